"""The torch Datasets for training and evaluation: a split's samples (`trainer.splits`)
read, cached and, for training, augmented jointly (`trainer.transforms`).

Caching: the Datasets keep every decoded image and label in memory after its first
read, in an `ImageCache` that Datasets over the same files share (the training split's,
augmented and not: each image is held once per process, hence per DataLoader worker).
The data sets this project trains on are small (the synthetic set is a few MB); for
full VOC that costs a few GB per worker — pass ``ImageCache(enabled=False)`` there.
"""
from __future__ import annotations

import numpy as np
import torch

from shared.errors import UserError
from shared.image_io import read_image, read_label
from shared.labels import UNLABELLED
from trainer.transforms import eval_transform, train_transform
from trainer.config import AUGMENTATIONS
from trainer.splits import Sample

MAP_FILL = (UNLABELLED, UNLABELLED, UNLABELLED, 0)  # padding of seeds, proposal, mask (unlabelled) and ROI (outside)


class ImageCache:
    """Decoded images and label maps by path, kept after their first read (when
    `enabled`). One object serves every Dataset of a process that reads the same files,
    so that the training split, read augmented and not, is decoded and held once."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, path: str, read) -> np.ndarray:
        """The array at `path`, from `read(path)` on its first request."""
        arr = self._arrays.get(path)
        if arr is None:
            arr = read(path)
            if self.enabled:
                self._arrays[path] = arr
        return arr


class _Base(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], num_classes: int, cache: ImageCache | None = None):
        self.samples = list(samples)
        self.num_classes = num_classes
        self.cache = cache if cache is not None else ImageCache()

    def __len__(self) -> int:
        return len(self.samples)

    def _get(self, path: str, kind: str) -> np.ndarray:
        return self.cache.get(path, read_image if kind == "image" else lambda p: read_label(p, self.num_classes))

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

    ``proposals`` (replaced between rounds by ``set_proposals``) maps
    an image id to its H×W uint8 proposal (255 = none); images without an entry get all-255.
    Images without a mask get an all-255 mask.

    Augmentation (``augment=True``), the same for image, seeds, proposal and mask: the
    pipeline of mode ``augmentation`` (`trainer.transforms`: ``default``, ``crop``,
    ``reference``) for ``crop_size``×``crop_size`` crops (0: whole images); ``scale_range``
    replaces the default mode's scale ranges. ``augment=False``: a centred crop (padded
    centred if needed) when ``crop_size`` > 0.

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
        cache: ImageCache | None = None,
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
        self.transform = (train_transform(augmentation, self.crop_size, map_fill=MAP_FILL, scale_range=scale_range)
                          if augment else eval_transform(self.crop_size, map_fill=MAP_FILL))

    def set_proposals(self, proposals: dict[str, np.ndarray]) -> None:
        """Stage A's labels (image id -> H×W uint8, 255 = none) for the next items."""
        self.proposals = proposals

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
        # the label maps, then the ROI (1 = image, 0 = padding: MAP_FILL), transformed alike
        maps = [seeds, np.asarray(proposal, np.uint8), mask, np.ones((h, w), np.uint8)]
        image, maps = self.transform(image, maps, self._rng(index) if self.augment else None)
        return _to_item(image, *maps[:3], index, roi=maps[3])


class EvalSet(_Base):
    """Whole images, no augmentation: the keys of :class:`TrainSet` (proposal all-255)
    plus "image_id". Images of different sizes need batch size 1."""

    def __getitem__(self, index: int) -> dict:
        s, image, seeds, mask = self._load(index)
        item = _to_item(image, seeds, np.full(seeds.shape, UNLABELLED, np.uint8), mask, index)
        item["image_id"] = s.image_id
        return item
