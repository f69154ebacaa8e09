"""The CPU-kernel decoder: decode steps in C (csrc/cpu_decode.c via cpu.py) on x86-64 CPUs.

Matrices keep the checkpoint's [out, in] layout, which the kernels' dot products stream fastest; a
bfloat16 model keeps bfloat16 weights and a quantized one its int8 or int4 weights; activations and
KV cache are float32, and a bfloat16 model's products take their input rounded to bfloat16 (cpu.py).
A prompt that fits one step is prefilled as that step's rows (`prefill`); a longer one runs the model's
PyTorch forward with these projections, so its products go through the kernels too (their multi-row
tiles).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from ..quant.scheme import Scheme
from ..runtime.decode import Decoder
from ..runtime.projection import Projection, QuantizedProjection
from . import cpu


class KernelProjection(Projection):
    """[out, in]; a few rows (a decode step, a short prompt) and every bfloat16 product go through the
    kernels' matvec, longer float32 prompts through MKL's blocked product."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.storage.dtype != torch.float32 or x.numel() <= cpu.PROJECT_MAX_ROWS * x.shape[-1]:
            # bfloat16 weights are those of a bfloat16 model: its products take x rounded to bfloat16
            return cpu.project(x, self.storage, round_x=self.storage.dtype == torch.bfloat16)
        return F.linear(x, self.storage)


class KernelQuantizedProjection(QuantizedProjection):
    """QuantizedProjection's storage and scales (int8 [out, in] with [out] scales, or int4 packed
    [out, in / 2] with [out, in / group_size]), multiplied by the kernels' matvec, which dequantises in
    registers: float32 results for any number of rows, and no dequantised matrix is ever made."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu.project(x, self.storage, self.scales, self.scheme, round_x=self.dtype == torch.bfloat16)


PROMPT_ROWS, PROMPT_SCRATCH_BYTES = 64, 64 << 20


class CpuKernelDecoder(Decoder):
    name = "C kernels"

    def __init__(self):
        super().__init__()
        self.kernels: Optional[CpuDecoder] = None

    def projection(self, holders, dtype: torch.dtype, device: torch.device,
                   scheme: Optional[Scheme] = None) -> Projection:
        if scheme is not None:
            return KernelQuantizedProjection(holders, dtype, device, scheme)
        return KernelProjection(holders, dtype, device)

    def activation_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def describe(self, model) -> str:
        """Which build of the kernels runs, and for a quantized model its products' arithmetic (cpu.describe)."""
        qkv = model.layers[0].attention.qkv
        return cpu.describe(getattr(qkv, "scheme", None), bfloat16=getattr(qkv, "dtype", None) == torch.bfloat16)

    def start(self, model) -> None:
        args, first = model.args, model.layers[0].attention
        self.kernels = CpuDecoder(DecodeTensors(
            dim=args.dim, heads=first.n_local_heads, kv_heads=first.n_local_kv_heads, head_dim=args.head_dim,
            hidden=model.layers[0].feed_forward.gate_up.out_features // 2, eps=args.norm_eps,
            max_rows=model.max_batch_size, max_seq_len=model.max_seq_len, step_rows=self.step_capacity(model),
            rotation=model.rotation,
            norm=model.norm.weight, embedding=model.tok_embeddings.weight,
            layers=[LayerTensors(layer.attention_norm.weight, layer.ffn_norm.weight,
                                 *_matrices(layer.attention.qkv, layer.attention.out, layer.feed_forward.gate_up,
                                            layer.feed_forward.down),
                                 layer.attention.cache_k, layer.attention.cache_v)
                    for layer in model.layers],
            scheme=getattr(model.layers[0].attention.qkv, "scheme", None)),
            model.comm.all_sum, model.world_size)

    def step(self, model, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        return self.kernels.hidden(tokens, pos)

    def step_rows(self, model, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.kernels.hidden(tokens, int(positions.max()), slots, positions)

    def prefill(self, model, tokens: torch.Tensor, start_pos: int, all_positions: bool = False,
                first_row: int = 0) -> torch.Tensor:
        """A prompt that fits one step (batch x seq rows, see `step_capacity`) runs as the rows of one C
        step, each token in its row's cache slot at its own position (causal: every row's keys are in
        the cache before any row attends), which spares the PyTorch forward's operators around the
        products (a quarter of a 32-token prefill of the 110M shape). Longer prompts take that forward,
        whose products are these kernels' tiles too (or MKL's for many rows of float32)."""
        batch, seq = tokens.shape
        if batch * seq > self.step_capacity(model):
            return super().prefill(model, tokens, start_pos, all_positions, first_row)
        slots = torch.arange(first_row, first_row + batch, device="cpu").repeat_interleave(seq)  # [batch * seq]
        positions = torch.arange(start_pos, start_pos + seq, device="cpu").repeat(batch)  # [batch * seq]
        h = self.kernels.hidden(tokens.reshape(-1, 1), start_pos + seq - 1, slots, positions)  # [batch * seq, 1, dim]
        h = h.view(batch, seq, -1)
        return h if all_positions else h[:, -1:]

    def step_capacity(self, model) -> int:
        """The cache's rows plus up to PROMPT_ROWS rows of prompts (continuous batching prefills short
        prompts inside the decode step, where the kernels read each slot's cache in place); fewer when
        the context is so long that their attention scratch would pass PROMPT_SCRATCH_BYTES."""
        heads = model.layers[0].attention.n_local_heads
        return model.max_batch_size + min(PROMPT_ROWS, PROMPT_SCRATCH_BYTES // (4 * heads * model.max_seq_len))

    def prompt_rows_in_step(self, model, decoding: int) -> int:
        """Whatever room the step has beyond its decoding rows: the kernels read a slot's cache in place
        for each of its rows."""
        return self.step_capacity(model) - decoding


def _matrices(*projections: Projection) -> List[Optional[torch.Tensor]]:
    """The storages of these projections, then their scales (None for float matrices)."""
    return [p.storage for p in projections] + [getattr(p, "scales", None) for p in projections]


@dataclass
class LayerTensors:
    """One layer's prepared tensors, as the kernels read them (matrices [out, in], this rank's share;
    quantized ones in quant/scheme.py's layout with their scales)."""

    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    wqkv: torch.Tensor
    wo: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    sqkv: Optional[torch.Tensor]  # scales of the quantized matrices, None for float32 / bfloat16
    so: Optional[torch.Tensor]
    s13: Optional[torch.Tensor]
    s2: Optional[torch.Tensor]
    cache_k: torch.Tensor  # [max_rows, kv_heads, max_seq_len, head_dim], float32
    cache_v: torch.Tensor


@dataclass
class DecodeTensors:
    """Everything a decode step reads, with this rank's sizes (heads, kv_heads, hidden are per rank)."""

    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    eps: float
    max_rows: int            # rows of the KV cache
    max_seq_len: int
    step_rows: int           # rows one step takes (>= max_rows: prompts prefilled within a step)
    rotation: torch.Tensor   # complex64 [max_seq_len, head_dim / 2]
    norm: torch.Tensor       # final norm weight [dim]
    embedding: torch.Tensor  # the whole table [vocab, dim], in the model dtype
    layers: List[LayerTensors]
    scheme: Optional[Scheme] = None  # how every layer's matrices are quantized; None: float, as the embedding


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


MATRICES = ("wqkv", "wo", "w13", "w2")
SCALES = ("sqkv", "so", "s13", "s2")
EMBEDDING_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the C code's EMB_*


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("attention_norm", "ffn_norm", *MATRICES, *SCALES, "cache_k", "cache_v")]


class _Model(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_int64) for name in
                 ("dim", "n_layers", "heads", "kv_heads", "head_dim", "hidden", "max_rows",
                  "max_seq_len", "threads", "embedding_type", "format", "group_size", "int8_x")]
                + [("eps", ctypes.c_float)]
                + [(name, ctypes.c_void_p) for name in ("rotation", "norm", "embedding")]
                + [("vocab_total", ctypes.c_int64), ("layers", ctypes.POINTER(_Layer))]
                + [(name, ctypes.c_void_p) for name in ("x", "qkv", "att", "scores", "ffn", "act")])


class CpuDecoder:
    """Decode steps through the C kernels over prepared tensors (`DecodeTensors`).

    Holds pointers into those tensors, so it must be made after the last of them is in place and
    dropped with them. `hidden` runs one new token per row; with several ranks, `sum_across_ranks`
    adds the partial results between the C calls, as the PyTorch forward does."""

    def __init__(self, t: DecodeTensors, sum_across_ranks: Callable[[torch.Tensor], torch.Tensor], ranks: int):
        self.lib = cpu.library(required=True)
        rows, seq = t.step_rows, t.max_seq_len
        self.sum, self.ranks, self.dim, self.n_layers = sum_across_ranks, ranks, t.dim, len(t.layers)
        f32 = dict(dtype=torch.float32, device="cpu")  # the C code's own buffers
        qkv_dim = (t.heads + 2 * t.kv_heads) * t.head_dim
        self._keep: List[torch.Tensor] = [
            torch.view_as_real(t.rotation).contiguous(),
            *(torch.empty(rows * n, **f32) for n in (t.dim, qkv_dim, t.heads * t.head_dim, t.heads * seq,
                                                    2 * t.hidden, t.hidden)),
        ]
        rotation, x, qkv, attn, scores, ffn_buf, act = self._keep

        def norm(weight: torch.Tensor) -> int:  # the C code reads norm weights as float32
            self._keep.append(weight.float().contiguous())
            return _ptr(self._keep[-1])

        self._layers = (_Layer * self.n_layers)(*(
            _Layer(norm(layer.attention_norm), norm(layer.ffn_norm),
                   *(_ptr(getattr(layer, name)) for name in (*MATRICES, *SCALES, "cache_k", "cache_v")))
            for layer in t.layers))
        weights = [getattr(layer, name) for layer in t.layers for name in MATRICES]
        fmt, group = cpu.weight_format(weights[0], t.scheme)
        assert t.scheme is not None or t.embedding.dtype == weights[0].dtype, "float matrices are in the model dtype"
        assert all(cpu.weight_format(m, t.scheme) == (fmt, group) and m.is_contiguous() for m in weights)
        assert all((getattr(layer, name) is None) == (t.scheme is None) for layer in t.layers for name in SCALES)
        assert all(layer.cache_k.dtype == torch.float32 for layer in t.layers)
        self.cache_rows, self.step_rows = t.max_rows, rows
        self.model = _Model(
            t.dim, self.n_layers, t.heads, t.kv_heads, t.head_dim, t.hidden, t.max_rows, seq,
            torch.get_num_threads(), EMBEDDING_TYPES[t.embedding.dtype], fmt, group,
            int(cpu.int8_activations(t.scheme)), t.eps, _ptr(rotation),
            norm(t.norm), _ptr(t.embedding), t.embedding.shape[0], self._layers,
            *(_ptr(m) for m in (x, qkv, attn, scores, ffn_buf, act)))
        self.ref = ctypes.byref(self.model)
        self.h = torch.empty(rows, t.dim, **f32)        # the residual stream
        self.partial = torch.empty(rows, t.dim, **f32)  # this rank's share of a row-parallel product

    def hidden(self, tokens: torch.Tensor, pos: int, slots: Optional[torch.Tensor] = None,
               positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final normed hidden states [rows, 1, dim] for one new token per row (tokens [rows, 1], int64)
        at position `pos`, appending to the KV cache. With `slots` and `positions` (int64 [rows], for
        continuous batching), row i continues cache row slots[i] at positions[i], and `pos` is their maximum."""
        rows = tokens.shape[0]
        most = self.cache_rows if slots is None else self.step_rows  # rows at once; cache rows without slots
        if rows > most or not 0 <= pos < self.model.max_seq_len:  # C checks no bounds
            raise ValueError(f"{rows} rows at position {pos} do not fit a step of {most} rows x "
                             f"{self.model.max_seq_len} positions")
        if slots is not None:
            slots, positions = slots.long().contiguous(), positions.long().contiguous()
            if (len(slots) != rows or len(positions) != rows or int(slots.min()) < 0
                    or int(slots.max()) >= self.cache_rows or int(positions.min()) < 0):
                raise ValueError(f"slots {slots.tolist()} / positions {positions.tolist()} do not fit {rows} rows and "
                                 f"the cache of {self.cache_rows} rows")
        where = (_ptr(slots), _ptr(positions))
        tokens = tokens.long()
        lib, m, h, partial = self.lib, self.ref, _ptr(self.h), self.partial
        out = torch.empty(rows, 1, self.dim, dtype=torch.float32, device="cpu")
        if self.ranks == 1:
            bad = lib.decode(m, tokens.data_ptr(), tokens.stride(0), rows, pos, *where, h, _ptr(partial),
                             out.data_ptr())
        else:
            bad = lib.embed(m, tokens.data_ptr(), tokens.stride(0), rows, h)  # the same ids on every rank
            incoming = None
            for layer in range(self.n_layers if bad < 0 else 0):
                lib.attention_block(m, layer, rows, pos, *where, h, _ptr(incoming), _ptr(partial))
                incoming = self.sum(partial[:rows])
                lib.ffn_block(m, layer, rows, h, _ptr(incoming), _ptr(partial))
                incoming = self.sum(partial[:rows])
            if bad < 0:
                lib.finish(m, rows, h, _ptr(incoming), out.data_ptr())
        if bad >= 0:
            raise IndexError(f"token id {int(tokens[bad, 0])} is outside the vocabulary "
                             f"(0..{self.model.vocab_total - 1})")
        return out
