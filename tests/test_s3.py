"""The storage layer against a real S3 server (SeaweedFS, started once per session by the ``s3`` fixture)."""

from __future__ import annotations

import io
import json
import pickle
import threading
import time
import uuid

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from s3server import closed_port, count_rows

from dxray.config import StorageConfig, load_config
from dxray.errors import DxrayError
from dxray.features import ImageFolder
from dxray.storage import redact
from dxray.storage.fs import check_output, filesystem, is_transient, retrying
from dxray.storage.sink import RunSink


def _task(task_id, **kw):
    return {"run_id": "r", "task_id": task_id, "kind": "class", "class_index": 3, "status": "ok"} | kw


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/"))


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _one_line(err: pytest.ExceptionInfo, *secrets: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    assert not any(s in msg for s in secrets), msg
    return msg


def test_run_round_trip_read_by_pyarrow_polars_and_duckdb(s3):
    prefix = _prefix()
    sink = RunSink(f"s3://{s3.bucket}/{prefix}", "r")  # endpoint and credentials from the environment only
    sink.write_table("tasks", [_task("a"), _task("b", status="error", error="boom")], part="x")
    sink.write_table("tasks", [_task("c")], part="y")
    sink.write_table("samples", [{"run_id": "r", "task_id": "a", "seed": s} for s in range(3)], part="a")
    png = b"\x89PNG not really"
    assert sink.write_bytes("images/a/0.png", png) == f"s3://{s3.bucket}/{prefix}/r/images/a/0.png"
    cfg = load_config(None, [f"output=s3://{s3.bucket}/{prefix}", f"storage.endpoint_url={s3.endpoint_url}"])
    dump = {"config": cfg.model_dump(mode="json"), "env": {"AWS_SECRET_ACCESS_KEY": s3.secret_key}}
    sink.write_manifest(redact(dump) | {"rows": {"tasks": 3}})

    for table, rows in (("tasks", 3), ("samples", 3)):
        counts = {engine: count_rows(s3, sink.uri(table), engine) for engine in ("pyarrow", "polars", "duckdb")}
        assert counts == {"pyarrow": rows, "polars": rows, "duckdb": rows}
        assert sink.read_table(table).num_rows == rows
    assert sink.committed_task_ids() == {"a", "c"} and sink.read_table("verdicts") is None  # b failed: not committed
    got = s3.client().get_object(Bucket=s3.bucket, Key=f"{prefix}/r/images/a/0.png")["Body"].read()
    assert got == png
    manifest = json.loads(sink.fs.open_input_stream(f"{sink.root}/manifest.json").read())
    assert manifest["rows"] == {"tasks": 3} and manifest["env"]["AWS_SECRET_ACCESS_KEY"] == "***"
    assert manifest["config"]["storage"]["endpoint_url"] == s3.endpoint_url
    assert _keys(s3, prefix) == [f"{prefix}/r/{k}" for k in ("images/a/0.png", "manifest.json", "samples/part-a.parquet",
                                                            "tasks/part-x.parquet", "tasks/part-y.parquet")]

    # No credential in anything the sink wrote, nor in the sink itself (Ray ships it to actors).
    secret = s3.secret_key.encode()
    for key in _keys(s3, prefix):
        assert secret not in s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read(), key
    assert secret not in pickle.dumps(sink)
    clone = pickle.loads(pickle.dumps(sink))
    assert clone.committed_task_ids() == {"a", "c"}


def test_rewriting_a_part_leaves_exactly_one_file(s3):
    prefix = _prefix()
    sink = RunSink(f"s3://{s3.bucket}/{prefix}/", "r")
    for steps in (1, 2, 3):
        sink.write_table("tasks", [_task("a", steps=steps)], part="a")
    assert _keys(s3, prefix) == [f"{prefix}/r/tasks/part-a.parquet"]  # no duplicate, no leftover temp
    assert sink.read_table("tasks").column("steps").to_pylist() == [3]
    # A temp left behind by a crashed writer is invisible to every reader.
    s3.client().put_object(Bucket=s3.bucket, Key=f"{prefix}/r/tasks/.part-b.parquet.1-x.tmp", Body=b"half a file")
    assert sink.read_table("tasks").num_rows == 1
    assert {e: count_rows(s3, sink.uri("tasks"), e) for e in ("pyarrow", "polars", "duckdb")} == \
        {"pyarrow": 1, "polars": 1, "duckdb": 1}


def test_endpoint_comes_from_config_then_aws_endpoint_url_s3_then_aws_endpoint_url(s3, monkeypatch):
    dead = f"http://127.0.0.1:{closed_port()}"
    prefix = _prefix()

    def roundtrip(storage=None) -> set[str]:
        sink = RunSink(f"s3://{s3.bucket}/{prefix}", "r", storage=storage or StorageConfig(retry_seconds=0))
        sink.write_table("tasks", [_task("a")], part="a")
        return sink.committed_task_ids()

    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)  # the config's endpoint wins over the environment
    assert roundtrip(StorageConfig(endpoint_url=s3.endpoint_url, retry_seconds=0)) == {"a"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint_url)  # the S3-specific variable wins over the generic
    assert roundtrip() == {"a"}
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    assert roundtrip() == {"a"}

    # Input folders (feature images) find the same endpoint.
    for key in ("imgs/3/b.png", "imgs/3/a.jpg", "imgs/7/c.png", "imgs/notes.txt"):
        s3.client().put_object(Bucket=s3.bucket, Key=f"{prefix}/{key}", Body=b"x")
    folder = ImageFolder(f"s3://{s3.bucket}/{prefix}/imgs")
    assert folder.exists() and sorted(folder.class_folders()) == [3, 7]
    assert [p.rsplit("/", 1)[1] for p in folder.images(3)] == ["a.jpg", "b.png"]


def test_s3_client_options():
    def options(output="s3://bkt/p", **kw):
        fs, path = filesystem(output, StorageConfig(**kw))
        assert path == output[5:].rstrip("/")
        return fs.__reduce__()[1][0]

    o = options(endpoint_url="http://127.0.0.1:9000", region="eu-west-1", connect_timeout=2)
    assert (o["endpoint_override"], o["scheme"], o["region"]) == ("127.0.0.1:9000", "http", "eu-west-1")
    assert o["force_virtual_addressing"] is False and o["connect_timeout"] == 2 and o["access_key"] is None
    o = options("s3://bkt/p/", endpoint_url="https://minio.example:9443", path_style=False)
    assert (o["endpoint_override"], o["scheme"], o["force_virtual_addressing"]) == ("minio.example:9443", "https", True)
    with pytest.raises(DxrayError, match="credentials in the URI are not supported") as err:
        filesystem("s3://AKID:hunter2@bkt/p", StorageConfig())
    assert "hunter2" not in str(err.value)


def test_writes_survive_an_outage(s3):
    sink = RunSink(f"s3://{s3.bucket}/{_prefix()}", "r", storage=StorageConfig(retry_seconds=60, connect_timeout=1))
    sink.write_table("tasks", [_task("a")], part="a")
    result: dict = {}

    def write() -> None:
        start = time.monotonic()
        try:
            result["uri"] = sink.write_table("tasks", [_task("b")], part="b")
        except Exception as err:  # reported below
            result["error"] = err
        result["seconds"] = time.monotonic() - start

    s3.stop()
    try:
        thread = threading.Thread(target=write)
        thread.start()
        time.sleep(3)
        assert thread.is_alive() and not result  # still retrying while the endpoint is down
    finally:
        s3.start()
    thread.join(60)
    assert "error" not in result, result
    assert result["uri"] == sink.uri("tasks/part-b.parquet") and result["seconds"] >= 3
    assert sink.committed_task_ids() == {"a", "b"}


def test_check_output_accepts_a_writable_bucket_and_leaves_nothing(s3, tmp_path):
    prefix = _prefix()
    check_output(f"s3://{s3.bucket}/{prefix}", StorageConfig())
    assert _keys(s3, prefix) == []
    check_output(str(tmp_path / "not" / "yet"), StorageConfig())  # local: no folder is made
    assert not (tmp_path / "not").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DxrayError, match="is a file, not a folder"):
        check_output(str(tmp_path / "file" / "out"), StorageConfig())


def test_check_output_names_a_missing_bucket(s3):
    with pytest.raises(DxrayError) as err:
        check_output("s3://no-such-bucket-dxray/p", StorageConfig())
    msg = _one_line(err, s3.secret_key)
    assert "s3://no-such-bucket-dxray/p" in msg and "bucket 'no-such-bucket-dxray' does not exist" in msg


def test_check_output_names_wrong_credentials_without_the_secret(s3, monkeypatch):
    wrong = "wrong-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    start = time.monotonic()
    with pytest.raises(DxrayError) as err:
        check_output(f"s3://{s3.bucket}/p", StorageConfig())
    msg = _one_line(err, s3.secret_key, wrong)
    assert "access denied" in msg and "AWS_SECRET_ACCESS_KEY" in msg and time.monotonic() - start < 5
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    with pytest.raises(DxrayError, match="access denied") as err:
        check_output(f"s3://{s3.bucket}/p", StorageConfig())
    _one_line(err, s3.secret_key, wrong)
    # The sink does not retry a refused credential either: it fails at once.
    sink = RunSink(f"s3://{s3.bucket}/p", "r", storage=StorageConfig(retry_seconds=60))
    start = time.monotonic()
    with pytest.raises(OSError, match="INVALID_ACCESS_KEY_ID|ACCESS_DENIED"):
        sink.write_table("tasks", [_task("a")], part="a")
    assert time.monotonic() - start < 5


def test_check_output_fails_fast_on_an_unreachable_endpoint(s3):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(DxrayError) as err:
        check_output(f"s3://{s3.bucket}/p", StorageConfig(endpoint_url=endpoint, retry_seconds=120))
    took = time.monotonic() - start
    msg = _one_line(err, s3.secret_key)
    assert f"cannot reach the S3 endpoint {endpoint}" in msg and f"s3://{s3.bucket}/p" in msg
    assert 2 <= took < 10, took


def test_retrying_backs_off_on_transient_errors_only():
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Could not connect")
        return "done"

    assert retrying(flaky, deadline_s=10, what="writing s3://b/k") == "done" and len(calls) == 3
    denied = OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body.")
    for err in (denied, FileNotFoundError("no such file"), OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2")):
        calls.clear()
        with pytest.raises(type(err)):
            retrying(lambda err=err: calls.append(1) or (_ for _ in ()).throw(err), deadline_s=10, what="x")
        assert calls == [1]
    assert is_transient(OSError("AWS Error UNKNOWN (HTTP status 503) during PutObject operation"))
    assert not is_transient(OSError("AWS Error UNKNOWN (HTTP status 400) during PutObject operation"))
    start = time.monotonic()
    with pytest.raises(DxrayError, match=r"^storage unavailable while writing s3://b/k: still failing after") as err:
        retrying(lambda: (_ for _ in ()).throw(TimeoutError("timed out")), deadline_s=1, what="writing s3://b/k")
    assert "\n" not in str(err.value) and 1 <= time.monotonic() - start < 3


def test_parquet_written_to_s3_carries_the_schema_version(s3):
    sink = RunSink(f"s3://{s3.bucket}/{_prefix()}", "r")
    sink.write_table("tasks", [_task("a")], part="a")
    body = s3.client().get_object(Bucket=s3.bucket, Key=sink.uri("tasks/part-a.parquet").split("/", 3)[3])["Body"]
    assert pq.read_schema(io.BytesIO(body.read())).metadata[b"dxray.table"] == b"tasks"
    assert isinstance(sink.fs, pafs.S3FileSystem)


def test_preflight_checks_the_output_before_any_model_loads(s3, tiny_config):
    from dxray.pipeline.preflight import preflight

    tiny_config.output = "s3://no-such-bucket-dxray/runs"
    with pytest.raises(DxrayError, match="bucket 'no-such-bucket-dxray' does not exist"):
        preflight(tiny_config)
    tiny_config.output = f"s3://{s3.bucket}/runs"
    preflight(tiny_config)


# Issue 30: S3 keys are names, not folder paths: an empty, '.' or '..' part is refused as such in one line (it
# was ArrowInvalid, exit 3, or a credential mismatch from the server), before anything is written.

@pytest.mark.parametrize("path, says", [
    ("/a//b", "has an empty path part ('//'); write s3://{b}/p/a/b"),
    ("//a", "has an empty path part"),
    ("/../other/x", "the path part '..' is not allowed"),
    ("/./x", "the path part '.' is not allowed"),
    ("/a/..", "the path part '..' is not allowed"),
])
def test_empty_dot_and_dotdot_path_parts_are_refused_as_such(s3, path, says):
    prefix = _prefix()
    uri = f"s3://{s3.bucket}/{prefix}{path}"
    with pytest.raises(DxrayError) as err:
        check_output(uri, StorageConfig())
    msg = _one_line(err, s3.secret_key)
    assert says.format(b=s3.bucket).replace("/p/", f"/{prefix}/") in msg and "access denied" not in msg
    assert _keys(s3, prefix) == []
    check_output(f"s3://{s3.bucket}/{prefix}/a/", StorageConfig())  # a trailing '/' is no empty part


@pytest.mark.parametrize("path", ["//a//b", "/../other/x"])
def test_the_command_line_refuses_them_in_one_line(s3, path, tmp_path, cache_dir):
    from conftest import TINY_YAML
    from test_cli import run_cli

    res = run_cli("explain", str(TINY_YAML), f"output=s3://{s3.bucket}{path}", cache=cache_dir)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "ArrowInvalid" not in res.stderr and "credential" not in res.stderr
