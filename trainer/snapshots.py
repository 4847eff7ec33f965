"""Stage A's input: the network's probabilities on every training image (Alg. 1 line 5).

Eval mode, no augmentation, an fp32 forward at the network's output resolution (stride
4), only over each image's label set L, stored as 8-bit codes of −log q (SPEC §6); the
solver resizes them to the image in log space. Parts are chunks of
`shard_size` consecutive training images; DDP rank `rank` writes parts k ≡ rank.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from shared import shards
from shared.errors import UserError
from shared.shard_store import ShardStore

NEG_LOG_Q_MAX = 20.0  # −log(1e-8) ≈ 18.4 is the solver's floor; larger values carry nothing


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
