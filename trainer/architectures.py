"""The networks a run can train (``--arch``), by name; checkpoints record the name.

- ``deeplabv3plus-mobilenetv2``: the paper's network (DeepLabV3+ / MobileNetV2,
  output stride 16), the one ImageNet backbone weights (``--backbone-weights``) fit.
- ``deeplabv3plus-mobilenetv2-os8``: the same at output stride 8.
- ``deeplabv3plus-mobilenetv2-ref``: the authors' DeepLabV3+ head and backbone end
  (trainer/model.py, ``reference_head``): the paper preset's network.
- ``unet``: a small full-resolution UNet that learns small data sets from scratch;
  the default for data without pretrained weights (``docs/recipe-synthetic``).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from shared.errors import UserError
from trainer.model import DeepLabV3Plus
from trainer.unet import UNet

ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "deeplabv3plus-mobilenetv2": lambda k: DeepLabV3Plus(k, output_stride=16),
    "deeplabv3plus-mobilenetv2-os8": lambda k: DeepLabV3Plus(k, output_stride=8),
    "deeplabv3plus-mobilenetv2-ref": lambda k: DeepLabV3Plus(k, output_stride=16, reference_head=True),
    "unet": lambda k: UNet(k),
}
PRETRAINED_BACKBONE = "deeplabv3plus-mobilenetv2"  # what --backbone-weights picks (the paper preset: its -ref variant)
DEFAULT_ARCH = "unet"


def resolve_arch(arch: str, init_arch: str | None, backbone_weights: str | None) -> str:
    """The network of a run: --arch if given, else --init's, else the paper's when ImageNet
    backbone weights are given, else DEFAULT_ARCH; conflicting choices are errors."""
    if arch and init_arch and arch != init_arch:
        raise UserError(f"--arch {arch}: --init is a {init_arch} checkpoint")
    chosen = arch or init_arch or (PRETRAINED_BACKBONE if backbone_weights else DEFAULT_ARCH)
    if backbone_weights and not chosen.startswith(PRETRAINED_BACKBONE):
        raise UserError(f"--backbone-weights: ImageNet weights fit {PRETRAINED_BACKBONE}, not --arch {chosen}")
    return chosen


def checkpoint_arch(state: dict) -> str:
    """The network a checkpoint holds (checkpoints from before --arch are the paper's)."""
    return state.get("arch", PRETRAINED_BACKBONE)


def build_model(arch: str, num_classes: int) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise UserError(f"--arch: must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch](num_classes)
