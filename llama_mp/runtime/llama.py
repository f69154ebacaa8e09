"""`Llama`: build a model-parallel model from a Meta checkpoint and generate text.

The public surface follows facebookresearch/llama (`Llama.build`, `generate`, `text_completion`,
`chat_completion`), so its users can switch imports. Every rank of the job calls the same methods with
the same arguments; rank 0's arguments are the ones used: it validates them and sends the work to the
others through the engine's rank protocol (engine.py). Every rank returns the same results.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple, TypedDict

import torch

from .. import distributed, families
from ..checkpoints.params import load_params
from ..checkpoints.quantize import refuse_quantized
from ..checks import described, require_int, require_seconds, require_seed, text_problem
from ..distributed import Group
from ..dtypes import choose_dtype
from ..errors import LlamaMPError
from ..quant.scheme import Scheme, parse_scheme
from .chat import UNSAFE_ERROR, Dialog, Message, check_dialogs, encode_dialog, has_special_tags
from .decode import choose_decoder
from .engine import Engine, Request
from .loading import load_checkpoint, ready_on_every_rank
from .model import Transformer
from .tokenizer import Tokenizer
from .tools import Tool, parse_calls


def quantize_scheme(quantize: Optional[str], group_size: Optional[int]) -> Optional[Scheme]:
    """The scheme `--quantize MODE [--group_size N]` asks for, None without --quantize, or a clear error."""
    if quantize is None:
        if group_size is not None:
            raise LlamaMPError(f"--group_size {group_size!r} sets the int4 groups of --quantize int4; add "
                               "--quantize int4, or leave --group_size out.")
        return None
    return parse_scheme(quantize, group_size)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]
    logprobs: List[float]


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]
    logprobs: List[float]


def log(group: Optional[Group], message: str) -> None:
    """A line on stderr from rank 0 only; stdout is kept for results."""
    if group is None or group.is_main:
        print(message, file=sys.stderr, flush=True)


def check_build_arguments(ckpt_dir, tokenizer_path, seed, timeout_s, load_timeout_s, quantize=None,
                          group_size=None) -> Tuple[str, str]:
    """The paths as strings (a pathlib.Path is welcome), if these arguments of `Llama.build` are sound;
    else a LlamaMPError. Checked before the process group starts, so a bad one costs no wait."""
    quantize_scheme(quantize, group_size)
    paths = []
    for name, path in (("ckpt_dir", ckpt_dir), ("tokenizer_path", tokenizer_path)):
        if not isinstance(path, (str, os.PathLike)):
            raise LlamaMPError(f"{name} must be a path (a string), got {described(path)}.")
        paths.append(os.fspath(path))
    require_seed("seed", seed)
    require_seconds("timeout_s", timeout_s)
    require_seconds("load_timeout_s", load_timeout_s)
    return paths[0], paths[1]


def check_prompts(prompts) -> None:
    """Raise a clear error unless `prompts` is a non-empty list (or tuple) of strings."""
    if isinstance(prompts, str):
        raise LlamaMPError("prompts must be a list of strings, got one string: wrap it in a list, "
                           f"[{described(prompts)}].")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise LlamaMPError(f"prompts must be a non-empty list of strings, got {described(prompts)}.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            hint = " Token ids go to generate(prompt_tokens=...)." if isinstance(prompt, (list, tuple)) else ""
            raise LlamaMPError(f"prompts must be a list of strings, but prompt {i} is {described(prompt)}.{hint}")
        if text_problem(prompt):
            raise LlamaMPError(f"prompt {i} {text_problem(prompt)}. Pass UTF-8 text.")


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, group: Group, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.group = group
        self.engine = Engine(model, group, tokenizer.stop_ids, seed)
        self.engine.ops.update({"text": self._text_op, "chat": self._chat_op})

    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        backend: str = "auto",
        device: str = "auto",
        dtype: str = "auto",
        decoder: str = "auto",
        timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
        load_timeout_s: float = distributed.DEFAULT_LOAD_TIMEOUT_S,
        group: Optional[Group] = None,
        quantize: Optional[str] = None,
        group_size: Optional[int] = None,
    ) -> "Llama":
        """Join the process group, load this rank's part of the checkpoint and the tokenizer.

        Call it on every rank (torchrun starts them). Any number of ranks that splits the model evenly
        works, whatever the checkpoint's shard count. `model_parallel_size`, if given, must equal the
        world size. `decoder` picks how decode steps run: "auto" (the CPU kernels where they can run,
        else PyTorch), "pytorch", "static", "compiled" (the static step compiled at load: CUDA graphs on a
        GPU, runtime/compiled.py) or "cpu_kernels". If any rank fails to load, every rank raises. Each wait
        for another rank is bounded by `timeout_s`, the wait for the slowest rank to finish loading by
        `load_timeout_s`. `group` is a process group from `distributed.setup` to join instead of a new one.
        `quantize` "int8" or "int4" (`group_size` 32, 64 or 128 for int4) quantizes a float checkpoint's
        layer weights while loading, one tensor at a time (the output layer in int8; embedding and norms
        stay in `dtype`, which is also the activations' dtype). A folder written by `llama-mp quantize`
        loads quantized without it.
        """
        try:
            ckpt_dir, tokenizer_path = check_build_arguments(ckpt_dir, tokenizer_path, seed, timeout_s,
                                                             load_timeout_s, quantize, group_size)
        except LlamaMPError as e:  # every rank finds it alike: the first local rank says it
            local_rank = group.local_rank if group is not None else distributed.env_ranks()[2]
            raise distributed.said_once(e, lambda _: check_build_arguments(
                ckpt_dir, tokenizer_path, seed, timeout_s, load_timeout_s, quantize, group_size), local_rank) from None
        scheme = quantize_scheme(quantize, group_size)
        group = group or distributed.setup(backend, device, timeout_s)
        start = time.perf_counter()
        loaded = {}

        def load() -> Transformer:
            if model_parallel_size is not None and model_parallel_size != group.world_size:
                raise LlamaMPError(f"model_parallel_size={model_parallel_size} but {group.world_size} process(es) "
                                   "were started; leave it unset, or start that many with torchrun.")
            require_int("max_seq_len", max_seq_len, 2)
            require_int("max_batch_size", max_batch_size, 1)
            loaded["dtype"] = torch_dtype = choose_dtype(dtype, group.device)
            params = load_params(ckpt_dir)
            loaded["tokenizer"] = tokenizer = Tokenizer(tokenizer_path, params.family)
            if scheme is not None:
                refuse_quantized(params, ckpt_dir)
            loaded["decoder"] = chosen = choose_decoder(decoder, group.device, torch_dtype, scheme or params.scheme,
                                                       params.family)
            if tokenizer.family != params.family:  # before any weight is read
                tok, model_family = families.named(tokenizer.family), families.family_of(params)
                raise LlamaMPError(f"The tokenizer {tokenizer_path!r} is a {tok.title} tokenizer ({tok.tokenizer_text}), "
                                   f"but {ckpt_dir!r} holds a {model_family.title} model (its params.json says so), "
                                   f"which needs a {model_family.tokenizer_text} one. Use the tokenizer.model shipped "
                                   "with this checkpoint.")
            model = load_checkpoint(ckpt_dir, group, torch_dtype, chosen, max_batch_size, max_seq_len, scheme)
            loaded["scheme"] = model.args.scheme
            if tokenizer.n_words > model.args.vocab_size:
                raise LlamaMPError(f"The tokenizer {tokenizer_path!r} has {tokenizer.n_words} pieces but the model "
                                   f"in {ckpt_dir!r} only has {model.args.vocab_size} token embeddings: they do not "
                                   "belong together. Use the tokenizer.model shipped with this checkpoint.")
            if tokenizer.n_words < model.args.vocab_size:  # a padded vocabulary: its extra ids are never generated
                model.limit_vocab(tokenizer.n_words)
                log(group, f"note: the model has {model.args.vocab_size} token embeddings and the tokenizer "
                           f"{tokenizer.n_words} pieces; ids from {tokenizer.n_words} on are never generated.")
            return model

        model = ready_on_every_rank(group, load, max_batch_size, max_seq_len, load_timeout_s)
        for note in families.family_of(model.args).loading_notes(model.args):
            log(group, "note: " + note)
        weights = "" if loaded["scheme"] is None else f"weights {loaded['scheme'].describe()}, "
        log(group, f"Loaded {ckpt_dir} on {group.world_size} rank(s) ({group.backend}, {group.device.type}, "
                   f"{weights}{str(loaded['dtype']).replace('torch.', '')}, {loaded['decoder'].name}) in "
                   f"{time.perf_counter() - start:.2f} s")
        return Llama(model, loaded["tokenizer"], group, seed)

    # ------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        top_k: int = 0,
        on_token: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt until eos or `max_gen_len` new tokens (or max_seq_len in all).

        Returns the generated ids per prompt (with the prompt in front if `echo`, eos excluded) and, with
        `logprobs`, the log-probability of each returned token. Greedy when temperature is 0.
        `on_token`, on rank 0, receives each step's new tokens ([batch] tensor on the host).
        """
        request = Request(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo)
        return self.engine.call("generate", lambda: self.engine.check(request), on_token=on_token)

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        top_k: int = 0,
        on_token: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> List[CompletionPrediction]:
        """Complete each prompt; `max_gen_len` defaults to filling max_seq_len."""
        def decide() -> Request:
            check_prompts(prompts)
            prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
            return self.engine.check(Request(prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, top_k,
                                             logprobs, echo))

        return self.engine.call("text", decide, on_token=on_token)

    def _text_op(self, request: Request, on_token=None) -> List[CompletionPrediction]:
        ids, lps = self.engine.generate(request, on_token)
        return [self._prediction(t, lps[i] if lps else None, wrap=None) for i, t in enumerate(ids)]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        top_k: int = 0,
        tools: Sequence[Tool] = (),
        tool_format: Optional[str] = None,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in the checkpoint family's chat format (Llama 2's or Llama 3's).

        A dialog whose messages contain the format's special tags is not run: its answer is Meta's error
        text, as in the reference implementation. `tools` (Llama 3.1 and later; runtime/tools.Tool) are
        offered in `tool_format` ("json": Llama 3.1, "python_list": 3.2, 3.3 and 4; None: the checkpoint
        family's own, json for Llama 3 and python_list for Llama 4); an answer that calls
        them has its calls (runtime/tools.ToolCall) in `generation["tool_calls"]` and an empty content, as
        Meta's `ChatFormat.decode_assistant_message` gives them. Tool results are messages of the `ipython`
        (or `tool`) role after the assistant message that called.
        """
        def decide() -> Tuple[List[bool], Request, Tuple[str, ...]]:
            check_dialogs(dialogs)
            if not all(isinstance(t, Tool) for t in tools):
                raise LlamaMPError(f"tools must be a list of llama_mp.runtime.tools.Tool, got {described(tools)}.")
            prompt_tokens = [encode_dialog(self.tokenizer, d, tools, tool_format) for d in dialogs]
            request = Request(prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, top_k, logprobs)
            return ([has_special_tags(d, self.tokenizer) for d in dialogs], self.engine.check(request),
                    tuple(t.name for t in tools))

        return self.engine.call("chat", decide)

    def _chat_op(self, payload: Tuple[List[bool], Request, Tuple[str, ...]]) -> List[ChatPrediction]:
        unsafe, request, tool_names = payload
        ids, lps = self.engine.generate(request)
        out: List[ChatPrediction] = []
        for i, t in enumerate(ids):
            if unsafe[i]:
                out.append({"generation": {"role": "assistant", "content": UNSAFE_ERROR}})
                continue
            prediction = self._prediction(t, lps[i] if lps else None, wrap="assistant")
            if tool_names:
                content, calls = parse_calls(prediction["generation"]["content"], self.tokenizer.family)
                if calls and all(c.name in tool_names for c in calls):
                    prediction["generation"].update(content=content, tool_calls=calls)
            out.append(prediction)
        return out

    def _gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.model.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _prediction(self, ids: List[int], lps: Optional[List[float]], wrap: Optional[str]) -> dict:
        text = self.tokenizer.decode(ids)
        pred: dict = {"generation": {"role": wrap, "content": text} if wrap else text, "token_ids": ids}
        if lps is not None:
            pred["tokens"] = [self.tokenizer.decode([x]) for x in ids]
            pred["logprobs"] = lps
        return pred
