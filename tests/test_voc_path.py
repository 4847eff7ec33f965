"""The VOC path without VOC: `make-synthetic --layout voc` writes VOC's folders, classes
and image shapes, and `--preset paper` trains Grid-TR on it end to end (a tiny budget)."""
import json
import os

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image

from tests.helpers import majority_class_miou, run_cli
from trainer.model import MobileNetV2Backbone


@pytest.mark.slow
def test_paper_preset_runs_end_to_end_on_a_voc_shaped_set(tmp_path):
    data, out = str(tmp_path / "VOC"), str(tmp_path / "run")
    run_cli("make-synthetic", "--layout", "voc", "--out", data, "--n-train", "4", "--n-val", "2", "--size", "160",
            check=True)
    ids = open(os.path.join(data, "ImageSets", "SegmentationAug", "train.txt")).read().split()
    shapes = {Image.open(os.path.join(data, "JPEGImages", f"{i}.jpg")).size for i in ids}
    assert len(ids) == 4 and all(max(s) == 160 and min(s) < 160 for s in shapes)
    present = [np.unique(np.asarray(Image.open(os.path.join(data, "SegmentationClassAug", f"{i}.png")))) for i in ids]
    assert all(len(p) < 8 for p in present) and max(int(p.max()) for p in present) < 21  # a few of 21 classes
    assert os.path.exists(os.path.join(data, "SegmentationClass", "val_0000.png"))
    assert os.path.exists(os.path.join(data, "pascal_2012_scribble0.5", f"{ids[0]}.png"))

    weights = str(tmp_path / "mobilenet_v2.pth")  # the paper preset trains from ImageNet weights: a stand-in
    torch.save(MobileNetV2Backbone().state_dict(), weights)
    run_cli("--local", "train", "--data", data, "--format", "voc", "--preset", "paper", "--method", "grid-tr",
            "--backbone-weights", weights,
            "--scribbles", "0.5", "--epochs", "2", "--pretrain-epochs", "1", "--epochs-per-round", "1",
            "--batch-size", "2", "--crop-size", "128", "--out", out, check=True)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["proposals_missing"] == 0 and summary["stage_a_images"] == 4 * 2
    assert 0 <= summary["val_miou"] <= 1 and len(summary["per_class_iou"]) == 21
    # stage A's labels beat the trivial baseline (the network's val mIoU, after three
    # epochs of an untrained DeepLabV3+ on 4 images, need not)
    rounds = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    proposal_miou = [r["proposal_miou"] for r in rounds if "proposal_miou" in r]
    baseline = majority_class_miou(data, "voc", 21, "0.5")
    assert len(proposal_miou) == 2 and min(proposal_miou) > baseline + 0.1, (proposal_miou, baseline)
    cfg = tomllib.loads(open(os.path.join(out, "config.toml")).read())
    assert (cfg["arch"], cfg["batch_average"], cfg["schedule"], cfg["lr"], cfg["eps"]) == (
        "deeplabv3plus-mobilenetv2-ref", True, "sync", 7e-4, 0.9514)
    assert cfg["crop_size"] == 128 and cfg["solver"]["tr_weight"] == 0.1  # flags win over the preset
