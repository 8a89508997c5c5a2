"""Test sessions: `baton session ...` and `baton run --session ID` against real servers; a
paused session refuses new runs with its reason; a pause and a run decided at once never
both land; the read tables and the service's API show the same."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from events import sessions
from events import types as ev
from events.errors import SessionRefused, UnknownSession
from events.memory import MemoryEventStore
from tests.cli import baton
from tests.test_services import Api

FLOW = """
name: in a session
base_url: "{{ env.API_URL }}"
tests:
  ping: {request: {url: /ping}, expect: {status: 200}}
"""


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch, pg_server_dsn: str, tmp_path: Path) -> Iterator[Api]:
    api = Api()
    monkeypatch.setenv("API_URL", api.url)
    monkeypatch.setenv("BATON_DATABASE_URL", pg_server_dsn)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flow.yaml").write_text(FLOW)
    yield api
    api.close()


def _ok(*args: str) -> str:
    code, out, err = baton(*args)
    assert code == 0, out + err
    return out


def _refused(*args: str) -> str:
    code, out, err = baton(*args)
    assert code == 2, out + err
    return err


def test_a_paused_session_refuses_new_runs_until_resumed(shell: Api) -> None:
    created = _ok("session", "create", "release 1.4", "--tester", "ann")
    session_id = created.split()[0]
    assert created.startswith(f"{session_id} release 1.4: created, 0 runs")

    _ok("run", "flow.yaml", "--session", session_id)
    shown = _ok("session", "show", session_id)
    assert shown.startswith(f"{session_id} release 1.4: active, 1 runs")
    [first_run] = re.findall(r"run (\S+)", shown)

    paused = _ok("session", "pause", session_id, "--reason", "staging redeploys")
    assert "paused (staging redeploys)" in paused
    err = _refused("run", "flow.yaml", "--session", session_id)
    assert (
        f"error: test session {session_id} (release 1.4) is paused (staging redeploys): "
        "no new run starts in it (resume it first)"
    ) in err
    assert len(shell.received) == 1  # the refused run sent nothing

    _ok("session", "resume", session_id)
    _ok("run", "flow.yaml", "--session", session_id)
    assert len(shell.received) == 2
    completed = _ok("session", "complete", session_id)
    assert completed.startswith(f"{session_id} release 1.4: completed, 2 runs")
    err = _refused("run", "flow.yaml", "--session", session_id)
    assert "is completed: no new run starts in it" in err
    err = _refused("session", "pause", session_id)
    assert "is completed: only an active session can be paused" in err

    events = _ok("events", first_run)
    assert f"session_id={session_id}" in events.replace('"', "")


def test_an_unknown_session_is_a_usage_error(shell: Api) -> None:
    err = _refused("run", "flow.yaml", "--session", "nope")
    assert "error: no test session 'nope' in the event store" in err
    assert shell.received == []


async def test_a_pause_and_a_run_decided_at_once_never_both_land() -> None:
    store = MemoryEventStore()
    for _ in range(20):
        session = await sessions.create(store, "race")
        session = await sessions.admit(store, session.id, ["first"])  # active
        outcomes = await asyncio.gather(
            sessions.change(store, session.id, "pause"),
            sessions.admit(store, session.id, ["second"]),
            return_exceptions=True,
        )
        recorded = await store.read_stream(ev.session_stream(session.id))
        kinds = [type(r.event).__name__ for r in recorded]
        assert kinds[-1] in ("SessionPaused", "SessionRunsStarted")
        if isinstance(outcomes[1], SessionRefused):
            # refused: the pause came first, and no run joined after it
            assert kinds[-1] == "SessionPaused" and kinds.count("SessionRunsStarted") == 1
        else:
            # admitted: it landed before the pause, which then paused an active session
            assert kinds[-2:] == ["SessionRunsStarted", "SessionPaused"]
        assert not isinstance(outcomes[0], BaseException)
    with pytest.raises(UnknownSession):
        await sessions.read(store, "missing")
