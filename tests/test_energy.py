"""The SPEC §1 energy: an independent loop implementation against energy.py."""
import math

import numpy as np
import pytest
import torch

from solver_service import energy as E
from tests.energy_oracle import contrast_sigma2, potts_energy, unary_costs


def loop_energy(labels, image, probs, seeds, lam, beta):
    """SPEC §1 written out pixel by pixel and pair by pair (probs already H×W)."""
    H, W = labels.shape
    img = image.astype(np.float64)
    pairs = []
    for y in range(H):
        for x in range(W):
            for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < H and 0 <= xx < W:
                    pairs.append(((y, x), (yy, xx), math.sqrt(2) if dy and dx else 1.0))
    n8 = (H - 1) * W + H * (W - 1) + 2 * (H - 1) * (W - 1)
    assert len(pairs) == n8
    d2 = [float(np.sum((img[a] - img[b]) ** 2)) for a, b, _ in pairs]
    sigma2 = sum(d2) / len(d2) if d2 else 0.0
    sigma2 = sigma2 if sigma2 > 0 else 1.0
    unary = 0.0
    for y in range(H):
        for x in range(W):
            if seeds[y, x] == 255:
                unary += lam * -math.log(max(float(probs[labels[y, x], y, x]), 1e-8))
    smooth = 0.0
    for (a, b, d), dd in zip(pairs, d2):
        if labels[a] != labels[b]:
            smooth += beta * (H * W / n8) * math.exp(-dd / (2 * sigma2)) / d
    return unary + smooth, unary, smooth


def random_problem(rng, H, W, K, seed_frac=0.2):
    image = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    probs = rng.dirichlet(np.ones(K), (H, W)).transpose(2, 0, 1)
    probs[0, 0, 0] = 0.0  # exercises the 1e-8 floor
    seeds = np.full((H, W), 255, np.uint8)
    m = rng.random((H, W)) < seed_frac
    seeds[m] = rng.integers(0, K, m.sum())
    labels = rng.integers(0, K, (H, W)).astype(np.uint8)
    return labels, image, probs, seeds


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 1), (2, 2), (5, 7), (6, 4)])
def test_potts_energy_matches_loop(shape):
    rng = np.random.default_rng(sum(shape))
    labels, image, probs, seeds = random_problem(rng, *shape, K=3)
    want = loop_energy(labels, image, probs, seeds, 0.3, 7.0)
    got = potts_energy(labels, image, probs, seeds, 0.3, 7.0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_edges_and_counts():
    s1, s2, d = E.grid_edges_n8(3, 4)
    assert s1.dtype == np.int32 and s1.flags.c_contiguous
    assert len(s1) == E.num_n8_edges(3, 4) == 2 * 4 + 3 * 3 + 2 * 2 * 3
    assert np.all(s1 < s2)
    assert len({(a, b) for a, b in zip(s1, s2)}) == len(s1)
    np.testing.assert_array_equal(np.unique(d), [1.0, np.sqrt(2)])


def test_weights_uniform_image_sigma_one():
    img = np.full((4, 5, 3), 17, np.uint8)
    assert contrast_sigma2(img) == 1.0
    w = E.contrast_weights(img, 100.0)
    n8 = E.num_n8_edges(4, 5)
    _, _, d = E.grid_edges_n8(4, 5)
    np.testing.assert_allclose(w, 100.0 * 20 / n8 / d)


def test_unary_costs_zero_on_seeds():
    rng = np.random.default_rng(0)
    _, _, probs, seeds = random_problem(rng, 4, 4, 3)
    u = unary_costs(probs, seeds, 0.5)
    assert np.all(u[:, seeds != 255] == 0)
    free = seeds == 255
    np.testing.assert_allclose(u[:, free], 0.5 * -np.log(np.maximum(probs[:, free], 1e-8)))


@pytest.mark.parametrize("src,dst", [((5, 7), (13, 9)), ((20, 30), (7, 11)), ((4, 4), (4, 9))])
def test_resize_matches_torch_bilinear(src, dst):
    rng = np.random.default_rng(1)
    p = rng.random((3, *src))
    want = torch.nn.functional.interpolate(torch.from_numpy(p)[None], size=dst, mode="bilinear",
                                           align_corners=False)[0].numpy()
    np.testing.assert_allclose(E.resize_bilinear(p, *dst), want, rtol=1e-10, atol=1e-12)


def test_potts_energy_resizes_probs():
    rng = np.random.default_rng(2)
    labels, image, _, seeds = random_problem(rng, 8, 6, 2)
    small = rng.dirichlet(np.ones(2), (4, 3)).transpose(2, 0, 1)
    full = np.exp(-E.neg_log_probs(small, 8, 6))  # resized in log space
    assert potts_energy(labels, image, small, seeds, 0.1, 3.0) == pytest.approx(
        potts_energy(labels, image, full, seeds, 0.1, 3.0), rel=1e-12)


def test_low_resolution_probabilities_are_resized_in_log_space():
    """SPEC §4: what stage A sees from a stride-4 snapshot should be the network's own
    upsampled output (log-softmax of bilinearly upsampled logits). Resizing −log q is
    much closer to it at class transitions than resizing q."""
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(0, 6, (1, 4, 6, 8)))  # confident, changing classes
    want = -torch.log_softmax(torch.nn.functional.interpolate(logits, size=(24, 32), mode="bilinear",
                                                              align_corners=False), 1)[0].numpy()
    q = torch.softmax(logits, 1)[0].numpy()
    in_log_space = E.neg_log_probs(q, 24, 32)
    as_probs = -np.log(np.maximum(E.resize_bilinear(q, 24, 32), 1e-8))
    assert np.allclose(E.neg_log_probs(q, 6, 8), -np.log(np.maximum(q, 1e-8)))
    err_log, err_prob = np.abs(in_log_space - want).max(), np.abs(as_probs - want).max()
    assert err_log < err_prob / 2, (err_log, err_prob)
    # and what the solver picks (argmin cost) agrees with the network's upsampled argmax more often
    agree = lambda cost: (cost.argmin(0) == want.argmin(0)).mean()
    assert agree(in_log_space) >= agree(as_probs)
