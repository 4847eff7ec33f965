"""The solver farm: Ray actors that turn snapshot shards into proposal shards.

A thin Ray layer over `solver_service.parts.solve_part`. Each round is one Ray Data
job over the round's part files, mapped by an autoscaling pool of `SolverActor`s
(`ActorPoolStrategy(MIN, MAX)`). Each actor asks for one CPU, the memory stage A
needs on the data set's largest image (`solver_memory`) and, in a cluster, a custom
resource that only solver nodes advertise.

Failures, all bounded: Ray restarts a dead actor and retries its part up to
`Pool.retries` times (a killed process or a lost node costs time, no image); past that
the round ends with an error naming the parts left, unless that pass wrote proposals
for other parts: then a new pass solves the rest (a node lost without notice can use up
the retries before the autoscaler replaces it). A pool that cannot place its
first actor within `Pool.wait_s` ends it with an error naming what each actor asks
for. Bad input (`UserError`) fails the same way every time: no retry. The `Farm`
thread reports its own death to the trainer (a marker in the store) and to the
driver (`on_error`), which stops training.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass

import ray

from shared.config import SolverConfig, from_dict, to_dict
from shared.errors import UserError
from shared.shard_store import PartJob, ShardStore
from solver_service.parts import solve_part

SNAPSHOT_POLL_S = 0.2  # first wait of an idle farm, doubled up to MAX_POLL_S
MAX_POLL_S = 1.0
RECHECK_S = 30.0  # how long a finished round is not listed again
# a round that made no progress (every part left is an unreadable snapshot) is tried again
# after this, doubled up to MAX_RETRY_S: each try lists and reads back its proposal parts
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 8.0  # above the trainer's 5 s between rewrites of an unreadable snapshot
MAX_STORAGE_WAIT_S = 30.0  # longest wait between tries while storage fails
STORAGE_ERROR = "storage: "  # an actor's error row for a storage failure (not bad input)
# Peak memory of stage A above the process, measured by benchmarks/solver_memory.py:
# 115 / 171 MB at 375×500 with |L| = 2 / 21, 788 MB / 1.08 GB at 1000×1000.
SOLVER_BYTES_PER_PIXEL = 900
SOLVER_BYTES_PER_PIXEL_LABEL = 16
WORKER_BYTES = 300 * 2**20  # a Ray worker with numpy, pyarrow and GCO loaded


def solver_memory(pixels: int, num_classes: int) -> int:
    """Bytes a solver actor asks Ray for: the process plus stage A on an image of
    `pixels` pixels over all K labels, with a quarter to spare."""
    return WORKER_BYTES + math.ceil(1.25 * pixels * (SOLVER_BYTES_PER_PIXEL + SOLVER_BYTES_PER_PIXEL_LABEL * num_classes))


@dataclass
class Pool:
    """Where and how the solver actors run."""

    solvers: tuple[int, int] = (1, 1)  # MIN, MAX actors
    resource: str | None = None  # custom resource that solver nodes advertise
    memory: int | None = None  # bytes per actor (solver_memory)
    retries: int = 3  # restarts of an actor and retries of its part
    wait_s: float = 600.0  # for the first actor to be placed

    def demand(self) -> str:
        """What one actor asks for, in words."""
        wants = ["1 CPU"]
        if self.memory:
            wants.append(f"{self.memory / 2**20:.0f} MiB of memory")
        if self.resource:
            wants.append(f"1 {self.resource!r}")
        return ", ".join(wants)


class SolverActor:
    """One stage-A worker process: solves whole snapshot parts, one per call."""

    def __init__(self, solver: dict):
        self.cfg = from_dict(SolverConfig, solver)
        self.name = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
        self.node_id = ray.get_runtime_context().get_node_id()  # unique even when nodes share an IP

    def __call__(self, batch: dict) -> dict:
        out = {"k": [], "images": [], "seconds": [], "warm_starts": [], "changed_sum": [], "solver": [], "node_id": [],
               "error": []}
        for job in batch["job"]:
            try:
                stats = solve_part(job.snapshot, job.proposal, self.cfg, job.init, self.name)
                out["error"].append("")
            except UserError as e:  # bad input fails the same way every time: report it, no retry
                stats = {"images": 0, "seconds": 0.0, "warm_starts": 0, "changed_sum": 0.0}
                out["error"].append(str(e))
            except OSError as e:  # storage still failing after storage.retried: the farm waits it out
                stats = {"images": 0, "seconds": 0.0, "warm_starts": 0, "changed_sum": 0.0}
                out["error"].append(STORAGE_ERROR + f"{type(e).__name__}: {e}")
            out["k"].append(job.snapshot.k)
            out["images"].append(stats["images"])
            out["seconds"].append(stats["seconds"])
            out["warm_starts"].append(stats["warm_starts"])
            out["changed_sum"].append(stats["changed_sum"])
            out["solver"].append(self.name)
            out["node_id"].append(self.node_id)
        return out


def solve_parts(jobs: list[PartJob], solver: SolverConfig, pool: Pool):
    """Stage A for a list of parts on an autoscaling pool of SolverActors; yields one
    stats row per part as it finishes. Each job rides in a one-column row ("job"), as
    one pickled object: a column of its own for the warm start would lose None (a
    block of None alone is a null column, which numpy batches read as NaN)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts images
    # and Ray Data's own lines per round (plan, start, end, "bars disabled"): the farm
    # prints one line a round with what users read (images, seconds, labels changed)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    context.wait_for_min_actors_s = max(1, math.ceil(pool.wait_s))
    context.enable_fallback_to_arrow_object_ext_type = True  # the "job" column is pickled objects: by choice, no warning
    with warnings.catch_warnings():
        # Ray Data restarts map actors and retries their tasks without limit unless
        # max_restarts/max_task_retries are passed as extra remote args, which Ray 2.60
        # warns are deprecated but offers no named parameter for.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ray.data.from_items([{"job": job} for job in jobs], override_num_blocks=len(jobs)).map_batches(
            SolverActor,
            fn_constructor_kwargs={"solver": to_dict(solver)},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=pool.solvers[0], max_size=max(pool.solvers)),
            num_cpus=1,
            memory=pool.memory,
            resources={pool.resource: 1} if pool.resource else None,
            max_restarts=pool.retries,
            max_task_retries=pool.retries,
        )
    try:
        for row in ds.iter_rows():
            if row["error"].startswith(STORAGE_ERROR):
                raise OSError(row["error"][len(STORAGE_ERROR):])
            if row["error"]:
                raise UserError(row["error"])
            yield row
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"no solver actor could be placed within {pool.wait_s:g}s (--solver-wait): each asks for "
                        f"{pool.demand()}, and the cluster has {_free()} free") from None


def _free() -> str:
    free = ray.available_resources()
    return ", ".join(f"{v / 2**20:.0f} MiB {k}" if k == "memory" else f"{v:g} {k}" for k, v in sorted(free.items())
                     if k in ("CPU", "GPU", "memory") or not k.startswith(("node:", "object_store", "accelerator")))


def solve_round(store: ShardStore, r: int, solver: SolverConfig, pool: Pool, n_images: int | None = None,
                warn=print) -> list[dict]:
    """Stage A for every part of snapshot round r that lacks a (readable, this run's)
    proposal; blocks. Then commits the round's proposals (its manifest names every
    part solved, with the image ids of the snapshot manifest).

    A snapshot part that does not read (or is another run's) is reported through `warn`
    and left alone: the trainer writes it again, and the farm solves it then. Parts
    that still kill their solver after `pool.retries` retries end the round with a
    UserError naming them. A progress bar (images solved, images/s, ETA) is drawn when
    stdout is a terminal.
    """
    from tqdm import tqdm

    bar = tqdm(total=n_images, desc=f"stage A round {r}", unit="img", disable=not sys.stdout.isatty())
    rows = []
    while True:  # every pass re-checks: a truncated proposal (e.g. left by an earlier run) is solved again
        todo = store.unsolved(r, verify=True)
        for k, e in (store.unreadable("snapshots", r, only=todo) if todo else {}).items():  # each a GET: only those to solve
            warn(f"warning: {e}; not solved until the trainer writes it again")
            todo.pop(k, None)
        if not todo:
            break
        jobs = store.jobs(r, todo)
        try:
            for row in solve_parts(jobs, solver, pool):
                rows.append(row)
                bar.update(row["images"])
        except (UserError, OSError):  # bad input; storage, which the farm waits out (not a solver death)
            raise
        except Exception as e:  # Ray gave up on a part: its solver died more than pool.retries times
            left = sorted(store.unsolved(r))
            if len([k for k in left if k in todo]) < len(todo):
                # A node lost without notice uses up a part's retries while its actor cannot
                # restart (no node for it until the autoscaler adds one): while passes solve
                # parts, a new pass (a new actor pool, on the nodes alive then) solves the rest.
                # A part that kills every solver fails a pass that solves nothing, and ends it.
                warn(f"stage A round {r}: {type(e).__name__} with {len(left)} part(s) left; solving them again")
                continue
            raise UserError(f"stage A round {r}: part(s) {left} still unsolved after {pool.retries} solver restarts "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"snapshots: {', '.join(todo[k].uri for k in left if k in todo)}") from None
    bar.close()
    snapshots = store.manifest("snapshots", r)
    if snapshots is not None:
        solved = store.parts("proposals", r)
        store.commit("proposals", r, {k: ids for k, ids in snapshots.image_ids().items() if k in solved})
    return rows


def solver_restarts() -> int:
    """Restarts of solver actors so far, from the GCS actor table.

    `ray.util.state` would need the dashboard, which local mode does not start; the
    GCS table that it reads is available on every driver.
    """
    from ray._private import state

    return sum(
        int(a.get("NumRestarts", 0)) for a in state.actors().values() if "SolverActor" in a.get("ActorClassName", "")
    )


class Farm(threading.Thread):
    """Runs in the driver beside the trainer: solves each snapshot round once it is whole.

    `on_error()` is called if the thread dies (after the failure marker is written, if
    storage allows): the driver uses it to stop the trainer."""

    def __init__(self, store: ShardStore, n_parts: int, solver: SolverConfig, pool: Pool,
                 on_round=None, on_error=None, n_images: int | None = None, storage_patience_s: float = 300.0):
        super().__init__(name="solver-farm", daemon=True)
        self.store, self.n_parts, self.solver, self.pool = store, n_parts, solver, pool
        self.n_images = n_images
        self.storage_patience_s = storage_patience_s  # --storage-patience
        self._retry_at: dict[int, tuple[float, float]] = {}  # round without progress: (next try, wait)
        self.on_round = on_round or (lambda r, rows, seconds: None)
        self.on_error = on_error or (lambda: None)
        self.stop_event = threading.Event()
        self.abandoned = False  # the driver stopped waiting for it (finish timed out)
        self.error: BaseException | None = None
        self.images = 0
        self._warned: set[str] = set()
        self._finished: set[int] = set()  # rounds with every proposal part committed, as last read
        self._checked = time.monotonic()

    def pending(self) -> list[int]:
        """Committed snapshot rounds whose proposals are not all committed, oldest first.
        The trainer commits rounds in order, so an idle poll reads one manifest: that of
        the round after the last one seen. Rounds found finished are not read again for
        RECHECK_S; then all are, for a proposal the trainer found corrupt (it deletes the
        part and its round's manifest)."""
        if time.monotonic() - self._checked > RECHECK_S:
            self._finished, self._checked = set(), time.monotonic()
        pending, r = [], 0
        while True:
            if r not in self._finished:
                snapshots = self.store.manifest("snapshots", r)
                if snapshots is None:
                    return pending
                if self.store.solved(r, snapshots):
                    self._finished.add(r)
                else:
                    pending.append(r)
            r += 1

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            print(message, flush=True)

    def _solve_next(self) -> bool:
        """Solve the first pending round that can progress; whether one did."""
        for r in self.pending():  # a round blocked on unreadable snapshots lets later ones pass
            if r in self._retry_at and time.monotonic() < self._retry_at[r][0]:
                continue
            start = time.perf_counter()
            rows = solve_round(self.store, r, self.solver, self.pool, self.n_images, self._warn_once)
            if rows:
                self._retry_at.pop(r, None)
                self.images += sum(row["images"] for row in rows)
                self.on_round(r, rows, time.perf_counter() - start)
                return True  # list the rounds again: newer ones may be whole by now
            wait = min(2 * self._retry_at[r][1], MAX_RETRY_S) if r in self._retry_at else FIRST_RETRY_S
            self._retry_at[r] = (time.monotonic() + wait, wait)
        return False

    def _solve_next_waiting_out_storage(self) -> bool:
        """`_solve_next`, riding out storage errors (an S3 outage, a lost mount) with backoff
        for up to storage_patience_s; past it the last one is raised."""
        first_failure, wait = None, SNAPSHOT_POLL_S
        while True:
            try:
                return self._solve_next()
            except UserError:
                raise
            except OSError as e:
                first_failure = first_failure or time.monotonic()
                left = self.storage_patience_s - (time.monotonic() - first_failure)
                if left <= 0:
                    raise OSError(f"storage failing for over {self.storage_patience_s:g}s (--storage-patience): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
                wait = min(2 * wait, MAX_STORAGE_WAIT_S, left)
                print(f"warning: stage A: storage error ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                      f"trying again in {wait:.1f}s ({left:.0f}s of --storage-patience left)", flush=True)
                if self.stop_event.wait(wait):
                    return False

    def run(self) -> None:
        idle_s = SNAPSHOT_POLL_S
        try:
            while True:
                solved = self._solve_next_waiting_out_storage()
                if solved:
                    idle_s = SNAPSHOT_POLL_S
                else:
                    if self.stop_event.is_set():
                        return
                    self.stop_event.wait(idle_s)
                    idle_s = min(2 * idle_s, MAX_POLL_S)  # an idle farm polls ever less often
        except (KeyboardInterrupt, SystemExit):  # Ray's ^C handling ends the process: not a stage-A failure
            return
        except BaseException as e:
            if self.abandoned:  # after ^C the driver shuts Ray down under the round it was solving
                return
            self.error = e
            traceback.print_exc()
            try:  # tell the trainer, which would otherwise wait for proposals
                self.store.mark_failed(f"{type(e).__name__}: {e}")
            except Exception as marker_error:
                print(f"warning: could not write the failure marker: {marker_error}", flush=True)
            self.on_error()

    def finish(self, timeout_s: float | None = None) -> None:
        """Solve what is left (waiting at most `timeout_s`), then stop; past the timeout the
        farm is left behind, and what then fails in it (its Ray shut down) is no failure."""
        self.stop_event.set()
        self.join(timeout_s)
        self.abandoned = self.is_alive()
