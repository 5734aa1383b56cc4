"""Keep library chatter out of dxray's own progress output (CLI, Ray actors, Ray Data jobs)."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """Hide the libraries' load-time progress bars and advice; dxray reports its own progress."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    logging.getLogger("torch").setLevel(logging.ERROR)
    # huggingface_hub logs every retry of an unreachable hub ("Retrying in 8s [Retry 4/5]"): the one-line
    # error that follows says what failed.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
