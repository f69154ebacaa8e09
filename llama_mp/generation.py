"""`Llama`: build a model-parallel model from a Meta checkpoint and generate text.

The public surface follows facebookresearch/llama (`Llama.build`, `generate`, `text_completion`,
`chat_completion`), so its users can switch imports. Every rank of the job calls the same methods with
the same arguments; rank 0's arguments are the ones used (it validates and broadcasts them). Greedy
decoding lets every rank find the argmax itself; otherwise rank 0 samples each next token and
broadcasts it. Every rank returns the same results.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, List, Optional, Tuple, TypedDict

import torch

from . import checkpoint, distributed
from .chat import UNSAFE_ERROR, Dialog, Message, check_dialog, encode_dialog, has_special_tags
from .collectives import broadcast_from_main_
from .distributed import DistEnv
from .dtypes import parse_dtype
from .errors import LlamaMPError
from .model import Transformer, skip_fairscale_init
from .params import ModelArgs, load_params
from .sampling import check_sampling, sample
from .tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]
    logprobs: List[float]


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]
    logprobs: List[float]


def log(env: Optional[DistEnv], message: str) -> None:
    """A line on stderr from rank 0 only; stdout is kept for results."""
    if env is None or env.is_main:
        print(message, file=sys.stderr, flush=True)


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return parse_dtype(str(dtype), extra=("auto",))


def load_weights(ckpt_dir: str, env: DistEnv, dtype: torch.dtype) -> Tuple[ModelArgs, Transformer]:
    """This rank's slice of the checkpoint in a model, not yet prepared. No collective runs here, so
    a rank that fails can still meet the others in `distributed.agree` instead of in a collective."""
    args, state = checkpoint.load_rank_state_dict(ckpt_dir, load_params(ckpt_dir), env.rank, env.world_size)
    with torch.device("meta"), skip_fairscale_init():  # shapes only: no random init, no memory
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=env.device, dtype=dtype)  # read from the memory-mapped shards only now
    model.requires_grad_(False)
    return args, model.eval()


def ready_on_every_rank(env: DistEnv, make_model: Callable[[], Transformer], max_batch_size: int,
                        max_seq_len: int, load_timeout_s: float) -> Transformer:
    """Make this rank's model with `make_model()` (load, or random weights) and prepare it; then the
    ranks agree that all of them succeeded before the first collective, so a failure on one rank is
    one message and a non-zero exit everywhere, never a rank left waiting."""
    error: Optional[BaseException] = None
    model = None
    try:
        model = make_model()
        model.prepare(max_batch_size, max_seq_len)
    except torch.OutOfMemoryError as e:
        error = LlamaMPError(
            f"Rank {env.rank} ran out of memory on {env.device} while loading the model for max_seq_len "
            f"{max_seq_len} and max_batch_size {max_batch_size} ({str(e).splitlines()[0]}). Run `llama-mp plan "
            "--ckpt_dir DIR --gpus N --gpu_mem_gb G` to see what fits: more ranks, a smaller --max_seq_len or "
            "--max_batch_size, or another --dtype.")
    except Exception as e:  # noqa: BLE001 - every rank must hear of any failure, or the others hang
        error = e
    distributed.agree(env, error, timeout_s=load_timeout_s)
    model.share_embedding()  # the first collective, once every rank is ready
    return model


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, env: DistEnv, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.env = env
        self.generator = torch.Generator(device=env.device)
        self.generator.manual_seed(seed)

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
        timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
        load_timeout_s: float = distributed.DEFAULT_LOAD_TIMEOUT_S,
    ) -> "Llama":
        """Join the process group, load this rank's part of the checkpoint and the tokenizer.

        Call it on every rank (torchrun starts them). Any number of ranks that splits the model evenly
        works, whatever the checkpoint's shard count. `model_parallel_size`, if given, must equal the
        world size. If any rank fails to load, every rank raises. Each wait for another rank is bounded
        by `timeout_s`, the wait for the slowest rank to finish loading by `load_timeout_s`.
        """
        env = distributed.setup(backend, device, timeout_s)
        start = time.perf_counter()
        loaded = {}

        def load() -> Transformer:
            if model_parallel_size is not None and model_parallel_size != env.world_size:
                raise LlamaMPError(f"model_parallel_size={model_parallel_size} but {env.world_size} process(es) "
                                   "were started; leave it unset, or start that many with torchrun.")
            for name, value, least in (("max_seq_len", max_seq_len, 2), ("max_batch_size", max_batch_size, 1)):
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise LlamaMPError(f"{name} must be an integer >= {least}, got {value!r}.")
            loaded["dtype"] = choose_dtype(dtype, env.device)
            loaded["tokenizer"] = tokenizer = Tokenizer(tokenizer_path)
            args, model = load_weights(ckpt_dir, env, loaded["dtype"])
            if tokenizer.n_words > args.vocab_size:
                raise LlamaMPError(f"The tokenizer {tokenizer_path!r} has {tokenizer.n_words} pieces but the model "
                                   f"in {ckpt_dir!r} only has {args.vocab_size} token embeddings: they do not belong "
                                   "together. Use the tokenizer.model shipped with this checkpoint.")
            return model

        model = ready_on_every_rank(env, load, max_batch_size, max_seq_len, load_timeout_s)
        log(env, f"Loaded {ckpt_dir} on {env.world_size} rank(s) ({env.backend}, {env.device.type}, "
                 f"{str(loaded['dtype']).replace('torch.', '')}) in {time.perf_counter() - start:.2f} s")
        return Llama(model, loaded["tokenizer"], env, seed)

    # ------------------------------------------------------------------------------------------
    def _check_request(self, prompt_tokens, max_gen_len: int, temperature: float, top_p: float, top_k: int) -> None:
        limits = f"(max_batch_size {self.model.max_batch_size}, max_seq_len {self.model.max_seq_len})"
        if not isinstance(prompt_tokens, list) or not prompt_tokens:
            raise LlamaMPError("No prompts were given: pass at least one prompt.")
        if len(prompt_tokens) > self.model.max_batch_size:
            raise LlamaMPError(f"{len(prompt_tokens)} prompts were given but the model was built for at most "
                               f"{self.model.max_batch_size} at once {limits}. Raise --max_batch_size (more KV cache "
                               "memory) or pass fewer prompts.")
        vocab = self.model.args.vocab_size
        for i, p in enumerate(prompt_tokens):
            if not p:
                raise LlamaMPError(f"Prompt {i} is empty (no tokens).")
            if len(p) >= self.model.max_seq_len:
                raise LlamaMPError(f"Prompt {i} has {len(p)} tokens, which leaves no room to generate within "
                                   f"max_seq_len {self.model.max_seq_len}. Shorten it or raise --max_seq_len.")
            if min(p) < 0 or max(p) >= vocab:
                raise LlamaMPError(f"Prompt {i} has token ids outside the vocabulary [0, {vocab}).")
        if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 1:
            raise LlamaMPError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}.")
        check_sampling(temperature, top_p, top_k)

    @torch.inference_mode()
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
        env = self.env
        request = (prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo)

        def checked():
            self._check_request(prompt_tokens, max_gen_len, temperature, top_p, top_k)
            return request

        prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo = distributed.decided_by_main(env, checked)
        return self._generate(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, on_token)

    def _generate(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo, on_token):
        env, model, device = self.env, self.model, self.env.device
        bsz = len(prompt_tokens)
        lengths = [len(p) for p in prompt_tokens]
        min_len, max_len = min(lengths), max(lengths)
        total_len = min(model.max_seq_len, max_gen_len + max_len)
        eos = self.tokenizer.eos_id

        tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)
        in_prompt = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
        for i, p in enumerate(prompt_tokens):
            tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long, device=device)
            in_prompt[i, :len(p)] = True
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float32, device=device) if logprobs else None
        chosen = torch.empty(bsz, dtype=torch.long, device=device)  # the broadcast buffer, reused

        # Greedy without logprobs needs no logits on rank 0: every rank finds the argmax itself (one
        # tiny all-gather), so neither the logits gather nor the token broadcast is needed.
        greedy_everywhere = temperature == 0 and not logprobs
        prev = 0
        for cur in range(min_len, total_len):
            # First call: the shortest prompt in one forward. Then one position per call; where a
            # longer prompt still has tokens, its own token is kept instead of the chosen one.
            want_all = logprobs and echo and prev == 0
            h = model.hidden(tokens[:, prev:cur], prev, all_positions=want_all)
            if greedy_everywhere:
                step = model.greedy_next(h)
            else:
                logits = model.logits(h)  # rank 0 only
                if env.is_main:
                    step = sample(logits[:, -1], temperature, top_p, top_k, self.generator)
            if cur < max_len and (greedy_everywhere or env.is_main):
                step = torch.where(in_prompt[:, cur], tokens[:, cur], step)
            if not greedy_everywhere:
                if env.is_main:
                    if logprobs:
                        self._record_logprobs(token_logprobs, logits, tokens, step, cur, want_all)
                    chosen.copy_(step)
                step = broadcast_from_main_(chosen)
            tokens[:, cur] = step
            done |= ~in_prompt[:, cur] & (step == eos)
            prev = cur
            if on_token is not None and env.is_main:
                on_token(step.cpu())
            if done.all():  # the one host sync per step
                break

        out_tokens, out_logprobs = [], []
        rows = tokens.tolist()
        lp_rows = token_logprobs.tolist() if logprobs else None
        for i, length in enumerate(lengths):
            start = 0 if echo else length
            end = min(length + max_gen_len, total_len)
            generated = rows[i][length:end]
            stop = length + generated.index(eos) if eos in generated else end
            out_tokens.append(rows[i][start:stop])
            if logprobs:
                out_logprobs.append(lp_rows[i][start:stop])
        return out_tokens, (out_logprobs if logprobs else None)

    @staticmethod
    def _record_logprobs(token_logprobs, logits, tokens, step, cur: int, all_positions: bool) -> None:
        """Log-probabilities of the tokens at `cur` (and, on an echo prefill, of the prompt before it)."""
        if all_positions and cur > 1:
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            token_logprobs[:, 1:cur] = lp.gather(-1, tokens[:, 1:cur, None])[..., 0]
        token_logprobs[:, cur] = torch.log_softmax(logits[:, -1], dim=-1).gather(-1, step[:, None])[:, 0]

    # ------------------------------------------------------------------------------------------
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
        if max_gen_len is None:
            max_gen_len = self.model.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        ids, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, top_k, on_token)
        return [self._prediction(t, lps[i] if logprobs else None, wrap=None) for i, t in enumerate(ids)]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        top_k: int = 0,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant (Llama 2 chat format).

        A dialog whose messages contain the format's special tags is not run: its answer is Meta's error
        text, as in the reference implementation.
        """
        if max_gen_len is None:
            max_gen_len = self.model.max_seq_len - 1
        def checked() -> List[Dialog]:
            for i, dialog in enumerate(dialogs):
                check_dialog(dialog, i)
            return dialogs

        dialogs = distributed.decided_by_main(self.env, checked)  # one message, from rank 0
        unsafe = [has_special_tags(d) for d in dialogs]
        prompt_tokens = [encode_dialog(self.tokenizer, d) for d in dialogs]
        ids, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, False, top_k)
        out: List[ChatPrediction] = []
        for i, t in enumerate(ids):
            if unsafe[i]:
                out.append({"generation": {"role": "assistant", "content": UNSAFE_ERROR}})
            else:
                out.append(self._prediction(t, lps[i] if logprobs else None, wrap="assistant"))
        return out

    def _prediction(self, ids: List[int], lps: Optional[List[float]], wrap: Optional[str]) -> dict:
        text = self.tokenizer.decode(ids)
        pred: dict = {"generation": {"role": wrap, "content": text} if wrap else text, "token_ids": ids}
        if lps is not None:
            pred["tokens"] = [self.tokenizer.decode([x]) for x in ids]
            pred["logprobs"] = lps
        return pred
