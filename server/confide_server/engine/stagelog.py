"""One log line per round stage: opened, stage closed, committed (with epsilon), aborted.

The round engine calls these at its durable transitions (after the transaction that made
the transition durable), on the ``confide_server.rounds`` logger. Each record carries
structured fields (``event``, ``round``, ``stage``, ...) that ``--log-format json`` writes
as JSON keys (:mod:`confide.logs`). Only ids, counts, stage names, reasons and privacy
figures are logged: never tokens, keys, masks, shares or update bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from confide_server.config import Config
    from confide_server.store import Store

__all__ = [
    "budget_outcome",
    "job_ended",
    "round_aborted",
    "round_committed",
    "round_opened",
    "secagg_tolerance",
    "stage_closed",
]

log = logging.getLogger("confide_server.rounds")


def _emit(level: int, message: str, **fields: Any) -> None:
    log.log(level, message, extra={"fields": fields})


def round_opened(round_id: int, stage: str, cohort: Sequence[str], deadline_s: float) -> None:
    """Log that a round started: its first stage, cohort size and stage deadline."""
    _emit(
        logging.INFO,
        f"round {round_id} opened: stage {stage}, cohort of {len(cohort)} sites, "
        f"deadline in {deadline_s:.0f} s",
        event="round_opened",
        round=round_id,
        stage=stage,
        cohort=len(cohort),
        clients=list(cohort),
    )


def stage_closed(round_id: int, stage: str, answered: int, cohort: int, next_stage: str) -> None:
    """Log that a stage closed and the round moved on to ``next_stage``."""
    _emit(
        logging.INFO,
        f"round {round_id} stage {stage} closed: {answered} of {cohort} answered; "
        f"next stage {next_stage}",
        event="stage_closed",
        round=round_id,
        stage=stage,
        answered=answered,
        cohort=cohort,
        next_stage=next_stage,
    )


def round_committed(round_id: int, stage: str, metrics: Mapping[str, Any]) -> None:
    """Log a committed round: its accuracy and, with DP, epsilon (per round and cumulative)."""
    acc = metrics.get("eval_accuracy")
    eps = metrics.get("epsilon")
    eps_round = metrics.get("epsilon_round")
    parts = [f"round {round_id} committed"]
    if isinstance(acc, float):
        parts.append(f"accuracy {acc:.4f}")
    if isinstance(eps, float):
        parts.append(
            f"epsilon {eps:.4f}"
            + (f" (round {eps_round:.4f})" if isinstance(eps_round, float) else "")
        )
    else:
        parts.append("no DP accounting")
    _emit(
        logging.INFO,
        ", ".join(parts),
        event="round_committed",
        round=round_id,
        stage=stage,
        accuracy=acc,
        epsilon=eps,
        epsilon_round=eps_round,
    )


def round_aborted(round_id: int, stage: str, reason: str, spent: bool) -> None:
    """Log an aborted round; ``spent``: whether the abort was charged to the privacy budget."""
    _emit(
        logging.WARNING,
        f"round {round_id} aborted at stage {stage}: {reason}"
        + ("; its noised aggregate was released, so the round is charged" if spent else ""),
        event="round_aborted",
        round=round_id,
        stage=stage,
        reason=reason,
        privacy_spent=spent,
    )


def job_ended(status: str, reason: str | None) -> None:
    """Log that the job left ``running`` (finished, failed, budget spent)."""
    _emit(
        logging.INFO if status == "finished" else logging.WARNING,
        f"job {status}" + (f": {reason}" if reason else ""),
        event="job_ended",
        status=status,
        reason=reason,
    )


def budget_outcome(store: Store, rounds_target: int) -> tuple[str, str]:
    """``(status, reason)`` of a job whose privacy budget is spent.

    ``("finished", "privacy budget exhausted")`` when every charged round committed;
    ``("failed", ...)`` naming the aborted rounds that were charged otherwise: budget spent
    on rounds that produced no model is a failure the operator must see (non-zero exit).
    """
    from confide_server.engine.privacy import BUDGET_EXHAUSTED, read_privacy

    _, per_round = read_privacy(store)
    rounds = store.rounds()
    charged = [r.round for r in rounds if r.status == "aborted" and r.round in per_round]
    if not charged:
        return "finished", BUDGET_EXHAUSTED
    done = sum(r.status == "committed" for r in rounds)
    listed = ", ".join(str(r) for r in charged[:10]) + (", ..." if len(charged) > 10 else "")
    return "failed", (
        f"{BUDGET_EXHAUSTED} after {done} of {rounds_target} rounds: {len(charged)} aborted "
        f"round(s) were charged because their noised updates had been released (rounds "
        f"{listed}); see the round reasons in 'confide-server status'"
    )


def secagg_tolerance(config: Config) -> tuple[bool, str] | None:
    """Whether a full SecAgg+ cohort survives one dropped site, and a line saying so.

    ``None`` without SecAgg+. With ``t = n`` (three sites under the default threat model)
    one dropout aborts the round: the line says so and how to change it.
    """
    sec = config.secagg
    if not sec.enabled:
        return None
    n = config.job.cohort_size
    p = sec.params(n)
    drops = p.n - p.t
    if drops >= 1:
        return True, (
            f"SecAgg+ with a cohort of {p.n}: threshold t={p.t}, a round survives "
            f"{drops} dropped site(s)"
        )
    return False, (
        f"SecAgg+ with a cohort of {p.n}: threshold t={p.t} = n, so no site may drop (one "
        f"dropout aborts the round) under adversarial_fraction {sec.adversarial_fraction:g}, "
        f"dropout_fraction {sec.dropout_fraction:g}; to tolerate one, enrol more sites or "
        "raise [secagg] dropout_fraction (3 sites: 0.34, which needs adversarial_fraction = 0, "
        "i.e. no site colludes with the server)"
    )
