"""Which hosts a run may send requests to.

``baton run`` runs its user's own flows and may reach anything. A flow uploaded to the
service is a tenant's, and the service's host can reach what the tenant must not: its
database, the service itself, the cloud's metadata address. So runs started through the
service go through a ``TargetPolicy`` (``BATON_ALLOWED_TARGETS``):

- unset: any public address, and nothing loopback, link-local, private or reserved;
- set: a comma-separated list of what is allowed: host names (``api.example.com``), IP
  addresses and CIDR blocks (``10.1.2.0/24``), and ``public`` for any public address.

A host name on the list is allowed whatever it resolves to. Any other host is resolved
and every one of its addresses must be allowed. The check comes before each request is
sent, redirects included (each hop is a request of its own), and again where the
connection is made (the resolver of the connection pool), so that a name that resolves
differently the second time (DNS rebinding) cannot slip through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
VARIABLE = "BATON_ALLOWED_TARGETS"
_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_VERDICT_SECONDS = 30.0
"""How long a host's verdict is reused (the connection pool's resolver checks again)."""


class TargetRefused(httpx.ConnectError):
    """A request to a target the policy refuses: nothing was sent."""


def _kind(address: Address) -> str:
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved address"
    return "an address not listed"


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone: fe80::1%eth0
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address


@dataclass(frozen=True)
class TargetPolicy:
    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()
    public: bool = True

    @classmethod
    def parse(cls, text: str | None) -> TargetPolicy:
        """The policy of a ``BATON_ALLOWED_TARGETS`` value; raises ValueError naming an
        entry that is neither a host name, an address, a CIDR block nor ``public``."""
        if text is None or not text.strip():
            return cls()
        hosts: set[str] = set()
        networks: list[Network] = []
        public = False
        for entry in (part.strip() for part in text.replace(" ", ",").split(",")):
            if not entry:
                continue
            if entry.lower() == "public":
                public = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if not _HOST.match(name):
                raise ValueError(
                    f"{VARIABLE}: {entry!r} is not a host name, an IP address, a CIDR block "
                    "or 'public'"
                )
            hosts.add(name)
        return cls(frozenset(hosts), tuple(networks), public)

    def refusal(self, host: str, addresses: Iterable[str]) -> str | None:
        """Why ``host`` (with the addresses it resolves to) may not be reached; None if
        it may."""
        if host.lower().rstrip(".") in self.hosts:
            return None
        for text in addresses:
            address = _address(text)
            if address is None:
                return f"{host} resolves to {text!r}, which is not an IP address"
            if any(address in network for network in self.networks):
                continue
            if self.public and address.is_global:
                continue
            shown = host if host == text else f"{host} ({address})"
            return (
                f"{shown} is {_kind(address)}, which runs started through the service may "
                f"not reach (allow it in {VARIABLE})"
            )
        return None

    def transport(self, inner: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
        return _GuardedTransport(inner, self)

    def resolver(self) -> AbstractResolver:
        return _GuardedResolver(self)


class _GuardedTransport(httpx.AsyncBaseTransport):
    """Refuses a request, before it is sent, to a target the policy refuses."""

    def __init__(self, inner: httpx.AsyncBaseTransport, policy: TargetPolicy) -> None:
        self._inner = inner
        self._policy = policy
        self._verdicts: dict[tuple[str, int], tuple[float, str | None]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        refusal = await self._verdict(host, port)
        if refusal is not None:
            raise TargetRefused(f"refused target: {refusal}", request=request)
        return await self._inner.handle_async_request(request)

    async def _verdict(self, host: str, port: int) -> str | None:
        if _address(host) is not None:
            return self._policy.refusal(host, [host])
        now = time.monotonic()
        known = self._verdicts.get((host, port))
        if known is not None and known[0] > now:
            return known[1]
        if host.lower().rstrip(".") in self._policy.hosts:
            refusal = None
        else:
            try:
                found = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
            except OSError:
                return None  # the connection fails with the resolver's own error
            refusal = self._policy.refusal(host, [str(info[4][0]) for info in found])
        if len(self._verdicts) > 10_000:
            self._verdicts.clear()
        self._verdicts[(host, port)] = (now + _VERDICT_SECONDS, refusal)
        return refusal

    async def aclose(self) -> None:
        await self._inner.aclose()


class _GuardedResolver(AbstractResolver):
    """The connection pool's resolver, refusing the addresses the policy refuses."""

    def __init__(self, policy: TargetPolicy) -> None:
        self._policy = policy
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        refusal = self._policy.refusal(host, [str(result["host"]) for result in found])
        if refusal is not None:
            raise OSError(f"refused target: {refusal}")
        return found

    async def close(self) -> None:
        await self._inner.close()
