"""PEFT state dicts <-> Flower ArrayRecords, for any floating dtype.

Flower's `Array` goes through numpy, which has no bfloat16: `ArrayRecord(state_dict)` raises on a
bf16 adapter. `to_arrayrecord` casts bf16 tensors to float32 (exact: every bf16 value is a float32
value) and `dtype_record` says which keys were cast, so that the receiver can restore them with
`from_arrayrecord(record, dtypes)`. float16, float32 and float64 travel as they are.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord

__all__ = ["to_arrayrecord", "from_arrayrecord", "dtype_record", "read_dtypes", "DTYPE_RECORD"]

DTYPE_RECORD = "fedtreelora-dtypes"     # ConfigRecord key of a reply: {"dtypes": JSON {key: torch dtype}}
_NO_NUMPY = (torch.bfloat16,)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"key {key!r}: {name!r} is not a torch floating dtype")
    return dtype


def to_arrayrecord(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of a state dict; bf16 tensors travel as float32.

    Parameters
    ----------
    state_dict : mapping of str to torch.Tensor
        For example `peft.get_peft_model_state_dict(model)`. Never modified.

    Returns
    -------
    flwr.app.ArrayRecord

    Raises
    ------
    TypeError
        A value that is not a tensor (the message names its key).

    Examples
    --------
    >>> import torch
    >>> record = to_arrayrecord({"w": torch.ones(2, dtype=torch.bfloat16)})
    >>> record["w"].dtype
    'float32'
    >>> from_arrayrecord(record, {"w": torch.bfloat16})["w"].dtype
    torch.bfloat16
    """
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"key {key!r}: expected a torch.Tensor, got {type(value).__name__}")
        value = value.detach().cpu()
        tensors[key] = (value.float() if value.dtype in _NO_NUMPY else value).contiguous()
    return ArrayRecord(torch_state_dict=tensors)


def dtype_record(state_dict: Mapping[str, torch.Tensor]) -> ConfigRecord | None:
    """The keys `to_arrayrecord` casts, with their own dtype, as a ConfigRecord; None when none is cast."""
    cast = {key: _dtype_name(v.dtype) for key, v in state_dict.items() if v.dtype in _NO_NUMPY}
    return ConfigRecord({"dtypes": json.dumps(cast)}) if cast else None


def read_dtypes(record: ConfigRecord | None) -> dict[str, torch.dtype]:
    """{key: dtype} from a `dtype_record` (empty for None).

    Raises
    ------
    KeyError
        The record lacks its "dtypes" entry.
    ValueError
        A dtype name that is not a torch floating dtype (the message names the key).
    """
    if record is None:
        return {}
    if "dtypes" not in record:
        raise KeyError(f'the {DTYPE_RECORD!r} ConfigRecord lacks its "dtypes" entry')
    return {key: _dtype(name, key) for key, name in json.loads(str(record["dtypes"])).items()}


def from_arrayrecord(record: ArrayRecord, dtypes: Mapping[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of an ArrayRecord, with the keys in `dtypes` cast back to their dtype.

    Parameters
    ----------
    record : flwr.app.ArrayRecord
        From `to_arrayrecord`, or any ArrayRecord of numeric arrays.
    dtypes : mapping of str to torch.dtype, optional
        Keys to cast back (`read_dtypes` of the sender's `DTYPE_RECORD`); other keys keep their
        wire dtype, and keys absent from the record are ignored.

    Returns
    -------
    dict of str to torch.Tensor

    Examples
    --------
    >>> import torch
    >>> state = {"a": torch.ones(2, dtype=torch.bfloat16), "b": torch.zeros(1, dtype=torch.float16)}
    >>> back = from_arrayrecord(to_arrayrecord(state), read_dtypes(dtype_record(state)))
    >>> {k: v.dtype for k, v in back.items()}
    {'a': torch.bfloat16, 'b': torch.float16}
    """
    state = dict(record.to_torch_state_dict())
    for key, dtype in (dtypes or {}).items():
        if key in state:
            state[key] = state[key].to(dtype)
    return state
