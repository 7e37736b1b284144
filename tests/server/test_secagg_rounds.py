"""SecAgg+ rounds in the round engine (no HTTP): stages, dropouts, late clients, crashes."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.client.secure import SecureParticipant
from confide.errors import ConfigError, FederationError, IntegrityError
from confide.noise import SecureRng
from confide.protocol.manifest import decode_tensors
from confide.protocol.signing import Identity
from confide.secagg import RoundSetup
from confide_server.app import open_engine
from confide_server.config import Config
from confide_server.engine.rounds import RoundEngine, RoundError
from confide_server.engine.secure import SECURE_STAGES
from confide_server.middlewares import status_for
from tests.server.conftest import FakeClock
from tests.server.util import Crash, eval_body, tiny_manifest, write_job
from tests.support import round_seed, seeded_rng_factory

MANIFEST = tiny_manifest()
IDS = ("a", "b", "c")
RNG_SEED = b"secagg-rounds-test"


def _config(tmp: Path, **kw: object) -> Config:
    base = {
        "job__cohort_size": 3,
        "job__min_clients": 2,
        "job__wait_for_clients": 3,
        "job__rounds": 1,
        "job__max_consecutive_aborts": 2,
        "secagg__enabled": True,
        # tolerate one dropout among three: k = 2, t = 2
        "secagg__adversarial_fraction": 0.0,
        "secagg__dropout_fraction": 0.34,
        "secagg__max_weight": 100,
    }
    return write_job(tmp, **{**base, **kw})


class Fed:
    """An engine plus three sites holding real identities and SecAgg+ clients."""

    def __init__(self, tmp: Path, cfg: Config, crash_at: str | None = None) -> None:
        self.tmp, self.cfg = tmp, cfg
        self.clock = FakeClock()
        self.idents = {c: Identity.generate() for c in IDS}
        self.parts: dict[str, SecureParticipant] = {}
        for c in IDS:
            (tmp / "sites" / c).mkdir(parents=True, exist_ok=True)
            # Seeded protocol randomness, injected (tests only), so secrets are recomputable.
            self.parts[c] = SecureParticipant(
                c,
                self.idents[c].private_key,
                tmp / "sites" / c,
                rng_factory=seeded_rng_factory(RNG_SEED, c),
            )
        rng = np.random.default_rng(7)
        self.updates = {c: rng.uniform(-0.5, 0.5, MANIFEST.size).astype(np.float32) for c in IDS}
        self.weights = {"a": 10, "b": 30, "c": 60}
        self.eng = self.open(crash_at)
        for c in IDS:
            self.eng.enroll(self.eng.create_tokens(1)[0], c, self.idents[c].public_key_b64)

    def open(self, crash_at: str | None = None) -> RoundEngine:
        def hook(point: str) -> None:
            if point == crash_at:
                raise Crash(point)

        eng = open_engine(self.cfg, clock=self.clock, crash_hook=hook)
        for c in IDS:
            eng.touch(c)
        return eng

    def restart(self, crash_at: str | None = None) -> None:
        self.eng.store.close()
        self.eng = self.open(crash_at)

    def submit(self, cid: str, stage: str, msg: dict[str, Any], r: int = 1) -> dict[str, Any]:
        body = json.dumps(msg).encode()
        prepared = self.eng.prepare(cid, r, stage, body)
        return self.eng.commit_submission(prepared, nonce=f"{cid}-{stage}-{r}-{len(body)}")

    def answer(self, cid: str) -> tuple[str, dict[str, Any]] | None:
        """Let ``cid`` answer its current task; return (stage, message) or None."""
        task = self.eng.task_for(cid).to_json()
        stage = task["action"]
        if stage not in SECURE_STAGES:
            return None
        if stage == "advertise":
            msg = self.parts[cid].advertise(task)
        else:
            msg = self.parts[cid].answer(task, self.updates[cid], self.weights[cid])
        self.submit(cid, stage, msg, task["round"])
        return stage, msg

    def answer_all_and_tick(self) -> None:
        for c in IDS:
            self.answer(c)
        self.eng.tick()

    def stage(self) -> str:
        row = self.eng.store.get_round(1)
        assert row is not None
        return row.stage

    def run_stage(self, skip: tuple[str, ...] = ()) -> None:
        stage = self.stage()
        for c in IDS:
            if c not in skip:
                self.answer(c)
        if skip:
            self.clock.now += 1000  # the deadline closes the stage
        assert self.eng.tick()
        assert self.stage() != stage or self.eng.store.get_round(1).status != "open"  # type: ignore[union-attr]

    def run_stages(self, *stages: str) -> None:
        """Every site answers each of ``stages`` in turn; round 1 must be at each one."""
        for stage in stages:
            assert self.stage() == stage
            self.run_stage()

    def committed(self, r: int = 1) -> Any:
        """Round ``r``'s row, which must be committed, with its metrics."""
        row = self.eng.store.get_round(r)
        assert row is not None
        assert row.status == "committed", row
        assert row.metrics is not None
        return row

    def finish_evaluate(self) -> None:
        for c in IDS:
            task = self.eng.task_for(c).to_json()
            if task["action"] == "evaluate":
                prepared = self.eng.prepare(c, 1, "evaluate", eval_body(0.5))
                self.eng.commit_submission(prepared, nonce=f"{c}-eval")
        self.clock.now += 1000
        self.eng.tick()

    def model(self) -> np.ndarray:
        path = self.eng.store.model_path(self.eng.current_model)
        assert path is not None
        return decode_tensors(MANIFEST, self.eng.blobs.read(path))[0]

    def expected(self, survivors: tuple[str, ...], base: np.ndarray) -> np.ndarray:
        w = sum(self.weights[c] for c in survivors)
        mean = sum(self.weights[c] * self.updates[c].astype(np.float64) for c in survivors) / w
        return base + mean


def _start(fed: Fed) -> np.ndarray:
    base = fed.model()
    assert fed.eng.tick()  # round 1 starts in "advertise"
    assert fed.stage() == "advertise"
    return base


def test_secure_round_commits_the_weighted_mean(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    base = _start(fed)
    task = fed.eng.task_for("a").to_json()
    assert task["action"] == "advertise"
    assert task["model_sha256"] == fed.eng.current_model
    setup = RoundSetup.from_json(task["setup"])
    assert (setup.params.n, setup.params.k, setup.params.t) == (3, 2, 2)
    # the announced identity keys are the enrolled ones
    assert dict(setup.identity_keys) == {
        c: base64.b64decode(fed.idents[c].public_key_b64) for c in IDS
    }
    fed.run_stages("advertise", "share", "mask", "unmask")
    assert fed.stage() == "evaluate"
    fed.finish_evaluate()
    row = fed.committed()
    assert row.metrics["train_clients"] == 3
    assert row.metrics["train_examples"] == 100
    assert {k: row.metrics["secagg"][k] for k in ("n", "k", "t")} == {"n": 3, "k": 2, "t": 2}
    np.testing.assert_allclose(fed.model(), fed.expected(IDS, base), atol=2e-4)


def test_consistency_check_stage_runs_when_configured(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path, secagg__consistency_check=True))
    base = _start(fed)
    fed.run_stages("advertise", "share", "mask", "consistency", "unmask")
    fed.finish_evaluate()
    np.testing.assert_allclose(fed.model(), fed.expected(IDS, base), atol=2e-4)


def test_dropout_after_sharing_and_late_masked_input_is_rejected(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    base = _start(fed)
    fed.run_stage()  # advertise
    fed.run_stage()  # share
    # c computes its masked input but only sends it after the deadline
    late_task = fed.eng.task_for("c").to_json()
    late = fed.parts["c"].answer(late_task, fed.updates["c"], fed.weights["c"])
    fed.run_stage(skip=("c",))  # mask closes at its deadline without c
    assert fed.stage() == "unmask"
    with pytest.raises(RoundError) as err:
        fed.submit("c", "mask", late)
    assert status_for(err.value) == 409
    assert fed.eng.task_for("c").action == "wait"  # c is out of this round
    fed.run_stage()  # unmask: a and b rebuild c's pairwise masks
    fed.finish_evaluate()
    row = fed.committed()
    assert row.metrics["train_clients"] == 2
    np.testing.assert_allclose(fed.model(), fed.expected(("a", "b"), base), atol=2e-4)


def test_client_back_after_being_declared_dropped_is_refused(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    late_adv = fed.parts["b"].advertise(fed.eng.task_for("b").to_json())
    fed.run_stage(skip=("b",))  # b misses the advertise deadline
    with pytest.raises(RoundError) as err:  # late for advertise
        fed.submit("b", "advertise", late_adv)
    assert status_for(err.value) == 409
    assert fed.eng.task_for("b").action == "wait"  # not asked to share
    fed.run_stage()  # share (a and c)
    assert fed.stage() == "mask"
    before = fed.eng.store.count_submissions()
    with pytest.raises(RoundError) as err:  # and not taken in later stages either
        fed.submit("b", "mask", {"round": 1, "client_id": "b"})
    assert status_for(err.value) == 409
    assert fed.eng.store.count_submissions() == before


@pytest.mark.parametrize("stage", ["advertise", "share", "mask", "unmask"])
def test_dropout_in_each_stage_round_completes_with_t_survivors(tmp_path: Path, stage: str) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    base = _start(fed)
    order = ["advertise", "share", "mask", "unmask"]
    for s in order:
        fed.run_stage(skip=("b",) if order.index(s) >= order.index(stage) else ())
    fed.finish_evaluate()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "committed", row
    survivors = ("a", "b", "c") if stage == "unmask" else ("a", "c")
    np.testing.assert_allclose(fed.model(), fed.expected(survivors, base), atol=2e-4)


def test_too_few_survivors_abort_the_round_and_keep_the_model(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path, job__min_clients=1))
    _start(fed)
    before = fed.eng.current_model
    fed.run_stage()
    fed.run_stage(skip=("b", "c"))  # one share upload: fewer than t = 2
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "aborted"
    assert "too-few-clients" in (row.reason or "")
    assert fed.eng.current_model == before


@pytest.mark.parametrize(
    ("stage", "point"),
    [
        ("share", "submission_committed"),
        ("mask", "submission_committed"),
        ("mask", "stage_committed"),
        ("unmask", "submission_committed"),
        ("unmask", "model_written"),
    ],
)
def test_crash_and_restart_mid_round_gives_the_right_aggregate(
    tmp_path: Path, stage: str, point: str
) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    base = _start(fed)
    while fed.stage() != stage:
        fed.run_stage()
    fed.restart(crash_at=point)
    with pytest.raises(Crash):
        fed.answer_all_and_tick()
    fed.restart()
    # everyone answers whatever is still asked; the restarted server re-asks for unmask
    while fed.stage() in SECURE_STAGES:
        for c in IDS:
            fed.answer(c)
        fed.clock.now += 1000
        assert fed.eng.tick()
    fed.finish_evaluate()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "committed"
    np.testing.assert_allclose(fed.model(), fed.expected(IDS, base), atol=2e-4)


def test_no_client_secret_reaches_the_server_state(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    for _ in range(4):
        fed.run_stage()
    fed.finish_evaluate()
    fed.eng.store.close()
    blobs = b"".join(p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file())
    blobs += b"".join(p.read_bytes() for p in (tmp_path / "sites").rglob("*") if p.is_file())
    for c in IDS:
        rng = SecureRng(round_seed(RNG_SEED, c, 1))
        for secret in (rng.random_bytes(32) for _ in range(3)):  # enc, mask, self-mask seeds
            for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
                assert form not in blobs


def test_pinned_peer_key_change_is_refused(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    task = fed.eng.task_for("a").to_json()
    fed.parts["a"].advertise(task)  # pins b's and c's keys
    setup = dict(task["setup"])
    keys = dict(setup["identity_keys"])
    keys["b"] = base64.b64encode(bytes(32)).decode()
    setup["identity_keys"] = keys
    with pytest.raises(IntegrityError, match="pinned"):
        fed.parts["a"].advertise({**task, "setup": setup})


def test_infeasible_secagg_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="infeasible"):
        _config(tmp_path, secagg__adversarial_fraction=0.34, secagg__dropout_fraction=0.34)


def test_round_without_protocol_state_is_aborted_on_restart(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path, job__rounds=2))
    _start(fed)
    fed.run_stage()
    with fed.eng.store.transaction() as cur:
        cur.execute("DELETE FROM secagg_state WHERE round=1")
    fed.restart()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "aborted"
    assert "protocol state" in (row.reason or "")
    assert fed.eng.tick()  # the next round starts normally
    assert fed.eng.task_for("a").action == "advertise"


def _malformed(msg: dict[str, Any]) -> list[bytes]:
    """Structurally broken variants of a genuine SecAgg+ message, plus non-messages."""
    bad: list[bytes] = [b"", b"\xff\xfe", b"not json", b"[]", b"null", b'"x"']
    bad.append(json.dumps({**msg, "client_id": "b"}).encode())
    bad.append(json.dumps({**msg, "round": 2}).encode())
    bad.append(json.dumps({**msg, "unexpected": 1}).encode())
    for key in msg:
        if key in ("client_id", "round"):
            continue
        bad.append(json.dumps({k: v for k, v in msg.items() if k != key}).encode())
        for junk in (None, 12345, "!!!not base64!!!", {}, [[1]]):
            if junk != msg[key]:  # e.g. an empty dict is a genuine value for some fields
                bad.append(json.dumps({**msg, key: junk}).encode())
    return bad


def _submit_raw(fed: Fed, stage: str, body: bytes, nonce: str) -> None:
    fed.eng.commit_submission(fed.eng.prepare("a", 1, stage, body), nonce=nonce)


def test_malformed_secure_messages_are_rejected_and_change_nothing(tmp_path: Path) -> None:
    # At every secure stage, client "a" first sends broken messages: each must be refused
    # with a FederationError (a 4xx with a JSON body over HTTP), never another exception,
    # and the genuine message sent afterwards must still be accepted, so that the round
    # commits exactly the weighted mean it would have without the junk.
    fed = Fed(tmp_path, _config(tmp_path))
    base = _start(fed)
    for stage in ("advertise", "share", "mask", "unmask"):
        assert fed.stage() == stage
        task = fed.eng.task_for("a").to_json()
        if stage == "advertise":
            genuine = fed.parts["a"].advertise(task)
        else:
            genuine = fed.parts["a"].answer(task, fed.updates["a"], fed.weights["a"])
        for i, body in enumerate(_malformed(genuine)):
            with pytest.raises(FederationError):
                _submit_raw(fed, stage, body, f"junk-{stage}-{i}")
        fed.submit("a", stage, genuine)
        for c in ("b", "c"):
            fed.answer(c)
        assert fed.eng.tick()
    fed.finish_evaluate()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "committed"
    np.testing.assert_allclose(fed.model(), fed.expected(IDS, base), atol=2e-4)
