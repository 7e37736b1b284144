#!/usr/bin/env python3
"""SecAgg+ side by side: confide's protocol layer vs Flower's SecAgg+ (same process run).

For each cohort size n (default 10, 50, 100) and each dropout rate (0 % and 10 % of the
cohort dropping *after* uploading its masked input, i.e. not answering the unmask request),
a full round over a 1,235,496-parameter update (SqueezeNet 1.1) is run in process:

* **confide**: :class:`confide.secagg.ClientSecAgg` / :class:`ServerSecAgg`, messages
  passed as objects (no JSON), weighted aggregation on, Ed25519-signed advertisements.
* **Flower** (``flwr``, if importable): the real ``SecAggPlusWorkflow`` server (all four
  stages, unmodified) driven by an in-process fake ``Grid`` that deep-copies each message
  (as a network would) and hands it to the real ``secaggplus_mod`` client mod; the training
  step is a stub returning the prepared update.

Both use the same neighbour count k (complete graph for n = 10, k = 16 otherwise; Flower's
``num_shares = k + 1`` counts the client itself) and the same threshold t.

Reported per configuration (medians over clients; one repetition -- the machine is a shared
2-core box, so expect noise of tens of per cent):

* ``mask``: per-client mask expansion and application (confide: pairwise key agreement +
  one fused ``apply_masks``; Flower: ``pseudo_rand_gen`` + array additions/subtractions +
  ``parameters_mod``, measured by wrapping those functions);
* ``masked stage``: the whole masked-input step (decrypt shares, quantize, mask, pack);
* ``client total``: all of one client's protocol work over the round;
* ``server unmask``: confide: accepting the unmask responses + ``close_unmask`` + weighted
  mean; Flower: ``unmask_stage`` minus the time spent inside client calls and in
  ``strategy.aggregate_fit`` (a FedAvg over identical results, not part of SecAgg);
* ``upload``: bytes of the masked vector one client uploads (confide: bit-packed; Flower:
  the ``ndarray_to_bytes`` payload), and the whole protocol upload per client.

Run from a venv holding confide's dependencies (and flwr for the comparison)::

    .venv-peers/bin/python benches/python/bench_secagg.py            # both
    .venv/bin/python benches/python/bench_secagg.py                  # confide only

Options: ``--n 10 50 100``, ``--dim N``, ``--flower-complete`` (also run Flower on the complete
graph for n = 100: minutes), ``--json PATH``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    import confide.secagg
except ImportError:  # no (recent enough) confide installed: use the built source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
    for _name in [m for m in sys.modules if m == "confide" or m.startswith("confide.")]:
        del sys.modules[_name]

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import confide
from confide.secagg import (
    ClientSecAgg,
    RoundSetup,
    SecAggParams,
    ServerSecAgg,
    assess,
    required_modulus_bits,
)
from confide.secagg.crypto import ed25519_public

SQUEEZENET = 1_235_496
QUANT_BITS = 22  # Flower's default quantization_range = 2**22
CLIP = 8.0  # Flower's default clipping_range
MAX_WEIGHT = 1000  # Flower's default max_weight


def k_for(n: int) -> int:
    return n - 1 if n <= 10 else 16


def t_for(k: int) -> int:
    return (k + 3) // 2  # smallest t with 2t >= k + 2


def updates_for(n: int, dim: int) -> list[np.ndarray]:
    base = np.random.default_rng(0).uniform(-1, 1, dim).astype(np.float32)
    return [np.roll(base, i) for i in range(n)]  # cheap, distinct


def dropped_for(n: int, rate: float) -> set[int]:
    m = round(rate * n)
    return {i for i in range(n) if i % 10 == 3} if m and n >= 10 else set(range(m))


# -- confide ------------------------------------------------------------------------------


def run_confide(n: int, k: int, dim: int, rate: float, when: str = "unmask") -> dict[str, Any]:
    t = t_for(k)
    dropped = dropped_for(n, rate)
    params = SecAggParams(
        n=n,
        k=k,
        t=t,
        max_dropouts=max(len(dropped), 0),
        quant_bits=QUANT_BITS,
        clip_range=CLIP,
        max_weight=MAX_WEIGHT,
        modulus_bits=required_modulus_bits(n, QUANT_BITS, MAX_WEIGHT),
    )
    ids = [f"site{i:03d}" for i in range(n)]
    keys = {c: Ed25519PrivateKey.generate() for c in ids}
    model = hashlib.sha256(b"squeezenet-1.1").digest()
    setup = RoundSetup(
        round=1,
        cohort=tuple(ids),
        identity_keys=tuple((c, ed25519_public(keys[c])) for c in ids),
        params=params,
        vector_length=dim,
        model_sha256=model,
        consistency_check=False,
    )
    upd = updates_for(n, dim)
    srv = ServerSecAgg(setup)
    clients = {c: ClientSecAgg(setup, c, keys[c]) for c in ids}
    ctime = dict.fromkeys(ids, 0.0)
    up_bytes = dict.fromkeys(ids, 0)
    mask_t: list[float] = []
    stage_t: list[float] = []
    vec_bytes = 0

    def timed(c: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        ctime[c] += time.perf_counter() - t0
        return out

    for c in ids:
        adv = timed(c, clients[c].advertise)
        up_bytes[c] += 32 * 3 + 64
        srv.receive_advertisement(adv)
    bcast = srv.close_advertise()
    for c in ids:
        up = timed(c, clients[c].share_keys, bcast)
        up_bytes[c] += sum(len(s.ciphertext) + len(s.nonce) for s in up.shares)
        srv.receive_share_upload(up)
    deliveries = srv.close_share()
    for i, c in enumerate(ids):
        if when == "mask" and i in dropped:
            continue  # dropped after sharing keys: its pairwise masks must be removed
        tm: dict[str, float] = {}
        t0 = time.perf_counter()
        mi = clients[c].masked_input(deliveries[c], upd[i], 10 + i, model_sha256=model, timings=tm)
        dt = time.perf_counter() - t0
        ctime[c] += dt
        stage_t.append(dt)
        mask_t.append(tm["mask"])
        vec_bytes = len(mi.data)
        up_bytes[c] += len(mi.data)
        srv.receive_masked_input(mi)
        del mi
    req = srv.close_mask()
    assert not isinstance(req, confide.secagg.ConsistencyRequest)
    responses = []
    for i, c in enumerate(ids):
        if i in dropped:
            continue
        resp = timed(c, clients[c].unmask, req)
        up_bytes[c] += sum(len(s) for _, s in (*resp.self_shares, *resp.key_shares))
        responses.append(resp)
    t0 = time.perf_counter()
    for resp in responses:
        srv.receive_unmask_response(resp)
    res = srv.close_unmask()
    mean = res.weighted_mean()
    unmask = time.perf_counter() - t0
    surv = [i for i in range(n) if not (when == "mask" and i in dropped)]
    w = np.array([10 + i for i in range(n)], dtype=np.float64)
    want = sum(w[i] * np.clip(upd[i], -CLIP, CLIP).astype(np.float64) for i in surv) / w[surv].sum()
    err = float(np.abs(mean - want).max())
    privacy, correctness = assess(n, k, t, 0, len(dropped))
    return {
        "framework": "confide",
        "n": n,
        "k": k,
        "t": t,
        "dropout": rate,
        "dim": dim,
        "mask_s": statistics.median(mask_t),
        "masked_stage_s": statistics.median(stage_t),
        "client_total_s": statistics.median(ctime.values()),
        "server_unmask_s": unmask,
        "vector_bytes": vec_bytes,
        "upload_bytes": statistics.median(up_bytes.values()),
        "max_abs_err": err,
        "modulus_bits": params.modulus_bits,
        "log2_privacy_failure(C=0)": privacy,
        "log2_correctness_failure": correctness,
    }


# -- Flower -------------------------------------------------------------------------------


def flower_available() -> bool:
    try:
        import flwr  # noqa: F401
    except ImportError:
        return False
    return True


def run_flower(n: int, k: int, dim: int, rate: float, when: str = "unmask") -> dict[str, Any]:
    import importlib

    import flwr

    # The package re-exports the function under the module's name: fetch the module itself.
    cmod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WKey
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
        SecAggPlusWorkflow,
    )
    from flwr.serverapp.grid import Grid
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    t = t_for(k)
    dropped = {i + 1 for i in dropped_for(n, rate)}
    upd = {i + 1: u for i, u in enumerate(updates_for(n, dim))}
    ctime = dict.fromkeys(upd, 0.0)
    up_bytes = dict.fromkeys(upd, 0)
    stage_t: list[float] = []
    mask_acc = {"t": 0.0}
    mask_t: list[float] = []
    vec_bytes = {"b": 0}
    in_clients = {"t": 0.0}

    def wrap(name: str) -> Any:
        real = getattr(cmod, name)

        def inner(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = real(*a, **kw)
            mask_acc["t"] += time.perf_counter() - t0
            return out

        return real, inner

    patched = {}
    for name in (
        "pseudo_rand_gen",
        "parameters_addition",
        "parameters_subtraction",
        "parameters_mod",
    ):
        patched[name], inner = wrap(name)
        setattr(cmod, name, inner)

    class Proxy(ClientProxy):
        def __init__(self, nid: int) -> None:
            super().__init__(str(nid))
            self.node_id = nid

        def get_properties(self, *a: Any, **kw: Any) -> Any:
            raise NotImplementedError

        get_parameters = fit = evaluate = reconnect = get_properties

    class FakeGrid(Grid):
        def __init__(self) -> None:
            self.ctx: dict[int, Context] = {}
            self.count = 0

        def set_run(self, run: Any) -> None:
            pass

        @property
        def run(self) -> Any:
            return None

        def create_message(self, *a: Any, **kw: Any) -> Any:
            raise NotImplementedError

        def get_node_ids(self) -> list[int]:
            return list(upd)

        def push_messages(self, messages: Any) -> Any:
            raise NotImplementedError

        def pull_messages(self, ids: Any) -> Any:
            raise NotImplementedError

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
            out = []
            for msg in messages:
                msg = copy.deepcopy(msg)  # what the network does
                msg.metadata.__dict__["_message_id"] = f"m{self.count}"
                self.count += 1
                nid = msg.metadata.dst_node_id
                stage = msg.content.config_records["secaggplus_configs"]["stage"]
                drop_stage = "collect_masked_vectors" if when == "mask" else "unmask"
                if nid in dropped and stage in (drop_stage, "unmask"):
                    continue  # dropped: never answers from this stage on
                ctx = self.ctx.setdefault(
                    nid,
                    Context(
                        run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={}
                    ),
                )

                def call_next(m: Any, c: Any, nid: int = nid) -> Any:
                    fitres = FitRes(
                        Status(Code.OK, ""), ndarrays_to_parameters([upd[nid]]), 10 + nid - 1, {}
                    )
                    return Message(compat.fitres_to_recorddict(fitres, False), reply_to=m)

                mask_acc["t"] = 0.0
                t0 = time.perf_counter()
                rep = cmod.secaggplus_mod(msg, ctx, call_next)
                dt = time.perf_counter() - t0
                in_clients["t"] += dt
                ctime[nid] += dt
                cfg = rep.content.config_records["secaggplus_configs"]
                sent = sum(len(v) for v in _bytes_in(cfg))
                up_bytes[nid] += sent
                if stage == "collect_masked_vectors":
                    stage_t.append(dt)
                    mask_t.append(mask_acc["t"])
                    vec_bytes["b"] = sent
                out.append(rep)
            return out

    try:
        cm = SimpleClientManager()
        for nid in upd:
            cm.register(Proxy(nid))
        strategy = FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n)
        agg_time = {"t": 0.0}
        real_agg = strategy.aggregate_fit

        def timed_agg(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = real_agg(*a, **kw)
            agg_time["t"] += time.perf_counter() - t0
            return out

        strategy.aggregate_fit = timed_agg  # type: ignore[method-assign]
        ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        lctx = LegacyContext(ctx, strategy=strategy, client_manager=cm)
        lctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WKey.CURRENT_ROUND: 1})
        lctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([np.zeros(dim, np.float32)]), True
        )
        wf = SecAggPlusWorkflow(num_shares=k + 1 if k < n - 1 else 1.0, reconstruction_threshold=t)
        unmask = {"t": 0.0}
        real_unmask = wf.unmask_stage

        def timed_unmask(*a: Any, **kw: Any) -> Any:
            before = in_clients["t"]
            t0 = time.perf_counter()
            ok = real_unmask(*a, **kw)
            unmask["t"] = time.perf_counter() - t0 - (in_clients["t"] - before) - agg_time["t"]
            if not ok:
                raise RuntimeError("Flower aborted the round")
            return ok

        wf.unmask_stage = timed_unmask  # type: ignore[method-assign]
        wf(FakeGrid(), lctx)
        params = compat.arrayrecord_to_parameters(
            lctx.state.array_records[MAIN_PARAMS_RECORD], True
        )
        mean = flwr.common.parameters_to_ndarrays(params)[0]
    finally:
        for name, real in patched.items():
            setattr(cmod, name, real)
    # Flower's FedAvg weighting is applied inside SecAgg+: compare with the survivors' mean.
    surv = [i for i in range(n) if not (when == "mask" and i + 1 in dropped)]
    w = np.array([10 + i for i in range(n)], dtype=np.float64)
    want = sum(w[i] * upd[i + 1].astype(np.float64) for i in surv) / w[surv].sum()
    return {
        "framework": f"flwr {flwr.__version__}",
        "n": n,
        "k": k,
        "t": t,
        "dropout": rate,
        "dim": dim,
        "mask_s": statistics.median(mask_t),
        "masked_stage_s": statistics.median(stage_t),
        "client_total_s": statistics.median(ctime.values()),
        "server_unmask_s": unmask["t"],
        "vector_bytes": vec_bytes["b"],
        "upload_bytes": statistics.median(up_bytes.values()),
        "max_abs_err": float(np.abs(mean - want).max()),
    }


def _bytes_in(cfg: Any) -> list[bytes]:
    out: list[bytes] = []
    for v in cfg.values():
        if isinstance(v, bytes):
            out.append(v)
        elif isinstance(v, list):
            out.extend(x for x in v if isinstance(x, bytes))
    return out


# -- main ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--dim", type=int, default=SQUEEZENET)
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--flower-complete", action="store_true")
    ap.add_argument(
        "--drop-stage",
        choices=["unmask", "mask"],
        default="unmask",
        help="drop after masking (default) or after sharing keys (pairwise masks to remove)",
    )
    ap.add_argument("--no-complete", action="store_true", help="skip confide complete n=100")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    have_flwr = flower_available()
    if not have_flwr:
        print("flwr not installed: running confide only")
    rows: list[dict[str, Any]] = []
    plan = [(n, k_for(n)) for n in args.n]
    if not args.no_complete and max(args.n) > 10:
        plan.append((max(args.n), max(args.n) - 1))
    for n, k in plan:
        for rate in args.dropout:
            row = run_confide(n, k, args.dim, rate, args.drop_stage)
            rows.append(row)
            _print(row)
            complete = k == n - 1 and n > 10
            if have_flwr and (not complete or args.flower_complete):
                frow = run_flower(n, k, args.dim, rate, args.drop_stage)
                rows.append(frow)
                _print(frow)
                _ratios(row, frow)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _print(r: dict[str, Any]) -> None:
    f32 = 4 * r["dim"]
    print(
        f"{r['framework']:>12} n={r['n']:<3} k={r['k']:<3} t={r['t']:<3} drop={r['dropout']:.0%} "
        f"| mask {r['mask_s'] * 1e3:8.1f} ms | masked stage {r['masked_stage_s'] * 1e3:8.1f} ms "
        f"| client total {r['client_total_s'] * 1e3:8.1f} ms "
        f"| server unmask {r['server_unmask_s']:7.3f} s "
        f"| vector {r['vector_bytes'] / 1e6:6.2f} MB ({r['vector_bytes'] / f32:.2f}x f32) "
        f"| upload {r['upload_bytes'] / 1e6:6.2f} MB | err {r['max_abs_err']:.1e}",
        flush=True,
    )


def _ratios(c: dict[str, Any], f: dict[str, Any]) -> None:
    print(
        f"{'flwr/confide':>12} {'':33}"
        f"| mask {f['mask_s'] / c['mask_s']:8.1f} x  "
        f"| masked stage {f['masked_stage_s'] / c['masked_stage_s']:8.1f} x  "
        f"| client total {f['client_total_s'] / c['client_total_s']:8.1f} x  "
        f"| server unmask {f['server_unmask_s'] / c['server_unmask_s']:7.1f} x "
        f"| vector {f['vector_bytes'] / c['vector_bytes']:.2f} x",
        flush=True,
    )


if __name__ == "__main__":
    main()
