"""API keys: made once, shown once, stored as a hash, scoped to an organization.

A key is ``bk_`` and 32 random bytes in URL-safe base64. The database keeps its sha256 and
its first characters (to tell keys apart in a list), never the key: a stolen copy of the
database opens nothing. Scopes: ``read`` (every GET), ``run`` (start, cancel and rerun
runs), ``admin`` (projects, suites, environments, keys).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Literal, get_args

import asyncpg
import msgspec

from events.settings import Settings
from orchestrator.errors import UsageError

Scope = Literal["read", "run", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
KEY_PREFIX = "bk_"
_SHOWN = len(KEY_PREFIX) + 8
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]*$")

_FIND_ORG = "SELECT id FROM organizations WHERE slug = $1"
_ADD_ORG = (
    "INSERT INTO organizations (id, slug, name) VALUES ($1, $2, $2) ON CONFLICT (slug) DO NOTHING"
)
_INSERT = (
    "INSERT INTO api_credentials (id, organization_id, name, prefix, key_hash, scopes)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)
_LOOKUP = (
    "SELECT id, organization_id, scopes, last_used_at < now() - interval '1 minute'"
    " OR last_used_at IS NULL AS stale"
    " FROM api_credentials WHERE key_hash = $1 AND revoked_at IS NULL"
)
_TOUCH = "UPDATE api_credentials SET last_used_at = now() WHERE id = $1"


class InvalidKeyRequest(UsageError, ValueError):
    """A key request that cannot be honoured (unknown scope, malformed organization)."""


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: the key's organization and what it may do."""

    organization_id: uuid.UUID
    key_id: uuid.UUID
    scopes: frozenset[str]

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes


class NewKey(msgspec.Struct, frozen=True):
    id: uuid.UUID
    key: str
    prefix: str
    created_at: datetime


def generate() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def check_scopes(scopes: Collection[str]) -> list[Scope]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise InvalidKeyRequest(
            f"scopes must be some of {', '.join(SCOPES)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    return [scope for scope in SCOPES if scope in scopes]


async def insert_key(
    conn: asyncpg.Connection, organization_id: uuid.UUID, scopes: Collection[str], name: str
) -> NewKey:
    """Store a new key of ``organization_id`` (in the caller's transaction); return it in
    clear, the only time it is ever seen."""
    key = generate()
    key_id = uuid.uuid4()
    created: datetime = await conn.fetchval(
        _INSERT + " RETURNING created_at",
        key_id,
        organization_id,
        name,
        key[:_SHOWN],
        digest(key),
        check_scopes(scopes),
    )
    return NewKey(key_id, key, key[:_SHOWN], created)


async def ensure_organization(conn: asyncpg.Connection, slug: str) -> uuid.UUID:
    """The id of the organization ``slug``, created if missing (as the tables' owner)."""
    if not _SLUG.match(slug):
        raise InvalidKeyRequest(
            f"organization {slug!r}: use lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    await conn.execute(_ADD_ORG, uuid.uuid4(), slug)
    found: uuid.UUID = await conn.fetchval(_FIND_ORG, slug)
    return found


async def create_key(settings: Settings, *, organization: str, scopes: list[str], name: str) -> str:
    """``baton keys create``: a new key of the organization ``organization`` (a slug, created
    if missing); returns the key in clear, once. Raises InvalidKeyRequest for a bad slug or scope,
    StoreError/StoreUnavailable from the database."""
    from events import open_store
    from events.postgres import driver_errors

    check_scopes(scopes)
    store = await open_store(settings)
    try:
        with driver_errors(store.dsn):
            async with store.pool.acquire() as conn, conn.transaction():
                org = await ensure_organization(conn, organization)
                new = await insert_key(conn, org, scopes, name)
    finally:
        await store.aclose()
    return new.key


async def authenticate(pool: asyncpg.Pool, key: str) -> Principal | None:
    """The principal of a key, None if it is unknown or revoked. Runs as the owner: the
    organization is what the key tells."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    row = await pool.fetchrow(_LOOKUP, digest(key))
    if row is None:
        return None
    if row["stale"]:
        # when a key was last used, to the minute: not a write on every request
        await pool.execute(_TOUCH, row["id"])
    return Principal(row["organization_id"], row["id"], frozenset(row["scopes"]))
