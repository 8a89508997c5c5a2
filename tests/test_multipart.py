"""multipart/form-data bodies: text fields and files from disk, sent to the demo shop's
/upload, checked by ``baton validate``, and recorded without the files' bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.cli import baton
from tests.flows import events_of, run_flow, write_flow

CONTENT = b"MARKER-7f3a file body that must never reach the event log\n" * 40


async def test_uploads_files_and_text_fields_and_logs_only_a_summary(
    env: dict[str, str], tmp_path: Path, pg_server_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "report.csv").write_bytes(CONTENT)
    monkeypatch.setenv("UPLOAD_NOTE", "hush-4f1b9c2e-note")
    flow = write_flow(
        tmp_path,
        """
        upload:
          request:
            method: POST
            url: /upload
            multipart:
              title: "Q{{ quarter }} report"
              note: "{{ secrets.UPLOAD_NOTE }}"
              data: {file: "files/{{ name }}", content_type: text/csv}
              copy: {file: files/report.csv, filename: renamed.bin}
          expect:
            status: 201
            json:
              "$.fields.title": Q3 report
              "$.files[0].filename": report.csv
              "$.files[0].content_type": text/csv
              "$.files[1].filename": renamed.bin
              "$.files[1].content_type": application/octet-stream
        """,
        head="variables: {quarter: 3, name: report.csv}\n",
    )
    code, out, err, tests = await run_flow(flow)
    assert code == 0, out + err
    digest = hashlib.sha256(CONTENT).hexdigest()
    (sent,) = await events_of(pg_server_dsn, tests["_run_id"], "RequestSent")
    (received,) = await events_of(pg_server_dsn, tests["_run_id"], "ResponseReceived")
    # the server saw the file whole: same size and hash as on disk
    assert f'"size":{len(CONTENT)},"sha256":"{digest}"' in received["body_excerpt"]
    summary = sent["body_excerpt"]
    assert summary.startswith("multipart/form-data: ")
    assert f"data=@report.csv (text/csv, {len(CONTENT)} bytes, sha256 {digest})" in summary
    assert "copy=@renamed.bin (application/octet-stream" in summary
    assert "title=Q3 report" in summary
    assert "MARKER-7f3a" not in summary
    assert "hush-4f1b9c2e-note" not in summary and "note=" in summary


async def test_a_file_that_disappears_before_the_run_fails_the_test_naming_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    flow = write_flow(
        tmp_path,
        """
        upload:
          request:
            method: POST
            url: /upload
            multipart: {doc: {file: "{{ name }}"}}
        """,
        head="variables: {name: gone.txt}\n",
    )
    code, _out, _err, tests = await run_flow(flow)
    assert code == 1
    assert tests["upload"]["status"] == "failed"
    assert "multipart.doc: cannot read" in tests["upload"]["message"]
    assert "gone.txt" in tests["upload"]["message"]


def test_validate_names_a_missing_file_and_its_place(tmp_path: Path) -> None:
    flow = write_flow(
        tmp_path,
        """
        upload:
          request:
            method: POST
            url: /upload
            multipart: {avatar: {file: img/missing.png}}
        """,
    )
    code, _out, err = baton("validate", str(flow))
    assert code == 2
    where = "tests.upload.request.multipart.avatar.file"
    assert f"{flow}: {where}: no such file: img/missing.png" in err
    assert "Traceback" not in err


def test_validate_refuses_two_bodies_in_one_request(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    flow = write_flow(
        tmp_path,
        """
        upload:
          request:
            method: POST
            url: /upload
            json: {a: 1}
            multipart: {a: {file: a.txt}}
        """,
    )
    code, _out, err = baton("validate", str(flow))
    assert code == 2
    assert "tests.upload.request: a request has one body, this one gives json and multipart" in err


def test_the_service_refuses_flows_that_read_files_of_its_host() -> None:
    from context_service.errors import Unprocessable
    from context_service.flows import load_text

    flow = """
name: exfiltrate
base_url: https://api.example.com
defaults:
  tls: {ca_bundle: "{{ env.CA }}"}
tests:
  upload:
    request:
      method: POST
      url: /upload
      multipart: {doc: {file: "{{ '/etc/passwd' }}"}, note: plain text is fine}
"""
    with pytest.raises(Unprocessable) as refused:
        load_text(flow, "exfiltrate.yaml")
    message = str(refused.value)
    assert "tests.upload.request.multipart.doc: a file cannot be read by the service" in message
    assert "defaults.tls: certificate files cannot be read by the service" in message
