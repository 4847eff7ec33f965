"""The training methods (Sec. 1.2, 4), one record each: the only place their names live.

Adding a method is one `Method` record plus its loss function. Its fields drive the
rest: `labels` picks the label map it trains on (scribbles or full masks);
`pretrain` names the method whose model it starts from, which a run without --init
trains first (Alg. 1 line 2) and Table 1, the λ sweep and the search fine-tune it from
(`trainer.config.TrainConfig.fine_tune_from`); `needs_proposals` starts the solver farm
and the trainer's stage-A side; `paper` is its recipe of the authors' VOC runs (the
`paper` preset) and `paper_table1` its row of the paper's Table 1. Elsewhere a method
is compared by these fields or by the roles below (FULL_SUPERVISION, PCE, TRUST_REGION),
never by a spelled-out name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from shared.labels import SCRIBBLE_LENGTHS, UNLABELLED
from trainer.losses import dense_crf, grid_potts, partial_ce, partial_l2, robust_ce
from trainer.permutohedral import krahenbuhl_factor

# (logits, batch, ε, ν, batch_average, seed_loss): batch_average divides the data terms by N
# as the reference does (SPEC §2); the regularisers are batch means already; seed_loss is
# Grid-GD's seed term (SEED_LOSSES).
Loss = Callable[[torch.Tensor, dict, float, float, bool, str], torch.Tensor]
# Grid-GD's seed term: "ce" the paper's eq. 8 (PCE), "l2" the authors' script's (--loss-type l2)
SEED_LOSSES = {"ce": partial_ce, "l2": partial_l2}
# the batch key of a data-parallel rank's normaliser of the supervised pixels (the seeds', or
# the masks' for full supervision; `Method.labels`): max(1, their count over the global
# batch) / world size, set by `trainer.engine.train_epoch`; absent: this batch's count
LABEL_COUNT = "label_count"


@dataclass(frozen=True)
class Method:
    name: str
    title: str  # its row in the paper's Table 1
    loss: Loss
    labels: str = "seeds"  # the batch's label map it trains on: "seeds" (scribbles) or "mask" (full labels)
    pretrain: str | None = None  # the method whose model it starts from (Alg. 1 line 2), if any
    needs_proposals: bool = False
    default_nu: float | None = None  # regulariser weight; --nu overrides it
    paper: dict = field(default_factory=dict)  # the reference's recipe (SPEC §4) beyond the common one
    # its row of the paper's Table 1 (ScribbleSup, VOC 2012 val mIoU, DeepLabV3+ / MobileNetV2):
    # scribble length ('0' clicks … '1' full) -> mIoU
    paper_table1: dict = field(default_factory=dict)

    @property
    def uses_masks(self) -> bool:
        return self.labels == "mask"

    @property
    def starts_from_pce(self) -> bool:
        """It starts from a pretrained model: --init's, or `pretrain`'s trained first."""
        return self.pretrain is not None


def _full(logits, batch, eps, nu, batch_average, seed_loss):
    """Cross-entropy on the full masks: the mean over their labelled pixels."""
    mask = batch["mask"]
    count = batch.get(LABEL_COUNT)
    total = F.cross_entropy(logits.float(), mask, ignore_index=UNLABELLED, reduction="sum")
    count = (mask != UNLABELLED).sum().clamp(min=1) if count is None else count
    return total / count / (len(logits) if batch_average else 1)


def _pce(logits, batch, eps, nu, batch_average, seed_loss):
    """Partial cross-entropy on the seeds (eq. 6)."""
    return partial_ce(logits, batch["seeds"], batch_average, batch.get(LABEL_COUNT))


def _grid_gd(logits, batch, eps, nu, batch_average, seed_loss):
    """PCE (or the authors' script's L2 seed term) + ν · relaxed grid Potts (eq. 7, 8)."""
    q = torch.softmax(logits.float(), 1)
    seeds = SEED_LOSSES[seed_loss](logits, batch["seeds"], batch_average, batch.get(LABEL_COUNT))
    return seeds + nu * grid_potts(q, batch["image"], batch.get("roi"))


def _dense_gd(logits, batch, eps, nu, batch_average, seed_loss):
    """PCE + ν · dense CRF relaxation (Tang et al.)."""
    q = torch.softmax(logits.float(), 1)
    return _pce(logits, batch, eps, nu, batch_average, seed_loss) + nu * dense_crf(q, batch["image"], roi=batch.get("roi"))


def _grid_tr(logits, batch, eps, nu, batch_average, seed_loss):
    """Robust cross-entropy to the proposals, exact on the seeds (eq. 17, 18, 24)."""
    return robust_ce(logits, batch["proposal"], batch["seeds"], eps, batch_average, batch.get(LABEL_COUNT))


# The reference's weights are in its own units (SPEC §3): its Grid-GD weight is ν on a
# batch-averaged PCE, as ours with batch_average on; its Dense-GD weight multiplies Tang
# et al.'s lattice, whose output is krahenbuhl_factor(5) times the exact filter ours
# computes. Converted here, once.
PAPER_DENSE_NU = 2e-9 * krahenbuhl_factor(5)


def _kernel_mass(side: int, sigma: float) -> float:
    """Σ_{i,j} exp(−‖p_i − p_j‖²/(2σ²)) over the pixels of a side×side grid: the product
    of one axis's sum m(L) = Σ_{|d|<L} (L − |d|)·exp(−d²/(2σ²)) with itself."""
    d = torch.arange(1 - side, side, dtype=torch.float64)
    return float(((side - d.abs()) * torch.exp(-d ** 2 / (2 * sigma ** 2))).sum()) ** 2


def dense_nu_for_crop(nu: float, crop: int, reference_crop: int = 513, sigma_xy: float = 100.0,
                      scale: float = 0.5) -> float:
    """Dense-GD's ν for training crops of crop×crop pixels that weighs its term against
    PCE as ν does on reference_crop crops (SPEC §3's 2e-9: VOC's 513 crops).

    The term's pull on the network is the sum over pixels of its gradient 2ν·Σ_j W_ij q_j;
    inside a region of one colour and one label that is 2ν·M, M = Σ_{i,j} of the spatial
    kernel over the scale-resized crop (σ = scale·σ_xy); PCE's pull, a mean over the seeds,
    does not depend on the crop's size. Keeping ν·M: ν · M(reference) / M(crop). On 64-pixel
    crops (32 after scale 0.5, all within σ = 50) M is ≈ 1e6, on 513 ones ≈ 7.6e8 (≈ 700×).
    """
    side = lambda c: max(1, round(c * scale))  # noqa: E731 - dense_crf's resized size
    sigma = sigma_xy * scale
    return nu * _kernel_mass(side(reference_crop), sigma) / _kernel_mass(side(crop), sigma)
PAPER_GRID_NU = 100.0


def _row(*mious: float) -> dict:
    """A row of the paper's Table 1: one mIoU per scribble length, shortest first (its columns)."""
    return dict(zip(SCRIBBLE_LENGTHS, mious, strict=True))


# The paper's Table 1 ("Results for ScribbleSup") is copied from its text (shared/paper.txt);
# full supervision is a single number there (0.70), repeated in every column.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", "full supervision", _full, labels="mask", paper={"lr": 0.007},
           paper_table1=_row(0.70, 0.70, 0.70, 0.70, 0.70)),
    Method("pce", "PCE-GD", _pce, paper={"lr": 0.007}, paper_table1=_row(0.50, 0.57, 0.59, 0.61, 0.61)),
    # SPEC §3's ν, sized for VOC images: on 96 px images it barely acts (docs/)
    Method("dense-gd", "Dense-GD", _dense_gd, pretrain="pce", default_nu=2e-9,
           paper={"lr": 0.007, "nu": PAPER_DENSE_NU, "pretrain_epochs": 0},  # from the backbone
           paper_table1=_row(0.55, 0.61, 0.62, 0.63, 0.64)),
    # tuned on the synthetic val split (docs/table1-synthetic-v2, synthetic v2)
    Method("grid-gd", "Grid-GD", _grid_gd, pretrain="pce", default_nu=3.0,
           paper={"lr": 7e-7, "nu": PAPER_GRID_NU}, paper_table1=_row(0.54, 0.60, 0.62, 0.64, 0.64)),
    Method("grid-tr", "Grid-TR (our)", _grid_tr, pretrain="pce", needs_proposals=True,
           paper={"lr": 7e-4}, paper_table1=_row(0.57, 0.63, 0.64, 0.66, 0.67)),
)}
# the roles the experiments compare: full supervision (the upper bound), the pretraining
# method the others start from (PCE-GD), and this project's method (the one with stage A)
FULL_SUPERVISION = next(m.name for m in METHODS.values() if m.uses_masks)
PCE = next(m.pretrain for m in METHODS.values() if m.pretrain)
TRUST_REGION = next(m.name for m in METHODS.values() if m.needs_proposals)


def method_loss(name: str, logits: torch.Tensor, batch: dict, eps: float, nu: float | None,
                batch_average: bool = False, seed_loss: str = "ce") -> torch.Tensor:
    """The loss of one batch; logits N×K×H×W at the input resolution."""
    method = METHODS[name]
    return method.loss(logits, batch, eps, method.default_nu if nu is None else nu, batch_average, seed_loss)
