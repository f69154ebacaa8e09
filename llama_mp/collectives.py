"""The few collectives a decode step issues, each done with the cheapest primitive that is exact.

Per step and layer the math needs two sums of partial results (after `wo` and after `w2`); then the
next token must be known everywhere. On NCCL an all-reduce is the right tool for the sums. On gloo a
small all-reduce costs about three times an all-gather of the same tensor (measured on 2 ranks: 1.6 ms
vs 0.56 ms for 288 floats), so small sums gather every rank's part and add them locally, in rank order:
every rank does the identical additions and so holds bit-identical results, which the ranks need, as
they go on to compute the same next step independently.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .errors import PeerLostError

# Below this many elements an all-gather + local sum beats gloo's all-reduce; above it, the
# all-reduce's lower traffic wins (prefill of long prompts, big batches).
GATHER_SUM_MAX_NUMEL = 1 << 16


class SharedMemoryExchange:
    """All-gather of small CPU tensors between the ranks of one host through shared memory.

    Layout of the shared file: one 64-byte line per rank holding its round counter, then two sets of
    per-rank data slots. In round r, a rank copies its tensor into its slot of set r % 2, then sets its
    counter to r; once every counter is >= r, all slots of that set hold round r's data. Two sets are
    enough: a rank can only write set r % 2 again in round r + 2, which needs every rank's counter at
    r + 1, and a rank raises it only after it has read round r.

    Correct on x86-64 only, whose stores become visible in program order (the data before the counter)
    and whose loads are not reordered with each other; elsewhere the ranks use gloo. Waiting spins
    briefly, then yields the core (ranks may outnumber cores), and gives up after `timeout_s`.
    """

    SLOT_BYTES = 1 << 18   # 256 KiB per rank and set: a decode step's vectors for batches up to ~32 x 2K
    LINE = 64              # one cache line per counter, so ranks do not write to each other's lines

    def __init__(self, rank: int, world_size: int, path: str, timeout_s: float):
        self.rank, self.n, self.timeout_s = rank, world_size, timeout_s
        size = world_size * self.LINE + 2 * world_size * self.SLOT_BYTES
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), size)
        raw = np.frombuffer(self.map, dtype=np.uint8)
        self.counters = raw[:world_size * self.LINE].view(np.int64)[::self.LINE // 8]
        self.slots = torch.from_numpy(raw[world_size * self.LINE:]).view(2, world_size, self.SLOT_BYTES)
        self.round = 0
        self._views: dict = {}  # (shape, dtype) -> per set: (this rank's slot, all slots) as tensors

    @staticmethod
    def usable(x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= SharedMemoryExchange.SLOT_BYTES

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` stacked in rank order, [n, *x.shape]: a view of the shared memory, valid until
        this rank's next `gather` (only then can another rank start writing that set again)."""
        self.round += 1
        mine, everyone = self._slot_views(x)[self.round % 2]
        mine.copy_(x)
        self.counters[self.rank] = self.round
        self._wait_for_round()
        return everyone

    def _slot_views(self, x: torch.Tensor):
        """Tensor views of the slots shaped like `x`, made once per shape: a decode step's few
        exchanges then cost one copy in, the wait, and whatever reads the result."""
        key = (x.shape, x.dtype)
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 64:  # prompts of many lengths: don't grow without bound
                self._views.clear()
            nbytes = x.numel() * x.element_size()
            views = self._views[key] = [(data[self.rank, :nbytes].view(x.dtype).view(x.shape),
                                         data[:, :nbytes].view(x.dtype).view(self.n, *x.shape))
                                        for data in self.slots]
        return views

    def _wait_for_round(self) -> None:
        counters, r = self.counters, self.round
        for _ in range(1000):  # the usual case: the others are a few microseconds away
            if (counters >= r).all():
                return
        deadline = time.monotonic() + self.timeout_s
        while not (counters >= r).all():
            if time.monotonic() > deadline:
                late = [i for i in range(self.n) if counters[i] < r]
                raise PeerLostError(
                    f"rank {self.rank} lost contact with the other ranks (Timed out waiting "
                    f"{int(self.timeout_s * 1000)}ms for rank(s) {late} in a shared-memory exchange). Another "
                    "rank crashed, was killed or stopped answering for --timeout_s seconds; its own message "
                    "or signal is in the output above / torchrun's report.")
            os.sched_yield()

    def close(self) -> None:
        self.slots = self.counters = None
        self._views.clear()
        self.map.close()


# Set once per process by `setup` (called from distributed.setup): no per-call queries of torch.distributed.
_world = 1
_gloo = False
_exchange: Optional[SharedMemoryExchange] = None


def world() -> int:
    return _world


def setup(rank: int, world_size: int, backend: str, timeout_s: float) -> None:
    """Collective when more than one rank: remember the group's shape, and set up the shared-memory
    exchange when every rank runs on this x86-64 host with a core of its own.

    Rank 0 creates the file in /dev/shm and removes its name as soon as every rank has mapped it, so
    nothing is left behind even if the job is killed. With more ranks than cores, waiting ranks would
    spin on cores the others need, so gloo stays in charge."""
    global _world, _gloo, _exchange
    _world, _gloo = world_size, backend == "gloo"
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if (_exchange is not None or world_size == 1 or local_ranks != world_size or not _gloo
            or world_size > cores or platform.machine().lower() not in ("x86_64", "amd64")
            or not os.path.isdir("/dev/shm")):
        return
    box = [None]
    if rank == 0:
        path = f"/dev/shm/llama_mp-{os.getpid()}-{secrets.token_hex(4)}"
        with open(path, "wb") as f:
            f.truncate(world_size * SharedMemoryExchange.LINE + 2 * world_size * SharedMemoryExchange.SLOT_BYTES)
        box = [path]
    dist.broadcast_object_list(box, src=0)
    try:
        _exchange = SharedMemoryExchange(rank, world_size, box[0], timeout_s)
    finally:
        dist.barrier()
        if rank == 0:
            os.unlink(box[0])


def teardown() -> None:
    global _world, _gloo, _exchange
    if _exchange is not None:
        _exchange.close()
    _world, _gloo, _exchange = 1, False, None


def _shared(x: torch.Tensor) -> Optional[SharedMemoryExchange]:
    """The shared-memory exchange, if this job has one and `x` fits it; else None (use gloo/NCCL)."""
    return _exchange if _exchange is not None and _exchange.usable(x) else None


def _stacked(x: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's `x`, stacked: [n, *x.shape]. Read it before the next collective: it may be a view
    of the shared-memory exchange."""
    x = x.contiguous()
    if _shared(x):
        return _exchange.gather(x)
    return gather_into(torch.empty((n, *x.shape), dtype=x.dtype, device=x.device), x)


def gather_into(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Collective: every rank's `x` into the preallocated `out` of shape [world, *x.shape]."""
    dist.all_gather_single(out.view(-1, *x.shape[1:]), x.contiguous())  # rank-major rows
    return out


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over all ranks, on every rank (the row-parallel reduction)."""
    n = world()
    if n == 1:
        return x
    if _gloo and x.numel() <= GATHER_SUM_MAX_NUMEL:
        return _stacked(x, n).sum(dim=0)
    x = x.contiguous()
    dist.all_reduce(x)
    return x


def gather_last_dim_to_main(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Rank 0: every rank's `x` concatenated along the last dimension. Other ranks: None."""
    n = world()
    if n == 1:
        return x
    x = x.contiguous()
    if _shared(x):  # everyone gets all parts; only rank 0 keeps them
        parts = _exchange.gather(x)
        return torch.cat(parts.unbind(0), dim=-1) if _exchange.rank == 0 else None
    parts = [torch.empty_like(x) for _ in range(n)] if dist.get_rank() == 0 else None  # sampling only
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if parts is not None else None


def broadcast_from_main_(x: torch.Tensor) -> torch.Tensor:
    """Collective: rank 0's `x` copied into `x` on every rank (the sampled tokens)."""
    if world() == 1:
        return x
    if _shared(x):
        return x.copy_(_exchange.gather(x)[0])
    dist.broadcast(x, src=0)
    return x


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
