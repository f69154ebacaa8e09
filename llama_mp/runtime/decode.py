"""Decoders: how a rank computes, chosen once at load. The model's math is written once (model.py);
a decoder decides where its weight matrices live (the Projection class) and how a decode step, one
new token per row, is run.

* `pytorch`: PyTorch operators, what GPUs (and CPUs without the kernels) run.
* `static`: PyTorch operators in a decode step of static shapes, which compiles into one graph.
* `cpu_kernels`: the C kernels of llama_mp/kernels on x86-64 CPUs with AVX2 and FMA.
* `auto` (default): the CPU kernels where they can run, else PyTorch.

A CUDA-graph decoder is one more class here, not a flag threaded through the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from ..errors import LlamaMPError
from ..quant.scheme import Scheme
from .projection import InOutProjection, Projection, QuantizedProjection

if TYPE_CHECKING:
    from .model import Transformer

DECODERS = ("auto", "pytorch", "static", "cpu_kernels")


class Decoder:
    """The `pytorch` decoder, whose four methods are the interface other decoders override: PyTorch
    operators for everything. On a CPU the matrices are stored [in, out] (MKL's fast matrix-vector
    path); on a GPU as the checkpoint has them, [out, in], for `F.linear`."""

    name = "PyTorch"
    # How many decode steps `generate` runs between checks that every row has stopped. A check makes the
    # host wait for the device; on a CPU that wait costs nothing while each step run past the last stop
    # is wasted, so here every step is checked. A decoder whose steps are queued on a GPU (captured
    # graphs) checks every k steps, as gpt-fast does; the output is the same either way, since tokens
    # after a row's stop are discarded.
    steps_per_stop_check: int = 1

    def projection(self, holders: Sequence[nn.Module], dtype: torch.dtype, device: torch.device,
                   scheme: Optional[Scheme] = None) -> Projection:
        """The Projection for these weight holders: in `dtype`, or quantized by `scheme` with
        activations in `dtype`."""
        if scheme is not None:
            return QuantizedProjection(holders, dtype, device, scheme)
        kind = InOutProjection if device.type == "cpu" else Projection
        return kind(holders, dtype, device)

    def activation_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype of activations and the KV cache for weights in `weight_dtype`."""
        return weight_dtype

    def start(self, model: "Transformer") -> None:
        """Called once every tensor of the model is in place (the whole embedding table included)."""

    def step(self, model: "Transformer", tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Final normed hidden states [rows, 1, dim] for one new token per row (tokens [rows, 1]) at
        position `pos`, appending to the KV cache."""
        return model.forward_hidden(tokens, pos)

    def prefill(self, model: "Transformer", tokens: torch.Tensor, start_pos: int, all_positions: bool = False,
                first_row: int = 0) -> torch.Tensor:
        """Final normed hidden states for many new tokens per row (tokens [batch, seq], a prompt),
        continuing cache rows first_row.. at `start_pos`: [batch, seq, dim] with `all_positions`, else
        the last position's [batch, 1, dim]."""
        return model.forward_hidden(tokens, start_pos, all_positions, first_row)

    def step_rows(self, model: "Transformer", tokens: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """As `step`, but row i continues cache row `slots[i]` at its own position `positions[i]`
        (continuous batching: runtime/batching.py)."""
        return model.forward_rows(tokens, slots, positions)

    def step_capacity(self, model: "Transformer") -> int:
        """The most rows one `step_rows` call takes. Beyond the cache's rows, a step may also carry a
        newcomer's prompt, one row per token in its slot (causal, since every row's keys are written
        before any row attends); here it does not: PyTorch would copy the slot's cache once per row."""
        return model.max_batch_size


class StaticDecoder(Decoder):
    """The `static` decoder: PyTorch operators, with a decode step whose shapes and operators are the
    same at every step (`Transformer.forward_static`: positions as tensors, the whole cache length read
    under a mask, no host sync), for generation and continuous batching alike. That is what
    `torch.compile(fullgraph=True)` and CUDA graphs take whole, so a compiling or graph-capturing
    decoder is a subclass of this one. Eager, it decodes the same ids as `pytorch` but its attention
    costs grow with max_seq_len rather than with the positions reached (the `pytorch` decoder slices
    the cache there), so on its own it is no faster."""

    name = "PyTorch, static shapes"

    def step(self, model: "Transformer", tokens: torch.Tensor, pos: int) -> torch.Tensor:
        positions = torch.full((tokens.shape[0],), pos, dtype=torch.long, device=tokens.device)
        return model.forward_static(tokens, positions)

    def step_rows(self, model: "Transformer", tokens: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        return model.forward_static(tokens, positions.to(tokens.device), slots.to(tokens.device))


def choose_decoder(name: str, device: torch.device, weight_dtype: torch.dtype,
                   scheme: Optional[Scheme] = None) -> Decoder:
    """The decoder `name` (one of DECODERS) for a model in `weight_dtype` on `device`, its layer matrices
    quantized by `scheme` if given (the kernels then take float16 models too)."""
    from ..kernels import cpu
    from ..kernels.decoder import CpuKernelDecoder

    if name not in DECODERS:
        raise LlamaMPError(f"Unknown --decoder {name!r}; use one of {', '.join(DECODERS)}.")
    if name == "pytorch":
        return Decoder()
    if name == "static":
        return StaticDecoder()
    if name == "cpu_kernels":
        dtypes = cpu.WEIGHT_DTYPES if scheme is None else cpu.EMBEDDING_DTYPES
        if device.type != "cpu" or weight_dtype not in dtypes:
            kinds = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise LlamaMPError(f"--decoder cpu_kernels runs on the CPU with {kinds} weights, not on "
                               f"{device.type} with {str(weight_dtype).replace('torch.', '')}; use --decoder auto.")
        cpu.library(required=True)
        return CpuKernelDecoder()
    return CpuKernelDecoder() if cpu.usable(device, weight_dtype, scheme) else Decoder()
