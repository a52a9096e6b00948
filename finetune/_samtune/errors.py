"""The one error type users see: every folder raises it, the CLI prints it without a traceback."""


class SamtuneError(Exception):
    """A problem the user can fix (bad recipe, missing file, wrong checkpoint).

    The CLI prints its message without a traceback and exits non-zero, so the message must name
    the file, key or value at fault and say how to fix it.
    """
