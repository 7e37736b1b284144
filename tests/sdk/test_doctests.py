"""Every Examples section in the shipped packages runs and is correct.

One walker over all modules of ``confide`` and ``confide_server``: a module added later is
covered without being listed. Modules whose optional extra is not installed (torch, onnx,
...) are skipped with the reason; a module that fails to import for any other reason fails.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import confide
import confide_server

_OPTIONAL = {
    "torch",
    "torchvision",
    "onnx",
    "onnxruntime",
    "ai_edge_litert",
    "tflite_runtime",
    "PIL",
    "pydicom",
    "skimage",
    "ray",
    "dp_accounting",
    "sklearn",
    "matplotlib",
}


def _modules() -> list[str]:
    names = []
    for pkg in (confide, confide_server):
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.name.endswith("__main__"):  # runs the CLI on import
                names.append(info.name)
    return sorted(names)


MODULES = _modules()


def test_the_walker_finds_the_subpackages() -> None:
    for name in (
        "confide.protocol.manifest",
        "confide.secagg.client",
        "confide.privacy.dpsgd",
        "confide.training.numpy_engine",
        "confide_server.engine.rounds",
    ):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_examples(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in _OPTIONAL:
            pytest.skip(f"optional dependency {exc.name} not installed")
        raise
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = [t for t in finder.find(module, name) if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_examples_actually_run() -> None:
    # The walker must reach the doctests the modules carry (about 26 in secagg alone).
    total = 0
    for name in (
        "confide.secagg.params",
        "confide.secagg.messages",
        "confide.noise",
        "confide.privacy.dpsgd",
        "confide.protocol.manifest",
    ):
        module = importlib.import_module(name)
        total += sum(len(t.examples) for t in doctest.DocTestFinder().find(module, name))
    assert total > 30
