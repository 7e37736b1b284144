"""SecAgg+ secure aggregation (Bell et al., CCS 2020; Bonawitz et al., CCS 2017).

A transport-independent protocol layer: pure logic and cryptography, explicit
JSON-serialisable messages, no networking and no global state. The federation runtime
carries the messages as round stages and calls the ``close_*`` methods at each deadline.

* :mod:`~confide.secaggplus.params` -- threat model -> neighbour count, threshold, modulus.
* :mod:`~confide.secaggplus.graph` -- random Harary graphs from the session id.
* :mod:`~confide.secaggplus.crypto` -- X25519, HKDF, ChaCha20-Poly1305, Ed25519.
* :mod:`~confide.secaggplus.messages` -- the messages and their strict JSON form.
* :class:`ClientSecAgg` / :class:`ServerSecAgg` -- the two state machines.
"""

from confide.secaggplus.client import ClientSecAgg
from confide.secaggplus.errors import (
    InfeasibleConfigError,
    LateSubmissionError,
    MessageFormatError,
    ProtocolViolationError,
    SecAggAbortError,
    SecAggError,
)
from confide.secaggplus.graph import harary_graph
from confide.secaggplus.messages import (
    Advertisement,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    KeyBroadcast,
    MaskedInput,
    RoundSetup,
    ShareDelivery,
    ShareUpload,
    UnmaskRequest,
    UnmaskResponse,
    decode,
)
from confide.secaggplus.params import (
    SecAggParams,
    ThreatModel,
    assess,
    derive_params,
    required_modulus_bits,
)
from confide.secaggplus.server import AggregateResult, ServerSecAgg

__all__ = [
    "Advertisement",
    "AggregateResult",
    "ClientSecAgg",
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedShare",
    "InfeasibleConfigError",
    "KeyBroadcast",
    "LateSubmissionError",
    "MaskedInput",
    "MessageFormatError",
    "ProtocolViolationError",
    "RoundSetup",
    "SecAggAbortError",
    "SecAggError",
    "SecAggParams",
    "ServerSecAgg",
    "ShareDelivery",
    "ShareUpload",
    "ThreatModel",
    "UnmaskRequest",
    "UnmaskResponse",
    "assess",
    "decode",
    "derive_params",
    "harary_graph",
    "required_modulus_bits",
]
