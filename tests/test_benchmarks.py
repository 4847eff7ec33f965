"""benchmarks/run.py: the shard-size part against its targets, and the command line;
benchmarks/gpu_voc.py's CPU smoke run.

run.py's full benchmark (training runs, solver farm) is not run here: see benchmarks/README.md.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, cli_env

RUN_PY = os.path.join(ROOT, "benchmarks", "run.py")


def load_run():
    spec = importlib.util.spec_from_file_location("trseg_bench_run", RUN_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shard_sizes_meet_targets(tmp_path):
    run = load_run()
    out = run.measure_sizes(n_images=4, workdir=str(tmp_path))
    for key in ("snapshot_bytes_per_image", "proposal_bytes_per_image"):
        assert isinstance(out[key], int) and out[key] > 0
    # a VOC-sized row: -log q over 3 present labels at stride 4, float16
    assert out["snapshot_shape"] == [3, 94, 125]
    assert out["snapshot_raw_bytes_per_image"] == 3 * 94 * 125 * 2
    assert out["proposal_raw_bytes_per_image"] == 375 * 500
    assert out["snapshot_bytes_per_image"] <= 100_000
    assert out["proposal_bytes_per_image"] <= 20_000
    met = run.check_targets(out)
    assert met == {"snapshot_bytes_per_image": True, "proposal_bytes_per_image": True}
    # the shards that were measured are on disk and follow the contract
    assert (tmp_path / "snapshots" / "round=3" / "part-0.parquet").exists()
    assert (tmp_path / "proposals" / "round=3" / "part-0.parquet").exists()


def test_check_targets_directions():
    run = load_run()
    met = run.check_targets({"tr_vs_pce": 1.2, "solver_scaling_2": 0.9, "solver_vs_raw_gco": 1.0, "stall_fraction": 0.06})
    assert met == {"tr_vs_pce": False, "solver_scaling_2": True, "solver_vs_raw_gco": True, "stall_fraction": False}


def test_help():
    proc = subprocess.run([sys.executable, RUN_PY, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--only" in proc.stdout


def test_only_sizes_prints_json_last(tmp_path):
    proc = subprocess.run([sys.executable, RUN_PY, "--only", "sizes", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["snapshot_bytes_per_image"] <= 100_000
    assert result["proposal_bytes_per_image"] <= 20_000
    assert "solver_ms_per_image" not in result and "machine" in result


def test_bad_part_is_an_error():
    proc = subprocess.run([sys.executable, RUN_PY, "--only", "nope"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "--only" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_voc_benchmark_quick_smoke(tmp_path):
    """benchmarks/gpu_voc.py --quick: the GPU check's code end to end on CPU (its figures
    mean nothing here): both runs, the lattice, one JSON line. Its Grid-TR run is also the
    paper's Grid-TR on VOC's layout end to end: the reference network and recipe, every
    image through stage A, stage A's labels above the trivial baseline (the network's val
    mIoU after one epoch on 4 images need not be), and VOC's 21 per-class IoUs."""
    import tomllib

    from tests.helpers import majority_class_miou

    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_voc.py"), "--quick", "--out",
                          str(tmp_path)], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=850)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    epochs = out["voc_epochs"]
    assert epochs["device"] == "cpu" and epochs["solver_actors"] >= 1
    assert epochs["pce"]["images_per_s"] > 0 and epochs["grid_tr"]["stage_a_images"] > 0
    assert 0 < epochs["grid_tr"]["snapshot_share"] < 1 and epochs["pce"]["snapshot_share"] == 0
    assert out["lattice"]["cpu_fwd_bwd_ms"] > 0
    tr = tmp_path / "grid_tr"
    summary = json.loads((tr / "summary.json").read_text())
    cfg = tomllib.loads((tr / "config.toml").read_text())
    rounds = [json.loads(line) for line in (tr / "metrics.jsonl").read_text().splitlines()]
    proposal_miou = [r["proposal_miou"] for r in rounds if "proposal_miou" in r]
    n_train = out["voc_epochs"]["setup"]["n_train"]
    assert summary["proposals_missing"] == 0 and summary["stage_a_images"] == n_train * len(proposal_miou) > 0
    assert len(summary["per_class_iou"]) == 21
    assert min(proposal_miou) > majority_class_miou(str(tmp_path / "voc"), "voc", 21) + 0.1, proposal_miou
    assert (cfg["arch"], cfg["batch_average"], cfg["schedule"], cfg["lr"], cfg["precision"]) == (
        "deeplabv3plus-mobilenetv2-ref", True, "sync", 7e-4, "fp32")
