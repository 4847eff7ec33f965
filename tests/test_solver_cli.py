"""`python -m solver_service solve` end to end on a tiny data folder, and bad input."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from shared.shard_store import ShardStore
from shared import shards
from shared.config import SolverConfig
from shared.image_io import read_label
from solver_service.parts import solve_part
from tests import helpers

H, W, K = 24, 32, 3


def run_cli(*args):
    return helpers.run_cli("solve", *args, module="solver_service", timeout=300)


def make_data(tmp_path, n=3):
    """Images + seeds (palette and grey PNGs) and a snapshot round of two parts."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        truth = np.zeros((H, W), np.uint8)
        truth[:, W // 2:] = 1
        truth[H // 2:, : W // 3] = 2
        img = np.array([[40, 40, 40], [220, 60, 60], [60, 60, 220]])[truth] + rng.normal(0, 8, (H, W, 3))
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "seeds").mkdir(exist_ok=True)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(tmp_path / "images" / f"im{i}.png")
        seeds = np.full((H, W), 255, np.uint8)
        seeds[3, 2:12] = 0
        seeds[4, 20:30] = 1
        seeds[20, 2:8] = 2
        s = Image.fromarray(seeds, "L")
        if i % 2:
            s = s.convert("P")  # palette PNG: the index is the class id
            s.putpalette([v for c in range(256) for v in (c, 0, 255 - c)])
        s.save(tmp_path / "seeds" / f"im{i}.png")
        # network output at half resolution, noisy
        small = truth[::2, ::2]
        q = np.full((K, *small.shape), 0.2)
        q[small, *np.indices(small.shape)] = 0.6
        q = q + rng.random(q.shape) * 0.2
        q /= q.sum(0)
        L = shards.label_set(seeds, K)
        rows.append(shards.Snapshot(
            image_id=f"im{i}", round=3, image_uri=str(tmp_path / "images" / f"im{i}.png"),
            seeds_uri=str(tmp_path / "seeds" / f"im{i}.png"), height=H, width=W, num_classes=K,
            label_set=L, neg_log_q=(-np.log(q[L])).astype(np.float16)))
    base = str(tmp_path / "shards")
    shards.write_table(shards.snapshots_table(rows[:2]), ShardStore(base).part("snapshots", 3, 0).uri)
    shards.write_table(shards.snapshots_table(rows[2:]), ShardStore(base).part("snapshots", 3, 1, "arrow").uri)
    return base


def test_palette_and_grey_seeds(tmp_path):
    make_data(tmp_path, n=2)
    a = read_label(str(tmp_path / "seeds" / "im0.png"))
    b = read_label(str(tmp_path / "seeds" / "im1.png"))
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) == {0, 1, 2, 255}


def test_cli_end_to_end(tmp_path):
    base = make_data(tmp_path)
    snaps = ShardStore(base).round_dir("snapshots", 3)
    out = ShardStore(base).round_dir("proposals", 3)
    r = run_cli("--snapshots", snaps, "--out", out, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "3 images" in r.stdout and "images/s" in r.stdout
    assert sorted(os.listdir(out)) == ["part-0.parquet", "part-1.arrow"]
    props = shards.read_proposals(os.path.join(out, "part-0.parquet")) + shards.read_proposals(os.path.join(out, "part-1.arrow"))
    assert [p.image_id for p in props] == ["im0", "im1", "im2"]
    seeds = read_label(str(tmp_path / "seeds" / "im0.png"))
    for p in props:
        assert p.round == 3 and not p.warm_start and p.labels.shape == (H, W)
        assert np.all(p.labels[seeds != 255] == seeds[seeds != 255])
        assert p.energy == pytest.approx(p.unary_energy + p.smooth_energy)
        assert set(np.unique(p.labels)) <= {0, 1, 2}
    # a second run skips the parts already done
    r = run_cli("--snapshots", snaps, "--out", out, "--workers", "1")
    assert r.returncode == 0 and "2 already done" in r.stdout
    # warm start from the round's converged proposals into another folder: GCO starts
    # there, so its first cycle finds no improving move (a cold start needs two or more)
    out2 = str(tmp_path / "warm")
    r = run_cli("--snapshots", snaps, "--out", out2, "--init", out, "--workers", "1", "--max-iter", "2")
    assert r.returncode == 0, r.stderr
    warm = shards.read_proposals(os.path.join(out2, "part-0.parquet"))
    assert all(p.warm_start for p in warm)
    for a, b in zip(props[:2], warm):
        assert a.iterations >= 2 and b.iterations == 1
        np.testing.assert_array_equal(b.labels, a.labels)
        assert b.energy == pytest.approx(a.energy, rel=1e-12)


def test_solve_part_function(tmp_path):
    base = make_data(tmp_path, n=2)
    proposal = ShardStore(base).part("proposals", 3, 0)
    st = solve_part(ShardStore(base).part("snapshots", 3, 0), proposal, SolverConfig(algorithm="swap"), solver_id="t:1")
    assert st["images"] == 2 and st["part_uri"] == proposal.uri and st["energy_sum"] > 0
    assert [p.solver for p in proposal.read_proposals()] == ["t:1", "t:1"]


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "workers0", "max_iter0", "bad_image"])
def test_cli_bad_input(tmp_path, case):
    base = make_data(tmp_path, n=2)
    snaps = ShardStore(base).round_dir("snapshots", 3)
    args = ["--snapshots", snaps, "--out", str(tmp_path / "out"), "--workers", "1"]
    want = snaps
    if case == "missing":
        args[1] = want = str(tmp_path / "nope" / "round=3")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[1] = want = str(tmp_path / "empty")
    elif case == "corrupt":
        want = os.path.join(snaps, "part-0.parquet")
        data = open(want, "rb").read()
        open(want, "wb").write(data[:100])
    elif case == "workers0":
        args[-1], want = "0", "--workers"
    elif case == "max_iter0":
        args += ["--max-iter", "0"]
        want = "--max-iter"
    elif case == "bad_image":
        want = str(tmp_path / "images" / "im0.png")
        open(want, "wb").write(b"garbage")
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    # Ray's own core-worker lines ("[2026-… E …] core_worker.cc: …") are not ours
    lines = [x for x in r.stderr.strip().splitlines() if not re.match(r"^\[?\d{4}-\d\d-\d\d", x)]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert want in lines[0] and "Traceback" not in r.stderr
