"""The solver farm on a multi-node Ray cluster on one machine (all nodes on 127.0.0.1):
a head with no CPU, a trainer node and two solver nodes advertising `solver_node`."""
from shared.shard_store import ShardStore, folder_parts
import os
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.cluster

from tests.helpers import ROOT
LOOPBACK = "127.0.0.1"


def _node_args(**kw):
    return {"node_ip_address": LOOPBACK, "include_dashboard": False, **kw}


@pytest.fixture
def cluster():
    """head (0 CPU) + trainer (1 CPU, trainer_node) + 2 solver nodes (1 CPU, solver_node: 1)."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    saved_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *([saved_path] if saved_path else [])])  # workers import the repo
    c = Cluster(initialize_head=True, head_node_args=_node_args(num_cpus=0))
    try:
        trainer = c.add_node(**_node_args(num_cpus=1, resources={"trainer_node": 1}))
        solvers = [c.add_node(**_node_args(num_cpus=1, resources={"solver_node": 1})) for _ in range(2)]
        c.wait_for_nodes()
        ray.init(address=c.address, _node_ip_address=LOOPBACK, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": "tests.hold.install", "env_vars": {"PYTHONPATH": ROOT}})
        yield c, trainer, solvers
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        if saved_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_path


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def _make_round(base, data_dir, n_parts, per_part, size, classes=3, seed=0):
    """Synthetic images + scribble seeds on disk and snapshot round 0 with random q."""
    from shared import shards

    rng = np.random.default_rng(seed)
    os.makedirs(data_dir, exist_ok=True)
    ids = []
    for k in range(n_parts):
        rows = []
        for j in range(per_part):
            i = k * per_part + j
            truth = np.minimum(np.arange(size) * classes // size, classes - 1)[None].repeat(size, 0).astype(np.uint8)
            colours = rng.integers(0, 256, (classes, 3))
            image = np.clip(colours[truth] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            seeds = np.full((size, size), 255, np.uint8)
            for c in range(classes):
                cols = np.flatnonzero(truth[0] == c)
                seeds[size // 4: 3 * size // 4, cols[len(cols) // 2]] = c
            image_path, seeds_path = os.path.join(data_dir, f"{i}.png"), os.path.join(data_dir, f"{i}_seeds.png")
            _png(image_path, image)
            _png(seeds_path, seeds)
            labels = shards.label_set(seeds, classes)
            q = rng.dirichlet(np.ones(len(labels)), size=(size // 4, size // 4)).transpose(2, 0, 1)
            rows.append(shards.Snapshot(
                image_id=f"img{i:04d}", round=0, image_uri=image_path, seeds_uri=seeds_path, height=size,
                width=size, num_classes=classes, label_set=labels,
                neg_log_q=(-np.log(q + 1e-6)).astype(np.float16)))
            ids.append(f"img{i:04d}")
        shards.write_table(shards.snapshots_table(rows), ShardStore(base).part("snapshots", 0, k).uri)
    return ids


def _check_all_proposals(base, ids, n_parts, size):
    done = ShardStore(base).parts("proposals", 0)
    assert sorted(done) == list(range(n_parts)), f"missing parts: {set(range(n_parts)) - set(done)}"
    got = []
    for k in range(n_parts):
        for p in done[k].read_proposals():
            assert p.round == 0 and p.labels.shape == (size, size) and np.isfinite(p.energy)
            got.append(p.image_id)
    assert sorted(got) == sorted(ids)


def test_solve_round_runs_only_on_solver_nodes(cluster, tmp_path):
    from shared.config import SolverConfig
    from solver_service.farm import Pool, solve_round

    c, trainer, solvers = cluster
    base, n_parts, size = str(tmp_path / "shards"), 6, 48
    ids = _make_round(base, str(tmp_path / "data"), n_parts, per_part=2, size=size)
    t0 = time.perf_counter()
    rows = solve_round(ShardStore(base), 0, SolverConfig(max_iter=2), Pool((1, 2), resource="solver_node"))
    print(f"round of {n_parts} parts: {time.perf_counter() - t0:.1f}s")

    assert sorted(int(r["k"]) for r in rows) == list(range(n_parts))
    assert sum(int(r["images"]) for r in rows) == len(ids)
    assert ShardStore(base).unsolved(0, verify=True) == {}
    _check_all_proposals(base, ids, n_parts, size)
    solver_ids = {n.node_id for n in solvers}
    used = {str(r["node_id"]) for r in rows}
    assert used <= solver_ids, f"solver actors ran off the solver nodes: {used - solver_ids}"
    assert trainer.node_id not in used and c.head_node.node_id not in used
    _check_cluster_paths(tmp_path)
    _check_local_ray_is_private(c)


def _check_local_ray_is_private(c):
    """On the same cluster: --local (ray_session.connect without an address) starts a Ray
    of its own while another runs on this machine; plain ray.init() would join the
    newest one (the cluster above writes /tmp/ray/ray_current_cluster)."""
    import subprocess
    import sys

    code = ("from shared import ray_session; import ray; ray_session.connect(None, num_cpus=1, quiet=True); "
            "print(ray.get_runtime_context().gcs_address, len(ray.nodes()))")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120, check=True).stdout.split()
    assert out[0] != c.address and out[1] == "1", out


def _check_cluster_paths(tmp_path):
    """On the same cluster (it is costly to start): a run joining a several-node cluster
    refuses local --out/--shards paths unless --shared-fs, and paths missing on a node."""
    from trainer.config import TrainConfig
    from shared.errors import UserError
    from trainer.driver import check_cluster_paths

    data = str(tmp_path / "data")
    with pytest.raises(UserError, match="--out .*local path.*--shared-fs"):
        check_cluster_paths(TrainConfig(data=data, out=str(tmp_path / "run")))
    with pytest.raises(UserError, match="--shards .*local path"):
        check_cluster_paths(TrainConfig(data=data, out="s3://b/run", shards=str(tmp_path / "s")))
    check_cluster_paths(TrainConfig(data=data, out="s3://b/run", shards="s3://b/s"))
    check_cluster_paths(TrainConfig(data=data, out=str(tmp_path / "run"), shared_fs=True))
    with pytest.raises(UserError, match=r"--init .*missing\.pt: not on cluster node\(s\) 127\.0\.0\.1"):
        check_cluster_paths(TrainConfig(data=data, out="s3://b/run", init=str(tmp_path / "missing.pt")))


@pytest.mark.faults
def test_losing_a_solver_node_mid_round_loses_no_proposal(cluster, tmp_path):
    """Issue: a solver node removed mid-round loses no image, and is counted as restarts."""
    from shared.config import SolverConfig
    from solver_service.farm import Pool, solve_round, solver_restarts

    c, trainer, solvers = cluster
    base, data, n_parts, size = str(tmp_path / "shards"), tmp_path / "data", 6, 48
    ids = _make_round(base, str(data), n_parts, per_part=1, size=size)
    (data / "hold").touch()  # tests/hold.py: every solver waits at its first image until released
    result, errors = {}, []

    def run():
        try:
            result["rows"] = solve_round(ShardStore(base), 0, SolverConfig(max_iter=2), Pool((1, 2), resource="solver_node"))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    def held():  # pids of the solver processes waiting at an image
        return set((data / "held").read_text().split()) if (data / "held").exists() else set()

    thread = threading.Thread(target=run, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    # wait until both solver actors (one per solver node) hold a part, so the node goes mid-solve
    while len(held()) < 2 and thread.is_alive() and time.perf_counter() - t0 < 120:
        time.sleep(0.05)
    assert len(held()) == 2, "the pool never ran two solver actors"
    proposals = ShardStore(base).round_dir("proposals", 0)
    assert folder_parts(proposals, "proposals") == {}  # nothing written yet: both parts in flight are at stake
    c.remove_node(solvers[0])
    (data / "hold").unlink()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the round did not finish after a solver node went away"
    assert not errors, errors
    print(f"round {time.perf_counter() - t0:.1f}s; {len(result['rows'])} part solves by "
          f"{len({r['solver'] for r in result['rows']})} actor processes")
    _check_all_proposals(base, ids, n_parts, size)
    solver_ids = {n.node_id for n in solvers}
    assert {str(r["node_id"]) for r in result["rows"]} <= solver_ids
    assert solver_restarts() >= 1


def test_table_cells_train_side_by_side_on_two_nodes(cluster, synthetic_set, tmp_path):
    """Two PCE cells as Tune trials (experiments/trials.py) with the default concurrency,
    what the cluster holds: their trainer workers train at the same time, on two nodes
    (each node has one CPU, a trainer worker asks for one)."""
    from ray import tune
    from ray._private import ray_constants

    from experiments import trials
    from trainer.config import TrainConfig
    from tests.helpers import descendants

    c, trainer, solvers = cluster
    data = synthetic_set(8, 4, 48)
    runs = {f"pce-{seed}": TrainConfig(data=data, method="pce", epochs=2, batch_size=4, crop_size=0, seed=seed,
                                       shared_fs=True, use_gpu=False, out=str(tmp_path / f"pce-{seed}"))
            for seed in (0, 1)}
    at_once = trials.runs_that_fit(list(runs.values()))
    assert at_once == 3  # three nodes of one CPU, one trainer CPU a cell
    raylets = {n.node_id: n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
               for n in [trainer, *solvers]}
    most, done = set(), threading.Event()

    def watch():  # the nodes whose raylet runs a Ray Train worker, sampled every 0.2 s
        nonlocal most
        while not done.is_set():
            busy = {node for node, pid in raylets.items()
                    if any(p.cmdline.startswith("ray::RayTrainWorker") for p in descendants(pid))}
            most = max(most, busy, key=len)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines = []
    try:
        results = trials.fit(trials.experiment_path(str(tmp_path), "cells", runs), runs, "synthetic",
                             {"run": tune.grid_search(list(runs))}, trials.grid_config(at_once),
                             len(runs), lines.append)
    finally:
        done.set()
        watcher.join()
    print(f"trainer workers at once on nodes {sorted(most)}; {lines[-1]}")
    assert len(most) == 2, f"the two cells' trainers were never on two nodes at once: {most}"
    assert trials.most_at_once(results) == 2 and "2 trials, at most 2 at once" in lines[-1]
    assert {r.config["run"] for r in results} == set(runs)
    assert all(os.path.exists(tmp_path / name / "summary.json") for name in runs)


def test_trainer_workers_a_cluster_can_never_place_end_the_run_in_one_line(synthetic_set, tmp_path, monkeypatch):
    """`--gpu` on a cluster without GPUs (one node on 127.0.0.1, joined with --address, where
    nothing checks capacity up front: a GPU node may yet come): Ray Train retries placing
    the trainer workers, a controller failure every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    (1 s here), and `controller_failure_limit` (--solver-wait ÷ that) ends the run with one
    line naming what a worker asks for, instead of waiting forever."""
    from ray.cluster_utils import Cluster

    from tests.helpers import run_cli

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
    c = Cluster(initialize_head=True, head_node_args=_node_args(num_cpus=1))
    try:
        t0 = time.monotonic()
        proc = run_cli("--address", c.address, "train", "--data", synthetic_set(4, 2, 32), "--method", "pce",
                       "--epochs", 1, "--batch-size", 4, "--crop-size", 0, "--gpu", "--loader-workers", 0,
                       "--solver-wait", 3, "--out", tmp_path / "out",
                       env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "1"}, timeout=240)
        took = time.monotonic() - t0
    finally:
        c.shutdown()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    print(f"ended after {took:.0f}s: {errors}")
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: --workers 1: the trainer workers (1 CPU and 1 GPU each) could not be placed "
                                "within --solver-wait 3s; free: ")
    # the CLI's own lines: its error last, no traceback (Ray Train's controller logs its retries,
    # tracebacks included, through Ray's `(TrainController pid=…)` prefix: Ray's processes')
    own = [line for line in proc.stderr.splitlines() if not line.startswith("\x1b[36m(")]
    assert own[-1] == errors[0] and not [line for line in own if "Traceback" in line], own[-20:]
