"""The one command runner: every entry point (launch/*.py, `llama-mp ...`) runs its fire component here.

It refuses unknown or missing options before anything runs, prints a user error as one paragraph from
the rank that found it, exits non-zero with the code that says how the rank ended (errors.py), stays
quiet on Ctrl-C and when another rank failed, and tears the process group down.
"""

from __future__ import annotations

import difflib
import inspect
import signal
import sys
import time
from typing import Callable, List, Optional

from .. import distributed
from ..errors import LlamaMPError, RemoteRankError, report

REPORTER_GRACE_S = 1.0


def check_options(fn: Callable, argv: List[str]) -> None:
    """Reject an --option that `fn` does not take, or a missing required one, before anything runs.
    Fire would hand an unknown option to `fn`'s return value after running the whole job, and only
    then complain; and it reports a missing one with a usage screen per rank."""
    params = inspect.signature(fn).parameters
    takes_value = False
    given, positional = set(), 0
    for arg in argv:
        if arg == "--" or arg in ("--help", "-h"):
            return
        if takes_value or not arg.startswith("--"):
            positional += not takes_value
            takes_value = False
            continue
        name, has_value = arg[2:].split("=", 1)[0].replace("-", "_"), "=" in arg
        negated = name[2:].lstrip("_") if name.startswith("no") else None  # --nojson / --no-json
        if name in params:
            given.add(name)
            takes_value = not has_value and params[name].annotation not in (bool, "bool")
            continue
        if negated in params:
            continue
        close = difflib.get_close_matches(name, list(params), n=1)
        raise LlamaMPError(f"Unknown option --{name}" + (f"; did you mean --{close[0]}?" if close else ".")
                           + f" {fn.__name__} takes --{', --'.join(params)}.")
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in given]
    missing = required[positional:]  # positional arguments fill the required ones in order
    if missing:
        raise LlamaMPError(f"{fn.__name__} needs --{' and --'.join(missing)}; --help lists every option.")


def _quiet_sigint() -> List[bool]:
    """Make Ctrl-C raise KeyboardInterrupt as usual, and remember that it came: a rank whose peer was
    interrupted first sees a broken connection, which is then no error worth printing."""
    seen = [False]

    def on_sigint(signum, frame):
        seen[0] = True
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    return seen


def run(component, name: Optional[str] = None) -> None:
    """Run a fire component as a command: one clear message and a non-zero exit on a user error.

    SIGTERM (what torchrun sends the other ranks when one fails) keeps its default action: the rank
    ends at once, silently, even inside a blocked collective, where a Python handler could not run.
    """
    import fire

    interrupted = _quiet_sigint()
    code = 1  # until fire returns: a bug that escapes keeps this, and its traceback
    try:
        if inspect.isfunction(component):
            argv = sys.argv[1:]
            try:
                check_options(component, argv)
            except LlamaMPError as e:  # the same on every rank: the first local rank says it
                raise distributed.said_once(e, lambda _: check_options(component, argv),
                                            distributed.env_ranks()[2]) from None
        fire.Fire(component, name=name)
        code = 0
    except Exception as e:  # noqa: BLE001 - sorted below; bugs are re-raised
        code = _report(e, interrupted[0])
    except KeyboardInterrupt:
        code = 130
    finally:
        distributed.teardown(failed=code != 0)
    sys.exit(code)


def _report(error: Exception, interrupted: bool) -> int:
    """Print what the user needs to read about `error` (at most one paragraph) and return the exit code."""
    if interrupted:
        return 130
    if not isinstance(error, LlamaMPError):
        error = distributed.peer_lost(error) or error
    if isinstance(error, RemoteRankError):  # another rank printed the reason
        # torchrun stops every rank once the first one exits: let the reporting rank finish first, so
        # that its message is out (nothing else orders it before a failure found before the process
        # group existed) and torchrun's report names it as the root cause, with its exit code.
        time.sleep(REPORTER_GRACE_S)
        return error.exit_code
    if isinstance(error, LlamaMPError):
        report(error)
        return error.exit_code
    raise error
