"""What a coding agent asks of Baton, as plain data: validate a flow, run it, read a run's
failures and its context, replay its assertions on the stored responses. The MCP server
(``orchestrator.mcp_server``) exposes these as tools; they raise Baton's own errors, which
it turns into tool errors with the CLI's one-line messages.

Every string returned has passed the run's redactor when it was recorded (the log holds
no secret in clear) and secret captures are masked, as ``baton context`` shows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from events import types as ev
from events.secrets import masked_event
from events.settings import Settings
from orchestrator.errors import UsageError


def _options(path: str, env: str | None, variables: Mapping[str, str] | None) -> Any:
    from orchestrator.execution import Options

    return Options(paths=[Path(path)], environment=env, variables=dict(variables or {}))


def validate_flow(
    path: str, env: str | None = None, variables: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The static checks of ``baton validate``: every problem, before any request."""
    from orchestrator import execution

    jobs = execution.prepare(_options(path, env, variables))
    return {
        "valid": True,
        "flows": [
            {"file": job.plan.loaded.label, "tests": len(job.plan.order), "runs": len(job.runs)}
            for job in jobs
        ],
    }


async def run_flow(
    path: str, env: str | None = None, variables: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run the flow file(s) at ``path`` as ``baton run`` does; the run ids and their tallies."""
    from orchestrator import execution
    from orchestrator.reporters import render_summary

    jobs = execution.prepare(_options(path, env, variables))
    results = await execution.execute(jobs, Settings.from_env())
    passed = all(result.status == "passed" for result in results)
    return {
        "status": "passed" if passed else "failed",
        "exit_code": 0 if passed else 1,
        "runs": [
            {
                "run_id": result.run_id,
                "suite": result.suite,
                "file": result.file,
                "status": result.status,
                "passed": result.count("passed"),
                "failed": result.count("failed"),
                "skipped": result.count("skipped"),
                "duration_ms": round(result.duration_ms, 1),
                "failed_tests": [t.name for t in result.tests if t.status == "failed"],
                # the shared setup (use:) the other runs started from, as the reports name it
                **({"setup": result.setup} if result.setup else {}),
            }
            for result in results
        ],
        "summary": render_summary(results, color=False),
    }


async def run_failures(run_id: str) -> dict[str, Any]:
    """Each failed test of a recorded run with its failed assertions and the last response
    it got, and each skipped test with its reason."""
    recorded = await _run_events(run_id)
    failed_checks: dict[tuple[str, int], list[dict[str, Any]]] = {}
    responses: dict[str, dict[str, Any]] = {}
    failures: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    status = "running"
    for item in recorded:
        event = masked_event(item.event)
        if isinstance(event, ev.AssertionEvaluated) and not event.passed:
            check = {"subject": event.subject, "predicate": event.predicate}
            check |= {"expected": event.expected, "actual": event.actual}
            failed_checks.setdefault((event.test, event.attempt), []).append(check)
        elif isinstance(event, ev.ResponseReceived):
            responses[event.test] = {
                "status": event.status,
                "body_excerpt": event.body_excerpt,
                "duration_ms": event.timings.total_ms,
            }
        elif isinstance(event, ev.TestFailed):
            failures.append(
                {
                    "test": event.test,
                    "category": event.category,
                    "message": event.message,
                    "attempts": event.attempts,
                    "assertions": failed_checks.get((event.test, event.attempts), []),
                    "response": responses.get(event.test),
                    "known_failure": event.known_failure is not None,
                }
            )
        elif isinstance(event, ev.TestSkipped):
            skipped.append({"test": event.test, "reason": event.reason})
        elif isinstance(event, ev.RunCompleted):
            status = event.status
        elif isinstance(event, ev.RunCancelled):
            status = "cancelled"
    return {"run_id": run_id, "status": status, "failed": failures, "skipped": skipped}


async def run_context(run_id: str, position: int | None = None) -> dict[str, Any]:
    """The run's context as ``baton context`` shows it (secret values masked)."""
    from orchestrator import inspect

    settings = Settings.from_env()
    store = await _open(settings)
    try:
        data = await inspect.context_data(store, settings, run_id, position)
    finally:
        await store.aclose()
    return {"run_id": run_id, "context": data}


async def replay(run_id: str, path: str | None = None) -> dict[str, Any]:
    """The flow's current expect and capture sections against the responses stored in the
    run, as ``baton replay`` checks them: no request sent, nothing recorded. ``path``: the
    flow file (default: the one the run recorded)."""
    from events.secrets import Cipher, load_key
    from orchestrator.execution import Options
    from orchestrator.replay import replay as replayed
    from orchestrator.reporters import render_summary

    settings = Settings.from_env()
    cipher = Cipher(load_key(settings.secret_key, settings.home))
    store = await _open(settings)
    try:
        result = await replayed(
            store,
            cipher,
            run_id,
            Options(paths=[]),
            flow=Path(path) if path else None,
            excerpt_limit=settings.excerpt_limit,
        )
    finally:
        await store.aclose()
    return {
        "run_id": run_id,
        "file": result.file,
        "status": result.status,
        "tests": [
            {
                "test": test.name,
                "status": test.status,
                "message": test.message,
                "failed_checks": [
                    {
                        "subject": check.subject,
                        "predicate": check.predicate,
                        "expected": check.expected,
                        "actual": check.actual,
                        "message": check.message,
                    }
                    for check in test.assertions
                    if not check.passed
                ],
            }
            for test in result.tests
        ],
        "summary": render_summary([result], color=False),
    }


async def _run_events(run_id: str) -> list[ev.RecordedEvent]:
    store = await _open(Settings.from_env())
    try:
        recorded = list(await store.read_stream(ev.run_stream(run_id)))
    finally:
        await store.aclose()
    if not recorded:
        raise UsageError(f"no run {run_id!r} in the event store (see `baton runs`)")
    return recorded


async def _open(settings: Settings) -> Any:
    from events import open_store

    return await open_store(settings)
