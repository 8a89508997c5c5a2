"""/api/v1/environments: a project's environments and their variables.

A run in an environment reads its variables as ``{{ NAME }}`` and ``{{ env.NAME }}`` (as a
``--env`` file and the process environment are read from the CLI), and its secret
variables as ``{{ secrets.NAME }}``. A secret's value is write-only: it is stored
encrypted (events.secrets.Cipher) and every answer shows ``value: null`` for it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.params import FromPath, FromQuery, JSONBody

from context_service.api.common import (
    Description,
    Name,
    PageDep,
    PrincipalDep,
    ServicesDep,
    bulk,
    exists,
)
from context_service.errors import NotFound, Unprocessable
from context_service.listing import Listing, Page, page_of
from events.projections import derive
from events.secrets import Cipher

VariableName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
]
Value = Annotated[str, msgspec.Meta(max_length=64 * 1024)]


class VariableIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: VariableName
    value: Value
    secret: bool = False


class Variable(msgspec.Struct, frozen=True):
    name: str
    value: str | None
    """None for a secret: its value is never returned."""
    secret: bool


class EnvironmentCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    project_id: uuid.UUID
    name: Name
    description: Description = ""
    variables: Annotated[list[VariableIn], msgspec.Meta(max_length=500)] = []


class EnvironmentUpdate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    description: Description | None = None
    variables: Annotated[list[VariableIn], msgspec.Meta(max_length=500)] = []
    """Set (added or replaced) by name."""
    remove: Annotated[list[VariableName], msgspec.Meta(max_length=500)] = []
    """Names of variables to delete."""


class EnvironmentBulkUpdate(
    EnvironmentUpdate, forbid_unknown_fields=True, frozen=True, kw_only=True
):
    id: uuid.UUID


class Environment(msgspec.Struct, frozen=True):
    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    description: str
    created_at: datetime
    updated_at: datetime
    variables: list[Variable]


_SELECT = (
    "SELECT e.id, e.project_id, e.name, e.description, e.created_at, e.updated_at,"
    " coalesce((SELECT array_agg(ARRAY[v.name, CASE WHEN v.secret THEN NULL ELSE v.value END,"
    " v.secret::text] ORDER BY v.name) FROM environment_variables v"
    " WHERE v.environment_id = e.id), '{}') AS variables"
    " FROM service_environments e"
)
_UPSERT = (
    "INSERT INTO environment_variables (environment_id, organization_id, name, value, secret)"
    " SELECT $1, $2, * FROM unnest($3::text[], $4::text[], $5::bool[])"
    " ON CONFLICT (environment_id, name) DO UPDATE"
    " SET value = excluded.value, secret = excluded.secret"
)


class _Row(msgspec.Struct):
    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    description: str
    created_at: datetime
    updated_at: datetime
    variables: list[list[str | None]]

    def public(self) -> Environment:
        variables = [
            Variable(name or "", value, flag == "true") for name, value, flag in self.variables
        ]
        return Environment(
            self.id,
            self.project_id,
            self.name,
            self.description,
            self.created_at,
            self.updated_at,
            variables,
        )


LISTING = Listing(
    base=f"SELECT * FROM ({_SELECT}) AS e",
    item=Environment,
    make=lambda row: _Row(*row).public(),
    id_column="e.id",
    sortable={"name": "e.name", "created_at": "e.created_at", "updated_at": "e.updated_at"},
    default_sort="name",
    filters={"project_id": "e.project_id", "name": "e.name"},
)


async def fetch_environment(conn: asyncpg.Connection, environment_id: uuid.UUID) -> Environment:
    row = await conn.fetchrow(f"{_SELECT} WHERE e.id = $1", environment_id)
    if row is None:
        raise NotFound(f"no environment {environment_id}")
    return _Row(*row).public()


async def _set_variables(
    conn: asyncpg.Connection,
    cipher: Cipher,
    environment_id: uuid.UUID,
    org: uuid.UUID,
    variables: list[VariableIn],
) -> None:
    if not variables:
        return
    seen: set[str] = set()
    for variable in variables:
        if variable.name in seen:
            raise Unprocessable(f"variable {variable.name!r} is given twice")
        seen.add(variable.name)
    values = [cipher.encrypt(v.value) if v.secret else v.value for v in variables]
    await conn.execute(
        _UPSERT,
        environment_id,
        org,
        [v.name for v in variables],
        values,
        [v.secret for v in variables],
    )


async def _create(
    conn: asyncpg.Connection, cipher: Cipher, org: uuid.UUID, data: EnvironmentCreate
) -> Environment:
    if not await exists(conn, "service_projects", data.project_id):
        raise NotFound(f"no project {data.project_id}")
    environment_id = derive("environment", data.project_id, data.name)
    await conn.execute(
        "INSERT INTO service_environments (id, organization_id, project_id, name, description)"
        " VALUES ($1, $2, $3, $4, $5)",
        environment_id,
        org,
        data.project_id,
        data.name,
        data.description,
    )
    await _set_variables(conn, cipher, environment_id, org, data.variables)
    return await fetch_environment(conn, environment_id)


async def _update(
    conn: asyncpg.Connection,
    cipher: Cipher,
    org: uuid.UUID,
    environment_id: uuid.UUID,
    data: EnvironmentUpdate,
) -> Environment:
    status = await conn.execute(
        "UPDATE service_environments SET description = coalesce($2, description),"
        " updated_at = now() WHERE id = $1",
        environment_id,
        data.description,
    )
    if status == "UPDATE 0":
        raise NotFound(f"no environment {environment_id}")
    if data.remove:
        await conn.execute(
            "DELETE FROM environment_variables WHERE environment_id = $1 AND name = ANY($2)",
            environment_id,
            data.remove,
        )
    await _set_variables(conn, cipher, environment_id, org, data.variables)
    return await fetch_environment(conn, environment_id)


class EnvironmentController(Controller):
    path = "/api/v1/environments"
    tags = ("environments",)

    @get("/")
    async def list_environments(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        page: PageDep,
        project_id: FromQuery[uuid.UUID | None] = None,
        name: FromQuery[str | None] = None,
    ) -> Page[Environment]:
        async with services.db.tenant(principal.organization_id) as conn:
            found = await LISTING.fetch(conn, page, {"project_id": project_id, "name": name})
        return page_of(found, Environment)

    @post("/")
    async def create_environment(
        self, services: ServicesDep, principal: PrincipalDep, data: JSONBody[EnvironmentCreate]
    ) -> Environment:
        org = principal.organization_id
        async with services.db.tenant(org) as conn:
            return await _create(conn, services.cipher, org, data)

    @post("/bulk")
    async def create_environments(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        data: JSONBody[list[EnvironmentCreate]],
    ) -> list[Environment]:
        org = principal.organization_id

        async def one(conn: asyncpg.Connection, item: EnvironmentCreate) -> Environment:
            return await _create(conn, services.cipher, org, item)

        async with services.db.tenant(org) as conn:
            return await bulk(services, data, one, conn)

    @patch("/bulk")
    async def update_environments(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        data: JSONBody[list[EnvironmentBulkUpdate]],
    ) -> list[Environment]:
        org = principal.organization_id

        async def one(conn: asyncpg.Connection, item: EnvironmentBulkUpdate) -> Environment:
            return await _update(conn, services.cipher, org, item.id, item)

        async with services.db.tenant(org) as conn:
            return await bulk(services, data, one, conn)

    @get("/{environment_id:uuid}")
    async def get_environment(
        self, services: ServicesDep, principal: PrincipalDep, environment_id: FromPath[uuid.UUID]
    ) -> Environment:
        async with services.db.tenant(principal.organization_id) as conn:
            return await fetch_environment(conn, environment_id)

    @patch("/{environment_id:uuid}")
    async def update_environment(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        environment_id: FromPath[uuid.UUID],
        data: JSONBody[EnvironmentUpdate],
    ) -> Environment:
        """Change the description, set variables by name, remove some."""
        org = principal.organization_id
        async with services.db.tenant(org) as conn:
            return await _update(conn, services.cipher, org, environment_id, data)

    @delete("/{environment_id:uuid}")
    async def delete_environment(
        self, services: ServicesDep, principal: PrincipalDep, environment_id: FromPath[uuid.UUID]
    ) -> None:
        async with services.db.tenant(principal.organization_id) as conn:
            status = await conn.execute(
                "DELETE FROM service_environments WHERE id = $1", environment_id
            )
        if status == "DELETE 0":
            raise NotFound(f"no environment {environment_id}")
