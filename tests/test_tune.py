"""`python -m trainer tune`: the search space file and its errors, and a 4-trial search
end to end with --out on S3 (Ray Tune, ASHA on the trainer's per-epoch val mIoU,
best.toml for train)."""
import csv
import io
import os
import re

import pytest

from experiments.search import default_space, read_space
from shared.errors import UserError
from tests.helpers import ROOT, cli_in_process, run_cli
from trainer.methods import METHODS
from trainer.tomlio import read_toml


def _space(tmp_path, text):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return str(path)


def test_every_method_has_a_default_space():
    for method in METHODS:
        sampled, fixed = read_space(default_space(method))
        assert sampled and not fixed, method
    assert set(read_space(default_space("grid-tr"))[0]) == {"tr_weight", "potts_weight", "lr"}


def test_space_format(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    sampled, fixed = read_space(_space(tmp_path, 'tr_weight = { loguniform = [0.01, 1.0] }\n'
                                                 'potts-weight = { choice = [10, 100] }\n'
                                                 'max_iter = { randint = [1, 6] }\n'
                                                 'eps = { uniform = [0.5, 0.7] }\nepochs = 3\n'))
    assert isinstance(sampled["tr_weight"], Float) and sampled["tr_weight"].lower == 0.01
    assert isinstance(sampled["potts_weight"], Categorical) and isinstance(sampled["max_iter"], Integer)
    assert fixed == {"epochs": 3}


@pytest.mark.parametrize("text, message", [
    ("tr_weigth = { uniform = [0.1, 1.0] }", "'tr_weigth' is not a configuration key"),
    ("out = { choice = ['a', 'b'] }", "'out' is not a configuration key a search can set"),
    ("lr = { normal = [0.1, 1.0] }", "expected one of"),
    ("epochs = { uniform = [1.5, 3] }", "'epochs': expected int, got float 1.5"),
    ("lr = { loguniform = [0, 1] }", "needs low > 0"),
    ("lr = { uniform = [1, 0.1] }", "needs low < high"),
    ("epochs = 3", "no key to search"),
])
def test_space_errors_name_the_file_and_key(tmp_path, text, message):
    path = _space(tmp_path, text + "\n")
    with pytest.raises(UserError, match=f"--search {path}: .*{message}"):
        read_space(path)


def test_cli_rejects_a_bad_space_before_ray_starts(tmp_path):
    res = cli_in_process("tune", "--method", "grid-tr", "--search", _space(tmp_path, "beta = { uniform = [1, 2] }\n"),
                         "--out", tmp_path / "o")
    assert res.returncode == 2 and "'beta' is not a configuration key" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o" / "tune").exists()


def _objects(uri: str) -> list[str]:
    """The paths of every object under an s3:// prefix, relative to it."""
    from pyarrow import fs as pafs

    from shared import storage

    filesystem, root = storage.resolve(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(900)
def test_tune_quick_two_trials_on_s3(s3_base, tmp_path):
    """2 trials of 2 PCE epochs on the tiny synthetic set, one at a time (2 cores), with
    --out on an S3 endpoint (moto): the trials' run folders, Tune's state and the tables
    are objects there, and nothing lands in a local folder."""
    from shared import storage

    out = s3_base
    root_before = set(os.listdir(ROOT))
    res = run_cli("tune", "--method", "pce", "--trials", 2, "--quick", "--max-concurrent", 1, "--out", out, timeout=800)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    assert set(os.listdir(ROOT)) == root_before  # no s3:/… folder in the working directory
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(out, "trials.csv")).decode())))
    assert len(rows) == 2 and len({(r["lr"], r["weight_decay"]) for r in rows}) == 2  # 2 sampled configurations
    assert all(0 <= float(r["val_miou"]) <= 1 for r in rows)
    assert [float(r["val_miou"]) for r in rows] == sorted((float(r["val_miou"]) for r in rows), reverse=True)
    objects = _objects(out)
    for r in rows:  # a trial ASHA stopped has no summary; the others trained the whole budget
        assert r["stopped_early"] == "True" or int(r["epochs"]) == 2
        assert (r["stopped_early"] == "False") == (f"trials/{r['trial']}/summary.json" in objects)
        assert f"trials/{r['trial']}/checkpoints/last.pt" in objects
    assert "trials.md" in objects
    # Tune's experiment state on S3 (what a rerun restores from), and every epoch of every
    # trial seen by Tune (ASHA's input): one progress row per epoch reported
    tune_files = [o for o in objects if re.match(r"tune/tune-pce-[0-9a-f]{8}/", o)]
    assert any(re.search(r"/experiment_state-.*\.json$", o) for o in tune_files), tune_files
    progress = [o for o in tune_files if o.endswith("/progress.csv")]
    assert len(progress) == 2
    for path in progress:
        text = storage.read_bytes(storage.join(out, path)).decode()
        epochs = [row["epoch"] for row in csv.DictReader(io.StringIO(text)) if row.get("epoch")]
        assert epochs and epochs[0] == "1", path
    assert sum(line.startswith("[") and "search (lr=" in line for line in res.stdout.splitlines()) == 2
    # best.toml: the best trial's configuration, which train --config takes from S3 too
    best = read_toml(storage.join(out, "best.toml"))
    assert float(rows[0]["lr"]) == pytest.approx(best["lr"], rel=1e-3) and best["method"] == "pce"
    printed = cli_in_process("train", "--config", storage.join(out, "best.toml"), "--out", tmp_path / "again",
                             "--print-config")
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert f"lr = {best['lr']}" in printed.stdout


def test_what_one_run_holds_and_how_many_ran_at_once():
    import json
    from types import SimpleNamespace

    from experiments.trials import demand, most_at_once
    from trainer.config import TrainConfig

    assert demand(TrainConfig(method="pce", num_workers=2, loader_workers=1, use_gpu=False)) == {"CPU": 4, "GPU": 0}
    # first solvers + trainer
    assert demand(TrainConfig(method="grid-tr", solvers="3:8", loader_workers=0, use_gpu=True)) == {"CPU": 4, "GPU": 1}
    spans = [(0, 10), (5, 12), (11, 20), (30, 31)]  # at most two at once (0-10 with 5-12, 5-12 with 11-20)
    results = [SimpleNamespace(metrics={"summary": json.dumps({"trial_started": a, "trial_ended": b})}) for a, b in spans]
    assert most_at_once(results) == 2
    stopped = SimpleNamespace(metrics={"val_miou": 0.1, "timestamp": 19, "time_total_s": 13.0})  # ran 6-19, no summary
    assert most_at_once(results + [stopped]) == 3


def test_a_dead_actors_placement_group_is_freed_by_the_driver():
    """Why `remove_orphaned_placement_groups` stays with Ray Train V2: the placement group
    of a (non-detached) actor that dies, as Ray Train's controller of a trial ASHA stopped,
    keeps its CPUs until the job ends (Ray Train's own cleaner asks the state API, which a
    private Ray does not serve); the driver's sweep frees it."""
    import time

    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from experiments.trials import remove_orphaned_placement_groups
    from shared.ray_session import connect

    connect(None, num_cpus=2, quiet=True)
    try:
        @ray.remote(num_cpus=0)
        class Controller:  # makes a worker group's placement group, as Ray Train's does
            def make(self):
                group = placement_group([{"CPU": 1}])
                ray.get(group.ready())
                return group

        controller = Controller.remote()
        group = ray.get(controller.make.remote())
        ray.kill(controller)
        time.sleep(2)
        assert placement_group_table(group)["state"] == "CREATED"  # its CPU still held
        assert remove_orphaned_placement_groups() == 1
        deadline = time.monotonic() + 30
        while placement_group_table(group)["state"] != "REMOVED" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert placement_group_table(group)["state"] == "REMOVED"
        assert remove_orphaned_placement_groups() == 0
    finally:
        ray.shutdown()


def test_trials_sharing_shards_get_folders_of_their_own():
    """A run claims its shard base and clears what another run left there: trials of one
    experiment (tune, table1, sweep-tr-weight) given one --shards must not share it."""
    from experiments.trials import trial_config
    from shared.config import to_dict
    from trainer.config import TrainConfig

    base = {name: to_dict(TrainConfig(method="grid-tr", out=f"/r/{name}", shards="s3://b/shards?x=1"))
            for name in ("tr-0.1", "tr-1")}
    cells = {trial_config({"run": name}, base).shard_base() for name in base}
    searched = {trial_config({"run": "tr-1", "lr": 0.1}, base, trial_id).shard_base() for trial_id in ("t1", "t2")}
    assert cells == {"s3://b/shards/tr-0.1?x=1", "s3://b/shards/tr-1?x=1"}
    assert searched == {"s3://b/shards/tr-1/t1?x=1", "s3://b/shards/tr-1/t2?x=1"}
    assert trial_config({"run": "tr-1"}, {"tr-1": to_dict(TrainConfig(out="/r"))}).shard_base() == "/r/shards"


def test_an_experiment_state_cut_off_by_a_kill_is_not_restored(tmp_path):
    """Tune rewrites its experiment state in place after every step: a driver killed in that
    instant leaves it empty (seen in a suite run; Tune then restored an experiment without
    its trials, and every trial failed). `fit` starts such an experiment afresh instead."""
    from experiments.trials import saved_state_readable

    assert not saved_state_readable(str(tmp_path))  # nothing saved
    (tmp_path / "experiment_state-2026-12-06_23-46-39.json").write_text("")  # cut off
    assert not saved_state_readable(str(tmp_path))
    (tmp_path / "experiment_state-2026-12-06_23-47-44.json").write_text('{"trial_data": []}')  # the newer one reads
    assert saved_state_readable(str(tmp_path))
    (tmp_path / "experiment_state-2026-12-06_23-50-00.json").write_text('{"trial_da')
    assert not saved_state_readable(str(tmp_path))
