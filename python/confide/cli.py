"""The ``confide`` command: join a federation as one site, or export a model to ONNX.

``confide client`` takes part in a job; ``confide export`` writes a model (manifest plus
safetensors weights) as ONNX for on-device inference and checks it with onnxruntime.

Whole simulated federations (a server and several sites) are the server distribution's
``confide-server simulate``: the SDK never imports or starts the server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from confide.errors import ConfideError, ConfigError

if TYPE_CHECKING:
    from confide.client.secure import RngFactory
    from confide.protocol.manifest import Manifest
    from confide.protocol.tasks import Task
    from confide.training import SiteData

__all__ = ["build_parser", "main", "run_client"]


async def run_client(
    args: argparse.Namespace,
    *,
    on_task: Callable[[Task], None] | None = None,
    rng_factory: RngFactory | None = None,
) -> int:
    """Run ``confide client`` with parsed ``args``.

    ``on_task`` sees every task (monitoring); ``rng_factory`` replaces the OS-keyed protocol
    randomness. The ``confide`` command passes neither: they are for embedding and tests.
    """
    from confide.client import Client, client_ssl_context
    from confide.training import build_trainer

    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    ctx = client_ssl_context(args.ca_file, args.cert, args.key)
    client = Client(
        args.server,
        args.state,
        ssl_context=ctx,
        poll_wait=args.poll_wait,
        retry_timeout=args.retry_timeout,
        log=log,
        rng_factory=rng_factory,
    )
    async with client:
        # The manifest first: the engine and the data format follow from it, and bad local
        # data is reported before a one-time enrolment token is spent.
        manifest = await client.fetch_manifest()
        trainer = build_trainer(manifest, **({"device": args.device} if args.device else {}))
        train = load_site_data(manifest, args.data, args)
        test = load_site_data(manifest, args.test_data, args) if args.test_data else None
        if not client.enrolled:
            if not args.token or not args.client_id:
                print("not enrolled yet: pass --token and --client-id", file=sys.stderr)
                return 2
            await client.enroll(args.token, args.client_id)
        result = await client.run(trainer, train, test, on_task=on_task)
    return 0 if result.status == "finished" else 1


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
    from confide.data import load_csv

    return load_csv(path, args.label_column, args.patient_id_column)


def run_export(args: argparse.Namespace) -> int:
    """Run ``confide export``: build the model the manifest names, write and check ONNX."""
    from confide.export import export_onnx, verify_onnx
    from confide.protocol.manifest import Manifest, decode_tensors
    from confide.training import build_trainer

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


def build_parser() -> argparse.ArgumentParser:
    """Build the ``confide`` argument parser."""
    parser = argparse.ArgumentParser(prog="confide", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("client", help="join a federated job as one site")
    c.add_argument("--server", required=True, help="http(s)://host:port")
    c.add_argument("--token", help="one-time enrolment token (first run only)")
    c.add_argument("--client-id", help="id to enrol under (first run only)")
    c.add_argument(
        "--data",
        required=True,
        help="training data: a CSV table (label column + features) for numpy jobs, or a "
        "labels CSV of images (path,label,patient_id) for torch jobs",
    )
    c.add_argument("--test-data", help="evaluation data, same format (default: the training data)")
    c.add_argument(
        "--device",
        default=None,
        help="torch jobs: the device to train on (cpu, cuda, cuda:1; default cpu)",
    )
    c.add_argument("--label-column", default="label")
    c.add_argument(
        "--patient-id-column",
        default=None,
        help="column naming each row's patient (not a feature); required for patient-level "
        "DP when a patient has several rows",
    )
    c.add_argument("--state", default=".confide-client", help="identity and state folder")
    c.add_argument("--ca-file", help="CA bundle to verify the server (https)")
    c.add_argument("--cert", help="client certificate (mutual TLS)")
    c.add_argument("--key", help="client certificate key (mutual TLS)")
    c.add_argument("--poll-wait", type=float, default=20.0)
    c.add_argument("--retry-timeout", type=float, default=120.0)
    c.add_argument("--quiet", action="store_true")
    e = sub.add_parser("export", help="write a model as ONNX for on-device inference")
    e.add_argument("--manifest", required=True, help="the job's model.json")
    e.add_argument("--weights", required=True, help="a model version (.safetensors)")
    e.add_argument("--format", choices=["onnx"], default="onnx", help="output format")
    e.add_argument("--out", required=True, help="output file (e.g. model.onnx)")
    e.add_argument(
        "--atol",
        type=float,
        default=1e-5,
        help="largest allowed difference between onnxruntime and the model (default 1e-5)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``confide`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            return run_export(args)
        return asyncio.run(run_client(args))
    except (ConfideError, OSError, ValueError) as exc:
        print(f"confide {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
