"""`python -m llama_mp.torchrun ARGS`: torchrun with the same ARGS, but a failed job ends in one line.

Plain torchrun ends a failed job with its own Python traceback and a ChildFailedError table, below
the message that matters (printed by the rank that found the problem). This runs torchrun's agent
in-process and replaces both with one line saying how each rank ended; a port that is already taken
gives our message instead of torchrun's DistNetworkError traceback. The exit code is the job's:
2 when a rank reported an error, else that of the first failure (128 + N for a signal N).
"""

from __future__ import annotations

import signal
import sys
from typing import List, Optional

from .distributed.failure import port_in_use, port_in_use_error

# Exit codes of our ranks (errors.py), in words.
_ENDINGS = {1: "failed (see its traceback above)", 2: "reported the error above",
            3: "stopped because another rank failed", 4: "lost contact with another rank",
            130: "was interrupted"}


def ending(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return _ENDINGS.get(exitcode, f"exited with code {exitcode}")


def job_exit_code(exitcodes: List[int]) -> int:
    code = 2 if 2 in exitcodes else exitcodes[0]
    return 128 - code if code < 0 else code


def process_count_problem(nproc_per_node: str, nnodes: str) -> Optional[str]:
    """What is wrong with torchrun's process counts (checks.MAX_RANKS in all), or None. torchrun itself
    would start --nproc_per_node 100000 processes; its names (auto, cpu, gpu) are left to it."""
    from .checks import MAX_RANKS

    counts = {"--nproc_per_node": [nproc_per_node], "--nnodes": str(nnodes).split(":")}
    for flag, values in counts.items():
        for value in values:
            text = str(value).strip()
            if text.lstrip("-").isdigit() and not 1 <= int(text) <= MAX_RANKS:
                return f"{flag} must be from 1 to {MAX_RANKS} (processes a job can split a model over), got {text}."
    return None


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(argv)
    problem = process_count_problem(args.nproc_per_node, args.nnodes)
    if problem:  # before torchrun starts that many processes
        print(f"llama_mp: error: {problem}", file=sys.stderr, flush=True)
        return 2
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        first_rank, _ = e.get_first_failure()
        ranks = [first_rank] + sorted(r for r in e.failures if r != first_rank)
        print("llama_mp: the job failed: " + "; ".join(
            f"rank {r} {ending(e.failures[r].exitcode)} (exit code {e.failures[r].exitcode})" for r in ranks) + ".",
            file=sys.stderr, flush=True)
        return job_exit_code([e.failures[r].exitcode for r in ranks])
    except SignalException as e:  # Ctrl-C or SIGTERM to torchrun: the ranks were stopped with it
        return 128 + int(e.sigval)
    except RuntimeError as e:
        if not port_in_use(e):
            raise
        port = args.master_port if args.rdzv_backend == "static" else args.rdzv_endpoint.rpartition(":")[2]
        print(f"llama_mp: error: {port_in_use_error(port)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
