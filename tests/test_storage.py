import glob
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dxray.contract import write_contract
from dxray.errors import DxrayError
from dxray.storage import package_versions, redact
from dxray.storage.images import encode_png, thumbnail_png, to_uint8
from dxray.storage.schemas import SCHEMA_VERSION, TABLES, export_schemas, to_table
from dxray.storage.sink import RunSink


def _task(task_id, **kw):
    return {"run_id": "r", "task_id": task_id, "kind": "class", "class_index": 3, "status": "ok",
            "loss_curve": [1.5, 0.5], "prompt_embedding": [[0.25, -1.0], [2.0, 0.0]], "train_seeds": [2**31 + 5]} | kw


def test_tables_round_trip_with_any_reader(tmp_path):
    sink = RunSink(str(tmp_path / "out"), "r")
    sink.write_table("tasks", [_task("a")], part="a")
    sink.write_table("tasks", [_task("b", status="error", error="boom")], part="b")
    via_dataset = ds.dataset(f"{sink.root}/tasks", format="parquet").to_table().sort_by("task_id").to_pylist()
    via_folder = pq.read_table(f"{sink.root}/tasks").sort_by("task_id").to_pylist()
    via_glob = pq.read_table(glob.glob(f"{sink.root}/tasks/*.parquet")).sort_by("task_id").to_pylist()
    assert via_dataset == via_folder
    assert via_dataset == via_glob
    assert [r["task_id"] for r in via_dataset] == ["a", "b"]
    assert via_dataset[0]["prompt_embedding"] == [[0.25, -1.0], [2.0, 0.0]]
    assert via_dataset[1]["error"] == "boom" and via_dataset[0]["final_loss"] is None
    meta = pq.read_schema(f"{sink.root}/tasks/part-a.parquet").metadata
    assert meta[b"dxray.schema_version"] == SCHEMA_VERSION.encode() and meta[b"dxray.table"] == b"tasks"


def test_samples_keep_their_thumbnails(tmp_path):
    img = np.zeros((40, 80, 3), np.uint8)
    sink = RunSink(str(tmp_path), "r")
    row = {"run_id": "r", "task_id": "a", "seed": np.int64(2**40), "thumbnail": thumbnail_png(img, 32),
           "width": 80, "height": 40, "class_prob": np.float64(0.25)}
    sink.write_table("samples", [row], part="a")
    (got,) = pq.read_table(glob.glob(f"{sink.root}/samples/*.parquet")).to_pylist()
    assert got["seed"] == 2**40 and got["class_prob"] == 0.25 and got["image_uri"] is None
    with Image.open(io.BytesIO(got["thumbnail"])) as im:
        assert im.format == "PNG" and im.size == (32, 16)
    assert pq.read_schema(f"{sink.root}/samples/part-a.parquet").metadata[b"dxray.table"] == b"samples"


def test_rewriting_a_part_never_duplicates_and_temp_files_are_invisible(tmp_path):
    sink = RunSink(str(tmp_path), "r")
    sink.write_table("tasks", [_task("a")], part="a")
    sink.write_table("tasks", [_task("a", steps=9)], part="a")
    (tmp_path / "r" / "tasks" / ".part-b.parquet.123.tmp").write_bytes(b"half a file from a crash")
    table = sink.read_table("tasks")
    assert table.num_rows == 1 and table.column("steps").to_pylist() == [9]
    assert sink.committed_task_ids() == {"a"}
    assert RunSink(str(tmp_path), "other").committed_task_ids() == set()


def test_unknown_column_is_named():
    with pytest.raises(DxrayError, match="table 'samples' has no column 'colour'"):
        to_table("samples", [{"run_id": "r", "task_id": "t", "colour": 1}])
    with pytest.raises(DxrayError, match="unknown table 'sample'"):
        to_table("sample", [])


def test_to_table_casts_numpy_and_tensors_and_fills_nulls():
    row = {"run_id": "r", "task_id": np.str_("t"), "class_index": np.int64(7), "final_loss": np.float64(0.5),
           "loss_curve": np.array([2.0, 1.0]), "prompt_embedding": np.eye(2, 3, dtype=np.float32),
           "train_seeds": np.array([1, 2**33]), "stopped_early": np.bool_(True), "lr": torch.tensor(0.125)}
    table = to_table("tasks", [row])
    assert table.schema.equals(TABLES["tasks"], check_metadata=True)
    (got,) = table.to_pylist()
    assert got["class_index"] == 7 and got["final_loss"] == 0.5 and got["lr"] == 0.125 and got["stopped_early"]
    assert got["prompt_embedding"] == [[1, 0, 0], [0, 1, 0]] and got["train_seeds"] == [1, 2**33]
    assert {k for k, v in got.items() if v is None} == set(TABLES["tasks"].names) - set(row)
    assert to_table("tasks", []).num_rows == 0


def test_to_table_names_the_bad_column():
    with pytest.raises(DxrayError, match="column 'class_index': .*'three'"):
        to_table("tasks", [{"run_id": "r", "task_id": "t", "class_index": "three"}])
    with pytest.raises(DxrayError, match="column 'task_id' must not be null"):
        to_table("tasks", [{"run_id": "r"}])


def test_images_and_thumbnails(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(encode_png(img))) as im:
        assert np.array_equal(np.asarray(im), img)
    with Image.open(io.BytesIO(thumbnail_png(img, 64))) as im:
        assert im.size == (64, 48)
    sink = RunSink(str(tmp_path), "r")
    uri = sink.write_bytes("images/t/0.png", encode_png(img))
    assert uri == str(tmp_path / "r" / "images" / "t" / "0.png")


def test_to_uint8_accepts_chw_hwc_gray_and_tensors():
    chw = np.linspace(0, 1, 3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    hwc = to_uint8(chw.transpose(1, 2, 0))
    assert hwc.shape == (4, 5, 3) and hwc.dtype == np.uint8 and hwc.max() == 255 and hwc.min() == 0
    assert np.array_equal(to_uint8(chw), hwc) and np.array_equal(to_uint8(torch.from_numpy(chw)), hwc)
    assert np.array_equal(to_uint8(np.full((2, 2), 2.0)), np.full((2, 2, 3), 255, np.uint8))
    with pytest.raises(ValueError, match="channels"):
        to_uint8(np.zeros((4, 4, 5)))


def test_outputs_resolve_to_absolute_paths_or_the_given_filesystem(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert RunSink("~/out", "r").root == f"{tmp_path}/out/r"
    assert RunSink("rel", "r").root == f"{tmp_path}/rel/r"
    sub = RunSink("base", "r", filesystem=pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()))
    sub.write_table("tasks", [_task("a")], part="a")
    assert (tmp_path / "bucket" / "base" / "r" / "tasks" / "part-a.parquet").exists()
    assert sub.committed_task_ids() == {"a"} and sub.read_table("samples") is None
    s3 = RunSink("bucket/prefix/", "r", filesystem=pafs.S3FileSystem(anonymous=True, region="us-east-1"))
    assert s3.uri("images/t/0.png") == "s3://bucket/prefix/r/images/t/0.png"


def test_export_schemas_is_deterministic_and_complete(tmp_path):
    first = export_schemas(tmp_path / "a")
    second = export_schemas(tmp_path / "b")
    assert [p.name for p in first] == [f"{n}.arrow.json" for n in TABLES]
    for p, q in zip(first, second, strict=True):
        text = p.read_text()
        assert text == q.read_text() and text.endswith("}\n")
        doc = json.loads(text)
        assert text == json.dumps(doc, indent=2, sort_keys=True) + "\n"
        assert doc["schema_version"] == SCHEMA_VERSION and doc["table"] == p.name.split(".")[0]
        assert [f["name"] for f in doc["fields"]] == TABLES[doc["table"]].names
        assert all(f["description"] and "\n" not in f["description"] for f in doc["fields"])
    tasks = {f["name"]: f for f in json.loads(first[0].read_text())["fields"]}
    assert tasks["prompt_embedding"]["type"] == "list<item: list<item: float>>" and not tasks["task_id"]["nullable"]


def test_redact_masks_secrets_everywhere():
    cfg = {"output": "s3://key:verysecret@bucket/x", "storage": {"aws_secret_access_key": "abc", "region": "eu"},
           "list": [{"token": "t"}, "plain"], "api_key": None}
    out = redact(cfg)
    text = json.dumps(out)
    assert "verysecret" not in text and "abc" not in text and '"t"' not in text
    assert out["storage"]["region"] == "eu" and out["list"][1] == "plain" and out["api_key"] is None
    assert out["output"] == "s3://***@bucket/x"
    assert redact(["http://host/x", ("postgres://u:p@h/db",)]) == ["http://host/x", ["postgres://***@h/db"]]
    assert cfg["storage"]["aws_secret_access_key"] == "abc"  # a copy: the input is left alone


def test_package_versions_cover_the_stack():
    versions = package_versions()
    assert set(versions) >= {"dxray", "torch", "pyarrow", "numpy", "ray", "pydantic"}
    assert versions["pyarrow"] == pa.__version__ and all(isinstance(v, str) and v for v in versions.values())


def test_manifest_is_written_under_the_run(tmp_path):
    sink = RunSink(str(tmp_path), "r")
    uri = sink.write_manifest({"b": 1, "a": {"x": [1, 2]}, "path": tmp_path})
    assert uri == str(tmp_path / "r" / "manifest.json")
    text = (tmp_path / "r" / "manifest.json").read_text()
    assert json.loads(text) == {"a": {"x": [1, 2]}, "b": 1, "path": str(tmp_path)} and text.index('"a"') < text.index('"b"')
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]


def test_published_schemas_are_in_step_with_the_code(tmp_path):
    """schemas/ is the contract other tools read: regenerate it with `dxray schema` after a change."""
    from conftest import ROOT

    fresh = write_contract(tmp_path)
    for path in fresh:
        name = path.relative_to(tmp_path).as_posix()
        committed = ROOT / "schemas" / name
        assert committed.exists(), f"schemas/{name} missing: run `dxray schema`"
        assert committed.read_text() == path.read_text(), f"schemas/{name} is stale: run `dxray schema`"
    published = {p.relative_to(ROOT / "schemas").as_posix() for p in (ROOT / "schemas").rglob("*.json")}
    assert published == {p.relative_to(tmp_path).as_posix() for p in fresh}, "schemas/ holds files `dxray schema` no longer writes"
    for name, schema in TABLES.items():
        published = json.loads((ROOT / "schemas" / "tables" / f"{name}.arrow.json").read_text())
        assert [f["name"] for f in published["fields"]] == schema.names


def test_redact_keeps_settings_that_merely_mention_tokens():
    out = redact({"prompt": {"n_tokens": 2}, "tokenizer": "clip", "hf_token": "hf_abc", "AWS_SESSION_TOKEN": "tok"})
    assert out["prompt"]["n_tokens"] == 2 and out["tokenizer"] == "clip"
    assert out["hf_token"] == "***" and out["AWS_SESSION_TOKEN"] == "***"
