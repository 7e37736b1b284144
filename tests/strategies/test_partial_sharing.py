"""Partial model sharing (``[sharing] fraction``): the subset, the server's aggregation, real
clients over HTTP (plain and SecAgg+), upload sizes, refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.client.partial import local_model_path, train_round_delta, upload_manifest
from confide.data import Dataset
from confide.errors import ConfigError, ShapeError
from confide.protocol.manifest import Manifest, decode_tensors, encode_tensors
from confide.protocol.sharing import (
    local_start,
    round_seed,
    scatter,
    shared_count,
    shared_indices,
    shared_manifest,
)
from confide.protocol.tasks import TrainConfig, parse_task
from confide.training import NumpyTrainer
from confide_server.app import open_engine
from confide_server.config import Config
from confide_server.engine.rounds import InvalidSubmissionError
from tests.server.conftest import FakeClock
from tests.server.util import N_FEATURES, eval_body, write_job
from tests.sites import run_sites

SEED = round_seed("test", 1, 1)


# --- the subset -----------------------------------------------------------------------


def test_known_answer_subset() -> None:
    """Pinned: a change to the PRG or the selection rule would split sites from servers."""
    assert SEED == "85b73b8bb5da0c28a187a9abb3661c3db6b5ef6d6757432b8e3745534549b51c"
    assert shared_indices(SEED, 100, 0.1).tolist() == [10, 35, 45, 52, 54, 62, 64, 74, 96, 99]
    assert shared_indices(round_seed("test", 1, 2), 5, 0.4).tolist() == [0, 4]


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 5000),
    fraction=st.floats(0.001, 1.0),
    rnd=st.integers(1, 10**6),
)
def test_subset_is_deterministic_sorted_and_of_the_right_size(
    size: int, fraction: float, rnd: int
) -> None:
    seed = round_seed("job", 7, rnd)
    a = shared_indices(seed, size, fraction)
    b = shared_indices(seed, size, fraction)  # another site, another process: same answer
    assert np.array_equal(a, b)
    assert len(a) == shared_count(size, fraction) == min(size, max(1, round(fraction * size)))
    assert len(np.unique(a)) == len(a)
    assert np.all(np.diff(a) > 0)
    assert a.min() >= 0
    assert a.max() < size


def test_rounds_share_different_subsets_and_full_sharing_is_everything() -> None:
    subsets = {tuple(shared_indices(round_seed("j", 1, r), 1000, 0.2)) for r in range(1, 6)}
    assert len(subsets) == 5
    assert shared_indices(SEED, 7, 1.0).tolist() == list(range(7))


def test_scatter_and_local_start_keep_what_is_not_shared() -> None:
    base = np.arange(6, dtype=np.float32)
    idx = np.array([1, 4])
    out = scatter(base, idx, np.array([10.0, 40.0], np.float32))
    assert out.tolist() == [0, 10, 2, 3, 40, 5]
    assert base.tolist() == list(range(6))  # a copy
    glob = np.full(6, -1.0, np.float32)
    assert local_start(glob, base, idx).tolist() == [0, -1, 2, 3, -1, 5]
    assert local_start(glob, None, idx).tolist() == [-1.0] * 6
    with pytest.raises(ShapeError, match="one value per shared index"):
        scatter(base, idx, np.zeros(3, np.float32))


def test_bad_fractions_and_seeds_are_refused() -> None:
    for bad in (0.0, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match=r"fraction must be a number in \(0, 1\]"):
            shared_count(10, bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="share_seed must be 64 hex digits"):
        shared_indices("zz", 10, 0.5)
    with pytest.raises(ConfigError, match="share_fraction < 1 needs share_seed"):
        TrainConfig(share_fraction=0.5)
    with pytest.raises(ConfigError, match=r"share_fraction must be in \(0, 1\]"):
        TrainConfig(share_fraction=2.0)


# --- the site -------------------------------------------------------------------------


def test_site_starts_from_its_own_values_off_the_subset_and_keeps_them_on_disk(
    tmp_path: Path,
) -> None:
    """Round 2 starts from the global values on round 2's subset and from the site's own
    round-1 result elsewhere; the upload is the shared coordinates only; a fresh process
    (restart) reads the local model back."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, N_FEATURES)).astype(np.float32)
    data = Dataset(x, (x[:, 0] > 0).astype(np.int64))
    trainer = NumpyTrainer.create("mlp", N_FEATURES, 2, (8,), seed=0)
    size = trainer.manifest.size
    glob = trainer.get_weights()
    cfg1 = TrainConfig(1, 8, 0.5, share_fraction=0.2, share_seed=round_seed("j", 1, 1))
    delta1, n, _ = train_round_delta(trainer, glob, data, cfg1, 0, tmp_path)
    idx1 = shared_indices(cfg1.share_seed or "", size, 0.2)
    assert n == 30
    assert delta1.shape == (len(idx1),)
    local1 = np.load(local_model_path(tmp_path, trainer), allow_pickle=False)
    np.testing.assert_allclose(delta1, (local1 - glob)[idx1], atol=1e-7)
    # round 2, in a "restarted" process: a fresh trainer object
    glob2 = glob + 1.0  # whatever the server made of round 1
    cfg2 = TrainConfig(1, 8, 0.5, share_fraction=0.2, share_seed=round_seed("j", 1, 2))
    idx2 = shared_indices(cfg2.share_seed or "", size, 0.2)
    start = local_start(glob2, local1, idx2)
    fresh = NumpyTrainer.from_manifest(trainer.manifest)
    delta2, _, _ = train_round_delta(fresh, glob2, data, cfg2, 1, tmp_path)
    ref = NumpyTrainer.from_manifest(trainer.manifest, start)
    ref.fit(data, cfg2, seed=1)
    np.testing.assert_allclose(delta2, (ref.get_weights() - start)[idx2], atol=1e-6)
    # the upload is a one-tensor body of the subset's length
    assert upload_manifest(trainer.manifest, cfg2) == shared_manifest(len(idx2))
    assert upload_manifest(trainer.manifest, TrainConfig()) == trainer.manifest


def test_norm_bound_applies_to_the_shared_vector(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, N_FEATURES)).astype(np.float32)
    data = Dataset(x, (x[:, 0] > 0).astype(np.int64))
    trainer = NumpyTrainer.create("mlp", N_FEATURES, 2, (8,), seed=0)
    cfg = TrainConfig(
        3, 4, 1.0, update_clip_norm=0.01, share_fraction=0.3, share_seed=round_seed("j", 1, 1)
    )
    delta, _, _ = train_round_delta(trainer, trainer.get_weights(), data, cfg, 0, tmp_path)
    assert float(np.linalg.norm(delta.astype(np.float64))) == pytest.approx(0.01, rel=1e-5)


# --- the server -----------------------------------------------------------------------


def _job(tmp: Path, **kw: Any) -> tuple[Config, Manifest]:
    """A 58-parameter MLP job (the tiny 5-parameter model has too few to sample 20 % of)."""
    # Tests read the stored updates after their rounds close: keep them (retention).
    cfg = write_job(tmp, sharing__fraction=0.2, retention__prune_updates=False, **kw)
    trainer = NumpyTrainer.create("mlp", N_FEATURES, 2, (8,), seed=0)
    trainer.manifest.save(tmp / "model.json")
    (tmp / "init.safetensors").write_bytes(encode_tensors(trainer.manifest, trainer.get_weights()))
    return cfg, trainer.manifest


def test_server_leaves_unshared_coordinates_unchanged(tmp_path: Path) -> None:
    cfg, manifest = _job(tmp_path, job__wait_for_clients=2)
    eng = open_engine(cfg, clock=FakeClock())
    for c in ("a", "b"):
        eng.enroll(eng.create_tokens(1)[0], c, f"key-{c}")
        eng.touch(c)
    base = decode_tensors(manifest, eng.blobs.read(eng.store.model_path(eng.current_model)))[0]  # type: ignore[arg-type]
    assert eng.tick()
    task = parse_task(eng.task_for("a").to_json())
    assert task.config.share_fraction == 0.2  # type: ignore[union-attr]
    assert task.config.share_seed == round_seed("test", 1, 1)  # type: ignore[union-attr]
    idx = shared_indices(round_seed("test", 1, 1), manifest.size, 0.2)
    k = len(idx)
    assert k == 12
    values = {"a": (1.0, 10), "b": (4.0, 30)}
    for c, (v, n) in values.items():
        body = encode_tensors(
            shared_manifest(k), np.full(k, v, np.float32), {"num_examples": str(n)}
        )
        eng.commit_submission(eng.prepare(c, 1, "train", body), nonce=f"{c}-train")
    # a full-length upload is refused: the round shares 12 values, not 58
    with pytest.raises(InvalidSubmissionError, match="upload the round's shared coordinates"):
        eng.prepare("a", 1, "train", encode_tensors(manifest, base, {"num_examples": "1"}))
    assert eng.tick()
    for c in ("a", "b"):
        eng.commit_submission(eng.prepare(c, 1, "evaluate", eval_body(0.5)), nonce=f"{c}-e")
    eng.tick()
    new = decode_tensors(manifest, eng.blobs.read(eng.store.model_path(eng.current_model)))[0]  # type: ignore[arg-type]
    others = np.setdiff1d(np.arange(manifest.size), idx)
    assert np.array_equal(new[others], base[others])  # bit for bit
    np.testing.assert_allclose(new[idx], base[idx] + (1.0 * 10 + 4.0 * 30) / 40, atol=1e-6)


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ({"strategy__name": "fedadam"}, "keeps per-coordinate server moments"),
        ({"sharing__fraction": 0.0}, r"fraction must be a number in \(0, 1\]"),
        ({"sharing__fraction": 1.5}, r"fraction must be a number in \(0, 1\]"),
        ({"sharing__fraction": "0.2"}, "sharing.fraction must be float"),
        ({"sharing__seed": 3}, "unexpected|unknown"),
        (
            {
                "secagg__enabled": True,
                "secagg__adversarial_fraction": 0.0,
                "secagg__dropout_fraction": 0.34,
                "job__cohort_size": 3,
                "job__wait_for_clients": 3,
                "privacy__mode": "distributed",
                "privacy__noise_multiplier": 1.0,
            },
            "ring modes calibrate",
        ),
    ],
)
def test_bad_sharing_configs_are_refused(
    tmp_path: Path, setting: dict[str, Any], says: str
) -> None:
    kw = {"sharing__fraction": 0.2, **setting}
    with pytest.raises(ConfigError, match=says):
        write_job(tmp_path, **kw)


def test_full_sharing_tasks_read_as_before(tmp_path: Path) -> None:
    cfg = write_job(tmp_path, job__wait_for_clients=1, sharing__fraction=1.0)
    eng = open_engine(cfg, clock=FakeClock())
    eng.enroll(eng.create_tokens(1)[0], "a", "key-a")
    eng.touch("a")
    eng.tick()
    assert set(eng.task_for("a").to_json()["config"]) == {"epochs", "batch_size", "learning_rate"}


# --- real clients over HTTP ------------------------------------------------------------


async def _federate(make_fed: Any, cfg: Config, tmp: Path, sites: tuple[str, ...]) -> Any:
    fed = await make_fed(cfg)
    statuses = await run_sites(fed, tmp, sites, np.random.default_rng(5), timeout=300)
    assert statuses == ["finished"] * len(sites)
    return fed


def _models(fed: Any, manifest: Manifest) -> list[np.ndarray]:
    """The model before each round, then the final one."""

    def read(sha: str) -> np.ndarray:
        path = fed.engine.store.model_path(sha)
        return decode_tensors(manifest, fed.engine.blobs.read(path))[0]

    rounds = fed.engine.config.job.rounds
    return [read(fed.engine.store.get_round(r).base_model) for r in range(1, rounds + 1)] + [
        read(fed.engine.current_model)
    ]


async def test_plain_federation_over_http_shares_a_fifth(make_fed: Any, tmp_path: Path) -> None:
    """Two confide.Client sites, 2 rounds, fraction 0.2: every stored upload holds the round's
    12 values (about a fifth of the full body), each round moves only its subset, and each
    site keeps its local model on disk."""
    cfg, manifest = _job(tmp_path / "job", strategy__learning_rate=0.5)
    fed = await _federate(make_fed, cfg, tmp_path, ("a", "b"))
    full = len(
        encode_tensors(manifest, np.zeros(manifest.size, np.float32), {"num_examples": "40"})
    )
    for r in (1, 2):
        subs = fed.engine.store.submissions(r, "train")
        assert len(subs) == 2
        for s in subs:
            body = fed.engine.blobs.read(s.blob)
            assert decode_tensors(shared_manifest(12), body)[0].shape == (12,)
            assert len(body) < 0.45 * full  # 12 of 58 values plus a header
    m0, m1, m2 = _models(fed, manifest)
    for r, (before, after) in enumerate(((m0, m1), (m1, m2)), start=1):
        idx = shared_indices(round_seed("test", 1, r), manifest.size, 0.2)
        others = np.setdiff1d(np.arange(manifest.size), idx)
        assert np.array_equal(before[others], after[others])
        assert not np.array_equal(before[idx], after[idx])
    for c in ("a", "b"):
        probe = NumpyTrainer.from_manifest(manifest)
        assert local_model_path(tmp_path / c, probe).exists()


async def test_secagg_federation_over_http_masks_the_subset(make_fed: Any, tmp_path: Path) -> None:
    """Three confide.Client sites under SecAgg+, fraction 0.2: the masked vectors have the
    subset's length, the sum is consistent, and unshared coordinates stay as they were."""
    cfg, manifest = _job(
        tmp_path / "job",
        strategy__learning_rate=0.5,
        job__rounds=1,
        job__cohort_size=3,
        job__min_clients=3,
        job__wait_for_clients=3,
        secagg__enabled=True,
        secagg__adversarial_fraction=0.0,
        secagg__dropout_fraction=0.34,
    )
    fed = await _federate(make_fed, cfg, tmp_path, ("a", "b", "c"))
    assert fed.engine.secure_vector_length == 12
    row = fed.engine.store.get_round(1)
    assert row.status == "committed"
    m0, m1 = _models(fed, manifest)
    idx = shared_indices(round_seed("test", 1, 1), manifest.size, 0.2)
    others = np.setdiff1d(np.arange(manifest.size), idx)
    assert np.array_equal(m0[others], m1[others])
    assert not np.array_equal(m0[idx], m1[idx])
