"""The augmentation modes of the training crops (``--augmentation``, `trainer.config.AUGMENTATIONS`)
as pipelines of `trainer.transforms`; a format's default mode is on its row of
`trainer.formats.LAYOUTS`.

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

from trainer.config import AUGMENTATIONS
from trainer.model import IMAGENET_MEAN
from trainer.transforms import (CenterCrop, Compose, Pad, RandomCrop, RandomGaussianBlur, RandomHorizontalFlip,
                                RandomResize, RandomScale)

REFERENCE_SHORT_SIDE = (256, 1026)  # the authors' VOC rescaling range (SPEC §4)
SCALE, SMALL_SCALE, SMALL_SIDE = (0.5, 2.0), (0.75, 1.5), 200  # the default mode's scale ranges


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
