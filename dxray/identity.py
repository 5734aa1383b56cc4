"""Identities: a run id and a task id are hashes of what defines the results, never of where they go
or how fast they are made, so a re-run with the same config resumes the same run and skips its tasks.

One table says which config fields each identity leaves out. Both ids are pinned by
``tests/test_identity.py``: a change here that moves an id orphans every existing run.
"""

from __future__ import annotations

import hashlib
import json

RUN, TASK = "run", "task"

# Top-level fields that say where results go or how they are reported, not what they are: in neither id.
# (verdict: a verdict is re-decidable from the stored r, so a new delta is the same run.)
_PLACE = {"output", "run_id", "device", "cache_dir", "storage", "cluster", "estimate", "verdict"}

# Per section: fields left out, and of which identity. How fast results are made (batch sizes) is in
# neither. Task ids also leave out what run ids have always held (checkpointing, dtype, allow_pickle):
# changing either rule would move existing ids, so the two rules stay as they were written.
_LEFT_OUT: dict[str, dict[str, set[str]]] = {
    "optimize": {"batch_tasks": {RUN, TASK}},
    "sample": {"batch_size": {RUN, TASK}},
    "segment": {"batch_size": {RUN, TASK}, "allow_pickle": {RUN, TASK},  # how weights load, not which: ids stay
                # The control is a task of its own (its template is in its id); a run from before it keeps its id
                # and a resume adds the control tasks.
                "control": {RUN, TASK}, "control_template": {RUN, TASK}},
    "generator": {"checkpointing": {TASK}, "dtype": {TASK}},
    "classifier": {"allow_pickle": {TASK}},
}


def digest(data: dict, length: int) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]


def section(cfg, name: str, scope: str) -> dict:
    """One config section as it enters the ``scope`` identity."""
    left_out = {f for f, scopes in _LEFT_OUT.get(name, {}).items() if scope in scopes}
    part = getattr(cfg, name)
    if name == "generator" and part.grad_steps is None:
        left_out.add("grad_steps")  # unset: the ids from before the option stay
    if name == "segment" and part.concepts is None:
        left_out.add("concepts")  # likewise; set, it is in both ids: every sample row gets its columns
    if name == "segment" and part.dtype == "float32":
        left_out.add("dtype")  # the default: ids from before the option stay; a lower precision is another run
    return part.model_dump(mode="json", exclude=left_out)


def run_fingerprint(cfg) -> str:
    """12 hex digits of the whole config minus where results go (the run id is ``run-`` + this)."""
    data = {name: section(cfg, name, RUN) if name in _LEFT_OUT else value
            for name, value in cfg.model_dump(mode="json").items() if name not in _PLACE}
    if cfg.prompt.kind == "soft":  # soft prompts: the run ids from before hard prompts stay
        data["prompt"] = cfg.prompt.model_dump(mode="json", exclude={"kind", "hard"})
    return digest(data, 12)


def task_ids(cfg):
    """``task_id`` for one config, the shared settings read once: planning 7,000 tasks (a full-ImageNet audit) dumps
    the config's sections once, not 7,000 times."""
    shared = {
        "n_tokens": cfg.prompt.n_tokens, "seed": cfg.seed, "sample_seeds": cfg.sample.seed_list(),
        **{name: section(cfg, name, TASK) for name in ("generator", "classifier", "optimize", "segment")},
    }
    if cfg.prompt.kind == "hard":  # only then: soft-prompt task ids stay as they were
        shared["hard_prompt"] = cfg.prompt.hard.model_dump(mode="json")

    # The shared values are JSON-encoded once; each id encodes only its own ``what`` and joins the two in key order:
    # the same text json.dumps(data, sort_keys=True) writes (tests/test_identity.py pins the ids).
    encoded = {k: json.dumps(v, sort_keys=True) for k, v in shared.items()}

    def make(**what) -> str:
        parts = {**{k: json.dumps(v, sort_keys=True) for k, v in what.items()}, **encoded}
        text = "{" + ", ".join(f"{json.dumps(k)}: {parts[k]}" for k in sorted(parts)) + "}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return make


def task_id(cfg, **what) -> str:
    """16 hex digits of what defines one task: ``what`` (kind, objective, template, init, class, feature, ...)
    plus the settings every task of the run shares."""
    return task_ids(cfg)(**what)
