"""CI matrices: ``baton run --shard K/N --batch ID`` in real processes at once against the
demo shop and the PostgreSQL server, then ``baton report --batch ID`` merging them from the
log. Counts come from the events table itself."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from events import types as ev
from orchestrator.execution import Options, prepare
from orchestrator.shards import Shard, units
from tests.cli import baton
from tests.conftest import SHOP

ROWS = 7
FAILING_ROW = 5
TWO_CHAINS = """
name: two chains
base_url: "{{ env.SHOP_URL }}"
tests:
  login:
    request:
      method: POST
      url: /auth/login
      json: {username: user001, password: pw-user001}
    capture: {auth.token: {json: "$.access_token"}}
  profile:
    request:
      url: /me
      headers: {Authorization: "Bearer {{ auth.token }}"}
    expect: {status: 200}
  health:
    request: {url: /health}
    expect: {status: 200}
"""


@pytest.fixture
def workdir(
    monkeypatch: pytest.MonkeyPatch, pg_server_dsn: str, shop_url: str, tmp_path: Path
) -> Path:
    """A CI job's checkout: the batch flow, 7 rows, the shop's URL and the database."""
    monkeypatch.setenv("SHOP_URL", shop_url)
    monkeypatch.setenv("BATON_DATABASE_URL", pg_server_dsn)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "batch.yaml").write_text((SHOP / "batch.yaml").read_text())
    (tmp_path / "two.yaml").write_text(TWO_CHAINS)
    rows(tmp_path, failing=None)
    return tmp_path


def rows(directory: Path, failing: int | None) -> None:
    lines = ["username,password"]
    for row in range(1, ROWS + 1):
        password = "wrong" if row == failing else f"pw-user{row:03}"
        lines.append(f"user{row:03},{password}")
    (directory / "rows.csv").write_text("\n".join(lines) + "\n")


def start_shard(shard: str, batch: str, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "orchestrator.cli", "run", "-q", *args]
    return subprocess.Popen(
        [*command, "--shard", shard, "--batch", batch],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_shards(shards: list[str], batch: str, *args: str) -> list[tuple[int, str]]:
    """The shards as concurrent processes: each one's exit code and output."""
    processes = [start_shard(shard, batch, *args) for shard in shards]
    done = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        done.append((process.returncode, out + err))
    return done


def per_row(dsn: str, batch: str) -> dict[int, tuple[int, int]]:
    """For each row of the batch: the runs started and the runs completed in the log."""
    return asyncio.run(_per_row(dsn, batch))


async def _per_row(dsn: str, batch: str) -> dict[int, tuple[int, int]]:
    connection = await asyncpg.connect(dsn)
    try:
        found = await connection.fetch(
            """
            SELECT (s.data->>'row')::int AS row, count(*) AS started,
                   count(c.stream) AS completed
            FROM events s
            LEFT JOIN events c ON c.stream = s.stream AND c.type = 'RunCompleted'
            WHERE s.type = 'RunStarted' AND s.data->>'batch_id' = $1
            GROUP BY 1
            """,
            batch,
        )
    finally:
        await connection.close()
    return {record["row"]: (record["started"], record["completed"]) for record in found}


def report_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_three_shards_at_once_cover_each_row_once_and_merge_into_one_report(
    workdir: Path, pg_server_dsn: str
) -> None:
    batch = f"pipeline-{uuid.uuid4().hex[:8]}"
    shards = run_shards(
        ["1/3", "2/3", "3/3"], batch, "batch.yaml", "--data", "rows.csv", "--json", "s.json"
    )
    assert [code for code, _ in shards] == [0, 0, 0], shards
    # 7 units round robin over 3 shards: 3, 2 and 2 of them
    assert [out.splitlines()[0] for _, out in shards] == [
        f"shard 1/3 of batch {batch}: 3 of 7 units",
        f"shard 2/3 of batch {batch}: 2 of 7 units",
        f"shard 3/3 of batch {batch}: 2 of 7 units",
    ]
    assert per_row(pg_server_dsn, batch) == dict.fromkeys(range(1, ROWS + 1), (1, 1))

    code, out, err = baton("report", "--batch", batch, "--junit", "j.xml", "--json", "r.json")
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("7 runs: 7 passed; tests: 35 passed in ")
    suites = ET.parse(workdir / "j.xml").getroot()
    assert (suites.get("tests"), suites.get("failures"), suites.get("errors")) == ("35", "0", "0")
    assert [suite.get("name") for suite in suites] == [
        f"shop batch checkout [row {row}]" for row in range(1, ROWS + 1)
    ]
    merged = report_json(workdir / "r.json")["runs"]
    assert [run["row"] for run in merged] == list(range(1, ROWS + 1))
    assert {run["batch_id"] for run in merged} == {batch}


def test_a_failing_row_fails_the_report_as_it_failed_its_shard(
    workdir: Path, pg_server_dsn: str
) -> None:
    rows(workdir, failing=FAILING_ROW)
    batch = f"pipeline-{uuid.uuid4().hex[:8]}"
    # row 5 is the second unit of shard 2 (units 1, 4, 7 / 2, 5 / 3, 6)
    shards = run_shards(["1/3", "2/3", "3/3"], batch, "batch.yaml", "--data", "rows.csv")
    assert [code for code, _ in shards] == [0, 1, 0], shards

    code, out, err = baton("report", "--batch", batch, "--junit", "j.xml")
    assert code == 1, out + err
    assert "✗ shop batch checkout [row 5] / login" in out
    assert out.splitlines()[-1].startswith("7 runs: 6 passed, 1 failed; tests: 30 passed, ")
    suites = ET.parse(workdir / "j.xml").getroot()
    assert suites.get("failures") == "1"
    failure = suites.find("testsuite/testcase[@name='login']/failure")
    assert failure is not None
    assert "expected 200, got 401" in (failure.get("message") or "")


def comparable(run: dict[str, Any]) -> dict[str, Any]:
    """A run of a JSON report without what the log does not keep (tests' tags, assertions'
    explanations) and the start time, which the log has to the microsecond of the event."""
    run = {**run, "started_at": None}
    run["tests"] = [
        {
            **{key: value for key, value in test.items() if key != "tags"},
            "assertions": [
                {k: v for k, v in check.items() if k != "message"}
                for check in test.get("assertions", [])
            ],
        }
        for test in run["tests"]
    ]
    return run


def test_the_report_holds_what_the_shards_reported(workdir: Path) -> None:
    """The merged JSON is the shards' JSON reports, run for run: nothing lost or changed on
    the way through the log, a failure's message, checks and exchange included."""
    rows(workdir, failing=FAILING_ROW)
    batch = f"pipeline-{uuid.uuid4().hex[:8]}"
    local: list[dict[str, Any]] = []
    for shard in (1, 2):
        baton(
            "run",
            "batch.yaml",
            "two.yaml",
            "--data",
            "rows.csv",
            "--shard",
            f"{shard}/2",
            "--batch",
            batch,
            "--json",
            f"s{shard}.json",
        )
        local += report_json(workdir / f"s{shard}.json")["runs"]
    code, out, err = baton("report", "--batch", batch, "--json", "r.json")
    assert code == 1, out + err
    merged = report_json(workdir / "r.json")["runs"]
    assert len(merged) == len(local) == ROWS + 2 * ROWS
    by_id = {run["run_id"]: comparable(run) for run in local}
    assert [comparable(run) for run in merged] == [by_id[run["run_id"]] for run in merged]
    failed = next(run for run in merged if run["status"] == "failed")
    assert failed["tests"][0]["exchange"]["status"] == 401


def test_a_missing_shard_is_named_and_fails_the_report(workdir: Path) -> None:
    batch = f"pipeline-{uuid.uuid4().hex[:8]}"
    shards = run_shards(["1/3", "3/3"], batch, "batch.yaml", "--data", "rows.csv")
    assert [code for code, _ in shards] == [0, 0], shards
    code, out, err = baton("report", "--batch", batch)
    assert code == 1
    assert out.splitlines()[-1].startswith("5 runs: 5 passed")
    assert err.splitlines() == [
        f"error: batch {batch}: shard 2/3 recorded nothing: it did not run, or failed before "
        f"its first run; run it (baton run --shard 2/3 --batch {batch})"
    ]


def test_a_retried_shard_replaces_its_first_attempt(workdir: Path, pg_server_dsn: str) -> None:
    rows(workdir, failing=FAILING_ROW)
    batch = f"pipeline-{uuid.uuid4().hex[:8]}"
    assert [
        c for c, _ in run_shards(["1/3", "2/3", "3/3"], batch, "batch.yaml", "--data", "rows.csv")
    ] == [0, 1, 0]
    # CI retries the failed shard; the API has been fixed meanwhile (the row's password)
    rows(workdir, failing=None)
    code, out, err = baton(
        "run",
        "batch.yaml",
        "--data",
        "rows.csv",
        "--shard",
        "2/3",
        "--batch",
        batch,
        "--json",
        "retry.json",
    )
    assert code == 0, out + err
    # both attempts are in the log; the report has each row once, the retry's for shard 2
    counts = per_row(pg_server_dsn, batch)
    assert counts == {1: (1, 1), 2: (2, 2), 3: (1, 1), 4: (1, 1), 5: (2, 2), 6: (1, 1), 7: (1, 1)}
    code, out, err = baton("report", "--batch", batch, "--json", "r.json")
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("7 runs: 7 passed; tests: 35 passed in ")
    merged = report_json(workdir / "r.json")["runs"]
    retried = {run["row"]: run["run_id"] for run in report_json(workdir / "retry.json")["runs"]}
    assert {run["row"]: run["run_id"] for run in merged if run["row"] in (2, 5)} == retried


def test_independent_chains_of_a_flow_split_under_shard_only(workdir: Path) -> None:
    code, out, err = baton("run", "two.yaml", "--json", "plain.json")
    assert code == 0, out + err
    assert [len(run["tests"]) for run in report_json(workdir / "plain.json")["runs"]] == [3]

    batch = f"pipeline-{uuid.uuid4().hex[:8]}"
    for shard in ("1/2", "2/2"):
        code, out, err = baton(
            "run", "two.yaml", "--shard", shard, "--batch", batch, "--json", f"{shard[0]}.json"
        )
        assert code == 0, out + err
        assert out.splitlines()[0] == f"shard {shard} of batch {batch}: 1 of 2 units"
    names = [
        [
            test["name"]
            for run in report_json(workdir / f"{k}.json")["runs"]
            for test in run["tests"]
        ]
        for k in "12"
    ]
    assert names == [["login", "profile"], ["health"]]
    code, out, err = baton("report", "--batch", batch)
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("2 runs: 2 passed; tests: 3 passed in ")


def test_units_are_listed_in_one_order_and_shards_share_them_round_robin(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "two.yaml").write_text(TWO_CHAINS)
    (tmp_path / "flows" / "batch.yaml").write_text((SHOP / "batch.yaml").read_text())
    (tmp_path / "rows.csv").write_text("username,password\nu1,p1\nu2,p2\n")
    environ = {"SHOP_URL": "http://127.0.0.1:1"}
    # named in another order, from another directory: the same units in the same order
    listings = [
        [
            unit.key
            for unit in units(
                prepare(Options(paths, data_file=tmp_path / "rows.csv"), environ), cwd=cwd
            )
        ]
        for paths, cwd in (
            ([tmp_path / "flows"], tmp_path),
            ([tmp_path / "flows" / "two.yaml", tmp_path / "flows" / "batch.yaml"], tmp_path),
        )
    ]
    expected = [
        "flows/batch.yaml::login[1]",
        "flows/batch.yaml::login[2]",
        "flows/two.yaml::login[1]",
        "flows/two.yaml::login[2]",
        "flows/two.yaml::health[1]",
        "flows/two.yaml::health[2]",
    ]
    assert listings == [expected, expected]
    shares = [
        [
            u.key
            for u in Shard(k, 4).take(
                units(
                    prepare(
                        Options([tmp_path / "flows"], data_file=tmp_path / "rows.csv"), environ
                    ),
                    cwd=tmp_path,
                )
            )
        ]
        for k in (1, 2, 3, 4)
    ]
    assert shares == [expected[0::4], expected[1::4], expected[2::4], expected[3::4]]
    assert sorted(key for share in shares for key in share) == sorted(expected)


@pytest.mark.parametrize("value", ["0/3", "4/3", "x", "1/0", "-1/3"])
def test_a_bad_shard_is_one_line_and_exit_2(workdir: Path, value: str) -> None:
    code, out, err = baton("run", "batch.yaml", f"--shard={value}", "--batch", "b")
    assert code == 2
    assert err.splitlines() == [
        f"error: --shard {value!r}: write K/N with 1 <= K <= N, e.g. --shard 1/3 for the "
        "first of three shards"
    ]
    assert out == ""


def test_shard_needs_a_batch_id(workdir: Path) -> None:
    code, _, err = baton("run", "batch.yaml", "--shard", "1/2")
    assert code == 2
    assert err.startswith("error: --shard 1/2 needs --batch ID")
    assert len(err.splitlines()) == 1


def test_an_unknown_batch_is_a_usage_error(workdir: Path) -> None:
    code, _, err = baton("report", "--batch", "never-ran")
    assert code == 2
    assert err.startswith("error: no shards of batch 'never-ran' in the event store")


def test_shard_events_round_trip_and_old_batch_events_still_decode() -> None:
    started = ev.ShardStarted("b", 2, 3, runs=["r1"], units=["flows/a.yaml::login[2]"])
    completed = ev.ShardCompleted("b", 2, 3, passed=1, failed=0, duration_ms=12.5)
    for event in (started, completed):
        assert ev.decode(ev.encode(event)) == event
    old = msgspec.json.encode(
        {"type": "BatchStarted", "batch_id": "b", "suite": "s", "source": "f", "runs": []}
    )
    assert ev.decode(old) == ev.BatchStarted("b", "s", "f", [])


SLOW = """
name: slow
base_url: "{{ env.SHOP_URL }}"
variables: {ms: 3000}
tests:
  wait:
    request: {url: "/slow?ms={{ ms }}"}
    expect: {status: 200}
"""


def wait_for_request(dsn: str, batch: str, row: int) -> None:
    """Until the run of ``row`` has sent its request."""

    async def sent() -> bool:
        connection = await asyncpg.connect(dsn)
        try:
            found = await connection.fetchval(
                """
                SELECT count(*) FROM events s JOIN events r ON r.stream = s.stream
                WHERE s.type = 'RunStarted' AND s.data->>'batch_id' = $1
                  AND (s.data->>'row')::int = $2 AND r.type = 'RequestSent'
                """,
                batch,
                row,
            )
        finally:
            await connection.close()
        return bool(found)

    deadline = time.monotonic() + 60
    while not asyncio.run(sent()):
        assert time.monotonic() < deadline, "the shard sent no request within 60 s"
        time.sleep(0.1)


def test_a_shard_killed_mid_run_is_unfinished_until_retried(
    workdir: Path, pg_server_dsn: str
) -> None:
    (workdir / "slow.yaml").write_text(SLOW)
    (workdir / "one.csv").write_text("row\n1\n2\n")
    batch = f"pipeline-{uuid.uuid4().hex[:8]}"
    assert run_shards(["1/2"], batch, "slow.yaml", "--data", "one.csv", "--var", "ms=0")[0][0] == 0
    killed = start_shard("2/2", batch, "slow.yaml", "--data", "one.csv")
    try:
        wait_for_request(pg_server_dsn, batch, row=2)
    finally:
        killed.kill()  # SIGKILL: no RunCancelled, no ShardCompleted
        killed.communicate(timeout=10)
    code, out, err = baton("report", "--batch", batch)
    assert code == 1
    assert out.splitlines()[-1].startswith("1 passed in ")
    [line] = err.splitlines()
    assert line.startswith(f"error: batch {batch}: run ")
    assert line.endswith(
        "(slow.yaml::wait[2]) of shard 2/2 has not ended: the shard is still running, or it "
        "died; run the shard again"
    )
    # CI retries it
    assert run_shards(["2/2"], batch, "slow.yaml", "--data", "one.csv", "--var", "ms=0")[0][0] == 0
    code, out, err = baton("report", "--batch", batch)
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("2 runs: 2 passed; tests: 2 passed in ")


def test_a_shard_with_no_units_passes_and_counts_as_present(workdir: Path) -> None:
    """More shards than units (a matrix sized for a bigger batch): the spare shard runs
    nothing, passes, and the report does not take it for a missing one."""
    batch = f"pipeline-{uuid.uuid4().hex[:8]}"
    for shard, line in (("1/3", "1 of 2 units"), ("2/3", "1 of 2 units"), ("3/3", "0 of 2 units")):
        code, out, err = baton("run", "two.yaml", "--shard", shard, "--batch", batch)
        assert code == 0, out + err
        assert out.splitlines()[0] == f"shard {shard} of batch {batch}: {line}"
    assert out.splitlines()[-1] == "no tests ran"
    code, out, err = baton("report", "--batch", batch)
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("2 runs: 2 passed; tests: 3 passed in ")


def test_batch_alone_runs_every_unit_as_one_shard(workdir: Path) -> None:
    batch = f"pipeline-{uuid.uuid4().hex[:8]}"
    code, out, err = baton("run", "two.yaml", "--batch", batch)
    assert code == 0, out + err
    assert out.splitlines()[0] == f"shard 1/1 of batch {batch}: 2 of 2 units"
    code, out, err = baton("report", "--batch", batch)
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("2 runs: 2 passed; tests: 3 passed in ")


def test_shards_that_disagree_on_n_fail_the_report(workdir: Path) -> None:
    batch = f"pipeline-{uuid.uuid4().hex[:8]}"
    for shard in ("1/2", "2/3"):
        assert baton("run", "two.yaml", "--shard", shard, "--batch", batch)[0] == 0
    code, _, err = baton("report", "--batch", batch)
    assert code == 1
    assert err.splitlines()[0] == (
        f"error: batch {batch}: its shards split it into different numbers of shards (2, 3); "
        "run every shard with the same --shard K/N"
    )
