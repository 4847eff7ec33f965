"""Faults: solver processes killed mid-round, corrupt or truncated shards, atomic writes.

(The trainer killed mid-round and `train --resume` are in test_resume.py; a solver node
removed mid-round at the solve_round level is in test_cluster.py.)
"""
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from tests.helpers import kill_processes, popen_cli, read_metrics, session_processes, solver_processes

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    """Images large enough (160 px) that a stage-A round takes several seconds."""
    from trainer.synthetic import make_synthetic

    root = str(tmp_path_factory.mktemp("faults") / "data")
    make_synthetic(root, n_train=8, n_val=2, size=160, classes=4)
    return root


def _round_in_progress(base):
    """(r, parts done) of a snapshot round whose proposals are being computed, else None."""
    from shared import shards

    for r in shards.list_rounds(base, "snapshots"):
        snaps = shards.list_parts(shards.round_uri(base, "snapshots", r))
        done = shards.list_parts(shards.round_uri(base, "proposals", r))
        if len(snaps) == 4 and len(done) < 4:
            return r, len(done)
    return None


def _check_every_part_has_a_proposal(base, n_parts):
    from shared import shards

    rounds = shards.list_rounds(base, "snapshots")
    assert rounds
    for r in rounds:
        props = shards.list_parts(shards.round_uri(base, "proposals", r))
        assert sorted(props) == list(range(n_parts)), f"round {r}: proposals of parts {sorted(props)}"
        for k, uri in props.items():
            snap_ids = [s.image_id for s in shards.read_snapshots(shards.part_uri(base, "snapshots", r, k))]
            got = shards.read_proposals(uri)
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
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_processes(session_processes(proc.pid))
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
