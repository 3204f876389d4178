"""Writing files so that a reader never sees half of one: write a sibling, then rename over."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write_text"]


def atomic_write_text(path, text: str) -> None:
    """Replace `path` with `text` atomically (a crash leaves the old file or the new one, never a mix)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
