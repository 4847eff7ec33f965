"""`python -m trainer table1 --quick`: the cells of Table 1 as Tune trials, interrupted and resumed, the
markdown and the plots; the tables and plots from fake summaries."""
import csv
import json
import os
import re
import signal
import time

import pytest

from experiments import table1
from experiments.pictures import epochs_before
from experiments.table1 import LENGTHS, METHODS, PAPER_TABLE1, cell_config, plan
from tests.helpers import cli_in_process, end_session, popen_cli, read_metrics, run_cli


def _read_csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], {r[0]: r[1:] for r in rows[1:]}


def test_paper_numbers_are_table1():
    # paper Table 1: PCE-GD 0.50 … 0.61, Grid-TR 0.57 … 0.67, full supervision 0.70
    assert [PAPER_TABLE1["pce"][L] for L in LENGTHS] == [0.50, 0.57, 0.59, 0.61, 0.61]
    assert [PAPER_TABLE1["grid-tr"][L] for L in LENGTHS] == [0.57, 0.63, 0.64, 0.66, 0.67]
    assert set(PAPER_TABLE1["full"].values()) == {0.70}


def test_plan_and_cell_configs(tmp_path):
    out = str(tmp_path)
    cells = plan()
    assert len(cells) == 26 and cells[0] == ("full", "1")
    for method, length in cells[1:]:  # PCE of a length comes before the cells that start from it
        if method != "pce":
            assert cells.index(("pce", length)) < cells.index((method, length))
    size = table1.QUICK
    tr = cell_config(out, "grid-tr", "0.3", "d", "synthetic", size)
    assert tr.init == os.path.join(out, "pce-0.3", "checkpoints", "last.pt") and tr.scribbles == "0.3"
    assert cell_config(out, "pce", "1", "d", "synthetic", size).scribbles == ""
    assert cell_config(out, "pce", "0", "d", "synthetic", size).init is None
    control = cell_config(out, "pce-continued", "0.5", "d", "synthetic", size)
    assert control.method == "pce" and control.epochs == tr.epochs == size.epochs
    assert control.init == os.path.join(out, "pce-0.5", "checkpoints", "last.pt")
    assert control.out == os.path.join(out, "pce-continued-0.5")
    full = cell_config(out, "full", "1", "d", "synthetic", size)
    assert full.epochs == size.pretrain_epochs + size.epochs
    tuned = table1.parse_settings(["dense-gd.nu=1.5e-6", "dense-gd.lr=2e-4", "pce.seed=4", "grid-tr.schedule=sync"])
    assert tuned == {"dense-gd": {"nu": 1.5e-6, "lr": 2e-4}, "pce": {"seed": 4}, "grid-tr": {"schedule": "sync"}}
    dense = cell_config(out, "dense-gd", "0.5", "d", "synthetic", size, settings=tuned)
    assert (dense.nu, dense.lr, dense.seed) == (1.5e-6, 2e-4, 0)  # its own keys, not its PCE start's
    assert cell_config(out, "grid-gd", "0.5", "d", "synthetic", size, settings=tuned).nu != 1.5e-6
    assert cell_config(out, "pce", "0.5", "d", "synthetic", size, settings=tuned).seed == 4
    for bad, named in (("dense-gd.nu", "METHOD.KEY=VALUE"), ("dense.nu=1", "METHOD one of"),
                       ("dense-gd.nnu=1", "'nnu'"), ("dense-gd.nu=x", "nu")):
        with pytest.raises(table1.UserError, match=named):
            table1.parse_settings([bad])
    paper = cell_config(out, "grid-tr", "0.8", "d", "voc", size, preset="paper", overrides={"epochs": 2})
    assert (paper.eps, paper.solver.tr_weight, paper.epochs, paper.batch_size) == (0.946, 0.075, 2, 12)


def _fake_results():
    results = {m: {} for m in table1.ROWS}
    for i, (method, length) in enumerate(plan()):
        results[method][length] = {"method": method, "dataset": "fake", "epochs": 2, "train_images": 8, "val_images": 4,
                                   "val_miou": 0.1 + 0.01 * i, "wall_s": 1.0, "trimap": {"1": 0.2, "5": 0.3 + 0.01 * i}}
    return results


def test_outputs_from_summaries(tmp_path):
    out, results = str(tmp_path), _fake_results()
    table1.write_outputs(out, results, settings={"dense-gd": {"nu": 1.5e-06, "lr": 0.0002}})
    header, rows = _read_csv(os.path.join(out, "table1.csv"))
    assert header == ["method", "0", "0.3", "0.5", "0.8", "1"]
    assert list(rows) == list(METHODS)
    assert rows["full"] == ["0.1000"] * 5
    assert all(v for r in rows.values() for v in r)
    md = open(os.path.join(out, "table1.md")).read()
    assert "Grid-TR (our)" in md and "0.67" in md and "starting model" in md
    control = next(line for line in md.splitlines() if line.startswith("| PCE-GD continued"))
    assert control.count("**") == 10 and "—" in control  # ours in every column, no paper value
    assert "all 26 cells" in md and "- Dense-GD cells: nu = 1.5e-06, lr = 0.0002 (`--set`)" in md
    for png in ("fig5_miou_vs_length.png", "fig6_trimap.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000


@pytest.mark.s3
def test_outputs_from_summaries_on_s3(s3_base, tmp_path, monkeypatch):
    """--out s3://…: the table and the plots are objects there, nothing is written locally."""
    from shared import storage

    monkeypatch.chdir(tmp_path)  # a path mistaken for local would land here (s3:/…)
    table1.write_outputs(s3_base, _fake_results())
    assert storage.list_dir(s3_base) == ["fig5_miou_vs_length.png", "fig6_trimap.png", "table1.csv", "table1.md"]
    csv_text = storage.read_bytes(storage.join(s3_base, "table1.csv")).decode()
    local = tmp_path / "local"
    table1.write_outputs(str(local), _fake_results())
    assert csv_text.encode() == (local / "table1.csv").read_bytes()  # the same bytes as a local table
    assert "all 26 cells" in storage.read_bytes(storage.join(s3_base, "table1.md")).decode()
    assert len(storage.read_bytes(storage.join(s3_base, "fig6_trimap.png"))) > 1000
    assert os.listdir(tmp_path) == ["local"]


def test_cli_rejects_bad_data(tmp_path):
    res = cli_in_process("--local", "table1", "--data", tmp_path / "missing", "--out", tmp_path / "o")
    assert res.returncode != 0 and "--data" in res.stderr and "Traceback" not in res.stderr


def test_a_bad_option_is_one_line_before_any_cell_trains(tmp_path):
    res = cli_in_process("--local", "table1", "--quick", "--lengths", "1", "--seed", "-1", "--out", tmp_path / "o")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: --seed: must be ≥ 0")
    bad_set = cli_in_process("--local", "table1", "--quick", "--set", "dense-gd.nu", "--out", tmp_path / "o")
    assert bad_set.returncode == 2 and bad_set.stderr.startswith("error: --set dense-gd.nu: expected METHOD.KEY=VALUE")
    assert "Traceback" not in res.stderr and "Trial" not in res.stdout
    assert not (tmp_path / "o").exists()  # no Tune experiment, no cell folder


CELLS = plan(("1",))  # full supervision, PCE-GD, the three fine-tuned methods and the control


def _cell_configs(out) -> dict:
    import tomllib

    return {d: tomllib.loads((out / d / "config.toml").read_text()) for d in os.listdir(out)
            if (out / d / "config.toml").exists()}


def _run_id(cell_folder):
    path = os.path.join(cell_folder, "run.json")
    return json.loads(open(path).read())["run_id"] if os.path.exists(path) else None


@pytest.fixture(scope="module")
def table1_run(tmp_path_factory):
    """`table1 --quick --lengths 1 --epochs 2 --seed 3` (6 cells, two Tune experiments): its
    `--plan` first (each cell's config.toml), then the table into the same folder, its
    driver killed while the second experiment has a cell finished and one between its two
    epochs, then the same command again. Returns (out, {cell: run id before the kill} of
    the finished cells, the second run's output, {cell: run id} of the interrupted one,
    {cell folder: its planned config}). One run shared by the tests below: each cell is
    ~15-25 s of Ray Train on 2 cores."""
    out = tmp_path_factory.mktemp("t1") / "t1"
    args = ("table1", "--quick", "--lengths", "1", "--epochs", "2", "--max-concurrent", "1", "--seed", "3",
            "--out", str(out))
    assert cli_in_process("--local", *args, "--plan").returncode == 0  # the plan starts no Ray: in this process
    planned = _cell_configs(out)
    fine_tuned = [table1.cell_dir(str(out), m, L) for m, L in CELLS if m not in ("full", "pce")]

    def done(d):
        return os.path.exists(os.path.join(d, "summary.json"))

    def mid_run(d):  # its first epoch's checkpoint, not yet its summary
        return os.path.exists(os.path.join(d, "checkpoints", "last.pt")) and not done(d)

    proc = popen_cli(*args, log_path=str(out.parent / "first.log"))
    try:
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            if any(map(done, fine_tuned)) and any(map(mid_run, fine_tuned)):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "table1 ended before it could be killed:\n" + (out.parent / "first.log").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        end_session(proc)
    before, interrupted = {}, {}
    for method, length in CELLS:
        folder = table1.cell_dir(str(out), method, length)
        if done(folder):
            before[(method, length)] = _run_id(folder)
        elif mid_run(folder):
            interrupted[(method, length)] = _run_id(folder)
    t0 = time.time()
    res = run_cli(*args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    print(f"table1 --quick --lengths 1, resumed: {time.time() - t0:.0f}s")
    return out, before, res.stdout, interrupted, planned


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_table1_quick_fills_its_cells(table1_run):
    out = table1_run[0]
    header, rows = _read_csv(out / "table1.csv")
    assert header == ["method", "0", "0.3", "0.5", "0.8", "1"]
    assert list(rows) == list(METHODS)
    for method, values in rows.items():
        filled = [bool(v) for v in values]
        assert filled == ([True] * 5 if method == "full" else [False, False, False, False, True]), (method, values)
        assert all(0.0 <= float(v) <= 1.0 for v in values if v)
    assert len(set(rows["full"])) == 1
    for method, length in CELLS:
        s = json.loads((out / table1.cell_name(method, length) / "summary.json").read_text())
        assert s["method"] == ("pce" if method == "pce-continued" else method)
        assert s["seed"] == 3  # --seed reaches every cell
        if method == "grid-tr":
            assert s["stage_a_images"] > 0
    md = (out / "table1.md").read_text()
    assert "PCE-GD" in md and "0.61" in md and "all 6 cells" in md and "training seed 3" in md
    assert (out / "fig5_miou_vs_length.png").stat().st_size > 1000
    assert (out / "fig6_trimap.png").stat().st_size > 1000
    assert [p.name for p in out.glob("curves-*.png")] == ["curves-1.png"]  # the one length trained
    assert epochs_before(str(out / table1.cell_name("grid-tr", "1"))) == len(
        (out / table1.cell_name("pce", "1") / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_table1_resumes_through_tune_training_only_the_missing_cells(table1_run):
    out, before, stdout = table1_run[:3]
    first = {table1.cell_name(m, L) for m, L in CELLS if m in ("full", "pce")}
    assert first <= {table1.cell_name(m, L) for m, L in before}, "the PCE experiment had finished before the kill"
    assert len(before) < len(CELLS), "some cells were still to train"
    # both experiments resumed; or, where the kill cut Tune's state file off as it was
    # written (experiments.trials.saved_state_readable), started again with their runs kept
    assert stdout.count("resuming the Tune experiment") + stdout.count("Tune's saved state is empty") == 2
    for (method, length), run_id in before.items():  # finished cells: not trained again
        s = json.loads((out / table1.cell_name(method, length) / "summary.json").read_text())
        assert s["run_id"] == run_id, (method, length)
    finished = [line for line in stdout.splitlines() if re.match(r"\[\d+/\d+\] \S+: val mIoU", line)]
    kept = stdout.count("this run finished already")  # a restarted experiment's finished runs, returned at once
    assert len(finished) == len(CELLS) - len(before) + kept, finished  # a line per trial run in this session
    assert "at most 1 at once" in stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_table1_an_interrupted_cell_continues_from_its_checkpoint(table1_run):
    """The cell killed after its first epoch is the same run after the rerun: its run id,
    a line saying it resumed, and each of its two epochs logged once."""
    out, _, stdout, interrupted, _ = table1_run
    assert len(interrupted) == 1, interrupted
    (method, length), run_id = next(iter(interrupted.items()))
    folder = out / table1.cell_name(method, length)
    assert json.loads((folder / "summary.json").read_text())["run_id"] == run_id
    assert f"{folder}: resuming this run from its last checkpoint" in stdout
    assert [m["epoch"] for m in read_metrics(str(folder))] == [1, 2]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_table1_cells_train_their_planned_configuration(table1_run):
    """Every cell's config.toml after training is the one `--plan` wrote, but for the
    devices, which the plan leaves to the machine that runs it (trainer.driver.resolve_devices),
    and `resume`, which the cell interrupted by the kill records as its second start."""
    out, _, _, interrupted, planned = table1_run
    interrupted = {table1.cell_name(m, L) for m, L in interrupted}
    ran, devices = _cell_configs(out), ("use_gpu", "loader_workers")
    assert sorted(planned) == sorted(ran) == sorted(table1.cell_name(m, L) for m, L in CELLS)
    for name, cfg in planned.items():
        assert not any(k in cfg for k in devices) and (ran[name]["use_gpu"], ran[name]["loader_workers"]) == (False, 0)
        assert ran[name]["resume"] == (name in interrupted) and not cfg["resume"], name
        assert {k: v for k, v in ran[name].items() if k not in (*devices, "resume")} == {
            k: v for k, v in cfg.items() if k != "resume"}, name


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_table1_seeds_reads_a_real_table(table1_run):
    out = table1_run[0]
    res = cli_in_process("table1-seeds", str(out), "--out", str(out.parent / "seeds.md"))
    assert res.returncode == 0, res.stderr[-3000:]
    text = (out.parent / "seeds.md").read_text()
    assert text.rstrip() == res.stdout.rstrip() and "# Table 1 over seeds 3" in text
    tr = json.loads((out / "grid-tr-1" / "summary.json").read_text())["val_miou"]
    assert re.search(rf"\| Grid-TR \(our\) \| {100 * tr:.1f} \| {100 * tr:.1f} \| 0.0 \|", text), text
    assert re.search(r"\| 3 \| \d+\.\d / \d+\.\d% \|", text), text  # seed 3's proposals per round, from metrics.jsonl


def _fake_seed_run(root, seed, values, rounds, dataset="d"):
    for (method, length), v in values.items():
        folder = root / table1.cell_name(method, length)
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"seed": seed, "dataset": dataset, "val_miou": v}))
        if method == "grid-tr":
            (folder / "metrics.jsonl").write_text("".join(
                json.dumps({"epoch": e, "round": r, "proposal_miou": p, "proposal_changed": p / 10}) + "\n"
                for e, (r, p) in enumerate([(0, None), *rounds], 1) if p is not None) + '{"epoch": 9}\n')
    return str(root)


def test_table1_seeds_mean_spread_and_gap_share(tmp_path):
    from experiments.seeds import read_run, summarize
    from shared.errors import UserError

    cells = [("full", "1"), ("pce", "1"), ("grid-tr", "1"), ("pce-continued", "1")]
    a = _fake_seed_run(tmp_path / "a", 0, dict(zip(cells, (0.9, 0.7, 0.8, 0.72))), [(0, 0.85), (0, 0.86), (1, 0.87)])
    b = _fake_seed_run(tmp_path / "b", 1, dict(zip(cells, (1.0, 0.6, 0.9, 0.62))), [(0, 0.8), (1, 0.81)])
    text = summarize([read_run(a), read_run(b)])
    assert "| full supervision | 90.0 | 100.0 | 95.0 | 10.0 |" in text
    assert "| PCE-GD continued (same-budget control) | 72.0 | 62.0 | 67.0 | 10.0 |" in text
    # per seed (0.8 − 0.7)/(0.9 − 0.7) = 50% and 75%; of the means (0.85 − 0.65)/(0.95 − 0.65) = 67%
    assert "| Grid-TR: share of the PCE-GD → full gap | 50% | 75% | 67% (of the means) | |" in text
    assert "| 0 | 86.0 / 8.6% | 87.0 / 8.7% |" in text and "| 1 | 80.0 / 8.0% | 81.0 / 8.1% |" in text  # a round's last
    assert "Dense-GD" not in text  # no run trained it
    other = _fake_seed_run(tmp_path / "c", 2, dict(zip(cells, (0.9, 0.7, 0.8, 0.7))), [], dataset="e")
    with pytest.raises(UserError, match="different data sets"):
        summarize([read_run(a), read_run(other)])
    with pytest.raises(UserError, match="not a `table1 --out` folder"):
        read_run(str(tmp_path))
