"""The few collectives a decode step issues, each done with the cheapest primitive that is exact.

Per step and layer the math needs two sums of partial results (after `wo` and after `w2`); then the
next token must be known everywhere. On NCCL an all-reduce is the right tool for the sums. On gloo a
small all-reduce costs about three times an all-gather of the same tensor (measured on 2 ranks: 1.6 ms
vs 0.56 ms for 288 floats), so small sums gather every rank's part and add them locally, in rank order:
every rank does the identical additions and so holds bit-identical results, which the ranks need, as
they go on to compute the same next step independently.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# Below this many elements an all-gather + local sum beats gloo's all-reduce; above it, the
# all-reduce's lower traffic wins (prefill of long prompts, big batches).
GATHER_SUM_MAX_NUMEL = 1 << 16


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _stacked(x: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's `x`, stacked: [n, *x.shape] (all_gather_single wants rank-major rows)."""
    x = x.contiguous()
    out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_single(out, x)
    return out.view(n, *x.shape)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over all ranks, on every rank (the row-parallel reduction)."""
    n = world()
    if n == 1:
        return x
    if x.numel() <= GATHER_SUM_MAX_NUMEL and dist.get_backend() == "gloo":
        return _stacked(x, n).sum(dim=0)
    x = x.contiguous()
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along its last dimension, on every rank."""
    n = world()
    if n == 1:
        return x
    return torch.cat(_stacked(x, n).unbind(0), dim=-1)


def gather_last_dim_to_main(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Rank 0: every rank's `x` concatenated along the last dimension. Other ranks: None."""
    n = world()
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)] if dist.get_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if parts is not None else None


def global_argmax(local_logits: torch.Tensor, vocab_offset: int) -> torch.Tensor:
    """argmax over a vocabulary split across ranks, on every rank, without moving the logits.

    Each rank sends its best (value, id) per row; ties go to the lowest id, as `torch.argmax` does on
    the whole vector, so greedy decoding matches one rank exactly.
    """
    best, index = local_logits.max(dim=-1)
    n = world()
    if n == 1:
        return index
    mine = torch.stack((best.double(), (index + vocab_offset).double()), dim=-1)  # ids < 2**53: exact
    parts = _stacked(mine, n)
    values, ids = parts[..., 0], parts[..., 1]
    winner = values.argmax(dim=0, keepdim=True)  # first maximum = lowest rank = lowest id
    return ids.gather(0, winner)[0].long()
