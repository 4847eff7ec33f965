"""Evaluation metrics: confusion matrices, mIoU, and trimap mIoU (paper Fig. 6).

Confusion matrices are numpy int64 arrays C (K×K) with C[g, p] = number of pixels
of ground-truth class g predicted as p; they add up, so a val set is evaluated by
summing per-image (or per-batch) matrices.  Inputs may be numpy arrays or torch
tensors (any device) of integer labels, of any matching shape; UNLABELLED (255, by
default) in the ground truth marks pixels that are not evaluated.

`confusion_counts` and `trimap_counts` are the same counts as torch tensors on the
inputs' device, with no host read (no range check, no bincount, whose CUDA kernel
reads its input's maximum): the trainer's evaluation sums them over batches there.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from shared.labels import UNLABELLED

__all__ = ["confusion_matrix", "confusion_counts", "trimap_counts", "miou", "boundary_distance",
           "trimap_confusions", "trimap_miou"]


def _as_long_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().long()
    return torch.from_numpy(np.asarray(x).astype(np.int64, copy=False))


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int = UNLABELLED) -> np.ndarray:
    """K×K int64 confusion matrix (rows ground truth, columns prediction).

    Pixels whose ground truth is ``ignore_index`` (or outside [0, K)) are skipped;
    predictions outside [0, K) raise ValueError.  Matrices add up across images.
    """
    p = _as_long_tensor(pred)
    g = _as_long_tensor(gt).to(p.device)
    if p.shape != g.shape:
        raise ValueError(f"pred {tuple(p.shape)} and gt {tuple(g.shape)} differ in shape")
    K = int(num_classes)
    valid = (g != ignore_index) & (g >= 0) & (g < K)
    if valid.any() and (int(p[valid].min()) < 0 or int(p[valid].max()) >= K):
        raise ValueError(f"predictions must be in [0, {K})")
    return confusion_counts(p, g, K, ignore_index).cpu().numpy()


def _counts(index: torch.Tensor, keep: torch.Tensor, bins: int) -> torch.Tensor:
    """How often each of `bins` values occurs in `index` where `keep`: a fixed-size
    scatter, where bincount's output size would depend on the data (a host read)."""
    index = torch.where(keep, index, torch.full_like(index, bins))  # bin `bins` collects the rest
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=index.device)
    counts.scatter_add_(0, index.reshape(-1), torch.ones_like(index.reshape(-1)))
    return counts[:bins]


def confusion_counts(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int = UNLABELLED) -> torch.Tensor:
    """`confusion_matrix` as an int64 K×K tensor on the inputs' device, with no host read;
    predictions must be in [0, K) (unchecked: an argmax over K classes is)."""
    K = int(num_classes)
    p, g = pred.long(), gt.long()
    valid = (g != ignore_index) & (g >= 0) & (g < K)
    return _counts(g * K + p, valid, K * K).reshape(K, K)


def miou(conf) -> tuple[float, list[float]]:
    """Mean IoU and per-class IoU from a confusion matrix.

    IoU_k = C[k,k] / (Σ_p C[k,p] + Σ_g C[g,k] − C[k,k]); a class absent from both
    ground truth and predictions has IoU NaN and is left out of the mean (NaN
    when every class is).
    """
    c = np.asarray(conf, dtype=np.float64)
    tp = np.diag(c)
    denom = c.sum(0) + c.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1.0), np.nan)
    valid = ~np.isnan(iou)
    mean = float(iou[valid].mean()) if valid.any() else math.nan
    return mean, [float(v) for v in iou]


def _dilate(m: torch.Tensor, rows: bool, cols: bool) -> torch.Tensor:
    """One-pixel binary dilation of N×H×W bools along the rows and/or columns axis."""
    out = m
    if rows:
        out = m.clone()
        out[:, 1:, :] |= m[:, :-1, :]
        out[:, :-1, :] |= m[:, 1:, :]
    if cols:
        src = out
        out = src.clone()
        out[:, :, 1:] |= src[:, :, :-1]
        out[:, :, :-1] |= src[:, :, 1:]
    return out


def boundary_distance(gt, max_width: int) -> torch.Tensor:
    """Smallest w in 1..max_width such that the pixel's (2w+1)² window holds two labels
    (it lies in the trimap band of width w), else max_width+1.

    gt: H×W or N×H×W labels (255 counts as a label here: VOC's void band marks
    object boundaries).  Computed with binary dilations (boolean shifts, i.e. a
    separable 3×3 max-pool): band(1) = pixels whose 3×3 window holds two labels,
    band(w) = band(1) dilated by a (2w−1)×(2w−1) square.
    Returns a long tensor of gt's shape (on gt's device for torch input).
    """
    g = _as_long_tensor(gt)
    squeeze = g.dim() == 2
    if squeeze:
        g = g[None]
    if g.dim() != 3:
        raise ValueError(f"gt must be H×W or N×H×W, got {tuple(g.shape)}")
    # band(1): the 3×3 window holds two labels <=> a differing horizontal or
    # vertical neighbour pair lies in it.
    hdiff = g[:, :, 1:] != g[:, :, :-1]  # pair (j, j+1)
    vdiff = g[:, 1:, :] != g[:, :-1, :]
    hpix = torch.zeros_like(g, dtype=torch.bool)  # pixel touches a differing h-pair
    hpix[:, :, 1:] |= hdiff
    hpix[:, :, :-1] |= hdiff
    vpix = torch.zeros_like(g, dtype=torch.bool)
    vpix[:, 1:, :] |= vdiff
    vpix[:, :-1, :] |= vdiff
    # The window must contain both pixels of the pair: dilate each by one step in
    # the pair's transverse direction (and the pair's span covers its own axis).
    band = _dilate(hpix, rows=True, cols=False) | _dilate(vpix, rows=False, cols=True)
    # dist = 1 + number of the dilations band(1..max_width) that miss the pixel.
    # On the host, shortcuts for an empty or a full band; on a device, reading the band
    # would stall the queue, and the plain loop counts the same.
    host = g.device.type == "cpu"
    if host and not bool(band.any()):
        return torch.full(g.shape if not squeeze else g.shape[1:], max_width + 1,
                          dtype=torch.long, device=g.device)
    missed = (~band).to(torch.int16)
    for w in range(2, max_width + 1):
        if host and w % 8 == 0 and bool(band.all()):
            break  # every later band is full: nothing more to count
        band = _dilate(band, rows=True, cols=True)
        missed += ~band
    dist = missed.long() + 1
    return dist[0] if squeeze else dist


def trimap_confusions(pred, gt, num_classes: int, widths, ignore_index: int = UNLABELLED) -> np.ndarray:
    """Confusion matrices restricted to the trimap band of each width.

    Returns an int64 array of shape (len(widths), K, K): entry t is
    ``confusion_matrix`` over the pixels within widths[t] px of a boundary
    (``boundary_distance(gt, ·) <= widths[t]``).
    Sum it over a val set and call :func:`trimap_miou` (paper Fig. 6: widths 1..40).
    One distance map and one bincount serve all widths.
    """
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError("widths must be positive integers")
    p = _as_long_tensor(pred)
    g = _as_long_tensor(gt).to(p.device)
    if p.shape != g.shape:
        raise ValueError(f"pred {tuple(p.shape)} and gt {tuple(g.shape)} differ in shape")
    K = int(num_classes)
    valid = (g != ignore_index) & (g >= 0) & (g < K)
    if valid.any() and (int(p[valid].min()) < 0 or int(p[valid].max()) >= K):
        raise ValueError(f"predictions must be in [0, {K})")
    return trimap_counts(p, g, K, widths, ignore_index).cpu().numpy()


def trimap_counts(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, widths,
                  ignore_index: int = UNLABELLED) -> torch.Tensor:
    """`trimap_confusions` as an int64 (len(widths), K, K) tensor on the inputs' device,
    with no host read; pred and gt N×H×W (or H×W), predictions in [0, K) unchecked."""
    K = int(num_classes)
    wmax = max(widths)
    p, g = pred.long(), gt.long()
    dist = boundary_distance(g, wmax)
    valid = (g != ignore_index) & (g >= 0) & (g < K)
    counts = _counts((dist - 1) * K * K + g * K + p, valid, (wmax + 1) * K * K)
    per_dist = counts.reshape(wmax + 1, K, K)[:wmax].cumsum(0)  # distance <= w
    return per_dist[torch.tensor([w - 1 for w in widths], device=per_dist.device)]


def trimap_miou(confs) -> list[float]:
    """mIoU for each width from (summed) :func:`trimap_confusions` output."""
    return [miou(c)[0] for c in np.asarray(confs)]
