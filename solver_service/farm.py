"""The solver farm: Ray actors that turn snapshot shards into proposal shards.

A thin Ray layer over `solver_service.parts.solve_part`. Each round is one Ray Data
job over the round's part files, mapped by an autoscaling pool of `SolverActor`s
(`ActorPoolStrategy(MIN, MAX)`). Ray restarts a dead actor and retries its task
(Ray Data sets max_restarts=-1 and max_task_retries=-1 on map actors), so a killed
process or a lost node costs time but no image. Each actor asks for one CPU and, in a
cluster, a custom resource that only solver nodes advertise.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import ray

from shared.config import SolverConfig, from_dict, to_dict
from shared.errors import UserError
from shared.shard_store import ShardStore
from solver_service.parts import solve_part

SNAPSHOT_POLL_S = 0.2


class SolverActor:
    """One stage-A worker process: solves whole snapshot parts, one per call."""

    def __init__(self, solver: dict):
        self.cfg = from_dict(SolverConfig, solver)
        self.name = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
        self.node_id = ray.get_runtime_context().get_node_id()  # unique even when nodes share an IP

    def __call__(self, batch: dict) -> dict:
        out = {"k": [], "images": [], "seconds": [], "warm_starts": [], "changed_sum": [], "solver": [], "node_id": [],
               "error": []}
        for k, snapshot, proposal, init in zip(batch["k"], batch["snapshot"], batch["proposal"], batch["init"]):
            try:
                stats = solve_part(str(snapshot), str(proposal), self.cfg, str(init) or None, self.name)
                out["error"].append("")
            except UserError as e:  # bad input fails the same way every time: report it, no retry
                stats = {"images": 0, "seconds": 0.0, "warm_starts": 0, "changed_sum": 0.0}
                out["error"].append(str(e))
            out["k"].append(int(k))
            out["images"].append(stats["images"])
            out["seconds"].append(stats["seconds"])
            out["warm_starts"].append(stats["warm_starts"])
            out["changed_sum"].append(stats["changed_sum"])
            out["solver"].append(self.name)
            out["node_id"].append(self.node_id)
        return out


def solve_parts(items: list[dict], solver: SolverConfig, solvers: tuple[int, int], resource: str | None = None):
    """Stage A for a list of parts ({"k", "snapshot", "proposal", "init"} URIs) on an
    autoscaling pool of SolverActors; yields one stats row per part as it finishes."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        SolverActor,
        fn_constructor_kwargs={"solver": to_dict(solver)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=solvers[0], max_size=max(solvers)),
        num_cpus=1,
        resources={resource: 1} if resource else None,
    )
    for row in ds.iter_rows():
        if row["error"]:
            raise UserError(row["error"])
        yield row


def solve_round(store: ShardStore, r: int, solver: SolverConfig, solvers: tuple[int, int], resource: str | None = None,
                n_images: int | None = None) -> list[dict]:
    """Stage A for every part of snapshot round r that lacks a (readable) proposal; blocks.

    A snapshot part that does not read is reported with its path and left alone: the
    trainer rewrites it, and the farm solves it then. A progress bar (images solved,
    images/s, ETA) is drawn when stdout is a terminal.
    """
    from tqdm import tqdm

    bar = tqdm(total=n_images, desc=f"stage A round {r}", unit="img", disable=not sys.stdout.isatty())
    rows = []
    while True:  # every pass re-checks: a truncated proposal (e.g. left by an earlier run) is solved again
        todo = store.unsolved(r, verify=True)
        for k, e in store.unreadable("snapshots", r).items():
            print(f"warning: {e}; not solved until the trainer rewrites it", flush=True)
            todo.pop(k, None)
        if not todo:
            break
        items = [{"k": k, "snapshot": uri, "proposal": store.part_uri("proposals", r, k), "init": store.warm_start(r, k)}
                 for k, uri in sorted(todo.items())]
        for row in solve_parts(items, solver, solvers, resource):
            rows.append(row)
            bar.update(row["images"])
    bar.close()
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
    """Runs in the driver beside the trainer: solves each snapshot round once it is whole."""

    def __init__(self, store: ShardStore, n_parts: int, solver: SolverConfig, solvers: tuple[int, int],
                 resource: str | None = None, on_round=None, n_images: int | None = None):
        super().__init__(name="solver-farm", daemon=True)
        self.store, self.n_parts, self.solver, self.solvers, self.resource = store, n_parts, solver, solvers, resource
        self.n_images = n_images
        self.on_round = on_round or (lambda r, rows, seconds: None)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.images = 0

    def next_round(self) -> int | None:
        for r in self.store.rounds("snapshots"):
            if self.store.round_complete("snapshots", r, self.n_parts) and self.store.unsolved(r):
                return r
        return None

    def run(self) -> None:
        try:
            while True:
                r = self.next_round()
                if r is None:
                    if self.stop_event.is_set():
                        return
                    time.sleep(SNAPSHOT_POLL_S)
                    continue
                start = time.perf_counter()
                rows = solve_round(self.store, r, self.solver, self.solvers, self.resource, self.n_images)
                self.images += sum(row["images"] for row in rows)
                if not rows:  # only unreadable snapshots left: wait for the trainer to rewrite them
                    if self.stop_event.is_set():
                        return
                    time.sleep(SNAPSHOT_POLL_S)
                    continue
                self.on_round(r, rows, time.perf_counter() - start)
        except BaseException as e:  # tell the trainer, which would otherwise wait forever
            self.error = e
            self.store.mark_failed(f"{type(e).__name__}: {e}")
            traceback.print_exc()

    def finish(self) -> None:
        """Solve what is left, then stop."""
        self.stop_event.set()
        self.join()
