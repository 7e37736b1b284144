"""Package-level properties: lazy accountant import, error hierarchy, reference driver."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from confide import SecureRng
from confide.errors import ConfideError
from confide.privacy import (
    BudgetExceeded,
    DDGConfig,
    InvalidPrivacyConfig,
    PrivacyError,
    PrivacyStateError,
    calibrate_ddg,
    dpsgd,
)
from tests.privacy.reference import Site, accuracy, fedavg, local_dpsgd, local_sgd


def test_mechanisms_do_not_need_dp_accounting() -> None:
    # Patient devices install confide without the `privacy` extra.
    code = (
        "import sys, confide.privacy as p; "
        "from confide.privacy import DPSGD, ddg_encode; "
        "assert 'dp_accounting' not in sys.modules, 'accountant imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_error_hierarchy() -> None:
    for cls in (InvalidPrivacyConfig, BudgetExceeded, PrivacyStateError):
        assert issubclass(cls, PrivacyError)
        assert issubclass(cls, ConfideError)
    assert issubclass(InvalidPrivacyConfig, ValueError)
    with pytest.raises(ConfideError, match="threshold"):
        DDGConfig(10, 1.0, 1.0, num_clients=2, threshold=3)


def _toy_sites() -> tuple[list[Site], np.ndarray, np.ndarray]:
    gen = np.random.default_rng(3)  # data only
    w = gen.normal(size=4)
    x = gen.normal(size=(600, 4)).astype(np.float32)
    y = (x @ w > 0).astype(np.float32)
    sites = [Site(x[i::3][:150], y[i::3][:150], np.arange(150) // 2) for i in range(3)]
    return sites, x[450:], y[450:]


def test_reference_driver_learns_with_dp() -> None:
    sites, xt, yt = _toy_sites()
    rng = SecureRng(bytes(range(32)))
    p = np.zeros(5, np.float32)
    for _ in range(5):
        ups = []
        for s in sites:
            opt = dpsgd.DPSGD(1.0, 1.0, expected_batch_size=15.0, rng=rng)
            ups.append(local_dpsgd(p, s, 5, 0.5, opt, 15 / s.n_patients, rng) - p)
        p = fedavg(p, ups)
    assert accuracy(p, xt, yt) > 0.8
    ddg = calibrate_ddg(DDGConfig(5, 1.0, 0.0, num_clients=3, threshold=2, bits=24))
    q = np.zeros(5, np.float32)
    for r in range(5):
        ups = [local_sgd(q, s, 5, 0.5, 16, rng) - q for s in sites]
        q = fedavg(q, ups, clip_norm=1.0, ddg=ddg, round_id=r, rng=rng)
    assert accuracy(q, xt, yt) > 0.8
