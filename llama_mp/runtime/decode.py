"""Decoders: how a rank computes, chosen once at load. The model's math is written once (model.py);
a decoder decides where its weight matrices live (the Projection class) and how a decode step, one
new token per row, is run.

* `pytorch`: PyTorch operators, what GPUs (and CPUs without the kernels) run.
* `static`: PyTorch operators in a decode step of static shapes, which compiles into one graph.
* `compiled`: that step compiled whole by torch.compile, CUDA graphs on a GPU (runtime/compiled.py).
* `cpu_kernels`: the C kernels of llama_mp/kernels on x86-64 CPUs with AVX2 and FMA.
* `auto` (default): the CPU kernels where they can run, else PyTorch.

The CUDA-graph decoder (`compiled`) is one more class, not a flag threaded through the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Type

import torch
from torch import nn

from .. import families
from ..errors import LlamaMPError
from ..quant.scheme import Scheme
from .model import CacheRows
from .projection import InOutProjection, Projection, QuantizedProjection
from .transfer import upload

if TYPE_CHECKING:
    from .model import Transformer

DECODERS = ("auto", "pytorch", "static", "compiled", "cpu_kernels")
GPU_STOP_CHECK_STEPS = 8  # at most 7 steps past the last stop: ~2% of a 256-token answer


class Decoder:
    """The `pytorch` decoder, whose methods are the interface other decoders override: PyTorch operators
    for everything, through the model's one pass (`Transformer.step`, prompts through
    `Transformer.prefill`). Each call reads exactly the cache it needs: the rows it continues (from the
    lowest to the highest, in place) and the positions up to the highest one reached.

    Its float matrices are stored as `float_projection` says, which `choose_decoder` picks for the device
    (`float_projection_for`); a decoder made for a GPU runs on a CPU too, which is how the CPU tests
    check what GPUs run."""

    name = "PyTorch"
    # How many decode steps `generate` runs between checks that every row has stopped (the one host read
    # of its loop): `steps_per_stop_check_for` the device, which `choose_decoder` passes.
    steps_per_stop_check: int = 1
    # Whether quantized matrices multiply through packed kernels (no dequantised matrix): `plan`'s memory.
    packs_quantized: bool = False
    # Whether decode steps run traced by torch.compile (fake tensors: an operator's meta registration, not
    # its kernel, says what a step may call).
    traces_steps: bool = False

    def __init__(self, float_projection: Optional[Type[Projection]] = None, steps_per_stop_check: int = 1):
        self.float_projection = float_projection  # None: the choice for the device it is materialized on
        self.steps_per_stop_check = steps_per_stop_check

    def projection(self, holders: Sequence[nn.Module], dtype: torch.dtype, device: torch.device,
                   scheme: Optional[Scheme] = None) -> Projection:
        """The Projection for these weight holders: in `dtype`, or quantized by `scheme` with
        activations in `dtype`."""
        if scheme is not None:
            return QuantizedProjection(holders, dtype, device, scheme)
        return (self.float_projection or float_projection_for(device))(holders, dtype, device)

    def activation_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype of activations and the KV cache for weights in `weight_dtype`."""
        return weight_dtype

    def start(self, model: "Transformer") -> None:
        """Called once every tensor of the model is in place (the whole embedding table included)."""

    def span(self, model: "Transformer", last_position: int) -> int:
        """The cache positions a step whose highest position is `last_position` reads: those it needs."""
        return last_position + 1

    def step(self, model: "Transformer", tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Final normed hidden states [rows, 1, dim] for one new token per row (tokens [rows, 1]) at
        position `pos`, appending to the KV cache rows 0..rows-1."""
        positions = torch.full((1, 1), pos, dtype=torch.long, device=tokens.device)  # every row's position
        return model.step(tokens, positions, pos + 1, CacheRows(0, tokens.shape[0]), causal=True)

    def prefill(self, model: "Transformer", tokens: torch.Tensor, start_pos: int, all_positions: bool = False,
                first_row: int = 0) -> torch.Tensor:
        """Final normed hidden states for many new tokens per row (tokens [batch, seq], a prompt),
        continuing cache rows first_row.. at `start_pos`: [batch, seq, dim] with `all_positions`, else
        the last position's [batch, 1, dim]."""
        return model.prefill(tokens, start_pos, first_row, all_positions)

    def step_rows(self, model: "Transformer", tokens: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """As `step`, but row i continues cache row `slots[i]` at its own position `positions[i]`
        (continuous batching: runtime/batching.py). `slots` and `positions` are read on the host (where
        the callers keep them) to size the call; on the device they would cost a wait."""
        device, slots_host = tokens.device, slots.cpu()
        first, last = int(slots_host.min()), int(slots_host.max())
        in_order = bool((slots_host == torch.arange(first, first + len(slots_host), device="cpu")).all())
        rows = CacheRows(first, last + 1 - first, None if in_order else upload(slots_host - first, device))
        span = self.span(model, int(positions.max()))
        return model.step(tokens, upload(positions, device)[:, None], span, rows)

    def prompt_rows_in_step(self, model: "Transformer", decoding: int) -> int:
        """How many prompt tokens a `step_rows` call that continues `decoding` slots may also carry, one
        row per token in the newcomer's slot (causal, since every row's keys are written before any row
        attends). None here: attention reads each slot's cache through one block row, so two rows of a
        slot would need a copy of it per row; a newcomer's prompt is prefilled on its own instead."""
        return 0


class StaticDecoder(Decoder):
    """The `static` decoder: PyTorch operators, with a decode step whose shapes are the same from step to
    step: `Transformer.step` over every row of the cache, positions as tensors, and the cache positions
    read in buckets (`span`: powers of two, at least SPAN_BUCKET_MIN), so a whole generation takes a
    handful of shapes, each one graph for `torch.compile(fullgraph=True)` or a CUDA-graph capture; a
    compiling or graph-capturing decoder is a subclass of this one. The rows a call does not continue
    take token 0 at the cache's last position, max_seq_len - 1: no row has anything there that it will
    read before writing it (a row's last position is written by the step that first reads it), so the
    write disturbs no sequence; a model with routed layers is told which rows are live (`StepInputs.live`),
    so those rows add no expert to what a step reads. Eager, it decodes the same ids as `pytorch`; its
    attention reads every cache row and up to twice the positions the `pytorch` decoder reads (masked)."""

    name = "PyTorch, static shapes"

    def span(self, model: "Transformer", last_position: int) -> int:
        return min(max(SPAN_BUCKET_MIN, 1 << last_position.bit_length()), model.max_seq_len)

    def step(self, model: "Transformer", tokens: torch.Tensor, pos: int) -> torch.Tensor:
        rows, device = tokens.shape[0], tokens.device
        slots, positions = torch.arange(rows, device=device), torch.full((rows,), pos, dtype=torch.long, device=device)
        return self.padded_step(model, tokens, slots, positions, self.span(model, pos))

    def step_rows(self, model: "Transformer", tokens: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        span = self.span(model, int(positions.max()))  # on the host, where the callers keep positions
        return self.padded_step(model, tokens, upload(slots, tokens.device), upload(positions, tokens.device), span)

    def padded_step(self, model: "Transformer", tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                    span: int, count: Optional[int] = None) -> torch.Tensor:
        """The device side of a step, what compiles or is captured whole: `Transformer.step` over every
        cache row (or rows 0..count-1, which hold every slot), row slots[i] taking tokens[i] at
        positions[i] (the others token 0 at the last position), its attention reading `span` positions;
        the hidden states of the rows asked for, in their order [rows, 1, dim]. Every argument but
        `span` and `count` is a device tensor."""
        count = model.max_batch_size if count is None else count
        every_token = torch.zeros((count, 1), dtype=tokens.dtype, device=tokens.device).index_copy_(0, slots, tokens)
        every_position = torch.full((count, 1), model.max_seq_len - 1, dtype=torch.long,
                                    device=tokens.device).index_copy_(0, slots, positions[:, None])
        live = (torch.zeros(count, dtype=torch.bool, device=tokens.device).index_fill_(0, slots, True)
                if model.routes_rows else None)  # only routed layers read it
        h = self.block_step(model, every_token, every_position, span, live)
        return h.index_select(0, slots)

    def block_step(self, model: "Transformer", tokens: torch.Tensor, positions: torch.Tensor,
                   span: int, live: Optional[torch.Tensor]) -> torch.Tensor:
        """`Transformer.step` over cache rows 0..count-1, one token each (tokens, positions [count, 1]; `live`
        [count]: the rows the call continues, for a model with routed layers): eager here, one compiled
        graph per shape in the `compiled` decoder (runtime/compiled.py)."""
        return model.step(tokens, positions, span, CacheRows(0, tokens.shape[0]), live=live)


# The fewest cache positions the static decoder's attention reads (its smallest bucket).
SPAN_BUCKET_MIN = 16


def float_projection_for(device: torch.device) -> Type[Projection]:
    """How a PyTorch decoder stores float matrices on `device`: [in, out] on a CPU (`InOutProjection`,
    MKL's fast matrix-vector path), the checkpoint's [out, in] for `F.linear` on a GPU (`Projection`)."""
    return InOutProjection if device.type == "cpu" else Projection


def steps_per_stop_check_for(device: torch.device) -> int:
    """How often `generate` checks that every row has stopped. A check makes the host wait for the device.
    On a CPU that wait costs nothing while each step run past the last stop is wasted: every step. On a
    GPU the wait would empty the queue of steps, so every GPU_STOP_CHECK_STEPS (as gpt-fast does); the
    output is the same either way, since tokens after a row's stop are discarded."""
    return 1 if device.type == "cpu" else GPU_STOP_CHECK_STEPS


def choose_decoder(name, device: torch.device, weight_dtype: torch.dtype,
                   scheme: Optional[Scheme] = None, family: Optional[str] = None) -> Decoder:
    """The decoder `name` (one of DECODERS) for a model in `weight_dtype` on `device`, its layer matrices
    quantized by `scheme` if given (the kernels then take float16 models too). A Decoder made already
    is returned as it is: e.g. `choose_decoder("static", torch.device("cuda"), ...)`, what a GPU gets,
    which tests run on the CPU."""
    from ..kernels import cpu
    from ..kernels.decoder import CpuKernelDecoder

    if isinstance(name, Decoder):
        return name
    if name not in DECODERS:
        raise LlamaMPError(f"Unknown --decoder {name!r}; use one of {', '.join(DECODERS)}.")
    if name == "pytorch":
        return Decoder(float_projection_for(device), steps_per_stop_check_for(device))
    if name == "static":
        return StaticDecoder(float_projection_for(device), steps_per_stop_check_for(device))
    if name == "compiled":
        from .compiled import CompiledDecoder

        problem = None if family is None or scheme is None else families.named(family).compiled_quantized_problem
        if problem:
            raise LlamaMPError(problem)
        if scheme is not None and scheme.mode == "int4" and device.type == "cuda" and weight_dtype != torch.bfloat16:
            raise LlamaMPError(f"--decoder compiled multiplies int4 weights on CUDA with torch's int4 kernel, which "
                               f"takes bfloat16 activations, not {str(weight_dtype).replace('torch.', '')}; use "
                               "--dtype bfloat16, or --decoder pytorch.")
        return CompiledDecoder(float_projection_for(device), steps_per_stop_check_for(device), device.type)
    kernels_problem = None if family is None else families.named(family).cpu_kernels_problem
    if kernels_problem and name == "cpu_kernels":
        raise LlamaMPError(f"--decoder cpu_kernels cannot run {families.named(family).title} ({kernels_problem}); "
                           "use --decoder pytorch or static (auto picks pytorch).")
    if name == "cpu_kernels":
        dtypes = cpu.WEIGHT_DTYPES if scheme is None else cpu.EMBEDDING_DTYPES
        if device.type != "cpu" or weight_dtype not in dtypes:
            kinds = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise LlamaMPError(f"--decoder cpu_kernels runs on the CPU with {kinds} weights, not on "
                               f"{device.type} with {str(weight_dtype).replace('torch.', '')}; use --decoder auto.")
        cpu.library(required=True)
        return CpuKernelDecoder()
    if not kernels_problem and cpu.usable(device, weight_dtype, scheme):
        return CpuKernelDecoder()
    return Decoder(float_projection_for(device), steps_per_stop_check_for(device))
