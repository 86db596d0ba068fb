"""Click commands, one per step; each validates, calls one library function, reports."""
