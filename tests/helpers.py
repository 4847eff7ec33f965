"""Helpers of the fault and bad-input tests: the CLI as a subprocess, Ray's processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env() -> dict:
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    env["TQDM_DISABLE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def cli_args(*args) -> list[str]:
    return [sys.executable, "-m", "trainer", *map(str, args)]


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(*args), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def popen_cli(*args, log_path: str) -> subprocess.Popen:
    """The CLI in its own session (so that its Ray processes can be found and ended)."""
    log = open(log_path, "w")
    return subprocess.Popen(
        cli_args(*args), cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def read_metrics(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def session_processes(sid: int) -> list:
    """Live processes of session `sid` (a CLI started by popen_cli and its local Ray)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


def kill_processes(procs) -> None:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def solver_processes(roots) -> list:
    """`ray::…SolverActor…` worker processes among the descendants of `roots` (psutil processes)."""
    import psutil

    found = {}
    for root in roots:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in family:
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if cmd.startswith("ray::") and "SolverActor" in cmd:
                found[p.pid] = p
    return list(found.values())
