"""Checkpoints of a run, one folder per phase (the shared warm-up, then each method).

After every round, `<folder>/round_XXX.safetensors` (every client's upload and mixing logits, keys
"<client>/adapter/<key>" and "<client>/mixing/<group>", and the server's other state) is written
and fsynced, then `state.json` (the round, the record so far, the file's SHA-256) replaces the old
one atomically: state.json is the commit point, older round files are removed after it. A torn or
corrupt checkpoint is a clear CheckpointError, never a silently different run.

`commit_tensors` / `load_tensors` are that commit for any named tensors; the round loop
(`fedtreelora.flower.strategy.PersonalisedStrategy`) commits its state with it, and
`load_checkpoint` reads the clients' uploads back from such a commit.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..client.trainer import ClientState
from ..core.files import atomic_write_text

__all__ = ["load_checkpoint", "commit_tensors", "load_tensors", "write_json", "earlier_layout", "EARLIER_LAYOUT",
           "CheckpointError", "RunFolderError"]


def write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def commit_tensors(folder: Path, round_: int, tensors: dict, info: dict) -> None:
    """Commit round `round_` of a run: `tensors` (str -> torch.Tensor) and the JSON-able `info`.

    `<folder>/round_XXX.safetensors` is written and fsynced, then `state.json` ({**info, "round",
    "file", "sha256"}) replaces the old one atomically: state.json is the commit point, older round
    files are removed after it. Tensors that share storage (views of one aggregation result) are
    written as copies. `load_tensors` reads a commit back.
    """
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    out = {}
    for key, v in tensors.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()              # safetensors refuses tensors that share (or only view) a storage
        if ptr is not None:
            seen.add(ptr)
        out[key] = v
    name = f"round_{round_:03d}.safetensors"
    tmp = folder / (name + ".tmp")
    save_file(out, str(tmp))
    with open(tmp, "rb+") as f:   # on disk before state.json points at it
        os.fsync(f.fileno())
    digest = _sha256(tmp)
    os.replace(tmp, folder / name)
    write_json(folder / "state.json", {**info, "round": round_, "file": name, "sha256": digest})
    for old in folder.glob("round_*.safetensors"):
        if old.name != name:
            old.unlink()


def earlier_layout(folder: Path) -> bool:
    """Whether `folder` holds a commit of fedtreelora's earlier checkpoint layout (before every run went
    through one Flower Strategy: no "format" in its state.json), which cannot be resumed."""
    path = Path(folder) / "state.json"
    if not path.is_file():
        return False
    try:
        return "format" not in json.loads(path.read_text())
    except (OSError, ValueError):
        return False   # torn or corrupt: load_tensors says so


EARLIER_LAYOUT = ("was written by an earlier fedtreelora (before every round ran through one Flower Strategy) "
                  "and cannot be resumed by this version: finish it with that version, or start it over "
                  "(--overwrite) or in another run folder")


class RunFolderError(ValueError):
    """A run folder that holds another run (other settings, or a run not asked to be resumed)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or corrupt."""


def load_tensors(folder: Path) -> tuple[dict, dict] | None:
    """The last commit of `commit_tensors` in `folder`: (info, tensors); None if nothing was committed yet.

    Raises CheckpointError, naming the file, when state.json or the round file it points at is
    unreadable, truncated or does not match the SHA-256 recorded when it was written.
    """
    from safetensors.torch import load_file
    path = folder / "state.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        name = info["file"]
        int(info["round"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({exc}); delete the folder to start over") from exc
    data = folder / name
    if not data.is_file():
        raise CheckpointError(f"checkpoint {data} named by {path} is missing")
    if "sha256" in info and _sha256(data) != info["sha256"]:
        raise CheckpointError(f"checkpoint {data} is corrupt or truncated (SHA-256 differs from the one recorded in {path})")
    try:
        tensors = load_file(str(data))
    except Exception as exc:  # safetensors reports a bad header or a short file in its own error type
        raise CheckpointError(f"checkpoint {data} cannot be read: {exc}") from exc
    return info, tensors


def load_checkpoint(folder: Path) -> tuple[dict, list[ClientState | None]] | None:
    """The last committed round of an experiment's `folder` (clients numbered 0..N-1): (info, every
    client's latest upload and mixing logits, indexed by client, None for a client without one);
    None if nothing was committed yet. Errors as `load_tensors`; a drop-in `FedTreeLoRA` run, whose
    clients are Flower node ids, is a CheckpointError that says how to read it."""
    loaded = load_tensors(folder)
    if loaded is None:
        return None
    info, tensors = loaded
    if info.get("format") and not info.get("nodes") and info.get("clients"):
        raise CheckpointError(f"checkpoint {folder} names its clients by Flower node id (a drop-in FedTreeLoRA run), "
                              "not 0..N-1: read it with load_tensors, or resume the strategy and call experts(node_id)")
    states: dict[int, ClientState] = {}
    try:
        for key, v in tensors.items():
            owner, kind, rest = key.split("/", 2)
            if kind == "adapter":
                states.setdefault(int(owner), ClientState({}, {})).adapter[rest] = v
            elif kind == "mixing":
                states.setdefault(int(owner), ClientState({}, {})).logits[rest] = v.reshape(())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {folder} has a tensor named {key!r} that is not a client's ({exc})") from exc
    return info, [states.get(k) for k in range(max(states) + 1 if states else 0)]
