"""The trainer killed mid-round, then `train --resume DIR`: same round, epoch and optimizer
state, the proposal shards already written are reused, a truncated snapshot is rewritten."""
from shared.shard_store import ShardStore
import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from tests.helpers import core_processes, descendants, end_session, popen_cli, read_metrics

pytestmark = pytest.mark.faults


def test_optimizer_state_survives_a_checkpoint(tmp_path):
    """make_optimizer loads the momentum buffers that last.pt holds (weights_only load)."""
    from trainer.config import TrainConfig
    from trainer.loop import make_optimizer
    from trainer.model import DeepLabV3Plus
    from trainer.runlog import RunLog, load_checkpoint

    cfg = TrainConfig(lr=0.01, momentum=0.9, optimizer="sgd")
    net = DeepLabV3Plus(3)
    opt, base_lrs = make_optimizer(net, cfg, cfg.lr)
    net(torch.rand(1, 3, 32, 32) * 255).logsumexp(1).mean().backward()
    opt.step()
    for g in opt.param_groups:
        g["lr"] *= 0.5  # a decayed rate, as the poly schedule leaves it
    log = RunLog(str(tmp_path), enabled=True)
    log.save_checkpoint("last.pt", {"model": net.state_dict(), "optimizer": opt.state_dict(), "num_classes": 3})
    log.close()

    state = load_checkpoint(str(tmp_path / "checkpoints" / "last.pt"))
    net2 = DeepLabV3Plus(3)
    net2.load_state_dict(state["model"])
    opt2, base_lrs2 = make_optimizer(net2, cfg, cfg.lr, state["optimizer"])
    assert base_lrs2 == base_lrs  # the schedule restarts from the base rates, not the decayed ones
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    bufs = [(p, opt.state[p]["momentum_buffer"]) for p in net.parameters() if p in opt.state]
    bufs2 = [(p, opt2.state[p]["momentum_buffer"]) for p in net2.parameters() if p in opt2.state]
    assert len(bufs) == len(bufs2) > 0
    for (_, a), (_, b) in zip(bufs, bufs2):
        assert torch.equal(a, b)


def test_loop_state_reads_and_writes_the_checkpoint_keys(tmp_path):
    """LoopState is the checkpoint: a last.pt as the loop wrote it before LoopState (and an
    older one, without the outlier model, stage-B seconds, stage-A counters and precision) resumes,
    and it writes back the same keys; the run's identity is this run's."""
    from trainer.loop import LoopState
    from trainer.runlog import RunLog, load_checkpoint

    keys = {"model", "optimizer", "phase", "epoch", "global_epoch", "num_classes", "class_names", "arch", "precision",
            "method", "val_miou", "best_miou", "run_id", "outliers", "stage_b_s", "stage_a"}
    before = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {}, "param_groups": []}, "phase": 1, "epoch": 2,
              "global_epoch": 5, "num_classes": 3, "class_names": ["a", "b", "c"], "arch": "unet",
              "precision": "fp32", "method": "grid-tr", "val_miou": 0.4, "best_miou": 0.5, "run_id": "old", "outliers": {},
              "stage_b_s": 1.5, "stage_a": {"stall_s": 2.0, "staleness": [0.0, 1.0], "max_staleness": 1}}
    log = RunLog(str(tmp_path), enabled=True)
    log.save_checkpoint("last.pt", before)
    log.close()
    state = LoopState.from_checkpoint(load_checkpoint(str(tmp_path / "checkpoints" / "last.pt")), run_id="new")
    assert state.resumes(1) and not state.resumes(0) and not LoopState().resumes(0)
    saved = state.checkpoint()
    assert set(saved) == keys and saved["run_id"] == "new"
    assert {k: v for k, v in saved.items() if k not in ("model", "run_id")} == {
        k: v for k, v in before.items() if k not in ("model", "run_id")}
    older = {k: v for k, v in before.items()
             if k not in ("outliers", "stage_b_s", "stage_a", "val_miou", "run_id", "precision")}
    state = LoopState.from_checkpoint(older)
    assert (state.outliers, state.stage_b_s, state.stage_a, state.val_miou, state.precision) == (None, 0.0, None, None,
                                                                                                  "auto")
    assert state.global_epoch == 5 and state.best_miou == 0.5 and set(state.checkpoint()) == keys


def test_truncated_snapshot_part_is_reported(tmp_path):
    """What the trainer checks on resume: every row of the round's snapshot parts reads."""
    from shared import shards

    store = ShardStore(str(tmp_path / "shards"))
    for k in range(2):
        rows = [shards.Snapshot(
            image_id=f"img{k}", round=0, image_uri="i.png", seeds_uri="s.png", height=8, width=8, num_classes=3,
            label_set=np.arange(3, dtype=np.uint8), neg_log_q=np.ones((3, 2, 2), np.float16))]
        store.write_snapshots(0, k, rows)
    assert not store.round_complete("snapshots", 0, 2)  # not committed yet
    store.commit("snapshots", 0, {0: ["img0"], 1: ["img1"]})
    assert store.round_complete("snapshots", 0, 2) and not store.unreadable("snapshots", 0, read_rows=True)
    bad = store.part("snapshots", 0, 1).uri
    _truncate(bad)
    unreadable = store.unreadable("snapshots", 0, read_rows=True)
    assert list(unreadable) == [1] and bad in str(unreadable[1])
    assert not store.round_complete("snapshots", 0, 3)  # a part missing


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.mark.slow
def test_kill_trainer_mid_round_then_resume(tmp_path):
    from shared import shards
    from trainer.runlog import load_checkpoint
    from trainer.synthetic import make_synthetic

    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    make_synthetic(data, n_train=8, n_val=2, size=112, classes=4)
    base = os.path.join(out, "shards")
    args = ["train", "--data", data, "--method", "grid-tr", "--epochs", 4, "--pretrain-epochs", 1,
            "--epochs-per-round", 2, "--shard-size", 2, "--schedule", "sync", "--solvers", 1, "--batch-size", 4,
            "--out", out]
    proc = popen_cli(*args, log_path=str(tmp_path / "first.log"))
    try:
        # kill once two grid-tr epochs (round 0) are logged and round 1's snapshot is whole: mid-round 1
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            tr = [m for m in read_metrics(out) if m["phase"] == "grid-tr"]
            if len(tr) >= 2 and len(ShardStore(base).parts("snapshots", 1)) == 4:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + open(tmp_path / "first.log").read()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # the local Ray of that run dies with it: no GCS, raylet or worker left of its session.
        # (Ray's dashboard and runtime-env agents may outlive it a while: ended below.)
        deadline = time.monotonic() + 60
        while (orphans := core_processes(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        end_session(proc)
    assert not orphans, f"processes left after the trainer was killed: {orphans}"

    epochs_before = [m["epoch"] for m in read_metrics(out)]
    ckpt = load_checkpoint(os.path.join(out, "checkpoints", "last.pt"))
    assert ckpt["phase"] == 1 and ckpt["epoch"] >= 2 and ckpt["optimizer"]["state"], "momentum buffers checkpointed"
    resume_round = ckpt["epoch"] // 2
    proposals = {part.uri: os.stat(part.uri).st_mtime_ns for r in ShardStore(base).rounds("proposals")
                 for part in ShardStore(base).parts("proposals", r).values()}
    assert proposals, "no proposal written before the kill"
    snap = ShardStore(base).part("snapshots", resume_round, 3).uri
    _truncate(snap)

    # the resumed run loses its trainer worker (kill -9) after one more epoch: Ray Train
    # restarts it from last.pt inside the same run (--max-failures), which ends on its own
    proc = popen_cli("train", "--resume", out, log_path=str(tmp_path / "resumed.log"))
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline and len(read_metrics(out)) <= ckpt["global_epoch"]:
            time.sleep(0.1)
        workers = [p for p in descendants(proc.pid) if "RayTrainWorker" in p.cmdline]
        assert proc.poll() is None and len(workers) == 1, open(tmp_path / "resumed.log").read()[-3000:]
        os.kill(workers[0].pid, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, open(tmp_path / "resumed.log").read()[-4000:]
    finally:
        end_session(proc)
    log = open(tmp_path / "resumed.log").read()
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5], (epochs_before, [m["epoch"] for m in metrics])
    first_resumed = metrics[ckpt["global_epoch"]]
    assert first_resumed["phase"] == "grid-tr" and first_resumed["round"] == resume_round
    # the optimizer went on from the checkpoint: the poly schedule's rate continues, not restarts
    assert first_resumed["lr"] < metrics[ckpt["global_epoch"] - 1]["lr"]
    assert snap in log, "the truncated snapshot was not reported with its path"
    shards.read_snapshots(snap)  # rewritten whole
    changed = [uri for uri, t in proposals.items() if os.stat(uri).st_mtime_ns != t]
    assert not changed, f"proposal shards recomputed on resume: {changed}"
    for r in ShardStore(base).rounds("snapshots"):
        assert sorted(ShardStore(base).parts("proposals", r)) == [0, 1, 2, 3]
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert summary["proposals_missing"] == 0
    assert load_checkpoint(os.path.join(out, "checkpoints", "last.pt"))["global_epoch"] == 5
    # every epoch went to Ray Train with a checkpoint, which the restarts read back
    # (get_checkpoint); it keeps the latest and the best by val mIoU
    from trainer.loop import CHECKPOINT_FILE, CHECKPOINT_SCORE

    ray_state = json.loads(open(os.path.join(out, "ray_train", "checkpoint_manager_snapshot.json")).read())
    latest = ray_state["latest_checkpoint_result"]
    assert latest["metrics"]["epoch"] == 5 and latest["metrics"][CHECKPOINT_SCORE] == summary["val_miou"]
    kept = ray_state["checkpoint_results"]
    assert latest["checkpoint_dir_name"] in [c["checkpoint_dir_name"] for c in kept] and len(kept) <= 2
    assert all(c["metrics"][CHECKPOINT_SCORE] >= latest["metrics"][CHECKPOINT_SCORE] for c in kept)
    state = load_checkpoint(os.path.join(out, "ray_train", latest["checkpoint_dir_name"], CHECKPOINT_FILE))
    assert state["global_epoch"] == 5 and state["stage_a"]["stall_s"] == pytest.approx(summary["trainer_stall_s"])


@pytest.mark.slow
def test_best_pt_comes_after_the_checkpoints_and_a_restart_never_writes_a_worse_one(synthetic_set, tmp_path,
                                                                                    monkeypatch):
    """best.pt is written after last.pt and Ray Train's checkpoint of its epoch; a worker
    restarted from a checkpoint compares against the best that checkpoint records, and
    completes best.pt when the checkpoint is itself the best (the worker was lost between
    reporting it and writing best.pt). tests/besthook.py scripts val mIoU 0.5, 0.7, 0.6 and
    kills the trainer worker once, right after epoch 2's report: best.pt must end as epoch 2.
    best.pt written before the report shows at epoch 1's report; a restart comparing against
    another best than its checkpoint's would write epoch 3 (0.6); one that does not complete
    best.pt leaves epoch 1. (≈ 60-100 s on 2 busy cores: a real run with a worker restart.)"""
    import ray

    from trainer.config import TrainConfig
    from tests.besthook import FOLDER, KILLED
    from tests.helpers import ROOT
    from trainer.driver import run_train
    from trainer.runlog import load_checkpoint

    out = tmp_path / "out"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # Ray Train's controller polls its workers that often
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "tests.besthook.install",
                          "env_vars": {"PYTHONPATH": ROOT, FOLDER: str(tmp_path)}})
    try:
        summary = run_train(TrainConfig(data=synthetic_set(4, 2, 32), method="pce", epochs=3, batch_size=4,
                                        crop_size=0, out=str(out), use_gpu=False, loader_workers=0))
    finally:
        ray.shutdown()
    seen = [json.loads(line) for line in open(tmp_path / "seen")]
    assert os.path.exists(tmp_path / KILLED)
    # the restart went on from epoch 2's checkpoint (Ray Train had it): each epoch reported once
    assert [s["epoch"] for s in seen] == [1, 2, 3], seen
    assert seen[0] == {"epoch": 1, "best": None, "last": True}  # at epoch 1's report: last.pt, no best.pt yet
    assert [s["best"] for s in seen[1:]] == [[1, 0.5], [2, 0.7]]  # completed by the restarted worker
    best = load_checkpoint(str(out / "checkpoints" / "best.pt"))
    assert [best["global_epoch"], best["val_miou"]] == [2, 0.7]
    assert summary["val_miou"] == 0.6 and load_checkpoint(str(out / "checkpoints" / "last.pt"))["best_miou"] == 0.7
