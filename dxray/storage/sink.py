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
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dxray.storage.schemas import TABLES, to_table


def resolve_output(output: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/prefix."""
    if "://" in output:
        return pafs.FileSystem.from_uri(output)
    return pafs.LocalFileSystem(), str(Path(output).expanduser().resolve())


class RunSink:
    def __init__(self, output: str, run_id: str, filesystem: pafs.FileSystem | None = None):
        if filesystem is None:
            filesystem, base = resolve_output(output)
        else:
            base = output.rstrip("/")
        self.fs = filesystem
        self.run_id = run_id
        self.root = f"{base}/{run_id}"
        self._made: set[str] = set()

    def uri(self, rel: str) -> str:
        path = f"{self.root}/{rel}".rstrip("/")
        return f"{self.fs.type_name}://{path}" if self.fs.type_name != "local" else path

    def _dir(self, path: str) -> None:
        parent = path.rsplit("/", 1)[0]
        if parent not in self._made:
            self.fs.create_dir(parent, recursive=True)
            self._made.add(parent)

    def _atomic(self, rel: str, write) -> str:
        path = f"{self.root}/{rel}"
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.{os.getpid()}.tmp"
        self._dir(path)
        write(tmp)
        self.fs.move(tmp, path)
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
        if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
            return None
        return ds.dataset(folder, filesystem=self.fs, format="parquet", schema=TABLES[name]).to_table()

    def committed_task_ids(self) -> set[str]:
        table = self.read_table("tasks")
        return set() if table is None else set(table.column("task_id").to_pylist())

    def write_manifest(self, manifest: dict) -> str:
        data = (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode()
        return self.write_bytes("manifest.json", data)
