"""The one exception type users see.

A `LlamaMPError` carries a message written for a person: what is wrong, where, and what to do.
Entry points catch it, print the message once (on the rank that found the problem) and exit non-zero;
anything else that escapes is a bug in llama_mp and keeps its traceback.

Exit codes of a rank, as torchrun's failure report lists them: 2 the rank found a problem and printed
it; 3 it stopped because another rank did; 4 it lost contact with another rank (killed, crashed, or
silent past --timeout_s); 130 interrupted (Ctrl-C); -15 / -9 killed by SIGTERM / SIGKILL.
"""

import sys


class LlamaMPError(Exception):
    """A problem with the user's input or environment, explained in one paragraph."""

    exit_code = 2


class RemoteRankError(LlamaMPError):
    """Another rank failed and has already printed why; this rank only needs to stop."""

    exit_code = 3


class PeerLostError(LlamaMPError):
    """A collective failed because another rank died or stopped answering; says so in one line."""

    exit_code = 4


def report(error: LlamaMPError) -> None:
    """Print `error` for the user on stderr, once however often it is reported."""
    if not getattr(error, "reported", False):
        print(f"llama_mp: error: {error}", file=sys.stderr, flush=True)
        error.reported = True
