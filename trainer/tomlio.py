"""Config files: read with tomllib, write the resolved config back with tomli-w."""
from __future__ import annotations

import tomllib

import tomli_w

from shared import storage
from shared.errors import UserError


def read_toml(uri: str, option: str = "--config") -> dict:
    """A TOML file at a local path or a storage URI (a run folder on s3:// too)."""
    try:
        return tomllib.loads(storage.read_bytes(uri).decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{option}: {uri} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{option}: {uri} is not valid TOML ({e})") from None


def dumps(d: dict) -> str:
    """TOML for a config dict, by a real TOML writer (any string round-trips); None
    values (unset options) are left out, as TOML has no null."""
    return tomli_w.dumps(_drop_none(d))


def _drop_none(d: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
