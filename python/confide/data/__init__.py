"""Local data: tabular loaders, image datasets and site partitioners.

Every dataset implements :class:`confide.training.base.SiteData` (``len``, ``labels``,
``patient_ids`` and ``batch(index)``), which is all an engine reads.
"""

from confide.data.tabular import (
    Dataset,
    RegressionDataset,
    Standardizer,
    check_feature_names,
    id_like_columns,
    load_breast_cancer,
    load_csv,
    load_diabetes,
    partition_dirichlet,
    partition_iid,
    save_csv,
    train_test_split,
)

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
