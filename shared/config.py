"""Typed configuration that both services read: `SolverConfig` (stage A, SPEC §1) and the
mapping of config dataclasses to and from dicts (TOML files, Ray Tune's trials, the
solver actors' arguments). The trainer's `TrainConfig` is in trainer/config.py.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from shared.errors import UserError

ALGORITHMS = ("expansion", "swap")


@dataclass
class SolverConfig:
    """Stage A (SPEC §1)."""

    tr_weight: float = 0.1  # λ
    potts_weight: float = 100.0  # β
    max_iter: int = 5
    restrict_labels: bool = True
    algorithm: str = "expansion"

    def validate(self) -> None:
        check_option(self.tr_weight >= 0, "--tr-weight", "must be ≥ 0")
        check_option(self.potts_weight >= 0, "--potts-weight", "must be ≥ 0")
        check_option(self.max_iter >= 1, "--max-iter", "must be ≥ 1")
        check_option(self.algorithm in ALGORITHMS, "--algorithm", f"must be one of {ALGORITHMS}")


def check_option(ok: bool, option: str, why: str) -> None:
    """A UserError naming the option unless `ok`."""
    if not ok:
        raise UserError(f"{option}: {why}")


SOLVER_FIELDS = frozenset(f.name for f in dataclasses.fields(SolverConfig))


def set_option(cfg, name: str, value) -> None:
    """Set one option of a config with a `solver` field (trainer.config.TrainConfig) by
    its flat name: stage-A options live on cfg.solver."""
    setattr(cfg.solver if name in SOLVER_FIELDS else cfg, name, value)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Build a config dataclass from a (possibly nested) dict; unknown keys and values of
    the wrong type (a TOML `epochs = "20"`) are errors naming the key."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        name = key.replace("-", "_")
        if name not in names:
            raise UserError(f"unknown configuration key {key!r}")
        if name == "solver" and isinstance(value, dict):
            value = from_dict(SolverConfig, value)
        else:
            value = _typed(key, value, hints[name])
        kwargs[name] = value
    return cls(**kwargs)


def _typed(key: str, value, hint):
    """`value` as the field's type: ints widen to floats, numbers to strings where a string
    is expected; nothing else is converted."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool) or value is None:
        pass
    elif float in allowed and isinstance(value, int):
        return float(value)
    elif str in allowed and isinstance(value, (int, float)):  # solvers = 4, scribbles = 0.5
        return str(value)
    for t in allowed:
        if t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = " or ".join(t.__name__ for t in allowed if t is not type(None))
    raise UserError(f"configuration key {key!r}: expected {names}, got {type(value).__name__} {value!r}")
