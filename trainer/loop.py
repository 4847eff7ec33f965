"""Alg. 1 on one Ray Train worker: PCE pretraining, then rounds of stage A and stage B.

`train_loop_per_worker` is the algorithm; the rest of the file is its parts. Stage A's
solvers are not here: the worker writes a snapshot at the start of every round and
reads back the proposals that the solver farm writes (SPEC §4, §6). Rank 0 writes
the run's outputs; every rank trains on its share of the data (DDP).

Every epoch ends with `ray.train.report(metrics, checkpoint)`: the checkpoint (rank
0's, one file) holds what a restarted worker needs (weights, optimizer, phase, epoch
and round counters, outlier model, stage-A counters), and Ray Train keeps the latest
and the best by val mIoU (`CHECKPOINT_SCORE`). The same state goes to the run folder's
checkpoints/last.pt for users (`--init`, `eval`, `--resume`). That state is one
`LoopState`, saved and restored by `Checkpoints` alone. The last report carries
the trainer's summary, which the driver reads from the `Result` of `fit()`.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field, fields, replace

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from shared import storage
from shared.config import from_dict
from trainer.config import TrainConfig, default_eps
from trainer import engine
from trainer.architectures import build_model
from trainer.datasets import EvalSet, ImageCache, TrainSet
from trainer.splits import load_split, read_classes
from trainer.methods import METHODS
from trainer.outliers import OutlierModel
from trainer.model import load_backbone_weights
from trainer.run_folder import RunFolder
from trainer.runlog import RunLog, checkpoint_bytes, load_checkpoint
from trainer.stage_a import StageA, summary as stage_a_summary
from trainer.visualize import write_panels

CACHE_MAX_IMAGES = 2000  # decoded images kept in memory: the synthetic sets, not VOC's 10,582
CHECKPOINT_FILE = "state.pt"  # the one file of a Ray Train checkpoint
# Ray Train's checkpoint_score_attribute: the val mIoU of an evaluated epoch of the
# method's phase, -1 otherwise (never the best); every report carries it
CHECKPOINT_SCORE = "checkpoint_val_miou"
# the key of the last report that carries the trainer's summary to the driver (not "summary":
# a Tune trial's own result has that one, experiments/trials.py)
SUMMARY_KEY = "trainer_summary"


def train_loop_per_worker(config: dict) -> None:
    """Alg. 1. Line 1: the network from ImageNet weights (or --init's model); line 2: the
    PCE-GD pretraining phase; lines 3-14: the method's phase. Each epoch of a method that
    trains on proposals starts with stage A (lines 5-7: a round's snapshot at its first
    epoch, then the freshest proposals s); then one epoch of stage B (lines 8-13: SGD on
    the method's loss, γ on the poly schedule), evaluation and a checkpoint (`LoopState`,
    which a restarted worker goes on from)."""
    w = Worker.start(config)
    data = Data.load(w)
    checkpoints = Checkpoints(w, data.classes)
    state = checkpoints.resume()  # a fresh run's, or where a restarted worker left off
    net, model, outliers = build_network(w, data.num_classes, state)  # line 1
    stage_a, plan = None, phases(w.cfg)
    for phase, (method, epochs) in enumerate(plan):  # line 2, then lines 3-14
        if phase < state.phase:
            continue  # done before a restart
        resumed = state.resumes(phase)
        start = state.epoch if resumed else 0
        stage_b = StageB(w, net, model, data.loader, method, outliers, start, epochs,
                         state.optimizer if resumed else None)  # line 3
        if METHODS[method].needs_proposals:
            stage_a = start_stage_a(w, data, state.stage_a if resumed else None)
        for epoch in range(start, epochs):  # lines 4, 14
            record = {"phase": method, "epoch": state.global_epoch + 1}
            if METHODS[method].needs_proposals:  # lines 5-7
                labels, figures = stage_a.before_epoch(net, epoch, verify=resumed and epoch == start)
                data.trainset.set_proposals(labels)
                record.update(figures, eps=outliers.value())  # ε as this epoch starts
            record.update(stage_b.epoch(data.trainset, state.global_epoch))  # lines 8-13
            state.global_epoch += 1
            state.stage_b_s += record["stage_b_s"]
            if epoch == epochs - 1 or state.global_epoch % w.cfg.eval_every == 0:
                evaluate_epoch(record, w, model, net, data, state.global_epoch)
            state.advance(phase, method, epoch + 1, record.get("val_miou"), net, stage_b.optimizer, outliers, stage_a)
            checkpoints.save(state, record, phase_done=epoch == epochs - 1, final=phase == len(plan) - 1)
    w.log.close()


def phases(cfg: TrainConfig) -> list[tuple[str, int]]:
    """PCE pretraining (Alg. 1 line 2) unless --init gives the pretrained model, or
    --pretrain-epochs 0 starts the method from the backbone (Dense-GD in the paper)."""
    if cfg.pretrains():
        return [(METHODS[cfg.method].pretrain, cfg.pretrain_epochs), (cfg.method, cfg.epochs)]
    return [(cfg.method, cfg.epochs)]


def train_split(cfg: TrainConfig):
    """Full supervision needs the masks, every other method the scribbles."""
    full = METHODS[cfg.method].uses_masks
    return load_split(cfg.data, cfg.format, "train", cfg.scribbles, require_seeds=not full, require_masks=full)


def train_loader(trainset, cfg: TrainConfig, rank: int, world: int, pin_memory: bool = False) -> DataLoader:
    """Stage B's batches on this rank: `--batch-size` is the global batch, split evenly
    over the ranks, and each rank draws a disjoint share of one shuffle of the training
    set, a new shuffle each epoch (`set_loader_epoch`). Loader processes are made anew
    each epoch, so they see the epoch's proposals and augmentation seed."""
    per_rank = cfg.batch_size // world
    sampler = DistributedSampler(trainset, world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    share = len(sampler) if sampler is not None else len(trainset)
    return DataLoader(trainset, batch_size=per_rank, shuffle=sampler is None, sampler=sampler,
                      drop_last=cfg.drop_last and share > per_rank, num_workers=cfg.loader_workers, pin_memory=pin_memory)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """The distributed sampler's shuffle for this epoch (Ray Train does not set it)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


@dataclass
class Worker:
    """This Ray Train worker: its configuration, run id, rank, device and run log (rank 0 writes)."""
    cfg: TrainConfig
    run_id: str
    rank: int
    world: int
    device: torch.device
    log: RunLog

    @classmethod
    def start(cls, config: dict) -> "Worker":
        """The worker of `train_loop_per_worker`'s config (a TrainConfig's fields and the
        run id), its torch generator seeded (`--seed` + rank)."""
        config = dict(config)
        run_id = config.pop("run_id", "")
        cfg = from_dict(TrainConfig, config)
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device()
        torch.manual_seed(cfg.seed + rank)
        if cfg.deterministic:
            engine.make_deterministic()
        return cls(cfg, run_id, rank, world, device, RunLog(cfg.out, enabled=rank == 0))


@dataclass
class Data:
    """The run's data on this worker: the classes, the training split (augmented for stage
    B, unaugmented for snapshots and panels), the val split, and stage B's loader."""
    classes: list[str]
    train_samples: list
    trainset: TrainSet
    train_eval: EvalSet
    valset: EvalSet
    loader: DataLoader

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def load(cls, w: Worker) -> "Data":
        cfg = w.cfg
        classes = read_classes(cfg.data, cfg.format)
        K = len(classes)
        train_samples = train_split(cfg)
        cache = ImageCache(enabled=len(train_samples) <= CACHE_MAX_IMAGES)  # one for all three: each image held once
        trainset = TrainSet(train_samples, K, cfg.crop_size, augment=True, seed=cfg.seed + w.rank, cache=cache,
                            augmentation=cfg.augmentation)
        valset = EvalSet(load_split(cfg.data, cfg.format, "val", cfg.scribbles), K, cache=cache)
        train_eval = EvalSet(train_samples, K, cache=cache)
        loader = train_loader(trainset, cfg, w.rank, w.world, pin_memory=w.device.type == "cuda")
        return cls(classes, train_samples, trainset, train_eval, valset, loader)


@dataclass
class LoopState:
    """Where Alg. 1 stands on this worker: all that a checkpoint holds (last.pt, best.pt,
    Ray Train's), under the checkpoint's keys (`checkpoint`, `from_checkpoint`). Saved
    and restored by `Checkpoints` only."""
    run_id: str = ""
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    arch: str = ""
    precision: str = "auto"  # --precision: eval and predict infer as training evaluated
    phase: int = 0  # the phase of `phases(cfg)` it is in
    method: str = ""  # that phase's
    epoch: int = 0  # the phase's epochs done
    global_epoch: int = 0  # the run's epochs done
    val_miou: float | None = None  # the last epoch's (None: not evaluated)
    best_miou: float = -1.0  # the best val mIoU of the method's phase (best.pt's)
    stage_b_s: float = 0.0  # seconds in stage B, all epochs
    model: dict | None = None  # state dicts: the network's, the optimizer's, the outlier model's
    optimizer: dict | None = None
    outliers: dict | None = None
    stage_a: dict | None = None  # StageA.state(): stall and staleness counters
    resumed: bool = field(default=False, metadata={"saved": False})  # read from a checkpoint

    def checkpoint(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("saved", True)}

    @classmethod
    def from_checkpoint(cls, state: dict, **now) -> "LoopState":
        """A checkpoint's state (one of an older version too: the keys it lacks take their
        defaults), with the fields in `now` (this run's identity) replaced."""
        saved = {f.name for f in fields(cls) if f.metadata.get("saved", True)}
        return replace(cls(**{k: v for k, v in state.items() if k in saved}, resumed=True), **now)

    def resumes(self, phase: int) -> bool:
        """`phase` is the one a restarted worker is in (its optimizer, epoch, stage A go on)."""
        return self.resumed and phase == self.phase

    def advance(self, phase: int, method: str, epoch: int, val_miou: float | None, net, optimizer, outliers,
                stage_a: StageA | None) -> None:
        """The state after an epoch: `epoch` of `phase` done, the live objects' state dicts."""
        self.phase, self.method, self.epoch, self.val_miou = phase, method, epoch, val_miou
        self.model, self.optimizer, self.outliers = net.state_dict(), optimizer.state_dict(), outliers.state_dict()
        self.stage_a = stage_a.state() if stage_a else None


class Checkpoints:
    """The one place a `LoopState` is saved (every epoch) and restored (a restarted worker,
    `--resume`), with the run folder's checkpoint files and Ray Train's checkpoints."""

    def __init__(self, w: Worker, classes: list[str]):
        self.w, self.folder = w, RunFolder(w.cfg.out)
        self.identity = dict(run_id=w.run_id, num_classes=len(classes), class_names=classes, arch=w.cfg.arch,
                             precision=w.cfg.precision)

    def resume(self) -> LoopState:
        """Where this run left off (`last_checkpoint`), else a fresh state."""
        saved = last_checkpoint(self.w.cfg, self.w.run_id)
        if saved is None:
            return LoopState(**self.identity)
        # metrics.jsonl may hold the epoch after the checkpoint (killed in between): it is run again
        self.w.log.drop_epochs_after(saved["global_epoch"])
        if self.w.rank == 0 and saved.get("val_miou") is not None and saved["val_miou"] == saved["best_miou"]:
            # the checkpoint is the best so far: a worker lost between reporting it and writing
            # best.pt (written last, in `save`) left best.pt an older model
            self.w.log.write_checkpoint(self.folder.best, checkpoint_bytes(saved))
        return LoopState.from_checkpoint(saved, **self.identity)

    def save(self, state: LoopState, record: dict, *, phase_done: bool, final: bool) -> None:
        """The epoch's `record` to metrics.jsonl and Ray Train, `state` to checkpoints/last.pt,
        Ray Train's checkpoint, best.pt where the method's phase reached its best val mIoU,
        and METHOD.pt where a phase that another follows is done."""
        improved = final and "val_miou" in record and record["val_miou"] > state.best_miou
        if improved:
            state.best_miou = record["val_miou"]
        log = self.w.log
        blob = checkpoint_bytes(state.checkpoint()) if self.w.rank == 0 else None  # one serialisation for every copy
        if phase_done and not final:
            log.write_checkpoint(self.folder.phase_end(state.method), blob)
        log.log_epoch(record, state.global_epoch)  # before last.pt: a resume drops lines past it
        log.write_checkpoint(self.folder.last, blob)
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float, str))}
        metrics[CHECKPOINT_SCORE] = record["val_miou"] if final and "val_miou" in record else -1.0
        if final and phase_done:
            metrics[SUMMARY_KEY] = {
                **stage_a_summary(state.stage_a), "stage_b_s": state.stage_b_s,
                "val_miou": record.get("val_miou"), "per_class_iou": record.get("per_class_iou"),
                "trimap": record.get("trimap"), "epochs": state.global_epoch,
            }
        report(metrics, blob)
        # after last.pt and Ray Train's checkpoint, which record this best: a worker restarted
        # from an earlier checkpoint would otherwise compare against an older best and could
        # overwrite best.pt with a worse model
        if improved:
            log.write_checkpoint(self.folder.best, blob)


def last_checkpoint(cfg: TrainConfig, run_id: str) -> dict | None:
    """Where this run left off: the latest checkpoint Ray Train holds for it (after a lost
    worker, FailureConfig; or after `--resume` where Ray Train's storage of the run
    survived), else its checkpoints/last.pt (`--resume` without it: a remote --out
    resumed on another machine). A last.pt of another run is not there: the driver
    claimed the folder."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(os.path.join(folder, CHECKPOINT_FILE))
        if state.get("run_id") == run_id:
            return state
    uri = RunFolder(cfg.out).last
    if not storage.exists(uri):
        return None
    state = load_checkpoint(uri)
    return state if cfg.resume or state.get("run_id") == run_id else None


def build_network(w: Worker, num_classes: int, state: LoopState):
    """The run's network (--arch, with ImageNet backbone weights, --init or the resumed
    weights), the model stage B trains (DDP over the ranks), and the outlier model ε."""
    cfg = w.cfg
    outliers = OutlierModel(cfg.eps_model, cfg.eps if cfg.eps is not None else default_eps(num_classes),
                            num_classes).to(w.device)
    net = build_model(cfg.arch, num_classes)
    if cfg.backbone_weights:
        load_backbone_weights(net, cfg.backbone_weights)
    if cfg.init:
        net.load_state_dict(load_checkpoint(cfg.init)["model"])
    if state.model is not None:
        net.load_state_dict(state.model)
    if state.outliers is not None:
        outliers.load_state_dict(state.outliers)
    if cfg.sync_bn and w.world > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net, ray.train.torch.prepare_model(net), outliers


def start_stage_a(w: Worker, data: Data, counters: dict | None) -> StageA:
    """Stage A of a phase that trains on proposals, with a restarted worker's `counters`."""
    stage_a = StageA(w.cfg, w.run_id, data.train_samples, data.train_eval, data.num_classes, w.device, w.rank,
                     w.world)
    if counters:
        stage_a.restore(counters)
    return stage_a


class StageB:
    """Alg. 1 lines 8-13 over one phase: SGD epochs on the method's loss, the rate γ on
    the poly schedule (line 11) from the phase's base rate (line 3)."""

    def __init__(self, w: Worker, net, model, loader: DataLoader, method: str, outliers: OutlierModel, start: int,
                 epochs: int, optimizer_state: dict | None):
        self.w, self.model, self.loader, self.method, self.outliers = w, model, loader, method, outliers
        lr = w.cfg.pretrain_lr if method != w.cfg.method else w.cfg.lr
        learned = outliers.param_groups(lr) if METHODS[method].needs_proposals else []  # ε trains with the robust loss
        self.optimizer, self.base_lrs = make_optimizer(net, w.cfg, lr, optimizer_state, learned)
        steps_per_epoch = max(1, len(loader))
        self.step, self.total_steps = start * steps_per_epoch, epochs * steps_per_epoch

    def epoch(self, trainset: TrainSet, global_epoch: int) -> dict:
        """One epoch (the run's `global_epoch`: its shuffle and augmentation); its figures."""
        cfg, device = self.w.cfg, self.w.device
        trainset.set_epoch(global_epoch)
        set_loader_epoch(self.loader, global_epoch)
        t0 = time.perf_counter()
        loss, self.step = engine.train_epoch(
            self.model, self.loader, self.optimizer, method=self.method, eps=self.outliers, nu=cfg.nu, device=device,
            step=self.step, total_steps=self.total_steps, base_lrs=self.base_lrs,
            batch_average=cfg.batch_average, seed_loss=cfg.seed_loss, precision=cfg.precision,
        )
        record = {"loss": loss, "lr": self.optimizer.param_groups[0]["lr"], "stage_b_s": time.perf_counter() - t0}
        if device.type == "cuda":  # the training step's peak, for the GPU benchmark (benchmarks/gpu_voc.py)
            record["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        return record


def evaluate_epoch(record: dict, w: Worker, model, net, data: Data, global_epoch: int) -> None:
    """Val mIoU and its figures into the epoch's `record` (tests/besthook.py reads the
    record from this frame); rank 0 writes the epoch's panels."""
    record.update(_evaluate(model, data.valset, data.num_classes, w.device, w.rank, w.world, w.cfg.precision))
    if w.rank == 0:
        write_panels(w.log, net, {"val": data.valset, "train": data.train_eval}, data.trainset.proposals, w.device,
                     global_epoch, data.classes, w.cfg.precision)


def report(metrics: dict, blob: bytes | None) -> None:
    """One epoch's metrics to Ray Train, with the checkpoint's bytes (rank 0 gives them,
    the other ranks None: every rank reports, as Ray Train requires)."""
    with tempfile.TemporaryDirectory(prefix="trseg-checkpoint-") as folder:
        checkpoint = None
        if blob is not None:
            with open(os.path.join(folder, CHECKPOINT_FILE), "wb") as f:
                f.write(blob)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def make_optimizer(net, cfg: TrainConfig, lr: float, state: dict | None = None, extra: list[dict] = ()):
    """A phase's optimizer over the model's parameter groups at base rate `lr` (and the
    `extra` groups: a learned outlier model), and their base learning rates (before any
    decay); `state` (a checkpoint's optimizer state) is loaded."""
    optimizer = engine.make_optimizer([*net.param_groups(lr), *extra], cfg.optimizer, lr, cfg.momentum,
                                      cfg.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    if state is not None:
        optimizer.load_state_dict(state)
    return optimizer, base_lrs


def _evaluate(model, valset, K, device, rank, world, precision="auto") -> dict:
    """Val confusions on this rank's share, summed over ranks. A DDP `model` is evaluated
    as its plain network (see `engine.confusions`: a rank may have no val image)."""
    net = model.module if isinstance(model, DistributedDataParallel) else model
    conf, trimap = engine.confusions(net, valset, K, device, indices=range(rank, len(valset), world),
                                     precision=precision)
    if world > 1:
        conf, trimap = conf.to(device), trimap.to(device)
        dist.all_reduce(conf)
        dist.all_reduce(trimap)
    return engine.scores(conf.cpu(), trimap.cpu())
