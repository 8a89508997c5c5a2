"""The aiohttp floor: the benchmark chain by hand on aiohttp, the leanest asyncio client.

Request for request and check for check the same as bench/plain_httpx.py (see there): one
``aiohttp.ClientSession`` for every chain, its connector limited to the concurrency, a
semaphore around each request. Run it as ``python bench/plain_aiohttp.py URL USERS.csv
CONCURRENCY``; it exits 1 if a check fails.
"""

from __future__ import annotations

import asyncio
import csv
import sys
from typing import Any

import aiohttp


class CheckFailed(Exception):
    pass


async def checked(
    response: aiohttp.ClientResponse, status: int, path: str, expected: Any
) -> dict[str, Any]:
    async with response:
        if response.status != status:
            raise CheckFailed(f"{response.url}: status {response.status} != {status}")
        data: dict[str, Any] = await response.json()
    value: Any = data
    for key in path.split("."):
        value = value[int(key)] if key.isdigit() else value[key]
    passed = expected(value) if callable(expected) else value == expected
    if not passed:
        raise CheckFailed(f"{response.url}: {path} = {value!r}")
    return data


async def chain(
    session: aiohttp.ClientSession, slots: asyncio.Semaphore, user: dict[str, str]
) -> None:
    async with slots:
        r = await session.post(
            "/auth/login", json={"username": user["username"], "password": user["password"]}
        )
        token = (await checked(r, 200, "token_type", "Bearer"))["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    async with slots:
        r = await session.get("/catalog", headers=auth)
        product_id = (await checked(r, 200, "count", lambda n: n >= 1))["products"][0]["id"]
    async with slots:
        r = await session.post("/cart", headers=auth, json={"product_id": product_id})
        cart_id = (await checked(r, 201, "items.0.product_id", product_id))["cart_id"]
    async with slots:
        r = await session.get(f"/cart/{cart_id}", headers=auth)
        await checked(r, 200, "cart_id", cart_id)
    async with slots:
        r = await session.post("/checkout", headers=auth, json={"cart_id": cart_id})
        order_id = (await checked(r, 201, "status", "pending"))["order_id"]
    async with slots:
        r = await session.get(f"/orders/{order_id}", headers=auth)
        await checked(r, 200, "order_id", order_id)


def read_users(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as rows:
        return list(csv.DictReader(rows))


async def main(base_url: str, users: list[dict[str, str]], concurrency: int) -> int:
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:
        outcomes = await asyncio.gather(
            *(chain(session, slots, user) for user in users), return_exceptions=True
        )
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    for failure in failures[:5]:
        print(f"failed: {failure!r}", file=sys.stderr)
    print(f"{len(users)} chains, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    url, users_path, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.exit(asyncio.run(main(url, read_users(users_path), limit)))
