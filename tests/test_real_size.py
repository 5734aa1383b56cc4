"""Real-size architectures end to end (issue 21; ``-m slow``, off by default: about 15 minutes and 10 GB of disk
on a 2-core CPU). Every model the paper's job loads is built at its real size with random weights, saved in the
hub's layout and run by ``dxray explain`` through the same ``from_pretrained`` paths (benchmarks/real_size.py,
which prints the seconds and peak RSS per stage). Needs ``pip install open-clip-torch`` (the real CLIP
vocabulary). Models are built once under $DXRAY_REAL_SIZE (default ~/.cache/dxray/real-size).

    pytest -m slow tests/test_real_size.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DXRAY_REAL_SIZE", Path.home() / ".cache" / "dxray" / "real-size"))


@pytest.fixture(scope="module")
def models() -> dict:
    from dxray.models.real_size import save_all

    return save_all(MODELS)


def test_the_dreamshaper_layout_passes_diffusion_pipelines_component_checks(models):
    """The folder is what a SimianLuo/LCM_Dreamshaper_v7 snapshot holds: DiffusionPipeline loads it whole (safety
    checker and feature extractor included), and dxray's loader takes it without the safety checker."""
    from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline

    index = json.loads((Path(models["lcm"]) / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    pipe = DiffusionPipeline.from_pretrained(models["lcm"])
    assert isinstance(pipe, LatentConsistencyModelPipeline) and pipe.safety_checker is not None
    assert pipe.unet.config.time_cond_proj_dim == 256
    assert sum(p.numel() for p in pipe.unet.parameters()) > 850e6  # SD1.5's UNet: 859.5M
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # real CLIP ids
    del pipe

    from dxray.generator import LCMGenerator

    g = LCMGenerator.from_pretrained(models["lcm"], device="cpu", dtype="float32", resolution=128, steps=2)
    assert g.w_embedding is not None and g.latent_shape == (4, 16, 16)


def test_the_lcm_lora_is_of_lcm_lora_sdv1_5s_size(models):
    from safetensors.torch import load_file

    state = load_file(str(Path(models["lcm_lora"]) / "pytorch_lora_weights.safetensors"))
    n = sum(t.numel() for t in state.values())
    assert 60e6 < n < 75e6, n  # lcm-lora-sdv1-5: 67.5M parameters (134.6 MB in fp16)
    assert any("conv_shortcut" in k for k in state) and any("time_emb_proj" in k for k in state)


def test_explain_runs_end_to_end_on_every_real_size_model(models, tmp_path):
    out = tmp_path / "runs"
    result = tmp_path / "real-size.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_size.py"), "--models", str(MODELS),
                           "--out", str(out), "--json", str(result)], cwd=ROOT, text=True, capture_output=True)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(result.read_text())
    assert set(doc["runs"]) == {"lcm", "lcm-lora"}
    for name, r in doc["runs"].items():
        assert r["failed"] == 0 and r["ok"] == 3, (name, r["errors"])  # class, feature and control tasks
        root = Path(r["run"])
        manifest = json.loads((root / "manifest.json").read_text())
        for table in ("feature_ranking", "tasks", "samples", "verdicts", "classes"):
            parts = list((root / table).glob("*.parquet"))
            assert parts and sum(pq.read_metadata(p).num_rows for p in parts) > 0, (name, table)
            assert manifest["rows"][table] > 0
        samples = pq.read_table(root / "samples").to_pandas()
        assert len(samples) == 3 * 2  # 3 tasks x 2 held-out images
        assert samples["boxes"].map(len).min() > 0  # the detector kept boxes and SAM masked them
        assert all(s["peak_rss_mb"] > 0 and s["seconds"] >= 0 for s in r["stages"])
