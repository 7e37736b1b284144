r"""The contribution ledger: one signed, hash-chained entry per committed round.

For every committed round the engine writes, in the very transaction that commits the
round (:meth:`confide_server.engine.rounds.RoundEngine._commit`), one entry::

    {"format": "confide-ledger/1", "job", "job_id", "round", "model_version",
     "model_hash", "base_model", "prev_entry_hash", "cohort", "survivors",
     "receipts": {stage: [receipt hash, ...]}, "strategy": {"name", "params"},
     "dp": {... , "epsilon", "epsilon_round"} | null, "secagg": {...} | null,
     "committed_at"}

``model_version`` is the number of committed rounds (1, 2, ...), ``model_hash`` the SHA-256
of the new model version, ``prev_entry_hash`` the ``entry_hash`` of the previous entry (64
zeros for the first), and each receipt hash is :func:`receipt_hash` of the receipt a site
got back for an accepted submission. Under SecAgg+ an entry records membership (who was in
the cohort, who survived, which receipts were issued), never contents: no update, no
masked vector, no share, only ids and hashes of receipts.

An entry is stored as its canonical JSON (:func:`canonical`: sorted keys, no spaces, ASCII,
no NaN); ``entry_hash`` is the SHA-256 of those bytes and ``signature`` the Ed25519
signature of ``b"confide-ledger/1\n" + bytes`` by the server's key (the release key,
:func:`confide_server.engine.releases.load_or_create_release_key`, domain-separated from
release records). The SQLite database is the source of truth; ``<state>/ledger.jsonl`` is
its export (one ``{"entry", "entry_hash", "signature"}`` object a line), rewritten after
every commit and at start-up, so a crash between the commit and the export is repaired on
restart.

Offline checks (``confide-server ledger verify`` and ``confide-server ledger receipt``,
:mod:`confide_server.ledger_cli`):
:func:`verify_ledger` checks every hash, signature and link of the chain and names the
first bad entry; :func:`find_receipt` tells a site whether its receipt is in a (verified)
ledger. The chain cannot reveal a ledger cut short *at the end*: compare its last
``model_version`` with the job status (``rounds_completed``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from confide._fsio import append_durably, write_atomic
from confide.errors import ConfigError, SignatureError
from confide.protocol.signing import Identity, decode_public_key

if TYPE_CHECKING:
    from confide_server.config import Config
    from confide_server.store import RoundRow, Store

log = logging.getLogger("confide_server")

__all__ = [
    "DOMAIN",
    "FORMAT",
    "GENESIS",
    "LEDGER_FILE",
    "LedgerFormatError",
    "LedgerSigner",
    "VerifyResult",
    "append_export",
    "canonical",
    "entry_fields",
    "entry_hash",
    "find_receipt",
    "json_safe",
    "load_public_key",
    "read_ledger",
    "receipt_hash",
    "sign_entry",
    "verify_ledger",
    "write_export",
]

FORMAT = "confide-ledger/1"
#: What the server's key signs: this prefix, then the entry's canonical bytes.
DOMAIN = b"confide-ledger/1\n"
#: ``prev_entry_hash`` of the first entry.
GENESIS = "0" * 64
#: The export's file name in the state folder.
LEDGER_FILE = "ledger.jsonl"
_LINE_KEYS = {"entry", "entry_hash", "signature"}


class LedgerFormatError(ConfigError):
    """A ledger file, key or receipt given to the ledger commands cannot be read at all.

    (A ledger that reads but does not verify is not an error: :func:`verify_ledger` says
    which entry is bad.)
    """

    code = "bad_ledger_input"


def canonical(obj: Any) -> bytes:
    """Return the canonical JSON bytes of ``obj`` (sorted keys, no spaces, ASCII).

    Examples
    --------
    >>> canonical({"b": 1, "a": [1.5, "x"]})
    b'{"a":[1.5,"x"],"b":1}'
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def json_safe(value: Any) -> Any:
    """Return ``value`` with paths as strings and non-finite floats as ``None`` (for entries).

    Examples
    --------
    >>> json_safe({"a": float("inf"), "b": (1, Path("x"))})
    {'a': None, 'b': [1, 'x']}
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def receipt_hash(receipt: Mapping[str, Any]) -> str:
    """Return the hex SHA-256 of a receipt's canonical JSON (what the ledger records).

    Examples
    --------
    >>> receipt_hash({"receipt_id": "ab", "round": 1})[:16]
    'f4749b8000a2121d'
    """
    return hashlib.sha256(canonical(dict(receipt))).hexdigest()


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Return the hex SHA-256 of an entry's canonical JSON."""
    return hashlib.sha256(canonical(dict(entry))).hexdigest()


def sign_entry(entry: Mapping[str, Any], key: Identity) -> dict[str, Any]:
    """Return the stored form of ``entry``: ``{"entry", "entry_hash", "signature"}``.

    Parameters
    ----------
    entry : mapping
        The entry (JSON values only).
    key : Identity
        The server's Ed25519 key.
    """
    data = canonical(dict(entry))
    return {
        "entry": dict(entry),
        "entry_hash": hashlib.sha256(data).hexdigest(),
        "signature": base64.b64encode(key.sign(DOMAIN + data)).decode(),
    }


class LedgerSigner:
    """The engine's side: the server key, loaded on first use from the state folder.

    Parameters
    ----------
    state_dir : Path
        The server's state folder (its release key signs the entries).
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._key: Identity | None = None
        #: The newest round this process wrote to ``ledger.jsonl`` (``None``: not yet, so
        #: the first export rewrites the file whole; later ones append the new entries).
        self.exported_round: int | None = None

    @property
    def key(self) -> Identity:
        """The server's Ed25519 key (created with the state folder's release key)."""
        if self._key is None:
            from confide_server.engine.releases import load_or_create_release_key

            self._key = load_or_create_release_key(self.state_dir)
        return self._key

    def sign(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Sign one entry (see :func:`sign_entry`)."""
        return sign_entry(entry, self.key)

    @property
    def export_path(self) -> Path:
        """``<state>/ledger.jsonl``."""
        return self.state_dir / LEDGER_FILE


def write_export(path: Path, lines: Sequence[Mapping[str, Any]]) -> None:
    """Write the JSON Lines export atomically (temporary file, fsync, rename).

    Parameters
    ----------
    path : Path
        Destination (``<state>/ledger.jsonl``).
    lines : sequence of mapping
        Stored entries, oldest first.
    """
    write_atomic(path, b"".join(canonical(dict(line)) + b"\n" for line in lines))


def append_export(path: Path, lines: Sequence[Mapping[str, Any]]) -> None:
    """Append entries to the JSON Lines export and fsync it (a round's commit: O(1)).

    A crash mid-append can leave a cut last line; the next process's first export
    rewrites the file whole (:func:`write_export`), and the database is the record.
    """
    append_durably(path, b"".join(canonical(dict(line)) + b"\n" for line in lines))


def entry_fields(
    config: Config,
    store: Store,
    cur: RoundRow,
    stages: Sequence[str],
    secagg_summary: Mapping[str, Any] | None,
    now: float,
) -> dict[str, Any]:
    """Collect a committing round's entry, less ``model_version`` and ``prev_entry_hash``.

    Those two are set inside the commit transaction (they depend on what it commits).
    Under SecAgg+ the survivors are the protocol's (whose masked updates entered the sum)
    and only receipt hashes are recorded; without it, the sites whose updates were
    accepted in ``train``.

    Parameters
    ----------
    config : Config
        The job configuration (strategy, privacy and SecAgg+ parameters).
    store : Store
        The job's database (submissions, privacy records).
    cur : RoundRow
        The round being committed (its ``new_model`` is set).
    stages : sequence of str
        The round's stage names, in order.
    secagg_summary : mapping or None
        The SecAgg+ round's public summary (``survivors``, ``n``, ``k``, ``t``,
        ``modulus_bits``), ``None`` for a plain round.
    now : float
        The commit time (Unix seconds).
    """
    from confide_server.engine.privacy import read_privacy_range

    receipts = {
        stage: sorted(receipt_hash(s.receipt) for s in store.submissions(cur.round, stage))
        for stage in stages
    }
    if secagg_summary is not None:
        survivors = sorted(str(c) for c in secagg_summary.get("survivors", ()))
        secagg: dict[str, Any] | None = {
            **{k: secagg_summary.get(k) for k in ("n", "k", "t", "modulus_bits")},
            "quant_bits": config.secagg.quant_bits,
            "clip_range": config.secagg.clip_range,
            "adversarial_fraction": config.secagg.adversarial_fraction,
            "dropout_fraction": config.secagg.dropout_fraction,
            "consistency_check": config.secagg.consistency_check,
        }
    else:
        survivors = sorted(s.client_id for s in store.submissions(cur.round, "train"))
        secagg = None
    # This round's record and the job summary only: a commit never reads the whole history.
    summary, per_round = read_privacy_range(store, cur.round, cur.round)
    dp: dict[str, Any] | None = None
    if summary is not None:
        spent = per_round.get(cur.round, {})
        dp = {
            **{k: v for k, v in summary.items() if k != "epsilon"},
            "epsilon": spent.get("epsilon", summary.get("epsilon")),
            "epsilon_round": spent.get("epsilon_round"),
        }
    st = config.strategy
    fields: dict[str, Any] = json_safe(
        {
            "format": FORMAT,
            "job": config.job.name,
            "job_id": store.get_meta("job_id"),
            "round": cur.round,
            "model_hash": cur.new_model,
            "base_model": cur.base_model,
            "cohort": sorted(cur.cohort),
            "survivors": survivors,
            "receipts": receipts,
            "strategy": {
                "name": st.name,
                "params": {
                    "epochs": st.epochs,
                    "batch_size": st.batch_size,
                    "learning_rate": st.learning_rate,
                    "server_learning_rate": st.server_learning_rate,
                    **dict(st.options),
                },
            },
            "dp": dp,
            "secagg": secagg,
            "committed_at": now,
        }
    )
    return fields


# -- offline checks ------------------------------------------------------------------------
def load_public_key(value: str) -> Ed25519PublicKey:
    """Read the server's public key: base64 text, or a file holding it (``release_key.pub``).

    Raises
    ------
    LedgerFormatError
        Neither a readable file nor a base64 32-byte Ed25519 key.
    """
    text = value.strip()
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerFormatError(f"cannot read server key file {path}: {exc}") from None
    try:
        return decode_public_key(text)
    except SignatureError as exc:
        raise LedgerFormatError(
            f"--server-key must be the server's base64 Ed25519 public key or a file holding "
            f"it (<state>/release_key.pub, or GET /v1/releases/key): {exc}"
        ) from None


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """Read a JSON Lines ledger export.

    Raises
    ------
    LedgerFormatError
        The file cannot be read, is empty, or a line is not an object with ``entry``,
        ``entry_hash`` and ``signature``.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LedgerFormatError(f"cannot read ledger {path}: {exc.strerror or exc}") from None
    lines: list[dict[str, Any]] = []
    for n, text in enumerate(raw.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise LedgerFormatError(
                f"{path} line {n} is not JSON ({exc}); expected one "
                '{"entry", "entry_hash", "signature"} object a line (<state>/ledger.jsonl)'
            ) from None
        if (
            not isinstance(doc, dict)
            or set(doc) != _LINE_KEYS
            or not isinstance(doc["entry"], dict)
        ):
            raise LedgerFormatError(
                f"{path} line {n} is not a ledger entry; expected exactly the keys "
                f"{sorted(_LINE_KEYS)} with an object as entry"
            )
        lines.append(doc)
    if not lines:
        raise LedgerFormatError(f"{path} holds no ledger entries")
    return lines


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify_ledger`.

    ``bad_index`` is the 0-based line of the first bad entry (``None`` when all verify),
    ``bad_round`` that line's ``round`` field if it has one, ``reason`` what is wrong.
    """

    ok: bool
    entries: int
    bad_index: int | None = None
    bad_round: Any = None
    reason: str = ""

    def describe(self) -> str:
        """One line for the command line."""
        if self.ok:
            return f"ledger OK: {self.entries} entries, chain and signatures verify"
        return (
            f"ledger INVALID at entry {self.bad_index} (line {(self.bad_index or 0) + 1}, "
            f"round {self.bad_round}): {self.reason}"
        )


def verify_ledger(lines: Sequence[Mapping[str, Any]], public_key: Ed25519PublicKey) -> VerifyResult:
    """Check hashes, signatures and the chain of a ledger; stop at the first bad entry.

    Each entry must hash to its ``entry_hash``, carry a valid signature by ``public_key``,
    name the previous entry's hash (:data:`GENESIS` first), have ``model_version`` one more
    than the previous and a strictly larger ``round``, and build on the previous entry's
    model (``base_model``). So an edited, reordered, removed or inserted entry, or a ledger
    signed by another key, fails; only a ledger cut short at the end still verifies.

    Parameters
    ----------
    lines : sequence of mapping
        Stored entries (:func:`read_ledger`).
    public_key : Ed25519PublicKey
        The server's key.
    """
    prev_hash = GENESIS
    prev: Mapping[str, Any] | None = None
    for i, line in enumerate(lines):
        entry = line.get("entry")
        rnd = entry.get("round") if isinstance(entry, Mapping) else None

        def bad(reason: str, i: int = i, rnd: Any = rnd) -> VerifyResult:
            return VerifyResult(False, len(lines), i, rnd, reason)

        if not isinstance(entry, Mapping) or entry.get("format") != FORMAT:
            return bad(f"not a {FORMAT} entry")
        try:
            data = canonical(dict(entry))
        except ValueError as exc:
            return bad(f"entry is not canonical JSON: {exc}")
        if hashlib.sha256(data).hexdigest() != line.get("entry_hash"):
            return bad("entry_hash does not match the entry (the entry was altered)")
        try:
            signature = base64.b64decode(str(line.get("signature")), validate=True)
            public_key.verify(signature, DOMAIN + data)
        except (InvalidSignature, binascii.Error, ValueError):
            return bad("signature does not verify with the given server key")
        if entry.get("prev_entry_hash") != prev_hash:
            return bad("prev_entry_hash does not name the previous entry (reordered or removed)")
        version = entry.get("model_version")
        expected_version = 1 if prev is None else int(prev.get("model_version", 0)) + 1
        if version != expected_version:
            return bad(f"model_version is {version!r}, expected {expected_version}")
        if prev is not None:
            if not isinstance(rnd, int) or rnd <= int(prev.get("round", 0)):
                return bad(f"round {rnd!r} does not follow round {prev.get('round')!r}")
            if entry.get("base_model") != prev.get("model_hash"):
                return bad("base_model is not the previous entry's model_hash")
        prev_hash = str(line["entry_hash"])
        prev = entry
    return VerifyResult(True, len(lines))


def find_receipt(
    lines: Sequence[Mapping[str, Any]], receipt: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """Return the entry whose receipts hold ``receipt``'s hash (its round and stage), or ``None``.

    Parameters
    ----------
    lines : sequence of mapping
        Stored entries (verify them first with :func:`verify_ledger`).
    receipt : mapping
        The receipt exactly as the server returned it (``{"receipt_id", "round", ...}``).
    """
    want = receipt_hash(receipt)
    for line in lines:
        entry = line.get("entry")
        if not isinstance(entry, Mapping) or entry.get("round") != receipt.get("round"):
            continue
        receipts = entry.get("receipts")
        if isinstance(receipts, Mapping) and want in (receipts.get(receipt.get("stage")) or ()):
            return entry
    return None
