"""PEFT LoRA state dicts <-> packed client rows.

A client's adapter (keys as `peft.get_peft_model_state_dict` returns them) becomes one row of
x [N, P]; the columns are grouped into segments, one per transformer layer (shallow to deep), and
one last segment for the trainable tensors outside the layers (a classification head saved through
`modules_to_save`), when there are any. `layer_offsets` [S+1] delimits the segments.

Parsing follows PEFT's own rule for `layers_to_transform`: the layer of a key is the first numbered
path segment (`...encoder.layer.3.attention...` -> layer 3 of the stack `...encoder.layer`).
A numbered group counts as a transformer layer only if it holds LoRA factors; stacks are ordered by
first appearance in the state dict (an encoder before its decoder), layers by index within a stack.
Inside a layer the B factors (`lora_B`, `lora_embedding_B`) come first, so the distance columns of
a layer are a contiguous prefix of its segment.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .ops import nonfinite_entry, pack_rows

__all__ = ["AdapterLayout", "parse_layout", "normalise_clients", "pack", "layer_rows", "unpack_row", "key_view",
           "is_b_factor", "first_nonfinite", "all_finite", "segment_norms"]

_FIRST_INDEX = re.compile(r"^(?P<stack>.*?\.[^.]*)\.(?P<idx>\d+)\.")
_B_FACTOR = re.compile(r"\.lora_(?:embedding_)?B(?:\.|$)")
_LORA = re.compile(r"\.lora_(?:embedding_)?[AB](?:\.|$)")


def is_b_factor(key: str) -> bool:
    """True for a LoRA B factor key (`...lora_B.weight`, `...lora_embedding_B`)."""
    return _B_FACTOR.search(key) is not None


@dataclass(frozen=True)
class AdapterLayout:
    """Where every key of a client state dict lives in a packed row.

    keys: all keys in packing order; shapes/dtypes: per key; columns: per key (start, stop);
    layers: transformer layer names shallow->deep (e.g. "base_model.model.bert.encoder.layer.0");
    layer_offsets: int64 [S+1] with S = len(layers) (+1 when there are non-layer tensors);
    b_ends: per layer, the end column of its B factors (they start at layer_offsets[l]);
    head_keys: the keys outside the layers (their segment is the last one).
    """

    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    columns: tuple[tuple[int, int], ...]
    layers: tuple[str, ...]
    layer_offsets: torch.Tensor
    b_ends: tuple[int, ...]
    head_keys: tuple[str, ...]
    dtype: torch.dtype  # packing dtype: the common (promoted) dtype of all keys
    input_keys: tuple[str, ...] = ()  # the keys in the clients' own order (results keep it)

    @property
    def n_params(self) -> int:
        return int(self.layer_offsets[-1])

    @property
    def has_head(self) -> bool:
        return bool(self.head_keys)

    def specs(self) -> list[tuple[str, torch.Size, torch.dtype, int, int, int]]:
        """(key, shape, dtype, start, stop, segment) per key, in the clients' own key order."""
        by_key = {key: (shape, dtype, lo, hi) for key, shape, dtype, (lo, hi)
                  in zip(self.keys, self.shapes, self.dtypes, self.columns)}
        seg = torch.searchsorted(self.layer_offsets, torch.tensor([lo for lo, _ in self.columns]), right=True) - 1
        segment = dict(zip(self.keys, seg.tolist()))
        return [(key, *by_key[key], segment[key]) for key in (self.input_keys or self.keys)]

    def key_at(self, column: int) -> str:
        for key, (lo, hi) in zip(self.keys, self.columns):
            if lo <= column < hi:
                return key
        raise IndexError(column)

    def b_layout(self) -> "AdapterLayout":
        """The layout of the B factors alone (the distance columns), layer by layer, no head."""
        starts = self.layer_offsets.tolist()
        offsets = [0]
        for l, end in enumerate(self.b_ends):
            offsets.append(offsets[-1] + end - starts[l])
        keys, shapes, dtypes, columns = [], [], [], []
        for l, end in enumerate(self.b_ends):
            for key, shape, dtype, (lo, hi) in zip(self.keys, self.shapes, self.dtypes, self.columns):
                if starts[l] <= lo and hi <= end:
                    keys.append(key), shapes.append(shape), dtypes.append(dtype)
                    columns.append((offsets[l] + lo - starts[l], offsets[l] + hi - starts[l]))
        common = dtypes[0]
        for dt in dtypes[1:]:
            common = torch.promote_types(common, dt)
        return AdapterLayout(keys=tuple(keys), shapes=tuple(shapes), dtypes=tuple(dtypes), columns=tuple(columns),
                             layers=self.layers, layer_offsets=torch.tensor(offsets, dtype=torch.int64),
                             b_ends=tuple(offsets[1:]), head_keys=(), dtype=common, input_keys=tuple(keys))


def normalise_clients(client_states) -> tuple[list[Mapping[str, torch.Tensor]], list[str] | None]:
    """A list of state dicts, and the client names when the input was a mapping name -> state dict.

    A client whose tensors require grad (an ``nn.Parameter`` passed as it is) is read through
    ``detach()`` views: the same memory, no autograd history in what the server step returns.
    """
    if isinstance(client_states, Mapping):
        if client_states and all(isinstance(v, torch.Tensor) for v in client_states.values()):
            raise TypeError("client_states must hold one state dict per client (a list or a dict of "
                            "client name -> state dict), got a single state dict")
        names = [str(name) for name in client_states]
        states = list(client_states.values())
    elif isinstance(client_states, Sequence) and not isinstance(client_states, (str, bytes)):
        names, states = None, list(client_states)
    else:
        raise TypeError(f"client_states must be a list of state dicts or a dict of client name -> state dict, "
                        f"got {type(client_states).__name__}")
    if not states:
        raise ValueError("client_states is empty: need at least one client")
    for k, s in enumerate(states):
        if not isinstance(s, Mapping):
            raise TypeError(f"client {_who(k, names)}: state dict must be a mapping of key -> tensor, got {type(s).__name__}")
        if not s:
            raise ValueError(f"client {_who(k, names)}: state dict is empty")
        grad = False
        for key, t in s.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"client {_who(k, names)}, key {key!r}: expected a tensor, got {type(t).__name__}")
            grad = grad or t.requires_grad
        if grad:  # parameters passed as they are: aggregation is no training step, so read their values only
            states[k] = {key: t.detach() for key, t in s.items()}
    return states, names


def _who(k: int, names: list[str] | None) -> str:
    return f"{k} ({names[k]!r})" if names else str(k)


def _check_agreement(states: list[Mapping[str, torch.Tensor]], names: list[str] | None) -> None:
    """Every client must hold the same keys with the same shapes, dtypes and device as client 0."""
    ref = states[0]
    ref_keys = set(ref)
    device = next(iter(ref.values())).device
    for key, t in ref.items():
        if not t.is_floating_point():
            raise TypeError(f"client {_who(0, names)}, key {key!r}: expected a floating-point tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"client {_who(0, names)}, key {key!r}: on {t.device}, other keys on {device}")
    ref_order = list(ref)
    ref_sig = ([t.shape for t in ref.values()], [t.dtype for t in ref.values()], [t.device for t in ref.values()])
    for k, s in enumerate(states[1:], start=1):
        # fast path (same keys in the same order, same shapes, dtypes, devices): three C-level list comparisons
        if list(s) == ref_order:
            values = list(s.values())
            if ([t.shape for t in values], [t.dtype for t in values], [t.device for t in values]) == ref_sig:
                continue
        if set(s) != ref_keys:
            missing = sorted(ref_keys - set(s))
            extra = sorted(set(s) - ref_keys)
            what = []
            if missing:
                what.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
            if extra:
                what.append(f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}")
            raise ValueError(f"client {_who(k, names)}: keys differ from client {_who(0, names)}: {'; '.join(what)}")
        for key, t0 in ref.items():
            t = s[key]
            if t.shape != t0.shape:
                if _LORA.search(key) and t.dim() == 2 and t0.dim() == 2:
                    r_dim = 0 if ".lora_A" in key or ".lora_embedding_A" in key else 1
                    if t.shape[r_dim] != t0.shape[r_dim]:
                        raise ValueError(f"client {_who(k, names)}, key {key!r}: LoRA rank {t.shape[r_dim]} differs from "
                                         f"client {_who(0, names)}'s rank {t0.shape[r_dim]} (shapes {tuple(t.shape)} vs {tuple(t0.shape)})")
                raise ValueError(f"client {_who(k, names)}, key {key!r}: shape {tuple(t.shape)} differs from "
                                 f"client {_who(0, names)}'s {tuple(t0.shape)}")
            if t.dtype != t0.dtype:
                raise TypeError(f"client {_who(k, names)}, key {key!r}: dtype {t.dtype} differs from client {_who(0, names)}'s {t0.dtype}")
            if t.device != t0.device:
                raise ValueError(f"client {_who(k, names)}, key {key!r}: on {t.device}, client {_who(0, names)} on {t0.device}")


def parse_layout(states: list[Mapping[str, torch.Tensor]], names: list[str] | None = None) -> AdapterLayout:
    """Check that the clients agree and lay their keys out in segments (see the module docstring)."""
    _check_agreement(states, names)
    ref = states[0]
    stacks: dict[str, int] = {}            # stack prefix -> order of first appearance
    groups: dict[tuple[int, int], list[str]] = {}
    others: list[str] = []
    for key in ref:
        m = _FIRST_INDEX.match(key)
        if m is None:
            others.append(key)
            continue
        order = stacks.setdefault(m["stack"], len(stacks))
        groups.setdefault((order, int(m["idx"])), []).append(key)
    layer_groups = []
    for gid in sorted(groups):
        keys = groups[gid]
        if any(_LORA.search(k) for k in keys):
            layer_groups.append(gid)
        else:  # a numbered group without LoRA factors (e.g. a Sequential head) is not a transformer layer
            others.extend(keys)
    if not layer_groups:
        raise ValueError("no LoRA layers found: expected keys like '...layer.<i>....lora_B.weight' as "
                         "peft.get_peft_model_state_dict returns them")
    stack_names = {v: k for k, v in stacks.items()}
    keys, columns, offsets, b_ends, layers = [], [], [0], [], []
    col = 0
    for gid in layer_groups:
        group = groups[gid]
        b_keys = [k for k in group if is_b_factor(k)]
        if not b_keys:
            raise ValueError(f"layer {stack_names[gid[0]]}.{gid[1]} has LoRA A factors but no B factors")
        for key in b_keys:
            keys.append(key)
            columns.append((col, col + ref[key].numel()))
            col += ref[key].numel()
        b_ends.append(col)
        for key in group:
            if not is_b_factor(key):
                keys.append(key)
                columns.append((col, col + ref[key].numel()))
                col += ref[key].numel()
        layers.append(f"{stack_names[gid[0]]}.{gid[1]}")
        offsets.append(col)
    head = [k for k in ref if k in set(others)]  # state dict order
    for key in head:
        keys.append(key)
        columns.append((col, col + ref[key].numel()))
        col += ref[key].numel()
    if head:
        offsets.append(col)
    if any(offsets[i + 1] == offsets[i] for i in range(len(offsets) - 1)):
        raise ValueError("a segment of the adapter has no parameters (empty tensors only)")
    dtypes = tuple(ref[k].dtype for k in keys)
    common = dtypes[0]
    for dt in dtypes[1:]:
        common = torch.promote_types(common, dt)
    return AdapterLayout(keys=tuple(keys), shapes=tuple(ref[k].shape for k in keys), dtypes=dtypes,
                         columns=tuple(columns), layers=tuple(layers),
                         layer_offsets=torch.tensor(offsets, dtype=torch.int64), b_ends=tuple(b_ends),
                         head_keys=tuple(head), dtype=common, input_keys=tuple(ref))


def pack(states: list[Mapping[str, torch.Tensor]], layout: AdapterLayout) -> torch.Tensor:
    """x [N, P] in layout.dtype on the clients' device: row k = client k's tensors, flattened, in layout
    order (`layer_rows` over every key: one copy of the inputs, which are only read)."""
    return layer_rows(states, layout.keys, layout.dtype)


def layer_rows(states, keys, dtype: torch.dtype, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """[N, w]: row k = states[k][key].flatten() for the keys side by side (in `dtype`).

    Equal to those keys' columns of `pack` (same order, same dtype conversion): one
    `ops.pack_rows` (a memcpy per tensor, in parallel) when every tensor is contiguous and already in
    `dtype` on the output's device, else one torch.stack per key, straight into its columns of the
    output. With `buffer` ([N, >= w], dtype), the output is its first w columns (rows strided): a
    caller that gathers block after block reuses one buffer instead of faulting in fresh memory for
    every block, which cost more than the copy.
    """
    ref = states[0]
    n = len(states)
    widths = [ref[key].numel() for key in keys]
    if buffer is None:
        out = torch.empty(n, sum(widths), dtype=dtype, device=ref[keys[0]].device)
    else:
        out = buffer[:, :sum(widths)]
    # Clients agree on every key's dtype and device (parse_layout checks it): client 0's stand for all.
    if all(ref[key].dtype == dtype and ref[key].device == out.device for key in keys):
        parts = [s[key] for key in keys for s in states]
        if all(map(torch.Tensor.is_contiguous, parts)):
            pack_rows(parts, out)
            return out
    lo = 0
    for key, width in zip(keys, widths):
        target = out[:, lo:lo + width].view(n, *ref[key].shape)
        parts = [s[key] for s in states]
        if ref[key].dtype == dtype:
            torch.stack(parts, out=target)
        else:
            target.copy_(torch.stack(parts))
        lo += width
    return out


def unpack_row(row: torch.Tensor, layout: AdapterLayout) -> dict[str, torch.Tensor]:
    """A state dict of views into `row` [P] (copies only for keys whose dtype differs from the row's)."""
    return {key: key_view(row[lo:hi], shape, dtype) for key, shape, dtype, lo, hi, _ in layout.specs()}


def key_view(columns: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """One key's tensor from its columns of a packed row: a view, or a copy where the dtype differs."""
    t = columns.view(shape)
    return t if t.dtype == dtype else t.to(dtype)


def all_finite(x: torch.Tensor) -> bool:
    """Whether x holds no NaN/Inf, in one reduction: a NaN or Inf entry makes the sum NaN or Inf.

    The sum runs in x's own dtype (float accumulation for bf16/fp16 inside torch), one vectorised
    read; a float64 sum of float32 input converts element by element and costs ~25x more. The one
    false alarm is an overflow of the sum of finite values (fp16 sums above 65504, say): callers
    locate the entry with `first_nonfinite`, which finds none then, before reporting."""
    return bool(torch.isfinite(x.sum()))


def first_nonfinite(x: torch.Tensor, layout: AdapterLayout, names: list[str] | None = None, column_offset: int = 0,
                    what: str = "client", row_offset: int = 0) -> str | None:
    """A message naming the first client and key holding NaN/Inf in x, or None when x is finite.

    x holds columns column_offset .. column_offset + x.shape[1] of `layout` (a slice of the packed
    rows, e.g. one layer's); row k of x is client row_offset + k (named names[row_offset + k]),
    called a `what` in the message.
    """
    found = None if all_finite(x) else nonfinite_entry(x)   # one read in the common, finite case
    if found is None:
        return None
    k, col, rows = found
    k += row_offset
    col += column_offset
    key = layout.key_at(col)
    lo = dict(zip(layout.keys, layout.columns))[key][0]
    shape = dict(zip(layout.keys, layout.shapes))[key]
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(col - lo), shape)) if len(shape) else ()
    return (f"{what} {_who(k, names)}, key {key!r}: NaN or Inf at index {index}"
            f"{f' ({rows} clients affected)' if rows > 1 else ''}")


def segment_norms(x: torch.Tensor, layout: AdapterLayout) -> torch.Tensor:
    """L2 norm of each client's slice of each segment, float64 [N, S]."""
    lo = layout.layer_offsets.tolist()
    return torch.stack([x[:, a:b].double().norm(dim=1) for a, b in zip(lo[:-1], lo[1:])], dim=1)

