"""Alg. 1 on one Ray Train worker: PCE pretraining, then rounds of stage B.

Stage A is not here: the worker writes a snapshot at the start of every round and
reads back the proposals that the solver farm writes (SPEC §4, §6). Rank 0 writes
the run's outputs; every rank trains on its share of the data (DDP).
"""
from __future__ import annotations

import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.experimental import tqdm_ray
from torch.utils.data import DataLoader

from shared import shards
from shared.config import TrainConfig, default_eps, from_dict
from shared.errors import CorruptShardError
from trainer import engine
from trainer.data import EvalSet, TrainSet, load_split, read_classes, read_label
from trainer.architectures import build_model
from trainer.model import load_backbone_weights
from trainer.proposals import ProposalFeed
from trainer.runlog import RunLog, load_checkpoint
from trainer.snapshots import chunks, snapshot_complete, write_snapshot_round
from trainer.visualize import write_panels

REGULARISED = ("grid-gd", "dense-gd", "grid-tr")
CACHE_MAX_IMAGES = 2000  # decoded images kept in memory: the synthetic sets, not VOC's 10,582


def phases(cfg: TrainConfig) -> list[tuple[str, int]]:
    """PCE pretraining (Alg. 1 line 2) unless --init gives the pretrained model."""
    if cfg.method in REGULARISED and not cfg.init:
        return [("pce", cfg.pretrain_epochs), (cfg.method, cfg.epochs)]
    return [(cfg.method, cfg.epochs)]


def train_split(cfg: TrainConfig):
    """Full supervision needs the masks, every other method the scribbles."""
    full = cfg.method == "full"
    return load_split(cfg.data, cfg.format, "train", cfg.scribbles, require_seeds=not full, require_masks=full)


def mask_reader(samples, num_classes: int):
    """image id -> its full mask (None when the image has none), read when asked."""
    paths = {s.image_id: s.mask_path for s in samples}
    return lambda image_id: read_label(paths[image_id], num_classes) if paths.get(image_id) else None


def progress_bar(enabled: bool, desc: str, total: int, unit: str = "img"):
    """A bar that Ray draws in the driver's terminal; None when the driver has none."""
    return tqdm_ray.tqdm(desc=desc, total=total, unit=unit) if enabled else None


def close(bar) -> None:
    if bar is not None:
        bar.close()


def train_loop_per_worker(config: dict) -> None:
    config = dict(config)
    show = config.pop("progress", False)
    cfg = from_dict(TrainConfig, config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    show = show and rank == 0
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    log = RunLog(cfg.out, enabled=rank == 0)

    classes = read_classes(cfg.data, cfg.format)
    K = len(classes)
    eps = cfg.eps if cfg.eps is not None else default_eps(K)
    train_samples = train_split(cfg)
    val_samples = load_split(cfg.data, cfg.format, "val", cfg.scribbles)
    cache = len(train_samples) <= CACHE_MAX_IMAGES
    trainset = TrainSet(train_samples, K, cfg.crop_size, augment=True, seed=cfg.seed + rank, cache=cache)
    valset = EvalSet(val_samples, K, cache=cache)
    train_eval = EvalSet(train_samples, K, cache=cache)  # unaugmented: snapshots and panels
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(trainset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(trainset) > cfg.batch_size),
        move_to_device=False,
    )

    net = build_model(cfg.arch, K)
    if cfg.backbone_weights:
        load_backbone_weights(net, cfg.backbone_weights)
    if cfg.init:
        net.load_state_dict(load_checkpoint(cfg.init)["model"])
    resume = load_checkpoint(f"{cfg.out}/checkpoints/last.pt") if cfg.resume else None
    if resume:
        net.load_state_dict(resume["model"])
        # metrics.jsonl may hold the epoch after the checkpoint (killed in between): it is run again
        log.drop_epochs_after(resume["global_epoch"])
    model = ray.train.torch.prepare_model(net)

    stats = {"stage_b_s": 0.0, "stall_s": 0.0, "staleness": [], "max_staleness": 0}
    best = resume["best_miou"] if resume else -1.0
    global_epoch = resume["global_epoch"] if resume else 0
    plan = phases(cfg)
    for phase, (method, epochs) in enumerate(plan):
        if resume and phase < resume["phase"]:
            continue
        same_phase = bool(resume) and phase == resume["phase"]
        optimizer, base_lrs = make_optimizer(net, cfg, resume["optimizer"] if same_phase else None)
        start = resume["epoch"] if same_phase else 0
        steps_per_epoch = max(1, len(loader))
        step = start * steps_per_epoch
        feed = None
        if method == "grid-tr":
            parts = [[train_samples[i].image_id for i in part] for part in chunks(len(train_samples), cfg.shard_size)]
            feed = ProposalFeed(cfg.shard_base(), parts, sync=cfg.schedule == "sync", max_staleness=cfg.max_staleness,
                                num_classes=K, mask_of=mask_reader(train_samples, K))
        final = phase == len(plan) - 1
        for epoch in range(start, epochs):
            record = {"phase": method, "epoch": global_epoch + 1}
            if feed is not None:
                record.update(_next_proposals(cfg, net, trainset, train_eval, train_samples, feed, epoch, rank, world, device, stats, show,
                                              verify=same_phase and epoch == start))
            trainset.set_epoch(global_epoch)
            t0 = time.perf_counter()
            bar = progress_bar(show, f"epoch {global_epoch + 1} [{method}]", len(loader) * cfg.batch_size)
            loss, step = engine.train_epoch(
                model, loader, optimizer, method=method, eps=eps, nu=cfg.nu, device=device,
                step=step, total_steps=epochs * steps_per_epoch, base_lrs=base_lrs, progress=bar,
            )
            close(bar)
            stats["stage_b_s"] += time.perf_counter() - t0
            record.update(loss=loss, lr=optimizer.param_groups[0]["lr"], stage_b_s=time.perf_counter() - t0)
            global_epoch += 1
            last = epoch == epochs - 1
            if last or global_epoch % cfg.eval_every == 0:
                bar = progress_bar(show, "evaluation", len(range(rank, len(valset), world)))
                record.update(_evaluate(model, valset, K, device, rank, world, bar))
                close(bar)
                if rank == 0:
                    write_panels(log, net, {"val": valset, "train": train_eval}, trainset.proposals, device, global_epoch, K)
            state = {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "phase": phase,
                "epoch": epoch + 1, "global_epoch": global_epoch, "num_classes": K, "class_names": classes, "arch": cfg.arch,
                "method": method, "val_miou": record.get("val_miou"), "best_miou": best,
            }
            if final and "val_miou" in record and record["val_miou"] > best:
                best = state["best_miou"] = record["val_miou"]
                log.save_checkpoint("best.pt", state)
            if last and not final:
                log.save_checkpoint(f"{method}.pt", state)
            log.log_epoch(record, global_epoch)  # before last.pt: a resume drops lines past it
            log.save_checkpoint("last.pt", state)
            if rank == 0:
                print(_progress_line(record, global_epoch, sum(e for _, e in plan)), flush=True)
            ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float, str))})
    stats["mean_staleness"] = sum(stats["staleness"]) / len(stats["staleness"]) if stats["staleness"] else 0.0
    del stats["staleness"]
    log.write_json("trainer_summary.json", {**stats, "val_miou": record.get("val_miou"), "per_class_iou": record.get("per_class_iou"), "trimap": record.get("trimap"), "epochs": global_epoch})
    log.close()


def make_optimizer(net, cfg: TrainConfig, state: dict | None = None):
    """The run's optimizer over the model's parameter groups, and their base learning
    rates (before any decay); `state` (a checkpoint's optimizer state) is loaded."""
    optimizer = engine.make_optimizer(net.param_groups(cfg.lr), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    if state is not None:
        optimizer.load_state_dict(state)
    return optimizer, base_lrs


def snapshot_round_readable(base: str, r: int, n_parts: int) -> bool:
    """Every part of snapshot round r is there and reads; a bad one is reported with its path."""
    if not snapshot_complete(base, r, n_parts):
        return False
    ok = True
    for uri in shards.list_parts(shards.round_uri(base, "snapshots", r)).values():
        try:
            shards.read_snapshots(uri)
        except CorruptShardError as e:
            print(f"warning: {e}; writing snapshot round {r} again", flush=True)
            ok = False
    return ok


def _next_proposals(cfg, net, trainset, train_eval, samples, feed, epoch, rank, world, device, stats, show, verify=False) -> dict:
    """Snapshot at the start of each round, then the freshest proposals (SPEC §4).

    `verify` (the first epoch of a resumed run): the round's snapshot parts are read back
    and the round is written again if one is unreadable (a truncated file, say)."""
    r, first = divmod(epoch, cfg.epochs_per_round)[0], epoch % cfg.epochs_per_round == 0
    base = cfg.shard_base()
    n_parts = len(chunks(len(samples), cfg.shard_size))
    record = {"round": r}
    if (first or verify) and not (snapshot_round_readable if verify else snapshot_complete)(base, r, n_parts):
        t0 = time.perf_counter()
        bar = progress_bar(show, f"snapshot round {r}", len(samples))
        n = write_snapshot_round(
            net, train_eval, samples, base=base, r=r, shard_size=cfg.shard_size,
            restrict_labels=cfg.solver.restrict_labels, device=device, rank=rank, world=world, progress=bar,
        )
        close(bar)
        if world > 1:
            dist.barrier()
        record["snapshot_s"] = time.perf_counter() - t0
        record["snapshot_images"] = n
    got = feed.refresh(r, wait=first or cfg.schedule == "sync")
    trainset.proposals = feed.labels
    stats["stall_s"] += got["stall_s"]
    stats["staleness"].append(got["mean_staleness"])
    stats["max_staleness"] = max(stats["max_staleness"], got["max_staleness"])
    record.update(stall_s=got["stall_s"], mean_staleness=got["mean_staleness"], max_staleness=got["max_staleness"])
    record.update(feed.diagnostics())
    return record


def _evaluate(model, valset, K, device, rank, world, progress=None) -> dict:
    """Val confusions on this rank's share, summed over ranks."""
    conf, trimap = engine.confusions(model, valset, K, device, indices=range(rank, len(valset), world), progress=progress)
    if world > 1:
        conf, trimap = conf.to(device), trimap.to(device)
        dist.all_reduce(conf)
        dist.all_reduce(trimap)
    return engine.scores(conf.cpu(), trimap.cpu())


def _progress_line(record: dict, epoch: int, total: int) -> str:
    parts = [f"epoch {epoch}/{total} [{record['phase']}]", f"loss {record['loss']:.4f}"]
    if "val_miou" in record:
        parts.append(f"val mIoU {100 * record['val_miou']:.1f}")
    if "round" in record:
        parts.append(f"round {record['round']} stall {record['stall_s']:.1f}s staleness {record['mean_staleness']:.2f}")
    if "proposal_changed" in record:
        parts.append(f"proposals: {100 * record['proposal_changed']:.1f}% changed from the network")
    if "proposal_miou" in record:
        parts.append(f"mIoU vs masks {100 * record['proposal_miou']:.1f}")
    return "  ".join(parts)
