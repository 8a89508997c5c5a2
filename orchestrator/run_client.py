"""One run's httpx client: httpx's API and cookie rules, without the per-request work that
finds nothing.

Around a client's cookie jar httpx does, for every request, two copies of the jar, a
``urllib.request.Request`` built from the ``httpx.Request`` (URL parsed again, every
header copied) and the standard library's cookie policy; and for every response another
``urllib.request.Request`` and an ``email.message.Message`` of all its headers, even when
there is no ``Set-Cookie``. On the benchmark that was more than a third of httpx's cost
per request (bench/README.md). Here:

- a response without ``Set-Cookie`` skips the extraction, which could only find nothing,
  and one with it is read by the jar without copying every header twice;
- a request's ``Cookie`` header comes from the same policy (``http.cookiejar``'s default,
  as in httpx), asked once per origin (and path, if a cookie is scoped to one) and
  remembered until the jar changes or one of its cookies expires.

Redirects still go through httpx, with the same jar.
"""

from __future__ import annotations

import codecs
import email.message
import functools
import time
import urllib.request
from http.cookiejar import Cookie, CookieJar
from typing import Any

import httpx


class _Jar(CookieJar):
    """A cookie jar that counts its changes: ``set_cookie`` and ``clear`` are the only ways
    the standard library's jar changes (extraction, expiry and ``clear_*`` use them)."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def set_cookie(self, cookie: Cookie) -> None:
        super().set_cookie(cookie)
        self.version += 1

    def clear(
        self, domain: str | None = None, path: str | None = None, name: str | None = None
    ) -> None:
        super().clear(domain, path, name)
        self.version += 1


class _CookieQuery(urllib.request.Request):
    """What the cookie policy reads of a request (URL, method), and where it puts the
    header it decides on."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.cookie: str | None = None

    def add_unredirected_header(self, key: str, val: str) -> None:
        if key == "Cookie":
            self.cookie = val


class _SetCookies:
    """What the cookie jar reads of a response: ``info().get_all(name)``. httpx builds an
    ``email.message.Message`` of every header for it."""

    def __init__(self, headers: httpx.Headers) -> None:
        self._headers = headers

    def info(self) -> _SetCookies:
        return self

    def get_all(self, name: str, default: list[str]) -> list[str]:
        return self._headers.get_list(name) or default


class RunCookies(httpx.Cookies):
    """A run's cookies: an ``httpx.Cookies`` whose jar remembers its answers."""

    def __init__(self) -> None:
        self._jar = _Jar()
        super().__init__(self._jar)
        self._answers: dict[tuple[str, str, str], str | None] = {}
        self._version = -1
        self._empty = True
        self._by_path = False
        self._valid_until = 0.0

    def extract_cookies(self, response: httpx.Response) -> None:
        if "set-cookie" in response.headers:
            self._jar.extract_cookies(
                _SetCookies(response.headers),  # type: ignore[arg-type]
                _CookieQuery(str(response.request.url)),
            )

    def header_for(self, url: httpx.URL) -> str | None:
        """The ``Cookie`` header the jar's policy gives a request to ``url``; None if none."""
        jar = self._jar
        if jar.version != self._version or time.time() >= self._valid_until:
            self._forget()
        if self._empty:
            return None
        path = url.raw_path.partition(b"?")[0].decode("ascii") if self._by_path else ""
        key = (url.scheme, url.netloc.decode("ascii"), path)
        try:
            return self._answers[key]
        except KeyError:
            query = _CookieQuery(str(url))
            jar.add_cookie_header(query)
            self._answers[key] = query.cookie
            return query.cookie

    def _forget(self) -> None:
        cookies = list(self._jar)
        self._answers.clear()
        self._version = self._jar.version
        self._empty = not cookies
        # a cookie scoped to a path below "/" makes the answer depend on the path
        self._by_path = any(cookie.path != "/" for cookie in cookies)
        # the policy leaves out a cookie once int(now) >= its expiry: answers hold until then
        expiries = [cookie.expires for cookie in cookies if cookie.expires is not None]
        self._valid_until = min(expiries, default=float("inf"))


class RunClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` for one run, with ``RunCookies`` as its cookie jar. It has no
    base URL or default query parameters: requests are made with ``prepare``."""

    def __init__(self, **options: Any) -> None:
        self._run_cookies = RunCookies()
        cookies = options.pop("cookies", None)
        super().__init__(**options)
        if cookies:
            self._run_cookies.update(cookies)

    @property
    def cookies(self) -> RunCookies:
        return self._run_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        self._run_cookies = RunCookies()
        if cookies:
            self._run_cookies.update(cookies)

    def prepare(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        content: bytes | str | None = None,
        data: Any = None,
        files: Any = None,
        params: Any = None,
        timeout: float,
    ) -> httpx.Request:
        """What ``build_request`` makes, with the run's cookies from ``RunCookies``:
        the client's default headers under the given ones, and the cookie header unless the
        request sets its own. ``params`` are added to a query already in ``url`` (a name in
        both takes the value of ``params``); httpx would replace that query with them."""
        merged = httpx.Headers(self.headers)
        merged.update(headers)
        request = httpx.Request(
            method,
            _url(url).copy_merge_params(params) if params else _url(url),
            headers=merged,
            content=content,
            data=data,
            files=files,
            extensions={"timeout": _timeout(timeout)},
        )
        if "cookie" not in request.headers:
            cookie = self._run_cookies.header_for(request.url)
            if cookie is not None:
                request.headers["Cookie"] = cookie
        return request


@functools.lru_cache(maxsize=1024)
def _url(text: str) -> httpx.URL:
    # parsing is ~10 us; most of a flow's URLs (/auth/login, /catalog) repeat from run to
    # run, and an httpx.URL never changes
    return httpx.URL(text)


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> dict[str, float | None]:
    return httpx.Timeout(seconds).as_dict()


def text(response: httpx.Response) -> str:
    """``response.text``, with the charset of each Content-Type worked out once (httpx
    parses it with ``email.message`` for every response)."""
    response.encoding = _encoding(response.headers.get("content-type"))
    return response.text


@functools.lru_cache(maxsize=256)
def _encoding(content_type: str | None) -> str:
    # httpx's rule: the charset parameter if Python knows it, utf-8 otherwise
    if content_type:
        message = email.message.Message()
        message["content-type"] = content_type
        charset = message.get_content_charset()
        if charset:
            try:
                codecs.lookup(charset)
            except LookupError:
                return "utf-8"
            return charset
    return "utf-8"
