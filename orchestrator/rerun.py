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
from events.store import EventStore
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
    outcomes: Mapping[str, str] = field(default_factory=dict)
    """The run's tests, each with its last status ("" if it never ended): those of its
    plan and, for a rerun, those it carried over, as the runs it continues left them.
    ``--failed`` chooses among these alone: a shard's or a worker's run is one unit of
    its flow, and the flow's other units are other runs' tests."""

    @classmethod
    def of(cls, events: Iterable[ev.RecordedEvent], before: Prior | None = None) -> Prior:
        """``before``: the Prior of the run this one continues, if it does and its log is
        still there; without it a rerun's carried-over tests count as passed (a --failed
        rerun carries over only tests that passed)."""
        recorded = list(events)
        captured_at = {
            (r.event.test, r.event.name): r.recorded_at
            for r in recorded
            if isinstance(r.event, ev.VariableCaptured | ev.AuthTokenUpdated)
        }
        context = fold(recorded)
        started = recorded[0].event if recorded else None
        if isinstance(started, ev.RunStarted):
            planned = [test.name for test in started.plan]
        else:
            planned = list(context.statuses)
        outcomes = dict(before.outcomes) if before is not None else {}
        outcomes.update((name, context.statuses.get(name, "")) for name in planned)
        return cls(context, captured_at, outcomes)


async def read_chain(
    store: EventStore, events: Sequence[ev.RecordedEvent]
) -> list[Sequence[ev.RecordedEvent]]:
    """The run's log, then the log of each run it continues (a rerun's rerun...), newest
    first, as far back as the logs are still stored."""
    chain = [events]
    while chain[-1] and isinstance(started := chain[-1][0].event, ev.RunStarted):
        if not started.continues:
            break
        earlier = await store.read_stream(ev.run_stream(started.continues))
        if not earlier:
            break
        chain.append(earlier)
    return chain


async def read_prior(store: EventStore, events: Sequence[ev.RecordedEvent]) -> Prior:
    """The Prior of a run from its log, and for a rerun from the logs of the runs it
    continues: a test a ``--from`` rerun carried over still failed is not forgotten."""
    prior = None
    for log in reversed(await read_chain(store, events)):
        prior = Prior.of(log, prior)
    assert prior is not None
    return prior


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
        outcomes = prior.outcomes
        chosen = {name for name in order if name in outcomes and outcomes[name] != "passed"}
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
