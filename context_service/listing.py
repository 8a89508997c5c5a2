"""List endpoints: filter, paginate, sort and select fields, the same way on every resource.

``?limit=50&offset=100`` pages; ``?sort=-started_at,name`` sorts (``-`` for descending,
the row id breaks ties so pages never overlap); ``?fields=id,status`` keeps only those
fields of each item; filters are named query parameters of each endpoint, and a filter
given as ``a,b`` matches either. Every name a client sends is checked against the
resource's own list and refused with a 400 that names the allowed ones: a client's
string never becomes SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, TypeVar, cast

import asyncpg
import msgspec
from litestar.params import QueryParameter

from context_service.errors import BadRequest

T = TypeVar("T")
MAX_LIMIT = 500


class Page(msgspec.Struct, Generic[T], frozen=True):
    """A page of a list: the items, how many match in all, and where the next page starts."""

    items: list[T]
    total: int
    limit: int
    offset: int
    next_offset: int | None = None


class ListParams(msgspec.Struct, frozen=True):
    limit: int = 50
    offset: int = 0
    sort: str | None = None
    fields: str | None = None


async def list_params(
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT, description="items per page")] = 50,
    offset: Annotated[int, QueryParameter(ge=0, le=2**31, description="items to skip")] = 0,
    sort: Annotated[
        str | None,
        QueryParameter(
            description="fields to sort by, comma-separated; '-' before one: descending"
        ),
    ] = None,
    fields: Annotated[
        str | None, QueryParameter(description="the fields of each item to return, comma-separated")
    ] = None,
) -> ListParams:
    """The dependency every list endpoint takes (``Provide(list_params)``)."""
    return ListParams(limit, offset, sort, fields)


@dataclass(frozen=True)
class Listing:
    """One resource's list query.

    ``base`` is a SELECT of the item's columns in the order of ``item``'s fields, without
    WHERE/ORDER (it may end in a FROM with joins); ``sortable`` and ``filters`` map the
    public names to SQL expressions; a filter's expression may hold one ``{}`` for the
    parameter (``started_at >= {}``), else it is compared for equality.
    """

    base: str
    item: type[msgspec.Struct]
    id_column: str
    sortable: Mapping[str, str]
    default_sort: str
    filters: Mapping[str, str] = field(default_factory=dict)
    where: Sequence[str] = ()
    """Conditions always applied, with their own parameters ($1...) first."""
    make: Callable[[asyncpg.Record], Any] | None = None
    """Builds an item from a row; else ``item(*row)``."""

    def _order(self, sort: str | None) -> str:
        terms: list[str] = []
        for raw in (sort or self.default_sort).split(","):
            name = raw.strip()
            descending = name.startswith("-")
            name = name.lstrip("-+")
            if not name:
                continue
            column = self.sortable.get(name)
            if column is None:
                raise BadRequest(
                    f"cannot sort by {name!r}; sortable: {', '.join(sorted(self.sortable))}"
                )
            terms.append(f"{column} {'DESC' if descending else 'ASC'}")
        terms.append(f"{self.id_column} ASC")
        return ", ".join(terms)

    def _where(self, values: Mapping[str, Any], args: list[Any]) -> str:
        conditions = list(self.where)
        for name, value in values.items():
            if value is None:
                continue
            expression = self.filters[name]
            if isinstance(value, str) and "," in value and "{}" not in expression:
                args.append([part.strip() for part in value.split(",")])
                conditions.append(f"{expression} = ANY(${len(args)})")
                continue
            args.append(value)
            placeholder = f"${len(args)}"
            if "{}" in expression:
                conditions.append(expression.replace("{}", placeholder))
            else:
                conditions.append(f"{expression} = {placeholder}")
        return f" WHERE {' AND '.join(conditions)}" if conditions else ""

    async def fetch(
        self,
        conn: asyncpg.Connection,
        params: ListParams,
        filters: Mapping[str, Any] | None = None,
        fixed_args: Sequence[Any] = (),
    ) -> Page[Any]:
        """The page of items matching ``filters`` (public names, None: not filtering)."""
        fields = selected_fields(self.item, params.fields)
        args = list(fixed_args)
        where = self._where(filters or {}, args)
        total: int = await conn.fetchval(f"SELECT count(*) FROM ({self.base}{where}) AS t", *args)
        args.extend((params.limit, params.offset))
        query = (
            f"{self.base}{where} ORDER BY {self._order(params.sort)}"
            f" LIMIT ${len(args) - 1} OFFSET ${len(args)}"
        )
        rows = await conn.fetch(query, *args)
        make = self.make or (lambda row: self.item(*row))
        items = [make(row) for row in rows]
        end = params.offset + len(items)
        return Page(
            items=trim(items, fields),
            total=total,
            limit=params.limit,
            offset=params.offset,
            next_offset=end if end < total else None,
        )


def selected_fields(item: type[msgspec.Struct], fields: str | None) -> list[str] | None:
    if not fields:
        return None
    names = [name.strip() for name in fields.split(",") if name.strip()]
    known = item.__struct_fields__
    unknown = [name for name in names if name not in known]
    if unknown:
        raise BadRequest(
            f"unknown field(s) {', '.join(map(repr, unknown))}; fields: {', '.join(known)}"
        )
    return names


def trim(items: list[Any], fields: list[str] | None) -> list[Any]:
    """The items, or only the given fields of each (plain dicts) when ``fields`` is set."""
    if fields is None:
        return items
    return [
        {name: value for name, value in msgspec.to_builtins(item).items() if name in fields}
        for item in items
    ]


def page_of(page: Page[Any], _item: type[T]) -> Page[T]:
    """Type a fetched page for a handler's signature (its items may be trimmed dicts)."""
    return cast(Page[T], page)
