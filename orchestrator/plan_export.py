"""``baton plan --json``: the checked plan as data, for CI tools and coding agents.

Shape (``version`` changes only if a field's meaning or type changes; new fields may be
added, so readers should ignore what they do not know)::

    {
      "version": 1,
      "flows": [
        {
          "file": "examples/shop/checkout.yaml",
          "name": "shop checkout",
          "runs": 1,                       # one per --data row
          "order": ["health", "login", ...],   # the order the runner starts them in
          "tests": [
            {
              "name": "profile",
              "depends_on": [{"test": "login", "kind": "token"}],  # token | data | order
              "needs": ["auth.token", "user_id", "username"],
              "captures": ["auth.token"],
              "tags": ["auth"],
              "setups": ["login.yaml::login"]   # shared setups (use:) it reads; only if any
            }
          ]
        }
      ]
    }

``tests`` is in ``order``; ``depends_on`` in that order too. ``needs`` lists the names a
test's templates read without a ``| default(...)``: variables, captures of other tests,
``env.NAME``, ``secrets.NAME`` (names only, never a value), ``poll.*`` left out.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from events.types import DependencyKind
from orchestrator import templating
from orchestrator.loader import test_parts
from orchestrator.planner import POLL, Plan

PLAN_VERSION = 1


class Dependency(msgspec.Struct):
    test: str
    kind: DependencyKind


class PlannedTestView(msgspec.Struct, omit_defaults=True):
    name: str
    depends_on: list[Dependency]
    needs: list[str]
    captures: list[str]
    tags: list[str]
    setups: list[str] = []
    """The shared setups (``use:``) whose captures it reads, by label; left out if none."""


class FlowPlan(msgspec.Struct):
    file: str
    name: str
    runs: int
    order: list[str]
    tests: list[PlannedTestView]


class PlanDocument(msgspec.Struct):
    version: int
    flows: list[FlowPlan]


def _needs(plan: Plan, test: str) -> list[str]:
    found = {
        name
        for _, value in test_parts(plan.loaded.flow.tests[test])
        for text in templating.template_strings(value)
        for name in templating.references(text)
        if name.split(".")[0] != POLL
    }
    return sorted(found)


def flow_plan(plan: Plan, runs: int = 1) -> FlowPlan:
    position = {name: index for index, name in enumerate(plan.order)}
    tests = []
    for name in plan.order:
        definition = plan.loaded.flow.tests[name]
        dependencies = sorted(plan.dependencies(name).items(), key=lambda dep: position[dep[0]])
        tests.append(
            PlannedTestView(
                name=name,
                depends_on=[Dependency(dep, kind) for dep, kind in dependencies],
                needs=_needs(plan, name),
                captures=list(definition.capture),
                tags=list(definition.tags),
                setups=sorted(plan.setup_needs.get(name, ())),
            )
        )
    return FlowPlan(
        file=plan.loaded.label,
        name=plan.loaded.flow.name,
        runs=runs,
        order=list(plan.order),
        tests=tests,
    )


def encode_plans(plans: Iterable[tuple[Plan, int]]) -> bytes:
    """The document of ``(plan, runs)`` pairs, indented for a reader."""
    document = PlanDocument(PLAN_VERSION, [flow_plan(plan, runs) for plan, runs in plans])
    return msgspec.json.format(msgspec.json.encode(document), indent=2)
