"""Errors raised by the privacy layer.

All derive from :class:`confide.errors.ConfideError`; configuration errors also derive from
``ValueError`` so ``except ValueError`` keeps working:

========================  ===========  ==================================================
class                     also a       raised for
========================  ===========  ==================================================
PrivacyError              --           base class of the privacy layer
InvalidPrivacyConfig      ValueError   a privacy parameter with an invalid value, or a
                                       combination the accountant cannot account for
BudgetExceeded            --           the next round would exceed the job's budget
PrivacyStateError         ValueError   a stored accountant state that is malformed or
                                       inconsistent with what is being recorded
========================  ===========  ==================================================
"""

from __future__ import annotations

from confide.errors import ConfideError

__all__ = ["BudgetExceeded", "InvalidPrivacyConfig", "PrivacyError", "PrivacyStateError"]


class PrivacyError(ConfideError):
    """Base class of every error raised by :mod:`confide.privacy`."""


class InvalidPrivacyConfig(PrivacyError, ValueError):  # noqa: N818 (name fixed by the design)
    """A privacy parameter is invalid, or the accountant cannot account for the setting."""


class BudgetExceeded(PrivacyError):  # noqa: N818 (name fixed by the design)
    """Running the next round would take epsilon above the budget.

    Parameters
    ----------
    message : str
        Human-readable explanation.
    projected_epsilon : float
        Cumulative epsilon the job would reach if the round ran.
    epsilon_max : float
        The budget.
    """

    def __init__(self, message: str, projected_epsilon: float, epsilon_max: float) -> None:
        super().__init__(message)
        self.projected_epsilon = projected_epsilon
        self.epsilon_max = epsilon_max


class PrivacyStateError(PrivacyError, ValueError):
    """A stored accountant state is malformed or contradicts a new record."""
