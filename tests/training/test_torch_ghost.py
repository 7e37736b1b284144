"""Ghost-norm clipping of per-patient sums: the same clipped sum as materialised rows.

The exact norm bound is tested directly (every patient's clipped contribution has norm at
most ``C' = C (1 - 2^-16)``), the error bound of the Gram-matrix norms against explicit
products (including a product that cancels to zero), and equality with the materialised
path (Rust-kernel clipping of per-sample rows, to the same ``C'``) at float tolerance. The
released sum's sensitivity is tested as a property (hypothesis, adversarial scales and
cancelling patients): removing any patient moves the sum by at most ``C``, and every other
patient's factor is bit-identical. Also the distributed path's reused workspace:
bit-identical ring vectors at fixed seeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    clipped_sum_of_factors,
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


# --------------------------------------------------------------------------- the released sum
# Hand-made factors (G, U) through clipped_sum_of_factors: one layer of out=IN=8 and T=3
# positions (ghost for patients of <= 3 records, materialised rows above: see plan_layer)
# plus its bias.

OUT, IN, POS = 8, 8, 3


def _factors(
    sizes: list[int], scales: list[float], seed: int, cancel: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    g = rng.normal(size=(n, OUT, POS))
    u = rng.normal(size=(n, IN, POS))
    pat = np.repeat(np.arange(len(sizes)), sizes)
    for p, s in enumerate(scales):
        g[pat == p] *= s
    if cancel is not None:  # this patient's two records cancel exactly: G_2 = G_1, U_2 = -U_1
        i = int(np.flatnonzero(pat == cancel)[0])
        g[i + 1], u[i + 1] = g[i], -u[i]
    return torch.from_numpy(g.astype(np.float32)), torch.from_numpy(u.astype(np.float32)), pat


def _release(
    g: torch.Tensor,
    u: torch.Tensor,
    pat: np.ndarray,
    keep: np.ndarray,
    clip: float,
    bias: bool = True,
    **kw: Any,
) -> tuple[np.ndarray, np.ndarray]:
    rows = np.flatnonzero(keep[pat])
    layer = (g[rows], u[rows], (0, OUT * IN), (OUT * IN, OUT * IN + OUT) if bias else None)
    out = clipped_sum_of_factors([layer], pat[rows], clip, OUT * IN + OUT, **kw)
    assert out is not None
    return out[0].numpy(), out[1].numpy()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=6),
    log_scales=st.lists(st.floats(-3.0, 12.0), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
    adversarial=st.booleans(),
    mode=st.sampled_from(["auto", "ghost", "rows"]),
)
def test_removing_any_patient_moves_the_released_sum_by_at_most_c(
    sizes: list[int], log_scales: list[float], seed: int, adversarial: bool, mode: str
) -> None:
    scales = [10.0**s for s in log_scales[: len(sizes)]]
    cancel = next((p for p, k in enumerate(sizes) if k >= 2), None) if adversarial else None
    g, u, pat = _factors(sizes, scales, seed, cancel)
    clip, n_max = 1.0, 40  # n_max: a bound on the records, independent of the batch
    everyone = np.ones(len(sizes), dtype=bool)
    full, c_full = _release(g, u, pat, everyone, clip, max_records=n_max, mode=mode)
    for q in range(len(sizes)):
        keep = everyone.copy()
        keep[q] = False
        part, c_part = _release(g, u, pat, keep, clip, max_records=n_max, mode=mode)
        assert float(np.linalg.norm(full - part)) <= clip, (q, sizes)
        # Each remaining patient's factor is a function of its own records (bit for bit).
        np.testing.assert_array_equal(c_part, c_full[keep])
        alone = np.zeros(len(sizes), dtype=bool)
        alone[q] = True
        own, c_own = _release(g, u, pat, alone, clip, max_records=n_max, mode=mode)
        assert c_own[0] == c_full[q]
        assert float(np.linalg.norm(own)) <= clip_target(clip)
        if c_own[0] < 1.0 and not (adversarial and q == cancel):
            assert float(np.linalg.norm(own)) >= clip_target(clip) * (1 - 1e-5)  # not looser


def test_a_cancelling_patients_rounding_share_is_charged_to_its_own_clip() -> None:
    # Patient 0's two records cancel exactly (its gradient is 0) but its factors are large:
    # the float64 sum's rounding of its terms is bounded by gamma(n_max T + 2) ||G|| ||U||,
    # not by anything its (zero) norm controls. The clip charges K times that share, so the
    # share is below eps C' / (2 n_max) as the sensitivity argument needs; the norm-only
    # rule (ghost_sq_norms' bound alone, as before) would leave it above that budget.
    from confide.privacy.torch_ghost import _EPS, _gamma

    g, u, pat = _factors([2, 1, 1], [1e8, 1.0, 1.0], seed=5, cancel=0)
    n_max, clip = 1024, 1.0
    target = clip_target(clip)
    everyone = np.ones(3, dtype=bool)  # no bias: the bias gradient of patient 0 does not cancel
    _, factors = _release(g, u, pat, everyone, clip, False, max_records=n_max, mode="ghost")
    g64, u64 = g[:2].double(), u[:2].double()
    gu = float(torch.linalg.vector_norm(g64) * torch.linalg.vector_norm(u64))
    share = _gamma(n_max * POS + 2) * gu
    budget = _EPS * target / (2 * n_max)
    assert factors[0] * share <= budget
    sq, err = ghost_sq_norms(
        g64.reshape(1, 2, OUT, POS).permute(0, 2, 1, 3).reshape(1, OUT, 6),
        u64.reshape(1, 2, IN, POS).permute(0, 2, 1, 3).reshape(1, IN, 6),
        np.array([0]),
        np.array([1]),
    )
    norm_only = min(1.0, clip / float(torch.sqrt(sq[0] + err[0])))
    assert norm_only * share > budget  # the term is needed
    assert factors[0] < norm_only


def test_the_plan_is_per_patient_and_matches_the_materialised_sum() -> None:
    # Patients of 1, 2 (ghost) and 5 (rows) records: one layer, both kinds at once.
    assert plan_layer(OUT, IN, POS, 2.0**2)
    assert not plan_layer(OUT, IN, POS, 5.0**2)
    g, u, pat = _factors([1, 2, 5, 1], [3.0, 2.0, 1.0, 4.0], seed=2)
    keep = np.ones(4, dtype=bool)
    auto, c_auto = _release(g, u, pat, keep, 0.5, max_records=16)
    rows, c_rows = _release(g, u, pat, keep, 0.5, max_records=16, mode="rows")
    ghost, _ = _release(g, u, pat, keep, 0.5, max_records=16, mode="ghost")
    assert (c_auto < 1.0).all()  # every patient clipped, so the sums can differ
    np.testing.assert_allclose(auto, rows, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(auto, ghost, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(c_auto, c_rows, rtol=1e-5)


def test_more_records_than_max_records_fall_back() -> None:
    g, u, pat = _factors([2, 1], [1.0, 1.0], seed=1)
    layer = (g, u, (0, OUT * IN), None)
    assert clipped_sum_of_factors([layer], pat, 1.0, OUT * IN, max_records=2) is None
    assert clipped_sum_of_factors([layer], pat, 1.0, OUT * IN, max_records=3) is not None


def test_both_paths_clip_to_the_same_c_prime_and_a_subclass_cannot_change_it() -> None:
    from confide.privacy.torch_ghost import CLIP_MARGIN
    from confide.training.numpy_engine import NumpyTrainer

    class Loose(TorchTrainer):
        @property
        def ghost_clip_margin(self) -> float:
            return 10.0  # ignored: dpsgd reads the module constant

    data = _data(["p"], scale=50.0, seed=3)
    ghost, rows = _squeeze(), _squeeze(ghost=False)
    loose = Loose.create("squeezenet1_1", 2, (3, SIDE, SIDE), seed=4, ghost_clipping=False)
    assert ghost.ghost_clip_margin == rows.ghost_clip_margin == CLIP_MARGIN == 1 - 2.0**-16
    assert dpsgd._clip_margin(ghost) == dpsgd._clip_margin(rows) == CLIP_MARGIN
    assert dpsgd._clip_margin(loose) == CLIP_MARGIN
    assert dpsgd._clip_margin(_TrainablePart(ghost)) == CLIP_MARGIN
    assert dpsgd._clip_margin(NumpyTrainer.create("logistic", 4, 2)) == 1.0  # numpy: C, as before
    clip = 1e-3
    assert float(_per_patient_norms(rows, data)[0]) > 10 * clip
    target = clip_target(clip)
    for t in (ghost, rows, loose):
        norm = float(np.linalg.norm(_sum(t, data, clip)))
        assert target * (1 - 1e-5) <= norm <= target, type(t).__name__


def test_the_float64_path_does_not_depend_on_precision_or_denormal_flags() -> None:
    # Flip torch's float32-precision and denormal switches through torch's own API: the
    # ghost sum is float64 throughout, so the clipped contribution stays within C'.
    data = _data(["p", "p"], scale=5.0, seed=7)
    t = _squeeze()
    clip = 0.01
    base = _sum(t, data, clip)
    precision = torch.get_float32_matmul_precision()
    flush = torch.set_flush_denormal(True)  # False where the CPU has no FTZ/DAZ
    try:
        torch.set_float32_matmul_precision("medium")
        got = _sum(t, data, clip)
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.set_flush_denormal(False)
    assert torch.get_float32_matmul_precision() == precision
    assert float(np.linalg.norm(got)) <= clip_target(clip)
    assert float(np.linalg.norm(base)) <= clip_target(clip)
    np.testing.assert_allclose(got, base, rtol=1e-2, atol=1e-3 * np.abs(base).max())
    assert isinstance(flush, bool)
