"""Named parameter presets, per scribble length and method (SPEC §4).

`paper` is the paper's Pascal VOC setting (DeepLabV3+ / MobileNetV2, K = 21), as the
authors' reference implementation runs it: 60 epochs, batch 12 on 513-pixel crops with
their augmentation (`trainer.transforms`, "reference"), every batch kept (no drop_last), SGD
momentum 0.9, weight decay 5e-4, poly LR (power 0.9), the decoder at 10× the backbone's
rate, every data term divided by the batch size as the reference does (`batch_average`,
so its learning rates apply unchanged), stage A before each round's batches (`sync`),
β = 100, max_iter 5, M = 5 stage-B epochs per round, (ε, λ) per scribble length
(`_PAPER_EPS_LAMBDA`), and per method the start, base LR and regulariser weight of the
method registry's `paper` recipe (`trainer.methods`). The PCE-GD model of Alg. 1 line 2
(pretraining, when a regularised method runs without --init) trains 60 epochs at
PCE-GD's LR.

The defaults of TrainConfig / SolverConfig are *not* a preset: they suit the built-in
synthetic set, and how they were chosen is recorded in docs/ (recipe-synthetic,
table1-synthetic-v2, lambda-synthetic-v2). A preset only fills in what the user did not set:
`trainer.config.resolve_train_config` layers defaults ← preset ← --resume config ← --config file ← flags.
"""
from __future__ import annotations

from shared.config import set_option
from shared.errors import UserError
from shared.labels import scribble_suffix
from trainer.methods import METHODS

_PAPER_COMMON = {
    "arch": "deeplabv3plus-mobilenetv2-ref",  # the authors' head (trainer/model.py)
    "optimizer": "sgd",
    "epochs": 60,
    "pretrain_epochs": 60,
    "pretrain_lr": METHODS["pce"].paper["lr"],
    "batch_size": 12,
    "crop_size": 513,
    "augmentation": "reference",
    "drop_last": False,
    "batch_average": True,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "sync",
    "epochs_per_round": 5,
    "potts_weight": 100.0,
    "max_iter": 5,
    "precision": "fp32",  # the reference trains in float32: no autocast
}
# scribble suffix ('' = full length, '0' = clicks) -> (ε, λ), SPEC §4
_PAPER_EPS_LAMBDA = {
    "": (0.944, 0.05),
    "0.8": (0.946, 0.075),
    "0.5": (0.9514, 0.1),
    "0.3": (0.9516, 0.1),
    "0": (0.9522, 0.1),
}

PRESETS: dict[str, dict[str, dict]] = {
    "paper": {
        suffix: {**_PAPER_COMMON, "eps": eps, "tr_weight": lam}
        for suffix, (eps, lam) in _PAPER_EPS_LAMBDA.items()
    },
}


# presets whose every run starts from ImageNet weights (SPEC §4): one from random weights
# would spend its GPU-days on numbers that say nothing of the paper
NEEDS_PRETRAINED = frozenset({"paper"})


def check_start(name: str | None, backbone_weights: str | None, init: str | None = None,
                takes_init: bool = False) -> None:
    """Refuse preset `name` without ImageNet weights and without --init (`takes_init`: the
    command has that option), before anything starts."""
    if name in NEEDS_PRETRAINED and not backbone_weights and not init:
        raise UserError(f"--preset {name}: trains from ImageNet weights; give --backbone-weights imagenet "
                        f"(or a torchvision mobilenet_v2 state_dict file){' or --init CKPT' if takes_init else ''}")


def preset_values(name: str, scribbles: str = "", method: str = "pce") -> dict:
    """The flat {option: value} of preset `name` for `method` at scribble suffix
    `scribbles` (solver keys such as tr_weight included, not nested)."""
    if name not in PRESETS:
        raise UserError(f"--preset: unknown preset {name!r} (choose from {', '.join(sorted(PRESETS))})")
    table = PRESETS[name]
    key = scribble_suffix(scribbles)
    if key not in table:
        raise UserError(f"--preset {name}: no setting for scribble length {scribbles!r}")
    return {**table[key], **METHODS[method].paper}


def apply_preset(cfg, name: str, explicit=()):
    """Set the preset's values on `cfg`, a trainer.config.TrainConfig (in place, also
    returned), for cfg.scribbles, except the options named in `explicit` (the ones the
    user set: they win)."""
    explicit = {k.replace("-", "_") for k in explicit}
    for key, value in preset_values(name, cfg.scribbles, cfg.method).items():
        if key not in explicit:
            set_option(cfg, key, value)
    return cfg
