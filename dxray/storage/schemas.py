"""Arrow schemas of the output tables: the data contract (DESIGN.md §3).

Columns are only ever added, never renamed; every file carries the schema
version in its metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dxray.errors import DxrayError

SCHEMA_VERSION = "1"


def _f(name: str, type_: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={b"description": description.encode()})


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={b"dxray.schema_version": SCHEMA_VERSION.encode(), b"dxray.table": name.encode()})


TASKS = _schema("tasks", [
    _f("run_id", pa.string(), "run folder name", nullable=False),
    _f("task_id", pa.string(), "hash of everything that defines the task", nullable=False),
    _f("kind", pa.string(), "class (Eq.3), feature (Eq.5), neuron (Eq.4) or control (the segmenter control: a plain prompt, not optimised)"),
    _f("class_index", pa.int32(), "classifier output index"),
    _f("class_name", pa.string(), "class name from the classifier's metadata"),
    _f("feature_index", pa.int32(), "penultimate feature (or neuron unit) index"),
    _f("feature_rank", pa.int32(), "1 = the class's most important feature"),
    _f("layer", pa.string(), "layer of the feature or neuron"),
    _f("objective", pa.string(), "the loss minimised, as a readable expression"),
    _f("template", pa.string(), "soft-prompt template; {} holds the learnable tokens"),
    _f("n_tokens", pa.int32(), "number of learnable tokens"),
    _f("init", pa.string(), "initialisation of the learnable tokens"),
    _f("status", pa.string(), "ok or error"),
    _f("error", pa.string(), "one-line error when status is error"),
    _f("steps", pa.int32(), "optimisation steps actually run"),
    _f("final_loss", pa.float32(), "loss at the last step"),
    _f("loss_curve", pa.list_(pa.float32()), "loss at every step"),
    _f("target_prob", pa.float32(), "mean target-class probability at the last step (training noise)"),
    _f("stopped_early", pa.bool_(), "stopped once the target probability was reached"),
    _f("prompt_embedding", pa.list_(pa.list_(pa.float32())), "learned rows (n_tokens x embedding dim)"),
    _f("hard_prompt_text", pa.string(), "decoded words of a hard prompt"),
    _f("train_seeds", pa.list_(pa.int64()), "first noise seed of every optimisation step"),
    _f("lr", pa.float32(), "learning rate"),
    _f("samples_per_step", pa.int32(), "noise samples per optimisation step (S)"),
    _f("seconds", pa.float32(), "optimisation wall time of the task"),
    _f("baseline_prob", pa.float32(), "mean held-out class probability with the initial prompt (before optimisation)"),
    _f("control_activations", pa.list_(pa.float32()), "segmenter control only: the mean penultimate features of its images (the generator's plain pictures of the class), what each feature reaches without optimisation; null otherwise"),
    _f("chosen_loss", pa.float32(), "hard prompt: loss of the returned words on the last step's seeds (final_loss is the last Gumbel draw's); restarts are ranked by it; null for soft prompts"),
])

SAMPLES = _schema("samples", [
    _f("run_id", pa.string(), "run folder name", nullable=False),
    _f("task_id", pa.string(), "task that produced the image", nullable=False),
    _f("class_index", pa.int32(), "class of the task"),
    _f("feature_index", pa.int32(), "feature of the task"),
    _f("seed", pa.int64(), "held-out noise seed"),
    _f("image_uri", pa.string(), "full-resolution PNG"),
    _f("thumbnail", pa.binary(), "small inline PNG"),
    _f("width", pa.int32(), "image width in pixels"),
    _f("height", pa.int32(), "image height in pixels"),
    _f("class_prob", pa.float32(), "classifier probability of the task's class"),
    _f("feature_activation", pa.float32(), "activation of the task's feature"),
    _f("detection_prompt", pa.string(), "Grounding DINO text prompt (class name, lower-case, ending with '.')"),
    _f("object_fraction", pa.float32(), "r = pixels of the detected class object / all pixels (0 when nothing detected)"),
    _f("mask_rle", pa.list_(pa.int32()), "union object mask, COCO uncompressed RLE counts (column-major, background first)"),
    _f("boxes", pa.list_(pa.list_(pa.float32())), "detected boxes, xyxy pixels"),
    _f("box_scores", pa.list_(pa.float32()), "detection score of each box"),
    _f("candidate_prompts", pa.list_(pa.string()), "the class's detection prompts when segment.prompts lists several (detection_prompt is the first); null with one"),
    _f("candidate_object_fractions", pa.list_(pa.float32()), "r of the image under each of candidate_prompts, in order (object_fraction, mask and boxes are the first's); null with one prompt"),
    _f("concepts", pa.list_(pa.string()), "the context concepts scored on the image (segment.concepts, lower-case, in order); null without"),
    _f("concept_fractions", pa.list_(pa.float32()), "coverage of each of concepts: pixels of the union of its masks / all pixels (the same detector and SAM as the object, all concepts in one query)"),
])

VERDICTS = _schema("verdicts", [
    _f("run_id", pa.string(), "run folder name", nullable=False),
    _f("class_index", pa.int32(), "classifier output index"),
    _f("class_name", pa.string(), "class name"),
    _f("feature_index", pa.int32(), "penultimate feature index"),
    _f("feature_rank", pa.int32(), "1 = the class's most important feature"),
    _f("template", pa.string(), "soft-prompt template of the feature task"),
    _f("mean_object_fraction", pa.float32(), "mean r over the held-out images"),
    _f("std_object_fraction", pa.float32(), "population standard deviation of r"),
    _f("n_samples", pa.int32(), "images with a measured r"),
    _f("delta", pa.float32(), "threshold: core when mean r >= delta"),
    _f("verdict", pa.string(), "core (mean r >= delta), spurious, or not explained (explained false, whatever r)"),
    _f("mean_object_fraction_low", pa.float32(), "2.5th percentile of the bootstrap means of r: the 95% interval's low end (null with fewer than 2 images)"),
    _f("mean_object_fraction_high", pa.float32(), "97.5th percentile of the bootstrap means of r: the 95% interval's high end (null with fewer than 2 images)"),
    _f("confidence", pa.float32(), "share of bootstrap resamples whose mean r gives the same verdict at delta (null with fewer than 2 images)"),
    _f("low_confidence", pa.bool_(), "confidence < 0.8, or fewer than 2 images: a verdict not to trust alone"),
    _f("bootstrap_resamples", pa.int32(), "bootstrap resamples of the images' r behind the interval and confidence"),
    _f("bootstrap_seed", pa.int64(), "seed of the resamples: sha256 of run id, class, feature and template (reproducible)"),
    _f("control_object_fraction", pa.float32(), "mean r of the class's segmenter control (its plain-prompt images); null without a control"),
    _f("reliable", pa.bool_(), "false when the segmenter control is below delta: the segmenter cannot find this class's object even in the generator's own pictures of it, so the verdict is not to be trusted; null without a control"),
    _f("detection_prompt", pa.string(), "the detection prompt whose r decided this verdict: the class's only prompt, or of several candidates the one with the highest mean r on the control images"),
    _f("top_concepts", pa.list_(pa.string()), "what the feature's images show besides the object: up to 3 concepts of segment.concepts with the highest mean coverage over its images (above 0), highest first; null without concepts"),
    _f("top_concept_fractions", pa.list_(pa.float32()), "mean coverage of each of top_concepts"),
    _f("mean_activation", pa.float32(), "mean activation of the feature over its held-out images (what the optimisation reached)"),
    _f("control_activation", pa.float32(), "the feature's mean activation over the class's segmenter-control images (its plain pictures, not optimised); null without a control"),
    _f("explained", pa.bool_(), "mean_activation >= control_activation: the optimised images drive the feature at least as high as the class's plain pictures do; false: the optimisation did not find what the feature responds to, so the verdict is 'not explained' whatever its r; null without a control"),
])

CLASSES = _schema("classes", [
    _f("run_id", pa.string(), "run folder name", nullable=False),
    _f("class_index", pa.int32(), "classifier output index"),
    _f("class_name", pa.string(), "class name"),
    _f("template", pa.string(), "soft-prompt template"),
    _f("class_object_fraction", pa.float32(), "mean r of the class explanation (Eq.3): is the object there at all?"),
    _f("class_prob", pa.float32(), "mean probability of the class over the class explanation's held-out images: does the classifier read them as the class?"),
    _f("explained", pa.bool_(), "class_prob >= 0.5 (verdict.EXPLAINED): the optimisation found what the classifier responds to; false: the class is not called biased whatever its r ('not explained'); null without class images"),
    _f("n_spurious", pa.int32(), "features judged spurious (not explained ones are not)"),
    _f("n_not_explained", pa.int32(), "features whose optimised images do not reach the control's activation (verdicts.explained false): neither core nor spurious"),
    _f("n_features", pa.int32(), "features judged"),
    _f("delta", pa.float32(), "threshold used for the verdicts"),
    _f("n_low_confidence", pa.int32(), "features whose verdict is low confidence (see verdicts.low_confidence)"),
    _f("control_object_fraction", pa.float32(), "mean r of the segmenter control: segment.control_template with the class name, not optimised; null without a control"),
    _f("reliable", pa.bool_(), "control_object_fraction >= delta: the segmenter finds the class object in the generator's plain pictures of it (false: this class's verdicts are unreliable); null without a control"),
    _f("detection_prompt", pa.string(), "the detection prompt whose r the class's figures use: its only prompt, or the candidate with the highest mean r on the control images"),
    _f("detection_candidates", pa.list_(pa.string()), "every detection prompt tried for the class (segment.prompts list), in order; null with one"),
    _f("candidate_control_object_fractions", pa.list_(pa.float32()), "mean control r of each of detection_candidates: the highest one wins (the first on a tie); null with one prompt"),
    _f("class_top_concepts", pa.list_(pa.string()), "up to 3 concepts with the highest mean coverage over the class explanation's images (above 0): what the class is seen with; null without concepts"),
    _f("class_top_concept_fractions", pa.list_(pa.float32()), "mean coverage of each of class_top_concepts"),
])

FEATURE_RANKING = _schema("feature_ranking", [
    _f("run_id", pa.string(), "run folder name", nullable=False),
    _f("class_index", pa.int32(), "classifier output index"),
    _f("class_name", pa.string(), "class name"),
    _f("feature_index", pa.int32(), "penultimate feature index"),
    _f("rank", pa.int32(), "1 = most important"),
    _f("importance", pa.float32(), "W[c, f] x mean activation (or W[c, f] alone for weight-only ranking)"),
    _f("source", pa.string(), "images-predicted, images-labelled, weights or table:<file>"),
    _f("n_images", pa.int32(), "images behind the mean activation"),
])

AGREEMENT = _schema("agreement", [
    _f("run_id", pa.string(), "run folder name", nullable=False),
    _f("annotations", pa.string(), "file name of the human labels (Salient ImageNet discover_spurious_features.csv)"),
    _f("subset", pa.string(), "classes compared: all, or salient90 (15 classes per number 0..5 of spurious top-5 features)"),
    _f("template", pa.string(), "soft-prompt template of the feature tasks"),
    _f("delta", pa.float32(), "threshold of the verdicts compared: core when mean r >= delta"),
    _f("stored", pa.bool_(), "true: the run's verdicts table as written; false: re-decided from the stored r (delta sweep)"),
    _f("animacy", pa.string(), "all, animate or inanimate classes"),
    _f("bias", pa.string(), "all, unbiased (0 human-spurious among the top 5), medium (1-4) or biased (5)"),
    _f("n_classes", pa.int32(), "classes with at least one compared pair"),
    _f("n_pairs", pa.int32(), "(class, feature) pairs with both a dxray verdict and a human label"),
    _f("n_agree", pa.int32(), "pairs where dxray and the annotators agree (core/spurious)"),
    _f("agreement", pa.float32(), "n_agree / n_pairs (null when n_pairs is 0)"),
    _f("n_human_spurious", pa.int32(), "pairs the annotators call spurious (>= 3 of 5 said separate_object or background)"),
    _f("n_dxray_spurious", pa.int32(), "pairs dxray calls spurious"),
    _f("n_both_spurious", pa.int32(), "pairs both call spurious"),
    _f("roc_auc", pa.float32(), "threshold-free: ROC AUC of mean r as a score for human core vs human spurious (1.0 = every core pair has a higher mean r than every spurious one, 0.5 chance; ties count half; the same at every delta; null when the pairs lack either label or a mean r)"),
    _f("exclude_unreliable", pa.bool_(), "pairs of classes whose segmenter control failed were left out (dxray agreement --exclude-unreliable)"),
    _f("n_unreliable", pa.int32(), "pairs of classes whose segmenter control failed (verdicts.reliable false): counted in n_pairs, or left out when exclude_unreliable"),
])

COMPARISON = _schema("comparison", [
    _f("run_id", pa.string(), "the run compared (RUN_B of dxray compare), whose folder holds this table", nullable=False),
    _f("run_a", pa.string(), "the baseline run (RUN_A) it is compared with"),
    _f("level", pa.string(), "class (one row per class and template both runs audited) or feature (one per (class, feature, template) both judged; only when features_comparable)"),
    _f("class_index", pa.int32(), "classifier output index"),
    _f("class_name", pa.string(), "class name (RUN_B's)"),
    _f("template", pa.string(), "soft-prompt template"),
    _f("feature_index", pa.int32(), "penultimate feature index (feature rows; null on class rows)"),
    _f("feature_rank", pa.int32(), "the feature's rank in RUN_B (feature rows)"),
    _f("features_comparable", pa.bool_(), "both runs audited the same classifier (spec, weights, kwargs, final layer), so feature f means the same unit in both"),
    _f("r_a", pa.float32(), "RUN_A's r: class_object_fraction on class rows, the verdict's mean r on feature rows"),
    _f("r_b", pa.float32(), "RUN_B's r, as r_a"),
    _f("r_change", pa.float32(), "r_b - r_a (null when either is)"),
    _f("r_low_a", pa.float32(), "RUN_A's 95% bootstrap interval of the mean r, low end (feature rows, where present)"),
    _f("r_high_a", pa.float32(), "RUN_A's 95% bootstrap interval, high end"),
    _f("r_low_b", pa.float32(), "RUN_B's 95% bootstrap interval, low end"),
    _f("r_high_b", pa.float32(), "RUN_B's 95% bootstrap interval, high end"),
    _f("delta_a", pa.float32(), "RUN_A's delta"),
    _f("delta_b", pa.float32(), "RUN_B's delta"),
    _f("biased_a", pa.bool_(), "class rows: RUN_A's class r < its delta (the class explanation barely shows the object)"),
    _f("biased_b", pa.bool_(), "class rows: the same in RUN_B"),
    _f("n_spurious_a", pa.int32(), "class rows: RUN_A's spurious features"),
    _f("n_spurious_b", pa.int32(), "class rows: RUN_B's spurious features"),
    _f("n_features_a", pa.int32(), "class rows: RUN_A's judged features"),
    _f("n_features_b", pa.int32(), "class rows: RUN_B's judged features"),
    _f("n_new_spurious", pa.int32(), "class rows: features core in RUN_A and spurious in RUN_B when features_comparable; else how many more spurious features RUN_B has (0 when fewer)"),
    _f("n_new_core", pa.int32(), "class rows: features spurious in RUN_A and core in RUN_B (features_comparable); else how many fewer spurious features RUN_B has"),
    _f("verdict_a", pa.string(), "feature rows: RUN_A's verdict (core, spurious or not explained)"),
    _f("verdict_b", pa.string(), "feature rows: RUN_B's verdict"),
    _f("change", pa.string(), "class rows: newly biased, no longer biased or same; feature rows: new spurious (spurious in B, not in A), new core (core in B, not in A), not explained (in B, not in A), or same"),
])

TABLES: dict[str, pa.Schema] = {"tasks": TASKS, "samples": SAMPLES, "verdicts": VERDICTS, "classes": CLASSES,
                                 "feature_ranking": FEATURE_RANKING, "agreement": AGREEMENT, "comparison": COMPARISON}


def _plain(value: Any) -> Any:
    """numpy arrays/scalars (and tensors) → Python values pyarrow converts with the column's type."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) or hasattr(value, "detach") else value


def to_table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) → a table with the exact schema; missing keys are null, unknown keys an error."""
    if name not in TABLES:
        raise DxrayError(f"unknown table {name!r} (known: {', '.join(TABLES)})")
    schema = TABLES[name]
    known = set(schema.names)
    for row in rows:
        extra = set(row) - known
        if extra:
            raise DxrayError(f"table {name!r} has no column {sorted(extra)[0]!r}")
    arrays = []
    for field in schema:
        values = [_plain(row.get(field.name)) for row in rows]
        if not field.nullable and any(v is None for v in values):
            raise DxrayError(f"table {name!r}: column {field.name!r} must not be null")
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DxrayError(f"table {name!r}: column {field.name!r}: {str(e).splitlines()[0]}") from None
    return pa.Table.from_arrays(arrays, schema=schema)


def describe_schema(name: str) -> dict:
    schema = TABLES[name]
    return {
        "table": name,
        "schema_version": SCHEMA_VERSION,
        "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable,
                    "description": (f.metadata or {}).get(b"description", b"").decode()} for f in schema],
    }


def export_schemas(folder: str | Path) -> list[Path]:
    """One ``{table}.arrow.json`` per table in ``folder`` (``dxray schema`` writes them to ``schemas/tables/``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in TABLES:
        path = folder / f"{name}.arrow.json"
        path.write_text(json.dumps(describe_schema(name), indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths
