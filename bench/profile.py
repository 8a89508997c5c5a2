"""Where Baton's time goes on the benchmark: import time, and a py-spy profile by component.

    python bench/profile.py imports              # -X importtime of what `baton run` loads
    python bench/profile.py record [--chains 500] [--rate 250]

``record`` starts the demo API and a fresh database (as bench/run.py does), runs ``baton
run bench/chain.yaml`` under ``py-spy record --format raw`` (pip install py-spy) and prints
the share of samples by component: each sample goes to the innermost frame that belongs to
a known library or Baton module, and a sample anywhere inside an import goes to "import".
The raw profile is kept in bench/profiles/ (not in git); flamegraph.pl or speedscope read it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import BENCH, CHAIN, ROOT, fresh_database, shop_api, users_file

# (substring of a py-spy frame, component); the innermost frame that matches one wins
COMPONENTS = [
    ("aiohttp/", "aiohttp (HTTP client)"),
    ("httpx_aiohttp/", "httpx-aiohttp adapter"),
    ("httpx/", "httpx client layer"),
    ("jinja2/", "templating"),
    ("templating.py", "templating"),
    ("assertions.py", "assertions"),
    ("jsonpath", "assertions"),
    ("captures.py", "captures"),
    ("secrets.py", "redaction and encryption"),
    ("cryptography", "redaction and encryption"),
    ("events/types.py", "events: build, ids, encode"),
    ("writer.py", "events: writer"),
    ("postgres.py", "events: store append"),
    ("asyncpg", "events: store append"),
    ("embedded", "embedded PostgreSQL"),
    ("reporters/", "reporters"),
    ("runner.py", "runner"),
    ("execution.py", "runner"),
    ("loader.py", "load and plan"),
    ("planner.py", "load and plan"),
]
IMPORTS = "importlib._bootstrap"
RUN_MODULES = (
    "orchestrator.cli",
    "orchestrator.execution",
    "orchestrator.reporters",
    "events.postgres",
    "events.secrets",
    "events.writer",
    "aiohttp",
    "httpx_aiohttp",
)


def components(raw: Path) -> tuple[int, Counter[str], Counter[str]]:
    """Samples in all, samples per component, and samples per innermost frame."""
    by_component: Counter[str] = Counter()
    by_frame: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = stack.split(";")
        by_frame[frames[-1]] += samples
        component = "event loop and other"
        if any(IMPORTS in frame for frame in frames):
            component = "import"
        else:
            for frame in reversed(frames):
                found = next((name for key, name in COMPONENTS if key in frame), None)
                if found is not None:
                    component = found
                    break
        by_component[component] += samples
    return total, by_component, by_frame


def record(chains: int, rate: int, admin_url: str) -> None:
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    out = BENCH / "profiles"
    out.mkdir(exist_ok=True)
    raw = out / f"baton-{chains}.raw"
    home = Path(tempfile.mkdtemp(prefix="baton-profile-"))
    try:
        with shop_api() as url, fresh_database(admin_url) as db_url:
            dropped = ("BATON_", "PYTHONDONTWRITEBYTECODE")
            env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
            env.update(SHOP_URL=url, BATON_DATABASE_URL=db_url, BATON_HOME=str(home))
            run = [sys.executable, "-m", "orchestrator.cli", "run", str(CHAIN), "-c", "10", "-q"]
            run += ["--data", str(users_file(chains))]
            # once unprofiled: the schema, the key file and bytecode are not what we look for
            subprocess.run(run, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            spy = ["py-spy", "record", "-r", str(rate), "-f", "raw", "-o", str(raw), "--"]
            subprocess.run([*spy, *run], env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    total, by_component, by_frame = components(raw)
    print(f"\n{total} samples at {rate} Hz ({raw.relative_to(ROOT)})\n")
    print("| component | share |\n|---|---:|")
    for name, samples in by_component.most_common():
        print(f"| {name} | {samples / total:.1%} |")
    print("\ninnermost frames:")
    for frame, samples in by_frame.most_common(20):
        print(f"{samples / total:6.1%}  {frame}")


def imports() -> None:
    code = "; ".join(f"import {module}" for module in RUN_MODULES)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    rows: list[tuple[int, int, str]] = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        fields = line.split(":", 1)[1].split("|")
        depth = (len(fields[2]) - len(fields[2].lstrip())) // 2
        rows.append((int(fields[1]), depth, fields[2].strip()))
    total = sum(us for us, depth, _ in rows if depth == 0)
    print(f"imports of `baton run`: {total / 1000:.0f} ms in all (-X importtime adds some)\n")
    for us, depth, name in rows:
        if us >= 10_000 and depth <= 2:
            print(f"{us / 1000:7.1f} ms  {'  ' * depth}{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("imports", help="import time of the modules `baton run` loads")
    rec = commands.add_parser("record", help="py-spy profile of baton run, by component")
    rec.add_argument("--chains", type=int, default=500)
    rec.add_argument("--rate", type=int, default=250, help="samples per second")
    rec.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    options = parser.parse_args()
    if options.command == "imports":
        imports()
    else:
        record(options.chains, options.rate, options.admin_url)


if __name__ == "__main__":
    main()
