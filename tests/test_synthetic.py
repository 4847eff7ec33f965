"""The synthetic data set: layout, determinism, scribble coverage at each length."""
import hashlib
import os
import time

import numpy as np
import pytest
from PIL import Image

from shared.errors import UserError

from shared.image_io import read_image, read_label
from trainer.splits import check_samples, load_split, read_classes
from trainer.synthetic import make_synthetic

SUFFIXES = ["", "0.8", "0.5", "0.3", "0"]


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            h.update(os.path.relpath(p, root).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "a"
    summary = make_synthetic(str(root), n_train=16, n_val=6, size=96, classes=4, seed=3)
    return str(root), summary


def test_layout_and_loading(synth):
    root, summary = synth
    assert read_classes(root, "synthetic") == ["background", "class1", "class2", "class3"]
    for sfx in SUFFIXES:
        train = load_split(root, "synthetic", "train", sfx)
        assert len(train) == 16 and all(s.mask_path for s in train)
        check_samples(train, 4)
    val = load_split(root, "synthetic", "val")
    assert len(val) == 6
    check_samples(val, 4)
    img = read_image(train[0].image_path)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    # every object class appears somewhere; objects and background both present
    present = set()
    for s in train:
        present |= set(np.unique(read_label(s.mask_path, 4)).tolist())
    assert present == {0, 1, 2, 3}


def test_deterministic(synth, tmp_path):
    root, _ = synth
    make_synthetic(str(tmp_path / "b"), n_train=16, n_val=6, size=96, classes=4, seed=3)
    assert _digest(root) == _digest(str(tmp_path / "b"))
    make_synthetic(str(tmp_path / "c"), n_train=16, n_val=6, size=96, classes=4, seed=4)
    assert _digest(root) != _digest(str(tmp_path / "c"))


def test_scribble_coverage_and_lengths(synth):
    root, summary = synth
    cov = summary["coverage"]
    assert 0.015 <= cov[""] <= 0.05
    assert cov[""] > cov["0.8"] > cov["0.5"] > cov["0.3"] > cov["0"] > 0
    # the summary agrees with the files, and scribbles agree with the masks
    train = load_split(root, "synthetic", "train")
    labelled = wrong = 0
    for s in train:
        seeds = read_label(s.seeds_path, 4)
        mask = read_label(s.mask_path, 4)
        labelled += (seeds != 255).sum()
        wrong += ((seeds != 255) & (seeds != mask)).sum()
        assert set(np.unique(seeds[seeds != 255])) == set(np.unique(mask))  # every class scribbled
    assert labelled / (16 * 96 * 96) == pytest.approx(cov[""])
    assert wrong == 0


def test_other_sizes(tmp_path):
    s = make_synthetic(str(tmp_path / "d"), n_train=2, n_val=1, size=64, classes=3, seed=1)
    assert s["classes"] == ["background", "class1", "class2"]
    assert read_image(str(tmp_path / "d" / "images" / "val_0000.png")).shape == (64, 64, 3)


def test_hard_variant_is_deterministic_and_harder(tmp_path):
    """Weak outlines, more and smaller objects, false edges; the default set is unchanged by it."""
    from trainer.synthetic import make_synthetic

    a = make_synthetic(str(tmp_path / "a"), n_train=6, n_val=1, variant="hard")
    make_synthetic(str(tmp_path / "b"), n_train=6, n_val=1, variant="hard")
    make_synthetic(str(tmp_path / "d"), n_train=6, n_val=1)
    hard = [np.asarray(Image.open(tmp_path / "a" / "masks" / f"train_{i:04d}.png")) for i in range(6)]
    again = [np.asarray(Image.open(tmp_path / "b" / "masks" / f"train_{i:04d}.png")) for i in range(6)]
    easy = [np.asarray(Image.open(tmp_path / "d" / "masks" / f"train_{i:04d}.png")) for i in range(6)]
    assert all((x == y).all() for x, y in zip(hard, again))
    assert not all((x == y).all() for x, y in zip(hard, easy))
    assert 0.01 < a["coverage"][""] < 0.06
    with pytest.raises(UserError, match="--variant"):
        make_synthetic(str(tmp_path / "c"), n_train=1, n_val=1, variant="nope")


def test_the_cached_set_appears_whole_and_replaces_a_half_made_one(tmp_path, monkeypatch):
    """experiments.default_job.synthetic_dataset: two commands at once on a fresh machine
    (two processes here) end with one whole set and no temporary folder; a set an
    interrupted older version left without its `.complete` is made again."""
    import multiprocessing

    from experiments.default_job import synthetic_dataset

    monkeypatch.setenv("TRSEG_CACHE", str(tmp_path))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        pending = pool.starmap_async(synthetic_dataset, [(4, 2, 32)] * 2)
        half_seen = []
        while not pending.ready():  # no reader may ever find the set's folder without `.complete`
            for name in os.listdir(tmp_path):
                if ".tmp-" not in name and not os.path.exists(tmp_path / name / ".complete"):
                    half_seen.append(name)
            time.sleep(0.005)
        roots = pending.get()
    assert not half_seen
    assert roots[0] == roots[1] and os.listdir(tmp_path) == [os.path.basename(roots[0])]
    made = sorted(os.listdir(os.path.join(roots[0], "images")))
    assert len(made) == 6 and os.path.exists(os.path.join(roots[0], ".complete"))
    os.remove(os.path.join(roots[0], ".complete"))
    os.remove(os.path.join(roots[0], "images", made[0]))  # half made
    assert synthetic_dataset(4, 2, 32) == roots[0]
    assert sorted(os.listdir(os.path.join(roots[0], "images"))) == made and os.listdir(tmp_path) == [os.path.basename(roots[0])]
