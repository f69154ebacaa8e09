"""`llama-mp reshard`: rewrite a Meta checkpoint with a different number of shards.

Output shards are built one at a time. For each one, only the input shards that overlap it are opened
(mmap), each tensor's slice is cut or concatenated exactly as a loading rank would do it
(`checkpoint.share_of`), and the shard is saved and dropped before the next one starts. Peak host
memory is therefore about one output shard plus the input pages it touches, never the whole model
(unless the output has a single shard, which *is* the whole model).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Callable, List, Optional

import torch
from tqdm import tqdm

from ..dtypes import parse_dtype
from ..errors import LlamaMPError
from . import layout
from . import meta as checkpoint
from .meta import StateDict, write_checklist
from .params import ModelArgs, load_params, save_params
from .staging import staged_output_dir

# What a writer asks for: the piece of tensor `key` that goes into output shard `index`.
PieceFn = Callable[[str, int], torch.Tensor]

def check_shard_count(args: ModelArgs, num_shards) -> None:
    """--mp must split the model like a process count does (layout.require_split)."""
    layout.require_split(args, num_shards, f"--mp {num_shards!r}: this model", "shard")


def write_shards(out_dir: str, keys: List[str], num_shards: int, piece: PieceFn, source: Optional[str],
                 dtype: Optional[torch.dtype] = None, progress: bool = True) -> None:
    """Save `consolidated.00.pth` ... one shard at a time, each tensor a compact copy of its piece.

    Every piece read from `source` (a folder the tools convert) must be finite, before and after the
    conversion (`require_finite_copy`); `source` None writes the given tensors as they are (quantize's,
    checked as they were read, and synthetic checkpoints, damaged ones included, which the tests need).

    The copy matters: `torch.save` of a view would store the view's whole underlying storage (the full
    mmap-backed tensor), so every piece is cloned into its own contiguous storage first. Saving through
    a Python file keeps the OSError of a failed write (ENOSPC: a full disk), which torch.save given a
    path turns into a RuntimeError saying only "unexpected pos".
    """
    with tqdm(total=num_shards * len(keys), desc=f"writing {num_shards} shard(s)", unit="tensor",
              file=sys.stderr, disable=not progress) as bar:
        for index in range(num_shards):
            shard: StateDict = {}
            for key in keys:
                t = piece(key, index)
                shard[key] = t.to(dtype=dtype or t.dtype, memory_format=torch.contiguous_format, copy=True)
                if source is not None:
                    checkpoint.require_finite_copy(key, source, t, shard[key])
                bar.update()
            with open(os.path.join(out_dir, checkpoint.shard_name(index)), "wb") as f:
                torch.save(shard, f)
            del shard


def copy_tokenizer(out_dir: str, explicit: Optional[str], *fallbacks: Optional[str]) -> None:
    """Copy `explicit` (the user's --tokenizer, which must be a file), else the first existing file among
    `fallbacks`, to `out_dir`/tokenizer.model (none: do nothing)."""
    if explicit is not None and not os.path.isfile(explicit):
        raise LlamaMPError(f"--tokenizer {explicit!r} is not a file. Pass the path of a SentencePiece "
                           "tokenizer.model, or leave --tokenizer out to use the one beside the source.")
    dst = os.path.join(out_dir, "tokenizer.model")
    for path in (explicit, *fallbacks):
        if path and os.path.isfile(path):
            if not (os.path.exists(dst) and os.path.samefile(path, dst)):
                shutil.copyfile(path, dst)
            return


def save_consolidated(ckpt_dir: str, args: ModelArgs, full_state: StateDict, num_shards: int,
                      progress: bool = False) -> None:
    """Split a whole-model state dict into `num_shards` Meta shards plus params.json and checklist.chk,
    with the same shard writer as reshard. `args.vocab_size` is written as given (-1 mimics Meta's files)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    save_params(args, ckpt_dir)
    keys = [k for k in full_state if k not in layout.IGNORED_KEYS]
    write_shards(ckpt_dir, keys, num_shards,
                 lambda key, index: layout.split(key, full_state[key], args, num_shards, index),
                 None, progress=progress)
    write_checklist(ckpt_dir, progress)


def open_meta(src: str, allow_quantized: bool = False):
    """(params with vocab resolved, shard paths, key order of shard 0): every shard checked, none read.
    A quantized checkpoint is refused unless `allow_quantized` (only resharding copies its tensors as
    they are; every other tool reads float weights)."""
    paths = checkpoint.shard_paths(src)
    args = load_params(src)
    if args.scheme is not None and not allow_quantized:
        raise LlamaMPError(f"{src} is a quantized checkpoint ({args.scheme.describe()}, says its params.json), and "
                           "this tool reads float weights only: quantizing cannot be undone exactly. Use the "
                           "original float checkpoint (`llama-mp reshard` does accept quantized folders).")
    keys: List[str] = []
    for index, path in enumerate(paths):
        shard = checkpoint.load_shard(path)
        if index == 0:
            args = checkpoint.resolve_vocab(args, shard, path, len(paths))
            expected = layout.shard_shapes(args, len(paths))
            # Meta's own key order (and LLaMA 1's rope.freqs, replicated); Llama 4's vision weights and router
            # statistics are not read by llama_mp, so they are not written either (no split rule is known).
            keys = [k for k in shard if k == "rope.freqs" or k not in layout.IGNORED_KEYS]
            dropped = len(shard) - len(keys)
            if dropped:
                print(f"note: {dropped} tensor(s) that llama_mp does not read (Llama 4's vision encoder, router "
                      "statistics) are not copied.", file=sys.stderr)
        checkpoint.check_tensors(shard, expected, path, args, len(paths))
    return args, paths, keys


def reshard(src: str, dst: str, mp: int, overwrite: bool = False, dtype: Optional[str] = None,
            tokenizer: Optional[str] = None, progress: bool = True) -> ModelArgs:
    """Write the Meta checkpoint `src` to `dst` with `mp` shards; return its params (vocab resolved).

    params.json is copied byte for byte, tokenizer.model too (or `tokenizer`), and a fresh checklist.chk
    is written. Tensors are bit-identical (unless `dtype` converts them), so K -> M -> K round-trips.
    A quantized checkpoint reshards the same way, scales with their weights (layout.py); `mp` must then
    also keep int4 groups whole in every shard.
    """
    args, paths, keys = open_meta(src, allow_quantized=True)
    check_shard_count(args, mp)
    if args.scheme is not None and dtype is not None:
        raise LlamaMPError(f"--dtype {dtype} converts float weights, but {src} is quantized ({args.scheme.describe()}): "
                           "its integers and scales are copied exactly. Leave --dtype out, or quantize a float "
                           "copy of the model in that dtype.")
    if checkpoint.OUTPUT_KEY not in keys and not checkpoint.can_tie_output(args, mp):
        # A tied output layer stays tied where the output's shards can hold it (Llama 3, or one shard);
        # LLaMA-layout shards split the embedding by columns, so there it is written out, cut by rows.
        keys = keys + [checkpoint.OUTPUT_KEY]
    torch_dtype = parse_dtype(dtype, optional=True)
    num_in = len(paths)
    opened = {"index": None, "shards": {}}

    def piece(key: str, index: int) -> torch.Tensor:
        if opened["index"] != index:  # a new output shard: open only the inputs that overlap it
            opened["shards"] = {k: checkpoint.load_shard(paths[k])
                                for k in checkpoint.overlapping_shards(index, mp, num_in)}
            opened["index"] = index
        return checkpoint.joined(*checkpoint.share_of(key, args, opened["shards"], num_in, index, mp))

    needs = sum(os.path.getsize(p) for p in paths)
    if torch_dtype is not None:  # the shards' size scales with the element size
        needs = needs * torch_dtype.itemsize // checkpoint.load_shard(paths[0])[keys[0]].dtype.itemsize
    with staged_output_dir(dst, overwrite, src=src, needs_bytes=needs) as out:
        shutil.copyfile(os.path.join(src, "params.json"), os.path.join(out, "params.json"))
        copy_tokenizer(out, tokenizer, os.path.join(src, "tokenizer.model"))
        write_shards(out, keys, mp, piece, src, torch_dtype, progress)
        opened["shards"] = {}  # unmap the inputs before hashing the outputs
        write_checklist(out, progress)
    return args
