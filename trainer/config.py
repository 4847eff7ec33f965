"""The trainer's typed configuration: `TrainConfig` (one training run, SPEC §4, §8), the
augmentation modes (the data formats are `trainer.formats`'s) and the layering of a run's configuration from
defaults, a preset, a run's config.toml, a --config file and the flags given
(`resolve_train_config`). The command line and TOML files map onto it.

Defaults are the ones that suit the built-in synthetic data set on a laptop; the
paper's VOC settings (SPEC §4) are the `paper` preset (`trainer.presets`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from shared.config import SOLVER_FIELDS, SolverConfig, check_option, from_dict, to_dict
from shared.errors import UserError
from shared.labels import check_scribbles
from trainer.formats import LAYOUTS

SCHEDULES = ("overlapped", "sync")
OPTIMIZERS = ("sgd", "adamw")
SEED_LOSSES = ("ce", "l2")  # grid-gd's seed term (trainer/methods.py)
EPS_MODELS = ("const", "learned", "learned-per-class")  # the outlier models of trainer/outliers.py
SCRATCH_LR = 3e-3  # AdamW on the UNet from scratch (docs/recipe-synthetic)
FINE_TUNE_LR = 3e-4  # a tenth of SCRATCH_LR, as the paper's Grid-TR rate is of PCE-GD's
PRECISIONS = ("auto", "fp32")  # trainer.engine.amp_dtype
AUGMENTATIONS = ("default", "reference", "crop")  # trainer/transforms.py: ours, the authors' VOC one (SPEC §4), crop only


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
    # "crop" (crop only); "": the format's (trainer/formats.py): crop on the synthetic format, whose classes differ by stripe
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
    # "auto": bf16 autocast on CUDA devices that run it natively (trainer.engine.amp_dtype);
    # "fp32": float32 throughout, as the reference implementation trains
    precision: str = "auto"
    eval_every: int = 1  # epochs between evaluations
    resume: bool = False

    def solver_range(self) -> tuple[int, int]:
        try:
            parts = [int(p) for p in str(self.solvers).split(":")]
        except ValueError:
            raise UserError(f"--solvers: expected N or MIN:MAX, got {self.solvers!r}") from None
        lo, hi = (parts[0], parts[0]) if len(parts) == 1 else parts[:2]
        check_option(len(parts) <= 2 and 1 <= lo <= hi, "--solvers", f"needs 1 ≤ MIN ≤ MAX, got {self.solvers!r}")
        return lo, hi

    def pretrains(self) -> bool:
        """PCE pretraining (Alg. 1 line 2) before the method's epochs: the method starts
        from a PCE model, --init does not give it, and --pretrain-epochs is not 0 (Dense-GD
        from the backbone in the paper)."""
        from trainer.methods import METHODS

        return METHODS[self.method].starts_from_pce and not self.init and self.pretrain_epochs > 0

    def fine_tune_from(self, pce: "TrainConfig") -> "TrainConfig":
        """PCE-GD, then fine-tune (Alg. 1 line 2 as a run of its own): start from the model
        that the run `pce` trains, its checkpoints/last.pt as --init, with its network; the
        backbone weights are in that model already. Every experiment that trains PCE-GD
        first calls this for the runs that continue from it. Returns self."""
        from trainer.architectures import resolve_arch
        from trainer.run_folder import RunFolder

        self.init = RunFolder(pce.out).last
        self.arch = resolve_arch(pce.arch, None, pce.backbone_weights)
        self.backbone_weights = None
        return self

    def shard_base(self) -> str:
        from trainer.run_folder import RunFolder

        return self.shards or RunFolder(self.out).shards

    def validate(self) -> None:
        from trainer.architectures import ARCHITECTURES
        from trainer.methods import METHODS

        check_option(self.method in METHODS, "--method", f"must be one of {tuple(METHODS)}")
        check_option(self.format in LAYOUTS, "--format", f"must be one of {tuple(LAYOUTS)}")
        self.scribbles = check_scribbles(self.scribbles)
        check_option(self.schedule in SCHEDULES, "--schedule", f"must be one of {SCHEDULES}")
        check_option(self.epochs >= 1, "--epochs", f"must be ≥ 1, got {self.epochs}")
        check_option(self.batch_size >= 1, "--batch-size", f"must be ≥ 1, got {self.batch_size}")
        if self.lr is None:
            self.lr = FINE_TUNE_LR if self.init or self.pretrains() else SCRATCH_LR
        if self.pretrain_lr is None:
            self.pretrain_lr = SCRATCH_LR
        check_option(self.lr > 0, "--lr", f"must be > 0, got {self.lr}")
        check_option(self.optimizer in OPTIMIZERS, "--optimizer", f"must be one of {OPTIMIZERS}")
        check_option(self.eps_model in EPS_MODELS, "--eps-model", f"must be one of {EPS_MODELS}")
        self.augmentation = self.augmentation or LAYOUTS[self.format].augmentation
        check_option(self.augmentation in AUGMENTATIONS, "--augmentation", f"must be one of {AUGMENTATIONS}")
        check_option(self.precision in PRECISIONS, "--precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        check_option(self.arch in ("", *ARCHITECTURES), "--arch", f"must be one of {tuple(ARCHITECTURES)}")
        check_option(self.pretrain_epochs >= 0, "--pretrain-epochs", "must be ≥ 0")
        check_option(self.epochs_per_round >= 1, "--epochs-per-round", "must be ≥ 1")
        check_option(self.max_staleness >= 0, "--max-staleness", "must be ≥ 0")
        check_option(0 < self.max_stall < math.inf, "--max-stall", f"must be finite and > 0 seconds, got {self.max_stall}")
        check_option(0 < self.solver_wait < math.inf, "--solver-wait", f"must be finite and > 0 seconds, got {self.solver_wait}")
        check_option(0 < self.storage_patience < math.inf, "--storage-patience",
               f"must be finite and > 0 seconds, got {self.storage_patience}")
        check_option(self.solver_retries >= 0, "--solver-retries", f"must be ≥ 0, got {self.solver_retries}")
        check_option(self.shard_size >= 1, "--shard-size", "must be ≥ 1")
        check_option(self.num_workers >= 1, "--workers", "must be ≥ 1")
        check_option(self.batch_size % self.num_workers == 0, "--batch-size",
               f"is the global batch: {self.batch_size} does not split evenly over --workers {self.num_workers}")
        check_option(self.pretrain_lr > 0, "--pretrain-lr", f"must be > 0, got {self.pretrain_lr}")
        check_option(self.max_failures >= 0, "--max-failures", f"must be ≥ 0, got {self.max_failures}")
        check_option(self.loader_workers is None or self.loader_workers >= 0, "--loader-workers", f"must be ≥ 0, got {self.loader_workers}")
        check_option(self.crop_size >= 0, "--crop-size", "must be ≥ 0")
        check_option(self.max_image_pixels >= 1, "--max-image-pixels", "must be ≥ 1")
        check_option(self.eval_every >= 1, "--eval-every", f"must be ≥ 1, got {self.eval_every}")
        check_option(self.seed >= 0, "--seed", f"must be ≥ 0 (numpy's generators take no negative seed), got {self.seed}")
        check_option(0 <= self.momentum < 1, "--momentum", f"must be in [0, 1), got {self.momentum}")
        check_option(self.weight_decay >= 0, "weight_decay", f"must be ≥ 0, got {self.weight_decay}")
        check_option(self.nu is None or self.nu >= 0, "--nu", f"must be ≥ 0, got {self.nu}")
        check_option(self.seed_loss in SEED_LOSSES, "--seed-loss", f"must be one of {SEED_LOSSES}, got {self.seed_loss!r}")
        check_option(self.eps is None or 0 <= self.eps < 1, "--eps", f"must be in [0, (K−1)/K), got {self.eps}")
        self.solver_range()
        self.solver.validate()


def resolve_train_config(params: dict) -> TrainConfig:
    """The run's configuration from the train options as the CLI parsed them ({option:
    value}, None where not given; `resume_dir`, `config_file`, `preset`): defaults ←
    --preset ← --resume DIR's config.toml ← --config FILE ← flags given."""
    from trainer.presets import apply_preset, check_start
    from trainer.run_folder import RunFolder
    from trainer.tomlio import read_toml

    values: dict = {}
    resume_dir = params.pop("resume_dir")
    config_file = params.pop("config_file")
    preset = params.pop("preset", None)
    if resume_dir:
        values.update(read_toml(RunFolder(resume_dir).config, "--resume"))
    if config_file:
        values.update(read_toml(config_file))
    solver = values.pop("solver", {})
    if not isinstance(solver, dict):  # a TOML `solver = 5`: the stage-A options are a [solver] table
        source = f"--config {config_file}" if config_file else f"--resume {RunFolder(resume_dir).config}"
        raise UserError(f"{source}: key 'solver': expected a [solver] table, got {type(solver).__name__} {solver!r}")
    solver = dict(solver)
    for key, value in params.items():
        if value is None:
            continue
        if key in SOLVER_FIELDS:
            solver[key] = value
        else:
            values[key] = value
    for key in list(values):
        if key.replace("-", "_") in SOLVER_FIELDS:
            solver[key.replace("-", "_")] = values.pop(key)
    cfg = from_dict(TrainConfig, values)
    cfg.solver = from_dict(SolverConfig, solver)
    if preset:  # the preset fills only what nothing above set (trainer/presets.py)
        apply_preset(cfg, preset, explicit=[*values, *solver])
        check_start(preset, cfg.backbone_weights, cfg.init, takes_init=True)
    if resume_dir:
        cfg.out, cfg.resume = resume_dir, True
    if not cfg.data:
        raise UserError("--data: required (a data set root)")
    return cfg


def config_toml(cfg: TrainConfig) -> str:
    """What the run's config.toml would hold (`train --print-config`): `cfg` validated, its
    network resolved (--init's network is read when the run starts)."""
    from trainer.architectures import resolve_arch
    from trainer.tomlio import dumps

    cfg.validate()
    cfg.arch = resolve_arch(cfg.arch, None, cfg.backbone_weights)
    return dumps(to_dict(cfg))


def check_eps(eps: float | None, num_classes: int) -> None:
    """ε < (K−1)/K (SPEC §2): above it the outlier model gives q(s) a negative weight."""
    if eps is not None and not 0 <= eps < (num_classes - 1) / num_classes:
        raise UserError(f"--eps: must be in [0, {(num_classes - 1) / num_classes:.4g}) for K = {num_classes} classes, got {eps}")


def default_eps(num_classes: int) -> float:
    """ε with the outlier odds b/a = 0.05 of the paper's ε ≈ 0.95 at K = 21 (SPEC §2, §4).

    ε must stay below (K−1)/K, so one fixed value cannot serve every K.
    """
    return (num_classes - 1) / (num_classes + 0.05)


def typed_option(key: str, value):
    """`value` as configuration key `key` (TrainConfig's or stage A's) takes it; an error
    naming the key where it does not (a TOML `nu = "x"`, an unknown key)."""
    return getattr(from_dict(SolverConfig if key in SOLVER_FIELDS else TrainConfig, {key: value}), key)
