"""Storage: Arrow schemas, the Parquet run sink, images, and manifest helpers."""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

# "token" only as a whole word of the key (hf_token, AWS_SESSION_TOKEN), so n_tokens / tokenizer stay readable.
_SECRET_KEY = re.compile(r"secret|password|passwd|credential|private|access_?key|session_?key|api_?key"
                         r"|(?:^|[_\-.])token(?:$|[_\-.])", re.I)
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)

PACKAGES = ("dxray", "torch", "torchvision", "diffusers", "transformers", "peft", "pyarrow", "ray", "pydantic", "numpy")


def redact(obj: Any) -> Any:
    """A copy with secret-looking keys masked and URI credentials removed."""
    if isinstance(obj, dict):
        return {k: ("***" if v is not None and _SECRET_KEY.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _USERINFO.sub(r"\g<scheme>***@", obj)
    return obj


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
