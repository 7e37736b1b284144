"""Loaders and partitioners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.data import (
    Dataset,
    Standardizer,
    load_breast_cancer,
    load_csv,
    partition_dirichlet,
    partition_iid,
    save_csv,
    train_test_split,
)


def test_breast_cancer_is_bundled() -> None:
    ds = load_breast_cancer()
    assert ds.x.shape == (569, 30)
    assert ds.x.dtype == np.float32
    assert set(np.unique(ds.y)) == {0, 1}


def test_csv_round_trip_is_exact(tmp_path: Path) -> None:
    ds = load_breast_cancer().subset(np.arange(20))
    save_csv(ds, tmp_path / "d.csv")
    back = load_csv(tmp_path / "d.csv")
    np.testing.assert_array_equal(back.x, ds.x)
    np.testing.assert_array_equal(back.y, ds.y)
    assert back.feature_names == ds.feature_names


def test_csv_errors(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no column 'label'"):
        load_csv(p)
    p.write_text("a,label\n1,0\nx,1\n")
    with pytest.raises(ValueError, match="row 3"):
        load_csv(p)
    p.write_text("a,label\n1,0,5\n")
    with pytest.raises(ValueError, match="cells"):
        load_csv(p)


@pytest.mark.parametrize("n_parts", [1, 3, 7])
def test_iid_partition_is_a_partition(n_parts: int) -> None:
    parts = partition_iid(100, n_parts, seed=1)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(100))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [p.tolist() for p in parts] == [p.tolist() for p in partition_iid(100, n_parts, seed=1)]


def test_dirichlet_partition_skews_labels() -> None:
    y = np.repeat(np.arange(2), 200).astype(np.int64)
    skewed = partition_dirichlet(y, 4, alpha=0.1, seed=0)
    flat = partition_dirichlet(y, 4, alpha=1000.0, seed=0)
    for parts in (skewed, flat):
        assert sorted(np.concatenate(parts).tolist()) == list(range(400))
        assert min(map(len, parts)) >= 2

    def spread(parts: list[np.ndarray]) -> float:
        return float(np.mean([abs(y[p].mean() - 0.5) for p in parts]))

    assert spread(skewed) > spread(flat) + 0.2
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(y, 4, alpha=0.0)


def test_split_and_standardize() -> None:
    ds = load_breast_cancer()
    train, test = train_test_split(ds, 0.2, seed=0)
    assert len(train) + len(test) == len(ds)
    assert abs(test.y.mean() - ds.y.mean()) < 0.02  # stratified
    z = Standardizer.fit(train.x).apply(train)
    np.testing.assert_allclose(z.x.mean(axis=0), 0, atol=1e-4)
    with pytest.raises(TypeError):
        Dataset(ds.x.astype(np.float64), ds.y)  # type: ignore[arg-type]
