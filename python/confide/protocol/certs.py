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

**Revocation.** A site whose identity key was stolen (or that left the consortium) is
revoked by the root (``confide provision revoke``), which issues the next **revocation
list**; every site gets it (``revocation_list`` in its policy) and refuses a cohort holding
a revoked certificate. Format::

    revoked.json      {"format": "confide-revocation-list/1", "consortium": NAME,
                       "version": N, "issued_at": UNIX_S,
                       "revoked": [{"site_id": ID, "key_sha256": HEX or null,
                                    "reason": TEXT}, ...],
                       "signature": B64}

signed like a certificate: the root's signature over ``confide-revocation-list/1``, LF, and
the canonical JSON without ``signature``. ``key_sha256`` is the hex SHA-256 of the raw
32-byte identity key (:func:`key_fingerprint`); ``null`` revokes every certificate of the id.
``revoked`` is sorted by site id, then key. ``version`` starts at 1 and grows by one per
list; a site keeps the highest version it accepted (``revocation-seen.json``) and refuses an
older list (rollback) or another list under the same version.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from confide._fsio import write_atomic
from confide.errors import ConfigError, SignatureError
from confide.protocol.signing import Identity
from confide.sigcache import verify_ed25519

__all__ = [
    "CERT_FILE",
    "CERT_FORMAT",
    "REVOCATION_FORMAT",
    "REVOCATION_SEEN_FILE",
    "ROOT_FORMAT",
    "ConsortiumRoot",
    "Revocation",
    "RevocationList",
    "SiteCertificate",
    "check_revocation_version",
    "init_root",
    "key_fingerprint",
    "load_or_create_identity",
    "provision_site",
    "revoke",
    "sign_certificate",
    "verify_certificate",
    "verify_revocation_list",
]

CERT_FORMAT = "confide-site-cert/1"
ROOT_FORMAT = "confide-consortium-root/1"
#: Where a site keeps its certificate, in its state folder (next to ``identity.pem``).
CERT_FILE = "certificate.json"
_IDENTITY_FILE = "identity.pem"
_ROOT_KEY_FILE = "root-key.pem"
_ROOT_FILE = "root.json"
#: Site ids and consortium names: one alphabet for both.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_CERT_BYTES = 4096
REVOCATION_FORMAT = "confide-revocation-list/1"
#: Where a site remembers the newest revocation list it accepted (rollback protection).
REVOCATION_SEEN_FILE = "revocation-seen.json"
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_MAX_REASON = 200
_MAX_LIST_BYTES = 4 << 20


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


def _is_name(value: Any) -> bool:
    """Whether ``value`` is a site id or consortium name: 1-64 of ``[A-Za-z0-9_.-]``."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def _is_whole(value: Any, low: int = 0) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) of at least ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _fields(doc: Any, keys: set[str], what: str, fmt: str | None = None) -> Mapping[str, Any]:
    """Return ``doc`` if it is a JSON object with exactly ``keys`` (and ``format`` ``fmt``).

    Raises
    ------
    SignatureError
        Not an object, keys missing or unexpected, or another format tag; the message names
        ``what`` (``"site certificate"``) and the keys expected.
    """
    if not isinstance(doc, Mapping) or set(doc) != keys:
        raise SignatureError(f"a {what} is a JSON object with keys {sorted(keys)}")
    if fmt is not None and doc["format"] != fmt:
        raise SignatureError(f"{what} format must be {fmt!r}")
    return doc


_T = TypeVar("_T")


def _read_document(path: str | Path, what: str, limit: int, parse: Callable[[Any], _T]) -> _T:
    """Read the JSON file ``path`` of at most ``limit`` bytes and ``parse`` it.

    Raises
    ------
    ConfigError
        The file cannot be read, is larger than ``limit``, is not JSON, or ``parse`` refuses
        it (a :class:`SignatureError`); the message names the file and ``what`` it should be.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {p}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ConfigError(f"{p} is over {limit} bytes: not a {what}")
    try:
        return parse(json.loads(data))
    except ValueError as exc:  # JSON errors and SignatureError alike
        raise ConfigError(f"{p} is not a {what}: {exc}") from None


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
        doc = _fields(doc, keys, "site certificate", CERT_FORMAT)
        for name in ("consortium", "site_id"):
            if not _is_name(doc[name]):
                raise SignatureError(f"certificate {name} must be 1-64 of [A-Za-z0-9_.-]")
        not_after = doc["not_after"]
        if not_after is not None and not _is_whole(not_after):
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
        return _read_document(path, "site certificate", _MAX_CERT_BYTES, cls.from_json)


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
        if not _is_name(name):
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
    if not _is_name(consortium):
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
    if not _is_name(site_id):
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
    write_atomic(path, (json.dumps(cert.to_json(), indent=1) + "\n").encode(), mode=0o644)
    return cert


# --- revocation -----------------------------------------------------------------------


@dataclass(frozen=True)
class Revocation:
    """One revoked certificate (or every certificate of a site id).

    Parameters
    ----------
    site_id : str
        The revoked client id.
    key_sha256 : str or None
        Hex SHA-256 of the revoked raw identity key (:func:`key_fingerprint`); ``None``
        revokes every certificate of ``site_id``, whatever its key.
    reason : str
        Free text for the operators (not interpreted).
    """

    site_id: str
    key_sha256: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form (one entry of ``revoked``)."""
        return {"site_id": self.site_id, "key_sha256": self.key_sha256, "reason": self.reason}

    def matches(self, site_id: str, identity_key: bytes) -> bool:
        """Whether this entry revokes ``identity_key`` certified for ``site_id``."""
        if site_id != self.site_id:
            return False
        return self.key_sha256 is None or self.key_sha256 == key_fingerprint(identity_key)


def key_fingerprint(identity_key: bytes) -> str:
    """Return the hex SHA-256 of a raw identity key: how a revocation list names a key.

    Examples
    --------
    >>> key_fingerprint(bytes(32))[:16]
    '66687aadf862bd77'
    """
    return hashlib.sha256(identity_key).hexdigest()


@dataclass(frozen=True)
class RevocationList:
    """The consortium root's signed list of revoked site certificates.

    Parameters
    ----------
    consortium : str
        The consortium's name (the root's).
    version : int
        Increases by one with every list the root issues (>= 1); a site refuses a list
        older than the newest it has seen (:func:`check_revocation_version`).
    issued_at : int
        Unix seconds when it was issued (informational; ``version`` orders lists).
    revoked : tuple of Revocation
        The revoked certificates, sorted by site id then key.
    signature : bytes
        The root's signature over :meth:`signed_bytes`.
    """

    consortium: str
    version: int
    issued_at: int
    revoked: tuple[Revocation, ...]
    signature: bytes

    def _body(self) -> dict[str, Any]:
        return {
            "format": REVOCATION_FORMAT,
            "consortium": self.consortium,
            "version": self.version,
            "issued_at": self.issued_at,
            "revoked": [r.to_json() for r in self.revoked],
        }

    def signed_bytes(self) -> bytes:
        """Return the bytes the root signs (domain tag + canonical JSON without the signature)."""
        text = json.dumps(self._body(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return REVOCATION_FORMAT.encode() + b"\n" + text.encode()

    def digest(self) -> str:
        """Return the hex SHA-256 of :meth:`signed_bytes` (what a site remembers)."""
        return hashlib.sha256(self.signed_bytes()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form (``revoked.json``)."""
        return {**self._body(), "signature": _b64(self.signature)}

    def revocation_of(self, site_id: str, identity_key: bytes) -> Revocation | None:
        """Return the entry that revokes this site's certified key, or ``None``."""
        for r in self.revoked:
            if r.matches(site_id, identity_key):
                return r
        return None

    @classmethod
    def from_json(cls, doc: Any) -> RevocationList:
        """Parse a revocation list strictly (its signature is not checked here).

        Raises
        ------
        SignatureError
            Not a revocation list: wrong format tag, missing or unexpected keys, wrong types.
        """
        keys = {"format", "consortium", "version", "issued_at", "revoked", "signature"}
        doc = _fields(doc, keys, "revocation list", REVOCATION_FORMAT)
        if not _is_name(doc["consortium"]):
            raise SignatureError("revocation list consortium must be 1-64 of [A-Za-z0-9_.-]")
        for name, low in (("version", 1), ("issued_at", 0)):
            if not _is_whole(doc[name], low):
                raise SignatureError(f"revocation list {name} must be an integer >= {low}")
        entries = doc["revoked"]
        if not isinstance(entries, list):
            raise SignatureError("revocation list revoked must be a list")
        revoked = []
        for e in entries:
            e = _fields(e, {"site_id", "key_sha256", "reason"}, "revoked entry")
            sid, fp, reason = e["site_id"], e["key_sha256"], e["reason"]
            if not _is_name(sid):
                raise SignatureError("revoked site_id must be 1-64 of [A-Za-z0-9_.-]")
            if fp is not None and (not isinstance(fp, str) or not _FINGERPRINT.fullmatch(fp)):
                raise SignatureError("revoked key_sha256 must be null or 64 lowercase hex digits")
            if not isinstance(reason, str) or len(reason) > _MAX_REASON:
                raise SignatureError(f"revoked reason must be a string of <= {_MAX_REASON} chars")
            revoked.append(Revocation(sid, fp, reason))
        return cls(
            consortium=doc["consortium"],
            version=doc["version"],
            issued_at=doc["issued_at"],
            revoked=tuple(revoked),
            signature=_unb64(doc["signature"], "revocation list signature", 64),
        )

    @classmethod
    def load(cls, path: str | Path) -> RevocationList:
        """Read a ``revoked.json`` (its signature is not checked here).

        Raises
        ------
        ConfigError
            The file cannot be read, is not JSON or not a revocation list.
        """
        return _read_document(path, "revocation list", _MAX_LIST_BYTES, cls.from_json)


def verify_revocation_list(
    lst: RevocationList | Mapping[str, Any], root: ConsortiumRoot
) -> RevocationList:
    """Check that ``lst`` was issued by ``root``.

    Raises
    ------
    SignatureError
        Malformed, another consortium, or not signed by ``root`` (tampered with).
    """
    r = lst if isinstance(lst, RevocationList) else RevocationList.from_json(lst)
    if r.consortium != root.consortium:
        raise SignatureError(
            f"revocation list of consortium {r.consortium!r}, this site trusts {root.consortium!r}"
        )
    if not verify_ed25519(root.public_key, r.signature, r.signed_bytes()):
        raise SignatureError(
            f"revocation list version {r.version} is not signed by this site's consortium root"
        )
    return r


def revoke(
    root_dir: str | Path,
    site_id: str,
    *,
    identity_key: bytes | None = None,
    reason: str = "",
    previous: RevocationList | None = None,
    now: float | None = None,
) -> RevocationList:
    """Issue the next revocation list: ``previous``'s entries plus ``site_id``.

    Parameters
    ----------
    root_dir : str or Path
        Folder from :func:`init_root`.
    site_id : str
        The client id to revoke.
    identity_key : bytes, optional
        Revoke only this raw key's certificate (a re-keyed site stays valid); default:
        every certificate of ``site_id``.
    reason : str
        Free text kept in the list.
    previous : RevocationList, optional
        The list issued last (it must be this root's); the new one has its version + 1.
    now : float, optional
        Unix seconds for ``issued_at`` (default: the clock).

    Raises
    ------
    ConfigError
        A bad id, key or reason, an unreadable root, or a ``previous`` list not signed by it.
    """
    if not _is_name(site_id):
        raise ConfigError(f"the site id must be 1-64 of [A-Za-z0-9_.-], got {site_id!r}")
    if identity_key is not None and (
        not isinstance(identity_key, bytes) or len(identity_key) != 32
    ):
        raise ConfigError("the identity key must be 32 raw Ed25519 public-key bytes")
    if not isinstance(reason, str) or len(reason) > _MAX_REASON:
        raise ConfigError(f"the reason must be text of at most {_MAX_REASON} characters")
    root, key = _load_root_key(root_dir)
    entries: set[Revocation] = set()
    version = 1
    if previous is not None:
        try:
            verify_revocation_list(previous, root)
        except SignatureError as exc:
            raise ConfigError(f"the previous revocation list: {exc.message}") from None
        entries.update(previous.revoked)
        version = previous.version + 1
    fp = None if identity_key is None else key_fingerprint(identity_key)
    entries.add(Revocation(site_id, fp, reason))
    ordered = tuple(sorted(entries, key=lambda r: (r.site_id, r.key_sha256 or "", r.reason)))
    issued = int(time.time() if now is None else now)
    unsigned = RevocationList(root.consortium, version, issued, ordered, b"\0" * 64)
    return RevocationList(
        root.consortium, version, issued, ordered, key.sign(unsigned.signed_bytes())
    )


def check_revocation_version(lst: RevocationList, state_dir: str | Path) -> None:
    """Refuse a list older than the newest this site has seen; remember a newer one.

    The site keeps ``revocation-seen.json`` (mode 0600) in its state folder: the highest
    version it accepted and that list's digest. A lower version is a rollback (a server or
    anyone who can swap the file would un-revoke a stolen key); the same version with other
    content is a root that signed two lists under one number, refused too.

    Raises
    ------
    SignatureError
        An older list, or another list under the same version.
    """
    path = Path(state_dir) / REVOCATION_SEEN_FILE
    seen: dict[str, Any] = {}
    if path.exists():
        try:
            seen = json.loads(path.read_text())
        except (OSError, ValueError):
            raise SignatureError(f"{path} is unreadable: cannot check the list's age") from None
    key = lst.consortium
    last = seen.get(key)
    if isinstance(last, dict):
        v, digest = last.get("version"), last.get("sha256")
        if isinstance(v, int) and lst.version < v:
            raise SignatureError(
                f"revocation list version {lst.version} is older than version {v} this site "
                "has already seen (a rollback would un-revoke certificates)"
            )
        if v == lst.version:
            if digest != lst.digest():
                raise SignatureError(
                    f"revocation list version {lst.version} differs from the version "
                    f"{lst.version} this site has already seen"
                )
            return
    seen[key] = {"version": lst.version, "sha256": lst.digest()}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, (json.dumps(seen, indent=1, sort_keys=True) + "\n").encode(), sync_dir=True)
