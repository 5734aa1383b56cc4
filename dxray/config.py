"""Run configuration: pydantic models, YAML files and ``key=value`` overrides.

Every field is validated before any model is loaded; a bad value raises a
one-line :class:`DxrayError` that names the field.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from dxray.errors import DxrayError, what_is
from dxray.storage.masking import remember_secrets

# Training-noise seeds live in [2**31, 2**32); held-out sampling seeds must stay below, so the
# images that judge a prompt were never seen while optimising it.
HELD_OUT_SEED_LIMIT = 2**31
INDEX_LIMIT = 2**31  # class, feature and unit indices
MAX_MESSAGE = 80  # characters of an input shown in an error message
MAX_CANDIDATES = 8  # detection prompts per class: each costs one more segmentation of every image
MAX_CONCEPTS = 32  # Grounding DINO reads at most 256 text tokens: the whole vocabulary is one query
# segment.concepts=default: common ImageNet contexts (the spurious cues Salient ImageNet's annotators name most)
DEFAULT_CONCEPTS = ("snow", "water", "grass", "sand", "sky", "tree", "road", "rock", "flower", "person", "hand",
                    "text", "building", "leaf", "wood", "fence")
MAX_TEMPLATE = 300  # characters; the exact token count is checked against the tokenizer when it loads
MAX_VALUES = 100_000  # values in a config once YAML aliases are expanded
MAX_DEPTH = 64
MAX_FILE_BYTES = 10 * 2**20
MAX_TEXT = MAX_FILE_BYTES  # characters once aliases are expanded: no more than a config file may hold


def _show(value: Any, limit: int = MAX_MESSAGE) -> str:
    """``repr(value)`` for an error message: one line, printable, at most ``limit`` characters."""
    text = repr(value) if not isinstance(value, str) or len(value) <= 10 * limit else repr(value[:10 * limit])
    return _clean(text, limit)


def _clean(text: str, limit: int = 400) -> str:
    """Text made printable and one line (control, bidi and line-break characters escaped), cut to ``limit``."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _number(value: Any) -> Any:
    # pydantic would take true/false as 1 and 0, and a string YAML 1.2 does not read as a number ('1:00',
    # '1_000', "'010'") as whatever it parses: a number field takes only what YAML itself reads as one.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    if isinstance(value, str):
        raise ValueError(f"expected a number, got the string {_show(value)} (write it unquoted as YAML 1.2 reads "
                         "numbers: decimal, 0o octal or 0x hex integers, decimal floats)")
    return value


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]
OptInt = Annotated[int | None, BeforeValidator(_number)]
OptFloat = Annotated[float | None, BeforeValidator(_number)]
Key = Annotated[int, Strict()]  # a class index as a mapping key: YAML gives ints, so '0' or true is a slip


def _index(i: int, what: str) -> int:
    if not 0 <= i < INDEX_LIMIT:
        raise ValueError(f"{what} {_show(i)} must be in [0, 2**31)")
    return i


def _no_repeats(values: list, what: str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{what} {_show(v)} is listed twice")
        seen.add(v)


def _plain_text(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} is empty")
    if not value.isprintable():
        raise ValueError(f"{what} {_show(value)} contains control or invisible characters")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class GeneratorConfig(_Section):
    model: str = Field("SimianLuo/LCM_Dreamshaper_v7", description="LCM checkpoint or SD1.5-family base: hub id or local folder ('tiny' builds a tiny random model)")
    lora: str | None = Field(None, description="LCM-LoRA to fuse into the base, e.g. latent-consistency/lcm-lora-sdv1-5")
    tiny_vae: str | None = Field(None, description="AutoencoderTiny used as the decoder, e.g. madebyollin/taesd")
    steps: Int = Field(4, gt=0, le=50, description="LCM sampler steps")
    guidance_scale: Float = Field(1.0, ge=0.0, le=100.0, description="guidance scale (embedded for LCM checkpoints, CFG for LCM-LoRA when > 1)")
    original_inference_steps: Int = Field(50, gt=0, le=1000, description="LCM training schedule length")
    resolution: Int = Field(512, gt=0, le=4096, description="image side in pixels (multiple of the VAE scale factor)")
    checkpointing: bool = Field(False, description="recompute each sampler step in backward to save memory")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    grad_steps: OptInt = Field(None, ge=1, description="backprop through only the last k sampler steps (earlier ones without gradients); null: all")

    @model_validator(mode="after")
    def _grad_steps(self) -> GeneratorConfig:
        if self.grad_steps is not None and self.grad_steps > self.steps:
            raise ValueError(f"generator.grad_steps {self.grad_steps} must be between 1 and generator.steps ({self.steps})")
        return self


class ClassifierConfig(_Section):
    spec: str = Field("torchvision:resnet50", description="torchvision:NAME, hf:ID_OR_PATH, timm:NAME or module.path:callable ('tiny' builds a tiny random model)")
    weights: str | None = Field("DEFAULT", description="torchvision/timm weights name, 'none', or a checkpoint file")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the model builder")
    class_names: list[str] | str | None = Field(None, description="class names (list or text file) overriding the model's metadata")
    input_size: OptInt = Field(None, gt=0, le=4096, description="classifier input side; default from the model")
    final_layer: str | None = Field(None, description="name of the final linear layer; default found automatically")
    allow_pickle: bool = Field(False, description="allow checkpoints that execute pickled code when loaded")


# Named templates (paper Fig. 4); any other string holding '{}' is a literal template.
TEMPLATE_PRESETS = {"object": "{}", "texture": "a texture of {}", "shape": "a shape of {}"}


class HardPromptConfig(_Section):
    """Hard prompts (paper Sec. 4.4): logits over token ids, straight-through Gumbel-softmax."""

    tau_start: Float = Field(1.0, gt=0, description="Gumbel-softmax temperature at the first step (exponential anneal)")
    tau_end: Float = Field(0.1, gt=0, description="Gumbel-softmax temperature at the last step")
    lr: OptFloat = Field(None, gt=0, description="learning rate of the logits (default: optimize.lr)")
    vocabulary: list[str] | str | None = Field(None, description="allowed words, each a single token: a list or a text file (one per line, read when the config loads); null: every whole-word token")

    @field_validator("vocabulary")
    @classmethod
    def _words(cls, vocabulary: list[str] | str | None) -> list[str] | None:
        if isinstance(vocabulary, str):
            path = Path(vocabulary).expanduser()
            if not path.is_file():
                raise ValueError(f"{_show(vocabulary)} is {what_is(path)}, not a file" if path.exists() else
                                 f"file not found: {_show(vocabulary)}")
            try:
                vocabulary = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                reason = "is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"cannot be read ({e.strerror})"
                raise ValueError(f"file {_show(vocabulary)} {reason}") from None
        if vocabulary is None:
            return None
        words = [w.strip() for w in vocabulary if w.strip()]
        if not words:
            raise ValueError("no words")
        return list(dict.fromkeys(words))


class PromptConfig(_Section):
    templates: list[str] = Field(default_factory=lambda: ["{}"], min_length=1, description="prompt templates: 'object' ({}), 'texture' (a texture of {}), 'shape' (a shape of {}) or any string where '{}' marks the learnable tokens")
    n_tokens: Int = Field(1, gt=0, le=16, description="learnable tokens in place of '{}'")
    init: str = Field("random", description="'random' (embedding-table scale), 'class' (the class name) or 'word:WORD'")
    kind: Literal["soft", "hard"] = Field("soft", description="soft: free embedding rows; hard: real tokens (Gumbel-softmax), decoded into hard_prompt_text")
    hard: HardPromptConfig = Field(default_factory=HardPromptConfig)

    @field_validator("templates")
    @classmethod
    def _one_placeholder(cls, templates: list[str]) -> list[str]:
        resolved = [TEMPLATE_PRESETS.get(t, t) for t in templates]
        for t in resolved:
            if len(t) > MAX_TEMPLATE:
                raise ValueError(f"template {_show(t)} is {len(t)} characters long (at most {MAX_TEMPLATE}: the "
                                 "CLIP text encoder takes 77 tokens)")
            if t.count("{}") != 1:
                names = ", ".join(TEMPLATE_PRESETS)
                raise ValueError(f"template {_show(t)} must contain '{{}}' exactly once (or be one of {names})")
        if len(set(resolved)) < len(resolved):
            raise ValueError(f"templates {_show(templates)} name the same template twice")
        return resolved

    @field_validator("init")
    @classmethod
    def _init_kind(cls, init: str) -> str:
        if init not in ("random", "class") and not (init.startswith("word:") and init[5:].strip()):
            raise ValueError(f"init {_show(init)} must be 'random', 'class' or 'word:WORD'")
        return init


class OptimizeConfig(_Section):
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: Float = Field(0.1, gt=0, description="learning rate")
    weight_decay: Float = Field(0.0, ge=0)
    steps: Int = Field(100, gt=0, le=100_000, description="optimisation steps per task")
    samples_per_step: Int = Field(1, gt=0, le=1024, description="noise samples z drawn per step (S)")
    early_stop_prob: OptFloat = Field(None, gt=0, le=1, description="stop a class task (not a feature task) once its mean target probability reaches this")
    feature_weight: Float = Field(1.0, gt=0, description="lambda of Eq.5: CE(class) - lambda * feature")
    batch_tasks: Int = Field(4, gt=0, le=1024, description="tasks optimised together in one batch")
    restarts: Int = Field(1, gt=0, le=100, description="independent initialisations per task; the lowest final loss wins (hard prompts: the lowest chosen_loss, the returned words' own)")


class SampleConfig(_Section):
    k: Int = Field(10, gt=0, le=10_000, description="held-out images per task")
    seeds: list[Int] | None = Field(None, description="held-out seeds (default 0..k-1)")
    batch_size: Int = Field(8, gt=0, le=1024)
    baseline: bool = Field(True, description="also score the initial prompt on the held-out seeds (before/after)")

    @model_validator(mode="after")
    def _seeds(self) -> SampleConfig:
        if self.seeds is not None:
            if len(self.seeds) != self.k:
                raise ValueError(f"sample.seeds has {len(self.seeds)} seeds but sample.k is {self.k}")
            bad = [s for s in self.seeds if not 0 <= s < HELD_OUT_SEED_LIMIT]
            if bad:
                raise ValueError(f"sample.seeds must be in [0, 2**31) (training noise uses the rest): {_show(bad[:3])}")
        return self

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None:
            _no_repeats(seeds, "held-out seed")
        return seeds

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.k))


class NeuronTarget(_Section):
    layer: str
    unit: Int = Field(ge=0, lt=INDEX_LIMIT)


class FeatureImagesConfig(_Section):
    path: str | None = Field(None, description="folder with one sub-folder per class (index or WordNet id), local or s3://")
    select: Literal["predicted", "labelled"] = Field("predicted", description="images the model predicts as c (Salient ImageNet) or labelled c")
    max_per_class: OptInt = Field(50, gt=0, le=1_000_000, description="images read per class folder")
    wnids: list[str] | str | None = Field(None, description="WordNet id of each class (list or text file), for folders named by wnid")
    batch_size: Int = Field(16, gt=0, le=1024)


class TargetsConfig(_Section):
    classes: list[Int] = Field(default_factory=lambda: [0], min_length=1, description="class indices to audit")
    class_task: bool = Field(True, description="optimise the class explanation (Eq.3) for each class")
    top_k: Int = Field(5, ge=0, le=10_000, description="top-k features per class (Eq.5 tasks)")
    feature_source: Literal["weights", "images", "table"] = Field("weights", description="rank features by W[c,f] x mean activation over images, by weight alone, or read a table")
    feature_images: FeatureImagesConfig = Field(default_factory=FeatureImagesConfig)
    feature_table: str | None = Field(None, description="CSV/Parquet with class_index, feature_index, rank")
    features: dict[Key, list[Int]] = Field(default_factory=dict, description="explicit features per class (overrides ranking)")
    neurons: list[NeuronTarget] = Field(default_factory=list, description="hidden neurons to explain (Eq.4)")

    @field_validator("classes")
    @classmethod
    def _non_negative(cls, classes: list[int]) -> list[int]:
        if any(c < 0 for c in classes):
            raise ValueError(f"class indices must be >= 0: {_show(classes)}")
        for c in classes:
            _index(c, "class index")
        _no_repeats(classes, "class")
        return classes

    @field_validator("features")
    @classmethod
    def _feature_lists(cls, features: dict[int, list[int]]) -> dict[int, list[int]]:
        for c, fs in features.items():
            try:
                _index(c, "class index")
                for f in fs:
                    _index(f, "feature index")
                _no_repeats(fs, "feature")
            except ValueError as e:
                raise ValueError(f"[{c}]: {e}") from None
        return features

    @model_validator(mode="after")
    def _source_inputs(self) -> TargetsConfig:
        if self.feature_source == "images" and not self.feature_images.path:
            raise ValueError("feature_source 'images' needs targets.feature_images.path")
        if self.feature_source == "table" and not self.feature_table:
            raise ValueError("feature_source 'table' needs targets.feature_table")
        return self


class SegmentConfig(_Section):
    enabled: bool = Field(True, description="score images with Grounding DINO + SAM")
    detector: str = Field("IDEA-Research/grounding-dino-tiny", description="Grounding DINO: hub id or local folder ('tiny' builds a tiny random model)")
    sam: str | None = Field("facebook/sam-vit-base", description="SAM: transformers hub id or local folder, or segment-anything:TYPE:PATH.pth (TYPE vit_b, vit_l or vit_h: an original SAM checkpoint, read by the segment-anything package, pip install 'dxray[sam]'); null uses the boxes as masks")
    allow_pickle: bool = Field(False, description="allow a segment-anything SAM checkpoint that executes pickled code when loaded")
    box_threshold: Float = Field(0.35, ge=0, le=1)
    text_threshold: Float = Field(0.25, ge=0, le=1)
    prompts: dict[Key, str | list[str]] = Field(default_factory=dict, description="detection prompt per class index (default: the class name); a list of up to 8 candidates (synonyms, a WordNet hypernym): every image is scored with each, and the one with the highest mean r on the class's control images decides its verdicts (needs segment.control)")
    control: bool = Field(True, description="segmenter control: per class, render sample.k images from control_template filled with the class name (no optimisation) and score them (classes.control_object_fraction); a class whose control r is below verdict.delta has its verdicts flagged unreliable")
    control_template: str = Field("a photo of a {}", description="the control's plain prompt; '{}' becomes the class name's words")
    concepts: list[str] | str | None = Field(None, description="context concepts whose coverage is scored on every image, to name what a spurious feature shows: a list, a text file (one per line), or 'default' (snow, water, grass, sand, sky, tree, road, rock, flower, person, hand, text, building, leaf, wood, fence); null: none. Each verdict gets its top concepts")
    batch_size: Int = Field(4, gt=0, le=1024)
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="precision of Grounding DINO's and SAM's forward passes (autocast; boxes are post-processed in float32). float16/bfloat16 speed them up on a GPU at a cost of about a pixel per box")

    @field_validator("concepts")
    @classmethod
    def _concepts(cls, concepts: list[str] | str | None) -> list[str] | None:
        if concepts == "default":
            return list(DEFAULT_CONCEPTS)
        if isinstance(concepts, str):
            path = Path(concepts).expanduser()
            if not path.is_file():
                raise ValueError(f"{_show(concepts)} is {what_is(path)}, not a file" if path.exists() else
                                 f"file not found: {_show(concepts)} (give a list, a text file or 'default')")
            try:
                concepts = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                reason = "is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"cannot be read ({e.strerror})"
                raise ValueError(f"file {_show(concepts)} {reason}") from None
            concepts = [c for c in concepts if c.strip()]
        if concepts is None:
            return None
        if not 1 <= len(concepts) <= MAX_CONCEPTS:
            raise ValueError(f"lists {len(concepts)} concepts (1 to {MAX_CONCEPTS}: they share one detector query)")
        for c in concepts:
            _plain_text(c, "a concept")
            if "." in c:
                raise ValueError(f"concept {_show(c)} holds a '.', which ends a phrase of the detector's query")
        _no_repeats([c.strip().lower() for c in concepts], "concept")
        return [c.strip() for c in concepts]

    @field_validator("control_template")
    @classmethod
    def _control_template(cls, template: str) -> str:
        if len(template) > MAX_TEMPLATE:
            raise ValueError(f"{_show(template)} is {len(template)} characters long (at most {MAX_TEMPLATE})")
        if template.count("{}") != 1:
            raise ValueError(f"{_show(template)} must contain '{{}}' exactly once (where the class name goes)")
        return template

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, prompts: dict[int, str | list[str]]) -> dict[int, str | list[str]]:
        for c, given in prompts.items():
            try:
                _index(c, "class index")
                texts = [given] if isinstance(given, str) else given
                if not 1 <= len(texts) <= MAX_CANDIDATES:
                    raise ValueError(f"lists {len(texts)} detection prompts (1 to {MAX_CANDIDATES})")
                for text in texts:
                    _plain_text(text, "the detection prompt")
                _no_repeats([t.strip().lower().rstrip(".").strip() for t in texts], "detection prompt")
            except ValueError as e:
                raise ValueError(f"[{c}]: {e}") from None
        return prompts

    @model_validator(mode="after")
    def _candidates_need_control(self) -> SegmentConfig:
        several = sorted(c for c, given in self.prompts.items() if not isinstance(given, str) and len(given) > 1)
        if several and self.enabled and not self.control:
            raise ValueError(f"prompts[{several[0]}] lists several detection prompts, but control is false: the "
                             f"control images choose among them (set segment.control=true, or give one prompt)")
        return self


class VerdictConfig(_Section):
    delta: Float = Field(0.3, ge=0, le=1, description="a feature is core when its mean object fraction r >= delta")


class StorageConfig(_Section):
    """Where the S3 client connects. Credentials never go here: they come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE) or an instance role."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://127.0.0.1:8333 (default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS)")
    region: str | None = Field(None, description="S3 region (default: AWS_REGION or AWS_DEFAULT_REGION)")
    path_style: bool | None = Field(None, description="path-style addressing; default: on with a custom endpoint, off on AWS")
    retry_seconds: Float = Field(120.0, ge=0, le=86_400, description="keep retrying a failed storage call with backoff for this long")
    connect_timeout: Float = Field(5.0, gt=0, le=86_400, description="seconds to wait for a connection to the endpoint")
    request_timeout: Float = Field(60.0, gt=0, le=86_400, description="seconds to wait for one request")


class ClusterConfig(_Section):
    """How `dxray audit` lays the work out on Ray."""

    address: str | None = Field(None, description="Ray address ('auto', ray://HOST:10001); default: RAY_ADDRESS, else a local Ray is started")
    local_gpus: OptInt = Field(None, ge=0, le=4096, description="GPUs a local Ray advertises (logical ones allowed); default: those torch sees")
    local_cpus: OptInt = Field(None, gt=0, le=1_000_000, description="CPUs a local Ray advertises; default: all")
    explainers: OptInt = Field(None, gt=0, le=10_000, description="explainer actors; default: one per gpus_per_explainer of the cluster's GPUs (1 on a CPU-only cluster)")
    gpus_per_explainer: Float = Field(1.0, ge=0, le=1024, description="GPUs pinned by each explainer actor (fractional allowed)")
    cpus_per_explainer: Float = Field(1.0, ge=0, le=1024, description="CPUs reserved by each explainer actor")
    segmenters: Int = Field(1, ge=0, le=10_000, description="segmenter actors (Grounding DINO + SAM)")
    gpus_per_segmenter: Float = Field(0.0, ge=0, le=1024, description="GPUs per segmenter actor (fractional: shares a GPU with an explainer; 0 = CPU)")
    cpus_per_segmenter: Float = Field(0.0, ge=0, le=1024, description="CPUs reserved by each segmenter actor")
    in_flight_per_actor: Int = Field(2, gt=0, le=1000, description="batches queued on each explainer at once (bounds memory; keeps the GPU busy)")
    task_retries: Int = Field(3, ge=0, le=1000, description="times a batch is re-submitted after its actor died")
    log_every_s: Float = Field(30.0, gt=0, le=86_400, description="seconds between summary lines in the job log")


class EstimateConfig(_Section):
    """Timing figures for `dxray audit --dry-run`; unset: taken from the ``figures`` folder when one fits."""

    seconds_per_step: OptFloat = Field(None, gt=0, le=86_400, description="GPU seconds of one optimisation step of one task (one restart, optimize.samples_per_step noise samples, gradients through the sampler)")
    seconds_per_image: OptFloat = Field(None, gt=0, le=86_400, description="GPU seconds per held-out or baseline image: sampling without gradients, plus Grounding DINO + SAM scoring when segment.enabled")
    figures: str = Field("benchmarks/results", description="folder of benchmark results (*.json) the timing figures come from, relative to the working directory (a checkout's benchmarks/results)")
    gpu: Literal["h100", "h200", "a100", "l40s"] = Field("h100", description="GPU of the analytic estimate, used when no measured figure fits: its dense bf16 peak (dxray.flops.PEAK_BF16_DENSE)")
    mfu: Float = Field(0.4, gt=0.0, le=1.0, description="model FLOPs utilisation assumed by the analytic estimate: seconds = counted FLOPs / (peak x mfu)")
    segment_images_per_s: Float = Field(16.0, gt=0.0, le=100_000.0, description="Grounding DINO + SAM images per second on that GPU, assumed by the analytic estimate (unmeasured)")


class Config(_Section):
    output: str = Field("dxray-out", description="local folder or s3://bucket/prefix")
    run_id: str | None = Field(None, description="run folder name; default derived from the config, so a re-run resumes")
    seed: Int = Field(0, ge=0, lt=2**63, description="base seed of initialisation and training noise")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    cache_dir: str | None = Field(None, description="where tiny models are built (default ~/.cache/dxray)")
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    verdict: VerdictConfig = Field(default_factory=VerdictConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    estimate: EstimateConfig = Field(default_factory=EstimateConfig)

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, run_id: str | None) -> str | None:
        # A folder name locally and part of an S3 key: no separators, control or invisible characters.
        if run_id is not None and (not run_id or "/" in run_id or "\\" in run_id or run_id.startswith(".")
                                   or run_id != run_id.strip() or not run_id.isprintable() or len(run_id) > 100):
            raise ValueError(f"run_id {_show(run_id)} must be a plain folder name (at most 100 printable "
                             "characters, no '/' or '\\', not starting with '.')")
        return run_id

    @field_validator("output", "cache_dir")
    @classmethod
    def _folder(cls, folder: str | None, info) -> str | None:
        # An empty folder name would mean the current directory.
        return None if folder is None else _plain_text(folder, f"{info.field_name} folder")

    def fingerprint(self) -> str:
        """Hash of everything that defines the results (not where they go): see dxray.identity."""
        from dxray.identity import run_fingerprint

        return run_fingerprint(self)

    def resolved_run_id(self) -> str:
        return self.run_id or f"run-{self.fingerprint()}"


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        part = f"[{part}]" if isinstance(part, int) else str(part)
        out += part if not out or part.startswith("[") else f".{part}"
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model inside an annotation (``Model``, ``list[Model]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is list:
        return _model_in(get_args(annotation)[0])
    return None


def _readable(model: type[BaseModel] | None, loc: tuple) -> tuple:
    """``loc`` without pydantic's union-member labels ('list[str]', 'function-before[...]'): below a
    section every string part is a field name (mapping fields have int keys, ``kwargs`` takes anything)."""
    out = []
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif model is not None and part in model.model_fields:
            out.append(part)
            model = _model_in(model.model_fields[part].annotation)
        elif model is not None:  # a key the section does not have (extra_forbidden)
            out.append(part)
            model = None
    return tuple(out)


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at ``loc`` (the parent of an unknown key)."""
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections
            continue
        field = model.model_fields.get(str(part))
        model = _model_in(getattr(field, "annotation", None))
        if model is None:
            return []
    return sorted(model.model_fields)


def _validation_line(err: ValidationError, model: type[BaseModel]) -> str:
    errors = err.errors()
    e = errors[0]
    loc = tuple(e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if len(loc) >= 2 and loc[-1] == "[key]":  # a mapping key that is not valid
        loc, msg = loc[:-2], f"key {_show(loc[-2])}: {msg}"
    loc = _readable(model, loc)
    same = [x for x in errors[1:] if _readable(model, tuple(x["loc"])) == loc and x["msg"] != e["msg"]]
    if same and not loc[-1:] == ("[key]",):  # the members of a union, each refused: "a list / a string"
        msg = " / ".join(dict.fromkeys([msg, *(x["msg"].removeprefix("Value error, ") for x in same)]))
        errors = [x for x in errors if x not in same]
    if msg.startswith("[") and "]: " in msg:  # a validator named the item: "[3]: the prompt is empty"
        item, msg = msg.split(": ", 1)
        loc += (item,)
    where = _clean(_field_path(loc), MAX_MESSAGE) or "config"
    if e["type"] == "extra_forbidden":
        valid = _valid_keys(model, loc[:-1])
        return _clean(f"unknown config key '{where}'; valid keys: {', '.join(valid)}")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return _clean(f"config field '{where}': {msg}{more}")


_NULL = re.compile(r"~|null|Null|NULL|")
_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads plain scalars by YAML 1.2's core schema and refuses a key given twice in one
    mapping: PyYAML silently keeps the last one, so a second ``optimize:`` block would quietly replace the first.

    PyYAML implements YAML 1.1, where ``010`` is 8, ``1:00`` is 60, ``1_000`` is 1000 and ``no`` is false;
    YAML 1.2 reads them as 10 and the strings '1:00', '1_000' and 'no'. The 1.2 core schema is four
    regular expressions, so it replaces PyYAML's resolvers here rather than bringing in a second YAML
    library (ruamel.yaml), which would need the duplicate-key, alias and error handling rewritten."""

    bool_values = {"true": True, "false": False}  # also for an explicit '!!bool': yes/no/on/off are 1.1 only

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' entries may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: the base class says so
                    continue
                if first is not None:
                    raise _DuplicateKey(f"key {_show(key)} appears twice", first, line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        # PyYAML's constructors let AttributeError, ValueError or KeyError escape for scalars that match no
        # form of their type: '!!timestamp x', '!!timestamp 2020-02-30', '!!bool x', an integer of 5000 digits.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as e:
            kind = str(node.tag).rsplit(":", 1)[-1]
            problem = f"{_show(node.value)} is not a valid {kind} ({_clean(str(e), MAX_MESSAGE)})"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None

    def construct_yaml_int(self, node):
        value = self.construct_scalar(node)
        if not _INT.fullmatch(value):  # an explicit '!!int' on a 1.1 spelling
            raise ValueError("not a YAML 1.2 integer")
        if value[:2] in ("0o", "0x"):
            return int(value[2:], 8 if value[1] == "o" else 16)
        return int(value, 10)  # a leading zero is still decimal

    def construct_yaml_float(self, node):
        value = self.construct_scalar(node)
        if not _FLOAT.fullmatch(value):
            raise ValueError("not a YAML 1.2 float")
        return float(value.replace(".", "") if value[-1].isalpha() else value)  # '-.inf' is float()'s '-inf'


# The YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), plus '<<' merge keys, which
# configs use; every other plain scalar is a string. Why not ruamel.yaml: it is no dependency yet, and this keeps
# the loader's duplicate-key, alias and error-line handling as it is.
_Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in [
    ("null", _NULL, ["~", "n", "N", ""]),
    ("bool", re.compile(r"true|True|TRUE|false|False|FALSE"), list("tTfF")),
    ("int", _INT, list("-+0123456789")),
    ("float", _FLOAT, list("-+.0123456789")),
    ("merge", re.compile(r"<<"), ["<"]),
]:
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(rf"^(?:{_pattern.pattern})$"), _first)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, message: str, first: int, second: int):
        where = f"lines {first} and {second}" if first != second else f"on line {first}"
        super().__init__(f"{message} ({where})")


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    """PyYAML's message on one line, keeping where it happened."""
    if isinstance(err, yaml.MarkedYAMLError):
        words = ", ".join(w for w in (err.context, err.problem) if w) or "syntax error"
        mark = err.problem_mark or err.context_mark
        return f"{words} (line {mark.line + 1}, column {mark.column + 1})" if mark else words
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        return f"unacceptable character #x{err.character:04x} (line {line}, column {column})"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _load_yaml(text: str) -> Any:
    """``text`` as YAML (safe types only); raises ValueError with a one-line reason."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as e:
        raise ValueError(str(e)) from None
    except yaml.YAMLError as e:
        raise ValueError(f"is not valid YAML: {_yaml_problem(e, text)}") from None
    except RecursionError:
        raise ValueError("is not valid YAML: nested too deeply") from None


def _text_size(value: Any) -> int:
    """Characters ``value`` takes written out (at least; an int's digits from its bit length, not str())."""
    if isinstance(value, str | bytes):
        return len(value)
    return value.bit_length() // 3 + 1 if isinstance(value, int) else 1


def _check_shape(data: Any) -> None:
    """Refuse values nested too deeply, too many or holding too much text once YAML aliases are expanded (an
    alias can make a structure recursive or exponentially large, or repeat a long string until the manifest,
    the dry run and the fingerprint grow to gigabytes), and strings holding a NUL character (no path takes one).
    Aliases share one object, so the walk counts the expansion without building it."""
    stack = [(data, 0, ())]
    count = chars = 0
    while stack:
        value, depth, loc = stack.pop()
        count += 1
        chars += _text_size(value)
        size = len(value) if isinstance(value, dict | list | tuple | set) else 0
        if count + len(stack) + size > MAX_VALUES or depth > MAX_DEPTH:  # each value on the stack is counted next
            raise ValueError(f"is nested deeper than {MAX_DEPTH} levels or holds more than {MAX_VALUES:,} values "
                             "(YAML aliases included)")
        if chars > MAX_TEXT:
            raise ValueError(f"holds more than {MAX_TEXT:,} characters once YAML aliases are expanded (at "
                             f"'{_clean(_field_path(loc), MAX_MESSAGE) or 'config'}'; a config file holds at most "
                             f"{MAX_FILE_BYTES // 2**20} MB)")
        if isinstance(value, str) and "\x00" in value:
            raise ValueError(f"config field '{_clean(_field_path(loc), MAX_MESSAGE) or 'config'}' contains a NUL "
                             "character")
        if isinstance(value, dict):
            chars += sum(_text_size(k) for k in value)
            stack.extend((v, depth + 1, (*loc, k)) for k, v in value.items())
        elif isinstance(value, list | tuple | set):
            stack.extend((v, depth + 1, (*loc, i)) for i, v in enumerate(value))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``a.b=1`` strings → nested dict; values are parsed as YAML (numbers, lists, null...)."""
    out: dict[str, Any] = {}
    given: dict[tuple[str, ...], int] = {}  # key parts -> which override (1-based) set them
    for number, item in enumerate(overrides, 1):
        key, sep, raw = item.partition("=")
        shown = _show(item)
        if not sep or not key.strip():
            raise DxrayError(f"override {shown} must look like key=value")
        parts = [p.strip() for p in key.strip().split(".")]
        if not all(parts):
            raise DxrayError(f"override {shown}: the key has an empty part (write a.b=1)")
        # A key given twice, or a section and a key inside it ('optimize={lr: 1}' and 'optimize.lr=2'): the
        # later one would silently replace the earlier (or the whole section), so which wins hangs on the order.
        # Only keys are named: a value may be a secret.
        for earlier, first in given.items():
            n = min(len(earlier), len(parts))
            if earlier[:n] == tuple(parts[:n]):
                keys = sorted({".".join(earlier), ".".join(parts)}, key=len)
                shown_keys = " and ".join(f"'{_clean(k, MAX_MESSAGE)}'" for k in keys)
                if len(keys) == 1:
                    raise DxrayError(f"override key {shown_keys} is given twice (overrides {first} and {number}): "
                                     "give each key once")
                raise DxrayError(f"override keys {shown_keys} overlap (overrides {first} and {number}): set "
                                 f"'{_clean(keys[0], MAX_MESSAGE)}' whole or keys inside it, not both")
        given[tuple(parts)] = number
        value = raw
        if raw.strip():
            try:
                if any(isinstance(t, yaml.TagToken) for t in yaml.scan(raw, Loader=_Loader)):
                    raise ValueError("YAML tags are not allowed in overrides")
                value = _load_yaml(raw)
                _check_shape(value)
            except yaml.YAMLError as e:
                raise DxrayError(_clean(f"override {shown} is not valid YAML: {_yaml_problem(e, raw)}")) from None
            except RecursionError:
                raise DxrayError(f"override {shown} is not valid YAML: nested too deeply") from None
            except ValueError as e:
                reason = str(e).replace(" (on line 1)", "")
                raise DxrayError(_clean(f"override {shown}{' ' if reason.startswith('is ') else ': '}{reason}")) from None
        else:
            value = ""
        node = out
        for part in parts[:-1]:  # no earlier override set a prefix of this key: every step is a dict
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def build_config(data: dict[str, Any], overrides: list[str] = ()) -> Config:
    merged = _merge(data, parse_overrides(list(overrides)))
    try:
        _check_shape(merged)
    except ValueError as e:
        raise DxrayError(_clean(str(e) if str(e).startswith("config field") else f"config {e}")) from None
    remember_secrets(merged)  # its secret values are masked wherever they turn up later (dxray.storage.masking)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise DxrayError(_validation_line(err, Config)) from None
    except RecursionError:
        raise DxrayError("config is nested too deeply") from None


_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket"}


def _not_a_file(p: Path) -> str | None:
    """What stands at ``p`` in words when it is no regular file ('is a character device', 'not found'), else None."""
    link = os.path.islink(p)
    try:
        kind = _KINDS.get(stat.S_IFMT(p.stat().st_mode))
    except ValueError:  # a NUL in the name
        return "is not a valid path (it holds a NUL character)"
    except OSError as e:
        if link and e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"is a symbolic link to {_show(os.readlink(p))}, which does not exist"
        return "not found" if e.errno in (errno.ENOENT, errno.ENOTDIR) else f"cannot be read: {e.strerror or e}"
    if kind is None:
        return None
    return f"is a symbolic link to {kind} ({_show(str(p.resolve()))})" if link else f"is {kind}, not a file"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        shown = _clean(str(path), 200)
        p = Path(path).expanduser()
        problem = _not_a_file(p)
        if problem:
            raise DxrayError(_clean(f"config file {shown} {problem}" if problem != "not found" else
                                    f"config file not found: {shown}"))
        try:
            if p.stat().st_size > MAX_FILE_BYTES:
                raise DxrayError(f"config file {shown} is larger than {MAX_FILE_BYTES // 2**20} MB")
            raw = p.read_bytes()
        except OSError as e:
            raise DxrayError(_clean(f"config file {shown} cannot be read: {e.strerror or e}")) from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DxrayError(f"config file {shown} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                             f"{e.start})") from None
        try:
            data = _load_yaml(text)
            _check_shape(data)
        except ValueError as e:
            sep = " " if str(e).startswith("is ") else ": "
            raise DxrayError(_clean(f"config file {shown}{sep}{e}")) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise DxrayError(f"config file {shown} must hold a mapping at the top level")
    return build_config(data, overrides)
