"""A small real HTTP server, in a thread, that checks credentials as an API would: HTTP
Basic on ``/basic``, and an OAuth2 client credentials token endpoint ``/token`` whose
tokens ``/api`` accepts. For the importers' tests: an imported flow must authenticate."""

from __future__ import annotations

import base64
import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


@dataclass
class AuthServer:
    user: str
    password: str
    client_id: str
    client_secret: str
    url: str = ""
    tokens: set[str] = field(default_factory=set)
    scopes: list[str] = field(default_factory=list)
    """The scope of every token request, in order."""


def _handler(state: AuthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _reply(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _basic(self) -> tuple[str, str] | None:
            header = self.headers.get("Authorization", "")
            if not header.startswith("Basic "):
                return None
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            return user, password

        def do_GET(self) -> None:
            if self.path.startswith("/basic"):
                if self._basic() == (state.user, state.password):
                    self._reply(200, {"user": state.user})
                else:
                    self._reply(401, {"error": "unauthorized"})
            elif self.path.startswith("/api"):
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                ok = token in state.tokens
                self._reply(200 if ok else 401, {"ok": ok})
            else:
                self._reply(404, {})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            client = self._basic() or (form.get("client_id"), form.get("client_secret"))
            if form.get("grant_type") != "client_credentials" or client != (
                state.client_id,
                state.client_secret,
            ):
                self._reply(401, {"error": "invalid_client"})
                return
            token = "at-" + secrets.token_hex(8)
            state.tokens.add(token)
            state.scopes.append(form.get("scope", ""))
            self._reply(200, {"access_token": token, "token_type": "Bearer", "expires_in": 600})

    return Handler


@contextmanager
def auth_server() -> Iterator[AuthServer]:
    state = AuthServer(
        user="alice",
        password="pw-" + secrets.token_hex(6),
        client_id="baton-ci",
        client_secret="cs-" + secrets.token_hex(6),
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
