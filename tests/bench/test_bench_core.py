"""pytest-benchmark timings of the public kernels on 100,000-element inputs.

They run as plain tests by default (pytest's addopts include ``--benchmark-disable``: each
benchmarked call runs once and its result is checked). Time them with::

    .venv/bin/python -m pytest tests/bench --benchmark-enable --benchmark-columns=min,median,max

The full report against numpy and Flower, at SqueezeNet size, is ``make bench``
(benches/python/bench_core.py); see benches/README.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import confide

N = 100_000
ROWS = 8
SEED = bytes(range(32))


@pytest.fixture(scope="module")
def grads() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(N, dtype=np.float32)


@pytest.mark.benchmark(group="clip")
def test_clip_l2(benchmark: Any, grads: np.ndarray) -> None:
    # In place: restore the unclipped input before every round (untimed).
    def setup() -> tuple[tuple[np.ndarray, float], dict[str, Any]]:
        return (grads.copy(), 1.0), {}

    norm = benchmark.pedantic(confide.clip_l2, setup=setup, rounds=20)
    assert norm == pytest.approx(float(np.linalg.norm(grads.astype(np.float64))), rel=1e-9)


@pytest.mark.benchmark(group="clip")
def test_clip_rows(benchmark: Any, grads: np.ndarray) -> None:
    mat = np.tile(grads, (ROWS, 1))

    def setup() -> tuple[tuple[np.ndarray, float], dict[str, Any]]:
        return (mat.copy(), 1.0), {}

    norms = benchmark.pedantic(confide.clip_rows, setup=setup, rounds=20)
    assert norms.shape == (ROWS,)


@pytest.mark.benchmark(group="noise")
def test_gaussian(benchmark: Any) -> None:
    out = benchmark(confide.gaussian, N, 1.0, rng=confide.SecureRng(SEED))
    assert out.shape == (N,)
    assert out.dtype == np.float32


@pytest.mark.benchmark(group="noise")
def test_add_gaussian_noise(benchmark: Any, grads: np.ndarray) -> None:
    out = benchmark(confide.add_gaussian_noise, grads, 1.0, rng=confide.SecureRng(SEED))
    assert out.shape == grads.shape


@pytest.mark.benchmark(group="secagg")
def test_quantize(benchmark: Any, grads: np.ndarray) -> None:
    q = benchmark(confide.quantize, grads, 3.0, 16, rng=confide.SecureRng(SEED))
    assert q.dtype == np.uint32
    assert int(q.max()) < 2**16


@pytest.mark.benchmark(group="secagg")
def test_apply_masks(benchmark: Any) -> None:
    x = np.arange(N, dtype=np.uint32)
    dom = confide.MaskDomain(b"bench", 1, "self")
    y = benchmark(confide.apply_masks, x, [(SEED, 1)], 32, dom)
    assert np.array_equal(confide.apply_masks(y, [(SEED, -1)], 32, dom), x)


@pytest.mark.benchmark(group="secagg")
def test_pack_bits(benchmark: Any) -> None:
    x = np.arange(N, dtype=np.uint32) & np.uint32(2**20 - 1)
    packed = benchmark(confide.pack_bits, x, 20)
    assert len(packed) == N * 20 // 8


@pytest.mark.benchmark(group="shamir")
def test_split_secret(benchmark: Any) -> None:
    shares = benchmark(confide.split_secret, SEED, 100, 51, rng=confide.SecureRng(SEED))
    assert confide.combine_shares(shares[-51:]) == SEED


@pytest.mark.benchmark(group="shamir")
def test_combine_shares(benchmark: Any) -> None:
    shares = confide.split_secret(SEED, 100, 51, rng=confide.SecureRng(SEED))[-51:]
    assert benchmark(confide.combine_shares, shares) == SEED
