"""One epoch of training and one pass of evaluation: a plain, standard loop."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from trainer.metrics import confusion_matrix, miou, trimap_confusions
from trainer.methods import method_loss
from trainer.outliers import OutlierModel

TRIMAP_WIDTHS = (1, 2, 4, 6, 8, 10, 15, 20, 25, 30, 35, 40)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 on CPU (CPU bf16 is slower than fp32 here)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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


def train_epoch(model, loader, optimizer, *, method, eps, nu, device, step, total_steps, base_lrs, progress=None,
                batch_average=False, seed_loss="ce"):
    """SGD over the loader once; returns (mean loss, next global step). `eps`: a float,
    or an `OutlierModel` whose ε is read at every step (learned with the network)."""
    model.train()
    losses = []
    outliers = eps if isinstance(eps, OutlierModel) else None
    for batch in loader:
        batch = to_device(batch, device)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = poly_lr(base, step, total_steps)
        with autocast(device):
            logits = model(batch["image"])
        loss = method_loss(method, logits, batch, eps() if outliers else eps, nu, batch_average, seed_loss)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite {method} loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if outliers is not None:
            outliers.average_gradients()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if progress is not None:
            progress.update(len(batch["index"]))
    return float(np.mean(losses)) if losses else float("nan"), step


@torch.no_grad()
def predict(model, image: torch.Tensor, device) -> torch.Tensor:
    """Labels (H×W) for one RGB image tensor 3×H×W in 0..255."""
    model.eval()
    with autocast(device):
        logits = model(image[None].to(device))
    return logits.argmax(1)[0]


@torch.no_grad()
def confusions(model, dataset, num_classes, device, indices=None, widths=TRIMAP_WIDTHS, progress=None):
    """The val confusion matrix and the per-band-width trimap confusions, summed."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    trimap = torch.zeros(len(widths), num_classes, num_classes, dtype=torch.int64)
    for i in range(len(dataset)) if indices is None else indices:
        item = dataset[i]
        pred = predict(model, item["image"], device).cpu()
        conf += torch.as_tensor(confusion_matrix(pred, item["mask"], num_classes))
        trimap += torch.as_tensor(np.stack(trimap_confusions(pred, item["mask"], num_classes, widths)))
        if progress is not None:
            progress.update(1)
    return conf, trimap


def scores(conf, trimap, widths=TRIMAP_WIDTHS) -> dict:
    """mIoU, per-class IoU and trimap mIoU per band width from summed confusions."""
    m, per_class = miou(conf.numpy())
    return {
        "val_miou": float(m),
        "per_class_iou": [None if (v is None or np.isnan(v)) else float(v) for v in per_class],
        "trimap": {str(w): float(miou(t.numpy())[0]) for w, t in zip(widths, trimap)},
    }
