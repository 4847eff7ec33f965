"""Benchmark: permutohedral bilateral_filter on Dense-GD-sized inputs.

Times trainer.losses.bilateral_filter on a 2×21×257×257 input (random image
content 0..255, σ_rgb = 15) in two settings:

  * ``full``:   the raw 257×257 call at σ_xy = 100;
  * ``dense_crf``: what ``dense_crf(scale=0.5)`` runs, 129×129 at σ_xy = 50;

forward (lattice build + filtering), forward+backward, and the lattice build
alone, on CPU and (if available) CUDA.  Prints one JSON object.

    python benchmarks/bilateral.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.losses import bilateral_filter  # noqa: E402
from trainer.permutohedral import PermutohedralLattice, bilateral_features  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, repeat: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _case(device: str, size: int, sigma_xy: float, repeat: int, N=2, C=21, sigma_rgb=15.0) -> dict:
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(N, 3, 257, 257, generator=g) * 255)
    x = torch.rand(N, C, 257, 257, generator=g)
    if size != 257:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images, x = images.to(device), x.to(device)
    xg = x.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            bilateral_filter(x, images, sigma_rgb, sigma_xy)

    def fwd_bwd():
        xg.grad = None
        bilateral_filter(xg, images, sigma_rgb, sigma_xy).sum().backward()

    feats = bilateral_features(images, sigma_rgb, sigma_xy)
    bidx = torch.arange(N, device=device).repeat_interleave(size * size)

    def build():
        PermutohedralLattice(feats, bidx)

    lat = PermutohedralLattice(feats, bidx)
    t_fwd = _time(fwd, device, repeat)
    return {
        "shape": [N, C, size, size],
        "sigma_rgb": sigma_rgb,
        "sigma_xy": sigma_xy,
        "lattice_points": lat.num_lattice_points,
        "build_s": round(_time(build, device, repeat), 4),
        "forward_s": round(t_fwd, 4),
        "forward_backward_s": round(_time(fwd_bwd, device, repeat), 4),
        "forward_s_per_image": round(t_fwd / N, 4),
    }


def measure(repeat: int = 3) -> dict:
    """Run the benchmark; returns {device: {"full": …, "dense_crf": …}, "torch": …}."""
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        out[dev] = {
            "full": _case(dev, 257, 100.0, repeat),
            "dense_crf": _case(dev, 129, 50.0, repeat),
        }
        if dev == "cuda":
            out[dev]["name"] = torch.cuda.get_device_name()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.repeat)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
