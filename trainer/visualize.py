"""Pictures for people: rows of tiles under column titles, with a class-colour legend.

`grid` draws them; `write_panels` uses it at every evaluation for a fixed set of val
and train images (image + scribbles | proposal | prediction | ground truth), as PNG
files under OUT/panels/ and as TensorBoard images. The jobs' comparison.png
(experiments/pictures.py) is the same grid with one prediction column per method.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shared import storage
from shared.image_io import palette
from shared.labels import UNLABELLED
from trainer.engine import predict
from trainer.run_folder import RunFolder

N_PANELS = 4
TILE = 128  # the smallest tile side in pixels: small images are upscaled (nearest neighbour)
PAD = 6
TITLE_H = 22
CAPTION_H = 18
LEGEND_H = 26
PANEL_TITLES = ("image + scribbles", "proposal", "prediction", "ground truth")


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """H×W class ids to H×W×3 uint8 in the data set's palette (VOC's: background black;
    255 = no label, shown in VOC's cream for its void pixels)."""
    pal = np.zeros((256, 3), np.uint8)
    pal[:num_classes] = palette(num_classes)[:num_classes]
    pal[UNLABELLED] = palette(256)[UNLABELLED]
    return pal[labels.astype(np.int64)]


def with_scribbles(image: np.ndarray, seeds: np.ndarray, num_classes: int) -> np.ndarray:
    """The RGB image with its scribbled pixels painted in their class colours."""
    out = image.astype(np.uint8).copy()
    drawn = seeds != UNLABELLED
    out[drawn] = colorize(seeds, num_classes)[drawn]
    return out


def tile_side(tiles: list[list[np.ndarray]]) -> int:
    """One side for every tile of a grid: TILE, or the largest image's side up to 2×TILE."""
    return int(min(2 * TILE, max(TILE, *(max(t.shape[:2]) for row in tiles for t in row))))


def column_boxes(n_cols: int, n_rows: int, side: int) -> list[list[tuple[int, int, int, int]]]:
    """(x0, y0, x1, y1) of every tile, row by row: where `grid` puts them."""
    return [[(PAD + j * (side + PAD), TITLE_H + i * (side + CAPTION_H + PAD),
              PAD + j * (side + PAD) + side, TITLE_H + i * (side + CAPTION_H + PAD) + side)
             for j in range(n_cols)] for i in range(n_rows)]


def _fit(tile: np.ndarray, side: int) -> Image.Image:
    """The tile scaled by nearest neighbour to fit a side×side box, keeping its aspect."""
    h, w = tile.shape[:2]
    scale = side / max(h, w)
    return Image.fromarray(tile).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)


def grid(tiles: list[list[np.ndarray]], titles: list[str], class_names: list[str],
         captions: list[list[str]] | None = None) -> np.ndarray:
    """Rows of H×W×3 uint8 tiles under column `titles`, a caption under each tile, and
    a legend of the class colours at the bottom; an H×W×3 uint8 picture."""
    side = tile_side(tiles)
    n_rows, n_cols = len(tiles), len(titles)
    boxes = column_boxes(n_cols, n_rows, side)
    width = PAD + n_cols * (side + PAD)
    height = TITLE_H + n_rows * (side + CAPTION_H + PAD) + LEGEND_H
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    for j, title in enumerate(titles):
        draw.text((boxes[0][j][0], 4), title, fill=(0, 0, 0), font=font)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            x0, y0, _, y1 = boxes[i][j]
            canvas.paste(_fit(tile, side), (x0, y0))
            if captions and captions[i][j]:
                draw.text((x0, y1 + 2), captions[i][j], fill=(0, 0, 0), font=font)
    x, y = PAD, height - LEGEND_H + 5
    colours = palette(len(class_names))
    for k, name in enumerate(class_names):
        draw.rectangle((x, y, x + 14, y + 14), fill=tuple(int(c) for c in colours[k]), outline=(0, 0, 0))
        draw.text((x + 18, y), name, fill=(0, 0, 0), font=font)
        x += 18 + int(draw.textlength(name, font=font)) + 12
    return np.asarray(canvas)


def png_bytes(picture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def panel(image: np.ndarray, seeds, proposal, prediction, mask, class_names: list[str]) -> np.ndarray:
    """One image's panel: image + scribbles | proposal | prediction | ground truth."""
    K = len(class_names)
    tiles = [with_scribbles(image, seeds, K)] + [colorize(x, K) for x in (proposal, prediction, mask)]
    return grid([tiles], list(PANEL_TITLES), class_names)


def write_panels(log, net, sets: dict, proposals: dict, device, epoch: int, class_names: list[str],
                 precision: str = "auto") -> None:
    """One panel for each of the first images of every split in `sets` (unaugmented EvalSets),
    the network's labels at the run's --precision."""
    if not log.enabled:
        return
    for split, dataset in sets.items():
        for i in range(min(N_PANELS, len(dataset))):
            item = dataset[i]
            pred = predict(net, item["image"], device, precision).cpu().numpy()
            proposal = proposals.get(item["image_id"], np.full(pred.shape, UNLABELLED, np.uint8))
            tile = panel(item["image"].permute(1, 2, 0).numpy(), item["seeds"].numpy(), proposal, pred,
                         item["mask"].numpy(), class_names)
            storage.write_bytes(storage.join(RunFolder(log.out).panels, f"epoch-{epoch:03d}", f"{split}-{item['image_id']}.png"),
                                png_bytes(tile))
            log.log_image(f"panels/{split}/{item['image_id']}", tile, epoch)
