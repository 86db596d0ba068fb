"""The only readers and writers of each file kind the steps exchange."""
