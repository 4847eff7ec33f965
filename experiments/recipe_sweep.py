"""The recipe sweep (issue: the network caps every result): which network and training
recipe learn the synthetic sets from scratch.

Every configuration trains one model in this process (no Ray: the same data sets, loss,
optimizer and evaluation code as a run's workers, `trainer.engine`), with full
supervision (`full`) or partial cross-entropy (`pce`) on the train split, and reports
val mIoU, the final training loss and the wall time. One JSON object a line on stdout
and in OUT/sweep.jsonl; OUT/sweep.md is the table.

    python -m experiments.recipe_sweep --variant default --out docs/recipe-synthetic
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.config import TrainConfig
from trainer import engine
from trainer.architectures import build_model
from trainer.datasets import EvalSet, TrainSet
from trainer.splits import load_split, read_classes
from trainer.methods import FULL_SUPERVISION, METHODS, PCE

# (arch, optimizer, lr, batch, crop, epochs); each trained with every method in METHODS
GRID = [
    ("deeplabv3plus-mobilenetv2", "sgd", 0.01, 8, 64, 40),  # the previous default
    ("deeplabv3plus-mobilenetv2", "adamw", 1e-3, 8, 64, 40),
    ("deeplabv3plus-mobilenetv2-os8", "sgd", 0.01, 8, 64, 40),
    ("unet", "sgd", 0.05, 8, 64, 40),
    ("unet", "adamw", 1e-3, 8, 64, 40),
    ("unet", "adamw", 3e-3, 8, 64, 40),
    ("unet", "adamw", 3e-3, 8, 0, 40),
    ("unet", "adamw", 3e-3, 4, 64, 40),
    ("unet", "adamw", 3e-3, 8, 64, 80),
    ("unet", "sgd", 0.05, 8, 0, 40),
]


def train_and_score(data: str, method: str, arch: str, optimizer: str, lr: float, batch: int,
                    crop: int, epochs: int, seed: int = 0, scribbles: str = "", augmentation: str = "") -> dict:
    torch.manual_seed(seed)
    K = len(read_classes(data, "synthetic"))
    cfg = TrainConfig(data=data, method=method, augmentation=augmentation)
    masks = METHODS[method].uses_masks
    train = load_split(data, "synthetic", "train", scribbles, require_seeds=not masks, require_masks=masks)
    val = load_split(data, "synthetic", "val", scribbles)
    cfg.validate()  # resolves the synthetic format's default augmentation
    trainset = TrainSet(train, K, crop, augment=True, seed=seed, augmentation=cfg.augmentation)
    loader = DataLoader(trainset, batch_size=batch, shuffle=True, drop_last=len(trainset) > batch)
    net = build_model(arch, K)
    opt = engine.make_optimizer(net.param_groups(lr), optimizer, lr, cfg.momentum, cfg.weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    device = torch.device("cpu")
    t0, step, loss = time.perf_counter(), 0, float("nan")
    for epoch in range(epochs):
        trainset.set_epoch(epoch)
        loss, step = engine.train_epoch(net, loader, opt, method=method, eps=0.0, nu=None, device=device,
                                        step=step, total_steps=epochs * len(loader), base_lrs=base)
    train_s = time.perf_counter() - t0
    conf, trimap = engine.confusions(net, EvalSet(val, K), K, device)
    return {"method": method, "arch": arch, "optimizer": optimizer, "lr": lr, "batch": batch, "crop": crop,
            "augmentation": cfg.augmentation, "epochs": epochs, "seed": seed,
            "val_miou": engine.scores(conf, trimap)["val_miou"], **where_errors_are(conf),
            "train_loss": loss, "train_s": round(train_s, 1)}


def where_errors_are(conf) -> dict:
    """Splits a K×K confusion matrix (rows: truth, class 0 the background) into the two
    questions a segmentation answers: where the objects are (``fg_miou``: mIoU of
    background against all objects merged) and which class each is (``class_acc``: the
    share of object pixels predicted as some object that get the right one)."""
    c = np.asarray(conf, dtype=np.float64)
    fg = np.array([[c[0, 0], c[0, 1:].sum()], [c[1:, 0].sum(), c[1:, 1:].sum()]])
    iou = np.diag(fg) / np.maximum(fg.sum(0) + fg.sum(1) - np.diag(fg), 1)
    return {"fg_miou": round(float(iou.mean()), 4),
            "class_acc": round(float(np.trace(c[1:, 1:]) / max(c[1:, 1:].sum(), 1)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="default", choices=("default", "hard"))
    ap.add_argument("--methods", default="full,pce")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--only", default=None, help="Comma-separated indices of GRID to run.")
    ap.add_argument("--n-train", type=int, default=64, help="Training images (the default job has 64).")
    ap.add_argument("--augmentation", default="", help="default, reference or crop [the synthetic default: crop].")
    ap.add_argument("--out", default="docs/recipe-synthetic")
    args = ap.parse_args()
    from experiments.default_job import FULL, synthetic_dataset
    from trainer.synthetic import VERSION

    data = synthetic_dataset(args.n_train, FULL.n_val, FULL.size, variant=args.variant)
    os.makedirs(args.out, exist_ok=True)
    grid = GRID if args.only is None else [GRID[int(i)] for i in args.only.split(",")]
    rows = []
    for (arch, opt, lr, batch, crop, epochs), method, seed in itertools.product(
            grid, args.methods.split(","), [int(s) for s in args.seeds.split(",")]):
        row = {"variant": args.variant, "data": f"v{VERSION}", "n_train": args.n_train,
               **train_and_score(data, method, arch, opt, lr, batch, crop, epochs, seed,
                                  augmentation=args.augmentation)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "sweep.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        write_table(args.out)


def write_table(out: str) -> None:
    """OUT/sweep.md from every line of OUT/sweep.jsonl: one row per configuration (rows
    from before a key was recorded get its value then: data v2, augmentation default)."""
    rows = [json.loads(line) for line in open(os.path.join(out, "sweep.jsonl")) if line.strip()]
    keys = ("variant", "data", "n_train", "arch", "optimizer", "lr", "batch", "crop", "augmentation", "epochs", "seed")
    then = {"n_train": 64, "data": "v2", "augmentation": "default"}
    table: dict[tuple, dict] = {}
    for r in rows:
        table.setdefault(tuple(r.get(k, then.get(k)) for k in keys), {})[r["method"]] = r
    lines = ["| variant | data | train images | arch | optimizer | lr | batch | crop | augmentation | epochs | seed "
             "| full | pce | full: objects found (fg mIoU) | full: their class right | full train loss | s per run |",
             "|" + " --- |" * 17]
    for key, by_method in table.items():
        full, pce = by_method.get(FULL_SUPERVISION, {}), by_method.get(PCE, {})
        cell = lambda r, k, f: format(r[k], f) if k in r else "—"  # noqa: E731
        lines.append("| " + " | ".join(str(v) for v in key) + f" | {cell(full, 'val_miou', '.3f')} | "
                     f"{cell(pce, 'val_miou', '.3f')} | {cell(full, 'fg_miou', '.3f')} | {cell(full, 'class_acc', '.3f')} | "
                     f"{cell(full, 'train_loss', '.3f')} | {cell(full, 'train_s', '.0f')} |")
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
