"""Atomic replacement of whole directories (checkpoints, exports, training states)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_directory(tmp: Path, target: Path) -> Path:
    """Move the complete directory ``tmp`` to ``target``, replacing any existing ``target``.

    The old directory is renamed aside before the new one is renamed in, so at every moment ``target`` is either the
    complete old directory or the complete new one (a crash in between leaves the old one beside it).
    """
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)
    return target
