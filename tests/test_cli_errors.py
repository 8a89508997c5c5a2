"""Exit codes as a shell or CI sees them, from the real ``baton`` process: 2 for what the user
gave, 1 for a failed test, 3 for what failed outside the flows. Each is one line on stderr,
never a traceback, and never a DSN's password, although the errors keep their causes."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from events.errors import ScrubbedCause, StoreUnavailable, scrubbed
from events.postgres import PostgresEventStore
from events.settings import scrub_dsn
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "postgresql://u:hunter2@127.0.0.1:1/x"
FLOW = """
name: errors
base_url: "{{ env.SHOP_URL }}"
tests:
  health:
    request: {url: /health}
    expect: {status: %d}
"""


def baton(tmp_path: Path, *args: str, **environ: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``baton *args`` in a process of its own, in a shell
    without any BATON_* variable but the ones given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
    env |= {"PYTHONPATH": str(ROOT), "BATON_HOME": str(tmp_path / "home"), **environ}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout, done.stderr


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def flow(tmp_path: Path) -> Path:
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW % 200)
    return path


def test_a_flow_that_does_not_check_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(FLOW.replace("/health", '"/{{ nowhere }}"') % 200)
    code, out, err = baton(tmp_path, "run", str(bad), SHOP_URL="http://127.0.0.1:1")
    assert code == 2, out + err
    assert "variable 'nowhere' is not defined" in one_error(err)


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [("BATON_STORE_WAIT", "soon", "BATON_STORE_WAIT"), ("BATON_SECRET_KEY", "x", "valid key")],
)
def test_a_bad_baton_variable_is_a_usage_error(
    tmp_path: Path, flow: Path, shop_url: str, variable: str, value: str, named: str
) -> None:
    code, out, err = baton(
        tmp_path,
        "run",
        str(flow),
        SHOP_URL=shop_url,
        **{variable: value, "BATON_DATABASE_URL": UNREACHABLE},
    )
    assert code == 2, out + err
    assert named in one_error(err)


def test_a_failed_test_exits_1(tmp_path: Path, shop_url: str, pg_server_dsn: str) -> None:
    failing = tmp_path / "failing.yaml"
    failing.write_text(FLOW % 418)
    code, out, err = baton(
        tmp_path, "run", str(failing), SHOP_URL=shop_url, BATON_DATABASE_URL=pg_server_dsn
    )
    assert code == 1, out + err
    assert "1 failed" in out.splitlines()[-1] and err == ""


@pytest.mark.parametrize(
    "command", [("run", "flow.yaml"), ("runs",), ("db", "status"), ("diff", "a", "b")]
)
def test_an_unreachable_database_is_named_without_its_password(
    tmp_path: Path, flow: Path, shop_url: str, command: tuple[str, ...]
) -> None:
    code, out, err = baton(tmp_path, *command, SHOP_URL=shop_url, BATON_DATABASE_URL=UNREACHABLE)
    assert code == 3, out + err
    line = one_error(err)
    assert line.startswith("error: event store unavailable: PostgreSQL at ")
    assert "postgresql://u:***@127.0.0.1:1/x" in line
    assert "hunter2" not in out + err and "Traceback" not in err


def test_an_api_that_does_not_answer_is_an_infrastructure_error(tmp_path: Path, flow: Path) -> None:
    code, out, err = baton(tmp_path, "run", str(flow), SHOP_URL="http://127.0.0.1:1")
    assert code == 3, out + err
    assert "cannot reach http://127.0.0.1:1" in one_error(err)


def test_a_bad_organization_for_a_key_is_a_usage_error(tmp_path: Path, pg_server_dsn: str) -> None:
    code, out, err = baton(
        tmp_path, "keys", "create", "--org", "Not A Slug!", BATON_DATABASE_URL=pg_server_dsn
    )
    assert code == 2, out + err
    assert "organization 'Not A Slug!'" in one_error(err)


def test_watching_a_service_that_refuses_is_an_infrastructure_error(
    tmp_path: Path, shop_url: str
) -> None:
    """The shop is no Baton service: it answers the stream's URL with a 404."""
    code, out, err = baton(tmp_path, "watch", "some-run", "--url", shop_url, "--key", "bk_x")
    assert code == 3, out + err
    assert f"{shop_url}/api/v1/runs/some-run/stream" in one_error(err)


def test_a_service_that_cannot_start_is_an_infrastructure_error(
    tmp_path: Path, pg_server_dsn: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code, out, err = baton(tmp_path, "serve", "--port", port, BATON_DATABASE_URL=pg_server_dsn)
    assert code == 3, out + err
    assert err.strip().splitlines()[-1] == (
        "error: the service did not start (its log above says why)"
    )
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("BATON_DATABASE_URL", "postgresql://u:hunter2@127.0.0.1:99999/x", "port '99999'"),
        ("BATON_DATABASE_URL", "host=127.0.0.1 password=hunter2", "not a PostgreSQL URL"),
        ("BATON_DATABASE_URL", "postgresql://u:hunter2@db@127.0.0.1/x", "percent-encoded"),
        ("BATON_REDIS_URL", "http://:hunter2@127.0.0.1:6379", "not a Redis URL"),
        ("BATON_QUEUE_URL", "redis://:hunter2@127.0.0.1:six/0", "port 'six'"),
    ],
)
def test_a_malformed_service_url_is_a_usage_error_naming_its_variable(
    tmp_path: Path, variable: str, value: str, named: str
) -> None:
    code, out, err = baton(tmp_path, "runs", **{variable: value})
    assert code == 2, out + err
    line = one_error(err)
    assert line.startswith(f"error: {variable}=") and named in line
    assert "hunter2" not in out + err


@pytest.mark.parametrize(
    ("queue", "exit_code", "says"),
    [("http://127.0.0.1:6379", 2, "not a Redis URL"), ("redis://127.0.0.1:{port}/0", 3, "")],
)
def test_a_queue_that_cannot_take_the_batch_fails_before_it_says_queued(
    tmp_path: Path, flow: Path, queue: str, exit_code: int, says: str
) -> None:
    url = queue.format(port=free_port())
    code, out, err = baton(
        tmp_path,
        "run",
        str(flow),
        "--queue",
        url,
        SHOP_URL="http://127.0.0.1:1",
        BATON_DATABASE_URL=UNREACHABLE,
    )
    assert code == exit_code, out + err
    assert out == ""  # no "batch ...: 1 units queued" line for a batch that never was
    assert one_error(err).startswith(f"error: {'--queue ' if says else 'the queue at '}{url}")
    assert says in err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("retention", "set", "shop", "--passed-days", "1000000"), "--passed-days"),
        (("retention", "set", "shop", "--context-hours", "9999999999"), "--context-hours"),
        (("retention", "apply", "--dry-run", "--now", "0001-01-01"), "--now '0001-01-01'"),
    ],
)
def test_a_retention_window_or_time_past_the_calendar_is_a_usage_error(
    tmp_path: Path, args: tuple[str, ...], named: str
) -> None:
    """Stored, such a window made every later apply overflow with a traceback."""
    code, out, err = baton(tmp_path, *args, BATON_DATABASE_URL=UNREACHABLE)
    assert code == 2, out + err
    assert named in err and "Traceback" not in err


ARCHIVED = "01a24267-6483-7c15-8755-4f3ebc8a93fb"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"not gzip at all", "damaged or unreadable"),
        (gzip.compress(b"x" * 5000, mtime=0)[:30], "damaged (cut short)"),
        (gzip.compress(b'{"id": 1}\n', mtime=0), "a line is not a recorded event"),
        (gzip.compress(b"", mtime=0), "it holds no event"),
    ],
    ids=["not-gzip", "cut-short", "not-events", "empty"],
)
def test_a_damaged_archive_file_is_named_not_restored(
    tmp_path: Path, pg_server_dsn: str, content: bytes, says: str
) -> None:
    path = tmp_path / "home" / "archive" / "shop" / "2026-01" / "events" / f"{ARCHIVED}.jsonl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    code, out, err = baton(
        tmp_path, "archive", "restore", ARCHIVED, BATON_DATABASE_URL=pg_server_dsn
    )
    assert code == 2, out + err  # a cut-short file was once "interrupted", exit 130
    line = one_error(err)
    assert line.startswith(f"error: the archive file {path} ") and says in line


def test_a_schema_whose_references_loop_fails_its_test_not_the_run(
    tmp_path: Path, shop_url: str, pg_server_dsn: str
) -> None:
    looping = tmp_path / "looping.yaml"
    schema = '{$ref: "#/$defs/A", $defs: {A: {$ref: "#/$defs/B"}, B: {$ref: "#/$defs/A"}}}'
    looping.write_text(FLOW.replace("expect: {status: %d}", f"expect: {{schema: {schema}}}"))
    code, out, err = baton(
        tmp_path, "run", str(looping), SHOP_URL=shop_url, BATON_DATABASE_URL=pg_server_dsn
    )
    assert code == 1, out + err
    assert "the schema's $ref references lead back to themselves" in out
    assert "Traceback" not in err


# ---- the causes behind them ---------------------------------------------------------------


async def test_an_unreachable_store_keeps_its_cause() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        await PostgresEventStore.connect(UNREACHABLE, connect_timeout=5)
    assert isinstance(caught.value.__cause__, OSError)  # the refused connection itself
    shown = "".join(traceback.format_exception(caught.value))
    assert "ConnectionRefusedError" in shown and "hunter2" not in shown


def test_a_cause_that_quotes_the_password_is_chained_scrubbed() -> None:
    dsn = "postgresql://u:hunter2@db.example/x"
    try:
        try:
            raise ConnectionRefusedError("refused")
        except OSError as refused:
            raise ValueError(f"cannot use {dsn}") from refused
    except ValueError as exc:
        cause = scrubbed(exc, lambda text: scrub_dsn(text, dsn))
    assert isinstance(cause, ScrubbedCause)
    assert str(cause) == "builtins.ValueError: cannot use postgresql://u:***@db.example/x"
    assert isinstance(cause.__cause__, ConnectionRefusedError)  # nothing to hide: itself
    clean = ValueError("nothing secret")
    assert scrubbed(clean, lambda text: scrub_dsn(text, dsn)) is clean


@pytest.mark.parametrize(
    ("dsn", "text"),
    [
        ("postgresql://u:hunter2@h/x", "failed for postgresql://u:hunter2@h/x"),
        ("postgresql://u:hunter%2F2@h/x", "password 'hunter/2' and 'hunter%2F2'"),
        ("postgresql://u@h/x?password=hunter2&sslmode=require", "bad option password=hunter2"),
        ("host=h user=u password='hunter2' dbname=x", "cannot parse password='hunter2'"),
        ("redis://:hunter2@127.0.0.1:6379/0", "AUTH hunter2 failed"),
    ],
)
def test_a_dsns_password_is_scrubbed_in_every_form(dsn: str, text: str) -> None:
    scrubbed_text = scrub_dsn(text, dsn)
    assert "hunter" not in scrubbed_text and "***" in scrubbed_text
    assert scrub_dsn("connection refused", dsn) == "connection refused"
