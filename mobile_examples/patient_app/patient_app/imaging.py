"""Decode a patient's upload (PNG, JPEG or DICOM) into the model's input, or say why not.

Everything here runs in the local app process; nothing is sent anywhere. Each failure is an
:class:`ImageError` whose message is shown to the patient as is, so messages are plain
sentences without internals.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "MAX_PIXELS",
    "MAX_UPLOAD_BYTES",
    "MIN_SIDE",
    "DecodedImage",
    "ImageError",
    "decode_image",
    "sniff_format",
    "to_model_input",
]

MAX_UPLOAD_BYTES = 20 << 20
"""Largest accepted upload (20 MiB)."""

MAX_PIXELS = 40_000_000
"""Largest accepted image (width x height), checked before the pixels are decoded."""

MIN_SIDE = 64
"""Smallest accepted width and height, in pixels."""


class ImageError(ValueError):
    """An upload that cannot be used; the message is meant for the patient."""


@dataclass(frozen=True)
class DecodedImage:
    """An upload decoded to RGB floats in [0, 1].

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(height, width, 3)`` float32 in [0, 1].
    kind : str
        ``"PNG"``, ``"JPEG"`` or ``"DICOM"``.
    """

    pixels: NDArray[np.float32]
    kind: str


def sniff_format(data: bytes) -> str | None:
    r"""Return ``"PNG"``, ``"JPEG"`` or ``"DICOM"`` from the file's magic bytes, else ``None``.

    Examples
    --------
    >>> sniff_format(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(8))
    'PNG'
    >>> sniff_format(bytes(128) + b"DICM") and sniff_format(b"hello") is None
    True
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    return None


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"The image is too large ({width} x {height} pixels); at most "
            f"{MAX_PIXELS // 1_000_000} megapixels are accepted."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"The image is too small ({width} x {height} pixels); it must be at least "
            f"{MIN_SIDE} x {MIN_SIDE} pixels."
        )


def _decode_pillow(data: bytes, kind: str) -> NDArray[np.float32]:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                _check_size(*im.size)
                im.load()
                rgb = im.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError("The image is too large to be decoded safely.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(
            f"The file looks like a {kind} image but it is damaged or truncated."
        ) from None
    pixels: NDArray[np.float32] = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    return pixels


def _decode_dicom(data: bytes) -> NDArray[np.float32]:
    try:
        import pydicom
    except ImportError:
        raise ImageError("DICOM files need pydicom, which is not installed in this app.") from None
    try:
        return _dicom_pixels(pydicom.dcmread(io.BytesIO(data)))
    except ImageError:
        raise
    except NotImplementedError:
        raise ImageError(
            "This DICOM file uses a compressed format this app cannot decode; "
            "export it as PNG or uncompressed DICOM."
        ) from None
    except Exception:  # a parser of untrusted bytes: pydicom raises many kinds on corruption
        raise ImageError("The DICOM file is damaged and cannot be read.") from None


def _dicom_pixels(ds: Any) -> NDArray[np.float32]:
    if "PixelData" not in ds:
        raise ImageError("The DICOM file holds no image (no pixel data).")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_size(cols, rows)
    arr = np.asarray(ds.pixel_array, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim == 3:  # multi-frame: the first frame
        arr = arr[0]
    if arr.ndim == 2:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        arr = arr * slope + intercept
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            arr = -arr
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[-1] != 3 or not np.isfinite(arr).all():
        raise ImageError("The DICOM image has an unsupported layout.")
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    pixels: NDArray[np.float32] = scaled.astype(np.float32)
    return pixels


def decode_image(data: bytes) -> DecodedImage:
    """Decode an upload, refusing anything that is not a usable PNG, JPEG or DICOM image.

    Parameters
    ----------
    data : bytes
        The uploaded file.

    Returns
    -------
    DecodedImage
        RGB pixels in [0, 1].

    Raises
    ------
    ImageError
        Empty, too large, not an image, damaged, too small or too big in pixels.
    """
    if not data:
        raise ImageError("The file is empty.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ImageError(f"The file is larger than {MAX_UPLOAD_BYTES >> 20} MB.")
    kind = sniff_format(data)
    if kind is None:
        raise ImageError("This file is not a PNG, JPEG or DICOM image.")
    pixels = _decode_dicom(data) if kind == "DICOM" else _decode_pillow(data, kind)
    return DecodedImage(pixels, kind)


def to_model_input(
    image: DecodedImage,
    shape: tuple[int | None, ...],
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
    std: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> NDArray[np.float32]:
    """Resize (centre crop to square, bilinear) and lay out an image for the model.

    Parameters
    ----------
    image : DecodedImage
        The decoded upload.
    shape : tuple
        The model input shape ``(N, 3, H, W)`` (``N`` may be ``None``).
    mean, std : tuple of float
        Per-channel normalisation applied after scaling to [0, 1].

    Returns
    -------
    numpy.ndarray
        ``(1, 3, H, W)`` float32.
    """
    from PIL import Image

    if len(shape) != 4 or shape[1] != 3 or shape[2] is None or shape[3] is None:
        raise ImageError("The installed model does not take RGB images; update the model.")
    h, w = int(shape[2]), int(shape[3])
    px = image.pixels
    side = min(px.shape[0], px.shape[1])
    top, left = (px.shape[0] - side) // 2, (px.shape[1] - side) // 2
    square = px[top : top + side, left : left + side]
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(square[..., c])).resize(
                (w, h), Image.Resampling.BILINEAR
            )
        )
        for c in range(3)
    ]
    arr = np.stack(channels).astype(np.float32)
    arr = (arr - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[
        :, None, None
    ]
    return np.ascontiguousarray(arr[None])
