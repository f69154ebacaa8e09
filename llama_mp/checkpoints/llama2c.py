"""llama2.c model files (karpathy/llama2.c, the original "legacy" / version 0 `.bin`) as Meta tensors.

The file is a header of seven little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len), then float32 arrays with no padding:

    token embedding [vocab, dim]
    per layer, grouped by kind (all layers' attention norms, then all wq, ...):
        attention norm [dim], wq [dim, dim], wk [kv_dim, dim], wv [kv_dim, dim], wo [dim, dim],
        ffn norm [dim], w1 [hidden, dim], w2 [dim, hidden], w3 [hidden, dim]
    final norm [dim], rotary cos and sin tables [seq_len, head_dim / 2] each,
    and the classifier [vocab, dim] only when vocab_size is negative (not tied to the embedding).

llama2.c's model rotates adjacent feature pairs exactly as Meta's does, and its exporter writes wq/wk as
the model holds them, so they are already in Meta's layout: no row reordering (unlike Hugging Face).
llama2.c has no norm_eps or rope_theta in the file; its model uses 1e-5 and 10000, and the rotary table
in the file is checked against theta 10000. The newer versioned files (magic "ak42") are not read.
"""

from __future__ import annotations

import os
import struct
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..errors import LlamaMPError
from . import layout
from .params import ModelArgs, ffn_fields_for, parse_params

HEADER = struct.Struct("<7i")
VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c export versions 1 and 2
LAYER_ORDER = ["attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
               "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
               "feed_forward.w3.weight"]


def read_header(path: str) -> Tuple[ModelArgs, int, bool]:
    """(params, seq_len, tied classifier) from a llama2.c file, with its size checked."""
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise LlamaMPError(f"{path} is too short to be a llama2.c model file.")
    if struct.unpack("<I", raw[:4])[0] == VERSIONED_MAGIC:
        raise LlamaMPError(f"{path} is a versioned llama2.c file (magic 'ak42'); only the original (version 0) "
                           "float32 format is read. Export it with llama2.c's `export.py --version 0`.")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack(raw)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len) <= 0:
        raise LlamaMPError(f"{path} does not start with a valid llama2.c header (dim {dim}, hidden {hidden}, "
                           f"layers {n_layers}, heads {n_heads}, kv heads {n_kv_heads}, vocab {vocab}, "
                           f"seq_len {seq_len}).")
    fields = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads,
              "n_kv_heads": n_kv_heads if n_kv_heads != n_heads else None,
              "vocab_size": abs(vocab), "norm_eps": 1e-5, "rope_theta": 10000.0}
    fields.update(ffn_fields_for(dim, hidden))
    args = parse_params(fields, where=f"{path} (llama2.c header)")
    tied = vocab > 0
    expected = HEADER.size + 4 * _float_count(args, seq_len, tied)
    actual = os.path.getsize(path)
    if actual != expected:
        raise LlamaMPError(f"{path} has {actual} bytes but its header implies {expected}: the file is truncated, "
                           "or is not a version 0 llama2.c float32 model.")
    return args, seq_len, tied


def _arrays(args: ModelArgs, seq_len: int, tied: bool) -> List[Tuple[str, Tuple[int, ...]]]:
    """(Meta key or rope table name, shape) of every array in file order."""
    shapes = layout.full_shapes(args)
    order = [("tok_embeddings.weight", shapes["tok_embeddings.weight"])]
    for name in LAYER_ORDER:
        order += [(f"layers.{i}.{name}", shapes[f"layers.{i}.{name}"]) for i in range(args.n_layers)]
    half = args.head_dim // 2
    order += [("norm.weight", shapes["norm.weight"]), ("rope.cos", (seq_len, half)), ("rope.sin", (seq_len, half))]
    if not tied:
        order.append(("output.weight", shapes["output.weight"]))
    return order


def _float_count(args: ModelArgs, seq_len: int, tied: bool) -> int:
    return sum(int(np.prod(shape)) for _, shape in _arrays(args, seq_len, tied))


def looks_like_llama2c(path: str) -> bool:
    """A regular file (not a torch zip archive) whose name ends in .bin: llama2.c's convention."""
    if not os.path.isfile(path) or not path.endswith(".bin"):
        return False
    with open(path, "rb") as f:
        return f.read(2) != b"PK"  # pytorch_model.bin files are zip archives


class Llama2cSource:
    """A llama2.c file seen as whole Meta-layout tensors (see convert.py), memory-mapped."""

    def __init__(self, path: str):
        self.args, seq_len, tied = read_header(path)
        self.tokenizer = None
        # Copy-on-write mapping: torch wants a writable array, and nothing is ever written back.
        flat = torch.from_numpy(np.memmap(path, dtype="<f4", mode="c", offset=HEADER.size))
        self._tensors: Dict[str, torch.Tensor] = {}
        offset = 0
        for key, shape in _arrays(self.args, seq_len, tied):
            n = int(np.prod(shape))
            self._tensors[key] = flat[offset:offset + n].view(shape)
            offset += n
        if tied:
            self._tensors["output.weight"] = self._tensors["tok_embeddings.weight"]
        self._check_rope(path, seq_len)

    def _check_rope(self, path: str, seq_len: int) -> None:
        from ..runtime.model import rotary_tables

        rotation = rotary_tables(self.args.head_dim, seq_len, self.args.rope_theta, torch.device("cpu"))
        cos, sin = rotation.real, rotation.imag  # the file stores e^(i * angle) as its two parts
        if not (torch.allclose(self._tensors["rope.cos"], cos, atol=1e-3)
                and torch.allclose(self._tensors["rope.sin"], sin, atol=1e-3)):
            raise LlamaMPError(f"The rotary tables in {path} do not match rope_theta 10000, llama2.c's value; "
                               "this file was made with another theta and cannot be converted faithfully.")

    def keys(self) -> List[str]:
        return list(layout.full_shapes(self.args))

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {key: tuple(self._tensors[key].shape) for key in self.keys()}

    def dtypes(self) -> Dict[str, object]:
        """Always float32: the version 0 format has no other (the mapping above reads it as such)."""
        return {key: self._tensors[key].dtype for key in self.keys()}

    def tensor(self, meta_key: str) -> torch.Tensor:
        return self._tensors[meta_key]
