"""The cluster path on Ray's local autoscaler (the fake multi-node provider; "Testing
Autoscaling Locally" in Ray's docs): the node types of deploy/cluster.yaml, scaled down to
one CPU a node, started by the autoscaler as local processes on 127.0.0.1. A Grid-TR run
joins the cluster through deploy/submit.py (`--address auto`, the cluster's token); the
autoscaler brings solver nodes up for stage A and a trainer node for Ray Train, one
solver node is lost in the middle of the round, and the idle nodes are stopped again."""
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

from tests.helpers import (ROOT, Proc, descendants, is_loopback, kill_processes, listening_sockets,
                           session_processes)

pytestmark = pytest.mark.cluster

CLUSTER_YAML = os.path.join(ROOT, "deploy", "cluster.yaml")
IDLE_TIMEOUT_MIN = 0.1  # the yaml's 10 minutes would hold the test that long
OBJECT_STORE = 150 * 2**20  # per node: Ray's default (30% of RAM each) adds up on one machine
# What the test's run can use of each type (--workers 1, --solvers 1:2), and one solver
# node more for the actor of the node the test kills. Above that the fake provider only
# churns: it launched a `trainer` node for Ray Train's standing resource request every
# ≈ 11 s and stopped it idle 6 s later (deploy/README.md, known limits), each launch a
# raylet and two agents starting on this machine's two cores.
MAX_WORKERS = {"trainer": 1, "solver": 3}
# The fake provider names the head type so; our yaml's head type becomes it.
FAKE_HEAD_TYPE = "ray.head.default"
# Solver actors ask Ray for memory, and the autoscaler launches only a type that declares
# enough. The AWS provider fills each type's memory in from its instance type; the fake
# one cannot: 2 GiB per CPU, as a c6i.4xlarge has (32 GiB, 16 vCPUs).
MEMORY_PER_CPU = 2 * 2**30


class FakeProvider(FakeMultiNodeProvider):
    """Ray's fake provider, given node types that declare their memory: Ray's own passes
    every resource of the type to the node as a custom resource, which Ray refuses for
    `memory`; without it the node reports this machine's memory, more than declared."""

    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        resources = {k: v for k, v in resources.items() if k != "memory"}
        return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)


def fake_cluster_config(gcs_address: str) -> dict:
    """deploy/cluster.yaml's node types for the fake provider: names, custom resources and
    min_workers as they are, max_workers at most MAX_WORKERS, every count divided by the
    type's CPU count (at least 1), so a node has one CPU; the solver type's `solver_node`
    (= its CPUs) becomes 1, the trainer keeps its GPU and `trainer_node`."""
    import yaml

    with open(CLUSTER_YAML) as f:
        src = yaml.safe_load(f)
    types = {}
    for name, t in src["available_node_types"].items():
        cpus = t["resources"]["CPU"]
        scaled = {**{k: max(1, v // cpus) for k, v in t["resources"].items()}, "memory": MEMORY_PER_CPU}
        if name == src["head_node_type"]:
            types[FAKE_HEAD_TYPE] = {"resources": {"CPU": scaled["CPU"]}, "node_config": {}, "max_workers": 0}
        else:
            types[name] = {"resources": {**scaled, "object_store_memory": OBJECT_STORE}, "node_config": {},
                           "min_workers": t["min_workers"],
                           "max_workers": min(t["max_workers"], MAX_WORKERS.get(name, t["max_workers"]))}
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
             "rsync_filter")
    return {
        "cluster_name": "trseg-fake", "max_workers": src["max_workers"], "upscaling_speed": src["upscaling_speed"],
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN, "head_node_type": FAKE_HEAD_TYPE, "available_node_types": types,
        "provider": {"type": "external", "module": "tests.test_autoscaler.FakeProvider", "gcs_address": gcs_address,
                     "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
        **{k: [] for k in empty},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCluster:
    """A head started by `ray start --head --block` in a session of its own, with the fake
    provider's autoscaler. Its Ray temp dir (RAY_TMPDIR) is private, so `--address auto`
    finds this cluster, not another on the machine; every port is a free one or Ray's
    pick. The autoscaler's nodes are processes of the same session: `stop` ends them all,
    and nothing else."""

    def __init__(self, tmp: str, home: str):
        self.tmp, self.token = tmp, os.path.join(home, ".trseg", "ray_auth_token")
        self.reader = None  # the tables() process
        os.makedirs(os.path.dirname(self.token))
        # created 0600, as the deploy steps do: submit.py refuses a token others can read
        with open(os.open(self.token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(os.urandom(32).hex())
        self.address = f"127.0.0.1:{_free_port()}"
        config = os.path.join(tmp, "autoscaler.json")
        with open(config, "w") as f:
            fake = fake_cluster_config(self.address)
            head_cpus = fake["available_node_types"][FAKE_HEAD_TYPE]["resources"]["CPU"]
            json.dump(fake, f)
        # without the test process's own token (tests/conftest.py): this cluster has its own
        outside = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
        self.env = {**outside, "RAY_TMPDIR": tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
        head_env = {**self.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token}
        self.log = os.path.join(tmp, "head.log")
        self.head = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
             "--node-ip-address=127.0.0.1", f"--port={self.address.split(':')[1]}",
             f"--ray-client-server-port={_free_port()}", "--dashboard-agent-listen-port=0",
             "--min-worker-port=0", "--max-worker-port=0", "--include-dashboard=false",
             f"--num-cpus={head_cpus}",
             f"--object-store-memory={OBJECT_STORE}", f"--autoscaling-config={config}"],
            env=head_env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_up(self, timeout_s: float) -> None:
        address_file = os.path.join(self.tmp, "ray", "ray_current_cluster")
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(address_file):
            assert self.head.poll() is None, f"ray start --head exited: {open(self.log).read()[-3000:]}"
            assert time.monotonic() < deadline, f"no head within {timeout_s}s: {open(self.log).read()[-3000:]}"
            time.sleep(0.5)

    def autoscaler_status(self) -> str:
        """The autoscaler's latest status report (for a failure's message)."""
        import glob

        logs = glob.glob(os.path.join(self.tmp, "ray", "session_*", "logs", "monitor.log"))
        text = open(logs[0]).read() if logs else ""
        return text[text.rfind("======== Autoscaler status"):][:3000]

    def raylets(self) -> list[Proc]:
        return [p for p in session_processes(self.head.pid) if "/raylet " in p.cmdline + " "]

    def tables(self) -> dict:
        """Ray's own node table (dead nodes included: type, start, end, why it ended) and
        actor table, read through a driver that joins with the token: one process, which
        joins once and answers each call (a process a call paid Ray's import and ray.init
        every 2 s while the test waited for the idle nodes to stop)."""
        if self.reader is None:
            env = {**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token}
            self.reader = subprocess.Popen([sys.executable, "-c", TABLES, self.address], env=env, bufsize=0,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=open(os.path.join(self.tmp, "tables.log"), "w"))
        answer = os.path.join(self.tmp, "tables.json")
        self.reader.stdin.write(answer.encode() + b"\n")
        deadline = time.monotonic() + 180
        while True:  # until it says "done" (Ray may print before)
            ready, _, _ = select.select([self.reader.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.reader.stdout.readline() if ready else b""  # b"" also when the reader died
            assert line, f"no tables within 180s: {open(os.path.join(self.tmp, 'tables.log')).read()[-3000:]}"
            if line.strip() == b"done":
                with open(answer) as f:
                    return json.load(f)

    def stop(self) -> None:
        """Every process of the head's session: the head's, and the autoscaler's nodes,
        which would outlive it (`ray start --block` takes over 30 s to stop on SIGTERM)."""
        if self.reader is not None:
            kill_processes([Proc(self.reader.pid)])
            self.reader.wait()
        kill_processes(session_processes(self.head.pid))
        self.head.wait()


TABLES = r"""
import json
import sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
for answer in sys.stdin:
    nodes = []
    for info in ray._private.worker.global_worker.gcs_client.get_all_node_info().values():
        nodes.append({"id": info.node_id.hex(), "type": info.node_type_name or ("head" if info.is_head_node else ""),
                      "start": info.start_time_ms / 1e3, "end": info.end_time_ms / 1e3 or None,
                      "resources": dict(info.resources_total), "alive": info.state == 0,
                      "death": info.death_info.reason_message})
    actors = [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "start": a["StartTime"] / 1e3,
               "end": a["EndTime"] / 1e3 or None, "restarts": a["NumRestarts"], "pid": a["Pid"]}
              for a in state.actors().values()]
    with open(answer.strip(), "w") as f:
        json.dump({"nodes": nodes, "actors": actors}, f)
    print("done", flush=True)
"""


@pytest.fixture
def fake_cluster():
    tmp = tempfile.mkdtemp(prefix="trseg-as-", dir="/tmp")  # short: Ray's socket paths live under it
    cluster = FakeCluster(tmp, os.path.join(tmp, "home"))
    try:
        cluster.wait_up(180)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _solving(raylets: list[Proc], solvers: set[int]) -> dict[int, int]:
    """{raylet pid: pid of a solver actor under it that has written a proposal and is busy
    on the CPU now, i.e. holds a part}."""
    found = {}
    for raylet in raylets:
        for p in descendants(raylet.pid):
            if p.pid in solvers:
                try:
                    before = _cpu_ticks(p.pid)
                    time.sleep(0.5)
                    if _cpu_ticks(p.pid) - before >= 2:  # an idle actor sleeps; a loaded machine gives it little
                        found[raylet.pid] = p.pid
                except OSError:
                    pass
    return found


def _lose_a_solver_node(cluster, proposals: str, n_parts: int, driver, timeout_s: float):
    """Once a solver actor that has written a proposal is solving another, end every
    process of its node (a machine lost without notice). Returns (the node's id, parts
    done before)."""
    from shared.shard_store import folder_parts

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and driver.poll() is None:
        done = folder_parts(proposals, "proposals") if os.path.isdir(proposals) else {}
        solvers = {int(p.solver.rsplit(":", 1)[1]) for part in done.values() for p in part.read_proposals()}
        busy = _solving(cluster.raylets(), solvers)
        assert len(done) < n_parts, f"the round ended before a solver was seen solving ({len(done)} parts done)"
        if busy:
            raylet = Proc(next(iter(busy)))
            node_id = raylet.cmdline.split("--node_id=")[1].split()[0]
            kill_processes([raylet, *descendants(raylet.pid)])
            return node_id, len(done)
        time.sleep(0.5)
    raise AssertionError(f"no solver node solved a part within {timeout_s}s (driver exit {driver.poll()}); "
                         f"{cluster.autoscaler_status()}")


def _since(t: float, t0: float) -> str:
    return f"{t - t0:.0f}" if t else "?"  # Ray records 0 for a time it has not seen (an actor that never started)


def _timeline(tables: dict, t0: float, lost: str) -> list[str]:
    """One line a node: type, launched, the actors it ran and when (an actor that Ray
    restarted elsewhere counts on its last node, from its first start), ended and why."""
    lines = []
    for n in sorted(tables["nodes"], key=lambda n: n["start"]):
        used = [f"{a['class'].split('(')[-1].rstrip(')')} {_since(a['start'], t0)}–{_since(a['end'], t0)}s"
                for a in tables["actors"] if a["node"] == n["id"]
                and ("SolverActor" in a["class"] or a["class"] == "RayTrainWorker")]
        end = f"ended {n['end'] - t0:.0f}s ({n['death']})" if n["end"] else "alive"
        end += " [killed by the test]" if n["id"] == lost else ""
        lines.append(f"{n['type']:8} {n['id'][-5:]} launched {n['start'] - t0:.0f}s, ran {', '.join(used) or '-'}; {end}")
    return lines


def _phases(out, t0: float) -> str:
    """When the run's files were written, in seconds from t0: snapshot and proposal parts
    (first–last), the end of each epoch, the summary."""
    import glob

    def span(pattern):
        times = sorted(os.path.getmtime(f) for f in glob.glob(os.path.join(str(out), pattern)))
        return f"{times[0] - t0:.0f}–{times[-1] - t0:.0f}s" if times else "-"

    epochs = [f"{p} {os.path.getmtime(f) - t0:.0f}s" for p, f in (("metrics", os.path.join(str(out), "metrics.jsonl")),
                                                               ("summary", os.path.join(str(out), "summary.json")))
              if os.path.exists(f)]
    return (f"snapshots {span('shards/snapshots/round=0/part-*')}, proposals {span('shards/proposals/round=0/part-*')}, "
            + ", ".join(epochs))


def test_autoscaler_brings_solver_nodes_up_for_stage_a_and_stops_them(fake_cluster, synthetic_set, tmp_path):
    """Issue 30 items 1 and 2 in one run."""
    c = fake_cluster
    # A part an image: the lost node holds one, the others go on. Stage A was most of the
    # run at 48 images (≈ 9 s a part on each solver at load 33 on two cores: 300 of 426 s),
    # and the snapshot and the epoch scale with the images too; the node is lost as soon as
    # a solver that wrote a part is busy on the next, and 16 leave the round going on then.
    n_train, shard_size = 16, 1
    data, out = synthetic_set(n_train, 2, 224), tmp_path / "run"
    argv = [sys.executable, os.path.join(ROOT, "deploy", "submit.py"), "--data", data, "--format", "synthetic",
            "--method", "grid-tr", "--solvers", "1:2", "--solver-resource", "solver_node",
            "--no-gpu",  # torch here has no CUDA: the trainer type's GPU is a resource only
            "--shared-fs",  # every fake node is this machine
            "--pretrain-epochs", "0", "--epochs", "1", "--epochs-per-round", "1", "--schedule", "sync",
            "--shard-size", str(shard_size), "--out", str(out)]
    env = {**c.env, "HOME": os.path.join(c.tmp, "home")}  # submit.py finds the token in ~/.trseg; nothing else does
    t0 = time.time()
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        lost, parts_before = _lose_a_solver_node(c, str(out / "shards" / "proposals" / "round=0"),
                                                 n_train // shard_size, driver, 600)
        t_lost = time.time() - t0
        pids = [p.pid for p in session_processes(c.head.pid) + session_processes(driver.pid)]
        assert all(is_loopback(address) for _, address in listening_sockets(pids)), listening_sockets(pids)
        driver.wait(600)
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_processes(session_processes(driver.pid))
    log = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, log[-4000:]
    t_done = time.time() - t0

    deadline, tables = time.monotonic() + 180, c.tables()
    while any(n["alive"] for n in tables["nodes"] if n["type"] != "head") and time.monotonic() < deadline:
        time.sleep(1)
        tables = c.tables()
    print(f"\nrun finished at {t_done:.0f}s, solver node {lost[-5:]} lost at {t_lost:.0f}s with "
          f"{parts_before}/{n_train // shard_size} parts done, idle nodes gone at {time.time() - t0:.0f}s "
          f"(load {open('/proc/loadavg').read().split()[0]}); {_phases(out, t0)}:\n"
          + "\n".join(_timeline(tables, t0, lost)))

    summary = json.loads((out / "summary.json").read_text())
    # every image has its proposal (a part the lost node wrote before its result reached
    # the driver is not solved again, so stage_a_images may fall short of n_train)
    assert summary["proposals_missing"] == 0, summary
    assert summary["solver_restarts"] >= 1, summary  # the lost node's actor was restarted
    nodes = {n["id"]: n for n in tables["nodes"]}
    solver_nodes = [n for n in tables["nodes"] if n["type"] == "solver"]
    assert len(solver_nodes) >= 2, "the autoscaler launched fewer than two solver nodes for --solvers 1:2"
    assert all(n["start"] > t0 for n in solver_nodes)
    placed = [a for a in tables["actors"] if a["node"] in nodes]
    assert {nodes[a["node"]]["type"] for a in placed if "SolverActor" in a["class"]} == {"solver"}
    assert {nodes[a["node"]]["type"] for a in placed if a["class"] == "RayTrainWorker"} == {"trainer"}
    assert not any(n["alive"] for n in tables["nodes"] if n["type"] != "head"), "idle nodes were not stopped"
    assert nodes[lost]["type"] == "solver" and not nodes[lost]["alive"]
    stopped = [n for n in solver_nodes if n["id"] != lost]
    assert stopped, "no solver node was left to stop"
    for n in stopped:  # the autoscaler's doing: one idle timeout after the node's last actor ended
        # (the fake provider's stop is a SIGTERM to the node's processes; Ray records either cause)
        assert n["death"] in ("Terminated by autoscaler.", "received SIGTERM"), n
        ends = [a["end"] for a in placed if a["node"] == n["id"] and a["end"]]
        # (a node that ran nothing: the autoscaler counts its idle time from its own launch,
        # which Ray's node table does not record, so only the cause is checked)
        if ends:
            assert n["end"] - max(ends) >= 0.9 * IDLE_TIMEOUT_MIN * 60, (n, max(ends))
