"""/api/v1/keys: the organization's API keys (``admin`` scope). A new key is shown once, in
the answer that creates it; lists show only its first characters."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec
from litestar import Controller, delete, get, post
from litestar.params import FromPath, FromQuery, JSONBody

from context_service.api.common import Name, PageDep, PrincipalDep, ServicesDep
from context_service.errors import NotFound, Unprocessable
from context_service.keys import InvalidKeyRequest, Scope, insert_key
from context_service.listing import Listing, Page, page_of


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Name
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=3)]


class ApiKey(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    prefix: str
    """The key's first characters, to tell it apart."""
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class CreatedKey(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    key: str
    """The key itself: shown this once, stored only as a hash."""
    prefix: str
    scopes: list[str]
    created_at: datetime


_SELECT = (
    "SELECT id, name, prefix, scopes, created_at, last_used_at, revoked_at FROM api_credentials"
)
LISTING = Listing(
    base=_SELECT,
    item=ApiKey,
    id_column="id",
    sortable={"name": "name", "created_at": "created_at", "last_used_at": "last_used_at"},
    default_sort="-created_at",
    filters={"name": "name"},
)


class KeyController(Controller):
    path = "/api/v1/keys"
    tags = ("keys",)

    @get("/", opt={"scope": "admin"})
    async def list_keys(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        page: PageDep,
        name: FromQuery[str | None] = None,
    ) -> Page[ApiKey]:
        async with services.db.tenant(principal.organization_id) as conn:
            return page_of(await LISTING.fetch(conn, page, {"name": name}), ApiKey)

    @post("/")
    async def create_key(
        self, services: ServicesDep, principal: PrincipalDep, data: JSONBody[KeyCreate]
    ) -> CreatedKey:
        try:
            async with services.db.tenant(principal.organization_id) as conn:
                new = await insert_key(conn, principal.organization_id, data.scopes, data.name)
        except InvalidKeyRequest as exc:
            raise Unprocessable(str(exc)) from None
        scopes: list[str] = [s for s in ("read", "run", "admin") if s in data.scopes]
        return CreatedKey(new.id, data.name, new.key, new.prefix, scopes, new.created_at)

    @delete("/{key_id:uuid}")
    async def revoke_key(
        self, services: ServicesDep, principal: PrincipalDep, key_id: FromPath[uuid.UUID]
    ) -> None:
        """Revoke a key: it stops working at once on this service process (the calling key
        too, if it is this one) and within 5 seconds on others (KEY_TTL)."""
        async with services.db.tenant(principal.organization_id) as conn:
            status = await conn.execute(
                "UPDATE api_credentials SET revoked_at = now() WHERE id = $1"
                " AND revoked_at IS NULL",
                key_id,
            )
        services.db.forget_key(key_id)
        if status == "UPDATE 0":
            raise NotFound(f"no active key {key_id}")
