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
from .errors import LlamaMPError
from .params import parse_params
from .tools_cli import TOOLS


def synth(out_dir: str, mp: int = 1, dim: int = 256, n_layers: int = 4, n_heads: int = 8,
          n_kv_heads: int = None, vocab_size: int = 0, multiple_of: int = 32, seed: int = 0,
          dtype: str = "float32", tokenizer: str = None) -> None:
    """Write a random checkpoint with MP shards in Meta's exact layout, for demos and benchmarks.

    The tokenizer is ../shared/assets/tokenizer.model when present (or --tokenizer), else a tiny one
    trained on the spot; it is copied next to the shards as tokenizer.model and the vocabulary is
    sized to it unless --vocab_size is given.
    """
    import shutil

    import torch

    from .synthetic import find_or_make_tokenizer, write_random_checkpoint
    from .tokenizer import Tokenizer

    if os.path.exists(os.path.join(out_dir, "params.json")):
        raise LlamaMPError(f"{out_dir} already holds a checkpoint; remove it or pick another folder.")
    os.makedirs(out_dir, exist_ok=True)
    tok_dst = os.path.join(out_dir, "tokenizer.model")
    src = tokenizer or find_or_make_tokenizer(tok_dst)
    if os.path.abspath(src) != os.path.abspath(tok_dst):
        shutil.copyfile(src, tok_dst)
    vocab = vocab_size or Tokenizer(tok_dst).n_words
    args = parse_params({"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
                         "vocab_size": vocab, "multiple_of": multiple_of, "norm_eps": 1e-5}, where="synth options")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise LlamaMPError(f"Unknown --dtype {dtype!r}; use one of {', '.join(dtypes)}.")
    write_random_checkpoint(out_dir, args, mp, seed=seed, dtype=dtypes[dtype])
    print(f"wrote {out_dir}: {mp} shard(s), {args.parameter_count() / 1e6:.1f}M parameters, tokenizer "
          f"{tok_dst}", file=sys.stderr)


COMMANDS = {"synth": synth, "bench": bench, **TOOLS}


def main() -> None:
    from .completion_cli import run

    run(COMMANDS, name="llama-mp")
