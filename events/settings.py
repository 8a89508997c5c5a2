"""Baton's settings, read once from the environment into one frozen object.

Unset and empty variables mean the same thing: an empty ``BATON_DATABASE_URL`` left in a
shell or a CI file selects the embedded default rather than failing on an empty DSN.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import msgspec

from events.errors import SettingsError as SettingsError

_MASK = "***"
STORE_WAIT = 60.0
"""Default BATON_STORE_WAIT: a managed PostgreSQL's failover takes 10-60 s."""
OWNER_TIMEOUT = 90.0
"""Default BATON_OWNER_TIMEOUT: longer than STORE_WAIT plus a few heartbeats."""
RETENTION_INTERVAL = 24 * 3600.0
"""Default BATON_RETENTION_INTERVAL: `baton serve` applies retention once a day."""
EXCERPT_LIMIT = 2048
"""Default BATON_EXCERPT_LIMIT: characters of a body an event keeps (redacted)."""
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_dsn(url: str) -> str:
    """The DSN with its password replaced by ``***``, safe to print or log.

    Handles URLs (``postgresql://user:secret@host/db``, ``?password=`` in the query) and
    libpq keyword strings (``host=h password=secret``).
    """
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub(lambda m: m.group(1) + _MASK, url)
    scheme, userinfo, rest = _split_userinfo(url)
    if ":" in userinfo:
        url = f"{scheme}{userinfo.partition(':')[0]}:{_MASK}@{rest}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(key.lower() == "password" for key, _ in pairs):
        return url
    masked = [(k, _MASK if k.lower() == "password" else v) for k, v in pairs]
    query = urlencode(masked, safe="/*")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _split_userinfo(url: str) -> tuple[str, str, str]:
    """``scheme://``, the userinfo, and what follows its ``@``; the userinfo is all before
    the last ``@`` ahead of the query, so that a password with an unescaped ``/`` or ``#``
    is still found (urlsplit would end the host at it and leave the password in the path)."""
    scheme, _, rest = url.partition("://")
    authority = re.split(r"[?]", rest, maxsplit=1)[0]
    at = authority.rfind("@")
    if at < 0:
        return f"{scheme}://", "", rest
    return f"{scheme}://", rest[:at], rest[at + 1 :]


_URL_FORMS = {
    "PostgreSQL": (("postgresql", "postgres"), "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"),
    "Redis": (("redis", "rediss", "unix"), "redis://HOST:PORT/DB (rediss:// for TLS)"),
}


def url_problem(url: str, kind: str) -> str | None:
    """What keeps ``url`` from being a URL of ``kind`` ("PostgreSQL" or "Redis"), in
    Baton's words, or None. Checked before a driver sees it: a driver's own message is in
    its words, and a port out of range crashes a connect (OverflowError) instead."""
    schemes, form = _URL_FORMS[kind]
    scheme, separator, _ = url.partition("://")
    if not separator or scheme.lower() not in schemes:
        return f"not a {kind} URL: give {form}"
    _, userinfo, rest = _split_userinfo(url)
    if re.search(r"[@/#?]", userinfo):
        return (
            "a user name or password with @ / # or ? in it must be percent-encoded"
            " (@ as %40, / as %2F, # as %23, ? as %3F)"
        )
    for host in re.split(r"[/?#]", rest, maxsplit=1)[0].split(","):  # libpq's h1:p1,h2:p2
        if host.startswith("[") and "]" not in host:
            return f"the IPv6 address {host} has no closing ]: give [ADDRESS]:PORT"
        port = host.rpartition("]")[2] if host.startswith("[") else host
        digits = port.partition(":")[2]
        if digits and not (digits.isascii() and digits.isdigit() and 0 < int(digits) < 65536):
            return f"the port {digits!r} is not a port number (1 to 65535): give {form}"
    return None


def _url(environ: Mapping[str, str], name: str, kind: str) -> str | None:
    value = _optional(environ, name)
    if value is not None and (problem := url_problem(value, kind)):
        raise SettingsError(f"{name}={mask_dsn(value)!r}: {problem}")
    return value


def scrub_dsn(text: str, dsn: str) -> str:
    """``text`` (a driver's message, say) with the DSN's password masked wherever it shows,
    as the DSN writes it or percent-decoded."""
    for password in _passwords(dsn):
        text = text.replace(password, _MASK)
    return text


def _passwords(dsn: str) -> list[str]:
    """The password of a DSN in every form a text may show it, the longest first."""
    if "://" not in dsn:
        found = [match.group(2).strip("'") for match in _KEYWORD_PASSWORD.finditer(dsn)]
    else:
        _, userinfo, rest = _split_userinfo(dsn)
        query = rest.partition("?")[2].partition("#")[0]
        found = [userinfo.partition(":")[2]] if ":" in userinfo else []
        found += [v for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() == "password"]
    forms = {form for password in found for form in (password, unquote(password)) if form}
    return sorted(forms, key=len, reverse=True)


def _optional(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    value = _optional(environ, name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise SettingsError(f"{name}={value!r}: expected a number of seconds above 0, like 60")
    return seconds


def _count(environ: Mapping[str, str], name: str, default: int) -> int:
    value = _optional(environ, name)
    if value is None:
        return default
    if not value.isdigit() or int(value) == 0:
        raise SettingsError(f"{name}={value!r}: expected a whole number above 0, like 8192")
    return int(value)


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Where Baton keeps its events and cache, and the key that encrypts its secrets.

    ``database_url`` None selects the embedded PostgreSQL under ``home / "pgdata"``;
    ``redis_url`` None selects the in-process context cache; ``secret_key`` None lets the
    embedded default generate a key under ``home``.

    ``store_wait``: seconds the runs of a process stay paused while the event store is
    unreachable before the process gives up (BATON_STORE_WAIT). ``owner_timeout``: seconds
    without a heartbeat after which a process counts as gone and its open runs are ended
    as interrupted (BATON_OWNER_TIMEOUT); it must exceed ``store_wait``, or a process
    paused through an outage would have its runs ended under it.
    """

    database_url: str | None = None
    redis_url: str | None = None
    home: Path = Path(".baton")
    secret_key: str | None = None
    store_wait: float = STORE_WAIT
    owner_timeout: float = OWNER_TIMEOUT
    allowed_targets: str | None = None
    """What runs started through the service may reach (orchestrator.targets); None:
    public addresses only."""
    queue_url: str | None = None
    """The worker queue (redis://HOST:PORT/DB) the service puts its runs on, for
    ``baton worker`` to run (BATON_QUEUE_URL); None: the service runs them itself."""
    archive_dir: Path | None = None
    """BATON_ARCHIVE_DIR: where retention archives; None: ``archive`` under ``home``."""
    retention_interval: float | None = RETENTION_INTERVAL
    """Seconds between two retention applies of ``baton serve`` (BATON_RETENTION_INTERVAL);
    None ("off"): the service applies none."""
    excerpt_limit: int = EXCERPT_LIMIT
    """Characters of each request and response body the events keep (BATON_EXCERPT_LIMIT):
    what ``baton replay`` can check again."""

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, *, cwd: Path | None = None
    ) -> Settings:
        """Settings from ``BATON_*`` variables; a relative ``BATON_HOME`` is under ``cwd``."""
        base = cwd if cwd is not None else Path.cwd()
        home_value = _optional(environ, "BATON_HOME")
        home = Path(home_value).expanduser() if home_value else Path(".baton")
        store_wait = _seconds(environ, "BATON_STORE_WAIT", STORE_WAIT)
        owner_timeout = _seconds(environ, "BATON_OWNER_TIMEOUT", OWNER_TIMEOUT)
        archive = _optional(environ, "BATON_ARCHIVE_DIR")
        if owner_timeout <= store_wait:
            # a process paused through an outage would count as gone, its runs ended under it
            raise SettingsError(
                f"BATON_OWNER_TIMEOUT ({owner_timeout:g} s) must be longer than"
                f" BATON_STORE_WAIT ({store_wait:g} s): raise the one or lower the other"
            )
        return cls(
            database_url=_url(environ, "BATON_DATABASE_URL", "PostgreSQL"),
            redis_url=_url(environ, "BATON_REDIS_URL", "Redis"),
            home=home if home.is_absolute() else base / home,
            secret_key=_optional(environ, "BATON_SECRET_KEY"),
            store_wait=store_wait,
            owner_timeout=owner_timeout,
            allowed_targets=_optional(environ, "BATON_ALLOWED_TARGETS"),
            queue_url=_url(environ, "BATON_QUEUE_URL", "Redis"),
            archive_dir=Path(archive).expanduser() if archive else None,
            retention_interval=(
                None
                if _optional(environ, "BATON_RETENTION_INTERVAL") == "off"
                else _seconds(environ, "BATON_RETENTION_INTERVAL", RETENTION_INTERVAL)
            ),
            excerpt_limit=_count(environ, "BATON_EXCERPT_LIMIT", EXCERPT_LIMIT),
        )

    @property
    def pgdata(self) -> Path:
        """The embedded PostgreSQL's data directory."""
        return self.home / "pgdata"

    def __repr__(self) -> str:
        # settings end up in logs and tracebacks: never show a password or the key
        database = mask_dsn(self.database_url) if self.database_url else None
        redis = mask_dsn(self.redis_url) if self.redis_url else None
        key = _MASK if self.secret_key else None
        queue = mask_dsn(self.queue_url) if self.queue_url else None
        return (
            f"Settings(database_url={database!r}, redis_url={redis!r}, "
            f"home={str(self.home)!r}, secret_key={key!r}, store_wait={self.store_wait!r}, "
            f"owner_timeout={self.owner_timeout!r}, queue_url={queue!r})"
        )
