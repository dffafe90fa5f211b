"""The one error type a user can cause. The CLI prints it in one line, without a traceback."""


class SDiTError(Exception):
    """A problem with the user's input, options or files; the message says what to do."""
