"""Errors of the SecAgg+ protocol layer.

All derive from :class:`confide.errors.ConfideError`. Messages never contain secrets: they
name the rule that was broken and the (public) client ids involved, nothing else.
"""

from __future__ import annotations

from confide.errors import ConfideError

__all__ = [
    "InfeasibleConfigError",
    "LateSubmissionError",
    "MessageFormatError",
    "ProtocolViolationError",
    "SecAggAbortError",
    "SecAggError",
]


class SecAggError(ConfideError):
    """Base class of every SecAgg+ error."""


class InfeasibleConfigError(SecAggError, ValueError):
    """The threat model, cohort size or quantization cannot meet the stated guarantees."""


class ProtocolViolationError(SecAggError, ValueError):
    """A message broke a protocol rule (wrong stage, unknown id, bad signature, ...).

    On the server this rejects one submission and the round goes on; on a client it is
    raised as :class:`SecAggAbortError`, since a client never continues after one.
    """


class MessageFormatError(ProtocolViolationError):
    """A message could not be decoded: missing or extra fields, wrong types or lengths."""


class LateSubmissionError(ProtocolViolationError):
    """A submission from a client that was already declared dropped; it is never counted."""


class SecAggAbortError(SecAggError):
    """The round is aborted.

    On a client this means the client refuses to continue and has revealed nothing more
    than it had before the offending request; the object is unusable afterwards. On the
    server it means too few clients are left to finish the round.

    Parameters
    ----------
    reason : str
        A short, stable, machine-readable reason code (e.g. ``"self-listed-dead"``).
    detail : str
        Human-readable explanation; never contains secret material.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"secure aggregation aborted ({reason}){': ' + detail if detail else ''}")
        self.reason = reason
