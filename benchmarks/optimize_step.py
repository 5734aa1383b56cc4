"""Optimisation-step throughput of dxray's engine vs a naive research loop, its levers, FLOPs, projection.

Image-steps per second = (tasks x noise samples) optimised per second (one image-step: encode the
prompt, 4 LCM steps with gradients, decode, classifier, backward, AdamW). dxray's engine is
``dxray.optimize.optimize`` with S noise samples per step and several tasks per batch; the baseline
(``naive_*`` below, written by hand) is the loop research code usually has: one noise sample per
forward, full VAE decode, tasks one after another, default precision, no checkpointing; same modules,
same objective (class CE), same noise seeds, same number of image-steps. Each lever is measured on
its own against dxray's default, side by side (lever off, then on) in the same process.

    python benchmarks/optimize_step.py --preset tiny                      # CPU, seconds (make bench)
    python benchmarks/optimize_step.py --preset sd15 --out optimize_step-gpu.json   # GPU (make bench-gpu)

Models are random-weight architectures built from configs: the same compute as the real weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _models import classifier_for, components, tiny_autoencoder

from dxray.generator import LCMGenerator, training_seed
from dxray.objectives import class_ce
from dxray.optimize import OptimizeSettings, Target, optimize, sample

RESULTS = Path(__file__).parent / "results"
# Per preset: dxray's default for the measured step (tasks per batch = optimize.batch_tasks' default).
PRESETS = {
    "tiny": {"resolution": 64, "tasks": 4, "samples": 2, "rounds": 3, "warmup": 1, "objective_steps": 12},
    "sd15": {"resolution": 512, "tasks": 4, "samples": 1, "rounds": 5, "warmup": 2, "objective_steps": 30},
}
PEAK_BF16_DENSE = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # FLOP/s
LEVERS = ("bf16_autocast", "checkpointing", "tasks_per_batch", "tiny_vae", "torch_compile", "sdpa_attention",
          "grad_steps")


# -- the machine ------------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    rec = {"device": device.type, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "gpu": None}
    if device.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(device)
    return rec


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_DENSE.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def figure(value, baseline, unit: str, **extra) -> dict:
    ratio = round(value / baseline, 3) if value is not None and baseline else None
    return {"value": value, "baseline": baseline, "ratio": ratio, "unit": unit, **extra}


# -- the naive reference loop (the baseline) ---------------------------------------------------------
def naive_loss(parts: dict, clf, rows: torch.Tensor, seed: int, class_index: int, device: torch.device,
               resolution: int, steps: int = 4, guidance_scale: float = 1.0) -> torch.Tensor:
    """One noise sample, written the way research code does it: fp32, batch 1, full VAE decode."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    tok, text, unet, vae = parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"]
    ids = tok("", padding="max_length", max_length=77).input_ids  # [BOS, EOS, PAD, ...]
    ids = torch.tensor([[ids[0], tok.bos_token_id, *ids[1:76]]], device=device)  # placeholder at position 1
    hook = text.get_input_embeddings().register_forward_hook(
        lambda _m, _i, out: torch.cat([out[:, :1], rows[None].to(out.dtype), out[:, 2:]], dim=1))
    try:
        cond = text(input_ids=ids).last_hidden_state
    finally:
        hook.remove()
    sched = LCMScheduler.from_config(parts["scheduler"].config)
    sched.set_timesteps(steps, device=device, original_inference_steps=50)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, resolution // scale, resolution // scale), generator=gen).to(device)
    latents = latents * sched.init_noise_sigma
    w = torch.tensor([guidance_scale - 1.0])
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, w, embedding_dim=unet.config.time_cond_proj_dim).to(device)
    for t in sched.timesteps:
        pred = unet(latents, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample
        latents, denoised = sched.step(pred, t, latents, generator=gen, return_dict=False)
    image = vae.decode(denoised / vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    logits = clf(image)["logits"]
    return F.cross_entropy(logits, torch.tensor([class_index], device=device))


def naive_run(parts, clf, targets: list[Target], rows0: list[torch.Tensor], samples: int, steps: int,
              device, resolution: int, on_step=None) -> list[list[float]]:
    """Tasks one after another; S forward/backward passes of one sample each per step; AdamW lr 0.1."""
    curves = []
    for task, start in zip(targets, rows0, strict=True):
        rows = torch.nn.Parameter(start.clone().to(device))
        opt = torch.optim.AdamW([rows], lr=0.1, weight_decay=0.0)
        curve = []
        for step in range(steps):
            opt.zero_grad()
            total = 0.0
            for j in range(samples):
                seed = training_seed(task.seed, step, j, samples)
                loss = naive_loss(parts, clf, rows, seed, task.class_index, device, resolution) / samples
                loss.backward()
                total += loss.item()
            opt.step()
            curve.append(total)
            if on_step:
                on_step()
        curves.append(curve)
    return curves


# -- dxray's engine ----------------------------------------------------------------------------------
class Bench:
    def __init__(self, preset: str, device: torch.device, resolution: int):
        self.preset, self.device, self.resolution = preset, device, resolution
        self.parts = components(preset)
        self.clf = classifier_for(preset).to(device)
        self.n_classes = self.clf.num_classes
        self._taesd = None

    def generator(self, *, dtype=None, checkpointing=False, grad_steps=None, tiny_vae=False) -> LCMGenerator:
        p = self.parts
        if tiny_vae and self._taesd is None:
            self._taesd = tiny_autoencoder(self.preset)
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)  # dtype auto
        return LCMGenerator(p["tokenizer"], p["text_encoder"], p["unet"], self._taesd if tiny_vae else p["vae"],
                            p["scheduler"], device=self.device, dtype=dtype, resolution=self.resolution,
                            checkpointing=checkpointing, grad_steps=grad_steps)

    def targets(self, n: int) -> list[Target]:
        return [Target(class_ce(i % self.n_classes), "{}", 1, "random", seed=i, class_index=i % self.n_classes)
                for i in range(n)]

    def engine_step(self, gen: LCMGenerator, tasks: int, samples: int):
        """One optimisation step of dxray's engine (all tasks in one batch, S samples each)."""
        targets, settings = self.targets(tasks), OptimizeSettings(steps=1, samples_per_step=samples)
        return (lambda: optimize(gen, self.clf, targets, settings)), tasks * samples

    def naive_step(self, tasks: int, samples: int):
        """One task-step of the naive loop (S one-sample forward/backward passes, then AdamW); the
        tasks take turns, as one after another would."""
        targets = self.targets(tasks)
        rows = [torch.nn.Parameter(self.generator().init_rows(1, "random", t.seed).to(self.device))
                for t in targets]
        opts = [torch.optim.AdamW([r], lr=0.1) for r in rows]
        turn = iter(range(10**9))

        def step():
            i = next(turn) % tasks
            opts[i].zero_grad()
            for j in range(samples):
                seed = training_seed(targets[i].seed, 0, j, samples)
                (naive_loss(self.parts, self.clf, rows[i], seed, targets[i].class_index, self.device,
                            self.resolution) / samples).backward()
            opts[i].step()

        return step, samples

    def set_attention(self, classic: bool) -> None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        for m in (self.parts["unet"], self.parts["vae"]):
            m.set_attn_processor(AttnProcessor() if classic else AttnProcessor2_0())


def interleaved(device: torch.device, steps: dict, rounds: int, warmup: int) -> dict:
    """Time each ``(step_fn, image_steps)`` of ``steps`` in turns (A B A B ...): on a shared machine a
    load spike then hits every configuration alike. Speed from the fastest round (the least disturbed,
    as timeit does), the median alongside; peak GPU memory per configuration."""
    times: dict = {k: [] for k in steps}
    memory: dict = {}
    for r in range(warmup + rounds):
        for name, (fn, _) in steps.items():
            reset_memory(device)
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
            memory[name] = max(memory.get(name) or 0, peak_memory_gib(device) or 0) or None
    out = {}
    for name, (_, n) in steps.items():
        best, med = min(times[name]), statistics.median(times[name])
        out[name] = {"image_steps_per_s": round(n / best, 3), "image_steps_per_s_median": round(n / med, 3),
                     "step_s_min": round(best, 4), "step_s_median": round(med, 4), "image_steps_per_step": n,
                     "rounds": rounds, "peak_memory_gib": memory[name]}
    return out


# -- checks and figures ------------------------------------------------------------------------------
def same_outputs(bench: Bench, tasks: int, samples: int) -> dict:
    """First-step loss of the naive loop and of dxray's engine on the same rows and noise seeds: one
    task and one seed, both fp32; and task 0 of dxray's default batch (tasks x S, default dtype)."""
    gen32 = bench.generator(dtype=torch.float32)
    tol = 1e-4 if bench.device.type == "cpu" else 2e-3

    def pair(targets, gen, s, rtol):
        ours = optimize(gen, bench.clf, targets, OptimizeSettings(steps=1, samples_per_step=s))[0].loss_curve[0]
        rows0 = [gen.init_rows(1, "random", targets[0].seed)]
        ref = naive_run(bench.parts, bench.clf, targets[:1], rows0, s, 1, bench.device, bench.resolution)[0][0]
        return {"dxray": ours, "naive": ref, "abs_diff": abs(ours - ref), "rtol": rtol,
                "match": abs(ours - ref) <= rtol * max(abs(ref), 1e-8)}

    return {"one_task_one_seed_fp32": pair(bench.targets(1), gen32, 1, tol),
            "default_batch_task0": pair(bench.targets(tasks), bench.generator(), samples,
                                        tol if bench.device.type == "cpu" else 5e-2)}


def count_flops(bench: Bench, fn) -> int:
    """FLOPs of ``fn()`` (forward + backward), with classic attention: FlopCounterMode does not count
    the CPU SDPA kernel; the math is the same."""
    from torch.utils.flop_counter import FlopCounterMode

    bench.set_attention(classic=True)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        bench.set_attention(classic=False)
    return counter.get_total_flops()


def flops(bench: Bench, engine: dict) -> dict:
    """Model FLOPs per image-step (one task, one sample, no checkpointing recompute), dxray vs naive."""
    t = bench.targets(1)
    gen = bench.generator()
    ours = count_flops(bench, lambda: optimize(gen, bench.clf, t, OptimizeSettings(steps=1, samples_per_step=1)))
    rows0 = [gen.init_rows(1, "random", t[0].seed)]
    theirs = count_flops(bench, lambda: naive_run(bench.parts, bench.clf, t, rows0, 1, 1, bench.device,
                                                  bench.resolution))
    achieved = ours * engine["image_steps_per_s"]
    peak = peak_flops(bench.device)
    return {
        "flops_per_image_step": figure(ours, theirs, "FLOP", note="forward + backward of one optimisation step, "
                                       "counted by torch.utils.flop_counter.FlopCounterMode"),
        "achieved_flops_per_s": figure(round(achieved), None, "FLOP/s", note="FLOPs per image-step x dxray's "
                                       "image-steps/s (default settings)"),
        "mfu": figure(None if peak is None else round(achieved / peak, 4), None, "fraction of bf16 dense peak",
                      peak_flops=peak, note=None if peak else "CPU or unknown GPU: no peak, no MFU"),
    }


def sampling_seconds_per_image(bench: Bench, batch: int = 8, reps: int = 3) -> float:
    """No-grad held-out sampling (dxray.optimize.sample, batch 8), for the projection."""
    gen = bench.generator()
    rows = gen.init_rows(1, "random", 0)
    seeds = list(range(batch))
    sample(gen, bench.clf, "{}", rows, seeds, class_index=0, batch_size=batch)  # warm-up
    times = []
    for _ in range(reps):
        sync(bench.device)
        t0 = time.perf_counter()
        sample(gen, bench.clf, "{}", rows, seeds, class_index=0, batch_size=batch)
        sync(bench.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / batch


def meta_flops(preset: str, resolution: int, tiny_vae: bool = False) -> dict:
    """FLOPs of one image-step (forward + backward) and of one no-grad sample, counted on the meta device (shapes
    only, no compute, so the SD1.5-size figure is known on any machine): the generator by ``dxray.flops`` (what
    ``dxray audit --dry-run`` counts), the preset's ResNet-50 by ``dxray.classifiers.count_flops``."""
    from dxray.classifiers import count_flops
    from dxray.flops import generator_flops

    gen, (forward, backward) = generator_flops(preset, resolution, tiny_vae=tiny_vae), count_flops("torchvision:resnet50")
    return {"flops_per_image_step": gen["image_step"] + backward, "flops_per_sample_no_grad": gen["sample"] + forward,
            "by_part": {"generator_image_step": gen["image_step"], "classifier_backward": backward}}


def h100_projection(a) -> dict:
    """SD1.5-size 512 px FLOPs (meta count) at the target 40% MFU of an H100, through plan_estimate:
    an analytic figure, not a measurement."""
    peak, mfu = PEAK_BF16_DENSE["H100"], 0.4
    full, taesd = meta_flops("sd15", 512), meta_flops("sd15", 512, tiny_vae=True)
    seg = 1 / a.segment_images_per_s

    def hours(f):
        return _imagenet_plan(f["flops_per_image_step"] / (peak * mfu),
                              f["flops_per_sample_no_grad"] / (peak * mfu) + seg)[0]

    return figure(round(hours(full), 2), None, "H100-hours (analytic)", flops_full_vae=full, flops_taesd=taesd,
                  with_taesd_in_loop=round(hours({**full, "flops_per_image_step": taesd["flops_per_image_step"]}), 2),
                  assumptions=f"model FLOPs counted on the meta device at 40% MFU of {peak / 1e12:.0f} TFLOP/s; "
                              f"Grounding DINO + SAM assumed at {a.segment_images_per_s} images/s (unmeasured); "
                              "full-VAE held-out sampling", target=16)


# -- levers ------------------------------------------------------------------------------------------
def measure_lever(bench: Bench, name: str, a) -> dict:
    """One lever: dxray's default with the lever off (baseline) and on (value), interleaved."""
    dev, T, S = bench.device, a.tasks, a.samples
    cuda = dev.type == "cuda"

    def pair(off: dict, on: dict, **extra) -> dict:
        both = interleaved(dev, {"off": bench.engine_step(bench.generator(**off.get("gen", {})), off.get("tasks", T), S),
                                 "on": bench.engine_step(bench.generator(**on.get("gen", {})), on.get("tasks", T), S)},
                           a.rounds, a.warmup)
        return figure(both["on"]["image_steps_per_s"], both["off"]["image_steps_per_s"], "image-steps/s",
                      off=both["off"], on=both["on"], **extra)

    if name == "bf16_autocast":
        if not cuda:
            return {"status": "not measured on CPU (autocast to bf16 is CUDA-only in the engine)"}
        return pair({"gen": {"dtype": torch.float32}}, {"gen": {"dtype": torch.bfloat16}})
    if name == "checkpointing":
        return pair({}, {"gen": {"checkpointing": True}})
    if name == "tasks_per_batch":
        return pair({"tasks": 1}, {"tasks": 4})
    if name == "tiny_vae":
        return pair({}, {"gen": {"tiny_vae": True}}, decoder="random AutoencoderTiny ("
                    + ("taesd-size" if bench.preset == "sd15" else "2 blocks of 8 channels") + ")")
    if name == "grad_steps":
        out = pair({}, {"gen": {"grad_steps": 1}}, grad_steps=1)
        out["objective"] = grad_steps_objective(bench, a)
        return out
    if name == "sdpa_attention":
        classic = bench.generator()
        steps = {"off": bench.engine_step(classic, T, S), "on": bench.engine_step(bench.generator(), T, S)}
        times: dict = {}
        for label in ("off", "on"):  # the processor is per module: one configuration at a time
            bench.set_attention(classic=label == "off")
            try:
                times[label] = interleaved(dev, {label: steps[label]}, a.rounds, a.warmup)[label]
            finally:
                bench.set_attention(classic=False)
        return figure(times["on"]["image_steps_per_s"], times["off"]["image_steps_per_s"], "image-steps/s",
                      off=times["off"], on=times["on"], note="diffusers AttnProcessor2_0 (on) vs AttnProcessor "
                      "(off) in the UNet and VAE; measured one after the other")
    if name == "torch_compile":
        if not cuda and not a.compile_on_cpu:
            return {"status": "not measured on CPU by default: compiling the tiny UNet (forward + backward) took "
                              "432 s on the 2-core dev box (--compile-on-cpu measures it)"}
        return compile_lever(a, dev)
    raise ValueError(f"unknown lever {name!r}; choose from {', '.join(LEVERS)}")


def compile_and_time(bench: Bench, a) -> dict:
    """torch_compile: the UNet compiled (first call: forward and backward graphs) vs eager, interleaved."""
    dev, T, S = bench.device, a.tasks, a.samples
    gen = bench.generator()
    gen.unet = torch.compile(bench.parts["unet"], backend=a.compile_backend)
    fn, n = bench.engine_step(gen, T, S)
    try:
        print("compiling", flush=True)
        t0 = time.perf_counter()
        fn()  # compiles (forward and backward graphs)
        sync(dev)
        compile_s = round(time.perf_counter() - t0, 1)
        print(f"compiled in {compile_s} s; timing", flush=True)
        both = interleaved(dev, {"off": bench.engine_step(bench.generator(), T, S), "on": (fn, n)},
                           a.rounds, a.warmup)
    except Exception as err:  # unsupported backend, compiler missing...: record, don't crash the bench
        return {"status": "error", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    finally:
        torch._dynamo.reset()
    extra = {} if a.compile_backend == "inductor" else {"backend": a.compile_backend}
    return figure(both["on"]["image_steps_per_s"], both["off"]["image_steps_per_s"], "image-steps/s",
                  off=both["off"], on=both["on"], compile_s=compile_s, **extra)


def compile_lever(a, device: torch.device) -> dict:
    """The torch_compile lever within --compile-budget-s (0: no limit).

    A compile cannot be stopped safely inside the process (Inductor holds the GIL, its worker pool
    and the GPU), so the lever runs in a child process of its own (same arguments; it builds its
    own models, compiles, times off vs on, writes its figure to a file) started in a new session;
    at the budget the whole session is killed (child and compile workers) and the lever records
    "over budget" with the seconds spent and how far it got."""
    budget = a.compile_budget_s or None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the parent's cached blocks: the child needs the memory
    with tempfile.TemporaryDirectory(prefix="optimize_step-compile-") as tmp:
        out = Path(tmp) / "lever.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--preset", a.preset, "--device", str(device),
                "--resolution", str(a.resolution), "--tasks", str(a.tasks), "--samples", str(a.samples),
                "--rounds", str(a.rounds), "--warmup", str(a.warmup), "--compile-backend", a.compile_backend,
                "--compile-child", str(out)]
        lines: list[str] = []
        t0 = time.perf_counter()
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        reader = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in child.stdout), daemon=True)
        reader.start()
        try:
            rc = child.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            reader.join(timeout=10)
            stages = [x for x in lines if x.startswith(("building", "compiling", "compiled"))]
            return {"status": "over budget", "budget_s": budget, "seconds": round(time.perf_counter() - t0, 1),
                    "reached": stages[-1] if stages else "starting",
                    "note": "compiled and timed in a child process, killed at --compile-budget-s"}
        reader.join(timeout=10)
        if rc != 0 or not out.exists():
            return {"status": "error", "error": f"compile child exited {rc}: {(lines or ['no output'])[-1][:300]}"}
        result = json.loads(out.read_text())
    result["seconds"] = round(time.perf_counter() - t0, 1)  # the child's whole run: models, compile, timing
    return result


def compile_child(a, device: torch.device) -> None:
    """--compile-child FILE: measure the torch_compile lever alone and write its figure to FILE."""
    torch.manual_seed(0)
    print("building models", flush=True)
    Path(a.compile_child).write_text(json.dumps(compile_and_time(Bench(a.preset, device, a.resolution), a),
                                                default=float))


def _toyworld_ready() -> bool:
    from dxray.toyworld.train import folder

    return (folder(None) / ".complete").exists()


def grad_steps_objective(bench: Bench, a) -> dict:
    """Loss after N optimisation steps with backprop through the last k steps vs all of them. On the
    trained toy world when it is cached (it reacts to prompts), else on the preset's random models."""
    if _toyworld_ready():
        from dxray.classifiers import load_classifier
        from dxray.toyworld.train import ensure_toyworld

        world = "toyworld"
        root = ensure_toyworld()  # cached (checked above): nothing is trained
        gen_of = lambda k: LCMGenerator.from_pretrained(str(root / "generator"), device=str(bench.device),  # noqa: E731
                                                        resolution=32, grad_steps=k)
        clf = load_classifier(f"hf:{root / 'classifier'}", device=bench.device)
        classes = list(range(min(6, clf.num_classes)))
    else:
        world = f"{bench.preset} random weights (toy world not cached: random models barely react to prompts)"
        gen_of = lambda k: bench.generator(grad_steps=k)  # noqa: E731
        clf = bench.clf
        classes = list(range(min(2, bench.n_classes)))
    steps, s = a.objective_steps, 2
    targets = [Target(class_ce(c), "{}", 1, "random", seed=c, class_index=c) for c in classes]
    held_out = list(range(8))
    out = {"world": world, "steps": steps, "samples_per_step": s, "classes": classes, "runs": {}}
    for k in (None, 2, 1):
        gen = gen_of(k)
        t0 = time.perf_counter()
        res = optimize(gen, clf, targets, OptimizeSettings(steps=steps, samples_per_step=s))
        secs = time.perf_counter() - t0
        probs = [sum(x.class_prob for x in sample(gen, clf, "{}", r.rows, held_out, class_index=c)) / len(held_out)
                 for r, c in zip(res, classes, strict=True)]
        out["runs"]["all" if k is None else f"last_{k}"] = {
            "grad_steps": k, "seconds": round(secs, 2),
            "mean_first_loss": round(statistics.mean(r.loss_curve[0] for r in res), 4),
            "mean_final_loss": round(statistics.mean(statistics.mean(r.loss_curve[-3:]) for r in res), 4),
            "held_out_target_prob": [round(p, 3) for p in probs],
            "mean_held_out_target_prob": round(statistics.mean(probs), 3)}
    return out


# -- projection --------------------------------------------------------------------------------------
def _segment_figure(preset: str, device: torch.device, assumed: float) -> tuple[float, str]:
    """Images/s of Grounding DINO + SAM: a committed segment-*.json that matches, else ``assumed``."""
    from dxray.plan_estimate import load_figures

    want = "tiny" if preset == "tiny" else "IDEA-Research/grounding-dino-tiny,facebook/sam-vit-base"
    for f in load_figures(RESULTS):
        name = f["file"].rsplit("/", 1)[-1]
        on_gpu = bool(f.get("gpu")) or f.get("device") == "cuda"
        if name.startswith("segment-") and f.get("model") == want and on_gpu == (device.type == "cuda"):
            return f["dino_sam_images_per_s"], f"{f['file']} ({want})"
    return assumed, (f"assumed {assumed} images/s for {want} on this device: no committed segment-*.json "
                     f"measures it (set --segment-images-per-s)")


def _imagenet_plan(step_s: float, image_s: float):
    """(GPU-hours, plan) of the full-ImageNet audit by dxray.plan_estimate.estimate: 1000 classes x
    (1 class + 5 feature tasks), 200 steps, K = 10 held-out images, segmentation on."""
    from dxray.classifiers import ClassifierInfo
    from dxray.config import build_config
    from dxray.plan_estimate import estimate

    info = ClassifierInfo("torchvision:resnet50", 1000, [f"c{i}" for i in range(1000)], ["logits", "penultimate"],
                          2048)
    cfg = build_config({"targets": {"classes": list(range(1000)), "top_k": 5},
                        "optimize": {"steps": 200, "samples_per_step": 1}, "sample": {"k": 10},
                        "segment": {"enabled": True},
                        "estimate": {"seconds_per_step": step_s, "seconds_per_image": image_s}})
    plan = estimate(cfg, info, [])
    return plan.gpu_hours, plan


def projection(bench: Bench, engine: dict, naive: dict, a) -> dict:
    """The full-ImageNet audit from this run's measured seconds per image-step (dxray vs naive)."""
    seg_rate, seg_source = _segment_figure(bench.preset, bench.device, a.segment_images_per_s)
    image_s = sampling_seconds_per_image(bench) + 1 / seg_rate
    ours, plan = _imagenet_plan(1 / engine["image_steps_per_s"], image_s)
    theirs, _ = _imagenet_plan(1 / naive["image_steps_per_s"], image_s)
    return figure(round(ours, 2), round(theirs, 2), f"{bench.device.type}-hours", tasks=plan.total_tasks,
                  optimisation_steps=plan.optimisation_steps,
                  images_sampled_without_grad=plan.held_out_images + plan.baseline_images,
                  seconds_per_image_step=round(1 / engine["image_steps_per_s"], 5),
                  seconds_per_image=round(image_s, 5), segmentation=seg_source,
                  preset=f"{bench.preset} @ {bench.resolution} px",
                  assumptions="optimize.samples_per_step 1, restarts 1, sample.k 10, baseline images on "
                              "(dxray defaults); held-out sampling measured here (no grad, batch 8)")


# -- main --------------------------------------------------------------------------------------------
def table(doc: dict) -> str:
    rows = [("figure", "dxray", "baseline", "ratio", "unit")]

    def add(name, f):
        if "value" in f:
            rows.append((name, f["value"], f["baseline"], f["ratio"], f["unit"]))
        else:
            rows.append((name, f.get("status", "")[:40], "", "", ""))

    add("throughput vs naive loop", doc["throughput"])
    for k, v in doc["flops"].items():
        add(k, v)
    for k, v in doc["levers"].items():
        add(f"lever: {k} (on vs off)", v)
    add("projection: full ImageNet", doc["projection"])
    if "projection_h100_analytic" in doc:
        add("projection: SD1.5 512px at 40% H100 MFU", doc["projection_h100_analytic"])
    width = [max(len(str(r[i])) for r in rows) for i in range(5)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, width, strict=True)) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=list(PRESETS), default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--tasks", type=int, help="tasks per batch (dxray's default: 4)")
    ap.add_argument("--samples", type=int, help="noise samples per step S")
    ap.add_argument("--rounds", type=int, help="timed steps per configuration (interleaved; the fastest counts)")
    ap.add_argument("--warmup", type=int, help="untimed rounds first")
    ap.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated subset of {','.join(LEVERS)}")
    ap.add_argument("--objective-steps", type=int, help="optimisation steps of the grad_steps quality check")
    ap.add_argument("--compile-on-cpu", action="store_true")
    ap.add_argument("--compile-budget-s", type=float, default=150.0,
                    help="seconds for the torch_compile lever (its models, compile and timing); past it the lever "
                         "records 'over budget' and the run goes on; 0: no limit")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager, aot_eager: "
                    "to try the lever's plumbing quickly)")
    ap.add_argument("--compile-child", help=argparse.SUPPRESS)
    ap.add_argument("--no-h100-projection", dest="h100_projection", action="store_false",
                    help="skip the SD1.5-size FLOP count on the meta device and its H100 projection")
    ap.add_argument("--segment-images-per-s", type=float, default=16.0,
                    help="assumed Grounding DINO + SAM rate when no benchmark matches")
    ap.add_argument("--out", default="optimize_step.json", help="file name under benchmarks/results/")
    a = ap.parse_args()
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    from dxray.generator import resolve_device

    device = resolve_device(a.device)
    if a.compile_child:
        return compile_child(a, device)
    torch.manual_seed(0)
    bench = Bench(a.preset, device, a.resolution)
    print(f"optimize_step: {a.preset} @ {a.resolution}px on {device}: {a.tasks} tasks x S={a.samples}", flush=True)

    check = same_outputs(bench, a.tasks, a.samples)
    timed = interleaved(device, {"dxray": bench.engine_step(bench.generator(), a.tasks, a.samples),
                                 "naive": bench.naive_step(a.tasks, a.samples)}, a.rounds, a.warmup)
    engine, naive = timed["dxray"], timed["naive"]
    doc = {
        "benchmark": "optimize_step", "machine": machine(device),
        "config": {"preset": a.preset, "resolution": a.resolution, "lcm_steps": 4, "tasks_per_batch": a.tasks,
                   "samples_per_step": a.samples, "rounds": a.rounds, "warmup_rounds": a.warmup,
                   "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32", "checkpointing": False,
                   "attention": "SDPA (AttnProcessor2_0)", "decoder": "full VAE", "grad_steps": "all"},
        "throughput": figure(engine["image_steps_per_s"], naive["image_steps_per_s"], "image-steps/s",
                             dxray=engine, naive=naive, target_ratio=2.0,
                             naive_loop="1 noise sample per forward, full VAE decode, tasks one after another, "
                                        "float32, no checkpointing"),
        "same_outputs": check,
    }
    print(f"throughput: dxray {engine['image_steps_per_s']} vs naive {naive['image_steps_per_s']} image-steps/s "
          f"(same first-step loss: {check['one_task_one_seed_fp32']['match']})", flush=True)
    doc["flops"] = flops(bench, engine)
    doc["flops"]["peak_memory_gib"] = figure(engine["peak_memory_gib"], naive["peak_memory_gib"], "GiB",
                                             note=None if device.type == "cuda" else "CPU: not measured")
    doc["levers"] = {}
    for name in [x for x in a.levers.split(",") if x]:
        print(f"lever {name} ...", flush=True)
        try:
            doc["levers"][name] = measure_lever(bench, name, a)
        except torch.OutOfMemoryError as err:  # one lever out of memory must not lose the others
            doc["levers"][name] = {"status": "error", "error": f"out of memory: {str(err).splitlines()[0][:200]}"}
            torch.cuda.empty_cache()
    doc["projection"] = projection(bench, engine, naive, a)
    if a.h100_projection:
        print("SD1.5-size FLOPs on the meta device ...", flush=True)
        doc["projection_h100_analytic"] = h100_projection(a)
    doc["targets"] = {"throughput_ratio_vs_naive": 2.0, "mfu_h100": 0.4, "imagenet_h100_hours": 16}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / a.out  # an absolute --out replaces the folder
    out.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    print(table(doc))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
