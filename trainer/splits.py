"""Split discovery (SPEC §5): a data set's class names and the samples of its `train` or
`val` split, found by the format's layout (`trainer.formats`). Discovery checks
only that the files exist; `check_samples` then opens each of them.

The file checks before training (`check_samples`) open every file of a split once
(image headers, PNG integrity, whole decodes, label values and sizes), so that a run
fails before it trains. Bad data raises :class:`shared.errors.UserError` with a
one-line message naming the file.

Label PNGs are palette or grey images whose pixel value is the class id (read by
`shared.image_io`, the same reader the solver uses); 255 is "unlabelled" (scribbles) or
"ignore" (masks). Any other value ≥ K is an error.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from shared.errors import UserError
from shared.image_io import read_image, read_label
from shared.labels import UNLABELLED, check_scribbles
from trainer.formats import LAYOUTS

SPLITS = ("train", "val")


@dataclass
class Sample:
    """One image of a split: its id and the paths of its files (None: no such file)."""

    image_id: str
    image_path: str
    seeds_path: str | None = None
    mask_path: str | None = None


def check_data_folder(data: str | None) -> None:
    """Before Ray starts: a missing --data folder is a typo, not a reason to wait."""
    if data and not os.path.isdir(data):
        raise UserError(f"--data: no such data set folder: {data!r}")


def _check_root(root: str, fmt: str) -> None:
    if fmt not in LAYOUTS:
        raise UserError(f"--format: must be one of {tuple(LAYOUTS)}, got {fmt!r}")
    if not root or not os.path.isdir(root):
        raise UserError(f"{root}: data root not found (not a directory)")


def _read_split_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UserError(f"{path}: split file not found")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read split file ({exc})") from None
    ids = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0]
        # tolerate lists of paths ("/JPEGImages/x.jpg /SegmentationClassAug/x.png")
        ids.append(os.path.splitext(os.path.basename(token))[0] if "/" in token else token)
    if not ids:
        raise UserError(f"{path}: empty split file (no image ids)")
    return ids


def read_classes(root: str, fmt: str) -> list[str]:
    """Class names, background first: VOC's 21 for ``voc``, ROOT/classes.txt otherwise."""
    _check_root(root, fmt)
    if LAYOUTS[fmt].classes:
        return list(LAYOUTS[fmt].classes)
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        raise UserError(f"{path}: classes file not found")
    try:
        with open(path, encoding="utf-8") as f:
            names = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read classes file ({exc})") from None
    if len(names) < 2:
        raise UserError(f"{path}: needs at least 2 classes (background first), found {len(names)}")
    if len(names) > UNLABELLED:
        raise UserError(f"{path}: at most {UNLABELLED} classes ({UNLABELLED} is 'unlabelled'), found {len(names)}")
    return names


def load_split(
    root: str,
    fmt: str,
    split: str,
    scribbles: str = "",
    *,
    require_seeds: bool | None = None,
    require_masks: bool | None = None,
) -> list[Sample]:
    """The samples of ``split`` ('train' or 'val') of the data set at ``root``.

    ``scribbles`` picks the scribble folder (suffix '', '0.8', '0.5', '0.3', '0').
    By default the scribbles are required for 'train' (a missing one is an error) and
    optional for 'val'; the masks are required for 'val' and optional for 'train'
    (``mask_path`` None when absent). ``require_seeds`` / ``require_masks`` override this
    (e.g. full supervision needs train masks, not scribbles). Only existence is checked
    here; see :func:`check_samples` for contents.
    """
    _check_root(root, fmt)
    if split not in SPLITS:
        raise UserError(f"split: must be 'train' or 'val', got {split!r}")
    scribbles = check_scribbles(scribbles)
    need_seeds = (split == "train") if require_seeds is None else require_seeds
    need_masks = (split == "val") if require_masks is None else require_masks

    layout = LAYOUTS[fmt]
    ids = _read_split_file(os.path.join(root, layout.split_file.format(split=split)))
    image_dirs, image_exts = [os.path.join(root, layout.image_dir)], layout.image_exts
    seeds_dir = os.path.join(root, layout.scribble_dir.format(suffix=scribbles))
    mask_dirs = [os.path.join(root, d) for d in layout.mask_dirs[split]]

    if need_seeds and not os.path.isdir(seeds_dir):
        raise UserError(f"{seeds_dir}: scribble folder not found")
    samples = []
    for image_id in ids:
        image_path = None
        for d in image_dirs:
            for ext in image_exts:
                p = os.path.join(d, image_id + ext)
                if os.path.isfile(p):
                    image_path = p
                    break
            if image_path:
                break
        if image_path is None:
            raise UserError(f"{os.path.join(image_dirs[0], image_id + image_exts[0])}: image not found")
        seeds_path = os.path.join(seeds_dir, image_id + ".png")
        if not os.path.isfile(seeds_path):
            if need_seeds:
                raise UserError(f"{seeds_path}: scribble file not found (image id {image_id!r})")
            seeds_path = None
        mask_path = next(
            (p for p in (os.path.join(d, image_id + ".png") for d in mask_dirs) if os.path.isfile(p)), None
        )
        if mask_path is None and need_masks:
            raise UserError(f"{os.path.join(mask_dirs[0], image_id + '.png')}: mask file not found")
        samples.append(Sample(image_id, image_path, seeds_path, mask_path))
    return samples



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
