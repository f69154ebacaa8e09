"""Quantizing a float checkpoint: while loading it (`--quantize`), or into a new folder (`llama-mp quantize`).

Both go through `QuantizingSlices`, which reads a rank's float slice of each linear layer from the
memory-mapped shards (as `RankSlices` does) and quantizes it a few rows at a time, so no full-precision
tensor is ever assembled beyond one rank's slice of one matrix. The tool writes output shard i of M with
exactly what rank i of M would compute while loading; quantization is independent of how the inputs are
split (int8 scales come from whole rows; int4 groups never straddle a split, layout.valid_world_sizes),
so loading the written folder on any valid rank count gives the same integers and scales, bit for bit,
as quantizing at load time on that count.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Union

import torch

from ..errors import LlamaMPError
from ..quant import experts as quantized_experts
from ..quant.scheme import Scheme, parse_scheme, quantize
from . import layout
from . import meta as checkpoint
from .meta import RankSlices
from .params import ModelArgs, load_params, save_params
from .reshard import copy_tokenizer, open_meta, write_shards
from .staging import staged_output_dir

# Rows are quantized this many float32 values at a time: the candidates of int4's scale search keep a
# few temporaries of this size, so a chunk stays a few tens of MiB whatever the matrix.
CHUNK_VALUES = 1 << 21


def quantize_into(weight: torch.Tensor, scheme: Scheme, q_out: torch.Tensor, scales_out: torch.Tensor,
                  row_max: Optional[torch.Tensor] = None) -> None:
    """Quantize float rows `weight` [out, in] (any float dtype, e.g. an mmap view) into `q_out` and
    `scales_out` (any device), a few rows at a time; `row_max` as for `quant.scheme.quantize`.

    The rounding runs on `q_out`'s device: loading onto a GPU quantizes there, one chunk in flight."""
    rows = max(1, CHUNK_VALUES // max(1, weight.shape[1]))
    device = q_out.device
    for start in range(0, weight.shape[0], rows):
        stop = min(start + rows, weight.shape[0])
        # moved in its stored dtype (half the bytes of float32 for bf16), widened where it is rounded
        chunk = weight[start:stop].to(device).to(torch.float32, memory_format=torch.contiguous_format)
        q, scales = quantize(chunk, scheme, None if row_max is None else row_max[start:stop].to(device))
        q_out[start:stop].copy_(q)
        scales_out[start:stop].copy_(scales)


def quantize_weight_into(key: str, args: ModelArgs, weight: torch.Tensor, q_out: torch.Tensor,
                         scales_out: torch.Tensor, row_max: Optional[torch.Tensor] = None) -> None:
    """Quantize float weight `key` (a rank's share of it) into its stored integers and scales as `args.scheme`
    lays them out: a matrix by rows (`quantize_into`), a stack of experts expert by expert (quant/experts.py)."""
    scheme, experts = layout.scheme_of(key, args), layout.stacked_experts(key, args)
    if experts:
        quantized_experts.quantize_into(weight, experts, scheme, q_out, scales_out, row_max, CHUNK_VALUES)
    else:
        quantize_into(weight, scheme, q_out, scales_out, row_max)


def whole_row_max(key: str, shards: List[checkpoint.StateDict], experts: Optional[int] = None) -> torch.Tensor:
    """max |w| of each whole row of row-parallel matrix `key`, from every shard's piece of its inputs (a stack
    of `experts` [in, out] matrices split along their inputs: of each expert's output, [experts, out])."""
    result: Optional[torch.Tensor] = None
    for sd in shards:
        piece = sd[key]
        if experts:
            m = quantized_experts.input_max(piece, experts)
        else:
            rows = max(1, CHUNK_VALUES // max(1, piece.shape[1]))
            m = torch.cat([piece[s:s + rows].float().abs().amax(dim=1) for s in range(0, piece.shape[0], rows)])
        result = m if result is None else torch.maximum(result, m)
    return result


def refuse_quantized(args: ModelArgs, ckpt_dir: str, flag: str = "--quantize") -> None:
    """A checkpoint is quantized once: `flag` on an already-quantized folder is an error."""
    if args.scheme is not None:
        raise LlamaMPError(f"{ckpt_dir} is already quantized ({args.scheme.describe()}, says its params.json); "
                           f"leave {flag} out to load it as it is. Quantizing again would only lose accuracy; "
                           "to change the scheme, quantize the original float checkpoint.")


def require_scheme_fits(args: ModelArgs, scheme: Scheme, where: str) -> None:
    problem = layout.scheme_problem(args, scheme)
    if problem:
        raise LlamaMPError(f"{where} cannot be quantized to {scheme.describe()}: {problem}.")


class QuantizingSlices:
    """This rank's share of every tensor of a float checkpoint as `scheme` stores it: the interface of
    `meta.RankSlices` (`args`, `keys`, `tensor`, `copy_into`) over the quantized layout (`args.scheme`).

    A quantized weight key yields its integers and keeps its scales for the `.scales` key that follows
    it (layout order); float tensors (embedding, norms) pass through. Row-parallel int8 matrices take
    their scales from whole rows: their row maxima are read from every shard (memory-mapped; no
    collective), so every rank gets the same scales."""

    def __init__(self, ckpt_dir: str, args: ModelArgs, rank: int, world_size: int, scheme: Scheme):
        refuse_quantized(args, ckpt_dir)
        self.source = RankSlices(ckpt_dir, args, rank, world_size)
        require_scheme_fits(self.source.args, scheme, f"This checkpoint ({ckpt_dir})")
        self.args = self.source.args.with_scheme(scheme)
        layout.require_split(self.args, world_size, f"This checkpoint ({ckpt_dir}) quantized to {scheme.describe()}",
                             "process", " Run with torchrun --nproc_per_node one of those.")
        self.ckpt_dir, self.rank, self.world_size = ckpt_dir, rank, world_size
        self._stored = layout.shard_shapes(self.args, world_size)  # this rank's integers and scales
        self._all_shards: Optional[List[checkpoint.StateDict]] = None
        self._scales: Dict[str, torch.Tensor] = {}

    def keys(self) -> List[str]:
        return list(layout.full_shapes(self.args))

    def _row_max(self, key: str, scheme: Scheme) -> Optional[torch.Tensor]:
        """Whole-row maxima for a row-parallel int8 matrix (split along its inputs) split over several shards
        or ranks, else None."""
        if scheme.mode != "int8" or layout.split_dim(key, self.args) != layout.input_dim(key, self.args):
            return None
        if self._all_shards is None:
            self._all_shards = [checkpoint.load_shard(p) for p in checkpoint.shard_paths(self.ckpt_dir)]
        if len(self._all_shards) == 1 and self.world_size == 1:
            return None  # the rows are whole already
        return whole_row_max(key, self._all_shards, layout.stacked_experts(key, self.args))

    def _quantize_weight(self, key: str, dest: Optional[torch.Tensor]) -> torch.Tensor:
        scheme, scales_key = layout.scheme_of(key, self.args), layout.scales_key(key, self.args)
        weight = self.source.tensor(key)
        self.source.require_finite(key, weight)  # NaN would quantize to integers that look sound
        if dest is None:
            dest = torch.empty(self._stored[key], dtype=scheme.weight_dtype)
        scales = torch.empty(self._stored[scales_key], dtype=scheme.scale_dtype)
        quantize_weight_into(key, self.args, weight, dest, scales, self._row_max(key, scheme))
        self._scales[scales_key] = scales
        return dest

    def tensor(self, key: str) -> torch.Tensor:
        """This rank's share of `key` (quantized if it is a quantized weight or scales), a new tensor or a view."""
        if layout.scheme_of(key, self.args) is None:
            share = self.source.tensor(key)
            self.source.require_finite(key, share)
            return share
        if key.endswith(".scales"):
            if key not in self._scales:
                self._quantize_weight(layout.weight_key(key, self.args), None)
            return self._scales.pop(key)
        return self._quantize_weight(key, None)

    def copy_into(self, key: str, dest: torch.Tensor) -> None:
        """Write this rank's share of `key` into `dest`; a quantized weight is quantized straight into it."""
        if layout.scheme_of(key, self.args) is not None and key.endswith(".weight"):
            self._quantize_weight(key, dest)
        elif layout.scheme_of(key, self.args) is not None:
            dest.copy_(self.tensor(key))
        else:
            self.source.copy_into(key, dest)


def rank_slices(ckpt_dir: str, rank: int, world_size: int,
                scheme: Optional[Scheme] = None) -> Union[RankSlices, QuantizingSlices]:
    """What a loading rank reads: the checkpoint as it is (float, or quantized by `llama-mp quantize`),
    or a float checkpoint quantized on the way by `scheme` (`--quantize`)."""
    args = load_params(ckpt_dir)
    if scheme is None:
        return RankSlices(ckpt_dir, args, rank, world_size)
    return QuantizingSlices(ckpt_dir, args, rank, world_size, scheme)


def output_bytes(args: ModelArgs, num_shards: int, float_size: int) -> int:
    """Bytes of the tensors of a checkpoint of `args` in `num_shards` shards, float tensors of `float_size`."""
    return num_shards * sum(math.prod(shape) * layout.element_size(key, args, float_size)
                            for key, shape in layout.shard_shapes(args, num_shards).items())


def quantize_checkpoint(src: str, dst: str, mode: str, group_size: Optional[int] = None, mp: Optional[int] = None,
                        overwrite: bool = False, progress: bool = True) -> ModelArgs:
    """Write the float Meta checkpoint `src` to `dst` quantized by (`mode`, `group_size`) with `mp` shards
    (default: as many as `src`); return the quantized params (vocab resolved).

    params.json gets the scheme as `"quantization": {...}`; the embedding and norms keep their dtype;
    tokenizer.model is copied and a fresh checklist.chk written. All or nothing (staging.py)."""
    scheme = parse_scheme(mode, group_size, where="--mode")
    refuse_quantized(load_params(src), src, flag="quantize")
    args, paths, _ = open_meta(src)
    require_scheme_fits(args, scheme, src)
    subject = (f"--mp {mp!r}" if mp is not None else f"{len(paths)} shards (the source's; --mp M picks another count)")
    mp = len(paths) if mp is None else mp
    quantized = args.with_scheme(scheme)
    layout.require_split(quantized, mp, f"{subject}: this model quantized to {scheme.describe()}", "shard")
    keys = list(layout.full_shapes(quantized))
    params = load_params(src)  # written as the source has it (vocab_size -1 stays -1)
    opened: Dict[str, object] = {"index": None, "slices": None}

    def piece(key: str, index: int) -> torch.Tensor:
        if opened["index"] != index:  # output shard `index` of `mp` is what rank `index` of `mp` loads
            opened["slices"] = QuantizingSlices(src, params, index, mp, scheme)
            opened["index"] = index
        return opened["slices"].tensor(key)

    float_size = checkpoint.load_shard(paths[0])[checkpoint.EMBEDDING_KEY].dtype.itemsize
    with staged_output_dir(dst, overwrite, src=src, needs_bytes=output_bytes(quantized, mp, float_size)) as out:
        save_params(params.with_scheme(scheme), out)
        copy_tokenizer(out, None, os.path.join(src, "tokenizer.model"))
        write_shards(out, keys, mp, piece, None, progress=progress)  # read through require_finite
        opened["slices"] = None  # unmap the inputs before hashing the outputs
        checkpoint.write_checklist(out, progress)
    return quantized
