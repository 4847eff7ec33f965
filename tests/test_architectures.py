"""The architecture registry (--arch): every network's interface, and how a run picks one."""
import pytest
import torch

from shared.errors import UserError
from trainer.architectures import ARCHITECTURES, build_model, checkpoint_arch, resolve_arch


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("hw", [(64, 64), (33, 50)])
def test_every_architecture_maps_rgb_to_logits_at_input_size(arch, hw):
    torch.manual_seed(0)
    net = build_model(arch, 3)
    x = torch.rand(2, 3, *hw) * 255
    net.train()
    out = net(x)
    out.mean().backward()
    assert out.shape == (2, 3, *hw)
    groups = net.param_groups(0.01)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    net.eval()
    with torch.no_grad():
        low = net.forward_lowres(x)
    assert low.shape[:2] == (2, 3) and torch.isfinite(low).all()


def test_unet_learns_a_tiny_set_quickly():
    """A from-scratch network for small data: it must fit 4 images of a 2-class pattern."""
    torch.manual_seed(0)
    net = build_model("unet", 2)
    x = torch.rand(4, 3, 32, 32) * 255
    y = (x[:, 0] > 127).long()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="--arch"):
        build_model("resnet9000", 3)


def test_resolution_order():
    assert resolve_arch("", None, None) == "unet"
    assert resolve_arch("", None, "w.pth") == "deeplabv3plus-mobilenetv2"
    assert resolve_arch("", "deeplabv3plus-mobilenetv2-os8", None) == "deeplabv3plus-mobilenetv2-os8"
    assert resolve_arch("unet", "unet", None) == "unet"
    with pytest.raises(UserError, match="--init is a unet checkpoint"):
        resolve_arch("deeplabv3plus-mobilenetv2", "unet", None)
    with pytest.raises(UserError, match="--backbone-weights"):
        resolve_arch("unet", None, "w.pth")
    assert checkpoint_arch({}) == "deeplabv3plus-mobilenetv2"  # checkpoints from before --arch
