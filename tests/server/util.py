"""Helpers shared by the server and end-to-end tests: a tiny job, signing, uploads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from confide.protocol.manifest import Manifest, encode_tensors
from confide.protocol.signing import Identity
from confide.training import NumpyTrainer
from confide_server.app import open_engine
from confide_server.config import Config, parse_config
from confide_server.engine.rounds import RoundEngine

N_FEATURES = 4


def tiny_manifest() -> Manifest:
    return NumpyTrainer.build_manifest("logistic", N_FEATURES, 2)


def write_job(tmp: Path, **overrides: Any) -> Config:
    """Write a 5-parameter logistic model and return its job config."""
    tmp.mkdir(parents=True, exist_ok=True)
    trainer = NumpyTrainer.create("logistic", N_FEATURES, 2, seed=0)
    trainer.manifest.save(tmp / "model.json")
    (tmp / "init.safetensors").write_bytes(encode_tensors(trainer.manifest, trainer.get_weights()))
    doc: dict[str, Any] = {
        "job": {
            "name": "test",
            "rounds": 2,
            "seed": 1,
            "cohort_size": 2,
            "min_clients": 1,
            "wait_for_clients": 2,
        },
        "model": {"manifest": "model.json", "weights": "init.safetensors"},
        "deadlines": {"train": 30.0, "evaluate": 30.0},
        "server": {"state_dir": "state"},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        doc.setdefault(section, {})[name] = value
    return parse_config(doc, tmp)


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after the crash point runs."""


def enrolled_engine(
    cfg: Config,
    clock: Any,
    ids: Iterable[str] = "abc",
    *,
    crash_at: str | None = None,
    touch: bool = True,
) -> RoundEngine:
    """``open_engine`` with every id in ``ids`` enrolled (once: a reopened state keeps them).

    With ``touch`` each site has just polled. ``crash_at`` raises :class:`Crash` at that
    crash point (the engine's ``crash_hook``), as a SIGKILL there would stop it.
    """

    def hook(point: str) -> None:
        if point == crash_at:
            raise Crash(point)

    engine = open_engine(cfg, clock=clock, crash_hook=hook if crash_at else None)
    for cid in ids:
        if engine.public_key(cid) is None:
            engine.enroll(engine.create_tokens(1)[0], cid, f"key-{cid}")
        if touch:
            engine.touch(cid)
    return engine


def delta_body(manifest: Manifest, value: float, num_examples: int = 10) -> bytes:
    vec = np.full(manifest.size, value, dtype=np.float32)
    return encode_tensors(manifest, vec, {"num_examples": str(num_examples)})


def eval_body(accuracy: float, num_examples: int = 10) -> bytes:
    return json.dumps({"num_examples": num_examples, "metrics": {"accuracy": accuracy}}).encode()


def signed(
    ident: Identity, cid: str, method: str, path: str, round_id: int, stage: str, body: bytes
) -> dict[str, str]:
    return ident.sign_request(cid, method, path, round_id, stage, body)


async def until(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> None:
    """Poll ``cond`` every ``step_s`` until it holds or ``timeout_s`` passed.

    It returns either way: the caller asserts the condition after it, so a timeout fails
    with the caller's own assertion.
    """
    for _ in range(int(timeout_s / step_s)):
        if cond():
            return
        await asyncio.sleep(step_s)
