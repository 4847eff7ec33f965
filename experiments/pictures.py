"""The two pictures of a job: comparison.png (what each method predicts, beside the
stage-A proposal and the ground truth) and curves.png (val mIoU per epoch).

Both are made from the run folders alone (checkpoints, metrics.jsonl, config.toml), so
`python -m trainer report` can draw them for any finished or running run.
"""
from __future__ import annotations

import io
import json
import posixpath
import tomllib

import numpy as np
import torch

from shared import storage
from shared.config import SolverConfig, from_dict
from trainer.config import TrainConfig
from solver_service.alpha_expansion import solve
from trainer.architectures import build_model
from trainer.datasets import EvalSet
from trainer.splits import load_split, read_classes
from trainer.engine import predict
from trainer.metrics import confusion_matrix, miou
from trainer.run_folder import RunFolder
from trainer.runlog import load_checkpoint
from trainer.stage_a import neg_log_probs
from trainer.visualize import colorize, grid, png_bytes, with_scribbles

N_IMAGES = 4  # val images in comparison.png


def read_config(run: str) -> TrainConfig:
    """A run folder's config.toml as the TrainConfig it was trained with."""
    raw = tomllib.loads(storage.read_bytes(RunFolder(run).config).decode())
    return from_dict(TrainConfig, raw)


def read_metrics(run: str) -> list[dict]:
    """A run folder's metrics.jsonl, one record per epoch ([] before its first epoch)."""
    uri = RunFolder(run).metrics
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def epochs_before(run: str) -> int:
    """The epochs of the run that `run` starts from (the run folder of its --init), after
    which its curve is drawn; 0 for a run from scratch or without a config.toml."""
    try:
        init = read_config(run).init
    except FileNotFoundError:
        return 0
    return len(read_metrics(posixpath.dirname(posixpath.dirname(init)))) if init else 0


def image_iou(pred: np.ndarray, mask: np.ndarray, num_classes: int) -> float:
    """mIoU of one image over the classes in its mask or prediction (255 in the mask ignored)."""
    return float(miou(confusion_matrix(pred, mask, num_classes))[0])


def _network(uri: str, num_classes: int) -> torch.nn.Module:
    state = load_checkpoint(uri)
    net = build_model(state["arch"], num_classes)
    net.load_state_dict(state["model"])
    return net.eval()


def proposal(net, item: dict, solver: SolverConfig, device) -> np.ndarray:
    """Stage A on one image (eq. 16): the Potts energy with its scribbles as hard
    constraints and λ·KL to `net`'s prediction, solved by the run's algorithm."""
    probs = np.exp(-neg_log_probs(net, [item["image"]], device)[0])
    return solve(item["image"].permute(1, 2, 0).numpy(), probs, item["seeds"].numpy().astype(np.uint8),
                 tr_weight=solver.tr_weight, potts_weight=solver.potts_weight, max_iter=solver.max_iter,
                 restrict_labels=solver.restrict_labels, algorithm=solver.algorithm).labels


def comparison(data: str, fmt: str, scribbles: str, checkpoints: dict[str, str], solver: SolverConfig,
               proposals_from: str, n_images: int = N_IMAGES, device=torch.device("cpu")) -> np.ndarray:
    """For the first val images: image + scribbles | stage-A proposal (from the network of
    `proposals_from`) | one column per method in `checkpoints` | ground truth, with each
    image's IoU per method under its tile."""
    classes = read_classes(data, fmt)
    K = len(classes)
    valset = EvalSet(load_split(data, fmt, "val", scribbles), K)
    nets = {name: _network(uri, K) for name, uri in checkpoints.items()}
    rows, captions = [], []
    for i in range(min(n_images, len(valset))):
        item = valset[i]
        mask = item["mask"].numpy()
        preds = {name: predict(net, item["image"], device).cpu().numpy() for name, net in nets.items()}
        prop = proposal(nets[proposals_from], item, solver, device)
        image = item["image"].permute(1, 2, 0).numpy()
        rows.append([with_scribbles(image, item["seeds"].numpy(), K), colorize(prop, K),
                     *(colorize(p, K) for p in preds.values()), colorize(mask, K)])
        captions.append([item["image_id"], f"IoU {100 * image_iou(prop, mask, K):.1f}",
                         *(f"IoU {100 * image_iou(p, mask, K):.1f}" for p in preds.values()), ""])
    titles = ["image + scribbles", "stage-A proposal", *checkpoints, "ground truth"]
    return grid(rows, titles, classes, captions)


def curves(runs: dict[str, tuple[str, int]]) -> bytes:
    """PNG bytes: val mIoU per epoch of each run (name → (folder, epochs before its
    first, e.g. the PCE pretraining it starts from)), a dotted line where a stage-A
    round starts, and the proposals' mIoU per round where the data set has masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, (run, offset) in runs.items():
        records = read_metrics(run)
        evaluated = [r for r in records if "val_miou" in r]
        line, = ax.plot([offset + r["epoch"] for r in evaluated], [100 * r["val_miou"] for r in evaluated],
                        marker=".", label=name)
        rounds = [r for r in records if r.get("snapshot_images")]
        for r in rounds:
            ax.axvline(offset + r["epoch"] - 0.5, color=line.get_color(), linestyle=":", linewidth=1)
        first_of_round = {}
        for r in records:
            if "proposal_miou" in r:
                first_of_round.setdefault(r["round"], r)
        if first_of_round:
            ax.plot([offset + r["epoch"] for r in first_of_round.values()],
                    [100 * r["proposal_miou"] for r in first_of_round.values()], linestyle="none", marker="x",
                    color=line.get_color(), label=f"{name}: proposals vs masks")
    ax.set_xlabel("epoch (dotted: a stage-A round starts)")
    ax.set_ylabel("val mIoU %")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_job_pictures(out: str, cells: dict[str, str], pretrained: str | None = None,
                       proposals_from: str | None = None) -> dict[str, str]:
    """comparison.png and curves.png into the job folder `out` for its cells (name → run
    folder); `pretrained`: the cell the others start from (drawn first, the others after
    its epochs; no prediction column of its own); `proposals_from`: the stage-A cell
    whose network makes the proposal column (default: the last cell). Returns the paths."""
    offset = len(read_metrics(cells[pretrained])) if pretrained else 0
    runs = {name: (run, 0 if name == pretrained else offset) for name, run in cells.items()}
    paths = {"curves": storage.join(out, "curves.png"), "comparison": storage.join(out, "comparison.png")}
    storage.write_bytes(paths["curves"], curves(runs))
    methods = {name: RunFolder(run).last for name, run in cells.items() if name != pretrained}
    cfg = read_config(cells[proposals_from or list(methods)[-1]])
    picture = comparison(cfg.data, cfg.format, cfg.scribbles, methods, cfg.solver, proposals_from or list(methods)[-1])
    storage.write_bytes(paths["comparison"], png_bytes(picture))
    return paths
