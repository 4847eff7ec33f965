"""Table 1 / Fig. 5 / Fig. 6 of the paper on any data set: every method at every
scribble length.

Cells, each a trial of a Ray Tune experiment (experiments/trials.py) running
`trainer.driver.run_train` (its trainer and, for Grid-TR, its own solver farm) in its
own run folder under OUT:

    OUT/full/                       full supervision (once: scribble length is irrelevant)
    OUT/pce-{L}/                    PCE-GD on scribbles of length L (Alg. 1 line 2)
    OUT/{dense-gd,grid-gd,grid-tr}-{L}/
                                    fine-tuned from OUT/pce-{L}/checkpoints/last.pt
    OUT/pce-continued-{L}/          PCE-GD continued from the same checkpoint for as
                                    many epochs: the same-budget control
    OUT/tune/table1-pce-*/          Tune's state of the first experiment: full and pce-{L}
    OUT/tune/table1-fine-tuned-*/   and of the second: the cells that start from pce-{L}

for L in 0 (clicks), 0.3, 0.5, 0.8, 1 (full scribbles). OUT is a local folder or an
object store URI (s3://bucket/prefix): everything above and the outputs below go
through shared/storage.py. The cells of an experiment run side by side, as many at
once as the cluster holds (`--max-concurrent`); the fine-tuned cells start when every
PCE-GD model exists. An interrupted table resumes through Tune's restore when the same
command runs again: finished cells are kept, the interrupted ones continue from their
checkpoints/last.pt.

Budget: the PCE cell trains `pretrain_epochs`; GD and TR continue from it for
`epochs` more. The PCE column is therefore the *starting model* of the other three,
as in the paper (PCE-GD is the baseline that Dense-GD, Grid-GD and Grid-TR start
from, Sec. 4.1 "Pretraining"). The paper's PCE-GD has converged, ours has had a
short budget, so the `pce-continued` control trains PCE-GD for the same extra epochs
from the same checkpoint: a regulariser only helps if it beats that too. It is a
row of table1.md, not of table1.csv. Full supervision trains pretrain_epochs + epochs.

With `--preset paper` every cell is as the authors ran it (SPEC §4, docs/voc.md): full
supervision, PCE-GD and Dense-GD from the ImageNet backbone, 60 epochs each; Grid-GD and
Grid-TR 60 epochs from that length's PCE-GD model; no control cells (the paper's PCE-GD
has converged). `--plan` writes every cell's config.toml and trains nothing.

Outputs: OUT/table1.csv (`method,0,0.3,0.5,0.8,1`, val mIoU in 0..1, full
supervision's value in every column), OUT/table1.md (the paper's layout, with the
paper's VOC numbers beside ours), OUT/fig5_miou_vs_length.png and
OUT/fig6_trimap.png, from the trials' results.
"""
from __future__ import annotations

import copy
import io
import json
import os
import time
import tomllib
from dataclasses import dataclass

from shared import storage
from shared.config import set_option
from shared.errors import UserError
from trainer.config import TrainConfig, typed_option
from shared.labels import SCRIBBLE_LENGTHS, scribble_suffix
from trainer.methods import FULL_SUPERVISION, PCE
from trainer.methods import METHODS as REGISTRY
from trainer.presets import apply_preset, preset_values
from trainer.run_folder import RunFolder
from experiments.pictures import curves, epochs_before, read_metrics

LENGTHS = SCRIBBLE_LENGTHS  # table columns; '1' is the '' scribble suffix
METHODS = tuple(REGISTRY)  # the rows of the paper's Table 1, in the registry's order
FINE_TUNED = tuple(m for m in METHODS if REGISTRY[m].starts_from_pce)
CONTROL = "pce-continued"  # PCE-GD, fine-tuned like FINE_TUNED: same epochs, same start
ROWS = (*METHODS, CONTROL)
LABELS = {**{m: REGISTRY[m].title for m in METHODS}, CONTROL: "PCE-GD continued (same epochs as the three above)"}

# Paper Table 1 ("Results for ScribbleSup", Pascal VOC 2012 val mIoU): each method's row
# is on its record (trainer.methods)
PAPER_TABLE1 = {m: REGISTRY[m].paper_table1 for m in METHODS}


@dataclass
class Table1Size:
    """The synthetic data set and the epoch budget of a table."""

    n_train: int
    n_val: int
    size: int
    pretrain_epochs: int  # the PCE cell
    epochs: int  # GD / TR fine-tuning from the PCE cell
    epochs_per_round: int
    batch_size: int
    crop_size: int


# FULL: the default synthetic set and the default job's budget (experiments.default_job).
FULL = Table1Size(n_train=64, n_val=32, size=96, pretrain_epochs=20, epochs=20, epochs_per_round=5, batch_size=8, crop_size=64)
# QUICK: 21 runs in a few minutes on 2 cores, for tests. Each run_train costs ~10 s of
# Ray Train start/stop whatever it trains, so the data and the epochs are tiny. The
# numbers mean nothing; the pipeline is what it exercises.
QUICK = Table1Size(n_train=8, n_val=4, size=48, pretrain_epochs=1, epochs=1, epochs_per_round=1, batch_size=4, crop_size=0)
# the crop of a quick table with a preset: its augmentation needs one (VOC's images differ in size)
QUICK_PRESET_CROP = 64


def cell_dir(out: str, method: str, length: str) -> str:
    return storage.join(out, cell_name(method, length))


def plan(lengths=LENGTHS, control: bool = True) -> list[tuple[str, str]]:
    """(method, length) in training order: full, then per length PCE before the cells
    that start from it; `control`: with the pce-continued cells (not a cell of the
    paper's table: a preset's table runs without them)."""
    cells = [(FULL_SUPERVISION, "1")]
    for length in lengths:
        cells.append((PCE, length))
        cells.extend((m, length) for m in (*FINE_TUNED, *((CONTROL,) if control else ())))
    return cells


def from_backbone(method: str, preset: str | None) -> bool:
    """Whether a cell trains from the backbone's initial weights rather than from its
    length's PCE-GD model: full supervision and PCE-GD always; with a preset, every
    method whose recipe has no PCE pretraining (the paper's Dense-GD, SPEC §4)."""
    if method == CONTROL:
        return False
    recipe = preset_values(preset, "", method) if preset else {}
    return not REGISTRY[method].starts_from_pce or recipe.get("pretrain_epochs") == 0


def cell_config(out, method, length, data, fmt, size: Table1Size, preset=None, overrides=None,
                settings=None) -> TrainConfig:
    """One cell. Without a preset (the synthetic table): PCE-GD trains `pretrain_epochs`,
    the other methods continue from it for `epochs`, full supervision trains both. With a
    preset, every cell trains as the authors ran it (SPEC §4): PCE-GD `pretrain_epochs`,
    the others `epochs`, from the backbone's ImageNet weights or from the PCE-GD model
    (`from_backbone`). `settings`: {row: {key: value}} of one method's cells (`--set`),
    over the overrides of every cell."""
    overrides = dict(overrides or {})
    cfg = TrainConfig(
        data=data, format=fmt, scribbles="" if method == FULL_SUPERVISION else scribble_suffix(length),
        method=PCE if method == CONTROL else method,
        batch_size=size.batch_size, crop_size=size.crop_size, epochs_per_round=size.epochs_per_round,
        out=cell_dir(out, method, length),
    )
    if preset:
        apply_preset(cfg, preset, explicit=overrides)
    else:
        cfg.epochs, cfg.pretrain_epochs = size.epochs, size.pretrain_epochs
    for key, value in {**overrides, **(settings or {}).get(method, {})}.items():
        set_option(cfg, key, value)
    pretrain, epochs = cfg.pretrain_epochs, cfg.epochs
    if method == PCE:
        cfg.epochs = pretrain
    elif method == FULL_SUPERVISION:
        cfg.epochs = epochs if preset else pretrain + epochs
    elif from_backbone(method, preset):
        cfg.pretrain_epochs = 0
    else:
        cfg.fine_tune_from(cell_config(out, PCE, length, data, fmt, size, preset, overrides, settings))
    return cfg


def cell_name(method: str, length: str) -> str:
    """The cell's run folder under OUT, and its trial's name."""
    return method if method == FULL_SUPERVISION else f"{method}-{length}"


def prepare(out: str, data: str | None, fmt: str, size, variant: str = "default") -> tuple[str, str, str]:
    """The run folder (absolute, or a URI) and the data set: the cached synthetic one
    without --data."""
    from experiments.default_job import synthetic_dataset

    out = out if storage.is_remote(out) else os.path.abspath(out)
    if not data:
        data, fmt = synthetic_dataset(size.n_train, size.n_val, size.size, variant=variant), "synthetic"
    return out, os.path.abspath(data), fmt


def table1_configs(out: str, data: str, fmt: str, size: Table1Size, preset: str | None, overrides: dict,
                   lengths, settings: dict | None = None) -> tuple[dict, dict]:
    """({cell: (method, length)}, {cell: TrainConfig}) of a table. A quick table with a
    preset keeps the preset's recipe on the quick budget."""
    if preset and size is QUICK:
        overrides = {"epochs": size.epochs, "pretrain_epochs": size.pretrain_epochs, "batch_size": size.batch_size,
                     "epochs_per_round": size.epochs_per_round, "crop_size": QUICK_PRESET_CROP, **overrides}
    cells = {cell_name(m, L): (m, L) for m, L in plan(lengths, control=not preset)}
    configs = {name: cell_config(out, m, L, data, fmt, size, preset, overrides, settings)
               for name, (m, L) in cells.items()}
    for cfg in configs.values():  # a bad option is one line now, before Ray starts
        copy.deepcopy(cfg).validate()
    return cells, configs


def run_table1(out: str, data: str | None = None, fmt: str = "synthetic", quick: bool = False,
               preset: str | None = None, overrides: dict | None = None, log=print,
               lengths=LENGTHS, variant: str = "default", max_concurrent: int | None = None,
               plan_only: bool = False, address: str | None = None, settings: dict | None = None) -> dict:
    """Train the cells at `lengths` as two Tune experiments (the cells from the backbone:
    full supervision, the PCE models and, with the paper preset, Dense-GD; then the cells
    fine-tuned from a PCE model), then write the table and the plots from the trials'
    results. Returns {method: {length: summary}}. `plan_only`: write each cell's
    config.toml, print the plan and train nothing (experiments/plan.py). Ray (`address`:
    shared.ray_session.connect's) starts only once every cell's config is valid."""
    size = QUICK if quick else FULL
    out, data, fmt = prepare(out, data, fmt, size, variant)
    cells, configs = table1_configs(out, data, fmt, size, preset, dict(overrides or {}), lengths, settings)
    if plan_only:
        from experiments.plan import write_plan

        write_plan(configs, log)
        return {}
    from shared.ray_session import connect

    connect(address)
    from ray import tune

    from experiments import trials

    log(f"data: {data} ({fmt})\nout: {out}")
    first = [name for name, cfg in configs.items() if not cfg.init]
    phases = {"table1-pce": first, "table1-fine-tuned": [name for name in cells if name not in first]}
    at_once = max_concurrent or trials.runs_that_fit(list(configs.values()))
    log(f"{len(cells)} cells, at most {at_once} at once")
    results: dict = {m: {} for m in ROWS}
    t_all = time.perf_counter()
    for phase, names in phases.items():
        runs = {name: configs[name] for name in names}
        grid = trials.fit(trials.experiment_path(out, phase, runs), runs, os.path.basename(data.rstrip("/")),
                          {"run": tune.grid_search(names)}, trials.grid_config(at_once),
                          len(names), log)
        for r in grid:
            method, length = cells[r.config["run"]]
            results[method][length] = trials.summary_of(r)
    write_outputs(out, results, preset, settings)
    log(f"table1: {len(cells)} cells in {time.perf_counter() - t_all:.0f}s -> {storage.join(out, 'table1.csv')}")
    return results


def miou_table(results: dict) -> dict:
    """{row: {length: mIoU or None}}; full supervision in every column."""
    table = {}
    for method in ROWS:
        if method == FULL_SUPERVISION:
            s = results[method].get("1")
            table[method] = {L: (s["val_miou"] if s else None) for L in LENGTHS}
        else:
            table[method] = {L: (results[method][L]["val_miou"] if L in results[method] else None) for L in LENGTHS}
    return table


def write_outputs(out: str, results: dict, preset: str | None = None, settings: dict | None = None) -> None:
    """table1.csv, table1.md and the plots into OUT (a folder or a URI)."""
    table = miou_table(results)
    write_csv(storage.join(out, "table1.csv"), table)
    storage.write_bytes(storage.join(out, "table1.md"), markdown(table, results, preset, settings).encode())
    plot_fig5(storage.join(out, "fig5_miou_vs_length.png"), table)
    plot_fig6(storage.join(out, "fig6_trimap.png"), results)
    write_curves(out, results)


def write_curves(out: str, results: dict) -> None:
    """curves-LENGTH.png: val mIoU per epoch of every cell at that scribble length that has
    trained (the fine-tuned cells drawn after the PCE-GD epochs they start from)."""
    for length in LENGTHS:
        runs = {m: cell_dir(out, m, length) for m in results if length in results[m]}
        runs = {m: run for m, run in runs.items() if read_metrics(run)}
        if runs:
            storage.write_bytes(storage.join(out, f"curves-{length}.png"),
                                curves({m: (run, epochs_before(run)) for m, run in runs.items()}))


def write_csv(uri: str, table: dict) -> None:
    storage.write_csv(uri, ["method", *LENGTHS], (
        [method, *("" if table[method][L] is None else f"{table[method][L]:.4f}" for L in LENGTHS)] for method in METHODS))


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"


SYNTHETIC_NOTES = (
    "- Full supervision is trained once (scribble length does not matter to it), for the GD/TR cells' total epochs",
    "  (PCE-GD's plus the fine-tuning's); its value is repeated in every column.",
    "- PCE-GD is the starting model: Dense-GD, Grid-GD and Grid-TR at each scribble length are fine-tuned from that",
    "  length's PCE-GD checkpoint (Alg. 1 line 2, paper Sec. 4.1), so they have trained longer than the PCE-GD row;",
    "  the paper's Table 1 compares the same way (PCE-GD is the baseline the others start from). The paper's PCE-GD",
    "  has converged; ours has not had a long budget, so the last row continues PCE-GD from the same checkpoint for",
    "  the same number of epochs: the fair baseline for the three methods above it (not in table1.csv).",
)
PRESET_NOTES = (
    "- Every cell as the authors ran it (SPEC §4): full supervision, PCE-GD and Dense-GD from the ImageNet backbone;",
    "  Grid-GD and Grid-TR from that length's PCE-GD model; full supervision is trained once, its value repeated in",
    "  every column. No same-budget control: the paper's PCE-GD has converged after its epochs.",
)


def _diff(ours, paper) -> str:
    return "" if ours is None or paper is None else f" ({100 * (ours - paper):+.1f})"


def read_results(out: str) -> dict:
    """{method: {length: summary}} of the cells of a table in OUT that have finished
    (their summary.json), whatever the run's lengths and preset were."""
    results: dict = {m: {} for m in ROWS}
    for method, length in plan(LENGTHS):
        raw = storage.read_if_exists(RunFolder(cell_dir(out, method, length)).summary)
        if raw is not None:
            results[method][length] = json.loads(raw)
    return results


def compare(out: str) -> str:
    """The markdown of table1.md for a finished or partial table in OUT."""
    from shared.errors import UserError

    results = read_results(out)
    if not any(results.values()):
        raise UserError(f"{out}: no finished Table 1 cell (no */summary.json of a table1 run)")
    # a preset's table trains Dense-GD from the backbone, the synthetic one from PCE-GD's model
    from_backbone_with_preset = [m for m in FINE_TUNED if from_backbone(m, "paper")]
    configs = [storage.read_if_exists(RunFolder(cell_dir(out, m, L)).config)
               for m in from_backbone_with_preset for L in LENGTHS]
    preset = any(raw is not None and "init" not in tomllib.loads(raw.decode()) for raw in configs)
    return markdown(miou_table(results), results, "paper" if preset else None)


def parse_settings(items) -> dict[str, dict]:
    """`--set METHOD.KEY=VALUE`, repeated: {row: {key: value}}, each value a TOML value
    (a bare word: a string) of the type the key takes; an error names the item."""
    settings: dict[str, dict] = {}
    for item in items:
        head, eq, raw = item.partition("=")
        method, dot, key = head.strip().partition(".")
        if not eq or not dot or method not in ROWS:
            raise UserError(f"--set {item}: expected METHOD.KEY=VALUE, METHOD one of {', '.join(ROWS)}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        name = key.replace("-", "_")
        try:
            value = typed_option(name, value)
        except UserError as e:
            raise UserError(f"--set {item}: {e}") from None
        settings.setdefault(method, {})[name] = value
    return settings


def markdown(table: dict, results: dict, preset: str | None = None, settings: dict | None = None) -> str:
    lines = [
        "# Table 1: val mIoU against scribble length",
        "",
        "Each cell: **this run** / paper (ScribbleSup on Pascal VOC 2012, Table 1 of Marin & Boykov, ICCV 2021)"
        " (this run − paper, in mIoU points).",
        "Scribble length 0 is clicks, 1 full-length scribbles.",
        "",
        "| scribble length | " + " | ".join(LENGTHS) + " |",
        "| --- | " + " | ".join("---" for _ in LENGTHS) + " |",
    ]
    for method in ROWS:
        paper = PAPER_TABLE1.get(method, dict.fromkeys(LENGTHS))
        cells = [f"**{_fmt(table[method][L])}** / {_fmt(paper[L])}{_diff(table[method][L], paper[L])}" for L in LENGTHS]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    any_summary = next((s for m in ROWS for s in results[m].values()), None)
    lines += [
        "",
        "Notes:",
        "",
        *(PRESET_NOTES if preset else SYNTHETIC_NOTES),
        "- The paper's numbers are VOC (K = 21, 60 epochs); on another data set they are there for the trend, not as targets.",
        *(f"- {LABELS[m]} cells: {', '.join(f'{k} = {v:g}' if isinstance(v, float) else f'{k} = {v}' for k, v in s.items())}"
          " (`--set`)" for m, s in (settings or {}).items()),
    ]
    if any_summary is not None:
        lines.append(f"- Data set: `{any_summary['dataset']}`, {any_summary['train_images']} train / {any_summary['val_images']} val images;"
                     f" training seed {any_summary.get('seed', 0)}.")
    walls = [s["wall_s"] for m in ROWS for s in results[m].values()]
    lines.append(f"- Training wall time, all {len(walls)} cells: {sum(walls) / 60:.1f} min (Ray start-up not included).")
    lines += ["", "| cell | epochs | val mIoU | wall s |", "| --- | --- | --- | --- |"]
    for method in ROWS:
        for L in LENGTHS:
            s = results[method].get(L)
            if s is not None:
                lines.append(f"| {method} @ {L} | {s['epochs']} | {s['val_miou']:.4f} | {s['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, uri: str) -> None:
    """A figure as one PNG file at a local path or a URI; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    storage.write_bytes(uri, buf.getvalue())


def plot_fig5(uri: str, table: dict) -> None:
    """mIoU against scribble length per method (paper Fig. 5), ours beside the paper's."""
    plt = _pyplot()
    xs = [float(L) for L in LENGTHS]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True)
    for ax, source, title in ((axes[0], table, "this run"), (axes[1], PAPER_TABLE1, "paper (VOC, Table 1)")):
        for method in ROWS:
            if method not in source:
                continue
            pts = [(x, source[method][L]) for x, L in zip(xs, LENGTHS) if source[method][L] is not None]
            if not pts:
                continue
            style = {FULL_SUPERVISION: "--", CONTROL: ":o"}.get(method, "-o")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=LABELS[method])
        ax.set_title(title)
        ax.set_xlabel("scribble length")
        ax.set_ylabel("val mIoU")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)  # below: the curves fill the axes
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    save_figure(fig, uri)


def plot_fig6(uri: str, results: dict) -> None:
    """Trimap mIoU against band width per method at full scribble length (paper Fig. 6)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ROWS:
        s = results[method].get("1")
        if not s or not s.get("trimap"):
            continue
        pts = sorted((float(w), v) for w, v in s["trimap"].items() if v is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", markersize=3, label=LABELS[method])
    ax.set_xlabel("trimap band width (pixels)")
    ax.set_ylabel("mIoU inside the band")
    ax.set_title("trimap accuracy, full-length scribbles")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, uri)
