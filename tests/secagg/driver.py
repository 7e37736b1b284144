"""In-process driver for SecAgg+ rounds: plays the network between clients and server.

Clients drop out before answering a named stage; everything else is delivered as JSON
dicts (``to_json`` -> ``from_json``), so the wire format is exercised on every run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import confide
from confide.secagg import (
    AggregateResult,
    ClientSecAgg,
    RoundSetup,
    SecAggParams,
    ServerSecAgg,
)
from confide.secagg.crypto import ed25519_public

STAGES = ("advertise", "share", "mask", "consistency", "unmask")
MODEL = b"model-bytes"


class RecordingClient(ClientSecAgg):
    """A client that remembers its plaintext ring vector (for bit-for-bit checks only)."""

    plain: np.ndarray | None = None

    def _quantize(self, update: Any, weight: int) -> Any:
        vec = super()._quantize(update, weight)
        self.plain = vec.copy()
        return vec


def identity(seed: bytes, cid: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed + cid.encode()).digest())


def make_params(
    n: int,
    k: int | None = None,
    t: int | None = None,
    max_dropouts: int | None = None,
    quant_bits: int = 16,
    max_weight: int = 100,
) -> SecAggParams:
    k = n - 1 if k is None else k
    t = (k + 3) // 2 if t is None else t
    d = n - t if max_dropouts is None else max_dropouts
    bits = confide.secagg.required_modulus_bits(n, quant_bits, max_weight)
    return SecAggParams(
        n=n,
        k=k,
        t=t,
        max_dropouts=d,
        quant_bits=quant_bits,
        clip_range=1.0,
        max_weight=max_weight,
        modulus_bits=bits,
    )


def make_setup(
    params: SecAggParams,
    *,
    d: int = 50,
    consistency: bool = False,
    round: int = 7,
    seed: bytes = b"seed",
) -> tuple[RoundSetup, dict[str, Ed25519PrivateKey]]:
    ids = [f"c{i:03d}" for i in range(params.n)]
    keys = {c: identity(seed, c) for c in ids}
    setup = RoundSetup(
        round=round,
        cohort=tuple(ids),
        identity_keys=tuple((c, ed25519_public(keys[c])) for c in ids),
        params=params,
        vector_length=d,
        model_sha256=hashlib.sha256(MODEL).digest(),
        consistency_check=consistency,
    )
    return setup, keys


def wire(msg: Any) -> dict[str, Any]:
    """What travels: the JSON dict (round-tripped through the json module)."""
    import json

    return json.loads(json.dumps(msg.to_json()))


@dataclass
class Round:
    setup: RoundSetup
    keys: dict[str, Ed25519PrivateKey]
    seed: bytes = b"round"
    updates: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    clients: dict[str, RecordingClient] = field(default_factory=dict)
    server: ServerSecAgg | None = None

    def __post_init__(self) -> None:
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(self.seed).digest()[:8], "big"))
        p = self.setup.params
        for c in self.setup.cohort:
            self.updates[c] = rng.uniform(-1.2, 1.2, self.setup.vector_length).astype(np.float32)
            self.weights[c] = int(rng.integers(0, p.max_weight + 1))
            crng = confide.SecureRng(hashlib.sha256(self.seed + c.encode()).digest())
            self.clients[c] = RecordingClient(self.setup, c, self.keys[c], rng=crng)
        self.server = ServerSecAgg(self.setup)

    def run(
        self,
        drop: Mapping[str, Iterable[str]] | None = None,
        late: Mapping[str, Iterable[str]] | None = None,
        restart_after: Iterable[str] = (),
    ) -> AggregateResult:
        """Run the round; ``drop[stage]`` never answer that stage (and nothing later).

        ``late[stage]`` answer that stage only after the server closed it. ``restart_after``
        names stages after whose closing the server is rebuilt from ``to_state()`` (through
        JSON).
        """
        drop = {s: set(v) for s, v in (drop or {}).items()}
        late = {s: set(v) for s, v in (late or {}).items()}
        gone: set[str] = set()
        srv = self.server
        assert srv is not None

        def live(ids: Iterable[str], stage: str) -> list[str]:
            gone.update(drop.get(stage, set()))
            return [c for c in ids if c not in gone]

        def restart(stage: str) -> None:
            nonlocal srv
            if stage in restart_after:
                import json

                srv = ServerSecAgg.from_state(json.loads(json.dumps(srv.to_state())))
                self.server = srv

        def deliver_late(stage: str, fn: Any) -> None:
            for c in late.get(stage, set()):
                if c in gone:
                    continue
                gone.add(c)
                self.late_errors.append(fn(c))

        self.late_errors: list[Any] = []
        cohort = self.setup.cohort
        adv = {c: wire(self.clients[c].advertise()) for c in live(cohort, "advertise")}
        for c in adv:
            if c not in late.get("advertise", set()):
                srv.receive_advertisement(adv[c])
        bcast = wire(srv.close_advertise())
        deliver_late("advertise", lambda c: _catch(srv.receive_advertisement, adv[c]))
        restart("advertise")

        ups = {c: wire(self.clients[c].share_keys(bcast)) for c in live(adv, "share")}
        for c in ups:
            if c not in late.get("share", set()):
                srv.receive_share_upload(ups[c])
        deliveries = {c: wire(m) for c, m in srv.close_share().items()}
        deliver_late("share", lambda c: _catch(srv.receive_share_upload, ups[c]))
        restart("share")

        masked = {}
        for c in live([c for c in ups if c in deliveries], "mask"):
            masked[c] = wire(
                self.clients[c].masked_input(
                    deliveries[c],
                    self.updates[c],
                    self.weights[c],
                    model_sha256=hashlib.sha256(MODEL).digest(),
                )
            )
        for c in masked:
            if c not in late.get("mask", set()):
                srv.receive_masked_input(masked[c])
        req = wire(srv.close_mask())
        deliver_late("mask", lambda c: _catch(srv.receive_masked_input, masked[c]))
        restart("mask")
        survivors = sorted(c for c in masked if c not in late.get("mask", set()))
        if self.setup.consistency_check:
            sigs = {
                c: wire(self.clients[c].consistency_check(req))
                for c in live(survivors, "consistency")
            }
            for c in sigs:
                srv.receive_consistency_signature(sigs[c])
            req = wire(srv.close_consistency())
            restart("consistency")
        resps = {c: wire(self.clients[c].unmask(req)) for c in live(survivors, "unmask")}
        for c in resps:
            srv.receive_unmask_response(resps[c])
        return srv.close_unmask()

    def expected(self, survivors: Iterable[str]) -> tuple[np.ndarray, int]:
        """Plaintext integer sum of the survivors' ring vectors (update part) and weights."""
        total = sum(self.clients[c].plain.astype(object) for c in survivors)  # type: ignore[union-attr]
        total = np.array(total, dtype=object)
        return total[:-1], int(total[-1])


def _catch(fn: Any, arg: Any) -> BaseException | None:
    try:
        fn(arg)
    except BaseException as exc:
        return exc
    return None
