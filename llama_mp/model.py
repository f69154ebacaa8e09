"""The LLaMA 1 / Llama 2 transformer, split over ranks with fairscale's model-parallel layers.

Each rank holds its own slice of every weight, exactly as Meta's shards store them (see layout.py):
attention heads and FFN columns are divided between ranks; `wo` and `w2` then sum the partial results
across ranks (one all-reduce each per layer), and the embedding and output layers all-gather. The KV
cache is preallocated per rank for that rank's own key/value heads only.

Build it on the meta device (no random init, no memory), load real tensors with `assign=True`, then
call `setup_caches` to allocate the KV cache and rotary tables on the target device.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fairscale_layers
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from torch import nn

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
        # Normalise in float32 whatever the model dtype, as Meta does, then scale.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device):
    """cos and sin of every (position, frequency) pair, float32, shape [max_seq_len, head_dim // 2]."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate Meta-style interleaved pairs (x[2i], x[2i+1]) of x: [batch, seq, heads, head_dim]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


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
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None

    def setup_cache(self, max_batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype):
        # [batch, kv_heads, seq, head_dim]: a prefix of the sequence axis is directly usable by SDPA.
        shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_v = torch.zeros(shape, device=device, dtype=dtype)

    def forward(self, x, start_pos: int, cos, sin, mask: Optional[torch.Tensor]) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        end = start_pos + seqlen
        self.cache_k[:bsz, :, start_pos:end] = k.transpose(1, 2)
        self.cache_v[:bsz, :, start_pos:end] = v.transpose(1, 2)
        keys, values = self.cache_k[:bsz, :, :end], self.cache_v[:bsz, :, :end]

        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask,
            enable_gqa=self.n_local_heads != self.n_local_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden, args.dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start_pos: int, cos, sin, mask) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
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

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the KV cache and rotary tables next to the weights (after loading them)."""
        device, dtype = self.output.weight.device, self.output.weight.dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        for layer in self.layers:
            layer.attention.setup_cache(max_batch_size, max_seq_len, device, dtype)
        self.rope_cos, self.rope_sin = rotary_tables(self.args.head_dim, max_seq_len, self.args.rope_theta, device)

    def forward(self, tokens: torch.Tensor, start_pos: int, all_positions: bool = False) -> torch.Tensor:
        """Float32 logits for the last position ([batch, vocab]), or every position with all_positions.

        `tokens` continue the cached sequence at `start_pos`: the whole prompt on the first call, then
        one new token per call.
        """
        seqlen = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        cos = self.rope_cos[start_pos:start_pos + seqlen]
        sin = self.rope_sin[start_pos:start_pos + seqlen]
        mask = None
        if seqlen > 1:  # causal over the new tokens; every cached position is visible
            mask = torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=tokens.device)
            mask = mask.tril(diagonal=start_pos)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask)
        if not all_positions:
            h = h[:, -1:]
        logits = self.output(self.norm(h)).float()
        return logits if all_positions else logits[:, 0]
