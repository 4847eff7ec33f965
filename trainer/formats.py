"""The data formats (SPEC §5, ``--format``): where each keeps its files under the data
root, its class names, and the augmentation its training crops get by default.

Layouts (ROOT is the data root, SUFFIX the scribble length: '', '0.8', '0.5', '0.3', '0'):

- ``voc``: ROOT/JPEGImages/{id}.jpg, ROOT/pascal_2012_scribble{SUFFIX}/{id}.png,
  ROOT/SegmentationClassAug/{id}.png (full labels), ROOT/SegmentationClass/{id}.png
  (val labels; SegmentationClassAug is used when it is absent),
  ROOT/ImageSets/SegmentationAug/{train,val}.txt. The 21 VOC classes.
- ``folder``: ROOT/images/{id}.png|.jpg|.jpeg, ROOT/scribbles{SUFFIX}/{id}.png,
  ROOT/masks/{id}.png (needed for val, optional for train), ROOT/train.txt,
  ROOT/val.txt (one id a line), ROOT/classes.txt (one name a line, background first).
- ``synthetic``: the ``folder`` layout, written by :func:`trainer.synthetic.make_synthetic`;
  its training crops are random crops only (``augmentation="crop"``): its classes differ
  by stripe orientation and period, which a flip or a rescale changes.

Adding a format is one row of :data:`LAYOUTS`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]


@dataclass(frozen=True)
class Layout:
    """Where a data format keeps its files (SPEC §5), relative to the data root.
    `{split}` and `{suffix}` (the scribble length suffix) are filled in."""

    split_file: str
    image_dir: str
    image_exts: tuple[str, ...]
    scribble_dir: str
    mask_dirs: dict[str, tuple[str, ...]]  # split -> folders to look in, first found wins
    classes: tuple[str, ...] | None = None  # fixed class names; None: ROOT/classes.txt
    augmentation: str = "default"  # the training crops' augmentation when --augmentation is not given


_FOLDER = Layout("{split}.txt", "images", (".png", ".jpg", ".jpeg"), "scribbles{suffix}",
                 {"train": ("masks",), "val": ("masks",)})
# --format: the data formats (trainer.splits finds their files)
LAYOUTS: dict[str, Layout] = {
    "voc": Layout("ImageSets/SegmentationAug/{split}.txt", "JPEGImages", (".jpg", ".jpeg", ".png"),
                  "pascal_2012_scribble{suffix}",
                  {"train": ("SegmentationClassAug",), "val": ("SegmentationClass", "SegmentationClassAug")},
                  classes=tuple(VOC_CLASSES)),
    "folder": _FOLDER,
    "synthetic": replace(_FOLDER, augmentation="crop"),  # written by trainer.synthetic.make_synthetic
}
