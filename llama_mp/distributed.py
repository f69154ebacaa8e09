"""Process-group setup for one torchrun job (or one plain process), and agreeing to fail.

Every process of a job calls `setup()`. It reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK), picks the device (`cuda:LOCAL_RANK` or CPU) and the backend (NCCL on GPUs when built in,
gloo otherwise), starts the process group with a bounded timeout and initialises fairscale's
model-parallel group over all ranks. A plain `python script.py` is a world of one and needs no port.

Failing well is most of this module. A rank that stops early leaves the others blocked in their next
collective, so every failure is either agreed on (`agree`, `decided_by_main`) or bounded: each
collective waits at most `timeout_s` (`--timeout_s`), except the agreement after loading, which may
wait `load_timeout_s` because ranks finish reading their shards at different times.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, TypeVar

import torch
import torch.distributed as dist

from . import collectives
from .errors import LlamaMPError, PeerLostError, RemoteRankError, report

# A generation step takes milliseconds to seconds, so 5 minutes of silence means a peer is gone or
# hung. Loading is different: a 65B shard from a network disk can take many minutes on one rank
# while the others already wait, so the agreement after loading gets its own, longer bound.
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_LOAD_TIMEOUT_S = 1800.0
T = TypeVar("T")
BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float = DEFAULT_TIMEOUT_S

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


def _choose(backend: str, device: str, timeout_s: float, local_rank: int) -> tuple:
    dev = choose_device(device, local_rank)
    chosen = choose_backend(backend, dev)
    if not timeout_s > 0:
        raise LlamaMPError(f"--timeout_s must be a positive number of seconds, got {timeout_s}.")
    return dev, chosen


def first_local_rank_to_fail(check: Callable[[int], Any], local_rank: int) -> int:
    """The lowest local rank of this node for which `check(local_rank)` raises (up to `local_rank`).

    Before the process group exists the ranks cannot talk, but checks of the arguments and of the
    node fail alike on every local rank (or, like "no GPU for this rank", on every rank above some
    point). Re-running the check for the lower local ranks tells a failing rank whether it is the first
    one: that one reports, the others stop quietly, so a node prints the message once, not N times.
    """
    for lower in range(local_rank):
        try:
            check(lower)
        except LlamaMPError:
            return lower
    return local_rank


def said_once(error: LlamaMPError, check: Callable[[int], Any], local_rank: int) -> LlamaMPError:
    """`error` on the first local rank that fails `check`, a quiet `RemoteRankError` on the others."""
    first = first_local_rank_to_fail(check, local_rank)
    return error if first == local_rank else RemoteRankError(f"local rank {first} reported the problem.")


def port_in_use(error: BaseException) -> bool:
    return "EADDRINUSE" in str(error) or "address already in use" in str(error).lower()


def port_in_use_error(port) -> LlamaMPError:
    return LlamaMPError(f"Port {port} is already in use on this machine, so the job's rendezvous store cannot "
                        "listen on it. Another job, or a leftover one, holds it: pick a free port (torchrun "
                        "--master_port or --rdzv_endpoint HOST:PORT, or MASTER_PORT), or find the owner with "
                        f"`ss -ltnp | grep :{port}`.")


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


def _bound_waits(timeout: datetime.timedelta) -> None:
    """Give fairscale's groups our timeout: `new_group` without one gets torch's default (30 min for
    gloo, 10 for NCCL), whatever the default group has. Our forward pass uses the default group (see
    collectives.py), but code that calls fairscale's own layer forwards uses these groups, and must not
    wait longer than --timeout_s either. `_set_pg_timeout` is private; without it we keep torch's defaults."""
    from fairscale.nn.model_parallel import initialize as mpu

    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is None:
        return
    for group in (mpu.get_model_parallel_group(), mpu.get_data_parallel_group()):
        set_timeout(timeout, group)


def setup(backend: str = "auto", device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Start (or join) the process group and fairscale's model-parallel group; idempotent."""
    from fairscale.nn.model_parallel import initialize as mpu

    rank, world, local = env_ranks()
    try:
        dev, chosen = _choose(backend, device, timeout_s, local)
    except LlamaMPError as e:
        raise said_once(e, lambda r: _choose(backend, device, timeout_s, r), local) from None
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if chosen == "nccl" else {}
        try:
            if "MASTER_ADDR" in os.environ or world > 1:
                dist.init_process_group(chosen, rank=rank, world_size=world, timeout=timeout, **kwargs)
            else:  # a plain process: an in-memory store, no port to pick or collide on
                dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=timeout, **kwargs)
        except (RuntimeError, ValueError) as e:  # DistNetworkError, DistStoreError, ...
            raise _init_failed(e, world, timeout_s) from None
    if not mpu.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes on stdout
            mpu.initialize_model_parallel(dist.get_world_size())
        _bound_waits(timeout)
        collectives.setup(dist.get_rank(), dist.get_world_size(), dist.get_backend(), timeout_s)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, dev, chosen, timeout_s)


def teardown(failed: bool = False) -> None:
    """Destroy fairscale's groups and the process group, so that NCCL does not warn at exit.

    After a failure NCCL's communicators may still hold an unfinished collective, and destroying them
    would wait for it; they are aborted instead. Gloo's groups are safe to destroy either way.
    """
    from fairscale.nn.model_parallel import initialize as mpu

    collectives.teardown()
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if failed and dist.get_backend() == "nccl" and abort is not None:
        abort()
    else:
        dist.destroy_process_group()


def peer_lost(error: BaseException) -> Optional[PeerLostError]:
    """`error` as a one-line `PeerLostError` if it is a collective that failed because another rank
    died or went silent; None for anything else (a bug in this rank, which keeps its traceback).

    Gloo notices a closed connection at once ("Connection reset/closed by peer") and a silent peer
    after the group's timeout ("Timed out waiting ..."); both arrive as RuntimeErrors naming gloo's
    sources. NCCL's arrive as DistBackendErrors (with TORCH_NCCL_BLOCKING_WAIT=1, see README).
    """
    text = str(error)
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and
                                                  ("/gloo/" in text or "NCCL" in text))):
        return None
    # "[/path/to/gloo/pair.cc:537] Read error ...: Connection reset by peer. This is typically ..."
    reason = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else "").split(". ")[0]
    rank = env_ranks()[0]
    return PeerLostError(f"rank {rank} lost contact with the other ranks ({reason or type(error).__name__}). "
                         "Another rank crashed, was killed or stopped answering for --timeout_s seconds; "
                         "its own message or signal is in the output above / torchrun's report.")


@contextlib.contextmanager
def patience(env: DistEnv, timeout_s: Optional[float]):
    """Let collectives on the default group inside this block wait up to `timeout_s`, then restore
    `env.timeout_s`. Without torch's private setter the group keeps its usual timeout."""
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if timeout_s is None or env.world_size == 1 or set_timeout is None:
        yield
        return
    set_timeout(datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        set_timeout(datetime.timedelta(seconds=env.timeout_s))


def agree(env: DistEnv, error: Optional[BaseException], timeout_s: Optional[float] = None) -> None:
    """Collective: every rank reports whether it failed; if any did, every rank raises.

    The lowest failing rank re-raises its own error (and prints it); the others raise `RemoteRankError`,
    so a bad shard on rank 1 stops rank 0 too instead of leaving it waiting in the next collective, and a
    problem every rank sees (a missing folder) is reported once, not N times. `timeout_s` bounds the
    wait for the slowest rank when it is not the usual one (after loading).
    """
    # MIN over ranks of "my rank if I failed, else world_size": the lowest failing rank, if any.
    first = torch.tensor([env.world_size if error is None else env.rank], dtype=torch.int64, device=env.device)
    if env.world_size > 1:
        with patience(env, timeout_s):
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
    first_failed = int(first.item())
    if first_failed == env.world_size:
        return
    if error is not None and first_failed == env.rank:
        _report_then_release(env, error)
        raise error  # only one rank tells the user, even when all of them hit the same problem
    _report_then_release(env, None)
    raise RemoteRankError(f"rank {first_failed} failed; see its message.")


def _report_then_release(env: DistEnv, error: Optional[BaseException]) -> None:
    """The reporting rank prints before a last collective lets the others go: as soon as one rank
    exits, torchrun stops the rest, which must not cut the message off."""
    if isinstance(error, LlamaMPError):
        report(error)
    if env.world_size > 1:
        dist.all_reduce(torch.zeros(1, device=env.device))


def broadcast_from_main(env: DistEnv, value: Any) -> Any:
    """Rank 0's `value` on every rank (a small picklable object: prompts, verdicts)."""
    if env.world_size == 1:
        return value
    box: List[Any] = [value if env.is_main else None]
    dist.broadcast_object_list(box, src=0, device=env.device)
    return box[0]


def decided_by_main(env: DistEnv, decide: Callable[[], T]) -> T:
    """Rank 0 runs `decide()` (read a file, check a request) and every rank returns its result.

    If it raises, rank 0 re-raises that error and the other ranks raise `RemoteRankError`: the ranks
    agree on whether to go on without each repeating the check, and the user reads one message. Only
    rank 0's inputs matter, so files such as --dialogs need to exist on the first node only.
    """
    error: Optional[BaseException] = None
    value = None
    if env.is_main:
        try:
            value = decide()
        except Exception as e:  # noqa: BLE001 - the others must hear of any failure, or they hang
            error = e
            if isinstance(e, LlamaMPError):
                report(e)  # before the others hear of it (see _report_then_release)
    ok, value = broadcast_from_main(env, (error is None, value))
    if error is not None:
        raise error
    if not ok:
        raise RemoteRankError("rank 0 stopped; see its message.")
    return value
