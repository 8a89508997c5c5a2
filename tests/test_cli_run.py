"""The shape of ``baton run`` as a new user meets it: any path (directories named ``flows``
and ``show`` too), options in ``--help``, and ``--serve`` waiting without spinning a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.cli import baton
from tests.conftest import SHOP, free_port

FLOW = """
name: {name}
base_url: "{{{{ env.SHOP_URL }}}}"
tests:
  health:
    request: {{url: /health}}
    expect: {{status: 200}}
"""


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, pg_server_dsn: str, shop_url: str, tmp_path: Path) -> Path:
    """A user's shell in an empty directory: the shop's URL and the PostgreSQL server."""
    monkeypatch.setenv("SHOP_URL", shop_url)
    monkeypatch.setenv("BATON_DATABASE_URL", pg_server_dsn)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("directory", ["flows", "show", "run"])
def test_run_takes_any_directory_name(env: Path, directory: str) -> None:
    (env / directory).mkdir()
    (env / directory / "health.yaml").write_text(FLOW.format(name=f"in {directory}"))
    code, out, err = baton("run", directory)
    assert code == 0, out + err
    assert f"in {directory}" in out.splitlines()
    assert out.splitlines()[-1].startswith("1 passed in ")
    # with options around it, and a second path of the same name
    code, out, err = baton("run", "-q", directory, f"./{directory}", "--concurrency", "2")
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("2 runs: 2 passed; tests: 2 passed in ")


def test_run_help_lists_its_options() -> None:
    code, out, _ = baton("run", "--help")
    assert code == 0
    assert out.startswith("Usage: baton run [OPTIONS] PATHS...")
    for option in ("--env", "--var", "--secrets", "--data", "--tag", "--concurrency"):
        assert option in out
    for option in ("--junit", "--json", "--html", "--quiet", "--serve"):
        assert option in out
    assert "Commands:" not in out


def test_show_is_a_command_of_its_own() -> None:
    code, out, _ = baton("--help")
    assert code == 0
    commands = out[out.index("Commands:") :]
    assert " show " in commands and " run " in commands
    code, _, err = baton("show")
    assert code == 2 and "RUN_ID" in err


def test_serve_waits_for_the_api_without_spinning(env: Path) -> None:
    """While --serve waits for an API that takes 4 s to listen, baton uses next to no CPU."""
    port = free_port()
    (env / "flow.yaml").write_text(FLOW.format(name="served"))
    server = f"{sys.executable} {SHOP / 'server.py'} --port {port}"
    command = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "run",
        "flow.yaml",
        "--serve",
        f"sh -c 'sleep 4; exec {server}'",
    ]
    environ = {**os.environ, "SHOP_URL": f"http://127.0.0.1:{port}"}
    root = Path(__file__).resolve().parent.parent
    environ["PYTHONPATH"] = str(root)
    process = subprocess.Popen(
        command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        watched = psutil.Process(process.pid)
        # started: flows checked, the server command launched (its shell is baton's child);
        # waited for, not slept for: on a busy machine start-up alone can outlast a fixed pause
        deadline = time.monotonic() + 30
        while not watched.children():
            assert process.poll() is None and time.monotonic() < deadline, "no server launched"
            time.sleep(0.05)
        before = watched.cpu_times()
        time.sleep(2)
        after = watched.cpu_times()
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    used = (after.user + after.system) - (before.user + before.system)
    assert used < 0.2, f"{used:.2f} s of CPU in 2 s of waiting"
    assert process.returncode == 0, out + err
    assert out.splitlines()[-1].startswith("1 passed in ")
