"""The workers' benchmark (bench/workers.py) in its smoke size: it must run every chain of
a queued batch exactly once on real workers, or its numbers mean nothing. The harness
counts the runs' events itself and exits non-zero on any difference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec

from tests.conftest import PG_ADMIN_DSN

BENCH = Path(__file__).resolve().parents[1] / "bench" / "workers.py"


def test_smoke_run_ends_every_chain_once_on_two_workers(tmp_path: Path) -> None:
    output = tmp_path / "workers.json"
    smoke = ["--rows", "12", "--workers", "2", "--parts", "io", "--repeat", "1"]
    where = ["--admin-url", PG_ADMIN_DSN, "--output", str(output)]
    done = subprocess.run(
        [sys.executable, str(BENCH), *smoke, "--latency-ms", "5", *where],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = msgspec.json.decode(output.read_bytes())
    [sample] = result["batches"]
    assert (sample["part"], sample["workers"], sample["rows"]) == ("io", 2, 12)
    assert len(sample["worker_cpu"]) == 2
    assert 0 < sample["span_seconds"] < sample["seconds"]
    assert result["summary"]["io"]["2"]["samples"] == 1
