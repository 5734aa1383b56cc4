"""Storage: Arrow schemas, the Parquet run sink, images, and manifest helpers."""

from __future__ import annotations

import os
import re
from importlib import metadata
from typing import Any

# "token" only as a whole word of the key (hf_token, AWS_SESSION_TOKEN), so n_tokens / tokenizer stay readable.
_SECRET_KEY = re.compile(r"secret|password|passwd|credential|private|access_?key|session_?key|api_?key"
                         r"|(?:^|[_\-.])token(?:$|[_\-.])", re.I)
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
# A query parameter whose name looks secret (?secret_key=..., &X-Amz-Signature=..., ;password=...): mask its value.
_SECRET_PARAM = re.compile(r"(?P<key>[?&;](?:[^=&;#\s]*(?:secret|password|passwd|credential|signature|sig|access_?key"
                           r"|session_?key|api_?key|token|auth)[^=&;#\s]*))=[^&;#\s'\"]*?(?=[&;#\s'\")]|[:,.]\s|[:,.]?$)", re.I)
# Values of these environment variables are secrets wherever they turn up (a library may echo one).
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HF_TOKEN",
               "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID")

PACKAGES = ("dxray", "torch", "torchvision", "diffusers", "transformers", "peft", "pyarrow", "ray", "pydantic", "numpy",
            "segment-anything")


def redact(obj: Any) -> Any:
    """A copy with secret-looking keys masked and URI credentials removed."""
    if isinstance(obj, dict):
        return {k: ("***" if v is not None and _SECRET_KEY.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_text(text: str) -> str:
    """``text`` with URI credentials (user:password@, secret-looking query values) and the values
    of the secret environment variables masked. Every message, log line, error row and manifest
    goes through here (the CLI's error line, the log handler, the sink's commit and manifest)."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    text = _SECRET_PARAM.sub(r"\g<key>=***", text)
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4 and value in text:  # tiny values would mask ordinary words
            text = text.replace(value, "***")
    return text


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
