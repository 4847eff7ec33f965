"""The built-in synthetic data set: a small task that shows what the paper is about.

Images (``size``×``size`` RGB) hold a background and 1–4 objects of K−1 object classes.

- Classes differ in colour AND texture: class k has a hue (evenly spaced on the colour
  wheel) and an oriented stripe texture (orientation and period per class); each
  object draws its hue (± 0.45/(K−1), under half the spacing 1/(K−1): hues of
  neighbouring classes do not overlap), saturation, value, stripe angle and period with
  a jitter. A flip or
  a rescale turns one class's stripes into another's, which is why the synthetic
  format trains with crops only (``TrainConfig.augmentation``).
- The background is a low-saturation colour with a smooth random shading field,
  plus clutter: 2–5 distractor patches in other background colours, some carrying the
  object classes' stripe textures.
- Objects are ellipses, smooth blobs or polygons, rotated, several per image, possibly
  touching or occluding each other (painted in order; the mask is what stays visible).
- Object extents are hard to get from appearance alone but easy from edges: inside
  each visible object region the appearance fades towards the local background over a
  rim of 6–10 px, at most half the region's depth (blend 0.85–0.97 at the boundary,
  decaying linearly with depth: every object keeps a core that shows its class), and the
  region's boundary pixels are darkened (a 1-px outline). The boundary is therefore a
  sharp image edge (where a contrast-sensitive Potts model cuts), while the rim looks
  like background to a classifier that has only seen the interiors. Scribbles lie in
  the interiors, so a network trained on scribbles alone (PCE) under-segments objects
  and places boundaries inside them; full supervision sees the rims.
- Gaussian noise (σ = 4) on top.

Scribbles imitate ScribbleSup's: a 2–3 px stroke along each object's medial line (the
midpoints of the region's chords perpendicular to its principal axis, inside the region
eroded by 2 px, ends trimmed), and 2–3 random smooth 2–3 px strokes in the background
(at least 3 px from any object). About 3% of the pixels are labelled at full length
(see ``tests/test_synthetic.py``). The shorter lengths '0.8', '0.5', '0.3' and '0'
(clicks) come from :func:`trainer.scribbles.shorten_scribble`.

Layout written (the ``folder`` format, SPEC §5): images/{id}.png, masks/{id}.png (train
and val), scribbles{suffix}/{id}.png for suffixes '', '0.8', '0.5', '0.3', '0',
train.txt, val.txt, classes.txt; or VOC's (``layout="voc"``: JPEGImages/, the mask and
scribble folders and split lists of SPEC §5, the 21 VOC classes, VOC-like shapes). Ids:
``train_0000``…, ``val_0000``…

Everything is a deterministic function of the arguments (numpy's PCG64 seeded with
(seed, split, index)).
"""
from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from shared.errors import UserError
from shared.image_io import write_label
from shared.labels import SCRIBBLE_SUFFIXES, UNLABELLED, scribble_length
from trainer.scribbles import shorten_scribble

VERSION = 3  # bump when the generated images change: cached copies are keyed by it
SUFFIXES = {sfx: scribble_length(sfx) for sfx in SCRIBBLE_SUFFIXES}  # suffix -> kept fraction


# --------------------------------------------------------------------------- helpers


def _erode(mask: np.ndarray, steps: int = 1, border_inside: bool = True) -> np.ndarray:
    """Binary erosion with the 3×3 square, ``steps`` times (image border counts as inside)."""
    m = mask.copy()
    for _ in range(steps):
        p = np.pad(m, 1, mode="edge" if border_inside else "constant")
        out = m.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                out &= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
        m = out
    return m


def _depth(mask: np.ndarray, max_depth: int) -> np.ndarray:
    """Chessboard distance (0 on the boundary pixels) into ``mask``, capped at ``max_depth``."""
    depth = np.full(mask.shape, max_depth, dtype=np.float32)
    cur = mask.copy()
    for d in range(max_depth):
        nxt = _erode(cur)
        depth[cur & ~nxt] = d
        cur = nxt
    depth[~mask] = 0
    return depth


def _hsv(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))) * 255


def _stripes(h, w, angle, period, amp, rng) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    return (amp * np.sin(2 * np.pi * t / period + phase)).astype(np.float32)


def _smooth_field(h, w, rng, amp, cells=4) -> np.ndarray:
    coarse = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((w, h), Image.BICUBIC)
    f = np.asarray(img, dtype=np.float32)
    return amp * f / (np.abs(f).max() + 1e-6)


def _shape_polygon(rng, cx, cy, r, kind) -> list[tuple[float, float]]:
    angle = rng.uniform(0, np.pi)
    if kind == "ellipse":
        n, a, b = 48, r, r * rng.uniform(0.45, 0.9)
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        px, py = a * np.cos(t), b * np.sin(t)
    elif kind == "blob":
        n = 48
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        rr = np.ones(n)
        for k in (2, 3, 4):
            rr += rng.uniform(0.05, 0.25) / (k - 1) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        rr *= r / rr.max()
        px, py = rr * np.cos(t) * rng.uniform(0.8, 1.0), rr * np.sin(t)
    else:  # polygon
        n = int(rng.integers(4, 8))
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        rr = r * rng.uniform(0.6, 1.0, n)
        px, py = rr * np.cos(t), rr * np.sin(t)
    ca, sa = np.cos(angle), np.sin(angle)
    return [(float(cx + x * ca - y * sa), float(cy + x * sa + y * ca)) for x, y in zip(px, py)]


def _medial_stroke(region: np.ndarray, erode: int, trim: float):
    """Points (x, y) of a line along ``region``'s medial line, or None if too small."""
    inner = region
    for e in range(erode, -1, -1):
        inner = _erode(region, e, border_inside=False) if e else region
        if inner.sum() >= 6:
            break
    ys, xs = np.nonzero(inner)
    if len(ys) < 3:
        return None
    pts = np.stack([xs, ys], 1).astype(np.float64)
    mean = pts.mean(0)
    cov = np.cov((pts - mean).T) + 1e-6 * np.eye(2)
    _, vecs = np.linalg.eigh(cov)
    axis, perp = vecs[:, 1], vecs[:, 0]
    u, v = (pts - mean) @ axis, (pts - mean) @ perp
    bins = np.round(u).astype(int)
    lo, hi = bins.min(), bins.max()
    keep_lo, keep_hi = lo + trim * (hi - lo), hi - trim * (hi - lo)
    line = []
    for b in range(lo, hi + 1):
        if b < keep_lo or b > keep_hi:
            continue
        sel = bins == b
        if sel.any():
            line.append((b, (v[sel].min() + v[sel].max()) / 2))
    if not line:
        line = [(0.0, 0.0)]
    ub = np.array([p[0] for p in line], dtype=np.float64)
    vb = np.array([p[1] for p in line], dtype=np.float64)
    if len(vb) >= 5:
        vb = np.convolve(np.pad(vb, 2, mode="edge"), np.ones(5) / 5, mode="valid")
    xy = mean + ub[:, None] * axis + vb[:, None] * perp
    return [(float(x), float(y)) for x, y in xy], inner


def _random_curve(rng, h, w, length) -> list[tuple[float, float]]:
    x, y = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    heading = rng.uniform(0, 2 * np.pi)
    pts = [(x, y)]
    for _ in range(int(length / 2)):
        heading += rng.normal(0, 0.25)
        x, y = x + 2 * np.cos(heading), y + 2 * np.sin(heading)
        pts.append((x, y))
    return pts


def _draw(h, w, pts, width) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if len(pts) == 1:
        x, y = pts[0]
        r = max(width - 1, 0) / 2
        draw.ellipse([x - r, y - r, x + r, y + r], fill=1)
    else:
        draw.line(pts, fill=1, width=width, joint="curve")
    return np.asarray(canvas) > 0


# --------------------------------------------------------------------------- one image


class _ClassStyle:
    def __init__(self, k: int, num_obj: int):
        self.hue = (k - 1) / num_obj
        self.hue_jitter = 0.45 / num_obj  # ± under half the spacing: hue alone tells the class
        self.angle = np.pi * (k - 1) / num_obj
        self.period = 5.0 + 2.0 * ((k - 1) % 3)


@dataclass(frozen=True)
class Variant:
    """What makes a synthetic set easy or hard for appearance and for edges."""

    outline: float = 0.55  # factor on object boundary pixels (1 = no outline: a weak boundary)
    clutter_outline: float = 1.0  # factor on clutter patch boundaries (< 1: strong edges that are not objects)
    radius: tuple[float, float] = (10, 24)  # object radius range at 96 px
    objects: tuple[int, int] = (1, 5)  # objects per image, [lo, hi)
    false_edges: int = 0  # dark lines across the image that are not object boundaries
    texture: float = 1.0  # factor on every stripe amplitude


VARIANTS = {
    "default": Variant(),
    # weak object boundaries, strong clutter edges, small objects, stronger textures
    "hard": Variant(outline=0.9, clutter_outline=0.5, radius=(5, 20), objects=(2, 7), false_edges=3, texture=1.6),
}


def _make_image(rng: np.random.Generator, height: int, width: int, classes: int,
                variant: Variant = VARIANTS["default"]):
    h, w = height, width
    size = min(h, w)
    s = size / 96.0
    num_obj = classes - 1
    styles = [None] + [_ClassStyle(k, num_obj) for k in range(1, classes)]

    # background: low-saturation colour, smooth shading, clutter patches
    bg_col = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.2), rng.uniform(0.35, 0.75))
    bg = np.broadcast_to(bg_col, (h, w, 3)).astype(np.float32).copy()
    bg += _smooth_field(h, w, rng, rng.uniform(10, 25))[..., None]
    for _ in range(int(rng.integers(2, 6))):
        col = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.8))
        poly = _shape_polygon(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(6, 18) * s,
                              ["ellipse", "polygon", "blob"][int(rng.integers(3))])
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon(poly, fill=1)
        m = np.asarray(canvas) > 0
        patch = np.broadcast_to(col, (h, w, 3)).astype(np.float32).copy()
        if rng.random() < 0.6:  # distractor texture: an object class's stripes
            st = styles[int(rng.integers(1, classes))]
            patch += _stripes(h, w, st.angle + rng.normal(0, 0.2), st.period, rng.uniform(6, 12) * variant.texture,
                              rng)[..., None]
        if variant.clutter_outline != 1.0:
            patch[m & ~_erode(m)] *= variant.clutter_outline
        bg[m] = patch[m]

    # objects, painted in order (later ones occlude earlier ones)
    n_obj = int(rng.integers(*variant.objects))
    label = np.zeros((h, w), np.uint8)
    owner = np.full((h, w), -1, np.int32)
    objects = []
    for i in range(n_obj):
        c = int(rng.integers(1, classes))
        st = styles[c]
        r = rng.uniform(*variant.radius) * s
        cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
        poly = _shape_polygon(rng, cx, cy, r, ["ellipse", "blob", "polygon"][int(rng.integers(3))])
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon(poly, fill=1)
        m = np.asarray(canvas) > 0
        if m.sum() < 12:
            continue
        col = _hsv(st.hue + rng.uniform(-st.hue_jitter, st.hue_jitter), rng.uniform(0.45, 0.9), rng.uniform(0.5, 0.95))
        tex = _stripes(h, w, st.angle + rng.normal(0, 0.25), st.period * rng.uniform(0.85, 1.2),
                       rng.uniform(8, 14) * variant.texture, rng)
        objects.append(dict(cls=c, col=col, tex=tex, rim=rng.uniform(6, 10) * s, blend=rng.uniform(0.85, 0.97)))
        label[m] = c
        owner[m] = len(objects) - 1

    img = bg.copy()
    regions = []
    for j, ob in enumerate(objects):
        region = owner == j
        if region.sum() < 6:
            regions.append(None)
            continue
        # the rim covers at most half of the region's depth: every object keeps a core
        # that shows its class (v2 faded small objects whole, and their class with them)
        depth = _depth(region, 2 * int(np.ceil(ob["rim"])) + 2)
        rim = max(min(ob["rim"], 0.5 * float(depth.max())), 1.0)
        beta = ob["blend"] * np.clip(1.0 - depth / rim, 0.0, 1.0)
        appearance = ob["col"][None, None, :] + ob["tex"][..., None]
        mix = (1 - beta[..., None]) * appearance + beta[..., None] * bg
        boundary = region & ~_erode(region)  # image border is not a boundary
        mix[boundary] *= variant.outline
        img[region] = mix[region]
        regions.append(region)
    for _ in range(variant.false_edges):  # across objects and background alike
        img[_draw(h, w, _random_curve(rng, h, w, rng.uniform(0.4, 0.9) * size), 1)] *= 0.5
    img += rng.normal(0, 4.0, img.shape)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    # scribbles: medial strokes in objects, random strokes in the background
    seeds = np.full((h, w), UNLABELLED, np.uint8)
    for ob, region in zip(objects, regions):
        if region is None:
            continue
        res = _medial_stroke(region, erode=max(1, int(round(2 * s))), trim=0.08)
        if res is None:
            continue
        pts, inner = res
        width = int(rng.integers(2, 4))
        stroke = _draw(h, w, pts, width) & inner
        seeds[stroke] = ob["cls"]
    free = _erode(label == 0, max(1, int(round(3 * s))), border_inside=True)
    for _ in range(int(rng.integers(2, 4))):
        pts = _random_curve(rng, h, w, rng.uniform(0.35, 0.6) * size)
        stroke = _draw(h, w, pts, int(rng.integers(2, 4))) & free & (seeds == UNLABELLED)
        seeds[stroke] = 0
    return image, label, seeds


# --------------------------------------------------------------------------- data set


# VOC's usual image shapes (short side / long side), either way up
VOC_ASPECTS = (0.75, 0.666, 0.562)


def _shape(layout: str, size: int, seed: int, split_code: int, i: int) -> tuple[int, int]:
    """(height, width): size×size, or for `voc` a VOC-like shape with long side `size`
    (from its own random stream, so the image content draws stay the same)."""
    if layout != "voc":
        return size, size
    rng = np.random.default_rng([seed, split_code, i, 1])
    short = max(32, int(round(size * VOC_ASPECTS[int(rng.integers(len(VOC_ASPECTS)))])))
    return (size, short) if rng.random() < 0.3 else (short, size)


def make_synthetic(
    out: str,
    n_train: int = 64,
    n_val: int = 32,
    size: int = 96,
    classes: int = 4,
    seed: int = 0,
    variant: str = "default",
    layout: str = "folder",
) -> dict:
    """Generate the synthetic data set into ``out``, in the ``folder`` layout (SPEC §5)
    or the ``voc`` one.

    ``folder``: ``classes`` counts the background (K ≥ 2; class names 'background',
    'class1', …); size×size images; images/, masks/ (train and val),
    scribbles{'', 0.8, 0.5, 0.3, 0}/, train.txt, val.txt, classes.txt.
    ``voc``: VOC's folders and 21 classes (each image holds a few of them), JPEG images
    of VOC-like shapes with long side ``size`` (500 for VOC's own), so that the VOC path
    (``--format voc``, ``--preset paper``) runs without VOC.
    Deterministic in its arguments. Returns a summary dict: {"train": n_train, "val":
    n_val, "classes": [...], "coverage": {suffix: fraction of labelled pixels in the
    train scribbles}}.
    """
    from trainer.formats import LAYOUTS, VOC_CLASSES

    if layout not in ("folder", "voc"):
        raise UserError(f"--layout: must be folder or voc, got {layout!r}")
    if layout == "voc":
        classes = len(VOC_CLASSES)
    if n_train < 1 or n_val < 1:
        raise UserError(f"--n-train/--n-val: must be ≥ 1, got {n_train}/{n_val}")
    if size < 32:
        raise UserError(f"--size: must be ≥ 32, got {size}")
    if variant not in VARIANTS:
        raise UserError(f"--variant: must be one of {tuple(VARIANTS)}, got {variant!r}")
    if not 2 <= classes <= 21:
        raise UserError(f"--classes: must be in 2..21, got {classes}")
    where = LAYOUTS[layout]
    mask_dirs = {split: where.mask_dirs[split] for split in ("train", "val")}
    try:
        os.makedirs(out, exist_ok=True)
        dirs = {where.image_dir, *mask_dirs["train"], *mask_dirs["val"],
                os.path.dirname(where.split_file.format(split="train")),
                *(where.scribble_dir.format(suffix=sfx) for sfx in SUFFIXES)}
        for d in dirs:
            os.makedirs(os.path.join(out, d), exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the data set folder ({exc})") from None

    names = list(where.classes or ["background"] + [f"class{k}" for k in range(1, classes)])
    counts = {sfx: 0 for sfx in SUFFIXES}
    total = 0
    for split, n, split_code in (("train", n_train, 0), ("val", n_val, 1)):
        ids = []
        for i in range(n):
            image_id = f"{split}_{i:04d}"
            rng = np.random.default_rng([seed, split_code, i])
            image, label, seeds = _make_image(rng, *_shape(layout, size, seed, split_code, i), classes,
                                              VARIANTS[variant])
            Image.fromarray(image).save(os.path.join(out, where.image_dir, image_id + where.image_exts[0]))
            for d in mask_dirs[split]:
                write_label(os.path.join(out, d, image_id + ".png"), label)
            for sfx, ratio in SUFFIXES.items():
                s = seeds if ratio == 1.0 else shorten_scribble(seeds, ratio)
                write_label(os.path.join(out, where.scribble_dir.format(suffix=sfx), image_id + ".png"), s)
                if split == "train":
                    counts[sfx] += int((s != UNLABELLED).sum())
            if split == "train":
                total += seeds.size
            ids.append(image_id)
        with open(os.path.join(out, where.split_file.format(split=split)), "w") as f:
            f.write("\n".join(ids) + "\n")
    if where.classes is None:
        with open(os.path.join(out, "classes.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    return {
        "train": n_train,
        "val": n_val,
        "classes": names,
        "coverage": {sfx: counts[sfx] / max(total, 1) for sfx in SUFFIXES},
    }
