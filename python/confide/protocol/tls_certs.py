"""TLS / mutual-TLS certificates from the consortium's provisioning (``confide provision tls``).

The consortium root (:mod:`confide.protocol.certs`) certifies the sites' Ed25519 identities
for the protocol; this module lets the same provisioner also run the X.509 CA the transport
uses, so the server's TLS certificate and the sites' mutual-TLS client certificates come from
the consortium and not from the server's operator. The CA is an ECDSA P-256 key (what every
TLS stack accepts), created on first use next to the root: ``tls-ca.pem`` (give it to the
server as ``[tls] client_ca`` and to the sites as ``--ca-file``) and ``tls-ca-key.pem``
(mode 0600, kept with ``root-key.pem``). Leaf certificates are ECDSA P-256 too:

* a **server** certificate (``--server-name``: DNS names or IP addresses, as
  subjectAltName; extended key usage serverAuth), for ``[tls] cert`` / ``key``;
* a **site** certificate (``--site-id``: the subject common name; clientAuth), for
  ``confide client --cert`` / ``--key``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from confide._fsio import write_atomic
from confide.errors import ConfigError
from confide.protocol.certs import ConsortiumRoot

__all__ = ["TLS_CA_FILE", "IssuedTls", "issue_tls"]

TLS_CA_FILE = "tls-ca.pem"
_TLS_CA_KEY = "tls-ca-key.pem"
_CA_YEARS = 10
_SITE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class IssuedTls:
    """Where :func:`issue_tls` wrote things: the CA certificate, the leaf and its key."""

    ca: Path
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(path, pem)


def _ca(root_dir: Path, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the consortium's TLS CA, creating it on first use."""
    consortium = ConsortiumRoot.load(root_dir / "root.json").consortium
    cert_path, key_path = root_dir / TLS_CA_FILE, root_dir / _TLS_CA_KEY
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except ValueError as exc:
            raise ConfigError(f"{root_dir}: the TLS CA files cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} does not hold an ECDSA key")
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{consortium} TLS CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365 * _CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _san(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            if not n or any(c.isspace() for c in n):
                raise ConfigError(f"--server-name must be a host name or IP, got {n!r}") from None
            out.append(x509.DNSName(n))
    return out


def issue_tls(
    root_dir: str | Path,
    out: str | Path,
    *,
    server_names: list[str] | None = None,
    site_id: str | None = None,
    days: int = 365,
) -> IssuedTls:
    """Issue a server or a site TLS certificate from the consortium's TLS CA.

    Parameters
    ----------
    root_dir : str or Path
        The folder ``confide provision init`` wrote (the CA is created there on first use).
    out : str or Path
        Folder for the leaf: ``server.pem`` / ``server-key.pem`` or ``<site_id>.pem`` /
        ``<site_id>-key.pem`` (key mode 0600), and a copy of ``tls-ca.pem``.
    server_names : list of str, optional
        A server certificate for these DNS names / IP addresses.
    site_id : str, optional
        A mutual-TLS client certificate for this site.
    days : int
        Validity of the leaf.

    Raises
    ------
    ConfigError
        Neither or both of ``server_names`` and ``site_id``, a bad name, or an unreadable root.
    """
    if (server_names is None) == (site_id is None):
        raise ConfigError("pass exactly one of --server-name (server) or --site-id (site)")
    if isinstance(days, bool) or not 1 <= days <= 3650:
        raise ConfigError(f"--days must be in [1, 3650], got {days!r}")
    root = Path(root_dir)
    now = dt.datetime.now(dt.timezone.utc)
    ca_cert, ca_key = _ca(root, now)
    key = ec.generate_private_key(ec.SECP256R1())
    if server_names is not None:
        if not server_names:
            raise ConfigError("--server-name needs at least one name")
        stem, cn = "server", server_names[0]
        usage = ExtendedKeyUsageOID.SERVER_AUTH
        san: list[x509.GeneralName] = _san(server_names)
    else:
        if site_id is None or not _SITE_ID.fullmatch(site_id):
            raise ConfigError(f"--site-id must be 1-64 of [A-Za-z0-9_.-], got {site_id!r}")
        stem, cn = site_id, site_id
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
        san = [x509.DNSName(site_id)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path, ca_copy = d / f"{stem}.pem", d / f"{stem}-key.pem", d / TLS_CA_FILE
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_copy.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return IssuedTls(ca_copy, cert_path, key_path)
