"""The stage-A energy (SPEC §1; paper eq. 16 and its grid-CRF form, eq. 26), in numpy.

    E(s) = Σ_{i unseeded} λ · (−log max(q_i(s_i), 1e-8))  +  Σ_{{i,j} ∈ N8} w_ij · [s_i ≠ s_j]
    subject to s_i = y_i on seeded pixels,

    w_ij = β · (H·W / |N8|) · exp(−‖I_i − I_j‖² / (2σ²)) / d_ij,
    σ²   = mean over N8 of ‖I_i − I_j‖²  (1 if that is 0),  d_ij ∈ {1, √2}.

Everything here is vectorised (no Python loop over pixels or edges) and float64. The
solver (`solver_service.alpha_expansion`) builds its problem from these pieces and
reports E of its labeling; the tests' reference value is `tests/energy_oracle.py`.

Edge order (used by `grid_edges_n8`, `contrast_weights` and the solver): horizontal
pairs (i, i+1), vertical pairs (i, i+W), diagonal "\\" pairs (i, i+W+1), diagonal "/"
pairs (i+1, i+W); each block in row-major order of its first pixel, and the first
index of every pair is the smaller one (what GCO expects).
"""
from __future__ import annotations

import numpy as np

PROB_FLOOR = 1e-8  # SPEC §1: −log max(q, 1e-8)


def num_n8_edges(height: int, width: int) -> int:
    """|N8| = (H−1)·W + H·(W−1) + 2·(H−1)·(W−1)  (SPEC §1)."""
    return (height - 1) * width + height * (width - 1) + 2 * max(height - 1, 0) * max(width - 1, 0)


def grid_edges_n8(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The N8 pairs {i,j} of an H×W grid: (first, second, d_ij), pixel ids row-major.

    first < second everywhere; `first`/`second` are C-contiguous int32 and d_ij is
    float64 (1 for horizontal/vertical pairs, √2 for diagonal ones).
    """
    idx = np.arange(height * width, dtype=np.int32).reshape(height, width)
    firsts = [idx[:, :-1], idx[:-1, :], idx[:-1, :-1], idx[:-1, 1:]]
    seconds = [idx[:, 1:], idx[1:, :], idx[1:, 1:], idx[1:, :-1]]
    s1 = np.ascontiguousarray(np.concatenate([a.ravel() for a in firsts]), np.int32)
    s2 = np.ascontiguousarray(np.concatenate([a.ravel() for a in seconds]), np.int32)
    n_hv = firsts[0].size + firsts[1].size
    dist = np.ones(s1.size, np.float64)
    dist[n_hv:] = np.sqrt(2.0)
    return s1, s2, dist


def _squared_differences(image: np.ndarray) -> np.ndarray:
    """‖I_i − I_j‖² for every N8 pair, in `grid_edges_n8` order (float64)."""
    planes = np.moveaxis(np.asarray(image, np.float64), -1, 0).copy()  # C×H×W
    h, w = planes.shape[1:]
    sizes = [h * (w - 1), (h - 1) * w, max(h - 1, 0) * max(w - 1, 0), max(h - 1, 0) * max(w - 1, 0)]
    out = np.zeros(sum(sizes), np.float64)
    views, start = [], 0
    for size, shape in zip(sizes, [(h, w - 1), (h - 1, w), (h - 1, w - 1), (h - 1, w - 1)]):
        views.append(out[start:start + size].reshape(shape) if size else None)
        start += size
    tmp = np.empty((h, w), np.float64)
    for c in planes:  # 3 channels: a loop over colour planes, not pixels
        for view, a, b in (
            (views[0], c[:, :-1], c[:, 1:]),
            (views[1], c[:-1, :], c[1:, :]),
            (views[2], c[:-1, :-1], c[1:, 1:]),
            (views[3], c[:-1, 1:], c[1:, :-1]),
        ):
            if view is None:
                continue
            d = np.subtract(a, b, out=tmp[: a.shape[0], : a.shape[1]])
            np.multiply(d, d, out=d)
            view += d
    return out


def contrast_weights(image: np.ndarray, potts_weight: float) -> np.ndarray:
    """w_ij of SPEC §1 for every N8 pair, in `grid_edges_n8` order (float64).

    w_ij = β · (H·W/|N8|) · exp(−‖I_i − I_j‖²/(2σ²)) / d_ij — the contrast-sensitive
    Potts weights of the paper's grid CRF (eq. 26).
    """
    h, w = image.shape[:2]
    n8 = num_n8_edges(h, w)
    d2 = _squared_differences(image)
    if n8 == 0:
        return np.zeros(0, np.float64)
    sigma2 = float(d2.mean())
    if not sigma2 > 0:
        sigma2 = 1.0
    n_hv = (h - 1) * w + h * (w - 1)
    weights = np.exp(d2 / (-2.0 * sigma2))
    weights *= potts_weight * (h * w / n8)
    weights[n_hv:] /= np.sqrt(2.0)
    return weights


def resize_bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of K×h×w values to K×H×W (float64).

    A numpy port of torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False, antialias=False): source coordinate (dst + 0.5)·in/out − 0.5,
    clamped at 0, neighbours clamped at the border (checked against torch in the
    tests). Returns the input as float64 unchanged when the size already matches.
    """
    p = np.asarray(values, np.float64)
    if p.shape[1:] == (height, width):
        return p

    def axis_weights(n_in: int, n_out: int):
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)
        i0 = np.minimum(src.astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = src - i0
        return i0, i1, frac

    r0, r1, fr = axis_weights(p.shape[1], height)
    p = p[:, r0, :] * (1.0 - fr)[None, :, None] + p[:, r1, :] * fr[None, :, None]
    c0, c1, fc = axis_weights(p.shape[2], width)
    p = p[:, :, c0] * (1.0 - fc)[None, None, :] + p[:, :, c1] * fc[None, None, :]
    return p


def neg_log_probs(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """−log max(q, 1e-8) at H×W, K×H×W float64, resized in log space (SPEC §4, snapshot
    precision): a bilinear blend of −log q follows what the network's own upsampled
    logits give at a class transition far more closely than a blend of probabilities,
    which lets a confident neighbour's mass leak across the boundary."""
    return resize_bilinear(-np.log(np.maximum(np.asarray(probs, np.float64), PROB_FLOOR)), height, width)
