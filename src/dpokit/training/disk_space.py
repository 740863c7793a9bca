"""A full disk, said in one line: for a checkpoint (checkpoint.py) and for the final model (export.py) alike.

Both are written into a temporary folder and renamed into place, so a disk that is too small, up front
or while writing, leaves nothing half-written; these helpers tell ENOSPC apart from other errors and
word the message, which always says which intact copy of the weights is left.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def disk_full_code(error: Exception) -> Optional[int]:
    """ENOSPC or EDQUOT behind an OSError or a SafetensorError ("... No space left on device (os error 28)"); else None."""
    code = getattr(error, "errno", None) or next((c for c in DISK_FULL if f"(os error {c})" in str(error)), None)
    return code if code in DISK_FULL else None


def filled_up(code: int) -> str:
    return f"the disk filled up while writing it ({os.strerror(code)}); the partial folder was removed"


def no_space(target: Path, needed: int, free: int, what_happened: str, kept: str, advice: str) -> str:
    """The one line: what did not fit where, the sizes, what happened, the copy that is intact, what to do."""
    return (
        f"not enough disk space for {target.name} in {target.parent}: it needs about {needed:,} bytes ({size_text(needed)}), "
        f"{free:,} bytes ({size_text(free)}) were free; {what_happened} and {kept}. {advice}"
    )


def size_text(n: int) -> str:
    """1234567 -> '1.2 MiB'."""
    value, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
