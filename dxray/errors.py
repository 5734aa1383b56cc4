"""User-facing errors: one line, no traceback, raised before expensive work."""


class DxrayError(Exception):
    """An error the user can fix (bad config, bad input, missing file).

    The CLI prints ``error: <message>`` and exits with status 2; the message must
    fit on one line and name the offending field or value.
    """


def one_line(err: BaseException, limit: int | None = None, *, typed: bool = True) -> str:
    """An error as one line, the one helper for it: 'TypeName: first line of its message' (the type alone
    when it has none), or with ``typed=False`` its whole message with whitespace collapsed (the type when
    it has none); cut at ``limit`` characters with '...'."""
    text = str(err)
    if typed:
        first = text.splitlines()[0] if text else ""
        line = f"{type(err).__name__}: {first}" if first else type(err).__name__
    else:
        line = " ".join(text.split()) or type(err).__name__
    return line if limit is None or len(line) <= limit else line[:limit] + "..."
