"""The confide exception hierarchy.

Every error raised by confide derives from :class:`ConfideError`. The subclasses also derive
from the matching builtin, so ``except ValueError`` and ``except TypeError`` keep working:

========================  ===========  ==================================================
class                     also a       raised for
========================  ===========  ==================================================
InvalidArgumentError      ValueError   a parameter with an invalid value (sigma, bits, t)
ShapeError                ValueError   lengths or shapes that do not agree
ArrayTypeError            TypeError    wrong dtype, rank or layout; not writeable
NonFiniteError            ValueError   NaN or Inf where finite values are required
ShareError                ValueError   malformed, mismatched or inconsistent shares
AggregateError            ValueError   an aggregate that cannot be a valid sum
RandomSourceError         OSError      the operating system's random source failed
========================  ===========  ==================================================

The classes are defined by the Rust core (``confide._core``) and re-exported here.
"""

from confide._core import (
    AggregateError,
    ArrayTypeError,
    ConfideError,
    InvalidArgumentError,
    NonFiniteError,
    RandomSourceError,
    ShapeError,
    ShareError,
)

__all__ = [
    "AggregateError",
    "ArrayTypeError",
    "ConfideError",
    "InvalidArgumentError",
    "NonFiniteError",
    "RandomSourceError",
    "ShapeError",
    "ShareError",
]
