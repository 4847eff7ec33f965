"""Stage-B and baseline losses vs loop-level implementations of their formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.test_permutohedral import RATIO_BAND
from trainer.losses import bilateral_filter, dense_crf, grid_potts, partial_ce, robust_ce

IGN = 255


def make_inputs(N=2, K=4, H=5, W=6, seed=0, frac_seed=0.3, frac_prop=0.8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, K, H, W, generator=g) * 3
    seeds = torch.randint(0, K, (N, H, W), generator=g)
    seeds[torch.rand(N, H, W, generator=g) > frac_seed] = IGN
    props = torch.randint(0, K, (N, H, W), generator=g)
    props[torch.rand(N, H, W, generator=g) > frac_prop] = IGN
    return logits, seeds, props


# ---------------------------------------------------------------- loop references

def ref_partial_ce(logits, seeds):
    N, K, H, W = logits.shape
    total, n = 0.0, 0
    for b in range(N):
        for i in range(H):
            for j in range(W):
                y = int(seeds[b, i, j])
                if y != IGN:
                    z = logits[b, :, i, j].double()
                    q = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
                    total += -math.log(q[y].item())
                    n += 1
    return total / n if n else 0.0


def ref_robust_ce(logits, props, seeds, eps):
    N, K, H, W = logits.shape
    a = eps / (K - 1)
    b_ = 1 - K * a
    total, n_seeds = 0.0, 0
    for b in range(N):
        for i in range(H):
            for j in range(W):
                z = logits[b, :, i, j].double()
                q = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
                y, s = int(seeds[b, i, j]), int(props[b, i, j])
                if y != IGN:
                    total += -math.log(q[y].item())
                    n_seeds += 1
                elif s != IGN:
                    total += -math.log(a + b_ * q[s].item())
    return total / max(1, n_seeds)


def ref_grid_potts(probs, images, roi=None):
    """SPEC §3 by a loop over the N8 pairs, only those with both pixels in `roi`."""
    N, K, H, W = probs.shape
    vals = []
    for b in range(N):
        pairs = []
        for i in range(H):
            for j in range(W):
                for di, dj in [(0, 1), (1, 0), (1, 1), (1, -1)]:
                    i2, j2 = i + di, j + dj
                    if 0 <= i2 < H and 0 <= j2 < W and (roi is None or (roi[b, i, j] and roi[b, i2, j2])):
                        pairs.append(((i, j), (i2, j2), math.sqrt(di * di + dj * dj)))
        if roi is None:
            assert len(pairs) == (H - 1) * W + H * (W - 1) + 2 * (H - 1) * (W - 1)
        img = images[b].double()
        d2 = [float(((img[:, p[0], p[1]] - img[:, r[0], r[1]]) ** 2).sum()) for p, r, _ in pairs]
        sigma2 = sum(d2) / len(pairs) or 1.0
        total = 0.0
        for (p, r, dist), dd in zip(pairs, d2):
            w = math.exp(-dd / (2 * sigma2)) / dist
            total += w * (1 - float((probs[b, :, p[0], p[1]].double() * probs[b, :, r[0], r[1]].double()).sum()))
        vals.append(total / len(pairs))
    return sum(vals) / N


# ---------------------------------------------------------------- partial CE

def test_partial_ce_matches_loop():
    logits, seeds, _ = make_inputs()
    assert partial_ce(logits, seeds).item() == pytest.approx(ref_partial_ce(logits, seeds), rel=1e-5)
    # Same as F.cross_entropy with ignore_index.
    torch.testing.assert_close(partial_ce(logits, seeds), F.cross_entropy(logits, seeds, ignore_index=IGN))


def test_partial_ce_no_seed_is_zero_with_grad():
    logits, seeds, _ = make_inputs()
    logits.requires_grad_(True)
    loss = partial_ce(logits, torch.full_like(seeds, IGN))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_partial_ce_rejects_bad_shapes_and_labels():
    logits, seeds, _ = make_inputs()
    with pytest.raises(ValueError):
        partial_ce(logits, seeds[:, :-1])
    bad = seeds.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError):
        partial_ce(logits, bad)


# ---------------------------------------------------------------- robust CE

@pytest.mark.parametrize("eps", [0.0, 0.3, 0.7, 0.74])
def test_robust_ce_matches_loop(eps):
    logits, seeds, props = make_inputs(seed=3)
    got = robust_ce(logits, props, seeds, eps).item()
    assert got == pytest.approx(ref_robust_ce(logits, props, seeds, eps), rel=1e-5)


def test_robust_ce_eps0_is_cross_entropy_on_seeds_and_proposals():
    logits, seeds, props = make_inputs(seed=4)
    target = torch.where(seeds != IGN, seeds, props)
    ce_sum = F.cross_entropy(logits, target, ignore_index=IGN, reduction="sum")
    expected = ce_sum / (seeds != IGN).sum()
    torch.testing.assert_close(robust_ce(logits, props, seeds, 0.0), expected)


def test_robust_ce_no_seed_normalises_by_one_and_ignores_unlabelled():
    logits, seeds, props = make_inputs(seed=5)
    none = torch.full_like(seeds, IGN)
    got = robust_ce(logits, props, none, 0.5).item()
    assert got == pytest.approx(ref_robust_ce(logits, props, none, 0.5), rel=1e-5)
    assert robust_ce(logits, none, none, 0.5).item() == 0.0


def test_robust_ce_eps_range():
    logits, seeds, props = make_inputs(K=4)
    for bad in (-0.1, 0.75, 0.9):
        with pytest.raises(ValueError):
            robust_ce(logits, props, seeds, bad)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.0, 0.5, 0.9522])
def test_robust_ce_extreme_logits_finite(dtype, eps):
    K = 21
    g = torch.Generator().manual_seed(0)
    logits = (torch.randint(0, 2, (2, K, 6, 7), generator=g).float() * 2 - 1) * 1e4
    seeds = torch.randint(0, K, (2, 6, 7), generator=g)
    seeds[:, :4] = IGN
    props = torch.randint(0, K, (2, 6, 7), generator=g)
    if dtype is None:
        x = logits.clone().requires_grad_(True)
        loss = robust_ce(x, props, seeds, eps)
        loss_p = partial_ce(x, seeds)
    else:
        x = logits.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            y = F.conv2d(x, torch.eye(K).view(K, K, 1, 1))  # an autocast op: output in bf16/fp16
            assert y.dtype == dtype
            loss = robust_ce(y, props, seeds, eps)
            loss_p = partial_ce(y, seeds)
    assert loss.dtype == torch.float32
    (loss + loss_p).backward()
    assert torch.isfinite(loss) and torch.isfinite(loss_p)
    assert torch.isfinite(x.grad).all()


def test_robust_ce_eps_dampens_outlier_gradient():
    # A confidently contradicted proposal has a bounded loss with ε > 0.
    K = 3
    logits = torch.zeros(1, K, 1, 2)
    logits[0, 0] = 50.0
    seeds = torch.tensor([[[0, IGN]]])
    props = torch.tensor([[[IGN, 2]]])
    a = 0.3 / (K - 1)
    assert robust_ce(logits, props, seeds, 0.3).item() == pytest.approx(-math.log(a + (1 - K * a) * 0.0), rel=1e-4)


# ---------------------------------------------------------------- grid Potts

def test_grid_potts_matches_loop():
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(2, 3, 5, 6, generator=g) * 2, 1)
    images = torch.rand(2, 3, 5, 6, generator=g) * 255
    assert grid_potts(probs, images).item() == pytest.approx(ref_grid_potts(probs, images), rel=1e-5)


def test_grid_potts_with_a_roi_counts_only_pairs_inside_it():
    """Padding (outside the ROI) enters neither σ², nor the pair sum, nor |N8| (SPEC §3):
    the value equals the loop over in-ROI pairs, and is blind to what the padding holds."""
    g = torch.Generator().manual_seed(9)
    probs = torch.softmax(torch.randn(2, 3, 6, 7, generator=g) * 2, 1)
    images = torch.rand(2, 3, 6, 7, generator=g) * 255
    roi = torch.ones(2, 6, 7, dtype=torch.bool)
    roi[0, 4:, :] = False  # padded at the bottom
    roi[1, :, 5:] = False  # and at the right
    assert grid_potts(probs, images, roi).item() == pytest.approx(ref_grid_potts(probs, images, roi), rel=1e-5)
    other = images.clone()
    other[~roi[:, None].expand_as(other)] = 0.0  # padding painted black
    assert grid_potts(probs, other, roi).item() == pytest.approx(grid_potts(probs, images, roi).item(), rel=1e-6)
    assert grid_potts(probs, images, torch.ones_like(roi)).item() == pytest.approx(grid_potts(probs, images).item())


def test_dense_crf_with_a_roi_filters_q_times_roi():
    """Dense-GD multiplies q by the ROI before the filter (SPEC §3): the value is that of
    q·roi, and padded pixels get no gradient."""
    N, K, H, W = 1, 2, 20, 20
    images = smooth_images(N, H, W)
    roi = torch.ones(N, H, W, dtype=torch.bool)
    roi[:, 14:, :] = False
    z = torch.randn(N, K, H, W, requires_grad=True)
    q = torch.softmax(z, 1)
    val = dense_crf(q, images, sigma_rgb=15.0, sigma_xy=10.0, scale=1.0, roi=roi)
    assert val.item() == pytest.approx(
        dense_crf(q.detach() * roi[:, None], images, sigma_rgb=15.0, sigma_xy=10.0, scale=1.0).item(), rel=1e-6)
    val.backward()
    assert torch.all(z.grad[:, :, 14:, :] == 0) and z.grad[:, :, :14].abs().sum() > 0


def test_grid_potts_constant_image_and_labelling():
    images = torch.full((1, 3, 4, 4), 9.0)  # σ² = 0 -> 1, all weights 1/d
    hard = torch.zeros(1, 2, 4, 4)
    hard[:, 0] = 1
    assert grid_potts(hard, images).item() == pytest.approx(0.0, abs=1e-7)
    probs = torch.softmax(torch.randn(1, 2, 4, 4), 1)
    assert grid_potts(probs, images).item() == pytest.approx(ref_grid_potts(probs, images), rel=1e-5)


def test_grid_potts_gradient_and_resize():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(1, 3, 4, 5, generator=g, requires_grad=True)
    images = torch.rand(1, 3, 8, 10, generator=g) * 255
    v = grid_potts(torch.softmax(z, 1), images)
    v.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ---------------------------------------------------------------- dense CRF

def exact_W(images, sigma_rgb, sigma_xy):
    N, _, H, W = images.shape
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    p = torch.stack([xs, ys], -1).reshape(-1, 2).double()
    mats = []
    for n in range(N):
        I = images[n].permute(1, 2, 0).reshape(-1, 3).double()
        mats.append(torch.exp(-torch.cdist(p, p) ** 2 / (2 * sigma_xy ** 2)
                              - torch.cdist(I, I) ** 2 / (2 * sigma_rgb ** 2)))
    return mats


def smooth_images(N, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    out = []
    for _ in range(N):
        ph = torch.rand(3, generator=g) * 6
        img = torch.stack([128 + 100 * torch.sin(xx / 5 + ph[0]), 128 + 100 * torch.cos(yy / 4 + ph[1]),
                           128 + 60 * torch.sin((xx - yy) / 6 + ph[2])])
        out.append((img + 8 * torch.randn(3, H, W, generator=g)).clamp(0, 255))
    return torch.stack(out)


def test_dense_crf_value_and_gradient_vs_exact():
    N, K, H, W = 2, 3, 24, 26
    images = smooth_images(N, H, W)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(N, K, H, W, generator=g, requires_grad=True)
    q = torch.softmax(z, 1)
    q.retain_grad()
    val = dense_crf(q, images, sigma_rgb=15.0, sigma_xy=10.0, scale=1.0)
    val.backward()
    mats = exact_W(images, 15.0, 10.0)
    qd = q.detach().double()
    exact_val = 0.0
    grads = []
    for n in range(N):
        qn = qd[n].reshape(K, -1)
        Wq = (mats[n] @ qn.T).T
        exact_val += -(qn * Wq).sum().item()
        grads.append((-2 * Wq / N).reshape(K, H, W))
    exact_val /= N
    low, high = RATIO_BAND  # trainer/permutohedral.py's documented bound
    assert low <= val.item() / exact_val <= high
    gexp = torch.stack(grads)
    cos = F.cosine_similarity(q.grad.double().flatten(), gexp.flatten(), dim=0).item()
    assert cos > 0.99
    assert low <= q.grad.double().norm().item() / gexp.norm().item() <= high
    assert torch.isfinite(z.grad).all()


def test_dense_crf_downscales_images_probs_and_sigma():
    N, K, H, W = 1, 2, 32, 32
    images = smooth_images(N, H, W, seed=2)
    probs = torch.softmax(torch.randn(N, K, H, W), 1)
    val = dense_crf(probs, images, sigma_rgb=15.0, sigma_xy=20.0, scale=0.5)
    small_i = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    small_q = F.interpolate(probs, size=(16, 16), mode="bilinear", align_corners=False)
    direct = -(small_q * bilateral_filter(small_q, small_i, 15.0, 10.0)).sum() / N
    torch.testing.assert_close(val, direct)


def test_dense_crf_under_autocast():
    images = smooth_images(1, 16, 16)
    z = torch.randn(1, 3, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = torch.softmax(z.to(torch.bfloat16), 1)
        val = dense_crf(q, images, scale=1.0, sigma_xy=8.0)
    assert val.dtype == torch.float32 and torch.isfinite(val)
    val.backward()
    assert torch.isfinite(z.grad).all()


def _batch(n=3, k=4, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, h, w, generator=g)
    seeds = torch.full((n, h, w), 255, dtype=torch.long)
    seeds[:, 1, 1:4] = torch.randint(0, k, (n, 3), generator=g)
    proposals = torch.randint(0, k, (n, h, w), generator=g)
    return logits, seeds, proposals


def test_batch_average_divides_the_data_terms_by_n():
    """SPEC §2: with batch_average the reference's scale, the per-batch value / N."""
    from trainer.methods import method_loss

    logits, seeds, proposals = _batch()
    assert partial_ce(logits, seeds, batch_average=True) == pytest.approx(partial_ce(logits, seeds).item() / 3)
    assert robust_ce(logits, proposals, seeds, 0.5, batch_average=True) == pytest.approx(
        robust_ce(logits, proposals, seeds, 0.5).item() / 3)
    image = torch.rand(3, 3, 6, 5) * 255
    batch = {"seeds": seeds, "proposal": proposals, "image": image, "mask": proposals}
    for name in ("full", "pce", "grid-tr"):
        assert method_loss(name, logits, batch, 0.5, None, True) == pytest.approx(
            method_loss(name, logits, batch, 0.5, None).item() / 3), name
    # the regulariser is a batch mean already: only the PCE part changes
    pce = partial_ce(logits, seeds).item()
    assert method_loss("grid-gd", logits, batch, 0.5, 2.0, True) == pytest.approx(
        method_loss("grid-gd", logits, batch, 0.5, 2.0).item() - pce + pce / 3)


@pytest.mark.parametrize("batch_average", [False, True])
def test_method_loss_is_data_term_plus_nu_times_regulariser(batch_average):
    """Grid-GD and Dense-GD: method_loss = PCE (the loop reference, /N with batch_average)
    + ν · the regulariser of softmax(logits) on the batch's images inside its ROI; grid
    Potts by the loop reference, the dense CRF as dense_crf computes it (checked against
    the exact filter above); ν None is the method's default."""
    from trainer.methods import METHODS, method_loss

    logits, seeds, proposals = _batch(n=2, h=7, w=8)
    image = smooth_images(2, 7, 8, seed=3)
    roi = torch.ones(2, 7, 8, dtype=torch.bool)
    roi[1, 5:, :] = False
    q = torch.softmax(logits, 1)
    pce = ref_partial_ce(logits, seeds) / (2 if batch_average else 1)
    regulariser = {"grid-gd": ref_grid_potts(q, image, roi), "dense-gd": dense_crf(q, image, roi=roi).item()}
    for name, reg in regulariser.items():
        assert abs(reg) > 1e-3 * pce, name  # a term that would show if it were dropped
        for nu in (None, 0.0, 0.5, 3.0):
            batch = {"seeds": seeds, "proposal": proposals, "image": image, "mask": proposals, "roi": roi}
            got = method_loss(name, logits, batch, 0.5, nu, batch_average).item()
            weight = METHODS[name].default_nu if nu is None else nu
            assert got == pytest.approx(pce + weight * reg, rel=1e-5, abs=1e-12), (name, nu)


def test_batch_average_equals_lr_and_weight_decay_rescaling():
    """One SGD step (momentum, weight decay) on the batch-averaged loss at LR η, wd λ is
    the step on the per-batch loss at η/N, wd N·λ: the two ways to use the reference's LRs."""
    from trainer.engine import make_optimizer

    logits, seeds, proposals = _batch(n=4)
    x = torch.randn(4, 3, 6, 5)
    steps = []
    for batch_average, lr, wd in ((True, 0.1, 5e-4), (False, 0.1 / 4, 4 * 5e-4)):
        torch.manual_seed(0)
        net = torch.nn.Conv2d(3, 4, 3, padding=1)
        opt = make_optimizer(net.parameters(), "sgd", lr, 0.9, wd)
        for _ in range(2):  # a second step exercises the momentum buffer
            opt.zero_grad()
            robust_ce(net(x) + logits, proposals, seeds, 0.5, batch_average=batch_average).backward()
            opt.step()
        steps.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*steps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- outlier model

def test_learned_eps_starts_at_the_given_value_and_matches_the_fixed_loss():
    from trainer.outliers import OutlierModel

    logits, seeds, proposals = _batch(k=4)
    for kind in ("learned", "learned-per-class"):
        model = OutlierModel(kind, 0.5, 4)
        eps = model()
        assert torch.allclose(eps, torch.full_like(eps, 0.5))
        loss = robust_ce(logits, proposals, seeds, eps)
        assert loss.item() == pytest.approx(robust_ce(logits, proposals, seeds, 0.5).item(), rel=1e-6)
        loss.backward()
        assert model.theta.grad is not None and model.theta.grad.abs().sum() > 0
    assert OutlierModel("const", 0.5, 4)() == 0.5 and OutlierModel("const", 0.5, 4).param_groups(0.1) == []


def test_per_class_eps_applies_each_labels_own_value():
    logits, seeds, proposals = _batch(k=3)
    eps = torch.tensor([0.1, 0.3, 0.6])
    K, q = 3, torch.softmax(logits, 1)
    want, n_seeds = 0.0, int((seeds != 255).sum())
    for n, i, j in zip(*torch.nonzero(torch.ones_like(seeds, dtype=torch.bool), as_tuple=True)):
        if seeds[n, i, j] != 255:
            want -= math.log(q[n, seeds[n, i, j], i, j])
        else:
            s = int(proposals[n, i, j])
            a = float(eps[s]) / (K - 1)
            want -= math.log(a + (1 - K * a) * float(q[n, s, i, j]))
    assert robust_ce(logits, proposals, seeds, eps).item() == pytest.approx(want / n_seeds, rel=1e-5)
    with pytest.raises(ValueError, match="eps"):
        robust_ce(logits, proposals, seeds, torch.tensor([0.1, 0.9, 0.2]))  # 0.9 ≥ (K−1)/K


@pytest.mark.parametrize("wrong,direction", [(True, 1), (False, -1)])
def test_learned_eps_follows_how_often_proposals_are_wrong(wrong, direction):
    """Trained alone on a fixed, confident network: ε rises when the proposals disagree
    with it (outliers) and falls when they agree."""
    from trainer.outliers import OutlierModel

    logits, seeds, _ = _batch(k=4)
    logits = logits * 4
    agree = logits.argmax(1)
    proposals = (agree + 1) % 4 if wrong else agree
    model = OutlierModel("learned", 0.3, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        robust_ce(logits, proposals, seeds, model()).backward()
        opt.step()
    assert direction * (model.value() - 0.3) > 0.05, model.value()
