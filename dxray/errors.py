"""User-facing errors: one line, no traceback, raised before expensive work."""


class DxrayError(Exception):
    """An error the user can fix (bad config, bad input, missing file).

    The CLI prints ``error: <message>`` and exits with status 2; the message must
    fit on one line and name the offending field or value.
    """


def one_line(err: BaseException, limit: int | None = None) -> str:
    """An error as one line: 'TypeName: first line of its message' (the type alone when it has none), cut at limit."""
    text = str(err)
    first = text.splitlines()[0] if text else ""
    line = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return line if limit is None else line[:limit]
