r"""The one bounded JSON decoder for everything that arrives from the network.

:func:`loads_bounded` parses untrusted JSON (request bodies, SecAgg+ messages, safetensors
headers) with limits the standard decoder lacks, so no input can raise anything but
:class:`~confide.errors.WireFormatError`:

* size: at most ``max_bytes`` bytes, checked before anything is parsed;
* depth: at most ``max_depth`` nested arrays/objects, checked by a linear pre-scan (the C
  decoder recurses, and 4k-50k levels raise ``RecursionError``);
* integers: at most ``max_int_digits`` digits (a 5,000-digit integer raises ``ValueError``
  in the decoder, and 400 digits overflow ``float()`` later);
* numbers: ``NaN``, ``Infinity`` and floats that overflow to infinity (``1e309``) refused;
* text: strict UTF-8, and no lone surrogates (``"\ud800"`` decodes to a ``str`` that cannot
  be encoded again);
* objects: a key given twice is refused (two tensors of one name, two ``client_id``).

Examples
--------
>>> loads_bounded(b'{"a": [1, 2.5, "x"]}')
{'a': [1, 2.5, 'x']}
>>> loads_bounded(b"[" * 100 + b"]" * 100)
Traceback (most recent call last):
...
confide.errors.WireFormatError: JSON nested deeper than 32 levels
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from confide.errors import WireFormatError

__all__ = ["DEFAULT_MAX_DEPTH", "DEFAULT_MAX_INT_DIGITS", "loads_bounded"]

#: Nesting levels allowed by default (confide's own messages use at most 4).
DEFAULT_MAX_DEPTH = 32
#: Digits of a JSON integer allowed by default (a SecAgg+ field element has at most 20).
DEFAULT_MAX_INT_DIGITS = 64

# A JSON string literal (with escapes, possibly unterminated), and every byte but ``[]{}``.
# One left-to-right pass: a string is consumed once, so brackets inside strings are not
# counted and the scan is linear in the input (no restart inside a string).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)  # runs, not bytes
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Only a \uD800-\uDFFF escape can produce a surrogate (strict UTF-8 text holds none).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse_int(text: str, max_digits: int) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > max_digits:
        raise WireFormatError(f"JSON integer of {digits} digits; at most {max_digits} allowed")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise WireFormatError(f"JSON number of {len(text)} characters; at most 64 allowed")
    value = float(text)
    if not math.isfinite(value):
        raise WireFormatError(f"JSON number {text} overflows a 64-bit float")
    return value


def _refuse_constant(text: str) -> Any:
    raise WireFormatError(f"JSON {text} is not a number; send finite numbers only")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise WireFormatError(f"JSON object names key {key[:64]!r} twice")
        out[key] = value
    return out


def _depth(data: bytes) -> int:
    """Maximum nesting of ``[``/``{`` outside string literals (one linear pass).

    The string literals are cut out and every byte but the brackets dropped in C; only
    the brackets are then walked in Python, not every string token.
    """
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        if byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _check_strings(doc: Any) -> None:
    """Refuse lone surrogates in any key or string (iterative: depth is already bounded)."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise WireFormatError("JSON string holds a lone UTF-16 surrogate")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads_bounded(
    data: bytes | str,
    *,
    max_bytes: int = 1 << 20,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_int_digits: int = DEFAULT_MAX_INT_DIGITS,
    what: str = "body",
) -> Any:
    """Decode untrusted JSON within bounds; raise only :class:`WireFormatError`.

    Parameters
    ----------
    data : bytes or str
        The JSON text (bytes must be UTF-8).
    max_bytes : int
        Largest accepted input, in bytes.
    max_depth : int
        Deepest accepted nesting of arrays and objects.
    max_int_digits : int
        Longest accepted integer literal, in digits.
    what : str
        What is decoded, for the error message (``"body"``, ``"safetensors header"``).

    Returns
    -------
    Any
        The decoded value (dicts, lists, str, int, finite float, bool, None).

    Raises
    ------
    WireFormatError
        The input is too large, too deep, not UTF-8/JSON, or holds a refused value.

    Examples
    --------
    >>> loads_bounded(b'{"n": 1' + b"0" * 100 + b"}")
    Traceback (most recent call last):
    ...
    confide.errors.WireFormatError: JSON integer of 101 digits; at most 64 allowed
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise WireFormatError(f"{what} of {len(raw)} bytes; at most {max_bytes} allowed")
    depth = _depth(raw)
    if depth > max_depth:
        raise WireFormatError(f"JSON nested deeper than {max_depth} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"{what} is not UTF-8: {exc}") from None
    try:
        doc = json.loads(
            text,
            parse_int=lambda s: _parse_int(s, max_int_digits),
            parse_float=_parse_float,
            parse_constant=_refuse_constant,
            object_pairs_hook=_pairs,
        )
    except json.JSONDecodeError as exc:
        raise WireFormatError(f"{what} is not JSON: {exc}") from None
    except RecursionError:  # unreachable after the depth scan; kept as a last line
        raise WireFormatError(f"JSON nested deeper than {max_depth} levels") from None
    if _SURROGATE_ESCAPE.search(raw):  # a valid pair is one character: check what came out
        _check_strings(doc)
    return doc
