"""Consortium certificates: site identities signed by a root independent of the server.

A consortium (the hospitals of one study, say) creates one **root** at provisioning
(``confide provision init``): an Ed25519 key kept offline by whoever provisions the sites
(``root-key.pem``, mode 0600) and its public half (``root.json``), which every site gets with
its policy. At enrolment each site prints its identity public key (``confide identity``), the
provisioner signs it (``confide provision sign``) and the site keeps the **site certificate**
(``certificate.json`` in its state folder). The client sends it at enrolment, the server
relays every cohort member's certificate with the round's keys, and each site verifies them
against *its own* root (:func:`verify_certificate`): a server that enrols ids whose keys it
holds cannot get them certified, so it cannot surround an honest site with Sybils.

Formats (JSON; base64 is standard base64 of the raw 32-byte Ed25519 keys and 64-byte
signature)::

    root.json         {"format": "confide-consortium-root/1", "consortium": NAME,
                       "public_key": B64}
    certificate.json  {"format": "confide-site-cert/1", "consortium": NAME,
                       "site_id": ID, "identity_key": B64, "not_after": UNIX_S or null,
                       "signature": B64}

The signature is the root's Ed25519 signature over ``confide-site-cert/1`` and a newline
(LF), then the canonical JSON (sorted keys, no spaces, UTF-8) of the certificate without its
``signature`` field. ``not_after`` (integer Unix seconds) is optional; a certificate past it
is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from confide.errors import ConfigError, SignatureError
from confide.protocol.signing import Identity
from confide.sigcache import verify_ed25519

__all__ = [
    "CERT_FILE",
    "CERT_FORMAT",
    "ROOT_FORMAT",
    "ConsortiumRoot",
    "SiteCertificate",
    "init_root",
    "load_or_create_identity",
    "provision_site",
    "sign_certificate",
    "verify_certificate",
]

CERT_FORMAT = "confide-site-cert/1"
ROOT_FORMAT = "confide-consortium-root/1"
#: Where a site keeps its certificate, in its state folder (next to ``identity.pem``).
CERT_FILE = "certificate.json"
_IDENTITY_FILE = "identity.pem"
_ROOT_KEY_FILE = "root-key.pem"
_ROOT_FILE = "root.json"
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_CERT_BYTES = 4096


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(value: Any, what: str, size: int) -> bytes:
    if not isinstance(value, str):
        raise SignatureError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{what} is not valid base64") from None
    if len(raw) != size:
        raise SignatureError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SiteCertificate:
    """A site's identity key signed by the consortium root.

    Parameters
    ----------
    consortium : str
        The consortium's name (the root's).
    site_id : str
        The client id the certificate is for.
    identity_key : bytes
        The site's raw 32-byte Ed25519 identity public key.
    not_after : int or None
        Unix seconds after which the certificate is refused; ``None``: no expiry.
    signature : bytes
        The root's signature over :meth:`signed_bytes`.
    """

    consortium: str
    site_id: str
    identity_key: bytes
    not_after: int | None
    signature: bytes

    def signed_bytes(self) -> bytes:
        """Return the bytes the root signs (domain tag + canonical JSON without the signature)."""
        body = {
            "format": CERT_FORMAT,
            "consortium": self.consortium,
            "site_id": self.site_id,
            "identity_key": _b64(self.identity_key),
            "not_after": self.not_after,
        }
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return CERT_FORMAT.encode() + b"\n" + text.encode()

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form (``certificate.json``)."""
        return {
            "format": CERT_FORMAT,
            "consortium": self.consortium,
            "site_id": self.site_id,
            "identity_key": _b64(self.identity_key),
            "not_after": self.not_after,
            "signature": _b64(self.signature),
        }

    @classmethod
    def from_json(cls, doc: Any) -> SiteCertificate:
        """Parse a certificate strictly (its signature is not checked here).

        Raises
        ------
        SignatureError
            Not a certificate: wrong format tag, missing or unexpected keys, wrong types.
        """
        keys = {"format", "consortium", "site_id", "identity_key", "not_after", "signature"}
        if not isinstance(doc, Mapping) or set(doc) != keys:
            raise SignatureError(f"a site certificate is a JSON object with keys {sorted(keys)}")
        if doc["format"] != CERT_FORMAT:
            raise SignatureError(f"certificate format must be {CERT_FORMAT!r}")
        for name in ("consortium", "site_id"):
            if not isinstance(doc[name], str) or not _ID.fullmatch(doc[name]):
                raise SignatureError(f"certificate {name} must be 1-64 of [A-Za-z0-9_.-]")
        not_after = doc["not_after"]
        if not_after is not None and (
            not isinstance(not_after, int) or isinstance(not_after, bool) or not_after < 0
        ):
            raise SignatureError("certificate not_after must be null or Unix seconds (int)")
        return cls(
            consortium=doc["consortium"],
            site_id=doc["site_id"],
            identity_key=_unb64(doc["identity_key"], "certificate identity_key", 32),
            not_after=not_after,
            signature=_unb64(doc["signature"], "certificate signature", 64),
        )

    @classmethod
    def load(cls, path: str | Path) -> SiteCertificate:
        """Read a ``certificate.json``.

        Raises
        ------
        ConfigError
            The file cannot be read, is not JSON or not a certificate.
        """
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the certificate {p}: {exc.strerror or exc}") from None
        if len(data) > _MAX_CERT_BYTES:
            raise ConfigError(f"{p} is over {_MAX_CERT_BYTES} bytes: not a site certificate")
        try:
            return cls.from_json(json.loads(data))
        except ValueError as exc:  # JSON errors and SignatureError alike
            raise ConfigError(f"{p} is not a site certificate: {exc}") from None


@dataclass(frozen=True)
class ConsortiumRoot:
    """The public half of a consortium root: what every site verifies peers against.

    Parameters
    ----------
    consortium : str
        The consortium's name.
    public_key : bytes
        The root's raw 32-byte Ed25519 public key.
    """

    consortium: str
    public_key: bytes

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form (``root.json``)."""
        return {
            "format": ROOT_FORMAT,
            "consortium": self.consortium,
            "public_key": _b64(self.public_key),
        }

    @classmethod
    def load(cls, path: str | Path) -> ConsortiumRoot:
        """Read a ``root.json`` written by :func:`init_root`.

        Raises
        ------
        ConfigError
            The file cannot be read or is not a consortium root.
        """
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except OSError as exc:
            raise ConfigError(
                f"cannot read the consortium root {p}: {exc.strerror or exc}"
            ) from None
        except ValueError:
            raise ConfigError(f"the consortium root {p} is not JSON") from None
        keys = {"format", "consortium", "public_key"}
        if not isinstance(doc, dict) or set(doc) != keys or doc["format"] != ROOT_FORMAT:
            raise ConfigError(
                f"{p} is not a consortium root (a {ROOT_FORMAT!r} JSON object with keys "
                f"{sorted(keys)}, from `confide provision init`)"
            )
        name = doc["consortium"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{p}: consortium must be 1-64 of [A-Za-z0-9_.-]")
        try:
            key = _unb64(doc["public_key"], "public_key", 32)
        except SignatureError as exc:
            raise ConfigError(f"{p}: {exc.message}") from None
        return cls(name, key)


def _message(exc: Exception) -> str:
    return str(getattr(exc, "message", exc))


def init_root(out: str | Path, consortium: str) -> ConsortiumRoot:
    """Create a consortium root in ``out``: ``root-key.pem`` (0600) and ``root.json``.

    Raises
    ------
    ConfigError
        A bad name, or ``out`` already holds a root (never overwritten).
    """
    if not isinstance(consortium, str) or not _NAME.fullmatch(consortium):
        raise ConfigError(f"the consortium name must be 1-64 of [A-Za-z0-9_.-], got {consortium!r}")
    d = Path(out)
    if (d / _ROOT_KEY_FILE).exists() or (d / _ROOT_FILE).exists():
        raise ConfigError(f"{d} already holds a consortium root; it is never overwritten")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    Identity(key).save(d / _ROOT_KEY_FILE)
    root = ConsortiumRoot(consortium, _raw_public(key.public_key()))
    (d / _ROOT_FILE).write_text(json.dumps(root.to_json(), indent=1) + "\n")
    return root


def _load_root_key(root_dir: str | Path) -> tuple[ConsortiumRoot, Ed25519PrivateKey]:
    d = Path(root_dir)
    root = ConsortiumRoot.load(d / _ROOT_FILE)
    try:
        key = Identity.load(d / _ROOT_KEY_FILE).private_key
    except OSError as exc:
        raise ConfigError(
            f"cannot read the root key {d / _ROOT_KEY_FILE}: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:  # not a PEM key (ConfigError is a ValueError too)
        raise ConfigError(f"{d / _ROOT_KEY_FILE}: {_message(exc)}") from None
    if _raw_public(key.public_key()) != root.public_key:
        raise ConfigError(f"{d}: root-key.pem does not match root.json")
    return root, key


def sign_certificate(
    root_dir: str | Path, site_id: str, identity_key: bytes, not_after: int | None = None
) -> SiteCertificate:
    """Sign a site's identity key with the root in ``root_dir``.

    Parameters
    ----------
    root_dir : str or Path
        Folder from :func:`init_root`.
    site_id : str
        The client id the site enrols with.
    identity_key : bytes
        Its raw 32-byte Ed25519 public key.
    not_after : int, optional
        Expiry (Unix seconds).

    Raises
    ------
    ConfigError
        A bad id or key, or an unreadable root.
    """
    if not isinstance(site_id, str) or not _ID.fullmatch(site_id):
        raise ConfigError(f"the site id must be 1-64 of [A-Za-z0-9_.-], got {site_id!r}")
    if not isinstance(identity_key, bytes) or len(identity_key) != 32:
        raise ConfigError("the identity key must be 32 raw Ed25519 public-key bytes")
    if not_after is not None and (isinstance(not_after, bool) or not_after < 0):
        raise ConfigError(f"not_after must be Unix seconds >= 0, got {not_after!r}")
    root, key = _load_root_key(root_dir)
    unsigned = SiteCertificate(root.consortium, site_id, identity_key, not_after, b"\0" * 64)
    return SiteCertificate(
        root.consortium, site_id, identity_key, not_after, key.sign(unsigned.signed_bytes())
    )


def verify_certificate(
    cert: SiteCertificate | Mapping[str, Any],
    root: ConsortiumRoot,
    *,
    site_id: str,
    identity_key: bytes,
    now: float | None = None,
) -> SiteCertificate:
    """Check that ``cert`` certifies ``identity_key`` for ``site_id`` under ``root``.

    Parameters
    ----------
    cert : SiteCertificate or mapping
        The certificate (its JSON form is parsed strictly).
    root : ConsortiumRoot
        The root this site was provisioned with.
    site_id, identity_key : str, bytes
        The peer id and raw key the server announced.
    now : float, optional
        Unix seconds (default: the clock).

    Returns
    -------
    SiteCertificate
        The verified certificate.

    Raises
    ------
    SignatureError
        Malformed, another consortium, not signed by ``root``, for another id or key, or
        expired.

    Examples
    --------
    >>> import base64, tempfile
    >>> d = tempfile.mkdtemp()
    >>> root = init_root(d + "/root", "study-1")
    >>> cert = provision_site(d + "/root", d + "/site-1", "site-1")
    >>> key = base64.b64decode(cert.to_json()["identity_key"])
    >>> verify_certificate(cert.to_json(), root, site_id="site-1", identity_key=key).site_id
    'site-1'
    >>> verify_certificate(cert, root, site_id="site-2", identity_key=key)
    Traceback (most recent call last):
    ...
    confide.errors.SignatureError: the certificate is for 'site-1', not for 'site-2'
    """
    c = cert if isinstance(cert, SiteCertificate) else SiteCertificate.from_json(cert)
    if c.consortium != root.consortium:
        raise SignatureError(
            f"certificate of consortium {c.consortium!r}, this site trusts {root.consortium!r}"
        )
    # Remembered per process for the exact bytes (confide.sigcache): the same answer, once.
    if not verify_ed25519(root.public_key, c.signature, c.signed_bytes()):
        raise SignatureError(
            f"the certificate for {c.site_id!r} is not signed by this site's consortium root"
        )
    if c.site_id != site_id:
        raise SignatureError(f"the certificate is for {c.site_id!r}, not for {site_id!r}")
    if c.identity_key != identity_key:
        raise SignatureError(f"the certificate for {site_id!r} certifies another identity key")
    t = time.time() if now is None else now
    if c.not_after is not None and t > c.not_after:
        raise SignatureError(f"the certificate for {site_id!r} expired at {c.not_after}")
    return c


def load_or_create_identity(state_dir: str | Path) -> Identity:
    """Return the identity in ``state_dir/identity.pem``, creating it (0600) if missing."""
    d = Path(state_dir)
    path = d / _IDENTITY_FILE
    if path.exists():
        return Identity.load(path)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = Identity.generate()
    ident.save(path)
    return ident


def provision_site(
    root_dir: str | Path, state_dir: str | Path, site_id: str, not_after: int | None = None
) -> SiteCertificate:
    """Create a site's identity if missing and write its certificate into its state folder.

    What an operator who provisions every site at once (a simulation, a test bench) does
    in one step; a real site runs ``confide identity`` and receives its certificate from
    the provisioner instead.
    """
    ident = load_or_create_identity(state_dir)
    raw = base64.b64decode(ident.public_key_b64)
    cert = sign_certificate(root_dir, site_id, raw, not_after)
    path = Path(state_dir) / CERT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cert.to_json(), indent=1) + "\n")
    os.replace(tmp, path)
    return cert
