"""Config files: read with tomllib, write the resolved config back as TOML."""
from __future__ import annotations

import tomllib

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
    """TOML for a flat dict with at most one level of tables (what the configs are)."""
    flat = [f"{k} = {_value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {_value(vv)}" for kk, vv in v.items() if vv is not None)
              for k, v in d.items() if isinstance(v, dict)]
    return "\n".join(flat) + "\n" + "\n".join(tables) + "\n"


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'
