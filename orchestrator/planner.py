"""The dependency graph of a flow, and every graph problem found before a request is sent.

Dependencies come from three places: *token* (a test reads an ``auth.*`` value another test
captures), *data* (it reads any other captured value), both inferred from its templates,
and *order* (``depends_on``), explicit.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

import msgspec
import networkx as nx

from events.secrets import reads_auth, secret_references
from events.types import DependencyKind, PlannedTest
from orchestrator import templating
from orchestrator.compiled import CompiledTest, compile_test
from orchestrator.errors import Problem, UsageError
from orchestrator.loader import LoadedFlow, test_parts
from orchestrator.model import Test


@dataclass(frozen=True)
class Scope:
    """The names a flow can read besides captures, known before the run starts."""

    variables: Collection[str]
    env: Mapping[str, str]
    secrets: Mapping[str, str]
    shared: Mapping[str, str] = field(default_factory=dict)
    """What the flow's shared setups (``use:``) capture: name -> the setup's label."""


@dataclass(frozen=True)
class Plan:
    loaded: LoadedFlow
    graph: nx.DiGraph
    """Edges run from the test that provides to the test that needs; attribute ``kind``."""
    order: list[str]
    """A topological order, stable by position in the file."""
    setup_needs: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """By test: the labels of the shared setups whose captures it reads."""

    def dependencies(self, test: str) -> dict[str, DependencyKind]:
        return {dep: self.graph.edges[dep, test]["kind"] for dep in self.graph.predecessors(test)}

    def only(self, tests: Collection[str]) -> Plan:
        """The plan of ``tests`` alone, in this plan's order: what they need of the others
        is theirs to bring (a rerun's reused captures), or among ``tests`` (a --tag
        selection with what it depends on)."""
        chosen = set(tests)
        order = [name for name in self.order if name in chosen]
        needs = {name: self.setup_needs[name] for name in order if name in self.setup_needs}
        return Plan(self.loaded, self.graph.subgraph(order).copy(), order, needs)

    @functools.cached_property
    def compiled(self) -> dict[str, CompiledTest]:
        """Each test of the plan, compiled on first use and shared by every run of it."""
        flow = self.loaded.flow
        return {name: compile_test(name, flow.tests[name], flow.defaults) for name in self.order}

    @functools.cached_property
    def secret_names(self) -> frozenset[str]:
        """Every secret the flow mentions, also those only read under ``| default(...)``:
        what a run's redactor must know before the first request."""
        flow = self.loaded.flow
        parts = [part for test in flow.tests.values() for part in test_parts(test)]
        parts.append(("variables", flow.variables))
        parts.append(("defaults.auth", msgspec.to_builtins(flow.defaults.auth)))
        return frozenset(
            name
            for _, value in parts
            for text in templating.template_strings(value)
            for name in secret_references(text)
        )

    @functools.cached_property
    def planned(self) -> list[PlannedTest]:
        """What RunStarted records of the plan; the same for every run of it."""
        tests = self.loaded.flow.tests
        return [
            PlannedTest(name, self.dependencies(name), definition_hash(tests[name]))
            for name in self.order
        ]


def definition_hash(test: object) -> str:
    return hashlib.sha256(msgspec.json.encode(test)).hexdigest()[:16]


def plan(loaded: LoadedFlow, scope: Scope, tags: Collection[str] = ()) -> Plan:
    """Build the graph; raises UsageError naming every problem (file, test, variable, cycle)."""
    flow, label = loaded.flow, loaded.label
    problems: list[Problem] = []
    providers: dict[str, str] = {}
    for name, test in flow.tests.items():
        for captured in test.capture:
            if captured in providers:
                problems.append(
                    Problem(
                        label,
                        f"tests.{name}.capture.{captured}",
                        f"{captured!r} is already captured by test {providers[captured]!r}",
                        "give one of them another name",
                    )
                )
            else:
                providers[captured] = name

    below = _below(providers)
    problems.extend(_reserved(label, flow.tests, scope))
    shared_below = _below(scope.shared)
    setup_needs: dict[str, set[str]] = {}
    for captured, name in providers.items():
        if captured in scope.shared:
            problems.append(
                Problem(
                    label,
                    f"tests.{name}.capture.{captured}",
                    f"{captured!r} is already captured by the shared setup "
                    f"{scope.shared[captured]}",
                    "give one of them another name",
                )
            )

    graph: nx.DiGraph = nx.DiGraph()
    graph.add_nodes_from(flow.tests)
    for name, test in flow.tests.items():
        if test.service is not None and test.service not in flow.services:
            declared = ", ".join(flow.services) or "none"
            problems.append(
                Problem(
                    label,
                    f"tests.{name}.service",
                    f"no service {test.service!r} among the declared services ({declared})",
                    "declare it under services (in the flow or the environment file)",
                )
            )
        for dep in test.depends_on:
            if dep not in flow.tests:
                problems.append(
                    Problem(
                        label,
                        f"tests.{name}.depends_on",
                        f"unknown test {dep!r}",
                        _did_you_mean(dep, flow.tests),
                    )
                )
            else:
                graph.add_edge(dep, name, kind="order")
        for where, reference in _references(test_parts(test)):
            if reference.split(".")[0] == POLL:
                problem = _poll_problem(reference)
                if problem:
                    problems.append(Problem(label, f"tests.{name}.{where}", *problem))
                continue
            found = _providers(reference, providers, below)
            if found:
                kind: DependencyKind = "token" if reads_auth(reference) else "data"
                for provider in found - {name}:
                    # a test reading a token and data from the same test: token wins
                    if graph.get_edge_data(provider, name, {}).get("kind") != "token":
                        graph.add_edge(provider, name, kind=kind)
                continue
            setups = _providers(reference, scope.shared, shared_below)
            if setups:
                setup_needs.setdefault(name, set()).update(setups)
                continue
            problem = _undefined(reference, scope, providers, in_test=True)
            if problem:
                problems.append(Problem(label, f"tests.{name}.{where}", *problem))
        if test.until is None or test.until.next is None:
            for where, value in test_parts(test):
                if any(_POLL_NEXT.search(text) for text in templating.template_strings(value)):
                    problems.append(
                        Problem(
                            label,
                            f"tests.{name}.{where}",
                            "poll.next is set only by until.next, which this test has not",
                            "add until: {next: ...} naming where each response gives the next",
                        )
                    )
                    break
    for where, reference in _references(
        [
            ("base_url", flow.base_url),
            ("defaults.headers", flow.defaults.headers),
            ("defaults.tls", msgspec.to_builtins(flow.defaults.tls)),
            ("defaults.auth", msgspec.to_builtins(flow.defaults.auth)),
            *((f"variables.{k}", v) for k, v in flow.variables.items()),
            *((f"services.{k}.base_url", v.base_url) for k, v in flow.services.items()),
        ]
    ):
        setups = _providers(reference, scope.shared, shared_below)
        if setups:
            # read by every test: a header of defaults, the base URL, a variable
            for name in flow.tests:
                setup_needs.setdefault(name, set()).update(setups)
            continue
        problem = _undefined(reference, scope, {})
        if problem:
            problems.append(Problem(label, where, *problem))

    if not problems:
        try:
            cycle = nx.find_cycle(graph)
        except nx.NetworkXNoCycle:
            pass
        else:
            path = " -> ".join([edge[0] for edge in cycle] + [cycle[0][0]])
            problems.append(
                Problem(label, "tests", f"dependency cycle: {path}", "break one of these links")
            )
    if problems:
        raise UsageError(problems)

    position = {name: index for index, name in enumerate(flow.tests)}
    order = list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
    full = Plan(loaded, graph, order, {k: frozenset(v) for k, v in setup_needs.items()})
    if not tags:
        return full
    wanted = {name for name, test in flow.tests.items() if set(test.tags) & set(tags)}
    needed = set(wanted)
    for name in wanted:
        needed |= nx.ancestors(graph, name)
    # the order of the whole plan restricted to an ancestor-closed set is the order
    # the set sorts to by itself: nothing outside it comes before anything in it
    return full.only(needed)


def _references(
    parts: Iterator[tuple[str, object]] | list[tuple[str, object]],
) -> Iterator[tuple[str, str]]:
    for where, value in parts:
        for text in templating.template_strings(value):
            for reference in sorted(templating.references(text)):
                yield where, reference


def _providers(
    reference: str, providers: Mapping[str, str], below: Mapping[str, set[str]]
) -> set[str]:
    """The tests capturing this name: the longest captured prefix of it (``user`` for
    ``user.id``), or every capture below it (``auth`` for ``auth.token``, from ``below``:
    a scan of every capture per reference would make planning quadratic)."""
    parts = reference.split(".")
    for end in range(len(parts), 0, -1):
        provider = providers.get(".".join(parts[:end]))
        if provider is not None:
            return {provider}
    return below.get(reference, set())


def _below(providers: Mapping[str, str]) -> dict[str, set[str]]:
    """Each dotted prefix of a captured name (``auth`` of ``auth.token``) -> its tests."""
    below: dict[str, set[str]] = {}
    for name, test in providers.items():
        parts = name.split(".")
        for end in range(1, len(parts)):
            below.setdefault(".".join(parts[:end]), set()).add(test)
    return below


POLL = "poll"
"""The namespace of a test's own polling values: ``poll.attempt``, ``poll.next``."""
POLL_NAMES = ("poll.attempt", "poll.next")
_POLL_NEXT = re.compile(r"\bpoll\s*(?:\.\s*next\b|\[\s*['\"]next['\"]\s*\])")


RESERVED = {
    POLL: "poll.* holds the values of until polling",
    "env": "env.* holds the process environment",
    "secrets": "secrets.* holds the secrets",
}
"""The namespaces a variable would hide: ``{{ env.URL | default(...) }}`` under a
variable ``env`` would quietly take its default."""


def _reserved(label: str, tests: Mapping[str, Test], scope: Scope) -> Iterator[Problem]:
    """A variable named as a namespace would hide it; a capture named ``poll``, the test's
    polling values."""
    hint = f"give it another name: {RESERVED[POLL]}"
    for name, holds in RESERVED.items():
        if name in scope.variables:
            yield Problem(
                label,
                f"variables.{name}",
                f"{name!r} is a reserved name",
                f"give it another name: {holds}",
            )
    for name, test in tests.items():
        for captured in test.capture:
            if captured.split(".")[0] == POLL:
                yield Problem(
                    label, f"tests.{name}.capture.{captured}", f"{POLL!r} is a reserved name", hint
                )


def _poll_problem(reference: str) -> tuple[str, str] | None:
    if reference in (POLL, "poll.attempt"):
        return None
    if reference == "poll.next":
        # references() leaves out names under | default(...): this one has none
        return (
            "poll.next has no value for the first request",
            "write {{ poll.next | default('...') }} with what the first request sends",
        )
    return (
        f"{reference!r} is not a polling value",
        _did_you_mean(reference, POLL_NAMES) or "poll has attempt and next",
    )


def _undefined(
    reference: str, scope: Scope, providers: Mapping[str, str], *, in_test: bool = False
) -> tuple[str, str] | None:
    root, _, rest = reference.partition(".")
    if root == POLL:
        return (
            f"{reference} has a value only inside a test",
            "read it in a test's request, expect or until",
        )
    if root == "env":
        key = rest.split(".")[0]
        if key and key not in scope.env:
            return (
                f"environment variable {key} is not set",
                f"export {key}=..., or write {{{{ env.{key} | default('...') }}}}",
            )
        return None
    if root == "secrets":
        key = rest.split(".")[0]
        if key and key not in scope.secrets:
            return (
                f"secret {key} is not set",
                f"export {key}=... or put it in the file given with --secrets",
            )
        return None
    if root in scope.variables:
        return None
    names = [*scope.variables, *providers, *scope.shared, *(POLL_NAMES if in_test else ())]
    hint = _did_you_mean(reference, names) or (
        "capture it in a test, or define it in variables, --var, --env or --data"
    )
    return (f"variable {reference!r} is not defined", hint)


def _did_you_mean(name: str, names: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"did you mean {close[0]!r}?" if close else ""
