"""Storage: Arrow schemas, the Parquet run sink, images, and manifest helpers."""

from __future__ import annotations

from importlib import metadata

from dxray.storage.masking import (
    SECRET_VARS,
    redact,
    redact_text,
    remember_secrets,
    secret_name,
    secret_values,
)

__all__ = ["PACKAGES", "SECRET_VARS", "package_versions", "redact", "redact_text", "remember_secrets", "secret_name",
           "secret_values"]

PACKAGES = ("dxray", "torch", "torchvision", "diffusers", "transformers", "peft", "pyarrow", "ray", "pydantic", "numpy",
            "segment-anything")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
