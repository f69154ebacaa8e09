"""The CPU-kernel decoder: decode steps in C (csrc/cpu_decode.c via cpu.py) on x86-64 CPUs.

Matrices keep the checkpoint's [out, in] layout, which the kernels' dot products stream fastest; a
bfloat16 model keeps bfloat16 weights and a quantized one its int8 or int4 weights, and both compute
in float32 (activations and KV cache). Prefill runs the model's PyTorch forward with these projections,
so its products go through the kernels too (their multi-row tiles).
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
            return cpu.project(x, self.storage)
        return F.linear(x, self.storage)


class KernelQuantizedProjection(QuantizedProjection):
    """QuantizedProjection's storage and scales (int8 [out, in] with [out] scales, or int4 packed
    [out, in / 2] with [out, in / group_size]), multiplied by the kernels' matvec, which dequantises in
    registers: float32 results for any number of rows, and no dequantised matrix is ever made."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu.project(x, self.storage, self.scales, self.scheme)


class CpuKernelDecoder(Decoder):
    name = "C kernels"

    def __init__(self):
        self.kernels: Optional[CpuDecoder] = None

    def projection(self, holders, dtype: torch.dtype, device: torch.device,
                   scheme: Optional[Scheme] = None) -> Projection:
        if scheme is not None:
            return KernelQuantizedProjection(holders, dtype, device, scheme)
        return KernelProjection(holders, dtype, device)

    def activation_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def start(self, model) -> None:
        args, first = model.args, model.layers[0].attention
        self.kernels = CpuDecoder(DecodeTensors(
            dim=args.dim, heads=first.n_local_heads, kv_heads=first.n_local_kv_heads, head_dim=args.head_dim,
            hidden=model.layers[0].feed_forward.gate_up.out_features // 2, eps=args.norm_eps,
            max_rows=model.max_batch_size, max_seq_len=model.max_seq_len, rotation=model.rotation,
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
    max_rows: int
    max_seq_len: int
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
                  "max_seq_len", "threads", "embedding_type", "format", "group_size")]
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
        rows, seq = t.max_rows, t.max_seq_len
        self.sum, self.ranks, self.dim, self.n_layers = sum_across_ranks, ranks, t.dim, len(t.layers)
        f32 = dict(dtype=torch.float32)
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
        self.model = _Model(
            t.dim, self.n_layers, t.heads, t.kv_heads, t.head_dim, t.hidden, rows, seq,
            torch.get_num_threads(), EMBEDDING_TYPES[t.embedding.dtype], fmt, group, t.eps, _ptr(rotation),
            norm(t.norm), _ptr(t.embedding), t.embedding.shape[0], self._layers,
            *(_ptr(m) for m in (x, qkv, attn, scores, ffn_buf, act)))
        self.ref = ctypes.byref(self.model)
        self.h = torch.empty(rows, t.dim, **f32)        # the residual stream
        self.partial = torch.empty(rows, t.dim, **f32)  # this rank's share of a row-parallel product

    def hidden(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Final normed hidden states [rows, 1, dim] for one new token per row (tokens [rows, 1], int64)
        at position `pos`, appending to the KV cache."""
        rows = tokens.shape[0]
        if rows > self.model.max_rows or not 0 <= pos < self.model.max_seq_len:  # C checks no bounds
            raise ValueError(f"{rows} rows at position {pos} do not fit the cache of {self.model.max_rows} rows "
                             f"x {self.model.max_seq_len} positions")
        tokens = tokens.long()
        lib, m, h, partial = self.lib, self.ref, _ptr(self.h), self.partial
        out = torch.empty(rows, 1, self.dim, dtype=torch.float32)
        if self.ranks == 1:
            bad = lib.decode(m, tokens.data_ptr(), tokens.stride(0), rows, pos, h, _ptr(partial), out.data_ptr())
        else:
            bad = lib.embed(m, tokens.data_ptr(), tokens.stride(0), rows, h)  # the same ids on every rank
            incoming = None
            for layer in range(self.n_layers if bad < 0 else 0):
                lib.attention_block(m, layer, rows, pos, h, _ptr(incoming), _ptr(partial))
                incoming = self.sum(partial[:rows])
                lib.ffn_block(m, layer, rows, h, _ptr(incoming), _ptr(partial))
                incoming = self.sum(partial[:rows])
            if bad < 0:
                lib.finish(m, rows, h, _ptr(incoming), out.data_ptr())
        if bad >= 0:
            raise IndexError(f"token id {int(tokens[bad, 0])} is outside the vocabulary "
                             f"(0..{self.model.vocab_total - 1})")
        return out
