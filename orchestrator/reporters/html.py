"""The HTML report: one self-contained page (inline CSS, a few lines of inline JS, no assets).

Rendered from ``report.html.j2`` (shipped as package data) with autoescaping on: response
bodies are whatever a server sent, and a ``<script>`` in one must show as text, never run.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.reporters import _format as fmt
from orchestrator.reporters.json_report import summarize
from orchestrator.results import RunResult

if TYPE_CHECKING:
    import jinja2

TEMPLATE = "report.html.j2"


@functools.cache
def _environment() -> jinja2.Environment:
    # built on first use, not at import: importing the package must stay cheap for the CLI
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("orchestrator", "reporters"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        show=fmt.show,
        duration=fmt.duration,
        label=fmt.run_label,
        counts=fmt.run_counts,
        problem=fmt.run_problem,
        first_line=fmt.first_line,
        known_failure=fmt.known_failure_note,
        printable=fmt.printable,
        clip=fmt.clip,
        marks={"passed": "✓", "failed": "✗", "skipped": "-"},
    )
    return env


def render_html(results: list[RunResult]) -> str:
    template = _environment().get_template(TEMPLATE)
    return template.render(runs=results, summary=summarize(results))


def write_html(results: list[RunResult], path: Path) -> None:
    """Write the HTML report to ``path``, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(results), encoding="utf-8")
