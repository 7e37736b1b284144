"""A server that downgrades, weakens or re-rolls a round: real clients refuse, over HTTP.

Each test runs the attack a malicious operator can mount from its own job config (turn
secure aggregation off, drop DP, weaken the SecAgg+ threat model, promise a large epsilon)
against real :class:`confide.client.Client` sites over loopback HTTP, and asserts the
refusal (:class:`~confide.errors.PolicyViolation`) and that the server received nothing
from any site (no stored submission of any stage).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.client import SitePolicy
from confide.client.policy import PrivacyLedger
from confide.errors import ConfigError, PolicyViolation
from confide.protocol.certs import init_root, provision_site
from confide.protocol.tasks import DPSGDConfig, PrivacyTask, TrainConfig
from confide.secagg import SecAggParams, ThreatModel, derive_params
from tests.security.peers import STAGES
from tests.server.util import write_job
from tests.sites import run_site

SECURE = {
    "secagg__enabled": True,
    "job__cohort_size": 3,
    "job__min_clients": 3,
    "job__wait_for_clients": 3,
    "secagg__max_weight": 100,
}
SAMPLE_DP = {
    "privacy__mode": "sample",
    "privacy__noise_multiplier": 1.0,
    "privacy__sampling_rate": 0.2,
    "privacy__local_steps": 2,
    "privacy__clip_norm": 1.0,
}


def _submissions(engine: Any) -> list[tuple[int, str, str]]:
    return [
        (r.round, stage, s.client_id)
        for r in engine.store.rounds()
        for stage in STAGES
        for s in engine.store.submissions(r.round, stage)
    ]


async def _sites(
    fed: Any, tmp: Path, n: int, policy: SitePolicy | None, timeout: float = 120.0
) -> list[Any]:
    """Run ``n`` real clients against ``fed``; return each one's result or exception.

    The sites are provisioned by one consortium (each holds a certificate; the policy,
    ``None`` meaning the strict default, names the consortium's root).
    """
    rng = np.random.default_rng(3)
    root = tmp / "consortium"
    if not (root / "root.json").exists():
        init_root(root, "test-consortium")
    policy = dataclasses.replace(policy or SitePolicy(), consortium_root=str(root / "root.json"))

    async def site(k: int) -> Any:
        cid = f"site-{k}"
        provision_site(root, tmp / cid, cid)
        return await run_site(fed, tmp / cid, cid, policy, rng, retry_timeout=10.0, poll_wait=1.0)

    return list(
        await asyncio.wait_for(
            asyncio.gather(*(site(k) for k in range(n)), return_exceptions=True), timeout
        )
    )


def _refused(results: list[Any], match: str) -> None:
    for r in results:
        assert isinstance(r, PolicyViolation), r
        assert match in str(r), str(r)


async def test_downgrade_to_plain_rounds_is_refused(make_fed: Any, tmp_path: Path) -> None:
    """Attack 1: the operator restarts with ``[secagg] enabled = false`` (DP still on)."""
    fed = await make_fed(write_job(tmp_path / "job", **SAMPLE_DP))
    results = await _sites(fed, tmp_path, 2, policy=None)  # None: the strict default
    _refused(results, "without secure aggregation")
    assert _submissions(fed.engine) == []


async def test_downgrade_to_no_dp_is_refused(make_fed: Any, tmp_path: Path) -> None:
    """Attack 1: secure aggregation on, but the operator drops the ``[privacy]`` section."""
    fed = await make_fed(write_job(tmp_path / "job", **SECURE))
    results = await _sites(fed, tmp_path, 3, policy=SitePolicy())
    _refused(results, "without differential privacy")
    assert _submissions(fed.engine) == []


async def test_epsilon_above_the_site_budget_is_refused(make_fed: Any, tmp_path: Path) -> None:
    """Attack 1: DP on, but with an epsilon over the job far above what the site accepts."""
    weak = {**SAMPLE_DP, "privacy__noise_multiplier": 0.3, "privacy__sampling_rate": 1.0}
    fed = await make_fed(write_job(tmp_path / "job", **SECURE, **weak))
    results = await _sites(fed, tmp_path, 3, policy=SitePolicy(max_epsilon=10.0))
    _refused(results, "above the site policy's max_epsilon 10")
    # Accounted before the masked update is built: keys were exchanged, no update left.
    stages = {stage for _, stage, _ in _submissions(fed.engine)}
    assert stages <= {"advertise", "share"}, stages


async def test_weak_threat_model_is_refused(make_fed: Any, tmp_path: Path) -> None:
    """Attack 2: the operator declares a dropout budget above the site's (D = 1 of 3)."""
    cfg = write_job(
        tmp_path / "job",
        **SECURE,
        **SAMPLE_DP,
        secagg__adversarial_fraction=0.0,
        secagg__dropout_fraction=0.34,
    )
    fed = await make_fed(cfg)
    results = await _sites(fed, tmp_path, 3, policy=SitePolicy())
    _refused(results, "tolerates 1 dropouts of 3")
    assert _submissions(fed.engine) == []


async def test_cohort_below_the_site_minimum_is_refused(make_fed: Any, tmp_path: Path) -> None:
    """Attack 2: a cohort smaller than the site accepts (here 3 < 4)."""
    fed = await make_fed(write_job(tmp_path / "job", **SECURE, **SAMPLE_DP))
    results = await _sites(fed, tmp_path, 3, policy=SitePolicy(min_cohort_size=4))
    _refused(results, "fewer than the site policy's min_cohort_size 4")
    assert _submissions(fed.engine) == []


async def test_architecture_outside_the_policy_is_refused(make_fed: Any, tmp_path: Path) -> None:
    fed = await make_fed(write_job(tmp_path / "job", **SECURE, **SAMPLE_DP))
    results = await _sites(fed, tmp_path, 3, policy=SitePolicy(architectures=("mlp",)))
    _refused(results, "architecture 'logistic' is not in")
    assert _submissions(fed.engine) == []


async def test_a_job_within_the_strict_default_policy_runs(make_fed: Any, tmp_path: Path) -> None:
    """The control: SecAgg+ with patient-level DP-SGD at a modest epsilon is accepted."""
    cfg = write_job(tmp_path / "job", **SECURE, **SAMPLE_DP, job__rounds=1)
    fed = await make_fed(cfg)
    results = await _sites(fed, tmp_path, 3, policy=None)
    assert [getattr(r, "status", r) for r in results] == ["finished"] * 3
    assert {s for _, s, _ in _submissions(fed.engine)} >= {"advertise", "mask"}
    # Each site recorded the round it released in its own ledger.
    for k in range(3):
        assert len(PrivacyLedger(tmp_path / f"site-{k}").events) == 1


async def test_downgrade_to_semi_honest_mode_is_refused(make_fed: Any, tmp_path: Path) -> None:
    """Attack 5's downgrade: the operator turns the consistency check off.

    Without it no roster is signed, so a server could show different holders different
    rosters at unmask; a site with ``require_consistency_check`` refuses before it signs.
    """
    fed = await make_fed(write_job(tmp_path / "job", **SECURE, **SAMPLE_DP))
    results = await _sites(fed, tmp_path, 3, policy=SitePolicy(require_consistency_check=True))
    _refused(results, "requires it (require_consistency_check = true)")
    assert _submissions(fed.engine) == []


async def test_malicious_server_mode_runs_for_a_site_that_requires_it(
    make_fed: Any, tmp_path: Path
) -> None:
    """The control: with ``[secagg] consistency_check = true`` the same sites take part."""
    cfg = write_job(
        tmp_path / "job", **SECURE, **SAMPLE_DP, secagg__consistency_check=True, job__rounds=1
    )
    fed = await make_fed(cfg)
    results = await _sites(fed, tmp_path, 3, policy=SitePolicy(require_consistency_check=True))
    assert [getattr(r, "status", r) for r in results] == ["finished"] * 3
    assert {s for _, s, _ in _submissions(fed.engine)} >= {"advertise", "mask", "consistency"}


# --- the checks themselves (no HTTP) --------------------------------------------------


def test_issue_examples_of_weak_parameters_are_refused() -> None:
    """Attack 2: a ring graph k = 2 at n = 10 (one colluder recovers a victim), n = 2."""
    policy = SitePolicy()
    ring = SecAggParams(
        n=10, k=2, t=2, max_dropouts=0, quant_bits=16, clip_range=1.0, max_weight=100,
        modulus_bits=24,
    )  # fmt: skip
    with pytest.raises(PolicyViolation, match=r"not private at 2\^-40 against 1 colluding"):
        policy.check_secagg(ring)
    pair = SecAggParams(
        n=2, k=1, t=2, max_dropouts=0, quant_bits=16, clip_range=1.0, max_weight=100,
        modulus_bits=20,
    )  # fmt: skip
    with pytest.raises(PolicyViolation, match="min_cohort_size"):
        policy.check_secagg(pair)
    # What the server derives for a threat model with no adversary is refused too ...
    lax = derive_params(60, ThreatModel(0.0, 0.1), quant_bits=16, clip_range=1.0, max_weight=9)
    with pytest.raises(PolicyViolation, match="the site derives k = "):
        policy.check_secagg(lax)
    # ... and the site's own derivation passes its own check.
    mine = derive_params(60, ThreatModel(0.1, 0.1), quant_bits=16, clip_range=1.0, max_weight=9)
    policy.check_secagg(mine)
    assert lax.k < mine.k


def test_epsilon_is_recomputed_and_composed_with_the_sites_ledger(tmp_path: Path) -> None:
    """A server that announces 1 planned round but keeps running rounds hits the budget."""
    dp = DPSGDConfig(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=0.05, steps=10)
    cfg = TrainConfig(dp=dp)
    policy = SitePolicy(max_epsilon=4.0, allow_plain=True)
    ledger = PrivacyLedger(tmp_path)
    lying = PrivacyTask("sample", 1e-5, dp=dp, rounds=1)
    released, refusal = 0, None
    for r in range(1, 50):
        try:
            event = policy.check_round(lying, cfg, ledger, secure=False)
        except PolicyViolation as exc:
            refusal = exc
            break
        ledger.record(r, event)
        released += 1
    assert refusal is not None
    assert "rounds done" in str(refusal)
    assert 1 <= released < 49
    # The ledger survives a restart of the site.
    assert len(PrivacyLedger(tmp_path).events) == released
    # A task whose training config runs other DP-SGD than it announces is refused.
    other = TrainConfig(dp=DPSGDConfig(noise_multiplier=0.01, clip_norm=1.0, sampling_rate=0.05,
                                       steps=10))  # fmt: skip
    with pytest.raises(PolicyViolation, match="other DP-SGD parameters"):
        policy.check_round(lying, other, PrivacyLedger(tmp_path / "b"), secure=False)
    with pytest.raises(PolicyViolation, match="no DP-SGD"):
        policy.check_round(lying, TrainConfig(), PrivacyLedger(tmp_path / "b"), secure=False)
    # Without the planned rounds the site cannot bound epsilon over the job.
    with pytest.raises(PolicyViolation, match="planned rounds"):
        policy.check_round(PrivacyTask("sample", 1e-5, dp=dp), cfg, ledger, secure=False)


def test_central_mode_needs_an_explicit_opt_in() -> None:
    central = PrivacyTask("central", 1e-5, update_clip_norm=1.0, rounds=5)
    with pytest.raises(PolicyViolation, match="central noise is added by the server"):
        SitePolicy(allow_plain=True).check_privacy_kind(central)
    SitePolicy(allow_plain=True, dp_kinds=("central",)).check_privacy_kind(central)


def test_policy_file_is_read_strictly(tmp_path: Path) -> None:
    good = tmp_path / "site-policy.toml"
    good.write_text(SitePolicy(max_epsilon=3, architectures=("mlp",)).to_toml())
    assert SitePolicy.load(good) == SitePolicy(max_epsilon=3.0, architectures=("mlp",))
    bad = tmp_path / "bad.toml"
    bad.write_text("allow_plain = true\nrequire_secagg = false\n")
    with pytest.raises(ConfigError, match=r"unknown site-policy keys \['require_secagg'\]"):
        SitePolicy.load(bad)
    bad.write_text('allow_plain = "yes"\n')
    with pytest.raises(ConfigError, match="allow_plain must be true or false"):
        SitePolicy.load(bad)
    bad.write_text('dp_kinds = ["sample", "none"]\n')
    with pytest.raises(ConfigError, match="dp_kinds"):
        SitePolicy.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        SitePolicy.load(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "text", ["{not json", '{"rounds": [{"round": "x"}]}', '{"rounds": 3}', "\udcff"]
)
def test_a_damaged_privacy_ledger_is_a_typed_error_that_says_not_to_delete_it(
    tmp_path: Path, text: str
) -> None:
    """A site whose spend record is unreadable must stop, not start over from zero epsilon."""
    from confide.errors import PrivacyStateError

    (tmp_path / "privacy-ledger.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(PrivacyStateError, match="do not delete it"):
        PrivacyLedger(tmp_path)


def test_the_privacy_ledger_survives_reopening_and_counts_a_round_once(tmp_path: Path) -> None:
    from confide.privacy.accountant import PrivacyEvent

    ledger = PrivacyLedger(tmp_path)
    event = PrivacyEvent("poisson_gaussian", sampling_rate=0.1, noise_multiplier=1.0, count=5)
    ledger.record(1, event)
    ledger.record(1, event)  # a redo of the same round is not a second spend
    again = PrivacyLedger(tmp_path)
    assert [e.to_dict() for e in again.events] == [event.to_dict()]
    assert oct((tmp_path / "privacy-ledger.json").stat().st_mode & 0o777) == "0o600"
