"""A small UNet (Ronneberger et al. 2015) for training from scratch on small data sets.

Four resolutions (strides 1, 2, 4, 8) with ``width``, 2·width, 4·width, 8·width
channels; each stage is two 3×3 conv + BatchNorm + ReLU; the decoder upsamples
bilinearly and concatenates the encoder's features of the same stride. The output is
at the input resolution, so boundaries are not limited by an output stride, which is
what a network without pretrained weights needs on images of ~100 px
(``docs/recipe-synthetic`` has the measurements).

Same interface as :class:`trainer.model.DeepLabV3Plus`: raw RGB 0..255 in, logits
N×K×H×W out; ``forward_lowres`` is ``forward`` (stride 1); ``param_groups(lr)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError
from trainer.model import IMAGENET_MEAN, IMAGENET_STD


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 32, depth: int = 4):
        super().__init__()
        if num_classes < 2:
            raise UserError(f"num_classes: must be ≥ 2, got {num_classes}")
        self.num_classes = num_classes
        chans = [width * 2**i for i in range(depth)]
        self.down = nn.ModuleList([_block(3, chans[0])] + [_block(a, b) for a, b in zip(chans, chans[1:])])
        self.up = nn.ModuleList([_block(b + a, a) for a, b in zip(chans[:-1], chans[1:])][::-1])
        self.classifier = nn.Conv2d(chans[0], num_classes, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        skips = []
        for i, block in enumerate(self.down):
            # ceil_mode keeps odd sizes: every pixel has a coarser cell
            x = block(x if i == 0 else F.max_pool2d(x, 2, ceil_mode=True))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return self.classifier(x)

    def forward_lowres(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def param_groups(self, lr: float) -> list[dict]:
        """One group at ``lr``: there is no pretrained backbone to protect."""
        return [{"params": list(self.parameters()), "lr": lr}]
