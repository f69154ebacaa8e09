"""`llama-mp`: the tools around checkpoints, as subcommands (fire).

    llama-mp synth DIR --mp 2        write a small random checkpoint in Meta's layout (+ a tokenizer)
    llama-mp reshard SRC DST --mp M  rewrite a Meta checkpoint with M shards
    llama-mp verify DIR              check checksums and structure, listing every problem
    llama-mp convert SRC DST --mp M  Hugging Face / llama2.c / Meta -> Meta (--to hf: Meta -> Hugging Face)
    llama-mp plan --model NAME --gpus N --gpu_mem_gb G   will it fit, and if not what would
    llama-mp bench --model NAME | --ckpt_dir DIR | --dim ...   prefill/decode speed (under torchrun for N ranks)
"""

from __future__ import annotations

import os
import sys

from .bench import bench
from .dtypes import parse_dtype
from .params import parse_params
from .tools_cli import TOOLS


def synth(out_dir: str, mp: int = 1, dim: int = 256, n_layers: int = 4, n_heads: int = 8,
          n_kv_heads: int = None, vocab_size: int = 0, multiple_of: int = 32, seed: int = 0,
          dtype: str = "float32", tokenizer: str = None, overwrite: bool = False) -> None:
    """Write a random checkpoint with MP shards in Meta's exact layout, for demos and benchmarks.

    The tokenizer is ../shared/assets/tokenizer.model when present (or --tokenizer), else a tiny one
    trained on the spot; it is copied next to the shards as tokenizer.model and the vocabulary is
    sized to it unless --vocab_size is given. MP must split every head, the FFN, the embedding and the
    vocabulary evenly. The folder appears only once complete (--overwrite replaces a non-empty one).
    """
    from .output_dir import staged_output_dir
    from .reshard import check_shard_count, copy_tokenizer
    from .synthetic import find_or_make_tokenizer, write_random_checkpoint
    from .tokenizer import Tokenizer

    torch_dtype = parse_dtype(dtype)
    with staged_output_dir(out_dir, overwrite) as out:
        tok_dst = os.path.join(out, "tokenizer.model")
        copy_tokenizer(out, tokenizer, None if tokenizer is not None else find_or_make_tokenizer(tok_dst))
        vocab = vocab_size or Tokenizer(tok_dst).n_words
        args = parse_params({"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
                             "vocab_size": vocab, "multiple_of": multiple_of, "norm_eps": 1e-5},
                            where="synth options")
        check_shard_count(args, mp)
        write_random_checkpoint(out, args, mp, seed=seed, dtype=torch_dtype)
    print(f"wrote {out_dir}: {mp} shard(s), {args.parameter_count() / 1e6:.1f}M parameters, tokenizer "
          f"{os.path.join(out_dir, 'tokenizer.model')}", file=sys.stderr)


COMMANDS = {"synth": synth, "bench": bench, **TOOLS}


def main() -> None:
    from .completion_cli import run

    run(COMMANDS, name="llama-mp")
