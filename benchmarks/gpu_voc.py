"""GPU check of the paper's VOC setting (issue 27), for the day a GPU is at hand.

    python benchmarks/gpu_voc.py [--quick] [--out DIR]

Parts, each a function that returns a dict (benchmarks/gpu.py calls them too):

- `measure_voc_epochs`: real runs through trainer.driver.run_train on a VOC-layout
  synthetic set (`make-synthetic --layout voc`, 21 classes, long side 500), with the
  paper preset (the authors' network, batch 12, 513 crops, their augmentation, SGD,
  sync schedule, float32 as the reference) on random weights (speed does not depend on
  them): PCE-GD, then Grid-TR from its checkpoint for two stage-A rounds, with one solver
  actor per CPU core the trainer leaves; on a GPU also PCE-GD under `--precision auto`
  (bf16 autocast on Ampere on), what leaving the reference's float32 saves. Per run: training images/s (stage B), peak GPU memory of the
  training step, the trainer's stall waiting for proposals, and the snapshot pass's
  share of an epoch; the first epoch (cuDNN's warm-up) is left out of the rates.
- `measure_lattice`: Dense-GD's permutohedral filter (trainer/losses.py
  bilateral_filter) at the paper's setting (21 classes, a 513 crop at scale 0.5, σ_xy
  50 there, σ_rgb 15) on two crops (a sixth of the batch of 12), forward and backward,
  on CPU (once) and on CUDA (best of 3), and the largest relative difference between
  the two outputs.

`--quick`: a CPU smoke run (tiny set, crops of 64, batch 2, one epoch each) that checks
the script end to end in a couple of minutes; its figures mean nothing. Without a GPU
the full run measures the CPU. The full run on one GPU takes about 5 minutes (set
generation ≈ 1 min on 16 cores, two runs with Ray Train's start-up, the lattice).
The last line of stdout is one JSON object.
"""
from __future__ import annotations

import os

# Before ray is first imported: every Ray process then binds to 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from trainer.run_folder import RunFolder  # noqa: E402

FULL = {"n_train": 48, "n_val": 2, "size": 500, "batch_size": 12, "crop_size": 513, "pce_epochs": 3,
        "epochs_per_round": 2, "tr_epochs": 4}
QUICK = {"n_train": 4, "n_val": 2, "size": 96, "batch_size": 2, "crop_size": 64, "pce_epochs": 1,
         "epochs_per_round": 1, "tr_epochs": 1}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_stats(out: str, n_train: int) -> dict:
    """Per-epoch figures of a run from its metrics.jsonl, the first epoch left out of the
    rates when there are more."""
    with open(RunFolder(out).metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steady = records[1:] or records
    stage_b = statistics.median(r["stage_b_s"] for r in steady)
    epoch = [r["stage_b_s"] + r.get("stall_s", 0.0) + r.get("snapshot_s", 0.0) for r in records]
    peak = max((r.get("gpu_peak_bytes", 0) for r in records), default=0)
    return {
        "epochs": len(records),
        "images_per_s": round(n_train / stage_b, 2),
        "stage_b_epoch_s": round(stage_b, 3),
        "stall_s": round(sum(r.get("stall_s", 0.0) for r in records), 3),
        "snapshot_share": round(sum(r.get("snapshot_s", 0.0) for r in records) / sum(epoch), 4),
        "gpu_peak_gib": round(peak / 2**30, 2) if peak else None,
    }


def measure_voc_epochs(quick: bool, workdir: str) -> dict:
    from trainer.presets import apply_preset
    from trainer.config import TrainConfig
    from shared.ray_session import connect
    from trainer.driver import run_train
    from trainer.synthetic import make_synthetic

    size = QUICK if quick else FULL
    data = os.path.join(workdir, "voc")
    t0 = time.perf_counter()
    make_synthetic(data, n_train=size["n_train"], n_val=size["n_val"], size=size["size"], seed=0, layout="voc")
    log(f"voc epochs: set of {size['n_train']} images made in {time.perf_counter() - t0:.0f}s")
    use_gpu = torch.cuda.is_available() and not quick
    cpus = os.cpu_count() or 2
    solvers = max(1, cpus - 2)  # the trainer worker and the driver keep one core each
    connect(None, quiet=True)
    result: dict = {"device": torch.cuda.get_device_name(0) if use_gpu else "cpu", "solver_actors": solvers,
                    "cpus": cpus, "setup": size}

    def run(name: str, method: str, epochs: int, **extra) -> str:
        cfg = TrainConfig(data=data, format="voc", method=method, out=os.path.join(workdir, name))
        apply_preset(cfg, "paper")
        cfg.epochs, cfg.pretrain_epochs, cfg.epochs_per_round = epochs, 0, size["epochs_per_round"]
        cfg.batch_size, cfg.crop_size, cfg.solvers, cfg.use_gpu = size["batch_size"], size["crop_size"], str(solvers), use_gpu
        cfg.eval_every, cfg.max_image_pixels = 10**6, 4096 * 4096  # evaluate after the last epoch only
        for key, value in extra.items():
            setattr(cfg, key, value)
        t = time.perf_counter()
        summary = run_train(cfg, "voc-synthetic")
        stats = _run_stats(cfg.out, size["n_train"])
        stats.update(wall_s=round(time.perf_counter() - t, 1), stage_a_images=summary["stage_a_images"])
        result[name] = stats
        log(f"voc epochs: {name}: {stats}")
        return cfg.out

    pce = run("pce", "pce", size["pce_epochs"])
    run("grid_tr", "grid-tr", size["tr_epochs"], init=RunFolder(pce).last)
    if use_gpu:
        run("pce_auto_precision", "pce", size["pce_epochs"], precision="auto")
    return result


def measure_lattice(quick: bool, repeat: int = 3) -> dict:
    from trainer.losses import bilateral_filter

    side = 33 if quick else 257  # a 513 crop at Dense-GD's scale 0.5
    n, k = 2, 21  # two crops of the batch of 12: the CPU side would take minutes on all twelve
    sigma_xy = 50.0 * side / 257
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, side, side, generator=g) * 255
    q = torch.softmax(torch.randn(n, k, side, side, generator=g), 1)
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    result: dict = {"shape": [n, k, side, side], "sigma_xy": sigma_xy, "sigma_rgb": 15.0}
    outputs = {}
    for device in devices:
        x, img = q.to(device).requires_grad_(True), images.to(device)

        def step():
            y = bilateral_filter(x, img, 15.0, sigma_xy)
            (y * x).sum().backward()
            return y

        outputs[device] = step().detach().cpu()  # also the warm-up
        best = float("inf")
        for _ in range(repeat if device == "cuda" else 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        result[f"{device}_fwd_bwd_ms"] = round(1000 * best, 1)
    if "cuda" in outputs:
        ref = outputs["cpu"]
        result["cuda_vs_cpu_max_rel_diff"] = float(((outputs["cuda"] - ref).abs().max() / ref.abs().max()))
        result["cuda_speedup"] = round(result["cpu_fwd_bwd_ms"] / result["cuda_fwd_bwd_ms"], 1)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny set, figures meaningless")
    parser.add_argument("--out", default=None, help="Folder of the runs [a temporary one]")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    import ray

    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.out or tmp
            result = {"quick": args.quick, "voc_epochs": measure_voc_epochs(args.quick, workdir),
                      "lattice": measure_lattice(args.quick)}
    finally:
        ray.shutdown()
    result["runtime_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
