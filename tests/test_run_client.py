"""A run's httpx client keeps cookies as httpx would, against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from orchestrator.run_client import RunClient, text


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"cookie": request.headers.get("Cookie", "")})


def _setter(header: str) -> web.RouteDef:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({}, headers={"Set-Cookie": header})

    return web.get("/set/" + header.split("=")[0], handler)


async def _two(request: web.Request) -> web.Response:
    response = web.json_response({})
    response.headers.add("Set-Cookie", "first=1; Path=/")
    response.headers.add("Set-Cookie", "second=2; Path=/")
    return response


async def _redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/echo", "Set-Cookie": "hop=1; Path=/"})


async def _latin(request: web.Request) -> web.Response:
    charset = request.query.get("charset", "latin-1")
    return web.Response(
        body="café".encode("latin-1"), headers={"Content-Type": f"text/plain; charset={charset}"}
    )


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes(
        [
            web.get("/echo", _echo),
            web.get("/api/echo", _echo),
            web.get("/redirect", _redirect),
            web.get("/set/two", _two),
            web.get("/latin", _latin),
            _setter("session=abc; Path=/"),
            _setter("scoped=1; Path=/api"),
            _setter("brief=x; Max-Age=1; Path=/"),
            _setter("gone=x; Max-Age=0; Path=/"),
        ]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def _get(client: httpx.AsyncClient, url: str, **headers: str) -> str:
    if isinstance(client, RunClient):
        request = client.prepare("GET", url, headers=headers, timeout=5)
    else:
        request = client.build_request("GET", url, headers=headers, timeout=5)
    response = await client.send(request, follow_redirects=True)
    cookie: str = response.json()["cookie"] if "echo" in url or response.history else ""
    return cookie


async def test_cookies_are_sent_back_within_a_run_only(server: str) -> None:
    async with RunClient() as first, RunClient() as second:
        assert await _get(first, f"{server}/echo") == ""
        await _get(first, f"{server}/set/session")
        assert await _get(first, f"{server}/echo") == "session=abc"
        assert await _get(second, f"{server}/echo") == ""


async def test_a_cookie_scoped_to_a_path_goes_only_there(server: str) -> None:
    async with RunClient() as client:
        await _get(client, f"{server}/set/session")
        await _get(client, f"{server}/set/scoped")
        assert await _get(client, f"{server}/echo") == "session=abc"
        assert await _get(client, f"{server}/api/echo") == "scoped=1; session=abc"
        assert await _get(client, f"{server}/echo") == "session=abc"


async def test_cookies_set_on_a_redirect_are_kept(server: str) -> None:
    async with RunClient() as client:
        assert await _get(client, f"{server}/redirect") == "hop=1"
        assert await _get(client, f"{server}/echo") == "hop=1"


async def test_expired_and_deleted_cookies_are_not_sent(server: str) -> None:
    async with RunClient() as client:
        await _get(client, f"{server}/set/brief")
        await _get(client, f"{server}/set/gone")
        assert await _get(client, f"{server}/echo") == "brief=x"
        await asyncio.sleep(1.1)
        assert await _get(client, f"{server}/echo") == ""


async def test_a_cookie_header_in_the_request_wins(server: str) -> None:
    async with RunClient() as client:
        await _get(client, f"{server}/set/session")
        assert await _get(client, f"{server}/echo", Cookie="mine=1") == "mine=1"


async def test_same_cookie_headers_as_a_plain_httpx_client(server: str) -> None:
    steps = ["set/session", "echo", "set/scoped", "api/echo", "set/two", "redirect", "api/echo"]
    async with RunClient() as ours, httpx.AsyncClient() as plain:
        for step in steps:
            assert await _get(ours, f"{server}/{step}") == await _get(plain, f"{server}/{step}")
        assert dict(ours.cookies) == dict(plain.cookies)


@pytest.mark.parametrize(("charset", "expected"), [("latin-1", "café"), ("no-such", "caf\ufffd")])
async def test_text_follows_the_charset_like_httpx(
    server: str, charset: str, expected: str
) -> None:
    async with RunClient() as client:
        url = f"{server}/latin?charset={charset}"
        response = await client.send(client.prepare("GET", url, headers={}, timeout=5))
        await response.aread()
        assert text(response) == expected
        plain = httpx.Response(200, headers=response.headers, content=response.content)
        assert plain.text == expected
