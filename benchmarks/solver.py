"""Stage-A solver speed on a hard synthetic 375×500, 3-label problem (VOC-sized).

Times `solve()` cold and warm-started (from the solution with its region boundaries
displaced by a few pixels: what the next round of the trust-region loop sees) and one raw pyGCO α-expansion call on the identical
integer energy (arrays built before the clock starts), each the median of a few runs.
Prints one JSON object; `measure()` returns it for other scripts.

    python benchmarks/solver.py [--repeats N]
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gco  # noqa: E402

from shared.labels import UNLABELLED  # noqa: E402
from solver_service.alpha_expansion import build_problem, solve  # noqa: E402

H, W, K = 375, 500, 3
MAX_ITER = 5
TR_WEIGHT, POTTS_WEIGHT = 0.1, 100.0


def make_problem(seed: int = 0):
    """Textured image with three regions, noisy low-resolution probabilities, strokes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    truth = np.zeros((H, W), np.uint8)
    truth[(xx - 160) ** 2 + (yy - 180) ** 2 < 110**2] = 1
    truth[(xx > 300) & (yy > 80) & (yy < 330) & (xx < 470)] = 2
    base = np.array([[90, 120, 60], [200, 80, 70], [60, 90, 190]], np.float64)[truth]
    texture = 25 * np.sin(xx / 3.0)[..., None] * np.cos(yy / 5.0)[..., None]
    image = np.clip(base + texture + rng.normal(0, 12, (H, W, 3)), 0, 255).astype(np.uint8)
    # network output at 1/4 resolution, noisy and often wrong
    h, w = H // 4 + 1, W // 4 + 1
    small = truth[:: 4, :: 4][:h, :w]
    logits = rng.normal(0, 1.0, (K, *small.shape))
    logits[small, np.arange(small.shape[0])[:, None], np.arange(small.shape[1])] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    seeds = np.full((H, W), UNLABELLED, np.uint8)
    seeds[175:180, 90:230] = 1
    seeds[20:25, 20:480] = 0
    seeds[350:355, 50:250] = 0
    seeds[150:260, 380:385] = 2
    return image, probs.astype(np.float32), seeds


def raw_gco(p: dict, max_iter: int = MAX_ITER) -> np.ndarray:
    """The bare pyGCO call: general graph, int32 costs, expansion, labels."""
    graph = gco.GCO()
    graph.create_general_graph(p["unary_int"].shape[0], p["unary_int"].shape[1])
    graph.set_data_cost(p["unary_int"])
    graph.set_all_neighbors(p["s1"], p["s2"], p["weights_int"])
    graph.set_smooth_cost(p["smooth_int"])
    graph.expansion(max_iter)
    labels = graph.get_labels()
    graph.destroy_graph()
    return labels


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(repeats: int = 3) -> dict:
    image, probs, seeds = make_problem()
    kw = dict(tr_weight=TR_WEIGHT, potts_weight=POTTS_WEIGHT, max_iter=MAX_ITER)
    p = build_problem(image, probs, seeds, tr_weight=TR_WEIGHT, potts_weight=POTTS_WEIGHT)
    solve(image, probs, seeds, **kw)  # warm the caches (edge list, imports)
    raw_ms = _median_ms(lambda: raw_gco(p), repeats)
    cold = solve(image, probs, seeds, **kw)
    cold_ms = _median_ms(lambda: solve(image, probs, seeds, **kw), repeats)
    # warm start: the previous round's proposal, i.e. the solution with its region
    # boundaries displaced by a few pixels (what the trust-region loop feeds the solver)
    init = cold.labels.copy()
    init[np.roll(cold.labels == 1, 4, axis=1)] = 1
    init[np.roll(cold.labels == 2, -3, axis=0)] = 2
    warm = solve(image, probs, seeds, init=init, **kw)
    warm_ms = _median_ms(lambda: solve(image, probs, seeds, init=init, **kw), repeats)
    rel_err = abs(cold.gco_energy - cold.energy) / abs(cold.energy)
    return {
        "shape": [H, W],
        "labels": K,
        "max_iter": MAX_ITER,
        "solver_ms_per_image": round(warm_ms, 1),
        "solver_cold_ms": round(cold_ms, 1),
        "solver_warm_ms": round(warm_ms, 1),
        "raw_gco_ms": round(raw_ms, 1),
        "solver_vs_raw_gco": round(cold_ms / raw_ms, 3),
        "warm_init_changed_pixels": int((init != cold.labels).sum()),
        "cold_iterations": cold.iterations,
        "warm_iterations": warm.iterations,
        "cold_energy": round(cold.energy, 3),
        "warm_energy": round(warm.energy, 3),
        "warm_kept_init": warm.kept_init,  # true: GCO's result was above the warm start itself
        "gco_kept_seeds": bool(np.array_equal(cold.gco_labels[seeds != UNLABELLED], seeds[seeds != UNLABELLED])),  # before solve() re-imposes them
        "integer_scale": cold.scale,
        "integer_rel_error": rel_err,
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    print(json.dumps(measure(ap.parse_args().repeats)))
