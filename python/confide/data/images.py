"""Image data for sites: folders of PNG/JPEG/DICOM files read lazily, as ``SiteData``.

Two layouts are read:

* **a labels CSV** with the header ``path,label,patient_id`` (extra columns are ignored):
  ``path`` is relative to the CSV's folder (or absolute), ``label`` a class name and
  ``patient_id`` the patient the image belongs to (required: patient-level DP-SGD samples
  and clips *patients*, so a patient's images must be known);
* **class sub-folders** (``root/<class>/<image>``), where every image is its own patient
  (correct for DP only if no patient has two images; prefer the CSV when in doubt).

Images are decoded on demand by :meth:`ImageDataset.batch` (only labels, paths and patient
ids live in memory), so a site's folder need not fit in RAM. Decoding: PNG/JPEG (and any
format Pillow reads) via Pillow; ``.dcm`` via pydicom (``pip install "confide[dicom]"``),
with the modality rescale applied and the slice min-max scaled to [0, 1]. Every image then
goes through the same transform (:class:`ImageTransform`): resize to ``(H, W)`` (bilinear),
grey to 3 channels (or colour to grey for 1 channel), scale to [0, 1] (8-bit /255, 16-bit
/65535), normalise ``(x - mean) / std`` per channel, float32 ``CHW``.

Every problem with the files is a :class:`~confide.errors.DataError` naming the file and, for
a CSV, the line: a wrong header, a missing file, an empty or unknown label, a missing patient
id, an unreadable or corrupt image.

Site splits (:meth:`ImageDataset.split_iid`, :meth:`ImageDataset.split_dirichlet`) assign
whole *patients* to sites, so no patient is shared by two hospitals.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide.data._index import check_index
from confide.data.tabular import partition_dirichlet, partition_iid
from confide.errors import ConfigError, DataError

__all__ = ["ArrayDataset", "ImageDataset", "ImageTransform", "read_image", "split_by_patient"]

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".dcm"})
_REQUIRED_COLUMNS = ("path", "label", "patient_id")


@dataclass(frozen=True)
class ImageTransform:
    """Resize, channel and normalisation settings shared by every image of a dataset.

    Parameters
    ----------
    size : tuple of int, default (64, 64)
        Output ``(H, W)``.
    channels : {1, 3}, default 3
        Output channels: grey images are repeated to 3 channels, colour images are
        converted to luminance for 1.
    mean, std : sequence of float, optional
        Per-channel normalisation after scaling to [0, 1]; defaults 0.5 and 0.5 (so
        outputs lie in [-1, 1]). One value applies to every channel.

    Examples
    --------
    >>> t = ImageTransform(size=(4, 4), channels=3)
    >>> out = t(np.full((2, 2), 255, np.uint8))
    >>> out.shape, out.dtype, float(out.max())
    ((3, 4, 4), dtype('float32'), 1.0)
    """

    size: tuple[int, int] = (64, 64)
    channels: int = 3
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        size = tuple(self.size)
        if len(size) != 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in size
        ):
            raise ConfigError(f"size must be (H, W) of ints >= 1, got {self.size!r}")
        object.__setattr__(self, "size", size)
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels!r}")
        for name in ("mean", "std"):
            vals = tuple(float(v) for v in getattr(self, name))
            if len(vals) not in (1, self.channels) or not all(math.isfinite(v) for v in vals):
                given = getattr(self, name)
                raise ConfigError(
                    f"{name} must hold 1 or {self.channels} finite values, got {given!r}"
                )
            object.__setattr__(self, name, vals)
        if any(v <= 0 for v in self.std):
            raise ConfigError(f"std must be > 0, got {self.std!r}")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of a transformed image."""
        return (self.channels, self.size[0], self.size[1])

    def __call__(self, image: NDArray[Any]) -> NDArray[np.float32]:
        """Transform one decoded image (``(H, W)`` grey or ``(H, W, 3|4)`` colour).

        ``uint8`` is scaled by 1/255, ``uint16`` by 1/65535; floating input must already
        lie in [0, 1].
        """
        from PIL import Image

        arr = np.asarray(image)
        if arr.dtype == np.uint8:
            scaled = arr.astype(np.float32) / np.float32(255.0)
        elif arr.dtype == np.uint16:
            scaled = arr.astype(np.float32) / np.float32(65535.0)
        elif np.issubdtype(arr.dtype, np.floating):
            scaled = arr.astype(np.float32)
        else:
            raise DataError(
                f"unsupported pixel dtype {arr.dtype} (expected uint8, uint16 or float)"
            )
        if scaled.ndim == 3 and scaled.shape[2] == 4:
            scaled = scaled[:, :, :3]  # drop alpha
        if scaled.ndim == 3 and scaled.shape[2] == 1:
            scaled = scaled[:, :, 0]
        if scaled.ndim not in (2, 3) or (scaled.ndim == 3 and scaled.shape[2] != 3):
            raise DataError(f"expected a 2-D grey or RGB(A) image, got shape {arr.shape}")
        if scaled.ndim == 3 and self.channels == 1:  # ITU-R 601 luma, as Pillow's "L"
            scaled = scaled @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        planes = [scaled] if scaled.ndim == 2 else [scaled[:, :, c] for c in range(3)]
        h, w = self.size
        resized = []
        for plane in planes:
            if plane.shape != (h, w):
                img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
                plane = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), np.float32)
            resized.append(plane)
        if len(resized) == 1 and self.channels == 3:
            resized = resized * 3
        out = np.stack(resized, axis=0).astype(np.float32, copy=False)
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        result: NDArray[np.float32] = np.ascontiguousarray((out - mean) / std, dtype=np.float32)
        return result


def _read_dicom(path: Path) -> NDArray[Any]:
    try:
        import pydicom
    except ImportError:
        raise DataError(
            f"{str(path)!r} is a DICOM file; reading DICOM needs pydicom: "
            'pip install "confide[dicom]"'
        ) from None
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise DataError("the DICOM file holds no pixel data")
    pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4):
        pixels = pixels[pixels.shape[0] // 2]  # multi-frame: the middle frame
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    pixels = pixels * slope + intercept
    lo, hi = float(pixels.min()), float(pixels.max())
    scaled = (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)
    return scaled.astype(np.float32)


def read_image(path: str | Path) -> NDArray[Any]:
    """Decode one image file: ``(H, W)`` grey or ``(H, W, 3)`` RGB.

    Parameters
    ----------
    path : str or Path
        PNG, JPEG or any Pillow format (returned as ``uint8``/``uint16``), or ``.dcm``
        (returned as float32 in [0, 1] after the modality rescale).

    Returns
    -------
    numpy.ndarray
        The pixels.

    Raises
    ------
    DataError
        Missing, unreadable or corrupt file, or pydicom not installed for a ``.dcm``.

    Examples
    --------
    >>> import tempfile, os
    >>> from PIL import Image
    >>> p = os.path.join(tempfile.mkdtemp(), "a.png")
    >>> Image.fromarray(np.zeros((3, 5), np.uint8)).save(p)
    >>> read_image(p).shape
    (3, 5)
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() == ".dcm":
            return _read_dicom(path)
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
                if img.mode in ("I;16", "I;16B", "I;16L"):
                    return np.asarray(img, dtype=np.uint16)
                if img.mode in ("I", "F"):
                    arr = np.asarray(img, dtype=np.float64)
                    lo, hi = float(arr.min()), float(arr.max())
                    out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
                    return out.astype(np.float32)
                if img.mode in ("L", "RGB"):
                    return np.asarray(img, dtype=np.uint8)
                if img.mode in ("1", "LA"):
                    return np.asarray(img.convert("L"), dtype=np.uint8)
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
        except UnidentifiedImageError:
            raise DataError("not an image Pillow can identify") from None
    except DataError as exc:
        if str(path) in str(exc):
            raise
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from None
    except Exception as exc:  # truncated/corrupt files raise OSError, ValueError, ...
        raise DataError(f"cannot read image {str(path)!r}: {type(exc).__name__}: {exc}") from None


class _Records:
    """The ``SiteData`` members both datasets read from their labels and patient ids."""

    _y: NDArray[np.int64]
    _ids: NDArray[Any] | None

    def __len__(self) -> int:
        return int(self._y.shape[0])

    @property
    def labels(self) -> NDArray[np.int64]:
        """``(n,)`` integer labels."""
        return self._y

    @property
    def patient_ids(self) -> NDArray[Any] | None:
        """``(n,)`` patient ids, or ``None`` (each record its own patient)."""
        return self._ids


class ArrayDataset(_Records):
    """In-memory ``SiteData``: a float32 array of inputs with labels and patient ids.

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, *shape)`` float32, finite.
    labels : numpy.ndarray
        ``(n,)`` integer labels.
    patient_ids : numpy.ndarray, optional
        ``(n,)`` patient of each record; ``None`` means every record is its own patient.
    classes : sequence of str, optional
        Class names, index = label.

    Examples
    --------
    >>> ds = ArrayDataset(np.zeros((4, 1, 2, 2), np.float32), np.array([0, 1, 0, 1]))
    >>> x, y = ds.batch(np.array([3, 0]))
    >>> x.shape, y.tolist()
    ((2, 1, 2, 2), [1, 0])
    """

    def __init__(
        self,
        x: NDArray[np.float32],
        labels: NDArray[np.integer[Any]],
        patient_ids: NDArray[Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 2:
            raise DataError(
                f"x must be a float32 array of shape (n, ...), got "
                f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
            )
        y = np.asarray(labels)
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"labels must be ({x.shape[0]},) integers, got {y.dtype} {y.shape}")
        if not np.isfinite(x).all():
            raise DataError("x contains NaN or Inf")
        if patient_ids is not None:
            patient_ids = np.asarray(patient_ids)
            if patient_ids.shape != (x.shape[0],):
                raise DataError(
                    f"patient_ids must have shape ({x.shape[0]},), got {patient_ids.shape}"
                )
        self._x = np.ascontiguousarray(x)
        self._y = y.astype(np.int64)
        self._ids = patient_ids
        self.classes = list(classes) if classes is not None else None

    @property
    def x(self) -> NDArray[np.float32]:
        """All inputs, ``(n, *shape)`` float32."""
        return self._x

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one record."""
        return tuple(self._x.shape[1:])

    def batch(self, index: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Return the inputs and labels of the records at ``index``.

        Parameters
        ----------
        index : numpy.ndarray
            Integer record indices.

        Returns
        -------
        tuple of numpy.ndarray
            ``(len(index), *shape)`` float32 inputs and ``(len(index),)`` int64 labels.
        """
        idx = check_index(index, len(self))
        return np.ascontiguousarray(self._x[idx]), self._y[idx]

    def subset(self, index: NDArray[np.int64]) -> ArrayDataset:
        """Return the records at ``index`` as a new dataset.

        Parameters
        ----------
        index : numpy.ndarray
            Integer record indices.

        Returns
        -------
        ArrayDataset
            The subset.
        """
        idx = check_index(index, len(self))
        ids = None if self._ids is None else self._ids[idx]
        return ArrayDataset(self._x[idx], self._y[idx], ids, self.classes)


class ImageDataset(_Records):
    r"""A site's images, decoded lazily: implements ``SiteData``.

    Build one with :meth:`from_csv` or :meth:`from_folders`.

    Parameters
    ----------
    paths : sequence of Path
        One image file per record.
    labels : numpy.ndarray
        ``(n,)`` int64 class indices into ``classes``.
    patient_ids : numpy.ndarray, optional
        ``(n,)`` patient of each record (``None``: each image its own patient).
    classes : sequence of str
        Class names.
    transform : ImageTransform
        Applied to every decoded image.
    sources : sequence of str, optional
        Where each record was declared (e.g. ``"labels.csv, line 7"``), for error messages.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "a.png")
    >>> _ = (root / "labels.csv").write_text("path,label,patient_id\na.png,healthy,p1\n")
    >>> ds = ImageDataset.from_csv(root / "labels.csv", transform=ImageTransform(size=(4, 4)))
    >>> len(ds), ds.classes, ds.batch(np.array([0]))[0].shape
    (1, ['healthy'], (1, 3, 4, 4))
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: NDArray[np.int64],
        patient_ids: NDArray[Any] | None,
        classes: Sequence[str],
        transform: ImageTransform,
        sources: Sequence[str] | None = None,
    ) -> None:
        self._paths = [Path(p) for p in paths]
        self._y = np.asarray(labels, dtype=np.int64)
        self._ids = None if patient_ids is None else np.asarray(patient_ids)
        self.classes = list(classes)
        self.transform = transform
        self._sources = list(sources) if sources is not None else [str(p) for p in self._paths]
        n = len(self._paths)
        if self._y.shape != (n,) or len(self._sources) != n:
            raise DataError(f"{n} paths need {n} labels and sources, got {self._y.shape}")
        if self._ids is not None and self._ids.shape != (n,):
            raise DataError(f"{n} paths need {n} patient ids, got {self._ids.shape}")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_csv(
        cls,
        csv_path: str | Path,
        *,
        classes: Sequence[str] | None = None,
        transform: ImageTransform | None = None,
    ) -> ImageDataset:
        """Read a ``path,label,patient_id`` labels CSV.

        Parameters
        ----------
        csv_path : str or Path
            The CSV; image paths in it are relative to its folder (or absolute).
        classes : sequence of str, optional
            The class names in label order; a label outside them is an error. By default
            the sorted distinct labels of the file.
        transform : ImageTransform, optional
            Default ``ImageTransform()`` (64x64, 3 channels).

        Returns
        -------
        ImageDataset
            The dataset; every listed file exists (images are decoded later).

        Raises
        ------
        DataError
            Missing CSV, wrong header, a row with a missing file, an empty or unknown label
            or a missing patient id (the message names the CSV and line).
        """
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataError(f"labels CSV {str(csv_path)!r} does not exist")
        base = csv_path.parent
        rows: list[tuple[int, str, str, str]] = []
        try:
            with csv_path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None:
                    raise DataError(
                        f"{str(csv_path)!r} is empty; expected the header path,label,patient_id"
                    )
                header = [h.strip() for h in header]
                missing = [c for c in _REQUIRED_COLUMNS if c not in header]
                if missing:
                    raise DataError(
                        f"{str(csv_path)!r}, line 1: header must contain path,label,patient_id; "
                        f"got {','.join(header)!r} (missing {missing})"
                    )
                col = {c: header.index(c) for c in _REQUIRED_COLUMNS}
                for row in reader:
                    line = reader.line_num
                    if not row or all(not v.strip() for v in row):
                        continue  # blank line
                    if len(row) < len(header):
                        raise DataError(
                            f"{str(csv_path)!r}, line {line}: expected {len(header)} fields, "
                            f"got {len(row)}"
                        )
                    rows.append(
                        (
                            line,
                            row[col["path"]].strip(),
                            row[col["label"]].strip(),
                            row[col["patient_id"]].strip(),
                        )
                    )
        except UnicodeDecodeError as exc:
            raise DataError(f"{str(csv_path)!r} is not UTF-8 text: {exc}") from None
        except csv.Error as exc:
            raise DataError(f"{str(csv_path)!r} is not a valid CSV file: {exc}") from None
        if not rows:
            raise DataError(f"{str(csv_path)!r} lists no images")
        names = sorted({r[2] for r in rows if r[2]}) if classes is None else list(classes)
        if classes is not None and (len(set(names)) != len(names) or not names):
            raise ConfigError(f"classes must be distinct non-empty names, got {classes!r}")
        index = {c: i for i, c in enumerate(names)}
        paths: list[Path] = []
        labels: list[int] = []
        ids: list[str] = []
        sources: list[str] = []
        for line, rel, label, pid in rows:
            where = f"{str(csv_path)!r}, line {line}"
            if not rel:
                raise DataError(f"{where}: empty path")
            if not label:
                raise DataError(f"{where}: empty label for {rel!r}")
            if label not in index:
                raise DataError(
                    f"{where}: unknown label {label!r} for {rel!r}; expected one of {names}"
                )
            if not pid:
                raise DataError(f"{where}: missing patient_id for {rel!r}")
            path = Path(rel) if Path(rel).is_absolute() else base / rel
            if not path.is_file():
                raise DataError(f"{where}: image file {str(path)!r} does not exist")
            paths.append(path)
            labels.append(index[label])
            ids.append(pid)
            sources.append(where)
        return cls(
            paths,
            np.array(labels, dtype=np.int64),
            np.array(ids),
            names,
            transform or ImageTransform(),
            sources,
        )

    @classmethod
    def from_folders(
        cls,
        root: str | Path,
        *,
        transform: ImageTransform | None = None,
    ) -> ImageDataset:
        """Read ``root/<class>/<image>``: one sub-folder per class (sorted names = labels).

        Every image is its own patient (no patient ids). Files with other suffixes than
        image ones (``.png .jpg .jpeg .bmp .tif .tiff .gif .dcm``) are skipped.

        Parameters
        ----------
        root : str or Path
            Folder of class folders.
        transform : ImageTransform, optional
            Default ``ImageTransform()``.

        Returns
        -------
        ImageDataset
            The dataset.

        Raises
        ------
        DataError
            ``root`` missing, fewer than one class folder, or no images.
        """
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {str(root)!r} does not exist")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{str(root)!r} has no class sub-folders")
        paths: list[Path] = []
        labels: list[int] = []
        for i, d in enumerate(class_dirs):
            files = sorted(
                p for p in d.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
            )
            paths.extend(files)
            labels.extend([i] * len(files))
        if not paths:
            raise DataError(f"no image files under {str(root)!r}")
        return cls(
            paths,
            np.array(labels, dtype=np.int64),
            None,
            [d.name for d in class_dirs],
            transform or ImageTransform(),
        )

    # ------------------------------------------------------------------- SiteData

    @property
    def paths(self) -> list[Path]:
        """Image file of each record."""
        return list(self._paths)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of a record after the transform."""
        return self.transform.output_shape

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def load(self, i: int) -> NDArray[np.float32]:
        """Decode and transform record ``i``.

        Parameters
        ----------
        i : int
            Record index.

        Returns
        -------
        numpy.ndarray
            ``(C, H, W)`` float32.

        Raises
        ------
        DataError
            The image cannot be read; the message names the file and the CSV line.
        """
        path = self._paths[i]
        where = self._sources[i]
        try:
            return self.transform(read_image(path))
        except DataError as exc:
            msg = str(exc)
            if str(path) not in msg:
                msg = f"{str(path)!r}: {msg}"
            if where != str(path):
                msg = f"{where}: {msg}"
            raise DataError(msg) from None

    def batch(self, index: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Decode the images at ``index``.

        Parameters
        ----------
        index : numpy.ndarray
            Integer record indices.

        Returns
        -------
        tuple of numpy.ndarray
            ``(len(index), C, H, W)`` float32 and ``(len(index),)`` int64 labels.
        """
        idx = check_index(index, len(self))
        out = np.empty((idx.size, *self.input_shape), dtype=np.float32)
        for j, i in enumerate(idx):
            out[j] = self.load(int(i))
        return out, self._y[idx]

    def validate(self) -> None:
        """Decode every image once, so a bad file fails now rather than mid-round.

        Raises
        ------
        DataError
            The first unreadable image (file and CSV line in the message).
        """
        for i in range(len(self)):
            self.load(i)

    def materialize(self) -> ArrayDataset:
        """Decode everything into an :class:`ArrayDataset` (for sets that fit in memory).

        Returns
        -------
        ArrayDataset
            Same records, labels, patient ids and classes.
        """
        x, y = self.batch(np.arange(len(self), dtype=np.int64))
        return ArrayDataset(x, y, self._ids, self.classes)

    # --------------------------------------------------------------------- splits

    def subset(self, index: NDArray[np.int64]) -> ImageDataset:
        """Return the records at ``index`` (still lazy).

        Parameters
        ----------
        index : numpy.ndarray
            Integer record indices.

        Returns
        -------
        ImageDataset
            The subset.
        """
        idx = check_index(index, len(self))
        return ImageDataset(
            [self._paths[i] for i in idx],
            self._y[idx],
            None if self._ids is None else self._ids[idx],
            self.classes,
            self.transform,
            [self._sources[i] for i in idx],
        )

    def split_iid(self, n_sites: int, seed: int = 0) -> list[ImageDataset]:
        """Split into ``n_sites`` sites, patients shuffled uniformly.

        Parameters
        ----------
        n_sites : int
            Number of sites (at most the number of patients).
        seed : int, default 0
            Shuffling seed (protects no secret).

        Returns
        -------
        list of ImageDataset
            One per site; every patient's images are on exactly one site.
        """
        return [self.subset(i) for i in split_by_patient(self, n_sites, None, seed)]

    def split_dirichlet(self, n_sites: int, alpha: float, seed: int = 0) -> list[ImageDataset]:
        """Split with Dirichlet(``alpha``) label skew, whole patients per site.

        A patient's label for the split is the most frequent label of their images.

        Parameters
        ----------
        n_sites : int
            Number of sites.
        alpha : float
            Concentration (> 0); small values give skewed sites.
        seed : int, default 0
            Seed.

        Returns
        -------
        list of ImageDataset
            One per site.
        """
        return [self.subset(i) for i in split_by_patient(self, n_sites, alpha, seed)]


def split_by_patient(
    data: ImageDataset | ArrayDataset, n_sites: int, alpha: float | None, seed: int = 0
) -> list[NDArray[np.int64]]:
    """Record indices of each site when whole patients are assigned to sites.

    Parameters
    ----------
    data : ImageDataset or ArrayDataset
        Records with labels and (optionally) patient ids.
    n_sites : int
        Number of sites.
    alpha : float or None
        ``None`` for an IID split of patients, else Dirichlet(``alpha``) label skew.
    seed : int, default 0
        Seed (protects no secret).

    Returns
    -------
    list of numpy.ndarray
        Sorted record indices per site, a partition of ``range(len(data))``.

    Examples
    --------
    >>> ds = ArrayDataset(np.zeros((6, 1), np.float32), np.array([0, 0, 1, 1, 0, 1]),
    ...                   np.array(["a", "a", "b", "b", "c", "c"]))
    >>> [p.tolist() for p in split_by_patient(ds, 3, None, seed=0)]
    [[4, 5], [0, 1], [2, 3]]
    """
    ids = data.patient_ids
    n = len(data)
    if ids is None:
        ids = np.arange(n)
    patients, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.ravel()
    n_patients = len(patients)
    if not isinstance(n_sites, int) or isinstance(n_sites, bool) or not 1 <= n_sites <= n_patients:
        raise ConfigError(
            f"n_sites must be an int in [1, {n_patients}] (patients), got {n_sites!r}"
        )
    try:
        if alpha is None:
            parts = partition_iid(n_patients, n_sites, seed)
        else:
            counts = np.zeros((n_patients, int(data.labels.max()) + 1), dtype=np.int64)
            np.add.at(counts, (inverse, data.labels), 1)
            parts = partition_dirichlet(counts.argmax(axis=1), n_sites, alpha, seed, min_size=1)
    except ValueError as exc:
        raise ConfigError(
            f"cannot split {n_patients} patients into {n_sites} sites: {exc}"
        ) from None
    site_of = np.empty(n_patients, dtype=np.int64)
    for s, part in enumerate(parts):
        site_of[part] = s
    record_site = site_of[inverse]
    return [np.flatnonzero(record_site == s).astype(np.int64) for s in range(n_sites)]
