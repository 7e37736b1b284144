"""An offline lesion-detection benchmark built from real scans that ship inside packages.

**The lesions are synthetic.** No labelled medical image set ships inside a Python package,
and nothing may be downloaded at run time, so this module builds one honestly: the
*backgrounds* are real medical images bundled with pydicom and scikit-image, the *lesions*
are painted on. It is a controlled benchmark for tests, the image demo and the benchmarks,
not a clinical data set, and results on it say nothing about diagnostic performance. Point
:class:`confide.data.images.ImageDataset` at your own folder for real work.

Backgrounds (all bundled, no network):

=========================  ==========================================================
``ct_small``               pydicom ``CT_small.dcm``: 128x128 CT slice
``ct_j2k``                 pydicom ``693_J2KI.dcm``: 512x512 CT slice (JPEG 2000)
``mr_small``               pydicom ``MR_small.dcm``: 64x64 MR slice
``mr_overlay``             pydicom ``examples_overlay.dcm``: 300x484 MR slice
``retina``                 ``skimage.data.retina()``: fundus photograph (green channel)
``microaneurysms``         ``skimage.data.microaneurysms()``: fundus detail, 102x102
=========================  ==========================================================

Task: each tile is labelled ``lesion`` (1) or ``no_lesion`` (0), with probability 1/2. A
lesion is a smoothly blurred ellipse of different intensity (brighter by ``contrast`` by
default, or brighter or darker with ``polarity="both"``; axes ``lesion_size`` of the tile,
random aspect and angle) at a random position. Every tile, with or without a lesion, gets
the same mild pixel noise, so the lesion is not given away by texture alone. The defaults
(bright lesions, contrast 0.5-0.8, axes 12-25 % of the tile) are what a CNN trained from
scratch on a few hundred tiles learns within the demo's budget; fainter, smaller or
two-signed lesions make a harder task (at the previous defaults, contrast 0.1-0.25 and axes
6-16 %, neither SqueezeNet nor the small CNN beat chance on 600 tiles in 10 epochs).

Patients: a pseudo-"patient" is one background scan, one region of it (a random window) and
one intensity response (gamma); their ``tiles_per_patient`` tiles are jittered crops of that
region (shifts, flips). So tiles of one patient are correlated, as a patient's images are,
and site splits and patient-level DP-SGD have something real to respect.

Everything is deterministic from ``seed`` (``numpy.random.default_rng``: it protects no
secret). :func:`write_lesion_folder` writes 8-bit PNGs and a ``path,label,patient_id`` CSV
that :meth:`~confide.data.images.ImageDataset.from_csv` reads; :func:`lesion_dataset`
returns the same records in memory, bit-identical to what the loader produces from the
folder.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide.data.images import ArrayDataset, ImageTransform
from confide.errors import ConfigError, DataError

__all__ = [
    "CLASSES",
    "SOURCES",
    "LesionTiles",
    "generate_lesion_tiles",
    "lesion_dataset",
    "load_scans",
    "write_lesion_folder",
]

#: Class names, index = label.
CLASSES = ("no_lesion", "lesion")
#: Background scans, in the order patients cycle through them.
SOURCES = ("ct_small", "ct_j2k", "mr_small", "mr_overlay", "retina", "microaneurysms")

_DICOM_FILES = {
    "ct_small": "CT_small.dcm",
    "ct_j2k": "693_J2KI.dcm",
    "mr_small": "MR_small.dcm",
    "mr_overlay": "examples_overlay.dcm",
}
_NOISE_STD = 0.02
_MAX_SCAN_SIDE = 384  # large scans are downsampled once: tiles never need more detail


def _normalise(pixels: NDArray[Any]) -> NDArray[np.float32]:
    p = np.asarray(pixels, dtype=np.float64)
    lo, hi = np.percentile(p, [0.5, 99.5])
    out = np.clip((p - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(p)
    return out.astype(np.float32)


def _shrink(img: NDArray[np.float32]) -> NDArray[np.float32]:
    from PIL import Image

    h, w = img.shape
    scale = _MAX_SCAN_SIDE / max(h, w)
    if scale >= 1.0:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR), np.float32)


def _load_source(name: str) -> NDArray[np.float32]:
    if name in _DICOM_FILES:
        try:
            import pydicom
            from pydicom.data import get_testdata_file
        except ImportError:
            raise DataError(
                'the lesion benchmark reads pydicom\'s bundled scans: pip install "confide[dicom]"'
            ) from None
        path = get_testdata_file(_DICOM_FILES[name], download=False)
        if path is None:
            raise DataError(f"pydicom's bundled test file {_DICOM_FILES[name]!r} is missing")
        try:
            ds = pydicom.dcmread(str(path))
            pixels = np.asarray(ds.pixel_array, dtype=np.float64)
        except Exception as exc:  # decoder plugins raise their own types
            raise DataError(
                f"cannot decode {_DICOM_FILES[name]!r}: {type(exc).__name__}: {exc}"
            ) from None
        return _shrink(_normalise(pixels))
    try:
        import skimage.data
    except ImportError:
        raise DataError(
            "the lesion benchmark reads scikit-image's bundled images: pip install scikit-image"
        ) from None
    if name == "retina":
        fundus = skimage.data.retina()  # type: ignore[no-untyped-call]
        return _shrink(_normalise(fundus[:, :, 1]))  # green channel: best contrast
    if name == "microaneurysms":
        return _normalise(skimage.data.microaneurysms())  # type: ignore[no-untyped-call]
    raise ConfigError(f"unknown lesion background {name!r}; expected one of {SOURCES}")


@functools.lru_cache(maxsize=1)
def load_scans() -> dict[str, NDArray[np.float32]]:
    """Return the background scans, grey float32 in [0, 1] (cached).

    Returns
    -------
    dict of str to numpy.ndarray
        :data:`SOURCES` to ``(H, W)`` images (read-only).

    Raises
    ------
    DataError
        pydicom or scikit-image is missing, or a bundled file cannot be decoded.

    Examples
    --------
    >>> scans = load_scans()
    >>> list(scans) == list(SOURCES), scans["ct_small"].shape
    (True, (128, 128))
    """
    scans = {name: _load_source(name) for name in SOURCES}
    for img in scans.values():
        img.setflags(write=False)
    return scans


@dataclass(frozen=True)
class LesionTiles:
    """Generated tiles.

    Parameters
    ----------
    images : numpy.ndarray
        ``(n, size, size)`` uint8 grey tiles.
    labels : numpy.ndarray
        ``(n,)`` int64: 1 lesion, 0 none.
    patient_ids : numpy.ndarray
        ``(n,)`` str patient of each tile (``"p0000"``...).
    sources : numpy.ndarray
        ``(n,)`` str background scan of each tile.
    """

    images: NDArray[np.uint8]
    labels: NDArray[np.int64]
    patient_ids: NDArray[np.str_]
    sources: NDArray[np.str_]


def _pick_region(scan: NDArray[np.float32], rng: np.random.Generator) -> tuple[int, int, int]:
    """Pick a square window (top, left, side) of the scan showing tissue, not background."""
    h, w = scan.shape
    best: tuple[float, tuple[int, int, int]] | None = None
    for _ in range(12):
        side = int(rng.uniform(0.4, 0.75) * min(h, w))
        side = max(16, min(side, h, w))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        win = scan[top : top + side, left : left + side]
        score = float(win.std()) + (0.0 if float(win.mean()) > 0.08 else -1.0)
        if best is None or score > best[0]:
            best = (score, (top, left, side))
    if best is None:  # unreachable: the loop runs at least once
        raise DataError("no region found")
    return best[1]


def _lesion_mask(
    size: int, rng: np.random.Generator, axes: tuple[float, float] = (0.12, 0.25)
) -> NDArray[np.float32]:
    """Draw a blurred ellipse in [0, 1] at a random position, axes a fraction of the tile."""
    cy, cx = rng.uniform(0.2, 0.8, size=2) * size
    a, b = rng.uniform(axes[0], axes[1], size=2) * size
    theta = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    edge = 1.5 / max(1.0, min(a, b))  # about a 1.5-pixel soft border, like a blur
    mask: NDArray[np.float32] = (1.0 / (1.0 + np.exp((r - 1.0) / edge))).astype(np.float32)
    return mask


def _check_params(
    n_patients: int,
    tiles_per_patient: int,
    size: int,
    contrast: tuple[float, float],
    lesion_size: tuple[float, float] = (0.12, 0.25),
    polarity: str = "bright",
) -> None:
    for name, value, low in (
        ("n_patients", n_patients, 1),
        ("tiles_per_patient", tiles_per_patient, 1),
        ("size", size, 16),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    lo, hi = contrast
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(
            f"contrast must be (low, high) with 0 < low <= high <= 1, got {contrast!r}"
        )
    lo, hi = lesion_size
    if not 0.0 < lo <= hi <= 0.5:
        raise ConfigError(
            "lesion_size must be (low, high) fractions of the tile with 0 < low <= high <= "
            f"0.5, got {lesion_size!r}"
        )
    if polarity not in ("bright", "both"):
        raise ConfigError(f"polarity must be 'bright' or 'both', got {polarity!r}")


def generate_lesion_tiles(
    n_patients: int = 60,
    tiles_per_patient: int = 5,
    size: int = 64,
    seed: int = 0,
    contrast: tuple[float, float] = (0.5, 0.8),
    lesion_size: tuple[float, float] = (0.12, 0.25),
    polarity: str = "bright",
    *,
    scans: Mapping[str, NDArray[np.float32]] | None = None,
) -> LesionTiles:
    """Generate the benchmark's tiles (see the module docstring: lesions are synthetic).

    Parameters
    ----------
    n_patients : int, default 60
        Pseudo-patients; backgrounds cycle through :data:`SOURCES`.
    tiles_per_patient : int, default 5
        Tiles per patient.
    size : int, default 64
        Tile side in pixels (>= 16).
    seed : int, default 0
        Seed of everything random here.
    contrast : (float, float), default (0.5, 0.8)
        Range of the lesion's intensity difference (on a [0, 1] scale).
    lesion_size : (float, float), default (0.12, 0.25)
        Range of the ellipse's semi-axes, as fractions of the tile side.
    polarity : {"bright", "both"}, default "bright"
        Lesions brighter than the tissue, or brighter or darker with probability 1/2.
    scans : mapping of str to numpy.ndarray, optional
        Other backgrounds (grey float32 in [0, 1]; patients cycle through them in order),
        e.g. public natural images for a public pretraining task; default
        :func:`load_scans`.

    Returns
    -------
    LesionTiles
        ``n_patients * tiles_per_patient`` tiles.

    Examples
    --------
    >>> t = generate_lesion_tiles(n_patients=2, tiles_per_patient=3, size=32, seed=1)
    >>> t.images.shape, t.images.dtype, sorted(set(t.patient_ids.tolist()))
    ((6, 32, 32), dtype('uint8'), ['p0000', 'p0001'])
    """
    from PIL import Image

    _check_params(n_patients, tiles_per_patient, size, contrast, lesion_size, polarity)
    backgrounds = load_scans() if scans is None else dict(scans)
    names = SOURCES if scans is None else tuple(backgrounds)
    if not names:
        raise ConfigError("scans must hold at least one background image")
    rng = np.random.default_rng(seed)
    n = n_patients * tiles_per_patient
    images = np.empty((n, size, size), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    ids: list[str] = []
    sources: list[str] = []
    k = 0
    for p in range(n_patients):
        source = names[p % len(names)]
        scan = backgrounds[source]
        top, left, side = _pick_region(scan, rng)
        gamma = float(rng.uniform(0.8, 1.25))
        h, w = scan.shape
        for _ in range(tiles_per_patient):
            jitter = max(1, side // 10)
            t = int(np.clip(top + rng.integers(-jitter, jitter + 1), 0, h - side))
            lft = int(np.clip(left + rng.integers(-jitter, jitter + 1), 0, w - side))
            crop = np.ascontiguousarray(scan[t : t + side, lft : lft + side])
            tile = np.asarray(
                Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR), np.float64
            )
            if rng.random() < 0.5:
                tile = tile[:, ::-1]
            if rng.random() < 0.5:
                tile = tile[::-1, :]
            tile = np.clip(tile, 0.0, 1.0) ** gamma
            label = int(rng.random() < 0.5)
            if label:
                sign = 1.0 if polarity == "bright" or rng.random() < 0.5 else -1.0
                tile = tile + sign * rng.uniform(*contrast) * _lesion_mask(size, rng, lesion_size)
            tile = tile + rng.normal(0.0, _NOISE_STD, size=tile.shape)
            images[k] = np.round(np.clip(tile, 0.0, 1.0) * 255.0).astype(np.uint8)
            labels[k] = label
            ids.append(f"p{p:04d}")
            sources.append(source)
            k += 1
    return LesionTiles(images, labels, np.array(ids), np.array(sources))


def write_lesion_folder(
    root: str | Path,
    n_patients: int = 60,
    tiles_per_patient: int = 5,
    size: int = 64,
    seed: int = 0,
    contrast: tuple[float, float] = (0.5, 0.8),
    lesion_size: tuple[float, float] = (0.12, 0.25),
    polarity: str = "bright",
) -> Path:
    """Write the tiles as PNGs plus ``labels.csv`` (``path,label,patient_id,source``).

    Parameters
    ----------
    root : str or Path
        Output folder (created); images go to ``root/images/``.
    n_patients, tiles_per_patient, size, seed, contrast, lesion_size, polarity
        See :func:`generate_lesion_tiles`.

    Returns
    -------
    Path
        The CSV, ready for :meth:`~confide.data.images.ImageDataset.from_csv`.

    Examples
    --------
    >>> import tempfile
    >>> from confide.data.images import ImageDataset
    >>> csv_path = write_lesion_folder(tempfile.mkdtemp(), n_patients=2, tiles_per_patient=2,
    ...                                size=32)
    >>> len(ImageDataset.from_csv(csv_path, classes=CLASSES))
    4
    """
    from PIL import Image

    tiles = generate_lesion_tiles(
        n_patients, tiles_per_patient, size, seed, contrast, lesion_size, polarity
    )
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    csv_path = root / "labels.csv"
    per_patient: dict[str, int] = {}
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient_id", "source"])
        for img, label, pid, source in zip(
            tiles.images, tiles.labels, tiles.patient_ids, tiles.sources, strict=True
        ):
            j = per_patient.get(str(pid), 0)
            per_patient[str(pid)] = j + 1
            rel = f"images/{pid}_{j:02d}.png"
            Image.fromarray(img).save(root / rel)
            writer.writerow([rel, CLASSES[int(label)], str(pid), str(source)])
    return csv_path


def lesion_dataset(
    n_patients: int = 60,
    tiles_per_patient: int = 5,
    size: int = 64,
    seed: int = 0,
    contrast: tuple[float, float] = (0.5, 0.8),
    lesion_size: tuple[float, float] = (0.12, 0.25),
    polarity: str = "bright",
    transform: ImageTransform | None = None,
    *,
    scans: Mapping[str, NDArray[np.float32]] | None = None,
) -> ArrayDataset:
    """Return the benchmark in memory: what the loader gives for :func:`write_lesion_folder`.

    Parameters
    ----------
    n_patients, tiles_per_patient, size, seed, contrast, lesion_size, polarity
        See :func:`generate_lesion_tiles`.
    transform : ImageTransform, optional
        Default ``ImageTransform(size=(size, size), channels=3)``.

    Returns
    -------
    ArrayDataset
        ``(n, C, H, W)`` float32 records with labels, patient ids and :data:`CLASSES`.

    Examples
    --------
    >>> ds = lesion_dataset(n_patients=2, tiles_per_patient=2, size=32)
    >>> ds.x.shape, ds.classes
    ((4, 3, 32, 32), ['no_lesion', 'lesion'])
    """
    tiles = generate_lesion_tiles(
        n_patients, tiles_per_patient, size, seed, contrast, lesion_size, polarity, scans=scans
    )
    tf = transform or ImageTransform(size=(size, size), channels=3)
    x = np.stack([tf(img) for img in tiles.images]).astype(np.float32, copy=False)
    return ArrayDataset(x, tiles.labels, tiles.patient_ids, list(CLASSES))
