"""The audit's lifecycle, whichever runner drives it (torchtune-recipe style: a job is a class whose
methods are its stages):

    job = AuditJob(cfg, "explain")
    job.preflight()                      # every check that needs no model weights
    job.prepare(ranker)                  # rank features, write the ranking, plan, drop committed tasks
    for each finished task: job.commit(finished, scores)   # samples first, the task row last
    job.finish(device)                   # verdicts, classes, then the manifest, last

The runners (:mod:`dxray.pipeline.local`, :mod:`dxray.distributed.audit`) differ only in how the
batches of ``job.todo`` get run: in this process, or on Ray actors.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from dxray import features
from dxray.classifiers import ClassifierInfo
from dxray.config import Config
from dxray.errors import DxrayError
from dxray.features import RankedFeature
from dxray.pipeline.preflight import preflight
from dxray.pipeline.ranking import Ranker, rank_features
from dxray.pipeline.rows import Finished
from dxray.pipeline.tasks import TaskSpec, plan
from dxray.progress import Planned
from dxray.runs import decision_in_force, open_sink
from dxray.storage import package_versions, redact, redact_text
from dxray.storage.compact import compact_run, finish_pending
from dxray.storage.schemas import TABLES
from dxray.storage.sink import RunSink
from dxray.verdict import SAMPLE_COLUMNS, TASK_COLUMNS, decide

log = logging.getLogger("dxray")


@dataclass
class RunSummary:
    run_id: str
    root: str
    planned: int
    skipped: int
    ok: int = 0
    failed: int = 0
    samples: int = 0
    verdicts: int = 0
    spurious: int = 0
    low_confidence: int = 0  # verdicts (issue 19)
    unreliable: int = 0  # classes whose segmenter control is below delta (issue 19)
    errors: list[str] = field(default_factory=list)


class AuditJob:
    """One audit run: its config, its sink, its plan and its tally."""

    def __init__(self, cfg: Config, command: str, sink: RunSink | None = None):
        self.cfg = cfg
        self.command = command  # the manifest's dxray_command
        self.started = datetime.now(UTC)
        self.info: ClassifierInfo | None = None
        self.sink = sink  # opened by prepare() unless given
        self.ranking: list[RankedFeature] = []
        self.specs: list[TaskSpec] = []
        self.todo: list[TaskSpec] = []
        self.summary: RunSummary | None = None

    # 1. Preflight ---------------------------------------------------------------------------------
    def preflight(self) -> ClassifierInfo:
        self.info = preflight(self.cfg)
        return self.info

    # 2. Prepare -----------------------------------------------------------------------------------
    def prepare(self, ranker: Ranker | None = None) -> list[TaskSpec]:
        """Rank features with ``ranker`` (the runner's, :func:`dxray.pipeline.ranking.choose_ranker`; None: nothing
        to rank), write the ranking (the only write of ``feature_ranking``), plan every task and drop the committed
        ones; returns the tasks still to do."""
        info = self.info or self.preflight()
        self.sink = sink = self.sink or open_sink(self.cfg)
        finish_pending(sink)  # a compaction a crash interrupted: complete it before anything else reads the run
        self.ranking = rank_features(self.cfg.targets, ranker)
        sink.write_table("feature_ranking", features.ranking_rows(sink.run_id, self.ranking, info.class_names),
                         part="all")
        self.specs = plan(self.cfg, info, self.ranking)
        # Committed: a task row of status ok AND its k samples. A task whose samples are gone (a damaged part
        # deleted, as the read error advises) is done again: its parts are named by its id, so the redo writes each
        # row once (a compacted file that still holds its other table's row keeps it; the redo's copy is dropped).
        k = len(self.cfg.sample.seed_list())
        done = sink.committed_task_ids(samples_per_task=k)
        self.todo = [s for s in self.specs if s.task_id not in done]
        if lost := len({s.task_id for s in self.todo} & sink.committed_task_ids()):
            log.warning("%d task(s) marked done have fewer than sample.k=%d samples in %s: doing them again",
                        lost, k, sink.uri("samples"))
        self.summary = RunSummary(sink.run_id, sink.uri(""), len(self.specs), len(self.specs) - len(self.todo))
        return self.todo

    def planned(self, **where) -> Planned:
        """The :class:`dxray.progress.Planned` event (``where``: the Ray runner's explainers and cluster)."""
        s = self.summary
        return Planned(s.planned, s.skipped, len(self.todo), s.root, **where)

    # 3. Commit, one task at a time ----------------------------------------------------------------
    def commit(self, done: Finished, scores: list[dict] | None = None, error: str | None = None) -> dict:
        """Samples first, the task row last: a task row of status ok on storage means the task is
        committed. ``error`` (labelled, :func:`dxray.pipeline.rows.error_text`) fails the task and
        drops its samples. Safe to call from several threads; returns the row written."""
        row = dict(done.task_row)
        if error is not None:
            row |= {"status": "error", "error": error}
        if row["error"]:  # an exception's text may echo a model URL or a library's view of a credential
            row["error"] = redact_text(row["error"])
        if row["status"] == "ok":
            rows = [r | s for r, s in zip(done.sample_rows, scores, strict=True)] if scores else done.sample_rows
            if rows:
                self.sink.write_table("samples", rows, part=row["task_id"])
        self.sink.write_table("tasks", [row], part=row["task_id"])
        return row

    def count(self, row: dict) -> None:
        """Tally a committed row (from the runner's thread, not the commit threads)."""
        s = self.summary
        if row["status"] == "ok":
            s.ok += 1
        else:
            s.failed += 1
            s.errors.append(f"{row['task_id']}: {row['error']}")

    # 4. Finish ------------------------------------------------------------------------------------
    def finish(self, device: str, extra: dict | None = None) -> RunSummary:
        """The committed parts compacted into a few large files (:mod:`dxray.storage.compact`), verdicts and
        classes from the stored tables, then the manifest, written last."""
        cfg, sink, summary = self.cfg, self.sink, self.summary
        compaction = compact_run(sink)
        decision = decision_in_force(cfg, sink.read_manifest())
        tables = {"tasks": sink.read_table("tasks", columns=TASK_COLUMNS),
                  "samples": sink.read_table("samples", columns=SAMPLE_COLUMNS)}
        summary.samples = tables["samples"].num_rows if tables["samples"] is not None else 0
        self._check_whole(tables["tasks"], tables["samples"])
        if cfg.segment.enabled and tables["tasks"] is not None and tables["samples"] is not None:
            verdicts, classes = decide(tables["tasks"], tables["samples"], decision["delta"], sink.run_id)
            sink.write_table("verdicts", verdicts, part="all")
            sink.write_table("classes", classes, part="all")
            summary.spurious = sum(v["verdict"] == "spurious" for v in verdicts)
            summary.verdicts = len(verdicts)
            summary.low_confidence = sum(bool(v.get("low_confidence")) for v in verdicts)
            summary.unreliable = len({c["class_index"] for c in classes if c.get("reliable") is False})
        tables |= {name: sink.read_table(name) for name in TABLES if name not in tables}  # the small derived ones
        g, c = cfg.generator, cfg.classifier
        sink.write_manifest({
            "run_id": sink.run_id, "dxray_command": self.command, "config": redact(cfg.model_dump(mode="json")),
            "versions": package_versions(),
            "models": {"generator": g.model, "lora": g.lora, "tiny_vae": g.tiny_vae,
                       "classifier": c.spec, "classifier_weights": c.weights},
            "feature_source": sorted({r.source for r in self.ranking}), "device": device,
            "started": self.started.isoformat(), "finished": datetime.now(UTC).isoformat(),
            "rows": {name: (t.num_rows if t is not None else 0) for name, t in tables.items()},
            "tasks": {"planned": summary.planned, "skipped": summary.skipped, "ok": summary.ok,
                      "failed": summary.failed},
            "decision": decision,
            "compaction": compaction,
            **(extra or {}),
        })
        return summary

    def _check_whole(self, tasks, samples) -> None:
        """Refuse to decide a run whose committed tasks of this plan lack samples (lost while it ran): verdicts and
        classes decided from them would be short or empty, and the manifest would call the run finished."""
        k = len(self.cfg.sample.seed_list())
        planned = {s.task_id for s in self.specs}
        counts = Counter(samples["task_id"].to_pylist()) if samples is not None else Counter()
        ok = zip(tasks["task_id"].to_pylist(), tasks["status"].to_pylist(), strict=True) if tasks is not None else []
        short = sorted(t for t, status in ok if status == "ok" and t in planned and counts[t] < k)
        if short:
            raise DxrayError(f"run {self.sink.uri('')}: {len(short)} committed task(s) have fewer than sample.k={k} "
                             f"samples (task {short[0]} has {counts[short[0]]}); verdicts, classes and the manifest "
                             f"were not written: re-run the run's command to do those tasks again")
