"""Ghost-norm clipping of per-patient sums: the same clipped sum as materialised rows.

The exact norm bound is tested directly (every patient's clipped contribution has norm at
most ``C``), the error bound of the Gram-matrix norms against explicit products (including
a product that cancels to zero), and equality with the materialised path (Rust-kernel
clipping of per-sample rows) at float tolerance. Also the distributed path's reused
workspace: bit-identical ring vectors at fixed seeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from confide.data.images import ArrayDataset  # noqa: E402
from confide.noise import SecureRng  # noqa: E402
from confide.privacy import distributed_dpsgd, dpsgd  # noqa: E402
from confide.privacy.distributed_dpsgd import (  # noqa: E402
    SampleDDGConfig,
    _TrainablePart,
    calibrate,
    site_step,
)
from confide.privacy.torch_ghost import (  # noqa: E402
    clip_target,
    ghost_clipped_sum,
    ghost_sq_norms,
    plan_layer,
)
from confide.training.torch_engine import TorchTrainer  # noqa: E402
from confide.training.trainable import with_trainable  # noqa: E402

SIDE = 24  # SqueezeNet at 24x24: 11x11, 5x5, 2x2 Fire stages (ghost and row layers both)


def _data(ids: list[str], side: int = SIDE, scale: float = 1.0, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    n = len(ids)
    y = rng.integers(0, 2, n).astype(np.int64)
    x = (scale * rng.normal(0.0, 1.0, (n, 3, side, side))).astype(np.float32)
    return ArrayDataset(x, y, np.array(ids))


def _squeeze(ghost: bool = True, **kw: Any) -> TorchTrainer:
    return TorchTrainer.create(
        "squeezenet1_1", 2, (3, SIDE, SIDE), seed=4, ghost_clipping=ghost, **kw
    )


def _sum(trainer: Any, data: ArrayDataset, clip: float, seed: int = 9) -> np.ndarray:
    torch.manual_seed(seed)  # the same dropout masks on both paths
    ids = np.asarray(data.patient_ids)
    return dpsgd.clipped_patient_sum(trainer, data, np.arange(len(data)), ids, clip)


def _per_patient_norms(trainer: TorchTrainer, data: ArrayDataset, seed: int = 9) -> np.ndarray:
    torch.manual_seed(seed)
    x, y = data.batch(np.arange(len(data)))
    g = trainer.per_sample_gradients(x, y).numpy().astype(np.float64)
    ids = np.asarray(data.patient_ids)
    return np.array([np.linalg.norm(g[ids == p].sum(axis=0)) for p in np.unique(ids)])


def test_gram_norms_are_within_their_error_bound_even_when_the_product_cancels() -> None:
    rng = np.random.default_rng(0)
    g = torch.from_numpy(rng.normal(size=(7, 5, 3)))
    u = torch.from_numpy(rng.normal(size=(7, 11, 3)))
    # Patient 2 (rows 3, 4): G_4 = G_3 and U_4 = -U_3, so its gradient is exactly zero.
    g[4] = g[3]
    u[4] = -u[3]
    starts, sizes = np.array([0, 1, 3, 5]), np.array([1, 2, 2, 2])
    sq, err = ghost_sq_norms(g, u, starts, sizes)
    for p, (s, k) in enumerate(zip(starts, sizes, strict=True)):
        exact = sum(g[i] @ u[i].T for i in range(s, s + k))
        truth = float(exact.square().sum())
        assert abs(float(sq[p]) - truth) <= float(err[p]), p
        assert float(err[p]) > 0.0
    assert abs(float(sq[2])) <= float(err[2])  # the cancelled patient: zero within the bound


def test_plan_puts_few_position_layers_on_ghost_norms() -> None:
    assert plan_layer(256, 576, 9, 1.0)
    assert not plan_layer(64, 144, 225, 1.0)
    assert not plan_layer(256, 576, 9, 400.0)  # many records per patient: rows again


@pytest.mark.parametrize("mode", ["auto", "ghost", "rows"])
def test_every_patients_clipped_contribution_is_within_the_bound(mode: str) -> None:
    # One patient per call, so the result *is* that patient's clipped contribution c_p v_p.
    t = _squeeze()
    t.module.train()
    offsets = t._per_sample_offsets(False)
    for k, scale in ((1, 1.0), (3, 5.0), (2, 50.0)):
        data = _data(["p"] * k, scale=scale, seed=k)
        norm = float(_per_patient_norms(t, data)[0])
        for clip in (norm * 0.25, norm * (1.0 - 1e-9)):
            torch.manual_seed(9)
            x, y = data.batch(np.arange(k))
            got = ghost_clipped_sum(
                t.module,
                torch.from_numpy(x),
                torch.from_numpy(y),
                np.zeros(k, dtype=np.int64),
                clip,
                offsets,
                t.manifest.size,
                mode=mode,
            )
            assert got is not None
            # The float64 vector that enters the sum: its norm is at most C' < C ...
            target = clip_target(clip)
            assert target == clip * (1 - 2.0**-16)
            assert float(np.sqrt(np.sum(np.square(got)))) <= target, (k, scale, clip)
            # ... and it was scaled to C', not far below it (the rounding shares and the
            # 2^-20 factor margin cost < 1e-5 here).
            assert float(np.linalg.norm(got)) >= target * (1 - 1e-5)


@pytest.mark.parametrize("side", [SIDE, 64])
def test_ghost_sum_equals_the_materialised_path(side: int) -> None:
    # Patients of 1-3 records, every patient clipped (checked, so the test can fail).
    ids = ["a", "b", "b", "c", "d", "d", "d", "e", "f", "f"]
    data = _data(ids, side=side, scale=3.0)
    ghost = TorchTrainer.create("squeezenet1_1", 2, (3, side, side), seed=4)
    rows = TorchTrainer.create("squeezenet1_1", 2, (3, side, side), seed=4, ghost_clipping=False)
    assert ghost.ghost_clipping
    assert not rows.ghost_clipping
    norms = _per_patient_norms(rows, data)
    live = norms[norms > 0]  # a record whose final ReLU is all zero has no gradient
    assert len(live) >= 4
    clip = 0.5 * float(live.min())
    expect = _sum(rows, data, clip)
    got = _sum(ghost, data, clip)
    assert np.abs(expect).max() > 0
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())
    assert np.linalg.norm(got) <= clip * len(norms)


def test_without_clipping_the_ghost_sum_is_the_batch_gradient() -> None:
    data = _data(["a", "a", "b", "c", "c"], scale=2.0)
    t = _squeeze(per_sample_chunk=64)
    got = _sum(t, data, 1e12)
    torch.manual_seed(9)
    x, y = data.batch(np.arange(5))
    g = t.per_sample_gradients(x, y).numpy().astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(got, g, rtol=1e-5, atol=1e-7 * np.abs(g).max())


def test_trainable_subset_ghost_equals_materialised() -> None:
    base = _squeeze()
    manifest = with_trainable(base.manifest, ["classifier", "features.12"], base.get_weights())
    ghost = TorchTrainer.from_manifest(manifest, base.get_weights())
    rows = TorchTrainer.from_manifest(manifest, base.get_weights(), ghost_clipping=False)
    data = _data(["a", "b", "b", "c"], scale=3.0)
    ids = np.asarray(data.patient_ids)
    out = []
    for t in (ghost, rows):
        torch.manual_seed(9)
        part = _TrainablePart(t)
        out.append(dpsgd.clipped_patient_sum(part, data, np.arange(4), ids, 0.01))
    assert out[0].shape == (ghost.trainable_manifest.size,)
    assert np.linalg.norm(out[1]) > 0.01  # clipped (three patients of norm 0.01 each at most)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-9)


def test_a_subclass_cannot_replace_the_ghost_clipping() -> None:
    class Unclipped(TorchTrainer):
        def ghost_clipped_sum(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a subclass's ghost_clipped_sum must never be called")

    data = _data(["a", "b", "c"], scale=3.0)
    sub = Unclipped.create("squeezenet1_1", 2, (3, SIDE, SIDE), seed=4)
    rows = _squeeze(ghost=False)
    np.testing.assert_array_equal(_sum(sub, data, 0.1), _sum(rows, data, 0.1))


def test_a_tiny_clip_norm_falls_back_to_the_rust_kernel() -> None:
    data = _data(["a", "b"], scale=3.0)
    t = _squeeze()
    t.module.train()
    x, y = data.batch(np.arange(2))
    assert (
        ghost_clipped_sum(
            t.module,
            torch.from_numpy(x),
            torch.from_numpy(y),
            np.arange(2),
            1e-160,
            t._per_sample_offsets(False),
            t.manifest.size,
        )
        is None
    )
    np.testing.assert_array_equal(_sum(t, data, 1e-160), _sum(_squeeze(ghost=False), data, 1e-160))


def _ddg(dim: int) -> Any:
    return calibrate(
        SampleDDGConfig(
            dim=dim,
            clip_norm=0.5,
            noise_multiplier=1.0,
            sampling_rate=0.7,
            num_sites=3,
            min_survivors=2,
            site_clip_norm=4.0,
        )
    )


@pytest.mark.parametrize("subset", [False, True])
def test_distributed_steps_reuse_one_workspace_with_identical_results(subset: bool) -> None:
    # ghost_clipping=False and chunk 2: the materialised path, which uses the workspace.
    def trainer() -> TorchTrainer:
        t = TorchTrainer.create(
            "small_cnn", 2, (1, 8, 8), seed=1, ghost_clipping=False, per_sample_chunk=2
        )
        if not subset:
            return t
        manifest = with_trainable(t.manifest, ["head"], t.get_weights())
        return TorchTrainer.from_manifest(
            manifest, t.get_weights(), ghost_clipping=False, per_sample_chunk=2
        )

    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 1, 8, 8)).astype(np.float32)
    data = ArrayDataset(x, rng.integers(0, 2, 9), np.array(list("aabbcddee")))
    reused = trainer()
    params = _ddg(reused.trainable_manifest.size)
    buffers = []
    for step in range(3):
        got = site_step(reused, data, params, rng=SecureRng(bytes([step]) * 32))
        buffers.append(distributed_dpsgd._WORKSPACES[reused].buffer)
        fresh = trainer()  # a new trainer: a new workspace, as every step had before
        want = site_step(fresh, data, params, rng=SecureRng(bytes([step]) * 32))
        np.testing.assert_array_equal(got, want)
    assert buffers[0] is not None
    assert all(b is buffers[0] for b in buffers)  # one buffer for all steps
    assert buffers[0].shape[1] == params.dim


def test_a_ghost_source_of_another_width_is_refused() -> None:
    from confide.errors import PrivacyUnsupportedError

    class Borrowing:  # claims a real trainer's ghost clipping for a smaller manifest
        manifest = TorchTrainer.create("small_cnn", 2, (1, 8, 8), seed=0).manifest
        per_sample_chunk = 64
        ghost_source = (_squeeze(), False)

    data = _data(["a", "b"])
    with pytest.raises(PrivacyUnsupportedError, match="columns"):
        dpsgd.clipped_patient_sum(Borrowing(), data, np.arange(2), np.arange(2), 1.0)
