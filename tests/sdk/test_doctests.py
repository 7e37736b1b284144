"""The Examples sections of the public core modules run and are correct."""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from confide import clip, noise, secagg, shamir


@pytest.mark.parametrize("module", [clip, noise, secagg, shamir], ids=lambda m: m.__name__)
def test_examples(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
