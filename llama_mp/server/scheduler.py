"""Rank 0's scheduler: a bounded queue of sequences, the slots of the running batch, and the batch loop.

HTTP handlers (the event loop thread) `submit` validated sequences; a full queue, a server still loading,
draining or failed answers 503 at once, so nothing waits without bound. The batch loop (`run`, on the
main thread, where every rank's model calls happen) repeats: release the slots of sequences that ended
or whose client went away, admit waiting sequences into free slots, and run one step of the batch on
every rank (runtime/batching.py). Each step's token of each row goes back to its request as an `Event`
through the request's own sink, which never blocks: a slow or vanished client cannot stall the batch.

The loop reads a step's tokens one step late: it queues step t+1 before it reads step t's tokens (on a
GPU the device so never waits for the host between steps). A sequence's length is known without its
tokens, so one that has all its tokens leaves the batch on time; one that a stop token or stop string
ends is known to have ended a step late, so it keeps its slot for one more step, whose token is dropped.

Text and stops are handled here, per sequence: tokens become text through `TextStream` (a character
split over several tokens is held back until complete), and text that might be the start of a `stop`
string is held back until it is known not to be one, so a stop string is never streamed.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch

from ..distributed.failure import peer_lost
from ..errors import PeerLostError
from ..runtime.batching import Admission, Batcher, HostStep, Plan, StepResult
from ..runtime.grammar import Constraint
from ..runtime.prefixes import KeptScores, PrefixCache, Row
from ..runtime.sampling import RowSampling, make_generator
from ..runtime.transfer import upload
from ..runtime.scoring import TokenScores
from ..runtime.tokenizer import TextStream, Tokenizer, prompt_pieces
from .protocol import ApiError, SequenceSpec, TokenLogprob

IDLE_WAIT_S = 0.25  # how often an idle loop looks at its flags (draining, a lost rank) without a request


@dataclass
class Event:
    """What one sequence produced since its last event: text (and, if asked, its tokens' logprobs); on
    its last event the finish reason and token counts; or an error (status, message) that ends it. The
    first event of a sequence whose prompt is scored (`echo` with `logprobs`) carries the scores, which
    the HTTP side turns into text (`Scheduler.prompt_logprobs`), off the batch loop."""

    index: int
    text: str = ""
    logprobs: Optional[List[TokenLogprob]] = None
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0   # of the prompt's, those a cached prefix held (not prefilled)
    error: Optional[ApiError] = None
    prompt_scores: Optional[TokenScores] = None


@dataclass
class Piece:
    """What a sequence releases at once: text, the logprobs entries of its tokens (None when the request
    wants none), and whether a stop string ended the text."""

    text: str
    entries: Optional[List[TokenLogprob]]
    stopped: bool


class StopText:
    """The text of a growing sequence of ids, cut at the first `stop` string, released as soon as it is safe.

    Text is released a whole token at a time, each token with its `logprobs` entry when the request wants
    them (`entries`), so what goes out of the text and of the entries always agrees: the entries' texts
    join into the text, in every chunk of a stream as in a whole answer. Where a stop string cuts the
    text, the entries are cut too: the token the stop string starts in keeps its text up to the cut, the
    tokens after it are dropped. The last token is held while part of a character is (the next token or
    the end writes it: the end as U+FFFD, in that token's text).
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], after: Sequence[int] = (),
                 entries: bool = False, min_tokens: int = 0):
        self.stream, self.stops, self.entries = TextStream(tokenizer, after), list(stops), entries
        self.held: List[TokenLogprob] = []  # the tokens not yet released (their texts, and entries)
        # stop strings count from the min_tokens-th token on (min_tokens): until then no text is held for them
        self.unarmed = max(min_tokens - 1, 0)

    def push(self, token: int, entry_of: Optional[Callable[[str], TokenLogprob]] = None) -> Piece:
        """Add `token`; `entry_of(text it added)` makes its logprobs entry (when `entries`)."""
        added = self.stream.push(token)
        self.held.append(entry_of(added) if entry_of is not None else TokenLogprob(added, None, None))
        if self.unarmed:
            self.unarmed -= 1
            return self._release(final=False, stops=())
        return self._release(final=False)

    def flush(self) -> Piece:
        """The end of the sequence: release everything (an incomplete character goes out as U+FFFD)."""
        rest = self.stream.flush()
        if rest and self.held:
            self.held[-1].token += rest
        elif rest:
            self.held.append(TokenLogprob(rest, None, None))
        return self._release(final=True)

    def _release(self, final: bool, stops: Optional[Sequence[str]] = None) -> Piece:
        stops = self.stops if stops is None else stops
        text = "".join(e.token for e in self.held)
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        stopped = bool(found)
        if stopped:
            cut = min(found)
        else:  # hold back the longest end of the text that may be the start of a stop string
            hold = 0 if final else max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                                        if text.endswith(s[:n])), default=0)
            cut = len(text) - hold
        # the last token stays while part of a character is held back: its text is not complete yet
        releasable = self.held if final or stopped or not self.stream.holding else self.held[:-1]
        out, at = [], 0
        for e in releasable:
            if at + len(e.token) > cut:
                break
            out.append(e)
            at += len(e.token)
        if stopped:
            if at < cut:  # the stop string starts inside this token: it keeps its text up to the cut
                partial = self.held[len(out)]
                partial.token = partial.token[:cut - at]
                out.append(partial)
            self.held = []
        else:
            self.held = self.held[len(out):]
        return Piece("".join(e.token for e in out), out if self.entries else None, stopped)


class Sink:
    """Where a request's events go: a queue of the event loop that answers it. The batch loop hands a
    step's events to each loop at once (`send`): one wake-up per loop and step, however many rows."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: "asyncio.Queue"):
        self.loop, self.queue = loop, queue


def send(outbox: List[Tuple[Sink, Event]]) -> None:
    """Deliver events from another thread, grouped by event loop; never blocks."""
    by_loop: Dict[asyncio.AbstractEventLoop, List[Tuple[Sink, Event]]] = {}
    for sink, event in outbox:
        by_loop.setdefault(sink.loop, []).append((sink, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that loop has closed (the server is stopping): nobody is listening
            pass


def _put_all(items: List[Tuple[Sink, Event]]) -> None:
    for sink, event in items:
        sink.queue.put_nowait(event)


@dataclass(eq=False)
class Generation:
    """One prompt being continued: its spec, where its events go, and its progress."""

    spec: SequenceSpec
    index: int                       # its place among its request's prompts
    sink: Sink
    generator: Optional[torch.Generator] = None
    text: Optional[StopText] = None
    # on the device, made once (see RowSampling): logit_bias as a [vocab] row, the counts of its tokens when it
    # has penalties, the ids it may not choose before min_tokens
    bias: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    ban: Optional[torch.Tensor] = None
    stop_ids: frozenset = frozenset()  # the ids that end it
    constraint: Optional[Constraint] = None  # the grammar its answer must match (response_format, tool_choice)
    answer: List[int] = field(default_factory=list)  # the tokens read back so far
    slot: Optional[int] = None
    row: Optional[Row] = None        # what its cache row holds (prefix caching), from its admission on
    cached: int = 0                  # the prompt tokens it did not prefill (a cached prefix)
    kept_scores: Optional[KeptScores] = None  # scored: the entries of those positions, kept with a row
    launched: int = 0                # the steps queued for it (each gives one token)
    generated: int = 0
    previous: int = -1               # the last token of the sequence so far (the prompt's, at first)
    done: bool = False
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)

    @property
    def sampling(self) -> RowSampling:
        """How the token of the step now queued is chosen (its `launched`-th, from 0)."""
        spec, c = self.spec, self.spec.choosing
        return RowSampling(spec.temperature, spec.top_p, c.top_k, self.generator,
                           -1 if spec.logprobs is None else spec.logprobs, c.min_p, c.presence_penalty,
                           c.frequency_penalty, self.bias, self.counts,
                           self.ban if self.launched < c.min_tokens else None)

    @property
    def all_queued(self) -> bool:
        """Whether the steps queued for it give every token it may have (its last may not be read yet)."""
        return self.launched >= max(self.spec.max_tokens, 1)  # 0: the prompt's first token ends it


class Scheduler:
    """The queue and the batch loop of rank 0 (see the module's docstring)."""

    def __init__(self, batcher: Batcher, tokenizer: Tokenizer, max_queue: int, seed: int = 1,
                 prefix_rows: Optional[int] = None):
        self.batcher, self.tokenizer = batcher, tokenizer
        # the free cache rows that may keep their tokens for a later prompt (None: all; 0: none)
        self.prefixes = PrefixCache(batcher.slots, batcher.slots if prefix_rows is None else prefix_rows)
        self.device = batcher.device  # the model's: where each request's generator draws from its logits
        self.stop_ids = set(tokenizer.stop_ids)
        self.max_queue = max_queue
        self.lock = threading.Condition()
        self.waiting: Deque[Generation] = collections.deque()
        self.by_slot: Dict[int, Generation] = {}
        self.releases: List[int] = []
        # the step queued last, whose tokens are not read yet, and the sequence in each of its slots then
        self.in_flight: Optional[Tuple[StepResult, Dict[int, Generation]]] = None
        self.seeds = torch.Generator(device="cpu").manual_seed(seed)  # seeds for requests that bring none
        self.draining_until: Optional[float] = None       # set by `drain` (a signal handler: no lock taken)
        self.failure: Optional[str] = None                # set by `fail`: why every request now gets 503
        self.stepping = False                             # whether the main thread is inside a step
        # For the summary at the end and /metrics: steps run, their rows, the seconds inside them, and the
        # seconds of the loop's rounds that ran one (planning, the step, handing out the step before's tokens):
        # what HTTP work on the loop's thread would lengthen while the step itself does not.
        self.steps, self.rows, self.step_s, self.loop_s = 0, 0, 0.0, 0.0
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}  # sequences, by how they ended

    # ------------------------------------------------------------------------------------------
    # The HTTP side (event loop thread)

    def submit(self, specs: Sequence[SequenceSpec], sink: Sink) -> List[Generation]:
        """Queue the sequences of one request (all or none), or raise ApiError 503."""
        if self.failure is not None:
            raise ApiError(503, f"The server cannot take requests: {self.failure}", "server_error")
        if self.draining_until is not None:
            raise ApiError(503, "The server is shutting down and takes no new requests.", "server_error")
        if len(specs) > self.max_queue:  # never fits, so a 400: a 503 would be retried forever
            raise ApiError(400, f"This request has {len(specs)} prompts, more than the {self.max_queue} sequences the "
                                "server's queue holds (--max_queue); send them in several requests.",
                           "invalid_request_error", "prompt")
        seqs = []
        for i, spec in enumerate(specs):
            seed = spec.seed if spec.seed is not None else \
                int(torch.randint(0, 2 ** 62, (1,), generator=self.seeds, device="cpu"))
            # A completion's text reads on from its prompt (" Paris" keeps its space); a chat answer's is
            # decoded alone, as Meta's chat_completion does (Llama 2's format puts a space after [/INST]).
            after = spec.prompt_ids if spec.after_prompt else ()
            seqs.append(Generation(spec, i, sink, make_generator(self.device, seed),
                                   StopText(self.tokenizer, spec.stop, after, spec.logprobs is not None,
                                            spec.choosing.min_tokens),
                                   *self._choice_tensors(spec), frozenset(self._stops_of(spec)),
                                   self._constraint(spec), previous=spec.prompt_ids[-1]))
        with self.lock:
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise ApiError(503, f"The server is busy: its queue of {self.max_queue} waiting sequences is full. "
                                    "Retry later, or raise --max_queue / --max_batch_size.", "server_error")
            self.waiting.extend(seqs)
            self.lock.notify()
        return seqs

    def _stops_of(self, spec: SequenceSpec) -> set:
        """The ids that end `spec`: the tokenizer's stop tokens (unless ignore_eos) and its stop_token_ids."""
        return (set() if spec.ignore_eos else self.stop_ids) | set(spec.choosing.stop_token_ids)

    def _constraint(self, spec: SequenceSpec) -> Optional[Constraint]:
        """The grammar state of a constrained sequence, made here, off the loop (the grammar was checked
        when the request was)."""
        if spec.grammar is None:
            return None
        return Constraint(spec.grammar, self.tokenizer, sorted(self.stop_ids))

    def _choice_tensors(self, spec: SequenceSpec):
        """(bias, counts, ban) of a Generation, on the device: made once per sequence, here, off the loop."""
        c, vocab = spec.choosing, self.tokenizer.n_words
        bias = counts = ban = None
        if c.logit_bias:
            ids, values = zip(*c.logit_bias)
            bias = torch.zeros(vocab, device=self.device).index_put_((upload(ids, self.device),),
                                                                     upload(values, self.device, torch.float32))
        if c.presence_penalty or c.frequency_penalty:
            counts = torch.zeros(vocab, device=self.device)
        if c.min_tokens:
            ban = upload(sorted(self._stops_of(spec)), self.device)
        return bias, counts, ban

    def cancel(self, seqs: Sequence[Generation]) -> None:
        """The client went away: drop these sequences at the next step (their slots are freed then)."""
        for seq in seqs:
            if not seq.done:
                seq.cancelled = True

    def drain(self, within_s: float) -> None:
        """Stop taking requests; finish the ones in flight within `within_s`, then cancel the rest.
        Safe in a signal handler: it only sets a flag, which the loop reads."""
        if self.draining_until is None:
            self.draining_until = time.monotonic() + within_s

    def fail(self, reason: str) -> None:
        """Every sequence, queued or running, and every later request is answered 503 with `reason`."""
        self.failure = self.failure or reason
        with self.lock:
            self.prefixes.forget()
            pending = list(self.waiting) + self._started()
            self.waiting.clear()
            self.lock.notify()
        outbox: List[Tuple[Sink, Event]] = []
        for seq in pending:
            self._end_with_error(seq, ApiError(503, f"The server failed: {reason}", "server_error"), outbox)
        send(outbox)

    def stats(self) -> Dict[str, int]:
        """Sequences waiting, running (in a slot, not yet released) and ended (finished, cancelled by their
        client, failed), the batch's slots, the steps run so far (their rows, the seconds in them and in the
        loop's rounds that ran them), and the prefix cache's prompt tokens looked up, hits (prompts) and the
        prompt tokens they held, and kept rows evicted."""
        p = self.prefixes
        return {"waiting": len(self.waiting), "running": len(self.by_slot), "slots": self.batcher.slots,
                "steps": self.steps, "rows": self.rows, "step_s": self.step_s, "loop_s": self.loop_s,
                **self.counts, "prefix_queries": p.queries, "prefix_hits": p.hits,
                "cached_tokens": p.cached_tokens, "prefix_evictions": p.evictions}

    # ------------------------------------------------------------------------------------------
    # The batch loop (main thread)

    def run(self) -> None:
        """Step the batch until draining is over (returns) or a step fails (every pending request gets
        503, then the error is raised). Raises RuntimeError if `fail` was called (a lost rank)."""
        while True:
            round_started = time.perf_counter()
            plan = self._next_plan(wait=self.in_flight is None)
            if self.failure is not None:
                raise RuntimeError(self.failure)
            if plan is None or (not plan.admit and not self.by_slot):
                if self.in_flight is not None:  # nothing to queue behind it: read it now, then plan again
                    self._deliver(*self.in_flight)
                    self.in_flight = None
                    continue
                if plan is None:
                    return
                continue  # idle; releases wait for the next real step
            started = time.perf_counter()
            self.stepping = True
            try:
                result = self.batcher.run(plan, self._sampling_of)
            except BaseException as e:
                if isinstance(e, PeerLostError) or peer_lost(e) is not None:
                    self.fail("rank 0 lost contact with another rank of the job (it died or stopped answering); "
                              "the server must be restarted.")
                else:
                    # the cause itself, in the answer: the log may not say more (or be out of reach)
                    cause = str(e).strip().splitlines()[0][:300] if str(e).strip() else "no message"
                    self.fail(f"a step of the batch failed ({type(e).__name__}: {cause}); the server must be "
                              "restarted.")
                raise
            finally:
                self.stepping = False
            self.steps, self.rows = self.steps + 1, self.rows + len(result.slots)
            self.step_s += time.perf_counter() - started
            owners = dict(self.by_slot)
            for seq in owners.values():
                seq.launched += 1
                # the step after its admission writes the token its last step chose, and so on
                seq.row.written = len(seq.spec.prompt_ids) + seq.launched - 1
            previous, self.in_flight = self.in_flight, (result, owners)
            if previous is not None:  # the step before, read while this one runs
                self._deliver(*previous)
            self.loop_s += time.perf_counter() - round_started

    def _next_plan(self, wait: bool) -> Optional[Plan]:
        """The next step's plan; None once draining is over (nothing left, or its time is up). With `wait`,
        waits a little when there is nothing to do."""
        with self.lock:
            if self.failure is not None:
                return Plan()
            draining = self.draining_until is not None
            if draining and time.monotonic() > self.draining_until:
                outbox: List[Tuple[Sink, Event]] = []
                for seq in list(self.waiting) + self._started():
                    self._end_with_error(seq, ApiError(503, "The server shut down before this request finished.",
                                                       "server_error"), outbox)
                send(outbox)
                self.waiting.clear()
                self.by_slot.clear()
                return None
            for slot, seq in list(self.by_slot.items()):
                if seq.done or seq.cancelled or seq.all_queued:
                    if seq.done or seq.cancelled:
                        self._cancelled(seq)
                    del self.by_slot[slot]  # the last token of one all_queued is read from the step in flight
                    self.releases.append(slot)
                    self.prefixes.release(slot)  # its row keeps what it holds, for a later prompt
            free = [s for s in range(self.batcher.slots) if s not in self.by_slot]
            admit, taken = [], {}
            while free and self.waiting:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    self._cancelled(seq)
                    continue
                spec = seq.spec
                score_top = spec.logprobs if spec.score_prompt else -1
                place, seq.row = self.prefixes.place(spec.prompt_ids, free, taken, score_top)
                seq.slot, seq.cached, seq.kept_scores = place.slot, place.cached, place.scores
                self.by_slot[seq.slot] = seq
                admit.append(Admission(seq.slot, tuple(spec.prompt_ids), score_top, place.cached, place.copy_from))
            if not self.by_slot:
                if draining:
                    return None
                if not self.waiting and wait:
                    self.batcher.pause()  # the other ranks wait without using a core
                    self.lock.wait(IDLE_WAIT_S)
                return Plan()
            release, self.releases = tuple(self.releases), []
            gather = any(seq.constraint is not None or seq.sampling.needs_logits for seq in self.by_slot.values())
            return Plan(release, tuple(admit), gather)

    def _started(self) -> List[Generation]:
        """The sequences in a slot, and those whose last token is still in flight (`fail` runs on another
        thread: the step in flight is looked at once)."""
        in_flight = self.in_flight
        return list(self.by_slot.values()) + (list(in_flight[1].values()) if in_flight is not None else [])

    def _sampling_of(self, slots: Sequence[int]) -> List[RowSampling]:
        """Each row's settings, from its own request; a constrained row's with the cap its grammar puts on the
        logits (runtime/grammar.Constraint: the grammar takes the tokens chosen so far, the last from the
        step in flight, and gives its mask). The step asks once its forward is queued: on a GPU the grammar's work
        overlaps the forward; on a CPU the forward has run on this thread, and the grammar adds its own time
        only, where a thread of its own would take a core (and this interpreter's lock) from the ranks
        while they compute (docs/server.md, "What constrained rows cost the others")."""
        rows = []
        for slot in slots:
            seq = self.by_slot[slot]
            sampling = seq.sampling
            if seq.constraint is not None:
                seq.constraint.catch_up(seq.answer + self._in_flight_token(seq))
                sampling = replace(sampling, logit_cap=seq.constraint.logit_cap(self.device))
            rows.append(sampling)
        return rows

    def _in_flight_token(self, seq: Generation) -> List[int]:
        """The token the step in flight chose for `seq` (not delivered yet), as a list of none or one, from
        that step's copy to the host (started as it was queued: on a GPU a wait for that step alone, while
        the step now queued computes). A constrained row's next mask depends on it."""
        if self.in_flight is None or self.in_flight[1].get(seq.slot) is not seq:
            return []
        result = self.in_flight[0]
        ids = result.copy_to_host().copy.get()[0]
        return [int(ids[result.slots.index(seq.slot)])]

    def _deliver(self, result: StepResult, owners: Dict[int, Generation]) -> None:
        """Hand a step's tokens to the sequences that were in its slots (`owners`) as events."""
        host = result.on_host()
        outbox: List[Tuple[Sink, Event]] = []
        for row, (slot, token) in enumerate(zip(host.slots, host.tokens)):
            seq = owners.get(slot)
            if seq is not None and seq.cancelled:
                self._cancelled(seq)  # no-op unless it left its slot before its client went away
            if seq is None or seq.done:
                continue
            scores = self._prompt_scores(seq, host.prompt_scores.get(slot))
            event = self._take(seq, token, host, row)
            if event is not None:
                event.prompt_scores = scores
                outbox.append((seq.sink, event))
            elif scores is not None:
                outbox.append((seq.sink, Event(seq.index, prompt_scores=scores)))
        send(outbox)

    def _prompt_scores(self, seq: Generation, computed: Optional[TokenScores]) -> Optional[TokenScores]:
        """A scored prompt's entries: those its cached positions kept, then those its step `computed`; its
        row keeps them all (while the row holds its tokens: a row that is forgotten takes them along)."""
        if computed is None:
            return None
        whole = seq.kept_scores.then(computed) if seq.kept_scores is not None else KeptScores(seq.spec.logprobs,
                                                                                            computed)
        seq.row.scores, seq.kept_scores = whole, None
        return whole.scores

    def _take(self, seq: Generation, token: int, host: HostStep, row: int) -> Optional[Event]:
        """Add `token` (of `row` of the step `host`, which has its logprobs when the request wants them)
        to `seq`: the event to send (None when there is nothing to say yet)."""
        spec = seq.spec
        seq.row.tokens.append(token)  # in its cache row once the next step feeds it (`row.written`)
        if spec.max_tokens == 0:  # nothing to generate: the prompt (echoed, scored) is the whole answer
            return self._finish(seq, Piece("", [] if spec.logprobs is not None else None, False), "length")
        seq.generated += 1  # a stop token too: it was generated, and counts in `usage` (as OpenAI's does)
        seq.answer.append(token)
        entry_of = None
        if spec.logprobs is not None:
            n, previous, logprob = spec.logprobs, seq.previous, host.logprobs[row]
            values, ids = (host.top_logprobs[row][:n], host.top_ids[row][:n]) if n else ([], [])
            entry_of = lambda added: self._entry(previous, token, added, logprob, values, ids)  # noqa: E731
        if token in seq.stop_ids:
            # It adds no text, but has its logprobs entry (written as ""), as OpenAI and vLLM give it:
            # lm-eval drops the last entry of an answer as the generated token
            rest = seq.text.flush()
            if entry_of is not None:
                rest.entries.append(entry_of(""))
            return self._finish(seq, rest, "stop")
        piece = seq.text.push(token, entry_of)
        seq.previous = token
        if piece.stopped:
            return self._finish(seq, piece, "stop")
        if seq.generated >= spec.max_tokens:
            rest = seq.text.flush()
            joined = None if piece.entries is None else piece.entries + rest.entries
            return self._finish(seq, Piece(piece.text + rest.text, joined, False), "length")
        return Event(seq.index, piece.text, piece.entries) if piece.text or piece.entries else None

    def _finish(self, seq: Generation, piece: Piece, reason: str) -> Event:
        seq.done = True
        self.counts["finished"] += 1
        return Event(seq.index, piece.text, piece.entries, reason, len(seq.spec.prompt_ids), seq.generated,
                     cached_tokens=seq.cached)

    def _entry(self, previous: int, token: int, text: str, logprob: float, top_values: List[float],
               top_ids: List[int]) -> TokenLogprob:
        """`token` (which added `text` after `previous`) with its logprob and the likeliest alternatives,
        each written as the text it would have added: the chosen one as `text`, so they compare equal."""
        alternatives = [(text if i == token else self.tokenizer.text_after(previous, i), v)
                        for i, v in zip(top_ids, top_values)]
        return TokenLogprob(text, logprob, alternatives)

    def prompt_logprobs(self, spec: SequenceSpec, scores: TokenScores) -> List[TokenLogprob]:
        """The prompt's tokens as `logprobs` entries (`echo` with `logprobs`): each with the text it adds
        (they join into the echoed prompt, `prompt_text`), and from the second on its logprob and alternatives."""
        prompt, texts = spec.prompt_ids, prompt_pieces(self.tokenizer, spec.prompt_ids)
        logprobs, values, ids = scores.logprobs.tolist(), scores.top_logprobs.tolist(), scores.top_ids.tolist()
        return [TokenLogprob(texts[0], None, None)] + [
            self._entry(prompt[i - 1], prompt[i], texts[i], logprobs[i - 1], values[i - 1], ids[i - 1])
            for i in range(1, len(prompt))]

    def _cancelled(self, seq: Generation) -> None:
        if not seq.done:
            seq.done = True
            self.counts["cancelled"] += 1

    def _end_with_error(self, seq: Generation, error: ApiError, outbox: List[Tuple[Sink, Event]]) -> None:
        if not seq.done:
            seq.done = True
            self.counts["failed"] += 1
            outbox.append((seq.sink, Event(seq.index, error=error)))
