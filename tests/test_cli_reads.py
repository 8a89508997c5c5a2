"""What a user reads back after runs: ``baton runs`` with filters, ``baton show``,
``baton context`` through the Redis cache, ``baton db``, ``baton projections rebuild``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import redis.asyncio as redis

from tests.cli import baton
from tests.conftest import SHOP, start_shop, stop


@pytest.fixture(scope="module")
def runs_env(pg_server_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Three recorded runs: checkout passed (env local, tag smoke), checkout against a
    broken catalog failed, features passed."""
    process, url = start_shop()
    broken, broken_url = start_shop("--broken", "catalog")
    home = tmp_path_factory.mktemp("home")
    patch = pytest.MonkeyPatch()
    values = {
        "BATON_DATABASE_URL": pg_server_dsn,
        "BATON_HOME": str(home),
        "BATON_REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    for key, value in values.items():
        patch.setenv(key, value)
    ids: dict[str, str] = {}
    try:
        for label, shop, args in (
            ("smoke", url, ["checkout.yaml", "--env", "local", "--tag", "smoke"]),
            ("broken", broken_url, ["checkout.yaml"]),
            ("features", url, ["features.yaml"]),
        ):
            patch.setenv("SHOP_URL", shop)
            report = home / f"{label}.json"
            code, out, err = baton("run", str(SHOP / args[0]), *args[1:], "--json", str(report))
            assert code in (0, 1), out + err
            ids[label] = json.loads(report.read_text())["runs"][0]["run_id"]
        yield {"ids": ids, **values}
    finally:
        patch.undo()
        stop(process)
        stop(broken)


@pytest.fixture
def reads(runs_env: dict, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key in ("BATON_DATABASE_URL", "BATON_HOME", "BATON_REDIS_URL"):
        monkeypatch.setenv(key, runs_env[key])
    ids: dict[str, str] = runs_env["ids"]
    return ids


def listed(*args: str) -> list[str]:
    code, out, err = baton("runs", *args)
    assert code == 0, err
    return [line.split()[0] for line in out.splitlines()[1:] if line and line[0] != " "]


def test_runs_filters(reads: dict[str, str]) -> None:
    mine = set(reads.values())
    assert mine <= set(listed("-n", "100"))
    assert set(listed("--status", "failed", "-n", "100")) & mine == {reads["broken"]}
    assert set(listed("--suite", "shop features", "-n", "100")) & mine == {reads["features"]}
    assert set(listed("--tag", "smoke", "-n", "100")) & mine == {reads["smoke"]}
    assert set(listed("--env", "local", "-n", "100")) & mine == {reads["smoke"]}
    tomorrow = (datetime.now() + timedelta(days=1)).strftime("%Y-%m-%d")
    assert listed("--since", tomorrow) == []
    assert set(listed("--until", tomorrow, "-n", "100")) >= mine
    code, out, _ = baton("runs", "--status", "cancelled", "--suite", "nope")
    assert code == 0 and out.strip() == "no runs match"


def test_run_show_lists_every_result(reads: dict[str, str]) -> None:
    code, out, _ = baton("show", reads["broken"])
    assert code == 0
    assert "status failed, 3 passed, 1 failed, 6 skipped of 10" in out
    catalog = next(line for line in out.splitlines() if " catalog " in line)
    assert "failed" in catalog and "HTTP 500" in catalog and "[server_error]" in catalog
    assert "[dependency_skipped] depends on catalog, which failed" in out
    code, _, err = baton("show", "not-a-run")
    assert code == 2 and "no run 'not-a-run'" in err


def test_events_have_column_headers(reads: dict[str, str]) -> None:
    code, out, _ = baton("events", reads["broken"])
    assert code == 0
    header, first, *_ = out.splitlines()
    assert header.split() == ["position", "version", "time", "type", "fields"]
    position, version, _, kind = first.split()[:4]
    assert version == "1" and kind == "RunStarted" and int(position) > 1


def test_events_mask_a_secret_capture_as_every_other_output_does(reads: dict[str, str]) -> None:
    code, out, _ = baton("events", reads["smoke"])
    assert code == 0
    tokens = [line for line in out.splitlines() if " AuthTokenUpdated " in line]
    assert tokens and all("value=***" in line for line in tokens)
    assert "enc:v1" not in out  # not even its ciphertext


def test_context_at_outside_the_run_names_its_range(reads: dict[str, str]) -> None:
    run = reads["broken"]  # the second run recorded: its events are not the log's first
    lines = baton("events", run)[1].splitlines()[1:]
    first, last = int(lines[0].split()[0]), int(lines[-1].split()[0])
    expected = (
        f"error: --at {{at}} is outside run {run}: its events are at log positions "
        f"{first} to {last} (the first column of `baton events`)"
    )
    # a negative position, a version number within the run, one past its end
    for at in (-1, 2, last + 1):
        code, out, err = baton("context", run, "--at", str(at))
        assert (code, out) == (2, ""), at
        assert err.strip() == expected.format(at=at)
    for at in (first, last):
        code, out, _ = baton("context", run, "--at", str(at))
        assert code == 0 and json.loads(out)["run_id"] == run
    assert json.loads(baton("context", run, "--at", str(first))[1])["status"] == "running"
    assert json.loads(baton("context", run, "--at", str(last))[1])["status"] == "failed"


async def test_context_is_served_from_redis(reads: dict[str, str], runs_env: dict) -> None:
    import asyncio

    client = redis.Redis.from_url(runs_env["BATON_REDIS_URL"])
    key = f"baton:context:{reads['smoke']}"
    try:
        await client.delete(key)
        code, out, _ = await asyncio.to_thread(baton, "context", reads["smoke"])
        assert code == 0
        cached = await client.get(key)
        assert cached is not None  # the read went through the cache and filled it
        assert json.loads(out)["status"] == "passed"
        ttl = await client.ttl(key)
        assert 23 * 3600 < ttl <= 24 * 3600  # 24 hours after the run ended
    finally:
        await client.delete(key)
        await client.aclose()


def test_db_status_and_migrate(reads: dict[str, str]) -> None:
    code, out, _ = baton("db", "migrate")
    assert code == 0 and out.startswith("schema up to date at step ")
    code, out, _ = baton("db", "status")
    assert code == 0
    assert "pending" not in out
    assert "1 event store" in out
    # one column of dates, however long a step's name
    assert len({line.index(" applied ") for line in out.splitlines()[1:]}) == 1, out


def test_projections_rebuild_keeps_what_users_read(reads: dict[str, str]) -> None:
    before = baton("show", reads["broken"])[1]
    code, out, _ = baton("projections", "rebuild")
    assert code == 0 and out.startswith("read tables rebuilt from ")
    assert baton("show", reads["broken"])[1] == before


def test_unreachable_database_for_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_DATABASE_URL", "postgresql://u:topsecret@127.0.0.1:1/x")
    for args in (("runs",), ("db", "status"), ("context", "x")):
        code, _, err = baton(*args)
        assert code == 3, args
        assert "topsecret" not in err and len(err.strip().splitlines()) == 1
