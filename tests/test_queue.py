"""The batch queue for real: a private redis-server, ``baton worker`` processes, the demo
shop, a database of the test's own; workers stopped with SIGTERM and SIGINT and killed
with SIGKILL. What happened is counted in the events table itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from redis.asyncio import Redis

from events.secrets import Cipher, load_key
from events.types import RunStarted
from orchestrator.queue import GROUP, STREAM, JobQueue, QueuedJob
from tests.conftest import SHOP, RedisServer
from tests.test_postgres_restart import PrivateServer
from tests.test_postgres_restart import private_server as private_server

ROWS = 50
FAILING_ROW = 7
SLOW = """
name: slow chain
base_url: "{{ env.SHOP_URL }}"
variables: {username: user001, password: pw-user001}
tests:
  login:
    request:
      method: POST
      url: /auth/login
      json: {username: "{{ username }}", password: "{{ password }}"}
    capture: {auth.token: {json: "$.access_token"}}
  wait:
    depends_on: [login]
    request: {url: "/slow?ms={{ env.SLOW_MS }}"}
    expect: {status: 200}
  profile:
    depends_on: [wait]
    request:
      url: /me
      headers: {Authorization: "Bearer {{ auth.token }}"}
    expect:
      status: 200
      json: {"$.username": "{{ username }}"}
"""


class Workdir:
    """A checkout the submitter and the workers share, and the processes started in it."""

    def __init__(self, path: Path, env: dict[str, str], queue: str) -> None:
        self.path = path
        self.env = env
        self.queue = queue
        self.processes: list[subprocess.Popen[str]] = []

    def baton(self, *args: str, **env: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args],
            cwd=self.path,
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        return process

    def worker(self, *args: str) -> subprocess.Popen[str]:
        return self.baton("worker", "--queue", self.queue, "--claim-after", "1.5", *args)

    def submit(self, *args: str) -> subprocess.Popen[str]:
        return self.baton("run", "-q", *args, "--queue", self.queue)


@pytest.fixture
def workdir(
    tmp_path: Path, fresh_database_dsn: str, private_redis: RedisServer
) -> Iterator[Workdir]:
    with checkout(tmp_path, fresh_database_dsn, private_redis.url) as work:
        yield work


@contextlib.contextmanager
def checkout(tmp_path: Path, dsn: str, queue: str) -> Iterator[Workdir]:
    process = subprocess.Popen(
        [sys.executable, str(SHOP / "server.py"), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    shop = process.stdout.readline().split()[-1]
    env = {
        **os.environ,
        "SHOP_URL": shop,
        "SLOW_MS": "2500",
        "BATON_DATABASE_URL": dsn,
        "BATON_HOME": str(tmp_path / "home"),  # one generated secret key for every process
    }
    env.pop("BATON_SECRET_KEY", None)
    (tmp_path / "batch.yaml").write_text((SHOP / "batch.yaml").read_text())
    (tmp_path / "slow.yaml").write_text(SLOW)
    lines = ["username,password"]
    for row in range(1, ROWS + 1):
        password = "wrong" if row == FAILING_ROW else f"pw-user{row:03}"
        lines.append(f"user{row:03},{password}")
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "six.csv").write_text("\n".join(lines[:7]).replace("wrong", "pw-user007") + "\n")
    work = Workdir(tmp_path, env, queue)
    migrated = work.baton("db", "migrate")
    assert migrated.wait(timeout=60) == 0
    try:
        yield work
    finally:
        for started in work.processes:
            if started.poll() is None:
                started.kill()
            started.communicate()
        process.terminate()
        process.communicate(timeout=10)


def query(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(dsn)
        try:
            return list(await connection.fetch(sql, *args))
        finally:
            await connection.close()

    return asyncio.run(go())


def per_run(dsn: str) -> dict[str, dict[str, int]]:
    """For every run stream: how many events of each type it holds."""
    counts: dict[str, dict[str, int]] = {}
    for record in query(dsn, "SELECT stream, type, count(*) FROM events GROUP BY 1, 2"):
        if record[0].startswith("run-"):
            counts.setdefault(record[0], {})[record[1]] = record[2]
    return counts


def results_per_test(dsn: str) -> dict[tuple[str, str], int]:
    """How many results (TestPassed, TestFailed, TestSkipped) each (run, test) has."""
    found = query(
        dsn,
        "SELECT stream, data->>'test', count(*) FROM events"
        " WHERE type IN ('TestPassed', 'TestFailed', 'TestSkipped') GROUP BY 1, 2",
    )
    return {(record[0], record[1]): record[2] for record in found}


def requests_of(dsn: str, test: str) -> int:
    found = query(
        dsn, "SELECT count(*) FROM events WHERE type = 'RequestSent' AND data->>'test' = $1", test
    )
    return int(found[0][0])


def wait_for(condition: Callable[[], bool], within: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.1)


def stopped(process: subprocess.Popen[str]) -> int:
    """SIGTERM to a worker: its exit code once it has drained."""
    process.send_signal(signal.SIGTERM)
    return finish(process, timeout=30)[0]


def finish(process: subprocess.Popen[str], timeout: float = 90) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def junit_cases(path: Path) -> list[tuple[str, str, str]]:
    """Each JUnit test case: its class (the run), name and outcome."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((child.tag for child in case), "passed")
        cases.append((case.get("classname", ""), case.get("name", ""), outcome))
    return cases


def failed_lines(out: str) -> list[str]:
    """The lines of the failed runs and tests, without their durations."""
    return [re.sub(r"\s+\d+ ms$", "", line) for line in out.splitlines() if line.startswith("✗")]


def summary(out: str) -> str:
    """The summary's totals line, without its duration."""
    line = [line for line in out.splitlines() if " runs: " in line][-1]
    return line.rsplit(" in ", 1)[0]


def test_fifty_rows_on_three_workers_end_once_each_and_report_as_a_local_run(
    workdir: Workdir, fresh_database_dsn: str
) -> None:
    workers = [workdir.worker() for _ in range(3)]
    code, out, err = finish(
        workdir.submit("batch.yaml", "--data", "rows.csv", "--junit", "queued.xml")
    )
    assert code == 1, out + err  # row 7 logs in with a wrong password
    counts = per_run(fresh_database_dsn)
    assert len(counts) == ROWS
    assert all(c["RunStarted"] == 1 and c["RunCompleted"] == 1 for c in counts.values())
    assert not any("RunCancelled" in c for c in counts.values())
    results = results_per_test(fresh_database_dsn)
    assert len(results) == ROWS * 5 and set(results.values()) == {1}
    assert sum(c.get("TestPassed", 0) for c in counts.values()) == (ROWS - 1) * 5

    local_code, local_out, local_err = finish(
        workdir.baton("run", "-q", "batch.yaml", "--data", "rows.csv", "--junit", "local.xml")
    )
    assert local_code == code, local_out + local_err
    assert (
        summary(out)
        == summary(local_out)
        == ("50 runs: 49 passed, 1 failed; tests: 245 passed, 1 failed, 4 skipped")
    )
    failures = failed_lines(out)
    assert failures == failed_lines(local_out)
    assert any("[row 7] / login" in line for line in failures)
    assert junit_cases(workdir.path / "queued.xml") == junit_cases(workdir.path / "local.xml")
    for worker in workers:
        assert stopped(worker) == 128 + signal.SIGTERM


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_worker_finishes_its_job_and_the_others_finish_the_batch(
    workdir: Workdir, fresh_database_dsn: str, signum: signal.Signals
) -> None:
    first = workdir.worker("--concurrency", "1")
    submitter = workdir.submit("slow.yaml", "--data", "six.csv")
    wait_for(lambda: requests_of(fresh_database_dsn, "wait") == 1, what="the first job's wait")
    others = [workdir.worker("--concurrency", "1") for _ in range(2)]
    first.send_signal(signum)
    code, _, err = finish(first, timeout=30)
    assert code == 128 + signum, err
    # it finished the job it had, and took no other
    ended = query(
        fresh_database_dsn,
        "SELECT count(*) FROM events WHERE type = 'RunCompleted' AND data->>'status' = 'passed'",
    )
    assert ended[0][0] >= 1
    code, out, err = finish(submitter)
    assert code == 0, out + err
    assert summary(out) == "6 runs: 6 passed; tests: 18 passed"
    counts = per_run(fresh_database_dsn)
    assert len(counts) == 6
    assert all(c["RunCompleted"] == 1 and "RunCancelled" not in c for c in counts.values())
    assert requests_of(fresh_database_dsn, "wait") == 6  # none sent twice: nothing handed back
    for other in others:
        stopped(other)


def test_a_killed_workers_job_is_claimed_and_resumed_from_its_events(
    workdir: Workdir, fresh_database_dsn: str
) -> None:
    doomed = workdir.worker()
    submitter = workdir.submit("slow.yaml")
    wait_for(lambda: requests_of(fresh_database_dsn, "wait") == 1, what="the wait request")
    doomed.kill()
    doomed.communicate()
    heir = workdir.worker()
    code, out, err = finish(submitter)
    assert code == 0, out + err
    assert "3 passed" in out
    [counts] = per_run(fresh_database_dsn).values()
    assert counts["RunStarted"] == 1 and counts["RunCompleted"] == 1
    assert "RunCancelled" not in counts
    assert set(results_per_test(fresh_database_dsn).values()) == {1}
    assert counts["TestPassed"] == 3
    # login passed before the kill: not sent again; its token came back from the log, as
    # profile's pass shows; the wait in flight was sent again
    assert requests_of(fresh_database_dsn, "login") == 1
    assert requests_of(fresh_database_dsn, "wait") == 2
    assert requests_of(fresh_database_dsn, "profile") == 1
    report = workdir.baton("report", "--batch", out.split()[1].rstrip(":"))
    code, report_out, report_err = finish(report)
    assert code == 0, report_out + report_err
    stopped(heir)


def test_a_job_that_keeps_killing_its_workers_ends_failed_after_max_deliveries(
    workdir: Workdir, fresh_database_dsn: str
) -> None:
    submitter = workdir.submit("slow.yaml")
    for delivery in (1, 2):
        worker = workdir.worker("--max-deliveries", "2")
        wait_for(
            lambda n=delivery: requests_of(fresh_database_dsn, "wait") == n,  # type: ignore[misc]
            what=f"delivery {delivery}'s wait request",
        )
        worker.kill()
        worker.communicate()
    last = workdir.worker("--max-deliveries", "2")
    code, out, err = finish(submitter)
    assert code == 1, out + err
    assert "handed to a worker 3 times" in out
    assert "--max-deliveries 2" in out
    [counts] = per_run(fresh_database_dsn).values()
    assert counts["RunCompleted"] == 1
    status = query(
        fresh_database_dsn, "SELECT data->>'status' FROM events WHERE type = 'RunCompleted'"
    )
    assert status[0][0] == "failed"
    assert requests_of(fresh_database_dsn, "wait") == 2  # not sent a third time
    stopped(last)


def test_a_job_past_the_drain_timeout_is_handed_back_and_resumed_by_another_worker(
    workdir: Workdir, fresh_database_dsn: str
) -> None:
    hurried = workdir.worker("--drain-timeout", "0.3")
    submitter = workdir.submit("slow.yaml")
    wait_for(lambda: requests_of(fresh_database_dsn, "wait") == 1, what="the wait request")
    hurried.send_signal(signal.SIGTERM)
    code, _, err = finish(hurried, timeout=10)
    assert code == 128 + signal.SIGTERM, err
    assert "handed 1 unfinished job(s) back" in err
    [counts] = per_run(fresh_database_dsn).values()
    assert "RunCancelled" not in counts and "RunCompleted" not in counts  # left open
    heir = workdir.worker()
    code, out, err = finish(submitter)
    assert code == 0, out + err
    [counts] = per_run(fresh_database_dsn).values()
    assert counts["RunCompleted"] == 1 and "RunCancelled" not in counts
    assert requests_of(fresh_database_dsn, "login") == 1
    assert requests_of(fresh_database_dsn, "wait") == 2
    stopped(heir)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_submitter_cancels_the_batch(
    workdir: Workdir, fresh_database_dsn: str, signum: signal.Signals
) -> None:
    worker = workdir.worker("--concurrency", "1")
    submitter = workdir.submit("slow.yaml", "--data", "six.csv")
    wait_for(lambda: requests_of(fresh_database_dsn, "wait") == 1, what="the first wait")
    submitter.send_signal(signum)
    code, out, err = finish(submitter, timeout=30)
    assert code == 128 + signum, out + err
    assert "INTERRUPTED" in out
    counts = per_run(fresh_database_dsn)
    assert len(counts) == 6
    assert all(c["RunStarted"] == 1 and c.get("RunCancelled") == 1 for c in counts.values())
    assert not any("RunCompleted" in c for c in counts.values())
    reasons = query(
        fresh_database_dsn,
        "SELECT data->>'reason', count(*) FROM events WHERE type = 'RunCancelled' GROUP BY 1",
    )
    assert dict((r[0], r[1]) for r in reasons) == {
        "interrupted": 1,  # the run in flight, cancelled by its worker
        "the batch was cancelled": 5,  # the jobs no worker had begun
    }
    time.sleep(1)  # the worker takes the remaining jobs, finds them ended, sends nothing
    assert requests_of(fresh_database_dsn, "login") == 1
    assert worker.poll() is None
    assert stopped(worker) == 128 + signal.SIGTERM


def test_postgres_down_mid_job_pauses_the_worker_which_acknowledges_only_what_is_stored(
    tmp_path: Path, private_server: PrivateServer, private_redis: RedisServer
) -> None:
    dsn = private_server.dsn
    with checkout(tmp_path, dsn, private_redis.url) as work:
        worker = work.worker("--concurrency", "2")
        submitter = work.submit("slow.yaml", "--data", "six.csv")
        wait_for(lambda: requests_of(dsn, "wait") == 2, what="two wait requests")
        private_server.pg_ctl("stop", "-m", "immediate")
        time.sleep(4)  # the waits end meanwhile: their events cannot be stored
        pending = pending_jobs(private_redis.url)
        private_server.pg_ctl("start")
        code, out, err = finish(submitter)
        assert code == 0, out + err
        assert worker.poll() is None
        assert pending == 6  # none acknowledged while its events were not stored
        assert pending_jobs(private_redis.url) == 0
        counts = per_run(dsn)
        assert len(counts) == 6
        assert all(c["RunCompleted"] == 1 and "RunCancelled" not in c for c in counts.values())
        assert set(results_per_test(dsn).values()) == {1}
        stopped(worker)


def pending_jobs(url: str) -> int:
    """Jobs taken and not acknowledged, and jobs not taken yet."""

    async def go() -> int:
        client = Redis.from_url(url)
        try:
            taken = await client.xpending(STREAM, GROUP)
            groups = await client.xinfo_groups(STREAM)
            return int(taken["pending"]) + int(groups[0]["lag"] or 0)
        finally:
            await client.aclose()

    return asyncio.run(go())


def delivered(url: str) -> list[int]:
    """How many times each job taken and not acknowledged was handed out."""

    async def go() -> list[int]:
        client = Redis.from_url(url)
        try:
            taken = await client.xpending_range(STREAM, GROUP, min="-", max="+", count=100)
            return [int(job["times_delivered"]) for job in taken]
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_redis_restarted_empty_mid_batch_loses_no_run(
    workdir: Workdir, fresh_database_dsn: str, private_redis: RedisServer
) -> None:
    workers = [workdir.worker("--concurrency", "1") for _ in range(2)]
    submitter = workdir.submit("slow.yaml", "--data", "six.csv")
    wait_for(lambda: requests_of(fresh_database_dsn, "wait") == 2, what="two wait requests")
    private_redis.kill()  # no persistence: it comes back without the stream
    time.sleep(0.5)
    private_redis.start()
    code, out, err = finish(submitter)
    assert code == 0, out + err
    assert summary(out) == "6 runs: 6 passed; tests: 18 passed"
    counts = per_run(fresh_database_dsn)
    assert len(counts) == 6
    assert all(c["RunCompleted"] == 1 and "RunCancelled" not in c for c in counts.values())
    assert set(results_per_test(fresh_database_dsn).values()) == {1}
    assert requests_of(fresh_database_dsn, "login") == 6  # no passed test sent again
    for worker in workers:
        assert worker.poll() is None
        stopped(worker)


def test_a_batch_is_queued_again_from_the_log_alone_when_redis_and_its_submitter_are_gone(
    workdir: Workdir, fresh_database_dsn: str, private_redis: RedisServer
) -> None:
    workers = [workdir.worker("--concurrency", "1")]
    submitter = workdir.submit("slow.yaml", "--data", "six.csv", "--var", "api_key=s3cr3t-v4lue")
    wait_for(lambda: requests_of(fresh_database_dsn, "wait") == 1, what="a wait request")
    submitter.kill()  # SIGKILL: no one is left to queue the batch again
    submitter.communicate()
    private_redis.kill()  # no persistence: it comes back without the jobs
    time.sleep(0.5)
    private_redis.start()
    [batch_id] = [
        row["stream"].removeprefix("batch-")
        for row in query(
            fresh_database_dsn, "SELECT DISTINCT stream FROM events WHERE stream LIKE 'batch-%'"
        )
    ]
    # the batch's record holds the jobs' options, never a --var in clear
    payloads = query(
        fresh_database_dsn,
        "SELECT data::text AS p FROM events WHERE stream = $1",
        f"batch-{batch_id}",
    )
    assert payloads and all("s3cr3t-v4lue" not in row["p"] for row in payloads)
    requeued = workdir.baton("batch", "requeue", batch_id, "--queue", workdir.queue)
    code, out, err = finish(requeued)
    assert code == 0, out + err
    queued = int(out.split(":")[1].split()[0])
    assert 1 <= queued <= 6  # the runs not ended in the log, the one in flight among them
    workers.append(workdir.worker("--concurrency", "3"))
    wait_for(
        lambda: sum(c.get("RunCompleted", 0) for c in per_run(fresh_database_dsn).values()) == 6,
        within=60,
        what="six runs completed",
    )
    counts = per_run(fresh_database_dsn)
    assert len(counts) == 6
    assert all(c["RunCompleted"] == 1 and "RunCancelled" not in c for c in counts.values())
    assert set(results_per_test(fresh_database_dsn).values()) == {1}
    report = workdir.baton("report", "--batch", batch_id)
    code, out, err = finish(report)
    assert code == 0, out + err
    assert summary(out) == "6 runs: 6 passed; tests: 18 passed"
    for worker in workers:
        stopped(worker)


def test_requeue_names_a_batch_it_cannot_find(workdir: Workdir) -> None:
    code, _out, err = finish(
        workdir.baton("batch", "requeue", "no-such-batch", "--queue", workdir.queue)
    )
    assert code == 2
    assert "error: no batch no-such-batch in the event store" in err


def test_a_job_of_a_newer_baton_is_left_for_another_worker_then_ended_saying_why(
    workdir: Workdir, fresh_database_dsn: str
) -> None:
    """In a rolling deploy an older worker takes jobs in a format it does not know: a batch's
    job with a field it lacks, a service's run sealed with one. It leaves each one pending
    for another worker; past --max-deliveries it ends their runs with the reason."""
    cipher = Cipher(load_key(None, workdir.path / "home"))
    ids = "00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"
    # what the service's RunStarted would say of each: the log begins with it
    started = [
        msgspec.json.encode(RunStarted(run_id=i, suite=f"flow {i[-1]}", suite_digest="", plan=[]))
        for i in ids
    ]
    newer_job = {
        **msgspec.to_builtins(QueuedJob("b-1", ids[0], "u", [], started=started[0].decode())),
        "priority": 5,
    }
    service_run = {"run_id": ids[1], "budget": 3}
    newer_service = QueuedJob.for_service(
        ids[1], cipher.encrypt(json.dumps(service_run)), 10, started[1].decode()
    )

    async def submit() -> None:
        queue = JobQueue(workdir.queue)
        try:
            await queue.ensure_group()
            redis = Redis.from_url(workdir.queue)
            await redis.xadd(STREAM, {"job": json.dumps(newer_job)})
            await redis.aclose()
            await queue.submit([newer_service])
        finally:
            await queue.aclose()

    asyncio.run(submit())
    worker = workdir.worker("--max-deliveries", "1")
    # taken once, left unacknowledged (claimable by another worker), no run ended yet
    wait_for(lambda: delivered(workdir.queue) == [1, 1], what="both jobs delivered once")
    assert not per_run(fresh_database_dsn)
    wait_for(lambda: len(per_run(fresh_database_dsn)) == 2, what="both runs ended")
    wait_for(lambda: pending_jobs(workdir.queue) == 0, what="both jobs acknowledged")
    reasons = query(
        fresh_database_dsn,
        "SELECT data->>'reason' FROM events WHERE type = 'RunCancelled' ORDER BY stream",
    )
    assert len(reasons) == 2
    for (reason,) in reasons:
        assert "handed to a worker 2 times and no worker could read it" in reason
        assert "queued by a newer Baton" in reason and "upgrade the workers" in reason
    assert "secret key" not in reasons[1][0]  # the key is right: the format is newer
    suites = query(
        fresh_database_dsn,
        "SELECT data->>'suite' FROM events WHERE type = 'RunStarted' ORDER BY stream",
    )
    assert suites == [("flow 1",), ("flow 2",)]
    assert stopped(worker) == 128 + signal.SIGTERM


async def test_a_service_run_is_queued_once_however_many_instances_queue_it(
    private_redis: RedisServer,
) -> None:
    """The instance that recorded a run and every instance that finds it unqueued may all
    queue it: one job reaches the stream."""
    queue = JobQueue(private_redis.url)
    try:
        run_id, other = "00000000-0000-4000-8000-000000000003", "00000000-0000-4000-8000-4"
        job = QueuedJob.for_service(run_id, "sealed", 10).encoded()
        assert await queue.unqueued([run_id, other]) == [run_id, other]
        first, *again = await asyncio.gather(*(queue.submit_once(run_id, job) for _ in range(3)))
        assert (first, again) == (True, [False, False])
        assert await queue.unqueued([run_id, other]) == [other]
        redis = Redis.from_url(private_redis.url)
        try:
            entries = await redis.xrange(STREAM)
        finally:
            await redis.aclose()
        assert [fields[b"job"] for _, fields in entries] == [job.encode()]
    finally:
        await queue.aclose()
