"""confide's accountant reproduces Dopamine's published privacy numbers (docs/privacy.md).

Dopamine reported epsilon 9.13 (central DP-SGD) and 10.71 (its federated, semi-central
DP-SGD under secure aggregation) at delta 1e-4, with the classic RDP conversion. The same
mechanisms under the PLD accountant give 7.48 and 8.87 (benches/python/dopamine_accounting.py
prints the full table, including the classic conversion that reproduces the published values).
"""

from __future__ import annotations

import pytest

from confide.privacy.accountant import account, dpsgd_event


@pytest.mark.parametrize(
    ("q", "z", "steps", "pld", "rdp"),
    [
        (50 / 2930, 1.0, 5860, 7.48, 8.23),  # CDP: Dopamine reported 9.13
        (0.03425, 1.15, 2920, 8.87, 9.74),  # FSCDP: Dopamine reported 10.71
    ],
)
def test_dopamine_settings(q: float, z: float, steps: int, pld: float, rdp: float) -> None:
    res = account([dpsgd_event(q, z, steps)], 1e-4)
    assert res.epsilon == pytest.approx(pld, abs=0.02)
    assert res.epsilon_rdp == pytest.approx(rdp, abs=0.02)
    assert res.epsilon < res.epsilon_rdp  # PLD is the tighter of the two
