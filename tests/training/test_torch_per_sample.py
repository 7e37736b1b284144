"""Hook-based per-sample gradients: equal to vmap's, refused where records could interact.

Also the DP-SGD driver's workspace reuse (in-place grouping, blocked float64 sums): the same
clipped per-patient sums as the allocating path.
"""

from __future__ import annotations

import doctest
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from confide.data.images import ArrayDataset  # noqa: E402
from confide.errors import ConfigError, ShapeError  # noqa: E402
from confide.noise import SecureRng  # noqa: E402
from confide.privacy import dpsgd, run_dpsgd  # noqa: E402
from confide.training import torch_per_sample  # noqa: E402
from confide.training.base import DPSGDConfig, TrainConfig  # noqa: E402
from confide.training.torch_engine import TorchTrainer  # noqa: E402
from confide.training.trainable import with_trainable  # noqa: E402


def toy(n: int, side: int = 8, channels: int = 1, seed: int = 0) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.normal(0, 0.5, size=(n, channels, side, side)).astype(np.float32)
    x[y == 1, :, : side // 2, : side // 2] += 1.0
    return x, y


def pair(arch: str, shape: tuple[int, ...], **kw: Any) -> tuple[TorchTrainer, TorchTrainer]:
    hooks = TorchTrainer.create(arch, 2, shape, seed=3, per_sample_method="hooks", **kw)
    ref = TorchTrainer.create(arch, 2, shape, seed=3, per_sample_method="vmap", **kw)
    assert hooks.per_sample_method == "hooks"
    assert ref.per_sample_method == "vmap"
    return hooks, ref


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_small_cnn_hooks_equal_vmap(chunk: int) -> None:
    hooks, ref = pair("small_cnn", (1, 8, 8), per_sample_chunk=chunk)
    x, y = toy(7)
    g, r = hooks.per_sample_gradients(x, y), ref.per_sample_gradients(x, y)
    assert g.is_contiguous()
    assert tuple(g.shape) == (7, hooks.manifest.size)
    assert float(r.abs().max()) > 1e-3  # not trivially zero
    np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-4, atol=1e-7)


def test_squeezenet_hooks_equal_vmap() -> None:
    # dropout 0: the two paths draw their dropout masks differently.
    hooks, ref = pair("squeezenet1_1", (3, 32, 32), options={"dropout": 0.0}, per_sample_chunk=2)
    x, y = toy(3, side=32, channels=3)
    g, r = hooks.per_sample_gradients(x, y).numpy(), ref.per_sample_gradients(x, y).numpy()
    np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-6)
    # every parameter tensor got a gradient from the hooks (no column left unwritten)
    for t in hooks.manifest.tensors:
        lo, hi = hooks._offsets[t.name]
        assert np.abs(g[:, lo:hi]).max() > 0, t.name


def test_auto_picks_hooks_for_the_shipped_models() -> None:
    assert TorchTrainer.create("small_cnn", 2, (1, 8, 8)).per_sample_method == "hooks"
    assert TorchTrainer.create("squeezenet1_1", 2, (3, 32, 32)).per_sample_method == "hooks"


def test_trainable_subset_hooks_equal_vmap() -> None:
    base = TorchTrainer.create("small_cnn", 2, (1, 8, 8), seed=3)
    manifest = with_trainable(base.manifest, ["head"], base.get_weights())
    hooks = TorchTrainer.from_manifest(manifest, base.get_weights(), per_sample_method="hooks")
    ref = TorchTrainer.from_manifest(manifest, base.get_weights(), per_sample_method="vmap")
    assert hooks.trainable_index is not None
    x, y = toy(5)
    for only in (True, False):
        g = hooks.per_sample_gradients(x, y, trainable_only=only).numpy()
        r = ref.per_sample_gradients(x, y, trainable_only=only).numpy()
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)
    full = hooks.per_sample_gradients(x, y).numpy()
    frozen = np.ones(hooks.manifest.size, bool)
    frozen[hooks.trainable_index] = False
    assert not full[:, frozen].any()  # frozen columns zero, also through a reused workspace
    buf = torch.full((8, hooks.manifest.size), 7.0)
    assert not hooks.per_sample_gradients(x, y, out=buf).numpy()[:, frozen].any()


class Mixer(nn.Module):
    """Subtracts the batch mean: records interact, so hooks would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)


class MyConv(nn.Conv2d):
    pass


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.Flatten(), Mixer(), nn.Linear(64, 2)),
        nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.Linear(8, 2)),
        nn.Sequential(MyConv(1, 2, 3), nn.Flatten(), nn.Linear(72, 2)),
        nn.Sequential(
            nn.Conv2d(1, 2, 3, groups=1, padding="same"), nn.Flatten(), nn.Linear(128, 2)
        ),
    ],
    ids=["batch-mixing", "layernorm", "conv-subclass", "same-padding"],
)
def test_unvetted_modules_keep_vmap(module: nn.Module) -> None:
    x, y = toy(4)
    t = TorchTrainer(module, (1, 8, 8), 2)
    assert t.per_sample_method == "vmap"
    loop = np.stack(
        [t.loss_and_gradient(x[i : i + 1], y[i : i + 1])[1].numpy() for i in range(len(y))]
    )
    np.testing.assert_allclose(t.per_sample_gradients(x, y).numpy(), loop, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="vetted"):
        TorchTrainer(module, (1, 8, 8), 2, per_sample_method="hooks")


def test_hooked_module_and_bad_method_are_refused() -> None:
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    m[1].register_forward_hook(lambda mod, i, o: o * 2)
    assert not torch_per_sample.supports_hooks(m, {"1.weight", "1.bias"})
    batch_flat = nn.Sequential(nn.Flatten(0), nn.Linear(64, 2))
    assert not torch_per_sample.supports_hooks(batch_flat, {"1.weight", "1.bias"})
    with pytest.raises(ConfigError, match="per_sample_method"):
        TorchTrainer.create("small_cnn", 2, (1, 8, 8), per_sample_method="fast")


def test_out_workspace_is_written_and_checked() -> None:
    t = TorchTrainer.create("small_cnn", 2, (1, 8, 8), seed=1)
    x, y = toy(5)
    buf = torch.empty((9, t.manifest.size))
    g = t.per_sample_gradients(x, y, out=buf)
    assert g.data_ptr() == buf.data_ptr()
    assert tuple(g.shape) == (5, t.manifest.size)
    np.testing.assert_array_equal(g.numpy(), t.per_sample_gradients(x, y).numpy())
    for bad in (
        torch.empty((4, t.manifest.size)),  # too few rows
        torch.empty((9, t.manifest.size), dtype=torch.float64),
        torch.empty((t.manifest.size, 9)).T,  # not C-contiguous
    ):
        with pytest.raises(ShapeError):
            t.per_sample_gradients(x, y, out=bad)


def test_in_place_grouping_equals_the_copying_one() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(1, 12))
        pat = np.sort(rng.integers(0, 5, size=n)).astype(np.int64)
        g = rng.standard_normal((n, 37)).astype(np.float32)
        want, wid = dpsgd._group_sorted(g.copy(), pat)
        got, gid = dpsgd._group_sorted(g.copy(), pat, in_place=True)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(gid, wid)


def test_blocked_float64_sum() -> None:
    rows = np.random.default_rng(6).standard_normal((5, 3 * dpsgd._SUM_BLOCK + 11))
    rows = rows.astype(np.float32)
    total = np.ones(rows.shape[1])
    dpsgd._sum_rows64(rows, total)
    np.testing.assert_allclose(total, 1.0 + rows.sum(axis=0, dtype=np.float64), rtol=0, atol=1e-12)


def test_clipped_patient_sum_with_workspace_matches_the_materialised_reference() -> None:
    # Patients of 1..4 records, chunk 3 (a patient spans chunks), one step's clipped sum:
    # computed through the reused workspace (hooks), vs float64 clipping of vmap's rows.
    x, y = toy(14, seed=2)
    ids = np.array(list("aaabccccdeeffg"))
    data = ArrayDataset(x, y, ids)
    hooks, ref = pair("small_cnn", (1, 8, 8), per_sample_chunk=3)
    g = ref.per_sample_gradients(x, y).numpy().astype(np.float64)
    clip = 0.05
    expect = np.zeros(ref.manifest.size)
    for pid in np.unique(ids):
        s = g[ids == pid].sum(axis=0)
        assert np.linalg.norm(s) > clip  # every patient clipped: the test can fail
        expect += s * min(1.0, clip / np.linalg.norm(s))
    ws = dpsgd._Workspace()
    for _ in range(2):  # the second call reuses the first one's buffer
        got = dpsgd.clipped_patient_sum(hooks, data, np.arange(14), ids, clip, workspace=ws)
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-8)
    assert ws.buffer is not None
    assert ws.buffer.shape[0] == 3


def test_run_dpsgd_hooks_equal_vmap() -> None:
    x, y = toy(20, seed=3)
    data = ArrayDataset(x, y, np.array([f"p{i // 3}" for i in range(20)]))
    hooks, ref = pair("small_cnn", (1, 8, 8), per_sample_chunk=4)
    dp = DPSGDConfig(noise_multiplier=1.0, clip_norm=0.5, sampling_rate=0.5, steps=4, momentum=0.5)
    cfg = TrainConfig(learning_rate=0.3, dp=dp)
    run_dpsgd(hooks, data, cfg, rng=SecureRng(bytes(range(32))))
    run_dpsgd(ref, data, cfg, rng=SecureRng(bytes(range(32))))
    w0 = TorchTrainer.create("small_cnn", 2, (1, 8, 8), seed=3).get_weights()
    assert np.abs(hooks.get_weights() - w0).max() > 1e-3  # it moved
    np.testing.assert_allclose(hooks.get_weights(), ref.get_weights(), rtol=1e-4, atol=1e-6)


def test_doctests() -> None:
    result = doctest.testmod(torch_per_sample, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_grouping_sums_equal_numpys_float64_sum() -> None:
    g = np.random.default_rng(7).standard_normal((9, 1001)).astype(np.float32)
    pat = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3], dtype=np.int64)
    sums, ids = dpsgd._group_sorted(g, pat)
    assert ids.tolist() == [0, 1, 2, 3]
    for k, (s, e) in enumerate([(0, 3), (3, 4), (4, 6), (6, 9)]):
        np.testing.assert_array_equal(
            sums[k], g[s:e].sum(axis=0, dtype=np.float64).astype(np.float32)
        )
