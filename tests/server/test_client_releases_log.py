"""The site's release log: durable, complete-or-absent, last two rounds kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.client.releases_log import KEEP_ROUNDS, ReleaseLog
from confide.errors import ConfigError


def test_a_record_survives_a_new_log_and_old_rounds_are_pruned(tmp_path: Path) -> None:
    log = ReleaseLog(tmp_path)
    for r in range(1, 6):
        log.put(r, "train", f"update {r}".encode())
    again = ReleaseLog(tmp_path)
    kept = [r for r in range(1, 6) if again.get(r, "train") is not None]
    assert kept == list(range(6 - KEEP_ROUNDS, 6))
    assert again.get(5, "train") == b"update 5"
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == [
        "r4-train.bin",
        "r4-train.sha256",
        "r5-train.bin",
        "r5-train.sha256",
    ]


def test_a_record_that_does_not_match_its_hash_was_never_sent(tmp_path: Path) -> None:
    log = ReleaseLog(tmp_path)
    log.put(3, "train", b"the noised update")
    (tmp_path / "releases" / "r3-train.bin").write_bytes(b"torn")
    assert log.get(3, "train") is None
    (tmp_path / "releases" / "r3-train.sha256").unlink()
    assert log.get(3, "train") is None


@pytest.mark.parametrize(("round_id", "stage"), [(-1, "train"), (1, "../x"), (1, "Train")])
def test_bad_keys_are_refused(tmp_path: Path, round_id: int, stage: str) -> None:
    with pytest.raises(ConfigError, match="keyed by"):
        ReleaseLog(tmp_path).put(round_id, stage, b"x")


@settings(max_examples=25, deadline=None)
@given(body=st.binary(max_size=4096), round_id=st.integers(0, 10**6))
def test_round_trip_is_byte_exact(
    tmp_path_factory: pytest.TempPathFactory, body: bytes, round_id: int
) -> None:
    root = tmp_path_factory.mktemp("log")
    ReleaseLog(root).put(round_id, "train", body)
    assert ReleaseLog(root).get(round_id, "train") == body
