"""/api/v1/projects: what suites, environments and runs belong to.

A project's id is derived from its organization and name, as the projector derives the id
of the project a run names, so the runs of a project are found by its id whichever way
they were started. Its name therefore never changes; its description may.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.params import FromPath, JSONBody, QueryParameter

from context_service.analytics import MAX_DAYS, Analytics, Period, analytics
from context_service.api.common import Description, Name, PageDep, PrincipalDep, ServicesDep, bulk
from context_service.errors import NotFound
from context_service.listing import Listing, Page, page_of
from events.projections import derive


class ProjectCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Name
    description: Description = ""


class ProjectUpdate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    description: Description | None = None


class ProjectBulkUpdate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: uuid.UUID
    description: Description | None = None


class Project(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    description: str
    created_at: datetime
    updated_at: datetime
    last_run_at: datetime | None


_COLUMNS = (
    "p.id, p.name, p.description, p.created_at, p.updated_at,"
    " (SELECT max(r.started_at) FROM test_runs r WHERE r.project_id = p.id)"
)
_SELECT = f"SELECT {_COLUMNS} FROM service_projects p"
LISTING = Listing(
    base=_SELECT,
    item=Project,
    id_column="p.id",
    sortable={"name": "p.name", "created_at": "p.created_at", "updated_at": "p.updated_at"},
    default_sort="name",
    filters={"name": "p.name"},
)


async def fetch_project(conn: asyncpg.Connection, project_id: uuid.UUID) -> Project:
    row = await conn.fetchrow(f"{_SELECT} WHERE p.id = $1", project_id)
    if row is None:
        raise NotFound(f"no project {project_id}")
    return Project(*row)


async def _create(conn: asyncpg.Connection, org: uuid.UUID, data: ProjectCreate) -> Project:
    project_id = derive("project", org, data.name)
    await conn.execute(
        "INSERT INTO service_projects (id, organization_id, name, description)"
        " VALUES ($1, $2, $3, $4)",
        project_id,
        org,
        data.name,
        data.description,
    )
    return await fetch_project(conn, project_id)


async def _update(
    conn: asyncpg.Connection,
    project_id: uuid.UUID,
    data: ProjectUpdate | ProjectBulkUpdate,
) -> Project:
    status = await conn.execute(
        "UPDATE service_projects SET description = coalesce($2, description),"
        " updated_at = now() WHERE id = $1",
        project_id,
        data.description,
    )
    if status == "UPDATE 0":
        raise NotFound(f"no project {project_id}")
    return await fetch_project(conn, project_id)


class ProjectController(Controller):
    path = "/api/v1/projects"
    tags = ("projects",)

    @get("/")
    async def list_projects(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        page: PageDep,
        name: Annotated[
            str | None, QueryParameter(description="exact name; a,b for either")
        ] = None,
    ) -> Page[Project]:
        async with services.db.tenant(principal.organization_id) as conn:
            return page_of(await LISTING.fetch(conn, page, {"name": name}), Project)

    @post("/")
    async def create_project(
        self, services: ServicesDep, principal: PrincipalDep, data: JSONBody[ProjectCreate]
    ) -> Project:
        async with services.db.tenant(principal.organization_id) as conn:
            return await _create(conn, principal.organization_id, data)

    @post("/bulk")
    async def create_projects(
        self, services: ServicesDep, principal: PrincipalDep, data: JSONBody[list[ProjectCreate]]
    ) -> list[Project]:
        org = principal.organization_id

        async def one(conn: asyncpg.Connection, item: ProjectCreate) -> Project:
            return await _create(conn, org, item)

        async with services.db.tenant(org) as conn:
            return await bulk(services, data, one, conn)

    @patch("/bulk")
    async def update_projects(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        data: JSONBody[list[ProjectBulkUpdate]],
    ) -> list[Project]:
        async def one(conn: asyncpg.Connection, item: ProjectBulkUpdate) -> Project:
            return await _update(conn, item.id, item)

        async with services.db.tenant(principal.organization_id) as conn:
            return await bulk(services, data, one, conn)

    @get("/{project_id:uuid}")
    async def get_project(
        self, services: ServicesDep, principal: PrincipalDep, project_id: FromPath[uuid.UUID]
    ) -> Project:
        async with services.db.tenant(principal.organization_id) as conn:
            return await fetch_project(conn, project_id)

    @patch("/{project_id:uuid}")
    async def update_project(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        project_id: FromPath[uuid.UUID],
        data: JSONBody[ProjectUpdate],
    ) -> Project:
        async with services.db.tenant(principal.organization_id) as conn:
            return await _update(conn, project_id, data)

    @delete("/{project_id:uuid}")
    async def delete_project(
        self, services: ServicesDep, principal: PrincipalDep, project_id: FromPath[uuid.UUID]
    ) -> None:
        """Delete the project with its suites and environments; its runs stay in the log."""
        async with services.db.tenant(principal.organization_id) as conn:
            status = await conn.execute("DELETE FROM service_projects WHERE id = $1", project_id)
        if status == "DELETE 0":
            raise NotFound(f"no project {project_id}")

    @get("/{project_id:uuid}/analytics")
    async def project_analytics(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        project_id: FromPath[uuid.UUID],
        days: Annotated[
            int, QueryParameter(ge=1, le=MAX_DAYS, description="UTC days up to until")
        ] = 30,
        until: Annotated[
            date | None, QueryParameter(description="the last day (UTC) looked at; today")
        ] = None,
        environment: Annotated[
            str | None, QueryParameter(description="only this environment (its name)")
        ] = None,
        test: Annotated[str | None, QueryParameter(description="only this test (its name)")] = None,
    ) -> Analytics:
        """Daily metrics per test and environment, run durations, flaky tests, slowdowns,
        failure categories and service health over the last ``days`` (docs/analytics.md)."""
        period = Period(
            until=until or datetime.now(UTC).date(),
            days=days,
            environment=environment or None,
            test=test or None,
        )
        async with services.db.tenant(principal.organization_id) as conn:
            return await analytics(conn, services.store, project_id, period)
