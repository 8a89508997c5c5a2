"""Context reads through the API: p50/p95/p99 of GET /api/v1/runs/{id}/context under load.

A private database on the PostgreSQL server (created, dropped at the end); the service
(``context_service`` under uvicorn, one process, with its projector, started as
``fanout_bench.py --serve`` starts it) with the Redis context cache (``BATON_REDIS_URL``)
and then without it (the in-process cache); a key of organization ``bench``; one real run
started through the API against the demo shop (``examples/shop/checkout.yaml``, 10 tests),
waited for until it ended. Then, for each of ``--rates``, ``--clients`` concurrent clients
(aiohttp, one connection each, in this process, not the service's) read the run's context
for ``--seconds``: at rate 0 back to back (closed loop: the service's saturation, where
latency is queueing, clients / throughput), else together that many reads/s on a fixed
schedule (open loop). A warm-up read first fills the cache. Every answer must be 200 and
byte-identical to the first one. Then one client alone for ``--single-seconds``: the
latency without queueing.

Latency, as the client sees it (perf_counter): closed loop, send to body read; open loop,
from the moment the read was due to body read (a read delayed behind a slow one counts
its wait). Requests/s over the whole window. CPU: user + system of the service process
and of this one.

    python bench/api_bench.py [--clients 20] [--seconds 10] [--rates 0 500 1000 1500]
        [--repeat 1] [--pg DSN] [--redis redis://127.0.0.1:6379/0]
        [--backend redis|memory ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import aiohttp  # noqa: E402
import httpx  # noqa: E402
from aiohttp import web  # noqa: E402
from fanout_bench import (  # noqa: E402
    ROOT,
    cpu_seconds,
    create_bench_database,
    drop_bench_database,
    free_port,
    percentile,
    wait_healthy,
)

from examples.shop.server import serve as serve_shop  # noqa: E402

PG_ADMIN = os.environ.get("BATON_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("BATON_TEST_REDIS", "redis://127.0.0.1:6379/0")
CHECKOUT = (ROOT / "examples" / "shop" / "checkout.yaml").read_text()


async def ok(http: httpx.AsyncClient, method: str, url: str, status: int, **kw: Any) -> Any:
    response = await http.request(method, url, **kw)
    if response.status_code != status:
        raise SystemExit(f"{method} {url}: {response.status_code} {response.text}")
    return response.json()


async def finished_run(http: httpx.AsyncClient, shop_url: str) -> str:
    """A checkout run started through the API against the shop, once it ended: its id."""
    project = await ok(http, "POST", "/api/v1/projects", 201, json={"name": "bench"})
    variables = [
        {"name": "SHOP_URL", "value": shop_url},
        {"name": "SHOP_PASSWORD", "value": "secret-alice", "secret": True},
    ]
    environment = await ok(
        http,
        "POST",
        "/api/v1/environments",
        201,
        json={"project_id": project["id"], "name": "local", "variables": variables},
    )
    suite = await ok(
        http, "POST", "/api/v1/suites", 201, json={"project_id": project["id"], "content": CHECKOUT}
    )
    body = {"suite_id": suite["id"], "environment_id": environment["id"]}
    run = await ok(http, "POST", "/api/v1/runs", 202, json=body)
    for _ in range(600):
        run = await ok(http, "GET", f"/api/v1/runs/{run['id']}", 200)
        if run["status"] not in ("queued", "running"):
            break
        await asyncio.sleep(0.1)
    if run["status"] != "passed":
        raise SystemExit(f"the bench run did not pass: {run}")
    return str(run["id"])


async def load(
    url: str, key: str, clients: int, seconds: float, rate: float | None = None
) -> dict[str, Any]:
    """``clients`` readers of ``url`` for ``seconds``: back to back (``rate`` None: closed
    loop, the service's saturation), or together ``rate`` reads/s on a fixed schedule (open
    loop). Open-loop latency counts from the moment a read was due, not from when it was
    sent, so a read held up behind a slow one counts its wait (no coordinated omission)."""
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
        async with http.get(url) as response:  # warm-up: the cache holds the context after
            assert response.status == 200, response.status
            expected = await response.read()
        latencies: list[float] = []
        bad_status: dict[int, int] = {}
        different = 0
        # the client's own collector pauses are not the service's latency (see app.py)
        gc.collect()
        gc.freeze()
        began = time.perf_counter() + 0.05
        deadline = began + seconds

        async def read(due: float) -> None:
            nonlocal different
            async with http.get(url) as response:
                body = await response.read()
            latencies.append((time.perf_counter() - due) * 1000)
            if response.status != 200:
                bad_status[response.status] = bad_status.get(response.status, 0) + 1
            elif body != expected:
                different += 1

        async def closed_loop() -> None:
            await asyncio.sleep(began - time.perf_counter())
            while (now := time.perf_counter()) < deadline:
                await read(now)

        async def open_loop(client: int) -> None:
            assert rate is not None
            interval = clients / rate  # each client's reads are this far apart, staggered
            due = began + client * interval / clients
            while due < deadline:
                await asyncio.sleep(due - time.perf_counter())
                await read(due)
                due += interval

        await asyncio.gather(
            *(closed_loop() if rate is None else open_loop(i) for i in range(clients))
        )
        elapsed = time.perf_counter() - began
    return {
        "offered_per_s": rate,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": {
            q: round(percentile(latencies, p), 2)
            for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
        }
        | {"max": round(max(latencies), 2)},
        "non_200": bad_status,
        "different_bodies": different,
        "body_bytes": len(expected),
        "elapsed_s": round(elapsed, 2),
    }


async def one_backend(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    from context_service.keys import create_key

    settings, env = await create_bench_database(args.pg)
    env.pop("BATON_REDIS_URL", None)
    if backend == "redis":
        env["BATON_REDIS_URL"] = args.redis
    port = free_port()
    service = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH / "fanout_bench.py"), "--serve", str(port), env=env, cwd=ROOT
    )
    runner, shop_url = await serve_shop("127.0.0.1", 0)
    shop: web.AppRunner | None = runner
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_healthy(base)
        key = await create_key(
            settings, organization="bench", scopes=["read", "run", "admin"], name="bench"
        )
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as http:
            run_id = await finished_run(http, shop_url)
            health = await ok(http, "GET", "/health", 200)
        await runner.cleanup()
        shop = None
        await asyncio.sleep(1)  # let the projector's catch-up after the run settle
        url = f"{base}/api/v1/runs/{run_id}/context"
        redis = next(d for d in health["dependencies"] if d["name"] == "redis")
        result: dict[str, Any] = {"cache": redis["detail"], "loads": []}
        for rate in args.rates:
            cpu_before, own_before = cpu_seconds(service.pid), time.process_time()
            load_before = os.getloadavg()[0]
            measured = await load(url, key, args.clients, args.seconds, rate or None)
            elapsed = measured["elapsed_s"]
            service_cpu = cpu_seconds(service.pid) - cpu_before
            measured["service_cpu_percent"] = round(100 * service_cpu / elapsed, 1)
            measured["service_cpu_ms_per_read"] = round(
                1000 * service_cpu / measured["requests"], 3
            )
            measured["client_cpu_percent"] = round(
                100 * (time.process_time() - own_before) / elapsed, 1
            )
            measured["load_average_1m"] = round(max(load_before, os.getloadavg()[0]), 2)
            measured["p99_under_10ms"] = "PASS" if measured["latency_ms"]["p99"] < 10 else "MISS"
            print(json.dumps({"backend": backend, **measured}), flush=True)
            result["loads"].append(measured)
        # one client alone: the service's own latency, without queueing behind 19 others
        single = await load(url, key, 1, args.single_seconds)
        result["one_client"] = {k: single[k] for k in ("requests_per_s", "latency_ms")}
    finally:
        if shop is not None:
            await shop.cleanup()
        service.send_signal(signal.SIGINT)
        await service.wait()
        await drop_bench_database(args.pg, settings)
    return {"backend": backend, "clients": args.clients, **result}


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for _ in range(args.repeat):
        for backend in args.backend:
            results.append(await one_backend(args, backend))
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10, help="per load")
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[0, 500, 1000, 1500],
        help="reads/s offered by the clients together, one load each; 0: back to back",
    )
    parser.add_argument("--single-seconds", type=float, default=3, help="1-client baseline")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the backends")
    parser.add_argument("--pg", default=PG_ADMIN)
    parser.add_argument("--redis", default=REDIS)
    parser.add_argument(
        "--backend", nargs="+", choices=["redis", "memory"], default=["redis", "memory"]
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = asyncio.run(main(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    cli()
