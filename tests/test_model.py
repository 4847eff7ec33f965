"""DeepLabV3+ / MobileNetV2: shapes, parameter groups, torchvision key layout, weight loading."""

import pytest
import torch

from shared.errors import UserError
from trainer.model import DeepLabV3Plus, load_backbone_weights


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepLabV3Plus(4)


@pytest.mark.parametrize("hw", [(96, 96), (64, 64), (97, 101), (33, 50)])
def test_output_shapes(model, hw):
    model.eval()
    x = torch.rand(2, 3, *hw) * 255
    with torch.no_grad():
        full = model(x)
        low = model.forward_lowres(x)
    assert full.shape == (2, 4, *hw)
    assert low.shape == (2, 4, (hw[0] + 3) // 4, (hw[1] + 3) // 4)
    assert torch.isfinite(full).all()


def test_train_mode_backward_batch_one(model):
    model.train()
    x = torch.rand(1, 3, 48, 48) * 255
    out = model(x)
    out.mean().backward()
    assert out.shape == (1, 4, 48, 48)
    model.zero_grad()


def test_param_groups_cover_all_once(model):
    groups = model.param_groups(0.01)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)


def test_backbone_keys_match_torchvision(model):
    sd = model.backbone.state_dict()
    assert len(sd) == 312  # torchvision mobilenet_v2: 314 keys, less classifier.1.{weight,bias}
    assert all(k.startswith("features.") for k in sd)
    expected = {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.running_var": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.weight": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.weight": (24,),
        "features.14.conv.1.0.weight": (576, 1, 3, 3),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.num_batches_tracked": (),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(p.numel() for p in model.backbone.parameters()) == 2223872


def test_output_stride_dilation(model):
    # OS16: the stride-2 stage at features.14 is dilated instead
    assert model.backbone.features[14].conv[1][0].stride == (1, 1)
    assert model.backbone.features[15].conv[1][0].dilation == (2, 2)
    assert model.backbone.features[7].conv[1][0].stride == (2, 2)


def test_load_backbone_weights_round_trip(tmp_path):
    src = DeepLabV3Plus(3)
    with torch.no_grad():
        for p in src.backbone.parameters():
            p.normal_()
    state = {k: v.clone() for k, v in src.backbone.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(1000, 1280)
    state["classifier.1.bias"] = torch.zeros(1000)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(state, path)
    dst = DeepLabV3Plus(3)
    load_backbone_weights(dst, str(path))
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v), k


def test_load_backbone_weights_errors(tmp_path, capsys):
    m = DeepLabV3Plus(3)
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match="nope.pth"):
        load_backbone_weights(m, str(missing))
    folder = tmp_path / "weights"
    folder.mkdir()
    capsys.readouterr()
    with pytest.raises(UserError, match="weights: cannot read backbone weights .*is a directory"):
        load_backbone_weights(m, str(folder))
    assert "trying again" not in capsys.readouterr().out  # final at once, not retried as a storage error
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(UserError, match="garbage.pth"):
        load_backbone_weights(m, str(garbage))
    partial = tmp_path / "partial.pth"
    sd = dict(m.backbone.state_dict())
    del sd["features.18.0.weight"]
    torch.save(sd, partial)
    with pytest.raises(UserError, match="partial.pth"):
        load_backbone_weights(m, str(partial))
    wrong = tmp_path / "wrong.pth"
    sd = dict(m.backbone.state_dict())
    sd["features.0.0.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(sd, wrong)
    with pytest.raises(UserError, match="wrong.pth"):
        load_backbone_weights(m, str(wrong))
