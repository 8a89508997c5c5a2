"""The httpx baseline: the benchmark chain written by hand with httpx, no Baton.

The same six requests per user as bench/chain.yaml, the same assertions (the status and one
JSON field per step), the same ids carried from step to step, and the same limit on requests
in flight (an asyncio.Semaphore around each request, like Baton's ``--concurrency``).

One ``httpx.AsyncClient`` for every chain, on httpx's default transport, its pool sized to
the concurrency limit: what a careful hand-written script does. Baton shares one pool
between its runs too. Run it as ``python bench/plain_httpx.py URL USERS.csv CONCURRENCY``;
it exits 1 if a check fails.
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


async def main(base_url: str, users_file: str, concurrency: int) -> int:
    with open(users_file, newline="", encoding="utf-8") as rows:
        users = list(csv.DictReader(rows))
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=10.0) as client:
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
    sys.exit(asyncio.run(main(url, users_path, limit)))
