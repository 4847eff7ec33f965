"""The default job: PCE-GD, then Grid-TR from it, on the built-in synthetic set.

Both methods get the same budget after pretraining: `pce` continues PCE training from
the pretrained model for as many epochs as `grid-tr` trains with proposals, so the
comparison is at equal total epochs.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from shared import storage
from shared.config import SolverConfig
from trainer.config import TrainConfig
from shared.errors import UserError
from trainer.driver import run_train
from trainer.synthetic import VERSION, make_synthetic
from experiments.pictures import write_job_pictures


@dataclass
class JobSize:
    n_train: int
    n_val: int
    size: int
    pretrain_epochs: int
    epochs: int
    epochs_per_round: int
    lr: float | None = None  # of the cells after pretraining (both): None, TrainConfig's fine-tuning rate
    tr_weight: float = SolverConfig.tr_weight  # Grid-TR's λ
    eps: float | None = None  # Grid-TR's ε; None: default_eps(K)
    schedule: str = "overlapped"  # Grid-TR's; "sync": every round's proposals before its epochs (Alg. 1)


FULL = JobSize(n_train=64, n_val=32, size=96, pretrain_epochs=20, epochs=20, epochs_per_round=5)
# The quick job shows the method in about two minutes: PCE-GD trained to its plateau on 16
# images, then 4 epochs each. Grid-TR at the built-in set's best stage-A setting (λ 1,
# ε 0.5: docs/variants-synthetic/stage-a-settings-default.md) and `sync`, so that all
# 4 of its epochs train on proposals (overlapped, round 0's would train on seeds alone).
QUICK = JobSize(n_train=16, n_val=16, size=64, pretrain_epochs=10, epochs=4, epochs_per_round=2,
                tr_weight=1.0, eps=0.5, schedule="sync")


def synthetic_dataset(n_train: int, n_val: int, size: int, classes: int = 4, seed: int = 0, variant: str = "default") -> str:
    """The synthetic set, generated once into a cache folder and reused."""
    cache = os.environ.get("TRSEG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "trseg"))
    tag = "" if variant == "default" else f"{variant}-"
    root = os.path.join(cache, f"synthetic-{tag}v{VERSION}-{n_train}-{n_val}-{size}-{classes}-{seed}")
    if os.path.exists(os.path.join(root, ".complete")):
        return root
    # Made beside its place, then renamed whole: two commands started at once on a fresh
    # machine (a table and a search, a test suite's two workers) never read each other's
    # half-written set; the first rename wins, the other's copy is dropped.
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=cache)
    try:
        make_synthetic(tmp, n_train=n_train, n_val=n_val, size=size, classes=classes, seed=seed, variant=variant)
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.exists(os.path.join(root, ".complete")):  # a set left half-made by an older version
                shutil.rmtree(root)
                os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def check_out(out: str | None, overwrite: bool = False) -> str:
    """The job's run folder (runs/<timestamp> without --out); refused if it holds an
    earlier default job and `overwrite` is off. Cheap: the CLI calls it before Ray starts."""
    out = out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if not overwrite and any(storage.list_dir(os.path.join(out, name)) for name in ("pce-init", "pce", "grid-tr")):
        raise UserError(f"--out {out}: holds an earlier default job; pick another --out or pass --overwrite")
    return out


def run_default_job(out: str | None, quick: bool = False, overwrite: bool = False, seed: int = 0,
                    size: JobSize | None = None) -> dict:
    size = size or (QUICK if quick else FULL)
    out = check_out(out, overwrite)
    data = synthetic_dataset(size.n_train, size.n_val, size.size)
    print(f"data: {data}\nrun folder: {out}", flush=True)
    common = dict(data=data, format="synthetic", epochs_per_round=size.epochs_per_round, seed=seed)
    start = TrainConfig(**common, method="pce", epochs=size.pretrain_epochs, out=f"{out}/pce-init")
    pretrain = run_train(start, "synthetic", overwrite)
    pce = run_train(TrainConfig(**common, method="pce", epochs=size.epochs, lr=size.lr, out=f"{out}/pce").fine_tune_from(start),
                    "synthetic", overwrite)
    tr = run_train(TrainConfig(**common, method="grid-tr", epochs=size.epochs, lr=size.lr, eps=size.eps,
                               solver=SolverConfig(tr_weight=size.tr_weight), schedule=size.schedule,
                               out=f"{out}/grid-tr").fine_tune_from(start), "synthetic", overwrite)
    rows = {"pce-init": pretrain, "pce": pce, "grid-tr": tr}
    total = size.pretrain_epochs + size.epochs
    print(f"\n{'method':<10} {'epochs':>6} {'val mIoU':>9} {'wall s':>8} {'stall s':>8} {'stage A':>8}")
    for name, s in rows.items():
        epochs = size.pretrain_epochs if name == "pce-init" else total
        print(f"{name:<10} {epochs:>6} {100 * s['val_miou']:>9.1f} {s['wall_s']:>8.1f} {s['trainer_stall_s']:>8.1f} {s['stage_a_images']:>8}")
    comparison = {name: {"val_miou": s["val_miou"], "wall_s": s["wall_s"]} for name, s in rows.items()}
    storage.write_bytes(storage.join(os.path.abspath(out), "comparison.json"), (json.dumps(comparison, indent=2) + "\n").encode())
    cells = {"PCE-GD start": f"{out}/pce-init", "PCE-GD": f"{out}/pce", "Grid-TR": f"{out}/grid-tr"}
    pictures = write_job_pictures(os.path.abspath(out), cells, pretrained="PCE-GD start", proposals_from="Grid-TR")
    print(f"\npictures: {pictures['comparison']}\n          {pictures['curves']}", flush=True)
    return rows
