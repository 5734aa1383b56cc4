"""Preflight: every check of a run that needs no model weights, before any weights load or any run
folder is made. Each failure is one DxrayError line naming the config field. The dry run calls it with
``missing`` (a list) to list what a job meant for another machine lacks here instead of stopping."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dxray import features, models, prompts
from dxray.classifiers import ClassifierInfo
from dxray.config import Config, TargetsConfig
from dxray.errors import DxrayError
from dxray.generator import check_model_ref
from dxray.pipeline.ranking import check_source
from dxray.storage.fs import check_output


def preflight(cfg: Config, missing: list[str] | None = None, *, build: bool = True) -> ClassifierInfo:
    """Every check that needs no model weights; raises a one-line DxrayError naming the config field,
    before any weights load or any run folder is made.

    With ``missing`` (a list: the dry run of a job meant for another machine), what is not found here
    (a local model folder, the classifier's checkpoint, the feature image folder or table, a wnids file)
    is appended to it as "field path" and the checks that need it are skipped; a real run (None) raises.
    With ``build=False`` a preset not built yet is described from its architecture alone (nothing is
    built, trained or saved: the dry run)."""
    check_cache_dir(cfg)  # before anything is built into it
    for ref, where, what in ((cfg.generator.model, "generator.model", "generator model"),
                             (cfg.generator.lora, "generator.lora", "LoRA"),
                             (cfg.generator.tiny_vae, "generator.tiny_vae", "tiny VAE")):
        if ref and not _listed_as_missing(ref, where, missing):
            check_model_ref(ref, what)
    # Before the classifier: describing a preset with build=True builds it (the toy world trains for minutes).
    check_output(cfg.output, cfg.storage)
    files: list[str] = []
    info = models.describe_classifier(cfg.classifier, cache_dir=cfg.cache_dir, build=build,
                                      missing=None if missing is None else files)
    if missing is not None:
        missing += [f"classifier.weights {f}" if f == cfg.classifier.weights else f"classifier.spec checkpoint {f}"
                    for f in files]
    n = info.num_classes
    t = cfg.targets
    for where, indices in [("targets.classes", t.classes), ("targets.features", list(t.features))]:
        bad = [c for c in indices if not 0 <= c < n]
        if bad:
            raise DxrayError(f"{where}: class index {bad[0]} out of range; the classifier has classes 0..{n - 1}")
    absent = sorted(set(t.features) - set(t.classes))
    if absent:
        raise DxrayError(f"targets.features names class {absent[0]}, which is not in targets.classes")
    check_target_widths(cfg.targets, info)
    if not (t.class_task or t.top_k or t.features or t.neurons):
        raise DxrayError("targets: nothing to do (class_task is false, top_k is 0, no features or neurons)")
    check_template_lengths(cfg)
    check_source(t, missing, lambda ref, where: _listed_as_missing(ref, where, missing, _not_found))
    if cfg.segment.enabled:
        from dxray.segment import check_sam_package_ref, detection_prompt, sam_package_ref

        for ref, where, what in ((cfg.segment.detector, "segment.detector", "detector"),
                                 (cfg.segment.sam, "segment.sam", "SAM")):
            if where == "segment.sam" and sam_package_ref(ref):
                check_sam_package_ref(ref, missing)
            elif ref and not models.is_preset(ref) and not _listed_as_missing(ref, where, missing):
                check_model_ref(ref, what)
        for c in t.classes:
            given = cfg.segment.prompts.get(c)
            if given is None:
                try:
                    detection_prompt(info.class_names[c])
                except DxrayError:
                    raise DxrayError(f"class {c}'s name {info.class_names[c]!r} is an empty class name for a "
                                     f"detection prompt (set segment.prompts[{c}])") from None
                continue
            seen: dict[str, str] = {}
            for text in [given] if isinstance(given, str) else given:
                try:
                    query = detection_prompt(text)
                except DxrayError:
                    raise DxrayError(f"segment.prompts[{c}]: detection prompt {text!r} is empty once lower-cased "
                                     f"and cut at its first comma") from None
                if query in seen:
                    raise DxrayError(f"segment.prompts[{c}]: detection prompts {seen[query]!r} and {text!r} are the "
                                     f"same query {query!r} once lower-cased and cut at their first comma")
                seen[query] = text
        exact = models.preset(cfg.segment.detector)
        if cfg.segment.concepts and exact is not None and exact.segmenter is not None:
            try:  # an exact segmenter builds in microseconds and knows which concepts it can see
                exact.segmenter(concepts=cfg.segment.concepts)
            except ValueError as e:
                raise DxrayError(f"segment.concepts: {e}") from None
    return info


def _local_path_absent(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) and not Path(ref).expanduser().exists()


def _not_found(where: str) -> bool:
    return not features.path_exists(where)


def _listed_as_missing(ref: str, where: str, missing: list[str] | None,
                       absent: Callable[[str], bool] | None = None) -> bool:
    """In a dry run (``missing`` a list): True, after listing ``where ref``, when ``ref`` is not here.
    ``absent`` defaults to "a local path that does not exist" (a hub id is never missing)."""
    if missing is None:
        return False
    try:
        gone = absent(ref) if absent else _local_path_absent(ref)
    except (OSError, DxrayError):  # unreachable storage: the real check says why, in one line
        return False
    if gone:
        missing.append(f"{where} {ref}")
    return gone


def check_cache_dir(cfg: Config) -> None:
    """``cache_dir`` (where built-in models are built; default $DXRAY_CACHE, else ~/.cache/dxray, checked when a
    built-in model uses it) must be a folder, or creatable in one, that this process can write."""
    refs = (cfg.generator.model, cfg.classifier.spec, cfg.segment.detector, cfg.segment.sam)
    if cfg.cache_dir is None and not any(models.is_preset(r) for r in refs):
        return
    root = models.cache_root(cfg.cache_dir)
    name = f"cache_dir {cfg.cache_dir}" if cfg.cache_dir is not None else f"cache_dir (default {root})"
    existing = root.resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        from dxray.errors import what_is

        raise DxrayError(f"{name}: {existing} is {what_is(existing)}, not a folder")
    import tempfile

    try:  # os.access says yes to root even where nothing can be made (/proc)
        with tempfile.TemporaryDirectory(prefix=".dxray-probe-", dir=existing):
            pass
    except OSError as err:
        raise DxrayError(f"{name} is not writable: cannot create a folder in {existing} "
                         f"({err.strerror or type(err).__name__})") from None


def check_target_widths(t: TargetsConfig, info: ClassifierInfo) -> None:
    """Explicit features, ``top_k`` and neuron units (the ``targets`` section) against the widths of the
    classifier's layers."""
    d = info.feature_dim
    for c, fs in t.features.items():
        bad = [f for f in fs if not 0 <= f < d]
        if bad:
            raise DxrayError(f"targets.features[{c}]: feature {bad[0]} out of range; the penultimate layer has "
                             f"features 0..{d - 1}")
    if t.top_k > d and any(c not in t.features for c in t.classes):
        raise DxrayError(f"targets.top_k {t.top_k} is more than the {d} penultimate features of the classifier")
    for i, nt in enumerate(t.neurons):
        if nt.layer not in info.layer_names:
            names = ", ".join(info.layer_names[:30]) + (" ..." if len(info.layer_names) > 30 else "")
            raise DxrayError(f"targets.neurons: unknown layer {nt.layer!r}; available: {names}")
        width = info.layer_widths.get(nt.layer)
        if width is not None and not 0 <= nt.unit < width:
            raise DxrayError(f"targets.neurons[{i}]: unit {nt.unit} out of range; layer {nt.layer!r} has units "
                             f"0..{width - 1}")


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _offline_tokenizer(cfg: Config):
    """The generator's CLIP tokenizer when it is on this machine already (a local folder, a hub id in the local
    hub cache; a built-in model's is made in memory); None otherwise: nothing is built or downloaded."""
    model = cfg.generator.model
    if models.is_preset(model):
        return models.preset_tokenizer(model)  # what the preset is built with: vocabulary only, no weights
    if model.startswith(("/", "./", "../", "~")):
        model = str(Path(model).expanduser())
    folder = Path(model) / "tokenizer"
    if not folder.is_dir():  # a hub id: its tokenizer files in the local hub cache, else nothing
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = [try_to_load_from_cache(model, f"tokenizer/{name}") for name in _TOKENIZER_FILES]
        except Exception:  # noqa: BLE001 - not a valid repo id
            return None
        found = [c for c in cached if isinstance(c, str)]
        if not found:
            return None
        folder = Path(found[0]).parent
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):  # else transformers builds an empty one
        return None
    try:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # noqa: BLE001 - not a CLIP tokenizer: the run's own load says why
        return None


def check_template_lengths(cfg: Config) -> None:
    """Every template, its ``{}`` as prompt.n_tokens tokens, fits the CLIP text encoder (BOS and EOS included);
    skipped when the tokenizer is not on this machine."""
    tokenizer = _offline_tokenizer(cfg)
    if tokenizer is None:
        return
    n = cfg.prompt.n_tokens
    for i, template in enumerate(cfg.prompt.templates):
        pre, suf = (part.strip() for part in template.split("{}", 1))
        length = 2 + n + sum(len(tokenizer(x, add_special_tokens=False).input_ids) for x in (pre, suf) if x)
        if length > prompts.MAX_LENGTH:
            short = template if len(template) <= 60 else template[:57] + "..."
            raise DxrayError(f"prompt.templates[{i}]: template {short!r} is {length} tokens long with "
                             f"prompt.n_tokens={n} learnable tokens (BOS and EOS included); the CLIP text "
                             f"encoder's limit is {prompts.MAX_LENGTH}")
