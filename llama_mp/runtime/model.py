"""The LLaMA transformer of one rank: its slice of every weight, and the forward pass written as the math.

Each rank holds its own slice of every weight, exactly as `checkpoints/layout.py` says Meta's shards
store them: attention heads and FFN columns are divided between ranks (column-parallel wq, wk, wv, w1,
w3 and output; row-parallel wo and w2). After `wo` and `w2` the ranks sum their partial results (two
sums per layer), and the output layer's vocabulary slices meet on rank 0 for sampling, or in a
distributed argmax for greedy decoding. The KV cache is preallocated per rank for its own kv heads.

Life of a model: built on the meta device (shapes only, no memory); `materialize` lets the decoder
(decode.py) allocate every matrix where and how it reads it fastest and takes the KV cache and rotary
table; the checkpoint is then copied straight into those tensors (loading.py); once every rank got that
far, `share_embedding` assembles the whole embedding table on every rank (a lookup then needs no
communication) and the decoder starts.

The layers run in one pass, `Transformer.step`: new tokens for a set of cache rows, each token at its own
position (a tensor), keys and values written into the cache in place and attention reading it in place
(views of a block of rows and of the positions up to a span). Every PyTorch decoder's decode step runs it,
and every prompt (`Transformer.prefill`, a chunk per call); the C kernels (kernels/decoder.py) are the one
other implementation, behind the same decoder seam.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import families
from ..checkpoints import layout
from ..checkpoints.params import ModelArgs
from ..distributed.collectives import Collectives
from ..quant.scheme import Scheme
from .memory import empty_for_streaming
from .projection import Projection

# Prompt positions one `Transformer.step` call takes (`Transformer.prefill` runs longer prompts in chunks).
PREFILL_CHUNK = 512
if TYPE_CHECKING:
    from ..distributed import Group
    from .decode import Decoder


class Weight(nn.Module):
    """One of this rank's weight tensors in Meta's layout and name (`<module>.weight`), a slice of the
    whole tensor as layout.py splits it. It only holds the tensor: Projections compute with it."""

    def __init__(self, shape):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)


class RMSNorm(Weight):
    def __init__(self, shape, eps: float):
        super().__init__(shape)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, round to the model dtype, then scale, exactly as Meta does. In float32
        # that is F.rms_norm with the weight, one fused operator with the same result bit for bit; in
        # bfloat16 or float16 the fused one would round once after scaling instead of twice (some values
        # then differ by one bfloat16 rounding), so there the scaling stays a separate multiplication.
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        if x.dtype == torch.float32:  # float32 activations, lower-precision weight (promotes to float32)
            return F.rms_norm(x, self.weight.shape, None, self.eps) * self.weight
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).type_as(x) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device,
                  scale: Optional[float] = None, high_freq_factor: float = 4.0) -> torch.Tensor:
    """Unit complex numbers e^(i * position * frequency), complex64 [max_seq_len, head_dim // 2].

    With `scale` (Llama 3.1's scaled rope), frequencies whose wavelength is longer than the original
    8192-token context are divided by `scale`, those shorter than a quarter of it are kept, and those in
    between are blended smoothly; computed in float64 from the float32 frequencies, as Meta does."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scale is not None:
        freqs = scaled_rope_frequencies(freqs, scale, high_freq_factor=high_freq_factor)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def scaled_rope_frequencies(freqs: torch.Tensor, scale: float, original_context: int = 8192,
                            low_freq_factor: float = 1.0, high_freq_factor: float = 4.0) -> torch.Tensor:
    """Llama 3.1's frequency scaling (see `rotary_tables`), float32 in and out."""
    f = freqs.double()
    wavelength = 2 * math.pi / f
    long_wave, short_wave = original_context / low_freq_factor, original_context / high_freq_factor
    blend = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    between = (1 - blend) * f / scale + blend * f
    # With high_freq_factor == low_freq_factor (Llama 4) nothing lies between, and `between` is unused.
    scaled = torch.where(wavelength < short_wave, f, torch.where(wavelength >= long_wave, f / scale, between))
    return scaled.to(freqs.dtype)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate Meta-style interleaved pairs (x[2i], x[2i+1]) of x: [rows, seq, heads, head_dim], by
    rotation [rows or 1, seq, head_dim / 2] (each token's own position's row of the rotary table).

    Each pair is one complex number; rotating it is one complex multiplication (in float32)."""
    if x.dtype != torch.float32:
        return apply_rotary(x.float(), rotation).type_as(x)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation[:, :, None]).flatten(-2)


def _softmax_as(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the last axis computed in float32 (as Meta does), returned in `dtype`: one operator
    in float32, two otherwise (no casts that change nothing)."""
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return weights if dtype == torch.float32 else weights.to(dtype)


class CacheRows(NamedTuple):
    """The KV-cache rows one call of `Transformer.step` works on: its attention reads the block of cache
    rows [first, first + count) in place (a view), and token row i of the call is block row index[i]
    (cache row first + index[i]); with index None, token row i is block row i (count rows)."""

    first: int
    count: int
    index: Optional[torch.Tensor] = None  # int64 [rows] on the model's device


class StepInputs(NamedTuple):
    """What every layer of one `Transformer.step` call shares, made once per call."""

    rotation: torch.Tensor          # [rows or 1, seq, head_dim / 2]: each new token's rotary row
    cache_rows: torch.Tensor        # [rows, 1]: the cache row each token row writes its keys and values to
    positions: torch.Tensor         # [rows or 1, seq]: the position each token writes them at
    rows: CacheRows                 # the block attention reads
    span: int                       # cache positions attention reads, 0..span-1
    bias: Optional[torch.Tensor]    # [count, 1, seq, span]: 0 where a query sees a key, -inf elsewhere;
                                    # None: every query sees the keys up to its own, the last seq of span
    chunk_bias: Optional[torch.Tensor] = None   # as bias, for chunked attention (Llama 4's RoPE layers)
    query_scale: Optional[torch.Tensor] = None  # [rows or 1, seq, 1, 1]: Llama 4's attention temperature
    # [rows] bool: the rows that carry a sequence, where a call also runs rows that only fill its shapes (the
    # static decoder's); None: every row. Routing keeps those rows off experts no sequence chose (llama4.py).
    live: Optional[torch.Tensor] = None


class LayerKind(NamedTuple):
    """How a layer's attention differs from Llama 1/2/3's (Llama 4: runtime/llama4.py's `layer_kind`)."""

    rope: bool = True            # rotary embedding (False: a NoPE layer)
    chunked: bool = False        # attention within blocks of attention_chunk_size positions
    qk_norm: bool = False        # weightless RMSNorm of q and k after rope
    temperature: bool = False    # q scaled by at.query_scale


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, shapes, prefix: str, comm: Collectives, kind: LayerKind = LayerKind()):
        super().__init__()
        self.head_dim, self.kind, self.eps = args.head_dim, kind, args.norm_eps
        if prefix + "wq.weight" in shapes:
            self.wq, self.wk, self.wv = (Weight(shapes[f"{prefix}{name}.weight"]) for name in ("wq", "wk", "wv"))
            self.n_local_heads = self.wq.weight.shape[0] // args.head_dim
            self.n_local_kv_heads = self.wk.weight.shape[0] // args.head_dim
            self.qkv_holders = [self.wq, self.wk, self.wv]
        else:  # Llama 4: [q; k; v] of this rank's heads in one tensor, as Meta's shards store it
            self.wqkv = Weight(shapes[prefix + "wqkv.weight"])
            parts = (args.n_heads + 2 * args.kv_heads) * args.head_dim // self.wqkv.weight.shape[0]
            self.n_local_heads, self.n_local_kv_heads = args.n_heads // parts, args.kv_heads // parts
            self.qkv_holders = [self.wqkv]
        self.wo = Weight(shapes[prefix + "wo.weight"])
        self.comm = comm
        self.qkv: Optional[Projection] = None  # q, k and v features of this rank, fused
        self.out: Optional[Projection] = None
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None

    def materialize(self, decoder: "Decoder", dtype: torch.dtype, device: torch.device, max_batch_size: int,
                    max_seq_len: int, scheme: Optional[Scheme] = None) -> None:
        self.qkv = decoder.projection(self.qkv_holders, dtype, device, scheme)
        self.out = decoder.projection([self.wo], dtype, device, scheme)
        # [batch, kv_heads, seq, head_dim]: a block of rows and a prefix of the sequence axis is a view
        # that attention reads in place.
        shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        cache_dtype = decoder.activation_dtype(dtype)
        self.cache_k = empty_for_streaming(shape, cache_dtype, device).zero_()
        self.cache_v = empty_for_streaming(shape, cache_dtype, device).zero_()

    def forward(self, x: torch.Tensor, at: StepInputs) -> torch.Tensor:
        """x [rows, seq, dim]: new tokens, row i's in cache row at.cache_rows[i] at at.positions[i]."""
        rows, seq, _ = x.shape
        heads, kv_heads, hd = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        qkv = self.qkv(x).view(rows, seq, heads + 2 * kv_heads, hd)
        qk = qkv[:, :, :heads + kv_heads]
        if self.kind.rope:
            qk = apply_rotary(qk, at.rotation)  # q and k rotate together
        if self.kind.qk_norm:
            qk = unit_rms_norm(qk, self.eps)
        if self.kind.temperature:
            qk = torch.cat([(qk[:, :, :heads] * at.query_scale).to(qk.dtype), qk[:, :, heads:]], dim=2)
        # Written in place (index_put_: only the new tokens' values move), before anything attends, so
        # a call's tokens see each other within their row (a prompt's causal attention).
        self.cache_k[at.cache_rows, :, at.positions] = qk[:, :, heads:]   # [rows, seq, kv_heads, hd]
        self.cache_v[at.cache_rows, :, at.positions] = qkv[:, :, heads + kv_heads:]
        block = slice(at.rows.first, at.rows.first + at.rows.count)
        keys = self.cache_k[block, :, :at.span]  # [count, kv_heads, span, hd]: views, never copies
        values = self.cache_v[block, :, :at.span]
        q = qk[:, :, :heads].transpose(1, 2)     # [rows, heads, seq, hd]
        index = at.rows.index
        bias = at.chunk_bias if self.kind.chunked else at.bias
        if index is not None:  # rows in scattered cache rows: their queries go to their block rows
            q = q.new_zeros(at.rows.count, heads, seq, hd).index_copy_(0, index, q)
        if seq == 1:
            # Decoding: the queries that share a kv head are the rows of one product with its keys, read
            # in place (GQA without repeating a kv head); softmax in float32.
            grouped = q.reshape(q.shape[0], kv_heads, heads // kv_heads, hd) * hd ** -0.5
            scores = torch.matmul(grouped, keys.transpose(2, 3))         # [count, kv_heads, group, span]
            if bias is not None:
                scores = scores + bias
            out = torch.matmul(_softmax_as(scores, q.dtype), values)    # [count, kv_heads, group, hd]
        else:
            # Prompts: SDPA's fused kernels (causal from position 0 with no mask at all, the fastest
            # there is); enable_gqa reads a kv head in place for its queries too, softmax in float32.
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, is_causal=bias is None,
                                                 enable_gqa=heads != kv_heads).transpose(1, 2)  # [count, seq, heads, hd]
        if index is not None:
            out = out.index_select(0, index)
        return self.comm.all_sum(self.out(out.reshape(rows, seq, heads * hd)))


class FeedForward(nn.Module):
    # Whether its output for a row depends on which rows of the call carry a sequence (`StepInputs.live`):
    # a routed layer's does, in what it reads (runtime/llama4.py's MoE).
    routes_rows = False

    def __init__(self, shapes, prefix: str, comm: Collectives):
        super().__init__()
        self.w1, self.w2, self.w3 = (Weight(shapes[f"{prefix}{name}.weight"]) for name in ("w1", "w2", "w3"))
        self.comm = comm
        self.gate_up: Optional[Projection] = None  # w1 and w3 fused
        self.down: Optional[Projection] = None

    def materialize(self, decoder: "Decoder", dtype: torch.dtype, device: torch.device,
                    scheme: Optional[Scheme] = None) -> None:
        self.gate_up = decoder.projection([self.w1, self.w3], dtype, device, scheme)
        self.down = decoder.projection([self.w2], dtype, device, scheme)

    def forward(self, x: torch.Tensor, at: Optional[StepInputs] = None) -> torch.Tensor:
        return self.comm.all_sum(swiglu(self.gate_up, self.down, x))


def swiglu(gate_up: Projection, down: Projection, x: torch.Tensor) -> torch.Tensor:
    """This rank's part of a SwiGLU FFN, before the ranks' sum: down(silu(gate) * up), gate and up fused."""
    gate, up = gate_up(x).chunk(2, dim=-1)
    return down(F.silu(gate) * up)


def unit_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight over the last axis, in float32, returned in x's dtype (Llama 4's qk norm)."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).type_as(x)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, shapes, index: int, comm: Collectives):
        super().__init__()
        prefix = f"layers.{index}."
        own = families.family_of(args).layers_module
        if own is not None:  # the family's own layers (Llama 4's: runtime/llama4.py)
            self.attention = Attention(args, shapes, prefix + "attention.", comm, own.layer_kind(args, index))
            self.feed_forward = own.feed_forward(args, shapes, prefix + "feed_forward.", comm, index)
        else:
            self.attention = Attention(args, shapes, prefix + "attention.", comm)
            self.feed_forward = FeedForward(shapes, prefix + "feed_forward.", comm)
        self.attention_norm = RMSNorm(shapes[prefix + "attention_norm.weight"], args.norm_eps)
        self.ffn_norm = RMSNorm(shapes[prefix + "ffn_norm.weight"], args.norm_eps)

    def forward(self, x: torch.Tensor, at: StepInputs) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), at)
        return h + self.feed_forward(self.ffn_norm(h), at)


class Transformer(nn.Module):
    """The whole model on one rank: its slice of every layer, plus (once shared) the whole embedding.

    Calls: `hidden`, `hidden_rows` and `hidden_in_slot` run new tokens through the layers (every rank,
    same result) by way of the decoder, which sizes the call (rows, span) and runs it: the PyTorch
    decoders through `step`, the one pass of the layers, or `prefill`, prompts through `step` a chunk at
    a time; the C kernels through their own step. `logits` gathers the vocabulary on rank 0 for
    sampling; `greedy_next` finds the argmax without moving logits at all. Build it inside
    `torch.device("meta")` to get shapes without memory (see loading.py).
    """

    def __init__(self, args: ModelArgs, group: Optional["Group"] = None):
        super().__init__()
        assert args.vocab_size > 0, "resolve vocab_size from the checkpoint before building the model"
        self.args = args
        # Chosen once: the family's attention chunk, and its layers, which a step asks for the temperature.
        self.family = families.family_of(args)
        self.own_layers, self.own_fields = self.family.layers_module, self.family.own_fields(args)
        self.attention_chunk = self.family.attention_chunk(args)  # positions a RoPE layer sees (None: all)
        self.rank, self.world_size = (group.rank, group.world_size) if group is not None else (0, 1)
        self.comm = group.collectives if group is not None else Collectives(0, 1, "none")
        # The holders take the float shapes [out, in]; a quantized model's projections (materialize) then
        # give them integer `weight` and `scales` views, as layout.py lays out a quantized checkpoint.
        shapes = {layout.model_key(key, args): shape
                  for key, shape in layout.shard_shapes(args.with_scheme(None), self.world_size).items()}
        self.tok_embeddings = Weight(shapes["tok_embeddings.weight"])  # this rank's slice, until shared
        self.layers = nn.ModuleList(TransformerBlock(args, shapes, i, self.comm) for i in range(args.n_layers))
        # Whether a step over rows that only fill its shapes tells the layers which rows are live.
        self.routes_rows = any(layer.feed_forward.routes_rows for layer in self.layers)
        self.norm = RMSNorm(shapes["norm.weight"], args.norm_eps)
        self.output = Weight(shapes["output.weight"])
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.decoder: Optional["Decoder"] = None
        self.act_dtype = torch.float32
        self.logits_of: Optional[Projection] = None
        self.unusable_from: Optional[int] = None  # local output ids from here on are never generated

    def checkpoint_tensors(self) -> dict:
        """This rank's tensors by their checkpoint names (layout.py's keys): the state dict, renamed where
        a family's checkpoint names differ from the model's (Llama 4's norms, experts, mlp)."""
        names = {layout.model_key(key, self.args): key for key in layout.full_shapes(self.args.with_scheme(None))}
        state = self.state_dict()
        if all(k == v for k, v in names.items()):
            return state
        return {names.get(key, key): tensor for key, tensor in state.items()}

    def materialize(self, decoder: "Decoder", dtype: torch.dtype, device: torch.device, max_batch_size: int,
                    max_seq_len: int) -> None:
        """Allocate every tensor on `device` (uninitialised: the checkpoint fills the weights), laid out
        as `decoder` wants them, with the KV cache for `max_batch_size` x `max_seq_len` and the rotary
        table. Local to this rank (no collective), so running out of memory here is reported like a
        load failure; the room for the whole embedding table is taken now for the same reason."""
        self.decoder, self.max_batch_size, self.max_seq_len = decoder, max_batch_size, max_seq_len
        self.act_dtype = decoder.activation_dtype(dtype)
        scheme = self.args.scheme  # None: float weights; else every layer linear, and the output in int8
        for layer in self.layers:
            layer.attention.materialize(decoder, dtype, device, max_batch_size, max_seq_len, scheme)
            layer.feed_forward.materialize(decoder, dtype, device, scheme)
        self.logits_of = decoder.projection([self.output], dtype, device,
                                            None if scheme is None else layout.OUTPUT_SCHEME)
        for holder in (self.tok_embeddings, self.norm, *(m for layer in self.layers
                                                            for m in (layer.attention_norm, layer.ffn_norm))):
            holder.weight = nn.Parameter(torch.empty(holder.weight.shape, dtype=dtype, device=device),
                                         requires_grad=False)
        self.rotation = rotary_tables(self.args.head_dim, max_seq_len, self.args.rope_theta, device,
                                      self.args.rope_scale if self.args.use_scaled_rope else None,
                                      self.args.rope_high_freq_factor)
        self.cache_positions = torch.arange(max_seq_len, device=device)  # attention's masks are made from it
        self.row_numbers = torch.arange(max_batch_size, device=device)[:, None]  # [rows, 1]: cache rows to write
        self.vocab_offset = self.output.weight.shape[0] * self.rank
        if self.world_size > 1:
            self._embedding_table = torch.empty(layout.full_shapes(self.args)["tok_embeddings.weight"],
                                                dtype=dtype, device=device)

    def share_embedding(self) -> None:
        """Collective: assemble the whole embedding table on every rank (into the memory `materialize`
        took), merging the ranks' slices along the dimension layout.py splits it; then start the decoder.

        One gather now (vocab x dim values per rank, e.g. 0.5 GB for 70B in bf16) saves one per step."""
        if self.world_size > 1:
            piece, table = self.tok_embeddings.weight, self._embedding_table
            dim = layout.split_dim("tok_embeddings.weight", self.args)
            if dim == 0:  # vocabulary rows: the ranks' slices, stacked in rank order, are the table
                self.comm.gather_into(table.view(self.world_size, *piece.shape), piece)
            else:
                parts = self.comm.gather_into(torch.empty((self.world_size, *piece.shape), dtype=piece.dtype,
                                                          device=piece.device), piece)
                torch.cat(parts.unbind(0), dim=dim, out=table)
            self.tok_embeddings.weight = nn.Parameter(table, requires_grad=False)
            del self._embedding_table
        self.decoder.start(self)

    def limit_vocab(self, usable: int) -> None:
        """Never generate ids >= `usable`: the tokenizer has only that many pieces, and a padded
        vocabulary's extra rows (real checkpoints have them) would give ids it cannot decode."""
        local = self.output.weight.shape[0]
        start = usable - self.vocab_offset
        self.unusable_from = max(start, 0) if start < local else None

    def _local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the logits [..., vocab / ranks], ids past the usable vocabulary at -inf."""
        logits = self.logits_of(h)
        if self.unusable_from is not None:
            logits[..., self.unusable_from:] = float("-inf")
        return logits

    def hidden(self, tokens: torch.Tensor, start_pos: int, all_positions: bool = False) -> torch.Tensor:
        """Final normed hidden states [batch, seq or 1, dim] for `tokens` continuing the cache at
        `start_pos` (the prompt on the first call, then one token per call, which the decoder runs)."""
        if tokens.shape[1] == 1:
            return self.decoder.step(self, tokens, start_pos)
        return self.decoder.prefill(self, tokens, start_pos, all_positions)

    def hidden_in_slot(self, tokens: torch.Tensor, slot: int, start: int = 0,
                       all_positions: bool = False) -> torch.Tensor:
        """Continuous batching: prefill one prompt (tokens [1, n]) into cache row `slot` from position
        `start` (what is before it is in the row already), leaving the other rows alone; the final normed
        hidden state of its last position [1, 1, dim], or with `all_positions` of every position [1, n, dim]."""
        if tokens.shape[1] == 1:
            at = torch.tensor([slot, start], dtype=torch.long, device="cpu")  # read on the host
            return self.hidden_rows(tokens, at[:1], at[1:])
        return self.decoder.prefill(self, tokens, start, all_positions, first_row=slot)

    def copy_cache_prefix(self, source: int, slot: int, n: int) -> None:
        """Prefix caching: cache row `slot` takes positions 0..n-1 of row `source` (on the device, in
        place), every layer's keys and values."""
        for layer in self.layers:
            attention = layer.attention
            attention.cache_k[slot, :, :n].copy_(attention.cache_k[source, :, :n])
            attention.cache_v[slot, :, :n].copy_(attention.cache_v[source, :, :n])

    def hidden_rows(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Continuous batching: one new token per row (tokens [rows, 1]), row i continuing cache row
        `slots[i]` at its own position `positions[i]` (int64 tensors [rows], best on the host: the
        decoders read what they need of them there, without waiting for the device, and move the rest);
        attention of a row sees its cache up to its own position. Final normed hidden states [rows, 1, dim],
        from the decoder (which may read the block of cache rows from min(slots) to max(slots))."""
        return self.decoder.step_rows(self, tokens, slots, positions)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding rows of `tokens` in the activation dtype (no cast where they already are)."""
        h = F.embedding(tokens, self.tok_embeddings.weight)
        return h if h.dtype == self.act_dtype else h.to(self.act_dtype)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, span: int, rows: CacheRows,
             all_positions: bool = True, causal: bool = False, live: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's one pass over new tokens, which every PyTorch decoder's decode step and every
        prefill run: tokens [n, seq], token (i, j) at position positions[i, j] (int64 [n or 1, seq], on
        the device: positions are only ever indices and compared, never read on the host) in cache row
        `rows`.first + `rows`.index[i] (+ i without an index). Attention of a token sees its row's cache
        up to its own position; it reads, in place, the cache rows of `rows`' block and positions
        0..span-1 (span > every position; what the decoder reads more than that is masked). `causal`
        says that every row's tokens are the last seq positions of the span, in order (a prompt
        continuing its rows; one new token per row at span - 1): then no mask is needed. The shapes
        depend only on n, seq, span and the block, so with them fixed this compiles into one graph
        (`torch.compile(fullgraph=True)`) and can be captured. Final normed hidden states [n, seq, dim]
        (`all_positions`), or of each row's last token [n, 1, dim]. `live` ([n] bool on the device, or None
        for all) says which rows carry a sequence when the others only fill the call's shapes."""
        n, seq = tokens.shape
        h = self._embed(tokens)                                                      # [n, seq, dim]
        first = rows.first
        cache_rows = self.row_numbers[first:first + n] if rows.index is None else (rows.index + first)[:, None]
        bias = None
        if not (causal and rows.index is None and (seq == 1 or seq == span)):
            bias = self._attention_bias(positions, span, rows, n, seq)
        chunk_bias, query_scale = bias, None
        chunk = self.attention_chunk
        if chunk is not None and span > chunk:  # else the chunk holds every key the call reads
            chunk_bias = self._attention_bias(positions, span, rows, n, seq, chunk)
        if self.own_layers is not None:
            query_scale = self.own_layers.query_scale(self.own_fields, positions)
        at = StepInputs(self.rotation[positions], cache_rows, positions, rows, span, bias, chunk_bias, query_scale,
                        live)
        for layer in self.layers:
            h = layer(h, at)
        return self.norm(h if all_positions else h[:, -1:])

    def _attention_bias(self, positions, span: int, rows: CacheRows, n: int, seq: int,
                        chunk: Optional[int] = None) -> torch.Tensor:
        """[count, 1, seq, span] additive bias: 0 where a block row's query sees a cached position (its
        own position and before; with `chunk`, only those of its own block of `chunk` positions), -inf
        elsewhere; made once per call, in the activation dtype, so that no layer converts a boolean mask
        again. Block rows no token row uses see position 0 only (a finite result that nothing reads)."""
        query_positions = positions.expand(n, seq)
        if rows.index is not None:
            query_positions = query_positions.new_zeros(rows.count, seq).index_copy_(0, rows.index, query_positions)
        keys, queries = self.cache_positions[:span], query_positions[:, None, :, None]
        hidden = keys > queries                                                        # [count, 1, seq, span]
        if chunk is not None:
            hidden |= keys < queries - queries % chunk
        return torch.zeros(hidden.shape, dtype=self.act_dtype, device=hidden.device).masked_fill_(hidden,
                                                                                                   float("-inf"))

    def prefill(self, tokens: torch.Tensor, start_pos: int, first_row: int = 0,
                all_positions: bool = False) -> torch.Tensor:
        """Prompts (tokens [batch, seq]) into cache rows first_row.. from `start_pos`, through `step`
        PREFILL_CHUNK positions at a time (which bounds a long prompt's activations, e.g. its FFN's
        [seq, hidden] products). Final normed hidden states [batch, seq, dim] with `all_positions`, else
        of the last position [batch, 1, dim]."""
        batch, seq = tokens.shape
        rows, out = CacheRows(first_row, batch), []
        for start in range(0, seq, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, seq)
            positions = torch.arange(start_pos + start, start_pos + end, device=tokens.device)[None]
            out.append(self.step(tokens[:, start:end], positions, start_pos + end, rows, all_positions, causal=True))
        return out[0] if len(out) == 1 else (torch.cat(out, dim=1) if all_positions else out[-1])

    def hidden_scored(self, tokens: torch.Tensor, slot: int, start: int = 0) -> torch.Tensor:
        """A scored prompt (tokens [1, n]) into cache row `slot` from `start`, a multiple of SCORED_CHUNK
        (what is before it is in the row): final normed hidden states [1, padded, dim] of its positions
        and of padding after them. It runs in calls of SCORED_CHUNK positions at multiples of it through
        `step` (PyTorch's operators, whatever the decoder), the last padded with token 0 up to the next
        multiple or max_seq_len: every call has the shapes its chunk index alone gives, so a position's
        hidden state has the same bits whatever the prompt's length or start (an attention kernel's
        blocking, a product's path depend on the shapes; the padding is masked for every real position).
        The padding's keys and values land past the prompt in the row, where nothing reads them before a
        later step writes there."""
        from .scoring import SCORED_CHUNK

        n = tokens.shape[1]
        end = min(-(-(start + n) // SCORED_CHUNK) * SCORED_CHUNK, self.max_seq_len)
        padded = torch.cat((tokens, tokens.new_zeros(1, end - start - n)), dim=1)
        rows, out = CacheRows(slot, 1), []
        for at in range(start, end, SCORED_CHUNK):
            stop = min(at + SCORED_CHUNK, end)
            positions = torch.arange(at, stop, device=tokens.device)[None]
            out.append(self.step(padded[:, at - start:stop - start], positions, stop, rows, causal=True))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def logits(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """Float32 logits over the whole vocabulary on rank 0; None on the other ranks."""
        full = self.comm.gather_last_dim_to_main(self._local_logits(h))
        return None if full is None else full.float()

    def greedy_next(self, h: torch.Tensor) -> torch.Tensor:
        """Greedy next token [batch] on every rank, from h of shape [batch, 1, dim]."""
        return self.comm.global_argmax(self._local_logits(h[:, -1]), self.vocab_offset)

    def forward(self, tokens: torch.Tensor, start_pos: int, all_positions: bool = False) -> Optional[torch.Tensor]:
        """Logits on rank 0 (None elsewhere): [batch, vocab] for the last position, or
        [batch, seq, vocab] with all_positions."""
        logits = self.logits(self.hidden(tokens, start_pos, all_positions))
        return logits if logits is None or all_positions else logits[:, -1]
