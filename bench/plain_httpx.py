"""The httpx baseline: the benchmark chain written by hand with httpx, no Baton.

The same six requests per user as bench/chain.yaml, the same assertions (the status and one
JSON field per step), the same ids carried from step to step, and the same limit on requests
in flight (an asyncio.Semaphore around each request, like Baton's ``--concurrency``).

One ``httpx.AsyncClient()`` for every chain, as constructed by default: httpx's default
transport and pool limits (100 connections, 20 kept alive). Baton shares one pool between
its runs too. A pool sized to the concurrency (50 kept alive) is slower, not faster: httpcore
checks every pooled connection's socket on every request (bench/README.md). Run it as
``python bench/plain_httpx.py URL USERS.csv CONCURRENCY``; it exits 1 if a check fails.

A CONCURRENCY of 1 is the sequential script: the chains one after another in a plain loop,
each request awaited before the next is sent, no tasks (bench/run.py's ``httpx-sequential``).
"""

from __future__ import annotations

import asyncio
import csv
import sys
from typing import Any

import httpx


class CheckFailed(Exception):
    pass


def check(response: httpx.Response, status: int, path: str, expected: Any) -> dict[str, Any]:
    if response.status_code != status:
        raise CheckFailed(f"{response.request.url}: status {response.status_code} != {status}")
    data: dict[str, Any] = response.json()
    value: Any = data
    for key in path.split("."):
        value = value[int(key)] if key.isdigit() else value[key]
    passed = expected(value) if callable(expected) else value == expected
    if not passed:
        raise CheckFailed(f"{response.request.url}: {path} = {value!r}")
    return data


async def chain(client: httpx.AsyncClient, slots: asyncio.Semaphore, user: dict[str, str]) -> None:
    async with slots:
        r = await client.post(
            "/auth/login", json={"username": user["username"], "password": user["password"]}
        )
    token = check(r, 200, "token_type", "Bearer")["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    async with slots:
        r = await client.get("/catalog", headers=auth)
    product_id = check(r, 200, "count", lambda n: n >= 1)["products"][0]["id"]
    async with slots:
        r = await client.post("/cart", headers=auth, json={"product_id": product_id})
    cart_id = check(r, 201, "items.0.product_id", product_id)["cart_id"]
    async with slots:
        r = await client.get(f"/cart/{cart_id}", headers=auth)
    check(r, 200, "cart_id", cart_id)
    async with slots:
        r = await client.post("/checkout", headers=auth, json={"cart_id": cart_id})
    order_id = check(r, 201, "status", "pending")["order_id"]
    async with slots:
        r = await client.get(f"/orders/{order_id}", headers=auth)
    check(r, 200, "order_id", order_id)


def read_users(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as rows:
        return list(csv.DictReader(rows))


async def main(base_url: str, users: list[dict[str, str]], concurrency: int) -> int:
    slots = asyncio.Semaphore(concurrency)
    outcomes: list[BaseException | None] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as client:
        if concurrency == 1:
            for user in users:
                try:
                    await chain(client, slots, user)
                except Exception as exc:
                    outcomes.append(exc)
        else:
            outcomes = await asyncio.gather(
                *(chain(client, slots, user) for user in users), return_exceptions=True
            )
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    for failure in failures[:5]:
        print(f"failed: {failure!r}", file=sys.stderr)
    print(f"{len(users)} chains, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    url, users_path, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.exit(asyncio.run(main(url, read_users(users_path), limit)))
