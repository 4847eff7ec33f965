"""The training objective of each method: which loss a batch is trained on (Sec. 1.2, 4).

Method defaults for the regulariser weight ν were tuned on the synthetic val set
(README, "Tuning"); `--nu` overrides them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.losses import dense_crf, grid_potts, partial_ce, robust_ce

DEFAULT_NU = {"grid-gd": 1.0, "dense-gd": 2e-9}


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
