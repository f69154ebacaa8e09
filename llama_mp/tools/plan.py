"""`llama-mp plan`: will a model fit on N GPUs, and if not, what would?

Per-rank memory is estimated by `runtime/footprint.py` (see there for what it counts).

Memory sizes are in GiB (2**30 bytes), the unit nvidia-smi's MiB / 1024 gives: a "12 GB" card is 12.
The verdict is a planning aid with a margin of a few hundred MiB, not a guarantee.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Dict, List, Optional

from .. import families
from ..checkpoints import layout
from ..checkpoints import meta as checkpoint
from ..checkpoints.params import ModelArgs, load_params, load_preset, preset_names
from ..checks import is_number, require_int
from ..dtypes import parse_dtype
from ..errors import LlamaMPError
from ..quant.scheme import DEFAULT_INT4_GROUP_SIZE, Scheme, parse_scheme
from ..runtime.footprint import CUDA_CONTEXT_BYTES, DTYPE_BYTES, GIB, estimate, largest

__all__ = ["CUDA_CONTEXT_BYTES", "GIB", "estimate", "make_plan", "model_args", "plan_to_text"]


def alternatives(args: ModelArgs, ranks: int, dtype: str, batch: int, seq: int, budget: int,
                 packed: bool = False) -> List[Dict]:
    """What would fit in `budget` bytes per GPU: fewer/more ranks, a smaller batch or sequence, a dtype
    (`packed`: quantized products through the packed kernels, as `--decoder compiled` runs them)."""
    counted = functools.partial(estimate, packed=packed)

    def ok(**change) -> bool:
        setting = {"ranks": ranks, "dtype": dtype, "batch": batch, "seq": seq, **change}
        return counted(args, **setting).total <= budget

    options = []
    fewest = next((n for n in layout.valid_world_sizes(args) if ok(ranks=n)), None)
    if fewest is not None and fewest != ranks:
        options.append({"change": "ranks", "ranks": fewest,
                        "total_bytes": counted(args, fewest, dtype, batch, seq).total})
    if batch > 1:
        b = largest(lambda x: ok(batch=x), batch - 1)
        if b:
            options.append({"change": "batch", "max_batch_size": b,
                            "total_bytes": counted(args, ranks, dtype, b, seq).total})
    if seq > 2:
        s = largest(lambda x: ok(seq=x), seq - 1, lower=2)
        if s:
            s = s - s % 64 if s >= 64 else s  # a round number is easier to pass on
            options.append({"change": "seq", "max_seq_len": s,
                            "total_bytes": counted(args, ranks, dtype, batch, s).total})
    for other in DTYPE_BYTES:
        if DTYPE_BYTES[other] < DTYPE_BYTES[dtype] and ok(dtype=other):
            options.append({"change": "dtype", "dtype": other,
                            "total_bytes": counted(args, ranks, other, batch, seq).total})
    if args.scheme is None:  # a float model: the first scheme that fits (an already-quantized one stays as it is)
        for scheme in (Scheme("int8"), Scheme("int4", DEFAULT_INT4_GROUP_SIZE)):
            smaller = args.with_scheme(scheme)
            if layout.scheme_problem(args, scheme) is None and ranks in layout.valid_world_sizes(smaller):
                total = counted(smaller, ranks, dtype, batch, seq).total
                if total <= budget:
                    options.append({"change": "quantize", "quantization": scheme.to_json(), "total_bytes": total})
                    break
    return options


def model_args(ckpt_dir: Optional[str], model: Optional[str]) -> (str, ModelArgs):
    """(a name to show, params with a known vocab) from a checkpoint folder or a preset name."""
    if (ckpt_dir is None) == (model is None):
        raise LlamaMPError("Give exactly one of --ckpt_dir DIR (a Meta checkpoint) or --model NAME (one of "
                           f"{', '.join(preset_names())}).")
    if model is not None:
        return str(model), load_preset(str(model))[0]
    ckpt_dir = str(ckpt_dir)
    paths = checkpoint.shard_paths(ckpt_dir)
    return ckpt_dir, checkpoint.resolve_vocab(load_params(ckpt_dir), checkpoint.load_shard(paths[0]), paths[0],
                                              len(paths))


def quantized_args(args: ModelArgs, name: str, quantize: Optional[str], group_size: Optional[int]) -> ModelArgs:
    """`args` as `--quantize MODE [--group_size N]` would store them (unchanged without --quantize)."""
    from ..checkpoints.quantize import refuse_quantized, require_scheme_fits
    from ..runtime.llama import quantize_scheme

    scheme = quantize_scheme(quantize, group_size)
    if scheme is None:
        return args
    refuse_quantized(args, name)
    require_scheme_fits(args, scheme, name)
    return args.with_scheme(scheme)


def make_plan(args: ModelArgs, name: str, gpus: int, gpu_mem_gb: float, dtype: str = "bfloat16",
              max_seq_len: int = 512, max_batch_size: int = 4, quantize: Optional[str] = None,
              group_size: Optional[int] = None, decoder: str = "auto") -> Dict:
    """The whole answer as a dict (what --json prints): estimate, verdict, reason and options. `args` of a
    quantized checkpoint carry its scheme; `quantize` (and `group_size`) plan a float one quantized;
    `decoder` "compiled" plans its packed quantized products (the others dequantise)."""
    from ..runtime.decode import DECODERS

    parse_dtype(dtype)  # a known name, or a LlamaMPError listing them
    if decoder not in DECODERS:
        raise LlamaMPError(f"Unknown --decoder {decoder!r}; use one of {', '.join(DECODERS)}.")
    packed = decoder == "compiled"
    args = quantized_args(args, name, quantize, group_size)
    problem = families.family_of(args).compiled_quantized_problem
    if packed and args.scheme is not None and problem:
        raise LlamaMPError(problem)
    for flag, value, low in (("--gpus", gpus, 1), ("--max_seq_len", max_seq_len, 2), ("--max_batch_size", max_batch_size, 1)):
        require_int(flag, value, low)
    if not is_number(gpu_mem_gb) or gpu_mem_gb <= 0:
        raise LlamaMPError(f"--gpu_mem_gb must be a positive number of GiB (e.g. 24), got {gpu_mem_gb!r}.")
    layout.require_split(args, gpus, name, "GPU")
    valid = layout.valid_world_sizes(args)
    budget = int(gpu_mem_gb * GIB)
    est = estimate(args, gpus, dtype, max_batch_size, max_seq_len, packed=packed)
    fits = est.total <= budget
    if fits:
        reason = f"{est.total / GIB:.2f} GiB per rank of {gpu_mem_gb:g} GiB, {(budget - est.total) / GIB:.2f} GiB spare"
    elif est.weights + est.cuda_context > budget:
        reason = (f"the weights alone need {est.weights / GIB:.2f} GiB per rank (+ {est.cuda_context / GIB:.0f} GiB "
                  f"CUDA context), more than the {gpu_mem_gb:g} GiB of one GPU: split the model over more GPUs "
                  "or use a smaller dtype" + (" or --quantize int8|int4" if args.scheme is None else ""))
    else:
        reason = (f"weights {est.weights / GIB:.2f} GiB fit, but with the KV cache ({est.kv_cache / GIB:.2f} GiB) "
                  f"and working memory a rank needs {est.total / GIB:.2f} GiB, more than {gpu_mem_gb:g} GiB")
    return {
        "model": name, "params": args.to_json_dict(), "parameters": args.parameter_count(),
        "gpus": gpus, "gpu_mem_bytes": budget, "dtype": dtype, "max_batch_size": max_batch_size,
        "max_seq_len": max_seq_len, "quantization": None if args.scheme is None else args.scheme.to_json(),
        "per_rank": {**{k: v for k, v in dataclasses.asdict(est).items()
                                                    if k not in ("ranks", "dtype", "batch", "seq")},
                                                 "total": est.total},
        "fits": fits, "reason": reason, "valid_gpu_counts": valid, "local_kv_heads": layout.local_kv_heads(args, gpus),
        "options": [] if fits else alternatives(args, gpus, dtype, max_batch_size, max_seq_len, budget, packed),
        "gpus_the_weights_need": gpus_the_weights_need(args, dtype, budget),
    }


def gpus_the_weights_need(args: ModelArgs, dtype: str, budget: int) -> int:
    """How many GPUs of `budget` bytes the weights alone would fill (each also holding a CUDA context and
    the whole embedding table): a lower bound on the GPUs the model needs, valid split or not."""
    whole = estimate(args, 1, dtype, 1, 2).weights
    embedding = estimate(args, 2, dtype, 1, 2).weights * 2 - whole  # counted again on every extra rank
    room = budget - CUDA_CONTEXT_BYTES - embedding
    return -(-(whole - embedding) // room) if room > 0 else 0


def _gib(n: int) -> str:
    return f"{n / GIB:9.2f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):9.1f} MiB"


def format_plan(plan: Dict) -> str:
    """The human table for stdout."""
    r = plan["per_rank"]
    kv_heads = plan["params"].get("n_kv_heads", plan["params"]["n_heads"])
    local_kv = plan["local_kv_heads"]
    shared = f", each shared by {plan['gpus'] // kv_heads} ranks" if plan["gpus"] > kv_heads else ""
    q = plan["quantization"]
    weights = plan["dtype"] if q is None else (f"{parse_scheme(q['mode'], q.get('group_size')).describe()} layer "
                                               f"weights, output int8, embedding and norms {plan['dtype']}")
    lines = [
        f"{plan['model']}: {plan['parameters'] / 1e9:.2f} B parameters, {weights}, batch "
        f"{plan['max_batch_size']} x {plan['max_seq_len']} tokens, on {plan['gpus']} GPU(s) of "
        f"{plan['gpu_mem_bytes'] / GIB:g} GiB",
        "",
        "  per rank",
        f"  {'weights':<28}{_gib(r['weights'])}   1/{plan['gpus']} of the split tensors, norms, whole embedding",
        f"  {'KV cache':<28}{_gib(r['kv_cache'])}   {local_kv} of {kv_heads} kv heads per rank{shared}",
        f"  {'CUDA context (estimate)':<28}{_gib(r['cuda_context'])}",
        f"  {'logits':<28}{_gib(r['logits'])}",
        f"  {'activations (estimate)':<28}{_gib(r['activations'])}",
        f"  {'total':<28}{_gib(r['total'])}",
        f"  {'GPU memory':<28}{_gib(plan['gpu_mem_bytes'])}",
        "",
        f"Fits: {'YES' if plan['fits'] else 'NO'} - {plan['reason']}.",
    ]
    if not plan["fits"]:
        described = {
            "ranks": lambda o: f"run on {o['ranks']} GPUs (torchrun --nproc_per_node {o['ranks']})",
            "batch": lambda o: f"--max_batch_size {o['max_batch_size']}",
            "seq": lambda o: f"--max_seq_len {o['max_seq_len']}",
            "dtype": lambda o: f"--dtype {o['dtype']}",
            "quantize": lambda o: " ".join(f"--{'quantize' if k == 'mode' else k} {v}" for k, v in o["quantization"].items()),
        }
        if plan["options"]:
            lines.append("What would fit (one change at a time):")
            lines += [f"  - {described[o['change']](o)}: {o['total_bytes'] / GIB:.2f} GiB per rank"
                      for o in plan["options"]]
        else:
            need, valid = plan["gpus_the_weights_need"], plan["valid_gpu_counts"]
            lines.append(f"Nothing fits on GPUs of this size (valid GPU counts: {valid}); use larger GPUs.")
            if need > max(valid):
                lines.append(f"The weights alone fill at least {need} GPUs of this size, but the model splits "
                             f"over at most {max(valid)} ranks.")
    return "\n".join(lines)


def plan_to_text(plan: Dict, as_json: bool) -> str:
    return json.dumps(plan, indent=2) if as_json else format_plan(plan)
