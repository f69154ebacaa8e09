"""The engine: one generation loop run by every rank, and the protocol that keeps the ranks in step.

Rank protocol. Rank 0 decides every piece of work: it validates a request and sends `(op, payload)` to
the other ranks, which run the same op on the same payload (`call`); a request rank 0 refuses is said
once, by rank 0. Code where every rank calls the same method (Meta's API: `Llama.generate` on each
rank; there the refusal stops every rank) and code where only rank 0 takes requests while the others
wait in `serve()` (a server; there they wait for the next one) use the same messages.

Generation. `generate` prefills the prompts, then decodes one position per step; a step's tokens are
chosen by `sampling.choose_tokens` (`next_token`), the server's batch's own choice too: greedy decoding
finds the argmax across the ranks' vocabulary slices (no logits move), sampling gathers the logits on
rank 0, samples there and broadcasts the ids. Nothing of a step is read on the host but the stop check,
every `Decoder.steps_per_stop_check` steps; tokens streamed to `on_token` are copied to the host as
each step is queued and handed over one step late, after the next step is queued (runtime/transfer.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..checks import described, is_int, require_bool, require_int
from ..distributed import Group, broadcast_from_main
from ..distributed.failure import patience, waking_peers_on_loss
from ..errors import LlamaMPError, RemoteRankError, report
from .model import Transformer
from .prefixes import common_prefix
from .transfer import Readback, upload
from .sampling import Choice, Forced, RowSampling, check_sampling, choose_tokens, make_generator
from .scoring import score_hidden

STOP, REFUSED = "stop", "refused"  # the protocol's own ops
PROMPT_TOKENS_FORM = ("prompt_tokens must be a list of prompts, each a list of token ids (Python ints), e.g. "
                      "[[1, 306, 4658]]")


def check_prompt_tokens(prompt_tokens) -> List[List[int]]:
    """`prompt_tokens` as a list of lists of ints, or a LlamaMPError that says which prompt and which id
    is wrong. Lists and tuples are accepted; tensors and arrays are not: `.tolist()` says what they hold."""
    if not isinstance(prompt_tokens, (list, tuple)):
        raise LlamaMPError(f"{PROMPT_TOKENS_FORM}; got {described(prompt_tokens)}.{_hint(prompt_tokens)}")
    prompts = []
    for i, prompt in enumerate(prompt_tokens):
        if not isinstance(prompt, (list, tuple)):
            raise LlamaMPError(f"{PROMPT_TOKENS_FORM}; prompt {i} is {described(prompt)}.{_hint(prompt)}")
        for j, token in enumerate(prompt):
            if not is_int(token):
                raise LlamaMPError(f"{PROMPT_TOKENS_FORM}; prompt {i} has {described(token)} at position {j}, "
                                   "which is not a token id.")
        prompts.append(list(prompt))
    return prompts


def _hint(value) -> str:
    if isinstance(value, str):
        return " Text goes to text_completion, or through tokenizer.encode(text, bos=True, eos=False)."
    if hasattr(value, "tolist"):  # a tensor or an array
        return " Pass ids.tolist()."
    return ""


@dataclass(frozen=True)
class Request:
    """One batch of prompts to continue, as rank 0 validated it."""

    prompt_tokens: List[List[int]]
    max_gen_len: int
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    logprobs: bool = False
    echo: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Engine:
    """Runs requests on one rank's model, in step with the other ranks of its group."""

    def __init__(self, model: Transformer, group: Group, stop_ids: Sequence[int], seed: int = 1):
        self.model, self.group = model, group
        self.stop_ids = list(stop_ids)
        self.generator = make_generator(group.device, seed)
        self.ops: Dict[str, Callable[..., Any]] = {"generate": self.generate, "score": self.score}
        # Prefix caching for `generate`: the tokens the last generation left in cache rows 0.. (the same on
        # every rank), which a later prompt that starts the same way continues from; whatever else writes
        # the cache forgets them (`forget_rows`). `cached_tokens`: what the last call did not prefill.
        self.rows_hold: List[List[int]] = []
        self.cached_tokens = 0

    # ------------------------------------------------------------------------------------------
    # Rank protocol

    def call(self, op: str, decide: Callable[[], Any], **local) -> Any:
        """Every rank: run `op` on the payload rank 0's `decide()` returns. If `decide` raises, rank 0 says
        so (one message) and re-raises; ranks that called `call` too raise RemoteRankError, ranks in
        `serve()` wait for the next request. `local` arguments (callbacks) stay on this rank."""
        with waking_peers_on_loss(self.group):
            return self._call(op, decide, **local)

    def _call(self, op: str, decide: Callable[[], Any], **local) -> Any:
        if self.group.is_main:
            try:
                payload = decide()
            except Exception as e:  # noqa: BLE001 - the others must hear of any failure, or they hang
                if isinstance(e, LlamaMPError):
                    report(e)  # before the others hear of it (they may exit at once)
                broadcast_from_main(self.group, (REFUSED, None))
                raise
            broadcast_from_main(self.group, (op, payload))
            return self.ops[op](payload, **local)
        op, payload = broadcast_from_main(self.group, None)
        if op == REFUSED:
            raise RemoteRankError("rank 0 refused the request; see its message.")
        if op == STOP:
            raise LlamaMPError("rank 0 stopped serving while this rank expected work.")
        return self.ops[op](payload)

    def serve(self, idle_timeout_s: Optional[float] = None) -> None:
        """Ranks other than 0: run whatever rank 0 sends, until it sends `stop()`.

        `idle_timeout_s` bounds the wait for rank 0's next request when that wait is not the group's
        `timeout_s`: in an interactive chat rank 0 waits for a person, who may think for minutes, while
        a silent peer during a request must still be given up on after `timeout_s`."""
        with waking_peers_on_loss(self.group):
            self._serve(idle_timeout_s)

    def _serve(self, idle_timeout_s: Optional[float]) -> None:
        while True:
            with patience(self.group, idle_timeout_s):
                op, payload = broadcast_from_main(self.group, None)
            if op == STOP:
                return
            if op != REFUSED:
                self.ops[op](payload)

    def forget_rows(self) -> None:
        """Something other than `generate` writes the KV cache: what the rows held is not known any more."""
        self.rows_hold = []

    def stop(self) -> None:
        """Rank 0: let the ranks in `serve()` return."""
        broadcast_from_main(self.group, (STOP, None))

    # ------------------------------------------------------------------------------------------
    # Requests

    def check(self, request: Request) -> Request:
        """`request` if this model can run it, else a LlamaMPError saying what to change. Prompts may be
        lists or tuples (the request returned holds lists) of Python ints; anything else, a tensor or a
        float id included, is refused rather than converted, since converting would truncate 1.9 to 1."""
        model = self.model
        prompts = check_prompt_tokens(request.prompt_tokens)
        limits = f"(max_batch_size {model.max_batch_size}, max_seq_len {model.max_seq_len})"
        if not prompts:
            raise LlamaMPError("No prompts were given: pass at least one prompt.")
        if len(prompts) > model.max_batch_size:
            raise LlamaMPError(f"{len(prompts)} prompts were given but the model was built for at most "
                               f"{model.max_batch_size} at once {limits}. Raise --max_batch_size (more KV cache "
                               "memory) or pass fewer prompts.")
        vocab = model.args.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise LlamaMPError(f"Prompt {i} is empty (no tokens).")
            if len(p) >= model.max_seq_len:
                raise LlamaMPError(f"Prompt {i} has {len(p)} tokens, which leaves no room to generate within "
                                   f"max_seq_len {model.max_seq_len}. Shorten it or raise --max_seq_len.")
            if min(p) < 0 or max(p) >= vocab:
                raise LlamaMPError(f"Prompt {i} has token ids outside the vocabulary [0, {vocab}).")
        require_int("max_gen_len", request.max_gen_len, 1)
        check_sampling(request.temperature, request.top_p, request.top_k)
        require_bool("logprobs", request.logprobs)
        require_bool("echo", request.echo)
        return replace(request, prompt_tokens=prompts)

    def check_score(self, tokens) -> List[int]:
        """`tokens` if `score` can run them: 2 to max_seq_len ids of the vocabulary."""
        tokens, = check_prompt_tokens([tokens])
        if not 2 <= len(tokens) <= self.model.max_seq_len:
            raise LlamaMPError(f"Scoring needs 2 to max_seq_len ({self.model.max_seq_len}) tokens at once, got "
                               f"{len(tokens)}. Use a shorter window or raise --max_seq_len.")
        if min(tokens) < 0 or max(tokens) >= self.model.args.vocab_size:
            raise LlamaMPError(f"Token ids outside the vocabulary [0, {self.model.args.vocab_size}).")
        return tokens

    # ------------------------------------------------------------------------------------------
    # Teacher forcing and generation (every rank)

    @torch.inference_mode()
    def score(self, tokens: List[int]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Teacher forcing over one sequence: the log-probability of each token given the ones before it
        and the most likely token at each of those positions, two [len - 1] tensors on the host (float32,
        int64) on rank 0; None on the other ranks. The KV cache is overwritten from position 0."""
        self.forget_rows()
        ids = upload(tokens, self.group.device)
        h = self.model.hidden(ids[None], 0, all_positions=True)[0]  # [len, dim]
        scores = score_hidden(self.model, h[:-1], ids[1:], top=1)
        return None if scores is None else (scores.logprobs.cpu(), scores.top_ids[:, 0].cpu())

    @torch.inference_mode()
    def generate(self, request: Request, on_token: Optional[Callable[[torch.Tensor], None]] = None
                 ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt until a stop token or `max_gen_len` new tokens (or max_seq_len in all).

        Returns the ids per prompt (the prompt in front if `echo`, the stop token excluded) and, with
        `logprobs`, each returned token's log-probability (rank 0; zeros elsewhere). `on_token`, on rank 0,
        receives each step's new tokens ([batch] tensor on the host), up to the step where every row has
        stopped; each one once the next step is queued (the last after the loop)."""
        model, device, main = self.model, self.group.device, self.group.is_main
        prompts, logprobs = request.prompt_tokens, request.logprobs
        bsz = len(prompts)
        lengths = [len(p) for p in prompts]
        min_len, max_len = min(lengths), max(lengths)
        total_len = min(model.max_seq_len, request.max_gen_len + max_len)
        # the positions every row holds already (a scored echo needs every prompt position's logits)
        held, self.rows_hold = self.rows_hold, []
        start = 0 if (logprobs and request.echo) or len(held) < bsz else \
            min(min(common_prefix(h, p) for h, p in zip(held, prompts)), min_len - 1)
        self.cached_tokens = start * bsz

        tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)     # prompts, then output
        in_prompt = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)  # which are prompt ids
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = upload(p, device)
            in_prompt[i, :len(p)] = True
        stop_ids = upload(self.stop_ids, device)
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float32, device=device) if logprobs else None

        check_every = model.decoder.steps_per_stop_check
        stream = _Stream(on_token, lengths, self.stop_ids) if on_token is not None and main else None
        prev = start
        for cur in range(min_len, total_len):
            # First call: the shortest prompt in one forward (after what the rows hold). Then one position
            # per call; where a longer prompt still has tokens, its own token is kept instead of the chosen one.
            want_all = logprobs and request.echo and cur == min_len
            h = model.hidden(tokens[:, prev:cur], prev, all_positions=want_all)
            forced = (in_prompt[:, cur], tokens[:, cur]) if cur < max_len else None
            choice = self.next_token(h, request, forced)
            if logprobs:
                self._record_logprobs(token_logprobs, choice, tokens, cur, want_all)
            tokens[:, cur] = choice.ids
            done |= ~in_prompt[:, cur] & torch.isin(choice.ids, stop_ids)
            prev = cur
            if stream is not None:
                stream.push(choice.ids, cur)
            if (cur + 1 - min_len) % check_every == 0 and done.all():  # the one host read of a step
                break
        if stream is not None:
            stream.finish()
        return self._results(tokens, token_logprobs, lengths, request, total_len, prev)

    def next_token(self, h: torch.Tensor, request: Request, forced: Optional[Forced] = None) -> Choice:
        """The next token [batch] on every rank from final hidden states h [batch, seq, dim], every row by
        `request`'s settings, with rank 0's gathered logits and the chosen tokens' logprobs when asked for.
        `forced` = (mask, ids): rows where the mask is set take those ids (prompt tokens still being fed)."""
        row = RowSampling(request.temperature, request.top_p, request.top_k, self.generator,
                          0 if request.logprobs else -1)
        return choose_tokens(self.model, h, [row] * h.shape[0], row.needs_logits, forced)

    @staticmethod
    def _record_logprobs(token_logprobs, choice: Choice, tokens, cur: int, all_positions: bool) -> None:
        """Log-probabilities of the tokens at `cur` (and, on an echo prefill, of the prompt before it)."""
        if choice.logits is None:  # not rank 0
            return
        if all_positions and cur > 1:
            lp = torch.log_softmax(choice.logits[:, :-1], dim=-1)
            token_logprobs[:, 1:cur] = lp.gather(-1, tokens[:, 1:cur, None])[..., 0]
        token_logprobs[:, cur] = choice.logprobs

    def _results(self, tokens, token_logprobs, lengths, request: Request, total_len: int, written: int):
        """The ids (and logprobs) to return, read on the host; and what the cache rows now hold: positions
        0..`written`-1 of every row."""
        out_tokens, out_logprobs = [], []
        rows = tokens.tolist()
        self.rows_hold = [row[:written] for row in rows]
        lp_rows = token_logprobs.tolist() if request.logprobs else None
        stops = set(self.stop_ids)
        for i, length in enumerate(lengths):
            start = 0 if request.echo else length
            end = min(length + request.max_gen_len, total_len)
            stop = next((j for j in range(length, end) if rows[i][j] in stops), end)
            out_tokens.append(rows[i][start:stop])
            if request.logprobs:
                out_logprobs.append(lp_rows[i][start:stop])
        return out_tokens, (out_logprobs if request.logprobs else None)


class _Stream:
    """Rank 0's `on_token` calls of one generation, each step's tokens handed over one step late (after
    the next step is queued), and none after the step where every row has stopped: the loop itself
    checks that only every few steps, but what `on_token` sees is what a check every step would give."""

    def __init__(self, on_token: Callable[[torch.Tensor], None], lengths: List[int], stop_ids: Sequence[int]):
        self.on_token, self.lengths, self.stop_ids = on_token, lengths, set(stop_ids)
        self.stopped = [False] * len(lengths)
        self.pending: Optional[Tuple[Readback, int]] = None

    def push(self, ids: torch.Tensor, cur: int) -> None:
        """The tokens [batch] of position `cur`, just queued: hand over the previous step's."""
        previous, self.pending = self.pending, (Readback([ids]), cur)
        if previous is not None:
            self._hand_over(*previous)

    def finish(self) -> None:
        if self.pending is not None:
            self._hand_over(*self.pending)
            self.pending = None

    def _hand_over(self, copy: Readback, cur: int) -> None:
        if all(self.stopped):
            return
        ids = copy.get()[0]
        for i, token in enumerate(ids.tolist()):
            self.stopped[i] |= cur >= self.lengths[i] and token in self.stop_ids
        self.on_token(ids)
