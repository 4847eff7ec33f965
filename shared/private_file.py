"""Secret files (Ray's token): readable by their owner only. No Ray import here: the
deploy entry script checks its token before Ray is first imported."""
from __future__ import annotations

import os
import stat

from shared.errors import UserError


def check_private(path: str) -> None:
    """A secret file that other users can read is an error naming it (and the fix)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return  # whoever reads it says what is missing
    if mode & 0o077:
        raise UserError(f"{path}: the Ray token file can be read by other users (mode {mode:04o}); "
                        f"make it private with chmod 600 {path}")
