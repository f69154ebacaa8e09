"""The two torchrun entry points: text completion and chat completion (see launch/, run by runner.py).

Each process of the job runs the same function; only rank 0 prints. Results go to stdout (human text,
or JSON Lines with --json); logs, timings and errors go to stderr. Errors exit non-zero with one
message from the rank that found the problem (exit codes: see errors.py).
"""

from __future__ import annotations

import json as jsonlib
import sys
import time
from typing import Callable, List, Optional, Union

from .. import distributed
from ..runtime.chat import load_dialogs
from ..runtime.llama import Llama, log
from ..runtime.tokenizer import TextStream
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
    decoder: str = "auto",
    json: bool = False,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    load_timeout_s: float = distributed.DEFAULT_LOAD_TIMEOUT_S,
) -> None:
    """Complete text prompts with a LLaMA checkpoint on every process of this torchrun job.

    --prompts takes one string or a JSON list of strings (built-in examples if absent). With one prompt
    and without --json, text is streamed as it is generated. --json prints one JSON object per prompt:
    {"prompt", "generation", "token_ids"[, "logprobs"]}. --timeout_s bounds every wait for another rank
    during generation; --load_timeout_s the wait for the slowest rank to load its shard. --decoder
    pytorch|cpu_kernels picks how decode steps run (auto: the CPU kernels where they can run).
    """
    prompt_list = _prompt_list(prompts)
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed,
                            backend=backend, device=device, dtype=dtype, decoder=decoder, timeout_s=timeout_s,
                            load_timeout_s=load_timeout_s)
    stream_one = len(prompt_list) == 1 and not json and generator.group.is_main
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
        elif stream_one:
            _stdout(stream.flush() + "\n")
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
) -> None:
    """Answer Llama 2 chat dialogs (a JSON file of dialogs via --dialogs; built-in examples otherwise).

    --json prints one JSON object per dialog: {"dialog", "generation": {"role", "content"}, "token_ids"}.
    Only the first node needs the --dialogs file: rank 0 reads it, before the model is loaded.
    """
    group = distributed.setup(backend, device, timeout_s)
    dialog_list = distributed.decided_by_main(group, lambda: load_dialogs(dialogs))
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed, dtype=dtype,
                            decoder=decoder, load_timeout_s=load_timeout_s, group=group)
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
