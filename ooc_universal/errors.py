"""The exceptions a user can act on, and the exit status each gets from the CLI.

  UsageError   the command line or the config is wrong (a value of the wrong type or
               range, an unknown key): exit 2, like click's own usage errors
  OocError     the command was well-formed but cannot run or failed: missing or damaged
               inputs, stale outputs, no room, a task that kept failing: exit 1
  (Ctrl-C)     exit 130; the same command resumes

The CLI prints `error: <message>` on one line; the message names the value received,
what was expected, and the fix.
"""


class OocError(Exception):
    """A user-fixable problem found while running (bad input, missing file, no room)."""


class UsageError(OocError):
    """The command line or config is wrong: a value of the wrong type or range."""


class StaleInputError(OocError):
    """An existing output was made from other inputs (another token set, model, config)."""


EXIT_FAILURE = 1      # a run-time failure (OocError)
EXIT_USAGE = 2        # a usage error (UsageError, click's usage errors)
EXIT_INTERRUPTED = 130
