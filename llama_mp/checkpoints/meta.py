"""Reading and writing Meta's consolidated checkpoint directories.

A directory holds `params.json`, `consolidated.00.pth` ... `consolidated.{K-1}.pth` and usually
`checklist.chk` (md5sum lines). Shards are opened with `mmap=True`, so a rank that needs only a slice
of a tensor reads only those pages: peak host memory per rank stays near its own share of the model,
whatever the number of shards K and processes N.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import torch

from tqdm import tqdm

from ..dtypes import DTYPES, largest_finite
from ..errors import LlamaMPError
from ..quant.scheme import scales_problem
from .. import families
from . import layout
from .params import ModelArgs

StateDict = Dict[str, torch.Tensor]
_SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")


def find_shards(ckpt_dir: str) -> Dict[int, str]:
    """Every `consolidated.NN.pth` in a directory, by index, gaps included (callers decide what a gap means)."""
    if not os.path.isdir(ckpt_dir):
        raise LlamaMPError(f"Checkpoint directory {ckpt_dir!r} does not exist. Pass --ckpt_dir the folder "
                           "that holds params.json and consolidated.00.pth (e.g. llama-2-7b/).")
    found = {}
    for path in glob.glob(os.path.join(glob.escape(ckpt_dir), "consolidated.*.pth")):
        m = _SHARD_NAME.match(os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    return found


def missing_shards(found: Dict[int, str], num_shards: Optional[int] = None) -> List[int]:
    """Indexes below `num_shards` (default: the highest one found + 1, all the names tell) with no file."""
    if num_shards is None:
        num_shards = max(found) + 1 if found else 0
    return [i for i in range(num_shards) if i not in found]


def shard_paths(ckpt_dir: str) -> List[str]:
    """The shard files of a checkpoint directory in order, checked for gaps."""
    found = find_shards(ckpt_dir)
    if not found:
        raise LlamaMPError(f"No consolidated.*.pth shard files in {ckpt_dir!r}. Check that the download "
                           "finished and that --ckpt_dir points at the model folder, not its parent.")
    missing = missing_shards(found)
    if missing:
        names = ", ".join(shard_name(i) for i in missing)
        raise LlamaMPError(f"{ckpt_dir!r} has {len(found)} shard files but is missing {names}. "
                           "Download the missing shard(s) again; `llama-mp verify` checks the whole folder.")
    return [found[i] for i in range(len(found))]


def nonfinite_problem(t: torch.Tensor) -> Optional[str]:
    """None when every value of `t` is finite (or `t` holds integers); else how many are NaN or infinite.

    One sum decides, which any NaN or infinity makes non-finite: a single read of the tensor, without a
    mask as large as it. The sum is taken in the tensor's own dtype (PyTorch accumulates in float32 either
    way; asking for a float32 result takes a path ten times slower on a CPU). Only a non-finite sum (a
    damaged tensor, or finite values whose sum overflows, as float16's can) has the values counted."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    if bool(torch.isfinite(t.sum())):
        return None
    bad = int((~torch.isfinite(t)).sum())
    return f"holds {bad} NaN or infinite value(s) of {t.numel()}" if bad else None


def require_finite_copy(key: str, where: str, piece: torch.Tensor, written: torch.Tensor) -> None:
    """Refuse to write `piece` of `key` (read from `where`) as `written` (its converted copy) when either
    holds a NaN or infinity: the converting tools would otherwise pass a damaged tensor on silently, and a
    weight like that makes every answer garbage."""
    problem = nonfinite_problem(piece)
    if problem is not None:
        raise LlamaMPError(f"{key} of {where} is damaged: it {problem}, so every answer of a copy would be "
                           "garbage, and nothing was written. Download the source again or rebuild it "
                           "(`llama-mp verify` lists every such tensor).")
    problem = nonfinite_problem(written) if written.dtype != piece.dtype else None
    if problem is not None:
        raise LlamaMPError(f"{key} of {where} does not fit in {str(written.dtype).replace('torch.', '')}: "
                           f"converted, it {problem} ({largest_finite(written.dtype)}), and nothing was written. "
                           "Convert to bfloat16 or float32 (--dtype).")


def load_shard(path: str) -> StateDict:
    """Open one shard lazily (mmap, tensors only): no pickled code runs, no page is read yet.

    Llama 4's shards also hold `<module>._extra_state` entries, io.BytesIO objects of the training code
    (empty of anything inference uses): the loader's allowlist admits that one class and nothing else,
    and they are dropped here, so nothing is lost and every other non-tensor is still refused."""
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt zip archives
        raise LlamaMPError(f"Cannot read shard {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                           "The file is truncated or corrupt; download it again and run "
                           "`llama-mp verify` on the folder.") from None
    if isinstance(sd, dict):
        sd = {k: v for k, v in sd.items()
              if not (isinstance(v, io.BytesIO) and isinstance(k, str) and k.endswith("._extra_state"))}
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LlamaMPError(f"{path} does not hold a state dict of tensors, so it is not a Meta consolidated "
                           "shard. Convert other formats with `llama-mp convert`.")
    for family in families.FAMILIES:  # a family's other names for its tensors, read as the shipped ones
        if family.shipped_names is not None:
            sd = family.shipped_names(sd)
    return sd


def vocab_size_of(shard: StateDict, where: str) -> int:
    emb = shard.get("tok_embeddings.weight")
    if emb is None or emb.dim() != 2:
        raise LlamaMPError(f"{where} has no 2-D tok_embeddings.weight, so it is not a LLaMA shard.")
    return emb.shape[0]


def shape_problems(shapes: Dict[str, Tuple[int, ...]], expected: Dict[str, Tuple[int, ...]]) -> List[str]:
    """Every missing, unexpected or misshaped tensor, one readable item each (empty when all match)."""
    problems = []
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected and k not in layout.IGNORED_KEYS]
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    for k, shape in expected.items():
        if k in shapes and tuple(shapes[k]) != tuple(shape):
            problems.append(f"{k} has shape {list(shapes[k])} but params.json implies {list(shape)}")
    return problems


def tensor_shapes(sd: StateDict) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# A weight is a floating-point tensor of one of the dtypes every tool accepts by name (dtypes.DTYPES).
# Anything else (bool, complex, float64, integers outside a quantized checkpoint) would end in a
# traceback while loading, or be copied into float weights as nonsense. Safetensors headers name dtypes
# as strings. In a quantized checkpoint (params.json records the scheme) each quantized tensor must have
# exactly the dtype layout.quantized_dtype names, and only those may be integers.
WEIGHT_DTYPES = frozenset(DTYPES.values())
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def is_weight_dtype(dtype) -> bool:
    """Whether `dtype` (a torch.dtype, or a safetensors header string such as "BF16") can hold weights."""
    return _SAFETENSORS_DTYPES.get(dtype, dtype) in WEIGHT_DTYPES


def as_torch_dtype(dtype) -> torch.dtype:
    """The torch dtype of a weight dtype given either way (torch.dtype or safetensors string)."""
    return _SAFETENSORS_DTYPES.get(dtype, dtype)


def dtype_name(dtype) -> str:
    """`torch.int8` -> "int8"; a safetensors string stays as it is ("I8")."""
    return str(dtype).replace("torch.", "")


def dtype_problems(dtypes: Dict[str, object], args: Optional[ModelArgs] = None) -> List[str]:
    """One item per tensor (by label: a key, or "file: name") whose dtype cannot hold it: a float weight
    dtype, or for a quantized tensor of `args`'s scheme exactly its integer or scale dtype."""
    problems, known = [], _known_keys(args)
    for label, dtype in dtypes.items():
        required = layout.quantized_dtype(label, args) if label in known else None
        if required is not None and as_torch_dtype(dtype) != required:
            problems.append(f"{label} is {dtype_name(dtype)}, but {args.scheme.describe()} checkpoints store it as "
                            f"{dtype_name(required)}")
        elif required is None and not is_weight_dtype(dtype):
            problems.append(f"{label} is {dtype_name(dtype)}, not a floating-point weight")
    return problems


def _known_keys(args: Optional[ModelArgs]):
    """The keys whose dtype `args` decides (every key of a quantized model; none without args)."""
    return layout.full_shapes(args) if args is not None and args.scheme is not None and args.vocab_size > 0 else ()


def weight_dtype_advice() -> str:
    """What a message about a wrong tensor dtype tells the user to do."""
    return (f"Weights must be {', '.join(DTYPES)}; integer (quantised) tensors belong only in a folder written "
            "by `llama-mp quantize`, whose params.json records the scheme. Download the original weights "
            "again, or convert them from an unquantised copy.")


def tensor_dtypes(sd: StateDict) -> Dict[str, torch.dtype]:
    return {k: v.dtype for k, v in sd.items()}


# Llama 3.2 1B and 3B tie the output layer to the token embedding. Meta's own consolidated files still
# store output.weight (transformers' conversion script reads it for 3.2 too), but a file written by other
# tools may leave it out. A shard without output.weight is read as tied when its embedding slice *is* its
# output slice: always in the Llama 3 layout (both split by vocabulary rows), and in a single shard of the
# LLaMA / Llama 2 layout (whole tensors). Several LLaMA-layout shards split the embedding by columns, so no
# shard holds any output rows whole; such a checkpoint is refused (`tied_output_problem`).
OUTPUT_KEY, EMBEDDING_KEY = "output.weight", "tok_embeddings.weight"


def ties_output(sd: StateDict) -> bool:
    """Whether a shard leaves out output.weight and so uses its embedding slice as the output layer."""
    return OUTPUT_KEY not in sd and EMBEDDING_KEY in sd


def stored_key(key: str, sd: StateDict) -> str:
    """The key under which shard `sd` holds tensor `key` (the embedding for a tied output layer)."""
    return EMBEDDING_KEY if key == OUTPUT_KEY and ties_output(sd) else key


def can_tie_output(args: Optional[ModelArgs], num_shards: int) -> bool:
    """Whether each of `num_shards` shards' embedding slice equals its output.weight slice."""
    return num_shards == 1 or layout.split_dim(EMBEDDING_KEY, args) == layout.split_dim(OUTPUT_KEY, args)


def tied_output_problem(num_shards: int) -> str:
    return (f"output.weight is missing, and it cannot be taken from the embedding (a tied output layer): "
            f"this LLaMA / Llama 2 layout splits tok_embeddings.weight by columns over the {num_shards} "
            "shards, so no shard holds whole output rows. Convert the model from a copy that has "
            "output.weight, or from a single-shard copy")


def tied_shapes(sd: StateDict, tie_allowed: bool = True) -> Dict[str, Tuple[int, ...]]:
    """The shard's tensor shapes, with output.weight filled in from the embedding when the shard ties
    them (and `tie_allowed`), so the usual shape check applies to both."""
    shapes = tensor_shapes(sd)
    if tie_allowed and ties_output(sd):
        shapes[OUTPUT_KEY] = shapes[EMBEDDING_KEY]
    return shapes


def check_tensors(sd: StateDict, expected: Dict[str, Tuple[int, ...]], where: str,
                  args: Optional[ModelArgs] = None, num_shards: int = 1) -> None:
    """Strict dtype, key and shape check, naming every tensor of the wrong kind, then every missing,
    unexpected or misshaped one. A shard without output.weight passes when its embedding can stand in
    for it (`can_tie_output` for `args` and `num_shards`), and is refused with the reason otherwise."""
    wrong_kind = dtype_problems(tensor_dtypes(sd), args)
    if wrong_kind:
        quantized = args is not None and args.scheme is not None
        advice = weight_dtype_advice() if not quantized else (
            "The file is damaged or from another tool: quantize the original checkpoint again with `llama-mp quantize`.")
        raise LlamaMPError(f"{where} holds tensors " + ("of the wrong dtype" if quantized else "that are not weights")
                           + ": " + "; ".join(wrong_kind[:8])
                           + (f"; and {len(wrong_kind) - 8} more" if len(wrong_kind) > 8 else "")
                           + ". " + advice)
    if ties_output(sd) and not can_tie_output(args, num_shards):
        raise LlamaMPError(f"{where}: {tied_output_problem(num_shards)}.")
    problems = shape_problems(tied_shapes(sd), expected)
    own = layout.own_layout(args)
    if problems and own is not None:  # what the family can say more plainly goes first (Llama 4: experts)
        problems = own.shape_summary(tensor_shapes(sd), args) + problems
    if problems:
        raise LlamaMPError(f"{where} does not match params.json: " + "; ".join(problems[:8])
                           + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
                           + ". The params.json and the shards probably come from different models; "
                             "`llama-mp verify` lists everything.")


def _few(keys: List[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def resolve_vocab(args: ModelArgs, first_shard: StateDict, where: str, num_shards: int) -> ModelArgs:
    """Fill in vocab_size from the checkpoint when params.json says -1, and check it otherwise. A family
    that splits the embedding by vocabulary rows (Llama 3) holds 1/num_shards of them in each shard."""
    vocab = vocab_size_of(first_shard, where)
    if layout.split_dim("tok_embeddings.weight", args) == 0:
        vocab *= num_shards
    if args.vocab_size not in (-1, vocab):
        raise LlamaMPError(f"params.json says vocab_size {args.vocab_size} but the shards ({where}, ...) hold "
                           f"{vocab} token embeddings. Fix vocab_size in params.json (LLaMA and Llama 2 files "
                           "use -1; Llama 3 files 128256).")
    return args.with_vocab(vocab)


def overlapping_shards(rank: int, world_size: int, num_shards: int) -> List[int]:
    """Shards whose slice of a split dimension overlaps rank `rank` of `world_size`."""
    return [k for k in range(num_shards)
            if k * world_size < (rank + 1) * num_shards and rank * num_shards < (k + 1) * world_size]


def rank_pieces(pieces: Dict[int, torch.Tensor], dim: int, num_shards: int, rank: int,
                world_size: int) -> List[Tuple[int, torch.Tensor]]:
    """Rank `rank`'s share of a tensor split over `num_shards` shards, from the overlapping pieces: a list
    of (offset along `dim` in the rank's share, view of a piece), in order."""
    per_shard = next(iter(pieces.values())).shape[dim]
    total = per_shard * num_shards
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    parts = []
    for k in sorted(pieces):
        start, stop = max(lo, k * per_shard), min(hi, (k + 1) * per_shard)
        if stop > start:  # a caller may pass more shards than overlap; they contribute nothing
            parts.append((start - lo, pieces[k].narrow(dim, start - k * per_shard, stop - start)))
    if not parts:
        raise ValueError(f"no piece overlaps rank {rank} of {world_size} (shards given: {sorted(pieces)})")
    return parts


def joined(dim: Optional[int], parts: List[Tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The (offset, piece) list of `rank_pieces` as one tensor: the piece itself (a view) when there is
    one, else a concatenation in host memory."""
    return parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts], dim=dim)


def share_of(key: str, args: ModelArgs, shards: Dict[int, StateDict], num_shards: int, rank: int,
             world_size: int) -> Tuple[Optional[int], List[Tuple[int, torch.Tensor]]]:
    """(split dim or None, [(offset, piece)]) making up rank `rank` of `world_size`'s share of `key`, from
    the `overlapping_shards` of a `num_shards`-shard checkpoint. Replicated kv heads (`layout.pieces`)
    are read from one of their shards and handed to every rank that uses them."""
    dim = None if key in layout.IGNORED_KEYS else layout.split_dim(key, args)
    if dim is None:
        return None, [(0, next(iter(shards.values()))[key])]
    parts_in, _ = layout.pieces(key, args, num_shards)
    parts_out, part = layout.pieces(key, args, world_size, rank)
    replicas = num_shards // parts_in
    # A tied output layer is cut from the embedding exactly as output.weight would be (check_tensors
    # has made sure the two slices coincide).
    distinct = {k // replicas: sd[stored_key(key, sd)] for k, sd in shards.items()}
    segs = layout.segments(key, args)
    if segs is None:
        return dim, rank_pieces(distinct, dim, parts_in, part, parts_out)
    # Parts split on their own (Llama 4's fused wqkv, [w1; w3], experts): each part's pieces in turn.
    pieces, start = [], 0
    for size in segs:
        views = {k: t.narrow(dim, start // parts_in, size // parts_in) for k, t in distinct.items()}
        pieces += [(start // parts_out + offset, piece)
                   for offset, piece in rank_pieces(views, dim, parts_in, part, parts_out)]
        start += size
    return dim, pieces


class RankSlices:
    """This rank's share of every tensor of a checkpoint for a `world_size`-way split, whatever the
    checkpoint's shard count, read from the memory-mapped shards that overlap it.

    With as many processes as shards, rank r simply takes shard r. Otherwise each rank opens only the
    shards that overlap its slice and cuts or joins the pieces it needs (load-time resharding), one
    tensor at a time: `copy_into` writes the pieces straight into their place in the destination (on
    any device, in any dtype), so no whole rank slice is ever assembled in host memory."""

    def __init__(self, ckpt_dir: str, args: ModelArgs, rank: int, world_size: int):
        self.ckpt_dir = ckpt_dir
        paths = shard_paths(ckpt_dir)
        self.num_shards, self.rank, self.world_size = len(paths), rank, world_size
        needed = overlapping_shards(rank, world_size, self.num_shards)
        self.paths = paths
        self.shards = {k: load_shard(paths[k]) for k in needed}
        self.args = resolve_vocab(args, self.shards[needed[0]], paths[needed[0]], self.num_shards)
        layout.require_split(self.args, world_size, f"This checkpoint ({ckpt_dir}, {self.num_shards} shard(s))",
                             "process", " Run with torchrun --nproc_per_node one of those.")
        expected = layout.shard_shapes(self.args, self.num_shards)
        for k, sd in self.shards.items():
            check_tensors(sd, expected, paths[k], self.args, self.num_shards)

    def keys(self) -> List[str]:
        return list(layout.full_shapes(self.args))

    def pieces(self, key: str) -> Tuple[Optional[int], List[Tuple[int, torch.Tensor]]]:
        """(split dim or None, [(offset, piece)]) making up this rank's share of `key`."""
        return share_of(key, self.args, self.shards, self.num_shards, self.rank, self.world_size)

    def tensor(self, key: str) -> torch.Tensor:
        return joined(*self.pieces(key))

    def require_finite(self, key: str, share: torch.Tensor) -> None:
        """Refuse this rank's share of `key` (as loaded, or as read for quantizing) if any value is NaN or
        infinite: such a weight turns every logit into NaN, and greedy decoding would still print tokens.
        Checked once per tensor while loading, so decoding pays nothing for it."""
        problem = nonfinite_problem(share)
        if problem is None:
            return
        damaged = [self.paths[k] for k, sd in sorted(self.shards.items())
                   if nonfinite_problem(sd[stored_key(key, sd)]) is not None]
        if damaged:
            raise LlamaMPError(f"{key} in {', '.join(damaged)} is damaged: this rank's share of it {problem}, so "
                               "every answer would be garbage. Download that shard again or rebuild it from its "
                               "source (`llama-mp verify` lists every such tensor).")
        raise LlamaMPError(f"{key} of {self.ckpt_dir} does not fit in {str(share.dtype).replace('torch.', '')}: "
                           f"converted, this rank's share of it {problem} ({largest_finite(share.dtype)}). Load "
                           "it in bfloat16 or float32 (--dtype).")

    def copy_into(self, key: str, dest: torch.Tensor) -> None:
        """Write this rank's share of `key` into `dest` (of its shape; converted to its dtype and device),
        then check it is finite (`require_finite`). The scales of a quantized checkpoint are checked once
        in place (`scales_problem`)."""
        dim, parts = self.pieces(key)
        for offset, piece in parts:
            (dest if dim is None else dest.narrow(dim, offset, piece.shape[dim])).copy_(piece)
        if not key.endswith(".scales"):
            self.require_finite(key, dest)
        else:
            problem = scales_problem(dest)
            if problem:
                raise LlamaMPError(f"{self.ckpt_dir}: {key} {problem}, so the weights it scales are garbage. The "
                                   "file is damaged: quantize the original checkpoint again with `llama-mp "
                                   "quantize` (`llama-mp verify` lists every such tensor).")


def load_rank_state_dict(ckpt_dir: str, args: ModelArgs, rank: int, world_size: int) -> Tuple[ModelArgs, StateDict]:
    """This rank's tensors for a `world_size`-way split as a state dict (views where one shard covers a
    tensor): for tools and tests; the loader streams them with `RankSlices.copy_into` instead."""
    slices = RankSlices(ckpt_dir, args, rank, world_size)
    return slices.args, {key: slices.tensor(key) for key in slices.keys()}


# ----------------------------------------------------------------------------------------------
# Writing


def md5_file(path: str, chunk_bytes: int = 1 << 22, progress=None) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                return h.hexdigest()
            h.update(block)
            if progress is not None:
                progress(len(block))


def write_checklist(ckpt_dir: str, progress: bool = True) -> None:
    """Write `checklist.chk` in md5sum format for params.json and every shard, as Meta ships it, with a
    progress bar (hashing 100+ GB takes minutes)."""
    names = ["params.json"] + [os.path.basename(p) for p in shard_paths(ckpt_dir)]
    total = sum(os.path.getsize(os.path.join(ckpt_dir, n)) for n in names)
    with tqdm(total=total, desc="md5", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              disable=not progress) as bar:
        lines = [f"{md5_file(os.path.join(ckpt_dir, n), progress=bar.update)}  {n}\n" for n in names]
    with open(os.path.join(ckpt_dir, "checklist.chk"), "w") as f:
        f.writelines(lines)


def shard_name(index: int) -> str:
    return f"consolidated.{index:02d}.pth"
