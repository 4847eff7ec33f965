"""Solve one snapshot shard part into a proposal shard (SPEC §6).

`solve_part` is the unit of work of the solver farm (`solver_service.farm`, which the
trainer's driver and the command line both use). It is a plain function of part
references (`shared.shard_store.Part`, which read and write themselves) and a
SolverConfig, so it runs the same on local disks and object stores.
"""
from __future__ import annotations

import os
import socket
import time

from shared import shards
from shared.config import SolverConfig
from shared.errors import UserError
from shared.image_io import read_image, read_label
from shared.shard_store import Part
from solver_service.alpha_expansion import solve


def default_solver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def solve_part(
    snapshot: Part,
    proposal: Part,
    cfg: SolverConfig,
    init: Part | None = None,
    solver_id: str = "",
) -> dict:
    """Solve every image of one snapshot part and write the proposal part atomically.

    Warm starts come from the proposal part `init` (matched by image_id) when it is
    given, exists, reads and belongs to the same run. The proposal carries the snapshot's
    run id and answers exactly its images (SPEC §6). Returns {"images", "seconds", "energy_sum", "iterations",
    "warm_starts", "part_uri", "snapshot_uri", "solver"}.
    """
    t0 = time.perf_counter()
    cfg.validate()
    solver_id = solver_id or default_solver_id()
    rows, run_id = snapshot.read_snapshots()
    inits = init.warm_starts(run_id) if init is not None else {}
    out = []
    for row in rows:
        image = read_image(row.image_uri)
        seeds = read_label(row.seeds_uri)
        if image.shape[:2] != (row.height, row.width):
            raise UserError(f"{row.image_uri}: image is {image.shape[:2]}, snapshot says {(row.height, row.width)}")
        if seeds.shape != (row.height, row.width):
            raise UserError(f"{row.seeds_uri}: seeds are {seeds.shape}, snapshot says {(row.height, row.width)}")
        init = inits.get(row.image_id)
        if init is not None and init.shape != seeds.shape:
            init = None
        try:
            res = solve(
                image, row.probs(), seeds, tr_weight=cfg.tr_weight, potts_weight=cfg.potts_weight,
                max_iter=cfg.max_iter, init=init, restrict_labels=cfg.restrict_labels,
                algorithm=cfg.algorithm,
            )
        except ValueError as e:
            raise UserError(f"{snapshot.uri}: image {row.image_id}: {e}") from None
        out.append(
            shards.Proposal(
                image_id=row.image_id, round=row.round, labels=res.labels, energy=res.energy,
                unary_energy=res.unary_energy, smooth_energy=res.smooth_energy,
                iterations=res.iterations, seconds=res.seconds, warm_start=init is not None,
                solver=solver_id, changed=res.changed,
            )
        )
    proposal.write(out, run_id)
    return {
        "images": len(out),
        "seconds": time.perf_counter() - t0,
        "energy_sum": float(sum(p.energy for p in out)),
        "iterations": int(sum(p.iterations for p in out)),
        "warm_starts": int(sum(p.warm_start for p in out)),
        "changed_sum": float(sum(p.changed for p in out)),
        "part_uri": proposal.uri,
        "snapshot_uri": snapshot.uri,
        "solver": solver_id,
    }
