"""Objectives you can do arithmetic on (after Lucent's ``optvis.objectives``).

An objective maps a layer lookup ``acts`` (a mapping from layer names such as
``"logits"`` or ``"penultimate"`` to activations of a batch) to one loss value
per image; the optimiser minimises its batch mean. Objectives combine with
``+``, ``-`` and ``* scalar`` and carry a readable description, which goes into
the ``objective`` column: Eq.5 reads ``class_ce(c) - neuron("penultimate", f)``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

Acts = Mapping[str, torch.Tensor]


class Objective:
    def __init__(self, fn: Callable[[Acts], torch.Tensor], description: str, layers: frozenset[str] = frozenset(),
                 precedence: int = 3, recipe: tuple | None = None):
        self.fn = fn
        self.description = description
        self.layers = frozenset(layers)  # layers it reads, so the classifier hooks only those
        self._precedence = precedence  # 1: sum, 2: product, 3: atom — for parentheses in descriptions
        self._recipe = recipe  # (module-level builder, args) that makes this objective again

    def __reduce_ex__(self, protocol):
        # Pickled as the builder call that made it: a reference, not the closures by value. cloudpickle
        # pickles a closure by value and scans sys.modules for it, ~15 ms per task spec sent to a Ray actor.
        return self._recipe if self._recipe is not None else super().__reduce_ex__(protocol)

    def __call__(self, acts: Acts) -> torch.Tensor:
        return self.fn(acts)

    def __repr__(self) -> str:
        return f"Objective({self.description})"

    def _wrapped(self, at_least: int) -> str:
        return self.description if self._precedence >= at_least else f"({self.description})"

    def __add__(self, other: Objective) -> Objective:
        return Objective(lambda a: self(a) + other(a), f"{self.description} + {other._wrapped(2)}",
                         self.layers | other.layers, 1, (operator.add, (self, other)))

    def __sub__(self, other: Objective) -> Objective:
        return Objective(lambda a: self(a) - other(a), f"{self.description} - {other._wrapped(2)}",
                         self.layers | other.layers, 1, (operator.sub, (self, other)))

    def __mul__(self, scalar: float) -> Objective:
        if not isinstance(scalar, int | float):
            return NotImplemented
        return Objective(lambda a: scalar * self(a), f"{scalar:g} * {self._wrapped(2)}", self.layers, 2,
                         (operator.mul, (self, scalar)))

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return Objective(lambda a: -self(a), f"-{self._wrapped(3)}", self.layers, 3, (operator.neg, (self,)))


def class_ce(c: int) -> Objective:
    """Eq.3: cross-entropy of the logits against class ``c``."""

    def fn(acts: Acts) -> torch.Tensor:
        logits = acts["logits"]
        target = torch.full((logits.shape[0],), c, dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits.float(), target, reduction="none")

    return Objective(fn, f"class_ce({c})", frozenset({"logits"}), recipe=(class_ce, (c,)))


def class_logit(c: int) -> Objective:
    """The raw logit of class ``c`` (negate it to maximise)."""
    return Objective(lambda acts: acts["logits"][:, c].float(), f"class_logit({c})", frozenset({"logits"}),
                     recipe=(class_logit, (c,)))


def neuron(layer: str, unit: int) -> Objective:
    """Activation of ``unit`` in ``layer`` (channel mean for conv maps). Eq.4 is ``-neuron(...)``."""

    def fn(acts: Acts) -> torch.Tensor:
        x = acts[layer][:, unit].float()
        return x.flatten(1).mean(1) if x.dim() > 1 else x

    return Objective(fn, f"neuron({layer!r}, {unit})", frozenset({layer}), recipe=(neuron, (layer, unit)))
