"""Joint image/label transforms, small and composable, in the style of torchvision's
`references/segmentation/transforms.py`: each one maps ``(image, maps, rng)`` to
``(image, maps)``, the same geometry for the image (H×W×3 uint8, resampled bilinear)
and every label map (H×W uint8, resampled nearest, so labels stay labels).

The random ones draw from ``rng`` (a :class:`numpy.random.Generator`), in the order they
run, so a pipeline is a deterministic function of its generator's seed; the others
ignore it (None is fine). Arrays may come back as views of the input: copy before
writing into them.

Adding a transform: a class with ``__call__(image, maps, rng)``, a test of it alone in
tests/test_transforms.py, and a place in a pipeline below.

The pipelines (:func:`train_transform`) are the augmentation modes of the training crops
(``--augmentation``, `trainer.config.AUGMENTATIONS`); a format's default mode is on its
row of `trainer.formats.LAYOUTS`.

- ``default`` (ours, after VainF/DeepLabV3Plus-Pytorch): a random scale (0.5–2, or
  0.75–1.5 for images whose short side is under 200 px: the synthetic ones, whose 1–3 px
  scribbles and fine textures are lost at 0.5), padding at the bottom/right to the crop
  (0 for the image, 255 for the label maps), a random crop, a horizontal flip (p 0.5).
- ``crop``: the padding and random crop only, for data whose classes differ in
  orientation or scale (the synthetic sets' stripe textures).
- ``reference``: the authors' VOC recipe (SPEC §4), in their order (reference
  dataloaders/datasets/pascal.py: RandomHorizontalFlip, RandomScaleCrop,
  RandomGaussianBlur): a flip (p 0.5), the short side to a uniform integer in
  REFERENCE_SHORT_SIDE (the long side truncated as theirs), centred padding to the crop
  with the mean RGB truncated to integers as theirs, (123, 116, 103) (≈ zero after the
  network's normalisation), a random crop, then a Gaussian blur of the image (p 0.5,
  radius in [0, 1) px, the padding included as theirs).

With crop size 0 (whole images) no mode rescales or crops; all but ``crop`` flip, so that
images of one size still batch. Unaugmented (:func:`eval_transform`): a centred crop,
padded centred if needed.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from trainer.config import AUGMENTATIONS
from trainer.model import IMAGENET_MEAN

Maps = list[np.ndarray]  # H×W uint8 label maps, transformed alike
REFERENCE_SHORT_SIDE = (256, 1026)  # the authors' VOC rescaling range (SPEC §4)
SCALE, SMALL_SCALE, SMALL_SIDE = (0.5, 2.0), (0.75, 1.5), 200  # the default mode's scale ranges


def resize(image: np.ndarray, maps: Maps, height: int, width: int) -> tuple[np.ndarray, Maps]:
    """The image bilinear, the maps nearest, to height×width."""
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BILINEAR))
    maps = [np.asarray(Image.fromarray(np.ascontiguousarray(m)).resize((width, height), Image.NEAREST)) for m in maps]
    return image, maps


class Compose:
    """The transforms in order, all drawing from the one generator."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, maps, rng=None):
        for t in self.transforms:
            image, maps = t(image, maps, rng)
        return image, maps

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomScale:
    """Rescale by a factor uniform in ``scale`` (sizes rounded, at least 1 px); images
    whose short side is under ``small_side`` px draw from ``small_scale`` instead. One draw."""

    def __init__(self, scale: tuple[float, float], small_scale: tuple[float, float] | None = None, small_side: int = 0):
        self.scale, self.small_scale, self.small_side = scale, small_scale, small_side

    def __call__(self, image, maps, rng):
        h, w = image.shape[:2]
        lo, hi = self.small_scale if self.small_scale and min(h, w) < self.small_side else self.scale
        s = rng.uniform(lo, hi)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        if (nh, nw) == (h, w):
            return image, maps
        return resize(image, maps, nh, nw)

    def __repr__(self) -> str:
        return f"RandomScale({self.scale}, small_scale={self.small_scale}, small_side={self.small_side})"


class RandomResize:
    """torchvision's: the short side to an integer uniform in [min_size, max_size], the long
    side in proportion, truncated (as the authors' RandomScaleCrop). One draw."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, maps, rng):
        h, w = image.shape[:2]
        short = int(rng.integers(self.min_size, self.max_size + 1))
        nh, nw = (short, max(1, int(w * short / h))) if h <= w else (max(1, int(h * short / w)), short)
        return resize(image, maps, nh, nw)

    def __repr__(self) -> str:
        return f"RandomResize({self.min_size}, {self.max_size})"


class Pad:
    """Pad to at least size×size: at the bottom and right, or ``centre``d (the odd pixel
    at the bottom/right). The image with ``fill`` (one value, or one per channel), the
    maps with ``map_fill`` (one value, or one per map: e.g. 255 for labels, 0 for an ROI)."""

    def __init__(self, size: int, fill: int | Sequence[int] = 0, map_fill: int | Sequence[int] = 255,
                 centre: bool = False):
        self.size, self.fill, self.map_fill, self.centre = size, fill, map_fill, centre

    def __call__(self, image, maps, rng=None):
        h, w = image.shape[:2]
        ph, pw = max(self.size - h, 0), max(self.size - w, 0)
        if not (ph or pw):
            return image, maps
        top, left = (ph // 2, pw // 2) if self.centre else (0, 0)
        pads = ((top, ph - top), (left, pw - left))
        if isinstance(self.fill, Sequence):
            image = np.stack([np.pad(image[..., c], pads, constant_values=int(v)) for c, v in enumerate(self.fill)], -1)
        else:
            image = np.pad(image, pads + ((0, 0),), constant_values=self.fill)
        fills = self.map_fill if isinstance(self.map_fill, Sequence) else [self.map_fill] * len(maps)
        if len(fills) != len(maps):
            raise ValueError(f"Pad: {len(fills)} map fill values for {len(maps)} maps")
        return image, [np.pad(m, pads, constant_values=v) for m, v in zip(maps, fills)]

    def __repr__(self) -> str:
        return f"Pad({self.size}, fill={self.fill}, map_fill={self.map_fill}, centre={self.centre})"


def _check_fits(name: str, size: int, h: int, w: int) -> None:
    if h < size or w < size:
        raise ValueError(f"{name}({size}): image {w}×{h} is smaller than the crop (Pad it first)")


class RandomCrop:
    """A size×size crop at a uniform position (two draws: top, then left). Pad first."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, maps, rng):
        h, w = image.shape[:2]
        _check_fits("RandomCrop", self.size, h, w)
        y0, x0 = int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1))
        return _crop(image, maps, y0, x0, self.size)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class CenterCrop:
    """The centred size×size crop (the odd pixel at the top/left). Pad first."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, maps, rng=None):
        h, w = image.shape[:2]
        _check_fits("CenterCrop", self.size, h, w)
        return _crop(image, maps, (h - self.size) // 2, (w - self.size) // 2, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


def _crop(image, maps, y0: int, x0: int, size: int):
    return image[y0:y0 + size, x0:x0 + size], [m[y0:y0 + size, x0:x0 + size] for m in maps]


class RandomHorizontalFlip:
    """Mirror left-right with probability p (one draw)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, maps, rng):
        if rng.random() < self.p:
            return image[:, ::-1], [m[:, ::-1] for m in maps]
        return image, maps

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip({self.p})"


class RandomGaussianBlur:
    """With probability p (one draw), a Gaussian blur of the image only, its radius
    uniform in [0, max_radius) px (a second draw), as the authors' RandomGaussianBlur."""

    def __init__(self, p: float = 0.5, max_radius: float = 1.0):
        self.p, self.max_radius = p, max_radius

    def __call__(self, image, maps, rng):
        if rng.random() < self.p:
            radius = float(rng.random()) * self.max_radius
            image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).filter(ImageFilter.GaussianBlur(radius=radius)))
        return image, maps

    def __repr__(self) -> str:
        return f"RandomGaussianBlur({self.p}, max_radius={self.max_radius})"



def train_transform(augmentation: str, crop_size: int, *, map_fill: int | Sequence[int] = 255,
                    scale_range: tuple[float, float] | None = None) -> Compose:
    """The pipeline of mode ``augmentation`` for crop_size×crop_size crops (0: whole
    images); ``scale_range`` replaces the default mode's scale ranges; ``map_fill`` pads
    the label maps (one value, or one per map)."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {AUGMENTATIONS}")
    if crop_size <= 0:
        return Compose([] if augmentation == "crop" else [RandomHorizontalFlip()])
    if augmentation == "reference":
        mean = tuple(int(m) for m in IMAGENET_MEAN)
        return Compose([RandomHorizontalFlip(), RandomResize(*REFERENCE_SHORT_SIDE),
                        Pad(crop_size, mean, map_fill, centre=True), RandomCrop(crop_size), RandomGaussianBlur()])
    crop = [Pad(crop_size, 0, map_fill), RandomCrop(crop_size)]
    if augmentation == "crop":
        return Compose(crop)
    scale = RandomScale(scale_range) if scale_range else RandomScale(SCALE, SMALL_SCALE, SMALL_SIDE)
    return Compose([scale, *crop, RandomHorizontalFlip()])


def eval_transform(crop_size: int, *, map_fill: int | Sequence[int] = 255) -> Compose:
    """No augmentation: the centred crop_size×crop_size crop, padded centred (0: the whole image)."""
    if crop_size <= 0:
        return Compose([])
    return Compose([Pad(crop_size, 0, map_fill, centre=True), CenterCrop(crop_size)])
