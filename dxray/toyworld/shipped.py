"""The canonical toy world ships with dxray as pinned weights, so every machine audits the same world.

Training depends on the CPU's float kernels (a world trained on one box differs from another's), so a world
built on first use made every toy-world figure and test belong to the machine that ran it. The world of seed
0 ships instead: ``weights/`` holds its generator, its biased classifier, its unbiased classifier and its biased
ViT (``classifier-vit``, the second classifier family) as safetensors + configs (6.9 MB), with world v5's
classifiers of seed 0 (``v5-classifier-{family}-rho{ρ}``, 2.4 MB: :data:`V5`). ``SHA256SUMS`` pins every file,
and ``pinned.json`` holds what the shipped models output on pinned inputs (``pinned_outputs``, and under ``v5``
``pinned_v5_outputs``), so a test on any machine can tell the world it loaded is the one that shipped. ``dxray toyworld train --force`` still builds a world from its seed and says whether the
rebuild equals the shipped one (``differences``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from dxray.errors import DxrayError

WEIGHTS = Path(__file__).parent / "weights"
SUMS = "SHA256SUMS"
PINNED = "pinned.json"
SEED = 0  # the world seed that ships (make demo's and CI's)
CLASSIFIERS = ("classifier", "classifier-unbiased", "classifier-vit")
# World v5's classifiers of world seed 0 (v5.ensure_classifier copies them): the CNN at every planted strength
# and the ViT at none and full, so no v5 test trains a classifier (2.4 MB; a generator would be 5.7 MB more).
V5_RHOS = {"cnn": (0.0, 0.5, 0.8, 0.95, 1.0), "vit": (0.0, 1.0)}
V5 = tuple(f"v5-classifier-{family}-rho{rho:g}" for family, rhos in V5_RHOS.items() for rho in rhos)
MODELS = ("generator", *CLASSIFIERS, *V5)


def available(seed: int | None) -> bool:
    """Whether the world of this seed ships with dxray (only seed 0 does)."""
    return (seed or 0) == SEED and (WEIGHTS / SUMS).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sums(root: Path) -> dict[str, str]:
    """The pinned sha256 of every file of the shipped world, by path relative to its root."""
    out = {}
    for line in (root / SUMS).read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name] = digest
    return out


def write_sums(root: Path) -> None:
    """Pin every model file under ``root`` (run once, when a new world ships)."""
    files = sorted(p for model in MODELS for p in (root / model).rglob("*") if p.is_file() and p.name != ".complete")
    (root / SUMS).write_text("".join(f"{_sha256(p)}  {p.relative_to(root).as_posix()}\n" for p in files))


def verify(root: Path, pinned: dict[str, str]) -> None:
    """Refuse, in one line naming the file, a world whose files are not the pinned ones."""
    for name, digest in pinned.items():
        path = root / name
        if not path.is_file():
            raise DxrayError(f"the shipped toy world is incomplete: {path} is missing (reinstall dxray)")
        if _sha256(path) != digest:
            raise DxrayError(f"the shipped toy world's {path} does not match its pinned sha256 (a damaged or "
                             f"altered file; reinstall dxray, or delete the cached copy to copy it again)")


def install(target: Path, models: tuple[str, ...], *, flat: bool = False) -> None:
    """Copy the shipped models, verified, into ``target`` (a folder being built) with the pins beside them;
    ``flat``: one model's files straight into ``target`` (a model folder of its own)."""
    pinned = sums(WEIGHTS)
    verify(WEIGHTS, {n: d for n, d in pinned.items() if n.split("/")[0] in models})
    for model in models:
        shutil.copytree(WEIGHTS / model, target if flat else target / model, dirs_exist_ok=True)
    if not flat:
        shutil.copy2(WEIGHTS / SUMS, target / SUMS)


def v5_available(seed: int, name: str) -> bool:
    """Whether world v5's classifier ``name`` (``classifier-{family}-rho{ρ}``) of this world seed ships."""
    return seed == SEED and f"v5-{name}" in V5 and (WEIGHTS / f"v5-{name}").is_dir()


def verify_model(folder: Path, model: str) -> None:
    """Refuse a copy of the shipped ``model`` (its files straight in ``folder``) whose files are not the pinned ones."""
    verify(folder, {n.split("/", 1)[1]: d for n, d in sums(WEIGHTS).items() if n.split("/")[0] == model})


def check_cached(root: Path, models: tuple[str, ...] = ("generator", "classifier")) -> None:
    """A cached copy of the shipped world is checked against the pins each time it is loaded (6 MB: ms)."""
    if (root / SUMS).is_file():
        verify(root, {n: d for n, d in sums(root).items() if n.split("/")[0] in models})


def differences(root: Path) -> dict[str, float]:
    """Largest absolute weight difference per model file between a built world and the shipped one
    (a missing or reshaped tensor counts as inf); empty when they are equal bit for bit."""
    from safetensors.torch import load_file

    out = {}
    for name in sums(WEIGHTS):
        if not name.endswith(".safetensors") or not (root / name).is_file():
            continue
        shipped, built = load_file(WEIGHTS / name), load_file(root / name)
        worst = 0.0
        for key, value in shipped.items():
            other = built.get(key)
            if other is None or other.shape != value.shape:
                worst = float("inf")
                break
            worst = max(worst, float((other.double() - value.double()).abs().max()) if value.numel() else 0.0)
        if worst or set(built) != set(shipped):
            out[name] = worst if set(built) == set(shipped) else float("inf")
    return out


def pinned_outputs(root: Path) -> dict:
    """What a world's models output on pinned inputs: each classifier's logits on 8 held-out renders, and the
    generator's images (pooled to 8 x 8) for two prompts on two noise seeds. Deterministic on any CPU up to
    float rounding (renders are integer drawings; noise comes from torch's CPU generator)."""
    import torch

    from dxray.classifiers import load_classifier
    from dxray.generator import LCMGenerator
    from dxray.toyworld import render

    scenes = [s for s, _ in render.held_out_dataset(8, seed=1)]
    out: dict = {}
    with torch.no_grad():
        for model in CLASSIFIERS:
            if (root / model).is_dir():
                clf = load_classifier(f"hf:{root / model}", device="cpu")
                out[model] = clf(render.unit_images(scenes), layers=[])["logits"].float().tolist()
        gen = LCMGenerator.from_pretrained(str(root / "generator"), device="cpu", resolution=render.SIZE)
        images = []
        for word in ("circle", "blue"):
            prompt = gen.soft_prompt("a {} on a background", 1)
            cond = gen.encode([prompt], [gen.init_rows(1, f"word:{word}", 0)])
            pooled = torch.nn.functional.adaptive_avg_pool2d(gen.generate(cond, [[0, 1]]), 8)
            images.append(pooled.float().tolist())
        out["generator"] = images
    return out


def v5_inputs() -> list:
    """Eight renders of world v5 (seed 1, every shortcut planted) that pin its classifiers' outputs."""
    from dxray.toyworld import shortcuts

    return [scene for scene, _ in shortcuts.classifier_dataset(8, seed=1, rho=1.0)]


def pinned_v5_outputs(folders: dict[str, Path]) -> dict:
    """Each world v5 classifier's logits on :func:`v5_inputs`, by shipped name (``folders``: name -> hf folder)."""
    import torch

    from dxray.classifiers import load_classifier
    from dxray.toyworld import render

    x = render.unit_images(v5_inputs())
    with torch.no_grad():
        return {name: load_classifier(f"hf:{path}", device="cpu")(x, layers=[])["logits"].float().tolist()
                for name, path in sorted(folders.items())}


def write_pinned(root: Path) -> None:
    (root / PINNED).write_text(json.dumps(pinned_outputs(root) | {"v5": pinned_v5_outputs(
        {m: root / m for m in V5 if (root / m).is_dir()})}) + "\n")
