"""Realtime fan-out: commit-to-subscriber latency of the run streams (SSE) under load.

A private database on the PostgreSQL server (created, dropped at the end), one or more
service instances (``context_service`` under uvicorn, each its own process), and SSE
subscribers in subscriber processes (aiohttp), each following one run's stream through one
of the instances. The appender (this process) appends events shaped like a real run's
(TestStarted, RequestSent, ResponseReceived with a ~300-byte body excerpt,
AssertionEvaluated, TestPassed) round-robin into the runs at a fixed rate, one event per
append (one transaction and one notice each: the doorbell's worst case), or ``--batch``
events per append as the runner's writer does.

Latency = the time a subscriber reads the message's ``id:`` line minus the time the append
that wrote that position returned (commit is before that return, so this is a slight
under-estimate of commit-to-subscriber: by one round trip's tail, ~0.1 ms). Clocks:
CLOCK_MONOTONIC, one clock for every process of the machine. Every subscriber's positions
are checked against its run's whole stream: lost, repeated and out-of-order counts.

    python bench/fanout_bench.py [--subscribers 100] [--rate 500] [--seconds 20] [--runs 10]
        [--instances 1] [--procs 2] [--batch 1] [--pg DSN] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import httpx  # noqa: E402

from events import types as ev  # noqa: E402
from events.postgres import PostgresEventStore  # noqa: E402
from events.projections import project  # noqa: E402
from events.settings import Settings  # noqa: E402
from events.store import NewEvent, StreamAppend  # noqa: E402

PG_ADMIN = os.environ.get("BATON_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
BODY = json.dumps({"items": [{"id": i, "name": f"book {i}", "price": 12.5} for i in range(8)]})


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# ---- a service instance (a process of its own) ---------------------------------------------


def serve(port: int, projector: bool) -> None:
    """The service on ``port``; without its projector for ``--no-projector`` (the bench
    then projects the runs' RunStarted itself: the runs must be in the read tables)."""
    import uvicorn
    import uvloop

    from context_service.app import create_app
    from context_service.server import UVICORN_OPTIONS
    from context_service.services import Services

    settings = Settings.from_env()

    async def run() -> None:
        services = await Services.open(settings)
        if not projector and services._projector_task is not None:
            services._projector_task.cancel()
        app = create_app(settings, services=services)
        config = uvicorn.Config(
            app, port=port, log_level="warning", access_log=False, **UVICORN_OPTIONS
        )
        try:
            await uvicorn.Server(config).serve()
        finally:
            await services.aclose()

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run())  # the loop uvicorn.run would choose for `baton serve`


# ---- subscribers (a process of their own) --------------------------------------------------


async def subscribe(spec: dict[str, Any]) -> None:
    """Follow each (base URL, run) of ``spec`` from its start; print ``ready`` once every
    subscriber has its RunStarted, then, when every run ended, what each received."""
    received: list[list[tuple[int, float]]] = [[] for _ in spec["subscribers"]]
    started = [asyncio.Event() for _ in spec["subscribers"]]
    headers = {"Authorization": f"Bearer {spec['key']}", "Accept": "text/event-stream"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as http:

        async def one(index: int, base: str, run_id: str) -> None:
            got = received[index]
            async with http.get(f"{base}/api/v1/runs/{run_id}/stream") as response:
                assert response.status == 200, response.status
                rest = b""
                # whole chunks, split here: a line-by-line reader costs the subscriber
                # processes more CPU than the service spends, on a machine they share
                async for chunk in response.content.iter_any():
                    at = now()
                    *messages, rest = (rest + chunk).split(b"\n\n")
                    for message in messages:
                        if message.startswith(b"id: "):
                            head, kind, _data = message.split(b"\n", 2)
                            got.append((int(head[4:]), at))
                            if kind == b"event: RunStarted":
                                started[index].set()
                            elif kind == b"event: RunCompleted":
                                return

        tasks = [
            asyncio.create_task(one(i, base, run))
            for i, (base, run) in enumerate(spec["subscribers"])
        ]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 60)
        print("ready", flush=True)
        await asyncio.gather(*tasks)
    print(json.dumps({"received": received}), flush=True)


# ---- the benchmark -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shaped(test: str, step: int) -> ev.Event:
    """The ``step``-th event of a test, as a real run writes them."""
    match step % 5:
        case 0:
            return ev.TestStarted(test)
        case 1:
            return ev.RequestSent(test, 1, "GET", "http://127.0.0.1:8765/catalog", {"a": "b"})
        case 2:
            headers = {"content-type": "application/json"}
            return ev.ResponseReceived(test, 1, 200, headers, BODY[:300], ev.Timings(12.5))
        case 3:
            return ev.AssertionEvaluated(test, 1, "status", "equals", 200, 200, True)
        case _:
            return ev.TestPassed(test, 1, 12.5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def wait_healthy(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            try:
                if (await client.get(f"{url}/health")).status_code in (200, 503):
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"the service at {url} did not start")


async def known(client: httpx.AsyncClient, url: str) -> None:
    for _ in range(300):
        if (await client.get(url)).status_code == 200:
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"{url} is still unknown to the service")


async def append_load(
    store: PostgresEventStore, runs: list[str], rate: int, seconds: float, batch: int
) -> tuple[dict[int, float], dict[str, list[int]]]:
    """Append ``rate`` events/s for ``seconds``; the return time of each position."""
    committed: dict[int, float] = {}
    positions: dict[str, list[int]] = {run: [] for run in runs}
    gate = asyncio.Semaphore(8)
    pending: set[asyncio.Task[None]] = set()

    async def one(run: str, events: list[ev.Event]) -> None:
        try:
            written = await store.append(
                [StreamAppend(ev.run_stream(run), [NewEvent(e) for e in events])]
            )
            at = now()
            for position in written[0]:
                committed[position] = at
            positions[run].extend(written[0])
        finally:
            gate.release()

    total = int(rate * seconds) // batch
    start = now()
    for i in range(total):
        delay = start + i * batch / rate - now()
        if delay > 0:
            await asyncio.sleep(delay)
        run = runs[i % len(runs)]
        step = i // len(runs)
        events = [shaped(f"t{(step * batch + k) // 5}", step * batch + k) for k in range(batch)]
        await gate.acquire()
        task = asyncio.create_task(one(run, events))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    for run in runs:  # positions of one run are in order: each append waited for its gate
        positions[run].sort()
    return committed, positions


async def create_bench_database(pg: str) -> tuple[Settings, dict[str, str]]:
    """A database of its own on the server at ``pg`` (the admin DSN), a BATON_HOME and a
    secret key: the settings, and the environment a service process needs for them."""
    name = f"baton_bench_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = pg.rsplit("/", 1)[0] + f"/{name}"
    home = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    env = {**os.environ, "BATON_DATABASE_URL": dsn, "BATON_HOME": str(home)}
    env["BATON_SECRET_KEY"] = key
    env["BATON_ALLOWED_TARGETS"] = "127.0.0.1"  # its runs go to the demo shop on loopback
    settings = Settings(database_url=dsn, home=home, secret_key=key, allowed_targets="127.0.0.1")
    return settings, env


async def drop_bench_database(pg: str, settings: Settings) -> None:
    """Undo ``create_bench_database``."""
    assert settings.database_url is not None
    name = settings.database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()
    shutil.rmtree(settings.home, ignore_errors=True)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from context_service.keys import create_key

    settings, env = await create_bench_database(args.pg)
    services: list[asyncio.subprocess.Process] = []
    store = await PostgresEventStore.connect(env["BATON_DATABASE_URL"], max_size=10)
    try:
        api_key = await create_key(settings, organization="bench", scopes=["read"], name="b")
        ports = [free_port() for _ in range(args.instances)]
        projector = ["--no-projector"] if args.no_projector else []
        for port in ports:
            services.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--serve", str(port), *projector, env=env, cwd=ROOT
                )
            )
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url in urls:
            await wait_healthy(url)
        org = await store.pool.fetchval("SELECT id FROM organizations WHERE slug = 'bench'")
        runs = [str(uuid.uuid4()) for _ in range(args.runs)]
        for run in runs:
            plan = [ev.PlannedTest("t0")]
            started = ev.RunStarted(run, "bench", "-", plan, organization=str(org), project="b")
            await store.append([StreamAppend(ev.run_stream(run), [NewEvent(started)])])
        if args.no_projector:
            await project(store)
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}) as client:
            for url in urls:  # until the projector filed the runs, so they are the org's
                for run in runs:
                    await known(client, f"{url}/api/v1/runs/{run}")
        followed = [(urls[i % len(urls)], runs[i % len(runs)]) for i in range(args.subscribers)]
        procs = []
        for p in range(args.procs):
            spec = {"key": api_key, "subscribers": followed[p :: args.procs]}
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--subscribe",
                    json.dumps(spec),
                    cwd=ROOT,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        for proc in procs:
            assert proc.stdout is not None
            assert (await proc.stdout.readline()).strip() == b"ready"
        cpu_before = [cpu_seconds(s.pid) for s in services]
        clients_before = [cpu_seconds(p.pid) for p in procs]
        own_before = time.process_time()
        load = os.getloadavg()[0]
        began = now()
        committed, positions = await append_load(store, runs, args.rate, args.seconds, args.batch)
        elapsed = now() - began
        cpu = [cpu_seconds(s.pid) - b for s, b in zip(services, cpu_before, strict=True)]
        load = max(load, os.getloadavg()[0])
        clients = sum(cpu_seconds(p.pid) for p in procs) - sum(clients_before)
        own = time.process_time() - own_before
        for run in runs:
            done = ev.RunCompleted("passed", 1, 0, 0, 1.0)
            await store.append([StreamAppend(ev.run_stream(run), [NewEvent(done)])])
        outputs = [json.loads((await proc.communicate())[0]) for proc in procs]
        full = {
            run: [r.position for r in await store.read_stream(ev.run_stream(run))] for run in runs
        }
    finally:
        await store.aclose()
        for service in services:
            service.send_signal(signal.SIGINT)
            await service.wait()
        await drop_bench_database(args.pg, settings)
    result = report(args, followed, outputs, full, committed, positions, elapsed, cpu)
    return {
        **result,
        "subscriber_processes_cpu_percent": round(100 * clients / elapsed, 1),
        "appender_cpu_percent": round(100 * own / elapsed, 1),
        "load_average_1m": round(load, 2),
        "cpus": os.cpu_count(),
    }


def report(
    args: argparse.Namespace,
    followed: list[tuple[str, str]],
    outputs: list[dict[str, Any]],
    full: dict[str, list[int]],
    committed: dict[int, float],
    positions: dict[str, list[int]],
    elapsed: float,
    cpu: list[float],
) -> dict[str, Any]:
    lost = repeated = disordered = 0
    latencies: list[float] = []
    for p, output in enumerate(outputs):
        for (_url, run), got in zip(followed[p :: args.procs], output["received"], strict=True):
            seen = [position for position, _ in got]
            lost += len(set(full[run]) - set(seen))
            repeated += len(seen) - len(set(seen))
            disordered += sum(1 for a, b in itertools.pairwise(seen) if b <= a)
            latencies += [(at - committed[pos]) * 1000 for pos, at in got if pos in committed]
    appended = sum(len(p) for p in positions.values())
    result = {
        "subscribers": args.subscribers,
        "instances": args.instances,
        "runs": args.runs,
        "batch": args.batch,
        "projector": not args.no_projector,
        "target_rate": args.rate,
        "appended": appended,
        "achieved_rate": round(appended / elapsed, 1),
        "deliveries": len(latencies),
        "latency_ms": {
            "p50": round(percentile(latencies, 50), 2),
            "p95": round(percentile(latencies, 95), 2),
            "p99": round(percentile(latencies, 99), 2),
            "max": round(max(latencies), 2),
        },
        "lost": lost,
        "repeated": repeated,
        "out_of_order": disordered,
        "service_cpu_percent": [round(100 * c / elapsed, 1) for c in cpu],
    }
    return result


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=int, default=500, help="events per second")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--procs", type=int, default=2, help="subscriber processes")
    parser.add_argument("--batch", type=int, default=1, help="events per append")
    parser.add_argument("--pg", default=PG_ADMIN)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--no-projector", action="store_true", help="ablation: services without their projector"
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--subscribe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, projector=not args.no_projector)
        return
    if args.subscribe:
        asyncio.run(subscribe(json.loads(args.subscribe)))
        return
    result = asyncio.run(main(args))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    cli()
