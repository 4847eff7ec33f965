"""Solve one snapshot shard part (or a whole round) into a proposal shard (SPEC §6).

`solve_part` is the unit of work of the solver farm: the command line's process pool
and the Ray solver actors both call it. It is a plain function of URIs and a
SolverConfig, so it runs the same on local disks and object stores.
"""
from __future__ import annotations

import io
import os
import socket
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
import multiprocessing as mp

import numpy as np
from PIL import Image

from shared import shards, storage
from shared.config import SolverConfig
from shared.errors import CorruptShardError, UserError
from solver_service.alpha_expansion import solve


def load_rgb(uri: str) -> np.ndarray:
    """An image file as H×W×3 uint8 RGB."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise UserError(f"{uri}: cannot read image ({e})") from None


def load_label_png(uri: str) -> np.ndarray:
    """A label PNG (palette or grey) as H×W uint8: the pixel value is the class id."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
            if im.mode in ("P", "L"):
                arr = np.asarray(im)
            elif im.mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.asarray(im).astype(np.int64)
                if arr.min() < 0 or arr.max() > 255:
                    raise ValueError(f"label values outside 0..255 in mode {im.mode}")
            else:
                raise ValueError(f"expected a palette or grey label image, got mode {im.mode}")
            return np.ascontiguousarray(arr, np.uint8)
    except (OSError, ValueError) as e:
        raise UserError(f"{uri}: cannot read label image ({e})") from None


def _warm_starts(init_uri: str | None) -> dict[str, np.ndarray]:
    if not init_uri or not storage.exists(init_uri):
        return {}
    try:
        return {p.image_id: p.labels for p in shards.read_proposals(init_uri)}
    except CorruptShardError as e:  # a warm start is an optimisation: solve cold
        warnings.warn(f"ignoring warm starts: {e}")
        return {}


def default_solver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def solve_part(
    snapshot_uri: str,
    proposal_uri: str,
    cfg: SolverConfig,
    init_uri: str | None = None,
    solver_id: str = "",
) -> dict:
    """Solve every image of one snapshot part and write the proposal part atomically.

    Warm starts come from the proposal part at `init_uri` (matched by image_id) when
    it is given and exists. Returns {"images", "seconds", "energy_sum", "iterations",
    "warm_starts", "part_uri", "snapshot_uri", "solver"}.
    """
    t0 = time.perf_counter()
    cfg.validate()
    solver_id = solver_id or default_solver_id()
    rows = shards.read_snapshots(snapshot_uri)
    inits = _warm_starts(init_uri)
    out = []
    for row in rows:
        image = load_rgb(row.image_uri)
        seeds = load_label_png(row.seeds_uri)
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
            raise UserError(f"{snapshot_uri}: image {row.image_id}: {e}") from None
        out.append(
            shards.Proposal(
                image_id=row.image_id, round=row.round, labels=res.labels, energy=res.energy,
                unary_energy=res.unary_energy, smooth_energy=res.smooth_energy,
                iterations=res.iterations, seconds=res.seconds, warm_start=init is not None,
                solver=solver_id, changed=res.changed,
            )
        )
    shards.write_table(shards.proposals_table(out), proposal_uri)
    return {
        "images": len(out),
        "seconds": time.perf_counter() - t0,
        "energy_sum": float(sum(p.energy for p in out)),
        "iterations": int(sum(p.iterations for p in out)),
        "warm_starts": int(sum(p.warm_start for p in out)),
        "changed_sum": float(sum(p.changed for p in out)),
        "part_uri": proposal_uri,
        "snapshot_uri": snapshot_uri,
        "solver": solver_id,
    }


def _solve_part_safe(*args) -> dict:
    # Exceptions cross the process boundary by pickling; CorruptShardError's
    # constructor does not survive that, so send every user error as a UserError.
    try:
        return solve_part(*args)
    except UserError as e:
        raise UserError(str(e)) from None


def _done(uri: str) -> bool:
    if not storage.exists(uri):
        return False
    try:
        shards.read_proposals(uri)
        return True
    except CorruptShardError:
        return False


def solve_round(
    snapshot_round_uri: str,
    proposal_round_uri: str,
    cfg: SolverConfig,
    workers: int,
    init_round_uri: str | None = None,
    progress: bool = True,
) -> dict:
    """Solve every part of a snapshot round with a process pool.

    Parts whose proposal file already exists and reads fine are skipped; the proposal
    part keeps the snapshot part's index and file format. Warm starts come from the
    same part index of `init_round_uri` when given.
    """
    t0 = time.perf_counter()
    cfg.validate()
    if workers < 1:
        raise UserError(f"--workers: must be ≥ 1, got {workers}")
    if not storage.exists(snapshot_round_uri):
        raise UserError(f"{snapshot_round_uri}: no such snapshot folder")
    parts = shards.list_parts(snapshot_round_uri)
    if not parts:
        raise UserError(f"{snapshot_round_uri}: no snapshot parts (part-K.parquet|arrow) in this folder")
    inits = shards.list_parts(init_round_uri) if init_round_uri else {}
    todo, skipped = [], 0
    for k, uri in sorted(parts.items()):
        ext = uri.split("?", 1)[0].rsplit(".", 1)[1]
        out = storage.join(proposal_round_uri, f"part-{k}.{ext}")
        if _done(out):
            skipped += 1
            continue
        todo.append((uri, out, cfg, inits.get(k), ""))

    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="part", disable=not (progress and sys.stderr.isatty()))
    stats = []
    try:
        if workers == 1 or len(todo) <= 1:
            for args in todo:
                stats.append(_solve_part_safe(*args))
                bar.update()
        else:
            ctx = mp.get_context("spawn")  # no fork of a process with pyarrow threads
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
                futures = [pool.submit(_solve_part_safe, *args) for args in todo]
                try:
                    for fut in as_completed(futures):
                        stats.append(fut.result())
                        bar.update()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    images = sum(s["images"] for s in stats)
    return {
        "images": images,
        "parts": len(stats),
        "skipped_parts": skipped,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "energy_sum": float(sum(s["energy_sum"] for s in stats)),
        "warm_starts": sum(s["warm_starts"] for s in stats),
        "out": proposal_round_uri,
    }
