"""Keep library chatter out of dxray's own progress output (CLI, Ray actors, Ray Data jobs)."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Hide the libraries' load-time progress bars and advice; dxray reports its own progress."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    # diffusers logs "An error occurred while trying to fetch ..." before raising the error dxray reports in
    # its own one line: on a refusal that would be a second line.
    dlog.set_verbosity(dlog.CRITICAL)
    # The libraries' UserWarnings (torch's on loading, transformers' advice) are not dxray's to show: a refusal
    # is one line, and a run reports what matters itself.
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"(torch|torchvision|transformers|diffusers|huggingface_hub|safetensors)(\.|$)")
    logging.getLogger("torch").setLevel(logging.ERROR)
    # huggingface_hub logs every retry of an unreachable hub ("Retrying in 8s [Retry 4/5]"): the one-line
    # error that follows says what failed.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
