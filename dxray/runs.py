"""Runs on storage: open one, and re-decide a finished one's verdicts for another δ. What is committed
in a run is :meth:`RunSink.committed_task_ids` (task rows of status ok with their sample.k samples), its one
definition."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime

from dxray.config import Config, StorageConfig
from dxray.errors import DxrayError, one_line, what_is
from dxray.storage.fs import check_reachable
from dxray.storage.sink import RunSink
from dxray.verdict import SAMPLE_COLUMNS, TASK_COLUMNS, decide

log = logging.getLogger("dxray")


def open_sink(cfg: Config, run_id: str | None = None) -> RunSink:
    """The sink of the run a config writes (its ``run_id``, else the one derived from it)."""
    return RunSink(cfg.output, run_id or cfg.resolved_run_id(), storage=cfg.storage)


def open_run(run: str, storage: StorageConfig | None = None) -> RunSink:
    """The sink of an existing run folder (local path or URI ending in the run id)."""
    if "://" not in run and not os.path.isdir(run):
        raise DxrayError(f"no run found at {run} ({what_is(run)} there, not a run folder)")
    parent, _, run_id = run.rstrip("/").rpartition("/")
    sink = RunSink(parent or ".", run_id, storage=storage)
    if sink.fs.type_name == "s3":
        check_reachable(run, sink.root, sink.storage)  # seconds, not storage.retry_seconds of retries
    if sink.read_table("tasks", columns=["task_id"]) is None:
        raise DxrayError(f"no run found at {run} (expected a tasks/ table inside)")
    return sink


def decision_in_force(cfg: Config, manifest: dict | None) -> dict:
    """The δ a (re-)finished run decides with: a δ set by ``dxray redecide`` stays in force over the
    config's ``verdict.delta`` (which does not change the run id), until the next redecide."""
    previous = (manifest or {}).get("decision")
    if isinstance(previous, dict) and previous.get("source") == "redecide" and \
            isinstance(previous.get("delta"), int | float) and 0 <= previous["delta"] <= 1:
        if previous["delta"] != cfg.verdict.delta:
            log.warning("keeping delta %s set by dxray redecide (the config says verdict.delta %s); "
                        "run dxray redecide again to change it", previous["delta"], cfg.verdict.delta)
        return previous
    return {"delta": cfg.verdict.delta, "source": "config"}


_DECIDED = ("verdicts/part-all.parquet", "classes/part-all.parquet", "manifest.json")


def redecide(run: str, delta: float) -> tuple[list[dict], list[dict]]:
    """Re-decide core/spurious for another δ from the stored r values; rewrites verdicts and classes
    and records the δ in the manifest, all or nothing: when a write fails, the files written so far
    are put back as they were, so the run is never left half re-decided."""
    from dxray.verdict import check_delta

    check_delta(delta)
    sink = open_run(run)
    manifest = sink.read_manifest()
    if manifest is None:
        raise DxrayError(f"run {run} has not finished (no readable manifest.json): re-run its command to finish "
                         f"it, then redecide")
    samples = sink.read_table("samples", columns=SAMPLE_COLUMNS)
    if samples is None:
        raise DxrayError(f"run {run} has no samples table")
    verdicts, classes = decide(sink.read_table("tasks", columns=TASK_COLUMNS), samples, delta, sink.run_id)
    decision = {"delta": delta, "source": "redecide", "at": datetime.now(UTC).isoformat()}
    before = {rel: sink.read_bytes(rel) for rel in _DECIDED}
    written: list[str] = []  # each write is atomic (sink._atomic): the one that failed left its file as it was
    writes = {_DECIDED[0]: lambda: sink.write_table("verdicts", verdicts, part="all"),
              _DECIDED[1]: lambda: sink.write_table("classes", classes, part="all"),
              _DECIDED[2]: lambda: sink.write_manifest(manifest | {"decision": decision})}
    for rel, write in writes.items():
        try:
            write()
        except (OSError, DxrayError) as err:
            _restore(sink, before, written)
            raise DxrayError(f"run {run}: could not write {rel} ({one_line(err, typed=False)}); the run is unchanged "
                             f"(still decided at its earlier delta)") from None
        written.append(rel)
    return verdicts, classes


def _restore(sink: RunSink, before: dict[str, bytes | None], written: list[str]) -> None:
    for rel in reversed(written):
        try:
            if before[rel] is None:
                sink.delete(rel)
            else:
                sink.write_bytes(rel, before[rel])
        except (OSError, DxrayError) as err:
            raise DxrayError(f"run {sink.uri('')}: redecide failed and {rel} could not be put back "
                             f"({one_line(err, typed=False)}); run dxray redecide again to make the run consistent") from None


# The columns a reader of the decided tables cannot do without (newer ones, such as the confidence interval,
# may be absent from a run decided before them).
DECIDED_COLUMNS = {"classes": ("class_index", "template", "class_object_fraction", "n_spurious", "n_features", "delta"),
                   "verdicts": ("class_index", "feature_index", "template", "mean_object_fraction", "delta", "verdict")}


def check_decided(sink: RunSink, run: str, name: str, label: str = "run") -> None:
    """A ``classes`` or ``verdicts`` table of another schema (another tool's, a hand-made one) is one line naming
    the table, the part and the missing column, not null-filled rows that compare as nothing; a column of
    another type is the sink's error on reading."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    folder = f"{sink.root}/{name}"
    try:
        if sink.fs.get_file_info(folder).type != pafs.FileType.Directory:
            return
        parts = list(ds.dataset(folder, filesystem=sink.fs, format="parquet").get_fragments())
        schemas = [(p.path[len(folder) + 1:], p.physical_schema.names) for p in parts]
    except (pa.ArrowException, OSError):
        return  # unreadable: reading the table says which part and why
    for part, names in schemas:
        missing = [c for c in DECIDED_COLUMNS[name] if c not in names]
        if missing:
            # redecide rewrites part-all; another part must go first or it would still be read
            fix = "" if part == "part-all.parquet" else f"move {name}/{part} away, then "
            raise DxrayError(f"{label} {run}: table {name} is not of dxray's schema: {name}/{part} lacks column "
                             f"{missing[0]!r}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                             f"{fix}dxray redecide {run} --delta D writes it again from the run's samples")
