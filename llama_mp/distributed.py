"""Process-group setup for one torchrun job (or one plain process), and agreeing to fail.

Every process of a job calls `setup()`. It reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK), picks the device (`cuda:LOCAL_RANK` or CPU) and the backend (NCCL on GPUs when built in,
gloo otherwise), starts the process group with a bounded timeout and initialises fairscale's
model-parallel group over all ranks. A plain `python script.py` is a world of one and needs no port.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from .errors import LlamaMPError, RemoteRankError

DEFAULT_TIMEOUT_S = 300.0
BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def setup(backend: str = "auto", device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Start (or join) the process group and fairscale's model-parallel group; idempotent."""
    from fairscale.nn.model_parallel import initialize as mpu

    rank, world, local = env_ranks()
    dev = choose_device(device, local)
    chosen = choose_backend(backend, dev)
    if timeout_s <= 0:
        raise LlamaMPError(f"--timeout_s must be positive, got {timeout_s}.")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {"device_id": dev} if chosen == "nccl" else {}
        if "MASTER_ADDR" in os.environ or world > 1:
            dist.init_process_group(chosen, timeout=timeout, **kwargs)
        else:  # a plain process: an in-memory store, no port to pick or collide on
            dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout, **kwargs)
    if not mpu.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes on stdout
            mpu.initialize_model_parallel(dist.get_world_size())
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, dev, chosen)


def teardown() -> None:
    """Destroy fairscale's groups and the process group, so that NCCL does not warn at exit."""
    from fairscale.nn.model_parallel import initialize as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def agree(env: DistEnv, error: Optional[BaseException]) -> None:
    """Collective: every rank reports whether it failed; if any did, every rank raises.

    The lowest failing rank re-raises its own error (and prints it); the others raise `RemoteRankError`,
    so a bad shard on rank 1 stops rank 0 too instead of leaving it waiting in the next collective, and a
    problem every rank sees (a missing folder) is reported once, not N times.
    """
    # MIN over ranks of "my rank if I failed, else world_size": the lowest failing rank, if any.
    first = torch.tensor([env.world_size if error is None else env.rank], dtype=torch.int64, device=env.device)
    if env.world_size > 1:
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    first_failed = int(first.item())
    if first_failed == env.world_size:
        return
    if error is not None and first_failed == env.rank:
        raise error  # only one rank tells the user, even when all of them hit the same problem
    raise RemoteRankError(f"rank {first_failed} failed; see its message.")


def broadcast_from_main(env: DistEnv, value: Any) -> Any:
    """Rank 0's `value` on every rank (a small picklable object: prompts, verdicts)."""
    if env.world_size == 1:
        return value
    box: List[Any] = [value if env.is_main else None]
    dist.broadcast_object_list(box, src=0, device=env.device)
    return box[0]
