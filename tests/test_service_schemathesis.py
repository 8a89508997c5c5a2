"""Generated requests against the live service, from its own OpenAPI document at /schema:
valid and invalid inputs (schemathesis' positive and negative modes) for every operation,
with a key and without one; no answer is a 5xx.

Driven through schemathesis' Python API and hypothesis directly: its pytest plugin
(``from_fixture``) does not work with this pytest version.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from context_service.keys import create_key
from tests.conftest import LiveService

EXAMPLES = 15
"""Per operation and mode: 30 operations x 2 modes x 15 = some 900 requests."""


def _operations(schema: Any) -> list[Any]:
    """Every operation of the document; one it cannot read fails the test here."""
    return [result.ok() for result in schema.get_all_operations()]


def _fuzz(
    schema: Any,
    session: requests.Session,
    mode: GenerationMode,
    examples: int,
    statuses: Counter[int],
) -> list[str]:
    failures: list[str] = []
    for operation in _operations(schema):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            response = case.call(session=session)
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} {case.query!r} {case.body!r}"
                    f" -> {response.status_code} {response.text[:300]}"
                )

        check()
    return failures


# One test per mode: pytest-xdist can run the two halves of the requests at once. Each mode
# must reach the handlers: some requests served, some refused as invalid (invalid ones create
# nothing, or only what the valid ones created already: no 201 asked of them).
@pytest.mark.parametrize(
    ("mode", "reached"),
    [(GenerationMode.POSITIVE, {200, 201, 400, 404}), (GenerationMode.NEGATIVE, {200, 400, 404})],
    ids=["positive", "negative"],
)
async def test_no_generated_request_gets_a_server_error(
    live_service: LiveService, mode: GenerationMode, reached: set[int]
) -> None:
    key = await create_key(
        live_service.settings, organization="fuzz", scopes=["read", "run", "admin"], name="st"
    )

    statuses: Counter[int] = Counter()

    def fuzz() -> list[str]:
        schema = schemathesis.openapi.from_url(f"{live_service.url}/schema/openapi.json")
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {key}"
            return _fuzz(schema, session, mode, EXAMPLES, statuses)

    # hypothesis runs synchronously: off the event loop, which the run tasks may need
    failures = await asyncio.to_thread(fuzz)
    assert failures == []
    assert reached <= set(statuses), statuses


async def test_without_a_key_no_generated_request_gets_past_401(
    live_service: LiveService,
) -> None:
    def fuzz() -> list[int]:
        schema = schemathesis.openapi.from_url(f"{live_service.url}/schema/openapi.json")
        statuses: list[int] = []
        with requests.Session() as session:
            for operation in _operations(schema):

                @given(case=operation.as_strategy())
                @settings(
                    max_examples=2,
                    deadline=None,
                    derandomize=True,
                    database=None,
                    phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                def check(case: Any) -> None:
                    if case.path.startswith("/api/"):
                        statuses.append(case.call(session=session).status_code)

                check()
        return statuses

    statuses = await asyncio.to_thread(fuzz)
    assert statuses and set(statuses) == {401}
