"""Coverage-guided fuzz target (atheris) over the server's input decoders.

One input is split by its first byte into a target and a payload:

* the bounded JSON decoder (:func:`confide.protocol.jsonio.loads_bounded`);
* the tensor codec (:func:`confide.protocol.manifest.decode_tensors`, safetensors header
  included);
* :meth:`RoundEngine.prepare` for the ``train`` (tensors) and ``evaluate`` (JSON metrics)
  payloads;
* a SecAgg+ ``advertise`` message, decoded and fed to a live secure round
  (``prepare`` + ``commit_submission``). The later stages' messages need the earlier ones of
  a real round; ``tests/server/test_fuzz_hostile.py`` feeds hostile variants of each.

Anything but a typed :class:`~confide.errors.FederationError` (which the error table turns
into a 4xx) is a finding. Short run (``make test`` runs it through
``tests/server/test_atheris.py``)::

    python -m tests.server.fuzz_decoders -runs=3000 -max_len=4096 CORPUS_DIR

Longer run (documented in docs/operations.md)::

    python -m tests.server.fuzz_decoders -max_total_time=3600 -jobs=2 fuzz-corpus/
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from confide.errors import FederationError
    from confide.protocol import jsonio, manifest
    from confide_server.engine import rounds

from tests.server.util import delta_body, eval_body, tiny_manifest, write_job

MANIFEST = tiny_manifest()


def _engines(tmp: Path) -> tuple[rounds.RoundEngine, rounds.RoundEngine]:
    """A plain engine with round 1 open in ``train``, a secure one in ``advertise``."""
    from confide_server.app import open_engine
    from tests.server.conftest import FakeClock
    from tests.server.test_secagg_rounds import Fed as SecureFed
    from tests.server.test_secagg_rounds import _config

    cfg = write_job(tmp / "plain", job__wait_for_clients=1, job__min_clients=1)
    plain = open_engine(cfg, clock=FakeClock())
    plain.enroll(plain.create_tokens(1)[0], "a", "k")
    plain.touch("a")
    plain.tick()
    fed = SecureFed(tmp / "secure", _config(tmp / "secure"))
    fed.eng.tick()
    return plain, fed.eng


_ENGINES: list[rounds.RoundEngine] = []
_NONCE = [0]


def _setup() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="confide-fuzz-"))
    _ENGINES.extend(_engines(tmp))


def test_one_input(data: bytes) -> None:
    """Feed one fuzzer input to the decoder its first byte selects."""
    if not data:
        return
    target, payload = data[0] % 5, data[1:]
    try:
        if target == 0:
            doc = jsonio.loads_bounded(payload)
            json.dumps(doc, allow_nan=False).encode()
        elif target == 1:
            manifest.decode_tensors(MANIFEST, payload)
        elif target in (2, 3):
            _ENGINES[0].prepare("a", 1, "train" if target == 2 else "evaluate", payload)
        else:  # a SecAgg+ advertisement, decoded and fed to the live protocol
            eng = _ENGINES[1]
            prepared = eng.prepare("a", 1, "advertise", payload)
            _NONCE[0] += 1
            eng.commit_submission(prepared, f"fuzz-{_NONCE[0]}")
    except FederationError:
        pass


def seeds() -> list[bytes]:
    """Seed corpus: one valid input per target."""
    return [
        b"\x00" + json.dumps({"a": [1, 2.5, "x"]}).encode(),
        b"\x01" + delta_body(MANIFEST, 0.1),
        b"\x02" + delta_body(MANIFEST, 0.1),
        b"\x03" + eval_body(0.5),
        b"\x04" + b'{"client_id": "a", "round": 1, "public_keys": {}}',
    ]


def main(argv: list[str]) -> None:
    """Run the fuzzer (libFuzzer flags in ``argv``); an empty corpus folder gets the seeds."""
    for arg in argv[1:]:
        folder = Path(arg)
        if not arg.startswith("-") and folder.is_dir() and not any(folder.iterdir()):
            for i, seed in enumerate(seeds()):
                (folder / f"seed-{i}").write_bytes(seed)
    _setup()
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
