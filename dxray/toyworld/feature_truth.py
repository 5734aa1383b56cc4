"""The toy world's feature-level known answer (the paper's Fig. 6): is each penultimate feature core or
spurious for a class, decided by a controlled experiment on exact renders, with no dxray optimisation.

For class c and penultimate feature f (the input of the classifier's final linear layer), with a_f the
feature's activation and every mean taken over both textures:

- ``object_on_neutral`` O: mean a_f over renders of c's object (random size and position) on the neutral
  backgrounds (:data:`render.UNBIASED_BACKGROUNDS`: no biased class was ever shown on them);
- ``bare_neutral`` N: mean a_f over the same backgrounds with nothing drawn on them;
- ``bare``: mean a_f over the bare background of every colour (reported; the baseline and the scale below);
- ``baseline`` z: the feature's floor, what its responses are measured from. A rectified (ReLU) feature's
  floor is 0, where it is off. A signed feature (a ViT's layernormed CLS token: no level means off) has no
  fixed floor, so z is the lowest of its means over the reference conditions: the bare background of every
  colour and every class's object on the neutral backgrounds (the same for every class). The classifier's
  features count as rectified when no bare background makes any of them negative (:func:`is_signed`);
- object response ``o = O - N``: what drawing the class object adds to the feature;
- background response ``b = B - z``, B the feature's mean on the class's own training background, bare: the
  planted background of a biased class, the strongest of the neutral backgrounds (its training backgrounds)
  for an unbiased one;
- scale ``s = max(|O - z|, |bare - z| of every colour)``: the feature's peak response over these conditions,
  a magnitude (for a rectified feature: ``max(O, every bare colour)``).

The call (margins :data:`RATIO` and :data:`MIN_RESPONSE`) takes the responses with their signs: a feature task
maximises a_f, so only what raises the feature drives it (a negative response drives nothing):

- **core** when ``o >= RATIO * b`` and ``o >= MIN_RESPONSE * s``: the object drives the feature, clearly
  more than the class's background does;
- **spurious** when ``b >= RATIO * max(o, 0)`` and ``b >= MIN_RESPONSE * s``: the background drives it and
  the object does not (or less than half as much);
- **ambiguous** otherwise (both, or neither); excluded from agreement figures and counted.

For a rectified feature z = 0, and every number is what the rule measured before signed features existed
(world 0's CNN: all 384 labels the same). The floor is the signed analogue of ReLU's 0: taking world 0's CNN
features as signed (z = their floor, not 0) gives the same 384 labels, where the median of the bare colours
as z would change 9% of them. For a signed feature the call does not move when every activation is shifted by
a constant or scaled by a positive factor (tests/test_toyworld_features.py).

The margins were chosen on world 0's classifier by looking at these activations only (no audit): there,
every top-5 feature of a biased class has b / o >= 2.4 and every top-5 feature of an unbiased class
o / b >= 2.0, so a factor of 1.5 leaves room on both sides (benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np
import torch

from dxray.toyworld import render

RATIO = 1.5  # the winning response must be at least this many times the other one
MIN_RESPONSE = 0.25  # ...and at least this share of the feature's peak response
PER_BACKGROUND = 32  # object renders per neutral background (half plain, half striped)


def penultimate(classifier, scenes: list[render.Scene]) -> torch.Tensor:
    """The classifier's penultimate features of exact renders of ``scenes`` (scenes x features, on the CPU)."""

    with torch.no_grad():
        return classifier(render.unit_images(scenes), layers=["penultimate"])["penultimate"].float().cpu()


def object_scenes(class_index: int, per_background: int = PER_BACKGROUND, seed: int = 0) -> list[render.Scene]:
    """The class's object at random sizes and positions on every neutral background, half plain, half striped."""
    rng = np.random.default_rng(seed + 1000 * class_index)
    out = []
    for b in render.UNBIASED_BACKGROUNDS:
        for i in range(per_background):
            s = render.placed_scene(rng, b, class_index)
            out.append(render.Scene(b, render.TEXTURES[i % 2], s.colour, s.shape, s.x, s.y, s.size))
    return out


def call(o: float, b: float, scale: float, ratio: float = RATIO, min_response: float = MIN_RESPONSE) -> str:
    """core / spurious / ambiguous from the object response o, background response b and peak scale."""
    floor = min_response * scale
    if scale > 0 and o >= ratio * b and o >= floor:
        return "core"
    if scale > 0 and b >= ratio * max(o, 0.0) and b >= floor:
        return "spurious"
    return "ambiguous"


def is_signed(bare: torch.Tensor) -> bool:
    """Whether a classifier's penultimate features are signed: some bare background (colours x features
    means) makes some feature negative, which a rectified (ReLU, then pooled) feature never is."""
    return bool((bare < 0).any())


def floor(all_bare: torch.Tensor, all_objects: torch.Tensor, signed: bool) -> torch.Tensor:
    """Per feature, the baseline z of the module doc: 0 for rectified features, else the lowest mean over the
    reference conditions (``all_bare``: colours x features; ``all_objects``: classes x features)."""
    if not signed:
        return torch.zeros(all_bare.shape[1], dtype=all_bare.dtype)
    return torch.minimum(all_bare.min(0).values, all_objects.min(0).values)


def responses(objects: torch.Tensor, neutral: torch.Tensor, background: torch.Tensor, all_bare: torch.Tensor,
              baseline: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per feature: the object response o, background response b and scale s of the module doc, from
    ``objects`` (features): O; ``neutral`` (neutral colours x features); ``background`` (features): B;
    ``all_bare`` (colours x features); ``baseline`` (features): z."""
    scale = torch.maximum((objects - baseline).abs(), (all_bare - baseline).abs().max(0).values)
    return {"object_response": objects - neutral.mean(0), "background_response": background - baseline,
            "scale": scale}


def feature_truth(classifier, classes: list[int] | None = None, features: list[int] | None = None,
                  per_background: int = PER_BACKGROUND, seed: int = 0, signed: bool | None = None) -> list[dict]:
    """One row per (class, feature): the truth label and every number behind it (see the module doc).
    ``features``: the penultimate units to label (default all); ``signed``: whether the features are signed
    (default: :func:`is_signed` of the bare backgrounds' activations)."""
    classes = list(range(len(render.CLASSES))) if classes is None else classes
    bare = {b: penultimate(classifier, [render.Scene(b, t) for t in render.TEXTURES]).mean(0)
            for b in render.BACKGROUND_COLOURS}
    all_bare = torch.stack(list(bare.values()))  # colours x features
    neutral = torch.stack([bare[b] for b in render.UNBIASED_BACKGROUNDS])
    signed = is_signed(all_bare) if signed is None else signed
    # A signed feature's floor takes every class's objects, whichever classes are labelled.
    wanted = range(len(render.CLASSES)) if signed else classes
    objects = {c: penultimate(classifier, object_scenes(c, per_background, seed)).mean(0) for c in wanted}
    baseline = floor(all_bare, torch.stack(list(objects.values())) if signed else all_bare, signed)
    rows = []
    for c in classes:
        own = [render.BIASED[c]] if c in render.BIASED else list(render.UNBIASED_BACKGROUNDS)
        background = torch.stack([bare[b] for b in own]).max(0).values
        r = responses(objects[c], neutral, background, all_bare, baseline)
        fs = range(objects[c].numel()) if features is None else features
        for f in fs:
            o, b, scale = (float(r[k][f]) for k in ("object_response", "background_response", "scale"))
            rows.append({
                "class_index": c, "class_name": render.CLASS_NAMES[c], "planted_biased": c in render.BIASED,
                "feature_index": int(f), "truth": call(o, b, scale),
                "object_on_neutral": float(objects[c][f]), "bare_neutral": float(neutral[:, f].mean()),
                "object_response": o, "background_response": b, "scale": scale, "signed": signed,
                "baseline": float(baseline[f]),
                "bare": {name: float(v[f]) for name, v in bare.items()},
            })
    return rows


def margins() -> dict:
    return {"ratio": RATIO, "min_response": MIN_RESPONSE, "per_background": PER_BACKGROUND,
            "neutral_backgrounds": list(render.UNBIASED_BACKGROUNDS)}
