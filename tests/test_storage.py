import io
import json

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dxray.contract import write_contract
from dxray.errors import DxrayError
from dxray.storage import redact
from dxray.storage.images import encode_png, thumbnail_png
from dxray.storage.schemas import SCHEMA_VERSION, TABLES, to_table
from dxray.storage.sink import RunSink


def _task(task_id, **kw):
    return {"run_id": "r", "task_id": task_id, "kind": "class", "class_index": 3, "status": "ok",
            "loss_curve": [1.5, 0.5], "prompt_embedding": [[0.25, -1.0], [2.0, 0.0]], "train_seeds": [2**31 + 5]} | kw


def test_tables_round_trip_with_any_reader(tmp_path):
    sink = RunSink(str(tmp_path / "out"), "r")
    sink.write_table("tasks", [_task("a")], part="a")
    sink.write_table("tasks", [_task("b", status="error", error="boom")], part="b")
    via_dataset = ds.dataset(f"{sink.root}/tasks", format="parquet").to_table().sort_by("task_id").to_pylist()
    via_glob = pq.read_table(f"{sink.root}/tasks").sort_by("task_id").to_pylist()
    assert via_dataset == via_glob
    assert [r["task_id"] for r in via_dataset] == ["a", "b"]
    assert via_dataset[0]["prompt_embedding"] == [[0.25, -1.0], [2.0, 0.0]]
    assert via_dataset[1]["error"] == "boom" and via_dataset[0]["final_loss"] is None
    meta = pq.read_schema(f"{sink.root}/tasks/part-a.parquet").metadata
    assert meta[b"dxray.schema_version"] == SCHEMA_VERSION.encode() and meta[b"dxray.table"] == b"tasks"


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


def test_images_and_thumbnails(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(encode_png(img))) as im:
        assert np.array_equal(np.asarray(im), img)
    with Image.open(io.BytesIO(thumbnail_png(img, 64))) as im:
        assert im.size == (64, 48)
    sink = RunSink(str(tmp_path), "r")
    uri = sink.write_bytes("images/t/0.png", encode_png(img))
    assert uri == str(tmp_path / "r" / "images" / "t" / "0.png")


def test_redact_masks_secrets_everywhere():
    cfg = {"output": "s3://key:verysecret@bucket/x", "storage": {"aws_secret_access_key": "abc", "region": "eu"},
           "list": [{"token": "t"}, "plain"], "api_key": None}
    out = redact(cfg)
    text = json.dumps(out)
    assert "verysecret" not in text and "abc" not in text and '"t"' not in text
    assert out["storage"]["region"] == "eu" and out["list"][1] == "plain" and out["api_key"] is None
    assert out["output"] == "s3://***@bucket/x"


def test_manifest_is_written_under_the_run(tmp_path):
    sink = RunSink(str(tmp_path), "r")
    sink.write_manifest({"b": 1, "a": {"x": [1, 2]}})
    assert json.loads((tmp_path / "r" / "manifest.json").read_text()) == {"a": {"x": [1, 2]}, "b": 1}


def test_published_schemas_are_in_step_with_the_code(tmp_path):
    """schemas/ is the contract other tools read: regenerate it with `dxray schema` after a change."""
    from conftest import ROOT

    fresh = write_contract(tmp_path)
    for path in fresh:
        committed = ROOT / "schemas" / path.name
        assert committed.exists(), f"schemas/{path.name} missing: run `dxray schema`"
        assert committed.read_text() == path.read_text(), f"schemas/{path.name} is stale: run `dxray schema`"
    for name, schema in TABLES.items():
        published = json.loads((ROOT / "schemas" / f"{name}.arrow.json").read_text())
        assert [f["name"] for f in published["fields"]] == schema.names
