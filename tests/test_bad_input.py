"""Bad input ends with a non-zero exit and one line `error: …` naming the file or option,
before Ray starts; an image without any scribble is trained on and reported."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.helpers import cli_in_process, run_cli

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def dataset(synthetic_set):
    return synthetic_set(4, 2, 48)


@pytest.fixture
def data(dataset, tmp_path):
    """A fresh copy of the data set, to break."""
    root = str(tmp_path / "data")
    shutil.copytree(dataset, root)
    return root


def _train_ids(root):
    with open(os.path.join(root, "train.txt")) as f:
        return [ln.strip() for ln in f if ln.strip()]


def _assert_one_line_error(proc, *names):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def _train(root, tmp_path, *extra):
    return cli_in_process("train", "--data", root, "--method", "pce", "--epochs", 1, "--out", tmp_path / "out", *extra)


def test_missing_scribble(data, tmp_path):
    path = os.path.join(data, "scribbles", _train_ids(data)[1] + ".png")
    os.remove(path)
    _assert_one_line_error(_train(data, tmp_path), path)


def test_label_not_below_k(data, tmp_path):
    path = os.path.join(data, "scribbles", _train_ids(data)[0] + ".png")
    seeds = np.asarray(Image.open(path)).copy()
    seeds[0, :5] = 7  # K = 4; 7 is neither a class nor 255
    Image.fromarray(seeds, mode="L").save(path)
    line = _assert_one_line_error(_train(data, tmp_path), path)
    assert "7" in line


def test_image_scribble_size_mismatch(data, tmp_path):
    path = os.path.join(data, "scribbles", _train_ids(data)[2] + ".png")
    Image.open(path).resize((40, 48), Image.NEAREST).save(path)
    _assert_one_line_error(_train(data, tmp_path), path)


def test_truncated_image(data, tmp_path):
    path = os.path.join(data, "images", _train_ids(data)[3] + ".png")
    with open(path, "rb") as f:
        head = f.read()
    with open(path, "wb") as f:
        f.write(head[: len(head) // 2])
    _assert_one_line_error(_train(data, tmp_path), path)


def test_truncated_jpeg_is_named_before_ray_starts(data, tmp_path):
    """Its header reads: only a full decode finds it (training would, inside a worker)."""
    image_id = _train_ids(data)[2]
    png = os.path.join(data, "images", image_id + ".png")
    path = png[:-4] + ".jpg"
    Image.open(png).convert("RGB").save(path, quality=95)
    os.remove(png)
    with open(path, "rb") as f:
        head = f.read()
    with open(path, "wb") as f:
        f.write(head[: len(head) * 2 // 3])
    line = _assert_one_line_error(_train(data, tmp_path), path)
    assert "truncated" in line


def test_an_image_past_pillows_pixel_limit_is_named(data, monkeypatch):
    """Image.DecompressionBombError is no OSError: it would surface without the file's name."""
    from shared.errors import UserError
    from trainer.splits import check_samples, load_split

    samples = load_split(data, "synthetic", "train")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 48 * 48 // 3)  # the images are 48×48: past twice the limit
    with pytest.raises(UserError, match=f"{samples[0].image_path}: .*decompression bomb"):
        check_samples(samples, 4)
    from shared.image_io import read_image

    with pytest.raises(UserError, match=f"{samples[0].image_path}: image: .*decompression bomb"):
        read_image(samples[0].image_path)


def test_empty_split_file(data, tmp_path):
    path = os.path.join(data, "train.txt")
    open(path, "w").close()
    _assert_one_line_error(_train(data, tmp_path), path)


def test_missing_classes_file(data, tmp_path):
    path = os.path.join(data, "classes.txt")
    os.remove(path)
    _assert_one_line_error(_train(data, tmp_path), path)


def test_garbage_init_checkpoint(data, tmp_path):
    path = str(tmp_path / "garbage.pt")
    with open(path, "wb") as f:
        f.write(os.urandom(4096))
    _assert_one_line_error(_train(data, tmp_path, "--init", path), path)


def test_pickled_code_init_checkpoint_is_refused(data, tmp_path):
    """weights_only=True: a checkpoint that would run code on load is an error, not an exploit."""
    import torch

    path, marker = str(tmp_path / "evil.pt"), tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil(), "num_classes": 4}, path)
    _assert_one_line_error(_train(data, tmp_path, "--init", path), path)
    assert not marker.exists()


@pytest.mark.parametrize("option, value", [("--epochs", 0), ("--solvers", 0), ("--eval-every", 0), ("--eps", 5),
                                           ("--eps", 0.76), ("--nu", -1), ("--scribbles", 0.25),
                                           ("--max-image-pixels", 0), ("--seed", -1)])
def test_bad_option(data, tmp_path, option, value):
    _assert_one_line_error(_train(data, tmp_path, option, value), option)


def test_missing_data_path(tmp_path):
    """The one case run as a user runs it (the others in process): `python -m trainer`."""
    missing = str(tmp_path / "no_such_data")
    proc = run_cli("train", "--data", missing, "--method", "pce", "--epochs", 1, "--out", tmp_path / "out")
    _assert_one_line_error(proc, "--data", missing)


def test_debug_shows_the_traceback(data, tmp_path):
    os.remove(os.path.join(data, "classes.txt"))
    proc = cli_in_process("--debug", "train", "--data", data, "--method", "pce", "--epochs", 1, "--out", tmp_path / "out")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_blank_scribble_file_means_every_label_in_stage_a():
    """An image without scribbles is trained on (tests/test_pipeline.py's sync run has one):
    stage A considers every label for it."""
    from shared import shards

    assert shards.label_set(np.full((48, 48), 255, np.uint8), 4).tolist() == [0, 1, 2, 3]


def test_toml_values_are_type_checked(data, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('batch_size = "8"\n')
    _assert_one_line_error(_train(data, tmp_path, "--config", config), "batch_size", "int")


def test_predict_refuses_inputs_that_would_overwrite_each_other(data, tmp_path):
    """Two images named a.png in different folders would both write OUT/a.png."""
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / d / "a.png")
    ckpt = tmp_path / "c.pt"
    import torch

    from trainer.architectures import build_model

    torch.save({"model": build_model("unet", 4).state_dict(), "num_classes": 4, "arch": "unet"}, ckpt)
    proc = cli_in_process("predict", "--checkpoint", ckpt, tmp_path / "x" / "a.png", tmp_path / "y" / "a.png",
                   "--out", tmp_path / "preds")
    _assert_one_line_error(proc, "a.png")
    assert not (tmp_path / "preds").exists()


def test_non_finite_network_output_names_the_image(data, tmp_path):
    """NaN would quantise to −log q = 0 (q = 1 for every label): stage A must never see it."""
    import torch

    from shared.errors import UserError
    from shared.shard_store import ShardStore, parts_of
    from trainer.datasets import EvalSet
    from trainer.splits import load_split
    from trainer.stage_a import write_snapshot_round

    class Diverged(torch.nn.Module):
        def forward_lowres(self, x):
            return torch.full((x.shape[0], 4, *x.shape[2:]), float("nan"))

    samples = load_split(data, "synthetic", "train")
    with pytest.raises(UserError, match=samples[0].image_id):
        write_snapshot_round(Diverged(), EvalSet(samples, 4), samples, store=ShardStore(str(tmp_path / "s")), r=0,
                             parts=parts_of(len(samples), 2), restrict_labels=True, device=torch.device("cpu"))


def test_image_over_the_size_cap_is_named(data, tmp_path):
    proc = _train(data, tmp_path, "--max-image-pixels", 48 * 47)  # the images are 48×48
    _assert_one_line_error(proc, "--max-image-pixels", os.path.join(data, "images"))
