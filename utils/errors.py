"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class UserError(Exception):
    """A problem the user can fix (bad path, wrong layout, missing weights); the message says how."""
