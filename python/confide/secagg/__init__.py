"""Secure aggregation: the masking primitives and the SecAgg+ protocol.

SecAgg+ follows Bell et al. (CCS 2020) and Bonawitz et al. (CCS 2017).

A transport-independent protocol layer: pure logic and cryptography, explicit
JSON-serialisable messages, no networking and no global state. The federation runtime
carries the messages as round stages and calls the ``close_*`` methods at each deadline.

* :mod:`~confide.secagg.primitives` -- quantization, mask expansion, bit packing (Rust core).
* :mod:`~confide.secagg.params` -- threat model -> neighbour count, threshold, modulus.
* :mod:`~confide.secagg.graph` -- random Harary graphs from the session id.
* :mod:`~confide.secagg.crypto` -- X25519, HKDF, ChaCha20-Poly1305, Ed25519.
* :mod:`~confide.secagg.messages` -- the messages and their strict JSON form.
* :class:`ClientSecAgg` / :class:`ServerSecAgg` -- the two state machines.
"""

from confide.errors import (
    InfeasibleConfigError,
    LateSubmissionError,
    MessageFormatError,
    ProtocolViolationError,
    SecAggAbortError,
    SecAggError,
)
from confide.secagg.client import ClientSecAgg
from confide.secagg.graph import harary_graph
from confide.secagg.messages import (
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
from confide.secagg.params import (
    SecAggParams,
    ThreatModel,
    assess,
    derive_params,
    required_modulus_bits,
)
from confide.secagg.primitives import (
    MaskDomain,
    apply_masks,
    dequantize,
    expand_mask,
    pack_bits,
    quantize,
    ring_dtype,
    unpack_bits,
)
from confide.secagg.server import AggregateResult, ServerSecAgg

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
    "MaskDomain",
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
    "apply_masks",
    "assess",
    "decode",
    "dequantize",
    "derive_params",
    "expand_mask",
    "harary_graph",
    "pack_bits",
    "quantize",
    "required_modulus_bits",
    "ring_dtype",
    "unpack_bits",
]
