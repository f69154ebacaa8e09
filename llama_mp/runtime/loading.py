"""Making this rank's model: shapes on the meta device, tensors where the decoder wants them, weights
from the checkpoint (or random), then every rank agreeing that it succeeded.

Peak memory while loading is the model itself: nothing is allocated before the decoder has said where
each matrix lives, and each tensor is copied from the memory-mapped shards straight into its place
(converted to the model's dtype on the way), one at a time.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
from tqdm import tqdm

from ..checkpoints import layout
from ..checkpoints.params import ModelArgs
from ..checkpoints.quantize import quantize_into, rank_slices, require_scheme_fits
from ..checkpoints.synth import random_tensor
from ..distributed import Group, agree
from ..errors import LlamaMPError
from ..quant import experts as quantized_experts
from ..quant.scheme import Scheme
from .decode import Decoder
from .footprint import require_fit
from .model import Transformer
from .sampling import make_generator


def empty_model(args: ModelArgs, group: Group, dtype: torch.dtype, decoder: Decoder, max_batch_size: int,
                max_seq_len: int) -> Transformer:
    """This rank's model with every tensor allocated (weights uninitialised) as `decoder` lays them out,
    once the estimate of its memory says the device can hold it."""
    if args.max_context is not None and max_seq_len > args.max_context:
        raise LlamaMPError(f"max_seq_len {max_seq_len} is longer than the {args.max_context} tokens this model was "
                           f"made for (Llama 3: 8192; 3.1 and later: 131072). Use --max_seq_len {args.max_context} "
                           "or less.")
    require_fit(args, group.world_size, dtype, decoder.activation_dtype(dtype), max_batch_size, max_seq_len,
                group.device, packed=decoder.packs_quantized)
    with torch.device("meta"):  # shapes only: no random init, no memory
        model = Transformer(args, group)
    model.materialize(decoder, dtype, group.device, max_batch_size, max_seq_len)
    return model.eval()


def load_checkpoint(ckpt_dir: str, group: Group, dtype: torch.dtype, decoder: Decoder, max_batch_size: int,
                    max_seq_len: int, scheme: Optional[Scheme] = None) -> Transformer:
    """This rank's slice of the checkpoint in `ckpt_dir`, in a model not yet shared (see `ready_on_every_rank`).

    A quantized folder loads as it is stored (integers and scales copied into place); a float one is
    quantized by `scheme` on the way, one tensor slice at a time (checkpoints/quantize.py), so neither
    ever holds the full-precision model. The model's dtype is that of its activations, embedding and norms."""
    slices = rank_slices(ckpt_dir, group.rank, group.world_size, scheme)
    model = empty_model(slices.args, group, dtype, decoder, max_batch_size, max_seq_len)
    targets = model.checkpoint_tensors()  # views of the tensors the decoder allocated
    assert set(targets) == set(slices.keys()), "the model's tensors are the layout's"
    with torch.no_grad():
        for key in tqdm(slices.keys(), desc="loading", unit="tensor", file=sys.stderr,
                        disable=None if group.is_main else True):
            slices.copy_into(key, targets[key])
    return model


def random_model(args: ModelArgs, group: Group, dtype: torch.dtype, decoder: Decoder, max_batch_size: int,
                 max_seq_len: int, seed: int = 0, scheme: Optional[Scheme] = None) -> Transformer:
    """This rank's slice of a model with random weights (`synth.random_tensor`; each rank draws its own),
    for benchmarks of shapes without a download. Drawn a few rows at a time, straight
    into the model's tensors in its dtype: no whole tensor exists twice.

    With `scheme` (or `args.scheme`) the layer linears and the output layer are drawn as float rows and
    quantized as `--quantize` would (int8 row maxima of each rank's own slice: the weights are random anyway)."""
    if scheme is not None:
        require_scheme_fits(args, scheme, f"This shape (dim {args.dim}, FFN {args.ffn_hidden_dim})")
        args = args.with_scheme(scheme)
    layout.require_split(args, group.world_size, f"This shape (dim {args.dim}, vocab {args.vocab_size})", "process")
    model = empty_model(args, group, dtype, decoder, max_batch_size, max_seq_len)
    float_args = args.with_scheme(None)
    full, local = layout.full_shapes(float_args), layout.shard_shapes(float_args, group.world_size)
    g = make_generator(group.device, seed * 1000 + group.rank)  # drawn where they go: a GPU draws 8B in ms
    targets = model.checkpoint_tensors()
    with torch.no_grad():
        for key, target in targets.items():
            quantized = layout.scheme_of(key, args)
            if quantized is None:
                for rows in target.split(1024):  # float32 draws of a few MiB, converted as they are copied
                    rows.copy_(random_tensor(key, rows.shape, full[key][-1], g))
            elif not key.endswith(".scales"):  # its .scales are written with it
                scales, (rows, cols) = targets[layout.scales_key(key, args)], local[key]
                experts = layout.stacked_experts(key, args)
                if experts:  # a stack of experts [E * in, out]: one expert's [in, out] at a time
                    for e in range(experts):
                        quantized_experts.quantize_into(
                            random_tensor(key, (rows // experts, cols), full[key][-1], g), 1, quantized,
                            target.view(experts, -1, cols)[e], scales.view(experts, -1, cols)[e])
                    continue
                for start in range(0, rows, 1024):
                    stop = min(start + 1024, rows)
                    quantize_into(random_tensor(key, (stop - start, cols), full[key][-1], g), quantized,
                                  target[start:stop], scales[start:stop])
    return model


def ready_on_every_rank(group: Group, make_model: Callable[[], Transformer], max_batch_size: int,
                        max_seq_len: int, load_timeout_s: float) -> Transformer:
    """Make this rank's model with `make_model()`; then the ranks agree that all of them succeeded before
    the first collective (the embedding gather), so a failure on one rank is one message and a non-zero
    exit everywhere, never a rank left waiting."""
    error: Optional[BaseException] = None
    model = None
    try:
        model = make_model()
    except torch.OutOfMemoryError as e:
        error = LlamaMPError(
            f"Rank {group.rank} ran out of memory on {group.device} while loading the model for max_seq_len "
            f"{max_seq_len} and max_batch_size {max_batch_size} ({str(e).splitlines()[0]}). Run `llama-mp plan "
            "--ckpt_dir DIR --gpus N --gpu_mem_gb G` to see what fits: more ranks, a smaller --max_seq_len or "
            "--max_batch_size, or another --dtype.")
    except Exception as e:  # noqa: BLE001 - every rank must hear of any failure, or they hang
        error = e
    agree(group, error, timeout_s=load_timeout_s)
    model.share_embedding()  # the first collective, once every rank is ready
    return model
