"""The one reader of images and the one reader and writer of label PNGs.

Trainer and solver both use these, on local paths or object-store URIs, so a file that
trains also solves. Label PNGs are palette ('P') or grey ('L', 'LA', 'PA', 'I')
images whose pixel value is the class id; `UNLABELLED` (255) marks no label.
Unreadable files raise UserError naming the file.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared import storage
from shared.errors import UserError
from shared.labels import UNLABELLED

_BAD_FILE = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def palette(num_classes: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``num_classes``×3 uint8 (entry 255 is (224, 224, 192))."""
    cmap = np.zeros((max(num_classes, 0), 3), dtype=np.uint8)
    for i in range(len(cmap)):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


_PALETTE_BYTES = palette(256).tobytes()


def _open(uri: str, what: str) -> Image.Image:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise UserError(f"{uri}: {what} not found") from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except Image.UnidentifiedImageError:  # its message names our in-memory buffer, not the file
        raise UserError(f"{uri}: unreadable {what} (not an image format Pillow knows)") from None
    except Image.DecompressionBombError as exc:  # not an OSError: past Pillow's pixel limit
        raise UserError(f"{uri}: {what}: {exc} (Pillow's limit, Image.MAX_IMAGE_PIXELS)") from None
    except _BAD_FILE as exc:
        raise UserError(f"{uri}: unreadable or truncated {what} ({exc})") from None


def read_image(uri: str) -> np.ndarray:
    """An RGB image as H×W×3 uint8."""
    with _open(uri, "image") as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_label(uri: str, num_classes: int | None = None) -> np.ndarray:
    """A label PNG as H×W uint8 (class id, 255 = unlabelled/ignore); with `num_classes`,
    values ≥ it other than 255 are an error."""
    with _open(uri, "label PNG") as img:
        if img.mode in ("P", "L"):
            arr = np.asarray(img)
        elif img.mode in ("LA", "PA"):
            arr = np.asarray(img.getchannel(0))
        elif img.mode in ("I", "I;16", "I;16B", "I;16L"):
            arr = np.asarray(img.convert("I")).astype(np.int64)
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise UserError(f"{uri}: label values outside 0..255 in a mode {img.mode} PNG")
        else:
            raise UserError(f"{uri}: label PNG has mode {img.mode}; expected a palette or grey image")
    arr = np.ascontiguousarray(arr, np.uint8)
    if num_classes is not None:
        bad = (arr >= num_classes) & (arr != UNLABELLED)
        if bad.any():
            values = sorted(int(v) for v in np.unique(arr[bad]))[:5]
            raise UserError(f"{uri}: label values {values} are ≥ the number of classes {num_classes} (and not {UNLABELLED})")
    return arr


def label_png(label: np.ndarray) -> bytes:
    """An H×W uint8 label map as a VOC-palette PNG (pixel value = class id)."""
    img = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="P")
    img.putpalette(_PALETTE_BYTES)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_label(uri: str, label: np.ndarray) -> None:
    storage.write_bytes(uri, label_png(label))
