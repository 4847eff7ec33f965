"""Table 1 on VOC as a user launches it (issue 27): ImageNet weights by name through
torch's hub cache (never downloaded here), the paper preset refused without them, the
plan of every cell. (The paper's Grid-TR trains end to end on the VOC layout in
tests/test_benchmarks.py's smoke run of benchmarks/gpu_voc.py; Table 1's cells train
their planned configuration in tests/test_table1.py.)"""
import json
import os
import tomllib
import urllib.error
import urllib.request

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from experiments import table1
from trainer.presets import check_start
from shared.errors import UserError
from tests.helpers import cli_in_process
from trainer import imagenet
from trainer.cli import main
from trainer.model import DeepLabV3Plus, MobileNetV2Backbone, load_backbone_weights


def _imagenet_file(path) -> dict:
    """A state_dict with torchvision mobilenet_v2's keys (features.* and classifier.*)."""
    torch.manual_seed(1)
    sd = {**MobileNetV2Backbone().state_dict(), "classifier.1.weight": torch.randn(1000, 1280),
          "classifier.1.bias": torch.zeros(1000)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(sd, path)
    return sd


@pytest.fixture
def no_download(monkeypatch):
    """Any download attempt fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the test suite must not download")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds the ImageNet file (a local stand-in)."""
    home = tmp_path_factory.mktemp("torch_home")
    sd = _imagenet_file(os.path.join(home, "hub", "checkpoints", os.path.basename(imagenet.URL)))
    return str(home), sd


@pytest.fixture(scope="module")
def voc_set(tmp_path_factory):
    from trainer.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("voc") / "voc"
    make_synthetic(str(root), n_train=8, n_val=4, size=64, seed=0, layout="voc")
    return str(root)


def _fail_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_imagenet_by_name_from_torch_cache(torch_home, monkeypatch, no_download):
    home, sd = torch_home
    monkeypatch.setenv("TORCH_HOME", home)
    assert imagenet.cache_path() == os.path.join(home, "hub", "checkpoints", "mobilenet_v2-b0353104.pth")
    net = DeepLabV3Plus(21)
    load_backbone_weights(net, "imagenet")
    got = net.backbone.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in got)


def test_imagenet_offline_is_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(UserError) as exc:
        imagenet.imagenet_state_dict()
    msg = str(exc.value)
    assert "\n" not in msg and imagenet.URL in msg and imagenet.cache_path() in msg
    assert "--backbone-weights PATH" in msg and "name resolution" in msg


def test_imagenet_download_checks_the_hash(tmp_path, monkeypatch):
    """torch's download with the hash prefix of the file's name: a file that is not
    torchvision's (served from disk instead of the network) is refused and not cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    fake = tmp_path / "served.pth"
    _imagenet_file(str(fake))
    monkeypatch.setattr(torch.hub, "urlopen", lambda req: urllib.request.urlopen(fake.as_uri()))
    with pytest.raises(UserError, match="invalid hash value"):
        imagenet.imagenet_state_dict()
    assert not os.path.exists(imagenet.cache_path())


@pytest.mark.parametrize("command", ["train", "table1", "sweep-tr-weight", "tune"])
def test_paper_preset_without_weights_is_refused_before_ray(command, voc_set, tmp_path, capsys):
    argv = ["--local", command, "--preset", "paper", "--data", voc_set, "--format", "voc", "--out", str(tmp_path / "o")]
    argv += ["--method", "grid-tr"] if command in ("train", "tune") else []
    line = _fail_line(capsys, argv)
    assert line.startswith("error: --preset paper:") and "--backbone-weights" in line
    assert not ray.is_initialized() and not (tmp_path / "o").exists()
    check_start("paper", None, "ckpt.pt")  # --init is a start too (train, tune)
    with pytest.raises(UserError, match="or --init CKPT"):
        check_start("paper", None, None, takes_init=True)


def test_missing_weights_file_is_one_line(voc_set, tmp_path, capsys):
    line = _fail_line(capsys, ["--local", "table1", "--preset", "paper", "--data", voc_set, "--format", "voc",
                               "--backbone-weights", str(tmp_path / "none.pth"), "--out", str(tmp_path / "o")])
    assert line.startswith("error: --backbone-weights: no such file") and not ray.is_initialized()


def _plan(out, voc_set, *extra):
    main(["--local", "table1", "--preset", "paper", "--data", voc_set, "--format", "voc",
          "--backbone-weights", "imagenet", "--plan", "--out", str(out), *extra])


def _cells(out) -> dict:
    return {d: tomllib.loads((out / d / "config.toml").read_text()) for d in os.listdir(out)
            if (out / d / "config.toml").exists()}


def test_table1_paper_plan_is_every_cell_as_the_authors_ran_it(voc_set, torch_home, tmp_path, monkeypatch, capsys,
                                                                no_download):
    """Item 4 of issue 27, field by field, from the plan's config.toml files (SPEC §4)."""
    monkeypatch.setenv("TORCH_HOME", torch_home[0])
    out = tmp_path / "plan"
    _plan(out, voc_set)
    printed = capsys.readouterr().out
    assert not ray.is_initialized() and "nothing trained" in printed
    cells = _cells(out)
    expected = {"full"} | {f"{m}-{L}" for m in ("pce", "dense-gd", "grid-gd", "grid-tr") for L in table1.LENGTHS}
    assert set(cells) == expected  # no same-budget control: not a cell of the paper's table
    eps_lam = {"1": (0.944, 0.05), "0.8": (0.946, 0.075), "0.5": (0.9514, 0.1), "0.3": (0.9516, 0.1),
               "0": (0.9522, 0.1)}
    for name, c in cells.items():
        assert not (out / name / "summary.json").exists() and not (out / name / "run.json").exists()
        common = (c["epochs"], c["batch_size"], c["crop_size"], c["optimizer"], c["momentum"], c["weight_decay"],
                  c["arch"], c["augmentation"], c["batch_average"])
        assert common == (60, 12, 513, "sgd", 0.9, 5e-4, "deeplabv3plus-mobilenetv2-ref", "reference", True), name
        assert c["drop_last"] is False and c.get("seed_loss") == "ce" and c["precision"] == "fp32", name
        method = c["method"]
        if method in ("full", "pce", "dense-gd"):  # from the ImageNet backbone at 0.007, nothing before
            assert (c["backbone_weights"], c.get("init"), c["lr"]) == ("imagenet", None, 0.007), name
            assert method != "dense-gd" or c["pretrain_epochs"] == 0, name  # full, pce: never pretrain
        else:  # from that length's PCE-GD model
            length = name.rsplit("-", 1)[1]
            assert c["init"] == str(out / f"pce-{length}" / "checkpoints" / "last.pt")
            assert c.get("backbone_weights") is None
        if method == "grid-gd":
            assert (c["lr"], c["nu"]) == (7e-7, 100.0)
        if method == "grid-tr":
            s = c["solver"]
            assert (c["lr"], s["potts_weight"], s["max_iter"], c["epochs_per_round"], c["schedule"]) == (
                7e-4, 100.0, 5, 5, "sync")
            assert (c["eps"], s["tr_weight"]) == eps_lam[name.rsplit("-", 1)[1]]
        if method == "dense-gd":
            from trainer.methods import PAPER_DENSE_NU
            assert c["nu"] == pytest.approx(PAPER_DENSE_NU)


def test_sweep_and_tune_plans(voc_set, torch_home, tmp_path, monkeypatch, capsys, no_download):
    monkeypatch.setenv("TORCH_HOME", torch_home[0])
    main(["--local", "sweep-tr-weight", "--preset", "paper", "--data", voc_set, "--format", "voc", "--scribbles", "0.5",
          "--values", "0.05,0.1", "--backbone-weights", "imagenet", "--plan", "--out", str(tmp_path / "s")])
    sweep = _cells(tmp_path / "s")
    assert set(sweep) == {"pce", "tr-0.05", "tr-0.1"}
    assert (sweep["pce"]["backbone_weights"], sweep["pce"]["epochs"]) == ("imagenet", 60)
    assert sweep["tr-0.1"]["solver"]["tr_weight"] == 0.1 and sweep["tr-0.1"]["eps"] == 0.9514
    main(["--local", "tune", "--preset", "paper", "--method", "grid-gd", "--data", voc_set, "--format", "voc",
          "--backbone-weights", "imagenet", "--plan", "--out", str(tmp_path / "t")])
    tune = _cells(tmp_path / "t")
    assert set(tune) == {"pce", "trials"} and tune["trials"]["init"].endswith("pce/checkpoints/last.pt")
    assert tune["pce"]["lr"] == tune["trials"]["pretrain_lr"] == 0.007 and tune["trials"]["lr"] == 7e-7  # SPEC §4
    assert "trials sample" in capsys.readouterr().out and not ray.is_initialized()


def test_make_synthetic_voc_layout(tmp_path):
    """`make-synthetic --layout voc` writes VOC's folders, a few of its 21 classes per image,
    images of varied shape up to --size, and the shortened scribble folders."""
    data = str(tmp_path / "VOC")
    res = cli_in_process("make-synthetic", "--layout", "voc", "--out", data, "--n-train", "4", "--n-val", "2",
                         "--size", "160")
    assert res.returncode == 0, res.stderr
    ids = open(os.path.join(data, "ImageSets", "SegmentationAug", "train.txt")).read().split()
    shapes = {Image.open(os.path.join(data, "JPEGImages", f"{i}.jpg")).size for i in ids}
    assert len(ids) == 4 and all(max(s) == 160 and min(s) < 160 for s in shapes)
    present = [np.unique(np.asarray(Image.open(os.path.join(data, "SegmentationClassAug", f"{i}.png")))) for i in ids]
    assert all(len(p) < 8 for p in present) and max(int(p.max()) for p in present) < 21  # a few of 21 classes
    assert os.path.exists(os.path.join(data, "SegmentationClass", "val_0000.png"))
    assert os.path.exists(os.path.join(data, "pascal_2012_scribble0.5", f"{ids[0]}.png"))


def test_table1_compare_a_partial_run(tmp_path, capsys):
    """`table1-compare DIR`: the paper's numbers beside the finished cells, with the difference."""
    out = tmp_path / "t"
    for name, miou in (("pce-1", 0.6), ("grid-tr-1", 0.695)):
        (out / name).mkdir(parents=True)
        (out / name / "summary.json").write_text(json.dumps(
            {"method": name.split("-1")[0], "dataset": "VOC", "epochs": 60, "train_images": 10582, "val_images": 1449,
             "val_miou": miou, "wall_s": 60.0, "trimap": {}}))
    main(["table1-compare", str(out)])
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("| Grid-TR"))
    assert row.endswith("**0.69** / 0.67 (+2.5) |") and "**—** / 0.57 |" in row  # clicks: not trained yet
    assert "**0.60** / 0.61 (-1.0)" in text and "all 2 cells" in text
    line = _fail_line(capsys, ["table1-compare", str(tmp_path / "empty")])
    assert "no finished Table 1 cell" in line


def test_grid_gd_seed_loss_l2_is_the_reference_scripts():
    """--seed-loss l2: Σ over seeded pixels of ‖onehot(y) − q‖² / seeded pixels, not divided
    by N (reference utils/loss.py LxLoss, the Grid-GD default of train_with_dcr.py's
    --loss-type); ce: PCE, eq. 8."""
    from trainer.losses import partial_ce, partial_l2
    from trainer.methods import method_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    seeds = torch.full((2, 4, 5), 255, dtype=torch.long)
    seeds[0, 1, 2], seeds[0, 3, 4], seeds[1, 0, 0] = 2, 0, 1
    q = torch.softmax(logits, 1)
    hand = sum(((torch.eye(3)[y] - q[n, :, i, j]) ** 2).sum() for n, i, j, y in ((0, 1, 2, 2), (0, 3, 4, 0), (1, 0, 0, 1)))
    assert partial_l2(logits, seeds) == pytest.approx(hand.item() / 3)
    assert partial_l2(logits, seeds, batch_average=True) == partial_l2(logits, seeds)
    assert partial_l2(logits, torch.full_like(seeds, 255)).item() == 0
    batch = {"seeds": seeds, "image": torch.rand(2, 3, 4, 5) * 255}
    l2 = method_loss("grid-gd", logits, batch, 0.0, 1.0, True, "l2")
    ce = method_loss("grid-gd", logits, batch, 0.0, 1.0, True, "ce")
    assert (l2 - ce).item() == pytest.approx(partial_l2(logits, seeds).item() - partial_ce(logits, seeds, True).item())
    with pytest.raises(UserError, match="--seed-loss"):
        from trainer.config import TrainConfig
        TrainConfig(data="d", seed_loss="l1").validate()


def test_reference_head_is_the_authors_network(torch_home, monkeypatch, no_download):
    """The paper preset's network: the authors' decoder (two 3×3 convs, dropout 0.5 and
    0.1: reference modeling/decoder.py), ASPP on the backbone's 320 channels with dropout
    0.5 (modeling/aspp.py), align_corners=True inside the head; torchvision's ImageNet file
    loads into it without its features.18."""
    from torch import nn

    from trainer.architectures import build_model

    net = build_model("deeplabv3plus-mobilenetv2-ref", 21)
    head = net.head
    convs = [m for m in head.classifier if isinstance(m, nn.Conv2d)]
    drops = [m.p for m in head.classifier if isinstance(m, nn.Dropout)]
    assert [tuple(c.weight.shape[:3]) for c in convs] == [(256, 304, 3), (256, 256, 3), (21, 256, 1)]
    assert drops == [0.5, 0.1] and head.aspp.project[-1].p == 0.5 and head.align_corners
    assert net.backbone.high_level_channels == 320 and head.aspp.convs[0][0].in_channels == 320

    def dilations(model):  # of the depthwise conv of each block from features.14 (the 160-channel stage) on
        return [b.conv[-3][0].dilation[0] for b in list(model.backbone.features)[14:18]]

    assert dilations(net) == [1, 1, 1, 2]  # the reference's backbone at OS 16
    assert dilations(build_model("deeplabv3plus-mobilenetv2", 21)) == [1, 2, 2, 2]  # torchvision's DeepLab
    monkeypatch.setenv("TORCH_HOME", torch_home[0])
    load_backbone_weights(net, "imagenet")
    assert torch.equal(net.backbone.state_dict()["features.17.conv.3.weight"], torch_home[1]["features.17.conv.3.weight"])
    net.eval()
    assert net(torch.rand(1, 3, 70, 90) * 255).shape == (1, 21, 70, 90)


def test_dense_nu_scales_with_the_crop_so_the_term_pulls_alike():
    """ν·Σ_ij W_ij kept equal across crop sizes (trainer.methods.dense_nu_for_crop): its
    kernel mass against brute force, and the Dense-GD term of a one-colour, one-label
    crop times the scaled ν equal for 64-, 96- and 160-pixel crops (lattice: within 15%)."""
    from trainer.losses import dense_crf
    from trainer.methods import _kernel_mass, dense_nu_for_crop

    ys, xs = torch.meshgrid(torch.arange(7.0, dtype=torch.float64), torch.arange(7.0, dtype=torch.float64), indexing="ij")
    p = torch.stack([ys.flatten(), xs.flatten()], 1)
    brute = torch.exp(-torch.cdist(p, p) ** 2 / (2 * 3.0 ** 2)).sum().item()
    assert _kernel_mass(7, 3.0) == pytest.approx(brute, rel=1e-9)
    assert dense_nu_for_crop(2e-9, 513) == 2e-9
    assert 600 < dense_nu_for_crop(2e-9, 64) / 2e-9 < 800  # 32² pixels all within σ = 50 against 257²

    def pull(crop):
        q = torch.zeros(1, 4, crop, crop)
        q[:, 1] = 1
        return -dense_nu_for_crop(2e-9, crop) * dense_crf(q, torch.full((1, 3, crop, crop), 120.0)).item()

    ref = pull(160)
    assert pull(64) == pytest.approx(ref, rel=0.15) and pull(96) == pytest.approx(ref, rel=0.15)
