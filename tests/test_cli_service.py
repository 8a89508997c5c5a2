"""``baton keys create`` and ``baton serve`` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.cli import baton
from tests.conftest import free_port


def test_serve_answers_with_a_key_from_keys_create(
    pg_server_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATON_DATABASE_URL", pg_server_dsn)
    monkeypatch.setenv("BATON_HOME", str(tmp_path))
    monkeypatch.delenv("BATON_REDIS_URL", raising=False)
    code, out, err = baton("keys", "create", "--org", "cli-test", "--scope", "read")
    assert code == 0, err
    key = out.strip()
    assert key.startswith("bk_") and len(key) > 40
    code, _, err = baton("keys", "create", "--org", "Not A Slug!")
    assert code == 2 and "error:" in err

    port = free_port()
    env = {**os.environ, "BATON_DATABASE_URL": pg_server_dsn, "BATON_HOME": str(tmp_path)}
    server = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "baton serve did not answer in 30 s"
                time.sleep(0.2)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        health = httpx.get(f"{base}/health", headers={"X-API-Key": key}, timeout=5)
        assert {d["name"] for d in health.json()["dependencies"]} >= {"postgresql", "projector"}
        assert httpx.get(f"{base}/api/v1/projects").status_code == 401
        listed = httpx.get(f"{base}/api/v1/projects", headers={"X-API-Key": key})
        assert listed.status_code == 200 and listed.json()["items"] == []
        assert httpx.get(f"{base}/schema/openapi.json").json()["info"]["title"] == "Baton"
    finally:
        server.terminate()
        server.wait(timeout=10)
