"""Signed model releases: every attack on a release is refused with a typed error."""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from confide.errors import ConfigError, FederationError, IntegrityError, SignatureError
from confide.protocol.release import (
    DOMAIN,
    DevicePolicy,
    DPGuarantee,
    ReleaseError,
    ReleaseIntegrityError,
    ReleasePolicyError,
    ReleaseRecord,
    ReleaseReplayError,
    ReleaseSignatureError,
    VersionStore,
    key_fingerprint,
    release_message,
    sign_release,
    verify_release,
)
from confide.protocol.signing import Identity

MODEL = b"\x08\x08onnx model bytes" * 64
POLICY = DevicePolicy(max_epsilon=4.0, max_delta=1e-5, min_unit="patient")


def _record(version: int = 1, model: bytes = MODEL, dp: DPGuarantee | None = None) -> ReleaseRecord:
    return ReleaseRecord.create(
        job_id="derm-2026",
        version=version,
        model=model,
        manifest_sha256="c0" * 32,
        classes=("benign", "malignant"),
        dp=DPGuarantee(2.0, 1e-5, "patient") if dp is None else dp,
        created_at=1_764_600_000,
    )


@pytest.fixture
def server_key() -> Identity:
    return Identity.generate()


def test_a_good_release_verifies(server_key: Identity) -> None:
    record = _record()
    sig = sign_release(record, server_key)
    got = verify_release(record.to_bytes(), sig, MODEL, server_key.public_key_b64, POLICY)
    assert got == record
    # base64 signature and record object forms are accepted too
    assert (
        verify_release(
            record,
            base64.b64encode(sig).decode(),
            MODEL,
            server_key.private_key.public_key(),
            POLICY,
        )
        == record
    )


def test_canonical_encoding_is_stable_and_documented() -> None:
    record = _record()
    data = record.to_bytes()
    doc = json.loads(data)
    assert data == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["format"] == "confide-release/1"
    assert doc["dp"] == {"delta": 1e-05, "epsilon": 2.0, "unit": "patient"}
    assert ReleaseRecord.from_bytes(data) == record
    assert release_message(data) == DOMAIN + data
    # Known answer: the exact bytes (a change of the encoding breaks deployed devices).
    assert data.startswith(b'{"classes":["benign","malignant"],"created_at":1764600000,')
    assert b'"version":1}' in data


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.replace(b",", b", ", 1),  # whitespace
        lambda d: d.replace(b'"epsilon":2.0', b'"epsilon":2'),  # non-canonical float
        lambda d: d[:-1] + b',"extra":1}',  # unknown key
        lambda d: d.replace(b'"confide-release/1"', b'"confide-release/2"'),
        lambda d: b"not json",
        lambda d: d.replace(b'"version":1', b'"version":0'),
    ],
)
def test_non_canonical_or_invalid_records_are_refused(mutate: object) -> None:
    data = mutate(_record().to_bytes())  # type: ignore[operator]
    with pytest.raises(ReleaseError):
        ReleaseRecord.from_bytes(data)


def test_unsigned_release_is_refused(server_key: Identity) -> None:
    data = _record().to_bytes()
    for sig in (None, b"", ""):
        with pytest.raises(ReleaseSignatureError, match="not signed"):
            verify_release(data, sig, MODEL, server_key.public_key_b64, POLICY)
    with pytest.raises(ReleaseSignatureError, match="64 bytes"):
        verify_release(data, b"x" * 10, MODEL, server_key.public_key_b64, POLICY)
    with pytest.raises(ReleaseSignatureError, match="base64"):
        verify_release(data, "not base64!", MODEL, server_key.public_key_b64, POLICY)


def test_re_signed_release_is_refused(server_key: Identity) -> None:
    # An attacker (or another server) re-signs a record with its own key.
    attacker = Identity.generate()
    record = _record(dp=DPGuarantee(0.5, 1e-6, "site"))
    sig = sign_release(record, attacker)
    with pytest.raises(ReleaseSignatureError, match="pinned release key") as info:
        verify_release(record.to_bytes(), sig, MODEL, server_key.public_key_b64, POLICY)
    assert isinstance(info.value, SignatureError)
    assert info.value.code == "release_bad_signature"


def test_record_edited_after_signing_is_refused(server_key: Identity) -> None:
    record = _record(dp=DPGuarantee(9.0, 1e-5, "patient"))
    sig = sign_release(record, server_key)
    # Lowering the recorded epsilon to pass the device policy breaks the signature.
    forged = replace(record, dp=DPGuarantee(1.0, 1e-5, "patient")).to_bytes()
    with pytest.raises(ReleaseSignatureError):
        verify_release(forged, sig, MODEL, server_key.public_key_b64, POLICY)
    # A request signature (other domain) never verifies as a release signature.
    request_sig = server_key.sign(record.to_bytes())
    with pytest.raises(ReleaseSignatureError):
        verify_release(record.to_bytes(), request_sig, MODEL, server_key.public_key_b64, POLICY)


def test_tampered_model_bytes_are_refused(server_key: Identity) -> None:
    record = _record()
    sig = sign_release(record, server_key)
    tampered = bytearray(MODEL)
    tampered[100] ^= 1
    with pytest.raises(ReleaseIntegrityError, match="SHA-256") as info:
        verify_release(record.to_bytes(), sig, bytes(tampered), server_key.public_key_b64, POLICY)
    assert isinstance(info.value, IntegrityError)
    with pytest.raises(ReleaseIntegrityError):
        verify_release(record.to_bytes(), sig, MODEL + b"\x00", server_key.public_key_b64, POLICY)


def test_replayed_older_version_is_refused(server_key: Identity, tmp_path: Path) -> None:
    store_path = tmp_path / "versions.json"
    versions = VersionStore(store_path)
    old, new = _record(version=3), _record(version=4, model=MODEL + b"v4")
    old_sig, new_sig = sign_release(old, server_key), sign_release(new, server_key)
    key = server_key.public_key_b64
    verify_release(old.to_bytes(), old_sig, MODEL, key, POLICY, versions)
    verify_release(new.to_bytes(), new_sig, MODEL + b"v4", key, POLICY, versions)
    # the same version again (an app restart) is fine
    verify_release(new.to_bytes(), new_sig, MODEL + b"v4", key, POLICY, versions)
    # a restarted device (state re-read from disk) still refuses the older, validly signed one
    again = VersionStore(store_path)
    assert again.highest(key_fingerprint(key)) == (4, new.model_sha256)
    with pytest.raises(ReleaseReplayError, match="older than the accepted version 4"):
        verify_release(old.to_bytes(), old_sig, MODEL, key, POLICY, again)
    assert stat.S_IMODE(os.stat(store_path).st_mode) == 0o600
    # equivocation: version 4 signed again for another model
    other = _record(version=4, model=b"other model")
    with pytest.raises(ReleaseReplayError, match="another model"):
        verify_release(
            other.to_bytes(), sign_release(other, server_key), b"other model", key, POLICY, again
        )


@pytest.mark.parametrize(
    ("dp", "match"),
    [
        (DPGuarantee(4.5, 1e-5, "patient"), "epsilon 4.5 is above the device maximum 4"),
        (DPGuarantee(1.0, 1e-3, "patient"), "delta 0.001 is above"),
        (DPGuarantee(1.0, 1e-6, "record"), "record-level DP is weaker"),
    ],
)
def test_weaker_dp_guarantee_is_refused(server_key: Identity, dp: DPGuarantee, match: str) -> None:
    record = _record(dp=dp)
    sig = sign_release(record, server_key)
    with pytest.raises(ReleasePolicyError, match=match):
        verify_release(record.to_bytes(), sig, MODEL, server_key.public_key_b64, POLICY)


def test_release_without_dp_is_refused_unless_policy_allows(server_key: Identity) -> None:
    record = replace(_record(), dp=None)
    sig = sign_release(record, server_key)
    with pytest.raises(ReleasePolicyError, match="without a DP guarantee"):
        verify_release(record.to_bytes(), sig, MODEL, server_key.public_key_b64, POLICY)
    lax = DevicePolicy(max_epsilon=4.0, max_delta=1e-5, require_dp=False)
    assert verify_release(record.to_bytes(), sig, MODEL, server_key.public_key_b64, lax).dp is None


def test_site_level_guarantee_satisfies_a_patient_policy(server_key: Identity) -> None:
    record = _record(dp=DPGuarantee(1.0, 1e-6, "site"))
    sig = sign_release(record, server_key)
    assert verify_release(record.to_bytes(), sig, MODEL, server_key.public_key_b64, POLICY)


def test_refusals_do_not_advance_the_version(server_key: Identity) -> None:
    versions = VersionStore()
    bad = _record(version=9, dp=DPGuarantee(50.0, 1e-5, "patient"))
    with pytest.raises(ReleasePolicyError):
        verify_release(
            bad.to_bytes(),
            sign_release(bad, server_key),
            MODEL,
            server_key.public_key_b64,
            POLICY,
            versions,
        )
    assert versions.highest(key_fingerprint(server_key.public_key_b64)) is None


def test_all_refusals_share_one_base() -> None:
    for cls in (
        ReleaseSignatureError,
        ReleaseIntegrityError,
        ReleasePolicyError,
        ReleaseReplayError,
    ):
        assert issubclass(cls, ReleaseError)
        assert issubclass(cls, FederationError)
        assert issubclass(cls, ValueError)


def test_invalid_inputs_are_config_errors(server_key: Identity) -> None:
    with pytest.raises(ConfigError, match="epsilon"):
        DPGuarantee(float("nan"), 1e-5, "patient")
    with pytest.raises(ConfigError, match="unit"):
        DPGuarantee(1.0, 1e-5, "hospital")
    with pytest.raises(ConfigError, match="delta"):
        DevicePolicy(max_epsilon=1.0, max_delta=1.0)
    with pytest.raises(ConfigError, match="pinned release key"):
        verify_release(_record().to_bytes(), bytes(64), MODEL, "short", POLICY)
    with pytest.raises(ConfigError, match="model_sha256"):
        ReleaseRecord("j", 1, "XYZ", "0" * 64, ("a",), None, 0)
