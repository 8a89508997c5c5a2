"""The demo shop API (examples/shop/server.py) over real HTTP on 127.0.0.1.

The examples, the runner's tests and the benchmarks rely on exactly these behaviours:
which requests fail, how often, and what they answer.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.shop.server import BROKEN_NAMES, create_app, serve

ROOT = Path(__file__).resolve().parents[1]
Shop = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def start_shop() -> AsyncIterator[Shop]:
    """Starts a shop (with create_app's options) and returns a client bound to it."""
    opened: list[tuple[Any, httpx.AsyncClient]] = []

    async def start(**opts: Any) -> httpx.AsyncClient:
        runner, url = await serve("127.0.0.1", 0, **opts)
        client = httpx.AsyncClient(base_url=url, timeout=5)
        opened.append((runner, client))
        return client

    yield start
    for runner, client in opened:
        await client.aclose()
        await runner.cleanup()


@pytest.fixture
async def shop(start_shop: Shop) -> httpx.AsyncClient:
    return await start_shop()


async def login(client: httpx.AsyncClient, username: str = "alice", **extra: Any) -> Any:
    password = extra.pop("password", f"secret-{username}")
    response = await client.post(
        "/auth/login", json={"username": username, "password": password, **extra}
    )
    assert response.status_code == 200, response.text
    return response.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_login_returns_tokens_a_cookie_and_the_user(shop: httpx.AsyncClient) -> None:
    response = await shop.post(
        "/auth/login", json={"username": "alice", "password": "secret-alice"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["user_id"] == 1
    assert body["expires_in"] == 300
    assert body["access_token"] != body["refresh_token"]
    assert "session" in response.cookies

    me = await shop.get("/me", headers=bearer(body["access_token"]))
    assert me.json()["username"] == "alice"
    assert me.json()["roles"] == ["admin"]
    cookie = response.cookies["session"]
    shop.cookies.clear()
    assert (await shop.get("/session")).status_code == 401
    session = await shop.get("/session", headers={"Cookie": f"session={cookie}"})
    assert session.json() == {"username": "alice", "user_id": 1}


async def test_generated_batch_users_log_in_with_their_csv_password(
    shop: httpx.AsyncClient,
) -> None:
    body = await login(shop, "user042", password="pw-user042")
    assert body["user_id"] == 1042
    assert (await login(shop, "user042"))["user_id"] == 1042
    assert (await login(shop, "carol"))["user_id"] == 5000
    profile = (await shop.get("/me", headers=bearer(body["access_token"]))).json()
    assert profile["username"] == "user042"
    assert profile["roles"] == ["customer"]


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"username": "alice", "password": "wrong"}, 401),
        ({"username": "user001", "password": "pw-user002"}, 401),
        ({"username": "alice"}, 400),
        ([1, 2], 400),
    ],
)
async def test_bad_logins_are_refused(shop: httpx.AsyncClient, payload: Any, status: int) -> None:
    response = await shop.post("/auth/login", json=payload)
    assert response.status_code == status
    assert "error" in response.json()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/me"),
        ("GET", "/catalog"),
        ("GET", "/products/1"),
        ("POST", "/cart"),
        ("POST", "/checkout"),
        ("GET", "/orders"),
        ("GET", "/inventory/1"),
        ("GET", "/recommendations"),
        ("POST", "/feedback"),
    ],
)
async def test_protected_endpoints_need_a_valid_bearer_token(
    shop: httpx.AsyncClient, method: str, path: str
) -> None:
    missing = await shop.request(method, path)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json() == {"error": "missing bearer token"}
    wrong = await shop.request(method, path, headers=bearer("not-a-token"))
    assert (wrong.status_code, wrong.json()) == (401, {"error": "invalid token"})


async def test_tokens_expire_and_a_refresh_token_gets_a_new_one(start_shop: Shop) -> None:
    shop = await start_shop(token_ttl=0.3)
    tokens = await login(shop)
    assert (await shop.get("/me", headers=bearer(tokens["access_token"]))).status_code == 200
    await asyncio.sleep(0.4)
    expired = await shop.get("/me", headers=bearer(tokens["access_token"]))
    assert (expired.status_code, expired.json()) == (401, {"error": "token expired"})

    refreshed = await shop.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refreshed.status_code == 200
    fresh = refreshed.json()["access_token"]
    assert fresh != tokens["access_token"]
    assert (await shop.get("/me", headers=bearer(fresh))).status_code == 200
    bad = await shop.post("/auth/refresh", json={"refresh_token": "nope"})
    assert bad.status_code == 401


async def test_login_ttl_shortens_but_never_lengthens_a_token(shop: httpx.AsyncClient) -> None:
    assert (await login(shop, ttl=0.2))["expires_in"] == 0.2
    assert (await login(shop, ttl=10_000))["expires_in"] == 300
    short = (await login(shop, ttl=0.2))["access_token"]
    await asyncio.sleep(0.3)
    assert (await shop.get("/me", headers=bearer(short))).json() == {"error": "token expired"}


async def test_catalog_filters_by_category_and_limit(shop: httpx.AsyncClient) -> None:
    auth = bearer((await login(shop))["access_token"])
    books = await shop.get("/catalog", params={"category": "books"}, headers=auth)
    assert {p["category"] for p in books.json()["products"]} == {"books"}
    assert books.headers["X-Total-Count"] == str(books.json()["count"]) == "3"
    limited = await shop.get("/catalog", params={"limit": 2}, headers=auth)
    assert [p["id"] for p in limited.json()["products"]] == [1, 2]
    assert (await shop.get("/catalog", params={"limit": "x"}, headers=auth)).status_code == 400
    assert (await shop.get("/products/3", headers=auth)).json()["name"] == "Event Sourcing Notes"
    unknown = await shop.get("/products/999", headers=auth)
    assert (unknown.status_code, unknown.json()) == (404, {"error": "product 999 not found"})


async def test_the_checkout_chain_and_the_order_shipping_after_two_reads(
    shop: httpx.AsyncClient,
) -> None:
    auth = bearer((await login(shop))["access_token"])
    product_id = (await shop.get("/catalog", headers=auth)).json()["products"][1]["id"]

    created = await shop.post("/cart", json={"product_id": product_id, "quantity": 2}, headers=auth)
    assert created.status_code == 201
    cart = created.json()
    assert created.headers["Location"] == f"/cart/{cart['cart_id']}"
    assert cart["total"] == 85.0
    added = await shop.post(
        f"/cart/{cart['cart_id']}/items", json={"product_id": "5"}, headers=auth
    )
    assert added.json()["total"] == 94.99
    fetched = (await shop.get(f"/cart/{cart['cart_id']}", headers=auth)).json()
    assert [item["product_id"] for item in fetched["items"]] == [2, 5]

    checkout = await shop.post("/checkout", json={"cart_id": cart["cart_id"]}, headers=auth)
    assert checkout.status_code == 201
    order = checkout.json()
    assert (order["status"], order["total"]) == ("pending", 94.99)
    again = await shop.post("/checkout", json={"cart_id": cart["cart_id"]}, headers=auth)
    assert again.status_code == 409

    statuses = []
    for _ in range(4):
        read = await shop.get(f"/orders/{order['order_id']}", headers=auth)
        statuses.append(read.json()["status"])
    assert statuses == ["pending", "pending", "shipped", "shipped"]
    assert read.json()["tracking_number"] == f"TRK-{order['order_id']:08d}"
    history = (await shop.get("/orders", headers=auth)).json()
    assert [o["order_id"] for o in history["orders"]] == [order["order_id"]]


async def test_carts_and_orders_belong_to_their_user(shop: httpx.AsyncClient) -> None:
    alice = bearer((await login(shop, "alice"))["access_token"])
    bob = bearer((await login(shop, "bob"))["access_token"])
    cart = (await shop.post("/cart", json={"product_id": 1}, headers=alice)).json()
    assert (await shop.get(f"/cart/{cart['cart_id']}", headers=bob)).status_code == 404
    assert (
        await shop.post("/checkout", json={"cart_id": cart["cart_id"]}, headers=bob)
    ).status_code == 404
    order = (await shop.post("/checkout", json={"cart_id": cart["cart_id"]}, headers=alice)).json()
    assert (await shop.get(f"/orders/{order['order_id']}", headers=bob)).status_code == 404
    assert (await shop.get("/orders", headers=bob)).json() == {"orders": [], "count": 0}


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"product_id": 999}, 404),
        ({"product_id": 1, "quantity": 0}, 422),
        ({"product_id": 7}, 409),
        ({"product_id": 3, "quantity": 9}, 409),
    ],
)
async def test_a_cart_refuses_bad_items(shop: httpx.AsyncClient, payload: Any, status: int) -> None:
    auth = bearer((await login(shop))["access_token"])
    response = await shop.post("/cart", json=payload, headers=auth)
    assert response.status_code == status
    assert "error" in response.json()


async def test_inventory_answers_503_twice_per_token_and_product(shop: httpx.AsyncClient) -> None:
    first = bearer((await login(shop))["access_token"])
    second = bearer((await login(shop))["access_token"])
    codes = [(await shop.get("/inventory/1", headers=first)).status_code for _ in range(4)]
    assert codes == [503, 503, 200, 200]
    assert (await shop.get("/inventory/2", headers=first)).status_code == 503
    assert (await shop.get("/inventory/1", headers=second)).status_code == 503
    answer = (await shop.get("/inventory/1", headers=first)).json()
    assert answer == {"product_id": 1, "stock": 120, "warehouse": "AMS-1"}


async def test_recommendations_answer_429_with_retry_after_once_per_token(
    shop: httpx.AsyncClient,
) -> None:
    first = bearer((await login(shop))["access_token"])
    throttled = await shop.get("/recommendations", headers=first)
    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "1")
    answered = await shop.get("/recommendations", headers=first)
    assert answered.status_code == 200
    assert all(product["stock"] > 0 for product in answered.json()["products"])
    second = bearer((await login(shop))["access_token"])
    assert (await shop.get("/recommendations", headers=second)).status_code == 429


async def test_feedback_takes_a_form_only(shop: httpx.AsyncClient) -> None:
    auth = bearer((await login(shop))["access_token"])
    sent = await shop.post("/feedback", data={"rating": "4", "comment": "ok"}, headers=auth)
    assert sent.status_code == 201
    assert (sent.json()["rating"], sent.json()["comment"]) == (4, "ok")
    as_json = await shop.post("/feedback", json={"rating": 4}, headers=auth)
    assert as_json.status_code == 415
    bad = await shop.post("/feedback", data={"rating": "9"}, headers=auth)
    assert bad.status_code == 422
    assert (await shop.get("/feedback", headers=auth)).json()["count"] == 1


async def test_public_pages_redirect_html_echo_and_json_errors(shop: httpx.AsyncClient) -> None:
    assert (await shop.get("/health")).json() == {"status": "ok", "version": "1.4.2"}
    legacy = await shop.get("/legacy/catalog")
    assert (legacy.status_code, legacy.headers["Location"]) == (302, "/catalog")
    about = await shop.get("/about")
    assert about.headers["Content-Type"].startswith("text/html")
    assert "<h1>Shop status</h1>" in about.text
    echo = await shop.post("/echo?tag=a&tag=b&page=2", content="raw text")
    assert echo.json()["query"] == {"tag": ["a", "b"], "page": "2"}
    assert echo.json()["body"] == "raw text"
    unknown = await shop.get("/nowhere")
    assert (unknown.status_code, unknown.json()) == (404, {"error": "Not Found"})
    assert unknown.headers["X-Request-Id"] != legacy.headers["X-Request-Id"]
    assert (await shop.delete("/health")).status_code == 405


async def test_broken_endpoints_answer_500_and_the_rest_still_works(start_shop: Shop) -> None:
    shop = await start_shop(broken=frozenset({"catalog", "cart"}))
    auth = bearer((await login(shop))["access_token"])
    catalog = await shop.get("/catalog", headers=auth)
    assert catalog.status_code == 500
    assert "catalog" in catalog.json()["error"]
    assert (await shop.post("/cart", json={"product_id": 1}, headers=auth)).status_code == 500
    assert (await shop.get("/cart/cart-123", headers=auth)).status_code == 500
    assert (await shop.get("/products/1", headers=auth)).status_code == 200
    assert (await shop.get("/me", headers=auth)).status_code == 200


def test_unknown_broken_names_are_refused() -> None:
    assert {"login", "catalog", "cart", "checkout", "order", "inventory"} <= BROKEN_NAMES
    with pytest.raises(ValueError, match="catalogue"):
        create_app(broken=frozenset({"catalogue"}))


async def test_each_app_has_its_own_state(start_shop: Shop) -> None:
    first, second = await start_shop(), await start_shop()
    token = (await login(first))["access_token"]
    assert (await second.get("/me", headers=bearer(token))).status_code == 401


async def test_latency_delays_every_request_answer_unchanged(start_shop: Shop) -> None:
    slow = await start_shop(latency_ms=300)
    loop = asyncio.get_running_loop()
    for path, status in (("/health", 200), ("/catalog", 401)):
        started = loop.time()
        assert (await slow.get(path)).status_code == status
        assert loop.time() - started >= 0.3


async def test_the_script_prints_its_address_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "shop" / "server.py"),
        "--port",
        "0",
        "--broken",
        "checkout",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        assert line.startswith("shop API on http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=line.split(" on ")[1].strip()) as client:
            assert (await client.get("/health")).status_code == 200
            assert (await client.post("/checkout")).status_code == 500
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0
