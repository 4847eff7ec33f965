"""Panels for people: image | scribbles | proposal | prediction | ground truth.

Written for a fixed set of val and train images at every evaluation, as PNG files
under OUT/panels/ and as TensorBoard images.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from shared import storage
from shared.image_io import palette
from trainer.engine import predict

N_PANELS = 4


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """H×W class ids (255 = none, shown black) to H×W×3 uint8 in the data set's palette."""
    pal = np.zeros((256, 3), np.uint8)
    pal[:num_classes] = np.asarray(palette(num_classes), np.uint8).reshape(-1, 3)[:num_classes]
    return pal[labels.astype(np.int64)]


def panel(image: np.ndarray, seeds, proposal, prediction, mask, num_classes: int) -> np.ndarray:
    tiles = [image.astype(np.uint8)] + [colorize(x, num_classes) for x in (seeds, proposal, prediction, mask)]
    gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
    return np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)


def write_panels(log, net, sets: dict, proposals: dict, device, epoch: int, num_classes: int) -> None:
    """One panel for each of the first images of every split in `sets` (unaugmented EvalSets)."""
    if not log.enabled:
        return
    for split, dataset in sets.items():
        for i in range(min(N_PANELS, len(dataset))):
            item = dataset[i]
            pred = predict(net, item["image"], device).cpu().numpy()
            proposal = proposals.get(item["image_id"], np.full(pred.shape, 255, np.uint8))
            tile = panel(item["image"].permute(1, 2, 0).numpy(), item["seeds"].numpy(), proposal, pred, item["mask"].numpy(), num_classes)
            buf = io.BytesIO()
            Image.fromarray(tile).save(buf, format="PNG")
            storage.write_bytes(storage.join(log.out, "panels", f"epoch-{epoch:03d}", f"{split}-{item['image_id']}.png"), buf.getvalue())
            log.log_image(f"panels/{split}/{item['image_id']}", tile, epoch)
