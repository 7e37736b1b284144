"""``confide-server ledger``: check a contribution ledger offline (:mod:`confide_server.ledger`).

``verify --ledger FILE --server-key KEY`` checks every entry's hash, signature and link and
exits 1 naming the first bad entry; ``receipt --ledger FILE --receipt R [--server-key KEY]``
exits 0 when the receipt a site got back is recorded, 1 when not. Input that cannot be read
(files, key, receipt) raises :class:`~confide_server.ledger.LedgerFormatError`, which
``confide-server`` prints in one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confide_server.ledger import (
    LedgerFormatError,
    find_receipt,
    load_public_key,
    read_ledger,
    verify_ledger,
)

__all__ = ["build_ledger_parser", "main_ledger"]


def _read_receipt(value: str) -> dict[str, Any]:
    """Read a receipt: a JSON file or inline JSON (the receipt, or the whole upload answer)."""
    path = Path(value)
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerFormatError(
                f"--receipt must be a JSON file or inline JSON of the receipt the server "
                f"returned; cannot read {value!r}: {exc}"
            ) from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise LedgerFormatError(f"--receipt is not JSON ({exc})") from None
    if isinstance(doc, dict) and isinstance(doc.get("receipt"), dict):
        doc = doc["receipt"]  # the upload's whole answer: {"receipt": ..., "duplicate": ...}
    if not isinstance(doc, dict) or not {"receipt_id", "round", "stage"} <= set(doc):
        raise LedgerFormatError(
            "--receipt must be the receipt object the server returned for an upload "
            '({"receipt_id", "round", "stage", "client_id", "sha256", ...})'
        )
    return doc


def build_ledger_parser() -> argparse.ArgumentParser:
    """Build the ``confide-server ledger`` argument parser."""
    from confide.cli import HelpFormatter
    from confide_server.cli import version_string

    p = argparse.ArgumentParser(
        prog="confide-server ledger",
        description="Check a contribution ledger offline (<state>/ledger.jsonl): its chain "
        "and signatures (verify), or that a site's receipt is in it (receipt).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--version", action="version", version=version_string())
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = sub.add_parser(
        "verify",
        help="check every entry's hash, signature and link; exit 1 naming the first bad one",
        formatter_class=HelpFormatter,
    )
    v.add_argument("--version", action="version", version=version_string())
    v.add_argument("--ledger", required=True, type=Path, help="the ledger (ledger.jsonl)")
    v.add_argument(
        "--server-key",
        required=True,
        help="the server's public key: base64, or a file holding it (release_key.pub)",
    )
    r = sub.add_parser(
        "receipt",
        help="check that a receipt the server returned is recorded in the ledger",
        formatter_class=HelpFormatter,
    )
    r.add_argument("--version", action="version", version=version_string())
    r.add_argument("--ledger", required=True, type=Path, help="the ledger (ledger.jsonl)")
    r.add_argument("--receipt", required=True, help="the receipt: a JSON file, or the JSON itself")
    r.add_argument(
        "--server-key",
        help="verify the whole ledger with this key first (base64 or release_key.pub)",
    )
    return p


def main_ledger(argv: Sequence[str]) -> int:
    """``confide-server ledger``: 0 valid / receipt found, 1 invalid / not found, 2 bad input.

    Raises
    ------
    LedgerFormatError
        A file, key or receipt that cannot be read (the caller prints it and exits 2).
    """
    args = build_ledger_parser().parse_args(list(argv))
    key = None if args.server_key is None else load_public_key(args.server_key)
    receipt = _read_receipt(args.receipt) if args.action == "receipt" else None
    lines = read_ledger(args.ledger)
    if key is not None:
        result = verify_ledger(lines, key)
        if not result.ok:
            print(result.describe(), file=sys.stderr)
            return 1
        if receipt is None:
            print(result.describe())
            return 0
    if receipt is None:  # pragma: no cover - argparse requires --server-key for verify
        return 2
    entry = find_receipt(lines, receipt)
    what = (
        f"receipt {receipt.get('receipt_id')} of {receipt.get('client_id')!r} "
        f"(round {receipt.get('round')}, stage {receipt.get('stage')!r})"
    )
    if entry is None:
        print(f"{what} is NOT in the ledger", file=sys.stderr)
        return 1
    print(
        f"{what} is in the ledger: round {entry.get('round')}, model_version "
        f"{entry.get('model_version')}, model {entry.get('model_hash')}"
        + ("" if key is not None else " (ledger not verified: pass --server-key)")
    )
    return 0
