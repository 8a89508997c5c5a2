"""Record a HAR 1.2 file of real requests to the demo shop, as a browser's network panel
exports one: a login, a cart, a checkout, an order, the session cookie, a static asset
and a request to a second host name.

``python -m tests.har_recorder http://127.0.0.1:8765 tests/data/importers/shop.har``
wrote the committed recording; the HAR tests also record a fresh one.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx


def _pairs(headers: httpx.Headers) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in headers.multi_items()]


def _entry(response: httpx.Response, started: datetime, seconds: float) -> dict[str, Any]:
    request = response.request
    request.read()  # a multipart body is a stream until read
    body = request.content.decode("utf-8")
    har_request: dict[str, Any] = {
        "method": request.method,
        "url": str(request.url),
        "httpVersion": "HTTP/1.1",
        "headers": _pairs(request.headers),
        "queryString": [{"name": k, "value": v} for k, v in request.url.params.multi_items()],
        "cookies": [],
        "headersSize": -1,
        "bodySize": len(request.content),
    }
    if body:
        har_request["postData"] = {
            "mimeType": request.headers.get("content-type", ""),
            "text": body,
        }
    cookies = [{"name": name, "value": value} for name, value in response.cookies.items()]
    return {
        "startedDateTime": started.isoformat().replace("+00:00", "Z"),
        "time": round(seconds * 1000, 3),
        "request": har_request,
        "response": {
            "status": response.status_code,
            "statusText": response.reason_phrase,
            "httpVersion": "HTTP/1.1",
            "headers": _pairs(response.headers),
            "cookies": cookies,
            "content": {
                "size": len(response.content),
                "mimeType": response.headers.get("content-type", ""),
                "text": response.text,
            },
            "redirectURL": response.headers.get("location", ""),
            "headersSize": -1,
            "bodySize": len(response.content),
        },
        "cache": {},
        "timings": {"send": 0, "wait": round(seconds * 1000, 3), "receive": 0},
    }


def record(base_url: str) -> dict[str, Any]:
    """The HAR document of one shopping session against the shop at ``base_url``."""
    entries: list[dict[str, Any]] = []
    other_host = base_url.replace("127.0.0.1", "localhost")

    with httpx.Client(base_url=base_url, timeout=10) as client:

        def send(method: str, url: str, **kwargs: Any) -> httpx.Response:
            started, clock = datetime.now(UTC), time.perf_counter()
            response = client.request(method, url, **kwargs)
            entries.append(_entry(response, started, time.perf_counter() - clock))
            return response

        send("GET", "/health")
        login = send("POST", "/auth/login", json={"username": "alice", "password": "secret-alice"})
        bearer = {"Authorization": f"Bearer {login.json()['access_token']}"}
        send("GET", "/catalog", params={"limit": 3}, headers=bearer)
        send("GET", "/static/logo.png")
        cart = send("POST", "/cart", json={"product_id": 1, "quantity": 1}, headers=bearer)
        cart_id = cart.json()["cart_id"]
        send("GET", f"/cart/{cart_id}", headers=bearer)
        order = send("POST", "/checkout", json={"cart_id": cart_id}, headers=bearer)
        send("GET", f"/orders/{order.json()['order_id']}", headers=bearer)
        send("GET", "/session")
        files = {"receipt": ("receipt.txt", b"order received\n", "text/plain")}
        send("POST", "/echo", data={"order": "thanks"}, files=files, headers=bearer)
        send("GET", f"{other_host}/health")
    return {
        "log": {
            "version": "1.2",
            "creator": {"name": "tests/har_recorder.py", "version": "1"},
            "pages": [],
            "entries": entries,
        }
    }


def main() -> None:
    base_url, output = sys.argv[1], Path(sys.argv[2])
    assert urlsplit(base_url).hostname == "127.0.0.1", "record against the shop on 127.0.0.1"
    output.write_text(json.dumps(record(base_url), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
