"""The training objective of each method: which loss a batch is trained on (Sec. 1.2, 4).

Regulariser weights ν (`--nu` overrides them): Grid-GD's was tuned on the synthetic
val set (ν = 0.3 / 1 / 3 gave 58.1 / 59.6 / 63.9 val mIoU; README, "Results");
Dense-GD's is SPEC §3's 2e-9, sized for VOC images (on 96 px images 1e-6 is better).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.losses import dense_crf, grid_potts, partial_ce, robust_ce

DEFAULT_NU = {"grid-gd": 3.0, "dense-gd": 2e-9}


def method_loss(method: str, logits: torch.Tensor, batch: dict, eps: float, nu: float | None) -> torch.Tensor:
    """The loss of one batch; logits N×K×H×W at the input resolution."""
    seeds = batch["seeds"]
    if method == "full":
        return F.cross_entropy(logits.float(), batch["mask"], ignore_index=255)
    if method == "pce":
        return partial_ce(logits, seeds)
    if method == "grid-tr":
        return robust_ce(logits, batch["proposal"], seeds, eps)
    weight = DEFAULT_NU[method] if nu is None else nu
    probs = torch.softmax(logits.float(), dim=1)
    if method == "grid-gd":
        return partial_ce(logits, seeds) + weight * grid_potts(probs, batch["image"])
    if method == "dense-gd":
        return partial_ce(logits, seeds) + weight * dense_crf(probs, batch["image"])
    raise ValueError(f"unknown method {method!r}")
