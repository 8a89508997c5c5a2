"""``baton import curl FILE``: curl commands (one or many, ``\\`` continuations) as a flow.

Each command is one test, in order. Commands are split the way a POSIX shell splits
them (``shlex``), so quoting works as in the terminal the command was copied from.
Credentials on a command line (``-u``, an ``Authorization`` or ``Cookie`` header, a
password field) become ``{{ secrets.NAME }}``, never written into the flow; ``-u`` becomes
the request's ``auth:`` (basic, digest with ``--digest``, aws_sigv4 with ``--aws-sigv4``).
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlsplit

from orchestrator.errors import UsageError
from orchestrator.importers import Imported, Untranslated
from orchestrator.importers.parts import (
    Secrets,
    basic_auth,
    basic_credentials,
    body_fields,
    header_value,
    is_credential_name,
    literal,
    literal_tree,
    origin,
    relative_to,
    request_name,
    secret_fields,
    secure_request,
    split_query,
    split_userinfo,
    unique,
)

# Options that change what curl prints or how it connects, not the request it sends.
_HARMLESS = frozenset(
    {
        "-s", "--silent", "-S", "--show-error", "-v", "--verbose", "-i", "--include",
        "--compressed", "-#", "--progress-bar",
        "--http1.1", "--http2", "-N", "--no-buffer", "-g", "--globoff", "--basic",
    }
)  # fmt: skip
_WITH_VALUE = frozenset(
    {
        "-X", "--request", "-H", "--header", "-d", "--data", "--data-raw", "--data-ascii",
        "--data-binary", "--data-urlencode", "--json", "-u", "--user", "-F", "--form",
        "--form-string", "-b", "--cookie", "-A", "--user-agent", "-e", "--referer", "--url",
        "-m", "--max-time", "--connect-timeout", "-o", "--output", "-w", "--write-out",
        "-x", "--proxy", "--retry", "-c", "--cookie-jar", "--cacert", "-E", "--cert", "--key",
        "--resolve", "--limit-rate", "-r", "--range", "-T", "--upload-file",
        "--aws-sigv4", "--oauth2-bearer",
    }
)  # fmt: skip
_NOT_IN_FLOWS = {
    "-x": "the flow format has no proxy setting",
    "--proxy": "the flow format has no proxy setting",
    "-T": "uploading a file is not in the flow format",
    "--upload-file": "uploading a file is not in the flow format",
    "--resolve": "the flow format cannot pin a host's address",
    "-r": "ranges are not in the flow format: give a Range header",
    "--range": "ranges are not in the flow format: give a Range header",
    "--ntlm": "the flow format has no NTLM auth",
    "--negotiate": "the flow format has no Negotiate (Kerberos) auth",
    "--anyauth": "the flow format picks no auth from the server's answer: basic is written",
}
_OUTPUT_ONLY = frozenset({"-o", "--output", "-w", "--write-out", "-c", "--cookie-jar"})
_OUTPUT_ONLY |= frozenset({"--connect-timeout", "--limit-rate", "--retry"})


@dataclass
class _Command:
    where: str
    method: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    json_data: list[str] = field(default_factory=list)
    get: bool = False
    head: bool = False
    follow: bool = False
    timeout: str | None = None
    user: str | None = None
    """``-u user:password``, as given."""
    digest: bool = False
    aws_sigv4: str | None = None
    """``--aws-sigv4 provider1:provider2:region:service``."""
    bearer: bool = False
    """The Authorization header came from ``--oauth2-bearer``."""
    multipart: dict[str, Any] = field(default_factory=dict)
    tls: dict[str, Any] = field(default_factory=dict)
    fail: bool = False
    from_file: bool = False
    """A body read from a file (not translated): curl still POSTs it."""
    """``-f``: curl fails on an HTTP error, so the test expects no error status."""


def convert(text: str, source: str) -> Imported:
    untranslated: list[Untranslated] = []
    commands = [
        _parse(words, where, untranslated) for words, where in _commands(text, source, untranslated)
    ]
    commands = [command for command in commands if command.url]
    for command in commands:
        if "://" not in (command.url or ""):
            command.url = f"http://{command.url}"  # curl's default scheme
        command.url, userinfo = split_userinfo(command.url or "")
        if userinfo is not None and command.user is None:  # as curl: -u wins over the URL's
            user, password = userinfo
            command.user = f"{user}:{password}" if password else user
    if not commands:
        raise UsageError(f"{source}: line 1: no curl command with a URL in it (write curl URL ...)")
    origins = Counter(origin(command.url or "") for command in commands)
    origins.pop("", None)
    base = origins.most_common(1)[0][0] if origins else ""
    secrets = Secrets()
    tests: dict[str, Any] = {}
    for command in commands:
        test = _test(command, base, secrets, untranslated)
        tests[
            unique(request_name(test["request"].get("method", "GET"), command.url or ""), tests)
        ] = test
    flow: dict[str, Any] = {"name": f"imported from {source}"}
    if base:
        flow["base_url"] = "{{ base_url }}"
        flow["variables"] = {"base_url": base}
    flow["tests"] = tests
    return Imported(flow, untranslated, secrets.places)


def _commands(
    text: str, source: str, untranslated: list[Untranslated]
) -> list[tuple[list[str], str]]:
    """Each command's words and its place: lines joined while a ``\\`` ends them or a
    quote is still open, as a shell reads them."""
    found: list[tuple[list[str], str]] = []
    lines = text.splitlines()
    start, buffer = 0, ""
    for number, line in enumerate(lines, 1):
        if not buffer:
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            start = number
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        buffer += line + "\n"
        try:
            words = _shell_words(buffer)
        except ValueError:
            continue  # a quote still open: the command goes on on the next line
        buffer = ""
        if words and words[0] == "$":
            words = words[1:]
        where = f"line {start}"
        if not words or words[0] != "curl":
            untranslated.append(Untranslated(where, f"not a curl command: {words[0]!r} ..."))
            continue
        found.append((words[1:], where))
    if buffer:
        raise UsageError(
            f"{source}: line {start}: a quote opened here is never closed; close it or "
            "escape it as the shell would"
        )
    return found


_ANSI_C = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
_ANSI_C.update({"e": "\x1b", "E": "\x1b", "\\": "\\", "'": "'", '"': '"', "?": "?"})
_ANSI_C_NUMBER = re.compile(r"x[0-9a-fA-F]{1,2}|u[0-9a-fA-F]{1,4}|U[0-9a-fA-F]{1,8}|[0-7]{1,3}")


def _shell_words(text: str) -> list[str]:
    """The words of ``text`` as bash reads them: shlex, and bash's ``$'...'`` strings, which
    Chrome's and Firefox's "Copy as cURL" write for a body with a quote or a line break."""
    rewritten: list[str] = []
    position, quote = 0, ""
    while position < len(text):
        char = text[position]
        if char == "\\" and quote != "'":
            rewritten.append(text[position : position + 2])
            position += 2
            continue
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif text.startswith("$'", position):
            value, position = _ansi_c(text, position + 2)
            rewritten.append(shlex.quote(value))
            continue
        rewritten.append(char)
        position += 1
    return shlex.split("".join(rewritten), comments=False)


def _ansi_c(text: str, position: int) -> tuple[str, int]:
    """The value of the ``$'...'`` string whose text starts at ``position``, and the
    position after it; ValueError if it is not closed."""
    value = bytearray()
    while position < len(text):
        char = text[position]
        if char == "'":
            return value.decode("utf-8", errors="replace"), position + 1
        if char == "\\" and position + 1 < len(text):
            escape = text[position + 1]
            number = _ANSI_C_NUMBER.match(text, position + 1)
            if escape in _ANSI_C:
                value += _ANSI_C[escape].encode()
            elif number and escape in "xuU01234567" and _code(number.group()) <= 0x10FFFF:
                digits = number.group()
                code = _code(digits)
                # \xHH and octal are bytes, \u and \U characters
                value += (
                    bytes([code & 0xFF])
                    if escape in "x01234567"
                    else chr(code).encode(errors="surrogatepass")
                )
                position = number.end()
                continue
            else:
                value += text[position : position + 2].encode()  # bash keeps an unknown one
            position += 2
            continue
        value += char.encode()
        position += 1
    raise ValueError("no closing quotation")


def _code(digits: str) -> int:
    return int(digits, 8) if digits[0] in "01234567" else int(digits[1:], 16)


def _parse(words: list[str], where: str, untranslated: list[Untranslated]) -> _Command:
    command = _Command(where)
    position = 0
    words = _expanded(words)
    while position < len(words):
        word = words[position]
        position += 1
        option, value = word, None
        if word.startswith("--") and "=" in word and word.split("=")[0] in _WITH_VALUE:
            option, value = word.split("=", 1)
        if option in _WITH_VALUE and value is None:
            if position >= len(words):
                untranslated.append(Untranslated(where, f"{option} without its value"))
                break
            value = words[position]
            position += 1
        if value is not None:
            _option(command, option, value, untranslated)
        elif option in _HARMLESS:
            continue
        elif option in ("-L", "--location"):
            command.follow = True
        elif option in ("-G", "--get"):
            command.get = True
        elif option in ("-I", "--head"):
            command.head = True
        elif option in ("-k", "--insecure"):
            command.tls["verify"] = False
        elif option in ("-f", "--fail", "--fail-with-body"):
            command.fail = True
        elif option == "--digest":
            command.digest = True
        elif option in _NOT_IN_FLOWS:
            untranslated.append(Untranslated(f"{where} {option}", _NOT_IN_FLOWS[option]))
        elif option.startswith("-") and option != "-":
            untranslated.append(Untranslated(f"{where} {option}", "an unknown curl option"))
        elif command.url is None:
            command.url = word
        else:
            untranslated.append(Untranslated(f"{where} {word}", "one URL per command is kept"))
    return command


def _expanded(words: list[str]) -> list[str]:
    """``-sSL`` as ``-s -S -L`` and ``-XPOST`` as ``-X POST``, as curl reads them."""
    expanded: list[str] = []
    for word in words:
        if len(word) > 2 and word[0] == "-" and word[1] != "-":
            if word[:2] in _WITH_VALUE:
                expanded += [word[:2], word[2:]]
                continue
            flags = [f"-{char}" for char in word[1:]]
            for index, flag in enumerate(flags):
                if flag in _WITH_VALUE:  # -sX POST: the last flag takes the rest
                    rest = word[index + 2 :]
                    expanded += [*flags[:index], flag, *([rest] if rest else [])]
                    break
            else:
                expanded += flags
            continue
        expanded.append(word)
    return expanded


def _option(command: _Command, option: str, value: str, untranslated: list[Untranslated]) -> None:
    at = f"{command.where} {option}"
    if option in ("-X", "--request"):
        command.method = value.upper()
    elif option in ("-H", "--header"):
        name, _, header = value.partition(":")
        if header.strip() or name.strip():
            command.headers[name.strip()] = header.strip()
    elif option in ("-d", "--data", "--data-ascii", "--data-binary", "--data-raw"):
        if value.startswith("@") and option != "--data-raw":
            untranslated.append(Untranslated(at, f"the body is read from a file ({value})"))
            command.from_file = True
        else:
            command.data.append(value)
    elif option == "--data-urlencode":
        # curl reads name@file when an @ comes before any =
        equals, file_at = value.find("="), value.find("@")
        name, _, content = value.partition("=")
        if file_at != -1 and (equals == -1 or file_at < equals):
            untranslated.append(Untranslated(at, f"the value is read from a file ({value})"))
            command.from_file = True
        elif equals == -1:
            command.data.append(quote_plus(value))
        else:  # =content sends the content alone
            command.data.append(f"{name}={quote_plus(content)}" if name else quote_plus(content))
    elif option == "--json":
        if value.startswith("@"):
            untranslated.append(Untranslated(at, f"the body is read from a file ({value})"))
            command.from_file = True
        else:
            command.json_data.append(value)
    elif option in ("-u", "--user"):
        command.user = value
    elif option == "--aws-sigv4":
        command.aws_sigv4 = value
    elif option == "--oauth2-bearer":
        command.headers["Authorization"] = f"Bearer {value}"
        command.bearer = True
    elif option in ("-b", "--cookie"):
        if "=" not in value:
            untranslated.append(Untranslated(at, f"cookies are read from a file ({value})"))
        else:
            command.headers["Cookie"] = value
    elif option in ("-A", "--user-agent"):
        command.headers["User-Agent"] = value
    elif option in ("-e", "--referer"):
        command.headers["Referer"] = value
    elif option == "--url":
        command.url = value
    elif option in ("-F", "--form", "--form-string"):
        _form_part(command, value, option == "--form-string", at, untranslated)
    elif option == "--cacert":
        command.tls["ca_bundle"] = value
        untranslated.append(Untranslated(at, f"{value} is read relative to the flow file"))
    elif option in ("-E", "--cert"):
        if ":" in value:
            untranslated.append(Untranslated(at, "a certificate's password is not translated"))
        command.tls["client_cert"] = value.split(":", 1)[0]
        untranslated.append(Untranslated(at, f"{value} is read relative to the flow file"))
    elif option == "--key":
        command.tls["client_key"] = value
        untranslated.append(Untranslated(at, f"{value} is read relative to the flow file"))
    elif option in ("-m", "--max-time"):
        command.timeout = f"{value}s"
    elif option in _NOT_IN_FLOWS:
        untranslated.append(Untranslated(at, _NOT_IN_FLOWS[option]))
    elif option not in _OUTPUT_ONLY:
        untranslated.append(Untranslated(at, "not translated"))


def _form_part(
    command: _Command, value: str, text_only: bool, at: str, untranslated: list[Untranslated]
) -> None:
    """``-F name=value`` a text field, ``-F name=@path;type=...;filename=...`` a file."""
    name, equals, content = value.partition("=")
    if not equals:
        untranslated.append(Untranslated(at, f"a form part without a name: {value!r}"))
        return
    if text_only or not content.startswith(("@", "<")):
        command.multipart[name] = content
        return
    if content.startswith("<"):
        untranslated.append(Untranslated(at, f"{name}: a text field read from a file"))
        return
    path, *options = content[1:].split(";")
    part: dict[str, Any] = {"file": path}
    for option in options:
        key, _, setting = option.partition("=")
        if key.strip() == "type":
            part["content_type"] = setting.strip()
        elif key.strip() == "filename":
            part["filename"] = setting.strip().strip('"')
    command.multipart[name] = part
    untranslated.append(
        Untranslated(at, f"{name}: the file {path} is read relative to the flow file")
    )


def _header_place(command: _Command, name: str) -> str:
    if name == "Authorization" and command.bearer:
        return f"{command.where} --oauth2-bearer"
    return f"{command.where} header {name}"


def _auth(
    command: _Command, secrets: Secrets, untranslated: list[Untranslated]
) -> dict[str, Any] | None:
    """The request's ``auth:`` from ``-u`` (with ``--digest`` or ``--aws-sigv4``)."""
    at = f"{command.where} -u"
    if command.aws_sigv4 is not None and command.user is None:
        untranslated.append(
            Untranslated(f"{command.where} --aws-sigv4", "no -u KEY:SECRET to sign with")
        )
    if command.user is None:
        for name in list(command.headers):
            found = basic_credentials(command.headers[name])
            if name.lower() == "authorization" and found is not None:
                del command.headers[name]  # httpx writes it from the auth
                return basic_auth(*found, secrets, f"{command.where} header {name}")
        return None
    user, colon, password = command.user.partition(":")
    if not colon:
        untranslated.append(Untranslated(at, f"no password: curl would ask for {user}'s"))
        # a value no command line can hold: the secret is named, never found
        password = f"\0asked for {user}"
    if command.aws_sigv4 is not None:
        return {"aws_sigv4": _aws(command, user, password, secrets, untranslated)}
    auth = basic_auth(user, password, secrets, at)
    return {"digest": auth["basic"]} if command.digest else auth


def _aws(
    command: _Command, key: str, secret: str, secrets: Secrets, untranslated: list[Untranslated]
) -> dict[str, Any]:
    at = f"{command.where} --aws-sigv4"
    # provider1[:provider2[:region[:service]]]; curl takes what is missing from the host
    # name, service.region.amazonaws.com
    given = (command.aws_sigv4 or "").split(":")[2:4]
    host = (urlsplit(command.url or "").hostname or "").split(".")
    from_host = [host[1], host[0]] if len(host) >= 4 and host[-2] == "amazonaws" else []
    region = given[0] if given else from_host[0] if from_host else ""
    service = given[1] if len(given) > 1 else from_host[1] if from_host else ""
    if not region or not service:
        untranslated.append(Untranslated(at, "no region or service: give them in the flow"))
    settings: dict[str, Any] = {
        "access_key_id": secrets.template(key, "aws_access_key_id", f"{at}: -u KEY"),
        "secret_access_key": secrets.template(
            secret, "aws_secret_access_key", f"{at}: -u KEY:SECRET"
        ),
        "region": literal(region or "REGION"),
        "service": literal(service or "SERVICE"),
    }
    for name in list(command.headers):
        if name.lower() == "x-amz-security-token":
            # the signer adds it, and signs it
            token = command.headers.pop(name)
            settings["session_token"] = secrets.template(
                token, "aws_session_token", f"{command.where} header {name}"
            )
    return settings


def _test(
    command: _Command, base: str, secrets: Secrets, untranslated: list[Untranslated]
) -> dict[str, Any]:
    where = command.where
    auth = _auth(command, secrets, untranslated)  # first: it takes the session token header
    url, params = split_query(command.url or "")
    body: dict[str, Any] = {}
    content_type = next((v for k, v in command.headers.items() if k.lower() == "content-type"), "")
    if command.json_data:
        body = body_fields("application/json", "".join(command.json_data))
        command.headers.setdefault("Accept", "application/json")
        if not content_type:
            command.headers["Content-Type"] = "application/json"
    elif command.data and command.get:
        params.update(dict(parse_qsl("&".join(command.data), keep_blank_values=True)))
    elif command.data:
        body = body_fields(content_type, "&".join(command.data))
    if "body" in body and not content_type and not command.json_data:
        command.headers["Content-Type"] = "application/x-www-form-urlencoded"
    sends = ((body or command.from_file) and not command.get) or command.multipart
    method = command.method or ("HEAD" if command.head else "POST" if sends else "GET")
    request: dict[str, Any] = {}
    if method != "GET":
        request["method"] = method
    request["url"] = literal(relative_to(base, url))
    if params:
        request["params"] = {
            key: secrets.template(str(value), key, f"{where} query {key}")
            if is_credential_name(key) and value
            else literal_tree(value)
            for key, value in params.items()
        }
    headers = {
        name: header_value(name, literal(value), secrets, _header_place(command, name))
        for name, value in command.headers.items()
    }
    if (
        "json" in body
        and "Content-Type" in headers
        and headers["Content-Type"] == "application/json"
    ):
        del headers["Content-Type"]  # a json body sets it
    if headers:
        request["headers"] = headers
    for kind, value in body.items():
        request[kind] = secret_fields(literal_tree(value), secrets, f"{where} body")
    if command.timeout:
        request["timeout"] = command.timeout
    if auth is not None:
        request["auth"] = auth
    if command.follow:
        request["follow_redirects"] = True
    if command.multipart:
        if body:
            untranslated.append(Untranslated(where, "-F and -d together: the -d body is left out"))
            for kind in body:
                request.pop(kind, None)
        request["multipart"] = {
            key: literal(part) if isinstance(part, str) else part
            for key, part in secret_fields(command.multipart, secrets, f"{where} -F").items()
        }
    secure_request(request, secrets, where)
    test: dict[str, Any] = {"request": request}
    if command.tls:
        test["tls"] = command.tls
    if command.fail:
        test["expect"] = {"status": ["1xx", "2xx", "3xx"]}
    return test
