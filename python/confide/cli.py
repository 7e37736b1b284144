"""The ``confide`` command: join a federation as one site, write an initial model, export one.

``confide client`` takes part in a job; ``confide init-model`` writes the initial model of a
table job (``model.json`` and ``init.safetensors``); ``confide export`` writes a model
(manifest plus safetensors weights) as ONNX for on-device inference and checks it with
onnxruntime.

Whole simulated federations (a server and several sites) are the server distribution's
``confide-server simulate``: the SDK never imports or starts the server.

A user mistake (a missing file, a refused token, a column that is not a number, Ctrl-C) is
reported in one or two lines on stderr with a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from confide._fsio import write_atomic
from confide.errors import ConfideError, ConfigError, ServerError, TransportError
from confide.logs import add_log_options, setup_logging

if TYPE_CHECKING:
    from confide.client import SitePolicy
    from confide.client.secure import RngFactory
    from confide.protocol.manifest import Manifest
    from confide.protocol.tasks import Task
    from confide.training import SiteData

__all__ = [
    "HelpFormatter",
    "add_command",
    "build_parser",
    "check_scheme",
    "exit_status",
    "main",
    "run_client",
]

DESCRIPTION = """\
confide: join a federated-learning job as one site (client), write the initial model of a
table job (init-model), or export a model as ONNX (export). Run 'confide COMMAND --help'
for a command's options."""

#: Seconds the scheme probe waits to connect and for the first bytes of an answer.
_PROBE_TIMEOUT = 10.0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (``None``, a flag's off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str,
    version: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Add the subcommand ``name``: :class:`HelpFormatter` help and its own ``--version``.

    Every subcommand of ``confide`` and ``confide-server`` is made here, so each answers
    ``--version`` and shows option defaults the same way.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        What ``parser.add_subparsers()`` returned.
    name : str
        The subcommand.
    help : str
        Its line in the parent's ``--help``.
    version : str
        What its ``--version`` prints (``%(prog)s`` is expanded).
    description : str, optional
        Its own ``--help`` text (default: none).

    Returns
    -------
    argparse.ArgumentParser
        The subcommand's parser, for its own options.

    Examples
    --------
    >>> parser = argparse.ArgumentParser(prog="tool")
    >>> sub = parser.add_subparsers(dest="command")
    >>> run = add_command(sub, "run", help="run it", version="%(prog)s 1.0")
    >>> run.prog, run.formatter_class is HelpFormatter
    ('tool run', True)
    """
    p = sub.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=version)
    return p


def _version() -> str:
    from confide import __version__

    return f"%(prog)s {__version__}"


def check_ca_file(path: str, option: str = "--ca-file") -> None:
    """Refuse a CA bundle that does not exist or holds no PEM certificate.

    Raises
    ------
    ConfigError
        The message names the file and says what to pass instead.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{option} {path}: no such file; pass the CA certificate (PEM) that signed the "
            "server's certificate (ask the server's operator for it)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(
            f"{option} {path}: not a PEM certificate (no '-----BEGIN CERTIFICATE-----' "
            f"block); convert a DER file with 'openssl x509 -inform der -in {path} -out ca.pem'"
        )


def _check_readable(path: str | None, option: str) -> None:
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{option} {path}: no such file")


async def check_scheme(url: str, *, timeout: float = _PROBE_TIMEOUT) -> str | None:
    """Fail fast when ``url``'s scheme does not match what the server speaks.

    One plain-text ``HEAD`` request on a fresh TCP connection: a plain HTTP server answers
    ``HTTP/...``, a TLS server answers with an alert or closes the connection. A server that
    cannot be reached yet is left to the client's retry loop (it may be starting).

    Returns
    -------
    str or None
        Why the server could not be reached (connection refused, a timeout), or ``None``.

    Raises
    ------
    TransportError
        ``http://`` against a TLS server, or ``https://`` against a plain HTTP server; the
        message names the URL and the one to use.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        return "connection refused: is confide-server running on that port?"
    except socket.gaierror:
        return f"unknown host {host!r}"
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        writer.write(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        first = await asyncio.wait_for(reader.read(5), timeout)
    except asyncio.TimeoutError:
        return None
    except OSError:
        first = b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    plain = first.startswith(b"HTTP/")
    if parts.scheme == "http" and not plain:
        raise TransportError(
            f"{url} does not answer plain HTTP; the server probably uses TLS: pass "
            f"--server https://{parts.netloc} with --ca-file"
        )
    if parts.scheme == "https" and plain:
        raise TransportError(
            f"{url} answers plain HTTP, not TLS: pass --server http://{parts.netloc}, or ask "
            "the operator to set [tls] cert and key in the job config"
        )
    return None


async def run_client(
    args: argparse.Namespace,
    *,
    on_task: Callable[[Task], None] | None = None,
    rng_factory: RngFactory | None = None,
    policy: SitePolicy | None = None,
) -> int:
    """Run ``confide client`` with parsed ``args``.

    ``on_task`` sees every task (monitoring); ``rng_factory`` replaces the OS-keyed protocol
    randomness; ``policy`` is used when ``args.policy`` names no file (default: the strict
    ``SitePolicy()``). The ``confide`` command passes none of them: they are for embedding
    and tests.
    """
    from confide.client import Client, client_ssl_context
    from confide.client import SitePolicy as _SitePolicy
    from confide.training import build_trainer

    setup_logging(args.log_level, args.log_file, args.log_format, stderr=False)
    site_log = logging.getLogger("confide.client")

    def log(line: str) -> None:
        # stdout as before (unless --quiet); the log file gets the same lines.
        if not args.quiet:
            print(line, flush=True)
        site_log.info(line)

    if args.ca_file is not None:
        check_ca_file(args.ca_file)
    _check_readable(args.cert, "--cert")
    _check_readable(args.key, "--key")
    for data in (args.data, args.test_data):
        _check_readable(data, "--data" if data == args.data else "--test-data")
    if not args.server.startswith(("http://", "https://")):
        raise ConfigError(f"--server must start with http:// or https://, got {args.server!r}")
    unreachable = await check_scheme(args.server)
    if unreachable is not None:
        log(
            f"{args.server} cannot be reached yet ({unreachable}); retrying for up to "
            f"{args.retry_timeout:g} s (--retry-timeout)"
        )
    if args.policy is not None:
        policy = _SitePolicy.load(args.policy)
    token = _enrolment_token(args)
    ctx = client_ssl_context(args.ca_file, args.cert, args.key)
    client = Client(
        args.server,
        args.state,
        ssl_context=ctx,
        poll_wait=args.poll_wait,
        retry_timeout=args.retry_timeout,
        log=log,
        rng_factory=rng_factory,
        policy=policy,
    )
    async with client:
        # The manifest first: the engine and the data format follow from it, and bad local
        # data is reported before a one-time enrolment token is spent.
        manifest = await client.fetch_manifest()
        trainer = build_trainer(manifest, **({"device": args.device} if args.device else {}))
        train = load_site_data(manifest, args.data, args)
        test = load_site_data(manifest, args.test_data, args) if args.test_data else None
        if not client.enrolled:
            if not token or not args.client_id:
                print(
                    "not enrolled yet: pass --token-file (or CONFIDE_TOKEN) and --client-id",
                    file=sys.stderr,
                )
                return 2
            try:
                await client.enroll(token, args.client_id)
            except ServerError as exc:
                if exc.code == "bad_token":
                    raise ConfigError(
                        "the server refused the enrolment token (unknown or already used): ask "
                        "the job's operator for a new one ('confide-server enroll --config "
                        "job.toml' prints it)"
                    ) from None
                raise
        result = await client.run(trainer, train, test, on_task=on_task)
    return 0 if result.status == "finished" else 1


def _enrolment_token(args: argparse.Namespace) -> str | None:
    """Return the enrolment token: ``--token-file``, else ``CONFIDE_TOKEN``, else ``--token``."""
    if args.token_file is not None:
        _check_readable(args.token_file, "--token-file")
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise ConfigError(f"--token-file {args.token_file}: the file is empty")
        return token
    env = os.environ.get("CONFIDE_TOKEN", "").strip()
    if env:
        return env
    given: str | None = args.token
    return given


def load_site_data(manifest: Manifest, path: str, args: argparse.Namespace) -> SiteData:
    """Load a site's data in the format the job's engine trains on.

    A numpy job reads a table (``--label-column``, ``--patient-id-column``); a torch job
    reads a labels CSV of images (``path,label,patient_id``), resized and normalised to the
    manifest's ``input_shape``. Class names come from the manifest's ``classes`` when it
    has them; otherwise labels must be the class indices ``0 .. num_classes - 1``.
    """
    spec = manifest.spec
    if spec.get("engine") == "torch":
        from confide.data.images import ImageDataset, ImageTransform

        channels, height, width = (int(v) for v in spec["input_shape"])
        classes = spec.get("classes") or [str(i) for i in range(int(spec["num_classes"]))]
        transform = ImageTransform(size=(height, width), channels=channels)
        return ImageDataset.from_csv(path, classes=[str(c) for c in classes], transform=transform)
    from confide.data import check_feature_names, load_csv

    table = load_csv(path, args.label_column, args.patient_id_column)
    expected = spec.get("feature_names")
    if expected is not None:
        check_feature_names(table, [str(n) for n in expected], path)
    warn_id_like(table, path, args.patient_id_column)
    return table


def warn_id_like(table: SiteData, path: str | Path, patient_id_column: str | None) -> None:
    """Print a warning (stderr) for each feature column that looks like an identifier."""
    from confide.data import Dataset, id_like_columns

    if not isinstance(table, Dataset):
        return
    for name in id_like_columns(table):
        hint = (
            f"pass --patient-id-column {name} if it names the patient"
            if patient_id_column is None
            else "remove it if it identifies a person or a record"
        )
        print(
            f"warning: {path}: column {name!r} looks like an identifier but is used as a "
            f"feature; {hint} (without a patient id column every row is its own patient for "
            "differential privacy)",
            file=sys.stderr,
        )


def run_export(args: argparse.Namespace) -> int:
    """Run ``confide export``: build the model the manifest names, write and check ONNX."""
    from confide.export import export_onnx, verify_onnx
    from confide.protocol.manifest import Manifest, decode_tensors
    from confide.training import build_trainer

    _check_readable(args.manifest, "--manifest")
    manifest = Manifest.load(args.manifest)
    trainer = build_trainer(manifest)
    try:
        data = Path(args.weights).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read weights file {args.weights!r}: {exc.strerror}") from None
    weights, _ = decode_tensors(manifest, data)
    trainer.set_weights(weights)
    out = export_onnx(trainer, args.out)
    worst = verify_onnx(trainer, out, atol=args.atol)
    print(
        f"wrote {out} ({manifest.spec.get('engine')} model, {manifest.size} parameters); "
        f"onnxruntime agrees with the model to {worst:.2e} (tolerance {args.atol:g})"
    )
    return 0


def run_init_model(args: argparse.Namespace) -> int:
    """Run ``confide init-model``: write ``model.json`` and ``init.safetensors`` to ``--out``.

    With ``--from-csv`` the feature count, the feature names (recorded in the manifest, so a
    site with other columns is refused) and the number of classes come from the table.
    """
    from confide.data import load_csv
    from confide.protocol.manifest import Manifest, encode_tensors
    from confide.training import NumpyTrainer

    names: list[str] | None = None
    classes = args.classes
    if args.from_csv is not None:
        _check_readable(args.from_csv, "--from-csv")
        table = load_csv(args.from_csv, args.label_column, args.patient_id_column)
        warn_id_like(table, args.from_csv, args.patient_id_column)
        names = list(table.feature_names)
        features = table.n_features
        if classes is None:
            classes = max(2, int(table.y.max()) + 1) if len(table) else 2
    elif args.features is not None:
        features = args.features
    else:
        raise ConfigError("pass --features N or --from-csv FILE (the table the sites hold)")
    if features < 1:
        raise ConfigError(f"--features must be >= 1, got {features}")
    classes = 2 if classes is None else classes
    if classes < 2:
        raise ConfigError(f"--classes must be >= 2, got {classes}")
    if args.arch == "mlp":
        kind, hidden = "mlp", tuple(args.hidden)
    else:
        kind, hidden = ("logistic" if classes == 2 else "softmax"), ()
    trainer = NumpyTrainer.create(kind, features, classes, hidden, seed=args.seed)
    manifest = trainer.manifest
    if names is not None:
        manifest = Manifest(manifest.tensors, {**manifest.spec, "feature_names": names})
    out = Path(args.out)
    targets = [out / "model.json", out / "init.safetensors"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.force:
        raise ConfigError(f"{', '.join(existing)} already exist; pass --force to replace them")
    out.mkdir(parents=True, exist_ok=True)
    manifest.save(targets[0])
    targets[1].write_bytes(encode_tensors(manifest, trainer.get_weights()))
    what = f"{kind} model, {features} features, {classes} classes, {manifest.size} parameters"
    print(f"wrote {targets[0]} and {targets[1]} ({what})")
    print('name them in job.toml: [model] manifest = "model.json", weights = "init.safetensors"')
    return 0


def run_identity(args: argparse.Namespace) -> int:
    """``confide identity``: print this site's identity public key (creating it if missing)."""
    from confide.protocol.certs import load_or_create_identity

    ident = load_or_create_identity(args.state)
    print(ident.public_key_b64)
    return 0


def run_provision(args: argparse.Namespace) -> int:
    """``confide provision init|sign|tls|revoke``: the consortium root and its certificates."""
    from confide.protocol.certs import init_root, sign_certificate

    if args.provision_command == "tls":
        from confide.protocol.tls_certs import issue_tls

        issued = issue_tls(
            args.root,
            args.out,
            server_names=args.server_name,
            site_id=args.site_id,
            days=args.days,
        )
        print(f"wrote {issued.cert} and {issued.key} (0600), CA {issued.ca}")
        return 0
    if args.provision_command == "revoke":
        return _run_revoke(args)
    if args.provision_command == "init":
        root = init_root(args.out, args.name)
        out = Path(args.out)
        print(
            f"consortium {root.consortium!r}: wrote {out / 'root-key.pem'} (secret: keep it "
            f"offline) and {out / 'root.json'} (give it to every site with its policy)"
        )
        return 0
    raw = _identity_key(args.identity)
    cert = sign_certificate(args.root, args.site_id, raw, args.not_after)
    out = Path(args.out)
    write_atomic(out, (json.dumps(cert.to_json(), indent=1) + "\n").encode(), mode=0o644)
    print(
        f"wrote {out}: {cert.site_id!r} certified by {cert.consortium!r}; the site puts it in "
        "its state folder as certificate.json before it enrols"
    )
    return 0


def _identity_key(text: str) -> bytes:
    """Decode ``--identity`` (the base64 key, or a file holding it)."""
    import base64
    import binascii

    value = text
    if Path(text).is_file():
        value = Path(text).read_text().strip()
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            "--identity must be the base64 key `confide identity` prints (or a file holding "
            f"it), got {text!r}"
        ) from None


def _run_revoke(args: argparse.Namespace) -> int:
    """``confide provision revoke``: issue the next revocation list."""
    from confide.protocol.certs import RevocationList, SiteCertificate, revoke

    key: bytes | None = None
    if args.identity is not None:
        key = _identity_key(args.identity)
    if args.cert is not None:
        cert = SiteCertificate.load(args.cert)
        if cert.site_id != args.site_id:
            raise ConfigError(
                f"--cert {args.cert} is for {cert.site_id!r}, not for --site-id {args.site_id!r}"
            )
        key = cert.identity_key
    out = Path(args.out)
    previous = RevocationList.load(out) if out.exists() else None
    lst = revoke(args.root, args.site_id, identity_key=key, reason=args.reason, previous=previous)
    write_atomic(out, (json.dumps(lst.to_json(), indent=1) + "\n").encode(), mode=0o644)
    what = "every certificate of" if key is None else "the certificate of this key for"
    print(
        f"wrote {out}: version {lst.version}, {len(lst.revoked)} revoked ({what} "
        f"{args.site_id!r}); give it to every site (its policy's revocation_list) and to "
        "the server ([server] revocation_list)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``confide`` argument parser."""
    version = _version()
    parser = argparse.ArgumentParser(prog="confide", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = add_command(
        sub,
        "client",
        help="join a federated job as one site",
        description="Join a federated job as one site: enrol once with a one-time token, then "
        "train and evaluate on local data until the job ends. Data never leaves this machine.",
        version=version,
    )
    c.add_argument("--server", required=True, help="the job's server, http(s)://host:port")
    c.add_argument(
        "--token-file",
        help="file holding the one-time enrolment token from the operator (first run only); "
        "or set CONFIDE_TOKEN. Prefer either to --token, which other users see in 'ps'",
    )
    c.add_argument(
        "--token",
        help="the enrolment token on the command line (visible in 'ps': see --token-file)",
    )
    c.add_argument(
        "--policy",
        help="this site's policy (site-policy.toml: docs/security.md); without it the strict "
        "default: secure aggregation and differential privacy (epsilon <= 10) required",
    )
    c.add_argument("--client-id", help="id to enrol under, e.g. hospital-1 (first run only)")
    c.add_argument(
        "--data",
        required=True,
        help="training data: a CSV table (label column + numeric features) for table jobs, or "
        "a labels CSV of images (path,label,patient_id) for image jobs",
    )
    c.add_argument("--test-data", help="evaluation data, same format (default: the training data)")
    c.add_argument(
        "--device",
        default=None,
        help="image (torch) jobs: the device to train on: cpu, cuda, cuda:1 (default: cpu)",
    )
    c.add_argument("--label-column", default="label", help="the CSV column holding the label")
    c.add_argument(
        "--patient-id-column",
        default=None,
        help="CSV column naming each row's patient (not a feature); needed for patient-level "
        "differential privacy when a patient has several rows",
    )
    c.add_argument(
        "--state", default=".confide-client", help="folder for this site's identity and state"
    )
    c.add_argument(
        "--ca-file", help="CA certificate (PEM) the server's certificate chains to (https)"
    )
    c.add_argument("--cert", help="this site's certificate (PEM), for mutual TLS")
    c.add_argument("--key", help="this site's certificate key (PEM), for mutual TLS")
    c.add_argument(
        "--poll-wait", type=float, default=20.0, help="seconds one long-poll for work may wait"
    )
    c.add_argument(
        "--retry-timeout",
        type=float,
        default=120.0,
        help="seconds to keep retrying an unreachable or busy server before giving up",
    )
    c.add_argument("--quiet", action="store_true", help="print nothing but errors")
    add_log_options(c)
    i = add_command(
        sub,
        "init-model",
        help="write the initial model of a table job (model.json + init.safetensors)",
        description="Write the initial model of a table job: model.json (the manifest) and "
        "init.safetensors (Glorot-uniform weights, zero biases), for [model] in job.toml. "
        "With --from-csv the feature names are recorded, so sites whose columns differ are "
        "refused before they enrol.",
        version=version,
    )
    i.add_argument(
        "--arch",
        choices=["logreg", "mlp"],
        default="logreg",
        help="logistic (2 classes) or softmax regression, or a multi-layer perceptron",
    )
    src = i.add_mutually_exclusive_group()
    src.add_argument("--features", type=int, help="number of feature columns")
    src.add_argument(
        "--from-csv", help="a CSV table like the sites': features, names and classes from it"
    )
    i.add_argument("--label-column", default="label", help="with --from-csv: the label column")
    i.add_argument(
        "--patient-id-column", default=None, help="with --from-csv: the patient id column"
    )
    i.add_argument(
        "--classes",
        type=int,
        default=None,
        help="number of classes (default: 2, or the table's largest label + 1)",
    )
    i.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[16],
        help="mlp: hidden layer widths",
    )
    i.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    i.add_argument("--out", required=True, help="output folder (created)")
    i.add_argument("--force", action="store_true", help="replace an existing model there")
    d = add_command(
        sub,
        "identity",
        help="print this site's identity public key (to have it certified)",
        description="Print the site's Ed25519 identity public key (base64), creating the key "
        "(identity.pem, mode 0600) in the state folder if it is missing. The consortium's "
        "provisioner signs it with `confide provision sign`.",
        version=version,
    )
    d.add_argument("--state", required=True, help="the site's state folder (as for client)")
    pv = add_command(
        sub,
        "provision",
        help="create a consortium root and certify site identities",
        description="Consortium provisioning: `init` creates the root that sites trust, "
        "`sign` certifies one site's identity key for its client id, `tls` issues TLS "
        "certificates, `revoke` signs the next revocation list (docs/security.md).",
        version=version,
    )
    psub = pv.add_subparsers(dest="provision_command", required=True, metavar="STEP")
    pi = add_command(psub, "init", help="create a consortium root", version=version)
    pi.add_argument("--out", required=True, help="folder for root-key.pem and root.json")
    pi.add_argument("--name", required=True, help="the consortium's name ([A-Za-z0-9_.-])")
    ps = add_command(psub, "sign", help="certify one site's identity", version=version)
    ps.add_argument("--root", required=True, help="the folder `provision init` wrote")
    ps.add_argument("--site-id", required=True, help="the client id the site enrols with")
    ps.add_argument(
        "--identity",
        required=True,
        help="the site's public key from `confide identity` (base64, or a file holding it)",
    )
    ps.add_argument("--out", required=True, help="the certificate to write (JSON)")
    ps.add_argument(
        "--not-after", type=int, default=None, help="expiry in Unix seconds (default: none)"
    )
    pr = add_command(
        psub,
        "revoke",
        help="revoke a site's certificate (the next signed revocation list)",
        description="Add a site to the consortium's revocation list and sign the next version "
        "of it with the root. --out is read first when it exists (the list issued last: its "
        "entries are kept, its version + 1 is written). Without --identity or --cert every "
        "certificate of the site id is revoked.",
        version=version,
    )
    pr.add_argument("--root", required=True, help="the folder `provision init` wrote")
    pr.add_argument("--site-id", required=True, help="the client id to revoke")
    rkey = pr.add_mutually_exclusive_group()
    rkey.add_argument(
        "--identity",
        default=None,
        help="revoke only this identity key (base64, or a file holding it)",
    )
    rkey.add_argument("--cert", default=None, help="revoke only this certificate.json's key")
    pr.add_argument("--reason", default="", help="free text kept in the list")
    pr.add_argument("--out", required=True, help="the revocation list (revoked.json)")
    pt = add_command(
        psub,
        "tls",
        help="issue a TLS server or mTLS site certificate from the consortium's CA",
        description="Issue a TLS certificate from the consortium's X.509 CA (created in "
        "--root on first use as tls-ca.pem): a server certificate (--server-name) for "
        "[tls] cert/key, or a site certificate (--site-id) for confide client --cert/--key.",
        version=version,
    )
    pt.add_argument("--root", required=True, help="the folder `provision init` wrote")
    pt.add_argument("--out", required=True, help="folder for the certificate and its key")
    who = pt.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--server-name",
        action="append",
        default=None,
        help="a DNS name or IP address of the server (repeat for several)",
    )
    who.add_argument("--site-id", default=None, help="the site's client id (mutual TLS)")
    pt.add_argument("--days", type=int, default=365, help="validity of the certificate")
    e = add_command(
        sub,
        "export",
        help="write a model as ONNX for on-device inference",
        description="Write a model version as ONNX and check it against onnxruntime.",
        version=version,
    )
    e.add_argument("--manifest", required=True, help="the job's model.json")
    e.add_argument("--weights", required=True, help="a model version (.safetensors)")
    e.add_argument("--format", choices=["onnx"], default="onnx", help="output format")
    e.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    e.add_argument(
        "--atol",
        type=float,
        default=1e-5,
        help="largest allowed difference between onnxruntime and the model",
    )
    return parser


#: Import names of optional dependencies and the extra that installs each (README "Install").
OPTIONAL_PACKAGES = {
    "sklearn": "confide-server[demo]",
    "matplotlib": "confide-server[demo]",
    "dp_accounting": "confide[privacy]",
    "torch": "confide[torch]",
    "onnx": "confide[export]",
    "onnxscript": "confide[export]",
    "onnxruntime": "confide[onnx]",
    "ai_edge_litert": "confide[litert]",
    "PIL": "confide[images]",
    "pydicom": "confide[dicom]",
    "skimage": "confide[lesions]",
}


def missing_package(exc: ModuleNotFoundError) -> str:
    """One line naming a missing optional package and the extra that installs it."""
    extra = OPTIONAL_PACKAGES.get((exc.name or "").split(".")[0])
    hint = f"pip install '{extra}'" if extra else "see the README's Install section"
    return f"the Python package {exc.name!r} is not installed: {hint}"


def describe_error(exc: BaseException) -> str:
    """One line for a user mistake: what went wrong, naming the file, column or option."""
    if isinstance(exc, ConfideError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def exit_status(prog: str, exc: BaseException) -> int:
    """Report ``exc`` on stderr as ``prog: <one line>`` and return the command's exit status.

    The convention of ``confide`` and ``confide-server``: Ctrl-C is ``130``; a reader that
    went away (``| head``) is ``1`` and nothing more is written to the closed stdout; a
    missing optional package (named with the extra that installs it) and any other user
    mistake (:func:`describe_error`) are ``2``.

    Examples
    --------
    >>> import contextlib, io
    >>> with contextlib.redirect_stderr(io.StringIO()) as err:
    ...     exit_status("tool", ConfigError("bad option"))
    2
    >>> err.getvalue().strip()
    'tool: bad option'
    """
    if isinstance(exc, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if isinstance(exc, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    what = missing_package(exc) if isinstance(exc, ModuleNotFoundError) else describe_error(exc)
    print(f"{prog}: {what}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``confide`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    prog = f"confide {args.command}"
    try:
        if args.command == "export":
            rc = run_export(args)
        elif args.command == "init-model":
            rc = run_init_model(args)
        elif args.command == "identity":
            rc = run_identity(args)
        elif args.command == "provision":
            rc = run_provision(args)
        else:
            rc = asyncio.run(run_client(args))
        sys.stdout.flush()
        return rc
    except (KeyboardInterrupt, ModuleNotFoundError, ConfideError, OSError, ValueError) as exc:
        return exit_status(prog, exc)
