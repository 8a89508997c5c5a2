"""The benchmark harness: Baton against its peers (httpx, aiohttp, Step CI), whole process.

    python bench/run.py [--repeat 5] [--concurrency 10] [--workloads 50,500] [--memory 5000]

Starts the demo API once, then for each workload (chains of six dependent requests, one per
user) runs every contender as a separate process ``--repeat`` times, the contenders of a
round one after the other in an order that rotates from round to round, so that they share
the machine's noise. Each sample is the wall time of the whole process (start-up and exit
included) and its peak RSS from wait4(). The ``--memory`` workload runs only Baton, for the
peak-memory target. Prints the medians and the target ratios, and writes everything to
bench/results/<date>.json. Step CI is installed with npm into ``--stepci-home`` (outside the
repository) the first time. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
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
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CHAIN = BENCH / "chain.yaml"
STEPCI_CHAIN = BENCH / "chain.stepci.yml"
STEPCI_VERSION = "2.8.2"
STEPS = 6
CONTENDERS = ("baton-pg", "baton-embedded", "httpx", "httpx-sequential", "aiohttp", "stepci")
BATON = ("baton-pg", "baton-embedded")
FASTER_HTTPX = "faster httpx"
"""A denominator: whichever of httpx and httpx-sequential has the lower median time."""
MEMORY = 0
"""A workload size in TARGETS standing for the ``--memory`` workload."""
TARGETS: list[tuple[str, str, int, str, int, float]] = [
    # (what, numerator, its chains, denominator, its chains, at most): the targets
    ("time", "baton-pg", 500, FASTER_HTTPX, 500, 1.0),
    ("time", "baton-embedded", 500, FASTER_HTTPX, 500, 1.0),
    ("time", "baton-pg", 500, "aiohttp", 500, 2.0),
    ("time", "baton-embedded", 500, "aiohttp", 500, 2.0),
    ("time", "baton-pg", 500, "stepci", 500, 0.5),
    ("time", "baton-embedded", 500, "stepci", 500, 0.5),
    ("time", "baton-pg", 50, FASTER_HTTPX, 50, 1.5),
    ("time", "baton-embedded", 50, FASTER_HTTPX, 50, 2.0),
    ("time", "baton-pg", 50, "stepci", 50, 0.5),
    ("time", "baton-embedded", 50, "stepci", 50, 0.5),
    ("rss", "baton-pg", MEMORY, "baton-pg", 500, 1.3),
    ("rss", "baton-embedded", MEMORY, "baton-embedded", 500, 1.3),
]


class Sample(msgspec.Struct):
    contender: str
    chains: int
    round: int
    seconds: float
    cpu_seconds: float
    peak_rss_kb: int


def users_file(chains: int) -> Path:
    """bench/users-N.csv, written if missing. The demo API takes ``pw-user001`` to
    ``pw-user999``; past 999 users, any name's ``secret-<name>`` (examples/shop/state.py)."""
    path = BENCH / f"users-{chains}.csv"
    if not path.exists():
        rows = [
            f"user{i:03d},pw-user{i:03d}" if i < 1000 else f"user{i},secret-user{i}"
            for i in range(1, chains + 1)
        ]
        path.write_text("username,password\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def install_stepci(home: Path) -> Path:
    """The ``stepci`` command of STEPCI_VERSION under ``home``, installed with npm if missing."""
    command = home / "node_modules" / ".bin" / "stepci"
    manifest = home / "node_modules" / "stepci" / "package.json"
    installed = (
        msgspec.json.decode(manifest.read_bytes()).get("version") if manifest.exists() else None
    )
    if installed != STEPCI_VERSION:
        if shutil.which("npm") is None:
            raise SystemExit("Step CI needs Node.js and npm (or --contenders without stepci)")
        home.mkdir(parents=True, exist_ok=True)
        print(f"installing stepci@{STEPCI_VERSION} into {home}", flush=True)
        install = ["npm", "install", "--prefix", str(home), "--no-audit", "--no-fund"]
        subprocess.run(
            [*install, f"stepci@{STEPCI_VERSION}"], check=True, stdout=subprocess.DEVNULL
        )
    return command


def stepci_workflow(users: Path, folder: Path) -> Path:
    """bench/chain.stepci.yml with one test per row of ``users``, the row in the test's env.
    Every test shares one list of steps, which YAML writes once and refers to by an alias,
    so the file stays small."""
    workflow = yaml.safe_load(STEPCI_CHAIN.read_text(encoding="utf-8"))
    steps = workflow["tests"]["chain"]["steps"]
    with users.open(newline="", encoding="utf-8") as rows:
        workflow["tests"] = {
            row["username"]: {"env": dict(row), "steps": steps} for row in csv.DictReader(rows)
        }
    path = folder / f"stepci-{users.stem}.yml"
    path.write_text(yaml.safe_dump(workflow, sort_keys=False), encoding="utf-8")
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


def commands(
    url: str, concurrency: int, db_url: str, scratch: Path, stepci: Path | None
) -> dict[str, Any]:
    """For each contender, a function of the users file giving (command, environment)."""
    baton = str(Path(sys.executable).with_name("baton"))
    # bytecode is cached as after a normal install: the warm-up round writes it
    dropped = ("BATON_", "PYTHONDONTWRITEBYTECODE")
    base = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    base["SHOP_URL"] = url
    pg_env = {**base, "BATON_DATABASE_URL": db_url, "BATON_HOME": str(scratch / "home-pg")}
    embedded_env = {**base, "BATON_HOME": str(scratch / "home-embedded")}
    # no usage report over the network (Step CI's own switch)
    stepci_env = {**base, "STEPCI_DISABLE_ANALYTICS": "1"}

    def baton_run(env: dict[str, str]) -> Any:
        def build(users: Path) -> tuple[list[str], dict[str, str]]:
            args = ["run", str(CHAIN), "--data", str(users), "--concurrency", str(concurrency)]
            return [baton, *args, "-q"], env

        return build

    def plain(script: str, limit: int) -> Any:
        def build(users: Path) -> tuple[list[str], dict[str, str]]:
            return [sys.executable, str(BENCH / script), url, str(users), str(limit)], base

        return build

    def stepci_run(users: Path) -> tuple[list[str], dict[str, str]]:
        assert stepci is not None
        workflow = stepci_workflow(users, scratch)
        args = ["run", str(workflow), "-e", f"SHOP_URL={url}", "--concurrency", str(concurrency)]
        return [str(stepci), *args], stepci_env

    return {
        "baton-pg": baton_run(pg_env),
        "baton-embedded": baton_run(embedded_env),
        "httpx": plain("plain_httpx.py", concurrency),
        "httpx-sequential": plain("plain_httpx.py", 1),
        "aiohttp": plain("plain_aiohttp.py", concurrency),
        "stepci": stepci_run,
    }


def summarize(samples: list[Sample], memory_chains: int) -> dict[str, Any]:
    medians: dict[str, dict[str, Any]] = {}
    for chains in sorted({s.chains for s in samples}):
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

    def row(contender: str, chains: int) -> dict[str, Any] | None:
        chains = memory_chains if chains == MEMORY else chains
        if contender == FASTER_HTTPX:
            found = [medians.get(f"{name}/{chains}") for name in ("httpx", "httpx-sequential")]
            return min((r for r in found if r), key=lambda r: r["seconds"], default=None)
        return medians.get(f"{contender}/{chains}")

    ratios = []
    for what, top, top_chains, bottom, bottom_chains, limit in TARGETS:
        a, b = row(top, top_chains), row(bottom, bottom_chains)
        if a is None or b is None or a is b:
            continue
        key = "seconds" if what == "time" else "peak_rss_mb"
        ratio = a[key] / b[key]
        # the same ratio within each round, whose samples ran minutes apart at most: less
        # exposed to load that comes and goes over a long run than the ratio of medians
        field = "seconds" if what == "time" else "peak_rss_kb"
        by_round = [
            getattr(x, field) / getattr(y, field)
            for x in samples
            if (x.contender, x.chains) == (a["contender"], a["chains"])
            for y in samples
            if (y.contender, y.chains, y.round) == (b["contender"], b["chains"], x.round)
        ]
        # CPU time suffers less from other work on a shared machine than wall time does
        cpu = a["cpu_seconds"] / b["cpu_seconds"] if what == "time" else None
        ratios.append(
            {
                "what": what,
                "numerator": f"{a['contender']}/{a['chains']}",
                "denominator": f"{b['contender']}/{b['chains']}",
                "ratio": round(ratio, 3),
                "round_ratio": round(statistics.median(by_round), 3) if by_round else None,
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
    print("\n| target | ratio | at most | verdict | per-round ratio | CPU time ratio |")
    print("|---|---:|---:|---|---:|---:|")
    for r in summary["ratios"]:
        label = f"{r['what']}: {r['numerator']} / {r['denominator']}"
        cpu = f"{r['cpu_ratio']:.2f}x" if r["cpu_ratio"] is not None else ""
        rounds = f"{r['round_ratio']:.2f}x" if r.get("round_ratio") is not None else ""
        print(
            f"| {label} | {r['ratio']:.2f}x | {r['at_most']}x | {r['verdict']} | {rounds} | {cpu} |"
        )


def machine(stepci: Path | None) -> dict[str, Any]:
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
    if stepci is not None:
        versions["stepci"] = STEPCI_VERSION
        node = subprocess.run(["node", "--version"], capture_output=True, text=True)
        versions["node"] = node.stdout.strip().lstrip("v")

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
    parser.add_argument(
        "--concurrency", type=int, default=10, help="requests in flight (default 10)"
    )
    parser.add_argument("--workloads", default="50,500", help="chains per workload")
    parser.add_argument(
        "--memory",
        type=int,
        default=5000,
        help="chains of the peak-memory workload, Baton only (default 5000; 0: none)",
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--admin-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server on which a fresh database is created, then dropped",
    )
    parser.add_argument(
        "--stepci-home",
        type=Path,
        default=Path.home() / ".cache" / "baton-bench" / "stepci",
        help="npm prefix that Step CI is installed into (outside the repository)",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    options = parser.parse_args()
    workloads = [int(n) for n in options.workloads.split(",")]
    contenders = [c for c in options.contenders.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    stepci = install_stepci(options.stepci_home) if "stepci" in contenders else None

    before = machine(stepci)
    samples: list[Sample] = []
    scratch = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    try:
        with shop_api() as url, fresh_database(options.admin_url) as db_url:
            build = commands(url, options.concurrency, db_url, scratch, stepci)
            # an untimed round: initdb of the embedded cluster, schema.sql, secret keys,
            # bytecode and page caches; none of it is counted
            start = time.perf_counter()
            for name in contenders:
                measure(*build[name](users_file(min(workloads))))
            print(f"warm-up round (embedded initdb included): {time.perf_counter() - start:.1f} s")
            runs = [(chains, contenders) for chains in workloads]
            if options.memory:
                runs.append((options.memory, [c for c in contenders if c in BATON]))
            for round_ in range(options.repeat):
                for chains, names in runs:
                    turn = round_ % len(names) if names else 0
                    for name in names[turn:] + names[:turn]:
                        seconds, cpu, rss = measure(*build[name](users_file(chains)))
                        samples.append(Sample(name, chains, round_, seconds, cpu, rss))
                        print(
                            f"round {round_ + 1} {name:>16} {chains:>5} chains: {seconds:.3f} s, "
                            f"CPU {cpu:.2f} s, {rss / 1024:.1f} MB",
                            flush=True,
                        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    summary = summarize(samples, options.memory)
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
            "memory_workload": options.memory,
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
