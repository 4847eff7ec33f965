"""Benchmark and checks for a GPU (issue 33): what the first CUDA run needs to know.

Prints one JSON object (the last line of stdout; progress on stderr):

  * ``device``: the GPU, its compute capability and the training autocast dtype
    (`trainer.engine.amp_dtype`: bf16 from compute capability 8.0, else fp32).
  * ``steps``: training steps/s of the paper's network (DeepLabV3+/MobileNetV2) on
    Grid-TR's robust loss at batch 12 × 513² (K = 21), batches already in pinned host
    memory (no loader): ``synced``, the step as it was (the loss read on the host every
    step, int64 label maps copied to the device) and ``async``, as it is (the loss read
    every `trainer.engine.LOG_EVERY` steps, uint8 label maps); ``speedup`` = async/synced.
  * ``lattice``: a Dense-GD step at batch 12 × 513² and the lattice's share of it: the
    step's time against a PCE step's on the same batch (the difference is the dense CRF
    term at scale 0.5, 12 × 21 × 257²) and the bilateral filter's forward+backward alone.
  * ``lattice_vs_exact``: the lattice's W·x on CUDA against the exact O(N²) filter
    (Pearson correlation, mean ratio; the CPU figures are ≥ 0.97 and 0.8–1.2,
    tests/test_permutohedral.py).
  * ``deterministic``: two 3-step Grid-TR runs from one seed under ``--deterministic``
    (`trainer.engine.make_deterministic`) give bit-identical losses or not.
  * ``cuda_tests``: pytest's summary of the CUDA tests (test_cuda_matches_cpu, the
    CSR check, the no-sync step of tests/test_gpu_ready.py); skipped without CUDA.
  * ``voc``: `benchmarks/gpu_voc.py`'s figures (PCE-GD and Grid-TR epochs of the paper
    preset at batch 12 × 513² with solver actors on the node's CPU cores: images/s,
    peak GPU memory, stall, the snapshot pass's share; Dense-GD's lattice on CUDA
    against CPU); left out by ``--smoke`` and ``--skip-voc``.

    python benchmarks/gpu.py            # on a GPU: estimated 3-5 + ≈ 5 minutes (not yet run on one)
    python benchmarks/gpu.py --skip-voc # the step, lattice and CUDA checks alone
    python benchmarks/gpu.py --smoke    # tiny sizes on whatever device there is (tests run it)

Without CUDA every part runs on the CPU, which is what ``--smoke`` is for; the full
sizes are meant for a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from shared.labels import UNLABELLED  # noqa: E402
from trainer import engine  # noqa: E402
from trainer.architectures import build_model  # noqa: E402
from trainer.losses import bilateral_filter  # noqa: E402
from trainer.outliers import OutlierModel  # noqa: E402

K = 21
# (arch, batch, side, timed steps) at full size and in --smoke
FULL = ("deeplabv3plus-mobilenetv2", 12, 513, 20)
SMOKE = ("unet", 2, 32, 3)
CUDA_TESTS = ["tests/test_permutohedral.py::test_cuda_matches_cpu",
              "tests/test_permutohedral.py::test_slice_and_splat_are_valid_csr",
              "tests/test_gpu_ready.py::test_the_cuda_step_does_not_sync"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batches(n: int, batch: int, side: int, labels: torch.dtype, pin: bool, seed: int = 0) -> list[dict]:
    """Loader-like batches: images 0..255, seeds on a sparse grid, proposals and masks everywhere."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        seeds = torch.full((batch, side, side), UNLABELLED, dtype=labels)
        seeds[:, ::16, ::16] = torch.randint(0, K, seeds[:, ::16, ::16].shape, generator=g).to(labels)
        b = {"image": torch.rand(batch, 3, side, side, generator=g) * 255, "seeds": seeds,
             "proposal": torch.randint(0, K, (batch, side, side), generator=g).to(labels),
             "mask": torch.randint(0, K, (batch, side, side), generator=g).to(labels),
             "roi": torch.ones(batch, side, side, dtype=torch.bool), "index": torch.arange(i * batch, (i + 1) * batch)}
        out.append({k: v.pin_memory() if pin else v for k, v in b.items()})
    return out


def trainer_parts(arch: str, device: torch.device, eps_model: str = "const", seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(arch, K).to(device)
    outliers = OutlierModel(eps_model, 0.5, K).to(device)
    optimizer = engine.make_optimizer([*model.param_groups(1e-3), *outliers.param_groups(1e-3)], "sgd", 1e-3, 0.9,
                                      5e-4)
    return model, outliers, optimizer, [g["lr"] for g in optimizer.param_groups]


def time_epoch(model, outliers, optimizer, base_lrs, data, device, method: str, log_every: int) -> float:
    """Seconds for one `engine.train_epoch` over `data` (the device drained at both ends)."""
    sync(device)
    t = time.perf_counter()
    engine.train_epoch(model, data, optimizer, method=method, eps=outliers, nu=None, device=device, step=0,
                       total_steps=len(data), base_lrs=base_lrs, log_every=log_every)
    sync(device)
    return time.perf_counter() - t


def steps_part(arch, batch, side, steps, device) -> dict:
    """Grid-TR steps/s with a host read every step and int64 labels (synced) and as the
    trainer runs now (async)."""
    pin = device.type == "cuda"
    model, outliers, optimizer, base_lrs = trainer_parts(arch, device)
    warm = make_batches(2, batch, side, torch.uint8, pin)
    time_epoch(model, outliers, optimizer, base_lrs, warm, device, "grid-tr", engine.LOG_EVERY)  # cuDNN, allocator
    out = {}
    for name, labels, every in (("synced", torch.int64, 1), ("async", torch.uint8, engine.LOG_EVERY)):
        data = make_batches(steps, batch, side, labels, pin, seed=1)
        seconds = time_epoch(model, outliers, optimizer, base_lrs, data, device, "grid-tr", every)
        out[f"{name}_steps_per_s"] = steps / seconds
        log(f"steps: {name} {steps / seconds:.2f}/s")
        del data
    out["speedup"] = out["async_steps_per_s"] / out["synced_steps_per_s"]
    out.update(arch=arch, batch=batch, side=side, steps=steps)
    return out


def lattice_part(arch, batch, side, steps, device) -> dict:
    """A Dense-GD step against a PCE step on the same batches, and the filter alone."""
    pin = device.type == "cuda"
    model, outliers, optimizer, base_lrs = trainer_parts(arch, device)
    n = max(2, steps // 4)
    data = make_batches(n, batch, side, torch.uint8, pin, seed=2)
    time_epoch(model, outliers, optimizer, base_lrs, data[:1], device, "dense-gd", engine.LOG_EVERY)  # warm-up
    dense = time_epoch(model, outliers, optimizer, base_lrs, data, device, "dense-gd", engine.LOG_EVERY) / n
    pce = time_epoch(model, outliers, optimizer, base_lrs, data, device, "pce", engine.LOG_EVERY) / n
    half = (side + 1) // 2  # dense_crf's scale 0.5
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(batch, 3, half, half, generator=g) * 255).to(device)
    q = torch.softmax(torch.randn(batch, K, half, half, generator=g), 1).to(device).requires_grad_(True)

    def filter_step():
        (q * bilateral_filter(q, images, 15.0, 50.0)).sum().backward()

    filter_step()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        filter_step()
    sync(device)
    alone = (time.perf_counter() - t) / n
    log(f"lattice: dense-gd step {dense:.3f}s, pce step {pce:.3f}s, filter fwd+bwd {alone:.3f}s")
    return {"dense_gd_step_s": dense, "pce_step_s": pce, "filter_fwd_bwd_s": alone,
            "share_by_difference": (dense - pce) / dense, "share_by_filter": alone / dense,
            "batch": batch, "side": side, "filter_input": [batch, K, half, half]}


def exact_filter(x: torch.Tensor, image: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """Σ_j W_ij x_j with the dense N×N matrix of one image (float64), on x's device."""
    _, C, H, W = x.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device), indexing="ij")
    p = torch.stack([xs, ys], -1).reshape(-1, 2).double()
    rgb = image[0].permute(1, 2, 0).reshape(-1, 3).double()
    w = torch.exp(-torch.cdist(p, p) ** 2 / (2 * sigma_xy ** 2) - torch.cdist(rgb, rgb) ** 2 / (2 * sigma_rgb ** 2))
    return (w @ x[0].reshape(C, -1).double().T).T.reshape(1, C, H, W)


def lattice_vs_exact_part(side: int, device: torch.device) -> dict:
    yy, xx = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    image = torch.stack([128 + 100 * torch.sin(xx / 6), 128 + 100 * torch.cos(yy / 5),
                         128 + 50 * torch.sin((xx + yy) / 7)])[None]
    image = (image + 10 * torch.randn(image.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 255)
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(5))
    out = {"side": side}
    for sigma_xy in (10.0, 100.0):
        approx = bilateral_filter(x.to(device), image.to(device), 15.0, sigma_xy).double()
        exact = exact_filter(x.to(device), image.to(device), 15.0, sigma_xy)
        corr = torch.corrcoef(torch.stack([approx.flatten(), exact.flatten()]))[0, 1]
        out[f"sigma_xy_{sigma_xy:g}"] = {"corr": float(corr), "mean_ratio": float(approx.mean() / exact.mean())}
    log(f"lattice vs exact: {out}")
    return out


def deterministic_part(arch, side, device) -> dict:
    """Two 3-step Grid-TR runs from one seed under make_deterministic (process-wide, so last)."""
    engine.make_deterministic()
    losses = []
    for _ in range(2):
        model, outliers, optimizer, base_lrs = trainer_parts(arch, device, seed=7)
        data = make_batches(3, 2, side, torch.uint8, device.type == "cuda", seed=6)
        run = []
        for i, b in enumerate(data):  # one epoch per step, to read each loss
            run.append(engine.train_epoch(model, [b], optimizer, method="grid-tr", eps=outliers, nu=None,
                                          device=device, step=i, total_steps=3, base_lrs=base_lrs)[0])
        losses.append(run)
    log(f"deterministic: {losses}")
    return {"identical": losses[0] == losses[1], "losses": losses}


def cuda_tests_part() -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    log(proc.stdout[-2000:])
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-300:]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is (seconds)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the CUDA tests (pytest)")
    parser.add_argument("--skip-voc", action="store_true",
                        help="leave out gpu_voc.py's VOC-setting epochs with solver actors (≈ 5 of the minutes)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch, batch, side, steps = SMOKE if args.smoke else FULL
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    result = {"device": {"type": device.type, "name": torch.cuda.get_device_name(device) if cap else "cpu",
                         "capability": list(cap) if cap else None, "amp_dtype": str(engine.amp_dtype(cap)),
                         "torch": torch.__version__}, "smoke": args.smoke}
    t0 = time.perf_counter()
    result["steps"] = steps_part(arch, batch, side, steps, device)
    result["lattice"] = lattice_part(arch, batch, side, steps, device)
    result["lattice_vs_exact"] = lattice_vs_exact_part(16 if args.smoke else 48, device)
    if not (args.smoke or args.skip_voc):  # gpu_voc.py --quick is its own smoke run (tests/test_voc_paper.py)
        import tempfile

        from benchmarks.gpu_voc import measure_lattice, measure_voc_epochs

        with tempfile.TemporaryDirectory(prefix="trseg-gpu-voc-") as workdir:
            result["voc"] = {"epochs": measure_voc_epochs(False, workdir), "lattice": measure_lattice(False)}
    if not args.skip_tests:
        result["cuda_tests"] = cuda_tests_part()
    result["deterministic"] = deterministic_part(arch, side, device)
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
