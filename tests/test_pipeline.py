"""End to end: the CLI, real Ray (local, 127.0.0.1), real GCO, real shards."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import helpers
from tests.helpers import ROOT

UNSCRIBBLED = "train_0000"  # the sync run's training image without a scribble


def run_cli(*args, env=None, timeout=600):
    return helpers.run_cli(*args, env=env, timeout=timeout, check=True)


def epochs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data(synthetic_set):
    return synthetic_set(8, 4, 48, seed=1)


@pytest.fixture(scope="module")
def sync_run(data, tmp_path_factory):
    """grid-tr with the sync schedule and a learned ε per class, configured from a TOML
    file, on `data` with one training image's scribbles all blank (UNSCRIBBLED)."""
    import shutil

    copy = str(tmp_path_factory.mktemp("data") / "set")
    shutil.copytree(data, copy)
    Image.fromarray(np.full((48, 48), 255, np.uint8), mode="L").save(os.path.join(copy, "scribbles", UNSCRIBBLED + ".png"))
    data = copy
    out = tmp_path_factory.mktemp("sync") / "run"
    config = tmp_path_factory.mktemp("cfg") / "run.toml"
    config.write_text(
        f'data = "{data}"\nformat = "synthetic"\nmethod = "grid-tr"\nepochs = 3\npretrain_epochs = 2\n'
        f'epochs_per_round = 1\nschedule = "sync"\nbatch_size = 4\ncrop_size = 48\nshard_size = 3\n'
        f'eps_model = "learned-per-class"\n'
        f"\n[solver]\ntr_weight = 0.1\n"
    )
    proc = run_cli("--local", "train", "--config", str(config), "--out", str(out), "--max-iter", "3")
    (out.parent / "terminal.log").write_text(proc.stdout + proc.stderr)
    return str(out)


def test_sync_run_writes_every_output(sync_run, data):
    summary = json.load(open(os.path.join(sync_run, "summary.json")))
    for key in ("method", "dataset", "scribble_length", "epochs", "train_images", "val_images", "val_miou",
                "per_class_iou", "wall_s", "stage_b_s", "trainer_stall_s", "stage_a_images",
                "proposals_missing", "solvers", "mean_staleness", "max_staleness", "solver_restarts"):
        assert key in summary, key
    assert summary["proposals_missing"] == 0
    # three rounds of eight images, the one without scribbles included (stage A over all
    # labels, SPEC §1): not an error, counted and reported by id
    assert summary["stage_a_images"] == 8 * 3
    assert summary["images_without_scribbles"] == 1 and summary["train_images"] == 8
    assert UNSCRIBBLED in open(os.path.join(os.path.dirname(sync_run), "terminal.log")).read()
    assert 0 <= summary["val_miou"] <= 1
    assert summary["val_miou"] > helpers.majority_class_miou(data, "synthetic", 4)  # it learned
    assert os.path.exists(os.path.join(sync_run, "checkpoints", "last.pt"))
    assert os.path.exists(os.path.join(sync_run, "checkpoints", "best.pt"))


def test_learned_eps_per_class_is_logged_every_epoch_and_trains(sync_run):
    from trainer.config import default_eps

    records = [json.loads(line) for line in open(os.path.join(sync_run, "metrics.jsonl"))]
    eps = [r["eps"] for r in records if r["phase"] == "grid-tr"]
    assert len(eps) == 3 and all(len(e) == 4 for e in eps)  # K = 4 classes, every Grid-TR epoch
    assert eps[0] == pytest.approx([default_eps(4)] * 4, rel=1e-5)  # starts at the given ε
    assert eps[-1] != pytest.approx(eps[0], abs=1e-6)  # and moved with the network
    assert all(0 < e < 3 / 4 for e in eps[-1])


def test_terminal_shows_each_epoch_once_without_ray_train_chatter(sync_run):
    log = open(os.path.join(os.path.dirname(sync_run), "terminal.log")).read()
    assert len(re.findall(r"epoch \d+/5 \[", log)) == 5  # 2 PCE + 3 Grid-TR epochs, each once
    assert "Reporting training result" not in log and "Checkpoint successfully created" not in log
    assert "Failed to query Ray Train Controller" not in log


def test_local_workers_state_api_never_reaches_another_ray(tmp_path):
    """Ray Train's placement-group cleaner asks the state API whether the controller is
    alive; in local mode that must not reach the newest Ray on the machine. The driver
    runs outside the checkout: workers still find the packages (the setup hook's too)."""
    probe = (
        f"import sys; sys.path.insert(0, {ROOT!r})\n"
        "from shared.ray_session import connect, NO_API_SERVER\n"
        "import os, ray\n"
        "from ray.util.state import list_actors\n"
        "from ray.util.state.exception import RayStateApiException\n"
        "@ray.remote\n"
        "def ask():\n"
        "    try:\n"
        "        list_actors()\n"
        "        return 'answered'\n"
        "    except RayStateApiException:\n"
        "        import shared.ray_logging\n"
        "        return os.environ['RAY_API_SERVER_ADDRESS'], shared.ray_logging.__file__\n"
        "connect(None)\n"
        "print('worker:', *ray.get(ask.remote()), NO_API_SERVER)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    hook = os.path.join(ROOT, "shared", "ray_logging.py")
    assert f"worker: http://127.0.0.1:1 {hook} http://127.0.0.1:1" in proc.stdout


def test_sync_never_uses_a_stale_proposal(sync_run):
    tr = [e for e in epochs(sync_run) if e["phase"] == "grid-tr"]
    assert len(tr) == 3 and [e["round"] for e in tr] == [0, 1, 2]
    assert all(e["max_staleness"] == 0 for e in tr)


def test_config_file_run_keeps_config_tensorboard_and_panels(sync_run):
    config = open(os.path.join(sync_run, "config.toml")).read()
    assert 'schedule = "sync"' in config and "max_iter = 3" in config  # the flag overrode nothing else
    events = os.listdir(os.path.join(sync_run, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    panels = os.path.join(sync_run, "panels")
    last = sorted(os.listdir(panels))[-1]
    pngs = os.listdir(os.path.join(panels, last))
    assert any(p.startswith("val-") for p in pngs) and any(p.startswith("train-") for p in pngs)
    assert Image.open(os.path.join(panels, last, pngs[0])).size[0] > 48 * 4


def test_eval_reproduces_training_miou(sync_run, data):
    summary = json.load(open(os.path.join(sync_run, "summary.json")))
    out = helpers.cli_in_process("eval", "--checkpoint", os.path.join(sync_run, "checkpoints", "last.pt"), "--data", data,
                                 "--json")  # no Ray: in this process, as test_readme runs it in a subprocess
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["val_miou"] == pytest.approx(summary["val_miou"], abs=1e-6)
    assert len(result["trimap"]) > 5


def test_predict_writes_masks_at_image_size(sync_run, data, tmp_path):
    image = os.path.join(data, "images", open(os.path.join(data, "val.txt")).read().split()[0] + ".png")
    out = helpers.cli_in_process("predict", "--checkpoint", os.path.join(sync_run, "checkpoints", "last.pt"), image,
                                 "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    written = out.stdout.strip().splitlines()
    assert len(written) == 1
    mask = Image.open(written[0])
    assert mask.size == Image.open(image).size and mask.mode == "P"
    assert np.asarray(mask).max() < 4


def test_overlapped_staleness_stays_within_bound_and_every_socket_is_loopback(data, tmp_path):
    """Also: no process of the local run (Ray, the trainer worker, the solvers) listens
    on anything but loopback (SPEC §8, the developers' guide)."""
    out = tmp_path / "run"
    _, sockets = helpers.run_cli_watching_sockets(
        "--local", "train", "--data", data, "--method", "grid-tr", "--epochs", "4", "--pretrain-epochs", "1",
        "--epochs-per-round", "1", "--max-staleness", "1", "--batch-size", "4", "--crop-size", "48",
        "--shard-size", "2", "--out", str(out))
    assert sockets, "no listening socket seen: the watch is broken"
    assert [s for s in sockets if not helpers.is_loopback(s[2])] == []
    tr = [e for e in epochs(str(out)) if e["phase"] == "grid-tr"]
    assert max(e["max_staleness"] for e in tr) <= 1
    summary = json.load(open(out / "summary.json"))
    assert summary["max_staleness"] <= 1 and summary["proposals_missing"] == 0
    assert summary["schedule"] == "overlapped"
