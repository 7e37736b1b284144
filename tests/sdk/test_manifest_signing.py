"""Manifests, the safetensors wire format, Ed25519 identities and request signatures."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from confide import (
    ConfideError,
    ConfigError,
    Identity,
    Manifest,
    ManifestError,
    SignatureError,
)
from confide.protocol.manifest import decode_tensors, encode_tensors, sha256_hex
from confide.protocol.signing import SignedRequest, decode_public_key, verify_request


def test_manifest_hash_and_json_round_trip(tmp_path: Path) -> None:
    m = Manifest.from_shapes([("a", (2, 2)), ("b", ())], {"engine": "x"})
    m.save(tmp_path / "m.json")
    back = Manifest.load(tmp_path / "m.json")
    assert back == m
    assert back.sha256 == m.sha256
    assert Manifest.from_shapes([("a", (2, 2)), ("b", (1,))]).sha256 != m.sha256
    with pytest.raises(ManifestError, match="unique"):
        Manifest.from_shapes([("a", (1,)), ("a", (2,))])
    with pytest.raises(ManifestError, match="name"):
        Manifest.from_shapes([("a b", (1,))])
    with pytest.raises(ManifestError):
        Manifest.from_json("{}")
    assert issubclass(ManifestError, ConfideError)
    assert issubclass(ManifestError, ValueError)


def test_encoding_is_deterministic_and_valid_safetensors() -> None:
    import safetensors.numpy

    m = Manifest.from_shapes([("w", (3, 2)), ("b", (2,))])
    v = np.arange(8, dtype=np.float32)
    blobs = {encode_tensors(m, v, {"z": "1", "a": "2"}) for _ in range(10)}
    assert len(blobs) == 1
    blob = blobs.pop()
    loaded = safetensors.numpy.load(blob)
    np.testing.assert_array_equal(loaded["w"], v[:6].reshape(3, 2))
    vec, meta = decode_tensors(m, blob)
    np.testing.assert_array_equal(vec, v)
    assert meta == {"z": "1", "a": "2"}


def test_identity_file_is_private(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "id.pem"
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).public_key_b64 == ident.public_key_b64
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="0600"):
        Identity.load(path)


def test_signature_binds_every_field() -> None:
    ident = Identity.generate()
    body = b"payload"
    headers = ident.sign_request("c1", "PUT", "/v1/rounds/3/train", 3, "train", body)
    req = SignedRequest.from_headers(headers)
    key = decode_public_key(ident.public_key_b64)
    now = req.timestamp_ms
    verify_request(
        key, req, "PUT", "/v1/rounds/3/train", sha256_hex(body), now_ms=now, max_skew_ms=1
    )
    with pytest.raises(SignatureError):
        verify_request(
            key, req, "PUT", "/v1/rounds/4/train", sha256_hex(body), now_ms=now, max_skew_ms=1
        )
    with pytest.raises(SignatureError):
        verify_request(
            key, req, "PUT", "/v1/rounds/3/train", sha256_hex(b"x"), now_ms=now, max_skew_ms=1
        )
    with pytest.raises(SignatureError, match="timestamp") as exc:
        verify_request(
            key, req, "PUT", "/v1/rounds/3/train", sha256_hex(body), now_ms=now + 10, max_skew_ms=1
        )
    assert exc.value.code == "stale_request"
    for field, value in [
        ("X-Confide-Round", "4"),
        ("X-Confide-Stage", "evaluate"),
        ("X-Confide-Client", "c2"),
        ("X-Confide-Nonce", "ab" * 16),
    ]:
        forged = SignedRequest.from_headers({**headers, field: value})
        with pytest.raises(SignatureError):
            verify_request(
                key,
                forged,
                "PUT",
                "/v1/rounds/3/train",
                sha256_hex(body),
                now_ms=now,
                max_skew_ms=1,
            )
    with pytest.raises(SignatureError, match="missing"):
        SignedRequest.from_headers({k: v for k, v in headers.items() if k != "X-Confide-Nonce"})
