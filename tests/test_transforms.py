"""Joint image/label transforms (trainer/transforms.py), each alone, and the augmentation
modes as pipelines of them (`train_transform`, `eval_transform`)."""
import numpy as np
import pytest

from trainer.transforms import (REFERENCE_SHORT_SIDE, CenterCrop, Compose, Pad, RandomCrop, RandomGaussianBlur,
                                RandomHorizontalFlip, RandomResize, RandomScale, eval_transform, resize,
                                train_transform)

H, W = 30, 50


def _coords(h=H, w=W):
    """Image R = x, G = y, B = 7; map 0 = x, map 1 = y."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx, yy, np.full_like(xx, 7)], -1).astype(np.uint8)
    return image, [xx.astype(np.uint8), yy.astype(np.uint8)]


def _aligned(image, maps):
    """The maps still name the pixel the image shows (exactly: no resampling)."""
    return np.array_equal(image[..., 0], maps[0]) and np.array_equal(image[..., 1], maps[1])


class Draws:
    """A stand-in generator that returns the draws it is given and records the calls."""

    def __init__(self, *values):
        self.values, self.calls = list(values), []

    def _next(self, name, *args):
        self.calls.append((name, *args))
        return self.values.pop(0)

    def random(self):
        return self._next("random")

    def uniform(self, lo, hi):
        return self._next("uniform", lo, hi)

    def integers(self, lo, hi):
        return self._next("integers", lo, hi)


def test_resize_image_bilinear_maps_nearest():
    image, maps = _coords()
    image2, maps2 = resize(image, maps, 60, 100)
    assert image2.shape == (60, 100, 3) and all(m.shape == (60, 100) for m in maps2)
    assert set(np.unique(maps2[0])) <= set(np.unique(maps[0]))  # nearest: no new label values
    assert np.abs(image2[..., 0].astype(int) - maps2[0]).max() <= 1  # bilinear within a source pixel


def test_random_scale_draws_once_and_picks_the_range_by_the_short_side():
    image, maps = _coords()
    t = RandomScale((0.5, 2.0), small_scale=(0.75, 1.5), small_side=200)
    rng = Draws(2.0)
    image2, maps2 = t(image, maps, rng)
    assert rng.calls == [("uniform", 0.75, 1.5)]  # 30 px < 200: the small range
    assert image2.shape == (60, 100, 3) and maps2[1].shape == (60, 100)
    big, big_maps = _coords(200, 220)
    rng = Draws(0.5)
    assert t(big, big_maps, rng)[0].shape == (100, 110, 3) and rng.calls == [("uniform", 0.5, 2.0)]
    rng = Draws(1.01)  # rounds to the same size: the arrays unchanged
    image3, maps3 = RandomScale((1.0, 1.1))(image, maps, rng)
    assert image3 is image and maps3[0] is maps[0]


def test_random_resize_sets_the_short_side_and_truncates_the_long():
    image, maps = _coords()  # 30×50
    rng = Draws(45)
    image2, maps2 = RandomResize(40, 60)(image, maps, rng)
    assert rng.calls == [("integers", 40, 61)]  # max_size included
    assert image2.shape == (45, 75, 3) and maps2[0].shape == (45, 75)
    tall, tall_maps = _coords(50, 30)
    assert RandomResize(40, 60)(tall, tall_maps, Draws(31))[0].shape == (51, 31, 3)  # 50·31/30 = 51.67 → 51


def test_pad_bottom_right_or_centred_with_per_map_fill():
    image, maps = _coords()
    image2, maps2 = Pad(40, fill=0, map_fill=(255, 9))(image, maps)
    assert image2.shape == (40, 50, 3) and maps2[0].shape == (40, 50)
    assert _aligned(image2[:H], [m[:H] for m in maps2])
    assert (image2[H:] == 0).all() and (maps2[0][H:] == 255).all() and (maps2[1][H:] == 9).all()
    image3, maps3 = Pad(55, fill=(1, 2, 3), map_fill=255, centre=True)(image, maps)
    assert image3.shape == (55, 55, 3)
    top, left = (55 - H) // 2, (55 - W) // 2  # 12 above, 13 below; 2 left, 3 right
    assert _aligned(image3[top:top + H, left:left + W], [m[top:top + H, left:left + W] for m in maps3])
    assert tuple(image3[0, 0]) == (1, 2, 3) and tuple(image3[-1, -1]) == (1, 2, 3) and maps3[1][0, 0] == 255
    assert (maps3[0] != 255).sum() == H * W
    same, same_maps = Pad(20)(image, maps)  # already large enough
    assert same is image and same_maps[0] is maps[0]
    with pytest.raises(ValueError, match="map fill"):
        Pad(40, map_fill=(255,))(image, maps)


def test_random_crop_draws_top_then_left():
    image, maps = _coords()
    rng = Draws(3, 7)
    image2, maps2 = RandomCrop(20)(image, maps, rng)
    assert rng.calls == [("integers", 0, H - 20 + 1), ("integers", 0, W - 20 + 1)]
    assert image2.shape == (20, 20, 3) and _aligned(image2, maps2)
    assert maps2[1][0, 0] == 3 and maps2[0][0, 0] == 7
    with pytest.raises(ValueError, match="Pad it first"):
        RandomCrop(40)(image, maps, Draws(0, 0))


def test_center_crop():
    image, maps = _coords()
    image2, maps2 = CenterCrop(21)(image, maps)
    assert image2.shape == (21, 21, 3) and _aligned(image2, maps2)
    assert maps2[1][0, 0] == (H - 21) // 2 and maps2[0][0, 0] == (W - 21) // 2
    with pytest.raises(ValueError, match="Pad it first"):
        CenterCrop(31)(image, maps)


def test_random_horizontal_flip():
    image, maps = _coords()
    flipped, fmaps = RandomHorizontalFlip(0.5)(image, maps, Draws(0.49))
    assert _aligned(flipped, fmaps) and fmaps[0][0, 0] == W - 1
    kept, kmaps = RandomHorizontalFlip(0.5)(image, maps, Draws(0.5))
    assert kept is image and kmaps[0] is maps[0]


def test_random_gaussian_blur_touches_the_image_only():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    maps = [rng.integers(0, 3, (H, W), dtype=np.uint8)]
    d = Draws(0.2, 0.9)
    blurred, bmaps = RandomGaussianBlur(0.5)(image, maps, d)
    assert [c[0] for c in d.calls] == ["random", "random"]  # whether, then the radius
    assert blurred.shape == image.shape and not np.array_equal(blurred, image) and bmaps[0] is maps[0]
    assert blurred.std() < image.std()
    d = Draws(0.7)
    assert RandomGaussianBlur(0.5)(image, maps, d)[0] is image and len(d.calls) == 1


def test_compose_runs_in_order_on_one_generator():
    image, maps = _coords()
    t = Compose([Pad(40, map_fill=255), RandomCrop(40), RandomHorizontalFlip()])
    a = t(image, maps, np.random.default_rng(5))
    b = t(image, maps, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
    d = Draws(0, 0, 0.9)
    t(image, maps, d)
    assert [c[0] for c in d.calls] == ["integers", "integers", "random"]
    assert Compose([])(image, maps) == (image, maps)


def _kinds(t):
    return [type(x).__name__ for x in t.transforms]


def test_augmentation_modes_as_pipelines():
    assert _kinds(train_transform("default", 64)) == ["RandomScale", "Pad", "RandomCrop", "RandomHorizontalFlip"]
    assert _kinds(train_transform("crop", 64)) == ["Pad", "RandomCrop"]
    ref = train_transform("reference", 513)
    assert _kinds(ref) == ["RandomHorizontalFlip", "RandomResize", "Pad", "RandomCrop", "RandomGaussianBlur"]
    assert (ref.transforms[1].min_size, ref.transforms[1].max_size) == REFERENCE_SHORT_SIDE
    assert ref.transforms[2].fill == (123, 116, 103) and ref.transforms[2].centre
    assert train_transform("default", 64, scale_range=(1.0, 1.0)).transforms[0].scale == (1.0, 1.0)
    for mode in ("default", "reference"):  # whole images: a flip only, so that they still batch
        assert _kinds(train_transform(mode, 0)) == ["RandomHorizontalFlip"]
    assert _kinds(train_transform("crop", 0)) == []
    assert _kinds(eval_transform(64)) == ["Pad", "CenterCrop"] and eval_transform(64).transforms[0].centre
    assert _kinds(eval_transform(0)) == []
    with pytest.raises(ValueError, match="augmentation"):
        train_transform("nope", 64)
