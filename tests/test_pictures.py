"""comparison.png, curves.png and `report`, on run folders made by hand (an untrained
and a trained-for-a-moment network, real stage A on the val images): no Ray."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import to_dict
from trainer.architectures import build_model
from trainer.config import TrainConfig
from trainer.runlog import checkpoint_bytes
from trainer.tomlio import dumps
from trainer.visualize import TILE, column_boxes, tile_side
from experiments.pictures import N_IMAGES
from experiments.report import report
from tests.helpers import cli_in_process


def _run_folder(path, data: str, method: str, seed: int, records: list[dict], init: str | None = None) -> str:
    os.makedirs(path / "checkpoints")
    torch.manual_seed(seed)
    net = build_model("unet", 4)
    with torch.no_grad():  # two networks that predict differently
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    (path / "checkpoints" / "last.pt").write_bytes(checkpoint_bytes({"model": net.state_dict(), "num_classes": 4, "arch": "unet"}))
    cfg = TrainConfig(data=data, method=method, arch="unet", epochs=len(records), out=str(path), init=init)
    (path / "config.toml").write_text(dumps(to_dict(cfg)))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def job(tmp_path_factory, synthetic_set):
    data = synthetic_set(4, 4, 32)
    out = tmp_path_factory.mktemp("job")
    evals = [{"phase": "pce", "epoch": e, "loss": 1.0, "val_miou": 0.3 + 0.1 * e} for e in (1, 2)]
    _run_folder(out / "pce-init", data, "pce", 0, evals)
    init = str(out / "pce-init" / "checkpoints" / "last.pt")
    _run_folder(out / "pce", data, "pce", 1, evals, init)
    tr = [{"phase": "grid-tr", "epoch": e, "loss": 1.0, "val_miou": 0.5 + 0.1 * e, "round": 0,
           "proposal_miou": 0.8, "proposal_changed": 0.1, **({"snapshot_images": 4, "snapshot_s": 0.5} if e == 1 else {})}
          for e in (1, 2)]
    _run_folder(out / "grid-tr", data, "grid-tr", 2, tr, init)
    return out


def test_report_writes_both_pictures_and_tells_the_story(job):
    lines = report(str(job))
    text = "\n".join(lines)
    assert "grid-tr, not finished: 2 of 2 epochs" in text  # no summary.json
    assert "val mIoU: last 70.0 (epoch 2), best 70.0 (epoch 2)" in text
    assert "stage-A round 0 (from epoch 1): 10.0% of labels changed from the network, mIoU vs masks 80.0" in text
    assert (job / "comparison.png").exists() and (job / "curves.png").exists()
    assert f"pictures: {job / 'comparison.png'}" in text


def test_comparison_has_readable_titled_columns_that_differ(job):
    report(str(job))
    picture = np.asarray(Image.open(job / "comparison.png").convert("RGB"))
    side = tile_side([[np.zeros((32, 32, 3))]])
    assert side >= TILE
    boxes = column_boxes(5, N_IMAGES, side)  # image + scribbles, proposal, PCE-GD, Grid-TR, truth
    assert picture.shape[0] > boxes[-1][-1][3] and picture.shape[1] > boxes[0][-1][2]
    columns = [np.stack([picture[y0:y1, x0:x1] for x0, y0, x1, y1 in (row[j] for row in boxes)]) for j in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not np.array_equal(columns[i], columns[j]), f"columns {i} and {j} are the same"
    # ground truth upscaled by nearest neighbour: only the classes' colours (and no blur between them)
    assert len(np.unique(columns[4].reshape(-1, 3), axis=0)) <= 4
    title_band = picture[:boxes[0][0][1]]
    assert (title_band < 128).any(), "no column titles drawn"


def test_curves_png_is_a_picture(job):
    report(str(job))
    with Image.open(job / "curves.png") as im:
        assert im.size[0] >= 500 and im.size[1] >= 300


def test_report_command_refuses_a_folder_that_is_no_run(tmp_path):
    res = cli_in_process("report", tmp_path)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}: not a run folder (no config.toml) nor a default job's (no pce-init, pce, grid-tr)")
