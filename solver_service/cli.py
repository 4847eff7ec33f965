"""`python -m solver_service solve`: stage A for one round of snapshots (SPEC §8)."""
from __future__ import annotations

import os
import sys

import click

from shared.config import ALGORITHMS, SolverConfig
from shared.errors import UserError


@click.group()
def cli() -> None:
    """The stage-A solver farm (α-expansion on the SPEC §1 energy)."""


@cli.command()
@click.option("--snapshots", required=True, help="snapshot round folder, e.g. BASE/snapshots/round=3")
@click.option("--out", required=True, help="proposal round folder, e.g. BASE/proposals/round=3")
@click.option("--workers", type=int, default=None, help="solver processes [default: CPU count]")
@click.option("--init", "init", default=None, help="proposal round folder to warm-start from")
@click.option("--tr-weight", type=float, default=SolverConfig.tr_weight, show_default=True, help="λ")
@click.option("--potts-weight", type=float, default=SolverConfig.potts_weight, show_default=True, help="β")
@click.option("--max-iter", type=int, default=SolverConfig.max_iter, show_default=True)
@click.option("--restrict-labels/--all-labels", default=True, show_default=True)
@click.option("--algorithm", default="expansion", show_default=True, help=f"one of {', '.join(ALGORITHMS)}")
def solve(snapshots, out, workers, init, tr_weight, potts_weight, max_iter, restrict_labels, algorithm):
    """Solve every part of a snapshot round into proposals."""
    from solver_service.parts import solve_round

    cfg = SolverConfig(tr_weight=tr_weight, potts_weight=potts_weight, max_iter=max_iter,
                       restrict_labels=restrict_labels, algorithm=algorithm)
    if workers is None:
        workers = os.cpu_count() or 1
    try:
        if workers < 1:
            raise UserError(f"--workers: must be ≥ 1, got {workers}")
        cfg.validate()
        s = solve_round(snapshots, out, cfg, workers, init_round_uri=init)
    except (UserError, ValueError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(
        f"solved {s['images']} images in {s['parts']} parts ({s['skipped_parts']} already done, "
        f"{s['warm_starts']} warm-started) in {s['seconds']:.2f} s, {s['images_per_s']:.2f} images/s -> {out}"
    )


def main() -> None:
    cli(prog_name="python -m solver_service")
