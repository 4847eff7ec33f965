"""Scribble shortening and the ScribbleSup converter."""
import numpy as np
import pytest
from PIL import Image

from shared.errors import UserError
from shared.image_io import read_label, write_label
from trainer.scribbles import convert_scribblesup, shorten_folder, shorten_scribble


def _two_strokes():
    s = np.full((40, 60), 255, np.uint8)
    s[10:12, 5:55] = 1  # horizontal stroke, length 50, 2 px wide
    for i in range(25):  # diagonal stroke of class 0
        s[14 + i, 10 + i] = 0
    return s


def test_shorten_keeps_central_fraction():
    s = _two_strokes()
    half = shorten_scribble(s, 0.5)
    xs = np.nonzero(half == 1)[1]
    assert abs(xs.min() - 17) <= 1 and abs(xs.max() - 42) <= 1  # central 25 of 50 columns
    ys = np.nonzero(half == 0)[0]
    assert abs((ys.max() - ys.min()) - 12) <= 1 and abs(ys.mean() - 26) <= 1
    # kept pixels are a subset of the original, same classes
    kept = half != 255
    assert np.array_equal(half[kept], s[kept])
    assert np.array_equal(shorten_scribble(s, 1.0), s)


def test_shorten_lengths_monotone_and_clicks():
    s = _two_strokes()
    counts = [int((shorten_scribble(s, r) != 255).sum()) for r in (1.0, 0.8, 0.5, 0.3, 0.0)]
    assert counts[0] > counts[1] > counts[2] > counts[3] > counts[4] > 0
    click = shorten_scribble(s, 0.0)
    for c, centre in ((1, (10.5, 29.5)), (0, (26, 22))):
        ys, xs = np.nonzero(click == c)
        assert 9 <= len(ys) <= 13  # a radius-2 disk
        assert abs(ys.mean() - centre[0]) <= 1.5 and abs(xs.mean() - centre[1]) <= 1.5


def test_shorten_separates_components_per_class():
    s = np.full((20, 60), 255, np.uint8)
    s[5, 2:20] = 1
    s[5, 20:40] = 2  # touches class 1 but is another scribble
    s[15, 2:50] = 1  # second, separate scribble of class 1
    out = shorten_scribble(s, 0.0)
    assert len(np.unique(out[out != 255])) == 2
    # three clicks: three disks
    from trainer.scribbles import _components

    assert sum(len(_components(out == c)) for c in (1, 2)) == 3


def test_shorten_folder(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "o"
    src.mkdir()
    write_label(str(src / "a.png"), _two_strokes())
    assert shorten_folder(str(src), str(dst), 0.3) == 1
    out = read_label(str(dst / "a.png"), 255)
    assert 0 < (out != 255).sum() < (_two_strokes() != 255).sum()
    with pytest.raises(UserError, match="missing"):
        shorten_folder(str(tmp_path / "missing"), str(dst), 0.5)


XML = """<?xml version="1.0"?>
<annotation>
  <filename>2007_000032.jpg</filename>
  <folder>VOC2012</folder>
  <size><width>60</width><height>40</height></size>
  <polygon>
    <tag>aeroplane</tag>
    <point><X>5</X><Y>10</Y></point>
    <point><X>50</X><Y>10</Y></point>
  </polygon>
  <polygon>
    <tag>background</tag>
    <point><X>5</X><Y>30</Y></point>
    <point><X>30</X><Y>35</Y></point>
    <point><X>80</X><Y>35</Y></point>
  </polygon>
  <object><name>tvmonitor</name>
    <polygon><point><X>40</X><Y>20</Y></point><point><X>45</X><Y>25</Y></point></polygon>
  </object>
</annotation>
"""


def test_convert_scribblesup(tmp_path):
    src, out = tmp_path / "xml", tmp_path / "png"
    src.mkdir()
    (src / "2007_000032.xml").write_text(XML)
    assert convert_scribblesup(str(src), str(out), width=3) == 1
    lab = read_label(str(out / "2007_000032.png"), 21)
    assert lab.shape == (40, 60)
    assert Image.open(out / "2007_000032.png").mode == "P"
    assert set(np.unique(lab)) == {0, 1, 20, 255}
    assert (lab[9:12, 6:49] == 1).all() and (lab[13, :] == 255).all()
    assert lab[35, 59] == 0  # clipped to the image
    assert 0.02 < (lab != 255).mean() < 0.2


def test_convert_scribblesup_errors(tmp_path):
    src = tmp_path / "xml"
    src.mkdir()
    (src / "bad_class.xml").write_text(XML.replace("aeroplane", "spaceship"))
    with pytest.raises(UserError, match="bad_class.xml.*spaceship"):
        convert_scribblesup(str(src), str(tmp_path / "o"))
    (src / "bad_class.xml").unlink()
    (src / "broken.xml").write_text("<annotation><polygon>")
    with pytest.raises(UserError, match="broken.xml"):
        convert_scribblesup(str(src), str(tmp_path / "o"))
    (src / "broken.xml").unlink()
    (src / "huge.xml").write_text(XML.replace("<width>60</width>", "<width>2000000</width>"))
    with pytest.raises(UserError, match="huge.xml.*outside"):  # not a 2-million-pixel-wide canvas
        convert_scribblesup(str(src), str(tmp_path / "o"))
