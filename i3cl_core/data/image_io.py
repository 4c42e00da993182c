"""The one image reader of the project (training, inference, the ensemble, browse).

``read_image(path)`` returns an RGB ``uint8`` array (H, W, 3), or raises :class:`DatasetError` naming the
file when it is missing, not an image, or truncated: a JPEG without its end-of-image marker or a PNG
without its ``IEND`` chunk (libjpeg would otherwise decode the top of the picture, fill the rest with
grey and only print "Premature end of JPEG file" without naming the file), or larger than the pixel limit.

One rule for every path that reads pixels or sizes (training, inference, the ensemble, check-data, browse,
the converters): **pixels in their stored orientation, the EXIF orientation tag ignored**, because the text
datasets' annotations (ArT, LSVT, Total-Text, CTW1500, ICDAR) are in the stored pixel frame. OpenCV's default
would rotate a phone photo while every size and polygon stayed in the stored frame. For data annotated in
the displayed orientation, ``I3CL_EXIF_TRANSPOSE=1`` (the commands' ``--exif-transpose``) applies the tag to
pixels and sizes alike. ``I3CL_MAX_IMAGE_PIXELS`` (default 150 million, 12,000 x 12,500) is the pixel limit:
a larger image is refused from its header, before any pixel is decoded, and a run goes on with the others.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path

import numpy as np

from i3cl_core.data.errors import DatasetError

DEFAULT_MAX_PIXELS = 150_000_000
MAX_PIXELS_ENV = "I3CL_MAX_IMAGE_PIXELS"
EXIF_TRANSPOSE_ENV = "I3CL_EXIF_TRANSPOSE"
_EXIF_ORIENTATION = 0x0112
_PIL_LIMIT_LOCK = threading.Lock()  # header() lifts Pillow's own limit for one open (check-data runs threads)

# the image files every command looks for (compared with a file's suffix in lower case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def truncation(data: bytes) -> str | None:
    """Why the encoded image ``data`` looks truncated, or None."""
    if data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in data[-1024:]:
        return "truncated JPEG (no end-of-image marker)"
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]:
        return "truncated PNG (no IEND chunk)"
    return None


def file_truncation(path, tail: int = 1024) -> str | None:
    """:func:`truncation` of an image file from its first bytes and its last ``tail`` bytes only (what
    the rule looks at), without reading the whole file: for checks over many images."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = f.seek(0, 2)
        f.seek(max(size - tail, len(head)))
        return truncation(head + f.read())


def max_pixels() -> int:
    """The pixel limit of every reader: ``I3CL_MAX_IMAGE_PIXELS`` or :data:`DEFAULT_MAX_PIXELS`."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value < 1:
        raise DatasetError(
            f"{MAX_PIXELS_ENV}={raw!r}: expected a whole number of pixels >= 1 (default {DEFAULT_MAX_PIXELS})"
        )
    return value


def exif_transpose() -> bool:
    """Whether images are turned to their EXIF orientation (``I3CL_EXIF_TRANSPOSE=1``); off by default."""
    raw = os.environ.get(EXIF_TRANSPOSE_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise DatasetError(f"{EXIF_TRANSPOSE_ENV}={raw!r}: expected 1/true/yes/on or 0/false/no/off")


def set_exif_transpose(on: bool) -> None:
    """Set the orientation rule for this process and the processes it starts (DataLoader workers,
    torchrun)."""
    os.environ[EXIF_TRANSPOSE_ENV] = "1" if on else "0"


def header(source, label: str | None = None) -> tuple[int, int, int]:
    """``(width, height, orientation)`` from the file's header alone, no pixel decoded: the size in the stored
    frame, or in the displayed frame when the EXIF rule is on (orientations 5-8 swap the sides);
    ``orientation`` is the EXIF tag (1 = none). ``source`` is a path or the encoded bytes. Raises DatasetError
    naming ``label`` for files that are not images or exceed the pixel limit."""
    from PIL import Image  # deferred: Pillow loads only when an image header is read

    label = label or str(source)
    try:
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own limit, below
            try:
                im = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with im:
            width, height = int(im.size[0]), int(im.size[1])
            try:
                orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            except Exception:  # a broken EXIF block: no usable tag
                orientation = 1
    except Exception as e:  # UnidentifiedImageError, OSError, ...
        raise DatasetError(f"{label} is unreadable or not an image ({type(e).__name__})") from e
    limit = max_pixels()
    if width * height > limit:
        raise DatasetError(
            f"{label} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limit:,} ({MAX_PIXELS_ENV} raises it)"
        )
    if exif_transpose() and orientation in (5, 6, 7, 8):
        width, height = height, width
    return width, height, orientation


def _orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels to the displayed frame of EXIF ``orientation`` (1-8)."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda a: a.transpose(1, 0, 2)[::-1],
    }
    return np.ascontiguousarray(ops[orientation](img)) if orientation in ops else img


def read_image(path, what: str | None = None, rgb: bool = True) -> np.ndarray:
    """Decode ``path`` (``what`` names it in errors, e.g. ``"image 12"``); RGB unless ``rgb=False`` (BGR).
    Stored orientation unless the EXIF rule is on (module docstring); the pixel limit is checked first."""
    import cv2  # deferred: OpenCV loads only when pixels are decoded

    path = Path(path)
    label = f"{path}" + (f": {what}" if what else "")
    if not path.is_file():
        raise DatasetError(f"{label} is missing")
    data = path.read_bytes()
    reason = truncation(data)
    if reason:
        raise DatasetError(f"{label} is a {reason}")
    if not data:
        raise DatasetError(f"{label} is unreadable or not an image")
    _, _, orientation = header(data, label)
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if img is None:
        raise DatasetError(f"{label} is unreadable or not an image")
    if exif_transpose():
        img = _orient(img, orientation)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if rgb else img
