"""Compaction: once a run finishes, the per-task parts of ``tasks`` and ``samples`` become a few large files.

While a run works, every committed task has its own part per table (``tasks/part-{task_id}.parquet``,
``samples/part-{task_id}.parquet``): a retry overwrites its part, a resume reads every part back. A
full ImageNet audit is ~12,000 such files, read one by one by every resume and every analyst's glob.
:func:`compact_run` (called by ``AuditJob.finish`` before the manifest) rewrites the committed parts
into ``compact-GGGG-NNNN.parquet`` files of about :data:`TARGET_BYTES` each (``GGGG``: the compaction's
generation, one per finish that found new parts; ``NNNN``: the file in it), rows ordered by class, so
each file covers a range of classes.

What is compacted: a ``tasks`` part whose rows all have status ok, and a ``samples`` part whose rows
all belong to such a committed task. A failed task's row stays in its own part, so a resume that tries
the task again overwrites it as before (and the next finish compacts it once it is ok); so do the
samples of a task whose task row never got written. Compacted files are never rewritten: a finish
with nothing new writes nothing.

Order of operations, per table (``tasks`` first). The plan (which parts go into which file) is
written into the journal with the first file's entry, so a re-run after a crash writes the very files
an uninterrupted run would have; then, one output file at a time:

1. append the file's entry ``{file, sources, rows, done: false}`` to the table's journal,
   ``{run}/_compaction/{table}.json`` (rewritten whole and atomically: temporary name, then moved);
2. write the file under a hidden temporary name and move it to its name: from here it is visible;
3. delete its sources (the parts it replaces);
4. mark the entry done.

dxray's reader (``RunSink.read_table``) lists the folder, then reads the journal, and skips every part
whose compacted file it listed. Every state a crash can leave (between any two of the steps, or in the
middle of step 3) therefore reads as every row exactly once: before step 2 the parts count, after it
the file does. A re-run completes the journal first (``prepare`` and ``finish`` both do): an entry not
done is written again from its sources if its file is not there, then its sources are deleted; leftover
temporary files are removed.

Readers that glob the folder themselves (DuckDB/Polars ``*.parquet``, ``pyarrow.dataset`` on the
folder, Ray Data) know nothing of the journal: they see a file's rows twice from the moment it appears
(step 2) until the last of its sources is deleted (step 3) — milliseconds on a local disk, one delete
per part on S3 — and, after a crash inside that span, until the run's command runs again. Hidden
temporaries end in ``.tmp`` (no ``*.parquet`` glob matches them) and the journal is outside the table
folders. See docs/analytics.md.

A test can stop the compactor at a named point: ``DXRAY_COMPACT_PAUSE={table}:{point}`` (points:
``journaled``, ``published``, ``half-deleted``, ``deleted``, ``done``) makes it write the point to the
file named by ``DXRAY_COMPACT_PAUSE_MARK`` and sleep there, the first time it gets there.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.dataset as ds

from dxray.storage.fs import is_transient, retrying
from dxray.storage.schemas import TABLES
from dxray.storage.sink import COMPACTED, JOURNAL, RunSink

TARGET_BYTES = 128 * 2**20  # parts per compacted file: about this many bytes of them
READ_FILES = 200  # parts per dataset scan when reading them back (memory, see _read_parts)
ROW_GROUP_BYTES = 16 * 2**20  # row groups of about this size inside a compacted file (readers' unit of work)
PAUSE_ENV, PAUSE_MARK_ENV = "DXRAY_COMPACT_PAUSE", "DXRAY_COMPACT_PAUSE_MARK"
# Row order of a compacted tasks file; samples keep each part's order, parts ordered by their task's key.
TASK_ORDER = ("class_index", "feature_rank", "feature_index", "template", "kind", "task_id")
_PART = re.compile(r"part-(?P<task_id>.+)\.parquet")
_paused: set[str] = set()


def _pause(name: str, point: str) -> None:
    """Tests only: stop here (see the module docstring) so that a kill -9 hits this exact point."""
    where = f"{name}:{point}"
    if os.environ.get(PAUSE_ENV) == where and where not in _paused:
        _paused.add(where)
        mark = os.environ.get(PAUSE_MARK_ENV)
        if mark:
            with open(mark, "w") as f:
                f.write(where)
        time.sleep(3600)


def _save(sink: RunSink, name: str, journal: dict) -> None:
    data = json.dumps(journal, separators=(",", ":"), sort_keys=True) + "\n"
    sink.write_bytes(f"{JOURNAL}/{name}.json", data.encode())


def _listing(sink: RunSink, rel: str) -> dict[str, int]:
    """{name inside folder ``rel``: size} of every file in it, hidden ones too."""
    prefix = f"{sink.root}/{rel}/"
    return {i.path[len(prefix):]: i.size for i in sink.files(rel)}


def _visible(rel: str) -> bool:
    return not any(p.startswith((".", "_")) for p in rel.split("/"))


def _read_parts(sink: RunSink, name: str, rels: list[str]) -> dict[str, pa.Table]:
    """Each part as a table of the table's schema (an older part gets nulls for newer columns)."""
    folder = f"{sink.root}/{name}"
    schema = TABLES[name]

    def read() -> dict[str, pa.Table]:
        batches: dict[str, list[pa.RecordBatch]] = {}
        # The driver's peak memory (benchmarks/scale.py) was here: a scan holds ~100 kB per fragment until it
        # ends (3,000 parts: +300 MB), and the default pool (mimalloc) kept what a read freed. Hence scans
        # of at most READ_FILES parts, into the system allocator, which gives freed memory back.
        for start in range(0, len(rels), READ_FILES):
            dataset = ds.FileSystemDataset.from_paths([f"{folder}/{r}" for r in rels[start:start + READ_FILES]],
                                                      schema=schema, format=ds.ParquetFileFormat(), filesystem=sink.fs)
            for tagged in dataset.scanner(fragment_readahead=16, memory_pool=pa.system_memory_pool()).scan_batches():
                batches.setdefault(tagged.fragment.path[len(folder) + 1:], []).append(tagged.record_batch)
        return {r: pa.Table.from_batches(batches.get(r, []), schema=schema) for r in rels}

    try:
        return retrying(read, deadline_s=sink.storage.retry_seconds, what=f"compacting {sink.uri(name)}")
    except (pa.ArrowException, OSError) as err:
        if isinstance(err, OSError) and is_transient(err):
            raise
        raise sink.unreadable(name, err) from None


def _assemble(name: str, parts: list[pa.Table]) -> pa.Table:
    """One table of the parts, with the table's exact schema (and its schema version metadata)."""
    table = pa.concat_tables(parts, memory_pool=pa.system_memory_pool())
    if name == "tasks":
        table = table.sort_by([(c, "ascending") for c in TASK_ORDER])
    return table.cast(TABLES[name])


def _write(sink: RunSink, name: str, file: str, table: pa.Table, part_bytes: int) -> None:
    per_row = max(1, part_bytes // max(1, table.num_rows))
    sink.write_parquet(f"{name}/{file}", table, row_group_size=max(1024, ROW_GROUP_BYTES // per_row))


def _delete(sink: RunSink, name: str, rels: list[str]) -> None:
    """Delete parts of table ``name``, several at a time (S3: a request or two each); the first half, then
    the rest. A part already gone (deleted before a crash) is fine."""

    def delete(rel: str) -> None:
        def attempt() -> None:
            try:
                sink.fs.delete_file(f"{sink.root}/{name}/{rel}")
            except FileNotFoundError:
                pass

        retrying(attempt, deadline_s=sink.storage.retry_seconds, what=f"deleting {sink.uri(f'{name}/{rel}')}")

    half = len(rels) // 2
    with ThreadPoolExecutor(max_workers=32 if sink.fs.type_name == "s3" else 4) as pool:
        for chunk, point in ((rels[:half], "half-deleted"), (rels[half:], None)):
            list(pool.map(delete, chunk))
            if point and chunk:
                _pause(name, point)


def _complete(sink: RunSink, name: str) -> dict:
    """Finish what an interrupted compaction of table ``name`` left (see the module docstring); the journal."""
    journal = sink.read_journal(name) or {"version": 1, "table": name, "outputs": []}
    if not journal["outputs"]:
        return journal
    listing = _listing(sink, name)
    changed = False
    for entry in journal["outputs"]:
        if entry.get("done"):
            continue
        present = [s for s in entry["sources"] if s in listing]
        if entry["file"] not in listing and present:  # stopped before its file appeared: write it again
            parts = _read_parts(sink, name, present)
            table = _assemble(name, [parts[s] for s in present])
            _write(sink, name, entry["file"], table, sum(listing[s] for s in present))
            entry["rows"] = table.num_rows
        _delete(sink, name, present)
        entry["done"], changed = True, True
    listing = _listing(sink, name)
    kept = [e for e in journal["outputs"] if e["file"] in listing]  # a file deleted by hand took its rows along
    changed |= len(kept) != len(journal["outputs"])
    journal["outputs"] = kept
    # Parts written again after they were compacted (a second driver of the same run committed them late):
    # read_table already skips them, the compacted file holds their rows; delete them for the globs.
    stale = [s for e in kept if e.get("done") for s in e["sources"] if s in listing]
    if stale:
        _delete(sink, name, stale)
    for rel in listing:  # temporaries of compacted files a crash left
        if rel.startswith(".compact-") and rel.endswith(".tmp"):
            sink.delete(f"{name}/{rel}")
    if changed:
        _save(sink, name, journal)
    return journal


def _eligible(name: str, part: pa.Table, committed: set[str] | None) -> bool:
    if part.num_rows == 0:
        return False
    if name == "tasks":
        return all(s == "ok" for s in part["status"].to_pylist())
    return set(part["task_id"].to_pylist()) <= committed


def _plan(sink: RunSink, name: str, journal: dict, target_bytes: int, committed: set[str] | None,
          order: dict[str, int]) -> list[list[str]]:
    """The parts no compacted file holds yet, ordered by their task's class and cut into groups of about
    ``target_bytes``: one compacted file each (less the parts that turn out not to be committed)."""
    listing = _listing(sink, name)
    outputs = {e["file"] for e in journal["outputs"]}
    replaced = {s for e in journal["outputs"] if e["file"] in listing for s in e["sources"]}
    candidates = []
    for rel in listing:
        if not _visible(rel) or rel in outputs or rel in replaced:
            continue
        m = _PART.fullmatch(rel)
        if committed is not None and m and m["task_id"] not in committed:
            continue  # the samples of a task that is not committed: its retry will overwrite them
        candidates.append(rel)

    def key(rel: str) -> tuple:
        m = _PART.fullmatch(rel)
        return (0, order[m["task_id"]], rel) if m and m["task_id"] in order else (1, 0, rel)

    candidates.sort(key=key)
    bins, current, size = [], [], 0
    for rel in candidates:
        current.append(rel)
        size += listing[rel]
        if size >= target_bytes:
            bins.append(current)
            current, size = [], 0
    return bins + [current] if current else bins


def _run_plan(sink: RunSink, name: str, journal: dict, committed: set[str] | None) -> list[dict]:
    """Write the compacted files of the journal's plan that are not written yet; returns their entries."""
    plan = journal["plan"]
    generation = plan["generation"]
    have = {e["file"] for e in journal["outputs"]}
    written: list[dict] = []
    for index, group in enumerate(plan["bins"]):
        file = f"compact-{generation:04d}-{index:04d}.parquet"
        if file in have:  # written before a crash (and completed since)
            continue
        listing = _listing(sink, name)
        group = [r for r in group if r in listing]
        parts = _read_parts(sink, name, group)
        sources = [r for r in group if _eligible(name, parts[r], committed)]
        if not sources:
            continue
        table = _assemble(name, [parts[r] for r in sources])
        entry = {"file": file, "generation": generation, "sources": sources, "rows": table.num_rows, "done": False}
        journal["outputs"].append(entry)
        _save(sink, name, journal)                                          # 1. journaled
        _pause(name, "journaled")
        _write(sink, name, file, table, sum(listing[r] for r in sources))   # 2. published
        _pause(name, "published")
        _delete(sink, name, sources)                                        # 3. sources deleted
        _pause(name, "deleted")
        entry["done"] = True                                                # 4. done
        _save(sink, name, journal)
        _pause(name, "done")
        written.append(entry)
    return written


def _compact_new(sink: RunSink, name: str, journal: dict, target_bytes: int, committed: set[str] | None = None,
                 order: dict[str, int] | None = None) -> list[dict]:
    """Compact the parts no compacted file holds yet; returns the journal entries written. The plan (which
    parts go into which file) is journaled with the first file's entry, so a re-run after a crash writes the
    same files an uninterrupted compaction would have; then parts committed since get a plan of their own."""
    written: list[dict] = []
    while True:
        if not journal.get("plan"):
            bins = _plan(sink, name, journal, target_bytes, committed, order or {})
            if not bins:
                return written
            generation = 1 + max((e.get("generation", 0) for e in journal["outputs"]), default=0)
            journal["plan"] = {"generation": generation, "bins": bins}  # saved with its first file's entry
            resumed = False
        else:
            resumed = True
        done = _run_plan(sink, name, journal, committed)
        journal.pop("plan")
        if done or resumed:  # a plan that wrote nothing was never saved
            _save(sink, name, journal)
        written += done
        if not resumed:
            return written


def finish_pending(sink: RunSink) -> None:
    """Complete a compaction a crash interrupted (a resume calls this before it reads what is committed)."""
    for name in COMPACTED:
        _complete(sink, name)
    for rel in _listing(sink, JOURNAL):  # a journal's own temporary left by a crash
        if rel.startswith(".") and rel.endswith(".tmp"):
            sink.delete(f"{JOURNAL}/{rel}")


def compact_run(sink: RunSink, target_bytes: int = TARGET_BYTES) -> dict:
    """Compact a run's committed parts of ``tasks`` and ``samples`` (completing an interrupted compaction
    first); returns, per table, what the manifest records: compacted ``files`` and their ``rows``, the
    ``parts`` left on their own, and the ``new_files`` / ``new_rows`` this call wrote."""
    finish_pending(sink)
    summary = {}
    for name in COMPACTED:  # tasks first: which samples are compacted follows from the committed tasks
        journal = sink.read_journal(name) or {"version": 1, "table": name, "outputs": []}
        committed = order = None
        if name == "samples":
            tasks = sink.read_table("tasks", columns=[*TASK_ORDER, "status"])
            if tasks is not None:
                tasks = tasks.sort_by([(c, "ascending") for c in TASK_ORDER])
                ok = [t for t, s in zip(tasks["task_id"].to_pylist(), tasks["status"].to_pylist(), strict=True)
                      if s == "ok"]
                committed, order = set(ok), {t: i for i, t in enumerate(ok)}
            else:
                committed, order = set(), {}
        new = _compact_new(sink, name, journal, target_bytes, committed, order)
        listing = _listing(sink, name)
        files = [e for e in journal["outputs"] if e["file"] in listing]
        held = {e["file"] for e in files} | {s for e in files for s in e["sources"]}
        summary[name] = {"files": len(files), "rows": sum(e["rows"] for e in files),
                         "parts": sum(1 for r in listing if _visible(r) and r not in held),
                         "new_files": len(new), "new_rows": sum(e["rows"] for e in new)}
    return summary
