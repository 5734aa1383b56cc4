"""User-facing errors: one line, no traceback, raised before expensive work."""

import os
import re
import stat


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


# Characters that act on a terminal or a reader instead of showing: C0 controls but tab and newline (ESC starts
# terminal escapes, BEL ends OSC titles, CR overwrites a line), DEL, C1 controls (CSI as one byte) and the
# text-direction controls (a class name holding U+202E shows its tail reversed).
_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(value):
    """``value`` with each control character shown as ``[U+001B]``, for text that came from data (class names,
    errors recorded in a run) printed to a terminal or rendered in HTML; anything not a string as it is."""
    if isinstance(value, str) and _HIDDEN.search(value):
        return _HIDDEN.sub(lambda m: f"[U+{ord(m.group()):04X}]", value)
    return value


def what_is(path: str | os.PathLike) -> str:
    """What stands at a local path, for a message: 'a folder', 'a symlink to a folder', 'a character device',
    'a FIFO', 'a socket', 'a file', 'nothing' (a dangling symlink: 'a broken symlink')."""
    p = os.fspath(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        return "a broken symlink" if os.path.islink(p) else "nothing"
    except OSError as e:
        return f"something that cannot be read ({e.strerror or type(e).__name__})"
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a file"))
    kind = next((name for test, name in kinds if test(mode)), "something other than a file or folder")
    return f"a symlink to {kind}" if os.path.islink(p) else kind


def load_errors() -> tuple[type[BaseException], ...]:
    """What from_pretrained raises on a broken or missing model, not a bug in dxray: a missing file or hub id
    (OSError), a bad config (ValueError; KeyError: a model_index.json without '_class_name'), a damaged or
    truncated weights file (SafetensorError, last)."""
    from safetensors import SafetensorError

    return OSError, ValueError, KeyError, SafetensorError
