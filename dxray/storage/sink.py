"""The run sink: Parquet tables, image objects and the manifest under ``{output}/{run_id}/``.

File names are deterministic (a retry overwrites, never duplicates) and each
file is written under a hidden temporary name first and then moved into place,
so readers (pyarrow.dataset, DuckDB, Polars, Ray Data: all skip dot-files) never
see half a file. The same code writes to a local folder or an S3 URI through
``pyarrow.fs``.

Once a run finishes, :mod:`dxray.storage.compact` rewrites the per-task parts of ``tasks`` and
``samples`` into a few large files and records which parts each one replaces in a journal,
``{run}/_compaction/{table}.json`` (outside every table folder, so no glob sees it). ``read_table``
reads a table through that journal: a part whose compacted file is already visible is skipped, so
dxray's readers see every row exactly once whatever moment a compaction stopped at.
"""

from __future__ import annotations

import json
import os
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dxray.config import StorageConfig
from dxray.errors import DxrayError
from dxray.storage import redact
from dxray.storage.fs import filesystem as resolve_filesystem
from dxray.storage.fs import is_transient, retrying
from dxray.storage.schemas import TABLES, to_table

COMPACTED = ("tasks", "samples")  # the tables dxray.storage.compact rewrites into a few large files
JOURNAL = "_compaction"  # {run}/_compaction/{table}.json, the compaction journal of each of them


def resolve_output(output: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/prefix."""
    return resolve_filesystem(output, storage)


def _short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _castable(found: pa.DataType, wanted: pa.DataType) -> bool:
    if found == wanted or pa.types.is_null(found):
        return True
    try:
        pa.array([], type=found).cast(wanted)
        return True
    except (pa.ArrowException, TypeError, ValueError):
        return False


def replaced_parts(journal: dict | None, listed: set[str]) -> tuple[set[str], bool]:
    """Which of the files ``listed`` in a table folder (names inside it) a reader skips, and whether the
    listing is settled. A part is skipped once the compacted file that holds its rows is listed (the
    compactor appends a file's entry to the journal before the file appears, and deletes its parts only
    after). Not settled: an entry whose file is not listed while some of its parts are gone, which no
    moment of a compaction leaves (the folder changed while it was being listed: list it again), or
    a compacted file deleted by hand (the next compaction drops its entry)."""
    replaced: set[str] = set()
    settled = True
    for entry in (journal or {}).get("outputs", []):
        if entry["file"] in listed:
            replaced.update(entry["sources"])
        elif not all(s in listed for s in entry["sources"]):
            settled = False
    return replaced, settled


class RunSink:
    """Writes one run. Cheap to build in any process (a Ray actor builds its own from
    ``(output, run_id, storage)``); it holds no credentials, the S3 client finds them itself.
    Every storage call is retried on transient errors for ``storage.retry_seconds``."""

    def __init__(self, output: str, run_id: str, filesystem: pafs.FileSystem | None = None,
                 storage: StorageConfig | None = None):
        self.storage = storage or StorageConfig()
        if filesystem is None:
            filesystem, base = resolve_output(output, self.storage)
        else:
            base = output.rstrip("/")
        self.fs = filesystem
        self.run_id = run_id
        self.root = f"{base}/{run_id}"
        self._made: set[str] = set()

    def uri(self, rel: str) -> str:
        path = f"{self.root}/{rel}".rstrip("/")
        return f"{self.fs.type_name}://{path}" if self.fs.type_name != "local" else path

    def _retry(self, call, what: str, rel: str):
        return retrying(call, deadline_s=self.storage.retry_seconds, what=f"{what} {self.uri(rel)}")

    def _dir(self, path: str) -> None:
        parent = path.rsplit("/", 1)[0]
        # Object stores have no folders to make (a key implies its prefix): save the round trips.
        if parent not in self._made and self.fs.type_name != "s3":
            self.fs.create_dir(parent, recursive=True)
        self._made.add(parent)

    def _atomic(self, rel: str, write) -> str:
        """Write under a hidden temporary name, then move into place; retried as one unit, so a
        retry rewrites the temporary file and moves it again (S3's move is copy + delete: the
        final name only ever holds a whole file, and a second move overwrites, never duplicates)."""
        path = f"{self.root}/{rel}"
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"

        def attempt() -> None:
            self._dir(path)
            try:
                write(tmp)
                self.fs.move(tmp, path)
            except BaseException:
                try:  # best effort: a leftover hidden temp is skipped by every reader anyway
                    self.fs.delete_file(tmp)
                except Exception:
                    pass
                raise

        self._retry(attempt, "writing", rel)
        return self.uri(rel)

    def write_bytes(self, rel: str, data: bytes) -> str:
        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)

        return self._atomic(rel, write)

    def write_table(self, name: str, rows: list[dict], part: str) -> str:
        table = to_table(name, rows)
        return self._atomic(f"{name}/part-{part}.parquet", lambda tmp: pq.write_table(table, tmp, filesystem=self.fs))

    def write_parquet(self, rel: str, table: pa.Table, **options) -> str:
        """A built table as one Parquet file at ``rel`` (``options`` go to ``pq.write_table``), atomically."""
        return self._atomic(rel, lambda tmp: pq.write_table(table, tmp, filesystem=self.fs, **options))

    def files(self, rel: str) -> list[pafs.FileInfo]:
        """Every file under ``rel`` (hidden ones too), [] when there is no such folder."""
        folder = f"{self.root}/{rel}"

        def listing() -> list[pafs.FileInfo]:
            if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
                return []
            return [i for i in self.fs.get_file_info(pafs.FileSelector(folder, recursive=True))
                    if i.type == pafs.FileType.File]

        return self._retry(listing, "listing", rel)

    def read_journal(self, name: str) -> dict | None:
        """The compaction journal of table ``name`` (:mod:`dxray.storage.compact`), None when it has none."""
        rel = f"{JOURNAL}/{name}.json"
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            journal = json.loads(data.decode())
            if not isinstance(journal, dict) or not isinstance(journal.get("outputs"), list) or not all(
                    isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("sources"), list)
                    and all(isinstance(x, str) for x in e["sources"]) for e in journal["outputs"]):
                raise ValueError("not a journal of compacted files and the parts they replace")
        except (UnicodeDecodeError, ValueError) as err:
            raise DxrayError(f"run {self.uri('')}: {rel} is not a readable compaction journal ({_short(err)}); "
                             f"it says which part files of {name} the compact-*.parquet files replace, so put it "
                             f"back from a copy before reading the run") from None
        return journal

    def _dataset(self, name: str, folder: str) -> tuple[ds.Dataset, bool]:
        """The table's files as one dataset, less the parts a compacted file replaces; and whether the
        listing was settled (:func:`replaced_parts`). The folder is listed before the journal is read."""
        dataset = ds.dataset(folder, filesystem=self.fs, format="parquet", schema=TABLES[name])
        if name not in COMPACTED:
            return dataset, True
        journal = self.read_journal(name)
        if not journal:
            return dataset, True
        fragments = list(dataset.get_fragments())
        rel = {f.path: f.path[len(folder) + 1:] for f in fragments}
        replaced, settled = replaced_parts(journal, set(rel.values()))
        if replaced:
            kept = [f for f in fragments if rel[f.path] not in replaced]
            dataset = ds.FileSystemDataset(kept, TABLES[name], ds.ParquetFileFormat(), self.fs)
        return dataset, settled

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        """The whole table (or ``columns`` of it), None when the run has none. A part that is not a
        readable Parquet file of the table's schema (corrupt, truncated, empty, other columns, text that
        is not UTF-8) is a one-line DxrayError that names it, not a pyarrow traceback. Parts a compacted file replaces
        are skipped (the journal, see above); a listing that a compaction running at the same time
        changed, or a file it deleted before it was read, means listing again."""
        folder = f"{self.root}/{name}"

        def read() -> pa.Table | None:
            for attempt in range(3):
                if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
                    return None
                dataset, settled = self._dataset(name, folder)
                if not settled and attempt < 2:
                    continue
                try:
                    table = dataset.to_table(columns=columns)
                    table.validate(full=True)  # text that is not UTF-8 (a flipped byte): this part's error, not a bug's
                    return table
                except FileNotFoundError:
                    if attempt == 2:
                        raise

        try:
            return self._retry(read, "reading", name)
        except (pa.ArrowException, OSError) as err:
            if isinstance(err, OSError) and is_transient(err):
                raise
            raise self.unreadable(name, err) from None

    def unreadable(self, name: str, err: BaseException) -> DxrayError:
        """The one-line error for table ``name`` that failed to read with ``err``: which file is at fault."""
        return DxrayError(f"run {self.uri('')}: {self._bad_part(name, f'{self.root}/{name}')} ({_short(err)}); "
                          f"delete it and re-run the run's command to write it again")

    def _bad_part(self, name: str, folder: str) -> str:
        """Which file of a table that failed to read is at fault (looked for only after a failure)."""
        schema = TABLES[name]
        for info in self.fs.get_file_info(pafs.FileSelector(folder, recursive=True)):
            base = info.base_name
            if info.type != pafs.FileType.File or base.startswith((".", "_")):
                continue
            rel = info.path[len(self.root) + 1:]
            try:
                with self.fs.open_input_file(info.path) as f:
                    found = pq.read_schema(f)
                for field in found:
                    if field.name in schema.names and not _castable(field.type, schema.field(field.name).type):
                        return f"{rel} has column {field.name!r} of type {field.type}, not {schema.field(field.name).type}"
                with self.fs.open_input_file(info.path) as f:
                    table = pq.read_table(f)
            except (pa.ArrowException, OSError):
                return f"{rel} is not a readable Parquet file"
            try:
                table.validate(full=True)
            except pa.ArrowException:
                return f"{rel} holds text that is not UTF-8"
        return f"table {name} cannot be read"

    def committed_task_ids(self, samples_per_task: int | None = None) -> set[str]:
        """The run's committed tasks: those with a task row of status ok and, given ``samples_per_task`` (the
        run's sample.k: a task id fixes its held-out seeds), at least that many sample rows. This is the one
        meaning of "committed": a resumed run skips exactly these (``AuditJob.prepare`` passes sample.k), and
        does again a failed task (status error) and one whose samples are gone (a damaged part deleted).
        Without ``samples_per_task``: the task rows alone."""
        table = self.read_table("tasks", columns=["task_id", "status"])
        if table is None:
            return set()
        ok = {t for t, status in zip(table["task_id"].to_pylist(), table["status"].to_pylist(), strict=True)
              if status == "ok"}
        if samples_per_task is None:
            return ok
        counts = self.sample_counts()
        return {t for t in ok if counts.get(t, 0) >= samples_per_task}

    def sample_counts(self) -> dict[str, int]:
        """Sample rows per task id ({} when the run has no samples table)."""
        table = self.read_table("samples", columns=["task_id"])
        if table is None or table.num_rows == 0:
            return {}
        counts = pc.value_counts(table["task_id"])
        return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))

    def write_manifest(self, manifest: dict) -> str:
        """The manifest, with every secret-looking value masked (model references may be URLs)."""
        data = (json.dumps(redact(manifest), indent=2, sort_keys=True, default=str) + "\n").encode()
        return self.write_bytes("manifest.json", data)

    def read_bytes(self, rel: str) -> bytes | None:
        """A whole file of the run, None when it does not exist."""
        path = f"{self.root}/{rel}"

        def read() -> bytes | None:
            if self.fs.get_file_info(path).type != pafs.FileType.File:
                return None
            with self.fs.open_input_stream(path) as f:
                return f.read()

        return self._retry(read, "reading", rel)

    def read_manifest(self) -> dict | None:
        """The run's manifest (None: the run has not finished, or the file is not a JSON object)."""
        data = self.read_bytes("manifest.json")
        try:
            manifest = json.loads(data.decode()) if data is not None else None
        except (UnicodeDecodeError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def delete(self, rel: str) -> None:
        path = f"{self.root}/{rel}"

        def delete() -> None:
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                self.fs.delete_file(path)

        self._retry(delete, "deleting", rel)
