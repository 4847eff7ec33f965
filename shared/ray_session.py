"""Joining a Ray cluster, or starting a private one on 127.0.0.1: the trainer's driver
and the solver's command line both start Ray here."""
from __future__ import annotations

import logging
import os
import secrets
import tempfile

import ray

from shared.private_file import check_private

NO_API_SERVER = "http://127.0.0.1:1"  # tcpmux: nothing listens there, connects are refused
# the token of a private Ray: Ray's own default, ~/.ray/auth_token, is written readable by all
LOCAL_TOKEN = "~/.trseg/ray_auth_token"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def connect(address: str | None, num_cpus: int | None = None, quiet: bool = False) -> None:
    """Join a cluster, or start a private Ray bound to 127.0.0.1 with no dashboard; either way
    every worker runs `shared.ray_logging`'s hook, so the terminal shows each epoch
    line once and none of Ray Train's per-report chatter.

    Local mode also needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 set before ray is first
    imported (the CLI does it), or worker sockets listen on every interface. `quiet`:
    Ray's own log lines only from errors up (a command whose output is one summary line).
    """
    if ray.is_initialized():
        return
    private_token(local=not address)
    # Ray Train's print patch tees every worker print into a logger that Ray forwards
    # too, so each epoch line would reach the terminal twice.
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={
            "env_vars": env_vars, "worker_process_setup_hook": "shared.ray_logging.quiet_workers"})
        return
    # Without a dashboard of its own, the state API in our workers would look for the
    # newest Ray on this machine (/tmp/ray/ray_current_cluster). Ray Train's
    # placement-group cleaner asks it every second whether our train controller is
    # alive; another local Ray with a dashboard answers "no such actor", and the
    # cleaner tears down this run's placement group mid-training. Point the state API
    # at a closed loopback port instead: every query fails fast and changes nothing.
    env_vars["RAY_API_SERVER_ADDRESS"] = NO_API_SERVER
    # One machine, so Ray Train's start and end can be quicker (each run of a table of
    # cells pays them): no preemption watcher (an actor of its own per worker group, one
    # more process to start, watching for drains that no autoscaler makes here), and the
    # controller polls its workers every 0.5 s, not 2 s (each poll a local call; it
    # notices the end of training that much sooner). The environment's values win.
    for name, value in (("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"), ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")):
        env_vars[name] = os.environ.get(name, value)
    # Workers import the setup hook before Ray adds the driver's folder to their path:
    # give them a source checkout's packages whether or not it is pip-installed (an
    # installed wheel's folder is site-packages, which must not go before the stdlib).
    if os.path.exists(os.path.join(PROJECT_ROOT, "pyproject.toml")):
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
    # address "local": a new Ray even where this machine runs another one (`ray start`, a
    # test's multi-node cluster): with no address, ray.init joins the newest of those
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=False,
             log_to_driver=not quiet,
             logging_level=logging.ERROR if quiet else logging.INFO, runtime_env={
        "env_vars": env_vars, "worker_process_setup_hook": "shared.ray_logging.quiet_local_workers"})
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def private_token(local: bool) -> None:
    """With token authentication (RAY_AUTH_MODE=token), the token file must be readable by
    its owner only: anyone who reads it controls the cluster. A private Ray (`local`) that
    names no token gets LOCAL_TOKEN, created mode 0600. A token file that others can read
    is refused, naming it."""
    if os.environ.get("RAY_AUTH_MODE") != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    if local and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.path.expanduser(LOCAL_TOKEN)
        if not os.path.exists(path):
            _publish_token(path)
        os.environ["RAY_AUTH_TOKEN_PATH"] = path
    check_private(os.path.expanduser(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"))


def _publish_token(path: str) -> None:
    """A new token at `path`, mode 0600, that appears whole: written to a private file
    beside it, then hard-linked into place, so that two commands started at once on a
    fresh machine (a test suite's two processes) never read it empty; the first link
    wins and both use its token."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".token-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.remove(tmp)


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (a private, local Ray)."""
    node = ray._private.worker.global_worker.node
    return node is not None and node.head  # a driver that joined a cluster holds a non-head node


def nodes_lacking(path: str) -> list[str]:
    """IP addresses of the live cluster nodes on which `path` does not exist (a zero-CPU
    probe task pinned to each node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(os.path.exists)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    found = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                     .remote(path) for n in nodes])
    return [n["NodeManagerAddress"] for n, ok in zip(nodes, found) if not ok]
