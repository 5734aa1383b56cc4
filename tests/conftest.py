"""Shared fixtures: tiny random models built from configs, saved and loaded back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "jobs" / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One model cache for the session; tiny models are built into it on first use."""
    path = tmp_path_factory.mktemp("dxray-cache")
    os.environ["DXRAY_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_generator(cache_dir):
    from dxray.generator import LCMGenerator

    return LCMGenerator.from_pretrained("tiny", cache_dir=str(cache_dir), device="cpu", resolution=64)


@pytest.fixture(scope="session")
def tiny_classifier(cache_dir):
    from dxray.classifiers import load_classifier

    return load_classifier("tiny", device="cpu")


@pytest.fixture
def tiny_config(tmp_path, cache_dir):
    """The tiny preset, writing into a fresh folder, trimmed for speed."""
    from dxray.config import load_config

    return load_config(TINY_YAML, [f"output={tmp_path / 'out'}", f"cache_dir={cache_dir}",
                                                  "optimize.steps=2", "sample.k=2", "device=cpu"])


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session: 4 logical CPUs and 2 logical GPUs on this CPU machine."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, configure_logging=False, namespace="dxray-tests")
    yield ray
    ray.shutdown()
