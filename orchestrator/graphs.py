"""A plan as text, mermaid or Graphviz dot, for ``baton graph``.

A test's name may be any YAML key: ``end`` (a mermaid keyword), brackets, quotes, or two
names that differ only in punctuation (``get-cart``, ``get_cart``). So no name is ever
used as a node id: node *n* is the *n*-th test of the plan, and the name is only its
quoted label, escaped for the format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from orchestrator.planner import Plan

# Inside a quoted mermaid label only `"` ends the label, but the label is then HTML, and
# mermaid rewrites anything shaped like `#name;` or `#65;` into a placeholder of its own
# (which mermaid 11 does not turn back): written as HTML's named entities, every name
# reads as written.
_MERMAID_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "#": "&num;"}
_MERMAID_SPECIAL = re.compile('[&<>"#]')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def render_graph(plan: Plan, fmt: str, setups: Sequence[str] = ()) -> str:
    """``setups``: the labels of the shared setups (``use:``) the flow uses, drawn as
    nodes of their own (``s1``...) before its tests."""
    ids = {test: f"n{index}" for index, test in enumerate(plan.order, start=1)}
    setup_ids = {label: f"s{index}" for index, label in enumerate(setups, start=1)}
    edges: list[tuple[str, str, str]] = [
        (ids[dep], ids[test], kind)
        for test in plan.order
        for dep, kind in plan.dependencies(test).items()
    ]
    edges += [
        (setup_ids[label], ids[test], "setup")
        for test in plan.order
        for label in sorted(plan.setup_needs.get(test, ()))
        if label in setup_ids
    ]
    if fmt == "mermaid":
        lines = ["graph TD"]
        lines += [f'    {id_}["setup {_mermaid_label(s)}"]' for s, id_ in setup_ids.items()]
        lines += [f'    {ids[test]}["{_mermaid_label(test)}"]' for test in plan.order]
        lines += [f"    {dep} -->|{kind}| {test}" for dep, test, kind in edges]
        return "\n".join(lines)
    if fmt == "dot":
        lines = [f'digraph "{_dot_string(plan.loaded.flow.name)}" {{', "    rankdir=LR;"]
        lines += [
            f'    {id_} [label="setup {_dot_string(s)}", shape=box];'
            for s, id_ in setup_ids.items()
        ]
        lines += [f'    {ids[test]} [label="{_dot_string(test)}"];' for test in plan.order]
        lines += [f'    {dep} -> {test} [label="{kind}"];' for dep, test, kind in edges]
        return "\n".join([*lines, "}"])
    lines = [f"{plan.loaded.flow.name} ({plan.loaded.label}): {len(plan.order)} tests"]
    lines += [f"  setup {label} (run first, once for every flow using it)" for label in setups]
    for index, test in enumerate(plan.order, start=1):
        needs = [f"{dep} ({kind})" for dep, kind in plan.dependencies(test).items()]
        needs += [f"{label} (setup)" for label in sorted(plan.setup_needs.get(test, ()))]
        lines.append(f"{index:>3}. {test}" + (f"  <- {', '.join(needs)}" if needs else ""))
    return "\n".join(lines)


def _mermaid_label(name: str) -> str:
    text = _CONTROL.sub(" ", name)
    return _MERMAID_SPECIAL.sub(lambda match: _MERMAID_ENTITIES[match.group()], text)


def _dot_string(text: str) -> str:
    """The inside of a DOT quoted string: only ``"`` needs escaping there, but a
    backslash starts a label escape (``\\n``, ``\\l``), so it is doubled, and a line
    break becomes one."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\n", "\\n"))
