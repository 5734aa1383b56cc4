"""User-facing errors: one line, no traceback, raised before expensive work."""


class DxrayError(Exception):
    """An error the user can fix (bad config, bad input, missing file).

    The CLI prints ``error: <message>`` and exits with status 2; the message must
    fit on one line and name the offending field or value.
    """
