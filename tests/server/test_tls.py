"""TLS with real ssl contexts: the client verifies the server's CA; optional mutual TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from confide.client import Client, client_ssl_context
from confide.errors import TransportError
from confide_server.app import create_app
from confide_server.cli import build_ssl_context
from confide_server.config import TLSConfig
from confide_server.simulate import free_port
from tests.server.util import write_job


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    san_ip: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    issuer_name, issuer_key = (subject, key) if issuer is None else issuer
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    if san_ip:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(
    path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None
) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    cas = {}
    for name in ("ca", "other-ca", "client-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, None, ca=True)
        cas[name] = (name, key)
        out[name] = tmp_path / f"{name}.pem"
        _write(out[name], cert)
    skey = ec.generate_private_key(ec.SECP256R1())
    out["server"] = tmp_path / "server.pem"
    _write(out["server"], _cert("server", skey, cas["ca"], ca=False, san_ip=True), skey)
    ckey = ec.generate_private_key(ec.SECP256R1())
    out["client"] = tmp_path / "client.pem"
    _write(out["client"], _cert("site-1", ckey, cas["client-ca"], ca=False), ckey)
    return out


@pytest.fixture
def serve(tmp_path: Path) -> Callable[..., Any]:
    runners: list[web.AppRunner] = []

    async def start(tls: TLSConfig) -> str:
        cfg = write_job(tmp_path / "job")
        runner = web.AppRunner(create_app(cfg))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=build_ssl_context(tls)).start()
        runners.append(runner)
        return f"https://127.0.0.1:{port}"

    start.runners = runners  # type: ignore[attr-defined]
    return start


async def _manifest(url: str, state: Path, **ctx: Any) -> str:
    async with Client(url, state, ssl_context=client_ssl_context(**ctx), retry_timeout=1.0) as c:
        return (await c.fetch_manifest()).sha256


async def test_client_verifies_server_against_ca(
    pki: dict[str, Path], serve: Any, tmp_path: Path
) -> None:
    url = await serve(TLSConfig(cert=pki["server"], key=pki["server"].with_suffix(".key")))
    try:
        assert len(await _manifest(url, tmp_path / "s", ca_file=pki["ca"])) == 64
        with pytest.raises(TransportError, match="TLS"):
            await _manifest(url, tmp_path / "s", ca_file=pki["other-ca"])
    finally:
        for r in serve.runners:
            await r.cleanup()


async def test_mutual_tls_requires_a_client_certificate(
    pki: dict[str, Path], serve: Any, tmp_path: Path
) -> None:
    url = await serve(
        TLSConfig(
            cert=pki["server"], key=pki["server"].with_suffix(".key"), client_ca=pki["client-ca"]
        )
    )
    try:
        sha = await _manifest(
            url,
            tmp_path / "s",
            ca_file=pki["ca"],
            cert_file=pki["client"],
            key_file=pki["client"].with_suffix(".key"),
        )
        assert len(sha) == 64
        with pytest.raises(TransportError):
            await _manifest(url, tmp_path / "s", ca_file=pki["ca"])
    finally:
        for r in serve.runners:
            await r.cleanup()
