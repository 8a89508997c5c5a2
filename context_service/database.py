"""The service's access to PostgreSQL: every query of a request under row-level security.

``tenant(organization)`` is a transaction whose first statement switches to the role
``baton_service`` (which owns nothing, so the policies of schema.sql apply to it) and names
the caller's organization; both settings end with the transaction, so a pooled connection
never carries them into the next request. Only what cannot be scoped to an organization
yet runs as the owner: finding the organization of an API key. The event log has no
organization column: a run's events are read through the EventStore (``Services.store``),
once ``tenant`` has shown that the run is the caller's.

This module is where driver errors become the service's errors (problem details).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import asyncpg

from context_service.errors import Conflict, NotFound, Unavailable, Unprocessable
from context_service.keys import Principal, authenticate, digest
from events.postgres import driver_errors

ROLE = "baton_service"
_OWNED_RUN = (
    "SELECT stream FROM test_runs WHERE id = $1"
    " UNION ALL SELECT 'run-' || id::text FROM service_runs WHERE id = $1 LIMIT 1"
)
"""A run's stream, if the organization of the transaction has the run (test_runs is the
projector's, service_runs the service's, perhaps not projected yet)."""
_KNOWN_RUNS = 20_000
KEY_TTL = 5.0
"""Seconds a key's principal is reused without asking the database again: a key revoked
through another service process stops working within this time (through this one, at once)."""
_KNOWN_KEYS = 10_000
# an ended run is never queued again: its job (secrets sealed in it) is not kept longer
_DONE = "UPDATE service_runs SET state = $2, error = $3, job = '', updated_at = now() WHERE id = $1"
_QUEUED = (
    "SELECT organization_id, id FROM service_runs"
    " WHERE state = 'queued' AND created_at > now() - interval '7 days'"
)
_JOB = "SELECT job FROM service_runs WHERE id = $1"
_WAITING = (
    "SELECT id, job FROM service_runs WHERE state = 'queued' AND job <> ''"
    " AND created_at > now() - interval '7 days'"
    " AND created_at < now() - make_interval(secs => $1)"
)
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
    """Transactions on the read tables, on the PostgreSQL event store's pool (``dsn`` names
    the server in errors); see the module's docstring. The event log itself is read through
    the EventStore, never here."""

    def __init__(
        self, pool: asyncpg.Pool, dsn: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._pool = pool
        self._dsn = dsn
        self._clock = clock
        self._owned_runs: dict[tuple[uuid.UUID, uuid.UUID], str] = {}
        self._principals: dict[bytes, tuple[Principal, float]] = {}
        """By the key's digest: the key itself is not kept."""

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @property
    def dsn(self) -> str:
        """The server's address, for ``translated`` (its password is masked in errors)."""
        return self._dsn

    async def check(self) -> None:
        """Raise Unavailable unless the role of schema.sql step 5 exists and this login may
        use it (a server where the owner could not create it)."""
        with translated(self._dsn):
            usable = await self._pool.fetchval(_ROLE_USABLE, ROLE)
        if not usable:
            raise Unavailable(
                f"the database has no role {ROLE} this login may use: create it "
                f"(CREATE ROLE {ROLE} NOLOGIN; GRANT {ROLE} TO <login>) and restart"
            )

    @asynccontextmanager
    async def tenant(self, organization: uuid.UUID) -> AsyncIterator[asyncpg.Connection]:
        """A transaction that sees and writes only ``organization``'s rows."""
        with translated(self._dsn):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.fetchrow(_ENTER, ROLE, str(organization))
                yield conn

    async def principal(self, key: str) -> Principal | None:
        """The principal of an API key, None if it is unknown or revoked. A known key is
        looked up at most once every KEY_TTL seconds: a round trip less on most requests."""
        now = self._clock()
        known = self._principals.get(key_digest := digest(key))
        if known is not None and known[1] > now:
            return known[0]
        with translated(self._dsn):
            principal = await authenticate(self._pool, key)
        if principal is None:
            self._principals.pop(key_digest, None)
            return None
        if len(self._principals) >= _KNOWN_KEYS:
            self._principals.clear()  # a cache: a forgotten key is looked up again
        self._principals[key_digest] = (principal, now + KEY_TTL)
        return principal

    def forget_key(self, key_id: uuid.UUID) -> None:
        """Stop reusing the principal of a key (revoked through this process)."""
        for key, (principal, _) in list(self._principals.items()):
            if principal.key_id == key_id:
                del self._principals[key]

    async def record_run_end(
        self, organization: uuid.UUID, run_id: uuid.UUID, state: str, error: str
    ) -> None:
        """A service run's state once it has ended: 'finished', 'cancelled' or 'error'."""
        async with self.tenant(organization) as conn:
            await conn.execute(_DONE, run_id, state, error)

    async def queued_runs(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """(organization, run) of every organization's service run of the last week whose
        end is not recorded, whichever instance started it: every instance follows them.
        The service's own table, read as its owner (no tenant): the follower records ends
        for every tenant."""
        with translated(self._dsn):
            rows = await self._pool.fetch(_QUEUED)
        return [(row[0], row[1]) for row in rows]

    async def queued_jobs(self, older_than: float) -> list[tuple[uuid.UUID, str]]:
        """(run, job) of every organization's queued run recorded more than ``older_than``
        seconds ago (and in the last week) whose job is kept (schema step 15), as its
        owner: every instance queues again those whose job never reached the queue."""
        with translated(self._dsn):
            rows = await self._pool.fetch(_WAITING, older_than)
        return [(row[0], row[1]) for row in rows]

    async def run_job(self, organization: uuid.UUID, run_id: uuid.UUID) -> str:
        """The job the instance that queued the run made (schema step 15); '' once the
        run's end is recorded, or if unknown."""
        async with self.tenant(organization) as conn:
            job: str | None = await conn.fetchval(_JOB, run_id)
        return job or ""

    async def run_stream(self, organization: uuid.UUID, run_id: uuid.UUID) -> str:
        """The run's stream if ``organization`` has the run, else NotFound. A run never
        changes organization, so a yes is remembered (for the last ``_KNOWN_RUNS`` runs
        asked about): reading a run again and again costs no ownership query."""
        known = (organization, run_id)
        stream = self._owned_runs.get(known)
        if stream is None:
            async with self.tenant(organization) as conn:
                stream = await stream_of(conn, run_id)
            if len(self._owned_runs) >= _KNOWN_RUNS:
                self._owned_runs.clear()  # a cache: a forgotten run is asked about again
            self._owned_runs[known] = stream
        return stream


async def stream_of(conn: asyncpg.Connection, run_id: uuid.UUID) -> str:
    """The run's stream, if the organization of ``conn``'s tenant transaction has the run;
    else NotFound."""
    stream: str | None = await conn.fetchval(_OWNED_RUN, run_id)
    if stream is None:
        raise NotFound(f"no run {run_id}")
    return stream


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
