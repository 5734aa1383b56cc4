"""Shared fixtures: tiny random models built from configs, saved and loaded back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run by default (the `ci` profile: derandomized, no example
# database), so CI and `make test` cannot pass or fail by chance. `pytest --hypothesis-profile=dev` explores with
# fresh random examples each run (and keeps failures in .hypothesis/); pin what it finds as an @example.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("dev", derandomize=False, deadline=None, print_blob=True)
settings.load_profile("ci")

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
    from dxray.models.tiny import ensure_tiny_lcm

    return LCMGenerator.from_pretrained(str(ensure_tiny_lcm(cache_dir)), device="cpu", resolution=64)


@pytest.fixture(scope="session")
def tiny_classifier(cache_dir):
    from dxray.classifiers import load_classifier
    from dxray.models.tiny import ensure_tiny_classifier

    return load_classifier(f"hf:{ensure_tiny_classifier(cache_dir)}", device="cpu")


@pytest.fixture
def tiny_config(tmp_path, cache_dir):
    """The tiny preset, writing into a fresh folder, trimmed for speed."""
    from dxray.config import load_config

    return load_config(TINY_YAML, [f"output={tmp_path / 'out'}", f"cache_dir={cache_dir}",
                                                  "optimize.steps=2", "sample.k=2", "device=cpu"])


@pytest.fixture(scope="session")
def ray_local(s3):
    """One real local Ray for the session: 4 logical CPUs and 2 logical GPUs on this CPU machine.
    Started after the S3 server so its workers inherit the credentials, as a node's environment or
    instance role provides them on a cluster."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, configure_logging=False, namespace="dxray-tests")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One real S3 server (SeaweedFS, tests/s3server.py) for the session, with its bucket made and
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL / AWS_REGION set in os.environ
    (restored afterwards). The server has .bucket, .endpoint_url, .access_key, .secret_key, .env(),
    .client() and .stop() / .start() / .restart() (same ports and data: for outage tests)."""
    from s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    overrides = {**server.env(), "AWS_EC2_METADATA_DISABLED": "true"}
    cleared = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in (*overrides, *cleared)}
    try:
        server.make_bucket()
        for k in cleared:
            os.environ.pop(k, None)
        os.environ.update(overrides)
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def planted_reading(classifier, n: int) -> tuple[float, float, list[int]]:
    """How a toy-world (v4) classifier reads ``n`` held-out renders: (accuracy on the unplanted classes, accuracy on
    the planted classes' objects away from their planted background, its prediction for each bare planted
    background, in the order of ``render.BIASED``). A classifier that learned the shortcut: high, ~0, the classes."""
    from dxray.toyworld import render
    from dxray.toyworld.render import unit_images

    held = render.held_out_dataset(n, seed=1)
    with torch.no_grad():
        pred = classifier(unit_images([s for s, _ in held]), layers=[])["logits"].argmax(-1).tolist()
        bare = classifier(unit_images([render.Scene(b) for b in render.BIASED.values()]), layers=[])["logits"]
    right = lambda keep: [p == c for p, (s, c) in zip(pred, held, strict=True) if keep(s, c)]  # noqa: E731
    unbiased = right(lambda s, c: c not in render.BIASED)
    away = right(lambda s, c: c in render.BIASED and s.background != render.BIASED[c])
    return sum(unbiased) / len(unbiased), sum(away) / len(away), bare.argmax(-1).tolist()
