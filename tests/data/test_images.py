"""Image folders and label CSVs as SiteData; the synthetic-lesion benchmark."""

from __future__ import annotations

import doctest
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from confide.data import images as images_module  # noqa: E402
from confide.data.images import (  # noqa: E402
    ArrayDataset,
    ImageDataset,
    ImageTransform,
    read_image,
    split_by_patient,
)
from confide.errors import ConfideError, ConfigError, DataError  # noqa: E402
from confide.training.base import SiteData  # noqa: E402


def png(path: Path, value: int = 128, size: tuple[int, int] = (12, 10), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        arr = np.zeros((*size, 3), np.uint8)
        arr[..., 0] = value
        Image.fromarray(arr).save(path)
    elif mode == "I;16":
        Image.fromarray(np.full(size, value * 257, np.uint16)).save(path)
    else:
        Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def write_csv(root: Path, text: str) -> Path:
    path = root / "labels.csv"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    png(tmp_path / "img" / "a.png", 0)
    png(tmp_path / "img" / "b.png", 255, mode="RGB")
    png(tmp_path / "img" / "c.png", 100, mode="I;16")
    Image.fromarray(np.full((9, 9), 200, np.uint8)).save(tmp_path / "img" / "d.jpg", quality=95)
    write_csv(
        tmp_path,
        "path,label,patient_id\n"
        "img/a.png,healthy,p1\n"
        "img/b.png,lesion,p1\n"
        "\n"
        "img/c.png,healthy,p2\n"
        "img/d.jpg,lesion,p3\n",
    )
    return tmp_path


def test_csv_dataset_is_site_data(folder: Path) -> None:
    ds = ImageDataset.from_csv(folder / "labels.csv", transform=ImageTransform(size=(8, 6)))
    assert isinstance(ds, SiteData)
    assert len(ds) == 4
    assert ds.classes == ["healthy", "lesion"]
    assert ds.labels.tolist() == [0, 1, 0, 1]
    assert ds.patient_ids.tolist() == ["p1", "p1", "p2", "p3"]  # type: ignore[union-attr]
    assert ds.input_shape == (3, 8, 6)
    x, y = ds.batch(np.array([3, 0, 1]))
    assert x.shape == (3, 3, 8, 6)
    assert x.dtype == np.float32
    assert x.flags.c_contiguous
    assert y.tolist() == [1, 0, 1]
    np.testing.assert_allclose(x[1], -1.0)  # black grey image, (0 - .5) / .5
    np.testing.assert_allclose(x[2][0], 1.0)  # red channel of the RGB image
    np.testing.assert_allclose(x[2][1:], -1.0)
    np.testing.assert_allclose(x[0], (200 / 255 - 0.5) / 0.5, atol=0.02)  # JPEG is lossy
    x16, _ = ds.batch(np.array([2]))
    np.testing.assert_allclose(x16, (100 * 257 / 65535 - 0.5) / 0.5, rtol=1e-6)


def test_transform_options(folder: Path) -> None:
    tf = ImageTransform(size=(4, 4), channels=1, mean=(0.0,), std=(1.0,))
    ds = ImageDataset.from_csv(folder / "labels.csv", transform=tf)
    x, _ = ds.batch(np.array([1]))
    assert x.shape == (1, 1, 4, 4)
    np.testing.assert_allclose(x, 0.299, atol=1e-3)  # pure red -> luma
    for bad in (
        {"size": (0, 4)},
        {"channels": 2},
        {"mean": (0.1, 0.2)},
        {"std": (0.0,)},
        {"mean": (float("nan"),)},
    ):
        with pytest.raises(ConfigError):
            ImageTransform(**bad)  # type: ignore[arg-type]


def test_given_classes_fix_label_order(folder: Path) -> None:
    ds = ImageDataset.from_csv(folder / "labels.csv", classes=["lesion", "healthy", "other"])
    assert ds.labels.tolist() == [1, 0, 1, 0]
    assert ds.num_classes == 3


def test_dicom_images(tmp_path: Path) -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    src = pydicom_data.get_testdata_file("CT_small.dcm", download=False)
    assert src is not None
    shutil.copy(src, tmp_path / "ct.dcm")
    write_csv(tmp_path, "path,label,patient_id\nct.dcm,lesion,p9\n")
    ds = ImageDataset.from_csv(tmp_path / "labels.csv", transform=ImageTransform(size=(32, 32)))
    x, _ = ds.batch(np.array([0]))
    assert x.shape == (1, 3, 32, 32)
    assert -1.0 <= float(x.min()) < float(x.max()) <= 1.0
    assert np.array_equal(x[0, 0], x[0, 2])  # grey repeated to three channels
    raw = read_image(tmp_path / "ct.dcm")
    assert raw.shape == (128, 128)
    assert raw.dtype == np.float32
    assert float(raw.min()) == 0.0
    assert float(raw.max()) == 1.0


def test_dicom_without_pydicom_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "x.dcm").write_bytes(b"\0" * 200)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    write_csv(tmp_path, "path,label,patient_id\nx.dcm,a,p1\n")
    ds = ImageDataset.from_csv(tmp_path / "labels.csv")
    with pytest.raises(DataError, match=r'pip install "confide\[dicom\]"') as info:
        ds.batch(np.array([0]))
    assert "x.dcm" in str(info.value)
    assert "line 2" in str(info.value)


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("csv_text", "match"),
    [
        (
            "file,label,patient_id\nimg/a.png,x,p\n",
            r"line 1: header must contain.*missing \['path'\]",
        ),
        ("path,label\nimg/a.png,x\n", r"line 1: .*missing \['patient_id'\]"),
        (
            "path,label,patient_id\nimg/a.png,x,p1\nimg/zz.png,x,p2\n",
            r"line 3: image file .*zz.png.* does not exist",
        ),
        ("path,label,patient_id\nimg/a.png,x,p1\nimg/a.png,,p2\n", "line 3: empty label"),
        (
            "path,label,patient_id\nimg/a.png,x,p1\n\nimg/a.png,x,\n",
            "line 4: missing patient_id for 'img/a.png'",
        ),
        ("path,label,patient_id\n,x,p1\n", "line 2: empty path"),
        ("path,label,patient_id\nimg/a.png,x\n", "line 2: expected 3 fields, got 2"),
        ("path,label,patient_id\n", "lists no images"),
        ("", "is empty"),
    ],
)
def test_csv_errors_name_the_file_and_line(folder: Path, csv_text: str, match: str) -> None:
    path = write_csv(folder, csv_text)
    with pytest.raises(DataError, match=match) as info:
        ImageDataset.from_csv(path)
    assert "labels.csv" in str(info.value)


def test_unknown_label_names_the_row(folder: Path) -> None:
    with pytest.raises(DataError, match=r"line 3: unknown label 'lesion'.*\['healthy'\]") as info:
        ImageDataset.from_csv(folder / "labels.csv", classes=["healthy"])
    assert "labels.csv" in str(info.value)


def test_missing_csv_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ImageDataset.from_csv(tmp_path / "nope.csv")
    (tmp_path / "labels.csv").write_bytes(b"path,label,patient_id\n\xff\xfe,x,p\n")
    with pytest.raises(DataError, match="not UTF-8"):
        ImageDataset.from_csv(tmp_path / "labels.csv")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"this is not an image", "cannot read image"),
        (None, "cannot read image"),  # a truncated PNG
    ],
)
def test_corrupt_images_name_the_file_and_line(
    folder: Path, content: bytes | None, match: str
) -> None:
    target = folder / "img" / "b.png"
    if content is None:
        content = target.read_bytes()[:40]
    target.write_bytes(content)
    ds = ImageDataset.from_csv(folder / "labels.csv")
    ds.batch(np.array([0]))  # the good ones still load
    with pytest.raises(DataError, match=match) as info:
        ds.batch(np.array([0, 1]))
    msg = str(info.value)
    assert "b.png" in msg
    assert "labels.csv" in msg
    assert "line 3" in msg
    with pytest.raises(DataError, match="line 3"):
        ds.validate()


def test_no_bare_exceptions_escape(folder: Path) -> None:
    ds = ImageDataset.from_csv(folder / "labels.csv")
    for bad in (np.array([9]), np.array([[0]]), np.array([0.5])):
        with pytest.raises(ConfideError):
            ds.batch(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_image(folder / "nothing.png")


# ------------------------------------------------------------------- class folders


def test_class_folders(tmp_path: Path) -> None:
    png(tmp_path / "benign" / "1.png")
    png(tmp_path / "benign" / "2.png")
    png(tmp_path / "malignant" / "3.png")
    (tmp_path / "malignant" / "notes.txt").write_text("ignored")
    ds = ImageDataset.from_folders(tmp_path, transform=ImageTransform(size=(5, 5)))
    assert ds.classes == ["benign", "malignant"]
    assert ds.labels.tolist() == [0, 0, 1]
    assert ds.patient_ids is None
    assert ds.batch(np.arange(3))[0].shape == (3, 3, 5, 5)
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageDataset.from_folders(tmp_path / "benign")
    with pytest.raises(DataError, match="does not exist"):
        ImageDataset.from_folders(tmp_path / "nope")


# --------------------------------------------------------------------------- splits


def patient_dataset(n_patients: int = 30, per: int = 3, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.integers(0, 2, n_patients), per)
    ids = np.repeat([f"p{i}" for i in range(n_patients)], per)
    return ArrayDataset(np.zeros((n_patients * per, 1), np.float32), labels, ids)


@pytest.mark.parametrize("alpha", [None, 0.3, 100.0])
def test_splits_keep_patients_whole(alpha: float | None) -> None:
    ds = patient_dataset()
    parts = split_by_patient(ds, 4, alpha, seed=1)
    assert len(parts) == 4
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(ds)))
    owners: dict[str, int] = {}
    for site, idx in enumerate(parts):
        assert idx.size > 0
        for pid in ds.patient_ids[idx]:  # type: ignore[index]
            assert owners.setdefault(str(pid), site) == site
    again = split_by_patient(ds, 4, alpha, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_split_errors_and_image_dataset_splits(folder: Path) -> None:
    with pytest.raises(ConfigError, match="n_sites"):
        split_by_patient(patient_dataset(n_patients=3), 4, None)
    ds = ImageDataset.from_csv(folder / "labels.csv")
    sites = ds.split_iid(3, seed=0)
    assert sorted(len(s) for s in sites) == [1, 1, 2]
    assert sum(len(s) for s in ds.split_dirichlet(2, alpha=1.0, seed=0)) == 4
    both = next(s for s in sites if len(s) == 2)
    assert both.patient_ids.tolist() == ["p1", "p1"]  # type: ignore[union-attr]
    m = both.materialize()
    assert np.array_equal(m.x, both.batch(np.arange(2))[0])


def test_array_dataset_validation() -> None:
    with pytest.raises(DataError, match="float32"):
        ArrayDataset(np.zeros((2, 3)), np.zeros(2, np.int64))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="labels"):
        ArrayDataset(np.zeros((2, 3), np.float32), np.zeros(3, np.int64))
    with pytest.raises(DataError, match="NaN"):
        ArrayDataset(np.full((2, 3), np.nan, np.float32), np.zeros(2, np.int64))
    with pytest.raises(DataError, match="patient_ids"):
        ArrayDataset(np.zeros((2, 3), np.float32), np.zeros(2, np.int64), np.zeros(3))


# -------------------------------------------------------------------------- lesions


def test_lesion_benchmark_is_deterministic_and_balanced() -> None:
    pytest.importorskip("pydicom")
    pytest.importorskip("skimage")
    from confide.data import lesions

    a = lesions.generate_lesion_tiles(n_patients=12, tiles_per_patient=4, size=32, seed=3)
    b = lesions.generate_lesion_tiles(n_patients=12, tiles_per_patient=4, size=32, seed=3)
    c = lesions.generate_lesion_tiles(n_patients=12, tiles_per_patient=4, size=32, seed=4)
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (48, 32, 32)
    assert set(a.sources.tolist()) == set(lesions.SOURCES)
    assert len(set(a.patient_ids.tolist())) == 12
    assert 0.25 < a.labels.mean() < 0.75
    assert int(a.images.std()) > 10  # real anatomy, not flat tiles
    assert "synthetic" in (lesions.__doc__ or "").lower()


def test_lesion_lesions_change_the_pixels() -> None:
    pytest.importorskip("pydicom")
    pytest.importorskip("skimage")
    from confide.data import lesions

    with_lesion = lesions.generate_lesion_tiles(
        n_patients=6, tiles_per_patient=1, size=32, seed=0, contrast=(0.9, 1.0)
    )
    # With near-full contrast, lesion tiles hold far more saturated pixels than the others.
    sat = ((with_lesion.images == 0) | (with_lesion.images == 255)).mean(axis=(1, 2))
    if with_lesion.labels.any() and (~with_lesion.labels.astype(bool)).any():
        assert sat[with_lesion.labels == 1].mean() > sat[with_lesion.labels == 0].mean()
    with pytest.raises(ConfigError, match="contrast"):
        lesions.generate_lesion_tiles(contrast=(0.5, 0.1))
    with pytest.raises(ConfigError, match="size"):
        lesions.generate_lesion_tiles(size=8)


def test_lesion_folder_round_trips_through_the_loader(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    pytest.importorskip("skimage")
    from confide.data import lesions

    csv_path = lesions.write_lesion_folder(
        tmp_path, n_patients=7, tiles_per_patient=3, size=32, seed=5
    )
    header = csv_path.read_text().splitlines()[0]
    assert header == "path,label,patient_id,source"
    loaded = ImageDataset.from_csv(
        csv_path, classes=lesions.CLASSES, transform=ImageTransform(size=(32, 32))
    ).materialize()
    memory = lesions.lesion_dataset(n_patients=7, tiles_per_patient=3, size=32, seed=5)
    assert np.array_equal(loaded.x, memory.x)  # bit-identical: same loader path
    assert np.array_equal(loaded.labels, memory.labels)
    assert np.array_equal(loaded.patient_ids, memory.patient_ids)  # type: ignore[arg-type]
    assert memory.classes == ["no_lesion", "lesion"]


def test_doctests() -> None:
    pytest.importorskip("pydicom")
    pytest.importorskip("skimage")
    from confide.data import lesions

    for module in (images_module, lesions):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0, module.__name__
        assert result.failed == 0, module.__name__


def test_lesion_polarity_and_size_are_checked_and_used() -> None:
    pytest.importorskip("pydicom")
    pytest.importorskip("skimage")
    from confide.data import lesions

    bright = lesions.generate_lesion_tiles(n_patients=8, tiles_per_patient=2, size=32, seed=2)
    both = lesions.generate_lesion_tiles(
        n_patients=8, tiles_per_patient=2, size=32, seed=2, polarity="both"
    )
    assert bright.images.shape == both.images.shape
    assert not np.array_equal(bright.images, both.images)
    with pytest.raises(ConfigError, match="polarity"):
        lesions.generate_lesion_tiles(polarity="dark")
    with pytest.raises(ConfigError, match="lesion_size"):
        lesions.generate_lesion_tiles(lesion_size=(0.3, 0.9))
