"""Measured privacy attacks: analytic first-layer inversion and trap weights.

A malicious server crafts the first layer of an MLP and sends the same model to every site
(so the model looks consistent to each site). For a first layer ``y = x W + b`` followed by
ReLU, one record's gradient is ``dL/dW[:, j] = g_j x`` and ``dL/db[j] = g_j``, so
``x = dW[:, j] / db[j]`` for any neuron ``j`` with ``g_j != 0`` (Phong et al. 2017; Geiping
et al. 2020). For a *sum* of many records the server makes each neuron fire for only a few
records, so many neurons' ratios equal single records even in the SecAgg+ sum over all
sites:

* ``"trap"`` (Boenisch et al. 2021, "When the curious abandon honesty"): random unit
  directions with a bias at the ``1 - p`` quantile of the server's auxiliary data, so each
  neuron fires for a fraction ``p`` of the records; a neuron that fires for exactly one
  record gives it back as ``dW[:, j] / db[j]``.
* ``"binned"`` (Fowl et al. 2022, "Robbing the fed"): groups of neurons share one direction
  ``a`` with biases at the quantiles of ``a . x``; neuron ``k`` fires when ``a . x > c_k``,
  so the difference of consecutive neurons isolates the records in bin ``(c_k, c_{k+1}]``.

Every second-layer row is the same ``[v, -v]`` (``v`` small, so the logits stay near 0 and
no record's gradient vanishes), which makes ``g_j`` the same for every neuron of a record.

The sites run confide's own code, as the client does: :func:`confide.client.training.fit_round`
(``NumpyTrainer.fit`` without DP; :func:`confide.privacy.run_dpsgd` with per-sample clipping
and Rust-core noise with DP), :func:`confide.client.training.bound_update`, the SecAgg+
clipping to ``clip_range`` and weighting by the example count of
:class:`confide.client.secure.SecureParticipant`, and the SecAgg+ protocol itself
(:class:`~confide.secagg.ClientSecAgg` / :class:`~confide.secagg.ServerSecAgg`, in process,
every message through its JSON form). One local step over the whole site (FedSGD, the worst
case) with a learning rate the server chose, so a site's update is ``-lr * gradient``.

The metric: a true record is *re-identified* when some recovered vector ``r`` has relative
error ``||r - x|| / ||x|| < 1e-3`` (:data:`MATCH_REL_ERR`). The chance level is the same
matching applied to a disjoint held-out set of real records that no site holds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from numpy.typing import NDArray

from confide import DPSGDConfig, NumpyTrainer, SecureRng, TrainConfig
from confide.client.training import bound_update, fit_round
from confide.data import Dataset, load_breast_cancer
from confide.secagg import (
    AggregateResult,
    ClientSecAgg,
    RoundSetup,
    SecAggParams,
    ServerSecAgg,
    required_modulus_bits,
)
from confide.secagg.crypto import ed25519_public

__all__ = [
    "ARMS",
    "MATCH_REL_ERR",
    "Arm",
    "ArmResult",
    "Federation",
    "Kind",
    "TrapModel",
    "best_relative_errors",
    "binomial_tolerance",
    "invert_single",
    "make_federation",
    "make_image_federation",
    "recover_records",
    "reidentification",
    "run_arm",
    "secagg_params",
    "secagg_sum",
    "site_update",
    "trap_model",
]

#: A recovered vector re-identifies a record when ``||r - x|| / ||x||`` is below this.
MATCH_REL_ERR = 1e-3
#: The arms: what the server sees, and whether the sites train with DP-SGD.
ARMS = ("unprotected", "secagg", "secagg_dp")

Arm = Literal["unprotected", "secagg", "secagg_clip_only", "secagg_dp"]
Kind = Literal["trap", "binned"]


@dataclass(frozen=True)
class Federation:
    """Sites' records, a disjoint held-out set (chance level) and the server's auxiliary set.

    Parameters
    ----------
    sites : tuple of Dataset
        One small dataset per site (standardized breast-cancer records).
    held_out : numpy.ndarray
        ``(m, 30)`` real records no site holds: matching recovered vectors against them
        gives the chance level.
    public : numpy.ndarray
        ``(p, 30)`` records the server knows (its prior on the feature distribution): the
        trap biases are set at quantiles of them. Disjoint from the other two.
    """

    sites: tuple[Dataset, ...]
    held_out: NDArray[np.float32]
    public: NDArray[np.float32]

    @property
    def records(self) -> NDArray[np.float32]:
        """All sites' records, stacked (site order)."""
        out: NDArray[np.float32] = np.concatenate([s.x for s in self.sites]).astype(np.float32)
        return out


def make_federation(
    seed: int,
    n_sites: int = 10,
    min_records: int = 8,
    max_records: int = 16,
    n_held_out: int = 150,
) -> Federation:
    """Split the standardized breast-cancer set into small sites, a held-out and a public set.

    Parameters
    ----------
    seed : int
        Shuffling seed.
    n_sites : int
        Number of sites (patient devices).
    min_records, max_records : int
        Each site holds a uniform number of records in ``[min_records, max_records]``.
    n_held_out : int
        Size of the held-out set; the remaining records form the public set.

    Returns
    -------
    Federation
        The split.
    """
    ds = load_breast_cancer()
    x = ds.x.astype(np.float64)
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    sizes = rng.integers(min_records, max_records + 1, size=n_sites)
    sites: list[Dataset] = []
    at = 0
    for n in sizes:
        idx = order[at : at + int(n)]
        sites.append(Dataset(np.ascontiguousarray(x[idx]), ds.y[idx].copy()))
        at += int(n)
    held_out = np.ascontiguousarray(x[order[at : at + n_held_out]])
    public = np.ascontiguousarray(x[order[at + n_held_out :]])
    return Federation(tuple(sites), held_out, public)


def make_image_federation(
    seed: int,
    size: int = 32,
    n_sites: int = 10,
    min_records: int = 8,
    max_records: int = 16,
    n_held_out: int = 150,
) -> Federation:
    """The same split over lesion tiles (:mod:`confide.data.lesions`), flattened to [0, 1].

    Whole pseudo-patients go to one set (their tiles are jittered crops of one region), so
    a held-out tile is never a crop of a site's patient.

    Parameters
    ----------
    seed : int
        Tile generation and shuffling seed.
    size : int
        Tile side; each record has ``size * size`` features.
    n_sites, min_records, max_records, n_held_out : int
        As in :func:`make_federation` (in tiles).

    Returns
    -------
    Federation
        The split (labels: lesion or not).
    """
    from confide.data.lesions import generate_lesion_tiles

    tiles = generate_lesion_tiles(n_patients=150, tiles_per_patient=4, size=size, seed=seed)
    x = (tiles.images.reshape(len(tiles.images), -1).astype(np.float32) / 255.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    patients = rng.permutation(np.unique(tiles.patient_ids))
    order = np.concatenate([np.flatnonzero(tiles.patient_ids == p) for p in patients])
    sizes = rng.integers(min_records, max_records + 1, size=n_sites)
    sites: list[Dataset] = []
    at = 0
    for n in sizes:
        idx = order[at : at + int(n)]
        sites.append(Dataset(np.ascontiguousarray(x[idx]), tiles.labels[idx].copy()))
        at += int(n)
    # Skip to the next patient boundary so no patient straddles two sets.
    ids = tiles.patient_ids[order]
    while 0 < at < len(order) and ids[at] == ids[at - 1]:
        at += 1
    held = order[at : at + n_held_out]
    at += n_held_out
    while 0 < at < len(order) and ids[at] == ids[at - 1]:
        at += 1
    return Federation(
        tuple(sites), np.ascontiguousarray(x[held]), np.ascontiguousarray(x[order[at:]])
    )


@dataclass(frozen=True)
class TrapModel:
    """A server-crafted model and what the server needs to invert updates of it.

    Parameters
    ----------
    trainer : NumpyTrainer
        ReLU MLP ``d -> n_hidden -> 2`` (``d`` features) carrying the crafted weights.
    kind : {"trap", "binned"}
        The first-layer construction.
    groups : tuple of numpy.ndarray
        ``"binned"``: the neuron indices of each group, thresholds ascending (differences of
        consecutive neurons isolate a bin). ``"trap"``: empty.
    learning_rate : float
        The learning rate the server sends with the task (``1 / v``, so updates are O(1)).
    """

    trainer: NumpyTrainer
    kind: Kind
    groups: tuple[NDArray[np.int64], ...]
    learning_rate: float

    @property
    def weights(self) -> NDArray[np.float32]:
        """The model's flat vector (what the server announces)."""
        return self.trainer.get_weights()


def _unit_columns(rng: np.random.Generator, d: int, n: int) -> NDArray[np.float64]:
    w = rng.normal(size=(d, n))
    out: NDArray[np.float64] = w / np.linalg.norm(w, axis=0, keepdims=True)
    return out


def trap_model(
    public: NDArray[np.float32],
    kind: Kind = "binned",
    n_hidden: int = 1024,
    *,
    seed: int = 0,
    fire_fraction: float = 1.0 / 120.0,
    n_groups: int = 4,
    v: float = 1e-4,
) -> TrapModel:
    """Craft a trap-weight (``"trap"``) or binned (``"binned"``) first layer.

    Parameters
    ----------
    public : numpy.ndarray
        The server's auxiliary records (the biases are quantiles of their projections).
    kind : {"trap", "binned"}
        See the module docstring.
    n_hidden : int
        First-layer width.
    seed : int
        Seed of the directions.
    fire_fraction : float
        ``"trap"``: fraction of records each neuron fires for (about one record of a sum
        of ``1 / fire_fraction``).
    n_groups : int
        ``"binned"``: number of directions; ``n_hidden // n_groups`` bins each.
    v : float
        Second-layer weight magnitude; the task's learning rate is ``1 / v``.

    Returns
    -------
    TrapModel
        The model and its inversion metadata.
    """
    d = int(public.shape[1])
    trainer = NumpyTrainer.create("mlp", d, 2, hidden=(n_hidden,), activation="relu")
    vec = trainer.get_weights()
    views = trainer.manifest.unflatten(vec)
    rng = np.random.default_rng(seed)
    pub = np.asarray(public, dtype=np.float64)
    groups: list[NDArray[np.int64]] = []
    if kind == "trap":
        w = _unit_columns(rng, d, n_hidden)
        thresholds = np.quantile(pub @ w, 1.0 - fire_fraction, axis=0)
        views["layer0.weight"][...] = w
        views["layer0.bias"][...] = -thresholds
    else:
        bins = n_hidden // n_groups
        a = _unit_columns(rng, d, n_groups)
        w = np.zeros((d, n_hidden))
        b = np.full(n_hidden, 0.0)  # neurons past n_groups * bins never fire (bias -1e6)
        b[n_groups * bins :] = -1e6
        for g in range(n_groups):
            proj = pub @ a[:, g]
            cuts = np.quantile(proj, np.arange(bins) / bins)
            cuts[0] = proj.min() - 1.0  # the first neuron fires for (almost) every record
            cols = np.arange(g * bins, (g + 1) * bins, dtype=np.int64)
            w[:, cols] = a[:, g : g + 1]
            b[cols] = -cuts
            groups.append(cols)
        views["layer0.weight"][...] = w
        views["layer0.bias"][...] = b
    views["layer1.weight"][:, 0] = v
    views["layer1.weight"][:, 1] = -v
    views["layer1.bias"][...] = 0.0
    trainer.set_weights(vec)
    return TrapModel(trainer, kind, tuple(groups), 1.0 / v)


def recover_records(model: TrapModel, update: NDArray[np.float32]) -> NDArray[np.float64]:
    """Invert one (summed) update of ``model``: one candidate record per neuron (or bin).

    Parameters
    ----------
    model : TrapModel
        The crafted model the update was computed at.
    update : numpy.ndarray
        A site's update or the SecAgg+ sum (any positive scaling: the ratio cancels it).

    Returns
    -------
    numpy.ndarray
        ``(k, d)`` float64 candidates (rows with a zero or non-finite denominator dropped).
    """
    views = model.trainer.manifest.unflatten(np.ascontiguousarray(update, dtype=np.float32))
    dw = views["layer0.weight"].astype(np.float64)  # (30, h)
    db = views["layer0.bias"].astype(np.float64)  # (h,)
    if model.kind == "binned":
        num_parts, den_parts = [], []
        for cols in model.groups:
            gw, gb = dw[:, cols], db[cols]
            num_parts.append(gw - np.concatenate([gw[:, 1:], np.zeros((gw.shape[0], 1))], axis=1))
            den_parts.append(gb - np.concatenate([gb[1:], [0.0]]))
        dw, db = np.concatenate(num_parts, axis=1), np.concatenate(den_parts)
    ok = db != 0.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cand = (dw[:, ok] / db[ok]).T
    keep: NDArray[np.float64] = cand[np.isfinite(cand).all(axis=1)]
    return keep


def best_relative_errors(
    candidates: NDArray[np.float64], records: NDArray[np.floating[Any]]
) -> NDArray[np.float64]:
    """For each record, ``min_r ||r - x|| / ||x||`` over the candidates (inf: none)."""
    x = np.asarray(records, dtype=np.float64)
    if candidates.shape[0] == 0:
        return np.full(len(x), np.inf)
    best = np.full(len(x), np.inf)
    chunk = max(1, (1 << 22) // max(1, x.size))  # bounded (chunk, n, d) temporaries
    for start in range(0, candidates.shape[0], chunk):
        c = candidates[start : start + chunk]
        d = np.linalg.norm(c[:, None, :] - x[None, :, :], axis=2).min(axis=0)
        best = np.minimum(best, d)
    out: NDArray[np.float64] = best / np.linalg.norm(x, axis=1)
    return out


def reidentification(
    candidates: NDArray[np.float64],
    records: NDArray[np.floating[Any]],
    threshold: float = MATCH_REL_ERR,
) -> float:
    """Fraction of ``records`` matched by a candidate (relative error < ``threshold``)."""
    return float((best_relative_errors(candidates, records) < threshold).mean())


def invert_single(trainer: NumpyTrainer, update: NDArray[np.float32]) -> NDArray[np.float64]:
    """Analytic inversion of a one-record update: ``dW[:, j] / db[j]`` at the largest ``|db|``.

    Parameters
    ----------
    trainer : NumpyTrainer
        Any MLP (its manifest gives the layout of the flat vector).
    update : numpy.ndarray
        The site's update ``-lr * gradient`` of one record.

    Returns
    -------
    numpy.ndarray
        The recovered record, float64 ``(n_features,)``.
    """
    views = trainer.manifest.unflatten(np.ascontiguousarray(update, dtype=np.float32))
    dw = views["layer0.weight"].astype(np.float64)
    db = views["layer0.bias"].astype(np.float64)
    j = int(np.argmax(np.abs(db)))
    out: NDArray[np.float64] = dw[:, j] / db[j]
    return out


def site_update(
    trainer: NumpyTrainer,
    weights: NDArray[np.float32],
    data: Dataset,
    config: TrainConfig,
    *,
    seed: int,
    rng: SecureRng | None = None,
) -> NDArray[np.float32]:
    """A site's update, computed as the client computes it.

    :func:`confide.client.training.train_delta` with its DP generator made explicit (a seeded
    :class:`~confide.SecureRng`, so the DP arm is reproducible): ``fit_round`` (the engine's
    ``fit`` without DP, ``run_dpsgd`` with), then ``bound_update``.
    """
    trainer.set_weights(weights)
    fit_round(trainer, data, config, seed, rng=rng)
    return bound_update((trainer.get_weights() - weights).astype(np.float32), config)


def secagg_params(n: int, clip_range: float, max_weight: int, quant_bits: int = 32) -> SecAggParams:
    """Complete-graph SecAgg+ parameters for ``n`` sites (threshold as tests/secagg uses)."""
    k = n - 1
    t = (k + 3) // 2
    return SecAggParams(
        n=n,
        k=k,
        t=t,
        max_dropouts=n - t,
        quant_bits=quant_bits,
        clip_range=clip_range,
        max_weight=max_weight,
        modulus_bits=required_modulus_bits(n, quant_bits, max_weight),
    )


def _wire(msg: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(msg.to_json()))
    return out


def secagg_sum(
    updates: Sequence[NDArray[np.float32]],
    weights: Sequence[int],
    params: SecAggParams,
    model_bytes: bytes,
    seed: bytes,
) -> AggregateResult:
    """Run one SecAgg+ round over ``updates`` in process; return what the server learns.

    Each site clips its update to ``params.clip_range`` and masks it with its example count
    (capped at ``max_weight``), as :class:`confide.client.secure.SecureParticipant` does;
    every message travels as its JSON form. The server sees only the masked inputs and the
    unmasked sum.
    """
    ids = [f"site{i:02d}" for i in range(len(updates))]
    keys = {
        c: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed + c.encode()).digest())
        for c in ids
    }
    model_sha = hashlib.sha256(model_bytes).digest()
    setup = RoundSetup(
        round=1,
        cohort=tuple(ids),
        identity_keys=tuple((c, ed25519_public(keys[c])) for c in ids),
        params=params,
        vector_length=int(updates[0].shape[0]),
        model_sha256=model_sha,
        consistency_check=False,
    )
    clients = {
        c: ClientSecAgg(
            setup, c, keys[c], rng=SecureRng(hashlib.sha256(seed + b"rng" + c.encode()).digest())
        )
        for c in ids
    }
    server = ServerSecAgg(setup)
    for c in ids:
        server.receive_advertisement(_wire(clients[c].advertise()))
    bcast = _wire(server.close_advertise())
    for c in ids:
        server.receive_share_upload(_wire(clients[c].share_keys(bcast)))
    deliveries = {c: _wire(m) for c, m in server.close_share().items()}
    for c, update, w in zip(ids, updates, weights, strict=True):
        clipped = np.clip(update, -params.clip_range, params.clip_range).astype(np.float32)
        masked = clients[c].masked_input(
            deliveries[c], clipped, min(int(w), params.max_weight), model_sha256=model_sha
        )
        server.receive_masked_input(_wire(masked))
    req = _wire(server.close_mask())
    for c in ids:
        server.receive_unmask_response(_wire(clients[c].unmask(req)))
    return server.close_unmask()


@dataclass(frozen=True)
class ArmResult:
    """One arm's outcome.

    Parameters
    ----------
    arm : str
        ``"unprotected"``, ``"secagg"``, ``"secagg_clip_only"`` or ``"secagg_dp"``.
    reidentified : float
        Fraction of the sites' records re-identified.
    chance : float
        The same matching against the held-out records.
    n_records, n_held_out, n_candidates : int
        Sizes.
    errors : numpy.ndarray
        Per true record, the best relative error of any candidate.
    candidates : numpy.ndarray
        The recovered vectors.
    """

    arm: str
    reidentified: float
    chance: float
    n_records: int
    n_held_out: int
    n_candidates: int
    errors: NDArray[np.float64]
    candidates: NDArray[np.float64]

    def to_json(self) -> dict[str, Any]:
        """The figures (no records)."""
        finite = self.errors[np.isfinite(self.errors)]
        return {
            "arm": self.arm,
            "reidentified": self.reidentified,
            "chance": self.chance,
            "n_records": self.n_records,
            "n_held_out": self.n_held_out,
            "n_candidates": self.n_candidates,
            "median_best_rel_error": float(np.median(finite)) if finite.size else None,
        }


def binomial_tolerance(p: float, n: int, sigmas: float = 3.0) -> float:
    """``sigmas`` standard errors of a rate ``p`` over ``n`` trials (floored at ``p = 1/n``)."""
    q = max(p, 1.0 / n)
    return sigmas * math.sqrt(q * (1.0 - q) / n)


def run_arm(
    fed: Federation,
    model: TrapModel,
    arm: Arm,
    *,
    seed: int = 0,
    noise_multiplier: float = 1.0,
    clip_norm: float = 1.0,
    clip_range: float = 64.0,
    quant_bits: int = 32,
) -> ArmResult:
    """Run one arm of the attack with confide's trainer and aggregation.

    Parameters
    ----------
    fed : Federation
        The sites.
    model : TrapModel
        The model the server sends to every site.
    arm : {"unprotected", "secagg", "secagg_clip_only", "secagg_dp"}
        ``unprotected``: the server sees every site's update. ``secagg``: only the SecAgg+
        sum. ``secagg_dp``: the sum, each site training with sample-mode DP-SGD
        (``noise_multiplier``, ``clip_norm``, ``q = 1``, one step). ``secagg_clip_only``: the
        same DP-SGD path with ``z = 0`` (per-sample clipping, no noise).
    seed : int
        Seeds the training order, the DP generators and the SecAgg+ keys.
    noise_multiplier, clip_norm : float
        DP-SGD ``z`` and ``C``.
    clip_range : float
        SecAgg+ quantizer range (the server's choice).
    quant_bits : int
        SecAgg+ quantizer bits (the server's choice; its config default is 16).

    Returns
    -------
    ArmResult
        The re-identification rate and its chance level.
    """
    lr = model.learning_rate
    max_n = max(len(s) for s in fed.sites)
    if arm in ("secagg_dp", "secagg_clip_only"):
        z = noise_multiplier if arm == "secagg_dp" else 0.0
        dp = DPSGDConfig(noise_multiplier=z, clip_norm=clip_norm, sampling_rate=1.0, steps=1)
        config = TrainConfig(epochs=1, batch_size=max_n, learning_rate=lr, dp=dp)
    else:
        config = TrainConfig(epochs=1, batch_size=max_n, learning_rate=lr)
    weights = model.weights
    trainer = NumpyTrainer.from_manifest(model.trainer.manifest)
    updates = [
        site_update(
            trainer,
            weights,
            site,
            config,
            seed=seed + i,
            rng=SecureRng(hashlib.sha256(f"dp-{seed}-{i}".encode()).digest()),
        )
        for i, site in enumerate(fed.sites)
    ]
    if arm == "unprotected":
        candidates = np.concatenate([recover_records(model, u) for u in updates])
    else:
        params = secagg_params(len(updates), clip_range, max_weight=max_n, quant_bits=quant_bits)
        result = secagg_sum(
            updates,
            [len(s) for s in fed.sites],
            params,
            weights.tobytes(),
            seed=f"secagg-{seed}".encode(),
        )
        candidates = recover_records(model, result.weighted_sum())
    records = fed.records
    errors = best_relative_errors(candidates, records)
    return ArmResult(
        arm=arm,
        reidentified=float((errors < MATCH_REL_ERR).mean()),
        chance=reidentification(candidates, fed.held_out),
        n_records=len(records),
        n_held_out=len(fed.held_out),
        n_candidates=int(candidates.shape[0]),
        errors=errors,
        candidates=candidates,
    )
