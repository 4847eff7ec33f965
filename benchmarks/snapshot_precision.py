"""What snapshot storage changes in stage A's proposals, on VOC-sized inputs (SPEC §4).

For each image (VOC-like 375×500, 21 classes, from the synthetic generator) a network
output is imitated at stride 4: logits that follow the true mask, with smooth noise.
The reference is the proposal stage A would compute from the network's own
full-resolution output (log-softmax of the bilinearly upsampled logits). It is
compared with the proposal from what a snapshot stores (−log q at stride 4 as 8-bit
codes, resized in log space by the solver) and, for scale, from resizing the stored
probabilities as probabilities (the former path). Prints one JSON object: the
fraction of unseeded pixels whose proposal label differs from the reference.

    python benchmarks/snapshot_precision.py [--images 8]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shared import shards  # noqa: E402
from shared.labels import UNLABELLED  # noqa: E402
from solver_service import energy as E  # noqa: E402
from solver_service.alpha_expansion import solve  # noqa: E402
from trainer.synthetic import _make_image  # noqa: E402

H, W, K, STRIDE = 375, 500, 21, 4


def network_logits(label: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """1×K×(H/4)×(W/4) logits: the mask, blurred to stride 4, plus smooth noise."""
    onehot = F.one_hot(torch.from_numpy(label.astype(np.int64)), K).permute(2, 0, 1)[None].float()
    low = F.avg_pool2d(onehot, STRIDE, ceil_mode=True) * 4.0
    noise = torch.from_numpy(rng.normal(0, 2.0, (1, K, low.shape[2] // 4 + 1, low.shape[3] // 4 + 1))).float()
    return low + F.interpolate(noise, size=low.shape[2:], mode="bilinear", align_corners=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    changed = {"stored_log_space": [], "stored_prob_space": []}
    for i in range(args.images):
        rng = np.random.default_rng([7, i])
        image, label, seeds = _make_image(rng, H, W, K)
        z = network_logits(label, rng)
        full = torch.softmax(F.interpolate(z, size=(H, W), mode="bilinear", align_corners=False), 1)[0].numpy()
        labels = shards.label_set(seeds, K)
        codes = shards.quantize_neg_log_q((-torch.log_softmax(z, 1))[0].numpy()[labels])
        stored = np.zeros((K, *codes.shape[1:]), np.float32)
        stored[labels] = np.exp(-codes.astype(np.float32) * shards.NEG_LOG_Q_STEP)
        free = seeds == UNLABELLED
        want = solve(image, full, seeds).labels
        for name, probs in (("stored_log_space", stored), ("stored_prob_space", E.resize_bilinear(stored, H, W))):
            changed[name].append(float((solve(image, probs, seeds).labels != want)[free].mean()))
    print(json.dumps({"snapshot_precision": {
        "images": args.images, "size": [H, W], "classes": K,
        **{f"{k}_changed_pixels": round(float(np.mean(v)), 5) for k, v in changed.items()},
        **{f"{k}_worst_image": round(float(np.max(v)), 5) for k, v in changed.items()},
    }}))


if __name__ == "__main__":
    main()
