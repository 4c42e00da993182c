"""The one image reader of the project (training, inference, the ensemble, browse).

``read_image(path)`` returns an RGB ``uint8`` array (H, W, 3), or raises :class:`DatasetError` naming the
file when it is missing, not an image, or truncated: a JPEG without its end-of-image marker or a PNG
without its ``IEND`` chunk (libjpeg would otherwise decode the top of the picture, fill the rest with
grey and only print "Premature end of JPEG file" without naming the file). EXIF orientation is applied,
as OpenCV does by default.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from i3cl_core.data.errors import DatasetError

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


def read_image(path, what: str | None = None, rgb: bool = True) -> np.ndarray:
    """Decode ``path`` (``what`` names it in errors, e.g. ``"image 12"``); RGB unless ``rgb=False`` (BGR)."""
    import cv2

    path = Path(path)
    label = f"{path}" + (f": {what}" if what else "")
    if not path.is_file():
        raise DatasetError(f"{label} is missing")
    data = path.read_bytes()
    reason = truncation(data)
    if reason:
        raise DatasetError(f"{label} is a {reason}")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise DatasetError(f"{label} is unreadable or not an image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if rgb else img
