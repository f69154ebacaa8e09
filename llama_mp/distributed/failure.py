"""Failing well across ranks: agreed or bounded, one message, never a rank left waiting.

A rank that stops early leaves the others blocked in their next collective, so every failure is either
agreed on (`agree`, `decided_by_main`) or bounded: each collective waits at most the group's
`timeout_s` (`--timeout_s`), except the agreement after loading, which may wait `load_timeout_s`
because ranks finish reading their shards at different times. Before the process group exists, ranks
cannot talk; `said_once` then makes a node print a problem every rank finds only once.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import LlamaMPError, PeerLostError, RemoteRankError, report

if TYPE_CHECKING:
    from .group import Group

T = TypeVar("T")


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


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs. A zombie (ended, not yet reaped by its parent)
    does not: a rank killed under torchrun stays one until the agent's next poll."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False
    except OSError:  # not ours to read: it exists
        return True
    try:  # no /proc (macOS): signal 0 only asks whether it exists
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


# The launchers whose command line holds torchrun's options: `torchrun` (a script), `python -m` of these.
LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch", "llama_mp.torchrun")
TORCHRUN_DEFAULT_GRACE_S = 30  # torch's default --shutdown_timeout (torch/distributed/launcher/api.py)


def launcher_grace_s(agent_argv: Optional[Sequence[str]] = None) -> Optional[float]:
    """Seconds torchrun lets its ranks run after it forwards SIGTERM before it SIGKILLs them; None when
    this process was not started by torchrun's agent (no TORCHELASTIC_RUN_ID).

    Found as torchrun finds it: its --shutdown_timeout, read with torchrun's own parser from the agent's
    command line (`agent_argv`, by default our parent's), which also reads PET_SHUTDOWN_TIMEOUT; else
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT; else 30. The ranks inherit the agent's environment, so the
    variables read here are the agent's."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    value = _shutdown_option(_process_argv(os.getppid()) if agent_argv is None else agent_argv)
    if value is None:
        value = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", TORCHRUN_DEFAULT_GRACE_S)
    try:
        return float(value)
    except ValueError:  # torchrun itself would have refused it
        return float(TORCHRUN_DEFAULT_GRACE_S)


def _process_argv(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _shutdown_option(argv: Sequence[str]) -> Optional[str]:
    """torchrun's --shutdown_timeout (or PET_SHUTDOWN_TIMEOUT) as its parser reads `argv`, the agent's
    whole command line; PET_SHUTDOWN_TIMEOUT alone if `argv` is not a launcher's."""
    for i, arg in enumerate(argv):
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] in LAUNCHER_MODULES:
            args = list(argv[i + 2:])
            break
        if os.path.basename(arg) == "torchrun":
            args = list(argv[i + 1:])
            break
    else:
        return os.environ.get("PET_SHUTDOWN_TIMEOUT")
    from torch.distributed.run import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # a command line it cannot read: no usage text
            parsed, _ = get_args_parser().parse_known_args(args)
    except SystemExit:
        return os.environ.get("PET_SHUTDOWN_TIMEOUT")
    return None if parsed.shutdown_timeout is None else str(parsed.shutdown_timeout)


def port_in_use(error: BaseException) -> bool:
    return "EADDRINUSE" in str(error) or "address already in use" in str(error).lower()


def port_in_use_error(port) -> LlamaMPError:
    return LlamaMPError(f"Port {port} is already in use on this machine, so the job's rendezvous store cannot "
                        "listen on it. Another job, or a leftover one, holds it: pick a free port (torchrun "
                        "--master_port or --rdzv_endpoint HOST:PORT, or MASTER_PORT), or find the owner with "
                        f"`ss -ltnp | grep :{port}`.")


def peer_lost(error: BaseException) -> Optional[PeerLostError]:
    """`error` as a one-line `PeerLostError` if it is a collective that failed because another rank
    died or went silent; None for anything else (a bug in this rank, which keeps its traceback).

    Gloo notices a closed connection at once ("Connection reset/closed by peer") and a silent peer
    after the group's timeout ("Timed out waiting ..."); both arrive as RuntimeErrors naming gloo's
    sources. NCCL's arrive as DistBackendErrors (with TORCH_NCCL_BLOCKING_WAIT=1, see docs/multi-node.md).
    """
    text = str(error)
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and
                                                  ("/gloo/" in text or "NCCL" in text))):
        return None
    # "[/path/to/gloo/pair.cc:537] Read error ...: Connection reset by peer. This is typically ..."
    reason = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else "").split(". ")[0]
    rank = int(os.environ.get("RANK", "0"))
    return PeerLostError(f"rank {rank} lost contact with the other ranks ({reason or type(error).__name__}). "
                         "Another rank crashed, was killed or stopped answering for --timeout_s seconds; "
                         "its own message or signal is in the output above / torchrun's report.")


@contextlib.contextmanager
def waking_peers_on_loss(group: "Group"):
    """Run the block; if a collective in it failed because a peer died or went silent, wake the
    stopped ranks of this host (`Group.wake_local_peers`) before the error goes on, so that the
    SIGTERM torchrun sends them once this rank exits ends them at once."""
    try:
        yield
    except Exception as e:
        if isinstance(e, PeerLostError) or peer_lost(e) is not None:  # the first: the shared-memory exchange's
            group.wake_local_peers()
        raise


# How long a rank waits for a person (the next line of an interactive chat): unbounded in practice, yet
# a number gloo and NCCL add to the current time without overflow (they count in milliseconds).
WAIT_FOR_PERSON_S = 365 * 24 * 3600.0


@contextlib.contextmanager
def patience(group: "Group", timeout_s: Optional[float]):
    """Let collectives on the default group inside this block wait up to `timeout_s`, then restore
    `group.timeout_s`. Without torch's private setter the group keeps its usual timeout."""
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if timeout_s is None or group.world_size == 1 or set_timeout is None:
        yield
        return
    set_timeout(datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        set_timeout(datetime.timedelta(seconds=group.timeout_s))


def agree(group: "Group", error: Optional[BaseException], timeout_s: Optional[float] = None) -> None:
    """Collective: every rank reports whether it failed; if any did, every rank raises.

    The lowest failing rank re-raises its own error (and prints it); the others raise `RemoteRankError`,
    so a bad shard on rank 1 stops rank 0 too instead of leaving it waiting in the next collective, and a
    problem every rank sees (a missing folder) is reported once, not N times. `timeout_s` bounds the
    wait for the slowest rank when it is not the usual one (after loading).
    """
    # MIN over ranks of "my rank if I failed, else world_size": the lowest failing rank, if any.
    first = torch.tensor([group.world_size if error is None else group.rank], dtype=torch.int64, device=group.device)
    if group.world_size > 1:
        with waking_peers_on_loss(group), patience(group, timeout_s):
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
    first_failed = int(first.item())
    if first_failed == group.world_size:
        return
    if error is not None and first_failed == group.rank:
        _report_then_release(group, error)
        raise error  # only one rank tells the user, even when all of them hit the same problem
    _report_then_release(group, None)
    raise RemoteRankError(f"rank {first_failed} failed; see its message.")


def _report_then_release(group: "Group", error: Optional[BaseException]) -> None:
    """The reporting rank prints before a last collective lets the others go: as soon as one rank
    exits, torchrun stops the rest, which must not cut the message off."""
    if isinstance(error, LlamaMPError):
        report(error)
    if group.world_size > 1:
        dist.all_reduce(torch.zeros(1, device=group.device))


def broadcast_from_main(group: "Group", value: Any) -> Any:
    """Rank 0's `value` on every rank (a small picklable object: prompts, verdicts)."""
    if group.world_size == 1:
        return value
    box: List[Any] = [value if group.is_main else None]
    dist.broadcast_object_list(box, src=0, device=group.device)
    return box[0]


def decided_by_main(group: "Group", decide: Callable[[], T]) -> T:
    """Rank 0 runs `decide()` (read a file, check a request) and every rank returns its result.

    If it raises, rank 0 re-raises that error and the other ranks raise `RemoteRankError`: the ranks
    agree on whether to go on without each repeating the check, and the user reads one message. Only
    rank 0's inputs matter, so files such as --dialogs need to exist on the first node only.
    """
    error: Optional[BaseException] = None
    value = None
    if group.is_main:
        try:
            value = decide()
        except Exception as e:  # noqa: BLE001 - the others must hear of any failure, or they hang
            error = e
            if isinstance(e, LlamaMPError):
                report(e)  # before the others hear of it (see _report_then_release)
    ok, value = broadcast_from_main(group, (error is None, value))
    if error is not None:
        raise error
    if not ok:
        raise RemoteRankError("rank 0 stopped; see its message.")
    return value
