"""`--plan` of table1, sweep-tr-weight and tune: every run resolved as it would train,
its config.toml written into its folder, a table printed, nothing trained.

The run that follows into the same --out computes the same configurations (the same
flags resolve the same way) and trains exactly these: each run's own config.toml, written
when it starts, is the planned file (tests/test_plan.py checks it).
"""
from __future__ import annotations

import copy
import math

from shared import storage
from shared.config import to_dict
from trainer.config import TrainConfig, default_eps
from trainer.imagenet import IMAGENET
from trainer.methods import METHODS
from trainer.run_folder import RunFolder
from trainer.tomlio import dumps

# Stage A's cost, from the solver benchmark (benchmarks/README.md: 361 ms a 375×500 image
# warm, one core): seconds per megapixel. An estimate: label count and image content move it.
STAGE_A_S_PER_MPIXEL = 0.361 / (375 * 500 / 1e6)


def resolved(cfg: TrainConfig) -> TrainConfig:
    """`cfg` as the run's check_inputs resolves it before writing its config.toml
    (learning rate, augmentation, network)."""
    from trainer.architectures import resolve_arch

    cfg = copy.deepcopy(cfg)
    cfg.validate()
    cfg.arch = resolve_arch(cfg.arch, None, cfg.backbone_weights)  # an --init cell's arch is set by its maker
    return cfg


def stage_a_core_minutes(cfg: TrainConfig, pixels: dict) -> float | None:
    """Estimated solver core-minutes of one stage-A round of `cfg` (None: no stage A)."""
    if not METHODS[cfg.method].needs_proposals:
        return None
    key = (cfg.data, cfg.format, cfg.scribbles)
    if key not in pixels:
        from trainer.splits import image_size, load_split

        pixels[key] = sum(math.prod(image_size(s.image_path)) for s in load_split(cfg.data, cfg.format, "train", cfg.scribbles))
    return pixels[key] / 1e6 * STAGE_A_S_PER_MPIXEL / 60


def write_plan(runs: dict[str, TrainConfig], log=print) -> dict[str, TrainConfig]:
    """Resolve every run, write OUT/config.toml of each, print the plan; returns the
    resolved configurations."""
    from trainer.splits import read_classes

    pixels: dict = {}
    rows, done = [], {}
    for name, cfg in runs.items():
        r = done[name] = resolved(cfg)
        storage.write_bytes(RunFolder(r.out).config, dumps(to_dict(r)).encode())
        tr = METHODS[r.method].needs_proposals
        eps = (r.eps if r.eps is not None else default_eps(len(read_classes(r.data, r.format)))) if tr else None
        minutes = stage_a_core_minutes(r, pixels)
        weights = "ImageNet" if r.backbone_weights == IMAGENET else (r.backbone_weights or "random weights")
        start = (f"{_short(r.init)}'s model" if r.init else
                 f"{weights}, {r.pretrain_epochs} PCE epochs first" if r.pretrains() else weights)
        rows.append([name, r.method, start, str(r.epochs), f"{r.lr:g}", str(r.batch_size), str(r.crop_size),
                     "" if eps is None else f"{eps:g}", f"{r.solver.tr_weight:g}" if tr else "",
                     "" if minutes is None else f"{minutes:.3g} × {math.ceil(r.epochs / r.epochs_per_round)}"])
    header = ["cell", "method", "starts from", "epochs", "LR", "batch", "crop", "ε", "λ",
              "stage-A core-min/round × rounds (est.)"]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    for line in (header, *rows):
        log("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
    log(f"plan: {len(rows)} run(s), each config.toml written into its folder; nothing trained. "
        f"Stage-A estimate: {STAGE_A_S_PER_MPIXEL:.2f} s per megapixel on one core (benchmarks/README.md).")
    return done


def _short(path: str) -> str:
    """An --init checkpoint by its run folder's name."""
    parts = path.replace("\\", "/").rstrip("/").split("/")
    return parts[-3] if len(parts) >= 3 else path
