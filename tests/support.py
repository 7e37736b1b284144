"""Test-only helpers: unvalidated arrays as site data, and seeded randomness factories.

Nothing here ships in the wheel. Seeded generators are injected through constructor
arguments (``Client(..., rng_factory=...)``), never through environment switches.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide.client.policy import SitePolicy
from confide.noise import SecureRng
from confide.protocol.tasks import PRIVACY_MODES


@dataclass
class Arrays:
    """A :class:`confide.training.SiteData` over raw arrays, without any validation.

    Lets a test hand an engine exactly the (possibly malformed) arrays it wants to check.
    """

    x: Any
    y: Any
    patient_ids: NDArray[Any] | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> Any:
        return self.y

    def batch(self, index: NDArray[np.int64]) -> tuple[Any, Any]:
        return self.x[index], self.y[index]


def round_seed(seed: bytes, client_id: str, round_id: int) -> bytes:
    """The 32-byte seed of one client's protocol randomness in one round."""
    return hashlib.sha256(seed + f"|{client_id}|{round_id}".encode()).digest()


def seeded_rng_factory(seed: bytes, client_id: str) -> Any:
    """A ``RngFactory`` whose generators are recomputable from ``seed`` (tests only)."""

    def make(purpose: str, round_id: int) -> SecureRng:
        cid = client_id if purpose == "secagg" else f"{client_id}|{purpose}"
        return SecureRng(round_seed(seed, cid, round_id))

    return make


class PermissivePolicy(SitePolicy):
    """A site policy that accepts every task: for tests of the runtime, not of the policy.

    Shipped code has no such switch; tests that exercise plain or non-DP jobs, or SecAgg+
    parameters chosen for speed, pass it to ``Client(policy=...)`` or through
    :mod:`tests.e2e.entry` (its default). The policy's own tests (tests/security) never
    use it.
    """

    def __init__(self) -> None:
        super().__init__(
            allow_plain=True,
            allow_no_dp=True,
            dp_kinds=PRIVACY_MODES,
            max_epsilon=1e300,
            max_delta=0.999,
            min_cohort_size=2,
            peer_trust="tofu",
        )

    def check_secagg(self, params: Any) -> None:
        """Accept any SecAgg+ parameters."""

    def warm_up(self) -> None:
        """Nothing to warm up: nothing is accounted."""

    def check_epsilon(self, privacy: Any, round_event: Any, ledger: Any) -> float:
        """Accept any epsilon (nothing is accounted)."""
        return math.nan
