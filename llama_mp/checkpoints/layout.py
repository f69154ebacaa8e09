"""How Meta splits each tensor across `consolidated.NN.pth` shards, per model family.

This is the single source of truth for shard layout: the model (each rank's slice of every weight),
the embedding assembly, loading, resharding, verification, conversion and plan all ask here. Meta's
model-parallel code (fairscale) splits

* column-parallel weights (wq, wk, wv, w1, w3, output) along dim 0, their output features;
* row-parallel weights (wo, w2) along dim 1, their input features;
* the token embedding along dim 1, the embedding dimension, in LLaMA 1 / Llama 2 / Code Llama
  (fairscale `ParallelEmbedding`), and along dim 0, the vocabulary, in Llama 3.x
  (`VocabParallelEmbedding`);
* norms are replicated in every shard. LLaMA 1 shards also carry `rope.freqs`, which we ignore.

The one rule for process and shard counts lives here too: N must split every head, the FFN, the
embedding and the vocabulary evenly (`require_split`).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch

from ..checks import is_int
from ..errors import LlamaMPError
from .params import ModelArgs

IGNORED_KEYS = frozenset({"rope.freqs"})

# Per model family: the dimension each tensor is split along (None: replicated). Keys inside a layer
# are given without their "layers.N." prefix.
_LLAMA = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
SPLIT_DIMS = {
    "llama": _LLAMA,
    # Llama 3.x: fairscale's VocabParallelEmbedding splits the embedding by vocabulary rows.
    "llama3": {**_LLAMA, "tok_embeddings.weight": 0},
}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def family(args: Optional[ModelArgs]) -> str:
    """The model family whose layout `args` describes: "llama" (LLaMA 1, Llama 2, Code Llama) or
    "llama3". None (params unknown, as for a damaged folder) gives the LLaMA family's table."""
    return "llama" if args is None else args.family


def split_dim(key: str, args: Optional[ModelArgs]) -> Optional[int]:
    """The dimension along which `key` is split across shards, or None if it is replicated."""
    m = _LAYER_KEY.match(key)
    return SPLIT_DIMS[family(args)][m.group(2) if m else key]


def full_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor of the whole (unsplit) model, in Meta's key order."""
    assert args.vocab_size > 0, "full_shapes needs a known vocab_size"
    d, hidden, kv = args.dim, args.ffn_hidden_dim, args.kv_heads * args.head_dim
    shapes: Dict[str, Tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (d, d),
            p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d),
            p + "attention.wo.weight": (d, d),
            p + "feed_forward.w1.weight": (hidden, d),
            p + "feed_forward.w2.weight": (d, hidden),
            p + "feed_forward.w3.weight": (hidden, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (args.vocab_size, d)
    return shapes


def shard_shape(full_shape: Tuple[int, ...], dim: Optional[int], num_shards: int) -> Tuple[int, ...]:
    if dim is None:
        return tuple(full_shape)
    shape = list(full_shape)
    shape[dim] //= num_shards
    return tuple(shape)


def shard_shapes(args: ModelArgs, num_shards: int) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor in one of `num_shards` shards (all shards have the same shapes)."""
    return {k: shard_shape(s, split_dim(k, args), num_shards) for k, s in full_shapes(args).items()}


def valid_world_sizes(args: ModelArgs, limit: int = 64) -> List[int]:
    """Every process count (up to `limit`) that splits all heads, FFN, embedding and vocab evenly."""
    must_divide = [args.n_heads, args.kv_heads, args.ffn_hidden_dim, args.dim]
    if args.vocab_size > 0:
        must_divide.append(args.vocab_size)
    return [n for n in range(1, limit + 1) if all(x % n == 0 for x in must_divide)]


def require_split(args: ModelArgs, count, subject: str, unit: str, advice: str = "") -> None:
    """Raise unless `count` ranks or shards (`unit`: "process", "shard", "GPU") split the model evenly,
    naming the counts that would. `subject` says what is being split, e.g. "This checkpoint (DIR)"."""
    valid = valid_world_sizes(args, limit=max(64, count if is_int(count) else 0))
    if is_int(count) and count in valid:
        return
    raise LlamaMPError(
        f"{subject} (n_heads {args.n_heads}, n_kv_heads {args.kv_heads}, FFN {args.ffn_hidden_dim}, dim "
        f"{args.dim}, vocab {args.vocab_size}) cannot be split over {count!r} {unit}{'es' if unit == 'process' else 's'}: "
        f"every head, the FFN, the embedding and the vocabulary must divide evenly. Valid {unit} counts: "
        f"{valid_world_sizes(args)}.{advice}")


def split(tensor: torch.Tensor, dim: Optional[int], num_shards: int, index: int) -> torch.Tensor:
    """Shard `index` of `num_shards` of a whole tensor (a view; replicated tensors come back whole)."""
    if dim is None:
        return tensor
    return tensor.chunk(num_shards, dim=dim)[index]


def merge(pieces: List[torch.Tensor], dim: Optional[int]) -> torch.Tensor:
    """Inverse of `split`: the whole tensor from all of its shards, in shard order."""
    return pieces[0] if dim is None else torch.cat(pieces, dim=dim)
