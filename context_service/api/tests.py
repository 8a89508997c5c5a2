"""/api/v1/tests: test cases as the runs recorded them, with their latest verdict.

A test case is (suite, test, definition hash): editing a test in a flow file makes a new
case, so a case's history is the history of one definition. The rows come from the read
tables (the projector keeps them), read under row-level security.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec
from litestar import Controller, get
from litestar.params import FromPath, FromQuery, QueryParameter

from context_service.api.common import PageDep, PrincipalDep, ServicesDep
from context_service.errors import NotFound
from context_service.listing import Listing, Page, page_of


class TestCase(msgspec.Struct, frozen=True):
    __test__ = False  # not a pytest class

    id: uuid.UUID
    suite_id: uuid.UUID
    project_id: uuid.UUID
    suite: str
    name: str
    definition_hash: str
    created_at: datetime
    last_run_at: datetime
    last_status: str | None
    last_run_id: uuid.UUID | None
    depends_on: list[str]


_BASE = """
SELECT c.id, c.suite_id, s.project_id, s.name AS suite, c.name, c.definition_hash,
       c.created_at, c.last_run_at, last.status AS last_status, last.run_id AS last_run_id,
       ARRAY(SELECT rc.name FROM test_dependencies d JOIN test_cases rc
             ON rc.id = d.required_test_id WHERE d.dependent_test_id = c.id
             ORDER BY rc.name) AS depends_on
FROM test_cases c
JOIN test_suites s ON s.id = c.suite_id
LEFT JOIN LATERAL (
    SELECT r.status, r.run_id FROM test_results r WHERE r.test_case_id = c.id
    ORDER BY r.started_at DESC NULLS LAST LIMIT 1
) last ON true
"""
LISTING = Listing(
    base=f"SELECT * FROM ({_BASE}) AS t",
    item=TestCase,
    id_column="t.id",
    sortable={
        "name": "t.name",
        "suite": "t.suite",
        "created_at": "t.created_at",
        "last_run_at": "t.last_run_at",
    },
    default_sort="suite,name",
    filters={
        "suite_id": "t.suite_id",
        "project_id": "t.project_id",
        "name": "t.name",
        "last_status": "t.last_status",
    },
)


class TestCaseController(Controller):
    __test__ = False

    path = "/api/v1/tests"
    tags = ("tests",)

    @get("/")
    async def list_tests(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        page: PageDep,
        suite_id: FromQuery[uuid.UUID | None] = None,
        project_id: FromQuery[uuid.UUID | None] = None,
        name: FromQuery[str | None] = None,
        last_status: Annotated[
            str | None, QueryParameter(description="passed, failed, skipped...; a,b for either")
        ] = None,
    ) -> Page[TestCase]:
        filters = {
            "suite_id": suite_id,
            "project_id": project_id,
            "name": name,
            "last_status": last_status,
        }
        async with services.db.tenant(principal.organization_id) as conn:
            return page_of(await LISTING.fetch(conn, page, filters), TestCase)

    @get("/{test_id:uuid}")
    async def get_test(
        self, services: ServicesDep, principal: PrincipalDep, test_id: FromPath[uuid.UUID]
    ) -> TestCase:
        async with services.db.tenant(principal.organization_id) as conn:
            row = await conn.fetchrow(f"{LISTING.base} WHERE t.id = $1", test_id)
        if row is None:
            raise NotFound(f"no test {test_id}")
        return TestCase(*row)
