"""What a first CUDA run would hit (issue 33), checked on CPU where it can be.

The meta device stands in for a GPU where host syncs matter: every read of a meta
tensor's values (`.item()`, `bool()`, `.tolist()`, `.cpu()`) raises, so code that runs on
it reads nothing from the device. Tests marked for CUDA run where one is present.
"""
import contextlib
import os

import numpy as np
import pytest
import torch

from trainer.config import TrainConfig
from shared.errors import UserError
from trainer import engine
from trainer.metrics import confusion_counts, confusion_matrix, trimap_confusions, trimap_counts
from trainer.outliers import OutlierModel

K = 4
META = torch.device("meta")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


def batches(n: int, size: int = 16, batch: int = 2, seed: int = 0) -> list[dict]:
    """Loader-like batches: uint8 label maps (some seeds, proposals everywhere), as the data sets give."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        seeds = torch.full((batch, size, size), 255, dtype=torch.uint8)
        seeds[:, ::4, ::4] = torch.randint(0, K, seeds[:, ::4, ::4].shape, generator=g).to(torch.uint8)
        out.append({
            "image": torch.rand(batch, 3, size, size, generator=g) * 255,
            "seeds": seeds,
            "proposal": torch.randint(0, K, (batch, size, size), generator=g).to(torch.uint8),
            "mask": torch.randint(0, K, (batch, size, size), generator=g).to(torch.uint8),
            "roi": torch.ones(batch, size, size, dtype=torch.bool),
            "index": torch.arange(i * batch, (i + 1) * batch),
        })
    return out


def tiny_net() -> torch.nn.Module:
    """A network small enough for a cheap test, batch norm included (eval mode matters)."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, K, 1))


def setup(device, eps_model="const"):
    torch.manual_seed(0)
    model = tiny_net().to(device)
    outliers = OutlierModel(eps_model, 0.5, K).to(device)
    optimizer = engine.make_optimizer([{"params": list(model.parameters())}, *outliers.param_groups(1e-3)],
                                      "adamw", 1e-3, 0.9, 5e-4)
    return model, outliers, optimizer, [g["lr"] for g in optimizer.param_groups]


# ------------------------------------------------------------------ no host sync in the step

@pytest.mark.parametrize("method,eps_model", [("pce", "const"), ("grid-gd", "const"),
                                              ("grid-tr", "learned-per-class"), ("full", "const")])
def test_the_training_step_reads_the_device_only_to_log(method, eps_model, monkeypatch):
    """On a device whose values cannot be read, an epoch of 5 steps logging every 2 runs
    through: its only reads are the logging ones, at steps 2, 4 and the end (Dense-GD's
    lattice, sized by the data, is the one exception: benchmarks/gpu.py measures it)."""
    import contextlib

    from trainer import losses

    monkeypatch.setattr(losses, "_no_autocast", lambda device: contextlib.nullcontext())  # autocast knows no meta
    reads = []
    monkeypatch.setattr(engine, "_read_losses", lambda total, method, first, step: reads.append(step) or 0.0)
    model, outliers, optimizer, base_lrs = setup(META, eps_model)
    _, step = engine.train_epoch(model, batches(5), optimizer, method=method, eps=outliers, nu=None, device=META,
                                 step=0, total_steps=5, base_lrs=base_lrs, log_every=2)
    assert step == 5 and reads == [2, 4, 5]


def test_a_non_finite_loss_ends_the_epoch_at_the_next_read():
    model, outliers, optimizer, base_lrs = setup(torch.device("cpu"))
    data = batches(3)
    data[0]["image"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite pce loss at a step in 10..11"):
        engine.train_epoch(model, data, optimizer, method="pce", eps=outliers, nu=None, device=torch.device("cpu"),
                           step=10, total_steps=20, base_lrs=base_lrs, log_every=2)


def test_the_mean_loss_is_the_epochs_mean():
    cpu = torch.device("cpu")
    model, outliers, optimizer, base_lrs = setup(cpu)
    data = batches(3)
    from trainer.methods import method_loss

    torch.manual_seed(1)
    mean, _ = engine.train_epoch(model, data, optimizer, method="pce", eps=outliers, nu=None, device=cpu,
                                 step=0, total_steps=3, base_lrs=base_lrs, log_every=2)
    model2, outliers2, optimizer2, _ = setup(cpu)
    losses = []
    for step, b in enumerate(data):  # the same steps, read one by one
        optimizer2.param_groups[0]["lr"] = engine.poly_lr(base_lrs[0], step, 3)
        b = engine.to_device(b, cpu)
        loss = method_loss("pce", model2(b["image"]), b, 0.5, None)
        optimizer2.zero_grad()
        loss.backward()
        optimizer2.step()
        losses.append(loss.item())
    assert mean == pytest.approx(np.mean(losses), rel=1e-5)


def test_label_maps_travel_as_uint8_and_arrive_long():
    b = engine.to_device(batches(1)[0], torch.device("cpu"))
    assert all(b[k].dtype == torch.int64 for k in engine.LABEL_MAPS) and b["roi"].dtype == torch.bool


@CUDA
def test_the_cuda_step_does_not_sync(monkeypatch):
    """On CUDA, torch reports every synchronising call: none but the logging read."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(engine, "_read_losses", lambda *a: 0.0)
    model, outliers, optimizer, base_lrs = setup(cuda, "learned")
    data = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches(4)]
    engine.train_epoch(model, data[:1], optimizer, method="grid-tr", eps=outliers, nu=None, device=cuda,
                       step=0, total_steps=4, base_lrs=base_lrs)  # warm-up: lazy CUDA initialisation syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.train_epoch(model, data[1:], optimizer, method="grid-tr", eps=outliers, nu=None, device=cuda,
                           step=1, total_steps=4, base_lrs=base_lrs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_device_metrics_read_nothing_and_match_the_host_ones():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, K, (3, 20, 24), generator=g)
    gt[:, :4] = 255
    gt[2] = 1  # no boundary at all
    pred = torch.randint(0, K, (3, 20, 24), generator=g)
    widths = (1, 2, 5)
    assert confusion_counts(pred.to(META), gt.to(META), K).shape == (K, K)  # no host read on a device
    assert trimap_counts(pred.to(META), gt.to(META), K, widths).shape == (3, K, K)
    np.testing.assert_array_equal(confusion_counts(pred, gt, K).numpy(),
                                  sum(confusion_matrix(p, t, K) for p, t in zip(pred, gt)))
    np.testing.assert_array_equal(trimap_counts(pred, gt, K, widths).numpy(),
                                  sum(trimap_confusions(p, t, K, widths) for p, t in zip(pred, gt)))


class Items(torch.utils.data.Dataset):
    def __init__(self, sizes, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = [{"image": torch.rand(3, h, w, generator=g) * 255,
                       "mask": torch.randint(0, K, (h, w), generator=g).to(torch.uint8)} for h, w in sizes]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_batched_evaluation_equals_one_image_at_a_time():
    """Consecutive images of one size share a forward (a batch-norm network in eval mode:
    the batch changes nothing); the counts are the per-image ones, summed."""
    torch.manual_seed(0)
    model = tiny_net()
    data = Items([(16, 16)] * 5 + [(16, 24)] * 2 + [(16, 16)])
    cpu = torch.device("cpu")
    conf, trimap = engine.confusions(model, data, K, cpu, batch_size=3)
    want_conf, want_trimap = 0, 0
    for item in data.items:
        pred = engine.predict(model, item["image"], cpu)
        want_conf = want_conf + confusion_matrix(pred, item["mask"], K)
        want_trimap = want_trimap + trimap_confusions(pred, item["mask"], K, engine.TRIMAP_WIDTHS)
    np.testing.assert_array_equal(conf.numpy(), want_conf)
    np.testing.assert_array_equal(trimap.numpy(), want_trimap)
    assert [len(b) for b in engine._same_size_batches(data, range(len(data)), 3)] == [3, 2, 2, 1]


# ------------------------------------------------------------------ AMP, TF32, determinism

def test_bf16_only_where_native():
    assert engine.amp_dtype((8, 0)) is torch.bfloat16 and engine.amp_dtype((9, 0)) is torch.bfloat16
    assert engine.amp_dtype((7, 5)) is None and engine.amp_dtype((7, 0)) is None  # T4, V100: fp32
    assert engine.amp_dtype(None) is None  # CPU
    assert engine.amp_dtype((9, 0), "fp32") is None  # --precision fp32 (--preset paper): the reference's float32


def test_autocast_follows_the_devices_capability(monkeypatch):
    import contextlib
    import warnings

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert isinstance(engine.autocast(torch.device("cuda")), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": this machine's, not the rule's
        ctx = engine.autocast(torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype is torch.bfloat16


def test_eval_and_predict_infer_at_the_checkpoints_precision(synthetic_set, tmp_path, monkeypatch):
    """A run trained at --precision fp32 is evaluated and predicted in float32 too: the
    checkpoint records it; one from before --precision infers at auto."""
    from trainer.architectures import build_model
    from trainer.evaluate import evaluate_checkpoint, predict_files

    data = synthetic_set(4, 2, 32)
    seen = []

    def recording(device, precision="auto"):
        seen.append(precision)
        return contextlib.nullcontext()

    monkeypatch.setattr(engine, "autocast", recording)
    state = {"model": build_model("unet", 4).state_dict(), "num_classes": 4, "arch": "unet"}
    for saved, expected in (({"precision": "fp32"}, "fp32"), ({}, "auto")):
        torch.save({**state, **saved}, tmp_path / "c.pt")
        seen.clear()
        evaluate_checkpoint(str(tmp_path / "c.pt"), data, "synthetic")
        predict_files(str(tmp_path / "c.pt"), (os.path.join(data, "images", "val_0000.png"),), str(tmp_path / "p"))
        assert seen and set(seen) == {expected}, (saved, seen)

def test_the_snapshot_pass_runs_without_tf32():
    from trainer.stage_a import neg_log_probs

    seen = []

    class Net(torch.nn.Module):
        def forward_lowres(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return torch.zeros(x.shape[0], K, 4, 4)

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # Ampere's default for convolutions
    try:
        neg_log_probs(Net(), [torch.zeros(3, 16, 16), torch.zeros(3, 8, 8)], torch.device("cpu"))
        assert seen == [(False, False)] * 2
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_deterministic_option(monkeypatch):
    from trainer.config import resolve_train_config

    cfg = resolve_train_config({"data": "x", "deterministic": True, "resume_dir": None, "config_file": None})
    assert cfg.deterministic and not TrainConfig().deterministic
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        engine.make_deterministic()
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]


# ------------------------------------------------------------------ GPU or not, and loaders

def test_a_cluster_without_gpus_now_needs_an_explicit_choice():
    from trainer.driver import resolve_use_gpu

    with pytest.raises(UserError, match="--gpu or --no-gpu: the cluster .* no GPU now"):
        resolve_use_gpu(None, private=False, cluster_gpus=0)
    assert resolve_use_gpu(None, private=False, cluster_gpus=2) is True
    assert resolve_use_gpu(None, private=True, cluster_gpus=0) is False  # a private Ray: this machine
    assert resolve_use_gpu(True, private=False, cluster_gpus=0) is True  # the autoscaler starts GPU nodes
    assert resolve_use_gpu(False, private=False, cluster_gpus=4) is False


def test_loader_workers_default_from_the_gpu_nodes_cpus(capsys):
    from trainer.driver import GPU_LOADERS_MAX, GPU_LOADERS_UNSEEN, default_loader_workers

    def node(cpus, gpus=0, alive=True):
        return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    assert default_loader_workers(False, [node(8, 1)]) == 0
    assert default_loader_workers(True, [node(16), node(8, 1), node(32, 2)]) == 7  # the smallest: 8 CPUs a GPU
    assert default_loader_workers(True, [node(96, 8), node(4, 1, alive=False)]) == GPU_LOADERS_MAX  # 12 CPUs a GPU, capped
    assert default_loader_workers(True, [node(16)]) == GPU_LOADERS_UNSEEN
    assert "no GPU node up yet" in capsys.readouterr().out


def test_gpu_benchmark_smoke():
    """benchmarks/gpu.py at tiny sizes on this machine's device, so that it cannot rot:
    every part runs and prints its figures (the CUDA tests are left out: pytest in pytest)."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--skip-tests"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"]["synced_steps_per_s"] > 0 and result["steps"]["async_steps_per_s"] > 0
    assert result["lattice"]["dense_gd_step_s"] > 0 and result["lattice"]["filter_fwd_bwd_s"] > 0
    assert all(v["corr"] > 0.95 for k, v in result["lattice_vs_exact"].items() if k.startswith("sigma"))
    assert result["deterministic"]["identical"]
