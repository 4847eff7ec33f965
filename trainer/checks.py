"""File checks before training: open every file of a split once (image headers, PNG
integrity, whole decodes, label values and sizes) so that a run fails before it trains,
with a :class:`shared.errors.UserError` naming the file.

Label PNGs are palette or grey images whose pixel value is the class id (read by
`shared.image_io`, the same reader the solver uses); 255 is "unlabelled" (scribbles) or
"ignore" (masks). Any other value ≥ K is an error.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

from shared.errors import UserError
from shared.image_io import read_image, read_label
from trainer.splits import Sample


def image_size(path: str) -> tuple[int, int]:
    """(H, W) from the header; PNGs are also checked for integrity (chunk CRCs)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.format == "PNG":
                img.verify()
            return h, w
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: {exc} (Pillow's limit, Image.MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: unreadable or truncated image ({exc})") from None


def check_samples(samples: list[Sample], num_classes: int, max_pixels: int | None = None) -> int:
    """Open every file of ``samples`` once so that bad data fails before training;
    returns the pixel count of the largest image.

    Checks: images at most ``max_pixels`` pixels (from the header) and decoded whole, as
    training will read them (a truncated JPEG has a good header), label PNGs decodable
    with values < K or 255, label sizes equal to the image's. Samples are checked in
    threads (Pillow decodes without the GIL); one already checked in this process, and
    unchanged since, is not decoded again. Raises UserError naming the file (the first
    bad sample in order).
    """
    if not samples:
        raise UserError("empty split: no samples")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(lambda s: _check_sample(s, num_classes, max_pixels), samples))
    return max(h * w for h, w in sizes)


_checked: set[tuple] = set()  # (a sample's files, K, cap, the files' mtimes and sizes) found good


def _check_sample(s: Sample, num_classes: int, max_pixels: int | None) -> tuple[int, int]:
    files = [p for p in (s.image_path, s.seeds_path, s.mask_path) if p is not None]
    try:
        key = (s.image_path, s.seeds_path, s.mask_path, num_classes, max_pixels, *((st.st_mtime_ns, st.st_size) for st in map(os.stat, files)))
    except OSError:
        key = None  # a missing file: the reads below name it
    size = image_size(s.image_path)
    if key in _checked:
        return size
    if max_pixels and size[0] * size[1] > max_pixels:
        raise UserError(f"{s.image_path}: {size[1]}×{size[0]} pixels is more than --max-image-pixels "
                        f"{max_pixels} (stage A holds several float64 copies of |L|×H×W)")
    read_image(s.image_path)
    for p in (s.seeds_path, s.mask_path):
        if p is None:
            continue
        lab = read_label(p, num_classes)
        if lab.shape != size:
            raise UserError(
                f"{p}: label size {lab.shape[1]}×{lab.shape[0]} differs from image "
                f"{s.image_path} ({size[1]}×{size[0]})"
            )
    if key is not None:
        _checked.add(key)
    return size
