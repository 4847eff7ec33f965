"""Config files: read with tomllib, write the resolved config back with tomli-w."""
from __future__ import annotations

import tomllib

import tomli_w

from shared.errors import UserError


def read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config: {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config: {path} is not valid TOML ({e})") from None


def dumps(d: dict) -> str:
    """TOML for a config dict, by a real TOML writer (any string round-trips); None
    values (unset options) are left out, as TOML has no null."""
    return tomli_w.dumps(_drop_none(d))


def _drop_none(d: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
