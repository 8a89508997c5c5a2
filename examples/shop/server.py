"""A small shop API for Baton's examples, tests and benchmarks: state in memory, one per app.

Run it: ``python examples/shop/server.py --host 127.0.0.1 --port 8765``. In tests, start it
in-process with ``runner, url = await serve("127.0.0.1", 0)``. The endpoints, the users
and the endpoint names accepted by ``broken`` are listed in examples/shop/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import BodyPartReader, web

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.shop import graphql
from examples.shop.state import PRODUCTS, VERSION, ApiError, Session, ShopState, product_or_404

__all__ = ["BROKEN_NAMES", "create_app", "main", "serve"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATE = web.AppKey("state", ShopState)
BROKEN = web.AppKey("broken", frozenset[str])
LATENCY = web.AppKey("latency", float)
USER = web.RequestKey("user", Session)
TOKEN = web.RequestKey("token", str)


def reply(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # msgspec encodes several times faster than json.dumps: the benchmark shares the CPU
    body = msgspec.json.encode(data)
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


async def body_json(request: web.Request) -> dict[str, Any]:
    try:
        data = msgspec.json.decode(await request.read())
    except msgspec.DecodeError:
        data = None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def authenticated(handler: Handler) -> Handler:
    async def check(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        request[USER], request[TOKEN] = state.bearer(request.headers.get("Authorization", ""))
        return await handler(request)

    return check


@web.middleware
async def shop_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.name or ""
    request_id = secrets.token_hex(8)
    if request.app[LATENCY]:
        # an API that waits on its own backends: the workers' benchmark needs I/O-bound chains
        await asyncio.sleep(request.app[LATENCY])
    try:
        if route.split(".")[0] in request.app[BROKEN]:
            raise ApiError(500, f"internal server error (endpoint {route!r} is broken)")
        response = await handler(request)
    except ApiError as error:
        response = reply({"error": error.message}, error.status, error.headers)
    except web.HTTPException as error:
        if error.status < 400:
            error.headers["X-Request-Id"] = request_id
            raise
        # aiohttp's own 404 and 405 are text; an API answers JSON everywhere
        kept = {name: value for name, value in error.headers.items() if name == "Allow"}
        response = reply({"error": error.reason}, error.status, kept)
    response.headers["X-Request-Id"] = request_id
    return response


# -- public endpoints


async def health(request: web.Request) -> web.Response:
    return reply({"status": "ok", "version": VERSION})


async def about(request: web.Request) -> web.Response:
    page = (
        "<!doctype html>\n<html><head><title>Baton demo shop</title></head>\n"
        "<body><h1>Shop status</h1><p>All systems operational.</p>\n"
        f"<p>API version {VERSION}</p></body></html>\n"
    )
    return web.Response(text=page, content_type="text/html")


async def echo(request: web.Request) -> web.Response:
    """The request as the server saw it: for raw bodies, params and headers."""
    query: dict[str, Any] = {}
    for key in request.query:
        values = request.query.getall(key)
        query[key] = values[0] if len(values) == 1 else values
    return reply(
        {
            "method": request.method,
            "path": request.path,
            "query": query,
            "content_type": request.headers.get("Content-Type", ""),
            "headers": {name.lower(): value for name, value in request.headers.items()},
            "body": (await request.read()).decode("utf-8", "replace"),
        }
    )


async def upload(request: web.Request) -> web.Response:
    """What a multipart/form-data body held: each file's name, type, size and sha256."""
    if request.content_type != "multipart/form-data":
        raise ApiError(415, "send the upload as multipart/form-data")
    files, fields = [], {}
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader) or part.name is None:
            continue
        data = await part.read()
        if part.filename is None:
            fields[part.name] = data.decode("utf-8", "replace")
            continue
        files.append(
            {
                "field": part.name,
                "filename": part.filename,
                "content_type": part.headers.get("Content-Type", ""),
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    return reply({"files": files, "fields": fields}, 201)


async def graphql_endpoint(request: web.Request) -> web.Response:
    try:
        body = msgspec.json.decode(await request.read())
    except msgspec.DecodeError:
        body = None
    return reply(graphql.execute(body))


async def slow(request: web.Request) -> web.Response:
    try:
        delay_ms = min(max(int(request.query.get("ms", "100")), 0), 10_000)
    except ValueError:
        raise ApiError(400, "ms must be an integer number of milliseconds") from None
    await asyncio.sleep(delay_ms / 1000)
    return reply({"slept_ms": delay_ms})


def _page(request: web.Request) -> tuple[int, int, list[dict[str, Any]], bool]:
    """?page=1&per_page=3 of the products: (page, per_page, its items, whether one follows)."""
    page, per_page = request.query.get("page", "1"), request.query.get("per_page", "3")
    if not page.isdigit() or int(page) < 1:
        raise ApiError(400, "page must be an integer from 1")
    if not per_page.isdigit() or not 1 <= int(per_page) <= 100:
        raise ApiError(400, "per_page must be an integer from 1 to 100")
    number, size = int(page), int(per_page)
    start = (number - 1) * size
    return number, size, PRODUCTS[start : start + size], start + size < len(PRODUCTS)


async def list_products(request: web.Request) -> web.Response:
    """Pages of products with the next page's URL in the body, null on the last page."""
    page, size, items, more = _page(request)
    following = f"/products?page={page + 1}&per_page={size}" if more else None
    return reply({"items": items, "page": page, "next": following, "total": len(PRODUCTS)})


async def stock_levels(request: web.Request) -> web.Response:
    """Pages of stock levels, a bare JSON array; the links are in the Link header (RFC 8288),
    relative to the request's URL, which a client resolves."""
    page, size, items, more = _page(request)

    def link(number: int, rel: str) -> str:
        return f'</stock?page={number}&per_page={size}>; rel="{rel}"'

    links = [link(1, "first")]
    if more:
        links.append(link(page + 1, "next"))
    if page > 1:
        links.append(link(page - 1, "prev"))
    levels = [{"product_id": p["id"], "stock": p["stock"]} for p in items]
    headers = {"Link": ", ".join(links), "X-Total-Count": str(len(PRODUCTS))}
    return reply(levels, headers=headers)


async def legacy_catalog(request: web.Request) -> web.Response:
    raise web.HTTPFound("/catalog")


async def login(request: web.Request) -> web.Response:
    data = await body_json(request)
    username, password, ttl = data.get("username"), data.get("password"), data.get("ttl")
    if not isinstance(username, str) or not isinstance(password, str):
        raise ApiError(400, "username and password are required")
    state = request.app[STATE]
    issued = state.login(username, password, ttl if isinstance(ttl, int | float) else None)
    response = reply(issued)
    cookie = state.new_cookie(issued["user_id"], username)
    response.set_cookie("session", cookie, httponly=True, samesite="Lax", path="/")
    return response


async def refresh(request: web.Request) -> web.Response:
    token = (await body_json(request)).get("refresh_token")
    return reply(request.app[STATE].refreshed(str(token)))


async def session_info(request: web.Request) -> web.Response:
    session = request.app[STATE].cookies.get(request.cookies.get("session", ""))
    if session is None:
        raise ApiError(401, "no valid session cookie")
    return reply({"username": session.username, "user_id": session.user_id})


# -- endpoints behind a bearer token


@authenticated
async def me(request: web.Request) -> web.Response:
    return reply(ShopState.profile(request[USER]))


@authenticated
async def catalog(request: web.Request) -> web.Response:
    category = request.query.get("category")
    products = [p for p in PRODUCTS if category in (None, "", p["category"])]
    limit = request.query.get("limit", "")
    if limit:
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise ApiError(400, "limit must be an integer from 1 to 100")
        products = products[: int(limit)]
    headers = {"X-Total-Count": str(len(products)), "Cache-Control": "max-age=60"}
    return reply({"products": products, "count": len(products)}, headers=headers)


@authenticated
async def product(request: web.Request) -> web.Response:
    return reply(product_or_404(request.match_info["product_id"]))


@authenticated
async def create_cart(request: web.Request) -> web.Response:
    cart = request.app[STATE].new_cart(request[USER], await body_json(request))
    return reply(cart, 201, {"Location": f"/cart/{cart['cart_id']}"})


@authenticated
async def get_cart(request: web.Request) -> web.Response:
    cart = request.app[STATE].cart(request[USER], request.match_info["cart_id"])
    return reply({key: value for key, value in cart.items() if key != "user_id"})


@authenticated
async def add_to_cart(request: web.Request) -> web.Response:
    data = await body_json(request)
    return reply(request.app[STATE].add_item(request[USER], request.match_info["cart_id"], data))


@authenticated
async def checkout(request: web.Request) -> web.Response:
    cart_id = (await body_json(request)).get("cart_id")
    order = request.app[STATE].checkout(request[USER], cart_id)
    return reply(order, 201, {"Location": f"/orders/{order['order_id']}"})


@authenticated
async def list_orders(request: web.Request) -> web.Response:
    orders = request.app[STATE].user_orders(request[USER])
    return reply({"orders": orders, "count": len(orders)})


@authenticated
async def get_order(request: web.Request) -> web.Response:
    return reply(request.app[STATE].read_order(request[USER], request.match_info["order_id"]))


@authenticated
async def inventory(request: web.Request) -> web.Response:
    state, product_id = request.app[STATE], request.match_info["product_id"]
    return reply(state.inventory(request[TOKEN], product_id))


@authenticated
async def recommendations(request: web.Request) -> web.Response:
    return reply(request.app[STATE].recommendations(request[TOKEN]))


@authenticated
async def post_feedback(request: web.Request) -> web.Response:
    if request.content_type != "application/x-www-form-urlencoded":
        raise ApiError(415, "send feedback as a form (application/x-www-form-urlencoded)")
    form = await request.post()
    rating, comment = str(form.get("rating", "")), str(form.get("comment", ""))
    return reply(request.app[STATE].add_feedback(request[USER], rating, comment), 201)


@authenticated
async def list_feedback(request: web.Request) -> web.Response:
    entries = request.app[STATE].user_feedback(request[USER])
    return reply({"feedback": entries, "count": len(entries)})


# (method, path, handler, name): the part of the name before a dot is what `broken` names
_ROUTES: list[tuple[str, str, Handler, str]] = [
    ("GET", "/health", health, "health"),
    ("GET", "/about", about, "about"),
    ("*", "/echo", echo, "echo"),
    ("GET", "/slow", slow, "slow"),
    ("POST", "/upload", upload, "upload"),
    ("POST", "/graphql", graphql_endpoint, "graphql"),
    ("GET", "/legacy/catalog", legacy_catalog, "legacy"),
    ("GET", "/products", list_products, "products"),
    ("GET", "/stock", stock_levels, "stock"),
    ("POST", "/auth/login", login, "login"),
    ("POST", "/auth/refresh", refresh, "refresh"),
    ("GET", "/session", session_info, "session"),
    ("GET", "/me", me, "me"),
    ("GET", "/catalog", catalog, "catalog"),
    ("GET", "/products/{product_id}", product, "product"),
    ("POST", "/cart", create_cart, "cart.create"),
    ("GET", "/cart/{cart_id}", get_cart, "cart.get"),
    ("POST", "/cart/{cart_id}/items", add_to_cart, "cart.items"),
    ("POST", "/checkout", checkout, "checkout"),
    ("GET", "/orders", list_orders, "orders"),
    ("GET", "/orders/{order_id}", get_order, "order"),
    ("GET", "/inventory/{product_id}", inventory, "inventory"),
    ("GET", "/recommendations", recommendations, "recommendations"),
    ("POST", "/feedback", post_feedback, "feedback.post"),
    ("GET", "/feedback", list_feedback, "feedback.list"),
]
BROKEN_NAMES = frozenset(name.split(".")[0] for *_, name in _ROUTES)
"""What ``create_app(broken=...)`` accepts: one name per endpoint group, e.g. ``cart``."""


def create_app(
    *, broken: frozenset[str] = frozenset(), token_ttl: float = 300.0, latency_ms: float = 0.0
) -> web.Application:
    """A fresh shop with its own state. The endpoints named in ``broken`` answer 500; every
    request waits ``latency_ms`` before it is handled."""
    unknown = set(broken) - BROKEN_NAMES
    if unknown:
        known = ", ".join(sorted(BROKEN_NAMES))
        raise ValueError(f"unknown endpoint names {sorted(unknown)}; known: {known}")
    app = web.Application(middlewares=[shop_middleware])
    app[STATE] = ShopState(token_ttl=token_ttl)
    app[BROKEN] = frozenset(broken)
    app[LATENCY] = max(latency_ms, 0.0) / 1000
    for method, path, handler, name in _ROUTES:
        app.router.add_route(method, path, handler, name=name)
    return app


async def serve(host: str = "127.0.0.1", port: int = 0, **opts: Any) -> tuple[web.AppRunner, str]:
    """Start a shop on host:port (port 0: any free one); returns the runner and the base URL.

    ``opts`` go to create_app. Stop the shop with ``await runner.cleanup()``.
    """
    runner = web.AppRunner(create_app(**opts), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, f"http://{host}:{runner.addresses[0][1]}"


async def _serve_forever(host: str, port: int, opts: dict[str, Any]) -> None:
    runner, url = await serve(host, port, **opts)
    print(f"shop API on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Baton's demo shop API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token-ttl", type=float, default=300.0, help="access token lifetime (s)")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="milliseconds every request waits before it is handled (asyncio.sleep)",
    )
    parser.add_argument(
        "--broken",
        default="",
        help=f"comma-separated endpoints that answer 500, of: {', '.join(sorted(BROKEN_NAMES))}",
    )
    args = parser.parse_args(argv)
    broken = frozenset(name.strip() for name in args.broken.split(",") if name.strip())
    if broken - BROKEN_NAMES:
        parser.error(f"unknown --broken names: {', '.join(sorted(broken - BROKEN_NAMES))}")
    if args.latency_ms < 0:
        parser.error("--latency-ms must be 0 or more")
    opts = {"broken": broken, "token_ttl": args.token_ttl, "latency_ms": args.latency_ms}
    asyncio.run(_serve_forever(args.host, args.port, opts))


if __name__ == "__main__":
    main()
