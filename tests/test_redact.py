"""Credentials never reach messages, logs, error rows or manifests, in any form a URI can carry them."""

import logging

import pytest
from conftest import TINY_YAML
from test_cli import run_cli

SECRET = "Zq7SECRETvalue"

FORMS = {
    "userinfo": f"s3://AKIAXXXX:{SECRET}@bucket/audits",
    "query": f"s3://bucket/audits?access_key=AKIAXXXX&secret_key={SECRET}",
    "presigned": f"https://host/m?X-Amz-Credential=AKIA%2F1&X-Amz-Signature={SECRET}&X-Amz-Security-Token={SECRET}",
    "password": f"https://user:{SECRET}@models.example.com/lcm",
    "token": f"hf:https://host/clf?token={SECRET}",
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_redact_text_masks_every_form(form):
    from dxray.storage import redact, redact_text

    text = f"error: cannot open {FORMS[form]}: not found"
    assert SECRET not in redact_text(text) and "***" in redact_text(text)
    assert SECRET not in str(redact({"models": {"generator": FORMS[form]}, "list": [FORMS[form]]}))


def test_redact_text_keeps_harmless_queries_and_masks_secret_environment_values(monkeypatch):
    from dxray.storage import redact_text

    assert redact_text("s3://b/x?region=eu-west-1&versionId=3") == "s3://b/x?region=eu-west-1&versionId=3"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert redact_text(f"SignatureDoesNotMatch for key {SECRET}.") == "SignatureDoesNotMatch for key ***."


@pytest.mark.parametrize("override", [
    f"output={FORMS['userinfo']}", f"output={FORMS['query']}", f"generator.model={FORMS['password']}",
    f"classifier.spec={FORMS['token']}", f"classifier.spec=hf:{FORMS['password']}",
    f"classifier.weights={FORMS['password']}/w.pt", f"generator.lora={FORMS['presigned']}",
    f"segment.detector={FORMS['password']}",
])
def test_no_command_line_error_echoes_a_credential(override, tmp_path, cache_dir):
    # One output= only: a key given twice is refused before the credential would be looked at (issue 30).
    default = [] if override.startswith("output=") else [f"output={tmp_path / 'out'}"]
    res = run_cli("explain", str(TINY_YAML), *default, override, cache=cache_dir)
    assert "given twice" not in res.stderr
    assert res.returncode == 2, res.stderr
    assert SECRET not in res.stderr + res.stdout and "Traceback" not in res.stderr
    assert res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "out").exists()


def test_manifests_and_error_rows_are_masked(tmp_path):
    from dxray.config import load_config
    from dxray.pipeline.job import AuditJob
    from dxray.pipeline.rows import Finished
    from dxray.storage.sink import RunSink

    sink = RunSink(str(tmp_path), "run-x")
    sink.write_manifest({"models": {"generator": FORMS["password"]}, "config": {"output": FORMS["query"]}})
    assert SECRET not in (tmp_path / "run-x" / "manifest.json").read_text()
    row = {"run_id": "run-x", "task_id": "t1", "kind": "class", "status": "ok", "error": None}
    job = AuditJob(load_config(None, [f"output={tmp_path}", "run_id=run-x"]), "explain", sink=sink)
    written = job.commit(Finished(row, [], None), error=f"OSError: cannot fetch {FORMS['presigned']}")
    assert written["status"] == "error" and SECRET not in written["error"]
    import pyarrow.dataset as ds

    assert SECRET not in str(ds.dataset(tmp_path / "run-x" / "tasks").to_table().to_pylist())


def test_log_lines_are_masked(capsys):
    from dxray.cli import _Redacting

    handler = logging.StreamHandler()
    handler.addFilter(_Redacting())
    log = logging.getLogger("dxray.test-redact")
    log.addHandler(handler)
    try:
        log.warning("retrying %s", FORMS["query"])
    finally:
        log.removeHandler(handler)
    err = capsys.readouterr().err
    assert "retrying s3://bucket/audits?access_key=***&secret_key=***" in err and SECRET not in err
