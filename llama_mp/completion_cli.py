"""The two torchrun entry points: text completion and chat completion (see launch/).

Each process of the job runs the same function; only rank 0 prints. Results go to stdout (human text,
or JSON Lines with --json); logs, timings and errors go to stderr. Errors exit non-zero with one
message from the rank that found the problem (exit codes: see errors.py).
"""

from __future__ import annotations

import difflib
import inspect
import json as jsonlib
import signal
import sys
import time
from typing import Callable, List, Optional, Union

from . import distributed
from .chat import load_dialogs
from .errors import LlamaMPError, RemoteRankError, report
from .generation import Llama, log
from .tokenizer import TextStream

REPORTER_GRACE_S = 1.0
EXAMPLE_PROMPTS = [
    "The best thing about running a language model on your own machine is",
    "Simply put, the theory of relativity states that ",
    "A short poem about the sea:\n",
    "Translate English to French:\n\nsea otter => loutre de mer\ncheese =>",
]


def _prompt_list(prompts: Union[None, str, List[str], tuple]) -> List[str]:
    if prompts is None:
        return list(EXAMPLE_PROMPTS)
    if isinstance(prompts, (list, tuple)):
        return [str(p) for p in prompts]
    return [str(prompts)]  # fire turns --prompts 42 into an int


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def text_completion(
    ckpt_dir: str,
    tokenizer_path: str,
    prompts: Union[None, str, List[str]] = None,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: int = 64,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int = 0,
    seed: int = 1,
    logprobs: bool = False,
    echo: bool = False,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    json: bool = False,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    load_timeout_s: float = distributed.DEFAULT_LOAD_TIMEOUT_S,
) -> None:
    """Complete text prompts with a LLaMA checkpoint on every process of this torchrun job.

    --prompts takes one string or a JSON list of strings (built-in examples if absent). With one prompt
    and without --json, text is streamed as it is generated. --json prints one JSON object per prompt:
    {"prompt", "generation", "token_ids"[, "logprobs"]}. --timeout_s bounds every wait for another rank
    during generation; --load_timeout_s the wait for the slowest rank to load its shard.
    """
    prompt_list = _prompt_list(prompts)
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed,
                            backend=backend, device=device, dtype=dtype, timeout_s=timeout_s,
                            load_timeout_s=load_timeout_s)
    stream_one = len(prompt_list) == 1 and not json and generator.env.is_main
    on_token: Optional[Callable] = None
    if stream_one:
        stream = TextStream(generator.tokenizer)
        eos = generator.tokenizer.eos_id
        _stdout(prompt_list[0])

        def on_token(step):
            if step[0] != eos:
                _stdout(stream.push(int(step[0])))

    start = time.perf_counter()
    results = generator.text_completion(prompt_list, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len,
                                        logprobs=logprobs, echo=echo, top_k=top_k, on_token=on_token)
    elapsed = time.perf_counter() - start
    if not generator.env.is_main:
        return
    new_tokens = sum(len(r["token_ids"]) for r in results)
    if echo:  # token_ids then start with the prompt
        new_tokens -= sum(len(generator.tokenizer.encode(p, bos=True, eos=False)) for p in prompt_list)
    for prompt, result in zip(prompt_list, results):
        if json:
            record = {"prompt": prompt, "generation": result["generation"], "token_ids": result["token_ids"]}
            if logprobs:
                record["logprobs"] = result["logprobs"]
            _stdout(jsonlib.dumps(record, ensure_ascii=False) + "\n")
        elif stream_one:
            _stdout(stream.flush() + "\n")
        else:
            _stdout(f"{prompt}{result['generation']}\n\n==================================\n\n")
    log(generator.env, f"Generated {new_tokens} tokens in {elapsed:.2f} s ({new_tokens / max(elapsed, 1e-9):.1f} tok/s)")


def chat_completion(
    ckpt_dir: str,
    tokenizer_path: str,
    dialogs: Optional[str] = None,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int = 0,
    seed: int = 1,
    logprobs: bool = False,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    json: bool = False,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    load_timeout_s: float = distributed.DEFAULT_LOAD_TIMEOUT_S,
) -> None:
    """Answer Llama 2 chat dialogs (a JSON file of dialogs via --dialogs; built-in examples otherwise).

    --json prints one JSON object per dialog: {"dialog", "generation": {"role", "content"}, "token_ids"}.
    Only the first node needs the --dialogs file: rank 0 reads it, before the model is loaded.
    """
    env = distributed.setup(backend, device, timeout_s)
    dialog_list = distributed.decided_by_main(env, lambda: load_dialogs(dialogs))
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed,
                            backend=backend, device=device, dtype=dtype, timeout_s=timeout_s,
                            load_timeout_s=load_timeout_s)
    results = generator.chat_completion(dialog_list, temperature=temperature, top_p=top_p,
                                        max_gen_len=max_gen_len, logprobs=logprobs, top_k=top_k)
    if not generator.env.is_main:
        return
    for dialog, result in zip(dialog_list, results):
        if json:
            record = {"dialog": dialog, "generation": result["generation"], "token_ids": result.get("token_ids", [])}
            if logprobs and "logprobs" in result:
                record["logprobs"] = result["logprobs"]
            _stdout(jsonlib.dumps(record, ensure_ascii=False) + "\n")
            continue
        for msg in dialog:
            _stdout(f"{msg['role'].capitalize()}: {msg['content']}\n\n")
        _stdout(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}\n"
                "\n==================================\n\n")


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
