"""The run sink: Parquet tables, image objects and the manifest under ``{output}/{run_id}/``.

File names are deterministic (a retry overwrites, never duplicates) and each
file is written under a hidden temporary name first and then moved into place,
so readers (pyarrow.dataset, DuckDB, Polars, Ray Data: all skip dot-files) never
see half a file. The same code writes to a local folder or an S3 URI through
``pyarrow.fs``.
"""

from __future__ import annotations

import json
import os
import uuid

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dxray.config import StorageConfig
from dxray.storage import redact
from dxray.storage.fs import filesystem as resolve_filesystem
from dxray.storage.fs import retrying
from dxray.storage.schemas import TABLES, to_table


def resolve_output(output: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/prefix."""
    return resolve_filesystem(output, storage)


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

    def read_table(self, name: str) -> pa.Table | None:
        folder = f"{self.root}/{name}"

        def read() -> pa.Table | None:
            if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
                return None
            return ds.dataset(folder, filesystem=self.fs, format="parquet", schema=TABLES[name]).to_table()

        return self._retry(read, "reading", name)

    def committed_task_ids(self) -> set[str]:
        table = self.read_table("tasks")
        return set() if table is None else set(table.column("task_id").to_pylist())

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
