"""The confide exception hierarchy: every error confide raises derives from ConfideError.

The subclasses also derive from the matching builtin, so ``except ValueError`` and
``except TypeError`` keep working for bad input. Every class lives here; the core's classes
are created by the Rust extension but registered under this module's name.

**Core** (raised by the Rust kernels):

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

**Federation** (manifests, wire format, signing, client, config), each with a short
machine-readable ``code`` that the server puts, with the message, in its JSON error bodies:

=======================  ===========  =====================================================
class                    also a       raised for
=======================  ===========  =====================================================
FederationError          --           base class of the federation layer
ManifestError            ValueError   a manifest, or tensors that do not match one
WireFormatError          ValueError   bytes that are not a valid safetensors/JSON message
SignatureError           ValueError   a request signature that is missing, stale or wrong
IntegrityError           ValueError   downloaded bytes whose SHA-256 is not the announced one
ConfigError              ValueError   an invalid job, client or training configuration
DataError                ValueError   local data that cannot be used (file, column, row)
ExportError              ValueError   a model that cannot be exported (ONNX), or disagrees
ReleaseError             ValueError   a model release a device refuses (signature, hash,
                                      replayed version, DP weaker than the device policy)
PolicyViolation          --           a task outside the site's policy (no secure
                                      aggregation, no or weak DP, weak SecAgg+ parameters,
                                      a small cohort, an architecture the site does not run)
ServerError              --           the server answered with an error (``status``, ``code``)
TransportError           OSError      the server cannot be reached (refused, TLS failure)
=======================  ===========  =====================================================

**Devices** (:mod:`confide.inference`): ``DeviceError``, with ``EngineUnavailableError``
(also an ``ImportError``: the engine's extra is not installed) and ``ModelFormatError``
(``ValueError``: bytes that are not a runnable model).

**Privacy**:

========================  ===========  ==================================================
PrivacyError              --           base class of the privacy layer
InvalidPrivacyConfig      ValueError   a privacy parameter with an invalid value, or a
                                       combination the accountant cannot account for
BudgetExceeded            --           the next round would exceed the job's budget
PrivacyStateError         ValueError   a stored accountant state that is malformed
PrivacyUnsupportedError   --           an engine that cannot run the requested DP mode
                                       (e.g. no per-sample gradients for sample-level DP)
========================  ===========  ==================================================

**Secure aggregation** (messages never contain secrets): ``SecAggError`` and its
subclasses ``InfeasibleConfigError``, ``ProtocolViolationError`` (``MessageFormatError``,
``LateSubmissionError``) and ``SecAggAbortError``.
"""

from __future__ import annotations

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
    "BudgetExceeded",
    "ConfideError",
    "ConfigError",
    "DataError",
    "DeviceError",
    "EngineUnavailableError",
    "ExportError",
    "FederationError",
    "InfeasibleConfigError",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidPrivacyConfig",
    "LateSubmissionError",
    "ManifestError",
    "MessageFormatError",
    "ModelFormatError",
    "NonFiniteError",
    "PolicyViolation",
    "PrivacyError",
    "PrivacyStateError",
    "PrivacyUnsupportedError",
    "ProtocolViolationError",
    "RandomSourceError",
    "ReleaseError",
    "ReleaseIntegrityError",
    "ReleasePolicyError",
    "ReleaseReplayError",
    "ReleaseSignatureError",
    "SecAggAbortError",
    "SecAggError",
    "ServerError",
    "ShapeError",
    "ShareError",
    "SignatureError",
    "TransportError",
    "WireFormatError",
]

# --- federation -----------------------------------------------------------------------


class FederationError(ConfideError):
    """Base class of the federation layer's errors.

    Parameters
    ----------
    message : str
        What was expected and what was given.
    code : str, optional
        Machine-readable code; defaults to the class attribute ``code``.
    """

    code = "federation_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ManifestError(FederationError, ValueError):
    """A manifest is invalid, or tensors do not match it (names, shapes, dtype, finiteness)."""

    code = "manifest_mismatch"


class WireFormatError(FederationError, ValueError):
    """Bytes on the wire are not a well-formed safetensors or JSON message."""

    code = "malformed_body"


class SignatureError(FederationError, ValueError):
    """A request signature is missing, malformed, stale or does not verify."""

    code = "bad_signature"


class IntegrityError(FederationError, ValueError):
    """Downloaded content does not hash to the SHA-256 the server announced."""

    code = "integrity_error"


class ConfigError(FederationError, ValueError):
    """A job or client configuration is invalid."""

    code = "bad_config"


class ServerError(FederationError):
    """The server answered a request with an error status.

    Parameters
    ----------
    status : int
        The HTTP status code.
    code : str
        The ``code`` field of the server's JSON error body.
    message : str
        The ``message`` field of the server's JSON error body.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}", code)
        self.status = status


class TransportError(FederationError, OSError):
    """The server could not be reached (connection refused or reset, TLS failure)."""

    code = "transport_error"


class ExportError(ConfideError, ValueError):
    """A model cannot be exported, or the exported graph disagrees with the model."""


class DataError(FederationError, ValueError):
    """Local data cannot be used: a file, column or row is missing, malformed or unreadable."""

    code = "bad_data"


class DeviceError(ConfideError):
    """Base class of on-device inference errors (:mod:`confide.inference`)."""


class EngineUnavailableError(DeviceError, ImportError):
    """The requested inference engine is not installed; the message names the pip extra."""


class ModelFormatError(DeviceError, ValueError):
    """The model bytes are not a model the engine can run.

    Raised for corrupt or truncated files, the other engine's format, and unsupported
    signatures (several inputs, a non-float32 input, no batch dimension).
    """


class ReleaseError(FederationError, ValueError):
    """A release the device refuses to run; nothing of the model is used."""

    code = "release_refused"


class ReleaseSignatureError(ReleaseError, SignatureError):
    """The release is unsigned, or its signature does not verify under the pinned key."""

    code = "release_bad_signature"


class ReleaseIntegrityError(ReleaseError, IntegrityError):
    """The model bytes do not hash to the record's ``model_sha256`` (tampered download)."""

    code = "release_integrity"


class ReleaseReplayError(ReleaseError):
    """The version is older than one already accepted, or reuses it for another model."""

    code = "release_replayed"


class ReleasePolicyError(ReleaseError):
    """The record's DP guarantee is weaker than the device policy allows (or absent)."""

    code = "release_policy"


class PolicyViolation(FederationError):  # noqa: N818 (name fixed by the design)
    """The server's task is outside the site's policy; the site refused it, uploading nothing.

    Raised by :class:`confide.client.Client` when a task would weaken what the site insists
    on (:class:`confide.client.SitePolicy`): secure aggregation, differential privacy of an
    allowed kind within the epsilon budget, SecAgg+ parameters at least as strong as the
    site derives from its own threat model, the cohort size, the model architecture.
    """

    code = "policy_violation"


# --- privacy --------------------------------------------------------------------------


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


class PrivacyUnsupportedError(PrivacyError):
    """The engine cannot run the requested privacy mode (e.g. no per-sample gradients).

    Raised before anything is trained or uploaded: a round whose guarantee the engine
    cannot provide is refused, never run without it.
    """


# --- secure aggregation ---------------------------------------------------------------


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
