"""SIGINT and SIGTERM stop ``baton run`` and ``baton serve`` cleanly: a prompt exit with
the documented code (130, 143), the embedded PostgreSQL stopped, every stored event kept
and the runs in flight ended with RunCancelled.

Each command runs as a user's process would, on the embedded default in a BATON_HOME of
this module's own: SIGINT goes to the whole process group, as Ctrl-C in a terminal sends
it; SIGTERM to the process alone, as Docker and Kubernetes send it.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
import psutil
import pytest

from tests.conftest import _private_home, free_port

SIGNALS = [signal.SIGINT, signal.SIGTERM]
EXIT_BOUND_S = 5.0
"""Well below what the slow requests still have to go (10 s): they were cancelled."""

SLOW_FLOW = """
name: {name}
base_url: "{{{{ env.SHOP_URL }}}}"
tests:
  quick:
    request: {{url: /health}}
  slow_a:
    depends_on: [quick]
    request: {{url: /slow, params: {{ms: 10000}}}}
  slow_b:
    depends_on: [quick]
    request: {{url: /slow, params: {{ms: 10000}}}}
  after:
    depends_on: [slow_a]
    request: {{url: /health}}
"""


class Baton:
    """``baton`` in a process of its own, its output read line by line as it comes."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args],
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a process group of its own, as a terminal's job has
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(
                target=self._read, args=(self.process.stdout, self.out, True), daemon=True
            ),
            threading.Thread(
                target=self._read, args=(self.process.stderr, self.err, False), daemon=True
            ),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], into: list[str], announce: bool) -> None:
        with stream:
            for line in stream:
                into.append(line)
                if announce:
                    self.lines.put(line)

    def wait_for_line(self, text: str, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"baton never printed {text!r}; it printed {self.stdout!r}")
            if text in line:
                return

    def interrupt(self, signum: signal.Signals) -> float:
        """Send the signal as a terminal (SIGINT) or a supervisor (SIGTERM) does; return how
        long the process took to exit."""
        if signum == signal.SIGINT:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)
        start = time.monotonic()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"baton did not exit within 30 s of {signum.name}")
        took = time.monotonic() - start
        for reader in self._readers:
            reader.join(5)
        return took

    def kill(self) -> None:
        """A failed test's process: it must not outlive the test."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)


def baton_output(*args: str, env: dict[str, str]) -> str:
    """What a command that ends by itself prints; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def postmasters(home: Path) -> list[int]:
    """PostgreSQL server processes running on the data directory under ``home``."""
    pgdata = str((home / "pgdata").resolve())
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "postgres" and pgdata in (process.info["cmdline"] or []):
            found.append(process.pid)
    return found


def assert_embedded_stopped(home: Path) -> None:
    assert not (home / "pgdata" / "postmaster.pid").exists(), "postmaster.pid left behind"
    assert postmasters(home) == [], "a PostgreSQL server still runs under BATON_HOME"


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """This module's BATON_HOME, its embedded PostgreSQL created once (initdb) and stopped."""
    path = _private_home()
    env = {**os.environ, "BATON_HOME": str(path)}
    env.pop("BATON_DATABASE_URL", None)
    baton_output("db", "migrate", env=env)
    assert_embedded_stopped(path)
    yield path
    for pid in postmasters(path):  # a failed test's leftover: do not leave it running
        psutil.Process(pid).terminate()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Baton]]:
    """Start ``baton`` processes that are killed after the test if still running."""
    started: list[Baton] = []

    def start(*args: str, env: dict[str, str]) -> Baton:
        started.append(Baton(*args, env=env))
        return started[-1]

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def env(home: Path, shop_url: str) -> dict[str, str]:
    values = {**os.environ, "BATON_HOME": str(home), "SHOP_URL": shop_url}
    for name in ("BATON_DATABASE_URL", "BATON_REDIS_URL"):
        values.pop(name, None)
    # the service refuses private targets unless told (issue 9): the shop is on 127.0.0.1
    values["BATON_ALLOWED_TARGETS"] = "127.0.0.1"
    return values


def events_of(run_id: str, env: dict[str, str]) -> list[list[str]]:
    """``baton events RUN_ID`` split in columns: position, version, time, type, fields."""
    header, *lines = baton_output("events", run_id, env=env).splitlines()
    assert header.split()[:4] == ["position", "version", "time", "type"]
    return [line.split(None, 4) for line in lines]


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_baton_run_stops_cleanly(
    signum: signal.Signals,
    env: dict[str, str],
    home: Path,
    tmp_path: Path,
    spawn: Callable[..., Baton],
) -> None:
    name = f"signals {signum.name}"
    flow = tmp_path / "slow.yaml"
    flow.write_text(SLOW_FLOW.format(name=name))
    run = spawn("run", str(flow), env=env)
    run.wait_for_line("✓ quick")
    time.sleep(0.3)  # slow_a and slow_b are sent
    took = run.interrupt(signum)
    stderr = run.stderr

    assert took < EXIT_BOUND_S
    assert run.process.returncode == 128 + signum.value
    assert stderr.strip().splitlines()[-1] == f"interrupted by {signum.name}"
    assert "Traceback" not in stderr
    # the partial summary: what passed, what was cancelled
    summary = run.stdout[run.stdout.index("INTERRUPTED") :].splitlines()
    assert summary[1:3] == [f"{name}: 1 passed, 3 cancelled", "  cancelled: slow_a, slow_b, after"]
    assert summary[-1] == "1 passed, 3 cancelled"
    assert_embedded_stopped(home)

    listed = baton_output("runs", "--suite", name, env=env).splitlines()
    assert len(listed) == 2, listed  # the header and this run
    run_id, status = listed[1].split()[:2]
    assert status == "cancelled"
    events = events_of(run_id, env)
    assert [e[3] for e in events[:5]] == [
        "RunStarted",
        "TestStarted",
        "RequestSent",
        "ResponseReceived",
        "TestPassed",
    ]
    assert events[-1][3:] == ["RunCancelled", "reason=interrupted"]
    assert sum(e[3] == "RequestSent" for e in events) == 3  # quick, slow_a, slow_b
    shown = baton_output("show", run_id, env=env)
    assert "status cancelled (interrupted), 1 passed, 0 failed, 0 skipped, 3 cancelled of 4" in (
        shown
    )
    assert "running" not in shown
    assert_embedded_stopped(home)


def test_baton_run_stops_cleanly_when_the_reader_of_its_events_goes(
    env: dict[str, str], home: Path, tmp_path: Path
) -> None:
    """``baton run --events ndjson | head -1``: the runs end as interrupted, no traceback,
    the exit code a shell reports for a tool stopped by SIGPIPE."""
    chained = [
        f"  t{i}:\n    request: {{url: /slow, params: {{ms: 300}}}}\n"
        + (f"    depends_on: [t{i - 1}]\n" if i else "")
        for i in range(20)
    ]
    flow = tmp_path / "chain.yaml"
    base = 'base_url: "{{ env.SHOP_URL }}"'
    flow.write_text(f"name: signals pipe\n{base}\ntests:\n{''.join(chained)}")
    with subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(flow), "--events", "ndjson"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        try:
            assert '"type":"RunStarted"' in process.stdout.readline()
            process.stdout.close()  # the reader goes; the chain has some 6 s to go
            stderr = process.stderr.read()
            process.wait(timeout=30)
        finally:
            process.kill()

    assert process.returncode == 128 + signal.SIGPIPE.value
    assert stderr.strip().splitlines()[-1] == "interrupted by SIGPIPE: standard output was closed"
    assert "Traceback" not in stderr and "event store failed" not in stderr
    assert "INTERRUPTED" in stderr  # the summary, on standard error as with --events
    listed = baton_output("runs", "--suite", "signals pipe", env=env).splitlines()
    run_id, status = listed[1].split()[:2]
    assert status == "cancelled"
    events = events_of(run_id, env)
    assert events[0][3] == "RunStarted"
    assert events[-1][3:] == ["RunCancelled", "reason=interrupted"]
    assert_embedded_stopped(home)


SLOW_SETUP = """
name: slow login
base_url: "{{ env.SHOP_URL }}"
tests:
  login:
    request: {url: /slow, params: {ms: 10000}}
    capture: {slept: {json: "$.slept_ms"}}
"""
USING = """
name: {name}
base_url: "{{{{ env.SHOP_URL }}}}"
use: [{{flow: ../auth/login.yaml, test: login}}]
tests:
{tests}
"""


def test_baton_run_interrupted_in_its_shared_setup_counts_the_flows_waiting_for_it(
    env: dict[str, str], tmp_path: Path, spawn: Callable[..., Baton]
) -> None:
    """The flows using a setup start once it has passed: stopped before, they are in the
    summary as cancelled, not missing from it."""
    (tmp_path / "auth").mkdir()
    (tmp_path / "auth" / "login.yaml").write_text(SLOW_SETUP)
    (tmp_path / "flows").mkdir()
    for name, tests in (("cart", ("add", "pay")), ("orders", ("list",))):
        body = "".join(
            f"  {t}:\n    request: {{url: /health, params: {{s: '{{{{ slept }}}}'}}}}\n"
            for t in tests
        )
        (tmp_path / "flows" / f"{name}.yaml").write_text(USING.format(name=name, tests=body))
    run = spawn("run", str(tmp_path / "flows"), "--events", "ndjson", env=env)
    run.wait_for_line('"type":"RequestSent"')  # the setup's login, 10 s to go
    run.interrupt(signal.SIGTERM)

    assert run.process.returncode == 128 + signal.SIGTERM.value, run.stderr
    assert "Traceback" not in run.stderr
    summary = run.stderr[run.stderr.index("INTERRUPTED") :].splitlines()
    assert summary[1:-2] == [
        "slow login: 0 passed, 1 cancelled",
        "  cancelled: login",
        "cart: 0 passed, 2 cancelled",
        "  cancelled: add, pay",
        "orders: 0 passed, 1 cancelled",
        "  cancelled: list",
        "",
        "3 runs, 0 finished; tests: 0 passed, 4 cancelled",
    ]
    assert summary[-1] == "interrupted by SIGTERM"


def _reading(fifo: Path, process: Baton, within: float = 60) -> int:
    """The writing end of ``fifo``, opened once ``process`` has opened it to read."""
    deadline = time.monotonic() + within
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader yet
            assert process.process.poll() is None, process.stderr
            assert time.monotonic() < deadline, "baton never opened the --data file"
            time.sleep(0.02)


def assert_interrupted_before_any_test(process: Baton, signum: signal.Signals) -> None:
    process.interrupt(signum)
    assert process.process.returncode == 128 + signum.value
    assert process.stdout.splitlines()[-1:] == ["INTERRUPTED before any test started"]
    assert process.stderr.strip().splitlines()[-1] == f"interrupted by {signum.name}"
    assert "Traceback" not in process.stderr


def test_baton_run_interrupted_while_it_reads_its_inputs_says_no_test_started(
    tmp_path: Path, spawn: Callable[..., Baton]
) -> None:
    """A --data file on a slow mount (here a FIFO nobody writes): the flows are loaded but
    no run exists yet."""
    flow = tmp_path / "slow.yaml"
    flow.write_text(SLOW_FLOW.format(name="signals data"))
    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    env = {**os.environ, "BATON_HOME": str(tmp_path / "home"), "SHOP_URL": "http://127.0.0.1:9"}
    run = spawn("run", str(flow), "--data", str(fifo), env=env)
    writer = _reading(fifo, run)
    try:
        assert_interrupted_before_any_test(run, signal.SIGTERM)
    finally:
        os.close(writer)


def test_baton_rerun_interrupted_while_the_store_opens_says_no_test_started(
    tmp_path: Path, spawn: Callable[..., Baton]
) -> None:
    """The event store's server accepts the connection and never answers (a database
    still starting, a proxy without its backend): Ctrl-C while rerun reads the record."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(60)
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/baton"
        env = {**os.environ, "BATON_HOME": str(tmp_path / "home"), "BATON_DATABASE_URL": url}
        rerun = spawn("rerun", str(uuid.uuid4()), "--failed", env=env)
        connection, _ = silent.accept()  # rerun is opening the store
        with connection:
            assert_interrupted_before_any_test(rerun, signal.SIGINT)


@pytest.fixture(scope="module")
def api_key(home: Path) -> str:
    env = {**os.environ, "BATON_HOME": str(home)}
    env.pop("BATON_DATABASE_URL", None)
    return baton_output(
        "keys",
        "create",
        "--org",
        "signals",
        *("--scope", "read", "--scope", "run"),
        *("--scope", "admin"),
        env=env,
    ).strip()


def wait_until_serving(client: httpx.Client, serve: Baton) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert serve.process.poll() is None, serve.stderr
        assert time.monotonic() < deadline, "baton serve did not answer in 60 s"
        time.sleep(0.1)


def start_slow_run(client: httpx.Client, shop_url: str, name: str) -> str:
    """A run of the slow flow through the API, returned once its slow requests are sent."""

    def ok(method: str, url: str, status: int, **kwargs: object) -> dict[str, object]:
        response = client.request(method, url, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == status, response.text
        found: dict[str, object] = response.json()
        return found

    project = ok("POST", "/api/v1/projects", 201, json={"name": name})
    environment = ok(
        "POST",
        "/api/v1/environments",
        201,
        json={
            "project_id": project["id"],
            "name": "local",
            "variables": [{"name": "SHOP_URL", "value": shop_url}],
        },
    )
    suite = ok(
        "POST",
        "/api/v1/suites",
        201,
        json={"project_id": project["id"], "content": SLOW_FLOW.format(name=name)},
    )
    run = ok(
        "POST",
        "/api/v1/runs",
        202,
        json={"suite_id": suite["id"], "environment_id": environment["id"]},
    )
    run_id = str(run["id"])
    deadline = time.monotonic() + 30
    while True:
        page = ok("GET", f"/api/v1/runs/{run_id}/events", 200)
        sent = [e for e in page["items"] if e["type"] == "RequestSent"]  # type: ignore[attr-defined]
        if len(sent) == 3:
            return run_id
        assert time.monotonic() < deadline, f"the run never sent its slow requests: {page}"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_baton_serve_stops_cleanly(
    signum: signal.Signals,
    env: dict[str, str],
    home: Path,
    api_key: str,
    shop_url: str,
    spawn: Callable[..., Baton],
) -> None:
    port = free_port()
    serve = spawn("serve", "--port", str(port), env=env)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        wait_until_serving(client, serve)
        run_id = start_slow_run(client, shop_url, f"signals-{signum.name.lower()}")
        served = client.get(f"/api/v1/runs/{run_id}/events").json()["items"]
    took = serve.interrupt(signum)
    stderr = serve.stderr

    assert took < EXIT_BOUND_S
    assert serve.process.returncode == 128 + signum.value
    assert stderr.strip().splitlines()[-1] == f"interrupted by {signum.name}"
    assert "Traceback" not in stderr
    assert shop_url not in stderr  # what runs request is not logged: a query may hold secrets
    assert_embedded_stopped(home)

    events = events_of(run_id, env)
    # every event the service had stored is still there, in order, at the same position
    assert [(e[0], e[3]) for e in events[: len(served)]] == [
        (str(item["position"]), item["type"]) for item in served
    ]
    assert events[-1][3:] == ["RunCancelled", "reason=interrupted"]
    assert not any(e[3] == "RunCompleted" for e in events)
    assert_embedded_stopped(home)


def test_baton_serve_ends_open_live_streams_at_once_on_sigterm(
    env: dict[str, str], api_key: str, shop_url: str, spawn: Callable[..., Baton]
) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    port = free_port()
    serve = spawn("serve", "--port", str(port), env=env)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {api_key}"}
    ended: dict[str, object] = {}
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        wait_until_serving(client, serve)
        run_id = start_slow_run(client, shop_url, "signals-streams")

        def follow_sse() -> None:
            try:
                with client.stream("GET", f"/api/v1/runs/{run_id}/stream") as response:
                    ended["sse_status"] = response.status_code
                    for _ in response.iter_bytes():
                        pass
                ended["sse"] = "ended"
            except httpx.HTTPError as exc:
                ended["sse"] = f"broken: {type(exc).__name__}"

        def follow_ws() -> None:
            url = f"ws://127.0.0.1:{port}/api/v1/runs/{run_id}/ws"
            with connect(url, additional_headers=headers) as socket_:
                try:
                    while True:
                        socket_.recv(timeout=30)
                except ConnectionClosed as closed:
                    ended["ws"] = closed.rcvd.code if closed.rcvd else None

        followers = [threading.Thread(target=follow_sse), threading.Thread(target=follow_ws)]
        for follower in followers:
            follower.start()
        time.sleep(1.0)  # both streams replayed the log and are live
        took = serve.interrupt(signal.SIGTERM)
        for follower in followers:
            follower.join(10)

    assert took < 2.5, f"open streams held the shut-down for {took:.1f} s"
    assert serve.process.returncode == 128 + signal.SIGTERM.value
    assert ended == {"sse_status": 200, "sse": "ended", "ws": 1001}
    assert " ERROR " not in serve.stderr and "Traceback" not in serve.stderr


def test_the_summary_of_an_interrupted_batch() -> None:
    """Three rows: one finished passing, one with a failure then cut short, one not begun."""
    from events.types import (
        PlannedTest,
        RunCancelled,
        RunCompleted,
        RunStarted,
        TestFailed,
        TestPassed,
        TestSkipped,
    )
    from orchestrator.reporters import RunTally

    tally = RunTally()
    names = ("login", "checkout", "get_cart", "pay")
    plan = [PlannedTest(name) for name in names]
    for row in (1, 2, 3):
        tally(f"r{row}", RunStarted(f"r{row}", "shop", "d", plan, batch_id="b", row=row))
    for test in names:
        tally("r1", TestPassed(test, 1, 5.0))
    tally("r1", RunCompleted("passed", 4, 0, 0, 20.0))
    tally("r2", TestPassed("login", 1, 5.0))
    tally("r2", TestFailed("checkout", 1, 5.0, "assertion", "status 500"))
    tally("r2", TestSkipped("pay", "depends on checkout, which failed"))
    for row in (2, 3):
        tally(f"r{row}", RunCancelled("interrupted"))
    assert tally.render(color=False).splitlines() == [
        "",
        "INTERRUPTED",
        "shop [row 2]: 1 passed, 1 failed, 1 skipped, 1 cancelled",
        "  failed: checkout",
        "  skipped: pay",
        "  cancelled: get_cart",
        "shop [row 3]: 0 passed, 4 cancelled",
        "  cancelled: login, checkout, get_cart, pay",
        "",
        "3 runs, 1 finished; tests: 5 passed, 1 failed, 1 skipped, 5 cancelled",
    ]
    assert RunTally().render(color=False) == "INTERRUPTED before any test started"
