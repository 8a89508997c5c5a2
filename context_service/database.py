"""The service's access to PostgreSQL: every query of a request under row-level security.

``tenant(organization)`` is a transaction whose first statement switches to the role
``baton_service`` (which owns nothing, so the policies of schema.sql apply to it) and names
the caller's organization; both settings end with the transaction, so a pooled connection
never carries them into the next request. Only what cannot be scoped to an organization
yet runs as the owner: finding the organization of an API key, and reading the event log
of a run once ``tenant`` has shown that the run is the caller's.

This module is where driver errors become the service's errors (problem details).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import asyncpg

from context_service.errors import Conflict, NotFound, Unavailable, Unprocessable
from events.postgres import PostgresEventStore, driver_errors

ROLE = "baton_service"
_ENTER = "SELECT set_config('role', $1, true), set_config('baton.organization_id', $2, true)"
_ROLE_USABLE = (
    "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)"
    " AND pg_has_role(current_user, $1, 'MEMBER')"
)
# what a unique constraint means to a user, by its name (PostgreSQL's default names)
_PROJECT = "a project of that name exists already"
_SUITE = "the project has a suite of that name already (the flow's name:); replace it instead"
_ENVIRONMENT = "the project has an environment of that name already"
# ids derive from names, so a second row of a name collides on its primary key first
_DUPLICATES = {
    "service_projects_pkey": _PROJECT,
    "service_projects_organization_id_name_key": _PROJECT,
    "service_suites_pkey": _SUITE,
    "service_suites_project_id_name_key": _SUITE,
    "service_environments_pkey": _ENVIRONMENT,
    "service_environments_project_id_name_key": _ENVIRONMENT,
    "environment_variables_pkey": "a variable is given twice",
    "organizations_slug_key": "an organization of that slug exists already",
}


class Database:
    """Transactions on the event store's pool; see the module's docstring."""

    def __init__(self, store: PostgresEventStore) -> None:
        self._store = store

    @property
    def store(self) -> PostgresEventStore:
        return self._store

    async def check(self) -> None:
        """Raise Unavailable unless the role of schema.sql step 5 exists and this login may
        use it (a server where the owner could not create it)."""
        with translated(self._store.dsn):
            usable = await self._store.pool.fetchval(_ROLE_USABLE, ROLE)
        if not usable:
            raise Unavailable(
                f"the database has no role {ROLE} this login may use: create it "
                f"(CREATE ROLE {ROLE} NOLOGIN; GRANT {ROLE} TO <login>) and restart"
            )

    @asynccontextmanager
    async def tenant(self, organization: uuid.UUID) -> AsyncIterator[asyncpg.Connection]:
        """A transaction that sees and writes only ``organization``'s rows."""
        with translated(self._store.dsn):
            async with self._store.pool.acquire() as conn, conn.transaction():
                await conn.fetchrow(_ENTER, ROLE, str(organization))
                yield conn

    @asynccontextmanager
    async def owner(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction as the tables' owner: row-level security does not apply. Only for
        what cannot belong to an organization yet (see the module's docstring)."""
        with translated(self._store.dsn):
            async with self._store.pool.acquire() as conn, conn.transaction():
                yield conn


@contextmanager
def translated(dsn: str) -> Iterator[None]:
    """asyncpg's errors as the service's: a constraint a request broke is the request's
    fault (409, 404, 422); anything else is the store's (StoreError, StoreUnavailable)."""
    with driver_errors(dsn):
        try:
            yield
        except asyncpg.UniqueViolationError as exc:
            name = exc.constraint_name or ""
            raise Conflict(_DUPLICATES.get(name, "it exists already")) from None
        except asyncpg.ForeignKeyViolationError:
            raise NotFound("it refers to something that does not exist") from None
        except asyncpg.InsufficientPrivilegeError:
            # a row-level security check: another organization's row, as far as we show
            raise NotFound("not found") from None
        except (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError):
            raise Unprocessable("text cannot hold the NUL character (\\u0000)") from None
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
            raise Unprocessable(f"a value is not allowed here ({exc.sqlstate})") from None
