"""The two torchrun entry points: text completion and chat completion (see launch/, run by runner.py).

Each process of the job runs the same function; only rank 0 prints. Results go to stdout (human text,
or JSON Lines with --json); logs, timings and errors go to stderr. Errors exit non-zero with one
message from the rank that found the problem (exit codes: see errors.py).
"""

from __future__ import annotations

import json as jsonlib
import shlex
import sys
import time
from typing import Callable, List, Optional, TypeVar

from .. import distributed
from ..checks import JsonProblem, described, parse_json, require_text, text_problem
from ..errors import LlamaMPError
from ..runtime.chat import load_dialogs
from ..runtime.llama import Llama, check_build_arguments, log
from ..runtime.sampling import check_sampling
from ..runtime.tokenizer import TextStream
from .runner import discard_output

T = TypeVar("T")

EXAMPLE_PROMPTS = [
    "The best thing about running a language model on your own machine is",
    "Simply put, the theory of relativity states that ",
    "A short poem about the sea:\n",
    "Translate English to French:\n\nsea otter => loutre de mer\ncheese =>",
]


def _before_loading(check: Callable[[], T]) -> T:
    """`check()`, run on every rank before the process group starts, so that a bad option costs no model
    load; every rank finds the same problem, and the first local rank of each node says it."""
    try:
        return check()
    except LlamaMPError as e:
        raise distributed.said_once(e, lambda _: check(), distributed.env_ranks()[2]) from None


def prompts_from_text(text: Optional[str]) -> List[str]:
    """The prompts `--prompts TEXT` asks for; the runner hands TEXT over exactly as typed.

    TEXT is one prompt, as typed, unless it is JSON: a JSON list of strings is several prompts (the only
    list form), any other JSON list is refused, and so is a JSON object (a likely mistake; to send such
    text as a prompt, wrap it in a JSON list). Text that only looks like JSON, such as `[INST] hi`, is a
    prompt. Without --prompts, the built-in examples."""
    if text is None:
        return list(EXAMPLE_PROMPTS)
    require_text("--prompts", text)
    start = text.lstrip()[:1]
    if start not in ("[", "{"):
        return [text]
    wrap = "To send this text as one prompt, wrap it in a JSON list" + (
        f": --prompts {shlex.quote(jsonlib.dumps([text]))}" if len(text) <= 200 else " of one string")
    try:
        value = parse_json(text)
    except JsonProblem as e:
        if e.syntax:  # not JSON: a prompt as typed
            return [text]
        raise LlamaMPError(f"--prompts reads as JSON but {e.reason}. {wrap}.") from None
    if isinstance(value, dict):
        raise LlamaMPError(f"--prompts is a JSON object, but prompts are one text or a JSON list of texts. {wrap}.")
    if not value:
        raise LlamaMPError("--prompts is an empty JSON list; give at least one prompt, or leave --prompts out "
                           "for the built-in examples.")
    for i, prompt in enumerate(value):
        if not isinstance(prompt, str):
            raise LlamaMPError(f"--prompts is a JSON list, but its item {i} is {jsonlib.dumps(prompt)[:60]}, not a "
                               f"string: a JSON list must hold only strings, one per prompt. {wrap}.")
        if text_problem(prompt):
            raise LlamaMPError(f"--prompts is a JSON list whose prompt {i} {text_problem(prompt)}. Pass UTF-8 text.")
    return value


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class _Streamed:
    """Rank 0's view of one prompt streamed as it is generated: the prompt is printed with the first
    token, once the request was accepted (a refused one leaves stdout empty), then each piece of text.

    If stdout's reader goes away (`... | head -1`), a process alone stops at once (the runner ends it
    quietly); in a job of several ranks, whose peers are in step with this one until the request ends,
    rank 0 finishes it without printing."""

    def __init__(self, generator: Llama, prompt: str):
        self.stream = TextStream(generator.tokenizer)
        self.stop_ids, self.prompt = set(generator.tokenizer.stop_ids), prompt
        self.alone = generator.group.world_size == 1
        self.started = False

    def _write(self, text: str) -> None:
        try:
            _stdout(text)
        except BrokenPipeError:
            if self.alone:
                raise
            discard_output()

    def __call__(self, step) -> None:
        if not self.started:
            self.started = True
            self._write(self.prompt)
        if int(step[0]) not in self.stop_ids:
            self._write(self.stream.push(int(step[0])))

    def finish(self) -> None:
        if not self.started:
            self._write(self.prompt)
        self._write(self.stream.flush() + "\n")


def text_completion(
    ckpt_dir: str,
    tokenizer_path: str,
    prompts: Optional[str] = None,
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
    decoder: str = "auto",
    json: bool = False,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    load_timeout_s: float = distributed.DEFAULT_LOAD_TIMEOUT_S,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
) -> None:
    """Complete text prompts with a LLaMA checkpoint on every process of this torchrun job.

    --prompts is one prompt, exactly as typed (commas, numbers, "None" and all), or a JSON list of
    strings for several: --prompts '["a, b", "c"]'. Other JSON lists and JSON objects are refused (wrap
    such text in a JSON list to send it as a prompt); built-in examples if --prompts is absent. With one
    prompt and without --json, text is streamed as it is generated. --json prints one JSON object per
    prompt: {"prompt", "generation", "token_ids"[, "logprobs"]}. --decoder
    pytorch|static|compiled|cpu_kernels picks how decode steps run (auto: the CPU kernels where they can
    run; compiled: the static step compiled whole at load, CUDA graphs on a GPU). If stdout's reader goes away
    (`| head -1`), the job stops writing and exits 0 without a message.

    Values: --temperature 0 (greedy) or a number from 0.001 to 100 (below, float32 logits overflow; above,
    every token is equally likely); --top_p in (0, 1]; --top_k an integer >= 0 (0: off); --seed an integer
    from 0 to 2**64 - 1; --timeout_s bounds every wait for another rank during generation, and
    --load_timeout_s the wait for the slowest rank to load its shard: seconds from 0.001 to 604800 (a week).
    --quantize int8|int4 (--group_size 32|64|128 for int4, default 32) quantizes a float checkpoint's layer
    weights while loading (a folder written by `llama-mp quantize` is loaded quantized without it).
    """
    def check() -> List[str]:
        check_sampling(temperature, top_p, top_k, "--{}")
        check_build_arguments(ckpt_dir, tokenizer_path, seed, timeout_s, load_timeout_s, quantize, group_size)
        return prompts_from_text(prompts)

    prompt_list = _before_loading(check)
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed,
                            backend=backend, device=device, dtype=dtype, decoder=decoder, timeout_s=timeout_s,
                            load_timeout_s=load_timeout_s, quantize=quantize, group_size=group_size)
    stream_one = len(prompt_list) == 1 and not json and generator.group.is_main
    streamed = _Streamed(generator, prompt_list[0]) if stream_one else None

    start = time.perf_counter()
    results = generator.text_completion(prompt_list, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len,
                                        logprobs=logprobs, echo=echo, top_k=top_k, on_token=streamed)
    elapsed = time.perf_counter() - start
    if not generator.group.is_main:
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
        elif streamed is not None:
            streamed.finish()
        else:
            _stdout(f"{prompt}{result['generation']}\n\n==================================\n\n")
    log(generator.group, f"Generated {new_tokens} tokens in {elapsed:.2f} s ({new_tokens / max(elapsed, 1e-9):.1f} tok/s)")


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
    decoder: str = "auto",
    json: bool = False,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    load_timeout_s: float = distributed.DEFAULT_LOAD_TIMEOUT_S,
    interactive: bool = False,
    system: Optional[str] = None,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    tools: Optional[str] = None,
    tool_format: Optional[str] = None,
) -> None:
    """Answer chat dialogs (a JSON file of dialogs via --dialogs; built-in examples otherwise), or chat in
    the terminal with --interactive (as launch/chat.py does; --system TEXT sets its system message).

    --dialogs is the path of a JSON file (taken as typed): a list of dialogs, each a list of
    {"role": "system"|"user"|"assistant", "content": ...} messages, [system?] user (assistant user)*: the
    last message is the user's. --json prints one JSON object per dialog: {"dialog", "generation":
    {"role", "content"}, "token_ids"}. Only the first node needs the --dialogs file: rank 0 reads it,
    before the model is loaded. --temperature, --top_p, --top_k, --seed, --timeout_s and --load_timeout_s
    take the values text_completion's --help lists (temperature 0 or 0.001 to 100, top_p in (0, 1], ...),
    and so do --quantize and --group_size (quantize a float checkpoint while loading). --tools FILE.json and
    --tool_format belong to the interactive chat (see launch/chat.py --help).
    """
    if interactive or system is not None or tools is not None or tool_format is not None:
        from .chat import chat, check_interactive_options  # chat.py builds on this module

        _before_loading(lambda: check_interactive_options(interactive, system, dialogs, json, logprobs,
                                                          tools is not None or tool_format is not None))
        return chat(ckpt_dir, tokenizer_path, system, max_seq_len, max_batch_size, max_gen_len, temperature,
                    top_p, top_k, seed, backend, device, dtype, decoder, timeout_s, load_timeout_s,
                    quantize=quantize, group_size=group_size, tools=tools, tool_format=tool_format)
    _before_loading(lambda: (check_sampling(temperature, top_p, top_k, "--{}"),
                             check_build_arguments(ckpt_dir, tokenizer_path, seed, timeout_s, load_timeout_s,
                                                   quantize, group_size)))
    group = distributed.setup(backend, device, timeout_s)
    dialog_list = distributed.decided_by_main(group, lambda: load_dialogs(dialogs))
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed, dtype=dtype,
                            decoder=decoder, load_timeout_s=load_timeout_s, group=group, quantize=quantize,
                            group_size=group_size)
    results = generator.chat_completion(dialog_list, temperature=temperature, top_p=top_p,
                                        max_gen_len=max_gen_len, logprobs=logprobs, top_k=top_k)
    if not generator.group.is_main:
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
