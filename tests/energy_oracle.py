"""The SPEC §1 energy as the tests compute it (the solver reports its own): vectorised
over the N8 pairs of `solver_service.energy`, float64. `tests/test_energy.py` checks it
against a pixel-by-pixel loop."""
from __future__ import annotations

import numpy as np

from shared.labels import UNLABELLED
from solver_service import energy as E


def contrast_sigma2(image: np.ndarray) -> float:
    """σ² = mean over N8 of ‖I_i − I_j‖² (σ² := 1 when it is 0 or N8 is empty)."""
    h, w = image.shape[:2]
    s1, s2, _ = E.grid_edges_n8(h, w)
    flat = np.asarray(image, np.float64).reshape(h * w, -1)
    d2 = ((flat[s1] - flat[s2]) ** 2).sum(1)
    s = float(d2.mean()) if d2.size else 0.0
    return s if s > 0 else 1.0


def unary_costs(probs: np.ndarray, seeds: np.ndarray, tr_weight: float) -> np.ndarray:
    """λ · (−log max(q_i(k), 1e-8)) for every pixel and label, K×H×W float64; 0 on seeded
    pixels (their label is a hard constraint); `probs` already at the image size."""
    u = -np.log(np.maximum(np.asarray(probs, np.float64), E.PROB_FLOOR))
    u *= tr_weight
    u[:, seeds != UNLABELLED] = 0.0
    return u


def seeds_satisfied(labels: np.ndarray, seeds: np.ndarray) -> bool:
    """Whether a labeling meets the hard constraints s_i = y_i on seeded pixels."""
    m = seeds != UNLABELLED
    return bool(np.array_equal(labels[m], seeds[m]))


def potts_energy(labels, image, probs, seeds, tr_weight: float, potts_weight: float) -> tuple[float, float, float]:
    """E(s) of SPEC §1 (paper eq. 16 / 26): (total, unary, smooth). `probs` K×h×w is
    resized to H×W in log space when its size differs, as the solver does; the unary sum
    runs over unseeded pixels only; the hard constraint is `seeds_satisfied`'s."""
    labels = np.asarray(labels)
    h, w = labels.shape
    cost = E.neg_log_probs(probs, h, w)
    lab = labels.astype(np.intp)
    rows, cols = np.nonzero(np.asarray(seeds) == UNLABELLED)
    unary = float(tr_weight * np.sum(cost[lab[rows, cols], rows, cols]))
    s1, s2, _ = E.grid_edges_n8(h, w)
    flat = lab.ravel()
    smooth = float(np.sum(E.contrast_weights(image, potts_weight)[flat[s1] != flat[s2]]))
    return unary + smooth, unary, smooth
