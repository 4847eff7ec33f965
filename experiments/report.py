"""`python -m trainer report RUN_DIR`: what a finished (or still running) run did, read
from its folder alone, and its pictures drawn if they are missing.

RUN_DIR is a training run (`train`'s --out: config.toml, metrics.jsonl, summary.json
when finished) or a default job's folder (its cells pce-init, pce and grid-tr).
"""
from __future__ import annotations

import json

from shared import storage
from shared.errors import UserError
from trainer.run_folder import RunFolder
from experiments.pictures import read_config, read_metrics, write_job_pictures

DEFAULT_JOB_CELLS = {"PCE-GD start": "pce-init", "PCE-GD": "pce", "Grid-TR": "grid-tr"}


def run_summary(run: str) -> list[str]:
    """Lines on one run: its configuration, val mIoU (best, last), stage-A rounds with the
    proposals' quality, and where the wall time went."""
    cfg = read_config(run)
    records = read_metrics(run)
    summary_uri = RunFolder(run).summary
    summary = json.loads(storage.read_bytes(summary_uri)) if storage.exists(summary_uri) else None
    total = cfg.epochs + (cfg.pretrain_epochs if cfg.pretrains() else 0)
    state = "finished" if summary else f"not finished: {len(records)} of {total} epochs in metrics.jsonl"
    lines = [f"{run}: {cfg.method}, {state}",
             f"  data {cfg.data} ({cfg.format}, scribbles {cfg.scribbles or 'full'}), arch {cfg.arch or 'default'}, "
             f"{cfg.optimizer} lr {cfg.lr}, batch {cfg.batch_size}, crop {cfg.crop_size}, seed {cfg.seed}"]
    evaluated = [r for r in records if "val_miou" in r]
    if evaluated:
        best = max(evaluated, key=lambda r: r["val_miou"])
        lines.append(f"  val mIoU: last {100 * evaluated[-1]['val_miou']:.1f} (epoch {evaluated[-1]['epoch']}), "
                     f"best {100 * best['val_miou']:.1f} (epoch {best['epoch']})")
    rounds: dict[int, dict] = {}
    for r in records:
        if "round" in r:
            rounds.setdefault(r["round"], r)
    for k, r in rounds.items():
        quality = [f"{100 * r['proposal_changed']:.1f}% of labels changed from the network"] if "proposal_changed" in r else []
        if "proposal_miou" in r:
            quality.append(f"mIoU vs masks {100 * r['proposal_miou']:.1f}")
        lines.append(f"  stage-A round {k} (from epoch {r['epoch']}): {', '.join(quality) or 'no proposals yet'}")
    snapshot_s = sum(r.get("snapshot_s", 0.0) for r in records)
    stage_b_s = sum(r.get("stage_b_s", 0.0) for r in records)
    stall_s = sum(r.get("stall_s", 0.0) for r in records)
    wall = f"wall {summary['wall_s']:.0f} s: " if summary else "so far: "
    lines.append(f"  {wall}stage B {stage_b_s:.0f} s, waiting for stage A {stall_s:.0f} s, snapshot passes {snapshot_s:.0f} s")
    return lines


def report(run_dir: str) -> list[str]:
    """The report's lines for RUN_DIR; comparison.png and curves.png written where missing."""
    job = {name: storage.join(run_dir, cell) for name, cell in DEFAULT_JOB_CELLS.items()}
    if all(storage.exists(RunFolder(run).config) for run in job.values()):
        cells, pretrained, proposals_from = job, "PCE-GD start", "Grid-TR"
    elif storage.exists(RunFolder(run_dir).config):
        method = read_config(run_dir).method
        cells, pretrained, proposals_from = {method: run_dir}, None, method
    else:
        raise UserError(f"{run_dir}: not a run folder (no config.toml) nor a default job's (no pce-init, pce, grid-tr)")
    lines = [line for run in cells.values() for line in run_summary(run)]
    pictures = {name: storage.join(run_dir, f"{name}.png") for name in ("comparison", "curves")}
    have_weights = all(storage.exists(RunFolder(run).last) for run in cells.values())
    if not all(storage.exists(p) for p in pictures.values()) and have_weights:
        write_job_pictures(run_dir, cells, pretrained=pretrained, proposals_from=proposals_from)
    lines += [f"pictures: {p}" for p in pictures.values() if storage.exists(p)]
    return lines
