"""SPEC §7: a run folder belongs to one run (checked before Ray starts)."""
import json
import os

import pytest

from trainer.config import TrainConfig
from shared.errors import UserError
from tests.helpers import cli_in_process
from trainer.driver import RUN_FILE, check_inputs, claim_run_folder


def _earlier_run(out):
    os.makedirs(os.path.join(out, "checkpoints"))
    open(os.path.join(out, "metrics.jsonl"), "w").write('{"epoch": 1}\n')
    open(os.path.join(out, "notes.txt"), "w").write("mine\n")


def test_second_run_into_a_used_folder_is_refused_in_one_line(synthetic_set, tmp_path):
    data, out = synthetic_set(4, 2, 48), str(tmp_path / "run")
    _earlier_run(out)
    proc = cli_in_process("train", "--data", data, "--method", "pce", "--epochs", 1, "--out", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--out {out}" in lines[0] and "--overwrite" in lines[0] and "--resume" in lines[0]


def test_default_job_into_an_earlier_ones_folder_is_refused_before_ray_starts(tmp_path):
    out = str(tmp_path / "job")
    _earlier_run(os.path.join(out, "grid-tr"))
    proc = cli_in_process("--out", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--out {out}" in lines[0] and "--overwrite" in lines[0]
    assert "data:" not in proc.stdout and "Ray" not in proc.stdout + proc.stderr  # nothing started
    assert open(os.path.join(out, "grid-tr", "notes.txt")).read() == "mine\n"


def test_overwrite_clears_only_run_outputs_and_records_a_new_run_id(synthetic_set, tmp_path):
    data, out = synthetic_set(4, 2, 48), str(tmp_path / "run")
    _earlier_run(out)
    cfg = TrainConfig(data=data, method="pce", out=out)
    with pytest.raises(UserError, match="another run"):
        check_inputs(cfg)
    check_inputs(cfg, overwrite=True)
    run_id = claim_run_folder(cfg)
    assert sorted(os.listdir(out)) == ["notes.txt", RUN_FILE]  # the user's file stays
    assert json.load(open(os.path.join(out, RUN_FILE)))["run_id"] == run_id
    resumed = TrainConfig(data=data, method="pce", out=out, resume=True)
    assert claim_run_folder(resumed) == run_id  # --resume continues the same run


def test_config_toml_round_trips_awkward_strings(tmp_path):
    """The resolved config.toml must read back exactly, whatever the paths hold."""
    import tomllib

    from shared.config import from_dict, to_dict
    from trainer.tomlio import dumps

    odd = 'runs/a "quoted"\\back\nslash\ttab\x01ctl é'
    cfg = TrainConfig(data=odd, out=odd, shards=odd, eps=None)
    text = dumps(to_dict(cfg))
    back = from_dict(TrainConfig, tomllib.loads(text))
    assert back == cfg
