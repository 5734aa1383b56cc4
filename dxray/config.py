"""Run configuration: pydantic models, YAML files and ``key=value`` overrides.

Every field is validated before any model is loaded; a bad value raises a
one-line :class:`DxrayError` that names the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dxray.errors import DxrayError

# Training-noise seeds live in [2**31, 2**32); held-out sampling seeds must stay below, so the
# images that judge a prompt were never seen while optimising it.
HELD_OUT_SEED_LIMIT = 2**31


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GeneratorConfig(_Section):
    model: str = Field("SimianLuo/LCM_Dreamshaper_v7", description="LCM checkpoint or SD1.5-family base: hub id or local folder ('tiny' builds a tiny random model)")
    lora: str | None = Field(None, description="LCM-LoRA to fuse into the base, e.g. latent-consistency/lcm-lora-sdv1-5")
    tiny_vae: str | None = Field(None, description="AutoencoderTiny used as the decoder, e.g. madebyollin/taesd")
    steps: int = Field(4, gt=0, le=50, description="LCM sampler steps")
    guidance_scale: float = Field(1.0, ge=0.0, description="guidance scale (embedded for LCM checkpoints, CFG for LCM-LoRA when > 1)")
    original_inference_steps: int = Field(50, gt=0, description="LCM training schedule length")
    resolution: int = Field(512, gt=0, description="image side in pixels (multiple of the VAE scale factor)")
    checkpointing: bool = Field(False, description="recompute each sampler step in backward to save memory")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    grad_steps: int | None = Field(None, ge=1, description="backprop through only the last k sampler steps (earlier ones without gradients); null: all")

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
    input_size: int | None = Field(None, gt=0, description="classifier input side; default from the model")
    final_layer: str | None = Field(None, description="name of the final linear layer; default found automatically")
    allow_pickle: bool = Field(False, description="allow checkpoints that execute pickled code when loaded")


# Named templates (paper Fig. 4); any other string holding '{}' is a literal template.
TEMPLATE_PRESETS = {"object": "{}", "texture": "a texture of {}", "shape": "a shape of {}"}


class HardPromptConfig(_Section):
    """Hard prompts (paper Sec. 4.4): logits over token ids, straight-through Gumbel-softmax."""

    tau_start: float = Field(1.0, gt=0, description="Gumbel-softmax temperature at the first step (exponential anneal)")
    tau_end: float = Field(0.1, gt=0, description="Gumbel-softmax temperature at the last step")
    lr: float | None = Field(None, gt=0, description="learning rate of the logits (default: optimize.lr)")
    vocabulary: list[str] | str | None = Field(None, description="allowed words, each a single token: a list or a text file (one per line, read when the config loads); null: every whole-word token")

    @field_validator("vocabulary")
    @classmethod
    def _words(cls, vocabulary: list[str] | str | None) -> list[str] | None:
        if isinstance(vocabulary, str):
            path = Path(vocabulary).expanduser()
            if not path.is_file():
                raise ValueError(f"file not found: {vocabulary}")
            vocabulary = path.read_text().splitlines()
        if vocabulary is None:
            return None
        words = [w.strip() for w in vocabulary if w.strip()]
        if not words:
            raise ValueError("no words")
        return list(dict.fromkeys(words))


class PromptConfig(_Section):
    templates: list[str] = Field(default_factory=lambda: ["{}"], min_length=1, description="prompt templates: 'object' ({}), 'texture' (a texture of {}), 'shape' (a shape of {}) or any string where '{}' marks the learnable tokens")
    n_tokens: int = Field(1, gt=0, le=16, description="learnable tokens in place of '{}'")
    init: str = Field("random", description="'random' (embedding-table scale), 'class' (the class name) or 'word:WORD'")
    kind: Literal["soft", "hard"] = Field("soft", description="soft: free embedding rows; hard: real tokens (Gumbel-softmax), decoded into hard_prompt_text")
    hard: HardPromptConfig = Field(default_factory=HardPromptConfig)

    @field_validator("templates")
    @classmethod
    def _one_placeholder(cls, templates: list[str]) -> list[str]:
        resolved = [TEMPLATE_PRESETS.get(t, t) for t in templates]
        for t in resolved:
            if t.count("{}") != 1:
                names = ", ".join(TEMPLATE_PRESETS)
                raise ValueError(f"template {t!r} must contain '{{}}' exactly once (or be one of {names})")
        if len(set(resolved)) < len(resolved):
            raise ValueError(f"templates {templates} name the same template twice")
        return resolved

    @field_validator("init")
    @classmethod
    def _init_kind(cls, init: str) -> str:
        if init not in ("random", "class") and not (init.startswith("word:") and init[5:].strip()):
            raise ValueError(f"init {init!r} must be 'random', 'class' or 'word:WORD'")
        return init


class OptimizeConfig(_Section):
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = Field(0.1, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0)
    steps: int = Field(100, gt=0, description="optimisation steps per task")
    samples_per_step: int = Field(1, gt=0, description="noise samples z drawn per step (S)")
    early_stop_prob: float | None = Field(None, gt=0, le=1, description="stop a class task (not a feature task) once its mean target probability reaches this")
    feature_weight: float = Field(1.0, gt=0, description="lambda of Eq.5: CE(class) - lambda * feature")
    batch_tasks: int = Field(4, gt=0, description="tasks optimised together in one batch")
    restarts: int = Field(1, gt=0, description="independent initialisations per task; the lowest final loss wins")


class SampleConfig(_Section):
    k: int = Field(10, gt=0, description="held-out images per task")
    seeds: list[int] | None = Field(None, description="held-out seeds (default 0..k-1)")
    batch_size: int = Field(8, gt=0)
    baseline: bool = Field(True, description="also score the initial prompt on the held-out seeds (before/after)")

    @model_validator(mode="after")
    def _seeds(self) -> SampleConfig:
        if self.seeds is not None:
            if len(self.seeds) != self.k:
                raise ValueError(f"sample.seeds has {len(self.seeds)} seeds but sample.k is {self.k}")
            bad = [s for s in self.seeds if not 0 <= s < HELD_OUT_SEED_LIMIT]
            if bad:
                raise ValueError(f"sample.seeds must be in [0, 2**31) (training noise uses the rest): {bad[:3]}")
        return self

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.k))


class NeuronTarget(_Section):
    layer: str
    unit: int = Field(ge=0)


class FeatureImagesConfig(_Section):
    path: str | None = Field(None, description="folder with one sub-folder per class (index or WordNet id), local or s3://")
    select: Literal["predicted", "labelled"] = Field("predicted", description="images the model predicts as c (Salient ImageNet) or labelled c")
    max_per_class: int | None = Field(50, gt=0, description="images read per class folder")
    wnids: list[str] | str | None = Field(None, description="WordNet id of each class (list or text file), for folders named by wnid")
    batch_size: int = Field(16, gt=0)


class TargetsConfig(_Section):
    classes: list[int] = Field(default_factory=lambda: [0], min_length=1, description="class indices to audit")
    class_task: bool = Field(True, description="optimise the class explanation (Eq.3) for each class")
    top_k: int = Field(5, ge=0, description="top-k features per class (Eq.5 tasks)")
    feature_source: Literal["weights", "images", "table"] = Field("weights", description="rank features by W[c,f] x mean activation over images, by weight alone, or read a table")
    feature_images: FeatureImagesConfig = Field(default_factory=FeatureImagesConfig)
    feature_table: str | None = Field(None, description="CSV/Parquet with class_index, feature_index, rank")
    features: dict[int, list[int]] = Field(default_factory=dict, description="explicit features per class (overrides ranking)")
    neurons: list[NeuronTarget] = Field(default_factory=list, description="hidden neurons to explain (Eq.4)")

    @field_validator("classes")
    @classmethod
    def _non_negative(cls, classes: list[int]) -> list[int]:
        if any(c < 0 for c in classes):
            raise ValueError(f"class indices must be >= 0: {classes}")
        return classes

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
    sam: str | None = Field("facebook/sam-vit-base", description="SAM: hub id or local folder; null uses the boxes as masks")
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    prompts: dict[int, str] = Field(default_factory=dict, description="detection prompt per class index (default: the class name)")
    batch_size: int = Field(4, gt=0)


class VerdictConfig(_Section):
    delta: float = Field(0.3, ge=0, le=1, description="a feature is core when its mean object fraction r >= delta")


class StorageConfig(_Section):
    """Where the S3 client connects. Credentials never go here: they come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE) or an instance role."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://127.0.0.1:8333 (default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS)")
    region: str | None = Field(None, description="S3 region (default: AWS_REGION or AWS_DEFAULT_REGION)")
    path_style: bool | None = Field(None, description="path-style addressing; default: on with a custom endpoint, off on AWS")
    retry_seconds: float = Field(120.0, ge=0, description="keep retrying a failed storage call with backoff for this long")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to wait for a connection to the endpoint")
    request_timeout: float = Field(60.0, gt=0, description="seconds to wait for one request")


class ClusterConfig(_Section):
    """How `dxray audit` lays the work out on Ray."""

    address: str | None = Field(None, description="Ray address ('auto', ray://HOST:10001); default: RAY_ADDRESS, else a local Ray is started")
    local_gpus: int | None = Field(None, ge=0, description="GPUs a local Ray advertises (logical ones allowed); default: those torch sees")
    local_cpus: int | None = Field(None, gt=0, description="CPUs a local Ray advertises; default: all")
    explainers: int | None = Field(None, gt=0, description="explainer actors; default: one per gpus_per_explainer of the cluster's GPUs (1 on a CPU-only cluster)")
    gpus_per_explainer: float = Field(1.0, ge=0, description="GPUs pinned by each explainer actor (fractional allowed)")
    cpus_per_explainer: float = Field(1.0, ge=0, description="CPUs reserved by each explainer actor")
    segmenters: int = Field(1, ge=0, description="segmenter actors (Grounding DINO + SAM)")
    gpus_per_segmenter: float = Field(0.0, ge=0, description="GPUs per segmenter actor (fractional: shares a GPU with an explainer; 0 = CPU)")
    cpus_per_segmenter: float = Field(0.0, ge=0, description="CPUs reserved by each segmenter actor")
    in_flight_per_actor: int = Field(2, gt=0, description="batches queued on each explainer at once (bounds memory; keeps the GPU busy)")
    task_retries: int = Field(3, ge=0, description="times a batch is re-submitted after its actor died")
    log_every_s: float = Field(30.0, gt=0, description="seconds between summary lines in the job log")


class EstimateConfig(_Section):
    """Timing figures for `dxray audit --dry-run`; unset: taken from benchmarks/results/ when one fits."""

    seconds_per_step: float | None = Field(None, gt=0, description="GPU seconds of one optimisation step of one task (one restart, optimize.samples_per_step noise samples, gradients through the sampler)")
    seconds_per_image: float | None = Field(None, gt=0, description="GPU seconds per held-out or baseline image: sampling without gradients, plus Grounding DINO + SAM scoring when segment.enabled")


class Config(_Section):
    output: str = Field("dxray-out", description="local folder or s3://bucket/prefix")
    run_id: str | None = Field(None, description="run folder name; default derived from the config, so a re-run resumes")
    seed: int = Field(0, ge=0, description="base seed of initialisation and training noise")
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
        if run_id is not None and (not run_id or "/" in run_id or run_id.startswith(".")):
            raise ValueError(f"run_id {run_id!r} must be a plain folder name")
        return run_id

    def fingerprint(self) -> str:
        """Hash of everything that defines the results (not where they go)."""
        data = self.model_dump(mode="json", exclude={"output", "run_id", "device", "cache_dir", "storage", "cluster",
                                                          "estimate"})
        data["optimize"].pop("batch_tasks")
        if data["prompt"]["kind"] == "soft":  # soft prompts: the run ids from before hard prompts stay
            data["prompt"].pop("kind")
            data["prompt"].pop("hard")
        if data["generator"].get("grad_steps") is None:
            data["generator"].pop("grad_steps", None)  # unset: the run ids from before the option stay
        data["sample"].pop("batch_size")
        data["segment"].pop("batch_size")
        data.pop("verdict")  # verdicts are re-decidable from stored r: same run
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def resolved_run_id(self) -> str:
        return self.run_id or f"run-{self.fingerprint()}"


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at ``loc`` (the parent of an unknown key)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def _one_line(err: ValidationError, model: type[BaseModel]) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    where = _field_path(loc) or "config"
    if e["type"] == "extra_forbidden":
        valid = _valid_keys(model, loc[:-1])
        return f"unknown config key '{where}'; valid keys: {', '.join(valid)}"
    msg = e["msg"].removeprefix("Value error, ")
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"config field '{where}': {msg}{more}"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``a.b=1`` strings → nested dict; values are parsed as YAML (numbers, lists, null...)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DxrayError(f"override {item!r} must look like key=value")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DxrayError(f"override {item!r} conflicts with another override")
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
        return Config.model_validate(merged)
    except ValidationError as err:
        raise DxrayError(_one_line(err, Config)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DxrayError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise DxrayError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise DxrayError(f"config file {path} must hold a mapping at the top level")
    return build_config(data, overrides)
