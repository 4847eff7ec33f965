"""Helpers of the tests: the project root, the command lines as subprocesses, Ray's processes."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "trseg-test"  # the bucket of the moto S3 server (conftest.s3_endpoint)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
_s3_prefixes = itertools.count()


def s3_uri(endpoint: str, name: str = "run") -> str:
    """A fresh s3:// prefix on the test bucket whose query carries the endpoint to pyarrow."""
    return f"s3://{BUCKET}/{name}{next(_s3_prefixes)}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


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


def cli_in_process(*args) -> subprocess.CompletedProcess:
    """`python -m trainer ARGS…` as `run_cli` gives it, run in this process for the
    commands that must fail before Ray starts (a subprocess costs ~6 s of imports): its
    exit status, stdout and stderr; the environment as it was. Ray starting is an error
    in the command's own output ("ray.init called"), so a test of a line that should
    have come first fails on it."""
    import contextlib
    import io

    import ray

    from trainer.cli import main

    def refuse(*a, **k):
        raise RuntimeError("ray.init called: the command got past its checks")

    out, err, environ, init = io.StringIO(), io.StringIO(), dict(os.environ), ray.init
    ray.init = refuse
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(map(str, args)))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        ray.init = init
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(["trainer", *map(str, args)], code, out.getvalue(), err.getvalue())


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


def end_session(proc) -> None:
    """After a test of a CLI started by popen_cli: the CLI and every process of its
    session (its local Ray) are gone."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    kill_processes(session_processes(proc.pid))


def solver_processes(root_pid: int) -> list[Proc]:
    """`ray::…SolverActor…` worker processes among the descendants of `root_pid`."""
    return [p for p in descendants(root_pid) if p.cmdline.startswith("ray::") and "SolverActor" in p.cmdline]


def _address(hex_address: str) -> str:
    """An address of /proc/net/tcp{,6} ("0100007F:1F90") as "127.0.0.1:8080"."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]  # each 32-bit word is little-endian
    packed = b"".join(words)
    import ipaddress

    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return f"{ip}:{int(port, 16)}"


def listening_sockets(pids) -> set[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket that the processes `pids` hold."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A":  # TCP_LISTEN
                    listening[cols[9]] = _address(cols[1])
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in listening:
                found.add((pid, listening[link[8:-1]]))
    return found


def is_loopback(address: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(address.rsplit(":", 1)[0]).is_loopback


def run_cli_watching_sockets(*args, timeout: float = 600) -> tuple[subprocess.CompletedProcess, set]:
    """`run_cli(..., check=True)`, sampling the listening sockets of the CLI and all its
    descendants (its private Ray) every 0.2 s: returns the process and every (pid,
    command, address) seen."""
    import tempfile
    import time

    seen = set()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cli_args(*args), cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            assert time.monotonic() < deadline, "timed out"
            procs = {p.pid: p for p in [Proc(proc.pid), *descendants(proc.pid)]} if os.path.exists(f"/proc/{proc.pid}") else {}
            seen |= {(pid, procs[pid].cmdline[:80], address) for pid, address in listening_sockets(procs)}
            time.sleep(0.2)
        log.seek(0)
        output = log.read()
    assert proc.returncode == 0, output[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, ""), seen


def majority_class_miou(data: str, fmt: str, num_classes: int, scribbles: str = "") -> float:
    """The trivial baseline of the learning checks: val mIoU of predicting the train
    masks' most frequent class everywhere."""
    import numpy as np

    from shared.image_io import read_label
    from trainer.splits import load_split
    from trainer.metrics import confusion_matrix, miou

    counts = np.zeros(256, np.int64)
    for s in load_split(data, fmt, "train", scribbles):
        counts += np.bincount(read_label(s.mask_path).ravel(), minlength=256)
    majority = int(np.argmax(counts[:255]))
    conf = sum(confusion_matrix(np.full_like(m, majority), m, num_classes)
               for m in (read_label(s.mask_path) for s in load_split(data, fmt, "val", scribbles)))
    return miou(conf)[0]



def core_processes(sid: int) -> list:
    """A session's Ray processes but its dashboard and runtime-env agents, which leave on
    their own a while after their raylet (tens of seconds on a loaded machine)."""
    agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard/agent.py", "runtime_env/agent/main.py")
    return [p for p in session_processes(sid) if not any(a in p.cmdline for a in agents)]
