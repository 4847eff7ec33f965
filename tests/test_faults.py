"""Faults: solver processes killed mid-round, corrupt or truncated shards, atomic writes.

(The trainer killed mid-round and `train --resume` are in test_resume.py; a solver node
removed mid-round at the solve_round level is in test_cluster.py.)
"""
from shared.shard_store import ShardStore
import json
import os
import signal
import time

import numpy as np
import pytest

from tests.helpers import core_processes, end_session, popen_cli, read_metrics, solver_processes

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def big_data(synthetic_set):
    """Images large enough (160 px) that a stage-A round takes several seconds."""
    return synthetic_set(8, 2, 160)


def _round_in_progress(base, n_parts=4):
    """(r, parts done) of a snapshot round whose proposals are being computed, else None."""

    for r in ShardStore(base).rounds("snapshots"):
        snaps = ShardStore(base).parts("snapshots", r)
        done = ShardStore(base).parts("proposals", r)
        if len(snaps) == n_parts and len(done) < n_parts:
            return r, len(done)
    return None


def _check_every_part_has_a_proposal(base, n_parts):
    from shared import shards

    rounds = ShardStore(base).rounds("snapshots")
    assert rounds
    for r in rounds:
        props = ShardStore(base).parts("proposals", r)
        assert sorted(props) == list(range(n_parts)), f"round {r}: proposals of parts {sorted(props)}"
        for k, part in props.items():
            snap_ids = [s.image_id for s in shards.read_snapshots(ShardStore(base).part("snapshots", r, k).uri)]
            got = part.read_proposals()
            assert [p.image_id for p in got] == snap_ids and all(p.round == r for p in got)


@pytest.mark.slow
def test_grid_tr_survives_two_solver_kills(big_data, tmp_path):
    """kill -9 of a `ray::…SolverActor…` process, twice, each mid-round: every round completes,
    the parts it held are solved again, 0 proposals missing, solver_restarts reported."""
    out = str(tmp_path / "run")
    base = os.path.join(out, "shards")
    proc = popen_cli(
        "train", "--data", big_data, "--method", "grid-tr", "--epochs", 3, "--pretrain-epochs", 1,
        "--epochs-per-round", 1, "--shard-size", 2, "--schedule", "sync", "--solvers", 1, "--batch-size", 4,
        "--crop-size", 64, "--out", out, log_path=str(tmp_path / "train.log"),
    )
    killed = []  # (pid, round, parts done when killed)
    try:
        deadline = time.monotonic() + 420
        while len(killed) < 2 and proc.poll() is None and time.monotonic() < deadline:
            state = _round_in_progress(base)
            victims = [p for p in solver_processes(proc.pid) if p.pid not in {k[0] for k in killed}]
            # one kill per round, while the round still has parts to solve
            if state and victims and state[0] not in {k[1] for k in killed}:
                for p in victims:
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append((p.pid, *state))
            time.sleep(0.1)
        assert len(killed) >= 2, f"only {len(killed)} solver kill(s) happened mid-round: {killed}"
        rc = proc.wait(timeout=600)
    finally:
        end_session(proc)
    log = open(tmp_path / "train.log").read()
    assert rc == 0, log[-5000:]
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    print(f"kills {killed}; summary: proposals_missing {summary['proposals_missing']}, solver_restarts "
          f"{summary['solver_restarts']}, stage_a_images {summary['stage_a_images']}")
    assert summary["proposals_missing"] == 0
    assert summary["solver_restarts"] >= 2
    _check_every_part_has_a_proposal(base, 4)
    # the images a killed actor held were solved again: a round of 8 images, all there
    assert summary["stage_a_images"] >= 8 * len(read_metrics(out)) - 8
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- corrupt shards


def _write_snapshot_parts(base, data_dir, n_parts, size=40, classes=3, r=0):
    """Small images, seeds and snapshot round r (random q) on disk."""
    from PIL import Image

    from shared import shards

    rng = np.random.default_rng(0)
    os.makedirs(data_dir, exist_ok=True)
    for k in range(n_parts):
        truth = np.minimum(np.arange(size) * classes // size, classes - 1)[None].repeat(size, 0).astype(np.uint8)
        image = np.clip(rng.integers(0, 256, (classes, 3))[truth] + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
        seeds = np.full((size, size), 255, np.uint8)
        for c in range(classes):
            seeds[size // 4: 3 * size // 4, np.flatnonzero(truth[0] == c)[0] + 2] = c
        image_path, seeds_path = os.path.join(data_dir, f"{k}.png"), os.path.join(data_dir, f"{k}_s.png")
        Image.fromarray(image).save(image_path)
        Image.fromarray(seeds).save(seeds_path)
        labels = shards.label_set(seeds, classes)
        q = rng.dirichlet(np.ones(len(labels)), size=(size // 4, size // 4)).transpose(2, 0, 1)
        row = shards.Snapshot(
            image_id=f"img{k}", round=r, image_uri=image_path, seeds_uri=seeds_path, height=size, width=size,
            num_classes=classes, label_set=labels, neg_log_q=(-np.log(q + 1e-6)).astype(np.float16))
        shards.write_table(shards.snapshots_table([row]), ShardStore(base).part("snapshots", r, k).uri)
    ShardStore(base).commit("snapshots", r, {k: [f"img{k}"] for k in range(n_parts)})


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _solve_parts_locally(base, n_parts, r=0):
    from shared.config import SolverConfig
    from solver_service.parts import solve_part

    for k in range(n_parts):
        solve_part(ShardStore(base).part("snapshots", r, k), ShardStore(base).part("proposals", r, k), SolverConfig(max_iter=1))
    ShardStore(base).commit("proposals", r, {k: [f"img{k}"] for k in range(n_parts)})


def test_truncated_proposal_is_reported_and_recomputed(tmp_path, capsys):
    """The farm's check names the file; solve_round (Ray) solves that part again, only that one."""
    import ray

    from shared import shards
    from shared.config import SolverConfig
    from solver_service.farm import Pool, solve_round

    base = str(tmp_path / "shards")
    _write_snapshot_parts(base, str(tmp_path / "data"), 3)
    _solve_parts_locally(base, 3)
    bad = ShardStore(base).part("proposals", 0, 1).uri
    good = {k: os.stat(ShardStore(base).part("proposals", 0, k).uri).st_mtime_ns for k in (0, 2)}
    _truncate(bad)
    with pytest.raises(shards.CorruptShardError, match="part-1"):
        shards.read_proposals(bad)
    assert ShardStore(base).unsolved(0) == {}  # without verify, a present file counts as done
    assert sorted(ShardStore(base).unsolved(0, verify=True)) == [1]
    assert bad in capsys.readouterr().out

    ray.init(address="local", num_cpus=1, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        rows = solve_round(ShardStore(base), 0, SolverConfig(max_iter=1), Pool())
    finally:
        ray.shutdown()
    assert [int(r["k"]) for r in rows] == [1]
    assert [p.image_id for p in shards.read_proposals(bad)] == ["img1"]
    assert {k: os.stat(ShardStore(base).part("proposals", 0, k).uri).st_mtime_ns for k in (0, 2)} == good


def test_proposal_feed_never_reads_a_truncated_shard(tmp_path, capsys):
    """The trainer's feed reports the path, drops the file (the farm recomputes it) and
    keeps the part at its previous proposal (here: none, seeds only)."""
    from trainer.proposals import ProposalFeed

    base = str(tmp_path / "shards")
    _write_snapshot_parts(base, str(tmp_path / "data"), 2)
    _solve_parts_locally(base, 2)
    bad = ShardStore(base).part("proposals", 0, 0).uri
    _truncate(bad)
    feed = ProposalFeed(ShardStore(base), [["img0"], ["img1"]], sync=False, max_staleness=1)
    got = feed.refresh(0, wait=False)
    assert bad in capsys.readouterr().out
    assert not os.path.exists(bad)
    assert "img0" not in feed.labels and feed.labels["img1"].shape == (40, 40)
    assert got["max_staleness"] == 1  # img0 has no proposal: round −1


def test_unreadable_snapshot_is_reported_not_solved(tmp_path, capsys):
    """The farm leaves a truncated snapshot part to the trainer (which rewrites it) and
    never solves from it."""
    base = str(tmp_path / "shards")
    _write_snapshot_parts(base, str(tmp_path / "data"), 2)
    store = ShardStore(base)
    bad = store.part("snapshots", 0, 1).uri
    _truncate(bad)
    assert sorted(store.unsolved(0, verify=True)) == [0, 1]
    unreadable = store.unreadable("snapshots", 0)
    assert sorted(unreadable) == [1] and bad in str(unreadable[1])


# --------------------------------------------------------------------------- atomic writes, no pickles


def test_writes_are_atomic(tmp_path, monkeypatch):
    """A write that fails before its rename leaves the old file whole and no visible part."""
    from shared import storage

    base = str(tmp_path / "shards")
    _write_snapshot_parts(base, str(tmp_path / "data"), 1)
    uri = ShardStore(base).part("snapshots", 0, 0).uri
    before = open(uri, "rb").read()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        storage.write_bytes(uri, b"garbage")
    with pytest.raises(OSError):
        storage.write_bytes(ShardStore(base).part("snapshots", 0, 1).uri, b"garbage")
    monkeypatch.undo()
    assert open(uri, "rb").read() == before
    assert not [n for n in os.listdir(os.path.dirname(uri)) if n.startswith(".tmp-")]  # cleaned up
    assert list(ShardStore(base).parts("snapshots", 0)) == [0]  # temp files are not parts


def test_shards_and_checkpoints_hold_no_pickle(tmp_path):
    """Shards: the contract's plain Arrow types, no pandas/pickle metadata. Checkpoints:
    loaded with weights_only=True (a pickled object is refused; see test_bad_input)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shared import shards

    base = str(tmp_path / "shards")
    _write_snapshot_parts(base, str(tmp_path / "data"), 1)
    _solve_parts_locally(base, 1)
    for kind in shards.KINDS:
        uri = ShardStore(base).part(kind, 0, 0).uri
        schema = pq.read_schema(uri)
        assert schema.remove_metadata().equals(shards.SCHEMAS[kind].remove_metadata())
        assert not any(isinstance(f.type, pa.ExtensionType) for f in schema)
        meta = b" ".join(k + b"=" + v for k, v in (schema.metadata or {}).items())
        assert b"pandas" not in meta and b"pickle" not in meta
        with open(uri, "rb") as f:
            raw = f.read()
        assert b"\x80\x04\x95" not in raw and b"\x80\x05\x95" not in raw  # pickle protocol 4/5 frames
    import inspect

    from trainer import runlog

    assert "weights_only=True" in inspect.getsource(runlog.load_checkpoint)


# --------------------------------------------------------------------------- a solver node removed


@pytest.mark.slow
def test_a_diverged_network_ends_the_run_at_once_with_its_own_line(synthetic_set, tmp_path):
    """A UserError inside a trainer worker (here the snapshot's non-finite check) fails the
    same way every time: one attempt, not 1 + --max-failures, and its own message. The
    diverged network is a checkpoint with NaN weights (what `--pretrain-lr 1e30` makes of
    the PCE model, without training it here)."""
    import torch

    from tests.helpers import run_cli
    from trainer.architectures import build_model

    net = build_model("unet", 4)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float("nan"))
    torch.save({"model": net.state_dict(), "num_classes": 4, "arch": "unet"}, tmp_path / "diverged.pt")
    proc = run_cli("train", "--data", synthetic_set(4, 2, 48), "--method", "grid-tr", "--epochs", 1,
                   "--init", tmp_path / "diverged.pt", "--crop-size", 32, "--batch-size", 4,
                   "--out", tmp_path / "out", check=False, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: non-finite network output on training image train_0000")
    output = proc.stdout + proc.stderr
    assert output.count("Moving model to device") == 1  # one trainer attempt: no retry
    # once: Ray Train's own logs of it (the worker's traceback, the controller's) are dropped
    assert output.count("non-finite network output") == 1, output[-3000:]


@pytest.mark.slow
def test_ctrl_c_ends_a_run_within_seconds_in_one_line_and_leaves_no_ray_behind(big_data, tmp_path):
    """SIGINT (Ctrl-C) to `python -m trainer --local train` mid-round (the trainer waits in
    `sync` for a stage-A round of several seconds that the farm is solving): the run ends
    within seconds, not after the farm has solved what is left (up to --max-stall, 300 s
    here), with one line after the signal (Ray Train's "Received SIGINT" line, no
    traceback), a non-zero status, its checkpoints kept and no process of its private Ray
    left. (≈ 60-100 s on 2 busy cores: most of it Ray's start and the first epoch.)"""
    out = str(tmp_path / "out")
    base, log_path = os.path.join(out, "shards"), str(tmp_path / "train.log")
    proc = popen_cli("--local", "train", "--data", big_data, "--method", "grid-tr", "--epochs", 20,
                     "--pretrain-epochs", 1, "--schedule", "sync", "--shard-size", 1, "--solvers", 1,
                     "--batch-size", 4, "--crop-size", 64, "--max-stall", 300, "--out", out, log_path=log_path)
    try:
        deadline = time.monotonic() + 300
        while _round_in_progress(base, 8) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        state = _round_in_progress(base, 8)
        assert proc.poll() is None and state, open(log_path).read()[-3000:]
        before = len(open(log_path).read().splitlines())
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
        took = time.monotonic() - sent
        deadline = time.monotonic() + 15  # GCS, raylet and workers (the agents follow later; ended below)
        while (left := core_processes(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        end_session(proc)
    lines = open(log_path).read().splitlines()
    # an epoch or a round may end meanwhile; Ray's C++ log lines (`[date … E pid tid] file.cc:…`)
    # and its workers' (`(Name pid=…)`) are its processes', not the CLI's
    after = [line for line in lines[before:] if not line.startswith(("epoch ", "stage A round ", "[20", "\x1b[36m("))]
    print(f"SIGINT at round {state[0]} with {state[1]} of 8 parts solved; ended {took:.1f}s after it, rc {rc}: {after}")
    assert took < 30, f"{took:.0f}s after SIGINT: {after}"
    assert rc != 0 and len(after) == 1 and "Received SIGINT" in after[0], lines[before - 3:]
    assert not left, f"processes of the run's Ray left: {left}"
    assert os.path.exists(os.path.join(out, "checkpoints", "last.pt"))
    assert ShardStore(base).failure() is None  # a resumed run would read a failure marker


def test_user_cause_finds_a_workers_user_error_inside_ray_trains_errors():
    from ray.train import ControllerError, WorkerGroupError

    from shared.errors import UserError
    from shared.errors import user_cause as _user_cause

    error = UserError("x.png: unreadable")
    assert _user_cause(WorkerGroupError("rank 1: …", {0: RuntimeError("gloo"), 1: error})) is error
    assert _user_cause(ControllerError(error)) is error
    assert _user_cause(WorkerGroupError("rank 0: …", {0: RuntimeError("lost")})) is None


def test_reliability_doc_names_a_test_that_exists_for_every_fault():
    """docs/reliability.md: one row per fault, each naming tests that exist."""
    import re

    from tests.helpers import ROOT

    text = open(os.path.join(ROOT, "docs", "reliability.md")).read()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| fault")
            and not line.startswith("| ---")]
    faults = ["worker killed", "solver process killed", "node lost", "storage outage", "disk full", "bad image",
              "diverged network", "Ctrl-C", "head node lost"]
    for fault in faults:
        assert any(all(word in row.split("|")[1] for word in fault.split()) for row in rows), fault
    for row in rows:
        cell = row.rstrip(" |").split("|")[-1]
        named, current = [], None
        for file, test in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)`", cell):
            current = file or current
            named.append((current, test))
        if "none automated" in cell:
            continue
        assert named, row
        for file, test in named:
            assert re.search(rf"^def {test}\(", open(os.path.join(ROOT, "tests", file)).read(), re.M), (file, test)
