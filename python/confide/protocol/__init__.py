"""The client/server contract: model manifests, the tensor codec, request signing, tasks.

* :mod:`~confide.protocol.manifest` -- the named, hashed description of the flat parameter
  vector, and the safetensors codec for tensors on the wire (never pickle).
* :mod:`~confide.protocol.signing` -- Ed25519 identities and the signed request form.
* :mod:`~confide.protocol.tasks` -- the stage list and every task the server sends, parsed
  once into typed objects.
"""

from confide.protocol.manifest import (
    Manifest,
    TensorSpec,
    decode_tensors,
    encode_tensors,
    sha256_hex,
)
from confide.protocol.signing import Identity, SignedRequest, verify_request

__all__ = [
    "Identity",
    "Manifest",
    "SignedRequest",
    "TensorSpec",
    "decode_tensors",
    "encode_tensors",
    "sha256_hex",
    "verify_request",
]
