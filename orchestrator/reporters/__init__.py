"""Reporters render finished results; they never send a request and never run a test.

``ConsoleProgress`` watches runs live; ``render_summary`` and the ``write_*`` functions
turn ``list[RunResult]`` into the console summary and the JUnit, JSON, CTRF and HTML
files.
"""

from orchestrator.reporters.console import (
    ConsoleProgress,
    RunTally,
    color_enabled,
    render_summary,
)
from orchestrator.reporters.ctrf import build_ctrf, write_ctrf
from orchestrator.reporters.html import render_html, write_html
from orchestrator.reporters.json_report import JsonReport, Summary, read_json, summarize, write_json
from orchestrator.reporters.junit import build_junit, write_junit

__all__ = [
    "ConsoleProgress",
    "JsonReport",
    "RunTally",
    "Summary",
    "build_ctrf",
    "build_junit",
    "color_enabled",
    "read_json",
    "render_html",
    "render_summary",
    "summarize",
    "write_ctrf",
    "write_html",
    "write_json",
    "write_junit",
]
