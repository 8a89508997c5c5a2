"""The benchmark harness: Baton against hand-written httpx and aiohttp clients, whole process.

    python bench/run.py [--repeat 5] [--concurrency 50] [--workloads 50,500]

Starts the demo API once, then for each workload (chains of six dependent requests, one per
user) runs every contender as a separate process ``--repeat`` times, the contenders of a
round one after the other in an order that rotates from round to round, so that they share
the machine's noise. Each sample is the wall time of the whole process (start-up and exit
included) and its peak RSS from wait4(). Prints the medians and the target ratios, and
writes everything to bench/results/<date>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CHAIN = BENCH / "chain.yaml"
STEPS = 6
CONTENDERS = ("baton-pg", "baton-embedded", "httpx", "aiohttp")
TARGETS: list[tuple[str, str, str, int, float]] = [
    # (what, numerator, denominator, chains, at most) -- chains 0: the numerator's own 50
    ("time", "baton-pg", "httpx", 500, 1.0),
    ("time", "baton-embedded", "httpx", 500, 1.0),
    ("time", "baton-pg", "aiohttp", 500, 2.5),
    ("time", "baton-embedded", "aiohttp", 500, 2.5),
    ("time", "baton-pg", "httpx", 50, 1.5),
    ("time", "baton-embedded", "httpx", 50, 2.0),
    ("rss", "baton-pg", "httpx", 50, 2.5),
    ("rss", "baton-pg", "httpx", 500, 2.5),
    ("rss", "baton-embedded", "httpx", 50, 2.5),
    ("rss", "baton-embedded", "httpx", 500, 2.5),
    ("rss", "baton-pg", "baton-pg", 500, 1.5),
    ("rss", "baton-embedded", "baton-embedded", 500, 1.5),
]


class Sample(msgspec.Struct):
    contender: str
    chains: int
    round: int
    seconds: float
    cpu_seconds: float
    peak_rss_kb: int


def users_file(chains: int) -> Path:
    path = BENCH / f"users-{chains}.csv"
    if not path.exists():
        rows = [f"user{i:03d},pw-user{i:03d}" for i in range(1, chains + 1)]
        path.write_text("username,password\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def measure(command: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user and system) and peak RSS (KiB) of one process, which
    must exit 0. Its children count once it has waited for them (pg_ctl; not the embedded
    server, which runs detached)."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errors
        )
        # wait4, not getrusage(RUSAGE_CHILDREN): that one is the maximum over every child so far
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            text = errors.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{' '.join(command)} exited {process.returncode}:\n{text}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


@contextlib.contextmanager
def shop_api() -> Iterator[str]:
    server = [sys.executable, str(ROOT / "examples/shop/server.py"), "--port", "0"]
    process = subprocess.Popen(server, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if " on " not in line:
            raise SystemExit(f"the demo API did not start: {line!r}")
        yield line.rsplit(" on ", 1)[1]
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new database on the PostgreSQL server of ``admin_url``, dropped afterwards."""
    import asyncpg

    name = f"baton_bench_{os.getpid()}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f"CREATE DATABASE {name}"))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def commands(url: str, concurrency: int, db_url: str, homes: dict[str, Path]) -> dict[str, Any]:
    """For each contender, a function of the users file giving (command, environment)."""
    baton = str(Path(sys.executable).with_name("baton"))
    # bytecode is cached as after a normal install: the warm-up round writes it
    dropped = ("BATON_", "PYTHONDONTWRITEBYTECODE")
    base = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    base["SHOP_URL"] = url
    pg_env = {**base, "BATON_DATABASE_URL": db_url, "BATON_HOME": str(homes["baton-pg"])}
    embedded_env = {**base, "BATON_HOME": str(homes["baton-embedded"])}

    def baton_run(env: dict[str, str]) -> Any:
        def build(users: Path) -> tuple[list[str], dict[str, str]]:
            args = ["run", str(CHAIN), "--data", str(users), "--concurrency", str(concurrency)]
            return [baton, *args, "-q"], env

        return build

    def plain(script: str) -> Any:
        def build(users: Path) -> tuple[list[str], dict[str, str]]:
            return [sys.executable, str(BENCH / script), url, str(users), str(concurrency)], base

        return build

    return {
        "baton-pg": baton_run(pg_env),
        "baton-embedded": baton_run(embedded_env),
        "httpx": plain("plain_httpx.py"),
        "aiohttp": plain("plain_aiohttp.py"),
    }


def summarize(samples: list[Sample], workloads: list[int]) -> dict[str, Any]:
    medians: dict[str, dict[str, Any]] = {}
    for chains in workloads:
        for contender in CONTENDERS:
            mine = [s for s in samples if s.contender == contender and s.chains == chains]
            if not mine:
                continue
            seconds = [s.seconds for s in mine]
            medians[f"{contender}/{chains}"] = {
                "contender": contender,
                "chains": chains,
                "requests": chains * STEPS,
                "seconds": statistics.median(seconds),
                "min_seconds": min(seconds),
                "max_seconds": max(seconds),
                "ms_per_request": statistics.median(seconds) * 1000 / (chains * STEPS),
                "cpu_seconds": statistics.median(s.cpu_seconds for s in mine),
                "peak_rss_mb": statistics.median(s.peak_rss_kb for s in mine) / 1024,
            }
    ratios = []
    for what, top, bottom, chains, limit in TARGETS:
        below = chains if top != bottom else min(workloads)
        a, b = medians.get(f"{top}/{chains}"), medians.get(f"{bottom}/{below}")
        if a is None or b is None or a is b:
            continue
        key = "seconds" if what == "time" else "peak_rss_mb"
        ratio = a[key] / b[key]
        # CPU time suffers less from other work on a shared machine than wall time does
        cpu = a["cpu_seconds"] / b["cpu_seconds"] if what == "time" else None
        ratios.append(
            {
                "what": what,
                "numerator": f"{top}/{chains}",
                "denominator": f"{bottom}/{below}",
                "ratio": round(ratio, 3),
                "cpu_ratio": round(cpu, 3) if cpu is not None else None,
                "at_most": limit,
                "verdict": "PASS" if ratio <= limit else "MISS",
            }
        )
    return {"medians": medians, "ratios": ratios}


def print_report(summary: dict[str, Any]) -> None:
    print(
        "\n| contender | chains | requests | median s (min-max) | ms/request | CPU s "
        "| peak RSS MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in summary["medians"].values():
        print(
            f"| {row['contender']} | {row['chains']} | {row['requests']} "
            f"| {row['seconds']:.3f} ({row['min_seconds']:.3f}-{row['max_seconds']:.3f}) "
            f"| {row['ms_per_request']:.3f} | {row['cpu_seconds']:.2f} | {row['peak_rss_mb']:.1f} |"
        )
    print("\n| target | ratio | at most | verdict | CPU time ratio |")
    print("|---|---:|---:|---|---:|")
    for r in summary["ratios"]:
        label = f"{r['what']}: {r['numerator']} / {r['denominator']}"
        cpu = f"{r['cpu_ratio']:.2f}x" if r["cpu_ratio"] is not None else ""
        print(f"| {label} | {r['ratio']:.2f}x | {r['at_most']}x | {r['verdict']} | {cpu} |")


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    packages = ("httpx", "httpx-aiohttp", "aiohttp", "asyncpg", "jinja2", "msgspec")
    versions = {}
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    # other work in progress in the checkout is measured too: say so
    dirty = git("status", "--porcelain", "--", "events", "orchestrator").strip()
    commit = git("rev-parse", "--short", "HEAD").strip() + ("-dirty" if dirty else "")
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "commit": commit,
        # taken before the first run: well above 0 means other work shared the machine
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each (default 5)")
    parser.add_argument("--concurrency", type=int, default=50, help="requests in flight")
    parser.add_argument("--workloads", default="50,500", help="chains per workload")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--admin-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server on which a fresh database is created, then dropped",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    options = parser.parse_args()
    workloads = [int(n) for n in options.workloads.split(",")]
    contenders = [c for c in options.contenders.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")

    before = machine()
    samples: list[Sample] = []
    scratch = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    homes = {"baton-pg": scratch / "home-pg", "baton-embedded": scratch / "home-embedded"}
    try:
        with shop_api() as url, fresh_database(options.admin_url) as db_url:
            build = commands(url, options.concurrency, db_url, homes)
            # an untimed round: initdb of the embedded cluster, schema.sql, secret keys,
            # bytecode and page caches; none of it is counted
            start = time.perf_counter()
            for name in contenders:
                measure(*build[name](users_file(min(workloads))))
            print(f"warm-up round (embedded initdb included): {time.perf_counter() - start:.1f} s")
            for round_ in range(options.repeat):
                order = (
                    contenders[round_ % len(contenders) :] + contenders[: round_ % len(contenders)]
                )
                for chains in workloads:
                    for name in order:
                        seconds, cpu, rss = measure(*build[name](users_file(chains)))
                        samples.append(Sample(name, chains, round_, seconds, cpu, rss))
                        print(
                            f"round {round_ + 1} {name:>15} {chains:>4} chains: {seconds:.3f} s, "
                            f"CPU {cpu:.2f} s, {rss / 1024:.1f} MB",
                            flush=True,
                        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    summary = summarize(samples, workloads)
    print_report(summary)
    when = datetime.now(UTC)
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / f"{when:%Y-%m-%dT%H%M%S}.json"
    record = {
        "date": when.isoformat(timespec="seconds"),
        "config": {
            "repeat": options.repeat,
            "concurrency": options.concurrency,
            "workloads": workloads,
            "contenders": contenders,
        },
        "machine": before,
        **summary,
        "samples": [msgspec.to_builtins(s) for s in samples],
    }
    path.write_bytes(msgspec.json.format(msgspec.json.encode(record), indent=2) + b"\n")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
