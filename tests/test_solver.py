"""solve(): optimality on tiny problems, hard seeds, label sets, warm starts, bad input."""
import itertools

import numpy as np
import pytest

from solver_service import energy as E
from tests.energy_oracle import potts_energy, seeds_satisfied
from solver_service.alpha_expansion import SOLVERS, build_problem, solve
from tests.test_energy import loop_energy


def problem(rng, H, W, K, seed_frac=0.15, beta=None):
    image = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    probs = rng.dirichlet(np.ones(K) * 0.7, (H, W)).transpose(2, 0, 1).astype(np.float32)
    seeds = np.full((H, W), 255, np.uint8)
    m = rng.random((H, W)) < seed_frac
    seeds[m] = rng.integers(0, K, m.sum())
    return image, probs, seeds


def brute_force(image, probs, seeds, lam, beta, labels):
    H, W = seeds.shape
    best = None
    free = np.flatnonzero(seeds.ravel() == 255)
    base = seeds.ravel().copy()
    for combo in itertools.product(labels, repeat=free.size):
        lab = base.copy()
        lab[free] = combo
        lab = lab.reshape(H, W)
        e = potts_energy(lab, image, probs, seeds, lam, beta)[0]
        if best is None or e < best[0]:
            best = (e, lab)
    return best


def all_energies(image, probs, seeds, lam, beta, K):
    """(energies, labellings) of every labelling of a tiny problem that meets the seeds,
    vectorised over the K^free labellings (float64, SPEC §1)."""
    H, W = seeds.shape
    flat = seeds.ravel()
    free = np.flatnonzero(flat == 255)
    labs = np.tile(flat.astype(np.intp), (K ** free.size, 1))
    labs[:, free] = np.array(list(itertools.product(range(K), repeat=free.size)), np.intp).reshape(-1, free.size)
    cost = lam * E.neg_log_probs(probs, H, W).reshape(K, H * W)
    unary = cost[labs[:, free], free].sum(axis=1)
    s1, s2, _ = E.grid_edges_n8(H, W)
    smooth = ((labs[:, s1] != labs[:, s2]) * E.contrast_weights(image, beta)).sum(axis=1)
    return unary + smooth, labs


def brute_force_k(image, probs, seeds, lam, beta, K):
    energies, labs = all_energies(image, probs, seeds, lam, beta, K)
    best = int(np.argmin(energies))
    return float(energies[best]), labs[best].reshape(seeds.shape).astype(np.uint8)


def best_move(energies, labs, allowed):
    """The lowest energy among the labellings one move away: `allowed(labs)` says, per
    labelling, whether it is in the move space of the current one."""
    return float(energies[allowed(labs)].min())


@pytest.mark.parametrize("K", [3, 4])
@pytest.mark.parametrize("trial", range(4))
def test_k_labels_against_brute_force(K, trial):
    """Expansion: within its bound 2c·E* (c = 1 for Potts) and a local minimum of every
    α-expansion move; swap: a local minimum of every α-β swap move; both ≥ E*."""
    rng = np.random.default_rng(1000 + 10 * K + trial)
    H, W = (3, 3) if K == 3 else (2, 4)
    image, probs, seeds = problem(rng, H, W, K, seed_frac=0.0 if trial % 2 else 0.2)
    lam, beta = [(1.0, 20.0), (0.3, 60.0), (2.0, 10.0), (0.5, 100.0)][trial]
    energies, labs = all_energies(image, probs, seeds, lam, beta, K)
    e_star = float(energies.min())
    tol = 1e-6 * abs(e_star) + 1e-9
    for algorithm in sorted(SOLVERS):
        res = solve(image, probs, seeds, tr_weight=lam, potts_weight=beta, max_iter=20,
                    restrict_labels=False, algorithm=algorithm)
        assert seeds_satisfied(res.gco_labels, seeds)
        assert res.energy >= e_star - tol
        cur = res.labels.ravel().astype(np.intp)
        if algorithm == "expansion":
            assert res.energy <= 2 * e_star + tol
            for alpha in range(K):  # every labelling one α-expansion away from the result
                e_move = best_move(energies, labs, lambda L: np.all((L == cur) | (L == alpha), axis=1))
                assert res.energy <= e_move + tol, (alpha, res.energy, e_move)
        else:
            for a, b in itertools.combinations(range(K), 2):  # one α-β swap away
                ab = (cur == a) | (cur == b)
                e_move = best_move(energies, labs, lambda L: np.all(
                    np.where(ab, (L == a) | (L == b), L == cur), axis=1))
                assert res.energy <= e_move + tol, ((a, b), res.energy, e_move)


@pytest.mark.parametrize("trial", range(12))
def test_two_labels_exact(trial):
    rng = np.random.default_rng(trial)
    H, W = (3, 3) if trial % 2 else (3, 4)
    image, probs, seeds = problem(rng, H, W, 2, seed_frac=0.1 if trial % 3 else 0.0)
    lam, beta = [(1.0, 10.0), (1.0, 40.0), (0.1, 100.0), (2.0, 5.0)][trial % 4]
    res = solve(image, probs, seeds, tr_weight=lam, potts_weight=beta, max_iter=10, restrict_labels=False)
    e_best, _ = brute_force(image, probs, seeds, lam, beta, (0, 1))
    assert res.energy <= e_best * (1 + 1e-6) + 1e-9
    assert np.all(res.labels[seeds != 255] == seeds[seeds != 255])


@pytest.mark.parametrize("algorithm", sorted(SOLVERS))
def test_gco_itself_honours_the_seeds(algorithm):
    """GCO's own labelling, before `solve` re-imposes the seeds, satisfies them, and its
    integer energy is the SPEC energy of that labelling: no hard-cost penalty was paid."""
    rng = np.random.default_rng(5)
    image, probs, seeds = problem(rng, 30, 40, 4, seed_frac=0.3)
    # make the network confidently disagree with the seeds
    probs[:] = 1e-6
    probs[0] = 1.0
    res = solve(image, probs, seeds, tr_weight=10.0, potts_weight=500.0, algorithm=algorithm, restrict_labels=False)
    assert seeds_satisfied(res.gco_labels, seeds)
    np.testing.assert_array_equal(res.gco_labels, res.labels)
    spec = potts_energy(res.gco_labels, image, probs, seeds, 10.0, 500.0)[0]
    assert res.gco_energy == pytest.approx(spec, rel=1e-4)
    assert res.energy == pytest.approx(spec, rel=1e-10)


def test_reported_energy_is_spec_energy():
    for trial in range(4):
        rng = np.random.default_rng(100 + trial)
        image, probs, seeds = problem(rng, 7, 9, 3)
        small = probs[:, ::2, ::2].copy()  # exercises the bilinear resize
        res = solve(image, small, seeds, tr_weight=0.2, potts_weight=30.0, restrict_labels=False)
        want = loop_energy(res.labels, image, np.exp(-E.neg_log_probs(small, 7, 9)), seeds, 0.2, 30.0)
        np.testing.assert_allclose((res.energy, res.unary_energy, res.smooth_energy), want, rtol=1e-10)
        assert res.labels.dtype == np.uint8 and res.labels.shape == (7, 9)


def test_integer_scaling_error_below_1e4():
    rng = np.random.default_rng(7)
    for beta, lam in [(100.0, 0.1), (1.0, 5.0), (100.0, 1e-3)]:
        image, probs, seeds = problem(rng, 40, 50, 3)
        res = solve(image, probs, seeds, tr_weight=lam, potts_weight=beta)
        assert abs(res.gco_energy - res.energy) / res.energy < 1e-4
        p = build_problem(image, probs, seeds, tr_weight=lam, potts_weight=beta)
        assert p["unary_int"].max() < 1e7 and p["weights_int"].max() <= 2**19


def test_label_restriction():
    rng = np.random.default_rng(3)
    image, probs, _ = problem(rng, 20, 20, 5)
    seeds = np.full((20, 20), 255, np.uint8)
    seeds[2, 2:8] = 1
    seeds[15, 3:9] = 3
    probs[:] = 0.01
    probs[4] = 0.96  # the network prefers a label that is not among the seeds
    res = solve(image, probs, seeds, tr_weight=1.0, potts_weight=1.0)
    assert set(np.unique(res.labels)) <= {1, 3}
    res = solve(image, probs, seeds, tr_weight=1.0, potts_weight=1.0, restrict_labels=False)
    assert 4 in set(np.unique(res.labels))
    # one seed label only: all K labels
    seeds[15, 3:9] = 255
    res = solve(image, probs, seeds, tr_weight=1.0, potts_weight=1.0)
    assert 4 in set(np.unique(res.labels))


def test_warm_start_reaches_gco():
    """From a labelling no expansion move improves (a converged solve warm-started from a
    random labelling, which the cold solve does not reach), one cycle leaves GCO's own
    labelling unchanged and its energy at the initial one: GCO started from `init`."""
    for trial in range(4):
        rng = np.random.default_rng(200 + trial)
        image, probs, seeds = problem(rng, 25, 30, 3)
        kw = dict(tr_weight=0.1, potts_weight=100.0, restrict_labels=False)
        start = rng.integers(0, 3, (25, 30)).astype(np.uint8)
        local = solve(image, probs, seeds, init=start, max_iter=20, **kw).labels
        cold = solve(image, probs, seeds, max_iter=1, **kw)
        assert not np.array_equal(cold.gco_labels, local)  # the test tells a cold start apart
        warm = solve(image, probs, seeds, init=local, max_iter=1, **kw)
        np.testing.assert_array_equal(warm.gco_labels, local)
        e_init = potts_energy(local, image, probs, seeds, 0.1, 100.0)[0]
        assert warm.gco_energy <= e_init * (1 + 1e-4)
        assert not warm.kept_init and warm.warm_start and warm.iterations == 1


def test_warm_start_from_the_brute_force_optimum_stays_there():
    for trial in range(4):
        rng = np.random.default_rng(300 + trial)
        image, probs, seeds = problem(rng, 3, 3, 3, seed_frac=0.0)
        e_best, best = brute_force_k(image, probs, seeds, 0.5, 30.0, 3)
        for algorithm in sorted(SOLVERS):
            warm = solve(image, probs, seeds, init=best, max_iter=1, tr_weight=0.5, potts_weight=30.0,
                         restrict_labels=False, algorithm=algorithm)
            np.testing.assert_array_equal(warm.gco_labels, best)
            assert warm.gco_energy <= e_best * (1 + 1e-4) and not warm.kept_init


def test_warm_start_never_above_init_and_keeps_the_seeds():
    for trial in range(3):
        rng = np.random.default_rng(200 + trial)
        image, probs, seeds = problem(rng, 25, 30, 3)
        for init in (rng.integers(0, 3, (25, 30)).astype(np.uint8), np.full((25, 30), 255, np.uint8)):
            warm = solve(image, probs, seeds, init=init, max_iter=1, restrict_labels=False)
            fixed = init.copy()
            fixed[seeds != 255] = seeds[seeds != 255]
            if fixed.max() < 3:
                e_init = potts_energy(fixed, image, probs, seeds, 0.1, 100.0)[0]
                assert warm.gco_energy <= e_init * (1 + 1e-4)
            assert seeds_satisfied(warm.gco_labels, seeds) and warm.warm_start


def test_swap_and_expansion_agree_on_easy_problem():
    rng = np.random.default_rng(11)
    truth = np.zeros((30, 40), np.intp)
    truth[:, 15:] = 1
    truth[20:, 30:] = 2
    probs = np.full((3, 30, 40), 0.1)
    probs[truth, *np.indices(truth.shape)] = 0.8
    image = (np.array([[30, 30, 30], [200, 40, 40], [40, 40, 220]])[truth] + rng.normal(0, 3, (30, 40, 3))).clip(0, 255)
    seeds = np.full((30, 40), 255, np.uint8)
    a = solve(image, probs, seeds, tr_weight=1.0, potts_weight=5.0, algorithm="expansion")
    b = solve(image, probs, seeds, tr_weight=1.0, potts_weight=5.0, algorithm="swap")
    np.testing.assert_array_equal(a.labels, truth)
    np.testing.assert_array_equal(b.labels, truth)
    assert a.energy == pytest.approx(b.energy)


def test_max_iter_caps_cycles():
    rng = np.random.default_rng(4)
    image, probs, seeds = problem(rng, 30, 30, 4)
    for m in (1, 2, 5):
        assert 1 <= solve(image, probs, seeds, max_iter=m, restrict_labels=False).iterations <= m


def _good():
    rng = np.random.default_rng(0)
    return problem(rng, 6, 7, 3)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda i, p, s: (i, np.where(p > 0.5, np.nan, p), s), "NaN or inf"),
        (lambda i, p, s: (i, np.where(p > 0.5, np.inf, p), s), "NaN or inf"),
        (lambda i, p, s: (i, p - 0.5, s), "negative"),
        (lambda i, p, s: (i[:5], p, s), "seeds shape"),
        (lambda i, p, s: (i, p, s[:, :3]), "seeds shape"),
        (lambda i, p, s: (i[..., :2], p, s), "H×W×3"),
        (lambda i, p, s: (i, p[0], s), "K×H×W"),
        (lambda i, p, s: (i, p[:1], s), "K ≥ 2"),
        (lambda i, p, s: (i, p, np.where(s == 255, 255, 7).astype(np.uint8)), "seed label 7"),
        (lambda i, p, s: (np.where(i > 100, np.nan, i.astype(float)), p, s), "image holds NaN"),
    ],
)
def test_bad_input_raises(mutate, match):
    image, probs, seeds = mutate(*_good())
    with pytest.raises(ValueError, match=match):
        solve(image, probs, seeds)


def test_bad_options_and_init():
    image, probs, seeds = _good()
    with pytest.raises(ValueError, match="init shape"):
        solve(image, probs, seeds, init=np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="unknown algorithm"):
        solve(image, probs, seeds, algorithm="icm")
    with pytest.raises(ValueError, match="max_iter"):
        solve(image, probs, seeds, max_iter=0)


def test_degenerate_sizes():
    rng = np.random.default_rng(9)
    for H, W in [(1, 1), (1, 6), (5, 1)]:
        image, probs, seeds = problem(rng, H, W, 2, seed_frac=0.0)
        res = solve(image, probs, seeds)
        assert res.labels.shape == (H, W)
        assert res.energy == pytest.approx(potts_energy(res.labels, image, probs, seeds, 0.1, 100.0)[0])


def test_changed_counts_unseeded_pixels_where_stage_a_overrides_the_network():
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, 10:] = 200
    probs = np.full((2, 20, 20), 0.5, np.float32)
    probs[0, :, :5] = probs[1, :, 5:] = 0.6  # the network puts the boundary at column 5
    probs[1, :, :5] = probs[0, :, 5:] = 0.4
    seeds = np.full((20, 20), 255, np.uint8)
    seeds[10, 2] = 0
    seeds[10, 17] = 1
    weak = solve(image, probs, seeds, tr_weight=1.0, potts_weight=0.0)
    assert weak.changed == 0.0  # no Potts term: the network's argmax wins everywhere
    strong = solve(image, probs, seeds, tr_weight=0.1, potts_weight=100.0)
    # the image edge is at column 10: stage A moves columns 5..9 to class 0 (100 of 398 free pixels)
    assert (strong.labels[:, :10] == 0).all() and (strong.labels[:, 10:] == 1).all()
    assert strong.changed == pytest.approx(100 / 398)
