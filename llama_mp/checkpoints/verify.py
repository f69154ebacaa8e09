"""`llama-mp verify`: check a Meta checkpoint directory and list *every* problem, not just the first.

Two independent checks, so one broken part does not hide another:

* integrity: the md5 of every file named in `checklist.chk` (streamed, with a progress bar), and
  whether every shard and params.json is covered by it;
* structure: params.json parses, the shard files have no gaps and open, and every key and shape in
  every shard is what params.json and the shard count imply (`layout.shard_shapes`), replicated
  tensors agree across shards, and each tensor has one dtype everywhere. In a quantized checkpoint
  (params.json's "quantization") every quantized tensor has its integer or scale dtype and every
  scale is finite and non-negative;
* values: no float tensor holds NaN or an infinity (the loader refuses those too). This reads every
  tensor once, as the md5 check reads every file.

The loader raises on the first problem it meets; this module collects them (`checkpoint.shape_problems`)
so a user with a 130 GB download learns everything that is wrong in one run.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from ..errors import LlamaMPError
from . import layout
from . import meta as checkpoint
from ..quant.scheme import scales_problem
from .params import ModelArgs, load_params

CHECKLIST = "checklist.chk"


def read_checklist(path: str) -> Tuple[Dict[str, str], List[str]]:
    """({file name: md5}, problems) from an md5sum-format file ("<md5>  <name>" or "<md5> *<name>").

    Only plain names of files in the checkpoint folder itself are taken: a line naming `../x`, an
    absolute path or a subfolder is reported, and that file is never opened (a checklist must not make
    verify read files outside the folder)."""
    entries, problems = {}, []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split(None, 1)
            digest = parts[0].lower() if parts else ""
            if len(parts) != 2 or len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
                problems.append(f"{CHECKLIST} line {number} is not an md5sum line: {line.strip()[:80]!r}")
                continue
            name = parts[1].strip().lstrip("*")
            if not is_plain_file_name(name):
                problems.append(f"{CHECKLIST} line {number} names {name[:80]!r}, which is not a file of this "
                                "folder (a path outside it or in a subfolder); it was not read")
                continue
            entries[name] = digest
    return entries, problems


def is_plain_file_name(name: str) -> bool:
    """A name of a file directly in the folder: no separator, not absolute, not "." or ".."."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name))


def checksum_problems(ckpt_dir: str, shard_names: List[str], progress: bool = True) -> List[str]:
    """Every file whose md5 differs from checklist.chk, every listed file that is missing, every shard
    (and params.json) the checklist does not cover. Empty when there is no checklist."""
    path = os.path.join(ckpt_dir, CHECKLIST)
    if not os.path.isfile(path):
        return []
    entries, problems = read_checklist(path)
    present = {name: os.path.join(ckpt_dir, name) for name in entries
               if os.path.isfile(os.path.join(ckpt_dir, name))}
    for name in entries:
        if name not in present:
            problems.append(f"{name} is listed in {CHECKLIST} but does not exist")
    for name in ["params.json"] + shard_names:
        if name not in entries and os.path.isfile(os.path.join(ckpt_dir, name)):
            problems.append(f"{name} is not listed in {CHECKLIST}, so its content cannot be checked")
    total = sum(os.path.getsize(p) for p in present.values())
    with tqdm(total=total, desc="md5", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              disable=not progress) as bar:
        for name, file_path in present.items():
            actual = checkpoint.md5_file(file_path, progress=bar.update)
            if actual != entries[name]:
                problems.append(f"{name} has md5 {actual} but {CHECKLIST} says {entries[name]}: the file is "
                                "corrupt or incomplete")
    return problems


def _open_shards(found: Dict[int, str], problems: List[str]) -> Dict[int, checkpoint.StateDict]:
    opened = {}
    for index, path in sorted(found.items()):
        try:
            opened[index] = checkpoint.load_shard(path)
        except LlamaMPError as e:
            problems.append(str(e).split(". ")[0])
    return opened


def _params(ckpt_dir: str, problems: List[str]) -> Optional[ModelArgs]:
    try:
        return load_params(ckpt_dir)
    except LlamaMPError as e:
        problems.append(str(e))
        return None


def structure_problems(ckpt_dir: str) -> List[str]:
    """Everything wrong with params.json, the shard files and their tensors (nothing is read but headers, and
    the scales of a quantized checkpoint)."""
    problems: List[str] = []
    args = _params(ckpt_dir, problems)
    found = checkpoint.find_shards(ckpt_dir)
    if not found:
        return problems + ["there are no consolidated.NN.pth shard files"]
    shards = _open_shards(found, problems)
    num_shards = max(found) + 1  # names show a gap; a missing *last* shard shows only in the tensor shapes
    if not shards:
        return problems + _missing(found, num_shards)
    first_index = min(shards)
    first = shards[first_index]
    expected = None
    if args is not None:
        num_shards = max(num_shards, _implied_shard_count(args, first))
        try:
            args = checkpoint.resolve_vocab(args, first, found[first_index], num_shards)
        except LlamaMPError as e:
            problems.append(str(e))
            args = None
    problems.extend(_missing(found, num_shards))
    if args is not None:
        try:
            layout.require_split(args, num_shards, "params.json's model", "shard")
            expected = layout.shard_shapes(args, num_shards)
        except LlamaMPError as e:
            problems.append(f"{num_shards} shards: {e} The files do not match params.json.")
    if expected is None:  # without trustworthy params, at least the shards must agree with each other
        expected = checkpoint.tied_shapes(first)
    for index, sd in sorted(shards.items()):
        for problem in (checkpoint.dtype_problems(checkpoint.tensor_dtypes(sd), args)
                        + _tie_problems(sd, args, num_shards, expected)
                        + checkpoint.shape_problems(_shapes(sd, args, num_shards, expected), expected)
                        + _scale_problems(sd, args) + _value_problems(sd, args)):
            problems.append(f"{checkpoint.shard_name(index)}: {problem}")
    problems.extend(_agreement_problems(shards, args, num_shards))
    return problems


def _scale_problems(sd: checkpoint.StateDict, args: Optional[ModelArgs]) -> List[str]:
    """Scales of a quantized checkpoint that are NaN, infinite or negative (the only tensor values read:
    scales are a small fraction of the file)."""
    problems = []
    for key, t in sd.items():
        if key.endswith(".scales") and layout.quantized_dtype(key, args) == t.dtype:
            problem = scales_problem(t)
            if problem:
                problems.append(f"{key} {problem}")
    return problems


def _value_problems(sd: checkpoint.StateDict, args: Optional[ModelArgs]) -> List[str]:
    """Float tensors (weights; scales have `_scale_problems`) with NaN or infinite values."""
    problems = []
    for key, t in sd.items():
        if key.endswith(".scales") and args is not None and layout.quantized_dtype(key, args) is not None:
            continue
        problem = checkpoint.nonfinite_problem(t) if checkpoint.is_weight_dtype(t.dtype) else None
        if problem:
            problems.append(f"{key} {problem}: the file is damaged")
    return problems


def _tie_problems(sd: checkpoint.StateDict, args: Optional[ModelArgs], num_shards: int,
                  expected: Dict[str, Tuple[int, ...]]) -> List[str]:
    """A missing output.weight that the embedding cannot stand in for (see `checkpoint.ties_output`)."""
    if checkpoint.ties_output(sd) and args is not None and not checkpoint.can_tie_output(args, num_shards):
        return [checkpoint.tied_output_problem(num_shards)]
    return []


def _shapes(sd: checkpoint.StateDict, args: Optional[ModelArgs], num_shards: int,
            expected: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """The shard's shapes for the shape check: a tied output layer counts as its embedding slice; one
    that cannot be tied is left out of the shape check, `_tie_problems` having said why."""
    shapes = checkpoint.tied_shapes(sd)
    if _tie_problems(sd, args, num_shards, expected):
        shapes[checkpoint.OUTPUT_KEY] = expected[checkpoint.OUTPUT_KEY]
    return shapes


def _implied_shard_count(args: ModelArgs, shard: checkpoint.StateDict) -> int:
    """How many shards the first layer's wq slice says the model was cut into (1 if it cannot tell)."""
    wq = shard.get("layers.0.attention.wq.weight")
    if wq is None or wq.dim() != 2 or wq.shape[0] == 0 or args.dim % wq.shape[0]:
        return 1
    return args.dim // wq.shape[0]


def _missing(found: Dict[int, str], num_shards: int) -> List[str]:
    return [f"{checkpoint.shard_name(i)} is missing ({len(found)} of {num_shards} shards present)"
            for i in checkpoint.missing_shards(found, num_shards)]


def _agreement_problems(shards: Dict[int, checkpoint.StateDict], args: Optional[ModelArgs],
                        num_shards: int) -> List[str]:
    """Replicated tensors (norms) must be equal in every shard, and each key must have one dtype."""
    problems = []
    first_index = min(shards)
    first = shards[first_index]
    for index, sd in sorted(shards.items()):
        if index == first_index:
            continue
        for key, t in sd.items():
            ref = first.get(key)
            if ref is None:
                continue
            if not (checkpoint.is_weight_dtype(t.dtype) and checkpoint.is_weight_dtype(ref.dtype)):
                continue  # already reported as not a weight
            if t.dtype != ref.dtype:
                problems.append(f"{checkpoint.shard_name(index)}: {key} is {t.dtype} but "
                                f"{checkpoint.shard_name(first_index)} has {ref.dtype}")
            elif _replicated(key, args) and t.shape == ref.shape and not torch.equal(t, ref):
                problems.append(f"{checkpoint.shard_name(index)}: replicated tensor {key} differs from "
                                f"{checkpoint.shard_name(first_index)}")
        problems.extend(_replica_problems(shards, sd, index, args, num_shards))
    return problems


def _replica_problems(shards: Dict[int, checkpoint.StateDict], sd: checkpoint.StateDict, index: int,
                      args: Optional[ModelArgs], num_shards: int) -> List[str]:
    """Shards beyond n_kv_heads hold their kv head's wk and wv again (layout.pieces): the copies must match."""
    if args is None or num_shards <= args.kv_heads:
        return []
    problems = []
    for key, t in sd.items():
        source = layout.first_replica(key, args, num_shards, index)
        ref = shards.get(source, {}).get(key)
        if source != index and ref is not None and ref.shape == t.shape and ref.dtype == t.dtype \
                and not torch.equal(t, ref):
            problems.append(f"{checkpoint.shard_name(index)}: {key} should repeat the kv head of "
                            f"{checkpoint.shard_name(source)} (more shards than n_kv_heads) but differs from it")
    return problems


def _replicated(key: str, args: Optional[ModelArgs]) -> bool:
    if key in layout.IGNORED_KEYS:
        return True
    try:
        return layout.split_dim(key, args) is None
    except KeyError:  # an unexpected key, already reported by the shape check
        return False


def verify_checkpoint(ckpt_dir: str, progress: bool = True) -> List[str]:
    """All problems found in a Meta checkpoint directory (empty list: it is sound)."""
    if not os.path.isdir(ckpt_dir):
        return [f"{ckpt_dir} is not a directory"]
    shard_names = [os.path.basename(p) for p in checkpoint.find_shards(ckpt_dir).values()]
    return checksum_problems(ckpt_dir, sorted(shard_names), progress) + structure_problems(ckpt_dir)


def has_checklist(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, CHECKLIST))
