"""The λ (`--tr-weight`) sweep of paper Sec. 5.1 / Fig. 7.

One PCE-GD model (OUT/pce/), then Grid-TR from it once per λ (OUT/tr-{λ}/), all
with the same budget. λ = 0 is the paper's "fixed set of proposals generated in a
single run of stage A": with λ = 0 the stage-A energy (eq. 16) does not depend on
the network, so every round would solve the same problem; the sweep runs it with
epochs_per_round = epochs, i.e. stage A once (round 0) and stage B on those fixed
proposals for the whole budget. λ > 0 runs the normal Alg. 1 rounds.

Each run is a trial of a Ray Tune experiment (experiments/trials.py), the λ runs side
by side once the PCE-GD model exists, as many at once as the cluster holds
(`--max-concurrent`); the same command again finishes an interrupted sweep (Tune's
restore; an interrupted run continues from its last checkpoint). OUT may be an object
store URI (s3://…). Writes, from the trials' results,
OUT/sweep.csv (`tr_weight,val_miou,stage_a_rounds,stage_a_images,wall_s`),
OUT/sweep.md and OUT/sweep.png (val mIoU against λ, the PCE start as a reference).
"""
from __future__ import annotations

import copy
import os

from shared import storage
from shared.labels import scribble_suffix
from shared.shard_store import ShardStore
from trainer.config import TrainConfig
from trainer.methods import PCE
from trainer.presets import apply_preset
from experiments.table1 import FULL, QUICK, Table1Size, _pyplot, prepare, save_figure

DEFAULT_VALUES = (0.0, 0.01, 0.05, 0.1, 0.5)
# The sweep's own quick size: two stage-A rounds, so λ > 0 differs from λ = 0.
QUICK_SWEEP = Table1Size(**{**QUICK.__dict__, "epochs": 2})


def parse_values(text: str) -> list[float]:
    from shared.errors import UserError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--values: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise UserError(f"--values: need one or more λ ≥ 0, got {text!r}")
    return sorted(set(values))


def run_name(lam: float) -> str:
    """The λ run's folder under OUT, and its trial's name."""
    return f"tr-{lam:g}"


def run_dir(out: str, lam: float) -> str:
    return storage.join(out, run_name(lam))


def _config(out, method, data, fmt, size, scribbles, preset, lam=None, potts_weight=None,
            backbone_weights=None) -> TrainConfig:
    cfg = TrainConfig(data=data, format=fmt, scribbles=scribbles, method=method, batch_size=size.batch_size,
                      crop_size=size.crop_size, epochs_per_round=size.epochs_per_round,
                      backbone_weights=backbone_weights)
    if preset:
        apply_preset(cfg, preset)
    else:
        cfg.epochs, cfg.pretrain_epochs = size.epochs, size.pretrain_epochs
    if method == PCE:
        cfg.epochs, cfg.out = cfg.pretrain_epochs, storage.join(out, "pce")
    else:
        cfg.fine_tune_from(_config(out, PCE, data, fmt, size, scribbles, preset, backbone_weights=backbone_weights))
        cfg.out = run_dir(out, lam)
        cfg.solver.tr_weight = lam
        if potts_weight is not None:
            cfg.solver.potts_weight = potts_weight
        if lam == 0:
            cfg.epochs_per_round = cfg.epochs  # one stage A: fixed proposals (Sec. 5.1)
    return cfg


def run_sweep(out: str, values=DEFAULT_VALUES, data: str | None = None, fmt: str = "synthetic",
              quick: bool = False, scribbles: str = "1", preset: str | None = None, log=print,
              variant: str = "default", potts_weight: float | None = None,
              max_concurrent: int | None = None, use_gpu: bool | None = None, backbone_weights: str | None = None,
              plan_only: bool = False, address: str | None = None) -> list[dict]:
    """`plan_only`: write each run's config.toml, print the plan, train nothing. Ray
    (`address`: shared.ray_session.connect's) starts only once every run's config is valid."""
    size = QUICK_SWEEP if quick else FULL
    out, data, fmt = prepare(out, data, fmt, size, variant)
    sfx = scribble_suffix(scribbles)
    pce = {"pce": _config(out, PCE, data, fmt, size, sfx, preset, backbone_weights=backbone_weights)}
    tr = {run_name(float(v)): _config(out, "grid-tr", data, fmt, size, sfx, preset, float(v), potts_weight,
                                      backbone_weights) for v in values}
    for cfg in (*pce.values(), *tr.values()):
        cfg.use_gpu = use_gpu  # --gpu/--no-gpu, None: trainer.driver.resolve_use_gpu decides
        copy.deepcopy(cfg).validate()  # a bad option is one line now, before Ray starts
    if plan_only:
        from experiments.plan import write_plan

        write_plan({**pce, **tr}, log)
        return []
    from shared.ray_session import connect

    connect(address)
    from ray import tune

    from experiments import trials

    at_once = max_concurrent or trials.runs_that_fit(list(tr.values()))
    log(f"{len(tr)} λ runs after the PCE-GD model, at most {at_once} at once")
    summaries = {}
    for phase, runs in (("sweep-pce", pce), ("sweep-tr", tr)):
        grid = trials.fit(trials.experiment_path(out, phase, runs), runs, os.path.basename(data.rstrip("/")),
                          {"run": tune.grid_search(list(runs))}, trials.grid_config(at_once),
                          len(runs), log)
        summaries.update({r.config["run"]: trials.summary_of(r) for r in grid})
    rows = []
    for v in values:
        s = summaries[run_name(float(v))]
        rounds = len(ShardStore(tr[run_name(float(v))].shard_base()).rounds("proposals"))
        rows.append({"tr_weight": float(v), "val_miou": s["val_miou"], "stage_a_rounds": rounds,
                     "stage_a_images": s["stage_a_images"], "wall_s": s["wall_s"], "epochs": s["epochs"]})
    write_outputs(out, rows, summaries["pce"], sfx)
    return rows


def write_outputs(out: str, rows: list[dict], pce: dict, sfx: str) -> None:
    """sweep.csv, sweep.md and sweep.png into OUT (a folder or a URI)."""
    storage.write_csv(storage.join(out, "sweep.csv"), ["tr_weight", "val_miou", "stage_a_rounds", "stage_a_images", "wall_s"], (
        [f"{r['tr_weight']:g}", f"{r['val_miou']:.4f}", r["stage_a_rounds"], r["stage_a_images"], f"{r['wall_s']:.1f}"]
        for r in rows))
    length = "1" if sfx == "" else sfx
    lines = [
        f"# Grid-TR against λ (`--tr-weight`), scribble length {length}",
        "",
        f"All runs start from the same PCE-GD model (val mIoU {pce['val_miou']:.4f}, {pce['epochs']} epochs) "
        f"and train {rows[0]['epochs'] if rows else '?'} epochs of Grid-TR.",
        "λ = 0: fixed proposals from a single stage A (paper Sec. 5.1, Fig. 7); λ > 0: one stage A per round (Alg. 1).",
        "",
        "| λ | val mIoU | stage-A rounds | stage-A images | wall s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['tr_weight']:g} | {r['val_miou']:.4f} | {r['stage_a_rounds']} | {r['stage_a_images']} | {r['wall_s']:.0f} |")
    storage.write_bytes(storage.join(out, "sweep.md"), ("\n".join(lines) + "\n").encode())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = list(range(len(rows)))
    ax.plot(xs, [r["val_miou"] for r in rows], "-o", label="Grid-TR")
    ax.axhline(pce["val_miou"], linestyle="--", color="grey", label="PCE-GD (start)")
    ax.set_xticks(xs, [f"{r['tr_weight']:g}" for r in rows])
    ax.set_xlabel("λ (tr-weight); 0 = fixed proposals")
    ax.set_ylabel("val mIoU")
    ax.set_title(f"λ sweep, scribble length {length}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, storage.join(out, "sweep.png"))
