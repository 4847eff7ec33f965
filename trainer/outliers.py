"""The outlier model of stage B's robust loss (SPEC §2, §4): the probability ε that a
proposal label is wrong.

    const               ε fixed (the paper)
    learned             one ε, trained with the network (the authors' code's 'Uniform'
                        model, unreported in the paper)
    learned-per-class   one ε per proposal label: a class the solver gets wrong more
                        often can be trusted less (a step past the authors)

A learned ε is ε_max · sigmoid(θ), ε_max = (K−1)/K: SPEC §4 writes sigmoid(θ), but past
(K−1)/K the robust likelihood a + b·q turns upside down (b < 0 rewards a low q for the
proposed label), so the range is kept inside the model's. θ starts at the given ε and is
trained by the stage-B optimizer at the network's base LR, without weight decay.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import EPS_MODELS



class OutlierModel(nn.Module):
    def __init__(self, kind: str, eps: float, num_classes: int):
        super().__init__()
        if kind not in EPS_MODELS:
            raise ValueError(f"unknown outlier model {kind!r}; choose one of {EPS_MODELS}")
        self.kind, self.eps0 = kind, float(eps)
        self.eps_max = (num_classes - 1) / num_classes
        self.theta = None
        if kind != "const":
            share = min(max(self.eps0 / self.eps_max, 1e-4), 1 - 1e-4)  # sigmoid's open range
            size = num_classes if kind == "learned-per-class" else 1
            self.theta = nn.Parameter(torch.full((size,), math.log(share / (1 - share))))

    def forward(self) -> float | torch.Tensor:
        """ε for the loss: a float (const), a 1-element or a K-element tensor (learned)."""
        if self.theta is None:
            return self.eps0
        eps = self.eps_max * torch.sigmoid(self.theta)
        return eps[0] if self.kind == "learned" else eps

    def value(self) -> float | list[float]:
        """ε now, for the logs."""
        eps = self()
        if isinstance(eps, float):
            return eps
        eps = eps.detach().cpu()
        return eps.tolist() if eps.dim() else float(eps)

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer group of θ (none for const): the network's base LR, no decay."""
        return [] if self.theta is None else [{"params": [self.theta], "lr": lr, "weight_decay": 0.0}]

    def average_gradients(self) -> None:
        """θ lives outside the DDP model: average its gradient over the ranks by hand."""
        if self.theta is not None and self.theta.grad is not None and dist.is_initialized():
            dist.all_reduce(self.theta.grad)
            self.theta.grad /= dist.get_world_size()
