"""Continuous batching on every rank: sequences join and leave a running batch between decode steps.

The KV cache has `max_batch_size` rows; here each row is a *slot* that holds one sequence at its own
position. A step, as rank 0 decides it (`Plan`), first frees the slots of sequences that ended (a
finished or cancelled request: nothing is computed for it any more), then runs one decode position for
every other occupied slot, each at its own position (`Transformer.hidden_rows`), and prefills the prompt
of each newcomer into its free slot from position 0 while the others keep their caches: inside the same
call, one row per prompt token, where the decoder takes the extra rows (the C kernels: it saves a
separate forward's fixed costs), else on its own (`Transformer.hidden_in_slot`). The last hidden state of
every row then gives its next token in one exchange (`sampling.choose_tokens`, as `Engine.generate`'s):
greedy rows without logprobs need only the distributed argmax; if any row samples or wants logprobs,
the logits are gathered on rank 0, which chooses every row's token (each request with its own settings
and random generator, `SamplingOf`) and broadcasts them. Every rank so holds the same tokens and the same
slot table, and the plan only has to carry what rank 0 alone knows: admissions (with their prompt
ids), releases and whether to gather.

Nothing of a step is read on the host: each slot's last token stays on the device, where the next step
takes it, and rank 0 reads a step's tokens (and logprobs) through a copy started as the step is queued
(`StepResult.on_host`), which the server does after queueing the next step.

Rank protocol: while the batch runs, the ranks are in a *session*, the engine's op `BATCH_OP` (sent by
rank 0 through `Engine.call`, so ranks waiting in `Engine.serve()` join it and the usual failure rules
hold: a lost rank raises on every survivor). In a session each step's plan travels as one or two small
int64 tensors through the step's own exchange (`Collectives.broadcast_from_main_`, shared memory between
the ranks of a host): a few microseconds, where a pickled object costs two gloo round trips per step.
When the batch empties, rank 0 ends the session (`pause`) and the others wait in `Engine.serve()` again,
blocked without using a core. `Engine.generate`, where all rows move together, is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..distributed.failure import waking_peers_on_loss
from ..errors import LlamaMPError
from .engine import Engine
from .transfer import Readback, upload
from .sampling import Choice, RowSampling, choose_tokens
from .scoring import SCORED_CHUNK, TokenScores, score_hidden

BATCH_OP = "batch"
END, STEP = 0, 1        # the kinds of a plan's header
HEADER = 3              # [kind, gather, length of the admissions' tensor], then one release flag per slot
ADMISSION_HEADER = 5    # an admission in that tensor: [slot, prompt length, score_top, cached, copy_from, *prompt]


@dataclass(frozen=True)
class Admission:
    """A newcomer: its prompt ids, prefilled into `slot` from position `cached`. With `score_top` >= 0 its
    prompt is also scored from there: the log-probability of each prompt token after position `cached`
    and the `score_top` likeliest ids at each position from `cached` on (the server's `echo` with
    `logprobs`; rank 0 keeps the entries of the positions before, see runtime/prefixes.py)."""

    slot: int
    prompt: Tuple[int, ...]
    score_top: int = -1
    cached: int = 0      # the prompt's first positions already in the slot's row (prefix caching), whose
    copy_from: int = -1  # row they are copied from first (-1: the slot itself); see runtime/prefixes.py


@dataclass(frozen=True)
class Plan:
    """One step of the batch as rank 0 decided it: what every rank needs to run the same model calls."""

    release: Tuple[int, ...] = ()
    admit: Tuple[Admission, ...] = ()
    gather: bool = False  # some row samples or wants logprobs: the logits go to rank 0, which chooses


@dataclass
class HostStep:
    """A step's result as rank 0 reads it on the host: per row its slot and token, and where asked for (see
    `RowSampling.logprobs`) the token's logprob and the likeliest alternatives (the most any row asked
    for; a row takes the first it asked for); the prompt scores by slot, on the host."""

    slots: List[int]
    tokens: List[int]
    logprobs: Optional[List[float]]
    top_logprobs: Optional[List[List[float]]]
    top_ids: Optional[List[List[int]]]
    prompt_scores: Dict[int, TokenScores]


@dataclass
class StepResult:
    """What a step produced: the slot of each row (decoding rows in slot order, then the newcomers in
    admission order), the choice of each row's next token (ids on the device; on rank 0 the logprobs
    asked for), and on rank 0 the scores of the prompts admitted with `score_top` (by slot; prompt tokens
    cached + 1.. given the ones before them). `on_host` reads them there."""

    slots: List[int]
    choice: Choice
    prompt_scores: Dict[int, TokenScores] = field(default_factory=dict)
    copy: Optional[Readback] = field(default=None, repr=False)

    def copy_to_host(self) -> "StepResult":
        """Start the copy of what rank 0 reads, without waiting: called as the step is queued."""
        if self.copy is None:
            c = self.choice
            scores = [t for s in self.prompt_scores.values() for t in (s.logprobs, s.top_logprobs, s.top_ids)]
            self.copy = Readback([c.ids, c.logprobs, c.top_logprobs, c.top_ids] + scores)
        return self

    def on_host(self) -> HostStep:
        """The result on the host; waits for its copy only (best after the next step is queued)."""
        ids, logprobs, top_logprobs, top_ids, *scores = self.copy_to_host().copy.get()
        listed = [None if t is None else t.tolist() for t in (logprobs, top_logprobs, top_ids)]
        prompt_scores = {slot: TokenScores(*scores[3 * i:3 * i + 3]) for i, slot in enumerate(self.prompt_scores)}
        return HostStep(self.slots, ids.tolist(), *listed, prompt_scores)


# Rank 0's sampling settings of the rows of a step, from their slots: slots -> one RowSampling per row.
SamplingOf = Callable[[Sequence[int]], Sequence[RowSampling]]


class Batcher:
    """This rank's slot table (which slots hold a sequence, its next position and last token) and the
    step that advances every occupied slot by one token. Made on every rank, before rank 0 sends steps:
    it registers its op with the engine."""

    def __init__(self, engine: Engine):
        self.engine, self.model, self.device = engine, engine.model, engine.group.device
        self.slots = self.model.max_batch_size
        self.position = [0] * self.slots    # the next position of each occupied slot (tokens in its cache)
        # the token to feed at that position, where the step that chose it left it: on the device
        self.last = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self.occupied: List[bool] = [False] * self.slots
        self.in_session = False  # rank 0: whether the other ranks follow its plans (see `run`)
        engine.ops[BATCH_OP] = self._session

    def free_slots(self) -> List[int]:
        return [s for s in range(self.slots) if not self.occupied[s]]

    @torch.inference_mode()
    def step(self, plan: Plan, sampling_of: Optional[SamplingOf] = None) -> StepResult:
        """Every rank: run `plan` (see the module's docstring). `sampling_of` is rank 0's, needed with gather."""
        model, device = self.model, self.device
        self.engine.forget_rows()  # the batch writes the rows `generate` left
        for slot in plan.release:
            self.occupied[slot] = False
        decoding = [s for s in range(self.slots) if self.occupied[s]]
        for a in plan.admit:
            if self.occupied[a.slot] or not 0 < len(a.prompt) < model.max_seq_len or \
                    not 0 <= a.cached < len(a.prompt):
                raise LlamaMPError(f"internal error: slot {a.slot} cannot take a prompt of {len(a.prompt)} tokens "
                                   f"with {a.cached} cached (occupied: {self.occupied[a.slot]}).")
        for a in plan.admit:  # before anything is written, in admission order (see runtime/prefixes.py)
            if a.copy_from >= 0:
                model.copy_cache_prefix(a.copy_from, a.slot, a.cached)
        if decoding and max(self.position[s] for s in decoding) >= model.max_seq_len:
            raise LlamaMPError(f"internal error: a slot reached max_seq_len {model.max_seq_len}; rank 0 must "
                               "release a sequence once its room is used.")
        # Rows of the decode step: each decoding slot's last token at its position, then the prompts that
        # fit the step (one row per token, from position 0 in the newcomer's slot: causal, since every
        # row's keys are in the cache before any row attends). Longer prompts are prefilled on their own.
        prompt_ids: List[int] = []  # the rows after the decoding ones (whose last tokens are on the device)
        slots, positions = list(decoding), [self.position[s] for s in decoding]
        picked = list(range(len(decoding)))  # the rows whose next token is wanted
        room = model.decoder.prompt_rows_in_step(model, len(decoding))
        inside, apart = [], []  # admissions prefilled in the step, and on their own
        for a in plan.admit:
            # a scored prompt is prefilled on its own, in the same calls whatever its start (hidden_scored)
            fits = len(a.prompt) - a.cached <= room and a.score_top < 0
            (inside if fits else apart).append(a)
            room -= len(a.prompt) - a.cached if fits else 0
        for a in inside:
            prompt_ids += a.prompt[a.cached:]
            slots += [a.slot] * (len(a.prompt) - a.cached)
            positions += range(a.cached, len(a.prompt))
            picked.append(len(slots) - 1)

        def as_tensor(values) -> torch.Tensor:
            return upload(values, device)

        hidden = []
        scored = []  # (admission, the hidden states of its prompt [n, dim])
        if slots:
            host = torch.tensor([slots, positions], dtype=torch.long, device="cpu")  # the decoders read these there
            tokens = torch.cat((self.last[as_tensor(decoding)], as_tensor(prompt_ids)))
            h = model.hidden_rows(tokens[:, None], host[0], host[1])
            hidden.append(h if len(picked) == len(slots) else h[as_tensor(picked)])
        for a in apart:
            if a.score_top >= 0:
                h = model.hidden_scored(as_tensor([a.prompt[a.cached:]]), a.slot, a.cached)
                scored.append((a, h[0]))
                last = len(a.prompt) - a.cached - 1
                hidden.append(h[:, last:last + 1])
                continue
            h = model.hidden_in_slot(as_tensor([a.prompt[a.cached:]]), a.slot, a.cached)
            hidden.append(h[:, -1:])
        for s in decoding:
            self.position[s] += 1
        for a in plan.admit:
            self.occupied[a.slot], self.position[a.slot] = True, len(a.prompt)
        rows = decoding + [a.slot for a in inside] + [a.slot for a in apart]
        if not rows:
            return StepResult([], Choice(torch.empty(0, dtype=torch.long, device=device)))
        h = torch.cat(hidden) if len(hidden) > 1 else hidden[0]  # [rows, 1, dim]
        settings = sampling_of(rows) if plan.gather and sampling_of is not None else None
        choice = choose_tokens(model, h, settings, plan.gather)
        self.last.index_copy_(0, as_tensor(rows), choice.ids)
        prompt_scores = {}
        for a, h_prompt in scored:  # padded (hidden_scored): scored in the same calls whatever the start
            n = len(a.prompt) - a.cached - 1  # positions scored: each but the last gives the next token's score
            targets = list(a.prompt[a.cached + 1:]) + [0] * (h_prompt.shape[0] - n)
            scores = score_hidden(model, h_prompt, as_tensor(targets), a.score_top, SCORED_CHUNK)
            if scores is not None:
                prompt_scores[a.slot] = TokenScores(scores.logprobs[:n], scores.top_logprobs[:n], scores.top_ids[:n])
        return StepResult(rows, choice, prompt_scores)

    @torch.inference_mode()  # like the step: the exchange's buffers are made in it, and used only in it
    def run(self, plan: Plan, sampling_of: SamplingOf) -> StepResult:
        """Rank 0: send `plan` to the other ranks (starting a session if need be) and run it here too; the
        result's copy to the host is started (read it with `on_host`, best once the next step is queued)."""
        if not self.in_session:
            self.engine.call(BATCH_OP, lambda: None)
            self.in_session = True
        with waking_peers_on_loss(self.engine.group):
            self._send(plan)
            return self.step(plan, sampling_of).copy_to_host()

    @torch.inference_mode()
    def pause(self) -> None:
        """Rank 0: end the session; the other ranks return to `Engine.serve()` (the batch is empty)."""
        if self.in_session:
            self.in_session = False
            with waking_peers_on_loss(self.engine.group):
                self._send(None)

    @torch.inference_mode()
    def _session(self, payload=None) -> None:
        """Every rank's side of `BATCH_OP`: on rank 0 nothing (its plans follow from `run`); on the others,
        run each plan rank 0 sends until it ends the session."""
        if self.engine.group.is_main:
            return
        while True:
            plan = self._receive()
            if plan is None:
                return
            self.step(plan)

    def _send(self, plan: Optional[Plan]) -> None:
        header = torch.zeros(HEADER + self.slots, dtype=torch.long, device="cpu")  # filled here, sent at once
        body: List[int] = []
        if plan is not None:
            for a in plan.admit:
                body += [a.slot, len(a.prompt), a.score_top, a.cached, a.copy_from, *a.prompt]
            header[:HEADER] = torch.tensor([STEP, int(plan.gather), len(body)], device="cpu")
            header[[HEADER + s for s in plan.release]] = 1
        comm = self.model.comm
        comm.broadcast_from_main_(upload(header, self.device))
        if body:
            comm.broadcast_from_main_(upload(body, self.device))

    def _receive(self) -> Optional[Plan]:
        comm = self.model.comm
        header = comm.broadcast_from_main_(torch.empty(HEADER + self.slots, dtype=torch.long, device=self.device))
        kind, gather, length, *flags = header.tolist()
        if kind == END:
            return None
        body = comm.broadcast_from_main_(torch.empty(length, dtype=torch.long, device=self.device)).tolist() \
            if length else []
        admit, at = [], 0
        while at < length:
            slot, n, score_top, cached, copy_from = body[at:at + ADMISSION_HEADER]
            at += ADMISSION_HEADER
            admit.append(Admission(slot, tuple(body[at:at + n]), score_top, cached, copy_from))
            at += n
        return Plan(tuple(s for s, flag in enumerate(flags) if flag), tuple(admit), bool(gather))
