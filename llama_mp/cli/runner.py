"""The one command runner: every entry point (launch/*.py, `llama-mp ...`) runs its fire component here.

It refuses unknown or missing options before anything runs, prints a user error as one paragraph from
the rank that found it, exits non-zero with the code that says how the rank ended (errors.py), stays
quiet on Ctrl-C and when another rank failed, and tears the process group down.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import signal
import sys
import time
from typing import Callable, List, Optional

from .. import distributed
from ..checks import check_option_values, require_text
from ..errors import LlamaMPError, RemoteRankError, report

REPORTER_GRACE_S = 1.0


TEXT_TYPES = (str, Optional[str], "str", "Optional[str]", "str | None")
# Text options that name files: a file name on Linux is bytes, and one that is not UTF-8 is still a name
# (Python hands it over with surrogate escapes, which `open` turns back into the same bytes).
PATH_OPTIONS = frozenset({"ckpt_dir", "tokenizer_path", "out_dir", "src", "dst", "text", "dialogs", "tools",
                          "per_token", "compare", "tokenizer"})


def text_options(fn: Callable) -> List[str]:
    """The options of `fn` whose values are text (annotated `str` or `Optional[str]`): paths, names,
    prompts. Fire would read their values as Python literals: `1.50` as 1.5, `a,b` as a tuple, `None`
    as None; `exact_text` keeps them as typed."""
    return [n for n, p in inspect.signature(fn).parameters.items() if p.annotation in TEXT_TYPES]


def exact_text(fn: Callable, argv: List[str]) -> List[str]:
    """`argv` with the value of every text option of `fn` (`--name VALUE`, `--name=VALUE`, or positional)
    written as a Python string literal, which fire reads back as exactly the text that was typed.
    Expects argv that `check_options` accepted."""
    params = inspect.signature(fn).parameters
    texts = set(text_options(fn))
    out: List[str] = []
    named, positional = set(), []  # which parameters got a value by name; indices in `out` of positional ones
    pending = None  # the option whose value is the next argument
    for i, arg in enumerate(argv):
        if pending is not None:  # a value, whatever it looks like ("--help" is a fine prompt)
            out.append(f"{arg!r}" if pending in texts else arg)
            pending = None
            continue
        if arg == "--" or arg in ("--help", "-h"):
            out += argv[i:]
            break
        if arg.startswith("--"):
            name, has_value = arg[2:].split("=", 1)[0].replace("-", "_"), "=" in arg
            named.add(name)
            if name in texts and has_value:
                arg = f"--{name}={arg.split('=', 1)[1]!r}"
            elif name in params and not has_value and params[name].annotation not in (bool, "bool"):
                pending = name
            out.append(arg)
            continue
        positional.append(len(out))
        out.append(arg)
    if pending is not None and pending in texts:
        raise LlamaMPError(f"--{pending} needs a value; --help lists every option.")
    unnamed = [n for n in params if n not in named]  # what fire fills with positional arguments, in order
    for index, name in zip(positional, unnamed):
        if name in texts:
            out[index] = repr(out[index])
    return out


def check_options(fn: Callable, argv: List[str]) -> None:
    """Reject an --option that `fn` does not take, or a missing required one, before anything runs.
    Fire would hand an unknown option to `fn`'s return value after running the whole job, and only
    then complain; and it reports a missing one with a usage screen per rank. One-letter shortcuts
    (`-p`), which fire would match to an option by its first letter, are refused: options are written
    in full, so that what fire receives is what `exact_text` saw."""
    params = inspect.signature(fn).parameters
    takes_value = False
    given, positional = set(), 0
    for arg in argv:
        if not takes_value and (arg == "--" or arg in ("--help", "-h")):
            return
        if not takes_value and arg[:1] == "-" and arg[1:2].isalpha():
            raise LlamaMPError(f"Unknown option {arg.split('=', 1)[0]}: write options in full, with two dashes "
                               f"(--{', --'.join(params)}).")
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


def checked_values(fn: Callable) -> Callable:
    """`fn` as fire calls it, but refusing first, on every rank alike, a number outside its option's
    domain (checks.OPTION_DOMAINS) and a text option that is not UTF-8 text: before any work, whatever
    the command does with the value later."""
    signature = inspect.signature(fn)
    texts = [n for n in text_options(fn) if n not in PATH_OPTIONS]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            values = signature.bind(*args, **kwargs).arguments
        except TypeError:  # fire reports a call that does not fit the signature itself
            return fn(*args, **kwargs)

        def check(_=None) -> None:
            check_option_values(fn.__name__, values)
            for name in texts:
                if isinstance(values.get(name), str):
                    require_text(f"--{name}", values[name])

        try:
            check()
        except LlamaMPError as e:  # the same on every rank: the first local rank says it
            raise distributed.said_once(e, check, distributed.env_ranks()[2]) from None
        return fn(*args, **kwargs)

    return call


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
    _names_as_bytes()
    code = 1  # until fire returns: a bug that escapes keeps this, and its traceback
    try:
        argv, command, target = sys.argv[1:], [], component
        if isinstance(component, dict) and argv and argv[0] in component:  # `llama-mp SUBCOMMAND ...`
            command, argv, target = argv[:1], argv[1:], component[argv[0]]
        if inspect.isfunction(target):

            def checked() -> List[str]:
                check_options(target, argv)
                return exact_text(target, argv)

            try:
                argv = checked()
            except LlamaMPError as e:  # the same on every rank: the first local rank says it
                raise distributed.said_once(e, lambda _: checked(), distributed.env_ranks()[2]) from None
            if command:
                component = {**component, command[0]: checked_values(target)}
            else:
                component = checked_values(target)
            fire.Fire(component, command=command + argv, name=name)
        else:
            fire.Fire(component, name=name)
        code = 0
    except BrokenPipeError:  # stdout's reader went away (`... | head -1`): it has all it wanted
        discard_output()
        code = 0
    except Exception as e:  # noqa: BLE001 - sorted below; bugs are re-raised
        code = _report(e, interrupted[0])
    except KeyboardInterrupt:
        code = 130
    finally:
        distributed.teardown(failed=code != 0)
    sys.exit(code)


def _names_as_bytes() -> None:
    """Let stdout and stderr write a file name that is not UTF-8 as the bytes it is made of (Python holds
    them as surrogate escapes), as other Unix tools print such names: `wrote DIR` must not end in a
    UnicodeEncodeError. Text is refused before it gets here if it is not UTF-8 (`checked_values`)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and getattr(stream, "encoding", "").lower().replace("-", "") == "utf8":
            try:
                stream.reconfigure(errors="surrogateescape")
            except (ValueError, OSError):  # closed, or not a real text stream
                pass


def discard_output() -> None:
    """Point stdout and stderr at /dev/null once a reader went away, so that nothing later (the last
    lines, Python's flush at exit, which would print "Exception ignored ... BrokenPipeError") meets
    the closed pipe again. Nothing is said: the reader chose to stop reading."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):  # not a file (captured by a test, or closed)
            pass
    os.close(devnull)


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
