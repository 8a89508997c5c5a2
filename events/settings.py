"""Baton's settings, read once from the environment into one frozen object.

Unset and empty variables mean the same thing: an empty ``BATON_DATABASE_URL`` left in a
shell or a CI file selects the embedded default rather than failing on an empty DSN.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

_MASK = "***"
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_dsn(url: str) -> str:
    """The DSN with its password replaced by ``***``, safe to print or log.

    Handles URLs (``postgresql://user:secret@host/db``, ``?password=`` in the query) and
    libpq keyword strings (``host=h password=secret``).
    """
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub(lambda m: m.group(1) + _MASK, url)
    try:
        parts = urlsplit(url)
    except ValueError:
        # not parseable as a URL: mask everything between the scheme and the last '@'
        scheme, _, rest = url.partition("://")
        at = rest.rfind("@")
        return f"{scheme}://{_MASK}{rest[at:]}" if at >= 0 else url
    netloc = parts.netloc
    userinfo, has_at, hostinfo = netloc.rpartition("@")
    if has_at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{_MASK}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() == "password" for key, _ in pairs):
            masked = [(k, _MASK if k.lower() == "password" else v) for k, v in pairs]
            query = urlencode(masked, safe="/*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _optional(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Where Baton keeps its events and cache, and the key that encrypts its secrets.

    ``database_url`` None selects the embedded PostgreSQL under ``home / "pgdata"``;
    ``redis_url`` None selects the in-process context cache; ``secret_key`` None lets the
    embedded default generate a key under ``home``.
    """

    database_url: str | None = None
    redis_url: str | None = None
    home: Path = Path(".baton")
    secret_key: str | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, *, cwd: Path | None = None
    ) -> Settings:
        """Settings from ``BATON_*`` variables; a relative ``BATON_HOME`` is under ``cwd``."""
        base = cwd if cwd is not None else Path.cwd()
        home_value = _optional(environ, "BATON_HOME")
        home = Path(home_value).expanduser() if home_value else Path(".baton")
        return cls(
            database_url=_optional(environ, "BATON_DATABASE_URL"),
            redis_url=_optional(environ, "BATON_REDIS_URL"),
            home=home if home.is_absolute() else base / home,
            secret_key=_optional(environ, "BATON_SECRET_KEY"),
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
        return (
            f"Settings(database_url={database!r}, redis_url={redis!r}, "
            f"home={str(self.home)!r}, secret_key={key!r})"
        )
