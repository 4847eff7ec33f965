"""Run integrity and failure semantics (SPEC §6, §7): shards of one run, nothing waits
forever, bounded retries. Real files, real GCO, real Ray (one private Ray for the
module); the storage faults are in test_s3.py."""
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared import shards
from shared.config import SolverConfig
from trainer.config import TrainConfig
from shared.errors import ForeignShardError, UserError
from shared.shard_store import ShardStore
from tests.test_faults import _solve_parts_locally, _truncate, _write_snapshot_parts
from trainer.proposals import ProposalFeed


def _props(base, run_id, k, ids, r=0):
    rows = [shards.Proposal(image_id=i, round=r, labels=np.zeros((4, 4), np.uint8), energy=0.0, unary_energy=0.0,
                            smooth_energy=0.0, iterations=1, seconds=0.0, warm_start=False, solver="t") for i in ids]
    store = ShardStore(base, run_id)
    store.write_proposals(r, k, rows)
    committed = store.manifest("proposals", r)
    store.commit("proposals", r, {**(committed.image_ids() if committed else {}), k: ids})
    return ShardStore(base).part("proposals", r, k).uri


# --------------------------------------------------------------------------- one run per shard base


def test_parts_carry_their_run_and_solving_keeps_it(tmp_path):
    """The trainer's snapshot carries its run id; the proposal that answers it too."""
    base = str(tmp_path / "shards")
    _write_snapshot_parts(base, str(tmp_path / "data"), 1)
    table = shards.read_table(ShardStore(base).part("snapshots", 0, 0).uri, "snapshots")
    rows = shards.snapshot_rows(table, "x")
    ShardStore(base, "run-a").write_snapshots(0, 0, rows)
    _solve_parts_locally(base, 1)
    uri = ShardStore(base).part("proposals", 0, 0).uri
    assert shards.run_of(shards.read_table(uri, "proposals").schema) == "run-a"
    shards.read_proposals(uri, "run-a")
    with pytest.raises(ForeignShardError, match="run-a"):
        shards.read_proposals(uri, "run-b")


def test_a_base_belongs_to_one_run(tmp_path):
    base = str(tmp_path / "shards")
    ShardStore(base, "a").claim()
    _props(base, "a", 0, ["x"])
    ShardStore(base, "a").claim()  # the same run (a resume): fine
    with pytest.raises(UserError, match=r"--shards .*another run \(a\).*--overwrite"):
        ShardStore(base, "b").claim()
    assert ShardStore(base).parts("proposals", 0)  # nothing deleted by the refusal
    ShardStore(base, "b").claim(overwrite=True)
    assert ShardStore(base).rounds("proposals") == [] and ShardStore(base).owner() == "b"


def test_unrecorded_shards_are_adopted_only_by_a_resume(tmp_path):
    base = str(tmp_path / "shards")
    _props(base, "", 0, ["x"])  # written before run ids
    with pytest.raises(UserError, match="unrecorded"):
        ShardStore(base, "b").claim()
    ShardStore(base, "b").claim(adopt=True)
    assert ShardStore(base).owner() == "b" and ShardStore(base).parts("proposals", 0)


def test_feed_ignores_another_runs_part_and_keeps_it(tmp_path, capsys):
    base = str(tmp_path)
    uri = _props(base, "other", 0, ["a", "b"])
    feed = ProposalFeed(ShardStore(base, "mine"), [["a", "b"]], sync=False, max_staleness=1)
    got = feed.refresh(0, wait=False)  # the other run's manifest: not this run's round
    assert feed.labels == {} and got["max_staleness"] == 1
    ShardStore(base, "mine").commit("proposals", 0, {0: ["a", "b"]})  # this run's manifest, the other's part
    got = feed.refresh(0, wait=False)
    assert feed.labels == {} and got["max_staleness"] == 1
    assert os.path.exists(uri) and "run other" in capsys.readouterr().out


def test_feed_refuses_a_proposal_for_other_images(tmp_path):
    base = str(tmp_path)
    _props(base, "mine", 0, ["a", "z"])
    feed = ProposalFeed(ShardStore(base, "mine"), [["a", "b"]], sync=True, max_staleness=0)
    with pytest.raises(UserError, match=r"part-0.*answers images \['a', 'z'\].*holds \['a', 'b'\]"):
        feed.refresh(0, wait=True)


# --------------------------------------------------------------------------- nothing waits forever


def test_max_stall_ends_the_wait_naming_round_and_parts(tmp_path, monkeypatch):
    """On a clock of its own (no timing on a loaded machine): the feed polls with a
    doubling interval, asks the trainer about the missing part at every poll, and gives
    up at the first poll more than --max-stall after the last progress."""
    import trainer.proposals as proposals_module

    clock, sleeps = [0.0], []

    def sleep(s):
        assert clock[0] < 100, "the wait never ended"
        sleeps.append(s)
        clock[0] += s

    monkeypatch.setattr(proposals_module, "time", SimpleNamespace(perf_counter=lambda: clock[0], monotonic=lambda: clock[0], sleep=sleep))
    base = str(tmp_path)
    _props(base, "mine", 0, ["a"])
    feed = ProposalFeed(ShardStore(base, "mine"), [["a"], ["b", "c"]], sync=True, max_staleness=0,
                        max_stall_s=0.5, poll_s=0.05)
    calls = []
    with pytest.raises(UserError, match=r"0\.5s \(--max-stall\): round 0 .* 1 part\(s\): 1 \(b…\)"):
        feed.refresh(0, wait=True, on_wait=calls.append)
    assert sleeps == [0.05, 0.1, 0.2, 0.4]  # 0.75 s waited: the first poll past 0.5 s ends it
    assert calls == [[1]] * 4  # the trainer was asked to look at the missing part each time


def test_max_stall_option_is_checked():
    with pytest.raises(UserError, match="--max-stall"):
        TrainConfig(data="x", max_stall=0).validate()
    for option, value in (("max_stall", float("inf")), ("solver_wait", float("inf")), ("max_stall", float("nan"))):
        with pytest.raises(UserError, match=f"--{option.replace('_', '-')}: must be finite"):
            TrainConfig(data="x", **{option: value}).validate()
    with pytest.raises(UserError, match="--solver-retries"):
        TrainConfig(data="x", solver_retries=-1).validate()


def test_pollers_read_one_manifest_a_poll_and_never_list(tmp_path, monkeypatch):
    """Each read or listing is a request on an object store: the idle farm reads the
    manifest of the round after the last one seen and nothing else; a finished round is
    read again after RECHECK_S (a proposal found corrupt, its round uncommitted, is
    solved again); the feed reads only rounds newer than the one every part holds."""
    from shared import storage
    from solver_service import farm as farm_module
    from solver_service.farm import Farm, Pool

    base = str(tmp_path / "shards")
    for r in (0, 1):
        _write_snapshot_parts(base, str(tmp_path / "data"), 2, r=r)
        _solve_parts_locally(base, 2, r=r)
    store = ShardStore(base)
    farm = Farm(store, 2, SolverConfig(), Pool())
    assert farm.pending() == []
    read, listed = [], []
    monkeypatch.setattr(store, "manifest", lambda kind, r: read.append((kind, r)) or ShardStore.manifest(store, kind, r))
    monkeypatch.setattr(storage, "list_dir", lambda uri: listed.append(uri) or [])
    assert farm.pending() == [] and read == [("snapshots", 2)]
    os.remove(store.part("proposals", 0, 1).uri)
    store.uncommit("proposals", 0)  # what the feed does with a corrupt part
    read.clear()
    assert farm.pending() == [] and read == [("snapshots", 2)]  # both rounds remembered as finished
    monkeypatch.setattr(farm_module, "RECHECK_S", 0.0)
    assert farm.pending() == [0]
    read.clear()
    assert sorted(store.newest_proposals(1, 2, since=0)) == [0, 1] and read == [("proposals", 1)]
    assert listed == []


# --------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "tests.poison.install",
                          "env_vars": {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}})
    yield ray
    ray.shutdown()


def test_a_part_that_kills_its_solver_ends_the_round_naming_it(ray_local, tmp_path):
    """tests/poison.py makes every solver process exit on poison/1.png (a segfault, an
    OOM kill): Ray restarts the actor and retries the part `retries` times, then the
    round ends with an error naming the parts left (part 1 among them) and their snapshots."""
    from solver_service.farm import Pool, solve_round

    base = str(tmp_path / "shards")
    _write_snapshot_parts(base, str(tmp_path / "poison"), 3)
    warned = []
    with pytest.raises(UserError, match=r"round 0: part\(s\) \[.*1.*\] still unsolved after 1 solver restarts.*part-1"):
        solve_round(ShardStore(base), 0, SolverConfig(max_iter=1), Pool(retries=1), warn=warned.append)
    with open(tmp_path / "poison" / "deaths") as f:
        deaths = f.read().split()
    print("solver deaths:", deaths, "warnings:", warned)
    # Bounded, not retried forever: each pass of the round costs the first try and one
    # retry (two deaths); a new pass starts only after one that solved some other part, so
    # with three parts there are at most three.
    passes = 1 + len(warned)
    assert passes <= 3 and all("solving them again" in w for w in warned)
    assert len(deaths) == 2 * passes
    assert 1 not in ShardStore(base).parts("proposals", 0)


def test_an_unplaceable_pool_ends_after_solver_wait(ray_local, tmp_path):
    from solver_service.farm import Pool, solve_round

    base = str(tmp_path / "shards")
    _write_snapshot_parts(base, str(tmp_path / "data"), 1, r=0)
    with pytest.raises(UserError, match=r"within 2s \(--solver-wait\): each asks for 1 CPU, 1 'solver_node'"):
        solve_round(ShardStore(base), 0, SolverConfig(max_iter=1), Pool(resource="solver_node", wait_s=2))


def test_two_fresh_runs_cannot_both_claim_one_shard_base(tmp_path, monkeypatch):
    """claim checks, then writes: a run that came between them must not lose its base."""
    base = str(tmp_path / "shards")
    ShardStore(base, "b").claim()
    late = ShardStore(base, "a")
    monkeypatch.setattr(late, "owner", iter([None, "b"]).__next__)  # its check ran before b wrote
    with pytest.raises(UserError, match=r"--shards .*: another run \(b\) claimed it just now"):
        late.claim()
    assert ShardStore(base).owner() == "b"


def test_local_capacity_is_checked_before_starting(ray_local):
    """For every method: trainer workers (and their GPUs) that a private Ray can never
    place would wait forever (Ray Train retries their placement without end)."""
    from trainer.driver import check_capacity

    check_capacity(TrainConfig(data="x", method="grid-tr", num_workers=1, loader_workers=0), use_gpu=False)
    check_capacity(TrainConfig(data="x", method="pce", num_workers=2, loader_workers=0), use_gpu=False)
    with pytest.raises(UserError, match=r"--workers 2 and --solvers 1: need 3 CPUs.*gives Ray 2; use --workers 1"):
        check_capacity(TrainConfig(data="x", method="grid-tr", num_workers=2, loader_workers=0), use_gpu=False)
    with pytest.raises(UserError, match=r"--workers 3: need 3 CPUs at once, this machine gives Ray 2; use --workers 2"):
        check_capacity(TrainConfig(data="x", method="pce", num_workers=3, loader_workers=0), use_gpu=False)
    with pytest.raises(UserError, match=r"--gpu: 1 trainer worker\(s\) need a GPU each, this machine gives Ray 0"):
        check_capacity(TrainConfig(data="x", method="full", loader_workers=0), use_gpu=True)


def test_a_private_ray_refuses_a_trainer_resource(ray_local):
    from trainer.driver import check_trainer_resource, trainer_resources

    check_trainer_resource(TrainConfig(data="x"))
    with pytest.raises(UserError, match=r"--trainer-resource trainer_node: a private Ray has no trainer nodes"):
        check_trainer_resource(TrainConfig(data="x", trainer_resource="trainer_node"))
    assert trainer_resources(TrainConfig(data="x", trainer_resource="t", loader_workers=2)) == {"CPU": 3, "t": 1}


def test_farm_passes_a_round_blocked_on_an_unreadable_snapshot(ray_local, tmp_path, capsys):
    """Round 0's part 1 is truncated: the farm solves what it can, warns once, and goes
    on to round 1 instead of waiting on round 0 forever; failures reach on_error."""
    from solver_service.farm import Farm, Pool

    base = str(tmp_path / "shards")
    for r in (0, 1):
        _write_snapshot_parts(base, str(tmp_path / "data"), 2, r=r)
    bad = ShardStore(base).part("snapshots", 0, 1).uri
    _truncate(bad)
    errors = []
    farm = Farm(ShardStore(base), 2, SolverConfig(max_iter=1), Pool(), on_error=lambda: errors.append(1))
    farm.start()
    deadline = time.monotonic() + 120
    while len(ShardStore(base).parts("proposals", 1)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    farm.finish(60)
    assert sorted(ShardStore(base).parts("proposals", 1)) == [0, 1]
    assert sorted(ShardStore(base).parts("proposals", 0)) == [0]
    assert capsys.readouterr().out.count(bad) == 1 and not errors and farm.error is None

    # bad input in a new round: the farm dies, writes the marker and calls on_error
    _write_snapshot_parts(base, str(tmp_path / "data2"), 2, r=2)
    os.remove(os.path.join(str(tmp_path / "data2"), "0.png"))
    farm = Farm(ShardStore(base), 2, SolverConfig(max_iter=1), Pool(), on_error=lambda: errors.append(1))
    farm.start()
    farm.join(120)
    assert errors == [1] and isinstance(farm.error, UserError) and "0.png" in str(farm.error)
    assert "0.png" in ShardStore(base).failure()


def test_trainer_writes_a_missing_answers_unreadable_snapshot_again(tmp_path, synthetic_set):
    """While it waits, the trainer writes its unreadable snapshot parts again (only those)."""
    from trainer.architectures import build_model
    from trainer.datasets import EvalSet
    from trainer.splits import load_split
    from trainer.stage_a import StageA

    data = synthetic_set(6, 2, 32)
    cfg = TrainConfig(data=data, method="grid-tr", shard_size=2, out=str(tmp_path / "run"))
    samples = load_split(data, "synthetic", "train", "")
    stage_a = StageA(cfg, "mine", samples, EvalSet(samples, 4), 4, torch.device("cpu"), 0, 1)
    net = build_model("unet", 4)
    stage_a._write(net, 0)
    store = ShardStore(cfg.shard_base(), "mine")
    bad, good = store.part("snapshots", 0, 1).uri, store.part("snapshots", 0, 2).uri
    before = os.stat(good).st_mtime_ns
    _truncate(bad)
    stage_a._repair(net, 0, [1, 2])
    assert store.unreadable("snapshots", 0, read_rows=True) == {}
    assert os.stat(good).st_mtime_ns == before


def test_the_farm_waits_out_a_storage_outage_then_gives_up_after_its_patience(ray_local, tmp_path, capsys):
    """tests/poison.py fails every image read under outage/ while outage/FAILING exists (an
    S3 503 inside the solver actor): no solver restart is spent, no failure marker is
    written; the round is solved once storage answers. An outage past --storage-patience
    ends the farm naming the option."""
    from solver_service.farm import Farm, Pool, solver_restarts

    base, data = str(tmp_path / "shards"), tmp_path / "outage"
    _write_snapshot_parts(base, str(data), 2)
    (data / "FAILING").touch()
    restarts, errors, out = solver_restarts(), [], ""
    farm = Farm(ShardStore(base), 2, SolverConfig(max_iter=1), Pool(), on_error=lambda: errors.append(1),
                storage_patience_s=600)
    farm.start()
    deadline = time.monotonic() + 120
    while out.count("storage error") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        out += capsys.readouterr().out
    (data / "FAILING").unlink()
    while len(ShardStore(base).parts("proposals", 0)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    farm.finish(60)
    assert out.count("warning: stage A: storage error") >= 2 and "SLOW_DOWN" in out
    assert sorted(ShardStore(base).parts("proposals", 0)) == [0, 1]
    assert farm.error is None and not errors and ShardStore(base).failure() is None
    assert solver_restarts() == restarts

    base = str(tmp_path / "shards2")
    _write_snapshot_parts(base, str(data), 1)
    (data / "FAILING").touch()
    farm = Farm(ShardStore(base), 1, SolverConfig(max_iter=1), Pool(), on_error=lambda: errors.append(1),
                storage_patience_s=1)
    farm.start()
    farm.join(120)
    assert errors == [1] and isinstance(farm.error, OSError)
    assert "(--storage-patience)" in str(farm.error) and "--storage-patience" in ShardStore(base).failure()


def test_a_round_without_progress_is_tried_again_ever_less_often(ray_local, tmp_path):
    """A round whose only part is an unreadable snapshot: each try lists and reads back the
    round's proposal parts (on VOC 1,300 GETs a second when tried every poll)."""
    from solver_service.farm import Farm, Pool

    base = str(tmp_path / "shards")
    _write_snapshot_parts(base, str(tmp_path / "data"), 1)
    _truncate(ShardStore(base).part("snapshots", 0, 0).uri)
    store, tries = ShardStore(base), []
    unsolved = store.unsolved
    store.unsolved = lambda *a, **k: tries.append(1) or unsolved(*a, **k)
    farm = Farm(store, 1, SolverConfig(max_iter=1), Pool())
    farm.start()
    time.sleep(4)  # tries at 0, 1, 3 s (backing off); every poll (0.2 s doubled up to 1 s) would make 6 or more
    farm.finish(30)
    assert 1 <= len(tries) <= 4 and farm.error is None


def test_a_farm_ended_by_ctrl_c_is_no_stage_a_failure(tmp_path):
    """On ^C, Ray Train's SIGINT handler ends the process and Ray raises SystemExit in the
    farm thread's ray.get: no failure marker (a resumed run would read it), no second
    interrupt of the main thread."""
    from solver_service.farm import Farm, Pool

    store, errors = ShardStore(str(tmp_path / "shards"), "r"), []
    store.claim()

    def ending():
        raise SystemExit(0)

    farm = Farm(store, 1, SolverConfig(max_iter=1), Pool(), on_error=lambda: errors.append(1))
    farm.pending = ending
    farm.start()
    farm.join(60)
    assert not farm.is_alive() and farm.error is None and not errors and store.failure() is None


def test_a_farm_the_driver_left_behind_fails_quietly(tmp_path, capfd):
    """After ^C the driver waits a few seconds for the farm (Farm.finish), then Ray shuts
    down under the round it is solving, which fails (ActorDiedError): no failure marker,
    no interrupt, no traceback under the one line of the ^C (seen under load)."""
    import threading

    from solver_service.farm import Farm, Pool

    store, errors, released = ShardStore(str(tmp_path / "shards"), "r"), [], threading.Event()
    store.claim()

    def solving():
        released.wait(60)
        raise RuntimeError("The actor died unexpectedly before finishing this task.")

    farm = Farm(store, 1, SolverConfig(max_iter=1), Pool(), on_error=lambda: errors.append(1))
    farm.pending = solving
    farm.start()
    farm.finish(0.1)
    assert farm.abandoned
    released.set()
    farm.join(60)
    assert not farm.is_alive() and farm.error is None and not errors and store.failure() is None
    assert "Traceback" not in capfd.readouterr().err
