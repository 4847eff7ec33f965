"""Data sets: layouts, bad-data errors (naming the file), augmentation alignment."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from shared.errors import UserError
from shared.image_io import palette, read_image, read_label, write_label
from trainer.datasets import EvalSet, ImageCache, TrainSet
from trainer.formats import VOC_CLASSES
from trainer.splits import Sample, check_samples, load_split, read_classes

H, W, K = 50, 70, 3


def _make_folder(root, n_train=3, n_val=2, h=H, w=W):
    rng = np.random.default_rng(0)
    for d in ("images", "masks", "scribbles", "scribbles0.5"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    ids = {"train": [f"t{i}" for i in range(n_train)], "val": [f"v{i}" for i in range(n_val)]}
    for split, names in ids.items():
        for name in names:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, "images", name + ".png"))
            mask = rng.integers(0, K, (h, w)).astype(np.uint8)
            mask[0, 0] = 255
            write_label(os.path.join(root, "masks", name + ".png"), mask)
            seeds = np.full((h, w), 255, np.uint8)
            seeds[10, 5:40] = 1
            seeds[30, 5:40] = 0
            for d in ("scribbles", "scribbles0.5"):
                write_label(os.path.join(root, d, name + ".png"), seeds)
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("background\ncat\ndog\n")
    return root


@pytest.fixture
def folder(tmp_path):
    return _make_folder(str(tmp_path / "data"))


# --------------------------------------------------------------------------- layouts


def test_folder_layout(folder):
    assert read_classes(folder, "folder") == ["background", "cat", "dog"]
    train = load_split(folder, "folder", "train")
    assert [s.image_id for s in train] == ["t0", "t1", "t2"]
    assert train[0].seeds_path.endswith(os.path.join("scribbles", "t0.png"))
    assert load_split(folder, "folder", "train", "0.5")[0].seeds_path.endswith(os.path.join("scribbles0.5", "t0.png"))
    val = load_split(folder, "folder", "val")
    assert all(s.mask_path for s in val)
    check_samples(train + val, K)


def test_train_mask_optional(folder):
    os.remove(os.path.join(folder, "masks", "t1.png"))
    train = load_split(folder, "folder", "train")
    assert train[1].mask_path is None
    item = TrainSet(train, K, 0, augment=False)[1]
    assert (item["mask"] == 255).all()
    with pytest.raises(UserError, match="t1.png"):
        load_split(folder, "folder", "train", require_masks=True)


def test_voc_layout(tmp_path):
    root = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClassAug", "SegmentationClass", "pascal_2012_scribble", "ImageSets/SegmentationAug"):
        (root / d).mkdir(parents=True)
    img = np.zeros((20, 30, 3), np.uint8)
    for i in ("a", "b"):
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg")
        write_label(str(root / "SegmentationClassAug" / f"{i}.png"), np.full((20, 30), 15, np.uint8))
        write_label(str(root / "pascal_2012_scribble" / f"{i}.png"), np.full((20, 30), 255, np.uint8))
    write_label(str(root / "SegmentationClass" / "b.png"), np.full((20, 30), 20, np.uint8))
    (root / "ImageSets/SegmentationAug/train.txt").write_text("a\n")
    (root / "ImageSets/SegmentationAug/val.txt").write_text("b\n")
    assert read_classes(str(root), "voc") == VOC_CLASSES and len(VOC_CLASSES) == 21
    train = load_split(str(root), "voc", "train")
    assert train[0].image_path.endswith("a.jpg") and train[0].mask_path.endswith(os.path.join("SegmentationClassAug", "a.png"))
    val = load_split(str(root), "voc", "val")
    assert val[0].mask_path.endswith(os.path.join("SegmentationClass", "b.png"))
    check_samples(train + val, 21)
    with pytest.raises(UserError, match="pascal_2012_scribble0.3"):
        load_split(str(root), "voc", "train", "0.3")


def test_palette_and_label_modes(tmp_path):
    p = palette(256)
    assert p.shape == (256, 3)
    assert tuple(p[0]) == (0, 0, 0) and tuple(p[1]) == (128, 0, 0) and tuple(p[15]) == (192, 128, 128)
    assert tuple(p[255]) == (224, 224, 192)
    assert palette(21).shape == (21, 3)
    lab = np.array([[0, 1], [2, 255]], np.uint8)
    Image.fromarray(lab, mode="L").save(tmp_path / "grey.png")
    write_label(str(tmp_path / "pal.png"), lab)
    assert np.array_equal(read_label(str(tmp_path / "grey.png"), 3), lab)
    assert np.array_equal(read_label(str(tmp_path / "pal.png"), 3), lab)


# --------------------------------------------------------------------------- bad data


def test_missing_root_and_classes(tmp_path, folder):
    with pytest.raises(UserError, match="nowhere"):
        load_split(str(tmp_path / "nowhere"), "folder", "train")
    with pytest.raises(UserError, match="nowhere"):
        read_classes(str(tmp_path / "nowhere"), "folder")
    os.remove(os.path.join(folder, "classes.txt"))
    with pytest.raises(UserError, match="classes.txt"):
        read_classes(folder, "folder")


def test_empty_split(folder):
    open(os.path.join(folder, "train.txt"), "w").write("\n\n")
    with pytest.raises(UserError, match="train.txt.*empty"):
        load_split(folder, "folder", "train")
    os.remove(os.path.join(folder, "val.txt"))
    with pytest.raises(UserError, match="val.txt"):
        load_split(folder, "folder", "val")


def test_missing_files(folder):
    os.remove(os.path.join(folder, "scribbles0.5", "t2.png"))
    with pytest.raises(UserError, match=r"scribbles0\.5.t2\.png"):
        load_split(folder, "folder", "train", "0.5")
    with pytest.raises(UserError, match="scribbles0.3"):
        load_split(folder, "folder", "train", "0.3")
    os.remove(os.path.join(folder, "masks", "v1.png"))
    with pytest.raises(UserError, match="v1.png"):
        load_split(folder, "folder", "val")
    os.remove(os.path.join(folder, "images", "t0.png"))
    with pytest.raises(UserError, match="t0.png"):
        load_split(folder, "folder", "train")


def test_truncated_image(folder):
    path = os.path.join(folder, "images", "t1.png")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    samples = load_split(folder, "folder", "train")
    with pytest.raises(UserError, match="t1.png"):
        check_samples(samples, K)
    with pytest.raises(UserError, match="t1.png"):
        read_image(path)
    open(path, "wb").write(b"garbage")
    with pytest.raises(UserError, match="t1.png"):
        check_samples(samples, K)


def test_size_mismatch(folder):
    write_label(os.path.join(folder, "scribbles", "t2.png"), np.full((H + 1, W), 255, np.uint8))
    samples = load_split(folder, "folder", "train")
    with pytest.raises(UserError, match="t2.png"):
        check_samples(samples, K)
    with pytest.raises(UserError, match="t2.png"):
        TrainSet(samples, K, 32)[2]


def test_label_out_of_range(folder):
    mask = np.zeros((H, W), np.uint8)
    mask[3, 3] = 7
    mask[4, 4] = 255  # fine
    write_label(os.path.join(folder, "masks", "v0.png"), mask)
    samples = load_split(folder, "folder", "val")
    with pytest.raises(UserError, match=r"v0\.png.*\[7\]"):
        check_samples(samples, K)
    Image.new("RGB", (W, H)).save(os.path.join(folder, "masks", "v0.png"))
    with pytest.raises(UserError, match="v0.png"):
        check_samples(samples, K)


# --------------------------------------------------------------------------- datasets


def _coord_sample(root):
    """Image R = 3x, G = 3y; seeds = x, mask = y, proposal = x + y (K = 250)."""
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([3 * xx, 3 * yy, np.full_like(xx, 7)], -1).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(root, "c.png"))
    write_label(os.path.join(root, "cs.png"), xx.astype(np.uint8))
    write_label(os.path.join(root, "cm.png"), yy.astype(np.uint8))
    s = Sample("c", os.path.join(root, "c.png"), os.path.join(root, "cs.png"), os.path.join(root, "cm.png"))
    return s, (xx + yy).astype(np.uint8)


def _check_aligned(item, tol):
    img, seeds, mask, prop = item["image"], item["seeds"], item["mask"], item["proposal"]
    valid = (seeds != 255) & (mask != 255) & (prop != 255)
    assert valid.float().mean() > 0.3
    pad = seeds == 255
    assert ((mask == 255) == pad).all() and ((prop == 255) == pad).all()
    assert (img[:, pad] == 0).all()
    assert item["roi"].dtype == torch.bool and torch.equal(item["roi"], ~pad)  # the ROI follows the padding
    x, y = img[0] / 3, img[1] / 3
    assert ((seeds[valid] - x[valid]).abs() <= tol).all()
    assert ((mask[valid] - y[valid]).abs() <= tol).all()
    assert ((prop[valid] - seeds[valid] - mask[valid]).abs() == 0).all()


def test_augmentation_keeps_maps_aligned(tmp_path):
    s, prop = _coord_sample(str(tmp_path))
    ds = TrainSet([s], 250, 40, augment=True, seed=1, scale_range=(1.0, 1.0))
    ds.proposals["c"] = prop
    flips = 0
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["image"].shape == (3, 40, 40) and item["image"].dtype == torch.float32
        assert item["seeds"].dtype == torch.uint8 and item["index"] == 0
        _check_aligned(item, tol=0)
        row = item["seeds"][item["seeds"].shape[0] // 2]
        flips += int(row[0] > row[-1])
    assert 0 < flips < 12
    # with rescaling: labels (nearest) and image (bilinear) agree within a source pixel
    ds = TrainSet([s], 250, 48, augment=True, seed=2)
    ds.proposals["c"] = prop
    for epoch in range(10):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["image"].shape == (3, 48, 48)
        _check_aligned(item, tol=1.5)
    ds.set_epoch(3)
    a, b = ds[0], ds[0]
    assert all(torch.equal(a[k], b[k]) for k in ("image", "seeds", "proposal", "mask"))


def test_pad_when_crop_larger(tmp_path):
    s, prop = _coord_sample(str(tmp_path))
    ds = TrainSet([s], 250, 80, augment=False)
    item = ds[0]
    assert item["image"].shape == (3, 80, 80)
    assert (item["seeds"] == 255).sum() == 80 * 80 - H * W
    assert item["roi"].sum() == H * W and torch.equal(item["roi"], item["seeds"] != 255)
    assert (item["proposal"] == 255).all()  # no proposal entry


def test_proposals_and_whole_images(folder):
    train = load_split(folder, "folder", "train")
    ds = TrainSet(train, K, 0, augment=False)
    item = ds[0]
    assert item["image"].shape == (3, H, W) and (item["proposal"] == 255).all()
    ds.proposals["t0"] = np.ones((H, W), np.uint8)
    assert (ds[0]["proposal"] == 1).all()
    ds.proposals["t0"] = np.ones((H + 2, W), np.uint8)
    with pytest.raises(UserError, match="t0"):
        ds[0]
    ds.proposals["t0"] = np.full((H, W), K, np.uint8)  # the losses check no label on a GPU: the data set does
    with pytest.raises(UserError, match="t0.*number of classes"):
        ds[0]
    ev = EvalSet(load_split(folder, "folder", "val"), K)
    item = ev[1]
    assert item["image_id"] == "v1" and item["image"].shape == (3, H, W)
    assert item["mask"].shape == (H, W) and (item["proposal"] == 255).all()
    assert torch.equal(item["mask"], torch.from_numpy(read_label(ev.samples[1].mask_path, K)))


def test_cached_after_first_read(folder):
    ev = EvalSet(load_split(folder, "folder", "val"), K)
    first = ev[0]
    os.remove(ev.samples[0].image_path)
    os.remove(ev.samples[0].mask_path)
    again = ev[0]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])


def test_train_and_eval_share_one_cache(folder):
    """The training split read augmented and not (the loop's TrainSet and EvalSet) is
    decoded once: the second Dataset finds every file in the shared cache."""
    train = load_split(folder, "folder", "train")
    cache = ImageCache()
    first = [TrainSet(train, K, 0, augment=False, cache=cache)[i] for i in range(len(train))]
    for s in train:
        for path in (s.image_path, s.seeds_path, s.mask_path):
            os.remove(path)
    ev = EvalSet(train, K, cache=cache)
    for i, item in enumerate(first):
        again = ev[i]
        assert all(torch.equal(item[key], again[key]) for key in ("image", "seeds", "mask"))
    with pytest.raises(UserError, match="not found"):  # a Dataset with a cache of its own reads the files
        EvalSet(train, K)[0]


def test_reference_augmentation_rescales_pads_centred_with_the_mean_and_marks_the_roi(tmp_path):
    """SPEC §4's VOC recipe: short side to [256, 1026], centred padding to the crop with
    the mean RGB, the ROI False exactly on that padding, maps aligned with it."""
    from trainer.transforms import REFERENCE_SHORT_SIDE
    from trainer.model import IMAGENET_MEAN

    s, prop = _coord_sample(str(tmp_path))
    crop = 513  # the recipe's
    ds = TrainSet([s], 250, crop, augment=True, seed=0, augmentation="reference")
    ds.proposals["c"] = prop
    padded = far_padding = 0
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        roi, img = item["roi"], item["image"]
        assert img.shape == (3, crop, crop) and roi.any()
        assert torch.equal(item["seeds"] != 255, roi) and torch.equal(item["mask"] != 255, roi)
        mean = torch.tensor([int(m) for m in IMAGENET_MEAN], dtype=torch.float32)  # (123, 116, 103) as theirs
        # the blur (radius < 1 px) comes last, as the reference's: padding 4 px off the image is the mean
        far = ~torch.nn.functional.max_pool2d(roi[None, None].float(), 9, 1, 4)[0, 0].bool()
        assert (img[:, far] == mean[:, None]).all()
        far_padding += int(far.sum())
        rows, cols = torch.nonzero(roi.any(1)).flatten(), torch.nonzero(roi.any(0)).flatten()
        for idx, n in ((rows, crop), (cols, crop)):
            if len(idx) < n:  # the image is smaller than the crop this way: centred
                padded += 1
                assert abs(int(idx[0]) - (n - 1 - int(idx[-1]))) <= 1
        assert min(len(rows), len(cols)) <= REFERENCE_SHORT_SIDE[1]
    assert padded > 0 and far_padding > 0
    with pytest.raises(ValueError, match="augmentation"):
        TrainSet([s], 250, crop, augmentation="nope")


def test_each_format_has_its_default_augmentation():
    """The format table names a format's augmentation; --augmentation overrides it."""
    from trainer.config import AUGMENTATIONS, TrainConfig
    from trainer.formats import LAYOUTS

    assert {f: LAYOUTS[f].augmentation for f in LAYOUTS} == {"voc": "default", "folder": "default", "synthetic": "crop"}
    assert all(layout.augmentation in AUGMENTATIONS for layout in LAYOUTS.values())
    for fmt, layout in LAYOUTS.items():
        cfg = TrainConfig(format=fmt)
        cfg.validate()
        assert cfg.augmentation == layout.augmentation
    cfg = TrainConfig(format="synthetic", augmentation="default")
    cfg.validate()
    assert cfg.augmentation == "default"
