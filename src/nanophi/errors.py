"""The one exception type for mistakes a user can make (bad path, bad flag, corrupt checkpoint...).

The CLI turns a `UserError` into one line on stderr and exit code 2; anything else is a bug and keeps its
traceback. Messages say what is wrong *and* how to fix it.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
