"""The `compiled` decoder: the static decode step (decode.py's StaticDecoder) compiled whole.

`torch.compile(fullgraph=True, dynamic=False)` of `Transformer.step` over a block of cache rows: on CUDA
in mode "reduce-overhead" (each graph captured as a CUDA graph, so a step's layers are one replay), on a CPU
with inductor's default C++ backend, which is how the CPU suite checks the same compiled code. The
tensor-parallel sums inside the step are traced as functional collectives
(`Collectives.all_sum` under `torch.compiler.is_compiling()`), so they are nodes of the graph: NCCL inside
the CUDA graph, gloo on a CPU.

Buckets. A step's shapes are its block of cache rows (`count`: a power of two, or max_batch_size, above
the highest row it continues) and its span (the static decoder's power-of-two buckets of positions), so a
model has (log2 max_batch_size + 1) x (log2(max_seq_len / 16) + 1) graphs at most, each compiled (and on
CUDA captured) once, at load (`start`, the warm-up), and reused for every step that falls in it. The rows
a step does not continue take token 0 at position max_seq_len - 1, as the static step's do, which is what
the warm-up writes too: nothing any sequence will read. Prompts are prefilled eagerly (`Transformer.prefill`).

Quantized models take packed products (`PackedInt8Projection`, `PackedInt4Projection`): torch's
`_weight_int8pack_mm` on the stored int8 matrix, and `_weight_int4pack_mm` (CUDA) or
`_weight_int4pack_mm_for_cpu` on the int4 groups repacked at load into the kernel's own tile layout; no
dequantised matrix is ever made. A compile failure is a LlamaMPError naming `--decoder pytorch`.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch._dynamo.exc
import torch._inductor.exc
from torch import nn

from ..errors import LlamaMPError
from ..quant.scheme import Scheme, unpack_int4
from .decode import SPAN_BUCKET_MIN, StaticDecoder
from .model import CacheRows
from .projection import Projection, QuantizedProjection
from .transfer import upload

if TYPE_CHECKING:
    from .model import Transformer

# What tracing and compiling raise (graph breaks under fullgraph, inductor and C++ compiler failures).
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit,
                  torch._inductor.exc.CppCompileError)
# The int4 kernels' tile depth (torch's innerKTiles: 2, 4 or 8; inputs must be a multiple of 16 x it).
INT4_INNER_K_TILES = 2


def row_buckets(max_batch_size: int) -> List[int]:
    """The block sizes a compiled step runs: powers of two below max_batch_size, and max_batch_size."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


def span_buckets(max_seq_len: int) -> List[int]:
    """The spans the static decoder's `span` gives for every position of a max_seq_len cache."""
    spans, span = [], SPAN_BUCKET_MIN
    while span < max_seq_len:
        spans.append(span)
        span *= 2
    return spans + [max_seq_len]


def _bucket_step(model: "Transformer", tokens: torch.Tensor, positions: torch.Tensor, live: Optional[torch.Tensor],
                 span: int) -> torch.Tensor:
    """What each compiled graph is: the model's one pass over cache rows 0..count-1 (tokens and positions
    [count, 1]; `live` [count], for a model with routed layers, the rows a step continues), attention
    reading `span` positions; hidden states [count, 1, dim]."""
    return model.step(tokens, positions, span, CacheRows(0, tokens.shape[0]), live=live)


class CompiledDecoder(StaticDecoder):
    """`--decoder compiled`: the static step, one compiled graph per (rows, span) bucket, warmed up at load.

    `warmup_s` is the time `start` took to compile (and on CUDA capture) every bucket, `graphs` how many
    there are; a later load with the same TORCHINDUCTOR_CACHE_DIR reuses inductor's compiled kernels."""

    packs_quantized = True
    traces_steps = True

    def __init__(self, float_projection: Optional[Type[Projection]] = None, steps_per_stop_check: int = 1,
                 device_type: str = "cpu"):
        super().__init__(float_projection, steps_per_stop_check)
        self.cuda_graphs = device_type == "cuda"
        self.name = "PyTorch, compiled" + (" with CUDA graphs" if self.cuda_graphs else " (inductor C++)")
        self.mode = "reduce-overhead" if self.cuda_graphs else None
        self.compiled = None
        self.buckets: List[Tuple[int, int]] = []
        self.warmup_s = 0.0
        self.graphs = 0

    def projection(self, holders: Sequence[nn.Module], dtype: torch.dtype, device: torch.device,
                   scheme: Optional[Scheme] = None) -> Projection:
        if scheme is None:
            return super().projection(holders, dtype, device)
        if scheme.mode == "int8":
            return PackedInt8Projection(holders, dtype, device, scheme)
        out_features = sum(h.weight.shape[0] for h in holders)
        problem = int4_pack_problem(holders[0].weight.shape[1], out_features, device, dtype)
        if problem:
            raise LlamaMPError(f"--decoder compiled cannot multiply {holders[0].weight.shape[1]}-input int4 "
                               f"matrices with torch's int4 kernel: {problem}. Use --decoder pytorch.")
        return PackedInt4Projection(holders, dtype, device, scheme)

    # ------------------------------------------------------------------------------------------
    # Load: pack, compile, warm up

    def pack(self, model: "Transformer") -> None:
        """Bring the loaded quantized matrices into the packed kernels' formats (once, at load)."""
        for projection in _projections(model):
            if isinstance(projection, (PackedInt8Projection, PackedInt4Projection)):
                projection.pack()

    def start(self, model: "Transformer") -> None:
        """Pack quantized matrices, then compile and run every bucket once (twice on CUDA: the first run
        warms up, the second records the CUDA graph). Every rank runs the same buckets in the same order,
        so their collectives meet."""
        self.pack(model)
        if self.cuda_graphs:
            for tensor in _step_tensors(model):  # read in place by the graphs, never copied into them
                torch._dynamo.mark_static_address(tensor)
        self.buckets = [(rows, span) for rows in row_buckets(model.max_batch_size)
                        for span in span_buckets(model.max_seq_len)]
        self.compiled = torch.compile(_bucket_step, fullgraph=True, dynamic=False, mode=self.mode)
        begin = time.perf_counter()
        device = model.cache_positions.device
        # Room for every bucket (and another model's in this process); past it dynamo would run the step
        # eagerly without a word, so there it fails instead.
        limits = dict(recompile_limit=len(self.buckets) + 8, accumulated_recompile_limit=len(self.buckets) + 256,
                      fail_on_recompile_limit_hit=True)
        with torch.inference_mode(), torch._dynamo.config.patch(**limits), warnings.catch_warnings():
            # The rotary product is complex (model.apply_rotary): inductor runs that one operator as aten's
            # own kernel inside the graph and says so once per graph; known, and no reason to alarm anyone.
            warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
            for rows, span in self.buckets:
                tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)
                positions = torch.full((rows, 1), model.max_seq_len - 1, dtype=torch.long, device=device)
                live = torch.zeros(rows, dtype=torch.bool, device=device) if model.routes_rows else None
                for _ in range(2 if self.cuda_graphs else 1):
                    self._run(model, tokens, positions, live, span)
        if self.cuda_graphs:
            torch.cuda.synchronize(device)
        self.warmup_s = time.perf_counter() - begin
        self.graphs = len(self.buckets)

    def _run(self, model: "Transformer", tokens: torch.Tensor, positions: torch.Tensor,
             live: Optional[torch.Tensor], span: int) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        try:
            return self.compiled(model, tokens, positions, live, span)
        except COMPILE_ERRORS as e:  # what dynamo and inductor raise; a collective's failure passes as it is
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise LlamaMPError(
                f"--decoder compiled could not compile the decode step for {tokens.shape[0]} cache row(s) and "
                f"{span} positions on {tokens.device.type} ({type(e).__name__}: {first}). torch.compile needs a "
                "working C++ compiler on a CPU (inductor's backend) or Triton on a GPU; run with "
                "--decoder pytorch (or static) instead, or set TORCH_LOGS=graph_breaks,recompiles to see "
                "where it fails.") from e

    # ------------------------------------------------------------------------------------------
    # Steps

    def bucket(self, model: "Transformer", rows: int) -> int:
        """The block of cache rows a step that continues rows 0..rows-1 runs: the smallest bucket."""
        return next(size for size in row_buckets(model.max_batch_size) if size >= rows)

    def step(self, model: "Transformer", tokens: torch.Tensor, pos: int) -> torch.Tensor:
        rows, device = tokens.shape[0], tokens.device
        slots, positions = torch.arange(rows, device=device), torch.full((rows,), pos, dtype=torch.long, device=device)
        return self.padded_step(model, tokens, slots, positions, self.span(model, pos), self.bucket(model, rows))

    def step_rows(self, model: "Transformer", tokens: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        # read on the host, where the callers keep them: the bucket and the span
        count, span = self.bucket(model, int(slots.max()) + 1), self.span(model, int(positions.max()))
        device = tokens.device
        return self.padded_step(model, tokens, upload(slots, device), upload(positions, device), span, count)

    def block_step(self, model: "Transformer", tokens: torch.Tensor, positions: torch.Tensor,
                   span: int, live: Optional[torch.Tensor]) -> torch.Tensor:
        if self.compiled is None:
            raise LlamaMPError("The compiled decoder was used before the model was loaded (its `start` compiles "
                               "the step); build the model with Llama.build.")
        return self._run(model, tokens, positions, live, span)


# ----------------------------------------------------------------------------------------------
# Packed quantized products


class PackedInt8Projection(QuantizedProjection):
    """int8 weights [out, in] with a float32 scale per output row, multiplied by `torch._weight_int8pack_mm`
    (CPU and CUDA): the int8 matrix as loaded is the kernel's format, so packing only makes the scales in
    the activation dtype. Every call dequantises in registers; no float matrix is made."""

    def pack(self) -> None:
        self.packed_scales = self.scales.to(self.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()  # the kernels take contiguous rows
        y = torch._weight_int8pack_mm(rows, self.storage, self.packed_scales)
        return y.view(*x.shape[:-1], self.out_features)


class PackedInt4Projection(QuantizedProjection):
    """int4 groups through torch's tinygemm kernels: `_weight_int4pack_mm` on CUDA (bfloat16 activations),
    `_weight_int4pack_mm_for_cpu` on a CPU, both computing `(q - 8) * scale + zero` per group, which with
    zero 0 is exactly this project's symmetric `q * scale` (stored as q + 8). `pack` (at load) converts the
    loaded nibbles into the kernel's tiles, as many bytes as the stored matrix, written over it in place
    (`packed` is a view of `storage`: the holders' `weight` views then hold the kernel's layout, not the
    checkpoint's), and the scales into its [in / group_size, out, 2] scale-and-zero table in the
    activation dtype (`scale_and_zero`, the one tensor this path adds; with bfloat16 activations the
    loaded scales are dropped for views of its scales, so it adds only the zeros)."""

    def __init__(self, holders: Sequence[nn.Module], dtype: torch.dtype, device: torch.device, scheme: Scheme):
        super().__init__(holders, dtype, device, scheme)
        self.holders = list(holders)

    def pack(self) -> None:
        # At most 6 bytes a weight at once (footprint.py counts it): int8 values, then int32 ones on a CPU.
        q = unpack_int4(self.storage).add_(8).view(torch.uint8)                  # [out, in], 0..15
        if self.storage.device.type == "cuda":  # the kernel's input: two per byte, the even input high
            nibbles = q[:, ::2].bitwise_left_shift(4).bitwise_or_(q[:, 1::2])     # [out, in / 2]
            del q
            tiles = torch._convert_weight_to_int4pack(nibbles, INT4_INNER_K_TILES)
            del nibbles
            self.packed = self.storage.view(torch.int32).view(tiles.shape).copy_(tiles)
        else:  # the kernel's input: one int32 per value
            values = q.to(torch.int32)
            del q
            tiles = torch._convert_weight_to_int4pack_for_cpu(values, INT4_INNER_K_TILES)
            del values
            self.packed = self.storage.view(tiles.dtype).view(tiles.shape).copy_(tiles)
        del tiles
        scales = self.scales.to(self.dtype).t()                                  # [in / g, out]
        self.scale_and_zero = torch.stack((scales, torch.zeros_like(scales)), dim=-1).contiguous()
        if self.scales.dtype == self.dtype:  # bfloat16 activations: the table's scales replace the loaded ones
            self.scales = self.scale_and_zero[..., 0].t()                         # [out, in / g], a view
            start = 0
            for holder in self.holders:
                rows = holder.scales.shape[0]
                holder.scales = nn.Parameter(self.scales[start:start + rows], requires_grad=False)
                start += rows

    def matrix(self) -> torch.Tensor:
        """The dequantised weights [out, in] in the activation dtype (a new tensor), read back through the
        kernel (the tiles are its own layout): the products of the identity."""
        return self(torch.eye(self.in_features, dtype=self.dtype, device=self.packed.device)).t()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()  # the kernels take contiguous rows
        if self.packed.device.type == "cuda":
            y = torch._weight_int4pack_mm(rows, self.packed, self.scheme.group_size, self.scale_and_zero)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.scheme.group_size, self.scale_and_zero)
        return y.view(*x.shape[:-1], self.out_features)


def int4_pack_problem(in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why torch's int4 kernels cannot take a matrix [out, in] with `dtype` activations on `device`, or None."""
    if in_features % (16 * INT4_INNER_K_TILES):
        return f"{in_features} inputs are not a multiple of {16 * INT4_INNER_K_TILES}"
    if device.type == "cuda" and (dtype != torch.bfloat16 or out_features % 8):
        return "CUDA's int4 kernel takes bfloat16 activations and a multiple of 8 outputs"
    return None


def _projections(model: "Transformer") -> List[Projection]:
    """Every projection of the model: the output layer's and those its layers' modules hold, whatever the
    layer kind (Llama's feed-forward, Llama 4's dense one or its MoE's shared expert)."""
    out = [model.logits_of]
    for layer in model.layers:
        out += [v for module in layer.modules() for v in vars(module).values() if isinstance(v, Projection)]
    return out


def _step_tensors(model: "Transformer") -> List[torch.Tensor]:
    """Every tensor a decode step reads that is not a parameter (which the compiler knows are static):
    the KV caches, the rotary table and index tables, and the projections' storage."""
    tensors: Dict[int, torch.Tensor] = {}
    for holder in [model, *(layer.attention for layer in model.layers)]:
        for value in vars(holder).values():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                tensors[id(value)] = value
    for projection in _projections(model):
        for value in vars(projection).values():
            if isinstance(value, torch.Tensor):
                tensors[id(value)] = value
    return list(tensors.values())
