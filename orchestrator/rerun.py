"""What a rerun runs again, and what it takes over from the run it continues.

One implementation for ``baton rerun`` and the service's rerun. The selection (the failed
tests, or one test onwards) grows by the tests that depend on it (the graph's descendants:
a dependent of a test run again must see its fresh captures), and by the producers of
captures whose ``ttl`` has passed when a selected test needs them (a token that expired
is fetched again). Every other test keeps its result: what it captured is recorded again
in the new run, under it, ciphertext staying ciphertext.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import networkx as nx

from events import types as ev
from events.context import Context, assign_dotted, fold
from events.secrets import Cipher, is_auth_name
from orchestrator.model import Flow, seconds

Reused = ev.VariableCaptured | ev.AuthTokenUpdated


@dataclass(frozen=True)
class Selection:
    """``failed``: the tests that did not pass; ``start``: that test onwards."""

    failed: bool = False
    start: str | None = None


@dataclass(frozen=True)
class Prior:
    """A run's log as a rerun reads it: its context, and when each capture was made."""

    context: Context
    captured_at: Mapping[tuple[str, str], datetime] = field(default_factory=dict)
    """By (test, capture name): the time of its event in the log."""
    rerun_of: frozenset[str] | None = None
    """For a rerun, the tests it ran: every other test had passed in the runs before it,
    and still counts as passed. None for a run that is no rerun."""

    @classmethod
    def of(cls, events: Iterable[ev.RecordedEvent]) -> Prior:
        recorded = list(events)
        captured_at = {
            (r.event.test, r.event.name): r.recorded_at
            for r in recorded
            if isinstance(r.event, ev.VariableCaptured | ev.AuthTokenUpdated)
        }
        context = fold(recorded)
        started = recorded[0].event if recorded else None
        ran = None
        if isinstance(started, ev.RunStarted) and started.continues:
            ran = frozenset(test.name for test in started.plan)
        return cls(context, captured_at, ran)


@dataclass(frozen=True)
class RerunPlan:
    tests: list[str]
    """What runs again, in the plan's order."""
    reused: list[Reused]
    """What the tests not run again captured, as events for the new run to record."""
    expired: list[str]
    """Tests run again (only) because a capture they made had outlived its ttl."""


def graph_of(planned: Sequence[ev.PlannedTest]) -> nx.DiGraph:
    """The dependency graph a RunStarted records: an edge from each test to its dependents."""
    graph: nx.DiGraph = nx.DiGraph()
    graph.add_nodes_from(test.name for test in planned)
    for test in planned:
        graph.add_edges_from((needed, test.name) for needed in test.depends_on)
    return graph


def select(
    order: Sequence[str],
    graph: nx.DiGraph,
    prior: Prior,
    selection: Selection,
    *,
    ttls: Mapping[tuple[str, str], float] | None = None,
    now: datetime | None = None,
) -> RerunPlan:
    """The tests of ``order`` to run again and the captures to reuse. ``ttls``: seconds by
    (test, capture name); with ``now``, a capture older than its ttl counts as gone."""
    context = prior.context
    if selection.start is not None:
        chosen = {selection.start}
    else:
        chosen = {
            name
            for name in order
            if context.statuses.get(name) != "passed"
            and (prior.rerun_of is None or name in prior.rerun_of)
        }
    chosen = _with_descendants(graph, chosen)
    expired: list[str] = []
    if ttls and now is not None:
        stale = {
            test
            for (test, name), ttl in ttls.items()
            if (test, name) in prior.captured_at
            and (now - prior.captured_at[(test, name)]).total_seconds() > ttl
        }
        # a stale producer matters only to a test run again that needs it, directly or not;
        # run again, its own needs may be stale too: repeat until nothing is added
        while True:
            needed = {
                producer
                for producer in stale - chosen
                if any(nx.has_path(graph, producer, test) for test in chosen if test in graph)
            }
            if not needed:
                break
            expired += sorted(needed)
            chosen |= needed
    tests = [name for name in order if name in chosen]
    return RerunPlan(tests, reused_captures(context, chosen), [n for n in order if n in expired])


def capture_ttls(flow: Flow, order: Iterable[str]) -> dict[tuple[str, str], float]:
    """Seconds by (test, capture name) of the captures of ``order`` that declare a ttl."""
    return {
        (test, name): seconds(spec.ttl)
        for test in order
        for name, spec in flow.tests[test].capture.items()
        if spec.ttl is not None
    }


def first_made(chosen: RerunPlan, prior: Prior) -> dict[tuple[str, str], int]:
    """When each reused capture was first made (microseconds since the epoch): the new run
    records it with that time, so that a rerun of the rerun still counts its ttl from then."""
    made = prior.captured_at
    return {
        (event.test, event.name): round(made[(event.test, event.name)].timestamp() * 1e6)
        for event in chosen.reused
        if (event.test, event.name) in made
    }


def _with_descendants(graph: nx.DiGraph, tests: Collection[str]) -> set[str]:
    found = set(tests)
    for name in tests:
        if name in graph:
            found |= nx.descendants(graph, name)
    return found


def reused_captures(context: Context, rerun: Collection[str]) -> list[Reused]:
    """The captures of ``context`` by tests that are not run again, as events for the
    rerun to record (ciphertext stays ciphertext)."""
    secret = set(context.secret_names)
    events: list[Reused] = []
    for test, values in context.captured.items():
        if test in rerun:
            continue
        for name, value in values.items():
            if is_auth_name(name):
                events.append(ev.AuthTokenUpdated(test=test, name=name, value=str(value)))
            else:
                events.append(
                    ev.VariableCaptured(test=test, name=name, value=value, secret=name in secret)
                )
    return events


def reused_namespace(
    reused: Iterable[Reused], cipher: Cipher
) -> tuple[dict[str, object], list[str]]:
    """What templates read of the reused captures (secrets in clear, dotted names nested),
    and the clear secret values among them, for the new run to mask. Raises SecretError if
    the key is not the one the run was recorded with."""
    namespace: dict[str, object] = {}
    hidden: list[str] = []
    for event in reused:
        value = event.value
        if isinstance(event, ev.AuthTokenUpdated) or event.secret:
            value = cipher.decrypt(str(event.value))
            hidden.append(value)
        assign_dotted(namespace, event.name, value)
    return namespace, hidden
