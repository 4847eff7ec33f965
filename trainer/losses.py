"""Stage-B and baseline losses (SPEC §2, §3; Marin & Boykov ICCV 2021).

Plain functions on tensors.  Shapes: logits N×K×H×W (any float dtype, also under
autocast: every loss upcasts to float32 and runs with autocast disabled), seeds
and proposals N×H×W long with 255 = unlabeled / no proposal, images N×3×H×W RGB
with values 0..255, probabilities N×K×H×W.

    partial_ce        eq. (6)                         PCE on the seeds
    robust_ce         eq. (17, 18, 22, 24, 25), SPEC §2   stage-B loss L_B
    grid_potts        eq. (7, 8), SPEC §3 Grid-GD       unweighted Potts term
    dense_crf         SPEC §3 Dense-GD (Tang et al.)    −Σ_k q^kᵀ W q^k / N
    bilateral_filter  W·x through a permutohedral lattice (trainer.permutohedral)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shared.labels import UNLABELLED

from .permutohedral import bilateral_filter

__all__ = [
    "partial_ce",
    "robust_ce",
    "grid_potts",
    "bilateral_filter",
    "dense_crf",
    "grid_pairs",
]


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _check(logits: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be N×K×H×W, got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(f"{name} {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")


def _on_host(t: torch.Tensor) -> bool:
    """Whether reading t's values costs no device sync. The value checks below run only
    then: on a GPU they would stall the queue every step, and there the trainer's inputs
    are checked before (the data sets check every label map, a learned ε is in range by
    construction)."""
    return t.device.type == "cpu"


def _label_log_prob(logq: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log q_i(labels_i) (N×H×W, 0 where unlabeled) and the mask of labeled pixels."""
    mask = labels != UNLABELLED
    K = logq.shape[1]
    if _on_host(labels) and mask.any():
        bad = labels[mask]
        if bool(((bad < 0) | (bad >= K)).any()):
            raise ValueError(f"labels must be in [0, {K}) or {UNLABELLED}")
    idx = torch.where(mask, labels, torch.zeros_like(labels)).long()
    picked = logq.gather(1, idx.unsqueeze(1)).squeeze(1)
    return torch.where(mask, picked, torch.zeros_like(picked)), mask


def _seed_normaliser(mask: torch.Tensor, seed_count: torch.Tensor | float | None) -> torch.Tensor | float:
    """What a seed loss divides its sum by: max(1, seeded pixels of this batch), or the
    caller's ``seed_count``. A data-parallel rank passes max(1, seeded pixels of the
    global batch) / world size (`trainer.engine.labelled_count`): DDP averages the ranks'
    gradients, so the step is then the one-rank step on the global batch, Σ / count over
    all ranks, however the scribbles fall across the ranks."""
    return mask.sum().clamp(min=1) if seed_count is None else seed_count


def partial_ce(logits: torch.Tensor, seeds: torch.Tensor, batch_average: bool = False,
               seed_count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Partial cross-entropy, eq. (6) / SPEC §3 PCE: mean of −log q_i(y_i) over seeds.

    ``seeds`` N×H×W long, 255 = unlabeled.  The mean is over all seeded pixels of
    the batch (``seed_count``: a data-parallel rank's normaliser, `_seed_normaliser`),
    divided by N as well with ``batch_average`` (the reference's scale,
    SPEC §2).  Returns a float32 zero that still carries a gradient (of zeros) when
    the batch has no seed.
    """
    _check(logits, seeds, "seeds")
    with _no_autocast(logits.device):
        logq = F.log_softmax(logits.float(), dim=1)
        lp, mask = _label_log_prob(logq, seeds)
        # no seed: lp is all zeros, a zero loss with zero gradients
        return -lp.sum() / _seed_normaliser(mask, seed_count) / (logits.shape[0] if batch_average else 1)


def partial_l2(logits: torch.Tensor, seeds: torch.Tensor, batch_average: bool = False,
               seed_count: torch.Tensor | float | None = None) -> torch.Tensor:
    """The seed term of the authors' Grid-GD script (its ``--loss-type l2`` default; the
    paper's eq. 8 has partial cross-entropy, :func:`partial_ce`, there):

        Σ_{i seeded} Σ_k (1[y_i = k] − q_i^k)² / number of seeded pixels

    ``batch_average`` is accepted and ignored: the reference's L2 loss is not divided by
    the batch size (its ``LxLoss``). A float32 zero with a gradient when nothing is seeded.
    ``seed_count``: a data-parallel rank's normaliser (`_seed_normaliser`).
    """
    _check(logits, seeds, "seeds")
    with _no_autocast(logits.device):
        q = torch.softmax(logits.float(), dim=1)
        mask = seeds != UNLABELLED
        n = mask.sum()
        if int(n) == 0:
            return q.sum() * 0.0
        onehot = F.one_hot(torch.where(mask, seeds, 0).long(), q.shape[1]).permute(0, 3, 1, 2).float()
        return (((onehot - q) ** 2).sum(1) * mask).sum() / (n if seed_count is None else seed_count)


def robust_ce(logits: torch.Tensor, proposals: torch.Tensor, seeds: torch.Tensor,
              eps: float | torch.Tensor, batch_average: bool = False,
              seed_count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Stage-B robust loss L_B, SPEC §2 (eq. 17, 18, 22, 24, 25).

    With K classes, a = ε/(K−1), b = 1 − K·a:

        ℓ_i = −log q_i(y_i)            seeded pixels (ε = 0 on seeds)
        ℓ_i = −log(a + b·q_i(s_i))     unseeded pixels with a proposal (s_i ≠ 255)
        other pixels are ignored
        L_B = Σ_i ℓ_i / max(1, number of seeded pixels in the batch)

    log(a + b·q) is computed as logsumexp(log a, log b + log_softmax z) in float32
    with autocast disabled, so values and gradients stay finite for logits up to
    ±1e4 whatever the input dtype.  ε = 0 gives plain cross-entropy on seeds and
    proposals (normalised by the seed count).  ε must lie in [0, (K−1)/K).
    ``batch_average`` divides by N as well (the reference's scale, SPEC §2).
    ``eps`` may be a tensor with a gradient (a learned outlier model,
    `trainer.outliers`): a scalar, or K values, one per proposal label.
    ``seed_count`` replaces the batch's seed count: a data-parallel rank's normaliser
    (`_seed_normaliser`).
    """
    _check(logits, seeds, "seeds")
    _check(logits, proposals, "proposals")
    K = logits.shape[1]
    if K < 2:
        raise ValueError("robust_ce needs at least two classes")
    values = eps.detach() if torch.is_tensor(eps) else torch.tensor(float(eps))
    if values.numel() not in (1, K) or _on_host(values) and not bool(((values >= 0) & (values < (K - 1) / K)).all()):
        raise ValueError(f"eps must be in [0, (K-1)/K) = [0, {(K - 1) / K:.4f}), one value or one per class, "
                         f"got {values.tolist()}")
    with _no_autocast(logits.device):
        logq = F.log_softmax(logits.float(), dim=1)
        seed_lp, seed_mask = _label_log_prob(logq, seeds)
        prop = torch.where(seed_mask, torch.full_like(proposals, UNLABELLED), proposals)
        prop_lp, prop_mask = _label_log_prob(logq, prop)
        if torch.is_tensor(eps):
            e = eps.float().to(logq.device)
            if e.numel() == K:  # ε of each pixel's proposed label
                e = e[prop.clamp(max=K - 1)]
            a = e / (K - 1)
            robust = torch.logaddexp(torch.log(a).expand_as(prop_lp), prop_lp + torch.log(1.0 - K * a))
        elif float(eps) > 0.0:
            a = float(eps) / (K - 1)
            robust = torch.logaddexp(torch.full_like(prop_lp, math.log(a)), prop_lp + math.log(1.0 - K * a))
        else:
            robust = prop_lp
        robust = torch.where(prop_mask, robust, torch.zeros_like(robust))
        total = -(seed_lp.sum() + robust.sum())
        return total / _seed_normaliser(seed_mask, seed_count) / (logits.shape[0] if batch_average else 1)


def grid_pairs(images: torch.Tensor, roi: torch.Tensor | None = None):
    """The N8 contrast weights w'_ij of SPEC §1/§3 (without β) over the pairs inside the
    ROI, and the number of those pairs per image.

    Returns ([((dy, dx), w)], n_pairs): w is N×H'×W' for the pairs (i, i + (dy, dx)) of
    the four directions (0,1), (1,0), (1,1), (1,−1), w'_ij = exp(−‖I_i − I_j‖²/(2σ²)) / d_ij,
    and 0 for a pair with a pixel outside ``roi`` (N×H×W, True = image, False = padding;
    None = every pixel). σ² per image = mean of ‖I_i − I_j‖² over its in-ROI pairs (1 if
    that is 0); n_pairs (N) counts them, |N8| of an image without padding.
    """
    img = images.detach().float()
    N, _, H, W = img.shape
    inside = torch.ones(N, H, W, dtype=torch.bool, device=img.device) if roi is None else roi.to(img.device).bool()
    shifts = [(0, 1), (1, 0), (1, 1), (1, -1)]
    diffs, masks = [], []
    for dy, dx in shifts:
        a, b = _pair_views(img, dy, dx)
        ra, rb = _pair_views(inside, dy, dx)
        masks.append((ra & rb).float())
        diffs.append(((a - b) ** 2).sum(1) * masks[-1])  # N×H'×W'
    n_pairs = sum(m.flatten(1).sum(1) for m in masks)  # N
    sq_sum = sum(d.flatten(1).sum(1) for d in diffs)  # N
    sigma2 = sq_sum / n_pairs.clamp(min=1)
    sigma2 = torch.where(sigma2 > 0, sigma2, torch.ones_like(sigma2)).view(N, 1, 1)
    out = []
    for (dy, dx), d2, m in zip(shifts, diffs, masks):
        dist = math.sqrt(2.0) if dy and dx else 1.0
        out.append(((dy, dx), torch.exp(-d2 / (2.0 * sigma2)) / dist * m))
    return out, n_pairs


def _pair_views(x: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views x_i, x_j (…×H'×W') over the pairs j = i + (dy, dx) inside the grid."""
    H, W = x.shape[-2:]
    if dx >= 0:
        a = x[..., : H - dy, : W - dx]
        b = x[..., dy:, dx:]
    else:
        a = x[..., : H - dy, -dx:]
        b = x[..., dy:, : W + dx]
    return a, b


def grid_potts(probs: torch.Tensor, images: torch.Tensor, roi: torch.Tensor | None = None) -> torch.Tensor:
    """Grid-GD regulariser, SPEC §3 (eq. 7, 8), unweighted (ν is the caller's).

        (1/|N8|) · Σ_{{i,j} ∈ N8} w'_ij · (1 − Σ_k q_i^k q_j^k)

    per image, averaged over the batch; w'_ij and |N8| as in :func:`grid_pairs`: only
    pairs with both pixels in ``roi`` (N×H×W; None = all) count, in σ², the sum and
    |N8| alike (padding is not image, SPEC §3).  ``probs`` N×K×H×W (softmax outputs);
    if their size differs from the images' they are resized bilinearly to the image
    size first (SPEC §1).  Computed in float32 with autocast disabled.
    """
    N, H, W = _batch_shape(probs, images)
    with _no_autocast(probs.device):
        q = probs.float()
        if q.shape[-2:] != (H, W):
            q = F.interpolate(q, size=(H, W), mode="bilinear", align_corners=False)
        pairs, n_pairs = grid_pairs(images.to(q.device), roi)
        total = q.new_zeros(N)
        for (dy, dx), w in pairs:
            qa, qb = _pair_views(q, dy, dx)
            total = total + (w * (1.0 - (qa * qb).sum(1))).flatten(1).sum(1)
        return (total / n_pairs.clamp(min=1)).mean()


def _batch_shape(probs: torch.Tensor, images: torch.Tensor) -> tuple[int, int, int]:
    """N, H, W of a batch of probabilities and its images (both N×C×H×W)."""
    if probs.dim() != 4 or images.dim() != 4 or probs.shape[0] != images.shape[0]:
        raise ValueError(f"probs {tuple(probs.shape)} and images {tuple(images.shape)} must be N×C×H×W")
    return probs.shape[0], images.shape[-2], images.shape[-1]


def dense_crf(probs: torch.Tensor, images: torch.Tensor, sigma_rgb: float = 15.0,
              sigma_xy: float = 100.0, scale: float = 0.5, roi: torch.Tensor | None = None) -> torch.Tensor:
    """Dense-GD regulariser, SPEC §3 (Tang et al.'s DenseCRF loss), unweighted.

    Images and probabilities are resized bilinearly by ``scale`` (σ_xy, given in
    full-resolution pixels, is multiplied by ``scale``); the value is

        −Σ_k q^kᵀ W q^k / N,   W_ij = exp(−‖p_i−p_j‖²/(2σ_xy²) − ‖I_i−I_j‖²/(2σ_rgb²))

    with q multiplied by ``roi`` (N×H×W, False on padding, resized with the images;
    None = all pixels) first, as the reference does, and
    W·q^k from :func:`bilateral_filter` (permutohedral lattice, normalised to
    match the exact W·q on image content; Tang et al.'s C++ lattice returns
    ``trainer.permutohedral.krahenbuhl_factor(5)`` ≈ 0.52 times this).  The
    gradient (by autograd) is −(W + Wᵀ)q/N ≈ −2·W·q/N w.r.t. the resized q.

    The weight ν is applied by the caller.  SPEC's default ν = 2e-9 was tuned for
    VOC-sized inputs (≈ 500×375 images, i.e. ≈ 250×190 after scale 0.5): the value
    grows with the squared number of pixels (q W q sums over all pixel pairs within
    σ_xy), so other image sizes, σ's or scales need another ν.
    """
    N, H, W = _batch_shape(probs, images)
    with _no_autocast(probs.device):
        q = probs.float()
        img = images.detach().float().to(q.device)
        if scale != 1.0:
            h, w = max(1, int(round(H * scale))), max(1, int(round(W * scale)))
            img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
        else:
            h, w = H, W
        if q.shape[-2:] != (h, w):
            q = F.interpolate(q, size=(h, w), mode="bilinear", align_corners=False)
        if roi is not None:
            q = q * F.interpolate(roi.to(q.device)[:, None].float(), size=(h, w), mode="nearest")
        Wq = bilateral_filter(q, img, sigma_rgb, sigma_xy * scale)
        return -(q * Wq).sum() / N

