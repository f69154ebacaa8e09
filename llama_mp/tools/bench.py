"""`llama-mp bench`: load time, prefill and decode speed, memory and bandwidth of the real decode path.

Runs on every rank of a torchrun job (or one plain process). The model is a checkpoint, a preset shape
or an explicit shape; shapes get random weights made on the fly on each rank (its own slice only), so
a 70B shape needs no 70B download. Timings are medians over several runs after a warm-up, taken
around `Llama.generate` itself (sampling, collectives and the per-step host sync included).
Decode speed is the marginal cost of one more token: (time for 1 + N tokens - time for 1) / N.
"""

from __future__ import annotations

import json as jsonlib
import os
import resource
import statistics
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .. import distributed
from ..checkpoints.params import ModelArgs, load_params, load_preset, parse_params
from ..checks import require_int, require_seed
from ..dtypes import choose_dtype
from ..errors import LlamaMPError
from ..runtime.decode import choose_decoder
from ..runtime.llama import Llama, quantize_scheme
from ..runtime.loading import load_checkpoint, random_model, ready_on_every_rank
from ..runtime.memory import empty_for_streaming
from ..runtime.model import Transformer
from ..runtime.sampling import check_sampling


class _NoStop:
    """Stands in for the tokenizer: an eos that never occurs, so every run makes all its tokens."""
    eos_id = -1
    stop_ids: list = []


# Random weights seed each rank's generator with seed * 1000 + rank, which must stay within 64 bits.
BENCH_SEED_LIMIT = 2 ** 32


def shape_args(ckpt_dir: Optional[str], model: Optional[str], shape: Dict) -> ModelArgs:
    if sum(x is not None for x in (ckpt_dir, model, shape.get("dim"))) != 1:
        raise LlamaMPError("Say what to benchmark with exactly one of --ckpt_dir DIR, --model PRESET "
                           "(e.g. llama-2-7b) or an explicit shape (--dim, --n_layers, --n_heads, ...).")
    if ckpt_dir:
        return load_params(ckpt_dir)
    if model:
        return load_preset(model)[0]
    raw = {k: v for k, v in shape.items() if v is not None}
    raw.setdefault("vocab_size", 32000)
    return parse_params(raw, where="bench shape options")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s of reading a large tensor once (a sum over 1 GiB on a GPU, 256 MiB on the CPU, far beyond
    the caches, in memory placed as the weights are): what a decode step, which only reads weights,
    can hope for."""
    n = (1 << 30 if device.type == "cuda" else 1 << 28) // 4
    src = empty_for_streaming((n,), torch.float32, device).fill_(1.0)
    src.sum()
    best = min(_timed(device, lambda: src.sum()) for _ in range(5))
    return src.numel() * 4 / best


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak anew (after loading, whose transient buffers are not the model's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the resident-set high-water mark (VmHWM)
    except OSError:
        pass  # elsewhere the peak includes loading


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bytes_read_per_token(model: Transformer, batch: int = 1) -> int:
    """Weights one decode step of `batch` rows streams from memory on this rank: all but the embedding
    table, of which only one row is read, and (Llama 4) the routed experts the step's path leaves unread
    (`MoE.unread_bytes`: grouped, at most min(E, batch * top_k) experts are read, so this is an upper
    bound; fewer when rows choose the same experts)."""
    emb = model.tok_embeddings.weight
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    unread = sum(layer.feed_forward.unread_bytes(batch) for layer in model.layers
                 if hasattr(layer.feed_forward, "unread_bytes"))
    return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size() - unread


def run_bench(llama: Llama, batch: int, prompt_len: int, new_tokens: int, runs: int, warmup: int,
              seed: int, temperature: float = 0.0, top_p: float = 0.9) -> Dict[str, float]:
    device = llama.group.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    vocab = llama.model.args.vocab_size
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g, device="cpu").tolist()
    for _ in range(warmup):
        llama.generate(prompts, min(new_tokens, 16), temperature=temperature, top_p=top_p)
    first, total = [], []

    def uncached(n: int) -> None:  # the whole prompt prefilled each time, not continued from the last run's
        llama.engine.forget_rows()
        llama.generate(prompts, n, temperature=temperature, top_p=top_p)

    for _ in range(runs):
        first.append(_timed(device, lambda: uncached(1)))
        total.append(_timed(device, lambda: uncached(1 + new_tokens)))
    prefill_s = statistics.median(first)
    decode_s = max(statistics.median(total) - prefill_s, 1e-9) / new_tokens
    return {"prefill_tok_s": batch * prompt_len / prefill_s, "decode_tok_s": batch / decode_s,
            "ms_per_token": decode_s * 1e3}


def _ops_of(fn) -> int:
    """PyTorch operators `fn` dispatches: top-level aten calls as torch.profiler records them (the ones
    an eager GPU step launches one or more kernels for), not the calls they make inside."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def ops_per_decode_step(model: Transformer, batch: int, prompt_len: int, seed: int) -> Dict[str, float]:
    """Operators of one greedy decode step on this rank (the decoder's step and the argmax), in all and
    per layer: the step is counted once with its layers and once without them (the same model with an
    empty layer list), and the difference divided among the layers. The C kernels run the layers
    outside PyTorch: there the count is what remains (embedding, output, argmax) and 0 per layer."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, model.args.vocab_size, (batch, prompt_len + 1), generator=g, device="cpu")
    ids = ids.to(model.rotation.device)
    prompt, new = ids[:, :prompt_len], ids[:, prompt_len:]

    def step() -> None:
        model.greedy_next(model.hidden(new, prompt_len))

    with torch.inference_mode():
        model.hidden(prompt, 0)
        step()  # warm: first calls may dispatch more
        total = _ops_of(step)
        layers, model.layers = model.layers, torch.nn.ModuleList()
        try:
            outside = _ops_of(step)
        finally:
            model.layers = layers
    return {"ops_per_step": total, "ops_per_layer": (total - outside) / len(layers)}


def compare_transformers(model: Transformer, batch: int, prompt_len: int, new_tokens: int, runs: int,
                         seed: int) -> float:
    """Decode tok/s of transformers' LlamaForCausalLM.generate on the same weights (one rank only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..checkpoints.hf import hf_config, hf_state_dict

    args = model.args
    dtype = model.output.weight.dtype
    state = {k: v for k, v in model.state_dict().items()}
    config = LlamaConfig(**hf_config(args, dtype, max_position_embeddings=prompt_len + new_tokens + 8))
    hf = LlamaForCausalLM(config).to(dtype=dtype, device=model.output.weight.device).eval()
    hf.load_state_dict(hf_state_dict(args, state), strict=True)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, args.vocab_size, (batch, prompt_len), generator=g, device="cpu")
    ids = ids.to(model.output.weight.device)
    device = model.output.weight.device

    def gen(n):
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    gen(8)
    first = statistics.median(_timed(device, lambda: gen(1)) for _ in range(runs))
    total = statistics.median(_timed(device, lambda: gen(1 + new_tokens)) for _ in range(runs))
    return batch * new_tokens / max(total - first, 1e-9)


def bench(
    ckpt_dir: Optional[str] = None,
    model: Optional[str] = None,
    dim: Optional[int] = None,
    n_layers: Optional[int] = None,
    n_heads: Optional[int] = None,
    n_kv_heads: Optional[int] = None,
    vocab_size: Optional[int] = None,
    multiple_of: Optional[int] = None,
    ffn_dim_multiplier: Optional[float] = None,
    dtype: str = "auto",
    batch: int = 1,
    prompt_len: int = 32,
    new_tokens: int = 256,
    runs: int = 3,
    warmup: int = 1,
    seed: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.9,
    backend: str = "auto",
    device: str = "auto",
    decoder: str = "auto",
    compare: Optional[str] = None,
    json: bool = False,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    profile_ops: bool = False,
) -> None:
    """Measure load time, prefill and decode speed, peak memory and bandwidth; run under torchrun for N ranks.

    Pick the model with --ckpt_dir DIR, --model PRESET (configs/, e.g. llama-2-7b) or an explicit shape
    (--dim 288 --n_layers 6 --n_heads 6 [--n_kv_heads --vocab_size 32000 --multiple_of 32]); shapes get
    random weights. Greedy decoding (or sampling with --temperature from 0.001 to 100 and --top_p in
    (0, 1]) of --new_tokens tokens at --batch, median of --runs after --warmup; --seed (an integer from 0
    to 2**32 - 1) picks the prompts and the random weights.
    --compare transformers also times LlamaForCausalLM.generate on the same weights (one rank only).
    --decoder pytorch|static|compiled|cpu_kernels picks the decode path (auto: the CPU kernels where they can
    run). The model is built in --dtype directly; peak memory is measured from the end of loading on. With
    --decoder compiled, load includes compiling every (rows, span) bucket of --batch x the sequence; the
    report gives that time on its own (compile_s, compiled_graphs), and tok/s is measured after it.
    --quantize int8|int4 [--group_size 32|64|128] quantizes the layer weights as they load or are drawn
    (the output layer in int8; embedding, norms and activations stay in --dtype), as `llama-mp` does.
    --profile_ops also counts the PyTorch operators of one decode step (torch.profiler), in all and per
    layer: what an eager GPU step launches kernels for.
    --json prints one JSON object instead of the table.
    """
    shape = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
             "vocab_size": vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": ffn_dim_multiplier}
    args = shape_args(ckpt_dir, model, shape)
    for flag, value, least in (("--batch", batch, 1), ("--prompt_len", prompt_len, 1),
                               ("--new_tokens", new_tokens, 1), ("--runs", runs, 1), ("--warmup", warmup, 0)):
        require_int(flag, value, least)
    require_seed("--seed", seed, BENCH_SEED_LIMIT)
    check_sampling(temperature, top_p, 0, "--{}")
    scheme = quantize_scheme(quantize, group_size)
    if compare and temperature:
        raise LlamaMPError("--compare transformers times greedy decoding; drop --temperature or the comparison.")
    if compare not in (None, "transformers"):
        raise LlamaMPError(f"--compare knows only 'transformers', got {compare!r}.")
    group = distributed.setup(backend, device)
    if compare and group.world_size > 1:
        raise LlamaMPError("--compare transformers runs on one process (transformers has no model parallelism "
                           "here); drop torchrun or the comparison.")
    torch_dtype = choose_dtype(dtype, group.device)
    max_seq_len = prompt_len + new_tokens + 1
    load_s = time.perf_counter()

    def make_model() -> Transformer:
        params = load_params(ckpt_dir) if ckpt_dir else args
        chosen = choose_decoder(decoder, group.device, torch_dtype, scheme or (params.scheme if ckpt_dir else None),
                                params.family)
        if ckpt_dir:
            return load_checkpoint(ckpt_dir, group, torch_dtype, chosen, batch, max_seq_len, scheme)
        return random_model(args, group, torch_dtype, chosen, batch, max_seq_len, seed, scheme)

    net = ready_on_every_rank(group, make_model, batch, max_seq_len, distributed.DEFAULT_LOAD_TIMEOUT_S)
    args = net.args
    _sync(group.device)
    load_s = time.perf_counter() - load_s
    reset_peak_memory(group.device)
    llama = Llama(net, _NoStop(), group)
    result = run_bench(llama, batch, prompt_len, new_tokens, runs, warmup, seed, temperature, top_p)
    per_token = bytes_read_per_token(net, batch)
    peaks = [peak_memory_bytes(group.device)]  # before the bandwidth probe adds its own buffer
    if group.world_size > 1:
        peaks = [None] * group.world_size
        dist.all_gather_object(peaks, peak_memory_bytes(group.device))
    bandwidth = read_bandwidth(group.device)
    report = {
        "model": ckpt_dir or model or f"dim{args.dim}_L{args.n_layers}_H{args.n_heads}",
        "parameters": args.parameter_count(), "ranks": group.world_size, "device": _device_name(group.device),
        "threads": torch.get_num_threads(), "dtype": str(torch_dtype).replace("torch.", ""),
        "weights": args.scheme.describe() if args.scheme is not None else "unquantized", "batch": batch,
        "prompt_len": prompt_len, "new_tokens": new_tokens,
        "decoding": f"sampling (temperature {temperature}, top_p {top_p})" if temperature else "greedy",
        "load_s": load_s, "compile_s": getattr(net.decoder, "warmup_s", 0.0),
        "compiled_graphs": getattr(net.decoder, "graphs", 0), **result,
        "peak_memory_per_rank_gib": [p / 2**30 for p in peaks],
        "weight_bytes_per_token_per_rank": per_token,
        "achieved_gb_s_per_rank": per_token * result["decode_tok_s"] / batch / 1e9,
        "read_gb_s_per_rank": bandwidth / 1e9,
        "decode_path": net.decoder.name,
    }
    if hasattr(net.decoder, "describe"):  # the C kernels: their build and (quantized) activations
        report["kernels"] = net.decoder.describe(net)
    report["bandwidth_fraction"] = report["achieved_gb_s_per_rank"] / report["read_gb_s_per_rank"]
    if profile_ops:
        report.update(ops_per_decode_step(net, batch, prompt_len, seed))
    if compare:
        report["transformers_decode_tok_s"] = compare_transformers(net, batch, prompt_len, new_tokens, runs, seed)
        report["speedup_vs_transformers"] = result["decode_tok_s"] / report["transformers_decode_tok_s"]
    if group.is_main:
        print(jsonlib.dumps(report) if json else format_report(report), flush=True)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def format_report(r: Dict) -> str:
    weights = "" if r["weights"] == "unquantized" else f", {r['weights']} weights"
    rows: List[tuple] = [
        ("model", f"{r['model']} ({r['parameters'] / 1e6:.1f}M parameters, {r['dtype']}{weights})"),
        ("ranks / device", f"{r['ranks']} x {r['device']}, {r['threads']} thread(s) per rank"),
        ("batch / prompt / new", f"{r['batch']} / {r['prompt_len']} / {r['new_tokens']} tokens, {r['decoding']}"),
        ("load", f"{r['load_s']:.2f} s" + (f", of which compiling and warming up {r['compiled_graphs']} graphs "
                                           f"{r['compile_s']:.2f} s" if r["compiled_graphs"] else "")),
        ("prefill", f"{r['prefill_tok_s']:.1f} tok/s"),
        ("decode", f"{r['decode_tok_s']:.1f} tok/s ({r['ms_per_token']:.2f} ms/token), {r['decode_path']}"
                   + (f" ({r['kernels']})" if r.get("kernels") else "")),
        ("peak memory per rank", ", ".join(f"{m:.2f} GiB" for m in r["peak_memory_per_rank_gib"])),
        ("weights read per token", f"{r['weight_bytes_per_token_per_rank'] / 1e6:.1f} MB per rank"),
        ("bandwidth", f"{r['achieved_gb_s_per_rank']:.1f} GB/s per rank, {100 * r['bandwidth_fraction']:.0f}% of "
                      f"a {r['read_gb_s_per_rank']:.1f} GB/s read"),
    ]
    if "ops_per_step" in r:
        rows.append(("operators per step", f"{r['ops_per_step']} ({r['ops_per_layer']:g} per layer), "
                                           f"{r['decode_path']}"))
    if "transformers_decode_tok_s" in r:
        rows.append(("transformers decode", f"{r['transformers_decode_tok_s']:.1f} tok/s "
                                            f"(llama_mp is {r['speedup_vs_transformers']:.2f}x)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

