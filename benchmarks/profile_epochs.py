"""CPU profile (torch.profiler) of one Grid-TR epoch, one Dense-GD epoch and one
evaluation pass on a small synthetic set: the ten largest costs of each, and the
host's reads of tensor values (each a device sync on a GPU).

The trainer's side only, as `trainer.loop` runs it (stage A's solvers are not in it: a
Grid-TR epoch trains on proposals, here random ones); the set is made in a temporary
folder (32 training images 96×96, crops 64, batch 8, 16 val images; the UNet). Prints
each part's table (ops by self CPU time) on stderr and one JSON object on stdout.

    python benchmarks/profile_epochs.py [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer import engine  # noqa: E402
from trainer.architectures import build_model  # noqa: E402
from trainer.datasets import EvalSet, TrainSet  # noqa: E402
from trainer.splits import load_split  # noqa: E402
from trainer.outliers import OutlierModel  # noqa: E402
from trainer.synthetic import make_synthetic  # noqa: E402

K = 4


def host_reads(prof) -> dict:
    """Reads of a tensor's value by the host (`.item()`, `bool()`, `int()`; on a GPU each
    one waits for the device's queue to drain): all of them, and those outside the
    optimizer's step, whose reads are of its step counters, CPU tensors on a GPU too."""
    def in_optimizer(e) -> bool:
        while e is not None:
            if e.name.startswith("Optimizer.step"):
                return True
            e = e.cpu_parent
        return False

    reads = [e for e in prof.events() if e.name == "aten::_local_scalar_dense"]
    return {"all": len(reads), "outside_optimizer": sum(not in_optimizer(e) for e in reads)}


def top(prof, n: int = 10) -> list[dict]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the trainer worker has 1 CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    result = {}
    with tempfile.TemporaryDirectory() as root:
        make_synthetic(root, n_train=32, n_val=16, size=96, classes=K, seed=0)
        train = load_split(root, "synthetic", "train", "", require_seeds=True)
        trainset = TrainSet(train, K, 64, augment=True, seed=0, augmentation="crop")
        rng = np.random.default_rng(0)
        trainset.proposals = {s.image_id: rng.integers(0, K, (96, 96), dtype=np.uint8) for s in train}
        trainset.set_epoch(0)
        valset = EvalSet(load_split(root, "synthetic", "val", ""), K)
        loader = torch.utils.data.DataLoader(trainset, batch_size=8, shuffle=True)
        for method in ("grid-tr", "dense-gd"):
            torch.manual_seed(0)
            model = build_model("unet", K)
            optimizer = engine.make_optimizer(model.param_groups(1e-3), "adamw", 1e-3, 0.9, 5e-4)
            base = [g["lr"] for g in optimizer.param_groups]
            kwargs = dict(method=method, eps=OutlierModel("const", 0.5, K), nu=None, device=device, step=0,
                          total_steps=len(loader), base_lrs=base)
            engine.train_epoch(model, loader, optimizer, **kwargs)  # warm-up
            t = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine.train_epoch(model, loader, optimizer, **kwargs)
            result[method] = {"epoch_s": time.perf_counter() - t, "steps": len(loader),
                              "host_reads": host_reads(prof), "top10": top(prof)}
            print(f"== {method} epoch\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10),
                  file=sys.stderr)
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.confusions(model, valset, K, device)
        result["evaluation"] = {"pass_s": time.perf_counter() - t, "images": len(valset),
                                "host_reads": host_reads(prof), "top10": top(prof)}
        print("== evaluation\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10),
              file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
