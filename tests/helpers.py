"""Helpers of the tests: the project root, the command lines as subprocesses, Ray's processes."""
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


def cli_args(*args, module: str = "trainer") -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run_cli(*args, module: str = "trainer", timeout: float = 600, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS…` from the checkout; `check`: fail the test on a non-zero exit."""
    proc = subprocess.run(cli_args(*args, module=module), cwd=ROOT, env={**cli_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


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


class Proc:
    """A process seen in /proc (Linux): pid, parent pid, session id and command line."""

    def __init__(self, pid: int):
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        self.pid, self.state, self.ppid, self.sid = pid, fields[0], int(fields[1]), int(fields[3])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            self.cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()

    def __repr__(self):
        return f"Proc({self.pid}, {self.cmdline[:60]!r})"


def all_processes() -> list[Proc]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                p = Proc(int(name))
            except (OSError, ValueError, IndexError):
                continue
            if p.state != "Z":
                out.append(p)
    return out


def session_processes(sid: int) -> list[Proc]:
    """Live processes of session `sid` (a CLI started by popen_cli and its local Ray)."""
    return [p for p in all_processes() if p.sid == sid]


def descendants(pid: int) -> list[Proc]:
    procs = all_processes()
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c.pid)
    return out


def kill_processes(procs) -> None:
    """SIGKILL the given processes (only ever ones this test started) and wait for them."""
    import signal
    import time

    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    alive = {p.pid for p in procs}
    while alive and time.monotonic() < deadline:
        alive = {q.pid for q in all_processes() if q.pid in alive}
        time.sleep(0.1)


def solver_processes(root_pid: int) -> list[Proc]:
    """`ray::…SolverActor…` worker processes among the descendants of `root_pid`."""
    return [p for p in descendants(root_pid) if p.cmdline.startswith("ray::") and "SolverActor" in p.cmdline]
