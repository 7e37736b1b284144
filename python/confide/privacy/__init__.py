"""Differential privacy for confide: accounting, DP-SGD, client-level DP.

Import costs: :mod:`confide.privacy.accountant` needs the ``privacy`` extra
(``pip install confide[privacy]``, which pulls Google's ``dp-accounting``); it is a server and
researcher dependency. The mechanisms (:mod:`~confide.privacy.dpsgd`,
:mod:`~confide.privacy.client_dp`) need only numpy and the Rust core, so they run on patient
devices without the extra. This package therefore imports the accountant lazily.

See ``docs/privacy.md`` for the threat model and how to choose the parameters.
"""

from __future__ import annotations

from typing import Any

from confide.errors import (
    BudgetExceeded,
    InvalidPrivacyConfig,
    PrivacyError,
    PrivacyStateError,
    PrivacyUnsupportedError,
)
from confide.privacy.adaptive import AdaptiveClipping
from confide.privacy.client_dp import (
    DDGConfig,
    DDGParams,
    add_central_noise,
    calibrate_ddg,
    clip_update,
    ddg_decode,
    ddg_encode,
    ddg_event,
    rotation_seed,
)
from confide.privacy.dpsgd import (
    DPSGD,
    clipped_patient_sum,
    poisson_sample,
    poisson_sample_patients,
    run_dpsgd,
)

__all__ = [
    "DPSGD",
    "AdaptiveClipping",
    "Budget",
    "BudgetExceeded",
    "DDGConfig",
    "DDGParams",
    "InvalidPrivacyConfig",
    "PrivacyAccountant",
    "PrivacyError",
    "PrivacyEvent",
    "PrivacyStateError",
    "PrivacyUnsupportedError",
    "add_central_noise",
    "calibrate_ddg",
    "calibrate_noise_multiplier",
    "client_fixed_cohort_event",
    "client_poisson_event",
    "clip_update",
    "clipped_patient_sum",
    "ddg_decode",
    "ddg_encode",
    "ddg_event",
    "dpsgd_event",
    "poisson_sample",
    "poisson_sample_patients",
    "rotation_seed",
    "run_dpsgd",
]

_ACCOUNTANT_NAMES = frozenset(
    {
        "Budget",
        "PrivacyAccountant",
        "PrivacyEvent",
        "calibrate_noise_multiplier",
        "client_fixed_cohort_event",
        "client_poisson_event",
        "dpsgd_event",
    }
)


def __getattr__(name: str) -> Any:
    # Lazy: the accountant needs dp-accounting (the `privacy` extra), devices do not.
    if name in _ACCOUNTANT_NAMES:
        from confide.privacy import accountant

        return getattr(accountant, name)
    raise AttributeError(f"module 'confide.privacy' has no attribute {name!r}")
