"""Small all-gathers between the ranks of one x86-64 host through a page of shared memory.

On gloo, even a 288-float all-gather costs about half a millisecond (its all-reduce three times that),
which a decode step pays twice per layer. When every rank runs on this host with a core of its own, the
ranks exchange such small tensors through a file in /dev/shm instead: a copy in, a wait on a counter
per rank, and the result read in place.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..errors import PeerLostError, RemoteRankError
from .failure import process_alive


class SharedMemoryExchange:
    """All-gather of small CPU tensors between the ranks of one host through shared memory.

    Layout of the shared file: one 64-byte line per rank holding its round counter, then two sets of
    per-rank data slots. In round r, a rank copies its tensor into its slot of set r % 2, then sets its
    counter to r; once every counter is >= r, all slots of that set hold round r's data. Two sets are
    enough: a rank can only write set r % 2 again in round r + 2, which needs every rank's counter at
    r + 1, and a rank raises it only after it has read round r.

    Correct on x86-64 only, whose stores become visible in program order (the data before the counter)
    and whose loads are not reordered with each other; elsewhere the ranks use gloo. Waiting spins
    briefly, then yields the core (ranks may outnumber cores), and gives up after `timeout_s`, or at
    once when a late rank's process has ended (`pids`: each rank's, by rank; None where not watched):
    a counter in shared memory does not tell that its writer died, as gloo's closed socket does. A rank
    that gives up sets its counter to GAVE_UP, so that the others stop quietly: one message per job.
    """

    SLOT_BYTES = 1 << 18   # 256 KiB per rank and set: a decode step's vectors for batches up to ~32 x 2K
    LINE = 64              # one cache line per counter, so ranks do not write to each other's lines
    LIVENESS_PERIOD_S = 0.1  # how often a waiting rank looks whether the late ranks' processes still exist
    GAVE_UP = -1             # a counter's value once its rank stopped waiting (and reported why)

    def __init__(self, rank: int, world_size: int, path: str, timeout_s: float,
                 pids: Sequence[Optional[int]] = ()):
        self.rank, self.n, self.timeout_s = rank, world_size, timeout_s
        self.pids = list(pids) + [None] * (world_size - len(pids))
        size = self.file_size(world_size)
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), size)
        raw = np.frombuffer(self.map, dtype=np.uint8)
        self.counters = raw[:world_size * self.LINE].view(np.int64)[::self.LINE // 8]
        self.slots = torch.from_numpy(raw[world_size * self.LINE:]).view(2, world_size, self.SLOT_BYTES)
        self.round = 0
        self._views: dict = {}  # (shape, dtype) -> per set: (this rank's slot, all slots) as tensors

    @classmethod
    def file_size(cls, world_size: int) -> int:
        return world_size * cls.LINE + 2 * world_size * cls.SLOT_BYTES

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
        now = time.monotonic()
        deadline, look = now + self.timeout_s, now + self.LIVENESS_PERIOD_S
        while not (counters >= r).all():
            now = time.monotonic()
            if now > look:
                look = now + self.LIVENESS_PERIOD_S
                self._check_peers()
            if now > deadline:
                late = [i for i in range(self.n) if counters[i] < r]
                self._give_up()
                raise PeerLostError(
                    f"rank {self.rank} lost contact with the other ranks (Timed out waiting "
                    f"{int(self.timeout_s * 1000)}ms for rank(s) {late} in a shared-memory exchange). Another "
                    "rank crashed, was killed or stopped answering for --timeout_s seconds; its own message "
                    "or signal is in the output above / torchrun's report.")
            os.sched_yield()

    def _check_peers(self) -> None:
        """Raise if a late rank will never come: it gave up on the exchange (and said why: this rank stops
        quietly), or its process ended without a word (this rank says so)."""
        counters, r = self.counters, self.round
        gave_up = [i for i in range(self.n) if counters[i] == self.GAVE_UP]
        if gave_up:
            raise RemoteRankError(f"rank {gave_up[0]} gave up on a shared-memory exchange; see its message.")
        dead = [i for i, pid in enumerate(self.pids) if counters[i] < r and pid and not process_alive(pid)]
        dead = [i for i in dead if counters[i] < r]  # read again: it may have written just before it exited
        if dead:
            self._give_up()
            raise PeerLostError(
                f"rank {self.rank} lost contact with the other ranks (the process of rank {dead[0]}, id "
                f"{self.pids[dead[0]]}, ended during a shared-memory exchange). Its own message or signal is "
                "in the output above / torchrun's report.")

    def _give_up(self) -> None:
        """Tell the other ranks, through this rank's counter, that it stopped waiting and reports why.
        (The caller raises: an error held in a local here would keep the shared map exported.)"""
        self.counters[self.rank] = self.GAVE_UP

    def close(self) -> None:
        self.slots = self.counters = None
        self._views.clear()
        self.map.close()


def open_exchange(rank: int, world_size: int, backend: str, timeout_s: float, pids: Sequence[Optional[int]] = (),
                  group: Optional[dist.ProcessGroup] = None) -> Optional[SharedMemoryExchange]:
    """Collective when more than one rank: a shared-memory exchange when every rank runs on this x86-64
    host with a core of its own and the backend is gloo, else None (gloo or NCCL carry everything).
    `pids`: the other ranks' process ids, by rank, watched while waiting.

    Rank 0 creates the file in /dev/shm and removes its name as soon as every rank has mapped it, so
    nothing is left behind even if the job is killed. With more ranks than cores, waiting ranks would
    spin on cores the others need, so gloo stays in charge."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if (world_size == 1 or local_ranks != world_size or backend != "gloo" or world_size > cores
            or platform.machine().lower() not in ("x86_64", "amd64") or not os.path.isdir("/dev/shm")):
        return None
    box = [None]
    if rank == 0:
        path = f"/dev/shm/llama_mp-{os.getpid()}-{secrets.token_hex(4)}"
        with open(path, "wb") as f:
            f.truncate(SharedMemoryExchange.file_size(world_size))
        box = [path]
    dist.broadcast_object_list(box, src=0, group=group)
    try:
        return SharedMemoryExchange(rank, world_size, box[0], timeout_s, pids)
    finally:
        dist.barrier(group=group)
        if rank == 0:
            os.unlink(box[0])
