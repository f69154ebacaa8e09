"""The few collectives a decode step issues, each done with the cheapest primitive that is exact.

Per step and layer the math needs two sums of partial results (after `wo` and after `w2`); then the
next token must be known everywhere. On NCCL an all-reduce is the right tool for the sums. On gloo a
small all-reduce costs about three times an all-gather of the same tensor (measured on 2 ranks: 1.6 ms
vs 0.56 ms for 288 floats), so small sums gather every rank's part and add them locally, in rank order:
every rank does the identical additions and so holds bit-identical results, which the ranks need, as
they go on to compute the same next step independently. Small gathers between ranks of one host go
through shared memory when it is there (shm.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .shm import SharedMemoryExchange

# Below this many elements an all-gather + local sum beats gloo's all-reduce; above it, the
# all-reduce's lower traffic wins (prefill of long prompts, big batches).
GATHER_SUM_MAX_NUMEL = 1 << 16
# The same call under its new name (torch 2.13 deprecates the old one, which older releases only have).
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Collectives:
    """The collectives of one group of ranks: its size and backend, fixed at setup, and the shared-memory
    exchange if it has one. A world of one needs no communication: every method returns its input."""

    def __init__(self, rank: int, world_size: int, backend: str,
                 exchange: Optional[SharedMemoryExchange] = None, group: Optional[dist.ProcessGroup] = None):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.gloo = backend == "gloo"
        self.exchange = exchange

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange.close()
            self.exchange = None

    def _shared(self, x: torch.Tensor) -> Optional[SharedMemoryExchange]:
        """The shared-memory exchange, if this group has one and `x` fits it; else None (gloo/NCCL)."""
        return self.exchange if self.exchange is not None and self.exchange.usable(x) else None

    def _stacked(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x`, stacked: [n, *x.shape]. Read it before the next collective: it may be a view
        of the shared-memory exchange."""
        x = x.contiguous()
        exchange = self._shared(x)
        if exchange is not None:
            return exchange.gather(x)
        return self.gather_into(torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device), x)

    def gather_into(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` into the preallocated `out` of shape [world, *x.shape]."""
        _all_gather_tensor(out.view(-1, *x.shape[1:]), x.contiguous(), group=self.group)  # rank-major
        return out

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over all ranks, on every rank (the row-parallel reduction)."""
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():  # inside a compiled step (runtime/compiled.py): graph nodes
            return self._traced_sum(x)
        if self.gloo and x.numel() <= GATHER_SUM_MAX_NUMEL:
            return self._stacked(x).sum(dim=0)
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x

    def _traced_sum(self, x: torch.Tensor) -> torch.Tensor:
        """`all_sum` as functional collectives, which torch.compile traces into its graph (NCCL then runs
        inside a CUDA graph): the same primitives as eager (on gloo a gather of every rank's part and a
        local sum over them for small tensors, an all-reduce otherwise), through gloo or NCCL itself
        rather than the shared-memory exchange. Every rank runs the same compiled sum over the same
        parts, so the ranks still hold bit-identical results."""
        group = self.group if self.group is not None else dist.group.WORLD
        if self.gloo and x.numel() <= GATHER_SUM_MAX_NUMEL:
            parts = funcol.all_gather_tensor(x.contiguous(), 0, group)
            return parts.view(self.world_size, *x.shape).sum(dim=0)
        return funcol.all_reduce(x, "sum", group)

    def gather_last_dim_to_main(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Rank 0: every rank's `x` concatenated along the last dimension. Other ranks: None."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        exchange = self._shared(x)
        if exchange is not None:  # everyone gets all parts; only rank 0 keeps them
            parts = exchange.gather(x)
            return torch.cat(parts.unbind(0), dim=-1) if self.rank == 0 else None
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast_from_main_(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` copied into `x` on every rank (the sampled tokens)."""
        if self.world_size == 1:
            return x
        exchange = self._shared(x)
        if exchange is not None:
            return x.copy_(exchange.gather(x)[0])
        dist.broadcast(x, src=0, group=self.group)
        return x

    def global_argmax(self, local_logits: torch.Tensor, vocab_offset: int) -> torch.Tensor:
        """argmax over a vocabulary split across ranks, on every rank, without moving the logits.

        Each rank sends its best (value, id) per row; ties go to the lowest id, as `torch.argmax` does on
        the whole vector, so greedy decoding matches one rank exactly.
        """
        best, index = local_logits.max(dim=-1)
        if self.world_size == 1:
            return index
        mine = torch.stack((best.double(), (index + vocab_offset).double()), dim=-1)  # ids < 2**53: exact
        parts = self._stacked(mine)
        values, ids = parts[..., 0], parts[..., 1]
        winner = values.argmax(dim=0, keepdim=True)  # first maximum = lowest rank = lowest id
        return ids.gather(0, winner)[0].long()
