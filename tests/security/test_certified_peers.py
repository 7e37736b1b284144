"""Certified peers: a server cannot surround a site with Sybils whose keys it holds.

The certificate checks (sign, verify, tamper, wrong root, other id or key, expiry), the
Sybil attack over real HTTP against a real :class:`confide.client.Client` (the operator
enrols two ids with keys it holds and places them in the victim's cohort: the victim
refuses before it signs anything, and the server holds nothing from it), the
``min_certified_sites`` floor, and the ``confide provision`` / ``confide identity`` commands.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.client import Client, SitePolicy, client_ssl_context
from confide.errors import ConfigError, PolicyViolation, SignatureError
from confide.protocol.certs import (
    CERT_FILE,
    ConsortiumRoot,
    SiteCertificate,
    init_root,
    load_or_create_identity,
    provision_site,
    sign_certificate,
    verify_certificate,
)
from confide.protocol.signing import Identity
from confide.protocol.tls_certs import issue_tls
from tests.cli.conftest import CONFIDE, run
from tests.security.peers import assert_nothing_stored_from, victim_among_puppets
from tests.server.util import write_job
from tests.sites import server_url

SECURE = {
    "secagg__enabled": True,
    "job__cohort_size": 3,
    "job__min_clients": 3,
    "job__wait_for_clients": 3,
    "secagg__max_weight": 100,
    "privacy__mode": "sample",
    "privacy__noise_multiplier": 1.0,
    "privacy__sampling_rate": 0.2,
    "privacy__local_steps": 2,
    "privacy__clip_norm": 1.0,
}


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


def _raw(ident: Identity) -> bytes:
    return base64.b64decode(ident.public_key_b64)


# --- the certificate ------------------------------------------------------------------


def test_signed_bytes_are_the_documented_canonical_form() -> None:
    """Known answer: the domain tag, a newline, then sorted compact JSON without the signature."""
    cert = SiteCertificate("c", "site-1", b"\x01" * 32, None, b"\0" * 64)
    assert cert.signed_bytes() == (
        b"confide-site-cert/1\n"
        b'{"consortium":"c","format":"confide-site-cert/1",'
        b'"identity_key":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",'
        b'"not_after":null,"site_id":"site-1"}'
    )


def test_sign_then_verify_roundtrip(tmp_path: Path) -> None:
    root = init_root(tmp_path / "root", "study-1")
    assert ConsortiumRoot.load(tmp_path / "root" / "root.json") == root
    assert (tmp_path / "root" / "root-key.pem").stat().st_mode & 0o777 == 0o600
    ident = Identity(_key(7))
    cert = sign_certificate(tmp_path / "root", "site-1", _raw(ident), not_after=2_000_000_000)
    again = SiteCertificate.from_json(json.loads(json.dumps(cert.to_json())))
    assert again == cert
    ok = verify_certificate(
        cert.to_json(), root, site_id="site-1", identity_key=_raw(ident), now=1_900_000_000
    )
    assert ok.site_id == "site-1"
    # Ed25519 is deterministic: the same root key signs the same body identically.
    assert sign_certificate(tmp_path / "root", "site-1", _raw(ident), 2_000_000_000) == cert


def test_refusals(tmp_path: Path) -> None:
    root = init_root(tmp_path / "root", "study-1")
    other = init_root(tmp_path / "other", "study-1")  # same name, another key
    key = _raw(Identity(_key(1)))
    cert = sign_certificate(tmp_path / "root", "site-1", key, not_after=100)
    doc = cert.to_json()

    def refused(c: Any, r: ConsortiumRoot = root, **kw: Any) -> str:
        args: dict[str, Any] = {"site_id": "site-1", "identity_key": key, "now": 50, **kw}
        with pytest.raises(SignatureError) as info:
            verify_certificate(c, r, **args)
        return str(info.value)

    assert "not signed by this site's consortium root" in refused(doc, other)
    assert "is for 'site-1', not for 'site-2'" in refused(doc, site_id="site-2")
    assert "another identity key" in refused(doc, identity_key=_raw(Identity(_key(2))))
    assert "expired at 100" in refused(doc, now=101)
    assert "consortium 'study-1', this site trusts 'x'" in refused(
        doc, ConsortiumRoot("x", b"1" * 32)
    )
    forged = {**doc, "site_id": "site-2"}  # re-labelled for another id: signature breaks
    assert "not signed" in refused(forged, site_id="site-2")
    assert "keys" in refused({**doc, "extra": 1})
    assert "format" in refused({**doc, "format": "x"})


@settings(max_examples=40, deadline=None)
@given(index=st.integers(min_value=0, max_value=63), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_signature_bit_is_refused(index: int, bit: int, tmp_path_factory: Any) -> None:
    d = tmp_path_factory.mktemp("root")
    root = init_root(d / "root", "c")
    key = _raw(Identity(_key(3)))
    cert = sign_certificate(d / "root", "s", key)
    sig = bytearray(cert.signature)
    sig[index] ^= 1 << bit
    bad = dataclasses.replace(cert, signature=bytes(sig))
    with pytest.raises(SignatureError, match="not signed"):
        verify_certificate(bad, root, site_id="s", identity_key=key)


def test_root_is_never_overwritten_and_names_are_checked(tmp_path: Path) -> None:
    init_root(tmp_path / "r", "c")
    with pytest.raises(ConfigError, match="never overwritten"):
        init_root(tmp_path / "r", "c")
    with pytest.raises(ConfigError, match="consortium name"):
        init_root(tmp_path / "s", "bad name")
    with pytest.raises(ConfigError, match="site id"):
        sign_certificate(tmp_path / "r", "bad id!", b"\0" * 32)
    with pytest.raises(ConfigError, match="32 raw"):
        sign_certificate(tmp_path / "r", "s", b"\0" * 31)


def test_check_peers_counts_certified_sites(tmp_path: Path) -> None:
    init_root(tmp_path / "r", "c")
    ids = [f"s{k}" for k in range(3)]
    certs = {c: provision_site(tmp_path / "r", tmp_path / c, c).to_json() for c in ids}
    keys = [(c, base64.b64decode(certs[c]["identity_key"])) for c in ids]
    policy = SitePolicy(consortium_root=str(tmp_path / "r" / "root.json"))
    assert policy.check_peers(keys, certs) == 3
    with pytest.raises(PolicyViolation, match="min_certified_sites = 4"):
        dataclasses.replace(policy, min_certified_sites=4).check_peers(keys, certs)
    with pytest.raises(PolicyViolation, match="'s1' has no consortium certificate"):
        policy.check_peers(keys, {c: v for c, v in certs.items() if c != "s1"})
    with pytest.raises(PolicyViolation, match="names no consortium_root"):
        SitePolicy().check_peers(keys, certs)
    assert SitePolicy(peer_trust="tofu").check_peers(keys, None) == 0
    with pytest.raises(ConfigError, match="peer_trust"):
        SitePolicy(peer_trust="anyone")


def test_policy_file_resolves_the_root_next_to_it(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('peer_trust = "consortium"\nconsortium_root = "root.json"\n')
    policy = SitePolicy.load(tmp_path / "p.toml")
    assert policy.consortium_root == str((tmp_path / "root.json").resolve())
    assert SitePolicy.load(tmp_path / "p.toml") == SitePolicy.from_dict(
        {"consortium_root": str((tmp_path / "root.json").resolve())}
    )


# --- the Sybil attack over HTTP -------------------------------------------------------


@pytest.mark.parametrize("sybil_cert", ["none", "operator_root", "victims_cert"])
async def test_sybil_cohort_is_refused_and_nothing_is_revealed(
    make_fed: Any, tmp_path: Path, sybil_cert: str
) -> None:
    """The operator enrols two ids with keys it holds and puts them in the victim's cohort.

    ``none``: they have no certificate. ``operator_root``: the operator certifies them with
    a root of its own under the consortium's name. ``victims_cert``: the server relays the
    victim's genuine certificate for them. In every case the victim refuses at advertise
    (PolicyViolation) and the server stored no message of any stage from it.
    """
    fed = await make_fed(write_job(tmp_path / "job", **SECURE, job__rounds=1))
    init_root(tmp_path / "consortium", "study-1")
    victim_policy = SitePolicy(
        max_epsilon=1e6, consortium_root=str(tmp_path / "consortium" / "root.json")
    )
    victim_cert = provision_site(tmp_path / "consortium", tmp_path / "victim", "victim")
    sybils = ["sybil-1", "sybil-2"]
    if sybil_cert == "operator_root":
        init_root(tmp_path / "operator", "study-1")
        for s in sybils:
            provision_site(tmp_path / "operator", tmp_path / s, s)
    if sybil_cert == "victims_cert":
        # A malicious server relays whatever it likes: here the victim's certificate.
        fed.engine._certs.update({s: json.dumps(victim_cert.to_json()) for s in sybils})
    result = await victim_among_puppets(fed, tmp_path, victim_policy, sybils)
    assert isinstance(result, PolicyViolation), result
    assert "refused" in str(result) or "no consortium certificate" in str(result)
    assert_nothing_stored_from(fed, "victim")
    assert fed.engine.store.certificates()["victim"]  # stored at enrolment, relayed as is


async def test_enrolment_refuses_a_certificate_for_another_key(
    make_fed: Any, tmp_path: Path
) -> None:
    """A provisioning mistake is reported at enrolment (4xx with what to do), not at round 1."""
    fed = await make_fed(write_job(tmp_path / "job"))
    url = server_url(fed)
    init_root(tmp_path / "r", "c")
    cert = sign_certificate(tmp_path / "r", "site-1", _raw(Identity(_key(5))))
    load_or_create_identity(tmp_path / "site-1")
    (tmp_path / "site-1" / CERT_FILE).write_text(json.dumps(cert.to_json()))
    async with Client(url, tmp_path / "site-1", retry_timeout=5.0) as c:
        with pytest.raises(ConfigError, match="another key"):
            await c.enroll(fed.engine.create_tokens(1)[0], "site-1")
    assert fed.engine.store.clients() == {}


# --- the commands ---------------------------------------------------------------------


def test_provision_and_identity_commands(tmp_path: Path) -> None:
    r = run([*CONFIDE, "provision", "init", "--out", str(tmp_path / "root"), "--name", "s1"])
    assert r.rc == 0, r.err
    r = run([*CONFIDE, "identity", "--state", str(tmp_path / "site")])
    assert r.rc == 0, r.err
    key = r.out.strip()
    assert run([*CONFIDE, "identity", "--state", str(tmp_path / "site")]).out.strip() == key
    out = tmp_path / "site" / CERT_FILE
    r = run(
        [
            *CONFIDE,
            "provision",
            "sign",
            "--root",
            str(tmp_path / "root"),
            "--site-id",
            "a",
            "--identity",
            key,
            "--out",
            str(out),
        ]
    )
    assert r.rc == 0, r.err
    root = ConsortiumRoot.load(tmp_path / "root" / "root.json")
    verify_certificate(
        json.loads(out.read_text()), root, site_id="a", identity_key=base64.b64decode(key)
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["provision", "init", "--out", "{root}", "--name", "s1"], "never overwritten"),
        (["provision", "init", "--out", "{tmp}/x", "--name", "a b"], "consortium name"),
        (
            [
                "provision",
                "sign",
                "--root",
                "{root}",
                "--site-id",
                "a",
                "--identity",
                "%%",
                "--out",
                "{tmp}/c.json",
            ],
            "--identity must be the base64 key",
        ),
        (
            [
                "provision",
                "sign",
                "--root",
                "{tmp}/none",
                "--site-id",
                "a",
                "--identity",
                base64.b64encode(b"k" * 32).decode(),
                "--out",
                "{tmp}/c.json",
            ],
            "cannot read the consortium root",
        ),
    ],
)
def test_provision_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    init_root(tmp_path / "root", "s1")
    argv = [a.format(root=tmp_path / "root", tmp=tmp_path) for a in args]
    r = run([*CONFIDE, *argv])
    assert r.rc == 2
    assert message in r.short_error()


# --- TLS from the same provisioning ---------------------------------------------------


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bytes:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        writer.write(dict(x[0] for x in peer["subject"])["commonName"].encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        data = await asyncio.wait_for(reader.read(), 60.0)
        writer.close()
        return data
    finally:
        server.close()
        await server.wait_closed()


async def test_provision_tls_gives_a_working_mutual_tls_pair(tmp_path: Path) -> None:
    init_root(tmp_path / "root", "study-1")
    srv = issue_tls(tmp_path / "root", tmp_path / "server", server_names=["127.0.0.1"])
    site = issue_tls(tmp_path / "root", tmp_path / "site-1", site_id="site-1")
    assert srv.key.stat().st_mode & 0o777 == 0o600
    assert srv.ca.read_bytes() == site.ca.read_bytes()  # one CA, made once

    def server_ctx(ca: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
        ctx.load_cert_chain(str(srv.cert), str(srv.key))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    client_ctx = client_ssl_context(site.ca, site.cert, site.key)
    assert client_ctx is not None
    assert await _handshake(server_ctx(srv.ca), client_ctx) == b"site-1"
    # A site certificate from another consortium's CA is refused by the server.
    init_root(tmp_path / "other", "study-2")
    stranger = issue_tls(tmp_path / "other", tmp_path / "stranger", site_id="site-1")
    bad_ctx = client_ssl_context(srv.ca, stranger.cert, stranger.key)
    assert bad_ctx is not None
    # (TLS 1.3 reports a refused client certificate after the handshake: the server closes.)
    try:
        data = await _handshake(server_ctx(srv.ca), bad_ctx)
    except (ssl.SSLError, ConnectionError):
        data = b""
    assert data == b"", "a stranger's certificate was accepted"


def test_provision_tls_command_and_its_errors(tmp_path: Path) -> None:
    init_root(tmp_path / "root", "s1")
    r = run(
        [
            *CONFIDE,
            "provision",
            "tls",
            "--root",
            str(tmp_path / "root"),
            "--out",
            str(tmp_path / "tls"),
            "--server-name",
            "localhost",
        ]
    )
    assert r.rc == 0, r.err
    assert (tmp_path / "tls" / "server.pem").exists()
    r = run(
        [
            *CONFIDE,
            "provision",
            "tls",
            "--root",
            str(tmp_path / "root"),
            "--out",
            str(tmp_path / "tls"),
            "--site-id",
            "bad id",
        ]
    )
    assert r.rc == 2
    assert "--site-id must be" in r.short_error()
