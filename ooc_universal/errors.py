"""One exception type for problems the user can fix.

The CLI prints `error: <message>` on one line and exits with status 2; the message
names the value received, what was expected, and the fix.
"""


class OocError(Exception):
    """A user-fixable problem (bad input, missing file, no room, ...)."""


class StaleInputError(OocError):
    """An existing output was made from other inputs (another token set, model, config)."""
