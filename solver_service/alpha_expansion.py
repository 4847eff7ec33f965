"""Stage A: α-expansion (or α-β swap) on the SPEC §1 energy with GCO through pyGCO.

Integer scaling. GCO works on int32 cost terms and refuses terms above
GCO_MAX_ENERGYTERM = 1e7. The float costs are multiplied by

    scale = 2**19 / max(max unary cost, max w_ij)        (scale = 1 if both are 0)

and rounded to the nearest integer, so the largest unary or pairwise term becomes
2**19 = 524288 and every term carries an absolute rounding error ≤ 0.5/scale (i.e.
≤ 1e-6 of the largest term). The resulting relative error of the energy is far below
the 1e-4 that SPEC §1 allows (measured in the tests and by benchmarks/solver.py).
Seeds are hard constraints: on a seeded pixel every other label costs
HARD_COST = 2**23 > 8 · 2**19, more than the most a pixel can gain from its 8
neighbours, so no move ever violates a seed; the output is checked anyway (seeds
are re-imposed). The energies that `solve` reports are always recomputed in float64
from the SPEC formula (energy.py), never GCO's integers; GCO's own labelling and
energy, before that check and before the warm-start comparison below, are reported
too (`gco_labels`, `gco_energy`), so that both safety nets can be seen not to act.

Warm start. pyGCO can only set initial labels one site at a time. The solver puts the
most frequent label of `init` at GCO label 0 (GCO's initial labeling is all 0) and
sets only the other sites, through the C entry point directly. If the result ends
above the SPEC energy of `init` (seeds fixed), `init` is returned instead
(`kept_init`). GCO's moves never raise its energy, so that happens only through the
integer rounding.
"""
from __future__ import annotations

import ctypes
import functools
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import gco
from gco import cgco

from shared.shards import label_set
from shared.labels import UNLABELLED
from solver_service import energy as E

TARGET_MAX_TERM = 2**19
HARD_COST = 2**23

# The same shared library as pyGCO's (dlopen returns the loaded one), but a function
# object without argtypes: plain ints are passed as C ints with no conversion cost.
_init_label = getattr(ctypes.CDLL(cgco._cgco._name), "gcoInitLabelAtSite")


@dataclass
class SolveResult:
    labels: np.ndarray  # uint8 (H, W), original class ids
    energy: float  # SPEC §1 E(labels), float64
    unary_energy: float
    smooth_energy: float
    iterations: int  # move cycles run (0 when init was kept without any cycle)
    seconds: float
    scale: float = 1.0  # integer scale used for GCO (see the module docstring)
    gco_energy: float = float("nan")  # GCO's integer energy / scale, for checks
    warm_start: bool = False
    changed: float = 0.0  # fraction of unseeded pixels where labels ≠ the network's argmax over L
    # GCO's own labelling (class ids, H×W), before seeds are re-imposed and before a
    # lower-energy `init` replaces it; `gco_energy` is its energy
    gco_labels: np.ndarray | None = None
    kept_init: bool = False  # `init` was returned: GCO's result was above it


class Solver(Protocol):
    """A move-making algorithm: runs at most `max_iter` cycles on a prepared GCO graph
    (costs and initial labels set) and returns the number of cycles it ran."""

    def __call__(self, graph: gco.GCO, max_iter: int) -> int: ...


def _cycles(step: Callable[[int], float], graph: gco.GCO, max_iter: int) -> int:
    # One cycle per call, so that we know how many ran; GCO's own loop stops the same
    # way (energy unchanged after a cycle).
    before = graph.compute_energy()
    for it in range(1, max_iter + 1):
        after = step(1)
        if after >= before:
            return it
        before = after
    return max_iter


def expansion(graph: gco.GCO, max_iter: int) -> int:
    """α-expansion (Boykov, Veksler, Zabih 2001), one move per label, cycling over L.

    Same result as GCO's standard cycles, without their last, confirming cycle where
    it is not needed: right after a successful α-move, re-expanding α cannot succeed
    (the new move space is inside the old one), so the solver stops as soon as every
    label has failed, or succeeded, since the last successful move. At most
    `max_iter` cycles; returns the number of cycles started.
    """
    n = int(graph.nb_labels)
    certified: set[int] = set()
    step = 0
    while step < max_iter * n and len(certified) < n:
        alpha = step % n
        if graph.expansion_on_alpha(alpha):
            certified = {alpha}
        else:
            certified.add(alpha)
        step += 1
    return -(-step // n)


def swap(graph: gco.GCO, max_iter: int) -> int:
    """α-β swap: same interface, slower, weaker optimum on Potts energies."""
    return _cycles(graph.swap, graph, max_iter)


SOLVERS: dict[str, Solver] = {"expansion": expansion, "swap": swap}


@functools.lru_cache(maxsize=8)
def _edges(height: int, width: int):
    s1, s2, _ = E.grid_edges_n8(height, width)
    s1.flags.writeable = False
    s2.flags.writeable = False
    return s1, s2


def _validate(image, probs, seeds, init):
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H×W×3, got shape {image.shape}")
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("image holds NaN or inf values")
    if probs.ndim != 3:
        raise ValueError(f"probs must be K×H×W, got shape {probs.shape}")
    if probs.shape[0] < 2:
        raise ValueError(f"need K ≥ 2 classes, probs has K = {probs.shape[0]}")
    if min(probs.shape[1:]) < 1:
        raise ValueError(f"probs is empty: shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs holds NaN or inf values")
    if np.any(probs < 0):
        raise ValueError("probs holds negative values")
    if seeds.shape != (h, w):
        raise ValueError(f"seeds shape {seeds.shape} differs from image size {(h, w)}")
    seeded = seeds[seeds != UNLABELLED]
    if seeded.size and int(seeded.max()) >= probs.shape[0]:
        raise ValueError(f"seed label {int(seeded.max())} ≥ K = {probs.shape[0]}")
    if init is not None and init.shape != (h, w):
        raise ValueError(f"init shape {init.shape} differs from image size {(h, w)}")


def build_problem(image, probs, seeds, *, tr_weight=0.1, potts_weight=100.0, restrict_labels=True):
    """Everything GCO needs, computed once and vectorised (also used by the benchmark).

    Returns a dict: labels (L, uint8), unary (|L|×H·W float64, 0 on seeds), weights
    (float64, N8 order), s1/s2 (int32 edges), scale, unary_int (H·W×|L| int32,
    C order, hard costs on seeds), weights_int (int32), smooth_int (|L|×|L| Potts).
    """
    image = np.asarray(image)
    probs = np.asarray(probs)
    seeds = np.asarray(seeds)
    h, w = image.shape[:2]
    labels = label_set(seeds, probs.shape[0], restrict_labels)
    unary = E.neg_log_probs(probs[labels], h, w).reshape(len(labels), h * w)
    unary *= tr_weight
    seed_flat = seeds.ravel()
    seeded = np.flatnonzero(seed_flat != UNLABELLED)
    unary[:, seeded] = 0.0
    weights = E.contrast_weights(image, potts_weight)
    s1, s2 = _edges(h, w)

    top = max(float(unary.max(initial=0.0)), float(weights.max(initial=0.0)))
    scale = TARGET_MAX_TERM / top if top > 0 else 1.0
    unary_int = np.rint(unary.T * scale).astype(np.int32, order="C")
    if seeded.size:
        # seed label -> its index in L (every seed label is in L by construction)
        lut = np.full(256, -1, np.int64)
        lut[labels] = np.arange(len(labels))
        unary_int[seeded] = HARD_COST
        unary_int[seeded, lut[seed_flat[seeded]]] = 0
    weights_int = np.ascontiguousarray(np.rint(weights * scale), np.int32)
    smooth_int = np.ascontiguousarray(1 - np.eye(len(labels)), np.int32)
    return dict(
        labels=labels, unary=unary, weights=weights, s1=s1, s2=s2, scale=scale, shape=(h, w),
        unary_int=unary_int, weights_int=weights_int, smooth_int=smooth_int,
    )


def _float_energy(idx: np.ndarray, p: dict) -> tuple[float, float, float]:
    """SPEC energy of a labeling given as indices into L (flat, H·W)."""
    unary = p["unary"]
    un = 0.0
    for k in range(unary.shape[0]):  # a loop over labels, not pixels
        un += float(unary[k][idx == k].sum())
    h, w = p["shape"]
    lab = idx.reshape(h, w)
    cut = np.concatenate([
        (lab[:, :-1] != lab[:, 1:]).ravel(), (lab[:-1, :] != lab[1:, :]).ravel(),
        (lab[:-1, :-1] != lab[1:, 1:]).ravel(), (lab[:-1, 1:] != lab[1:, :-1]).ravel(),
    ])
    sm = float(p["weights"][cut].sum())
    return un + sm, un, sm


def solve(
    image,
    probs,
    seeds,
    *,
    tr_weight: float = 0.1,
    potts_weight: float = 100.0,
    max_iter: int = 5,
    init=None,
    restrict_labels: bool = True,
    algorithm: str = "expansion",
) -> SolveResult:
    """Minimise the SPEC §1 energy (paper eq. 16, 26) with GCO.

    image: H×W×3 uint8 or float 0..255. probs: K×h×w probabilities, resized to H×W
    in log space with `energy.neg_log_probs` (bilinear on −log q, a numpy port of torch's
    align_corners=False) when the size differs. seeds: H×W uint8, 255 = unlabeled, hard constraints.
    init: H×W labels to warm-start from (seeds are imposed on it first).
    Raises ValueError on bad input.
    """
    t0 = time.perf_counter()
    if algorithm not in SOLVERS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(SOLVERS)}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be ≥ 1, got {max_iter}")
    if not (np.isfinite(tr_weight) and tr_weight >= 0 and np.isfinite(potts_weight) and potts_weight >= 0):
        raise ValueError("tr_weight and potts_weight must be finite and ≥ 0")
    image = np.asarray(image)
    probs = np.asarray(probs)
    seeds = np.asarray(seeds)
    if image.dtype.kind not in "uif" or probs.dtype.kind not in "uif" or seeds.dtype.kind not in "ui":
        raise ValueError("image and probs must be numeric arrays, seeds an integer array")
    init = None if init is None else np.asarray(init)
    _validate(image, probs, seeds, init)
    h, w = seeds.shape
    p = build_problem(image, probs, seeds, tr_weight=tr_weight, potts_weight=potts_weight,
                      restrict_labels=restrict_labels)
    L = p["labels"]
    n_labels = len(L)
    seed_flat = seeds.ravel()
    seeded = seed_flat != UNLABELLED
    lut = np.zeros(256, np.int32)
    lut[L] = np.arange(n_labels, dtype=np.int32)

    init_idx = None
    order = np.arange(n_labels)  # GCO label j is L[order[j]]
    if init is not None:
        init_lab = init.astype(np.int64).ravel()
        valid = np.isin(init_lab, L)
        init_idx = np.where(valid, lut[np.clip(init_lab, 0, 255)], -1)
        init_idx[seeded] = lut[seed_flat[seeded]]
        counts = np.bincount(init_idx[init_idx >= 0], minlength=n_labels)
        top = int(np.argmax(counts))
        init_idx[init_idx < 0] = top
        order = np.concatenate([[top], np.delete(np.arange(n_labels), top)])

    unary_int = p["unary_int"] if init is None else np.ascontiguousarray(p["unary_int"][:, order])
    graph = gco.GCO()
    graph.create_general_graph(h * w, n_labels)
    try:
        graph.set_data_cost(unary_int)
        if p["s1"].size:
            graph.set_all_neighbors(p["s1"], p["s2"], p["weights_int"])
        graph.set_smooth_cost(p["smooth_int"])
        if init_idx is not None:
            inv = np.empty(n_labels, np.int32)
            inv[order] = np.arange(n_labels, dtype=np.int32)
            gco_init = inv[init_idx]
            sites = np.flatnonzero(gco_init != 0)
            handle = int(graph.handle)
            for _ in map(_init_label, [handle] * sites.size, sites.tolist(), gco_init[sites].tolist()):
                pass
        iterations = SOLVERS[algorithm](graph, max_iter)
        gco_energy = graph.compute_energy() / p["scale"]
        gco_idx = order[graph.get_labels()]
    finally:
        graph.destroy_graph()

    idx = gco_idx.copy()
    if np.any(idx[seeded] != lut[seed_flat[seeded]]):  # cannot happen (HARD_COST); be safe
        idx[seeded] = lut[seed_flat[seeded]]
    total, un, sm = _float_energy(idx, p)
    kept_init = False
    if init_idx is not None:
        i_total, i_un, i_sm = _float_energy(init_idx, p)
        if i_total < total:
            idx, total, un, sm, kept_init = init_idx, i_total, i_un, i_sm, True
    out = L[idx].reshape(h, w).astype(np.uint8)
    free = ~seeded
    network = np.argmin(p["unary"], axis=0)  # argmax of q over L (unary is λ·(−log q))
    changed = float(np.mean(idx[free] != network[free])) if free.any() and tr_weight > 0 else 0.0
    return SolveResult(
        labels=out, energy=total, unary_energy=un, smooth_energy=sm, iterations=iterations,
        seconds=time.perf_counter() - t0, scale=p["scale"], gco_energy=gco_energy,
        warm_start=init is not None, changed=changed,
        gco_labels=L[gco_idx].reshape(h, w).astype(np.uint8), kept_init=kept_init,
    )
