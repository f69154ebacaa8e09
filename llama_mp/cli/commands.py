"""`llama-mp`: the tools around checkpoints, as subcommands (fire).

    llama-mp synth DIR --mp 2        write a small random checkpoint in Meta's layout (+ a tokenizer)
    llama-mp reshard SRC DST --mp M  rewrite a Meta checkpoint with M shards
    llama-mp verify DIR              check checksums and structure, listing every problem
    llama-mp convert SRC DST --mp M  Hugging Face / llama2.c / Meta -> Meta (--to hf: Meta -> Hugging Face)
    llama-mp quantize SRC DST --mode int8|int4   write a quantized copy of a float Meta checkpoint
    llama-mp plan --model NAME --gpus N --gpu_mem_gb G   will it fit, and if not what would
    llama-mp bench --model NAME | --ckpt_dir DIR | --dim ...   prefill/decode speed (under torchrun for N ranks)
    llama-mp serve --ckpt_dir DIR --tokenizer_path T   OpenAI-compatible HTTP server (under torchrun for N ranks)
    llama-mp bench-serve --url URL --concurrency 1,4,8   requests/s, tokens/s, latencies of a running server
    llama-mp perplexity --ckpt_dir DIR --tokenizer_path T --text FILE   how well a model predicts a text (torchrun)

Each function is what fire shows for `llama-mp <command> --help`, so its docstring is the manual page.
Results go to stdout; progress bars and notes to stderr; user errors raise LlamaMPError (exit 2).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

from .. import distributed, families
from ..checkpoints.params import parse_params
from ..dtypes import parse_dtype
from ..errors import LlamaMPError
from ..tools.bench import bench
from ..server.command import serve
from ..tools.bench_serve import bench_serve


def synth(out_dir: str, mp: int = 1, dim: int = 256, n_layers: int = 4, n_heads: int = 8,
          n_kv_heads: int = None, vocab_size: int = 0, multiple_of: int = 32, seed: int = 0,
          dtype: str = "float32", tokenizer: str = None, overwrite: bool = False, family: str = "llama") -> None:
    """Write a random checkpoint with MP shards in Meta's exact layout, for demos and benchmarks.

    --family llama (LLaMA / Llama 2 layout and SentencePiece tokenizer), llama3 (Llama 3.1: embedding
    split by vocabulary rows, scaled rope with theta 500000, tiktoken tokenizer) or llama4 (Meta's Llama 4
    layout: MoE and dense layers, NoPE, chunked attention, qk norm; Llama 4's tokenizer). The tokenizer is the
    family's file in ../shared/assets when present (or --tokenizer), else a tiny one made on the spot;
    it is copied next to the shards as tokenizer.model and the vocabulary is sized to it unless
    --vocab_size is given. MP must split every head, the FFN, the embedding and the
    vocabulary evenly. The folder appears only once complete (--overwrite replaces a non-empty one).
    """
    from ..checkpoints.reshard import check_shard_count, copy_tokenizer
    from ..checkpoints.staging import staged_output_dir
    from ..checkpoints.synth import find_or_make_tokenizer, write_random_checkpoint
    from ..runtime.tokenizer import Tokenizer

    if family not in families.names():
        raise LlamaMPError(f"Unknown --family {family!r}; use one of {', '.join(families.names())}.")
    torch_dtype = parse_dtype(dtype)
    with staged_output_dir(out_dir, overwrite) as out:
        tok_dst = os.path.join(out, "tokenizer.model")
        made = None if tokenizer is not None else find_or_make_tokenizer(tok_dst, family=family)
        copy_tokenizer(out, tokenizer, made)
        vocab = vocab_size or Tokenizer(tok_dst, family).n_words
        args = parse_params({"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
                             "vocab_size": vocab, "multiple_of": multiple_of, "norm_eps": 1e-5,
                             **families.named(family).synth_params}, where="synth options")
        check_shard_count(args, mp)
        require_synth_fits(out_dir, args, torch_dtype)
        write_random_checkpoint(out, args, mp, seed=seed, dtype=torch_dtype)
    print(f"wrote {out_dir}: {mp} shard(s), {args.parameters_text()}, tokenizer "
          f"{os.path.join(out_dir, 'tokenizer.model')}", file=sys.stderr)


def require_synth_fits(out_dir: str, args, dtype) -> None:
    """synth makes the whole model in memory, then writes it: refuse a shape that this host's memory or
    the destination's disk cannot hold before drawing a single weight."""
    import torch

    from ..checkpoints import layout
    from ..checkpoints.staging import require_room
    from ..runtime.footprint import available_bytes

    size = args.parameter_count() * dtype.itemsize
    largest = max(math.prod(shape) for shape in layout.full_shapes(args).values()) * 4  # drawn in float32
    free = available_bytes(torch.device("cpu"))
    if free is not None and size + largest > free:
        raise LlamaMPError(f"synth makes the whole model in memory before writing it: this shape "
                           f"({args.parameter_count() / 1e9:.2f} B parameters) needs about "
                           f"{(size + largest) / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB are available. Use a "
                           "smaller shape, or `llama-mp bench --dim ...`, which draws random weights on each rank "
                           "without writing a checkpoint.")
    require_room(out_dir, os.path.dirname(os.path.abspath(out_dir)), size)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def reshard(src: str, dst: str, mp: int, overwrite: bool = False, dtype: Optional[str] = None) -> None:
    """Rewrite the Meta checkpoint SRC into a new folder DST with --mp M shards.

    Writes consolidated.00.pth ... consolidated.{M-1}.pth, a copy of params.json (and tokenizer.model
    when SRC has one) and a fresh checklist.chk. One output shard is built at a time from memory-mapped
    inputs, so host memory stays near one output shard. Tensors are copied bit for bit (--dtype
    float32|bfloat16|float16 converts them). M must split every head, the FFN, the embedding and the
    vocabulary evenly; the error lists the valid counts. DST must not exist or be empty, unless
    --overwrite; it appears only once complete (written beside it, then renamed).
    """
    from ..checkpoints.reshard import reshard as run

    args = run(str(src), str(dst), mp, overwrite=overwrite, dtype=dtype)
    print(f"wrote {dst}: {mp} shard(s), {args.parameters_text()}")


def verify(ckpt_dir: str, quiet: bool = False) -> None:
    """Check a Meta checkpoint folder and report every problem found; exit 0 only if there are none.

    Checks the md5 of every file listed in checklist.chk (when present; streamed), that every shard is
    listed, that params.json is valid, that no shard is missing or unreadable, and that every key and
    shape in every shard matches params.json and the shard count (replicated tensors equal everywhere).
    Prints one line per problem on stdout and exits 2 if any. --quiet hides the progress bar.
    """
    from ..checkpoints.verify import has_checklist, verify_checkpoint

    ckpt_dir = str(ckpt_dir)
    problems = verify_checkpoint(ckpt_dir, progress=not quiet)
    if not has_checklist(ckpt_dir):
        _note(f"note: {ckpt_dir} has no checklist.chk, so file contents were not checksummed (structure only)")
    if not problems:
        print(f"OK: {ckpt_dir} is a sound checkpoint")
        return
    print(f"{len(problems)} problem(s) in {ckpt_dir}:")
    for problem in problems:
        print(f"  - {problem}")
    raise LlamaMPError(f"{ckpt_dir} failed verification with {len(problems)} problem(s), listed above. "
                       "Download the named files again, or fix params.json to match the shards.")


def convert(src: str, dst: str, mp: int = 1, to: str = "meta", overwrite: bool = False,
            dtype: Optional[str] = None, tokenizer: Optional[str] = None) -> None:
    """Convert SRC into a Meta checkpoint folder DST with --mp M shards (or, with --to hf, into Hugging Face format).

    SRC is detected: a Hugging Face Llama folder (config.json + model*.safetensors or pytorch_model*.bin,
    sharded or not; q/k rotary row order converted, GQA kept), a llama2.c model file (*.bin, the original
    float32 format), or a Meta folder (resharded). DST gets params.json (multiple_of/ffn_dim_multiplier
    chosen to reproduce the FFN width), the shards, checklist.chk and SRC's tokenizer.model (or
    --tokenizer PATH). --to hf writes config.json + model.safetensors (split into 5 GiB files when larger)
    that transformers' LlamaForCausalLM.from_pretrained loads. --dtype float32|bfloat16|float16 converts
    the weights (default: keep). DST must not exist or be empty unless --overwrite.
    """
    from ..checkpoints.convert import convert as run

    kind = run(str(src), str(dst), mp=mp, to=to, overwrite=overwrite, dtype=dtype,
               tokenizer=None if tokenizer is None else str(tokenizer))
    target = "a Hugging Face folder" if to == "hf" else f"a Meta checkpoint with {mp} shard(s)"
    print(f"wrote {dst}: {target}, from the {kind} checkpoint {src}")


def quantize(src: str, dst: str, mode: str, group_size: Optional[int] = None, mp: Optional[int] = None,
             overwrite: bool = False) -> None:
    """Write a quantized copy of the float Meta checkpoint SRC into a new folder DST (--mode int8|int4).

    Every linear layer of every transformer layer (wq wk wv wo w1 w2 w3; Llama 4: wqkv, wo, the dense
    fc1/fc2, the shared expert and every routed expert, each expert along its own inputs; its router
    stays float) is stored as --mode says:
    int8 with one float32 scale per output row, or int4 (two per byte) with one bfloat16 scale per
    --group_size inputs (32, the default, 64 or 128; each group's scale the least-squared-error one,
    never worse than round-to-nearest). The output layer is int8 per row in both modes; the embedding and
    the norms keep their dtype. Scales sit beside the weights (`<name>.scales`), params.json records
    "quantization": {"mode", "group_size"}, tokenizer.model is copied and checklist.chk written. --mp M
    shards (default: as many as SRC; with int4 each shard's slice of wo's and w2's inputs must be whole
    groups, the error lists the valid counts). The launchers load DST as it is (no --quantize), on any
    valid rank count, and `llama-mp reshard` / `verify` work on it. DST must not exist or be empty
    unless --overwrite; it appears only once complete. Refuses an already-quantized SRC.
    """
    from ..checkpoints.meta import shard_paths
    from ..checkpoints.quantize import quantize_checkpoint

    args = quantize_checkpoint(str(src), str(dst), mode, group_size=group_size, mp=mp, overwrite=overwrite)
    print(f"wrote {dst}: {len(shard_paths(str(dst)))} shard(s), {args.parameters_text()}, "
          f"{args.scheme.describe()}")


def plan(gpus: int, gpu_mem_gb: float, ckpt_dir: Optional[str] = None, model: Optional[str] = None,
         dtype: str = "bfloat16", max_seq_len: int = 512, max_batch_size: int = 4, json: bool = False,
         quantize: Optional[str] = None, group_size: Optional[int] = None, decoder: str = "auto") -> None:
    """Say whether a model fits on --gpus N GPUs of --gpu_mem_gb G GiB each, and if not, what would.

    The model is --ckpt_dir DIR (a Meta checkpoint; only its headers are read) or --model NAME, a preset:
    llama-7b, llama-13b, llama-33b, llama-65b, llama-2-7b, llama-2-13b, llama-2-70b, codellama-34b,
    llama-3-8b, llama-3-70b, llama-3.1-8b, llama-3.1-70b, llama-3.1-405b, llama-3.2-1b, llama-3.2-3b, llama-3.3-70b.
    Per rank it adds the weights, the KV cache for max_batch_size x max_seq_len (its own kv heads only)
    and an estimate of working memory (1 GiB CUDA context, logits, activations), and compares with G.
    When it does not fit it lists single changes that would: the fewest GPUs, a smaller batch or
    sequence length, a smaller dtype. Prints a table, or with --json a JSON object. Exits 0 whether or
    not the model fits (read "fits" in the JSON); exits 2 for bad input (e.g. a GPU count that cannot
    split the model, with the valid counts). A quantized checkpoint (`llama-mp quantize`) is planned as
    stored; --quantize int8|int4 [--group_size N] plans a float one quantized while loading (layer weights
    per the scheme, output layer int8, embedding and norms in --dtype). --decoder compiled plans the
    quantized products as that decoder runs them (packed kernels, no dequantised matrix).
    """
    from ..tools.plan import make_plan, model_args, plan_to_text

    name, args = model_args(ckpt_dir, model)
    print(plan_to_text(make_plan(args, name, gpus, gpu_mem_gb, str(dtype), max_seq_len, max_batch_size,
                                 quantize, group_size, decoder), json))


def perplexity(ckpt_dir: str, tokenizer_path: str, text: str, window: Optional[int] = None,
               stride: Optional[int] = None, per_token: Optional[str] = None, compare: Optional[str] = None,
               max_seq_len: int = 512, quantize: Optional[str] = None, group_size: Optional[int] = None,
               backend: str = "auto", device: str = "auto", dtype: str = "auto", decoder: str = "auto",
               json: bool = False, timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
               load_timeout_s: float = distributed.DEFAULT_LOAD_TIMEOUT_S) -> None:
    """Perplexity of the model on a UTF-8 text file, on every process of a torchrun job (or one process).

    The text is scored by teacher forcing in sliding windows of --window tokens (default --max_seq_len),
    each advancing by --stride (default half the window) and scoring only tokens no earlier window
    scored, so every token after the first is scored once with at least window - stride tokens of
    context. --per_token FILE saves each token's log-probability and the model's most likely token;
    --compare FILE (saved by another run on the same text, e.g. the full-precision model) adds the mean
    |difference of log-probabilities| and the share of positions where both models' most likely tokens
    agree: how to check a quantized model (--quantize int8|int4, or a `llama-mp quantize` folder) on your
    own data. Prints one line, or with --json one JSON object, on rank 0.
    """
    import json as jsonlib

    from ..checkpoints.staging import check_output_file
    from ..runtime.llama import Llama, check_build_arguments
    from ..tools.perplexity import check_window, format_report, perplexity as score_file, read_text
    from .completion import _before_loading

    def check() -> None:
        check_build_arguments(ckpt_dir, tokenizer_path, 1, timeout_s, load_timeout_s, quantize, group_size)
        check_window(window, stride, max_seq_len)
        read_text(text)
        if per_token is not None and distributed.env_ranks()[0] == 0:  # rank 0 writes it, after the whole run
            check_output_file("--per_token", per_token)

    _before_loading(check)
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, 1, backend=backend, device=device, dtype=dtype,
                        decoder=decoder, timeout_s=timeout_s, load_timeout_s=load_timeout_s, quantize=quantize,
                        group_size=group_size)
    report = score_file(llama, text, window, stride, per_token, compare)
    if report is not None:
        print(jsonlib.dumps(report) if json else format_report(report))


COMMANDS = {"synth": synth, "bench": bench, "reshard": reshard, "verify": verify, "convert": convert,
            "quantize": quantize, "plan": plan, "perplexity": perplexity,
            "serve": serve, "bench-serve": bench_serve}


def main() -> None:
    from .runner import run

    run(COMMANDS, name="llama-mp")
