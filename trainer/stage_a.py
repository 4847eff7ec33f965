"""The trainer's side of stage A (Alg. 1 lines 4–6): snapshot, proposals, staleness.

At the first epoch of round r the worker writes the round's snapshot (the network's
−log q on every training image); before every epoch it takes the freshest proposals
the solver farm has written (SPEC §4), waiting only where the schedule demands it.
A snapshot round is committed (its manifest, `ShardStore.commit`) by rank 0 once every
rank has written its parts: the farm waits on that one object. While it waits, the
worker checks now and then that the snapshot parts still missing an answer are there
and readable, and writes those that are not again (the farm skips them until then).

The snapshot, stage A's input (Alg. 1 line 5): the network's probabilities on every
training image, in eval mode, no augmentation, an fp32 forward at the network's output
resolution (stride 4), only over each image's label set L, stored as 8-bit codes of
−log q (SPEC §6); the solver resizes them to the image in log space. Parts are chunks
of `shard_size` consecutive training images; DDP rank `rank` writes parts k ≡ rank.
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from shared import shards
from shared.errors import UserError
from shared.image_io import read_label
from shared.shard_store import ShardStore, parts_of
from trainer.config import TrainConfig
from trainer.proposals import ProposalFeed

NEG_LOG_Q_MAX = 20.0  # −log(1e-8) ≈ 18.4 is the solver's floor; larger values carry nothing
REPAIR_EVERY_S = 5.0  # while waiting: how often the missing parts' snapshots are checked


@contextlib.contextmanager
def exact_fp32():
    """Float32 convolutions and matmuls as IEEE float32: TF32 off in cuDNN (on by default,
    Ampere on) and cuBLAS for the block; the flags are restored after it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def neg_log_probs(model, images: list[torch.Tensor], device) -> list[np.ndarray]:
    """−log q at the output resolution for each image; images of one size share a batch."""
    out: list[np.ndarray | None] = [None] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    for idx in by_size.values():  # fp32, not the training autocast nor TF32: stage A sees the exact output (SPEC §4)
        with exact_fp32():
            logits = model.forward_lowres(torch.stack([images[i] for i in idx]).to(device))
        neg = (-torch.log_softmax(logits.float(), 1)).clamp_(max=NEG_LOG_Q_MAX).cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = neg[j]
    return out


def write_snapshot_round(model, dataset, samples, *, store: ShardStore, r, parts, restrict_labels, device,
                         rank=0, world=1, only=None):
    """Write this rank's parts of snapshot round r (those in `only`, if given); returns
    the number of images written."""
    model.eval()
    written = 0
    for k, part in enumerate(parts):
        if k % world != rank or (only is not None and k not in only):
            continue
        items = [dataset[i] for i in part]
        rows = []
        for i, item, neg_log_q in zip(part, items, neg_log_probs(model, [it["image"] for it in items], device)):
            if not np.isfinite(neg_log_q).all():  # would quantise to q = 1 for every label
                raise UserError(f"non-finite network output on training image {samples[i].image_id} "
                                f"({samples[i].image_path}): the model diverged; lower --lr")
            seeds = item["seeds"].numpy()
            labels = shards.label_set(seeds, neg_log_q.shape[0], restrict_labels)
            s = samples[i]
            rows.append(
                shards.Snapshot(
                    image_id=s.image_id, round=r, image_uri=os.path.abspath(s.image_path),
                    seeds_uri=os.path.abspath(s.seeds_path), height=seeds.shape[0], width=seeds.shape[1],
                    num_classes=neg_log_q.shape[0], label_set=labels, neg_log_q=neg_log_q[labels],
                )
            )
        store.write_snapshots(r, k, rows)
        written += len(rows)
    return written



def mask_reader(samples, num_classes: int):
    """image id -> its full mask (None when the image has none), read when asked."""
    paths = {s.image_id: s.mask_path for s in samples}
    return lambda image_id: read_label(paths[image_id], num_classes) if paths.get(image_id) else None


def rank0_decides(flag: bool | None, world: int) -> bool:
    """Rank 0's `flag`, on every rank (the others pass None); every rank must call it."""
    if world == 1:
        return bool(flag)
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


class StageA:
    def __init__(self, cfg: TrainConfig, run_id: str, samples, train_eval, num_classes: int, device, rank: int,
                 world: int):
        self.cfg, self.samples, self.train_eval = cfg, samples, train_eval
        self.device, self.rank, self.world = device, rank, world
        self.store = ShardStore(cfg.shard_base(), run_id)
        self.parts = parts_of(len(samples), cfg.shard_size)
        self.feed = ProposalFeed(
            self.store, [[samples[i].image_id for i in part] for part in self.parts],
            sync=cfg.schedule == "sync", max_staleness=cfg.max_staleness, max_stall_s=cfg.max_stall,
            num_classes=num_classes, mask_of=mask_reader(samples, num_classes),
            storage_patience_s=cfg.storage_patience,
        )
        self._checked = 0.0
        self.staleness: list[float] = []
        self.max_staleness = 0

    def before_epoch(self, net, epoch: int, verify: bool = False) -> tuple[dict[str, np.ndarray], dict]:
        """Snapshot at the start of each round, then the freshest proposals: the labels
        stage B trains on (image id -> proposal) and the epoch's stage-A figures. `verify`
        (the first epoch of a resumed run): the round's snapshot is read back and written
        again if a part is unreadable (a truncated file, say)."""
        r, first = divmod(epoch, self.cfg.epochs_per_round)[0], epoch % self.cfg.epochs_per_round == 0
        record = {"round": r}
        # rank 0 alone reads the storage and decides: ranks that disagreed (a part
        # written between their reads) would not all reach the barrier below
        if (first or verify) and rank0_decides(not self._snapshot_ok(r, verify) if self.rank == 0 else None,
                                               self.world):
            t0 = time.perf_counter()
            record["snapshot_images"] = self._write(net, r)
            if self.world > 1:
                dist.barrier()
            self._commit(r)
            record["snapshot_s"] = time.perf_counter() - t0
        elif verify:  # whole and readable, perhaps left uncommitted by a killed worker
            self._commit(r)
        got = self.feed.refresh(r, wait=first or self.cfg.schedule == "sync",
                                on_wait=lambda missing: self._repair(net, r, missing))
        self.staleness.append(got["mean_staleness"])
        self.max_staleness = max(self.max_staleness, got["max_staleness"])
        record.update(got)
        record.update(self.feed.diagnostics())
        return self.feed.labels, record

    def _write(self, net, r: int, only=None) -> int:
        return write_snapshot_round(
            net, self.train_eval, self.samples, store=self.store, r=r, parts=self.parts,
            restrict_labels=self.cfg.solver.restrict_labels, device=self.device, rank=self.rank,
            world=self.world, only=only,
        )

    def _commit(self, r: int) -> None:
        if self.rank == 0:
            self.store.commit("snapshots", r, {k: [self.samples[i].image_id for i in part]
                                               for k, part in enumerate(self.parts)})

    def _snapshot_ok(self, r: int, verify: bool) -> bool:
        """Round r's snapshot is committed (if verify: every part is there, this run's,
        and every row reads)."""
        if not verify:
            return self.store.round_complete("snapshots", r, len(self.parts))
        bad = self.store.round_intact("snapshots", r, len(self.parts))
        if bad is None:
            return False
        for e in bad.values():
            print(f"warning: {e}; writing snapshot round {r} again", flush=True)
        return not bad

    def _repair(self, net, r: int, missing: list[int]) -> None:
        """Write again this rank's snapshot parts of round r that are missing an answer
        and are absent, unreadable or another run's (checked every REPAIR_EVERY_S)."""
        if time.monotonic() - self._checked < REPAIR_EVERY_S:
            return
        self._checked = time.monotonic()
        mine = [k for k in missing if k % self.world == self.rank]
        present = self.store.parts("snapshots", r)
        bad = set(self.store.unreadable("snapshots", r, only=mine)) | {k for k in mine if k not in present}
        if bad:
            print(f"warning: snapshot round {r}: part(s) {sorted(bad)} absent or unreadable; writing them again",
                  flush=True)
            self._write(net, r, only=bad)

    def state(self) -> dict:
        """The counters a restarted worker continues from (checkpointed every epoch). The
        feed's position needs no saving: it reads again, from the manifests, the newest
        committed proposal of every part, the one it held or a fresher one."""
        return {"stall_s": self.feed.stall_s, "staleness": list(self.staleness), "max_staleness": self.max_staleness}

    def restore(self, state: dict) -> None:
        self.feed.stall_s, self.staleness, self.max_staleness = (
            state["stall_s"], list(state["staleness"]), state["max_staleness"])



def summary(state: dict | None) -> dict:
    """The run's stage-A figures for its summary, from `StageA.state()` (None: no stage A)."""
    if state is None:
        return {"stall_s": 0.0, "mean_staleness": 0.0, "max_staleness": 0}
    return {
        "stall_s": state["stall_s"],
        "mean_staleness": float(np.mean(state["staleness"])) if state["staleness"] else 0.0,
        "max_staleness": state["max_staleness"],
    }
