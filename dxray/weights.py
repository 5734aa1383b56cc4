"""Weight files read safely, for every model dxray loads: a checkpoint's tensors without running pickled code unless
the user opts in, one line naming the file and the objects when a pickle is refused, and one line from a hub or
``from_pretrained`` error. Shared by the generator, the classifiers and the segmenter."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from dxray.errors import DxrayError, load_errors, one_line

_TRACEBACK_ADVICE = re.compile(r"[\s.;,]*\b(please\s+)?(check\s+out|see|look\s+at)\b[^.]*\b(stack\s*trace|traceback)"
                               r"\s+above\b.*$", re.IGNORECASE | re.DOTALL)


def hub_reason(err: BaseException, limit: int = 300) -> str:
    """One line from a hub / from_pretrained error: its first line without advice pointing at a traceback
    above; the root cause (``__cause__``) is named instead when the tail was cut."""
    if isinstance(err, KeyError):
        return f"a config file lacks the key {err.args[0]!r}" if err.args else "a config file lacks a key"
    if isinstance(err, load_errors()[-1]):
        return f"a weights file is damaged or not safetensors ({' '.join(str(err).split())[:limit]})"
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    text = lines[0] if lines else type(err).__name__
    cut = _TRACEBACK_ADVICE.sub("", text).rstrip(" .;,")
    if cut != text.rstrip(" .;,") and err.__cause__ is not None:
        cause = (str(err.__cause__).strip().splitlines() or [""])[0]
        cut += f" ({type(err.__cause__).__name__}{': ' + cause if cause else ''})"
    return cut if len(cut) <= limit else cut[:limit] + "..."


def check_file(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DxrayError(f"classifier weights file not found: {path}")
    return p


def load_weights(model: nn.Module, path: str, allow_pickle: bool = False) -> None:
    """Load a .safetensors/.pt/.pth/.bin state dict (optionally nested, 'module.'-prefixed) into ``model``."""
    state = read_state_dict(path, allow_pickle)
    fit_state(model, {k.removeprefix("module."): v for k, v in state.items()}, path)


PICKLE_HINT = "set allow_pickle=True (classifier.allow_pickle) only if you trust the file"


def read_state_dict(path: str, allow_pickle: bool = False, pickle_hint: str = PICKLE_HINT) -> dict[str, Tensor]:
    """The tensors of a .safetensors/.pt/.pth/.bin checkpoint, unwrapped from 'state_dict'/'model';
    never runs pickled code unless ``allow_pickle`` (``pickle_hint`` says how to allow it)."""
    p = check_file(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except SafetensorError as err:
            raise DxrayError(f"cannot read checkpoint {path}: {one_line(err, 150, typed=False)}") from None
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=not allow_pickle)
        except pickle.UnpicklingError as err:
            if allow_pickle:
                raise DxrayError(f"cannot read checkpoint {path}: {one_line(err, 150, typed=False)}") from None
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f" ({found.group(1)})" if found else ""
            raise DxrayError(f"checkpoint {path} holds objects that weights_only loading refuses{what}; "
                             f"{pickle_hint}") from None
        except Exception as err:
            raise DxrayError(f"cannot read checkpoint {path}: {one_line(err, 150, typed=False)}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict | nn.Module):
            state = state[key]
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DxrayError(f"checkpoint {path} holds no state dict of tensors (looked under 'state_dict' and 'model')")
    return state


def pickle_refusal(what: str, folder: str, err: pickle.UnpicklingError, hint: str) -> str:
    """One line for a model folder whose checkpoint weights-only loading refused: which file holds which
    pickled objects, and ``hint`` (never "weights_only=False")."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    name, objects = "", found.group(1) if found else ""
    root = Path(folder).expanduser()
    if root.is_dir():  # name the file: the first .bin whose pickle imports something weights-only refuses
        for f in sorted([*root.glob("*.bin"), *root.glob("*/*.bin")]):
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
            except Exception:  # noqa: BLE001 - an old-format or unreadable file: the error's own name stays
                continue
            if unsafe:
                name, objects = f" ({f.relative_to(root)})", ", ".join(unsafe[:3])
                break
    return f"{what} holds a pickled checkpoint{name} that dxray does not unpickle{f' ({objects})' if objects else ''}; {hint}"


def fit_state(model: nn.Module, state: dict[str, Tensor], path: str) -> None:
    """Load ``state`` into ``model``; every key must match."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise DxrayError(f"checkpoint {path} does not fit the model: {one_line(err, 200, typed=False)}") from None
    if missing or unexpected:
        raise DxrayError(f"checkpoint {path} does not fit the model: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}")
