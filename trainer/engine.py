"""One epoch of training and one pass of evaluation: a plain, standard loop."""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shared.labels import UNLABELLED

from trainer.metrics import confusion_counts, miou, trimap_counts, trimap_miou
from trainer.methods import LABEL_COUNT, METHODS, method_loss
from trainer.outliers import OutlierModel

TRIMAP_WIDTHS = (1, 2, 4, 6, 8, 10, 15, 20, 25, 30, 35, 40)
# steps between the host's reads of the training loss (its finiteness, the epoch's mean):
# each read waits for the device to finish its queue
LOG_EVERY = 50
EVAL_BATCH = 8  # val images of one size evaluated in one forward
LABEL_MAPS = ("seeds", "proposal", "mask")  # uint8 in the batches; long on the device


def amp_dtype(capability: tuple[int, int] | None, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of training forwards on a CUDA device of this compute capability
    (None: not CUDA), None for plain float32 (always with `precision` "fp32", --precision:
    the reference's arithmetic). bf16 only where the tensor cores run it
    natively (compute capability ≥ 8.0, Ampere on): `torch.cuda.is_bf16_supported()`
    also counts the emulated bf16 of T4 and V100, slower than fp32 there. Not fp16 there
    either: it needs a GradScaler, whose step reads the overflow flag on the host every
    step and skips steps that overflow."""
    if precision == "fp32":
        return None
    return torch.bfloat16 if capability is not None and tuple(capability) >= (8, 0) else None


def autocast(device: torch.device, precision: str = "auto"):
    """Autocast at `amp_dtype` of the device; plain float32 on CPU (CPU bf16 is slower than fp32 here)."""
    dtype = amp_dtype(torch.cuda.get_device_capability(device) if device.type == "cuda" else None, precision)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_deterministic() -> None:
    """--deterministic: torch's deterministic kernels wherever it has one, cuDNN without
    benchmarking (which picks among kernels by timing), cuBLAS with the fixed workspace
    it needs for reproducible sums. Ops without a deterministic CUDA kernel (the backward
    of bilinear upsampling, in the networks' decoders and the regularisers' resizing)
    warn once and stay nondeterministic, rather than end the run (`warn_only`)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on the device; the label maps travel as uint8 (an eighth of
    int64's bytes) and become there the long indices the losses take."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    for key in LABEL_MAPS:
        if key in out:
            out[key] = out[key].long()
    return out


def poly_lr(base: float, step: int, total: int, power: float = 0.9) -> float:
    """The poly learning-rate schedule (SPEC §4)."""
    return base * (1 - min(step, total - 1) / total) ** power


def make_optimizer(param_groups: list[dict], name: str, lr: float, momentum: float, weight_decay: float):
    """SGD with momentum (the paper's) or AdamW (decoupled weight decay) over the groups."""
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def train_epoch(model, loader, optimizer, *, method, eps, nu, device, step, total_steps, base_lrs,
                batch_average=False, log_every=LOG_EVERY, seed_loss="ce", precision="auto"):
    """SGD over the loader once; returns (mean loss, next global step). `eps`: a float,
    or an `OutlierModel` whose ε is read at every step (learned with the network).
    The losses are summed on the device; the sum is read every `log_every` steps and at
    the end (`_read_losses`), the step's only host syncs (the lattice of Dense-GD aside,
    whose size is data-dependent). A non-finite loss makes the sum non-finite and ends the
    epoch at the next read, naming the steps it lies in; the weights it reached are never
    checkpointed. Under DDP each step's loss is normalised by the supervised pixels of the
    global batch (`labelled_count`), so its averaged gradient is the one-rank gradient of
    the global batch; the mean loss returned is this rank's share times the world size."""
    model.train()
    outliers = eps if isinstance(eps, OutlierModel) else None
    group = model.process_group if isinstance(model, DistributedDataParallel) else None
    total = torch.zeros((), device=device)
    first, n = step, 0
    for batch in loader:
        batch = to_device(batch, device)
        if group is not None:
            batch[LABEL_COUNT] = labelled_count(batch[METHODS[method].labels], group)
        for param_group, base in zip(optimizer.param_groups, base_lrs):
            param_group["lr"] = poly_lr(base, step, total_steps)
        with autocast(device, precision):
            logits = model(batch["image"])
        loss = method_loss(method, logits, batch, eps() if outliers else eps, nu, batch_average, seed_loss)
        total += loss.detach()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if outliers is not None:
            outliers.average_gradients()
        optimizer.step()
        step, n = step + 1, n + 1
        if n % log_every == 0:
            _read_losses(total, method, first, step)
    return _read_losses(total, method, first, step) / n if n else float("nan"), step


def labelled_count(labels: torch.Tensor, group=None) -> torch.Tensor:
    """A DDP rank's normaliser of a loss over labelled pixels (SPEC §2's seed count):
    max(1, labelled pixels of the global batch) / world size. DDP averages the ranks'
    gradients, so Σ_rank (this rank's sum / normaliser) / world = Σ over all ranks / count
    over all ranks: the step of one rank on the global batch, however the scribbles fall
    across the ranks (with each rank's own count, a rank with few seeds would weigh its
    pixels more). One all-reduce of one number per step, queued on the device (no host sync);
    every rank calls it at every step, as DDP's backward does."""
    count = (labels != UNLABELLED).sum()
    dist.all_reduce(count, group=group)
    return count.clamp(min=1).float() / dist.get_world_size(group)


def _read_losses(total: torch.Tensor, method: str, first: int, step: int) -> float:
    """The host's one read of the device's loss figures: the sum of the epoch's losses so
    far; FloatingPointError if it is not finite (a loss was not)."""
    value = float(total)
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite {method} loss at a step in {first}..{step - 1}")
    return value


@torch.no_grad()
def predict(model, image: torch.Tensor, device, precision: str = "auto") -> torch.Tensor:
    """Labels (H×W) for one RGB image tensor 3×H×W in 0..255."""
    model.eval()
    with autocast(device, precision):
        logits = model(image[None].to(device))
    return logits.argmax(1)[0]


def _same_size_batches(dataset, indices, batch_size: int):
    """The items at `indices`, in order, in lists of up to `batch_size` consecutive items of one size."""
    batch: list[dict] = []
    for i in indices:
        item = dataset[i]
        if batch and (len(batch) == batch_size or batch[0]["image"].shape != item["image"].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@torch.no_grad()
def confusions(model, dataset, num_classes, device, indices=None, widths=TRIMAP_WIDTHS,
               batch_size=EVAL_BATCH, precision="auto"):
    """The val confusion matrix and the per-band-width trimap confusions, summed (CPU
    tensors). Consecutive images of one size share a forward; the counts are summed on
    the device and read once at the end. `model` is the plain network, never the DDP
    wrapper: a rank may have fewer val images than another (or none), and DDP's forward
    broadcasts buffers, a collective every rank would have to join."""
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    trimap = torch.zeros(len(widths), num_classes, num_classes, dtype=torch.int64, device=device)
    for items in _same_size_batches(dataset, range(len(dataset)) if indices is None else indices, batch_size):
        images = torch.stack([item["image"] for item in items]).to(device, non_blocking=True)
        masks = torch.stack([item["mask"] for item in items]).to(device, non_blocking=True)
        with autocast(device, precision):
            pred = model(images).argmax(1)
        conf += confusion_counts(pred, masks, num_classes)
        trimap += trimap_counts(pred, masks, num_classes, widths)
    return conf.cpu(), trimap.cpu()


def scores(conf, trimap, widths=TRIMAP_WIDTHS) -> dict:
    """mIoU, per-class IoU and trimap mIoU per band width from summed confusions."""
    m, per_class = miou(conf.numpy())
    return {
        "val_miou": float(m),
        "per_class_iou": [None if (v is None or np.isnan(v)) else float(v) for v in per_class],
        "trimap": {str(w): float(v) for w, v in zip(widths, trimap_miou(trimap.numpy()))},
    }
