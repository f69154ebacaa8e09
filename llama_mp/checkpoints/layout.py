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

Above `n_kv_heads` ranks (Llama 3.1 405B, 8 kv heads, on 16 GPUs) the kv projections wk and wv cannot
be cut further: each rank then holds one whole kv head, the one its query heads use, and N / n_kv_heads
neighbouring ranks (and shards) hold the same head, as in Meta's reference code (`pieces`).

The one rule for process and shard counts lives here too: N must split every query head, the FFN, the
embedding and the vocabulary evenly, and either divide n_kv_heads or be a multiple of it (`require_split`).

Quantized checkpoints (`args.scheme`, quant/scheme.py) store every linear layer of every transformer
layer (wq wk wv wo w1 w2 w3) as integers `<name>.weight` (int8 [out, in], or int4 packed two per byte,
uint8 [out, in / 2]) plus `<name>.scales`, and the output layer as int8 per row in both modes (it is read
every token and is the most sensitive); the embedding and the norms stay float. Scales split like their
weights along the output rows (column-parallel: dim 0; wk and wv by the kv `pieces` rule). A row-parallel
matrix (wo, w2) is split along its inputs: its int8 scales cover whole rows and are replicated in every
shard, its int4 scales are per group of inputs and split along dim 1, so with int4 every rank's slice of
those inputs must be whole groups (`valid_world_sizes`). `quantized_dtype` says which dtype each
quantized tensor must have. A family with a layout of its own names its quantized matrices and their
scales (Llama 4: llama4.QUANTIZED_LINEARS, SCALES_NAMES); its routed experts are stacks of [in, out]
matrices (`stacked_experts`), stored as quant/experts.py says, whose inputs run along dim 0
(`input_dim`): their scales follow the same rule with the roles of the dims swapped.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch

from .. import families
from ..checks import is_int
from ..errors import LlamaMPError
from ..quant import experts as quantized_experts
from ..quant.scheme import INT4_GROUP_SIZES, Scheme
from .params import ModelArgs


class _IgnoredKeys:
    """Keys of a shard that no model reads: LLaMA 1's `rope.freqs`, Llama 4's vision weights (text only) and
    its router statistics of training in every layer (llama4.IGNORED_LAYER_NAMES)."""

    def __contains__(self, key) -> bool:
        if key == "rope.freqs" or is_vision_key(key):
            return True
        m = _LAYER_KEY.match(key) if isinstance(key, str) else None
        return m is not None and any(m.group(2) in f.layout_module.IGNORED_LAYER_NAMES
                                     for f in families.FAMILIES if f.layout is not None)


IGNORED_KEYS = _IgnoredKeys()


def is_vision_key(key) -> bool:
    """Whether `key` is a weight of Llama 4's vision encoder or projection (llama_mp runs the text model)."""
    return isinstance(key, str) and key.startswith(("vision_embeddings.", "vision_projection."))

# Per model family (families/): the dimension each tensor is split along (None: replicated), keys inside
# a layer without their "layers.N." prefix, in Family.split_dims. A family whose layout is a module of its
# own (Family.layout: Llama 4's checkpoints/llama4.py) gives SPLIT_DIMS, IGNORED_LAYER_NAMES, MODEL_NAMES,
# full_shapes, splits, split_message, segments, split_tensor, merge_tensors, and for quantizing QUANTIZED_LINEARS,
# SCALES_NAMES, stacked_experts and quantized_inputs.
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
# Cut by kv head, and replicated once there are more ranks than kv heads.
_KV_KEYS = frozenset({"attention.wk.weight", "attention.wv.weight", "attention.wk.scales", "attention.wv.scales"})
# The matrices a quantized checkpoint stores as integers (in a layer; and the output layer, always int8).
QUANTIZED_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                     "feed_forward.w2", "feed_forward.w3")
_QUANTIZED_WEIGHTS = frozenset(name + ".weight" for name in QUANTIZED_LINEARS)
OUTPUT_SCHEME = Scheme("int8")


def own_layout(args: Optional[ModelArgs]):
    """The module of `args`'s family if its layout is one of its own (Family.layout), else None. None
    (params unknown, as for a damaged folder) is the LLaMA family's (families.family_of)."""
    return families.family_of(args).layout_module


def split_dims(args: Optional[ModelArgs]):
    """The split dimension of each tensor name (inside a layer: without "layers.N.") of `args`'s family."""
    own = own_layout(args)
    return own.SPLIT_DIMS if own is not None else families.family_of(args).split_dims


def split_dim(key: str, args: Optional[ModelArgs]) -> Optional[int]:
    """The dimension along which `key` is split across shards, or None if it is replicated."""
    if key.endswith(".scales"):
        scheme = scheme_of(key, args)
        if scheme is None:
            raise KeyError(key)  # a float model has no scales, like any other unknown key
        weight = weight_key(key, args)
        dim = split_dim(weight, args)
        if dim != input_dim(weight, args):
            return dim  # split by outputs: the scales with them
        return None if scheme.mode == "int8" else dim  # int8: whole-row scales, replicated
    m = _LAYER_KEY.match(key)
    return split_dims(args)[m.group(2) if m else key]


def scales_key(key: str, args: Optional[ModelArgs]) -> str:
    """The key of the scales of quantized weight `key`: `<name>.scales` for `<name>.weight`, and for a
    family's tensors named otherwise their model's name so (Llama 4: llama4.SCALES_NAMES)."""
    own, m = own_layout(args), _LAYER_KEY.match(key)
    if own is not None and m and m.group(2) in own.SCALES_NAMES:
        return f"layers.{m.group(1)}.{own.SCALES_NAMES[m.group(2)]}"
    return key[:-len(".weight")] + ".scales"


def weight_key(key: str, args: Optional[ModelArgs]) -> str:
    """Inverse of `scales_key`: the weight scaled by `.scales` key `key`."""
    own, m = own_layout(args), _LAYER_KEY.match(key)
    if own is not None and m:
        for weight, scales in own.SCALES_NAMES.items():
            if scales == m.group(2):
                return f"layers.{m.group(1)}.{weight}"
    return key[:-len(".scales")] + ".weight"


def stacked_experts(key: str, args: Optional[ModelArgs]) -> Optional[int]:
    """The number of experts E when weight `key` is a stack of E expert matrices [E * in, out] stored as
    quant/experts.py says (Llama 4's routed experts), else None (a matrix [out, in])."""
    own, m = own_layout(args), _LAYER_KEY.match(key)
    return own.stacked_experts(m.group(2), args) if own is not None and m else None


def input_dim(key: str, args: Optional[ModelArgs]) -> int:
    """The dimension of weight `key` along which its inputs run: 1 for [out, in], 0 for stacked experts."""
    return 0 if stacked_experts(key, args) else 1


def scheme_of(key: str, args: Optional[ModelArgs]) -> Optional[Scheme]:
    """The scheme tensor `key` (a weight or its `.scales`) is stored in, or None for a float tensor."""
    if args is None or args.scheme is None:
        return None
    weight = weight_key(key, args) if key.endswith(".scales") else key
    if weight == "output.weight":
        return OUTPUT_SCHEME
    m, own = _LAYER_KEY.match(weight), own_layout(args)
    return args.scheme if m and m.group(2) in (_QUANTIZED_WEIGHTS if own is None else own.QUANTIZED_LINEARS) else None


def quantized_dtype(key: str, args: Optional[ModelArgs]) -> Optional[torch.dtype]:
    """The dtype quantized tensor `key` must have (int8 or uint8 integers, float32 or bfloat16 scales),
    or None for a float weight (any of the weight dtypes)."""
    scheme = scheme_of(key, args)
    if scheme is None:
        return None
    return scheme.scale_dtype if key.endswith(".scales") else scheme.weight_dtype


def element_size(key: str, args: Optional[ModelArgs], float_size: int) -> int:
    """Bytes per stored element of `key`: its quantized dtype's, or `float_size` for a float tensor."""
    dtype = quantized_dtype(key, args)
    return float_size if dtype is None else dtype.itemsize


def scheme_problem(args: ModelArgs, scheme: Scheme) -> Optional[str]:
    """Why `scheme` cannot quantize this model's layers (int4 groups that do not divide the inputs of a
    linear layer: dim for wq wk wv wo w1 w3, the FFN width for w2; a family's own: `quantized_inputs`), or None."""
    own = own_layout(args)
    rows = (("dim", args.dim), ("FFN width", args.ffn_hidden_dim)) if own is None else own.quantized_inputs(args)
    for what, inputs in rows:
        if not scheme.divides(inputs):
            fitting = [str(g) for g in INT4_GROUP_SIZES if inputs % g == 0]
            return (f"int4 groups of {scheme.group_size} do not divide the model's {what} {inputs}, the length of "
                    "the rows they cut; use " + (f"--group_size {' or '.join(fitting)}, or " if fitting else "")
                    + "--quantize int8")
    return None


def kv_replicas(args: ModelArgs, count: int) -> int:
    """How many of `count` ranks or shards hold each kv head: 1 up to n_kv_heads, else count / n_kv_heads."""
    return max(count // args.kv_heads, 1)


def pieces(key: str, args: Optional[ModelArgs], count: int, index: int = 0) -> Tuple[int, int]:
    """(parts, part): split `count` ways, the whole `key` is cut into `parts` equal pieces along its split
    dim and rank or shard `index` holds piece `part`. That is (count, index) for every tensor except wk and
    wv beyond n_kv_heads ranks, which are cut into n_kv_heads pieces, `kv_replicas` ranks holding each."""
    m = _LAYER_KEY.match(key)
    if args is None or (m.group(2) if m else key) not in _KV_KEYS or count <= args.kv_heads:
        return count, index
    replicas = kv_replicas(args, count)
    return count // replicas, index // replicas


def full_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor of the whole (unsplit) model, in Meta's key order."""
    assert args.vocab_size > 0, "full_shapes needs a known vocab_size"
    if own_layout(args) is not None:
        shapes = own_layout(args).full_shapes(args)
        return shapes if args.scheme is None else _quantized_shapes(shapes, args)
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
    return shapes if args.scheme is None else _quantized_shapes(shapes, args)


def _quantized_shapes(shapes: Dict[str, Tuple[int, ...]], args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """`shapes` of a float model as a quantized checkpoint stores them: integer weights, each followed
    by its `.scales` (stacked experts as quant/experts.py stores them)."""
    out: Dict[str, Tuple[int, ...]] = {}
    for key, shape in shapes.items():
        scheme = scheme_of(key, args)
        experts = stacked_experts(key, args)
        if scheme is None:
            out[key] = shape
        elif experts:
            out[key] = quantized_experts.weight_shape(scheme, *shape)
            out[scales_key(key, args)] = quantized_experts.scale_shape(scheme, experts, *shape)
        else:
            out[key] = scheme.weight_shape(*shape)
            out[scales_key(key, args)] = scheme.scale_shape(*shape)
    return out


def shard_shape(key: str, full_shape: Tuple[int, ...], args: ModelArgs, num_shards: int) -> Tuple[int, ...]:
    """Shape of `key`'s piece in each of `num_shards` shards (or ranks)."""
    dim = split_dim(key, args)
    if dim is None:
        return tuple(full_shape)
    shape = list(full_shape)
    shape[dim] //= pieces(key, args, num_shards)[0]
    return tuple(shape)


def shard_shapes(args: ModelArgs, num_shards: int) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor in one of `num_shards` shards (all shards have the same shapes)."""
    return {k: shard_shape(k, s, args, num_shards) for k, s in full_shapes(args).items()}


def local_kv_heads(args: ModelArgs, count: int) -> int:
    """kv heads each of `count` ranks holds (and caches)."""
    return args.kv_heads // pieces("attention.wk.weight", args, count)[0]


def valid_world_sizes(args: ModelArgs, limit: int = 64) -> List[int]:
    """Every process count (up to `limit`) that splits query heads, FFN, embedding and vocab evenly and
    divides n_kv_heads or is a multiple of it (each rank's query heads then share one kv head); with int4
    weights, each rank's slice of the inputs of wo (dim) and w2 (FFN width) must also be whole groups."""
    return [n for n in range(1, min(limit, args.n_heads) + 1) if splits(args, n)]


def splits(args: ModelArgs, n: int) -> bool:
    """Whether `n` processes or shards split the model as `valid_world_sizes` says. A count above n_heads
    never does, so asking costs nothing whatever `n` is."""
    if own_layout(args) is not None:
        return own_layout(args).splits(args, n)
    must_divide = [args.n_heads, args.ffn_hidden_dim, args.dim]
    if args.vocab_size > 0:
        must_divide.append(args.vocab_size)
    group = args.scheme.group_size if args.scheme is not None and args.scheme.mode == "int4" else 1
    return (1 <= n <= args.n_heads and all(x % n == 0 for x in must_divide)
            and (args.kv_heads % n == 0 or n % args.kv_heads == 0)
            and (args.dim // n) % group == 0 and (args.ffn_hidden_dim // n) % group == 0)


def require_split(args: ModelArgs, count, subject: str, unit: str, advice: str = "") -> None:
    """Raise unless `count` ranks or shards (`unit`: "process", "shard", "GPU") split the model evenly,
    naming the counts that would. `subject` says what is being split, e.g. "This checkpoint (DIR)"."""
    if is_int(count) and splits(args, count):
        return
    if own_layout(args) is not None:
        raise LlamaMPError(own_layout(args).split_message(args, count, subject, unit, valid_world_sizes(args), advice))
    raise LlamaMPError(
        f"{subject} (n_heads {args.n_heads}, n_kv_heads {args.kv_heads}, FFN {args.ffn_hidden_dim}, dim "
        f"{args.dim}, vocab {args.vocab_size}) cannot be split over {count!r} {unit}{'es' if unit == 'process' else 's'}: "
        f"every query head, the FFN, the embedding and the vocabulary must divide evenly, and the count must divide n_kv_heads or be a multiple of it"
        f"{_group_rule(args)}. Valid {unit} counts: {valid_world_sizes(args)}.{advice}")


def _group_rule(args: ModelArgs) -> str:
    """The extra splitting rule of int4 weights, as a clause of `require_split`'s message."""
    if args.scheme is None or args.scheme.mode != "int4":
        return ""
    g = args.scheme.group_size
    return (f"; with int4 weights in groups of {g}, each slice of the inputs of wo (dim {args.dim}) and w2 (FFN "
            f"{args.ffn_hidden_dim}) must also be whole groups of {g}")


def split(key: str, tensor: torch.Tensor, args: ModelArgs, num_shards: int, index: int) -> torch.Tensor:
    """Shard `index` of `num_shards` of the whole tensor `key` (a view; replicated tensors come back whole)."""
    dim = split_dim(key, args)
    if dim is None:
        return tensor
    parts, part = pieces(key, args, num_shards, index)
    segs = segments(key, args)
    if segs is not None:
        return own_layout(args).split_tensor(tensor, dim, segs, parts, part)
    return tensor.chunk(parts, dim=dim)[part]


def merge(key: str, shards: List[torch.Tensor], args: ModelArgs) -> torch.Tensor:
    """Inverse of `split`: the whole tensor `key` from all of its shards, in shard order (one of each
    set of replicas)."""
    dim = split_dim(key, args)
    if dim is None:
        return shards[0]
    parts, _ = pieces(key, args, len(shards))
    segs = segments(key, args)
    if segs is not None:
        return own_layout(args).merge_tensors(shards[::len(shards) // parts], dim, segs)
    return torch.cat(shards[::len(shards) // parts], dim=dim)


def segments(key: str, args: Optional[ModelArgs]) -> Optional[List[int]]:
    """For a tensor whose parts are each split on their own (Llama 4's fused wqkv, [w1; w3] and the
    experts' output matrices: llama4.segments), the parts' sizes along its split dim; else None."""
    own = own_layout(args)
    if own is None:
        return None
    m = _LAYER_KEY.match(key)
    return own.segments(m.group(2) if m else key, args)


def model_key(key: str, args: Optional[ModelArgs]) -> str:
    """The name the runtime model gives tensor `key` of a checkpoint (the same, except for Llama 4's
    tensors whose names are not `<module>.weight`: llama4.MODEL_NAMES)."""
    own = own_layout(args)
    m = _LAYER_KEY.match(key) if own is not None else None
    if not m:
        return key
    return f"layers.{m.group(1)}.{own.MODEL_NAMES.get(m.group(2), m.group(2))}"


def first_replica(key: str, args: ModelArgs, num_shards: int, index: int) -> int:
    """The first shard holding the same piece of split tensor `key` as shard `index`: `index` itself,
    except for kv heads held by several shards (their copies must be equal)."""
    parts, part = pieces(key, args, num_shards, index)
    return part * (num_shards // parts)
