"""`eval` and `predict`: a checkpoint on a val split, or on image files."""
from __future__ import annotations

import os

import numpy as np
import torch

from shared import storage
from shared.errors import UserError
from trainer import engine
from shared.image_io import label_png, read_image
from trainer.datasets import EvalSet
from trainer.splits import check_samples, load_split, read_classes
from trainer.architectures import build_model, checkpoint_arch
from trainer.runlog import load_checkpoint


def load_model(checkpoint: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's network (the architecture it records) in eval mode, and its state."""
    state = load_checkpoint(checkpoint)
    model = build_model(checkpoint_arch(state), state["num_classes"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"{checkpoint}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), state


def checkpoint_precision(state: dict) -> str:
    """The --precision its run trained and evaluated at (checkpoints from before it: auto)."""
    return state.get("precision", "auto")


def evaluate_checkpoint(checkpoint: str, data: str, fmt: str, scribbles: str = "") -> dict:
    """The numbers training reports for this checkpoint, recomputed (SPEC §7)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not os.path.exists(data):
        raise UserError(f"--data: no such data set folder: {data!r}")
    model, state = load_model(checkpoint, device)
    classes = read_classes(data, fmt)
    if len(classes) != state["num_classes"]:
        raise UserError(f"{checkpoint}: a {state['num_classes']}-class model, but {data} has {len(classes)} classes")
    samples = load_split(data, fmt, "val", scribbles)
    check_samples(samples, len(classes))
    conf, trimap = engine.confusions(model, EvalSet(samples, len(classes)), len(classes), device,
                                     precision=checkpoint_precision(state))
    return {**engine.scores(conf, trimap), "class_names": classes}


def predict_files(checkpoint: str, images: tuple[str, ...], out: str) -> list[str]:
    """One palette PNG per image, at the image's size; returns the written paths."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, state = load_model(checkpoint, device)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise UserError(f"predict: several inputs would write {clash[0]}.png to --out {out}; rename them or predict separately")
    written = []
    for path in images:
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1).float()
        labels = engine.predict(model, image, device, checkpoint_precision(state)).cpu().numpy().astype(np.uint8)
        target = storage.join(out, os.path.splitext(os.path.basename(path))[0] + ".png")
        storage.write_bytes(target, label_png(labels))
        written.append(target)
    return written
