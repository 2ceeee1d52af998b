"""The one exception type that reaches the user as a one-line message.

Anything the user can fix (a missing file, a bad key, a malformed distribution) raises
`UserError`; the CLI prints `tuner: error: <message>` and exits with code 2. Every other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line with exit code 2."""
