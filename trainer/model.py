"""DeepLabV3+ with a MobileNetV2 backbone (Chen et al. 2018; Sandler et al. 2018).

Follows the reference implementation VainF/DeepLabV3Plus-Pytorch
(`deeplabv3plus_mobilenet`):

- backbone: torchvision's MobileNetV2 layout. Its ``state_dict`` keys are exactly
  torchvision ``mobilenet_v2``'s ``features.*`` keys, so torchvision's ImageNet
  weights file loads with :func:`load_backbone_weights` (the file's
  ``classifier.*`` keys are ignored). Output stride 16 (or 8): the stride of the
  last stride-2 stage(s) is replaced by dilation, as in the reference.
- low-level features: ``features[0:4]`` (24 channels, stride 4).
- high-level features: ``features[4:]`` (1280 channels, stride 16). Unlike the
  reference (which drops torchvision's final 1×1 conv, ``features.18``), the whole
  torchvision backbone is used, so every loaded weight is trained and no parameter
  is unused (DDP needs no ``find_unused_parameters``).
- ASPP: 1×1 conv, three 3×3 atrous convs (rates 6, 12, 18 at OS16; 12, 24, 36 at
  OS8) and image pooling, 256 channels each, projected to 256 (dropout 0.1).
- decoder: low-level features projected to 48 channels, concatenated with the
  upsampled ASPP output, a 3×3 conv (256) and a 1×1 classifier, at stride 4.
- ``reference_head=True``: the network of the paper's authors (dmitrii-marin/
  robust_trust_region, jfzhang95's DeepLabV3+): the backbone ends at 320 channels
  (no ``features.18``; its weights in a torchvision file are skipped), ASPP dropout 0.5,
  two 3×3 convs in the decoder with dropout 0.5 and 0.1, align_corners=True in the
  head's upsampling. One difference is kept: the logits go to the input size with
  align_corners=False, as stage A resizes the snapshots (solver_service/energy.py), so
  that its probabilities stay the network's own output (SPEC §4).

The network takes RGB images N×3×H×W, float, values 0..255, and normalises them
with the ImageNet mean/std inside ``forward`` (callers and losses see raw RGB).
Any H, W works (sizes need not be multiples of 16).
"""
from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch import nn

from shared import storage
from shared.errors import UserError

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# (expand ratio t, channels c, repeats n, stride s): torchvision's MobileNetV2 table
_MBV2_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class ConvBNReLU(nn.Sequential):
    """Conv2d (0) + BatchNorm2d (1) + ReLU6 (2): torchvision's Conv2dNormActivation keys."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, dilation=1):
        padding = (kernel - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """torchvision's InvertedResidual (same submodule names: ``conv.*``), with dilation."""

    def __init__(self, cin, cout, stride, expand_ratio, dilation=1):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden, dilation=dilation),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Backbone(nn.Module):
    """torchvision ``mobilenet_v2().features`` (width 1.0) with dilation for OS 8/16.

    ``state_dict()`` keys: ``features.0.0.weight`` … ``features.18.1.num_batches_tracked``.
    Where a stage's stride becomes dilation, its first block keeps the dilation before it
    and the others take the new one (torchvision's DeepLab); `reference_dilation`: every
    block of the stage keeps the one before it, as the authors' backbone (reference
    modeling/backbone/mobilenet.py: at OS 16 the 160-channel blocks at 1, the 320 at 2).
    """

    def __init__(self, output_stride: int = 16, last_conv: bool = True, reference_dilation: bool = False):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise UserError(f"output_stride: must be 8, 16 or 32, got {output_stride}")
        layers: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        current_stride, dilation, cin = 2, 1, 32
        for t, c, n, s in _MBV2_SETTINGS:
            previous_dilation = dilation
            if current_stride * s > output_stride:
                stride = 1
                dilation *= s
            else:
                stride = s
                current_stride *= s
            for i in range(n):
                if i == 0:
                    layers.append(InvertedResidual(cin, c, stride, t, dilation=previous_dilation))
                else:
                    layers.append(InvertedResidual(cin, c, 1, t, dilation=previous_dilation if reference_dilation
                                                   else dilation))
                cin = c
        if last_conv:  # torchvision's features.18; the reference's backbone ends at 320 channels
            layers.append(ConvBNReLU(cin, 1280, kernel=1))
            cin = 1280
        self.features = nn.Sequential(*layers)
        self.low_level_channels = 24
        self.high_level_channels = cin

    def forward(self, x):
        low = self.features[0:4](x)
        high = self.features[4:](low)
        return low, high


def _bn_any_batch(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm that also works on one 1×1 sample in training (uses running stats then)."""
    if bn.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)


class ASPPPooling(nn.Module):
    def __init__(self, cin, cout, align_corners=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.align_corners = align_corners

    def forward(self, x):
        size = x.shape[-2:]
        y = F.adaptive_avg_pool2d(x, 1)
        y = F.relu(_bn_any_batch(self.bn, self.conv(y)))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=self.align_corners)


class ASPP(nn.Module):
    def __init__(self, cin, rates, cout=256, dropout=0.1, align_corners=False):
        super().__init__()
        branches: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        ]
        for r in rates:
            branches.append(
                nn.Sequential(
                    nn.Conv2d(cin, cout, 3, padding=r, dilation=r, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                )
            )
        branches.append(ASPPPooling(cin, cout, align_corners))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(cout * len(branches), cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.project(torch.cat([b(x) for b in self.convs], dim=1))


class DeepLabHeadV3Plus(nn.Module):
    """VainF's head; with ``reference``, the authors' (jfzhang95's, their
    modeling/decoder.py and aspp.py): ASPP dropout 0.5, two 3×3 convs with dropout 0.5 and
    0.1 before the classifier, align_corners=True in the head's upsampling."""

    def __init__(self, high_channels, low_channels, num_classes, rates, reference=False):
        super().__init__()
        self.align_corners = reference
        self.project = nn.Sequential(
            nn.Conv2d(low_channels, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True)
        )
        self.aspp = ASPP(high_channels, rates, dropout=0.5 if reference else 0.1, align_corners=reference)
        second = [nn.Dropout(0.5), nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256),
                  nn.ReLU(inplace=True), nn.Dropout(0.1)] if reference else []
        self.classifier = nn.Sequential(
            nn.Conv2d(304, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            *second,
            nn.Conv2d(256, num_classes, 1),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, low, high):
        low = self.project(low)
        high = self.aspp(high)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return self.classifier(torch.cat([low, high], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ / MobileNetV2. Input: RGB N×3×H×W float 0..255 (raw, unnormalised).

    - ``forward(x)``: logits N×K×H×W at the input resolution (bilinear, align_corners=False).
    - ``forward_lowres(x)``: logits at the network's output resolution (stride 4,
      ⌈H/4⌉×⌈W/4⌉), used for the snapshots of stage A.
    - ``param_groups(lr)``: SGD parameter groups, backbone at ``lr``, head at ``10·lr``.
    - ``backbone.state_dict()`` has torchvision ``mobilenet_v2``'s ``features.*`` keys.
    """

    def __init__(self, num_classes: int, output_stride: int = 16, reference_head: bool = False):
        super().__init__()
        if num_classes < 2:
            raise UserError(f"num_classes: must be ≥ 2, got {num_classes}")
        rates = {16: (6, 12, 18), 8: (12, 24, 36), 32: (3, 6, 9)}.get(output_stride)
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.backbone = MobileNetV2Backbone(output_stride, last_conv=not reference_head,
                                            reference_dilation=reference_head)
        self.head = DeepLabHeadV3Plus(
            self.backbone.high_level_channels, self.backbone.low_level_channels, num_classes, rates,
            reference=reference_head,
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward_lowres(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        low, high = self.backbone(x)
        return self.head(low, high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_lowres(x)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self, lr: float) -> list[dict]:
        """[{'params': backbone, 'lr': lr}, {'params': head, 'lr': 10·lr}] (SPEC §4)."""
        return [
            {"params": list(self.backbone.parameters()), "lr": lr},
            {"params": list(self.head.parameters()), "lr": 10 * lr},
        ]


def load_backbone_weights(model: DeepLabV3Plus, path: str) -> None:
    """Load torchvision ``mobilenet_v2`` ImageNet weights (a state_dict file, or
    ``imagenet``: torchvision's published file through torch's hub cache,
    trainer/imagenet.py) into the backbone.

    The file is read with ``torch.load(weights_only=True)``; its ``features.*`` keys must
    match the backbone exactly (names and shapes; ``classifier.*`` keys are ignored).
    Keys prefixed ``backbone.`` (this project's checkpoints) are accepted too.
    Raises UserError naming the file on any failure.
    """
    from trainer.imagenet import IMAGENET, imagenet_state_dict

    state = imagenet_state_dict() if path == IMAGENET else _read_state(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state_dict (got {type(state).__name__})")
    feats = {}
    for key, value in state.items():
        if not isinstance(key, str):
            continue
        k = key[len("backbone."):] if key.startswith("backbone.") else key
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith("features."):
            feats[k] = value
    if not feats:
        raise UserError(f"{path}: no 'features.*' keys: not a torchvision mobilenet_v2 state_dict")
    expected = model.backbone.state_dict()
    if "features.18.0.weight" not in expected:  # the reference's backbone has no last 1×1 conv
        feats = {k: v for k, v in feats.items() if not k.startswith("features.18.")}
    missing = sorted(set(expected) - set(feats))
    unexpected = sorted(set(feats) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{path}: backbone keys do not match torchvision mobilenet_v2 "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    for k, v in feats.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(expected[k].shape):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise UserError(f"{path}: {k} has shape {shape}, expected {tuple(expected[k].shape)}")
    model.backbone.load_state_dict(feats, strict=True)


def _read_state(path: str):
    try:
        data = storage.read_bytes(path)  # a local path or a URI
    except FileNotFoundError:
        raise UserError(f"{path}: backbone weights file not found") from None
    except OSError as exc:  # a folder, a refused read
        raise UserError(f"{path}: cannot read backbone weights ({str(exc).splitlines()[0]})") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reading failure is the file's fault
        raise UserError(f"{path}: cannot read backbone weights ({type(exc).__name__}: {exc})") from None
