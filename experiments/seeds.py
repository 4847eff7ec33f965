"""How much the seed moves each figure: several Table 1 runs that differ only in their
training seed (`table1 --seed N --out DIR`), read back from their cells' summary.json
and metrics.jsonl and written as one table.

Per scribble length that the runs trained: every method's val mIoU in each run, their
mean and spread (max − min); Grid-TR's share of the PCE-GD → full-supervision gap,
(TR − PCE) / (full − PCE), per run and of the means; and Grid-TR's proposals per
stage-A round, per run: their mIoU against the training masks (where the data has
masks) and the share of unseeded pixels where stage A overrode the network's argmax.
"""
from __future__ import annotations

import json
import statistics

from shared import storage
from shared.errors import UserError
from trainer.methods import FULL_SUPERVISION, PCE, TRUST_REGION
from trainer.run_folder import RunFolder
from experiments.table1 import CONTROL, LABELS, LENGTHS, ROWS, cell_name


def read_run(out: str) -> dict:
    """{"seed", "dataset", "cells": {(method, length): summary}, "proposals": {length: [(mIoU, changed) per round]}}
    of one table1 run folder (a path or URI)."""
    cells, proposals, seed, dataset = {}, {}, None, None
    for method in ROWS:
        for length in (("1",) if method == FULL_SUPERVISION else LENGTHS):
            raw = storage.read_if_exists(RunFolder(storage.join(out, cell_name(method, length))).summary)
            if raw is None:
                continue
            s = json.loads(raw)
            cells[(method, length)] = s
            seed, dataset = s.get("seed", 0), s["dataset"]
            if method == TRUST_REGION:
                proposals[length] = proposal_quality_per_round(storage.join(out, cell_name(method, length)))
    if not cells:
        raise UserError(f"{out}: no finished Table 1 cell (no */summary.json): not a `table1 --out` folder")
    return {"seed": seed, "dataset": dataset, "cells": cells, "proposals": proposals}


def proposal_quality_per_round(run: str) -> list[tuple[float | None, float]]:
    """(mIoU against the masks or None, share of unseeded pixels changed) of each stage-A
    round's proposals: the values that the last epoch of round r trained on are round
    r's (under `overlapped` they appear an epoch into the round)."""
    raw = storage.read_if_exists(RunFolder(run).metrics)
    last = {}
    for line in (raw or b"").decode().splitlines():
        record = json.loads(line)
        if "proposal_changed" in record and "round" in record:
            last[record["round"]] = (record.get("proposal_miou"), record["proposal_changed"])
    return [last[r] for r in sorted(last)]


def _proposal_cell(miou: float | None, changed: float) -> str:
    return ("—" if miou is None else f"{100 * miou:.1f}") + f" / {100 * changed:.1f}%"


def gap_share(tr: float, pce: float, full: float) -> float | None:
    return (tr - pce) / (full - pce) if full > pce else None


def summarize(runs: list[dict]) -> str:
    """The markdown table of `runs` (read_run's), one section per scribble length."""
    datasets = {r["dataset"] for r in runs}
    if len(datasets) > 1:
        raise UserError(f"the runs trained on different data sets: {sorted(datasets)}")
    seeds = [r["seed"] for r in runs]
    lines = [f"# Table 1 over seeds {', '.join(map(str, seeds))}", "",
             f"Data set `{datasets.pop()}`; val mIoU × 100 per run (seed), their mean and spread (max − min).", ""]
    for length in LENGTHS:
        if not all(any(L == length for _, L in r["cells"]) for r in runs):
            continue
        lines += [f"## Scribble length {length}", "",
                  "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread |",
                  "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- |"]
        means = {}
        for method in ROWS:
            key = (method, "1" if method == FULL_SUPERVISION else length)
            values = [r["cells"][key]["val_miou"] for r in runs if key in r["cells"]]
            if len(values) < len(runs):
                continue
            means[method] = statistics.fmean(values)
            label = "PCE-GD continued (same-budget control)" if method == CONTROL else LABELS[method]
            lines.append(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in values)
                         + f" | {100 * means[method]:.1f} | {100 * (max(values) - min(values)):.1f} |")
        if {FULL_SUPERVISION, PCE, TRUST_REGION} <= set(means):
            shares = [gap_share(r["cells"][(TRUST_REGION, length)]["val_miou"], r["cells"][(PCE, length)]["val_miou"],
                                r["cells"][(FULL_SUPERVISION, "1")]["val_miou"]) for r in runs]
            of_means = gap_share(means[TRUST_REGION], means[PCE], means[FULL_SUPERVISION])
            lines.append("| Grid-TR: share of the PCE-GD → full gap | "
                         + " | ".join("—" if s is None else f"{100 * s:.0f}%" for s in shares)
                         + f" | {'—' if of_means is None else f'{100 * of_means:.0f}%'} (of the means) | |")
        rounds = [r["proposals"].get(length, []) for r in runs]
        if any(rounds):
            lines += ["", "Grid-TR's proposals per stage-A round: mIoU × 100 against the training masks / share of",
                      "unseeded pixels where stage A overrode the network's argmax:", "",
                      "| seed | " + " | ".join(f"round {i}" for i in range(max(map(len, rounds)))) + " |",
                      "| --- | " + " | ".join("---" for _ in range(max(map(len, rounds)))) + " |"]
            lines += [f"| {s} | " + " | ".join(_proposal_cell(*v) for v in per_round) + " |"
                      for s, per_round in zip(seeds, rounds)]
        lines.append("")
    return "\n".join(lines)
