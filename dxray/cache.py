"""The cache folder where dxray builds its presets on first use, and the one way to build into it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else $DXRAY_CACHE, else ~/.cache/dxray."""
    root = cache_dir or os.environ.get("DXRAY_CACHE") or Path.home() / ".cache" / "dxray"
    return Path(root).expanduser()


def built(target: Path) -> bool:
    """Whether a preset's folder is complete (a crashed build leaves none of it)."""
    return (target / ".complete").exists()


def build_once(target: Path, build) -> Path:
    """Build into a temporary sibling and rename, so a crash never leaves half a model. A file lock
    makes concurrent builders (several Ray actors on a fresh cache) wait for the first one instead
    of replacing a finished folder while another process is loading it."""
    from filelock import FileLock

    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / ".complete").exists():  # built by another process while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / ".complete").touch()
            shutil.rmtree(target, ignore_errors=True)  # a crashed build's leftovers, never a finished one
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
