"""`llama-mp convert`: any supported checkpoint to Meta's consolidated layout (or Meta to Hugging Face).

Sources are detected from what is on disk:

* a Meta directory (params.json + consolidated.NN.pth): resharded (`reshard.py`);
* a Hugging Face Llama directory (config.json + safetensors or pytorch_model*.bin): `hf.py`;
* a llama2.c `.bin` file: `llama2c.py`.

Every reader presents the same small interface, a "source": `args` (ModelArgs, vocab known), `keys()`
in Meta order, `tensor(key)` giving the whole tensor in Meta's layout (read lazily), and `tokenizer`
(a path or None). The writer then splits each tensor with `layout.split`, one output shard at a time.
A source may also say `ties_output` (its output layer is the embedding: a Meta checkpoint without
output.weight, a Hugging Face folder without lm_head.weight); `tensor("output.weight")` then gives the
embedding. Meta folders are always written with output.weight, as Meta's own files are (Llama 3.2 too);
Hugging Face folders keep the tie (`tie_word_embeddings`, no lm_head.weight).

A Hugging Face repo of a Meta model also carries Meta's checkpoint under `original/`. convert reads the
folder the user named, i.e. the Hugging Face weights (what transformers runs; the tensors are the same),
and takes only the tokenizer from `original/`; a folder whose safetensors were not downloaded is
pointed at `original/` instead.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Protocol, Tuple

import torch
from tqdm import tqdm

from ..dtypes import parse_dtype
from ..errors import LlamaMPError
from . import layout
from . import meta as checkpoint
from .hf import HFSource, is_hf_dir, write_hf
from .hf_tokenizer import write_hf_tokenizer
from .llama2c import Llama2cSource, looks_like_llama2c
from .meta import write_checklist
from .params import ModelArgs, save_params
from .reshard import check_shard_count, copy_tokenizer, open_meta, reshard, write_shards
from .staging import staged_output_dir


class Source(Protocol):
    args: ModelArgs
    tokenizer: Optional[str]
    ties_output: bool  # optional: absent means False

    def keys(self) -> List[str]: ...

    def shapes(self) -> Dict[str, Tuple[int, ...]]: ...

    def dtypes(self) -> Dict[str, object]:
        """{label naming the file and tensor: dtype} from headers where the format has them."""

    def tensor(self, meta_key: str) -> torch.Tensor: ...


class MetaSource:
    """A Meta directory seen as whole tensors: each one merged from its shards (mmap) when asked for."""

    def __init__(self, ckpt_dir: str):
        self.args, paths, _ = open_meta(ckpt_dir)
        self._shards = [checkpoint.load_shard(p) for p in paths]
        self.tokenizer = os.path.join(ckpt_dir, "tokenizer.model")
        # open_meta has checked that a missing output.weight can be read from the embedding.
        self.ties_output = checkpoint.ties_output(self._shards[0])

    def keys(self) -> List[str]:
        return list(layout.full_shapes(self.args))

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return layout.full_shapes(self.args)  # open_meta has checked every shard against it

    def dtypes(self) -> Dict[str, object]:
        return {key: self._shards[0][checkpoint.stored_key(key, self._shards[0])].dtype
                for key in self.keys()}  # checked by open_meta too

    def tensor(self, meta_key: str) -> torch.Tensor:
        if meta_key == checkpoint.OUTPUT_KEY and self.ties_output:
            meta_key = checkpoint.EMBEDDING_KEY
        return layout.merge(meta_key, [sd[meta_key] for sd in self._shards], self.args)


def detect(src: str) -> str:
    """'meta', 'hf' or 'llama2c', or an error saying what was looked for."""
    if os.path.isdir(src):
        if os.path.isfile(os.path.join(src, "params.json")) and checkpoint.find_shards(src):
            return "meta"
        if is_hf_dir(src):
            return "hf"
    elif looks_like_llama2c(src):
        return "llama2c"
    raise LlamaMPError(f"Cannot tell what {src!r} is. convert reads a Meta checkpoint folder (params.json + "
                       "consolidated.00.pth), a Hugging Face Llama folder (config.json + model*.safetensors "
                       "or pytorch_model*.bin) or a llama2.c model file (*.bin).")


def open_source(src: str) -> Source:
    kind = detect(src)
    if kind == "hf":
        return HFSource(src)
    if kind == "llama2c":
        return Llama2cSource(src)
    return MetaSource(src)


def check_source_shapes(source: Source, where: str) -> None:
    """Every tensor is a weight (`meta.is_weight_dtype`) of the shape the derived params imply, before
    anything is written: an int8 tensor would otherwise be written out as a checkpoint that cannot load."""
    wrong_kind = checkpoint.dtype_problems(source.dtypes())
    if wrong_kind:
        raise LlamaMPError(f"{where} holds tensors that are not weights: " + "; ".join(wrong_kind[:6])
                           + (f"; and {len(wrong_kind) - 6} more" if len(wrong_kind) > 6 else "")
                           + ". " + checkpoint.weight_dtype_advice())
    problems = checkpoint.shape_problems(source.shapes(), layout.full_shapes(source.args))
    if problems:
        raise LlamaMPError(f"{where} is inconsistent with its own config: " + "; ".join(problems[:6])
                           + ". The files are incomplete or from different models.")


def output_bytes(source: Source, dtype: Optional[torch.dtype]) -> int:
    """About how many bytes the converted weights take: every parameter in `dtype`, or else in the dtype
    of the source's first tensor (for a full disk's message)."""
    if dtype is None:
        dtype = checkpoint.as_torch_dtype(next(iter(source.dtypes().values())))
    return source.args.parameter_count() * dtype.itemsize


def write_meta(source: Source, dst: str, mp: int, overwrite: bool = False, dtype: Optional[str] = None,
               tokenizer: Optional[str] = None, progress: bool = True, src: Optional[str] = None) -> None:
    """Write `source` as a Meta directory with `mp` shards, params.json (real vocab size), checklist.chk
    and tokenizer.model (the source's, or `tokenizer`)."""
    check_shard_count(source.args, mp)
    torch_dtype = parse_dtype(dtype, optional=True)

    def piece(key: str, index: int) -> torch.Tensor:
        return layout.split(key, source.tensor(key), source.args, mp, index)

    with staged_output_dir(dst, overwrite, src=src, needs_bytes=output_bytes(source, torch_dtype)) as out:
        save_params(source.args, out)
        copy_tokenizer(out, tokenizer, source.tokenizer)
        write_shards(out, source.keys(), mp, piece, src or "the source", torch_dtype, progress)
        write_checklist(out, progress)


def write_hf_dir(source: Source, dst: str, overwrite: bool = False, dtype: Optional[str] = None,
                 tokenizer: Optional[str] = None, progress: bool = True, src: Optional[str] = None) -> None:
    """Write `source` as a Hugging Face Llama directory: config.json, safetensors and, when the source has a
    tokenizer (or `tokenizer` names one), tokenizer.model with the files transformers reads it by
    (hf_tokenizer.py); config.json takes its bos and stop ids from that tokenizer."""
    torch_dtype = parse_dtype(dtype, optional=True)
    keys = source.keys()

    def tensor(key: str) -> torch.Tensor:
        t = source.tensor(key)
        written = t.to(torch_dtype) if torch_dtype else t
        checkpoint.require_finite_copy(key, src or "the source", t, written)
        return written

    with staged_output_dir(dst, overwrite, src=src, needs_bytes=output_bytes(source, torch_dtype)) as out, \
            tqdm(total=len(keys), desc="writing safetensors", unit="tensor", file=sys.stderr,
                 disable=not progress) as bar:
        # The tokenizer first: a wrong --tokenizer (or one that cannot be written) fails before the weights.
        copy_tokenizer(out, tokenizer, source.tokenizer)
        copied = _copied_tokenizer(out, source.args)
        if copied is not None:
            write_hf_tokenizer(out, copied)
        special_ids = (copied.bos_id, list(copied.stop_ids)) if copied else None
        write_hf(out, source.args, keys, tensor, progress=bar.update, special_ids=special_ids,
                 tie_word_embeddings=getattr(source, "ties_output", False))


def _copied_tokenizer(out_dir: str, args: ModelArgs):
    """The tokenizer copied into `out_dir`, read as the model's family reads it (so config.json gets its bos
    and stop ids), or None."""
    from .. import families
    from ..runtime.tokenizer import Tokenizer

    path = os.path.join(out_dir, "tokenizer.model")
    return Tokenizer(path, families.family_of(args).name) if os.path.isfile(path) else None


def convert(src: str, dst: str, mp: int = 1, to: str = "meta", overwrite: bool = False,
            dtype: Optional[str] = None, tokenizer: Optional[str] = None, progress: bool = True) -> str:
    """Convert `src` (detected) to `to` ('meta' with `mp` shards, or 'hf'); return the source kind."""
    if to not in ("meta", "hf"):
        raise LlamaMPError(f"--to {to!r} is not a target; use --to meta (default) or --to hf.")
    kind = detect(src)
    if to == "meta" and kind == "meta":
        reshard(src, dst, mp, overwrite=overwrite, dtype=dtype, tokenizer=tokenizer, progress=progress)
        return kind
    source = open_source(src)
    check_source_shapes(source, src)
    if to == "hf":
        write_hf_dir(source, dst, overwrite, dtype, tokenizer, progress, src=src)
    else:
        write_meta(source, dst, mp, overwrite, dtype, tokenizer, progress, src=src)
    return kind
