"""``tls:`` settings against a local HTTPS server whose CA, server and client certificates
are made here: a CA bundle, a client certificate for a listener that requires one
(ssl.CERT_REQUIRED), and ``verify: false`` with its warning."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.cli import baton
from tests.flows import events_of, run_flow


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    *,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@dataclass
class Servers:
    public: str
    """Any client may connect."""
    mutual: str
    """Only a client with a certificate from the test CA."""
    certs: Path


async def _who(request: web.Request) -> web.Response:
    peer = request.transport.get_extra_info("peercert") if request.transport else None
    subject = dict(pair[0] for pair in peer["subject"]) if peer else {}
    return web.json_response({"client": subject.get("commonName")})


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[Servers]:
    certs = tmp_path / "certs"
    certs.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("Baton test CA", ca_key)
    _write(certs / "ca", ca, ca_key)
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(certs / name, _issue(f"baton-{name}", key, (ca.subject, ca_key), server=server), key)

    def context(require_client: bool) -> ssl.SSLContext:
        made = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        made.load_cert_chain(certs / "server.crt", certs / "server.key")
        if require_client:
            made.verify_mode = ssl.CERT_REQUIRED
            made.load_verify_locations(certs / "ca.crt")
        return made

    app = web.Application()
    app.router.add_get("/who", _who)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    urls = []
    for required in (False, True):
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context(required))
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        urls.append(f"https://127.0.0.1:{port}")
    yield Servers(urls[0], urls[1], certs)
    await runner.cleanup()


def _flow(directory: Path, base_url: str, tests: str, defaults: str = "") -> Path:
    flow = directory / "tls.yaml"
    flow.write_text(f"name: tls\nbase_url: {base_url}\n{defaults}tests:\n{tests}")
    return flow


async def test_a_ca_bundle_and_a_client_certificate_reach_a_mutual_tls_server(
    env: dict[str, str],
    tmp_path: Path,
    servers: Servers,
    pg_server_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a CI job names the key's path in the environment: the path is a template
    monkeypatch.setenv("CLIENT_KEY_FILE", str(servers.certs / "client.key"))
    flow = _flow(
        tmp_path,
        servers.mutual,
        "  who:\n    request: {url: /who}\n"
        '    expect: {status: 200, json: {"$.client": baton-client}}\n',
        "defaults:\n  tls:\n    ca_bundle: certs/ca.crt\n"
        '    client_cert: certs/client.crt\n    client_key: "{{ env.CLIENT_KEY_FILE }}"\n',
    )
    code, out, err, tests = await run_flow(flow)
    assert code == 0, out + err
    assert "warning" not in err
    (sent,) = await events_of(pg_server_dsn, tests["_run_id"], "RequestSent")
    assert "insecure" not in sent


async def test_without_the_ca_the_certificate_is_refused_with_the_fix(
    env: dict[str, str], tmp_path: Path, servers: Servers
) -> None:
    flow = _flow(tmp_path, servers.public, "  who:\n    request: {url: /who}\n")
    code, _out, _err, tests = await run_flow(flow)
    assert code == 1
    message = tests["who"]["message"]
    assert tests["who"]["category"] == "connection"
    assert "the server's certificate is not trusted: give its CA with tls.ca_bundle" in message


async def test_without_a_client_certificate_a_mutual_tls_server_fails_the_test(
    env: dict[str, str], tmp_path: Path, servers: Servers
) -> None:
    flow = _flow(
        tmp_path,
        servers.mutual,
        "  who:\n    request: {url: /who}\n    tls: {ca_bundle: certs/ca.crt}\n",
    )
    code, _out, _err, tests = await run_flow(flow)
    assert code == 1
    assert tests["who"]["category"] == "connection"
    assert "give tls.client_cert and tls.client_key" in tests["who"]["message"]


async def test_verify_false_connects_and_warns_once_and_is_recorded(
    env: dict[str, str], tmp_path: Path, servers: Servers, pg_server_dsn: str
) -> None:
    flow = _flow(
        tmp_path,
        servers.public,
        "  first:\n    request: {url: /who}\n"
        "  second:\n    request: {url: /who}\n"
        "  checked:\n    request: {url: /who}\n    tls: {verify: true}\n"
        "    expect: {status: 200}\n",
        "defaults:\n  tls: {verify: false}\n",
    )
    code, _out, err, tests = await run_flow(flow)
    assert code == 1  # `checked` turns verification back on, and the CA is unknown
    assert tests["first"]["status"] == "passed" and tests["second"]["status"] == "passed"
    assert tests["checked"]["status"] == "failed"
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {flow}: TLS certificates are not verified (tls.verify: false) for "
        "first, second; use tls.ca_bundle outside a test server"
    ]
    sent = {e["test"]: e for e in await events_of(pg_server_dsn, tests["_run_id"], "RequestSent")}
    assert sent["first"]["insecure"] is True
    assert "insecure" not in sent["checked"]


def test_validate_names_a_missing_certificate_file(tmp_path: Path) -> None:
    flow = _flow(
        tmp_path,
        "https://127.0.0.1:1",
        "  who:\n    request: {url: /who}\n    tls: {client_key: certs/none.key}\n",
        "defaults:\n  tls: {ca_bundle: certs/ca.pem}\n",
    )
    code, _out, err = baton("validate", str(flow))
    assert code == 2
    assert f"{flow}: defaults.tls.ca_bundle: no such file: certs/ca.pem" in err
    assert f"{flow}: tests.who.tls.client_key: no such file: certs/none.key" in err
    assert f"{flow}: tests.who.tls.client_key: a client key without client_cert" in err


def test_validate_checks_the_templates_of_tls_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CA_FILE", raising=False)
    flow = _flow(
        tmp_path,
        "https://127.0.0.1:1",
        '  who:\n    request: {url: /who}\n    tls: {client_cert: "{{ cert_path }}"}\n',
        'defaults:\n  tls: {ca_bundle: "{{ env.CA_FILE }}"}\n',
    )
    code, _out, err = baton("validate", str(flow))
    assert code == 2
    assert f"{flow}: defaults.tls: environment variable CA_FILE is not set" in err
    assert f"{flow}: tests.who.tls: variable 'cert_path' is not defined" in err
