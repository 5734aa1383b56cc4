"""Image classifiers behind one interface: logits plus named activations, differentiable end to end.

Specs are ``torchvision:NAME``, ``hf:ID_OR_PATH``, ``timm:NAME``, ``robust-resnet50:PATH`` (a MadryLab
``robustness`` checkpoint or its safetensors conversion) or ``module.path:callable``.
Builders live in the plain dict ``BUILDERS`` (segment-anything ``build_sam.py`` style); each
returns a ``_Built`` and never loads weights when asked for a ``meta`` build (``describe``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dxray.errors import DxrayError, load_errors, one_line, what_is
from dxray.weights import (
    fit_state,
    hub_reason,
    load_weights,
    pickle_refusal,
    read_state_dict,
)

IMAGENET_SIZE = (224, 224)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_NAMES = ("fc", "classifier", "head", "heads", "last_linear")  # usual final-layer attributes
_IDENT = re.compile(r"[A-Za-z_][\w.]*")
_HF_HUB_KEYS = ("revision", "local_files_only", "token", "cache_dir", "subfolder")


@dataclass(frozen=True)
class ClassifierInfo:
    """Cheap metadata from the architecture alone (no weights)."""

    spec: str
    num_classes: int
    class_names: list[str]
    layer_names: list[str]
    feature_dim: int = 0  # inputs of the final linear layer (penultimate features)
    # Size of dim 1 of each named layer's output (what a neuron's unit indexes: channels of a conv map), from a
    # forward of one input on the meta device; a layer whose width is unknown is absent.
    layer_widths: dict[str, int] = field(default_factory=dict)


@dataclass
class _Built:
    model: nn.Module
    num_classes: int | None = None  # known from metadata; else taken from the final layer
    class_names: list[str] | None = None
    input_size: tuple[int, int] = IMAGENET_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    hf: bool = False


def _names_list(names: Sequence[str], limit: int = 30) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _is_path(ref: str) -> bool:
    return ref.startswith("~") or any(c in ref for c in "/\\.") or os.path.exists(ref)


def _meta_or_not(meta: bool):
    return torch.device("meta") if meta else contextlib.nullcontext()


# While describe(..., missing=[...]) runs: a meta build lists a weights file it cannot find here instead of
# raising (the architecture alone describes the model; the dry run of a job meant for another machine).
_MISSING: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("dxray_missing_files", default=None)


def _meta_file(path: str, message: str) -> None:
    """A meta build's check of a weights file: ``message`` unless it exists (or is only listed as missing)."""
    if Path(path).expanduser().is_file():
        return
    missing = _MISSING.get()
    if missing is None:
        raise DxrayError(message)
    missing.append(path)


def _load_file(model: nn.Module, path: str, meta: bool, allow_pickle: bool) -> None:
    """Check the file for a meta build (describe); load it otherwise."""
    if meta:
        _meta_file(path, f"classifier weights file not found: {path}")
    else:
        load_weights(model, path, allow_pickle)


def _build_torchvision(name: str, weights: str | None, kwargs: dict, meta: bool, allow_pickle: bool) -> _Built:
    from torchvision import models

    if name not in models.list_models():
        raise DxrayError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
    enum = None
    if weights not in (None, "none") and not _is_path(weights):
        members = models.get_model_weights(name).__members__
        if weights not in members:
            raise DxrayError(f"unknown weights {weights!r} for torchvision:{name}; available: {', '.join(members)}")
        enum = members[weights]
    if meta and enum is not None:  # what the weights would set, without downloading them
        kwargs = {"num_classes": len(enum.meta["categories"]), **kwargs}
    try:
        with _meta_or_not(meta):
            model = models.get_model(name, weights=None if meta else enum, **kwargs)
    except ValueError as err:
        raise DxrayError(f"cannot build torchvision:{name}: {one_line(err, 200, typed=False)}") from None
    if weights not in (None, "none") and enum is None:
        _load_file(model, weights, meta, allow_pickle)
    if enum is None:
        return _Built(model)
    t = enum.transforms()
    size = getattr(t, "crop_size", IMAGENET_SIZE)
    return _Built(model, len(enum.meta["categories"]), list(enum.meta["categories"]), _pair(list(size)),
                  tuple(getattr(t, "mean", IMAGENET_MEAN)), tuple(getattr(t, "std", IMAGENET_STD)))


def _processor_geometry(built: _Built, ref: str, kwargs: dict) -> None:
    """Size/mean/std from the image processor; ImageNet defaults when there is none."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(ref, **{k: kwargs[k] for k in _HF_HUB_KEYS if k in kwargs})
    except OSError:
        return
    built.mean = tuple(getattr(proc, "image_mean", None) or IMAGENET_MEAN)
    built.std = tuple(getattr(proc, "image_std", None) or IMAGENET_STD)
    crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
    for s in (crop, getattr(proc, "size", None)):
        if isinstance(s, int):
            built.input_size = (s, s)
            return
        if s is not None:
            h, w, edge = s.get("height"), s.get("width"), s.get("shortest_edge")
            if h and w:
                built.input_size = (int(h), int(w))
                return
            if edge:
                built.input_size = (int(edge), int(edge))
                return


def _build_hf(ref: str, weights: str | None, kwargs: dict, meta: bool, allow_pickle: bool) -> _Built:
    from transformers import AutoConfig, AutoModelForImageClassification

    path = os.path.expanduser(ref)
    if (ref.startswith(("/", "./", "../", "~")) or os.path.exists(path)) and not os.path.isdir(path):
        raise DxrayError(f"classifier folder not found: {ref}")
    if weights not in (None, "none", "DEFAULT") and not _is_path(weights):
        raise DxrayError(f"weights for hf:{ref} must be 'none', 'DEFAULT' or a checkpoint file, got {weights!r}")
    try:
        if meta or weights not in (None, "DEFAULT"):  # architecture only: meta build, random init or a file
            config = AutoConfig.from_pretrained(path, **kwargs)
            with _meta_or_not(meta):
                model = AutoModelForImageClassification.from_config(config)
        else:  # transformers reads a pytorch_model.bin weights-only, whatever it is told
            model = AutoModelForImageClassification.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise DxrayError(pickle_refusal(f"classifier 'hf:{ref}'", path, err, "set classifier.allow_pickle=true "
                                            "only if you trust it, or re-save it as safetensors once (save_pretrained "
                                            "writes model.safetensors)")) from None
        model = _hf_unpickled(path, kwargs)
    except load_errors() as err:
        raise DxrayError(f"cannot load classifier 'hf:{ref}': {hub_reason(err, 200)}") from None
    if weights not in (None, "none", "DEFAULT"):
        _load_file(model, weights, meta, allow_pickle)
    id2label = model.config.id2label or {}
    n = model.config.num_labels
    built = _Built(model, n, [str(id2label.get(i, id2label.get(str(i), f"class_{i}"))) for i in range(n)], hf=True)
    if not meta:
        _processor_geometry(built, path, kwargs)
    return built


def _hf_unpickled(path: str, kwargs: dict) -> nn.Module:
    """The folder's architecture with its pickled ``pytorch_model*.bin`` weights (classifier.allow_pickle),
    tensors only; a ``.bin`` transformers refused to unpickle."""
    from transformers import AutoConfig, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(path, **kwargs))
    state: dict[str, Tensor] = {}
    for f in sorted(Path(path).glob("pytorch_model*.bin")):
        try:
            loaded = torch.load(f, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - whatever the unpickling raised, in one line
            raise DxrayError(f"cannot read checkpoint {f}: {one_line(err, 150, typed=False)}") from None
        state |= {k: v for k, v in loaded.items() if isinstance(v, Tensor)} if isinstance(loaded, dict) else {}
    fit_state(model, state, path)
    return model


def _build_timm(name: str, weights: str | None, kwargs: dict, meta: bool, allow_pickle: bool) -> _Built:
    try:
        import timm
        import timm.data
    except ImportError:
        raise DxrayError("timm is not installed; pip install 'dxray[timm]'") from None
    file = weights not in (None, "none") and _is_path(weights)
    pretrained = weights not in (None, "none") and not file
    try:
        with _meta_or_not(meta):
            model = timm.create_model(name, pretrained=pretrained and not meta, **kwargs)
    except RuntimeError as err:
        raise DxrayError(f"cannot build timm:{name}: {one_line(err, 200, typed=False)}") from None
    if file:
        _load_file(model, weights, meta, allow_pickle)
    cfg = timm.data.resolve_data_config(model=model)
    built = _Built(model, model.num_classes, None, _pair(list(cfg["input_size"][1:])),
                   tuple(cfg["mean"]), tuple(cfg["std"]))
    if pretrained:
        names = model.pretrained_cfg.get("label_names")
        subset = None if names else timm.data.infer_imagenet_subset(model)
        if subset:
            info = timm.data.ImageNetInfo(subset)
            names = [info.index_to_description(i) for i in range(info.num_classes())]
        built.class_names = list(names) if names else None
    return built


def _build_callable(spec: str, weights: str | None, kwargs: dict, meta: bool, allow_pickle: bool) -> _Built:
    module_name, _, attr = spec.partition(":")
    try:
        fn = functools.reduce(getattr, attr.split("."), importlib.import_module(module_name))
    except (ImportError, AttributeError) as err:
        raise DxrayError(f"cannot import classifier builder {spec!r}: {one_line(err, 150, typed=False)}") from None
    with _meta_or_not(meta):
        model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise DxrayError(f"classifier builder {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights not in (None, "none", "DEFAULT"):
        if not _is_path(weights):
            raise DxrayError(f"weights for {spec} must be a checkpoint file, got {weights!r}")
        _load_file(model, weights, meta, allow_pickle)
    return _Built(model)


class InputNormalize(nn.Module):
    """The ``robustness`` library's input layer: clamp to [0, 1], then (x - new_mean) / new_std."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("new_mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("new_std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (torch.clamp(x, 0, 1) - self.new_mean) / self.new_std


class RobustResNet50(nn.Module):
    """A torchvision ResNet-50 behind the ``robustness`` library's ``InputNormalize`` (MadryLab ImageNet models,
    e.g. the L2 eps=3 ``imagenet_l2_3_0.pt`` of Salient ImageNet). Layer names are torchvision's plus
    ``normalizer``, so the state dict is the converted safetensors layout."""

    def __init__(self, **kwargs):
        from torchvision.models import resnet50

        super().__init__()
        self.normalizer = InputNormalize()
        for name, child in resnet50(weights=None, **kwargs).named_children():
            self.add_module(name, child)

    def forward(self, x: Tensor) -> Tensor:  # torchvision's ResNet._forward_impl after the normaliser
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalizer(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def robust_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``robustness`` checkpoint's ``model`` dict in ``RobustResNet50`` layout: ``module.``/``model.`` prefixes
    stripped, the attacker's duplicate dropped, ``normalizer.new_mean/new_std`` kept (as 3x1x1)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("attacker."):
            continue
        if key.startswith("normalizer."):
            out[key] = value.reshape(3, 1, 1) if value.numel() == 3 else value
        else:
            out[key.removeprefix("model.")] = value
    return out


def _robust_pickle_hint(path: str) -> str:
    return (f"set classifier.allow_pickle=true only if you trust the file, or convert it once: "
            f"dxray convert-checkpoint {path} OUT.safetensors --allow-pickle")


def _build_robust(path: str, weights: str | None, kwargs: dict, meta: bool, allow_pickle: bool) -> _Built:
    from torchvision.models import ResNet50_Weights

    if weights not in (None, "DEFAULT"):
        raise DxrayError(f"classifier.weights must stay DEFAULT for robust-resnet50 (the checkpoint is the spec's "
                         f"path), got {weights!r}")
    if meta:
        _meta_file(path, f"robust-resnet50 checkpoint not found: {path}")
    elif not Path(path).expanduser().is_file():
        raise DxrayError(f"robust-resnet50 checkpoint not found: {path}")
    with _meta_or_not(meta):
        model = RobustResNet50(**kwargs)
    if not meta:
        state = robust_state_dict(read_state_dict(path, allow_pickle, _robust_pickle_hint(path)))
        defaults = model.normalizer.state_dict()  # ImageNet mean/std, when the checkpoint has no normaliser
        fit_state(model, {**{f"normalizer.{k}": v for k, v in defaults.items()}, **state}, path)
        if not bool((model.normalizer.new_std > 0).all()):
            raise DxrayError(f"checkpoint {path}: normalizer.new_std must be positive, got "
                             f"{model.normalizer.new_std.flatten().tolist()}")
    n = model.fc.out_features
    names = list(ResNet50_Weights.DEFAULT.meta["categories"]) if n == 1000 else None
    # The normaliser is inside the model: Classifier.preprocess only resizes ((x - 0) / 1 is exact).
    return _Built(model, n, names, IMAGENET_SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _robust_layout_error(src: str, state: dict[str, Tensor]) -> str | None:
    """Why ``state`` (in RobustResNet50 layout) is not a robust ResNet-50's network, or None when it is."""
    with torch.device("meta"):
        layout = list(RobustResNet50().state_dict())
    network = [k for k in layout if not k.startswith("normalizer.")]
    missing = [k for k in network if k not in state]
    unexpected = [k for k in state if k not in layout]
    if not missing and not unexpected:
        return None
    return (f"checkpoint {src} does not hold a robustness ResNet-50: expected torchvision resnet50's "
            f"{len(network)} tensors (conv1.weight, bn1.*, layer1-4.*, fc.weight, fc.bias; optionally under "
            f"module.model. or model.) and normalizer.new_mean/new_std; {len(missing)} missing e.g. {missing[:3]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:3]}")


def convert_checkpoint(src: str | Path, dst: str | Path, allow_pickle: bool = False) -> dict[str, int | str]:
    """Write a ``robustness`` checkpoint's network and normaliser as a safetensors file that
    ``robust-resnet50:DST`` loads without unpickling; returns what was written. DST's folder must exist,
    and SRC must hold every tensor of the ResNet-50 (nothing else but the normaliser and the attacker copy)."""
    from safetensors.torch import save_file

    src, dst = str(src), Path(dst).expanduser()
    if dst.suffix != ".safetensors":
        raise DxrayError(f"convert-checkpoint: DST must end in .safetensors, got {str(dst)!r}")
    if not dst.parent.is_dir():
        raise DxrayError(f"convert-checkpoint: DST's folder {dst.parent} does not exist (create it first)")
    if dst.is_dir():
        raise DxrayError(f"convert-checkpoint: DST {dst} is a folder; give the file to write")
    if dst.exists() and dst.resolve() == Path(src).expanduser().resolve():
        raise DxrayError(f"convert-checkpoint: DST is the same file as SRC ({src})")
    if not Path(src).expanduser().is_file():
        raise DxrayError(f"convert-checkpoint: SRC not found: {src}")
    hint = "pass --allow-pickle only if you trust the file"
    state = robust_state_dict(read_state_dict(src, allow_pickle, hint))
    norm = [k for k in state if k.startswith("normalizer.")]
    if not state.keys() - set(norm):
        raise DxrayError(f"checkpoint {src} holds no network weights (only {norm})")
    why = _robust_layout_error(src, state)
    if why:
        raise DxrayError(why)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(dst),
              metadata={"format": "pt", "source": Path(src).name, "layout": "dxray robust-resnet50"})
    return {"path": str(dst), "tensors": len(state), "normalizer": "from the checkpoint" if norm else "absent "
            "(ImageNet mean/std when loaded)"}


BUILDERS: dict[str, Callable[..., _Built]] = {
    "torchvision": _build_torchvision,
    "hf": _build_hf,
    "timm": _build_timm,
    "robust-resnet50": _build_robust,
}


def _builder(spec: str) -> tuple[Callable[..., _Built], str]:
    """The builder of ``spec`` and the reference it is given."""
    scheme, sep, ref = spec.partition(":")
    if sep and ref and scheme in BUILDERS:
        return BUILDERS[scheme], ref
    if sep and _IDENT.fullmatch(scheme) and _IDENT.fullmatch(ref):
        return _build_callable, spec
    raise DxrayError(f"unknown classifier spec {spec!r}; expected torchvision:NAME, hf:ID_OR_PATH, "
                     f"timm:NAME, robust-resnet50:PATH or module.path:callable")


def imported_callable(spec: str) -> str | None:
    """``module:callable`` when ``spec`` makes dxray import a module and call something in it (a config is
    trusted like code, as Hydra's ``_target_``); None for the built-in builders."""
    try:
        return spec if _builder(spec)[0] is _build_callable else None
    except DxrayError:
        return None


def _build(spec: str, weights: str | None, kwargs: dict | None, meta: bool, allow_pickle: bool = False) -> _Built:
    builder, ref = _builder(spec)
    try:
        return builder(ref, weights, dict(kwargs or {}), meta, allow_pickle)
    except TypeError as err:  # almost always a bad keyword in `kwargs`
        from dxray.storage import redact_text

        # The keys only: a value may be a token, a password or a header (values are never printed).
        keys = ", ".join(map(str, kwargs or {})) or "none"
        raise DxrayError(f"cannot build classifier {spec!r} with kwargs ({keys}; values not shown): "
                         f"{redact_text(one_line(err, 150, typed=False))}") from None


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[-1]))


def _find_final(model: nn.Module, name: str | None, num_classes: int | None) -> tuple[str, nn.Linear]:
    """The final linear layer: ``name``, a usual head attribute, or the last fitting nn.Linear."""
    modules = dict(model.named_modules())
    if name is not None and (not name or name not in modules):
        raise DxrayError(f"final_layer: unknown layer {name!r}; available: {_names_list([n for n in modules if n])}")
    roots = [name] if name is not None else [n for n in HEAD_NAMES if n in modules] + [""]
    for root in roots:
        found = [(f"{root}.{n}" if root and n else root or n, m) for n, m in modules[root].named_modules()
                 if isinstance(m, nn.Linear) and num_classes in (None, m.out_features)]
        if found:
            return found[-1]
    raise DxrayError(f"no final nn.Linear layer found under {name or 'the model'!r}"
                     f"{f' with {num_classes} outputs' if num_classes else ''}; set final_layer")


def _class_names(given: list[str] | str | None, default: list[str] | None, n: int) -> list[str]:
    if isinstance(given, str):
        p = Path(given).expanduser()
        if not p.is_file():
            raise DxrayError(f"class_names {given} is {what_is(p)}, not a file" if p.exists() else
                             f"class_names file not found: {given}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:  # as segment.concepts and prompt.hard.vocabulary say it
            reason = "is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"cannot be read ({e.strerror})"
            raise DxrayError(f"classifier.class_names: file {given!r} {reason}") from None
        given = [line.strip() for line in text.splitlines() if line.strip()]
    names = list(given) if given is not None else default or [f"class_{i}" for i in range(n)]
    if len(names) != n:
        raise DxrayError(f"class_names has {len(names)} names but the classifier has {n} classes")
    return names


def _layer_names(model: nn.Module) -> list[str]:
    return ["logits", "penultimate"] + [n for n, _ in model.named_modules() if n]


def _layer_widths(built: _Built, input_size: tuple[int, int] | None) -> dict[str, int]:
    """Dim 1 of every named module's output, from one forward on the meta device (no memory, no compute);
    {} when the model cannot run on meta tensors."""
    widths: dict[str, int] = {}

    def keep(_module, _args, out, name):
        with contextlib.suppress(DxrayError, IndexError):
            widths[name] = int(_first_tensor(out).shape[1])

    handles = [m.register_forward_hook(functools.partial(keep, name=n)) for n, m in built.model.named_modules() if n]
    try:
        x = torch.empty(1, 3, *(input_size or built.input_size), device="meta")
        with torch.no_grad():
            built.model(pixel_values=x) if built.hf else built.model(x)
    except Exception:  # noqa: BLE001 - a model that needs real tensors: widths unknown, checked when it runs
        return {}
    finally:
        for h in handles:
            h.remove()
    return widths


def count_flops(spec: str, *, weights: str | None = None, kwargs: dict | None = None,
                input_size: int | tuple[int, int] | None = None) -> tuple[int | None, int | None]:
    """FLOPs of one image at the input size, counted on the meta device from the architecture alone (a weights file
    that is not here does not matter): a forward (scoring a held-out image) and a forward + backward to the input
    (one optimisation image-step; the weights are frozen, so no weight gradients). (None, None) when the model
    cannot run on meta tensors."""
    token = _MISSING.set([])
    try:
        built = _build(spec, weights, kwargs, meta=True)
    finally:
        _MISSING.reset(token)
    return _flops(built, _pair(input_size) if input_size else None)


def _flops(built: _Built, input_size: tuple[int, int] | None) -> tuple[int | None, int | None]:
    from torch.utils.flop_counter import FlopCounterMode

    run = (lambda x: built.model(pixel_values=x)) if built.hf else built.model  # noqa: E731
    built.model.requires_grad_(False)  # as an audit runs it: frozen
    try:
        x = torch.empty(1, 3, *(input_size or built.input_size), device="meta")
        with torch.no_grad(), FlopCounterMode(display=False) as forward:
            run(x)
        x.requires_grad_(True)
        with FlopCounterMode(display=False) as both:
            _first_tensor(run(x)).float().sum().backward()
    except Exception:  # noqa: BLE001 - a model that needs real tensors: its cost is unknown here
        return None, None
    return forward.get_total_flops(), both.get_total_flops()


def describe(spec: str, *, weights: str | None = None, kwargs: dict | None = None,
             class_names: list[str] | str | None = None, input_size: int | tuple[int, int] | None = None,
             missing: list[str] | None = None) -> ClassifierInfo:
    """Classes, layer names and widths from the architecture alone, built on the meta device.
    With ``missing`` (a list), a weights file that is not here is appended to it instead of raised."""
    token = _MISSING.set(missing)
    try:
        built = _build(spec, weights, kwargs, meta=True)
    finally:
        _MISSING.reset(token)
    _, final = _find_final(built.model, None, built.num_classes)
    n = built.num_classes or final.out_features
    widths = _layer_widths(built, _pair(input_size) if input_size else None)
    widths |= {"logits": n, "penultimate": final.in_features}
    return ClassifierInfo(spec, n, _class_names(class_names, built.class_names, n), _layer_names(built.model),
                          final.in_features, widths)


def load_classifier(spec: str, *, weights: str | None = None, kwargs: dict | None = None,
                    class_names: list[str] | str | None = None,
                    input_size: int | tuple[int, int] | None = None,
                    mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                    final_layer: str | None = None,
                    device: str | torch.device = "cpu", allow_pickle: bool = False) -> Classifier:
    """Build ``spec``, load its weights and wrap it as an eval-mode, frozen ``Classifier``."""
    built = _build(spec, weights, kwargs, meta=False, allow_pickle=allow_pickle)
    final_name, final = _find_final(built.model, final_layer, built.num_classes)
    n = built.num_classes or final.out_features
    return Classifier(
        built.model, final_layer=final_name, class_names=_class_names(class_names, built.class_names, n),
        input_size=_pair(input_size) if input_size else built.input_size,
        mean=tuple(mean or built.mean), std=tuple(std or built.std), hf=built.hf,
    ).to(device)


def _first_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, tuple | list) else ()
    for v in values:
        if isinstance(v, Tensor):
            return v
    raise DxrayError(f"layer output of type {type(out).__name__} holds no tensor")


class Classifier(nn.Module):
    """A frozen, eval-mode classifier: ``forward(images, layers)`` -> {"logits", **activations}."""

    def __init__(self, model: nn.Module, *, final_layer: str, class_names: list[str],
                 input_size: tuple[int, int], mean: tuple, std: tuple, hf: bool = False):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.final_layer_name = final_layer
        self.class_names = list(class_names)
        self.num_classes = len(class_names)
        self.input_size, self.mean, self.std, self.hf = tuple(input_size), tuple(mean), tuple(std), hf
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.register_buffer("_mean", torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std, dtype=dtype).view(1, -1, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> Classifier:
        return super().train(False)  # always eval: batch-norm statistics stay fixed

    @property
    def final_linear(self) -> nn.Linear:
        return self.model.get_submodule(self.final_layer_name)

    @property
    def final_weight(self) -> Tensor:
        return self.final_linear.weight

    def layer_names(self) -> list[str]:
        return _layer_names(self.model)

    def preprocess(self, images: Tensor) -> Tensor:
        """B×3×H×W in [0, 1] -> resized (antialiased bilinear) and normalised model input."""
        x = images.to(device=self._mean.device, dtype=self._mean.dtype)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", antialias=True, align_corners=False)
        return (x - self._mean) / self._std

    def forward(self, images: Tensor, layers: Sequence[str] = ()) -> dict[str, Tensor]:
        wanted = [n for n in dict.fromkeys(layers) if n != "logits"]
        modules = dict(self.model.named_modules())
        for n in wanted:
            if n != "penultimate" and (not n or n not in modules):
                raise DxrayError(f"unknown layer {n!r}; available: {_names_list(self.layer_names())}")
        acts: dict[str, Tensor] = {}

        def keep_input(_module, args, name="penultimate"):
            acts[name] = args[0].flatten(1)

        def keep_output(_module, _args, out, name):
            acts[name] = _first_tensor(out)

        handles = []
        try:
            for n in wanted:
                if n == "penultimate":
                    handles.append(modules[self.final_layer_name].register_forward_pre_hook(keep_input))
                else:
                    handles.append(modules[n].register_forward_hook(functools.partial(keep_output, name=n)))
            x = self.preprocess(images)
            logits = self.model(pixel_values=x).logits if self.hf else _first_tensor(self.model(x))
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in wanted if n not in acts]
        if missing:
            raise DxrayError(f"layer {missing[0]!r} did not run in the forward pass")
        return {"logits": logits, **{n: acts[n] for n in wanted}}
