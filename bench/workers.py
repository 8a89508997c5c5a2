"""The workers' benchmark: a queued batch's throughput on 1, 2 and 4 ``baton worker``
processes, and the time from a worker's death to its job being resumed.

    python bench/workers.py [--rows 2000] [--workers 1,2,4] [--concurrency 8] [--repeat 3]
    python bench/workers.py --rows 40 --repeat 1 --claim-after 2 --kills 1   # smoke run

Three parts (``--parts io,cpu,resume``), each on processes the harness starts itself: a
private redis-server on a free port, a database of its own on the PostgreSQL server
(created, migrated with ``baton db migrate``, dropped), the demo shop, and a scratch
checkout that the submitter and the workers share (bench/workers-chain.yaml and a users
file of ``--rows`` rows).

- ``io``: the shop waits ``--latency-ms`` (50) on every request; ``--rows`` chains of three
  dependent requests. For each worker count, N workers (``--concurrency`` each) are
  started and have joined the consumer group before ``baton run ... --queue`` is started;
  the sample is the submitter's whole process (wall and CPU) plus the span in the log from
  the first RunStarted to the last RunCompleted, and each worker's CPU time.
- ``cpu``: the same with no latency: every worker computes.
- ``resume``: one chain of bench/workers-slow.yaml, whose second request waits; the worker
  running it is killed with SIGKILL mid-request while a second worker waits; the sample
  is the time from the kill to the first new event on the run's stream (its
  ``recorded_at``), for each ``--claim-after``.

Every batch must end with every run started and completed once, one TestPassed per test
and one request per test (nothing sent twice), or the harness stops. Rounds rotate the
worker counts' order. Results: bench/results/workers-<date>.json; see bench/WORKERS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import redis

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CHAIN = BENCH / "workers-chain.yaml"
SLOW_CHAIN = BENCH / "workers-slow.yaml"
CHAIN_TESTS = 3
SLOW_MS = 4000
"""The killed job's wait: longer than the kill takes to arrive, shorter than any bound."""
_databases = itertools.count()


class Batch(msgspec.Struct):
    part: str
    workers: int
    round: int
    rows: int
    seconds: float
    """The submitter's whole process: start-up, queueing, following, report, exit."""
    span_seconds: float
    """In the log: the first RunStarted to the last RunCompleted."""
    submitter_cpu: float
    worker_cpu: list[float]
    load: list[float]
    postgres_cpu: float
    """The batch's database's PostgreSQL backends (sampled every 0.5 s: a backend's last
    half second before it closes is missed)."""
    shop_cpu: float
    machine_busy: float
    """The share of both cores busy during the batch, everyone's work included."""


class Resumed(msgspec.Struct):
    claim_after: float
    round: int
    seconds: float
    """SIGKILL to the first new event's recorded_at on the run's stream."""
    seen_seconds: float
    """SIGKILL to the harness seeing that event (polling every 20 ms)."""
    event: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"redis-server did not answer on port {port}") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.kill()
        process.wait()


def admin(admin_url: str, sql: str) -> None:
    async def go() -> None:
        connection = await asyncpg.connect(admin_url)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(go())


def query(dsn: str, sql: str, *args: Any) -> list[Any]:
    async def go() -> list[Any]:
        connection = await asyncpg.connect(dsn)
        try:
            return list(await connection.fetch(sql, *args))
        finally:
            await connection.close()

    return asyncio.run(go())


@contextlib.contextmanager
def database(admin_url: str) -> Iterator[str]:
    """A new database on the server of ``admin_url``, dropped afterwards."""
    name = f"baton_wbench_{os.getpid()}_{next(_databases)}"
    admin(admin_url, f"CREATE DATABASE {name}")
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        admin(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def shop(latency_ms: float) -> Iterator[tuple[str, int]]:
    server = [sys.executable, str(ROOT / "examples/shop/server.py"), "--port", "0"]
    server += ["--latency-ms", str(latency_ms)]
    process = subprocess.Popen(server, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if " on " not in line:
            raise SystemExit(f"the demo API did not start: {line!r}")
        yield line.rsplit(" on ", 1)[1], process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


def cpu_of(pid: int) -> float:
    """CPU seconds (user and system) of a running process, 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every core since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


class PostgresMeter:
    """The CPU seconds of the backends that serve one database, sampled in a thread."""

    def __init__(self, admin_url: str, database: str) -> None:
        self.admin_url = admin_url
        self.database = database
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._sample()), daemon=True)

    async def _sample(self) -> None:
        connection = await asyncpg.connect(self.admin_url)
        try:
            while not self.stop.is_set():
                sql = "SELECT pid FROM pg_stat_activity WHERE datname = $1"
                for record in await connection.fetch(sql, self.database):
                    self.seen[record[0]] = max(self.seen.get(record[0], 0.0), cpu_of(record[0]))
                await asyncio.sleep(0.5)
        finally:
            await connection.close()

    def __enter__(self) -> PostgresMeter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def seconds(self) -> float:
        return sum(self.seen.values())


WITHOUT_PROJECTOR = """
import events.projections as projections
async def serve(self, *args, stop=None, **kwargs):
    if stop is not None:
        await stop.wait()
projections.Projector.serve = serve
from orchestrator.cli import main
main()
"""
"""``baton`` with the read tables' projector doing nothing: a measurement of what the
projector in every worker costs (``--without-worker-projector``), not a way to run."""


class Checkout:
    """The scratch checkout that the submitter and the workers share, with their logs."""

    def __init__(self, path: Path, shop_url: str, dsn: str, queue: str) -> None:
        self.path = path
        self.dsn = dsn
        self.queue = queue
        self.baton = str(Path(sys.executable).with_name("baton"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env = {
            **env,
            "SHOP_URL": shop_url,
            "SLOW_MS": str(SLOW_MS),
            "BATON_DATABASE_URL": dsn,
            "BATON_HOME": str(path / "home"),  # one generated secret key for every process
        }
        self.logs = itertools.count()
        self.log_of: dict[int, Path] = {}

    def start(self, *args: str, command: list[str] | None = None) -> subprocess.Popen[bytes]:
        path = self.path / f"{args[0]}-{next(self.logs)}.log"
        with path.open("wb") as log:
            process = subprocess.Popen(
                [*(command or [self.baton]), *args],
                cwd=self.path,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            self.log_of[process.pid] = path
            return process

    def says(self, process: subprocess.Popen[bytes], text: str) -> bool:
        return text in self.log_of[process.pid].read_text(errors="replace")

    def worker(
        self, concurrency: int, claim_after: float, *, projector: bool = True
    ) -> subprocess.Popen[bytes]:
        args = ["--concurrency", str(concurrency), "--claim-after", str(claim_after)]
        command = None if projector else [sys.executable, "-c", WITHOUT_PROJECTOR]
        return self.start("worker", "--queue", self.queue, *args, command=command)

    def migrate(self) -> None:
        if self.start("db", "migrate").wait(timeout=120) != 0:
            raise SystemExit(f"baton db migrate failed: see {self.path}")


def readers(queue: str) -> int:
    """How many clients wait on the jobs stream (XREADGROUP): workers ready to take a job.
    (Redis 7.0 adds a consumer to the group only once a read hands it something.)"""
    client = redis.Redis.from_url(queue)
    try:
        return sum(1 for c in client.client_list() if c.get("cmd") == "xreadgroup")
    finally:
        client.close()


def wait_for(condition: Any, what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {within} s: {what}")
        time.sleep(0.02)


def waited(process: subprocess.Popen[bytes], what: str) -> float:
    """CPU seconds of a process that must exit 0 (or 143: a worker stopped by SIGTERM)."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode not in (0, 128 + signal.SIGTERM):
        raise SystemExit(f"{what} exited {process.returncode}")
    return usage.ru_utime + usage.ru_stime


def check_batch(dsn: str, rows: int, tests: int) -> None:
    """Every run started and completed once, each test passed once, nothing sent twice."""
    counts = query(
        dsn,
        "SELECT type, count(*), count(DISTINCT stream) FROM events"
        " WHERE stream LIKE 'run-%' AND type IN"
        " ('RunStarted', 'RunCompleted', 'RunCancelled', 'TestPassed', 'RequestSent')"
        " GROUP BY type",
    )
    found = {record[0]: (record[1], record[2]) for record in counts}
    expected = {
        "RunStarted": (rows, rows),
        "RunCompleted": (rows, rows),
        "TestPassed": (rows * tests, rows),
        "RequestSent": (rows * tests, rows),
    }
    if found != expected:
        raise SystemExit(f"the batch did not end as expected: {found} != {expected}")


def span(dsn: str) -> float:
    [record] = query(
        dsn,
        "SELECT extract(epoch FROM max(recorded_at) FILTER (WHERE type = 'RunCompleted')"
        " - min(recorded_at) FILTER (WHERE type = 'RunStarted')) FROM events",
    )
    return float(record[0])


def users(path: Path, rows: int) -> Path:
    file = path / f"users-{rows}.csv"
    lines = [f"w{i},secret-w{i}" for i in range(1, rows + 1)]
    file.write_text("username,password\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return file


def batch(
    args: argparse.Namespace,
    part: str,
    shop_api: tuple[str, int],
    workers: int,
    round_: int,
    folder: Path,
) -> Batch:
    shop_url, shop_pid = shop_api
    with database(args.admin_url) as dsn, redis_server() as queue:
        checkout = Checkout(folder, shop_url, dsn, queue)
        checkout.migrate()
        profile = folder / f"profile-{part}-{workers}-{round_}"
        projector = not args.without_worker_projector
        started = [
            checkout.worker(args.concurrency, 30, projector=projector) for _ in range(workers)
        ]
        spies = [spy(w, profile / f"worker{i}.txt") for i, w in enumerate(started) if args.profile]
        try:
            wait_for(lambda: readers(queue) == workers, f"{workers} workers to join")
            load = list(os.getloadavg())
            meter = PostgresMeter(args.admin_url, dsn.rsplit("/", 1)[1]).__enter__()
            shop_before, ticks_before = cpu_of(shop_pid), machine_ticks()
            begin = time.perf_counter()
            submit_args = ["run", CHAIN.name, "--data", f"users-{args.rows}.csv", "-q"]
            submitter = checkout.start(*submit_args, "--queue", queue)
            if args.profile:
                spies.append(spy(submitter, profile / "submitter.txt"))
            submitter_cpu = waited(submitter, f"the submitter (logs in {folder})")
            seconds = time.perf_counter() - begin
            shop_cpu = cpu_of(shop_pid) - shop_before
            busy, total = (
                now - then for now, then in zip(machine_ticks(), ticks_before, strict=True)
            )
            meter.__exit__()
        finally:
            for worker in started:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
        worker_cpu = [waited(worker, "a worker") for worker in started]
        for recorder in spies:
            recorder.wait(timeout=60)
        check_batch(dsn, args.rows, CHAIN_TESTS)
        return Batch(
            part,
            workers,
            round_,
            args.rows,
            seconds,
            span(dsn),
            submitter_cpu,
            worker_cpu,
            load,
            meter.seconds(),
            shop_cpu,
            busy / total,
        )


def spy(process: subprocess.Popen[bytes], path: Path) -> subprocess.Popen[bytes]:
    """py-spy record of a running process until it exits: raw stacks (flamegraph.pl,
    speedscope), idle frames included, so waits show too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args = ["record", "--idle", "-r", "200", "-f", "raw", "-o", str(path)]
    command = [py_spy, *args, "--pid", str(process.pid)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def resumed(
    args: argparse.Namespace,
    shop_api: tuple[str, int],
    claim_after: float,
    round_: int,
    folder: Path,
) -> Resumed:
    shop_url = shop_api[0]
    with database(args.admin_url) as dsn, redis_server() as queue:
        checkout = Checkout(folder, shop_url, dsn, queue)
        checkout.migrate()
        doomed = checkout.worker(1, claim_after)
        wait_for(lambda: readers(queue) == 1, "the first worker to join")
        submitter = checkout.start("run", SLOW_CHAIN.name, "-q", "--queue", queue)
        waiting = "SELECT version FROM events WHERE type = 'RequestSent' AND data->>'test' = 'wait'"
        wait_for(lambda: bool(query(dsn, waiting)), "the slow request to be sent")
        heir = checkout.worker(1, claim_after)
        wait_for(lambda: checkout.says(heir, "takes jobs"), "the second worker to start")
        time.sleep(0.5)  # its first XREADGROUP
        [(stream, version)] = [
            tuple(r)
            for r in query(
                dsn, "SELECT stream, max(version) FROM events WHERE stream LIKE 'run-%' GROUP BY 1"
            )
        ]
        killed = time.time()
        doomed.kill()
        doomed.wait()
        later = "SELECT type, extract(epoch FROM recorded_at) FROM events"
        later += " WHERE stream = $1 AND version > $2 ORDER BY version LIMIT 1"
        found: list[Any] = []

        def seen() -> bool:
            found[:] = query(dsn, later, stream, version)
            return bool(found)

        wait_for(seen, "the killed worker's job to be resumed", within=claim_after * 3 + 30)
        seen_at = time.time()
        waited(submitter, f"the submitter (logs in {folder})")
        heir.send_signal(signal.SIGTERM)
        waited(heir, "the second worker")
        check_batch_resumed(dsn)
        [(event, at)] = found
        return Resumed(claim_after, round_, float(at) - killed, seen_at - killed, event)


def check_batch_resumed(dsn: str) -> None:
    """The killed run ended once; login not sent again; the wait sent twice."""
    sent = query(
        dsn,
        "SELECT data->>'test', count(*) FROM events WHERE type = 'RequestSent' GROUP BY 1",
    )
    ended = query(dsn, "SELECT count(*) FROM events WHERE type = 'RunCompleted'")
    if dict(map(tuple, sent)) != {"login": 1, "wait": 2, "profile": 1} or ended[0][0] != 1:
        raise SystemExit(f"the resumed run did not end as expected: {sent}, {ended}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(batches: list[Batch], resumes: list[Resumed]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for part in sorted({b.part for b in batches}):
        rows: dict[str, Any] = {}
        by_workers: dict[int, list[Batch]] = {}
        for b in batches:
            if b.part == part:
                by_workers.setdefault(b.workers, []).append(b)
        base = by_workers.get(1)
        for workers, samples in sorted(by_workers.items()):
            seconds = median([s.seconds for s in samples])
            span_s = median([s.span_seconds for s in samples])
            throughput = samples[0].rows / seconds
            span_throughput = samples[0].rows / span_s
            row: dict[str, Any] = {
                "samples": len(samples),
                "seconds": seconds,
                "seconds_min_max": [
                    min(s.seconds for s in samples),
                    max(s.seconds for s in samples),
                ],
                "span_seconds": span_s,
                "chains_per_second": throughput,
                "span_chains_per_second": span_throughput,
                "submitter_cpu": median([s.submitter_cpu for s in samples]),
                "workers_cpu": median([sum(s.worker_cpu) for s in samples]),
                "postgres_cpu": median([s.postgres_cpu for s in samples]),
                "shop_cpu": median([s.shop_cpu for s in samples]),
                "machine_busy": median([s.machine_busy for s in samples]),
            }
            if base:
                base_seconds = median([s.seconds for s in base])
                base_span = median([s.span_seconds for s in base])
                row["efficiency"] = throughput / (workers * base[0].rows / base_seconds)
                row["span_efficiency"] = span_throughput / (workers * base[0].rows / base_span)
            rows[str(workers)] = row
        summary[part] = rows
    by_claim: dict[float, list[Resumed]] = {}
    for r in resumes:
        by_claim.setdefault(r.claim_after, []).append(r)
    summary["resume"] = {
        f"{claim:g}": {
            "samples": len(samples),
            "seconds": median([s.seconds for s in samples]),
            "seconds_min_max": [min(s.seconds for s in samples), max(s.seconds for s in samples)],
            "events": sorted({s.event for s in samples}),
        }
        for claim, samples in sorted(by_claim.items())
    }
    return summary


def report(summary: dict[str, Any]) -> None:
    for part in ("io", "cpu"):
        if part not in summary:
            continue
        print(f"\n{part}: workers  median s  chains/s  efficiency  (log span s, chains/s, eff.)")
        for workers, row in summary[part].items():
            eff = row.get("efficiency", float("nan"))
            span_eff = row.get("span_efficiency", float("nan"))
            print(
                f"    {workers:>7}  {row['seconds']:8.2f}  {row['chains_per_second']:8.1f}"
                f"  {eff:10.2f}  ({row['span_seconds']:.2f}, {row['span_chains_per_second']:.1f},"
                f" {span_eff:.2f})"
            )
    for claim, row in summary.get("resume", {}).items():
        low, high = row["seconds_min_max"]
        print(
            f"resume, --claim-after {claim}: {row['seconds']:.2f} s median ({low:.2f}-{high:.2f}),"
            f" first event {', '.join(row['events'])}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="chains per batch")
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--concurrency", type=int, default=8, help="each worker's --concurrency")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the io part's wait")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each part")
    parser.add_argument("--parts", default="io,cpu,resume")
    parser.add_argument("--claim-after", default="2,6", help="the resume part's values (s)")
    parser.add_argument("--kills", type=int, default=3, help="resume samples per --claim-after")
    parser.add_argument("--profile", action="store_true", help="py-spy every process (raw)")
    parser.add_argument(
        "--without-worker-projector",
        action="store_true",
        help="measurement only: workers whose read-table projector does nothing",
    )
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--output", type=Path, default=None, help="the results' JSON file")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    parts = args.parts.split(",")
    claims = [float(c) for c in args.claim_after.split(",")]

    started_at = datetime.now(UTC)
    batches: list[Batch] = []
    resumes: list[Resumed] = []
    with tempfile.TemporaryDirectory(prefix="baton-wbench-") as scratch:
        folder = Path(scratch)
        shutil.copy(CHAIN, folder)
        shutil.copy(SLOW_CHAIN, folder)
        users(folder, args.rows)
        for part in ("io", "cpu"):
            if part not in parts:
                continue
            with shop(args.latency_ms if part == "io" else 0.0) as url:
                for round_ in range(args.repeat):
                    shift = round_ % len(counts)
                    for workers in counts[shift:] + counts[:shift]:
                        sample = batch(args, part, url, workers, round_, folder)
                        batches.append(sample)
                        print(
                            f"{part} round {round_} workers {workers}: {sample.seconds:.2f} s"
                            f" (log span {sample.span_seconds:.2f} s), load {sample.load[0]:.2f},"
                            f" CPU s: workers {sum(sample.worker_cpu):.1f}, submitter"
                            f" {sample.submitter_cpu:.1f}, PostgreSQL {sample.postgres_cpu:.1f},"
                            f" shop {sample.shop_cpu:.1f}; cores {sample.machine_busy:.0%} busy",
                            flush=True,
                        )
        if "resume" in parts:
            with shop(0.0) as url:
                for round_ in range(args.kills):
                    for claim in claims:
                        sample_r = resumed(args, url, claim, round_, folder)
                        resumes.append(sample_r)
                        print(
                            f"resume round {round_} --claim-after {claim:g}:"
                            f" {sample_r.seconds:.2f} s ({sample_r.event})",
                            flush=True,
                        )
        if args.profile:
            kept = BENCH / "profiles" / f"workers-{started_at:%Y-%m-%dT%H%M%S}"
            for found in folder.glob("profile-*"):
                shutil.copytree(found, kept / found.name)
            print(f"profiles in {kept}")
    summary = summarize(batches, resumes)
    report(summary)
    result = {
        "started": started_at.isoformat(),
        "ended": datetime.now(UTC).isoformat(),
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("output", "admin_url")},
            "chain": CHAIN.name,
            "chain_tests": CHAIN_TESTS,
            "slow_ms": SLOW_MS,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": _cpu_model(),
        },
        "commit": _commit(),
        "batches": [msgspec.to_builtins(b) for b in batches],
        "resumes": [msgspec.to_builtins(r) for r in resumes],
        "summary": summary,
    }
    output = args.output or BENCH / "results" / f"workers-{started_at:%Y-%m-%dT%H%M%S}.json"
    output.write_bytes(msgspec.json.format(msgspec.json.encode(result)) + b"\n")
    print(f"results in {output}")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _commit() -> str:
    found = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return found.stdout.strip()


if __name__ == "__main__":
    main()
