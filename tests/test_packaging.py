"""A non-editable install works: the wheel carries everything Baton reads at run time.

The wheel is built from this checkout and installed into a fresh virtualenv outside it;
the bundled example then runs from another directory, on the embedded default. The
dependencies come from the test's own environment (a path file), so the test checks what
the wheel carries, not the package index; `.ci/run` installs the dependencies for real.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOP = ROOT / "examples" / "shop"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("baton-*.whl")
    return built


def test_the_wheel_carries_the_schema_and_the_templates(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "events/schema.sql" in names
    assert zipfile.ZipFile(wheel).read("events/schema.sql") == (ROOT / "schema.sql").read_bytes()
    assert "orchestrator/reporters/report.html.j2" in names
    assert any(name.startswith("context_service/templates/") for name in names)


def test_an_installed_wheel_runs_the_example_from_another_directory(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = ["install", "--quiet", "--no-deps", str(wheel)]
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), *install],
        check=True,
        capture_output=True,
        timeout=120,
    )
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    imported = subprocess.run(
        [str(python), "-c", "import events; print(events.__file__)"],
        cwd=elsewhere,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert imported.startswith(str(site)), imported  # the wheel's copy, not the checkout's

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve = f"{python} {SHOP / 'server.py'} --port {port}"
    result = subprocess.run(
        [str(venv / "bin" / "baton"), "run", str(SHOP / "checkout.yaml"), "--serve", serve],
        cwd=elsewhere,
        env={"PATH": "/usr/bin:/bin", "SHOP_URL": f"http://127.0.0.1:{port}"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout
    assert (elsewhere / ".baton" / "pgdata").is_dir()  # the embedded default, started here
