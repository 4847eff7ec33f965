"""`python -m solver_service solve`: stage A for one round of snapshots (SPEC §8)."""
from __future__ import annotations

import os
import sys
import time

import click

from shared import storage
from shared.config import ALGORITHMS, SolverConfig
from shared.errors import CorruptShardError, UserError
from shared.shard_store import PartJob, ShardStore, folder_jobs


@click.group()
def cli() -> None:
    """The stage-A solver farm (α-expansion on the SPEC §1 energy)."""


@cli.command()
@click.option("--snapshots", required=True, help=f"snapshot round folder, e.g. {ShardStore('BASE').round_dir('snapshots', 3)}")
@click.option("--out", required=True, help=f"proposal round folder, e.g. {ShardStore('BASE').round_dir('proposals', 3)}")
@click.option("--workers", type=int, default=None, help="solver actors on a private Ray [default: CPU count]")
@click.option("--init", "init", default=None, help="proposal round folder to warm-start from")
@click.option("--tr-weight", type=float, default=SolverConfig.tr_weight, show_default=True, help="λ")
@click.option("--potts-weight", type=float, default=SolverConfig.potts_weight, show_default=True, help="β")
@click.option("--max-iter", type=int, default=SolverConfig.max_iter, show_default=True)
@click.option("--restrict-labels/--all-labels", default=True, show_default=True)
@click.option("--algorithm", default="expansion", show_default=True, help=f"one of {', '.join(ALGORITHMS)}")
def solve(snapshots, out, workers, init, tr_weight, potts_weight, max_iter, restrict_labels, algorithm):
    """Solve every part of a snapshot round into proposals (parts already solved are kept)."""
    cfg = SolverConfig(tr_weight=tr_weight, potts_weight=potts_weight, max_iter=max_iter,
                       restrict_labels=restrict_labels, algorithm=algorithm)
    if workers is None:
        workers = os.cpu_count() or 1
    try:
        if workers < 1:
            raise UserError(f"--workers: must be ≥ 1, got {workers}")
        cfg.validate()
        jobs, done = plan_folder(snapshots, out, init)
        t0 = time.perf_counter()
        rows = []
        if jobs:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # 127.0.0.1 only, before Ray starts
            from shared.ray_session import connect
            from solver_service.farm import Pool, solve_parts

            connect(None, num_cpus=workers, quiet=True)
            rows = list(solve_parts(jobs, cfg, Pool(solvers=(1, min(workers, len(jobs))))))
        seconds = time.perf_counter() - t0
    except (UserError, ValueError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    images = sum(int(r["images"]) for r in rows)
    click.echo(
        f"solved {images} images in {len(rows)} parts ({done} already done, "
        f"{sum(int(r['warm_starts']) for r in rows)} warm-started) in {seconds:.2f} s, "
        f"{images / seconds if seconds > 0 else 0.0:.2f} images/s -> {out}"
    )


def plan_folder(snapshot_dir: str, proposal_dir: str, init_dir: str | None) -> tuple[list[PartJob], int]:
    """The parts of a snapshot round folder to solve into `proposal_dir`
    (`shard_store.folder_jobs`), and how many are done already."""
    if not storage.exists(snapshot_dir):
        raise UserError(f"{snapshot_dir}: no such snapshot folder")
    jobs = folder_jobs(snapshot_dir, proposal_dir, init_dir)
    if not jobs:
        raise UserError(f"{snapshot_dir}: no snapshot parts (part-K.parquet|arrow) in this folder")
    todo = []
    for job in jobs:
        job.snapshot.check()  # a corrupt part is named before any solver starts
        try:
            job.proposal.check()  # solved already
        except (CorruptShardError, FileNotFoundError):
            todo.append(job)
    return todo, len(jobs) - len(todo)


def main() -> None:
    cli(prog_name="python -m solver_service")
