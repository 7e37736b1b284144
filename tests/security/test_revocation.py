"""Certificate revocation: the consortium root's signed list of revoked site certificates.

The list format (known answer: a fixed root key signs deterministically), tamper, wrong
root, rollback and equivocation refusals, ``check_peers`` with a list, the ``confide
provision revoke`` command, and the attack over real HTTP: a site whose identity key was
stolen is revoked; the operator, holding the stolen key and its genuine certificate, puts
it in the victim's cohort; the victim refuses before it signs anything and the server stores
nothing from it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.client import Client, SitePolicy
from confide.errors import ConfigError, PolicyViolation, ServerError, SignatureError
from confide.protocol.certs import (
    REVOCATION_SEEN_FILE,
    ConsortiumRoot,
    Revocation,
    RevocationList,
    check_revocation_version,
    init_root,
    key_fingerprint,
    provision_site,
    revoke,
    verify_revocation_list,
)
from confide.protocol.signing import Identity
from tests.cli.conftest import CONFIDE, run
from tests.security.peers import assert_nothing_stored_from, victim_among_puppets
from tests.security.test_certified_peers import SECURE
from tests.server.util import write_job
from tests.sites import server_url

# The known answer: root key = 32 bytes 0x09, consortium "c", site-2's key = 32 bytes 0x01.
KAT_ROOT_PUBLIC = "/RckOFqgx1tk+3jNYC+h2ZH96/drE8WO1wLqyDXp9hg="
KAT_SIGNED = (
    b"confide-revocation-list/1\n"
    b'{"consortium":"c","format":"confide-revocation-list/1","issued_at":1700000000,'
    b'"revoked":[{"key_sha256":"72cd6e8422c407fb6d098690f1130b7ded7ec2f7f5e1d30bd9d521f015363793",'
    b'"reason":"key stolen","site_id":"site-2"}],"version":1}'
)
KAT_SIGNATURE = (
    "ID9//e0J1+timYM+Zvf4ICyNiMEGQqm/77Z09UEIog8ne04t3NcWPaidPiii86JnqBfowKJHvXSS8GB4YaHyCw=="
)


def _fixed_root(d: Path, seed: int = 9, name: str = "c") -> ConsortiumRoot:
    """A root folder with a known key (``init_root`` draws a fresh one)."""
    key = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
    d.mkdir(parents=True, exist_ok=True)
    Identity(key).save(d / "root-key.pem")
    raw = base64.b64decode(Identity(key).public_key_b64)
    root = ConsortiumRoot(name, raw)
    (d / "root.json").write_text(json.dumps(root.to_json()))
    return root


def _raw(state: Path) -> bytes:
    return base64.b64decode(json.loads((state / "certificate.json").read_text())["identity_key"])


# --- the list -------------------------------------------------------------------------


def test_known_answer(tmp_path: Path) -> None:
    root = _fixed_root(tmp_path / "root")
    assert base64.b64encode(root.public_key).decode() == KAT_ROOT_PUBLIC
    lst = revoke(
        tmp_path / "root", "site-2", identity_key=b"\x01" * 32, reason="key stolen", now=1.7e9
    )
    assert lst.signed_bytes() == KAT_SIGNED
    assert base64.b64encode(lst.signature).decode() == KAT_SIGNATURE
    assert lst.revoked == (Revocation("site-2", key_fingerprint(b"\x01" * 32), "key stolen"),)
    doc = json.loads(json.dumps(lst.to_json()))
    assert verify_revocation_list(doc, root) == lst
    assert RevocationList.from_json(doc) == lst


def test_versions_grow_and_entries_are_kept(tmp_path: Path) -> None:
    root = init_root(tmp_path / "root", "study-1")
    v1 = revoke(tmp_path / "root", "site-a", now=10)
    v2 = revoke(tmp_path / "root", "site-b", identity_key=b"\x02" * 32, previous=v1, now=20)
    assert (v1.version, v2.version) == (1, 2)
    assert [r.site_id for r in v2.revoked] == ["site-a", "site-b"]
    verify_revocation_list(v2, root)
    # A null key revokes every certificate of the id; a key revokes only that key.
    assert v2.revocation_of("site-a", b"\x07" * 32) is not None
    assert v2.revocation_of("site-b", b"\x02" * 32) is not None
    assert v2.revocation_of("site-b", b"\x03" * 32) is None
    assert v2.revocation_of("site-c", b"\x02" * 32) is None
    other = init_root(tmp_path / "other", "study-1")
    forged = revoke(tmp_path / "other", "site-x")
    with pytest.raises(ConfigError, match="previous revocation list"):
        revoke(tmp_path / "root", "site-c", previous=forged)
    assert other != root


def test_refusals(tmp_path: Path) -> None:
    root = init_root(tmp_path / "root", "study-1")
    other = init_root(tmp_path / "other", "study-1")  # same name, another key
    doc = revoke(tmp_path / "root", "site-1", reason="left").to_json()
    with pytest.raises(SignatureError, match="not signed by this site's consortium root"):
        verify_revocation_list(doc, other)
    with pytest.raises(SignatureError, match="this site trusts 'x'"):
        verify_revocation_list(doc, ConsortiumRoot("x", root.public_key))
    # Tampering: drop the entry (un-revoke), raise the version, change the reason.
    for bad in (
        {**doc, "revoked": []},
        {**doc, "version": 5},
        {**doc, "revoked": [{**doc["revoked"][0], "reason": "x"}]},
    ):
        with pytest.raises(SignatureError, match="not signed"):
            verify_revocation_list(bad, root)
    for bad, what in (
        ({**doc, "extra": 1}, "keys"),
        ({**doc, "format": "x"}, "format"),
        ({**doc, "version": 0}, "version"),
        ({**doc, "revoked": [{**doc["revoked"][0], "key_sha256": "AB"}]}, "key_sha256"),
        ({**doc, "revoked": [{"site_id": "s"}]}, "revoked entry"),
    ):
        with pytest.raises(SignatureError, match=what):
            verify_revocation_list(bad, root)


@settings(max_examples=30, deadline=None)
@given(index=st.integers(min_value=0, max_value=63), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_signature_bit_is_refused(index: int, bit: int, tmp_path_factory: Any) -> None:
    d = tmp_path_factory.mktemp("root")
    root = _fixed_root(d / "root")
    lst = revoke(d / "root", "s", now=1)
    sig = bytearray(lst.signature)
    sig[index] ^= 1 << bit
    with pytest.raises(SignatureError, match="not signed"):
        verify_revocation_list(dataclasses.replace(lst, signature=bytes(sig)), root)


def test_rollback_and_equivocation_are_refused(tmp_path: Path) -> None:
    init_root(tmp_path / "root", "c")
    v1 = revoke(tmp_path / "root", "a", now=1)
    v2 = revoke(tmp_path / "root", "b", previous=v1, now=2)
    state = tmp_path / "site"
    check_revocation_version(v1, state)
    check_revocation_version(v2, state)
    check_revocation_version(v2, state)  # the same list again: fine
    assert (state / REVOCATION_SEEN_FILE).stat().st_mode & 0o777 == 0o600
    with pytest.raises(SignatureError, match="older than version 2"):
        check_revocation_version(v1, state)
    # The root signed a second, different version 2 (or someone with its key did).
    twin = revoke(tmp_path / "root", "c", previous=v1, now=3)
    with pytest.raises(SignatureError, match="differs from the version 2"):
        check_revocation_version(twin, state)


# --- the site's check -----------------------------------------------------------------


def _cohort(tmp: Path, n: int = 3) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    ids = [f"s{k}" for k in range(n)]
    certs = {c: provision_site(tmp / "r", tmp / c, c).to_json() for c in ids}
    keys = [(c, base64.b64decode(certs[c]["identity_key"])) for c in ids]
    return keys, certs


def test_check_peers_refuses_a_revoked_member(tmp_path: Path) -> None:
    init_root(tmp_path / "r", "c")
    keys, certs = _cohort(tmp_path)
    out = tmp_path / "revoked.json"
    v1 = revoke(tmp_path / "r", "s1", identity_key=keys[1][1], reason="key stolen")
    out.write_text(json.dumps(v1.to_json()))
    root = str(tmp_path / "r" / "root.json")
    policy = SitePolicy(consortium_root=root, revocation_list=str(out))
    state = tmp_path / "me"
    with pytest.raises(PolicyViolation, match=r"'s1' refused: .*revoked .*version 1 \(key stolen"):
        policy.check_peers(keys, certs, state_dir=state)
    assert SitePolicy(consortium_root=root).check_peers(keys, certs) == 3  # without the list
    # s1 re-keyed and re-certified under the same id: only the stolen key was revoked.
    new = provision_site(tmp_path / "r", tmp_path / "s1-new", "s1").to_json()
    keys2 = [keys[0], ("s1", base64.b64decode(new["identity_key"])), keys[2]]
    assert policy.check_peers(keys2, {**certs, "s1": new}, state_dir=state) == 3
    # Rollback: an older list put back in place is refused (the site saw version 2).
    v2 = revoke(tmp_path / "r", "s2", previous=v1)
    out.write_text(json.dumps(v2.to_json()))
    with pytest.raises(PolicyViolation, match="'s2' refused"):
        policy.check_peers(keys2, {**certs, "s1": new}, state_dir=state)
    out.write_text(json.dumps(v1.to_json()))
    with pytest.raises(PolicyViolation, match="older than version 2"):
        policy.check_peers(keys2, {**certs, "s1": new}, state_dir=state)
    # Another root's list, or no readable list: refused (fail closed).
    init_root(tmp_path / "evil", "c")
    out.write_text(json.dumps(revoke(tmp_path / "evil", "zz").to_json()))
    with pytest.raises(PolicyViolation, match="not signed by this site's consortium root"):
        policy.check_peers(keys2, {**certs, "s1": new}, state_dir=state)
    out.unlink()
    with pytest.raises(PolicyViolation, match="cannot read the revocation list"):
        policy.check_peers(keys2, {**certs, "s1": new}, state_dir=state)


def test_policy_key_resolves_next_to_the_file_and_needs_consortium_trust(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        'consortium_root = "root.json"\nrevocation_list = "revoked.json"\n'
    )
    policy = SitePolicy.load(tmp_path / "p.toml")
    assert policy.revocation_list == str((tmp_path / "revoked.json").resolve())
    assert SitePolicy.load(tmp_path / "p.toml") == SitePolicy.from_dict(
        {"consortium_root": policy.consortium_root, "revocation_list": policy.revocation_list}
    )
    with pytest.raises(ConfigError, match='needs peer_trust = "consortium"'):
        SitePolicy(peer_trust="tofu", revocation_list="x.json")


# --- the command ----------------------------------------------------------------------


def test_provision_revoke_command(tmp_path: Path) -> None:
    root = init_root(tmp_path / "root", "s1")
    cert = provision_site(tmp_path / "root", tmp_path / "site-a", "a")
    out = tmp_path / "revoked.json"
    base = [*CONFIDE, "provision", "revoke", "--root", str(tmp_path / "root"), "--out", str(out)]
    cert_path = str(tmp_path / "site-a" / "certificate.json")
    r = run([*base, "--site-id", "a", "--cert", cert_path, "--reason", "key stolen"])
    assert r.rc == 0, r.err
    assert "version 1" in r.out
    r = run([*base, "--site-id", "b"])
    assert r.rc == 0, r.err
    lst = verify_revocation_list(json.loads(out.read_text()), root)
    assert lst.version == 2
    assert lst.revoked == (
        Revocation("a", key_fingerprint(cert.identity_key), "key stolen"),
        Revocation("b", None, ""),
    )
    r = run([*base, "--site-id", "b", "--cert", cert_path])
    assert r.rc == 2
    assert "is for 'a', not for --site-id 'b'" in r.short_error()
    r = run([*base, "--site-id", "bad id"])
    assert r.rc == 2
    assert "site id must be" in r.short_error()


# --- the attack over HTTP -------------------------------------------------------------


async def test_a_revoked_site_in_the_cohort_is_refused(make_fed: Any, tmp_path: Path) -> None:
    """site-2's identity key was stolen; the consortium revoked it.

    The operator (holding the stolen key and site-2's genuine certificate) enrols it and
    puts it in the victim's cohort with an honest certified site. The victim refuses at
    advertise (PolicyViolation naming the revocation) and the server stores no message of
    any stage from it.
    """
    fed = await make_fed(write_job(tmp_path / "job", **SECURE, job__rounds=1))
    init_root(tmp_path / "consortium", "study-1")
    provision_site(tmp_path / "consortium", tmp_path / "victim", "victim")
    provision_site(tmp_path / "consortium", tmp_path / "site-3", "site-3")
    stolen = provision_site(tmp_path / "consortium", tmp_path / "site-2", "site-2")
    lst = revoke(
        tmp_path / "consortium", "site-2", identity_key=stolen.identity_key, reason="key stolen"
    )
    (tmp_path / "revoked.json").write_text(json.dumps(lst.to_json()))
    victim_policy = SitePolicy(
        max_epsilon=1e6,
        consortium_root=str(tmp_path / "consortium" / "root.json"),
        revocation_list=str(tmp_path / "revoked.json"),
    )
    result = await victim_among_puppets(fed, tmp_path, victim_policy, ["site-2", "site-3"])
    assert isinstance(result, PolicyViolation), result
    assert "'site-2' refused: its certificate is revoked" in str(result)
    assert_nothing_stored_from(fed, "victim")
    assert _raw(tmp_path / "site-2") == stolen.identity_key
    assert (tmp_path / "victim" / REVOCATION_SEEN_FILE).exists()  # the version it saw


async def test_a_server_given_the_list_refuses_to_enrol_a_revoked_certificate(
    make_fed: Any, tmp_path: Path
) -> None:
    """``[server] consortium_root`` + ``revocation_list``: 400 at enrolment, with what to do."""
    init_root(tmp_path / "c", "study-1")
    stolen = provision_site(tmp_path / "c", tmp_path / "site-2", "site-2")
    provision_site(tmp_path / "c", tmp_path / "site-3", "site-3")
    lst = revoke(tmp_path / "c", "site-2", identity_key=stolen.identity_key, reason="key stolen")
    (tmp_path / "revoked.json").write_text(json.dumps(lst.to_json()))
    job = write_job(
        tmp_path / "job",
        server__consortium_root=str(tmp_path / "c" / "root.json"),
        server__revocation_list=str(tmp_path / "revoked.json"),
    )
    fed = await make_fed(job)
    url = server_url(fed)
    async with Client(url, tmp_path / "site-2", retry_timeout=5.0) as c:
        with pytest.raises(
            ServerError, match=r"'site-2' is revoked .* version 1 \(key stolen\)"
        ) as e:
            await c.enroll(fed.engine.create_tokens(1)[0], "site-2")
    assert e.value.status == 400
    assert fed.engine.store.clients() == {}
    async with Client(url, tmp_path / "site-3", retry_timeout=5.0) as c:
        await c.enroll(fed.engine.create_tokens(1)[0], "site-3")
    assert set(fed.engine.store.clients()) == {"site-3"}
    with pytest.raises(ConfigError, match="set both or neither"):
        write_job(tmp_path / "job2", server__revocation_list=str(tmp_path / "revoked.json"))
