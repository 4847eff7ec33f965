"""Alg. 1 on one Ray Train worker: PCE pretraining, then rounds of stage B.

Stage A is not here: the worker writes a snapshot at the start of every round and
reads back the proposals that the solver farm writes (SPEC §4, §6). Rank 0 writes
the run's outputs; every rank trains on its share of the data (DDP).

Every epoch ends with `ray.train.report(metrics, checkpoint)`: the checkpoint (rank
0's, one file) holds what a restarted worker needs (weights, optimizer, phase, epoch
and round counters, outlier model, stage-A counters), and Ray Train keeps the latest
and the best by val mIoU (`CHECKPOINT_SCORE`). The same state goes to the run folder's
checkpoints/last.pt for users (`--init`, `eval`, `--resume`). The last report carries
the trainer's summary, which the driver reads from the `Result` of `fit()`.
"""
from __future__ import annotations

import os
import tempfile
import time

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
from trainer.data import EvalSet, TrainSet, load_split, read_classes
from trainer.methods import METHODS
from trainer.outliers import OutlierModel
from trainer.model import load_backbone_weights
from trainer.run_folder import RunFolder
from trainer.runlog import RunLog, checkpoint_bytes, load_checkpoint
from trainer.stage_a import NO_STAGE_A, StageA
from trainer.visualize import write_panels

CACHE_MAX_IMAGES = 2000  # decoded images kept in memory: the synthetic sets, not VOC's 10,582
CHECKPOINT_FILE = "state.pt"  # the one file of a Ray Train checkpoint
# Ray Train's checkpoint_score_attribute: the val mIoU of an evaluated epoch of the
# method's phase, -1 otherwise (never the best); every report carries it
CHECKPOINT_SCORE = "checkpoint_val_miou"
# the key of the last report that carries the trainer's summary to the driver (not "summary":
# a Tune trial's own result has that one, experiments/trials.py)
SUMMARY_KEY = "trainer_summary"


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


def build_network(cfg: TrainConfig, num_classes: int, resume: dict | None):
    """The run's network: --arch, with ImageNet backbone weights, --init or the resumed weights."""
    net = build_model(cfg.arch, num_classes)
    if cfg.backbone_weights:
        load_backbone_weights(net, cfg.backbone_weights)
    if cfg.init:
        net.load_state_dict(load_checkpoint(cfg.init)["model"])
    if resume:
        net.load_state_dict(resume["model"])
    return net


def train_loop_per_worker(config: dict) -> None:
    """Alg. 1: PCE pretraining, then per epoch (stage A's proposals when the method
    needs them,) one epoch of stage B, evaluation, checkpoint and metrics."""
    config = dict(config)
    run_id = config.pop("run_id", "")
    cfg = from_dict(TrainConfig, config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    if cfg.deterministic:
        engine.make_deterministic()
    log = RunLog(cfg.out, enabled=rank == 0)

    classes = read_classes(cfg.data, cfg.format)
    K = len(classes)
    outliers = OutlierModel(cfg.eps_model, cfg.eps if cfg.eps is not None else default_eps(K), K).to(device)
    train_samples = train_split(cfg)
    cache = len(train_samples) <= CACHE_MAX_IMAGES
    trainset = TrainSet(train_samples, K, cfg.crop_size, augment=True, seed=cfg.seed + rank, cache=cache,
                        augmentation=cfg.augmentation)
    valset = EvalSet(load_split(cfg.data, cfg.format, "val", cfg.scribbles), K, cache=cache)
    train_eval = EvalSet(train_samples, K, cache=cache)  # unaugmented: snapshots and panels
    loader = train_loader(trainset, cfg, rank, world, pin_memory=device.type == "cuda")
    resume = last_checkpoint(cfg, run_id)
    if resume:  # metrics.jsonl may hold the epoch after the checkpoint (killed in between): it is run again
        log.drop_epochs_after(resume["global_epoch"])
    net = build_network(cfg, K, resume)
    if resume and "outliers" in resume:
        outliers.load_state_dict(resume["outliers"])
    if cfg.sync_bn and world > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    model = ray.train.torch.prepare_model(net)

    stage_a = None
    stage_b_s = resume.get("stage_b_s", 0.0) if resume else 0.0
    best = resume["best_miou"] if resume else -1.0
    if resume and rank == 0 and resume.get("val_miou") is not None and resume["val_miou"] == best:
        # the checkpoint is the best so far: a worker lost between reporting it and writing
        # best.pt (written last, below) left best.pt an older model
        log.save_checkpoint("best.pt", checkpoint_bytes(resume))
    global_epoch = resume["global_epoch"] if resume else 0
    plan = phases(cfg)
    for phase, (method, epochs) in enumerate(plan):
        if resume and phase < resume["phase"]:
            continue
        same_phase = bool(resume) and phase == resume["phase"]
        lr = cfg.pretrain_lr if method != cfg.method else cfg.lr
        learned = outliers.param_groups(lr) if METHODS[method].needs_proposals else []  # ε trains with the robust loss
        optimizer, base_lrs = make_optimizer(net, cfg, lr, resume["optimizer"] if same_phase else None, learned)
        start = resume["epoch"] if same_phase else 0
        steps_per_epoch = max(1, len(loader))
        step = start * steps_per_epoch
        if METHODS[method].needs_proposals:
            stage_a = StageA(cfg, run_id, train_samples, train_eval, K, device, rank, world)
            if same_phase and resume.get("stage_a"):
                stage_a.restore(resume["stage_a"])
        final = phase == len(plan) - 1
        for epoch in range(start, epochs):
            record = {"phase": method, "epoch": global_epoch + 1}
            if METHODS[method].needs_proposals:  # Alg. 1 lines 4-6
                record.update(stage_a.before_epoch(net, epoch, verify=same_phase and epoch == start))
                trainset.proposals = stage_a.labels
                record["eps"] = outliers.value()  # as this epoch starts
            trainset.set_epoch(global_epoch)
            set_loader_epoch(loader, global_epoch)
            t0 = time.perf_counter()
            loss, step = engine.train_epoch(
                model, loader, optimizer, method=method, eps=outliers, nu=cfg.nu, device=device,
                step=step, total_steps=epochs * steps_per_epoch, base_lrs=base_lrs,
                batch_average=cfg.batch_average, seed_loss=cfg.seed_loss,
            )
            stage_b_s += time.perf_counter() - t0
            record.update(loss=loss, lr=optimizer.param_groups[0]["lr"], stage_b_s=time.perf_counter() - t0)
            if device.type == "cuda":  # the training step's peak, for the GPU benchmark (benchmarks/gpu_voc.py)
                record["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
            global_epoch += 1
            last = epoch == epochs - 1
            if last or global_epoch % cfg.eval_every == 0:
                record.update(_evaluate(model, valset, K, device, rank, world))
                if rank == 0:
                    write_panels(log, net, {"val": valset, "train": train_eval}, trainset.proposals, device, global_epoch, classes)
            state = {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "phase": phase,
                "epoch": epoch + 1, "global_epoch": global_epoch, "num_classes": K, "class_names": classes,
                "arch": cfg.arch, "method": method, "val_miou": record.get("val_miou"), "best_miou": best,
                "run_id": run_id, "outliers": outliers.state_dict(), "stage_b_s": stage_b_s,
                "stage_a": stage_a.state() if stage_a else None,
            }
            improved = final and "val_miou" in record and record["val_miou"] > best
            if improved:
                best = state["best_miou"] = record["val_miou"]
            blob = checkpoint_bytes(state) if rank == 0 else None  # one serialisation for every copy
            if last and not final:
                log.save_checkpoint(f"{method}.pt", blob)
            log.log_epoch(record, global_epoch)  # before last.pt: a resume drops lines past it
            log.save_checkpoint("last.pt", blob)
            metrics = {k: v for k, v in record.items() if isinstance(v, (int, float, str))}
            metrics[CHECKPOINT_SCORE] = record["val_miou"] if final and "val_miou" in record else -1.0
            if final and last:
                metrics[SUMMARY_KEY] = {
                    **(stage_a.summary() if stage_a else NO_STAGE_A), "stage_b_s": stage_b_s,
                    "val_miou": record.get("val_miou"), "per_class_iou": record.get("per_class_iou"),
                    "trimap": record.get("trimap"), "epochs": global_epoch,
                }
            report(metrics, blob)
            # after last.pt and Ray Train's checkpoint, which record this best: a worker restarted
            # from an earlier checkpoint would otherwise compare against an older best and could
            # overwrite best.pt with a worse model
            if improved:
                log.save_checkpoint("best.pt", blob)
    log.close()


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


def _evaluate(model, valset, K, device, rank, world) -> dict:
    """Val confusions on this rank's share, summed over ranks. A DDP `model` is evaluated
    as its plain network (see `engine.confusions`: a rank may have no val image)."""
    net = model.module if isinstance(model, DistributedDataParallel) else model
    conf, trimap = engine.confusions(net, valset, K, device, indices=range(rank, len(valset), world))
    if world > 1:
        conf, trimap = conf.to(device), trimap.to(device)
        dist.all_reduce(conf)
        dist.all_reduce(trimap)
    return engine.scores(conf.cpu(), trimap.cpu())
