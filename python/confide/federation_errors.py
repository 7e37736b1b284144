"""Exceptions of the federation layer (manifests, wire format, signing, client, config).

They all derive from :class:`confide.errors.ConfideError`, and from the matching builtin where
one fits, so ``except ValueError`` keeps working for bad input:

=======================  ===========  =====================================================
class                    also a       raised for
=======================  ===========  =====================================================
FederationError          --           base class of everything below
ManifestError            ValueError   a manifest, or tensors that do not match one
WireFormatError          ValueError   bytes that are not a valid safetensors/JSON message
SignatureError           ValueError   a request signature that is missing, stale or wrong
IntegrityError           ValueError   downloaded bytes whose SHA-256 is not the announced one
ConfigError              ValueError   an invalid job or client configuration
ServerError              --           the server answered with an error (``status``, ``code``)
TransportError           OSError      the server cannot be reached (refused, TLS failure)
=======================  ===========  =====================================================

Every class carries a short machine-readable ``code``; the server puts it, with the message,
in the JSON body of its error responses.
"""

from __future__ import annotations

from confide.errors import ConfideError

__all__ = [
    "ConfigError",
    "FederationError",
    "IntegrityError",
    "ManifestError",
    "ServerError",
    "SignatureError",
    "TransportError",
    "WireFormatError",
]


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
