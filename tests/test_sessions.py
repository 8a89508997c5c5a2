"""Test sessions: `baton session ...` and `baton run --session ID` against real servers; a
paused session refuses new runs with its reason; a pause and a run decided at once never
both land; the read tables and the service's API show the same."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from context_service.keys import create_key
from events import sessions
from events import types as ev
from events.errors import SessionRefused, UnknownSession, WrongExpectedVersion
from events.memory import MemoryEventStore
from tests.cli import baton
from tests.conftest import LiveService, Org
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


class Interleaving:
    """The memory store, with every read of a stream handing the loop on: two changes
    decided at once both read the session before either appends, as they do over a
    network."""

    def __init__(self) -> None:
        self.store = MemoryEventStore()
        self.conflicts = 0

    async def read_stream(self, stream: str) -> list[ev.RecordedEvent]:
        found = await self.store.read_stream(stream)
        for _ in range(3):
            await asyncio.sleep(0)
        return found

    async def append(self, appends: list[Any]) -> list[list[int]]:
        try:
            return await self.store.append(appends)
        except WrongExpectedVersion:
            self.conflicts += 1
            raise


@pytest.mark.parametrize("first", ["pause", "run"])
async def test_a_pause_and_a_run_decided_at_once_never_both_land(first: str) -> None:
    store: Any = Interleaving()
    for _ in range(5):
        session = await sessions.create(store, "race")
        session = await sessions.admit(store, session.id, ["first"])  # active
        pause = sessions.change(store, session.id, "pause")
        run = sessions.admit(store, session.id, ["second"])
        both = (pause, run) if first == "pause" else (run, pause)
        earlier, later = await asyncio.gather(*both, return_exceptions=True)
        recorded = await store.read_stream(ev.session_stream(session.id))
        kinds = [type(r.event).__name__ for r in recorded]
        if first == "pause":
            # the pause landed; the run, decided on the active session, read it again
            assert isinstance(later, SessionRefused), later
            assert kinds[-1] == "SessionPaused" and kinds.count("SessionRunsStarted") == 1
        else:
            # the run landed; the pause, decided on the same version, read it again
            assert not isinstance(earlier, BaseException) and not isinstance(later, BaseException)
            assert kinds[-2:] == ["SessionRunsStarted", "SessionPaused"]
    assert store.conflicts == 5  # each time, the second append found the first one there
    with pytest.raises(UnknownSession):
        await sessions.read(store, "missing")


@pytest.fixture
async def initech(live_service: LiveService) -> AsyncIterator[Org]:
    key = await create_key(
        live_service.settings, organization="initech", scopes=["read", "run", "admin"], name="s"
    )
    org = Org(live_service, key)
    yield org
    await org.http.aclose()


async def _suite_in_environment(org: Org, api: Api) -> dict[str, str]:
    project = await org.ok("POST", "/api/v1/projects", 201, json={"name": "sessions"})
    environment = await org.ok(
        "POST",
        "/api/v1/environments",
        201,
        json={
            "project_id": project["id"],
            "name": "local",
            "variables": [{"name": "API_URL", "value": api.url}],
        },
    )
    suite = await org.ok(
        "POST", "/api/v1/suites", 201, json={"project_id": project["id"], "content": FLOW}
    )
    return {"suite_id": suite["id"], "environment_id": environment["id"]}


async def test_the_service_pauses_a_session_and_refuses_its_new_runs_with_409(
    initech: Org, live_service: LiveService
) -> None:
    api = Api()
    try:
        run_of = await _suite_in_environment(initech, api)
        created = await initech.ok(
            "POST",
            "/api/v1/sessions",
            201,
            json={"name": "exploratory", "project": "sessions", "tester": "bo"},
        )
        session = created["id"]
        assert (created["status"], created["runs"], created["tester"]) == ("created", 0, "bo")
        in_session = {**run_of, "session_id": session}
        first = await initech.ok("POST", "/api/v1/runs", 202, json=in_session)
        assert (await initech.finished(first["id"]))["status"] == "passed"
        found = await initech.ok("GET", f"/api/v1/sessions/{session}")
        assert (found["status"], found["runs"]) == ("active", 1)

        paused = await initech.ok(
            "POST", f"/api/v1/sessions/{session}/pause", json={"reason": "vendor outage"}
        )
        assert (paused["status"], paused["reason"]) == ("paused", "vendor outage")
        refused = await initech.http.post("/api/v1/runs", json=in_session)
        assert refused.status_code == 409
        assert "is paused (vendor outage): no new run starts in it" in refused.text
        again = await initech.http.post(f"/api/v1/sessions/{session}/pause")
        assert again.status_code == 409 and "only an active session can be paused" in again.text
        assert len(api.received) == 1

        await initech.ok("POST", f"/api/v1/sessions/{session}/resume")
        second = await initech.ok("POST", "/api/v1/runs", 202, json=in_session)
        assert (await initech.finished(second["id"]))["status"] == "passed"
        runs = await initech.poll(
            f"/api/v1/sessions/{session}/runs",
            lambda items: [item["status"] for item in items] == ["passed", "passed"],
        )
        assert [item["run_id"] for item in runs] == [first["id"], second["id"]]
        assert {item["suite"] for item in runs} == {"in a session"}
        completed = await initech.ok("POST", f"/api/v1/sessions/{session}/complete")
        assert (completed["status"], completed["runs"]) == ("completed", 2)
        assert completed["ended_at"] is not None

        outsider = await create_key(
            live_service.settings, organization="hooli", scopes=["read"], name="o"
        )
        async with live_service.client(outsider) as other:
            assert (await other.get(f"/api/v1/sessions/{session}")).status_code == 404
    finally:
        api.close()
