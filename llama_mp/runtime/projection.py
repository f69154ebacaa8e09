"""Projections: the weight matrices of a rank, stored the way its decode backend reads them fastest.

The model's state dict keeps Meta's names and `[out, in]` shapes (`layers.0.attention.wq.weight`, ...).
What computes `x @ W.T` is a `Projection`: one matrix of this rank, or several that take the same
input fused by output rows (q, k and v; w1 and w3), in a storage whose layout and dtype the backend
chose. The state-dict weights are views into that storage, so loading a checkpoint writes straight into
it and no memory is duplicated. A new weight format (int8, int4) is a new Projection class.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.scheme import Scheme, dequantize
from .memory import empty_for_streaming


class Projection:
    """`y = x @ W.T` for `W` = the given weight holders' matrices stacked by output rows.

    Allocating it replaces each holder's (meta) `weight` by a view of the storage, [out_i, in]."""

    def __init__(self, holders: Sequence[nn.Module], dtype: torch.dtype, device: torch.device):
        shapes = [tuple(h.weight.shape) for h in holders]
        self.in_features = shapes[0][1]
        self.out_features = sum(rows for rows, _ in shapes)
        self.storage = self._allocate(dtype, device)
        start = 0
        for holder, (rows, _) in zip(holders, shapes):
            holder.weight = nn.Parameter(self.matrix()[start:start + rows], requires_grad=False)
            start += rows

    def _allocate(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return empty_for_streaming((self.out_features, self.in_features), dtype, device)

    def matrix(self) -> torch.Tensor:
        """The weights as [out, in] (a view of the storage)."""
        return self.storage

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.storage)


class InOutProjection(Projection):
    """Stored transposed, [in, out]: on a CPU `x @ W` with W stored so runs MKL's matrix-vector kernel
    about twice as fast as `F.linear` on [out, in] (decoding is bound by reading weights)."""

    def _allocate(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return empty_for_streaming((self.in_features, self.out_features), dtype, device)

    def matrix(self) -> torch.Tensor:
        return self.storage.t()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.storage)


class QuantizedProjection(Projection):
    """`y = x @ W.T` for W quantized by `scheme` (quant/scheme.py): `storage` holds the integers (int8
    [out, in], or int4 packed two per byte [out, in / 2]) and `scales` their scales ([out], or
    [out, in / group_size]). Each holder gets views of both, `weight` and `scales`, so a checkpoint's
    `<name>.weight` and `<name>.scales` load straight into place. Activations stay in `dtype`.

    This is the portable path: it multiplies by the dequantised matrix, made for each call (correct
    everywhere, fast nowhere); decoders subclass it with fused kernels. One exception, measured on a
    CPU: int8 with bfloat16 activations, or one float32 row, goes through `torch._weight_int8pack_mm`,
    which dequantises in registers (4-20x faster there; float32 results within float32 rounding of the
    dequantised product, about 1e-6 relative; bfloat16 ones within bfloat16 rounding, like that path's).
    Its float32 kernel is slower than dequantising once there are several rows, so those do not use it."""

    def __init__(self, holders: Sequence[nn.Module], dtype: torch.dtype, device: torch.device, scheme: Scheme):
        self.scheme, self.dtype = scheme, dtype
        shapes = [tuple(h.weight.shape) for h in holders]
        self.in_features = shapes[0][1]
        self.out_features = sum(rows for rows, _ in shapes)
        self.storage = empty_for_streaming(scheme.weight_shape(self.out_features, self.in_features),
                                           scheme.weight_dtype, device)
        self.scales = torch.empty(scheme.scale_shape(self.out_features, self.in_features), dtype=scheme.scale_dtype,
                                  device=device)
        start = 0
        for holder, (rows, _) in zip(holders, shapes):
            holder.weight = nn.Parameter(self.storage[start:start + rows], requires_grad=False)
            holder.scales = nn.Parameter(self.scales[start:start + rows], requires_grad=False)
            start += rows

    def matrix(self) -> torch.Tensor:
        """The dequantised weights [out, in] in the activation dtype (a new tensor)."""
        return dequantize(self.storage, self.scales, self.scheme, self.dtype)

    def _packed_int8(self, x: torch.Tensor) -> bool:
        return (self.scheme.mode == "int8" and self.storage.device.type == "cpu" and _HAS_INT8PACK
                and (x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and x.numel() == self.in_features)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed_int8(x):
            rows = x.reshape(-1, self.in_features).contiguous()
            y = torch._weight_int8pack_mm(rows, self.storage, self.scales.to(x.dtype))
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.matrix())


_HAS_INT8PACK = hasattr(torch, "_weight_int8pack_mm")
