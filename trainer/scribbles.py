"""Scribble tools (SPEC §5): shortening scribbles and converting ScribbleSup annotations.

Pure numpy + PIL (no scipy).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import deque

import numpy as np
from PIL import Image, ImageDraw

from shared.errors import UserError
from shared.image_io import read_label, write_label
from shared.labels import UNLABELLED
from trainer.formats import VOC_CLASSES

CLICK_RADIUS = 2  # pixels: r = 0 gives a disk of this radius at each scribble's centre

_N8 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a boolean mask, as lists of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        comp, queue = [], deque([(int(y0), int(x0))])
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for dy, dx in _N8:
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(comp)
    return comps


def _geodesic(pixels: set, start: tuple[int, int]) -> dict:
    """BFS distance (8-connected steps) from ``start`` within ``pixels``; also parents."""
    dist, parent = {start: 0}, {start: None}
    queue = deque([start])
    while queue:
        p = queue.popleft()
        for dy, dx in _N8:
            q = (p[0] + dy, p[1] + dx)
            if q in pixels and q not in dist:
                dist[q] = dist[p] + 1
                parent[q] = p
                queue.append(q)
    return dist, parent


def shorten_scribble(seeds: np.ndarray, ratio: float) -> np.ndarray:
    """Keep, for each connected scribble, the central fraction ``ratio`` of its length.

    ``seeds``: H×W uint8 (class id, 255 = unlabelled). A connected scribble is an
    8-connected component of one class's pixels. Its length is measured along the
    stroke: a BFS from any pixel finds an end ``a`` (the farthest pixel), a BFS from
    ``a`` gives every pixel's geodesic distance d to it, and the length L = max d. The
    pixels with d in [(1−r)/2·L, (1+r)/2·L] are kept (at least the centre pixel).
    ``ratio`` 0 gives a click: a disk of radius ``CLICK_RADIUS`` (2 px) around the centre
    of the stroke (the midpoint of the geodesic path from ``a`` to the far end), drawn
    only on pixels that are not another class's seeds. ``ratio`` ≥ 1 returns a copy.
    """
    seeds = np.asarray(seeds, dtype=np.uint8)
    if ratio >= 1:
        return seeds.copy()
    if ratio < 0:
        raise UserError(f"scribble ratio: must be in [0, 1], got {ratio}")
    h, w = seeds.shape
    out = np.full_like(seeds, UNLABELLED)
    disks = []
    for c in np.unique(seeds):
        if c == UNLABELLED:
            continue
        for comp in _components(seeds == c):
            pixels = set(comp)
            d0, _ = _geodesic(pixels, comp[0])
            a = max(d0, key=d0.get)
            dist, parent = _geodesic(pixels, a)
            b = max(dist, key=dist.get)
            length = dist[b]
            # centre: the midpoint of the geodesic path a → b
            centre, steps = b, length - length // 2
            for _ in range(steps):
                centre = parent[centre]
            if ratio == 0:
                disks.append((int(c), centre))
                continue
            lo, hi = (1 - ratio) / 2 * length, (1 + ratio) / 2 * length
            kept = [p for p in comp if lo <= dist[p] <= hi] or [centre]
            ys, xs = zip(*kept)
            out[np.array(ys), np.array(xs)] = c
    if disks:
        yy, xx = np.mgrid[0:h, 0:w]
        for c, (cy, cx) in disks:
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= CLICK_RADIUS**2
            disk &= (seeds == UNLABELLED) | (seeds == c)
            out[disk & (out == UNLABELLED)] = c
    return out


def shorten_folder(src: str, out: str, ratio: float) -> int:
    """Shorten every scribble PNG of folder ``src`` into folder ``out`` (same names).

    Returns the number of files written. Labels are read as grey/palette PNGs (any value
    < 255 is a class) and written as VOC-palette PNGs.
    """
    if not os.path.isdir(src):
        raise UserError(f"{src}: scribble folder not found")
    names = sorted(n for n in os.listdir(src) if n.lower().endswith(".png"))
    if not names:
        raise UserError(f"{src}: no PNG files")
    os.makedirs(out, exist_ok=True)
    for name in names:
        seeds = read_label(os.path.join(src, name), UNLABELLED)
        write_label(os.path.join(out, name), shorten_scribble(seeds, ratio))
    return len(names)


def _text(elem, tag: str):
    child = elem.find(tag)
    return None if child is None or child.text is None else child.text.strip()


MAX_SIDE = 8192  # a <size> beyond this is a broken file, not an image (VOC's are ≤ 500)


def convert_scribblesup(src_dir: str, out_dir: str, width: int = 3, images_dir: str | None = None) -> int:
    """Convert ScribbleSup's original annotations (one XML file per image) to label PNGs.

    Supported format (ScribbleSup's ``pascal_2012`` annotations; element names are
    case-sensitive)::

        <annotation>
          <filename>2007_000032.jpg</filename>
          <size><width>500</width><height>281</height></size>
          <polygon>
            <tag>aeroplane</tag>
            <point><X>104</X><Y>78</Y></point>
            <point><X>375</X><Y>183</Y></point> …
          </polygon> …
        </annotation>

    Each ``<polygon>`` is an open polyline (a scribble) of class ``<tag>``. The
    VOC-object variant ``<object><name>cls</name><polygon><point>…</point></polygon></object>``
    is accepted too. Class names map to VOC ids ('background' → 0 … 'tvmonitor' → 20;
    case-insensitive); an unknown name is a UserError naming the file. When ``<size>`` is
    absent the size is read from ``images_dir``/{stem}.jpg|.png.

    Output: ``out_dir``/{stem}.png, a VOC-palette PNG with 255 = unlabelled, each polyline
    drawn with PIL ``ImageDraw.line`` at ``width`` px (joint="curve"; a single point is a
    disk of diameter ``width``). Coordinates are clipped to the image. Polylines are drawn
    in file order (a later one overwrites an earlier one where they cross). Returns the
    number of files written.
    """
    if not os.path.isdir(src_dir):
        raise UserError(f"{src_dir}: ScribbleSup annotation folder not found")
    names = sorted(n for n in os.listdir(src_dir) if n.lower().endswith(".xml"))
    if not names:
        raise UserError(f"{src_dir}: no .xml annotation files")
    if width < 1:
        raise UserError(f"width: must be ≥ 1, got {width}")
    class_ids = {n.lower(): i for i, n in enumerate(VOC_CLASSES)}
    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        path = os.path.join(src_dir, name)
        stem = os.path.splitext(name)[0]
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as exc:
            raise UserError(f"{path}: cannot parse ScribbleSup XML ({exc})") from None
        size = root.find("size")
        try:
            if size is not None:
                w, h = int(float(_text(size, "width"))), int(float(_text(size, "height")))
            elif images_dir is not None:
                img_path = next(
                    (os.path.join(images_dir, stem + e) for e in (".jpg", ".jpeg", ".png")
                     if os.path.isfile(os.path.join(images_dir, stem + e))), None)
                if img_path is None:
                    raise UserError(f"{path}: no <size> and no image {stem}.jpg in {images_dir}")
                with Image.open(img_path) as im:
                    w, h = im.size
            else:
                raise UserError(f"{path}: no <size> element (pass images_dir to read the image size)")
        except (TypeError, ValueError):
            raise UserError(f"{path}: bad <size> element") from None
        if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
            raise UserError(f"{path}: <size> {w}×{h} is outside 1..{MAX_SIDE} pixels a side")
        strokes = []  # (class id, [(x, y), …])
        items = [(p, _text(p, "tag")) for p in root.iter("polygon") if p.find("tag") is not None]
        for obj in root.iter("object"):
            for p in obj.iter("polygon"):
                items.append((p, _text(obj, "name")))
        for poly, cname in items:
            if cname is None or cname.lower() not in class_ids:
                raise UserError(f"{path}: unknown class name {cname!r} (expected a VOC class)")
            pts = []
            for pt in poly.iter("point"):
                try:
                    x, y = float(_text(pt, "X")), float(_text(pt, "Y"))
                except (TypeError, ValueError):
                    raise UserError(f"{path}: bad <point> (needs numeric <X> and <Y>)") from None
                pts.append((min(max(x, 0), w - 1), min(max(y, 0), h - 1)))
            if pts:
                strokes.append((class_ids[cname.lower()], pts))
        canvas = Image.new("L", (w, h), UNLABELLED)
        draw = ImageDraw.Draw(canvas)
        for cid, pts in strokes:
            if len(pts) == 1:
                (x, y), r = pts[0], (width - 1) / 2
                draw.ellipse([x - r, y - r, x + r, y + r], fill=cid)
            else:
                draw.line(pts, fill=cid, width=width, joint="curve")
        write_label(os.path.join(out_dir, stem + ".png"), np.asarray(canvas))
    return len(names)
