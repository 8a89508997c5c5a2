"""/api/v1/suites: flow files, uploaded as text and checked as ``baton validate`` checks them.

A suite is named by its flow's ``name:``; its id is derived from its project and that name,
as the projector derives the id of the suite a run records, so a suite's runs and test
cases carry its id. Replacing a suite's file keeps its name: a flow with another name is
another suite.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post, put
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from context_service.api.common import PageDep, PrincipalDep, ServicesDep, bulk, exists
from context_service.errors import Conflict, NotFound
from context_service.flows import MAX_FLOW_BYTES, check_upload, load_text, safe_filename
from context_service.listing import Listing, Page, page_of
from events.projections import derive

# a little over MAX_FLOW_BYTES, so that the flow's own limit answers with its own message
Content = Annotated[str, msgspec.Meta(max_length=MAX_FLOW_BYTES * 2)]
Filename = Annotated[str, msgspec.Meta(max_length=200)]


class SuiteCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    project_id: uuid.UUID
    content: Content
    """The flow file's text (YAML)."""
    filename: Filename = "flow.yaml"


class SuiteReplace(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    content: Content
    filename: Filename | None = None


class SuiteBulkReplace(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: uuid.UUID
    content: Content
    filename: Filename | None = None


class Suite(msgspec.Struct, frozen=True):
    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    filename: str
    digest: str
    tests: list[str]
    created_at: datetime
    updated_at: datetime


class SuiteFile(Suite, frozen=True):
    content: str


_COLUMNS = "id, project_id, name, filename, digest, tests, created_at, updated_at"
_SELECT = f"SELECT {_COLUMNS}, content FROM service_suites"
LISTING = Listing(
    base=f"SELECT {_COLUMNS} FROM service_suites",
    item=Suite,
    id_column="id",
    sortable={"name": "name", "created_at": "created_at", "updated_at": "updated_at"},
    default_sort="name",
    filters={"project_id": "project_id", "name": "name"},
)


async def fetch_suite(conn: asyncpg.Connection, suite_id: uuid.UUID) -> SuiteFile:
    row = await conn.fetchrow(f"{_SELECT} WHERE id = $1", suite_id)
    if row is None:
        raise NotFound(f"no suite {suite_id}")
    return SuiteFile(*row)


async def _project_variables(conn: asyncpg.Connection, project_id: uuid.UUID) -> set[str]:
    """Every variable name an environment of the project defines: a flow may read them."""
    rows = await conn.fetch(
        "SELECT DISTINCT v.name FROM environment_variables v"
        " JOIN service_environments e ON e.id = v.environment_id WHERE e.project_id = $1",
        project_id,
    )
    return {row[0] for row in rows}


async def _create(conn: asyncpg.Connection, org: uuid.UUID, data: SuiteCreate) -> SuiteFile:
    if not await exists(conn, "service_projects", data.project_id):
        raise NotFound(f"no project {data.project_id}")
    filename = safe_filename(data.filename)
    loaded = load_text(data.content, filename)
    check_upload(loaded, await _project_variables(conn, data.project_id))
    suite_id = derive("suite", data.project_id, loaded.flow.name)
    await conn.execute(
        "INSERT INTO service_suites (id, organization_id, project_id, name, filename, content,"
        " digest, tests) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        suite_id,
        org,
        data.project_id,
        loaded.flow.name,
        filename,
        data.content,
        loaded.digest,
        list(loaded.flow.tests),
    )
    return await fetch_suite(conn, suite_id)


async def _replace(
    conn: asyncpg.Connection, suite_id: uuid.UUID, data: SuiteReplace | SuiteBulkReplace
) -> SuiteFile:
    current = await fetch_suite(conn, suite_id)
    filename = safe_filename(data.filename) if data.filename else current.filename
    loaded = load_text(data.content, filename)
    if loaded.flow.name != current.name:
        raise Conflict(
            f"this suite is {current.name!r} and the new file's name is {loaded.flow.name!r}: "
            "a flow with another name is another suite (create it instead)"
        )
    check_upload(loaded, await _project_variables(conn, current.project_id))
    await conn.execute(
        "UPDATE service_suites SET content = $2, filename = $3, digest = $4, tests = $5,"
        " updated_at = now() WHERE id = $1",
        suite_id,
        data.content,
        filename,
        loaded.digest,
        list(loaded.flow.tests),
    )
    return await fetch_suite(conn, suite_id)


class SuiteController(Controller):
    path = "/api/v1/suites"
    tags = ("suites",)

    @get("/")
    async def list_suites(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        page: PageDep,
        project_id: FromQuery[uuid.UUID | None] = None,
        name: Annotated[
            str | None, QueryParameter(description="the flow's name; a,b for either")
        ] = None,
    ) -> Page[Suite]:
        async with services.db.tenant(principal.organization_id) as conn:
            found = await LISTING.fetch(conn, page, {"project_id": project_id, "name": name})
        return page_of(found, Suite)

    @post("/")
    async def create_suite(
        self, services: ServicesDep, principal: PrincipalDep, data: JSONBody[SuiteCreate]
    ) -> SuiteFile:
        """Upload a flow file: 422 with the CLI's messages if a static check fails."""
        async with services.db.tenant(principal.organization_id) as conn:
            return await _create(conn, principal.organization_id, data)

    @post("/bulk")
    async def create_suites(
        self, services: ServicesDep, principal: PrincipalDep, data: JSONBody[list[SuiteCreate]]
    ) -> list[SuiteFile]:
        org = principal.organization_id

        async def one(conn: asyncpg.Connection, item: SuiteCreate) -> SuiteFile:
            return await _create(conn, org, item)

        async with services.db.tenant(org) as conn:
            return await bulk(services, data, one, conn)

    @patch("/bulk")
    async def replace_suites(
        self, services: ServicesDep, principal: PrincipalDep, data: JSONBody[list[SuiteBulkReplace]]
    ) -> list[SuiteFile]:
        async def one(conn: asyncpg.Connection, item: SuiteBulkReplace) -> SuiteFile:
            return await _replace(conn, item.id, item)

        async with services.db.tenant(principal.organization_id) as conn:
            return await bulk(services, data, one, conn)

    @get("/{suite_id:uuid}")
    async def get_suite(
        self, services: ServicesDep, principal: PrincipalDep, suite_id: FromPath[uuid.UUID]
    ) -> SuiteFile:
        async with services.db.tenant(principal.organization_id) as conn:
            return await fetch_suite(conn, suite_id)

    @put("/{suite_id:uuid}")
    async def replace_suite(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        suite_id: FromPath[uuid.UUID],
        data: JSONBody[SuiteReplace],
    ) -> SuiteFile:
        """Replace the flow file (same checks as an upload; the flow's name must stay)."""
        async with services.db.tenant(principal.organization_id) as conn:
            return await _replace(conn, suite_id, data)

    @delete("/{suite_id:uuid}")
    async def delete_suite(
        self, services: ServicesDep, principal: PrincipalDep, suite_id: FromPath[uuid.UUID]
    ) -> None:
        async with services.db.tenant(principal.organization_id) as conn:
            status = await conn.execute("DELETE FROM service_suites WHERE id = $1", suite_id)
        if status == "DELETE 0":
            raise NotFound(f"no suite {suite_id}")
