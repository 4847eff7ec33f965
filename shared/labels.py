"""Label values and scribble lengths, defined once for every command and service."""
from __future__ import annotations

UNLABELLED = 255  # seeds: no scribble; masks: ignore; proposals: none

# scribble length suffixes of the data layouts (SPEC §5): '' is full length, '0' clicks
SCRIBBLE_SUFFIXES = ("", "0.8", "0.5", "0.3", "0")
# the same lengths by name, shortest first: the columns of the paper's Table 1 ('1': full)
SCRIBBLE_LENGTHS = tuple(sorted((s or "1" for s in SCRIBBLE_SUFFIXES), key=float))


def scribble_suffix(value) -> str:
    """Any spelling of a scribble length to its suffix: '' / '1' / 1.0 → ''; '0.50' → '0.5';
    0 → '0'. Unknown lengths are returned as given (validation names the option)."""
    s = str(value if value is not None else "").strip()
    if s in ("", "1", "1.0"):
        return ""
    try:
        v = float(s)
    except ValueError:
        return s
    return "0" if v == 0 else f"{v:g}"


def check_scribbles(value, option: str = "--scribbles") -> str:
    """`scribble_suffix` of a user's value; UserError naming the option if it is no length."""
    from shared.errors import UserError

    suffix = scribble_suffix(value)
    if suffix not in SCRIBBLE_SUFFIXES:
        raise UserError(f"{option}: must be one of 1 (full length), 0.8, 0.5, 0.3, 0 (clicks); got {value!r}")
    return suffix


def length_name(value, option: str = "--scribbles") -> str:
    """A user's scribble length as the tables name it (SCRIBBLE_LENGTHS): '1' for full
    length, else its suffix; UserError naming the option if it is no length."""
    return check_scribbles(value, option) or "1"


def scribble_length(suffix: str) -> float:
    """The kept fraction of each scribble: '' → 1.0, '0.5' → 0.5, '0' → 0.0."""
    return 1.0 if scribble_suffix(suffix) == "" else float(suffix)
