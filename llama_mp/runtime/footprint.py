"""How much memory one rank needs, estimated before anything is allocated (and by `llama-mp plan`).

Per-rank memory is estimated as the sum of

* weights: this rank's slice of every tensor (`layout.shard_shapes(args, N)`: split tensors / N,
  norms whole), times the dtype's size, plus the rest of the token embedding table, which the model
  assembles whole on every rank at load time (a lookup then needs no communication). A quantized
  model (`args.scheme`) stores its layer linears as the scheme says (int8: 1 byte a weight plus a
  float32 scale per row; int4: half a byte plus a bfloat16 scale per group) and the output layer in
  int8; embedding and norms stay in the dtype (layout.py's shapes and dtypes, `layout.element_size`);
* KV cache: keys and values for this rank's own kv heads only, preallocated for the whole
  batch x max_seq_len: 2 * n_layers * batch * seq * local kv heads * head_dim * dtype size, where a
  rank holds kv_heads / N heads, or one when N exceeds kv_heads (`layout.local_kv_heads`);
* working memory, an estimate (not a measurement) kept deliberately simple:
  - 1 GiB for the CUDA context, cuBLAS/NCCL workspaces and allocator slack (typically 0.5-1 GiB);
  - logits: every rank gathers the full vocabulary in float32, plus one float32 copy for sampling:
    2 * batch * vocab * 4 bytes;
  - a quantized model's products: the portable path makes the dequantised matrix of one (fused)
    projection at a time in the dtype (or, if larger, what a family's own layers dequantise at once, their
    `dequantized_bytes`: Llama 4's block of routed experts); the packed one (`--decoder compiled`) makes none, but keeps each
    matrix's scales again in the dtype (int4: the kernel's table of scales and zeros, twice their
    count) and repacks each int4 matrix once at load (6 bytes a weight for the largest, transiently);
  - activations of the largest step (the prompt, up to max_seq_len tokens): per token, about four
    hidden-size buffers (residual, norm output, attention output, layer output), this rank's q/k/v
    in float32 (rotary works in float32) and three FFN-width buffers (w1, w3, their product) for this
    rank's share of the FFN. Attention scores are not counted: SDPA's fused kernels do not store the
    seq x seq matrix.

Memory sizes are in GiB (2**30 bytes). Loading refuses a model or a `max_seq_len` x `max_batch_size`
that cannot fit in the memory the device has free, with the numbers, instead of being killed by the
kernel's out-of-memory killer half way.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional

import torch

from .. import families
from ..checkpoints import layout
from ..checkpoints.params import ModelArgs
from ..dtypes import DTYPES
from ..errors import LlamaMPError

GIB = 1 << 30
CUDA_CONTEXT_BYTES = 1 * GIB
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


@dataclasses.dataclass
class Estimate:
    """Per-rank memory in bytes for one configuration."""

    ranks: int
    dtype: str
    batch: int
    seq: int
    weights: int
    kv_cache: int
    cuda_context: int
    logits: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.cuda_context + self.logits + self.activations


def estimate(args: ModelArgs, ranks: int, dtype: str, batch: int, seq: int, cache_dtype: Optional[str] = None,
             cuda_context: int = CUDA_CONTEXT_BYTES, packed: bool = False) -> Estimate:
    """Memory one rank needs to run `args` split `ranks` ways with weights in `dtype` (the KV cache in
    `cache_dtype`, by default the same), see the module docstring for what is counted. `packed`: the
    quantized matrices multiply through torch's packed kernels (`--decoder compiled`), not dequantised."""
    size = DTYPE_BYTES[dtype]
    # Layers are alike: count one, then multiply (Llama 4's MoE and dense layers differ: count them all).
    alike = families.family_of(args).layers_alike
    one_layer = dataclasses.replace(args, n_layers=1) if alike else args
    full, shard = layout.full_shapes(one_layer), layout.shard_shapes(one_layer, ranks)
    embedding_rest = math.prod(full["tok_embeddings.weight"]) - math.prod(shard["tok_embeddings.weight"])
    stored = {key: math.prod(shape) * layout.element_size(key, args, size) for key, shape in shard.items()}
    per_layer = sum(b for key, b in stored.items() if key.startswith("layers."))
    rest = sum(b for key, b in stored.items() if not key.startswith("layers."))
    weights = (args.n_layers if alike else 1) * per_layer + rest + embedding_rest * size
    local_kv = layout.local_kv_heads(args, ranks)
    kv_cache = 2 * args.n_layers * batch * seq * local_kv * args.head_dim * DTYPE_BYTES[cache_dtype or dtype]
    logits = 2 * batch * args.vocab_size * 4
    qkv = (args.n_heads // ranks + 2 * local_kv) * args.head_dim * 4
    per_token = 4 * args.dim * size + qkv + 3 * (args.ffn_hidden_dim // ranks) * size
    activations = batch * seq * per_token
    if args.scheme is not None and not packed:  # the portable path dequantises one (fused) matrix at a time
        rows = max(shard["output.weight"][0], 2 * args.ffn_hidden_dim // ranks)  # the output layer, or w1|w3
        dequantized = rows * args.dim * size
        own_layers = families.family_of(args).layers_module
        if own_layers is not None:  # or what a family's own layers dequantise at once (Llama 4's experts)
            dequantized = max(dequantized, own_layers.dequantized_bytes(args, ranks, size))
        activations += dequantized
    elif args.scheme is not None:
        shard = layout.shard_shapes(one_layer.with_scheme(None), ranks)  # the float shapes [out, in]
        weights += args.n_layers * _packed_extra(args, shard, dtype) + shard["output.weight"][0] * size
        if args.scheme.mode == "int4":  # repacking one (fused) matrix at load: its values as int8 and int32
            qkv = sum(shard[f"layers.0.attention.{k}.weight"][0] for k in ("wq", "wk", "wv")) * args.dim
            gate_up = 2 * math.prod(shard["layers.0.feed_forward.w1.weight"])
            down, out = (math.prod(shard[f"layers.0.{k}.weight"]) for k in ("feed_forward.w2", "attention.wo"))
            activations = max(activations, max(qkv, gate_up, down, out) * (1 + 4 + 1))
    return Estimate(ranks, dtype, batch, seq, weights, kv_cache, cuda_context, logits, activations)


def _packed_extra(args: ModelArgs, shard, dtype: str) -> int:
    """Bytes one layer's packed products add to its stored weights: the scales again in the activation
    dtype (int8: [out]; int4: the kernel's [in / group, out, 2] table of scales and zeros, whose scales
    replace the loaded ones when the activations are bfloat16 like them)."""
    extra, size = 0, DTYPE_BYTES[dtype]
    # int4 with bfloat16 activations keeps only the table (its scales replace the loaded ones): one more per group
    per_group = 1 if dtype == "bfloat16" else 2
    for key in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        rows, inputs = shard[f"layers.0.{key}.weight"]
        extra += rows * size * (1 if args.scheme.mode == "int8" else per_group * inputs // args.scheme.group_size)
    return extra


def largest(fits: Callable[[int], bool], upper: int, lower: int = 1) -> Optional[int]:
    """Largest value in [lower, upper] for which `fits` holds (it is monotone), else None."""
    if not fits(lower):
        return None
    lo, hi = lower, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory this rank may still take on `device`: the GPU's free memory, or on a CPU the host's
    available memory shared by the ranks torchrun started on it. None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib * 1024 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def require_fit(args: ModelArgs, ranks: int, dtype: torch.dtype, cache_dtype: torch.dtype, batch: int, seq: int,
                device: torch.device, packed: bool = False) -> None:
    """Refuse, with the numbers and what would fit, a model that this rank's device cannot hold (`packed`:
    as `estimate`'s)."""
    free = available_bytes(device)
    if free is None:
        return
    name, cache = (str(t).replace("torch.", "") for t in (dtype, cache_dtype))
    context = CUDA_CONTEXT_BYTES if device.type == "cuda" else 0

    def need(b: int, s: int) -> Estimate:
        return estimate(args, ranks, name, b, s, cache, cuda_context=context, packed=packed)

    est = need(batch, seq)
    if est.total <= free:
        return
    where = f"on {device}" + (" (this host's available memory, shared by its ranks)" if device.type == "cpu" else "")
    numbers = (f"about {est.total / GIB:.1f} GiB {where}: weights {est.weights / GIB:.1f} GiB, KV cache "
               f"{est.kv_cache / GIB:.1f} GiB for max_batch_size {batch} x max_seq_len {seq}, working memory "
               f"{(est.total - est.weights - est.kv_cache) / GIB:.1f} GiB; {free / GIB:.1f} GiB is free")
    if need(1, 2).total > free:
        advice = (f"The weights alone do not fit: use more ranks (valid counts: {layout.valid_world_sizes(args)}), a "
                  "smaller --dtype, " + ("--quantize int8 or int4, " if args.scheme is None else "")
                  + "or a machine with more memory")
    else:
        fits_seq = largest(lambda s: need(batch, s).total <= free, seq, lower=2)
        fits_batch = largest(lambda b: need(b, seq).total <= free, batch)
        options = ([f"--max_seq_len {fits_seq}"] if fits_seq else []) + ([f"--max_batch_size {fits_batch}"] if fits_batch else [])
        advice = f"Lower {' or '.join(options) or '--max_seq_len and --max_batch_size'}, or use more ranks"
    raise LlamaMPError(f"This rank would need {numbers}. {advice}; `llama-mp plan` shows what fits where.")
