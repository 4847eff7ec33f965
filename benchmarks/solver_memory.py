"""Peak memory of one stage-A solve, per image size and label count.

Each measurement runs in a fresh process: it imports the solver, records its peak
resident set (`ru_maxrss`), solves one random problem (every label seeded, so the
label set L is all K labels: the worst case), and reports the growth of the peak.
`solver_service.farm.solver_memory` (what a solver actor asks Ray for) is printed
beside it and must stay above the measurement.

    python benchmarks/solver_memory.py [--sizes 375x500,1000x1000] [--labels 2,21]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _peak_growth(h: int, w: int, k: int, out) -> None:
    import numpy as np

    from shared.labels import UNLABELLED
    from solver_service.alpha_expansion import solve

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(k), size=(h // 8 + 1, w // 8 + 1)).transpose(2, 0, 1).astype(np.float32)
    seeds = np.full((h, w), UNLABELLED, np.uint8)
    seeds[0, :k] = np.arange(k)  # every label present: L is all K labels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    solve(image, probs, seeds, max_iter=1)
    out.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def measure(h: int, w: int, k: int) -> int:
    """Bytes the peak resident set grew by while solving one H×W, K-label problem."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_peak_growth, args=(h, w, k, out))
    proc.start()
    grown = out.get()
    proc.join()
    return grown


def main() -> None:
    from solver_service.farm import WORKER_BYTES, solver_memory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="375x500,1000x1000", help="H×W list, comma-separated")
    ap.add_argument("--labels", default="2,21", help="K list, comma-separated")
    args = ap.parse_args()
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        for k in (int(v) for v in args.labels.split(",")):
            grown = measure(h, w, k)
            asked = solver_memory(h * w, k) - WORKER_BYTES
            rows.append(dict(height=h, width=w, labels=k, peak_growth_mb=round(grown / 2**20, 1),
                             bytes_per_pixel=round(grown / (h * w), 1),
                             asked_mb=round(asked / 2**20, 1), covered=asked >= grown))
    print(json.dumps(dict(solver_memory=rows)))


if __name__ == "__main__":
    main()
