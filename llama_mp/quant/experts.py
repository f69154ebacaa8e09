"""Routed experts quantized in Meta's stored layout: a stack of E matrices, each [in, out] (`x @ W_e`),
stored as one [E * in, out] tensor (Llama 4's `moe_w_in_eD_F` / `moe_w_swiglu_eD_F` [E*dim, F] and
`moe_w_out_eF_D` [E*F, dim], or a rank's slice of one).

Each expert is quantized on its own by quant/scheme.py's scheme, as the matrix [out, in] it stands for
(W_e transposed): its rows are the expert's outputs and its groups run along the expert's own inputs, so
no scale or int4 group ever covers two experts. The results are stored transposed back, so the stack
keeps Meta's orientation and splits over ranks exactly as the float one does:

* int8: integers int8 [E * in, out]; scales float32 [E, out] (one per expert and output, from the
  expert's whole input column: replicated where the inputs are split, as the dense row-parallel scales are).
* int4: integers uint8 [E * in / 2, out]: in each block of 16 rows (32 inputs) of an expert, row j holds
  input j in its low nibble and input j + 16 in its high one (pack_int4's layout, along the inputs);
  scales bfloat16 [E * in / group_size, out].

`dequantize` gives back exactly what scheme.dequantize gives for each expert's [out, in] matrix, transposed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .scheme import Scheme, dequantize as dequantize_rows, quantize


def weight_shape(scheme: Scheme, rows: int, cols: int) -> Tuple[int, int]:
    """The stored integers of a float stack [rows, cols] (rows = experts x each expert's inputs)."""
    return (rows, cols) if scheme.mode == "int8" else (rows // 2, cols)


def scale_shape(scheme: Scheme, experts: int, rows: int, cols: int) -> Tuple[int, int]:
    """The stored scales of a float stack [rows, cols] of `experts` matrices."""
    return (experts, cols) if scheme.mode == "int8" else (rows // scheme.group_size, cols)


def input_max(stack: torch.Tensor, experts: int) -> torch.Tensor:
    """max |w| over the inputs held in `stack` [experts * in, out], per expert and output: [experts, out]
    float32 (one expert widened at a time)."""
    return torch.stack([e.float().abs().amax(dim=0) for e in stack.view(experts, -1, stack.shape[1])])


def quantize_into(stack: torch.Tensor, experts: int, scheme: Scheme, q_out: torch.Tensor, scales_out: torch.Tensor,
                  column_max: Optional[torch.Tensor] = None, chunk_values: int = 1 << 21) -> None:
    """Quantize the float stack [experts * in, out] (any float dtype, e.g. an mmap view) into `q_out` and
    `scales_out` (stored shapes above, any device), one expert and a few thousand values at a time, the
    rounding on `q_out`'s device. `column_max` (int8 only): [experts, out] maxima over each expert's whole
    inputs when `stack` holds one rank's slice of them (`input_max` of every piece); by default the slice's."""
    inputs, cols = stack.shape[0] // experts, stack.shape[1]
    q_view, scales_view = q_out.view(experts, -1, cols), scales_out.view(experts, -1, cols)
    step = max(1, chunk_values // max(1, inputs))
    device = q_out.device
    for e in range(experts):
        for start in range(0, cols, step):
            stop = min(start + step, cols)
            # moved in its stored dtype, widened where it is rounded; [out, in] as the scheme takes it
            chunk = stack[e * inputs:(e + 1) * inputs, start:stop].to(device).to(torch.float32).t().contiguous()
            q, scales = quantize(chunk, scheme, None if column_max is None else column_max[e, start:stop].to(device))
            q_view[e, :, start:stop].copy_(q.t())
            scales_view[e, :, start:stop].copy_(scales.t() if scales.dim() == 2 else scales[None])


def dequantize(q: torch.Tensor, scales: torch.Tensor, scheme: Scheme, dtype: torch.dtype) -> torch.Tensor:
    """The float matrices [n, in, out] of n stored experts: q [n, in or in / 2, out] and scales
    [n, 1 or in / group_size, out] (a stack's `.view(E, -1, out)`, or experts gathered from it)."""
    rows_scales = scales.transpose(-1, -2)                          # [n, out, 1 or in / g]
    if scheme.mode == "int8":
        rows_scales = rows_scales.squeeze(-1)
    return dequantize_rows(q.transpose(-1, -2), rows_scales, scheme, dtype).transpose(-1, -2)
