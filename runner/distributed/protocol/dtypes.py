"""The tensor dtypes that may cross the wire, their safetensors codes, and the finiteness check.

Only what the runtime sends is allowed (float32/16, bfloat16, int64/32); everything else is
refused, at the sender and at the receiver. The encoder, the manifest check, the
safetensors reader and the per-kind rules all ask this one table, so a dtype is either
supported everywhere or nowhere. :func:`all_finite` lives here too because both sides use it
(the sender refuses a cast that overflows, the receiver refuses NaN/Inf tensors).
"""

from __future__ import annotations

import torch

from runner.distributed.protocol.errors import ProtocolError, Reason

# name -> (torch dtype, safetensors code). Only what the runtime sends; anything else is refused.
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
}
_NAME_OF = {dt: name for name, (dt, _) in DTYPES.items()}
_ST_CODE = {name: code for name, (_, code) in DTYPES.items()}
_ST_NAME = {code: name for name, code in _ST_CODE.items()}
FLOATS = frozenset({"float32", "float16", "bfloat16"})
INTS = frozenset({"int64", "int32"})
WIRE_DTYPES = frozenset({"float16", "bfloat16"})  # optional lossy casts on the wire


def dtype_name(dtype: torch.dtype) -> str:
    """Protocol name of a torch dtype; unsupported dtypes are a sender bug, so ValueError."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise ProtocolError(Reason.BAD_DTYPE, f"dtype {dtype} is not sent on the wire") from None


def _itemsize(name: str) -> int:
    return DTYPES[name][0].itemsize


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``, at reduction speed.

    ``isfinite(t).all()`` materialises a bool tensor and is ~50x slower than a sum on CPU.
    Any NaN/Inf element makes the float32 sum non-finite, so a finite sum proves the tensor
    finite; only a non-finite sum (NaN/Inf present, or an overflow of huge finite values)
    pays for the exact check.
    """
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())
