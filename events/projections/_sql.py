"""Set-based writes: one statement per table and page, whatever the number of rows.

A page of a thousand events touches hundreds of rows; sending them as one array per
column (``INSERT ... SELECT * FROM unnest(...)``) is one round trip instead of hundreds.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

Column = tuple[str, str]
"""(name, SQL type) of a column written through ``unnest``."""

_encoder = msgspec.json.Encoder()


def jsonb(value: Any) -> bytes:
    """A jsonb parameter: the store's connections pass jsonb as JSON bytes (events.postgres)."""
    return _encoder.encode(value)


def from_jsonb(data: bytes | None, default: Any) -> Any:
    return default if data is None else msgspec.json.decode(data)


def excluded(*columns: str) -> list[str]:
    """``SET column = excluded.column`` for each column: the incoming row wins."""
    return [f"{column} = excluded.{column}" for column in columns]


def earliest(table: str, column: str) -> str:
    """``SET column`` to the earlier of the stored and the incoming time."""
    return f"{column} = LEAST({table}.{column}, excluded.{column})"


def latest(table: str, column: str) -> str:
    """``SET column`` to the later of the stored and the incoming time."""
    return f"{column} = GREATEST({table}.{column}, excluded.{column})"


def insert_sql(
    table: str, columns: Sequence[Column], *, key: Sequence[str], update: Sequence[str] = ()
) -> str:
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"${index}::{kind}[]" for index, (_, kind) in enumerate(columns, 1))
    action = f"DO UPDATE SET {', '.join(update)}" if update else "DO NOTHING"
    return (
        f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({', '.join(key)}) {action}"
    )


async def upsert(
    conn: asyncpg.Connection,
    table: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Any]],
    *,
    key: Sequence[str],
    update: Sequence[str] = (),
) -> None:
    """Insert rows (tuples in the order of ``columns``); on a key conflict, apply ``update``
    (or do nothing). A key must not repeat within ``rows``."""
    if not rows:
        return
    arrays = [list(column) for column in zip(*rows, strict=True)]
    await conn.execute(insert_sql(table, columns, key=key, update=update), *arrays)


async def delete(
    conn: asyncpg.Connection, table: str, columns: Sequence[Column], keys: Sequence[Sequence[Any]]
) -> None:
    """Delete the rows whose ``columns`` equal one of ``keys``."""
    if not keys:
        return
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"${index}::{kind}[]" for index, (_, kind) in enumerate(columns, 1))
    match = " AND ".join(f"t.{name} = k.{name}" for name, _ in columns)
    await conn.execute(
        f"DELETE FROM {table} t USING unnest({arrays}) AS k({names}) WHERE {match}",
        *[list(column) for column in zip(*keys, strict=True)],
    )


def uuids(values: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    return list(dict.fromkeys(values))
