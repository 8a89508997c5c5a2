"""A plan as text, mermaid or Graphviz dot, for ``baton graph``."""

from __future__ import annotations

from orchestrator.planner import Plan


def render_graph(plan: Plan, fmt: str) -> str:
    edges = [
        (dep, test, kind) for test in plan.order for dep, kind in plan.dependencies(test).items()
    ]
    if fmt == "mermaid":
        lines = ["graph TD"]
        lines += [f"    {_id(test)}[{test}]" for test in plan.order]
        lines += [f"    {_id(dep)} -->|{kind}| {_id(test)}" for dep, test, kind in edges]
        return "\n".join(lines)
    if fmt == "dot":
        lines = [f'digraph "{_quote(plan.loaded.flow.name)}" {{', "    rankdir=LR;"]
        lines += [f'    "{_quote(test)}";' for test in plan.order]
        lines += [
            f'    "{_quote(dep)}" -> "{_quote(test)}" [label="{kind}"];'
            for dep, test, kind in edges
        ]
        return "\n".join([*lines, "}"])
    lines = [f"{plan.loaded.flow.name} ({plan.loaded.label}): {len(plan.order)} tests"]
    for index, test in enumerate(plan.order, start=1):
        needs = ", ".join(f"{dep} ({kind})" for dep, kind in plan.dependencies(test).items())
        lines.append(f"{index:>3}. {test}" + (f"  <- {needs}" if needs else ""))
    return "\n".join(lines)


def _id(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
