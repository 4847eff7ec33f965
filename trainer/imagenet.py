"""ImageNet weights of the backbone by name: ``--backbone-weights imagenet``.

torchvision's published MobileNetV2 ImageNet state_dict (``IMAGENET1K_V1``), fetched
with ``torch.hub.load_state_dict_from_url``: torchvision's URL, the SHA-256 prefix in
its file name checked on download, torch's own cache (``$TORCH_HOME/hub/checkpoints``).
torchvision itself is not imported: its PyPI wheel fails to import beside the CPU torch
build (``operator torchvision::nms does not exist``). The backbone keeps torchvision's
keys (trainer/model.py), so the file loads as it is.
"""
from __future__ import annotations

import os

import torch

from shared import storage
from shared.errors import UserError

IMAGENET = "imagenet"  # the name --backbone-weights takes besides a file
URL = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"  # torchvision MobileNet_V2_Weights.IMAGENET1K_V1


def cache_path() -> str:
    """Where torch's hub cache keeps (and looks for) the file."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL))


def imagenet_state_dict() -> dict:
    """The state_dict, from torch's cache or downloaded into it (hash checked). Without a
    network, one line says which file to fetch and where the cache expects it."""
    try:
        return torch.hub.load_state_dict_from_url(URL, map_location="cpu", progress=False, check_hash=True,
                                                  weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash a RuntimeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--backbone-weights imagenet: cannot get {URL} ({reason}); download it to {cache_path()} "
                        f"(TORCH_HOME sets the folder) or pass --backbone-weights PATH") from None


def check_backbone_weights(value: str | None) -> None:
    """Before Ray starts: the ImageNet file is at hand (fetched now if need be), a local
    file exists."""
    if value == IMAGENET:
        imagenet_state_dict()
    elif value and not storage.is_remote(value) and not os.path.isfile(value):
        raise UserError(f"--backbone-weights: no such file: {value!r} (or give 'imagenet')")


def backbone_weights_path(value: str | None) -> str | None:
    """--backbone-weights, checked before Ray starts (the ImageNet file fetched into torch's
    cache if need be); a local file as an absolute path, for the cells' workers."""
    check_backbone_weights(value)
    return value if not value or value == IMAGENET or storage.is_remote(value) else os.path.abspath(value)
