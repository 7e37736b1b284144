"""Attack 6 (graph re-roll): a server asks a site to advertise again for the same round.

With fresh keys on every ``advertise`` a server could re-draw the session id (a hash of
the setup and every signed advertisement, which seeds the Harary graph) as often as it
likes and keep the neighbour graph it prefers. A real site answers a repeated advertise
with the very same signed advertisement, and refuses another setup for the same round, a
round it already left, and an earlier round.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.errors import IntegrityError
from confide.secagg import RoundSetup
from confide.secagg._protocol import compute_session, neighbours
from confide.secagg.messages import Advertisement
from tests.server.test_secagg_rounds import Fed, _config, _start


def test_a_second_advertise_gets_the_same_keys(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    task = fed.eng.task_for("a").to_json()
    first = fed.parts["a"].advertise(task)
    for _ in range(5):  # the re-roll: ask again and again
        assert fed.parts["a"].advertise(task) == first
    # So the graph every honest site derives does not change either.
    setup = RoundSetup.from_json(task["setup"])
    adverts = {c: fed.parts[c].advertise(fed.eng.task_for(c).to_json()) for c in ("b", "c")}
    adverts["a"] = fed.parts["a"].advertise(task)
    msgs = [Advertisement.from_json(adverts[c]) for c in sorted(adverts)]
    digest = setup.digest()
    graph = neighbours(setup, sorted(adverts), compute_session(setup, digest, msgs))
    again = [Advertisement.from_json(fed.parts[c].advertise(fed.eng.task_for(c).to_json()))
             for c in sorted(adverts)]  # fmt: skip
    assert neighbours(setup, sorted(adverts), compute_session(setup, digest, again)) == graph


def test_another_setup_for_the_same_round_is_refused(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    task = fed.eng.task_for("a").to_json()
    fed.parts["a"].advertise(task)
    setup = dict(task["setup"])
    setup["consistency_check"] = not setup["consistency_check"]
    with pytest.raises(IntegrityError, match=r"round 1 \(another setup or task\)"):
        fed.parts["a"].advertise({**task, "setup": setup})
    # The same setup with another training config is another task, not a retry.
    config = {**task["config"], "learning_rate": 1e-9}
    with pytest.raises(IntegrityError, match=r"round 1 \(another setup or task\)"):
        fed.parts["a"].advertise({**task, "config": config})


def test_a_round_the_site_left_is_not_advertised_again(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    task = fed.eng.task_for("a").to_json()
    fed.parts["a"].advertise(task)
    fed.parts["a"].finish(1)  # e.g. it aborted on an inconsistent request
    with pytest.raises(IntegrityError, match="a round this client already left"):
        fed.parts["a"].advertise(task)
