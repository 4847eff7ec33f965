"""Data sets (SPEC §5): the `voc`, `folder` and `synthetic` layouts, reading and checking
images and label PNGs, and the torch Datasets for training and evaluation.

Layouts (ROOT is the data root, SUFFIX the scribble length: '', '0.8', '0.5', '0.3', '0'):

- ``voc``: ROOT/JPEGImages/{id}.jpg, ROOT/pascal_2012_scribble{SUFFIX}/{id}.png,
  ROOT/SegmentationClassAug/{id}.png (full labels), ROOT/SegmentationClass/{id}.png
  (val labels; SegmentationClassAug is used when it is absent),
  ROOT/ImageSets/SegmentationAug/{train,val}.txt. The 21 VOC classes.
- ``folder``: ROOT/images/{id}.png|.jpg|.jpeg, ROOT/scribbles{SUFFIX}/{id}.png,
  ROOT/masks/{id}.png (needed for val, optional for train), ROOT/train.txt,
  ROOT/val.txt (one id a line), ROOT/classes.txt (one name a line, background first).
- ``synthetic``: the ``folder`` layout, written by :func:`trainer.synthetic.make_synthetic`.

Label PNGs are palette or grey images whose pixel value is the class id (read by
`shared.image_io`, the same reader the solver uses); 255 is "unlabelled" (scribbles) or
"ignore" (masks). Any other value ≥ K is an error.

Bad data raises :class:`shared.errors.UserError` with a one-line message naming the
file. :func:`load_split` checks that files exist; :func:`check_samples` opens each
file once (image headers, PNG integrity, label values and sizes) so a run fails
before it trains.

Caching: the Datasets keep every decoded image and label in memory after its first
read (per Dataset object, hence per DataLoader worker). The data sets this project
trains on are small (the synthetic set is a few MB); for full VOC that costs a few GB
per worker — pass ``cache=False`` there.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, UnidentifiedImageError

from shared.errors import UserError
from shared.image_io import read_image, read_label
from shared.labels import UNLABELLED, check_scribbles
from trainer.config import AUGMENTATIONS, LAYOUTS
from trainer.model import IMAGENET_MEAN

SPLITS = ("train", "val")
REFERENCE_SHORT_SIDE = (256, 1026)  # the authors' VOC rescaling range (SPEC §4)


@dataclass
class Sample:
    """One image of a split: its id and the paths of its files (None: no such file)."""

    image_id: str
    image_path: str
    seeds_path: str | None = None
    mask_path: str | None = None


# --------------------------------------------------------------------------- layouts (trainer.config.LAYOUTS)


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


# --------------------------------------------------------------------------- files


def _image_size(path: str) -> tuple[int, int]:
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
    size = _image_size(s.image_path)
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


# --------------------------------------------------------------------------- datasets


class _Base(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], num_classes: int, cache: bool = True):
        self.samples = list(samples)
        self.num_classes = num_classes
        self.cache = cache
        self._cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _get(self, path: str, kind: str) -> np.ndarray:
        arr = self._cache.get(path)
        if arr is None:
            arr = read_image(path) if kind == "image" else read_label(path, self.num_classes)
            if self.cache:
                self._cache[path] = arr
        return arr

    def _load(self, index: int) -> tuple[Sample, np.ndarray, np.ndarray, np.ndarray]:
        s = self.samples[index]
        image = self._get(s.image_path, "image")
        h, w = image.shape[:2]
        maps = []
        for p in (s.seeds_path, s.mask_path):
            if p is None:
                maps.append(np.full((h, w), UNLABELLED, np.uint8))
                continue
            lab = self._get(p, "label")
            if lab.shape != (h, w):
                raise UserError(
                    f"{p}: label size {lab.shape[1]}×{lab.shape[0]} differs from image {s.image_path} ({w}×{h})"
                )
            maps.append(lab)
        return s, image, maps[0], maps[1]


def _to_item(image, seeds, proposal, mask, index, roi=None) -> dict:
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
        # uint8 label maps (values < K ≤ 255, or 255), checked here: the trainer sends them
        # to the device as they are and the losses check nothing there. Copies: an
        # unaugmented item's maps are the image cache's own (read-only) arrays
        "seeds": torch.from_numpy(np.array(seeds, dtype=np.uint8)),
        "proposal": torch.from_numpy(np.array(proposal, dtype=np.uint8)),
        "mask": torch.from_numpy(np.array(mask, dtype=np.uint8)),
        "roi": torch.ones(seeds.shape, dtype=torch.bool) if roi is None else torch.from_numpy(roi.astype(bool)),
        "index": index,
    }


class TrainSet(_Base):
    """Training images with their seeds, proposals and masks, augmented jointly.

    ``proposals`` (mutable: the trainer replaces entries between rounds) maps an image id
    to its H×W uint8 proposal (255 = none); images without an entry get all-255.
    Images without a mask get an all-255 mask.

    Augmentation (``augment=True``), the same for image, seeds, proposal and mask, as in
    the reference (VainF/DeepLabV3Plus-Pytorch): a random scale (image bilinear, label
    maps nearest), a random crop of ``crop_size``×``crop_size`` (padding: 0 for the
    image, 255 for the label maps), a horizontal flip with probability 0.5.
    Scale range: ``scale_range`` if given; otherwise the reference's (0.5, 2.0) for
    images whose short side is ≥ 200 px, and (0.75, 1.5) for smaller images (the
    synthetic ones: at 0.5 their 1–3 px scribbles and fine textures are lost to
    resampling). With ``crop_size`` 0 (whole images) no rescaling is done, only the
    flip, so that images of one size still batch. ``augmentation="crop"``: the random
    crop only, for data whose classes differ in orientation or scale (the synthetic
    sets' stripe textures: a flip or a rescale turns one class's texture into
    another's). ``augment=False``: no scale or flip,
    a centred crop (padded if needed) when ``crop_size`` > 0.

    Randomness: call ``set_epoch(e)`` each epoch for augmentations that are a
    deterministic function of (seed, epoch, index); before the first call, draws come
    from torch's global generator (which DataLoader seeds per worker and epoch).

    Items: {"image": float32 3×h×w (0..255), "seeds", "proposal", "mask": uint8 h×w,
    "roi": bool h×w (False on padding: the regularisers leave it out, SPEC §3), "index": int}.
    """

    def __init__(
        self,
        samples: list[Sample],
        num_classes: int,
        crop_size: int,
        augment: bool = True,
        seed: int = 0,
        *,
        scale_range: tuple[float, float] | None = None,
        cache: bool = True,
        augmentation: str = "default",
    ):
        super().__init__(samples, num_classes, cache)
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {AUGMENTATIONS}")
        self.crop_size = int(crop_size)
        self.augment = augment
        self.augmentation = augmentation
        self.seed = seed
        self.scale_range = scale_range
        self.epoch: int | None = None
        self.proposals: dict[str, np.ndarray] = {}

    def use_proposals(self, labels: dict[str, np.ndarray]) -> None:
        """Stage A's labels (image id -> proposal) for the items from now on."""
        self.proposals = labels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        if self.epoch is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> dict:
        s, image, seeds, mask = self._load(index)
        h, w = image.shape[:2]
        proposal = self.proposals.get(s.image_id)
        if proposal is None:
            proposal = np.full((h, w), UNLABELLED, np.uint8)
        elif proposal.shape != (h, w):
            raise UserError(
                f"proposal for image {s.image_id!r} has size {proposal.shape[1]}×{proposal.shape[0]}, "
                f"image {s.image_path} is {w}×{h}"
            )
        elif ((proposal >= self.num_classes) & (proposal != UNLABELLED)).any():
            raise UserError(f"proposal for image {s.image_id!r} has labels ≥ the number of classes "
                            f"{self.num_classes} (and not {UNLABELLED})")
        # the label maps, then the ROI (1 = image, 0 = padding), transformed alike
        labels = [seeds, np.asarray(proposal, np.uint8), mask, np.ones((h, w), np.uint8)]
        fill = [UNLABELLED, UNLABELLED, UNLABELLED, 0]
        rng = self._rng(index) if self.augment else None
        cs = self.crop_size
        if rng is not None and cs > 0 and self.augmentation == "reference":
            image, labels = reference_augment(image, labels, fill, cs, rng)
            return _to_item(image, *labels[:3], index, roi=labels[3])

        if rng is not None and cs > 0 and self.augmentation != "crop":
            lo, hi = self.scale_range or ((0.5, 2.0) if min(h, w) >= 200 else (0.75, 1.5))
            scale = rng.uniform(lo, hi)
            nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
            if (nh, nw) != (h, w):
                image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
                labels = [np.asarray(Image.fromarray(m).resize((nw, nh), Image.NEAREST)) for m in labels]
                h, w = nh, nw
        if cs > 0:
            ph, pw = max(cs - h, 0), max(cs - w, 0)
            if ph or pw:
                # pad bottom/right as the reference's pad_if_needed (split evenly when not augmenting)
                top, left = (0, 0) if rng is not None else (ph // 2, pw // 2)
                pads = ((top, ph - top), (left, pw - left))
                image = np.pad(image, pads + ((0, 0),), constant_values=0)
                labels = [np.pad(m, pads, constant_values=v) for m, v in zip(labels, fill)]
                h, w = h + ph, w + pw
            if rng is not None:
                y0, x0 = int(rng.integers(0, h - cs + 1)), int(rng.integers(0, w - cs + 1))
            else:
                y0, x0 = (h - cs) // 2, (w - cs) // 2
            image = image[y0:y0 + cs, x0:x0 + cs]
            labels = [m[y0:y0 + cs, x0:x0 + cs] for m in labels]
        if rng is not None and self.augmentation != "crop" and rng.random() < 0.5:
            image = image[:, ::-1]
            labels = [m[:, ::-1] for m in labels]
        return _to_item(image, *labels[:3], index, roi=labels[3])


def reference_augment(image: np.ndarray, maps: list[np.ndarray], fill: list[int], crop: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """The authors' VOC augmentation (SPEC §4), in their order (reference
    dataloaders/datasets/pascal.py: RandomHorizontalFlip, RandomScaleCrop,
    RandomGaussianBlur): a horizontal flip (p 0.5); the short side rescaled to a uniform
    integer in REFERENCE_SHORT_SIDE, the long side truncated as theirs (image bilinear,
    maps nearest); padded centred to `crop` with the mean RGB truncated to integers as
    theirs, (123, 116, 103) (≈ zero after the network's normalisation; the maps with
    `fill`, so the ROI map marks the padding); a random crop×crop crop; then a Gaussian blur of random radius in [0, 1) px (p 0.5), on the
    image only (the crop's padding included, as theirs)."""
    if rng.random() < 0.5:
        image, maps = image[:, ::-1], [m[:, ::-1] for m in maps]
    h, w = image.shape[:2]
    short = int(rng.integers(REFERENCE_SHORT_SIDE[0], REFERENCE_SHORT_SIDE[1] + 1))
    nh, nw = (short, max(1, int(w * short / h))) if h <= w else (max(1, int(h * short / w)), short)
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.BILINEAR))
    maps = [np.asarray(Image.fromarray(np.ascontiguousarray(m)).resize((nw, nh), Image.NEAREST)) for m in maps]
    ph, pw = max(crop - nh, 0), max(crop - nw, 0)
    if ph or pw:
        pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        image = np.stack([np.pad(image[..., c], pads, constant_values=int(IMAGENET_MEAN[c])) for c in range(3)], -1)
        maps = [np.pad(m, pads, constant_values=v) for m, v in zip(maps, fill)]
    h, w = image.shape[:2]
    y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    image, maps = image[y0:y0 + crop, x0:x0 + crop], [m[y0:y0 + crop, x0:x0 + crop] for m in maps]
    if rng.random() < 0.5:
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).filter(
            ImageFilter.GaussianBlur(radius=float(rng.random()))))
    return image, maps


class EvalSet(_Base):
    """Whole images, no augmentation: the keys of :class:`TrainSet` (proposal all-255)
    plus "image_id". Images of different sizes need batch size 1."""

    def __getitem__(self, index: int) -> dict:
        s, image, seeds, mask = self._load(index)
        item = _to_item(image, seeds, np.full(seeds.shape, UNLABELLED, np.uint8), mask, index)
        item["image_id"] = s.image_id
        return item
