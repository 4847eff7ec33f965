"""Typed configuration, in one place. The command line and TOML files map onto it.

Defaults are the ones that suit the built-in synthetic data set on a laptop; the
paper's VOC settings (SPEC §4) are the `paper` preset (`experiments.presets`).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from shared.errors import UserError
from shared.labels import check_scribbles

SCHEDULES = ("overlapped", "sync")
ALGORITHMS = ("expansion", "swap")
OPTIMIZERS = ("sgd", "adamw")
SEED_LOSSES = ("ce", "l2")  # grid-gd's seed term (trainer/methods.py)
EPS_MODELS = ("const", "learned", "learned-per-class")  # the outlier models of trainer/outliers.py
SCRATCH_LR = 3e-3  # AdamW on the UNet from scratch (docs/recipe-synthetic)
FINE_TUNE_LR = 3e-4  # a tenth of SCRATCH_LR, as the paper's Grid-TR rate is of PCE-GD's
AUGMENTATIONS = ("default", "reference", "crop")  # trainer/data.py: ours, the authors' VOC one (SPEC §4), crop only


@dataclass
class SolverConfig:
    """Stage A (SPEC §1)."""

    tr_weight: float = 0.1  # λ
    potts_weight: float = 100.0  # β
    max_iter: int = 5
    restrict_labels: bool = True
    algorithm: str = "expansion"

    def validate(self) -> None:
        _check(self.tr_weight >= 0, "--tr-weight", "must be ≥ 0")
        _check(self.potts_weight >= 0, "--potts-weight", "must be ≥ 0")
        _check(self.max_iter >= 1, "--max-iter", "must be ≥ 1")
        _check(self.algorithm in ALGORITHMS, "--algorithm", f"must be one of {ALGORITHMS}")


@dataclass
class TrainConfig:
    """One training run (SPEC §4, §8)."""

    data: str = ""
    format: str = "synthetic"
    scribbles: str = ""  # scribble length suffix: '' (full), '0.8', '0.5', '0.3', '0' (clicks)
    method: str = "pce"
    epochs: int = 20
    arch: str = ""  # trainer.architectures; "": --init's, else the paper's with --backbone-weights, else unet
    optimizer: str = "adamw"  # sgd (the paper's, with momentum) or adamw
    batch_size: int = 8  # the global batch, split evenly over the trainer workers
    # peak rate of the method's epochs, poly decay (DeepLab's decoder trains at 10× it);
    # None: SCRATCH_LR, or a tenth of it when they fine-tune a trained model (--init, or
    # after PCE pretraining), as the paper's Grid-TR fine-tunes at 1/10 of PCE-GD's rate
    lr: float | None = None
    pretrain_lr: float | None = None  # of the PCE pretraining epochs; None: SCRATCH_LR
    # of the training crops: "default" (scale, crop, flip), "reference" (the authors' VOC recipe),
    # "crop" (crop only); "": crop on the synthetic format, whose classes differ by stripe
    # orientation and period (a flip or a rescale turns one class's texture into another's)
    augmentation: str = ""
    eps_model: str = "const"  # const, learned, learned-per-class (trainer/outliers.py)
    batch_average: bool = False  # divide the data terms by the batch size, as the reference (SPEC §2)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    crop_size: int = 64  # training crops; 0 trains on whole images
    drop_last: bool = True  # drop an epoch's last short batch (the reference keeps it: the paper preset)
    max_image_pixels: int = 4096 * 4096  # larger images are an input error (stage A memory)
    init: str | None = None  # checkpoint to start from (Alg. 1 line 2: the PCE model)
    pretrain_epochs: int = 10  # PCE epochs before grid-gd/dense-gd/grid-tr when no --init; 0: none
    backbone_weights: str | None = None  # torchvision mobilenet_v2 ImageNet state_dict
    out: str = "runs/train"
    seed: int = 0
    # stage B (SPEC §2) and the baselines' weights (SPEC §3)
    eps: float | None = None  # ε; None: default_eps(K), the paper's 0.95 at K = 21
    nu: float | None = None  # regulariser weight of grid-gd / dense-gd; None = method default
    seed_loss: str = "ce"  # grid-gd's seed term: ce (the paper's eq. 8) or l2 (the authors' script's)
    epochs_per_round: int = 5  # M in Alg. 1
    # the solver farm and the schedule (SPEC §4, §6)
    schedule: str = "overlapped"
    max_staleness: int = 1
    # seconds the trainer waits without any new proposal part before the run ends: generous,
    # since sync rounds wait for a whole stage A (raise it for big sets on few solvers)
    max_stall: float = 1800.0
    solver_wait: float = 600.0  # seconds a run waits for its first solver actor, or its trainer workers, to be placed
    solver_retries: int = 3  # kills of a solver on one round's parts before the run ends
    storage_patience: float = 300.0  # seconds stage A rides out failing storage (an S3 outage) before the run ends
    solvers: str = "1"  # N or MIN:MAX solver actors
    solver_resource: str | None = None  # custom resource that solver nodes advertise
    shards: str | None = None  # base URI of the shards; default OUT/shards
    # local --out/--shards paths are on a filesystem every cluster node mounts (NFS, …)
    shared_fs: bool = False
    shard_size: int = 8  # images per shard part
    solver: SolverConfig = field(default_factory=SolverConfig)
    # the trainer
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    trainer_resource: str | None = None  # custom resource that trainer nodes advertise
    max_failures: int = 3  # trainer-worker losses Ray Train recovers from (last checkpoint) per run
    # data-loading processes per trainer worker (each asks for one more CPU); None: 0 on CPU,
    # on GPU what the GPU nodes' CPUs allow (trainer.driver.default_loader_workers)
    loader_workers: int | None = None
    sync_bn: bool = False  # SyncBatchNorm across the workers (CUDA only, as in torch)
    use_gpu: bool | None = None  # None: decided by trainer.driver.resolve_use_gpu
    # torch's deterministic kernels (trainer.engine.make_deterministic): a GPU run repeats itself
    deterministic: bool = False
    eval_every: int = 1  # epochs between evaluations
    resume: bool = False

    def solver_range(self) -> tuple[int, int]:
        try:
            parts = [int(p) for p in str(self.solvers).split(":")]
        except ValueError:
            raise UserError(f"--solvers: expected N or MIN:MAX, got {self.solvers!r}") from None
        lo, hi = (parts[0], parts[0]) if len(parts) == 1 else parts[:2]
        _check(len(parts) <= 2 and 1 <= lo <= hi, "--solvers", f"needs 1 ≤ MIN ≤ MAX, got {self.solvers!r}")
        return lo, hi

    def pretrains(self) -> bool:
        """PCE pretraining (Alg. 1 line 2) before the method's epochs: the method starts
        from a PCE model, --init does not give it, and --pretrain-epochs is not 0 (Dense-GD
        from the backbone in the paper)."""
        from trainer.methods import METHODS

        return METHODS[self.method].starts_from_pce and not self.init and self.pretrain_epochs > 0

    def shard_base(self) -> str:
        from shared.storage import join

        return self.shards or join(self.out, "shards")

    def validate(self) -> None:
        from trainer.architectures import ARCHITECTURES
        from trainer.data import LAYOUTS
        from trainer.methods import METHODS

        _check(self.method in METHODS, "--method", f"must be one of {tuple(METHODS)}")
        _check(self.format in LAYOUTS, "--format", f"must be one of {tuple(LAYOUTS)}")
        self.scribbles = check_scribbles(self.scribbles)
        _check(self.schedule in SCHEDULES, "--schedule", f"must be one of {SCHEDULES}")
        _check(self.epochs >= 1, "--epochs", f"must be ≥ 1, got {self.epochs}")
        _check(self.batch_size >= 1, "--batch-size", f"must be ≥ 1, got {self.batch_size}")
        if self.lr is None:
            self.lr = FINE_TUNE_LR if self.init or self.pretrains() else SCRATCH_LR
        if self.pretrain_lr is None:
            self.pretrain_lr = SCRATCH_LR
        _check(self.lr > 0, "--lr", f"must be > 0, got {self.lr}")
        _check(self.optimizer in OPTIMIZERS, "--optimizer", f"must be one of {OPTIMIZERS}")
        _check(self.eps_model in EPS_MODELS, "--eps-model", f"must be one of {EPS_MODELS}")
        self.augmentation = self.augmentation or ("crop" if self.format == "synthetic" else "default")
        _check(self.augmentation in AUGMENTATIONS, "--augmentation", f"must be one of {AUGMENTATIONS}")
        _check(self.arch in ("", *ARCHITECTURES), "--arch", f"must be one of {tuple(ARCHITECTURES)}")
        _check(self.pretrain_epochs >= 0, "--pretrain-epochs", "must be ≥ 0")
        _check(self.epochs_per_round >= 1, "--epochs-per-round", "must be ≥ 1")
        _check(self.max_staleness >= 0, "--max-staleness", "must be ≥ 0")
        _check(0 < self.max_stall < math.inf, "--max-stall", f"must be finite and > 0 seconds, got {self.max_stall}")
        _check(0 < self.solver_wait < math.inf, "--solver-wait", f"must be finite and > 0 seconds, got {self.solver_wait}")
        _check(0 < self.storage_patience < math.inf, "--storage-patience",
               f"must be finite and > 0 seconds, got {self.storage_patience}")
        _check(self.solver_retries >= 0, "--solver-retries", f"must be ≥ 0, got {self.solver_retries}")
        _check(self.shard_size >= 1, "--shard-size", "must be ≥ 1")
        _check(self.num_workers >= 1, "--workers", "must be ≥ 1")
        _check(self.batch_size % self.num_workers == 0, "--batch-size",
               f"is the global batch: {self.batch_size} does not split evenly over --workers {self.num_workers}")
        _check(self.pretrain_lr > 0, "--pretrain-lr", f"must be > 0, got {self.pretrain_lr}")
        _check(self.max_failures >= 0, "--max-failures", f"must be ≥ 0, got {self.max_failures}")
        _check(self.loader_workers is None or self.loader_workers >= 0, "--loader-workers", f"must be ≥ 0, got {self.loader_workers}")
        _check(self.crop_size >= 0, "--crop-size", "must be ≥ 0")
        _check(self.max_image_pixels >= 1, "--max-image-pixels", "must be ≥ 1")
        _check(self.eval_every >= 1, "--eval-every", f"must be ≥ 1, got {self.eval_every}")
        _check(self.seed >= 0, "--seed", f"must be ≥ 0 (numpy's generators take no negative seed), got {self.seed}")
        _check(0 <= self.momentum < 1, "--momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be ≥ 0, got {self.weight_decay}")
        _check(self.nu is None or self.nu >= 0, "--nu", f"must be ≥ 0, got {self.nu}")
        _check(self.seed_loss in SEED_LOSSES, "--seed-loss", f"must be one of {SEED_LOSSES}, got {self.seed_loss!r}")
        _check(self.eps is None or 0 <= self.eps < 1, "--eps", f"must be in [0, (K−1)/K), got {self.eps}")
        self.solver_range()
        self.solver.validate()


def check_eps(eps: float | None, num_classes: int) -> None:
    """ε < (K−1)/K (SPEC §2): above it the outlier model gives q(s) a negative weight."""
    if eps is not None and not 0 <= eps < (num_classes - 1) / num_classes:
        raise UserError(f"--eps: must be in [0, {(num_classes - 1) / num_classes:.4g}) for K = {num_classes} classes, got {eps}")


def default_eps(num_classes: int) -> float:
    """ε with the outlier odds b/a = 0.05 of the paper's ε ≈ 0.95 at K = 21 (SPEC §2, §4).

    ε must stay below (K−1)/K, so one fixed value cannot serve every K.
    """
    return (num_classes - 1) / (num_classes + 0.05)


def _check(ok: bool, option: str, why: str) -> None:
    if not ok:
        raise UserError(f"{option}: {why}")


SOLVER_FIELDS = frozenset(f.name for f in dataclasses.fields(SolverConfig))


def set_option(cfg: TrainConfig, name: str, value) -> None:
    """Set one option by its flat name: stage-A options live on cfg.solver."""
    setattr(cfg.solver if name in SOLVER_FIELDS else cfg, name, value)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Build a config dataclass from a (possibly nested) dict; unknown keys and values of
    the wrong type (a TOML `epochs = "20"`) are errors naming the key."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        name = key.replace("-", "_")
        if name not in names:
            raise UserError(f"unknown configuration key {key!r}")
        if name == "solver" and isinstance(value, dict):
            value = from_dict(SolverConfig, value)
        else:
            value = _typed(key, value, hints[name])
        kwargs[name] = value
    return cls(**kwargs)


def _typed(key: str, value, hint):
    """`value` as the field's type: ints widen to floats, numbers to strings where a string
    is expected; nothing else is converted."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool) or value is None:
        pass
    elif float in allowed and isinstance(value, int):
        return float(value)
    elif str in allowed and isinstance(value, (int, float)):  # solvers = 4, scribbles = 0.5
        return str(value)
    for t in allowed:
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = " or ".join(t.__name__ for t in allowed if t is not type(None))
    raise UserError(f"configuration key {key!r}: expected {names}, got {type(value).__name__} {value!r}")
