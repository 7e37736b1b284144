"""Issue 11's server-side attacks, played against Flower's own client-side SecAgg+.

The server is what this script fakes; every client is Flower's real code: a ``ClientApp``
built with ``flwr.client.mod.secaggplus_mod`` around a ``NumPyClient``, called stage by stage
with ``Message``/``Context`` objects as a SuperNode would call it. The malicious server only
crafts the four stage messages (``setup``, ``share_keys``, ``collect_masked_vectors``,
``unmask``) and then uses Flower's public primitives (Shamir ``combine_shares``, the ECDH key
derivation, the mask PRG, ``dequantize``) to unmask what the clients handed out. For each
attack of issue 11 it records whether Flower's client refuses or falls, and where it falls,
how far the victim's update recovered by the server is from the victim's true update (one
quantization step is ``2 * clipping_range / quantization_range``; Flower rounds
stochastically).

1. downgrade: a plain ``train`` message to a client built with the mod; a SecAgg+ round whose
   cohort is the victim alone (``share_num = threshold = 1``).
2. weak parameters: ``threshold = 1`` in a cohort of 3 (one colluder decrypts its share of the
   victim's secrets); a cohort of 2 (victim and one colluder; the secure sum minus the
   colluder's own update).
3. Sybils: the server relays public keys it generated itself for 3 ids next to the victim and
   2 honest clients (``threshold = 3``, ``share_num = 6``); the victim's encrypted shares to
   those ids give the server both of its secrets without an unmask stage.
4. config inconsistency: a learning rate of 0 for every site but the victim (Flower's
   messages carry no signatures, so nothing binds the training config).
5. split view at unmask: 8 honest clients, ``num_shares = 1.0`` and
   ``reconstruction_threshold = 0.5`` (fractions, which Flower's workflow turns into
   ``share_num = 8``, ``threshold = 4``); 4 holders are told the victim is alive, the other
   4 that it dropped, each request self-consistent; and a single request naming the victim
   both alive and dead.
6. re-roll: a second ``setup`` for the same round, before and after ``share_keys``.

And one that is not in issue 11 (``mask_entropy``): Flower's mask PRG folds its 32-byte seed
into a 32-bit ``RandomState`` seed, so a victim the server calls dropped after its upload
(one roster for everybody, the protocol followed) is left behind a self mask of 2**32
possibilities; the run searches a 2**16-seed window around the true seed and extrapolates.

Runs in the peers environment of ``make bench`` (numpy and flwr; it does not import
confide): ``.venv-peers/bin/python benches/python/flower_attacks.py [--json out.json]``.
Takes about ten seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

try:
    import flwr
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        decrypt,
        encrypt,
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        RECORD_KEY_STATE,
        Key,
        Stage,
    )
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen,
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.compat.common import recorddict_compat as compat
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )
    from flwr.supercore.task_identity import TaskIdentity
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"flower_attacks.py needs flwr (pip install flwr==1.42.0): {exc}")

DIM = 64  # parameters in the toy model
CLIP = 8.0  # Flower's defaults: clipping_range 8, quantization_range 2**22, modulus 2**32
TARGET = 1 << 22
MOD = 1 << 32
MAX_WEIGHT = 1000.0
STEP = 2 * CLIP / TARGET  # one quantization step

# The confide tests that run the same attack against confide and assert the refusal.
CONFIDE_TESTS = {
    "downgrade": [
        "tests/security/test_site_policy.py::test_downgrade_to_plain_rounds_is_refused",
        "tests/security/test_site_policy.py::test_downgrade_to_no_dp_is_refused",
        "tests/security/test_site_policy.py::test_downgrade_to_semi_honest_mode_is_refused",
        "tests/security/test_site_policy.py::test_cohort_below_the_site_minimum_is_refused",
    ],
    "weak_parameters": [
        "tests/security/test_site_policy.py::test_issue_examples_of_weak_parameters_are_refused",
        "tests/security/test_site_policy.py::test_weak_threat_model_is_refused",
    ],
    "sybil": [
        "tests/security/test_certified_peers.py::test_sybil_cohort_is_refused_and_nothing_is_revealed",
    ],
    "config_inconsistency": [
        "tests/security/test_task_binding.py::test_sites_given_different_tasks_all_abort_at_share",
        "tests/security/test_task_binding.py::test_sites_given_different_tasks_over_http_reveal_nothing",
    ],
    "split_view": [
        "tests/security/test_unique_roster.py::test_split_view_is_refused_and_reveals_nothing",
        "tests/security/test_unique_roster.py::test_colluders_signing_both_rosters_do_not_reach_the_quorum",
    ],
    "mask_entropy": [
        "tests/vectors/test_vectors.py::test_mask_expansion_matches_vectors",
    ],
    "reroll": [
        "tests/security/test_graph_reroll.py::test_a_second_advertise_gets_the_same_keys",
        "tests/security/test_graph_reroll.py::test_another_setup_for_the_same_round_is_refused",
    ],
}


# --------------------------------------------------------------------------- the clients


class Site(NumPyClient):  # type: ignore[misc]
    """A hospital: one private vector; ``fit`` returns ``w + lr * private`` (lr from the task)."""

    def __init__(self, private: np.ndarray, num_examples: int) -> None:
        self.private = private
        self.num_examples = num_examples

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        lr = float(config.get("lr", 1.0))
        return [parameters[0] + lr * self.private], self.num_examples, {}


@dataclass
class Node:
    """One Flower client process: its ``ClientApp`` (with the mod), its context, its data."""

    nid: int
    site: Site
    app: ClientApp
    ctx: Context
    group: str = "1"

    def send(self, configs: dict[str, Any], fitins: RecordDict | None = None) -> ConfigRecord:
        """Deliver one stage message the way a SuperNode does and return the reply's configs."""
        content = fitins if fitins is not None else RecordDict()
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
        msg = Message(
            content=content,
            dst_node_id=self.nid,
            message_type=MessageType.TRAIN,
            group_id=self.group,
        )
        reply = self.app(msg, self.ctx)
        self.last_reply = reply
        return reply.content.config_records[RECORD_KEY_CONFIGS]

    def secret_state(self) -> dict[str, Any]:
        """What a server that *is* this node (a colluder) knows: its SecAgg+ state."""
        return dict(self.ctx.state.config_records[RECORD_KEY_STATE])


def make_node(nid: int, private: np.ndarray, num_examples: int) -> Node:
    site = Site(private, num_examples)
    app = ClientApp(client_fn=lambda _ctx: site.to_client(), mods=[secaggplus_mod])
    ctx = Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
    return Node(nid, site, app, ctx)


# --------------------------------------------------------------------------- the server


@dataclass
class Sybil:
    """An id the server introduced; it holds both key pairs."""

    nid: int
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""

    def __post_init__(self) -> None:
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        self.sk1, self.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
        self.sk2, self.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)


@dataclass
class Server:
    """A server that speaks Flower's SecAgg+ stages and keeps everything it sees."""

    nodes: dict[int, Node]
    sybils: dict[int, Sybil] = field(default_factory=dict)
    pks: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    share_msgs: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # dst -> (src, ct)
    masked: dict[int, list[np.ndarray]] = field(default_factory=dict)
    num_examples: dict[int, int] = field(default_factory=dict)
    forwarded: dict[int, list[int]] = field(default_factory=dict)  # dst -> srcs forwarded

    def setup(self, share_num: int, threshold: int) -> None:
        cfg = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: len(self.nodes) + len(self.sybils),
            Key.SHARE_NUMBER: share_num,
            Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: CLIP,
            Key.TARGET_RANGE: TARGET,
            Key.MOD_RANGE: MOD,
            Key.MAX_WEIGHT: MAX_WEIGHT,
        }
        for nid, node in self.nodes.items():
            res = node.send(dict(cfg))
            self.pks[nid] = (cast(bytes, res[Key.PUBLIC_KEY_1]), cast(bytes, res[Key.PUBLIC_KEY_2]))
        for nid, syb in self.sybils.items():
            self.pks[nid] = (syb.pk1, syb.pk2)

    def share_keys(self, views: dict[int, Iterable[int]] | None = None) -> None:
        """Relay public keys; ``views[nid]`` is the key list the server shows ``nid``."""
        everyone = sorted(self.pks)
        self.share_msgs = {nid: [] for nid in everyone}
        for nid, node in self.nodes.items():
            shown = sorted(views[nid]) if views else everyone
            cfg: dict[str, Any] = {str(j): list(self.pks[j]) for j in shown}
            cfg[Key.STAGE] = Stage.SHARE_KEYS
            res = node.send(cfg)
            for dst, ct in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST], strict=True):
                self.share_msgs[cast(int, dst)].append((nid, cast(bytes, ct)))
        for nid, syb in self.sybils.items():  # a Sybil sends well-formed junk shares
            for dst in self.nodes:
                key = generate_shared_key(
                    bytes_to_private_key(syb.sk2), bytes_to_public_key(self.pks[dst][1])
                )
                junk = share_keys_plaintext_concat(nid, dst, os.urandom(52), os.urandom(52))
                self.share_msgs[dst].append((nid, encrypt(key, junk)))

    def collect(
        self,
        weights: np.ndarray,
        lr: dict[int, float] | None = None,
        only: Iterable[int] | None = None,
    ) -> None:
        """Forward the shares (and the task: global weights, per-site config), collect uploads."""
        chosen = set(only) if only is not None else None
        for nid, node in self.nodes.items():
            fwd = [(s, c) for s, c in self.share_msgs[nid] if chosen is None or s in chosen]
            self.forwarded[nid] = [s for s, _ in fwd]
            fitins = compat.fitins_to_recorddict(
                FitIns(ndarrays_to_parameters([weights]), {"lr": (lr or {}).get(nid, 1.0)}), True
            )
            cfg = {
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                Key.CIPHERTEXT_LIST: [c for _, c in fwd],
                Key.SOURCE_LIST: [s for s, _ in fwd],
            }
            res = node.send(cfg, fitins)
            self.masked[nid] = [
                bytes_to_ndarray(b) for b in cast(list[bytes], res[Key.MASKED_PARAMETERS])
            ]
            # Flower's reply keeps the FitRes record minus its arrays: num_examples in the clear.
            metrics = node.last_reply.content.metric_records
            self.num_examples[nid] = int(metrics["fitres.num_examples"]["num_examples"])

    def upload(
        self,
        weights: np.ndarray,
        share_num: int,
        threshold: int,
        lr: dict[int, float] | None = None,
    ) -> None:
        """Run a round up to the uploads: ``setup``, ``share_keys`` (one view), ``collect``."""
        self.setup(share_num=share_num, threshold=threshold)
        self.share_keys()
        self.collect(weights, lr=lr)

    def unmask(
        self, requests: dict[int, tuple[list[int], list[int]]]
    ) -> dict[int, list[tuple[str, bytes]]]:
        """Send each holder its (active, dead) lists; return owner -> [(kind, share)]."""
        got: dict[int, list[tuple[str, bytes]]] = {}
        for nid, (active, dead) in requests.items():
            res = self.nodes[nid].send(
                {
                    Key.STAGE: Stage.UNMASK,
                    Key.ACTIVE_NODE_ID_LIST: active,
                    Key.DEAD_NODE_ID_LIST: dead,
                }
            )
            owners = cast(list[int], res[Key.NODE_ID_LIST])
            shares = cast(list[bytes], res[Key.SHARE_LIST])
            for i, (owner, share) in enumerate(zip(owners, shares, strict=True)):
                kind = "seed" if i < len(active) else "sk1"  # the reply lists active first
                got.setdefault(owner, []).append((kind, share))
        return got

    # --------------------------------------------------------------- unmasking one client

    def open_shares_as(self, holder_sk2: bytes, holder: int, owner: int) -> tuple[bytes, bytes]:
        """Decrypt the share ``owner`` sent to ``holder`` (the server holds ``holder``'s sk2)."""
        ct = next(c for s, c in self.share_msgs[holder] if s == owner)
        key = generate_shared_key(
            bytes_to_private_key(holder_sk2), bytes_to_public_key(self.pks[owner][1])
        )
        src, dst, seed_share, sk1_share = share_keys_plaintext_separate(decrypt(key, ct))
        assert (src, dst) == (owner, holder)
        return seed_share, sk1_share

    def strip_pairwise(self, victim: int, sk1: bytes) -> list[np.ndarray]:
        """The victim's upload minus its pairwise masks (mod ``MOD``): ``Q + self mask``."""
        y = [a.astype(np.int64) for a in self.masked[victim]]
        dims = [a.shape for a in y]
        for j in self.forwarded[victim]:
            key = generate_shared_key(
                bytes_to_private_key(sk1), bytes_to_public_key(self.pks[j][0])
            )
            for i, m in enumerate(pseudo_rand_gen(key, MOD, dims)):
                y[i] = y[i] - m if victim > j else y[i] + m
        return [a % MOD for a in y]

    def unmask_one(self, victim: int, seed: bytes, sk1: bytes) -> tuple[np.ndarray, float]:
        """Remove the victim's self mask and pairwise masks: its update and its weight."""
        y = self.strip_pairwise(victim, sk1)
        dims = [a.shape for a in y]
        y = [(a - m) % MOD for a, m in zip(y, pseudo_rand_gen(seed, MOD, dims), strict=True)]
        return decode(y, n_summed=1)

    def secure_sum(
        self, got: dict[int, list[tuple[str, bytes]]], n_summed: int
    ) -> tuple[np.ndarray, float]:
        """An honest unmask's result: the uploads summed, every owner's self mask removed."""
        total = [
            sum(a.astype(np.int64) for a in parts)
            for parts in zip(*self.masked.values(), strict=True)
        ]
        for owner in self.nodes:
            seed = combine([s for k, s in got[owner] if k == "seed"])
            total = [
                t - m
                for t, m in zip(
                    total, pseudo_rand_gen(seed, MOD, [a.shape for a in total]), strict=True
                )
            ]
        return decode([t % MOD for t in total], n_summed=n_summed)


def decode(y: list[np.ndarray], n_summed: int) -> tuple[np.ndarray, float]:
    """Flower's encoding: ``[q_ratio] + quantize(dq * params)``; undo it for a sum of n."""
    q = int(y[0][0])
    values = dequantize([y[1]], CLIP, TARGET)[0] - (n_summed - 1) * CLIP
    return values * TARGET / q, q / TARGET * MAX_WEIGHT  # (weighted mean, summed weight)


# --------------------------------------------------------------------------- scenarios


@dataclass
class Outcome:
    attack: str
    variant: str
    flower: str  # "refuses" or "falls"
    detail: str
    max_abs_error: float | None = None  # max |recovered victim update - true update|
    victim_weight_recovered: float | None = None
    victim_weight_true: int | None = None


def federation(n: int, seed: int) -> tuple[dict[int, Node], np.ndarray]:
    rng = np.random.default_rng(seed)
    nodes = {}
    for i in range(n):
        nid = 1000 + 17 * i
        nodes[nid] = make_node(nid, rng.uniform(-1.0, 1.0, DIM), int(rng.integers(20, 400)))
    return nodes, rng.uniform(-1.0, 1.0, DIM)


RECOVERED = 1e-3  # max |recovered - true| that counts as recovered (entries are of order 1)


def max_error(recovered: np.ndarray, true: np.ndarray) -> float:
    return float(np.max(np.abs(recovered - true)))


def fell(
    attack: str, variant: str, detail: str, rec: tuple[np.ndarray, float], node: Node, w: np.ndarray
) -> Outcome:
    """The victim's update and weight as the server recovered them, against the truth."""
    update, weight = rec
    err = max_error(update, w + node.site.private)
    verdict = "falls" if err < RECOVERED else "unclear"
    return Outcome(attack, variant, verdict, detail, err, round(weight, 3), node.site.num_examples)


def combine(shares: list[bytes]) -> bytes:
    return combine_shares(shares)


def attack_downgrade() -> list[Outcome]:
    out = []
    nodes, w = federation(1, seed=1)
    (node,) = nodes.values()
    fitins = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([w]), {}), True)
    msg = Message(
        content=fitins, dst_node_id=node.nid, message_type=MessageType.TRAIN, group_id="1"
    )
    try:
        node.app(msg, node.ctx)
        out.append(
            Outcome(
                "downgrade", "plain train message", "falls", "trained and answered in the clear"
            )
        )
    except Exception as exc:  # we report what Flower raised
        out.append(
            Outcome(
                "downgrade",
                "plain train message",
                "refuses",
                f"the mod raises {type(exc).__name__} {exc} (the record it expects is missing), "
                "but only in a ClientApp built with the mod: the FAB decides "
                "(SuperNode --trusted-entities can pin it)",
            )
        )
    # SecAgg+ in name only: the victim is the whole cohort.
    nodes, w = federation(1, seed=2)
    srv = Server(nodes)
    (v,) = nodes
    srv.upload(w, share_num=1, threshold=1)
    got = srv.unmask({v: ([v], [])})  # an honest unmask: the victim is alive
    seed = combine([s for k, s in got[v] if k == "seed"])
    out.append(
        fell(
            "downgrade",
            "cohort of 1 (share_num = threshold = 1)",
            "accepted: no minimum cohort, sample_num unchecked; no pairwise masks, and an "
            "honest unmask returns the self-mask seed",
            srv.unmask_one(v, seed, b""),  # no peers: the mask key is never used
            nodes[v],
            w,
        )
    )
    return out


def attack_weak_parameters() -> list[Outcome]:
    out = []
    # threshold 1: each share is the secret itself; one colluder holds one share.
    nodes, w = federation(3, seed=3)
    srv = Server(nodes)
    victim, colluder, _honest = list(nodes)
    srv.upload(w, share_num=3, threshold=1)
    sk2 = cast(bytes, nodes[colluder].secret_state()["sk2"])
    seed_share, sk1_share = srv.open_shares_as(sk2, colluder, victim)
    out.append(
        fell(
            "weak_parameters",
            "threshold 1 of 3, one colluder",
            "accepted; the colluder's one share is the victim's mask seed and mask key "
            "(no unmask stage)",
            srv.unmask_one(victim, combine([seed_share]), combine([sk1_share])),
            nodes[victim],
            w,
        )
    )
    # a cohort of 2: an honest round; the sum minus the colluder's own update.
    nodes, w = federation(2, seed=4)
    srv = Server(nodes)
    victim, colluder = list(nodes)
    srv.upload(w, share_num=2, threshold=2)
    got = srv.unmask({nid: ([victim, colluder], []) for nid in nodes})
    mean, summed = srv.secure_sum(got, n_summed=2)
    n_c = srv.num_examples[colluder]  # in the clear in the collect reply (and the colluder's own)
    n_v = srv.num_examples[victim]
    mine = w + nodes[colluder].site.private
    update = (mean * (n_v + n_c) - mine * n_c) / n_v
    out.append(
        fell(
            "weak_parameters",
            "cohort of 2 (victim + one colluder), t = 2",
            "accepted; an honest round: secure sum minus the colluder's update",
            (update, summed - n_c),
            nodes[victim],
            w,
        )
    )
    return out


def attack_sybil() -> list[Outcome]:
    nodes, w = federation(3, seed=5)
    victim = next(iter(nodes))
    sybils = {9001 + i: Sybil(9001 + i) for i in range(3)}
    srv = Server(nodes, sybils)
    srv.upload(w, share_num=6, threshold=3)
    opened = [srv.open_shares_as(s.sk2, s.nid, victim) for s in sybils.values()]
    seed = combine([a for a, _ in opened])
    sk1 = combine([b for _, b in opened])
    return [
        fell(
            "sybil",
            "3 server-made ids + victim + 2 honest, t = 3 of 6",
            "accepted any relayed keys (only uniqueness is checked); "
            "the Sybils' shares open both secrets",
            srv.unmask_one(victim, seed, sk1),
            nodes[victim],
            w,
        )
    ]


def attack_config_inconsistency() -> list[Outcome]:
    nodes, w = federation(4, seed=6)
    victim = next(iter(nodes))
    srv = Server(nodes)
    srv.upload(
        w, share_num=4, threshold=3, lr={nid: (1.0 if nid == victim else 0.0) for nid in nodes}
    )
    got = srv.unmask({nid: (list(nodes), []) for nid in nodes})  # an honest unmask
    mean, _ = srv.secure_sum(got, n_summed=len(nodes))
    n = srv.num_examples
    others = sum(n[j] for j in nodes if j != victim)
    update = (mean * sum(n.values()) - w * others) / n[victim]  # the others returned w exactly
    return [
        fell(
            "config_inconsistency",
            "lr = 0 for the 3 other sites, honest unmask",
            "accepted: nothing signed, no task hash; the secure sum is the victim's update",
            (update, n[victim]),
            nodes[victim],
            w,
        )
    ]


def attack_split_view() -> list[Outcome]:
    out = []
    for variant in ("split", "both-lists"):
        nodes, w = federation(8, seed=7)
        ids = list(nodes)
        victim = ids[0]
        srv = Server(nodes)
        srv.upload(w, share_num=8, threshold=4)  # Flower's workflow for 1.0 and 0.5 at n = 8
        if variant == "split":
            alive_view, dead_view = ids[:4], ids[4:]  # the victim itself is in the "alive" group
            req = {h: (ids, []) for h in alive_view}
            req |= {h: ([j for j in ids if j != victim], [victim]) for h in dead_view}
            detail = (
                "4 holders told 'victim alive', 4 'victim dropped'; each request self-consistent"
            )
        else:
            req = {h: (ids, [victim]) for h in ids[1:5]}
            detail = "one request naming the victim alive and dead: no disjointness check"
        got = srv.unmask(req)
        seeds = [s for k, s in got[victim] if k == "seed"]
        sk1s = [s for k, s in got[victim] if k == "sk1"]
        o = fell(
            "split_view",
            f"n = 8, t = 4: {variant}",
            f"{detail}; server got {len(seeds)} seed + {len(sk1s)} key shares",
            srv.unmask_one(victim, combine(seeds[:4]), combine(sk1s[:4])),
            nodes[victim],
            w,
        )
        out.append(o)
    return out


def attack_reroll() -> list[Outcome]:
    out = []
    nodes, _ = federation(3, seed=8)
    srv = Server(nodes)

    def setup_again(variant: str, detail: str) -> Outcome:
        """A second ``setup`` for the same round (group_id): do the clients answer fresh keys?"""
        first = dict(srv.pks)
        srv.setup(share_num=3, threshold=2)
        fresh = sum(first[n] != srv.pks[n] for n in nodes)
        verdict = "falls" if fresh == len(nodes) else "refuses"
        return Outcome("reroll", variant, verdict, f"{fresh}/{len(nodes)} {detail}")

    srv.setup(share_num=3, threshold=2)
    out.append(
        setup_again(
            "second setup after setup", "clients answered with fresh keys (a warning is logged)"
        )
    )
    srv.share_keys()
    out.append(
        setup_again(
            "second setup after share_keys",
            "fresh keys; the graph is the server's anyway (the key list it relays)",
        )
    )
    return out


def seed32(seed: bytes) -> int:
    """The 32-bit integer Flower's ``pseudo_rand_gen`` folds a seed into (XOR of its words)."""
    out = 0
    for i in range(0, len(seed), 4):
        out ^= int.from_bytes(seed[i : i + 4], "little")
    return out


def attack_mask_entropy(window: int = 1 << 16) -> list[Outcome]:
    """Not in issue 11: the self mask has 32 bits of entropy, whatever the 32-byte seed.

    An honest-looking round in which the server calls the victim dropped *after* its masked
    vector arrived: every holder is sent the same roster (victim dead), so it releases key
    shares only, as the protocol says it should. The server removes the pairwise masks and is
    left with ``Q + PRG(seed32)``; it searches the 2**32 seeds for the one that leaves the
    weight element (and then every element) inside the quantizer's range. The run searches a
    window of ``window`` seeds placed around the true one (read from the victim's state to keep
    the run short) and extrapolates the full search from the measured rate.
    """
    nodes, w = federation(5, seed=10)
    ids = list(nodes)
    victim = ids[0]
    srv = Server(nodes)
    srv.upload(w, share_num=5, threshold=3)
    others = [j for j in ids if j != victim]
    got = srv.unmask({h: (others, [victim]) for h in others})  # one roster for everybody
    sk1 = combine([s for k, s in got[victim] if k == "sk1"])
    y = srv.strip_pairwise(victim, sk1)  # Q + self mask: all that is left
    dims = [a.shape for a in y]
    true = seed32(cast(bytes, nodes[victim].secret_state()["rd_seed"]))
    lo = max(0, true - window // 2)
    passed: list[int] = []
    gen = np.random.RandomState()  # Flower's PRG, reproduced to search it (re-seeded: faster)
    t0 = time.perf_counter()
    for cand in range(lo, lo + window):
        gen.seed(cand)
        first = (int(y[0][0]) - int(gen.randint(0, MOD - 1, (1,), dtype=np.int64)[0])) % MOD
        if first <= TARGET:  # the weight element q_ratio lies in [0, quantization_range]
            rest = (y[1] - gen.randint(0, MOD - 1, dims[1], dtype=np.int64)) % MOD
            if int(rest.max()) <= TARGET:
                passed.append(cand)
    rate = window / (time.perf_counter() - t0)
    hours = (1 << 32) / rate / 3600
    found = passed == [true]
    rec = None
    if found:
        mask = np.random.RandomState(true)
        q = [(y[0] - mask.randint(0, MOD - 1, dims[0], dtype=np.int64)) % MOD]
        q.append((y[1] - mask.randint(0, MOD - 1, dims[1], dtype=np.int64)) % MOD)
        rec = decode(q, n_summed=1)
    detail = (
        f"victim called dropped after its upload, one roster for all; {len(passed)} of {window} "
        f"seeds pass the range test (the true one: {found}); {rate:.0f} seeds/s here, "
        f"full 2**32 search {hours:.1f} core-hours"
    )
    if rec is None:
        return [Outcome("mask_entropy", "32-bit self-mask seed", "unclear", detail)]
    return [fell("mask_entropy", "32-bit self-mask seed", detail, rec, nodes[victim], w)]


def honest_baseline() -> Outcome:
    """Sanity: the driver is faithful: an honest round's sum decodes to the weighted mean."""
    nodes, w = federation(5, seed=9)
    srv = Server(nodes)
    srv.upload(w, share_num=5, threshold=3)
    got = srv.unmask({nid: (list(nodes), []) for nid in nodes})
    mean, _ = srv.secure_sum(got, n_summed=len(nodes))
    n = {nid: node.site.num_examples for nid, node in nodes.items()}
    true = sum(n[i] * (w + nodes[i].site.private) for i in nodes) / sum(n.values())
    err = max_error(mean, true)
    return Outcome(
        "baseline", "honest round, n = 5, t = 3", "n/a", "the sum decodes to the weighted mean", err
    )


ATTACKS: tuple[Callable[[], list[Outcome]], ...] = (
    attack_downgrade,
    attack_weak_parameters,
    attack_sybil,
    attack_config_inconsistency,
    attack_split_view,
    attack_reroll,
    attack_mask_entropy,
)


def run_all(seed: int = 0) -> list[Outcome]:
    np.random.seed(seed)  # noqa: NPY002 - Flower's stochastic rounding uses the global one
    # The identity a ServerApp process gets from its SuperLink (instruction messages need it).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    outcomes = [honest_baseline()]
    for attack in ATTACKS:
        outcomes.extend(attack())
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| attack | variant | Flower 1.42 client | max abs error of the recovered update "
        "| victim weight (recovered / true) | confide (refuses) |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        err = "-" if o.max_abs_error is None else f"{o.max_abs_error:.1e}"
        wt = (
            "-"
            if o.victim_weight_true is None
            else f"{o.victim_weight_recovered:g} / {o.victim_weight_true}"
        )
        tests = CONFIDE_TESTS.get(o.attack, [])
        test = tests[0].split("::")[-1] if tests else "-"
        lines.append(
            f"| {o.attack} | {o.variant} | **{o.flower}**: {o.detail} | {err} | {wt} | `{test}` |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the outcomes here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    outcomes = run_all(args.seed)
    elapsed = time.perf_counter() - t0
    print(f"flwr {flwr.__version__}, numpy {np.__version__}, Python {platform.python_version()}")
    print(f"update entries in [-2, 2]; recovered: max abs error < {RECOVERED:g}; {elapsed:.1f} s\n")
    print(table(outcomes))
    if args.json:
        doc = {
            "flwr": flwr.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "quantization_step": STEP,
            "recovered_below": RECOVERED,
            "seconds": round(elapsed, 2),
            "outcomes": [o.__dict__ for o in outcomes],
            "confide_tests": CONFIDE_TESTS,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
    attacks = [o for o in outcomes if o.attack != "baseline"]
    return 0 if all(o.flower in ("falls", "refuses") for o in attacks) else 1


if __name__ == "__main__":
    sys.exit(main())
