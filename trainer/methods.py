"""The training methods (Sec. 1.2, 4), one record each: the only place their names live.

Adding a method is one `Method` record plus its loss function. Its flags drive the
rest: `starts_from_pce` makes a run without --init pretrain with PCE first (Alg. 1
line 2) and makes Table 1 fine-tune it from the PCE-GD cell; `needs_proposals` starts
the solver farm and the trainer's stage-A side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trainer.losses import dense_crf, grid_potts, partial_ce, robust_ce

Loss = Callable[[torch.Tensor, dict, float, float], torch.Tensor]  # (logits, batch, ε, ν)


@dataclass(frozen=True)
class Method:
    name: str
    title: str  # its row in the paper's Table 1
    loss: Loss
    starts_from_pce: bool = False
    needs_proposals: bool = False
    default_nu: float | None = None  # regulariser weight; --nu overrides it


def _full(logits, batch, eps, nu):
    """Cross-entropy on the full masks."""
    return F.cross_entropy(logits.float(), batch["mask"], ignore_index=255)


def _pce(logits, batch, eps, nu):
    """Partial cross-entropy on the seeds (eq. 6)."""
    return partial_ce(logits, batch["seeds"])


def _grid_gd(logits, batch, eps, nu):
    """PCE + ν · relaxed grid Potts (eq. 7, 8)."""
    return _pce(logits, batch, eps, nu) + nu * grid_potts(torch.softmax(logits.float(), 1), batch["image"])


def _dense_gd(logits, batch, eps, nu):
    """PCE + ν · dense CRF relaxation (Tang et al.)."""
    return _pce(logits, batch, eps, nu) + nu * dense_crf(torch.softmax(logits.float(), 1), batch["image"])


def _grid_tr(logits, batch, eps, nu):
    """Robust cross-entropy to the proposals, exact on the seeds (eq. 17, 18, 24)."""
    return robust_ce(logits, batch["proposal"], batch["seeds"], eps)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", "full supervision", _full),
    Method("pce", "PCE-GD", _pce),
    # SPEC §3's ν, sized for VOC images: on 96 px images it barely acts (docs/)
    Method("dense-gd", "Dense-GD", _dense_gd, starts_from_pce=True, default_nu=2e-9),
    # tuned on the synthetic val split (docs/table1-synthetic)
    Method("grid-gd", "Grid-GD", _grid_gd, starts_from_pce=True, default_nu=3.0),
    Method("grid-tr", "Grid-TR (our)", _grid_tr, starts_from_pce=True, needs_proposals=True),
)}


def method_loss(name: str, logits: torch.Tensor, batch: dict, eps: float, nu: float | None) -> torch.Tensor:
    """The loss of one batch; logits N×K×H×W at the input resolution."""
    method = METHODS[name]
    return method.loss(logits, batch, eps, method.default_nu if nu is None else nu)
