"""SqueezeNet 1.1, the small CNN, the architecture registry and safetensors weights."""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from torch import nn  # noqa: E402

from confide.errors import ManifestError, NonFiniteError, WireFormatError  # noqa: E402
from confide.training import torch_models  # noqa: E402
from confide.training.torch_models import (  # noqa: E402
    SqueezeNet11,
    architectures,
    build_model,
    count_parameters,
    load_weights,
    register_architecture,
    squeezenet1_1,
)


def spec(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "engine": "torch",
        "arch": "squeezenet1_1",
        "num_classes": 2,
        "input_shape": [3, 64, 64],
    }
    base.update(kw)
    return base


@pytest.mark.parametrize(("classes", "expected"), [(1000, 1_235_496), (2, 723_522)])
def test_squeezenet_parameter_counts_match_the_reference(classes: int, expected: int) -> None:
    assert count_parameters(SqueezeNet11(num_classes=classes)) == expected
    assert count_parameters(build_model(spec(num_classes=classes))) == expected


def test_squeezenet_layout_and_names_match_torchvision() -> None:
    m = SqueezeNet11(num_classes=10)
    names = [n for n, _ in m.named_parameters()]
    assert names[:4] == [
        "features.0.weight",
        "features.0.bias",
        "features.3.squeeze.weight",
        "features.3.squeeze.bias",
    ]
    assert names[-2:] == ["classifier.1.weight", "classifier.1.bias"]
    assert len(names) == 2 + 8 * 3 * 2 + 2
    shapes = dict(m.named_parameters())
    assert tuple(shapes["features.12.expand3x3.weight"].shape) == (256, 64, 3, 3)
    assert tuple(shapes["classifier.1.weight"].shape) == (10, 512, 1, 1)
    assert not any(getattr(mod, "inplace", False) for mod in m.modules())
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())


@pytest.mark.parametrize("side", [17, 64, 224])
def test_squeezenet_forward_shapes(side: int) -> None:
    m = build_model(spec(input_shape=[3, side, side], num_classes=5)).eval()
    with torch.no_grad():
        out = m(torch.zeros(2, 3, side, side))
    assert tuple(out.shape) == (2, 5)


def test_squeezenet_initialisation_follows_the_reference() -> None:
    torch.manual_seed(0)
    m = SqueezeNet11(num_classes=4)
    final = m.classifier[1].weight.detach()
    assert abs(float(final.std()) - 0.01) < 0.002
    assert all(
        float(p.detach().abs().sum()) == 0.0 for n, p in m.named_parameters() if n.endswith("bias")
    )


def test_small_cnn_is_small_and_grey_capable() -> None:
    m = build_model(spec(arch="small_cnn", input_shape=[1, 8, 8], num_classes=3))
    assert count_parameters(m) == 1299
    assert tuple(m(torch.zeros(4, 1, 8, 8)).shape) == (4, 3)
    wide = build_model(spec(arch="small_cnn", options={"width": 4}))
    assert count_parameters(wide) < count_parameters(m)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"engine": "numpy"}, "not a torch model spec"),
        ({"arch": "resnet9000"}, "unknown architecture 'resnet9000'"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"input_shape": [3, 64]}, "input_shape"),
        ({"input_shape": [3, 8, 8]}, "at least 17x17"),
        ({"input_shape": [3, 64, "64"]}, "input_shape"),
        ({"hidden": [3]}, "unknown keys"),
        ({"options": {"nope": 1}}, "cannot build"),
        ({"options": ["dropout"]}, "options"),
    ],
)
def test_bad_specs_are_manifest_errors(bad: dict[str, object], match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        build_model(spec(**bad))


def test_registry_rejects_duplicates_and_builds_custom() -> None:
    def tiny(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))

    register_architecture("test_tiny_linear", tiny, replace=True)
    assert "test_tiny_linear" in architectures()
    m = build_model(spec(arch="test_tiny_linear", input_shape=[1, 2, 2]))
    assert count_parameters(m) == 4 * 2 + 2
    with pytest.raises(ManifestError, match="already registered"):
        register_architecture("test_tiny_linear", tiny)
    with pytest.raises(ManifestError, match="callable"):
        register_architecture("x", 3)  # type: ignore[arg-type]


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_load_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = SqueezeNet11(num_classes=2)
    path = _save(tmp_path / "w.safetensors", {k: v.detach() for k, v in src.named_parameters()})
    dst = SqueezeNet11(num_classes=2)
    ids = {n: id(p) for n, p in dst.named_parameters()}
    load_weights(dst, path)
    for (n, a), (_, b) in zip(src.named_parameters(), dst.named_parameters(), strict=True):
        assert torch.equal(a, b), n
        assert id(b) == ids[n]


def test_load_weights_converts_half_precision(tmp_path: Path) -> None:
    m = nn.Linear(3, 2)
    path = _save(
        tmp_path / "h.safetensors",
        {"weight": torch.full((2, 3), 0.5, dtype=torch.float16), "bias": torch.zeros(2)},
    )
    load_weights(m, path)
    assert m.weight.dtype == torch.float32
    assert m.weight.tolist() == [[0.5] * 3] * 2


@pytest.mark.parametrize(
    ("tensors", "error", "match"),
    [
        ({"weight": torch.ones(2, 3)}, ManifestError, r"missing \['bias'\]"),
        (
            {"weight": torch.ones(2, 3), "bias": torch.ones(2), "extra": torch.ones(1)},
            ManifestError,
            r"extra \['extra'\]",
        ),
        ({"weight": torch.ones(3, 2), "bias": torch.ones(2)}, ManifestError, r"shape \(3, 2\)"),
        (
            {"weight": torch.ones(2, 3, dtype=torch.int32), "bias": torch.ones(2)},
            ManifestError,
            "dtype",
        ),
        (
            {"weight": torch.full((2, 3), float("nan")), "bias": torch.ones(2)},
            NonFiniteError,
            "NaN",
        ),
    ],
)
def test_load_weights_errors_leave_the_model_untouched(
    tmp_path: Path, tensors: dict[str, torch.Tensor], error: type[Exception], match: str
) -> None:
    m = nn.Linear(3, 2)
    before = [p.detach().clone() for p in m.parameters()]
    path = _save(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(error, match=match) as info:
        load_weights(m, path)
    assert "bad.safetensors" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))


def test_load_weights_missing_and_corrupt_files(tmp_path: Path) -> None:
    m = nn.Linear(3, 2)
    with pytest.raises(ManifestError, match="does not exist"):
        load_weights(m, tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WireFormatError, match=r"junk\.safetensors"):
        load_weights(m, junk)


def test_doctests() -> None:
    result = doctest.testmod(torch_models, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_squeezenet_without_final_relu_keeps_the_parameters_and_gives_signed_logits() -> None:
    torch.manual_seed(0)
    ref = squeezenet1_1(2, (3, 64, 64))
    torch.manual_seed(0)
    plain = squeezenet1_1(2, (3, 64, 64), final_relu=False)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert count_parameters(plain) == 723522
    x = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        a, b = ref(x), plain(x)
    assert (a >= 0).all()  # the reference's logits are averaged ReLU outputs
    assert (b < 0).any()  # without the ReLU they can be negative (it cannot die)
    with pytest.raises(ManifestError, match="final_relu"):
        squeezenet1_1(2, (3, 64, 64), final_relu=1)  # type: ignore[arg-type]
