"""A scratch file for the per-layer distances of a streaming `build_tree`, so its GEMMs run once.

The streaming tree needs every layer's [N, N] distances twice: summed into the mean (which gives
the tree), then again for the cut search (which needs the tree). Holding all L of them is the
[L, N, N] tensor streaming exists to avoid (9.6 GB at N = 10,000, L = 24), and recomputing them
doubles the Gram GEMMs, the dominant cost. Writing each layer to an unlinked scratch file and
reading it back costs one sequential write and read of 4 L N^2 bytes, a few seconds against
minutes of GEMMs, and adds nothing to the process's resident memory.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch

__all__ = ["LayerSpill", "SCRATCH_ENV"]

SCRATCH_ENV = "FEDTREELORA_SCRATCH_DIR"  # folder of the scratch file; "none" = recompute instead
_HEADROOM = 1 << 30                      # leave this much of the disk free


class LayerSpill:
    """Write float32 [N, N] CPU layers in order, then read them back in the same order.

    `LayerSpill.open(n, n_layers, device)` returns None where spilling does not apply (a CUDA
    device, where recomputing is cheap; `FEDTREELORA_SCRATCH_DIR=none`; too little free disk).
    The file is unlinked as soon as it is created, so it disappears with the process, crash included.
    """

    def __init__(self, handle, n: int):
        self._handle, self._n, self._written = handle, n, 0

    @classmethod
    def open(cls, n: int, n_layers: int, device) -> "LayerSpill | None":
        folder = os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()
        if torch.device(device).type != "cpu" or folder.lower() == "none":
            return None
        try:
            if shutil.disk_usage(folder).free < 4 * n * n * n_layers + _HEADROOM:
                return None
            return cls(tempfile.TemporaryFile(dir=folder), n)
        except OSError:  # an unwritable or missing folder: recompute rather than fail the tree
            return None

    def write(self, d: torch.Tensor) -> None:
        d.detach().to(torch.float32).contiguous().numpy().tofile(self._handle)
        self._written += 1

    def layers(self):
        """The written layers, in order, each as a fresh float32 [N, N] tensor."""
        self._handle.flush()
        self._handle.seek(0)
        for _ in range(self._written):
            layer = np.fromfile(self._handle, dtype=np.float32, count=self._n * self._n)
            yield torch.from_numpy(layer).view(self._n, self._n)

    def close(self) -> None:
        self._handle.close()
