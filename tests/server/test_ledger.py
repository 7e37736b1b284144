"""The contribution ledger: a signed hash chain over real federations, its checks and CLI."""

from __future__ import annotations

import base64
import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.protocol.signing import Identity
from confide_server.cli import main
from confide_server.engine.rounds import RoundEngine
from confide_server.engine.secure import SECURE_STAGES
from confide_server.ledger import (
    DOMAIN,
    GENESIS,
    LedgerFormatError,
    canonical,
    entry_hash,
    find_receipt,
    load_public_key,
    read_ledger,
    receipt_hash,
    sign_entry,
    verify_ledger,
)
from tests.server.test_rounds import _run_job
from tests.server.test_secagg_rounds import Fed
from tests.server.test_secagg_rounds import _config as secagg_config
from tests.server.util import eval_body


def _ledger(eng: RoundEngine) -> list[dict[str, Any]]:
    return read_ledger(eng.config.server.state_dir / "ledger.jsonl")


def _key(eng: RoundEngine) -> Any:
    return load_public_key(str(eng.config.server.state_dir / "release_key.pub"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> RoundEngine:
    """A finished 3-round plain federation (three sites, every update accepted)."""
    _, eng = _run_job(tmp_path_factory.mktemp("plain"), [], job__rounds=3)
    return eng


def test_plain_federation_chain_verifies_and_records_the_round(plain: RoundEngine) -> None:
    lines = _ledger(plain)
    assert lines == plain.store.ledger()  # the export is the database's ledger
    result = verify_ledger(lines, _key(plain))
    assert result.ok, result.describe()
    rounds = plain.store.rounds()
    assert [line["entry"]["round"] for line in lines] == [r.round for r in rounds] == [1, 2, 3]
    prev, base = GENESIS, plain.store.get_meta("initial_model")
    for line, r in zip(lines, rounds, strict=True):
        entry = line["entry"]
        assert entry["prev_entry_hash"] == prev
        assert line["entry_hash"] == entry_hash(entry)
        assert entry["model_version"] == r.round
        assert entry["model_hash"] == r.new_model
        assert entry["base_model"] == base == r.base_model
        assert entry["cohort"] == entry["survivors"] == ["a", "b", "c"]
        assert entry["strategy"]["name"] == "fedavg"
        assert entry["dp"] is None
        assert entry["secagg"] is None
        for stage in ("train", "evaluate"):
            subs = plain.store.submissions(r.round, stage)
            assert entry["receipts"][stage] == sorted(receipt_hash(s.receipt) for s in subs)
            assert len(subs) == 3
        prev, base = line["entry_hash"], r.new_model
    assert lines[-1]["entry"]["model_hash"] == plain.current_model


def _tampered(lines: list[dict[str, Any]], how: str) -> list[dict[str, Any]]:
    out = copy.deepcopy(lines)
    if how == "edit_survivors":
        out[1]["entry"]["survivors"] = ["a", "b"]
    elif how == "edit_and_rehash":  # a consistent hash, but no valid signature
        out[1]["entry"]["model_hash"] = "f" * 64
        out[1]["entry_hash"] = entry_hash(out[1]["entry"])
    elif how == "edit_hash":
        out[2]["entry_hash"] = "0" * 64
    elif how == "bad_signature":
        out[0]["signature"] = base64.b64encode(b"\0" * 64).decode()
    elif how == "not_base64_signature":
        out[0]["signature"] = "!!"
    elif how == "reorder":
        out[1], out[2] = out[2], out[1]
    elif how == "drop_middle":
        del out[1]
    elif how == "drop_first":
        del out[0]
    elif how == "duplicate":
        out.insert(2, out[1])
    else:  # pragma: no cover
        raise AssertionError(how)
    return out


@pytest.mark.parametrize(
    ("how", "bad_index"),
    [
        ("edit_survivors", 1),
        ("edit_and_rehash", 1),
        ("edit_hash", 2),
        ("bad_signature", 0),
        ("not_base64_signature", 0),
        ("reorder", 1),
        ("drop_middle", 1),
        ("drop_first", 0),
        ("duplicate", 2),
    ],
)
def test_tampering_is_detected_at_the_first_bad_entry(
    plain: RoundEngine, how: str, bad_index: int
) -> None:
    result = verify_ledger(_tampered(_ledger(plain), how), _key(plain))
    assert not result.ok
    assert result.bad_index == bad_index, result.describe()
    assert f"entry {bad_index}" in result.describe()


def test_wrong_key_is_detected_and_a_resigned_ledger_too(plain: RoundEngine) -> None:
    lines = _ledger(plain)
    other = Identity.generate()
    result = verify_ledger(lines, Ed25519PrivateKey.generate().public_key())
    assert not result.ok
    assert result.bad_index == 0
    assert "signature" in result.reason
    # Rebuilt and re-signed with another key: internally consistent, but not the server's.
    forged = [sign_entry(line["entry"], other) for line in lines]
    assert verify_ledger(forged, load_public_key(other.public_key_b64)).ok
    assert verify_ledger(forged, _key(plain)).bad_index == 0


def test_signature_is_domain_separated(plain: RoundEngine) -> None:
    line = _ledger(plain)[0]
    sig = base64.b64decode(line["signature"])
    _key(plain).verify(sig, DOMAIN + canonical(line["entry"]))  # raises if not
    with pytest.raises(InvalidSignature):
        _key(plain).verify(sig, canonical(line["entry"]))


def test_sites_receipts_are_found_and_forged_ones_are_not(plain: RoundEngine) -> None:
    lines = _ledger(plain)
    for r in (1, 2, 3):
        for s in plain.store.submissions(r, "train"):
            entry = find_receipt(lines, s.receipt)
            assert entry is not None
            assert entry["round"] == r
    real = plain.store.submissions(2, "train")[0].receipt
    for field, value in [("num_examples", 999), ("client_id", "mallory"), ("round", 3)]:
        assert find_receipt(lines, {**real, field: value}) is None
    assert find_receipt(lines, {**real, "stage": "evaluate"}) is None


@pytest.mark.parametrize(
    "points",
    [
        ["before_round_commit"],
        ["round_committed", "round_started"],
        ["stage_committed", "before_round_commit", "round_committed"],
    ],
)
def test_crash_and_restart_keep_a_valid_chain(
    tmp_path: Path, plain: RoundEngine, points: list[str]
) -> None:
    """SIGKILL at commit time: never a round without its entry or an entry twice."""
    final, eng = _run_job(tmp_path, points, job__rounds=3)
    assert final == plain.current_model
    lines = _ledger(eng)
    assert verify_ledger(lines, _key(eng)).ok
    ref = _ledger(plain)
    assert [x["entry"]["model_hash"] for x in lines] == [x["entry"]["model_hash"] for x in ref]
    assert [x["entry"]["survivors"] for x in lines] == [x["entry"]["survivors"] for x in ref]
    committed = [r.round for r in eng.store.rounds() if r.status == "committed"]
    assert [x["entry"]["round"] for x in lines] == committed


def test_export_deleted_is_rewritten_on_restart(tmp_path: Path) -> None:
    _, eng = _run_job(tmp_path, [])
    path = eng.config.server.state_dir / "ledger.jsonl"
    before = path.read_bytes()
    path.unlink()
    eng.store.close()
    _, eng = _run_job(tmp_path, [])  # reopens the finished job: nothing more to run
    assert path.read_bytes() == before


# -- SecAgg+ ---------------------------------------------------------------------------
def _run_secure(fed: Fed, drop_in_round: dict[int, str]) -> None:
    """Run the secure job to its end; ``drop_in_round[r]`` skips ``mask`` in round ``r``."""
    eng = fed.eng
    for _ in range(200):
        if eng.status != "running":
            return
        for c in ("a", "b", "c"):
            eng.touch(c)
        if eng.idle:
            if not eng.tick():
                fed.clock.now += 1
            continue
        for c in ("a", "b", "c"):
            t = eng.task_for(c).to_json()
            if t["action"] == "mask" and drop_in_round.get(t["round"]) == c:
                continue
            if t["action"] in SECURE_STAGES:
                fed.answer(c)
            elif t["action"] == "evaluate":
                prepared = eng.prepare(c, t["round"], "evaluate", eval_body(0.5))
                eng.commit_submission(prepared, nonce=f"{c}-eval-{t['round']}")
        if not eng.tick():
            fed.clock.now += 1000  # the deadline closes a stage a site skipped
    raise AssertionError("the secure job did not finish")


def test_secagg_federation_ledger_records_membership_not_contents(tmp_path: Path) -> None:
    # The rows are compared with the ledger: kept (with prune_updates, retention forgets
    # them once the replay window passed, and this test's clock jumps 1,000 s a stage).
    fed = Fed(tmp_path, secagg_config(tmp_path, job__rounds=2, retention__prune_updates=False))
    _run_secure(fed, {2: "b"})
    eng = fed.eng
    assert eng.status == "finished"
    lines = _ledger(eng)
    assert verify_ledger(lines, _key(eng)).ok
    assert [line["entry"]["round"] for line in lines] == [1, 2]
    first, second = (line["entry"] for line in lines)
    assert first["cohort"] == second["cohort"] == ["a", "b", "c"]
    assert first["survivors"] == ["a", "b", "c"]
    assert second["survivors"] == ["a", "c"]  # b's masked update never entered the sum
    assert second["secagg"]["n"] == 3
    assert (second["secagg"]["k"], second["secagg"]["t"]) == (2, 2)
    for entry in (first, second):
        for stage in ("advertise", "share", "mask", "unmask"):
            subs = eng.store.submissions(entry["round"], stage)
            assert subs, stage
            assert entry["receipts"][stage] == sorted(receipt_hash(s.receipt) for s in subs)
    # Membership only: no message, key, share or masked vector, not even their digests.
    text = (eng.config.server.state_dir / "ledger.jsonl").read_text()
    for r in (1, 2):
        for stage in SECURE_STAGES:
            for s in eng.store.submissions(r, stage):
                assert s.sha256 not in text
                for value in (s.payload or {}).get("message", {}).values():
                    if isinstance(value, str) and len(value) > 16:
                        assert value not in text
    receipt = eng.store.submissions(2, "mask")[0].receipt
    assert find_receipt(lines, receipt) is not None


# -- command line ----------------------------------------------------------------------
def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["ledger", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_verify_and_receipt(
    plain: RoundEngine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = plain.config.server.state_dir
    ledger, pub = str(state / "ledger.jsonl"), str(state / "release_key.pub")
    rc, out, _ = _cli(capsys, "verify", "--ledger", ledger, "--server-key", pub)
    assert (rc, out.strip()) == (0, "ledger OK: 3 entries, chain and signatures verify")
    key_b64 = (state / "release_key.pub").read_text().strip()
    assert _cli(capsys, "verify", "--ledger", ledger, "--server-key", key_b64)[0] == 0

    bad = tmp_path / "tampered.jsonl"
    lines = _tampered(_ledger(plain), "drop_middle")
    bad.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, _, err = _cli(capsys, "verify", "--ledger", str(bad), "--server-key", pub)
    assert rc == 1
    assert "INVALID at entry 1" in err
    assert "round 3" in err

    receipt = plain.store.submissions(2, "train")[1].receipt
    good = tmp_path / "receipt.json"
    good.write_text(json.dumps({"receipt": receipt, "duplicate": False}))  # the whole answer
    rc, out, _ = _cli(capsys, "receipt", "--ledger", ledger, "--receipt", str(good))
    assert rc == 0
    assert "is in the ledger: round 2" in out
    assert "not verified" in out
    rc, out, _ = _cli(
        capsys, "receipt", "--ledger", ledger, "--receipt", json.dumps(receipt), "--server-key", pub
    )
    assert rc == 0
    assert "not verified" not in out
    forged = json.dumps({**receipt, "num_examples": receipt["num_examples"] + 1})
    rc, _, err = _cli(capsys, "receipt", "--ledger", ledger, "--receipt", forged)
    assert rc == 1
    assert "NOT in the ledger" in err
    # A genuine receipt checked against a tampered ledger with the key: refused.
    rc, _, err = _cli(
        capsys, "receipt", "--ledger", str(bad), "--receipt", str(good), "--server-key", pub
    )
    assert rc == 1
    assert "INVALID" in err


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing_ledger", "cannot read ledger"),
        ("not_json", "is not JSON"),
        ("wrong_shape", "is not a ledger entry"),
        ("empty", "holds no ledger entries"),
        ("bad_key", "--server-key must be"),
        ("short_key", "--server-key must be"),
        ("bad_receipt", "--receipt"),
        ("receipt_not_object", "--receipt must be the receipt"),
    ],
)
def test_cli_bad_input_is_a_clear_error_exit_2(
    plain: RoundEngine, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, needle: str
) -> None:
    state = plain.config.server.state_dir
    ledger, pub = str(state / "ledger.jsonl"), str(state / "release_key.pub")
    bad = tmp_path / "bad.jsonl"
    argv = ["verify", "--ledger", ledger, "--server-key", pub]
    if case == "missing_ledger":
        argv[2] = str(tmp_path / "nope.jsonl")
    elif case == "not_json":
        bad.write_text('{"entry": \n')
        argv[2] = str(bad)
    elif case == "wrong_shape":
        bad.write_text('{"entry": {}, "hash": "x"}\n')
        argv[2] = str(bad)
    elif case == "empty":
        bad.write_text("\n")
        argv[2] = str(bad)
    elif case == "bad_key":
        argv[4] = "not a key"
    elif case == "short_key":
        argv[4] = base64.b64encode(b"x" * 31).decode()
    elif case == "bad_receipt":
        argv = ["receipt", "--ledger", ledger, "--receipt", str(tmp_path / "none.json")]
    elif case == "receipt_not_object":
        argv = ["receipt", "--ledger", ledger, "--receipt", '{"round": 1}']
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert needle in err
    assert err.startswith("confide-server ledger: ")
    assert "Traceback" not in err


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "verify", "--ledger", "x"])  # no --server-key
    assert exc.value.code == 2
    assert "--server-key" in capsys.readouterr().err


def test_read_ledger_refuses_what_is_not_a_ledger(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text("[1, 2]\n")
    with pytest.raises(LedgerFormatError, match="line 1 is not a ledger entry"):
        read_ledger(p)


def test_a_failed_export_never_fails_the_round(
    tmp_path: Path, plain: RoundEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """The database is the record: an unwritable ledger.jsonl is logged, the job goes on."""
    (tmp_path / "state" / "ledger.jsonl").mkdir(parents=True)  # os.replace onto it fails
    with caplog.at_level(logging.WARNING, logger="confide_server"):
        final, eng = _run_job(tmp_path, [], job__rounds=3)
    assert final == plain.current_model
    assert [r.status for r in eng.store.rounds()] == ["committed"] * 3
    assert verify_ledger(eng.store.ledger(), _key(eng)).ok
    assert any("could not export the ledger" in r.getMessage() for r in caplog.records)
