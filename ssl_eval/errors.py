"""The one exception type for errors a user can cause.

The CLI prints ``str(err)`` and exits non-zero without a traceback; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Something the user can fix: an unknown name, a missing file, a bad card or checkpoint.

    The message says what is wrong and what to do about it.
    """
