"""Real-size architectures end to end (issue 21): every model the paper's job loads, at its real size with random
weights, saved in the hub's folder layout (:mod:`dxray.models.real_size`), then ``dxray explain`` on them through
the same ``from_pretrained`` paths, at a reduced resolution and step count. Prints the seconds and the peak RSS of
each stage and writes ``benchmarks/results/real-size-cpu.json``.

    python benchmarks/real_size.py --models ~/.cache/dxray/real-size     # builds the models once (~9 GB)

Two runs, each in its own process (so its peak RSS is its own):

* ``lcm``: jobs/configs/imagenet.yaml's models: an LCM_Dreamshaper_v7-layout LCM (its model_index.json lists a
  safety checker and a feature extractor), torchvision ResNet-50 from a weights file, Grounding DINO
  (grounding-dino-tiny size) + SAM ViT-B, with the segmenter control.
* ``lcm-lora``: an SD1.5 base + a LoRA of lcm-lora-sdv1-5's rank and target modules, fused, decoded by a
  taesd-size AutoencoderTiny, classifier-free guidance 1.5, and the robust ResNet-50 (a MadryLab-layout
  checkpoint converted with ``dxray convert-checkpoint``).

Random weights would give every Grounding DINO query a score near 1.0; the saved detector's output norm is scaled
so that box_threshold 0.9 keeps about 14 boxes per image, as a trained detector keeps a handful (SAM masks them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "jobs" / "configs" / "imagenet.yaml"
# reduced for a 2-core CPU: 128 px (16 x 16 latents), 2 sampler steps, 2 optimisation steps, 2 held-out images
SMALL = ["generator.resolution=128", "generator.steps=2", "generator.checkpointing=false", "optimize.steps=2",
         "optimize.batch_tasks=1", "sample.k=2", "sample.batch_size=2", "targets.classes=[309]", "targets.top_k=1",
         "segment.box_threshold=0.9", "segment.batch_size=2", "device=cpu"]


def runs(models: dict, out: str) -> dict[str, list[str]]:
    """The overrides of each run."""
    robust = str(Path(out) / "robust-resnet50.safetensors")
    return {
        "lcm": [f"generator.model={models['lcm']}", f"classifier.weights={models['resnet50']}",
                f"classifier.class_names={models['class_names']}", f"segment.detector={models['grounding_dino']}",
                f"segment.sam={models['sam']}", f"output={out}/lcm"],
        "lcm-lora": [f"generator.model={models['sd15']}", f"generator.lora={models['lcm_lora']}",
                     f"generator.tiny_vae={models['taesd']}", "generator.guidance_scale=1.5",
                     f"classifier.spec=robust-resnet50:{robust}", f"classifier.class_names={models['class_names']}",
                     f"segment.detector={models['grounding_dino']}", f"segment.sam={models['sam']}",
                     f"output={out}/lcm-lora"],
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def child(overrides: list[str]) -> None:
    """One ``dxray explain`` (the CLI's in-process runner) with a progress hook that times each stage."""
    from dxray import progress as ev
    from dxray.config import load_config
    from dxray.pipeline.local import run

    stages, t0 = [], time.perf_counter()
    last = [t0]

    def stage(name: str, **extra) -> None:
        now = time.perf_counter()
        stages.append({"stage": name, "seconds": round(now - last[0], 1), "peak_rss_mb": round(peak_rss_mb()),
                       **extra})
        last[0] = now

    def progress(event) -> None:
        if isinstance(event, ev.Preflighted):
            stage("preflight (config, model folders, classifier on the meta device)")
        elif isinstance(event, ev.Planned):
            stage("load generator + classifier + segmenter, rank features")
        elif isinstance(event, ev.TaskCommitted | ev.TaskFailed):
            data = event.row
            optimise = data.get("seconds")  # the task row's optimisation seconds (none for the control)
            stage(f"task {data.get('kind')} {data.get('class_index')}: optimise, sample, segment ({data['status']})",
                  optimise_s=round(optimise, 1) if optimise == optimise and optimise is not None else None)

    summary = run(load_config(str(CONFIG), SMALL + overrides), progress=progress)
    stage("finish (compact, verdicts, classes, manifest)")
    print(json.dumps({"run": summary.root, "ok": summary.ok, "failed": summary.failed, "errors": summary.errors,
                      "stages": stages, "total_s": round(time.perf_counter() - t0, 1)}))


def measure(name: str, overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(overrides)], capture_output=True,
                          text=True, cwd=ROOT, env=os.environ | {"TQDM_DISABLE": "1"})
    if proc.returncode:
        raise SystemExit(f"run {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(Path.home() / ".cache" / "dxray" / "real-size"),
                    help="where the real-size random models are built (once)")
    ap.add_argument("--out", default=None, help="runs' output folder (default: a folder beside --models)")
    ap.add_argument("--runs", default="lcm,lcm-lora")
    ap.add_argument("--json", default=str(RESULTS / "real-size-cpu.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))

    import torch

    from dxray.models.real_size import save_all

    t = time.perf_counter()
    models = save_all(Path(a.models))
    print(f"models ready in {time.perf_counter() - t:.0f} s under {a.models}", flush=True)
    out = a.out or str(Path(a.models).parent / "real-size-runs")
    Path(out).mkdir(parents=True, exist_ok=True)
    robust = Path(out) / "robust-resnet50.safetensors"
    subprocess.run([sys.executable, "-m", "dxray", "convert-checkpoint", models["robustness_checkpoint"],
                    str(robust)], check=True, capture_output=True, cwd=ROOT)
    doc = {"machine": f"{os.cpu_count()}-core CPU", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "settings": SMALL, "runs": {}}
    for name, overrides in runs(models, out).items():
        if name not in a.runs.split(","):
            continue
        print(f"run {name} ...", flush=True)
        doc["runs"][name] = r = measure(name, overrides)
        for s in r["stages"]:
            of_which = f" (optimising {s['optimise_s']} s)" if s.get("optimise_s") is not None else ""
            print(f"  {s['seconds']:8.1f} s  peak RSS {s['peak_rss_mb']:7.0f} MB  {s['stage']}{of_which}")
        print(f"  {r['total_s']:8.1f} s  total; tasks ok {r['ok']}, failed {r['failed']}; {r['run']}", flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
