"""The LLaMA 1 / Llama 2 transformer, split over ranks with fairscale's model-parallel layers.

Each rank holds its own slice of every weight, exactly as Meta's shards store them (see layout.py):
attention heads and FFN columns are divided between ranks; `wo` and `w2` then sum the partial results
across ranks (two sums per layer, see collectives.py), and the output layer's vocabulary slices are
gathered on rank 0 for sampling. The fairscale layers hold the weights in Meta's layout; the forward
pass is written here, with only the collectives the math needs. The KV cache is preallocated per rank
for that rank's own key/value heads only.

Build it on the meta device (no random init, no memory), load real tensors with `assign=True`, then
call `prepare` (fuse projections, allocate the KV cache and rotary table on the target device) and,
once every rank got that far, `share_embedding`.

On x86-64 CPUs with float32 or bfloat16 weights, decode steps (one new token per sequence) run in C
instead, with the same math and the same collectives (cpu_kernels.py); the products of prompts go
through its kernels too, and everything else runs the code below, in float32.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fairscale_layers
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from torch import nn

from . import cpu_kernels
from .collectives import all_sum, gather_into, gather_last_dim_to_main, global_argmax
from .params import ModelArgs


def _keep(weight: torch.Tensor) -> torch.Tensor:
    """init_method that does nothing: weights come from the checkpoint, never from a random init."""
    return weight


@contextlib.contextmanager
def skip_fairscale_init() -> Iterator[None]:
    """Stop fairscale from initialising weights while the model is built.

    With more than one rank, fairscale's layers build the whole unsplit weight on every rank and copy
    their slice out of it: wasted time and memory, and impossible on the meta device. Our weights always
    come from the checkpoint, so we skip that step.
    """
    original = fairscale_layers._initialize_affine_weight
    fairscale_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fairscale_layers._initialize_affine_weight = original


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, round to the model dtype, then scale, exactly as Meta does. Written
        # out: on CPU this is several times faster than F.rms_norm for one token's vector.
        xf = x if x.dtype == torch.float32 else x.float()
        normed = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return (normed if x.dtype == torch.float32 else normed.type_as(x)) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device) -> torch.Tensor:
    """Unit complex numbers e^(i * position * frequency), complex64 [max_seq_len, head_dim // 2]."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate Meta-style interleaved pairs (x[2i], x[2i+1]) of x: [batch, seq, heads, head_dim].

    Each pair is one complex number; rotating it is one complex multiplication (in float32)."""
    if x.dtype != torch.float32:
        return apply_rotary(x.float(), rotation).type_as(x)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation[:, None, :]).flatten(-2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = get_model_parallel_world_size()
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.kv_heads // mp
        kv_dim = args.kv_heads * args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.dim, bias=False, gather_output=False, init_method=_keep)
        self.wk = ColumnParallelLinear(args.dim, kv_dim, bias=False, gather_output=False, init_method=_keep)
        self.wv = ColumnParallelLinear(args.dim, kv_dim, bias=False, gather_output=False, init_method=_keep)
        self.wo = RowParallelLinear(args.dim, args.dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.out_in = False  # layout of the prepared matrices below: see `_fuse`
        self.wqkv: Optional[torch.Tensor] = None  # q, k and v features of this rank together
        self.wo_w: Optional[torch.Tensor] = None
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None

    def prepare(self, max_batch_size: int, max_seq_len: int, out_in: bool, dtype: torch.dtype) -> None:
        """`dtype`: of the activations and so of the KV cache (float32 with the CPU kernels)."""
        device = self.wq.weight.device
        self.out_in = out_in
        self.wqkv = _fuse(out_in, self.wq, self.wk, self.wv)
        self.wo_w = _fuse(out_in, self.wo)
        # [batch, kv_heads, seq, head_dim]: a prefix of the sequence axis is directly usable by attention.
        shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.cache_k = cpu_kernels.empty_for_streaming(shape, dtype, device).zero_()
        self.cache_v = cpu_kernels.empty_for_streaming(shape, dtype, device).zero_()

    def forward(self, x, start_pos: int, rotation, mask: Optional[torch.Tensor]) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        heads, kv_heads, hd = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        qkv = _project(x, self.wqkv, self.out_in).view(bsz, seqlen, heads + 2 * kv_heads, hd)
        qk = apply_rotary(qkv[:, :, :heads + kv_heads], rotation)  # q and k rotate together
        q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads:]

        end = start_pos + seqlen
        self.cache_k[:bsz, :, start_pos:end] = k.transpose(1, 2)
        self.cache_v[:bsz, :, start_pos:end] = v.transpose(1, 2)
        keys, values = self.cache_k[:bsz, :, :end], self.cache_v[:bsz, :, :end]

        if seqlen == 1:
            # Decoding: one query per head against the cache. Queries that share a kv head are
            # grouped as rows of one matrix product, so kv heads are never copied (GQA for free).
            q = q.reshape(bsz, kv_heads, heads // kv_heads, hd) * hd ** -0.5
            scores = torch.matmul(q, keys.transpose(2, 3))
            out = torch.matmul(torch.softmax(scores.float(), dim=-1).type_as(q), values)
        else:
            # A prompt from position 0 is plain causal attention (lets SDPA pick its fastest kernel);
            # new tokens after cached ones need the explicit mask.
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                 is_causal=mask is None, enable_gqa=heads != kv_heads)
            out = out.transpose(1, 2)
        return all_sum(_project(out.reshape(bsz, seqlen, heads * hd), self.wo_w, self.out_in))


def _fuse(out_in: bool, *layers: nn.Module) -> torch.Tensor:
    """The layers' weights as one contiguous matrix: one product instead of several.

    Layout [sum of out_features, in_features] (the checkpoint's, `out_in`) for the CPU decode kernels,
    whose dot products stream it fastest; otherwise [in_features, sum of out_features], because
    `x @ w` with w stored [in, out] runs MKL's matrix-vector kernel about twice as fast as `x @ w.T`
    (decoding is bound by reading weights), and costs nothing on GPUs. Each layer's weight becomes a
    view into the fused matrix (still [out, in]), so no memory is duplicated and state_dict() is
    unchanged."""
    weights = [layer.weight for layer in layers]
    shape = (sum(w.shape[0] for w in weights), weights[0].shape[1])
    room = cpu_kernels.empty_for_streaming(shape if out_in else shape[::-1], weights[0].dtype, weights[0].device)
    if out_in:
        fused = torch.cat(weights, dim=0, out=room)
    else:
        fused = torch.cat([w.t() for w in weights], dim=1, out=room).t()  # stored [in, out]
    start = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
        start += rows
    return fused if out_in else fused.t()


def _project(x: torch.Tensor, w: torch.Tensor, out_in: bool) -> torch.Tensor:
    """x @ W for a matrix prepared by `_fuse`; with the kernels' layout, their product for few rows
    or bfloat16 weights."""
    if not out_in:
        return torch.matmul(x, w)
    if w.dtype != torch.float32 or x.numel() <= cpu_kernels.PROJECT_MAX_ROWS * x.shape[-1]:
        return cpu_kernels.project(x, w)
    return F.linear(x, w)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden, args.dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)
        self.out_in = False
        self.w13: Optional[torch.Tensor] = None
        self.w2_w: Optional[torch.Tensor] = None

    def prepare(self, out_in: bool) -> None:
        self.out_in = out_in
        self.w13 = _fuse(out_in, self.w1, self.w3)
        self.w2_w = _fuse(out_in, self.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = _project(x, self.w13, self.out_in).chunk(2, dim=-1)
        return all_sum(_project(F.silu(gate) * up, self.w2_w, self.out_in))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start_pos: int, rotation, mask) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, rotation, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The whole model on one rank: its slice of every layer, plus the full embedding table.

    Calls: `hidden` runs the layers over new tokens (every rank, same result); `logits` gathers the
    vocabulary on rank 0 for sampling; `greedy_next` finds the argmax without moving logits at all.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.vocab_size > 0, "resolve vocab_size from the checkpoint before building the model"
        self.args = args
        self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False, init_method=_keep)
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.out_in = False
        self.act_dtype = torch.float32
        self.decoder: Optional[cpu_kernels.CpuDecoder] = None  # the C decode path, when in use

    def prepare(self, max_batch_size: int, max_seq_len: int) -> None:
        """Get ready to run, once the weights are loaded: fuse projections and allocate the KV cache
        and rotary table next to the weights. Local to this rank (no collective), so running out of
        memory here is reported like a load failure. `share_embedding` must follow."""
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        weight = self.output.weight
        self.out_in = cpu_kernels.wanted(weight.device, weight.dtype)
        # With the CPU kernels a bfloat16 model computes in float32; otherwise in its weights' dtype.
        self.act_dtype = torch.float32 if self.out_in else weight.dtype
        for layer in self.layers:
            layer.attention.prepare(max_batch_size, max_seq_len, self.out_in, self.act_dtype)
            layer.feed_forward.prepare(self.out_in)
        self.rotation = rotary_tables(self.args.head_dim, max_seq_len, self.args.rope_theta, weight.device)
        self.output_w = _fuse(self.out_in, self.output)
        self.vocab_offset = self.output.weight.shape[0] * get_model_parallel_rank()
        ranks, piece = get_model_parallel_world_size(), self.tok_embeddings.weight
        if ranks > 1:  # room for the whole embedding table, taken now while failing is still orderly
            self._embedding_parts = torch.empty((ranks, *piece.shape), dtype=piece.dtype, device=piece.device)
            self._embedding_table = torch.empty((piece.shape[0], piece.shape[1] * ranks), dtype=piece.dtype,
                                                device=piece.device)

    def share_embedding(self) -> None:
        """Collective: assemble the whole embedding table on every rank (into memory `prepare` took).

        Meta's shards split the embedding by columns, which would cost an all-gather per step; one
        all-gather now (vocab x dim values per rank, e.g. 0.5 GB for 70B in bf16) saves it for good.
        Then, every tensor being in place, the CPU decoder (if used) takes its pointers."""
        ranks = get_model_parallel_world_size()
        if ranks > 1:
            parts = gather_into(self._embedding_parts, self.tok_embeddings.weight)  # [ranks, vocab, dim/ranks]
            table = self._embedding_table
            table.view(table.shape[0], parts.shape[0], -1).copy_(parts.transpose(0, 1))
            self.tok_embeddings.weight = nn.Parameter(table, requires_grad=False)
            del self._embedding_parts, self._embedding_table
        if self.out_in:
            self.decoder = cpu_kernels.CpuDecoder(self, all_sum, ranks)

    def hidden(self, tokens: torch.Tensor, start_pos: int, all_positions: bool = False) -> torch.Tensor:
        """Final normed hidden states [batch, seq or 1, dim] for `tokens` continuing the cache at
        `start_pos` (the prompt on the first call, then one token per call)."""
        seqlen = tokens.shape[1]
        if seqlen == 1 and self.decoder is not None:
            return self.decoder.hidden(tokens, start_pos)
        h = F.embedding(tokens, self.tok_embeddings.weight).to(self.act_dtype)
        rotation = self.rotation[start_pos:start_pos + seqlen]
        mask = None
        if seqlen > 1 and start_pos > 0:  # causal over the new tokens; every cached position is visible
            mask = torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=tokens.device)
            mask = mask.tril(diagonal=start_pos)
        for layer in self.layers:
            h = layer(h, start_pos, rotation, mask)
        return self.norm(h if all_positions else h[:, -1:])

    def logits(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """Float32 logits over the whole vocabulary on rank 0; None on the other ranks."""
        full = gather_last_dim_to_main(_project(h, self.output_w, self.out_in))
        return None if full is None else full.float()

    def greedy_next(self, h: torch.Tensor) -> torch.Tensor:
        """Greedy next token [batch] on every rank, from h of shape [batch, 1, dim]."""
        return global_argmax(_project(h[:, -1], self.output_w, self.out_in), self.vocab_offset)

    def forward(self, tokens: torch.Tensor, start_pos: int, all_positions: bool = False) -> Optional[torch.Tensor]:
        """Logits on rank 0 (None elsewhere): [batch, vocab] for the last position, or
        [batch, seq, vocab] with all_positions."""
        logits = self.logits(self.hidden(tokens, start_pos, all_positions))
        return logits if logits is None or all_positions else logits[:, -1]
