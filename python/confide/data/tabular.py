"""Tabular data for sites and experiments: loaders and partitioners.

A :class:`Dataset` is a float32 feature matrix ``x`` with integer labels ``y``. Sites load
their table from CSV (:func:`load_csv`, label in a named column); experiments use
scikit-learn's bundled breast-cancer set (:func:`load_breast_cancer`, no download) and split
it into sites either IID (:func:`partition_iid`) or with Dirichlet(alpha) label skew
(:func:`partition_dirichlet`). All randomness here is ``numpy.random.default_rng(seed)``:
it shuffles experiments and protects no secret.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide.data._index import check_index
from confide.errors import ArrayTypeError, ConfigError, DataError

__all__ = [
    "Dataset",
    "RegressionDataset",
    "Standardizer",
    "check_feature_names",
    "id_like_columns",
    "load_breast_cancer",
    "load_csv",
    "load_diabetes",
    "partition_dirichlet",
    "partition_iid",
    "save_csv",
    "train_test_split",
]


def _check_rows(x: NDArray[Any], y: NDArray[Any], patient_ids: NDArray[Any] | None) -> None:
    """Refuse a table unless ``x`` is ``(n, d)`` and ``y`` and ``patient_ids`` are ``(n,)``."""
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"x must be (n, d) and y (n,), got {x.shape} and {y.shape}")
    if patient_ids is not None and patient_ids.shape != y.shape:
        raise DataError("patient_ids must hold one id per row")


@dataclass(frozen=True)
class Dataset:
    """Features and labels.

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, d)`` float32 features, finite.
    y : numpy.ndarray
        ``(n,)`` int64 labels in ``[0, n_classes)``.
    feature_names : tuple of str, optional
        Column names.
    patient_ids : numpy.ndarray, optional
        ``(n,)`` patient of each row (strings). Patient-level DP-SGD samples and clips per
        patient; without it every row is its own patient.
    """

    x: NDArray[np.float32]
    y: NDArray[np.int64]
    feature_names: tuple[str, ...] = ()
    patient_ids: NDArray[np.str_] | None = None

    def __post_init__(self) -> None:
        _check_rows(self.x, self.y, self.patient_ids)
        if self.x.dtype != np.float32 or self.y.dtype != np.int64:
            raise ArrayTypeError(
                f"x must be float32 and y int64, got {self.x.dtype}, {self.y.dtype}"
            )
        if not np.isfinite(self.x).all():
            raise DataError("x contains NaN or Inf")
        if self.y.size and self.y.min() < 0:
            raise DataError("labels must be non-negative")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def labels(self) -> NDArray[np.int64]:
        """``(n,)`` int64 labels (the same array as ``y``)."""
        return self.y

    def batch(self, index: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Return the features and labels of the rows at ``index``.

        Parameters
        ----------
        index : numpy.ndarray
            Row indices.

        Returns
        -------
        tuple of numpy.ndarray
            ``(x[index], y[index])``.

        Examples
        --------
        >>> ds = Dataset(np.zeros((3, 2), np.float32), np.array([0, 1, 0]))
        >>> ds.batch(np.array([2, 1]))[1].tolist()
        [0, 1]
        """
        idx = check_index(index, len(self))
        return self.x[idx], self.y[idx]

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return int(self.x.shape[1])

    def subset(self, index: NDArray[np.int64]) -> Dataset:
        """Return the rows at ``index``.

        Parameters
        ----------
        index : numpy.ndarray
            Row indices.

        Returns
        -------
        Dataset
            A new dataset (copies).
        """
        ids = None if self.patient_ids is None else self.patient_ids[index]
        return Dataset(self.x[index], self.y[index], self.feature_names, ids)


@dataclass(frozen=True)
class RegressionDataset:
    """Features and a real-valued target (for the numpy engine's regression head).

    :class:`Dataset` holds integer class labels; a length-of-stay or disease-progression
    target is a float and lives here, so no classification path sees it by accident.

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, d)`` float32 features, finite.
    y : numpy.ndarray
        ``(n,)`` float32 targets, finite.
    patient_ids : numpy.ndarray, optional
        ``(n,)`` patient of each row (patient-level DP-SGD groups by it).

    Examples
    --------
    >>> ds = RegressionDataset(np.zeros((2, 3), np.float32), np.array([1.5, -2.0], np.float32))
    >>> ds.batch(np.array([1]))[1].tolist()
    [-2.0]
    """

    x: NDArray[np.float32]
    y: NDArray[np.float32]
    patient_ids: NDArray[np.str_] | None = None

    def __post_init__(self) -> None:
        _check_rows(self.x, self.y, self.patient_ids)
        if self.x.dtype != np.float32 or self.y.dtype != np.float32:
            raise ArrayTypeError(f"x and y must be float32, got {self.x.dtype}, {self.y.dtype}")
        if not (np.isfinite(self.x).all() and np.isfinite(self.y).all()):
            raise DataError("x or y contains NaN or Inf")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def labels(self) -> NDArray[np.float32]:
        """``(n,)`` float32 targets (the same array as ``y``)."""
        return self.y

    def batch(self, index: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Return the features and targets of the rows at ``index``."""
        idx = check_index(index, len(self))
        return self.x[idx], self.y[idx]

    def subset(self, index: NDArray[np.int64]) -> RegressionDataset:
        """Return the rows at ``index`` (copies)."""
        ids = None if self.patient_ids is None else self.patient_ids[index]
        return RegressionDataset(self.x[index], self.y[index], ids)


class Standardizer:
    """Per-feature ``(x - mean) / std`` fitted on training data.

    Parameters
    ----------
    mean : numpy.ndarray
        Per-feature mean.
    std : numpy.ndarray
        Per-feature standard deviation (zeros are replaced by one).

    Examples
    --------
    >>> x = np.array([[0.0, 1.0], [2.0, 1.0]], dtype=np.float32)
    >>> Standardizer.fit(x).transform(x).tolist()
    [[-1.0, 0.0], [1.0, 0.0]]
    """

    def __init__(self, mean: NDArray[np.float64], std: NDArray[np.float64]) -> None:
        self.mean = mean
        self.std = np.where(std > 0, std, 1.0)

    @classmethod
    def fit(cls, x: NDArray[np.float32]) -> Standardizer:
        """Fit on a feature matrix.

        Parameters
        ----------
        x : numpy.ndarray
            ``(n, d)`` features.

        Returns
        -------
        Standardizer
            Fitted transform.
        """
        x64 = np.asarray(x, dtype=np.float64)
        return cls(x64.mean(axis=0), x64.std(axis=0))

    def transform(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Standardise ``x``.

        Parameters
        ----------
        x : numpy.ndarray
            ``(n, d)`` features.

        Returns
        -------
        numpy.ndarray
            Float32 standardised copy.
        """
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def apply(self, ds: Dataset) -> Dataset:
        """Return ``ds`` with standardised features.

        Parameters
        ----------
        ds : Dataset
            Input.

        Returns
        -------
        Dataset
            Standardised copy.
        """
        return Dataset(self.transform(ds.x), ds.y, ds.feature_names, ds.patient_ids)


def load_csv(
    path: str | Path, label_column: str = "label", patient_id_column: str | None = None
) -> Dataset:
    """Read a CSV with a header row; every other column is a numeric feature.

    Parameters
    ----------
    path : str or Path
        File to read.
    label_column : str
        Name of the integer label column.
    patient_id_column : str, optional
        Column holding a patient identifier (any text; not a feature). Needed for
        patient-level DP when a patient has several rows: DP-SGD then samples and clips per
        patient, so the guarantee protects the patient and not a single record.

    Returns
    -------
    Dataset
        The table.

    Raises
    ------
    DataError
        No such label column, ragged rows, non-numeric or non-finite cells (the message
        names the file, row and column).
    """
    with Path(path).open(newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty CSV") from None
        if label_column not in header:
            raise DataError(f"{path}: no column {label_column!r} in header {header}")
        if patient_id_column is not None and patient_id_column not in header:
            raise DataError(f"{path}: no column {patient_id_column!r} in header {header}")
        rows = list(reader)
    li = header.index(label_column)
    pi = -1 if patient_id_column is None else header.index(patient_id_column)
    if pi == li:
        raise DataError(f"{path}: the label column cannot be the patient id column")
    features = tuple(h for i, h in enumerate(header) if i not in (li, pi))
    x = np.empty((len(rows), len(features)), dtype=np.float32)
    y = np.empty(len(rows), dtype=np.int64)
    ids: list[str] = []
    for r, row in enumerate(rows):
        if len(row) != len(header):
            raise DataError(f"{path}: row {r + 2} has {len(row)} cells, expected {len(header)}")
        try:
            y[r] = int(row[li])
        except ValueError:
            raise DataError(
                f"{path}: row {r + 2}: label column {label_column!r} holds {row[li]!r}, "
                "expected an integer class index (0, 1, ...)"
            ) from None
        try:
            x[r] = [float(v) for i, v in enumerate(row) if i not in (li, pi)]
        except ValueError:
            col = next(i for i, v in enumerate(row) if i not in (li, pi) and not _is_float(v))
            raise DataError(
                f"{path}: row {r + 2}: column {header[col]!r} holds {row[col]!r}, not a number; "
                "every column except the label is a numeric feature. If it identifies the "
                f"patient, pass --patient-id-column {header[col]}; otherwise remove it"
            ) from None
        if pi >= 0:
            ids.append(row[pi])
    patient_ids = np.array(ids, dtype=np.str_) if pi >= 0 else None
    return Dataset(x, y, features, patient_ids)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


#: Column names that usually identify a person or a record rather than describe one.
_ID_NAME = re.compile(r"mrn|patient|subject|(^|[^a-z])(id|ids|record|ssn|nhs)([^a-z]|$)")


def id_like_columns(ds: Dataset) -> list[str]:
    """Return the feature columns that look like identifiers rather than measurements.

    A column is id-like when its name reads like one (``id``, ``mrn``, ``patient_id``,
    ``subject``, ``record``...), or when it holds only integers that are distinct on
    (nearly) every row, like a medical record number. Such a column should not be a feature:
    the model could memorise it, and without ``patient_id_column`` the unit of differential
    privacy silently becomes the row instead of the patient.

    Parameters
    ----------
    ds : Dataset
        A table with ``feature_names``.

    Returns
    -------
    list of str
        The suspicious feature names, in column order.

    Examples
    --------
    >>> x = np.array([[101, 0.5], [102, 0.7], [103, 0.5]], dtype=np.float32)
    >>> id_like_columns(Dataset(x, np.array([0, 1, 0]), ("visit", "dose")))
    ['visit']
    """
    found = []
    n = len(ds)
    for j, name in enumerate(ds.feature_names):
        col = ds.x[:, j]
        integral = bool(np.all(col == np.round(col)))
        distinct = len(np.unique(col))
        near_unique = n >= 3 and integral and distinct >= max(3, int(0.95 * n))
        camel_id = name.endswith(("Id", "ID")) and len(name) > 2
        if _ID_NAME.search(name.lower()) or camel_id or near_unique:
            found.append(name)
    return found


def check_feature_names(ds: Dataset, expected: Sequence[str], source: str | Path) -> None:
    """Refuse a table whose feature columns are not the job's, in the job's order.

    Parameters
    ----------
    ds : Dataset
        The site's table.
    expected : sequence of str
        The feature names the job's manifest records (``spec["feature_names"]``).
    source : str or Path
        The table's file, for the message.

    Raises
    ------
    DataError
        Columns are missing, unexpected, or in another order; the message names them.
    """
    have, want = list(ds.feature_names), list(expected)
    if have == want:
        return
    missing = [c for c in want if c not in have]
    extra = [c for c in have if c not in want]
    parts = []
    if missing:
        parts.append(f"missing columns {missing}")
    if extra:
        parts.append(f"unexpected columns {extra}")
    if not parts:
        first = next(i for i, (a, b) in enumerate(zip(have, want, strict=True)) if a != b)
        parts.append(
            f"columns in another order (column {first + 1} is {have[first]!r}, the job expects "
            f"{want[first]!r})"
        )
    raise DataError(
        f"{source}: the feature columns do not match the job's model: {'; '.join(parts)}. "
        f"The job expects, in this order: {', '.join(want)} (plus the label column and, if "
        "any, the patient id column)"
    )


def save_csv(
    ds: Dataset,
    path: str | Path,
    label_column: str = "label",
    patient_id_column: str | None = None,
) -> None:
    """Write ``ds`` as CSV readable by :func:`load_csv` (float32 values round-trip exactly).

    Parameters
    ----------
    ds : Dataset
        Data.
    path : str or Path
        Destination.
    label_column : str
        Name of the label column (written last).
    patient_id_column : str, optional
        Name of the patient id column, written first when ``ds`` has ``patient_ids``
        (default ``"patient_id"`` then).
    """
    names = ds.feature_names or tuple(f"f{i}" for i in range(ds.n_features))
    ids = ds.patient_ids
    id_header = [patient_id_column or "patient_id"] if ids is not None else []
    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*id_header, *names, label_column])
        for r, (xi, yi) in enumerate(zip(ds.x, ds.y, strict=True)):
            lead = [str(ids[r])] if ids is not None else []
            writer.writerow([*lead, *(repr(float(v)) for v in xi), int(yi)])


def load_breast_cancer() -> Dataset:
    """Return scikit-learn's bundled Wisconsin breast-cancer set (569 x 30, 2 classes).

    Returns
    -------
    Dataset
        Raw (unscaled) features; label 1 = benign.
    """
    from sklearn.datasets import load_breast_cancer as _load

    bunch: Any = _load()
    names = tuple(str(n).replace(" ", "_") for n in bunch.feature_names)
    return Dataset(bunch.data.astype(np.float32), bunch.target.astype(np.int64), names)


def load_diabetes() -> RegressionDataset:
    """Return scikit-learn's bundled diabetes set (442 x 10, a real-valued target).

    The target is a measure of disease progression one year after baseline (25 to 346);
    the features (age, sex, BMI, blood pressure, six serum measurements) come centred and
    scaled by scikit-learn. A stand-in for length-of-stay-style regression.

    Returns
    -------
    RegressionDataset
        Features and target as float32.
    """
    from sklearn.datasets import load_diabetes as _load

    bunch: Any = _load()
    return RegressionDataset(bunch.data.astype(np.float32), bunch.target.astype(np.float32))


def train_test_split(
    ds: Dataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Stratified random split.

    Parameters
    ----------
    ds : Dataset
        Data.
    test_fraction : float
        In ``(0, 1)``.
    seed : int
        Shuffling seed.

    Returns
    -------
    train, test : Dataset
        Disjoint parts.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_idx: list[NDArray[np.int64]] = []
    train_idx: list[NDArray[np.int64]] = []
    for label in np.unique(ds.y):
        idx = rng.permutation(np.flatnonzero(ds.y == label))
        k = round(len(idx) * test_fraction)
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return ds.subset(np.sort(np.concatenate(train_idx))), ds.subset(
        np.sort(np.concatenate(test_idx))
    )


def partition_iid(n_examples: int, n_parts: int, seed: int = 0) -> list[NDArray[np.int64]]:
    """Split ``range(n_examples)`` into ``n_parts`` shuffled parts of near-equal size.

    Parameters
    ----------
    n_examples : int
        Number of rows.
    n_parts : int
        Number of sites (``1 <= n_parts <= n_examples``).
    seed : int
        Shuffling seed.

    Returns
    -------
    list of numpy.ndarray
        Sorted row indices per site.

    Examples
    --------
    >>> [len(p) for p in partition_iid(10, 3)]
    [4, 3, 3]
    """
    if not 1 <= n_parts <= n_examples:
        raise ConfigError(f"need 1 <= n_parts <= n_examples, got {n_parts}, {n_examples}")
    order = np.random.default_rng(seed).permutation(n_examples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, n_parts)]


def partition_dirichlet(
    y: NDArray[np.int64],
    n_parts: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 2,
) -> list[NDArray[np.int64]]:
    """Label-skewed split: each class is spread over sites with Dirichlet(alpha) proportions.

    Small ``alpha`` (0.1) gives sites dominated by one class; large ``alpha`` (100) is close
    to IID. Draws are repeated (up to 100 times) until every site has ``min_size`` rows.

    Parameters
    ----------
    y : numpy.ndarray
        Integer labels.
    n_parts : int
        Number of sites (>= 1).
    alpha : float
        Concentration (> 0).
    seed : int
        Seed.
    min_size : int
        Smallest acceptable site.

    Returns
    -------
    list of numpy.ndarray
        Sorted row indices per site; together a partition of ``range(len(y))``.

    Raises
    ------
    ValueError
        Bad parameters, or no draw met ``min_size``.
    """
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ConfigError(f"alpha must be finite and > 0, got {alpha}")
    if n_parts < 1 or n_parts * min_size > len(y):
        raise DataError(f"cannot make {n_parts} sites of >= {min_size} rows from {len(y)}")
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_parts)]
        for label in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == label))
            props = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [np.array(sorted(p), dtype=np.int64) for p in parts]
    raise DataError(f"no Dirichlet({alpha}) draw gave every site {min_size} rows; raise alpha")
