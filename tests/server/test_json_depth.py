"""The bounded decoder's depth pre-scan: the same answer as the token-by-token scan.

``confide.protocol.jsonio._depth`` cuts the string literals out and walks only the
brackets (the server's JSON submissions are mostly base64 strings: walking every string
token in Python was 6 % of its time at 1,000 sites, issue 16). It must give exactly what
the reference token scan below gives, for any bytes: brackets inside strings (escaped
quotes included) never count, an unterminated string runs to the end.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.errors import WireFormatError
from confide.protocol.jsonio import _depth, loads_bounded

_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


def _reference(data: bytes) -> int:
    depth = deepest = 0
    for token in _TOKEN.finditer(data):
        first = token.group()[:1]
        if first in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif first in (b"]", b"}"):
            depth -= 1
    return deepest


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (b"", 0),
        (b'{"a": [1, 2]}', 2),
        (b'{"a": "[[[[{{{{"}', 1),
        (b'["\\"[[[", [[]]]', 3),  # an escaped quote does not end the string
        (b'[["unterminated [[[[', 2),
        (b"]]][[", 0),
        (b"[" * 40 + b"]" * 40, 40),
    ],
)
def test_known_depths(data: bytes, want: int) -> None:
    assert _depth(data) == want == _reference(data)


_JSONISH = st.lists(
    st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b",", b":", b" ", b'\\"']),
    max_size=200,
).map(b"".join)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.one_of(_JSONISH, st.binary(max_size=300)))
def test_the_same_depth_as_the_token_scan_for_any_bytes(data: bytes) -> None:
    assert _depth(data) == _reference(data)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
        max_leaves=30,
    )
)
def test_real_json_documents(doc: object) -> None:
    data = json.dumps(doc).encode()
    assert _depth(data) == _reference(data)


def test_too_deep_is_still_refused_and_strings_are_not_counted() -> None:
    with pytest.raises(WireFormatError, match="deeper than 32"):
        loads_bounded(b"[" * 33 + b"]" * 33)
    assert loads_bounded(b'["' + b"[" * 100 + b'"]') == ["[" * 100]
