"""TLS settings of a test (``tls:``) as SSL contexts, and a transport per context.

aiohttp fixes the SSL context of a connection pool when the pool is made, so each distinct
TLS setting gets a pool of its own, made when a request first needs it and shared by every
run of the process after that; requests without ``tls:`` use the default pool.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

EXTENSION = "baton.tls"
"""The httpx request extension that carries a request's TlsConfig (redirects keep it)."""


class TlsProblem(Exception):
    """A TLS setting that cannot be used: a file missing, unreadable or not PEM."""


@dataclass(frozen=True)
class TlsConfig:
    """A test's TLS settings, paths made absolute; the files' change times are part of it,
    so that a certificate replaced on disk is read again."""

    ca_bundle: str | None
    client_cert: str | None
    client_key: str | None
    verify: bool
    stamps: tuple[int, ...] = ()

    @classmethod
    def of(
        cls,
        base_dir: Path,
        *,
        ca_bundle: str | None,
        client_cert: str | None,
        client_key: str | None,
        verify: bool,
    ) -> TlsConfig:
        ca, cert, key = (_absolute(base_dir, p) for p in (ca_bundle, client_cert, client_key))
        paths = (ca, cert, key)
        stamps = []
        for where, path in zip(("ca_bundle", "client_cert", "client_key"), paths, strict=True):
            if path is not None:
                try:
                    stamps.append(os.stat(path).st_mtime_ns)
                except OSError as exc:
                    raise TlsProblem(f"tls.{where}: cannot read {path}: {exc.strerror}") from None
        return cls(ca, cert, key, verify=verify, stamps=tuple(stamps))

    def context(self) -> ssl.SSLContext:
        """The SSL context; raises TlsProblem naming the setting that is wrong."""
        return _context(self)


def _absolute(base_dir: Path, path: str | None) -> str | None:
    if path is None:
        return None
    return str((base_dir / Path(path).expanduser()).resolve())


@functools.lru_cache(maxsize=64)
def _context(config: TlsConfig) -> ssl.SSLContext:
    # reading a CA bundle costs milliseconds: once per setting, not per request
    try:
        context = ssl.create_default_context(cafile=config.ca_bundle)
    except (ssl.SSLError, OSError) as exc:
        raise TlsProblem(
            f"tls.ca_bundle: {config.ca_bundle} is not a PEM CA bundle ({exc})"
        ) from None
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.client_cert is not None:
        try:
            context.load_cert_chain(config.client_cert, config.client_key)
        except (ssl.SSLError, OSError) as exc:
            raise TlsProblem(
                f"tls.client_cert: {config.client_cert} with "
                f"{config.client_key or 'the key in the same file'} is not a PEM certificate "
                f"and its private key ({exc})"
            ) from None
    return context


TransportFactory = Callable[[ssl.SSLContext | None], httpx.AsyncBaseTransport]


class TlsTransports(httpx.AsyncBaseTransport):
    """Sends each request through the pool of its TLS setting (EXTENSION), the default
    pool for a request without one."""

    def __init__(self, make: TransportFactory) -> None:
        self._make = make
        self._default = make(None)
        self._pools: dict[TlsConfig, httpx.AsyncBaseTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        config = request.extensions.get(EXTENSION)
        if config is None:
            return await self._default.handle_async_request(request)
        pool = self._pools.get(config)
        if pool is None:
            try:
                context = config.context()
            except TlsProblem as exc:
                raise httpx.ConnectError(str(exc), request=request) from None
            pool = self._pools[config] = self._make(context)
        return await pool.handle_async_request(request)

    async def aclose(self) -> None:
        for pool in [self._default, *self._pools.values()]:
            await pool.aclose()
