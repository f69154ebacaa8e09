"""The dtypes every tool accepts by name (--dtype), and the one parser for them."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .errors import LlamaMPError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: Optional[str], option: str = "--dtype", extra: Sequence[str] = (),
                optional: bool = False) -> Optional[torch.dtype]:
    """The torch dtype for `option NAME`. With `optional`, None (the option left out: keep the source's
    dtype) gives None. `extra` names values the caller handles itself (e.g. "auto"), for the error."""
    if name is None and optional:
        return None
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    keep = " (or leave it out to keep the source's dtype)" if optional else ""
    raise LlamaMPError(f"Unknown {option} {name!r}; use one of {', '.join([*extra, *DTYPES])}{keep}.")


def largest_finite(dtype: torch.dtype) -> str:
    """What an overflow message says of `dtype`: "float16 holds at most 65504", from torch.finfo, so each
    dtype's bound is its own (bfloat16 and float32 overflow near 3.4e38, not at 65504)."""
    return f"{str(dtype).replace('torch.', '')} holds at most {torch.finfo(dtype).max:g}"


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """--dtype for a model on `device`; "auto" is bfloat16 on GPUs that compute in it natively (compute
    capability 8.0 and up: A100, H100, RTX 30xx/40xx), float16 on older ones (V100, T4, which only
    emulate bfloat16), float32 on the CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        return torch.float32
    return parse_dtype(str(dtype), extra=("auto",))
