"""Secrets: encrypted at rest, redacted everywhere they could be shown.

A secret is a kind of value, not a naming convention: once the runner knows a value is
secret it encrypts it before any event carries it and adds it to the run's ``Redactor``,
which every console line, report, log, API response and notification passes through.

A response can also carry a credential the flow never names (a refresh token in a login
answer), so a ``Redactor`` masks by shape too, after a ``Policy``: the values of keys,
parameters, fields and headers whose names say they are credentials, and JWT-shaped
strings. This module is the one home of that policy; the log lines of a process pass
through it as well (``RedactingFormatter``).

It is also the one home of which *names* are secret: every ``auth.*`` capture (a run's auth
tokens) unless it says ``secret: false``, any capture that says ``secret: true``, and the
``secrets.*`` inputs a flow reads; and of how an event is shown to anyone but the runner
(``masked_event``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets as _random
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from events.errors import SecretError as SecretError
from events.types import AuthTokenUpdated, Event, VariableCaptured

MASK = "***"
PREFIX = "enc:v1:"
KEY_FILE = "secret.key"
GENERATE_HINT = (
    'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
)

# The key id lets a wrong key be told apart from a damaged token; it is a keyed hash, so it
# says nothing about the key itself.
_KEY_ID_LENGTH = 8
_AAD = b"baton-secret-v1"
_NONCE = 12
_KEY_TEXT = re.compile(r"[A-Za-z0-9_\-+/]{43}=?")


# ---- which names are secret ---------------------------------------------------------------

AUTH_NAMESPACE = "auth"
AUTH_PREFIX = AUTH_NAMESPACE + "."
_SECRET_REFERENCE = re.compile(r"secrets\.(\w+)|secrets\[['\"](\w+)['\"]\]")


def is_auth_name(name: str) -> bool:
    """Whether a captured name is one of the run's auth tokens: ``auth.token``, not
    ``author``, nor a capture named just ``auth``."""
    return name.startswith(AUTH_PREFIX)


def reads_auth(reference: str) -> bool:
    """Whether a name a template reads is an auth token: one (``auth.token``) or all of
    them (``{{ auth | tojson }}`` reads ``auth``); ``{{ author }}`` reads none."""
    return reference == AUTH_NAMESPACE or is_auth_name(reference)


def is_secret_capture(name: str, secret: bool | None) -> bool:
    """What a capture's ``secret:`` says; without one, every auth token is a secret."""
    return secret if secret is not None else is_auth_name(name)


def secret_references(text: str) -> set[str]:
    """The names of the ``secrets.*`` a template text reads (``secrets.NAME`` or
    ``secrets['NAME']``), also those only read under ``| default(...)``."""
    return {a or b for a, b in _SECRET_REFERENCE.findall(text)}


def masked_event(event: Event) -> Event:
    """The event as anyone but the runner may see it: the value of a secret capture (its
    ciphertext, an auth token's or one marked ``secret``) is no one's business."""
    if isinstance(event, AuthTokenUpdated) or (
        isinstance(event, VariableCaptured) and event.secret
    ):
        return msgspec.structs.replace(event, value=MASK)
    return event


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_key(text: str, source: str = "BATON_SECRET_KEY") -> bytes:
    """The 32 raw bytes of a key written in (URL-safe or standard) base64, as Fernet makes."""
    raw = text.strip()
    if not _KEY_TEXT.fullmatch(raw):
        # never echo the value: a malformed key may still be someone's real secret
        raise SecretError(
            f"{source} is not a valid key ({len(raw)} characters): it must be 32 random bytes "
            f"in URL-safe base64, 44 characters. Generate one with: {GENERATE_HINT}"
        )
    return _unb64url(raw.rstrip("=").replace("+", "-").replace("/", "_"))


class Cipher:
    """AES-256-GCM with the 32-byte key; tokens are ``enc:v1:<key id>:<base64url>``.

    AES-GCM rather than Fernet: the same Fernet-format key, but authenticated encryption
    with tokens about half as long (12-byte nonce + 16-byte tag, no timestamp, no separate
    HMAC), and the AEAD the design names. The ``v1`` in the prefix leaves room to change
    the scheme without guessing what an old token is.
    """

    __slots__ = ("_aead", "key_id")

    def __init__(self, key: bytes | str) -> None:
        if isinstance(key, str) or len(key) != 32:
            text = key if isinstance(key, str) else key.decode("ascii", "replace")
            key = parse_key(text, "the key")
        self._aead = AESGCM(key)
        self.key_id = hmac.new(key, b"baton key id", hashlib.sha256).hexdigest()[:_KEY_ID_LENGTH]

    def __repr__(self) -> str:
        return f"Cipher(key_id={self.key_id!r})"

    def encrypt(self, value: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, value.encode("utf-8"), _AAD)
        return f"{PREFIX}{self.key_id}:{_b64url(nonce + sealed)}"

    def decrypt(self, token: str) -> str:
        if not is_encrypted(token):
            raise SecretError("not an encrypted value (no 'enc:v1:' prefix)")
        key_id, _, body = token[len(PREFIX) :].partition(":")
        if key_id != self.key_id:
            raise SecretError(
                f"this secret was encrypted with another key (key id {key_id}, the current "
                f"key is {self.key_id}): set BATON_SECRET_KEY to the key the run was "
                "recorded with"
            )
        try:
            data = _unb64url(body)
            clear = self._aead.decrypt(data[:_NONCE], data[_NONCE:], _AAD)
        except (binascii.Error, ValueError, InvalidTag) as exc:
            raise SecretError("the encrypted value is damaged and cannot be decrypted") from exc
        return clear.decode("utf-8")


def is_encrypted(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def load_key(secret_key: str | None, home: Path) -> bytes:
    """``BATON_SECRET_KEY`` if given, else the key under ``home``, generated on first use."""
    if secret_key is not None and secret_key.strip():
        return parse_key(secret_key)
    home.mkdir(parents=True, exist_ok=True)
    path = home / KEY_FILE
    if not path.exists():
        _create_key_file(path)
    return parse_key(path.read_text(encoding="ascii", errors="replace"), str(path))


def _create_key_file(path: Path) -> None:
    """Write a new key so that no process ever reads a partial or world-readable file.

    The key goes into a private temporary file (O_EXCL, 0600) which is then hard-linked to
    its name: the link appears with its full content or not at all, and fails if another
    process got there first, whose key then wins.
    """
    key = base64.urlsafe_b64encode(os.urandom(32)) + b"\n"
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{_random.token_hex(4)}")
    _write_new(temporary, key)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    except OSError:
        # a file system without hard links: create the file itself exclusively instead
        with contextlib.suppress(FileExistsError):
            _write_new(path, key)
    finally:
        temporary.unlink(missing_ok=True)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# Shorter values would turn ordinary words and numbers into "***" all over the output.
MIN_SECRET_LENGTH = 4
# A base64 run this short (8 characters) could turn up by chance inside unrelated base64.
_MIN_CORE_BYTES = 6
_BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_")
_PERCENT = re.compile(r"%[0-9A-F]{2}")
# Masked whatever a flow's policy keeps: the credential headers of the design.
_ALWAYS_MASKED_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key"}
)


def _forms(secret: str) -> dict[str, tuple[int, int]]:
    """Every text a secret can appear as, each with how far to widen a match (left, right).

    Exact forms (clear, percent-encoded, JSON-escaped, base64 of the whole value) widen by
    nothing. Base64 of a secret inside a longer value (``Basic base64(user:password)``, a
    JWT, an echoed header) is not a substring of the secret's own base64: it depends on
    where the secret falls in the 3-byte groups. So for each of the 3 alignments the form
    is the base64 of the whole groups made only of secret bytes, and a match widens over
    the 2 or 3 neighbouring characters that mix secret bits with the bytes around it.
    Limit: a secret shorter than 8 bytes is found inside longer base64 only at some
    alignments, as its cores would be too short to tell from chance.
    """
    forms: dict[str, tuple[int, int]] = {secret: (0, 0)}
    percent = {quote(secret, safe=""), quote(secret), quote_plus(secret), quote_plus(secret, "/")}
    for text in percent:
        forms[text] = (0, 0)
        forms[_PERCENT.sub(lambda m: m.group().lower(), text)] = (0, 0)
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        forms[escaped] = (0, 0)
        forms[escaped.replace("/", "\\/")] = (0, 0)
    data = secret.encode("utf-8")
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(data).decode("ascii")
        forms[whole] = (0, 0)
        forms.setdefault(whole.rstrip("="), (0, 0))
        for skip in range(3):
            usable = (len(data) - skip) // 3 * 3
            if usable < _MIN_CORE_BYTES:
                continue
            trailing = len(data) - skip - usable
            core = encode(data[skip : skip + usable]).decode("ascii")
            widen = (skip + 1 if skip else 0, trailing + 1 if trailing else 0)
            previous = forms.get(core, (0, 0))
            forms[core] = (max(previous[0], widen[0]), max(previous[1], widen[1]))
    return forms


def _trie_pattern(words: Iterable[str]) -> str:
    """One regular expression matching any of ``words``, the longest one at a position.

    Written as a prefix tree rather than a flat alternation: at each position of the text
    the engine follows one branch instead of trying every form of every secret, about three
    times faster on a 4 KB response excerpt with a dozen secrets.
    """
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = None

    def build(node: dict[str, Any]) -> str:
        chain: list[str] = []
        # single-child runs are the bulk of a long secret: walk them without recursing
        while len(node) == 1 and "" not in node:
            ((char, child),) = node.items()
            chain.append(re.escape(char))
            node = child
        branches = [re.escape(char) + build(child) for char, child in node.items() if char]
        if not branches:
            return "".join(chain)
        group = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:
            # greedy: the longer word if it matches, this shorter one otherwise
            group = f"(?:{group})?"
        return "".join(chain) + group

    return build(root)


# ---- credentials by shape -----------------------------------------------------------------

_CREDENTIAL_NAME = re.compile(
    r"passw(?:or)?d|secret|token|api[-_]?key|private[-_]?key|authorization|cookie|session|jwt"
)
# What a lower-cased text must contain for one of those names to be in it: a cheap test
# that lets most texts (no credential named in them) skip the scan.
_NAME_HINTS = ("passw", "secret", "token", "key", "authorization", "cookie", "session", "jwt")
_JWT = re.compile(r"eyJ[\w-]{2,}\.eyJ[\w-]{2,}\.[\w-]*")
# Credentials that say what they are by their form, whatever key or text holds them (a
# key named "value", a log line): AWS access key ids, the prefixed tokens of GitHub,
# GitLab, Slack, Stripe and Google, a PEM private key (to its end, or to the end of the
# string holding it when it is cut short).
_PREFIXED = re.compile(
    r"(?<![\w-])(?:(?:AKIA|ASIA)[A-Z0-9]{16}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{20,}"
    r"|glpat-[\w-]{20,}|xox[abposr]-[A-Za-z0-9-]{10,}|[sr]k_live_[A-Za-z0-9]{16,}"
    r"|AIza[\w-]{35})(?![\w-])"
    r"|-----BEGIN ([A-Z ]*)PRIVATE KEY-----[^\"']*?(?:-----END \1PRIVATE KEY-----|(?=[\"'])|\Z)"
)
_PREFIX_HINTS = ("AKIA", "ASIA", "gh", "glpat-", "xox", "k_live_", "AIza", "PRIVATE KEY")
# the password of a URL's userinfo (scheme://user:password@host), whatever the URL
# (its slashes JSON-escaped too: https:\/\/user:password@host)
_USERINFO = re.compile(r"(:(?:\\?/){2}[^\s/?#@:\"'<>\\]*):[^\s/?#@\"'<>\\]+@")
_BEARER = re.compile(r"\b(Bearer)\s+[\w.~+/=-]{8,}", re.IGNORECASE)
# "key": value in JSON, 'key': value in a Python repr (a log line), \"key\": value in JSON
# written inside a JSON string (an echo service's copy of the request body)
_MEMBER = re.compile(r"""(\\?["'])([^"'\\\n]{1,128})\1\s*:\s*""")
_SCALAR = re.compile(r"[^,}\]\s\\]*")
# key=value in a query string, a form body, a cookie, a log line
_PAIR = re.compile(r"(?<![\w.%\[\]-])([\w.%\[\]-]{1,128})=([^&\s;,\"'<>=\\][^&\s;,\"'<>\\]*)")
_WORD = re.compile(r"[A-Za-z_][\w-]*")
_GLOB_CHARS = re.compile(r"[*?\[\]]")


def _globs(patterns: Iterable[str]) -> re.Pattern[str] | None:
    translated = [fnmatch.translate(pattern) for pattern in patterns]
    return re.compile("|".join(translated)) if translated else None


class Policy:
    """Which names say that their value is a credential: the built-in words (password,
    passwd, secret, any ``*token*``, api_key/apikey, private_key, authorization, cookie,
    session, jwt, anywhere in a name and in any case), plus ``keys``, minus ``keep``.

    ``keys`` and ``keep`` are glob patterns matched against a whole name without case:
    ``ssn`` is that name only, ``*card*`` any name holding "card". ``keep`` wins: it is how
    a flow shows a value whose name only looks like a credential's (``token_type``).
    """

    __slots__ = ("_added", "_hints", "_kept", "_verdicts")

    def __init__(self, keys: Iterable[str] = (), keep: Iterable[str] = ()) -> None:
        added = [key.lower() for key in keys if key]
        self._added = _globs(added)
        self._kept = _globs(key.lower() for key in keep if key)
        literal = {chunk for key in added for chunk in _GLOB_CHARS.split(key) if chunk}
        self._hints = (*_NAME_HINTS, *sorted(literal))
        self._verdicts: dict[str, bool] = {}

    def __repr__(self) -> str:
        return f"Policy(added={self._added and self._added.pattern!r})"

    def is_credential(self, name: str) -> bool:
        verdict = self._verdicts.get(name)
        if verdict is None:
            lowered = unquote_plus(name).lower()
            verdict = not (self._kept and self._kept.match(lowered)) and bool(
                _CREDENTIAL_NAME.search(lowered) or (self._added and self._added.match(lowered))
            )
            if len(self._verdicts) < 4096:  # bounded: names come from the responses
                self._verdicts[name] = verdict
        return verdict

    def mentions_credential(self, text: str) -> bool:
        """Whether a name in ``text`` (a JSONPath, an assertion's subject) is a credential's."""
        return any(self.is_credential(word) for word in _WORD.findall(text))

    def scrub(self, text: str) -> str:
        """``text`` with every credential it shows by its shape masked; itself if none."""
        lowered = text.lower()
        scrubbed = text
        if any(hint in lowered for hint in self._hints):
            scrubbed = _PAIR.sub(self._pair, self._members(scrubbed))
        if "eyJ" in scrubbed:
            scrubbed = _JWT.sub(MASK, scrubbed)
        if any(hint in scrubbed for hint in _PREFIX_HINTS):
            scrubbed = _PREFIXED.sub(MASK, scrubbed)
        if "@" in scrubbed and ("://" in scrubbed or ":\\/\\/" in scrubbed):
            scrubbed = _USERINFO.sub(rf"\1:{MASK}@", scrubbed)
        if "bearer" in lowered:
            scrubbed = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", scrubbed)
        return text if scrubbed == text else scrubbed

    def _pair(self, match: re.Match[str]) -> str:
        name = match.group(1)
        return f"{name}={MASK}" if self.is_credential(name) else match.group()

    def _members(self, text: str) -> str:
        pieces: list[str] = []
        last = pos = 0
        while (match := _MEMBER.search(text, pos)) is not None:
            pos = match.end()
            if not self.is_credential(match.group(2)):
                continue  # its value is searched as the rest: nested names, pairs
            quote_mark = match.group(1)
            end = _value_end(text, pos, quote_mark)
            pieces.append(text[last:pos])
            pieces.append(f"{quote_mark}{MASK}{quote_mark}")
            last = pos = end
        if not pieces:
            return text
        pieces.append(text[last:])
        return "".join(pieces)


def _value_end(text: str, start: int, quote_mark: str) -> int:
    """Where the value at ``start`` ends: a string, an object or an array (at its closing
    bracket), or a bare scalar; the end of the text if it is cut short."""
    if text.startswith(quote_mark, start):
        # inside JSON written in a JSON string (\"), a quote of the outer text is one
        # backslash away, a quote of the inner string three (\\\"), five for a backslash
        # then the end of the string
        level = len(quote_mark) - 1
        period, closing = 2 << level, (1 << level) - 1
        pos = start + len(quote_mark)
        while (end := text.find(quote_mark[-1], pos)) >= 0:
            run = 0
            while end - run > pos and text[end - run - 1] == "\\":
                run += 1
            if run % period == closing:
                return end + 1
            pos = end + 1
        return len(text)
    if start < len(text) and text[start] in "{[":
        depth, in_string, escaped = 0, False, False
        for index in range(start, len(text)):
            char = text[index]
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    return index + 1
        return len(text)
    match = _SCALAR.match(text, start)
    return match.end() if match else start


DEFAULT_POLICY = Policy()


@functools.lru_cache(maxsize=256)
def policy_for(keys: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> Policy:
    """The policy of a flow or test (``redact: {keys: [...], keep: [...]}``), made once."""
    return DEFAULT_POLICY if not keys and not keep else Policy(keys, keep)


# ---- known secrets ------------------------------------------------------------------------


class _Known:
    """The secret values of one run, with every text they can appear as; shared by the
    redactors of its tests.

    A value added replaces the containers rather than changing them: a log line formatted
    in another thread (``RedactingFormatter``) reads a whole set, never one changing size.
    """

    __slots__ = ("__weakref__", "forms", "longest", "patterns", "secrets", "shortest")

    def __init__(self) -> None:
        self.secrets: frozenset[str] = frozenset()
        self.forms: dict[str, tuple[int, int]] = {}
        self.shortest = 0
        self.longest = 0
        self.patterns: dict[tuple[str, ...], re.Pattern[str]] = {}
        with _LIVE_LOCK:
            _LIVE.add(self)

    def add(self, value: str) -> None:
        if len(value) < MIN_SECRET_LENGTH or value in self.secrets:
            return
        forms = dict(self.forms)
        for text, widen in _forms(value).items():
            old = forms.get(text, (0, 0))
            forms[text] = (max(old[0], widen[0]), max(old[1], widen[1]))
        self.shortest = min(len(text) for text in forms)
        self.longest = max(len(text) for text in forms)
        self.patterns = {}
        self.forms = forms
        self.secrets = self.secrets | {value}

    def _search(
        self, found: list[str], patterns: dict[tuple[str, ...], re.Pattern[str]]
    ) -> Callable[[str, int], tuple[int, int] | None]:
        """Where the next of the ``found`` forms starts and ends, the longest at a position."""
        if len(found) == 1:
            form = found[0]

            def find(text: str, pos: int) -> tuple[int, int] | None:
                start = text.find(form, pos)
                return None if start < 0 else (start, start + len(form))

            return find
        key = tuple(found)
        pattern = patterns.get(key)
        if pattern is None:
            pattern = patterns[key] = re.compile(_trie_pattern(found))

        def search(text: str, pos: int) -> tuple[int, int] | None:
            match = pattern.search(text, pos)
            return None if match is None else match.span()

        return search

    def replace(self, text: str) -> str:
        """Most texts hold no secret, and each run learns new ones (its own token), so a
        regular expression over every form would be compiled once per run for a handful
        of texts. A text is first checked with plain substring tests; only the forms it
        holds are then searched, by ``str.find`` when it is one form, by a regular
        expression over just those forms otherwise (the others can never match)."""
        forms, patterns = self.forms, self.patterns
        if not forms or len(text) < self.shortest:
            return text
        found = [form for form in forms if form in text]
        if not found:
            return text
        search = self._search(found, patterns)
        pieces: list[str] = []
        last = 0
        span = search(text, 0)
        while span is not None:
            start, end = span
            left, right = forms[text[start:end]]
            while left and start > last and text[start - 1] in _BASE64_CHARS:
                start -= 1
                left -= 1
            while right and end < len(text) and text[end] in _BASE64_CHARS:
                end += 1
                right -= 1
            pieces.append(text[last:start])
            pieces.append(MASK)
            last = end
            span = search(text, end)
        pieces.append(text[last:])
        return "".join(pieces)


# A cookie value shorter than this is more likely a setting than a session.
_MIN_COOKIE_SECRET = 8
# Every run's known secrets while its redactors live: what a log line is redacted with.
_LIVE: weakref.WeakSet[_Known] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
# A cut excerpt could end inside a credential that is then no longer recognised (half a
# JWT, half a secret): the text around the cut is redacted with this much beyond it.
_EXCERPT_MARGIN = 2048


class Redactor:
    """Masks every known secret, in any of its encodings, and whatever its ``policy``
    recognises as a credential by its shape, with ``***``.

    Values shorter than ``MIN_SECRET_LENGTH`` (4) characters are not known secrets:
    masking every ``"1"`` or ``"ab"`` would ruin the output and such a value protects
    little anyway. The known set only grows during a run (secrets captured as it goes),
    and is shared with the redactors ``scoped`` to one test's policy.
    """

    __slots__ = ("_known", "policy")

    def __init__(self, values: Iterable[str] = (), policy: Policy = DEFAULT_POLICY) -> None:
        self._known = _Known()
        self.policy = policy
        for value in values:
            self.add(value)

    def __repr__(self) -> str:
        return f"Redactor({len(self._known.secrets)} secrets)"

    def __len__(self) -> int:
        return len(self._known.secrets)

    def scoped(self, policy: Policy) -> Redactor:
        """A redactor with another policy and the same known secrets (one test's)."""
        if policy is self.policy:
            return self
        scoped = Redactor.__new__(Redactor)
        scoped._known = self._known
        scoped.policy = policy
        return scoped

    def add(self, value: str) -> None:
        self._known.add(value)

    def add_sent_credentials(self, headers: Mapping[str, str]) -> None:
        """Know the credentials a request's headers send as secrets, however the flow
        wrote them (a literal ``Authorization: Bearer ...`` too): a target that echoes one
        back under a name that says nothing (``{"seen": "<the token>"}``) shows a secret.
        A cookie's values count when long enough to be an identifier, not a flag
        (``theme=dark``), which would otherwise be masked wherever the word appears."""
        for name, value in headers.items():
            lowered = name.lower()
            if lowered not in _ALWAYS_MASKED_HEADERS and not self.policy.is_credential(name):
                continue
            if lowered == "cookie":
                values = [pair.partition("=")[2].strip() for pair in value.split(";")]
                for cookie in values:
                    if len(cookie) >= _MIN_COOKIE_SECRET:
                        self.add(cookie)
                continue
            self.add(value.strip())
            scheme, _, credential = value.strip().partition(" ")
            self.add(credential.strip())
            if scheme.lower() == "basic":
                with contextlib.suppress(binascii.Error, ValueError):
                    decoded = base64.b64decode(credential.strip(), validate=True).decode()
                    self.add(decoded.partition(":")[2])

    def holds(self, value: Any) -> bool:
        """Whether ``value`` (JSON-like) shows a known secret, in any of its forms."""
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        return self._known.replace(text) is not text

    def redact(self, text: str) -> str:
        return self.policy.scrub(self._known.replace(text))

    def excerpt(self, text: str, limit: int) -> str:
        """The first ``limit`` characters of ``text``, redacted as if it were whole: the
        cut never leaves the start of a credential that would have been masked."""
        window = limit + 2 * _EXCERPT_MARGIN
        while True:
            redacted = self.redact(text[:window])
            if window >= len(text) or len(redacted) >= limit + _EXCERPT_MARGIN:
                return redacted[:limit]
            window *= 2

    def redact_value(self, value: Any) -> Any:
        """``value`` (JSON-like: dicts, lists, strings, numbers) with every secret masked,
        and the value of every key named like a credential, at any depth."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {
                self.redact(k) if isinstance(k, str) else k: MASK
                if isinstance(k, str) and self.policy.is_credential(k)
                else self.redact_value(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.redact_value(item) for item in value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            # a number is one token: mask it only when it is a secret, not when it contains one
            return MASK if str(value) in self._known.secrets else value
        return value

    def mask_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Credential headers masked outright, every other value redacted."""
        return {
            name: MASK
            if name.lower() in _ALWAYS_MASKED_HEADERS or self.policy.is_credential(name)
            else self.redact(value)
            for name, value in headers.items()
        }


def redact_process_text(text: str) -> str:
    """``text`` redacted with every run's known secrets in this process and the default
    policy: for what is not any one run's (a log line)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for known in live:
        text = known.replace(text)
    return DEFAULT_POLICY.scrub(text)


class RedactingFormatter(logging.Formatter):
    """A log formatter whose every line, traceback included, is ``redact_process_text``'s."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_process_text(super().format(record))
