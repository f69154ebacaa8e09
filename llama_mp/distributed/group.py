"""The process group of one torchrun job (or one plain process), and everything a rank knows about it.

Every process of a job calls `setup()`. It reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK), picks the device (`cuda:LOCAL_RANK` or CPU) and the backend (NCCL on GPUs when built in,
gloo otherwise) and starts the process group with a bounded timeout, or joins the one the caller
started. A plain `python script.py` is a world of one and needs no port. What the rank then knows (its
rank, the group's size, device, backend, timeout and collectives) lives on the returned `Group`: there
is no other state, so code that set up torch.distributed (and fairscale) itself gets the same result.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..checks import require_seconds
from ..errors import LlamaMPError, RemoteRankError
from .collectives import Collectives
from .failure import launcher_grace_s, port_in_use, port_in_use_error, said_once
from .shm import open_exchange

# A generation step takes milliseconds to seconds, so 5 minutes of silence means a peer is gone or
# hung. Loading is different: a 65B shard from a network disk can take many minutes on one rank
# while the others already wait, so the agreement after loading gets its own, longer bound.
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_LOAD_TIMEOUT_S = 1800.0
BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cuda", "cpu")


@dataclass
class Group:
    """This rank's place in the job: who it is, where it computes, and how it talks to the others."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    collectives: Collectives = field(default=None, repr=False)
    # (host, pid) of every rank, by rank: who shares this rank's host (`local_peer_pids`).
    peers: Tuple[Tuple[str, int], ...] = field(default=(), repr=False)
    # How long torchrun lets the ranks run after it forwards SIGTERM (None: not under torchrun).
    launcher_grace_s: Optional[float] = None

    def __post_init__(self):
        if self.collectives is None:
            self.collectives = Collectives(self.rank, self.world_size, self.backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_peer_pids(self) -> List[Optional[int]]:
        """By rank: the process id of each other rank of this host, None for this rank and remote ones."""
        return local_pids(self.peers, self.rank)

    def wake_local_peers(self) -> None:
        """Send SIGCONT to the other ranks of this host. Called when this rank gives up on a silent peer:
        a stopped rank (SIGSTOP, Ctrl-Z) cannot act on torchrun's SIGTERM until it runs again, so
        torchrun would wait its 30 s grace before SIGKILL. SIGCONT does nothing to a running process."""
        for pid in filter(None, self.local_peer_pids()):
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:  # it has ended, or is not ours to signal
                pass

    def close(self) -> None:
        """Release the shared-memory exchange (the process group itself is torch's: see `teardown`)."""
        self.collectives.close()


def env_ranks() -> tuple:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise LlamaMPError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e}); launch with torchrun, which "
                           "sets them, or unset them to run as one process.") from None
    return rank, world, local


def local_pids(peers: Sequence[Tuple[str, int]], rank: int) -> List[Optional[int]]:
    """`peers` ((host, pid) by rank) as the pids of the ranks other than `rank` on this host, else None.
    Only these can be watched: a pid means nothing on another host or in another PID namespace."""
    host = host_identity()
    return [pid if r != rank and h == host else None for r, (h, pid) in enumerate(peers)]


def choose_device(device: str, local_rank: int) -> torch.device:
    if device not in DEVICES:
        raise LlamaMPError(f"Unknown --device {device!r}; use one of {', '.join(DEVICES)}.")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LlamaMPError("--device cuda was asked for, but this PyTorch build sees no CUDA GPU "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Run with "
                           "--device cpu --backend gloo, or install a CUDA build of PyTorch on a GPU machine.")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise LlamaMPError(f"Local rank {local_rank} has no GPU: this node shows {count} CUDA device(s). Use "
                           f"--nproc_per_node {count} or fewer on this node (check CUDA_VISIBLE_DEVICES).")
    return torch.device("cuda", local_rank)


def choose_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise LlamaMPError(f"Unknown --backend {backend!r}; use one of {', '.join(BACKENDS)}.")
    nccl_built = dist.is_available() and dist.is_nccl_available()
    if backend == "auto":
        return "nccl" if device.type == "cuda" and nccl_built else "gloo"
    if backend == "nccl" and not nccl_built:
        raise LlamaMPError("--backend nccl was asked for, but this PyTorch build has no NCCL (the usual case on "
                           "macOS, Windows and CPU-only builds: 'Distributed package doesn't have NCCL built "
                           "in'). Use --backend gloo (or auto, which picks gloo here); gloo runs on CPU and "
                           "works across machines too.")
    if backend == "nccl" and device.type != "cuda":
        raise LlamaMPError("--backend nccl needs CUDA tensors, but the device is the CPU. Use --backend gloo "
                           "with --device cpu, or --device cuda on a GPU machine.")
    return backend


def host_identity() -> str:
    """This host as the ranks compare it: its name and, where Linux says, its PID namespace, so that
    containers sharing a host name do not take each other's process ids for their own."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


def _choose(backend: str, device: str, timeout_s: float, local_rank: int) -> tuple:
    require_seconds("timeout_s", timeout_s)
    dev = choose_device(device, local_rank)
    chosen = choose_backend(backend, dev)
    return dev, chosen


def _init_failed(error: Exception, world: int, timeout_s: float) -> LlamaMPError:
    addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if port_in_use(error):
        return port_in_use_error(os.environ.get("MASTER_PORT", "?"))
    return LlamaMPError(f"Could not start the process group of {world} rank(s) through {addr} within "
                        f"{timeout_s:g} s ({first}). Check that every node runs the same torchrun command with "
                        "the same --nnodes/--rdzv_endpoint (or MASTER_ADDR/MASTER_PORT), that the address is "
                        "reachable from every node and not firewalled, and on multi-homed machines set "
                        "GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface that connects them.")


def _check_callers_fairscale(world: int) -> None:
    """Code written for Meta's scripts may have set up fairscale's model-parallel group before calling us.
    llama_mp computes over the whole job (its own layers, the default group); a caller who split the job
    into several model-parallel groups asks for something else, which we refuse rather than compute."""
    mpu = sys.modules.get("fairscale.nn.model_parallel.initialize")
    if mpu is None or not mpu.model_parallel_is_initialized():
        return
    size = mpu.get_model_parallel_world_size()
    if size != world:
        error = LlamaMPError(f"fairscale's model-parallel group was set up with {size} rank(s) but the job has "
                             f"{world}: llama_mp splits the model over every rank of the job. Initialise it with "
                             f"initialize_model_parallel({world}), or leave the setup to llama_mp.")
        raise error if dist.get_rank() == 0 else RemoteRankError("rank 0 reported the problem.")


def setup(backend: str = "auto", device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """Start the process group (or join the caller's) and return this rank's `Group`. Collective when the
    job has several ranks (it sets up the shared-memory exchange), so every rank calls it."""
    rank, world, local = env_ranks()
    try:
        dev, chosen = _choose(backend, device, timeout_s, local)
    except LlamaMPError as e:
        raise said_once(e, lambda r: _choose(backend, device, timeout_s, r), local) from None
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {"device_id": dev} if chosen == "nccl" else {}
        try:
            if "MASTER_ADDR" in os.environ or world > 1:
                dist.init_process_group(chosen, rank=rank, world_size=world, timeout=timeout, **kwargs)
            else:  # a plain process: an in-memory store, no port to pick or collide on
                dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=timeout, **kwargs)
        except (RuntimeError, ValueError) as e:  # DistNetworkError, DistStoreError, ...
            raise _init_failed(e, world, timeout_s) from None
    rank, world, chosen = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    _check_callers_fairscale(world)
    peers = [(host_identity(), os.getpid())] * world
    if world > 1:
        dist.all_gather_object(peers, peers[0])
    exchange = open_exchange(rank, world, chosen, timeout_s, local_pids(peers, rank))
    return Group(rank, world, local, dev, chosen, timeout_s, Collectives(rank, world, chosen, exchange),
                 tuple(peers), launcher_grace_s())


def teardown(failed: bool = False) -> None:
    """Destroy fairscale's groups (if a caller made them) and the process group, so that NCCL does not
    warn at exit.

    After a failure NCCL's communicators may still hold an unfinished collective, and destroying them
    would wait for it; they are aborted instead. Gloo's groups are safe to destroy either way.
    """
    mpu = sys.modules.get("fairscale.nn.model_parallel.initialize")
    if mpu is not None and mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if failed and dist.get_backend() == "nccl" and abort is not None:
        abort()
    else:
        dist.destroy_process_group()
