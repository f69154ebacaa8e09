"""Prefix caching: which tokens each KV-cache row holds, so a prompt that starts the same way continues
from them instead of being prefilled again (a chat's next turn, a shared system prompt, an evaluation's
answer choices after one question).

Rank 0 keeps this table; the other ranks only follow what it decides, which travels with the step's
admissions (`batching.Admission`: `cached` positions are already in the row, from `copy_from` if that is
another row). A row's keys and values at positions 0..n-1 depend only on its tokens 0..n-1, so a row
that holds a prompt's first n tokens serves as those n positions of any prompt that starts with them.

A row holds what its last sequence wrote: the prompt, then each generated token once a later step fed
it. A sequence that ended leaves its row *kept* (nothing runs in it) until the row is wanted; a new
prompt goes to the free row that holds the longest start of it (prefilling only the rest, in place),
else it copies that start on the device from a row that is busy (or already taken by this step) into a
free row. Rows with nothing worth keeping are taken first, then kept ones least recently used.

Safety rules, each what makes a hit equal to a miss:
* `Row.valid` is what the row really holds: tokens are counted once a step has written them.
* A row taken in this step is, for later admissions of the same step, only as good as what stays in it:
  the copies of a step run before it writes anything, in admission order (`Batcher.step`).
* Every prompt keeps at least its last token to prefill: its hidden state gives the next token.

A scored prompt (`echo` with `logprobs`: every position's logprob and alternatives, as lm-eval's
multiple choice asks for a context and each of its choices) needs more than keys and values: the score
entries of the positions it does not prefill. So a row that held a scored prompt also keeps, on rank 0,
the entries computed for it (`Row.scores`: position i's logprob of token i+1 and its `top` alternatives,
for the `logprobs` count asked), and a scored prompt continues only from a row whose entries it can take:
the same `top`, as many positions as it shares with the row's tokens up to the token each entry scores,
rounded down to a multiple of SCORED_CHUNK: scored prompts are prefilled and scored in calls of that many
positions at multiples of it (`Transformer.hidden_scored`), so the rest is computed in the very calls the
whole prompt's prefill makes for it, and the scores are equal bit for bit.
Its `cached` positions are those whose entries it reuses, so the first position it prefills is the one
whose logits score its first new token (one before the first token it does not share). What a row keeps
is bounded by the row: one entry per position of its prompt, of at most MAX_LOGPROBS + 1 values, and it
is forgotten with the row (evicted, overwritten, or its request failed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .scoring import SCORED_CHUNK, TokenScores


@dataclass(frozen=True)
class KeptScores:
    """The score entries of a row's first positions, on the host: `scores` position i scores token i+1 of
    the row's tokens, with the `top` likeliest alternatives (a request's `logprobs`)."""

    top: int
    scores: TokenScores

    def __len__(self) -> int:
        return self.scores.logprobs.shape[0]

    def first(self, n: int) -> "KeptScores":
        s = self.scores
        return KeptScores(self.top, TokenScores(s.logprobs[:n], s.top_logprobs[:n], s.top_ids[:n]))

    def then(self, more: TokenScores) -> "KeptScores":
        """These entries followed by `more` (those of the next positions)."""
        s = self.scores
        return KeptScores(self.top, TokenScores(torch.cat((s.logprobs, more.logprobs)),
                                                torch.cat((s.top_logprobs, more.top_logprobs)),
                                                torch.cat((s.top_ids, more.top_ids))))


@dataclass
class Row:
    """The tokens a cache row holds: `tokens` (the prompt, then the generated tokens read so far), of
    which the first `written` are in the cache (a token is written by the step that feeds it)."""

    tokens: List[int]
    written: int
    used: int = 0  # when it last served or was filled (a tick of its table), for least-recently-used
    scores: Optional[KeptScores] = None  # the score entries of its first positions, if its prompt was scored

    @property
    def valid(self) -> Sequence[int]:
        return self.tokens[:self.written]


@dataclass(frozen=True)
class Placement:
    """Where a prompt goes: its row, how many of its first tokens are already there (`cached`), and the
    row they are copied from first (-1: they are in `slot` itself); for a scored prompt, the score entries
    of those `cached` positions (None when it has none)."""

    slot: int
    cached: int = 0
    copy_from: int = -1
    scores: Optional[KeptScores] = None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class PrefixCache:
    """Rank 0's table of what each of the cache's `rows` holds, for up to `keep` kept rows (rows no
    sequence runs in; 0: no prefix is reused, every prompt is prefilled whole)."""

    rows: int
    keep: int
    held: Dict[int, Row] = field(default_factory=dict)   # by slot: busy rows and kept ones
    busy: Dict[int, bool] = field(default_factory=dict)  # slot -> a sequence runs in it
    tick: int = 0
    queries: int = 0         # prompt tokens looked up (of every prompt placed while the cache is on)
    hits: int = 0            # prompts that continued from a cached prefix
    cached_tokens: int = 0   # prompt tokens they did not prefill
    evictions: int = 0       # kept rows forgotten for the budget or overwritten by another prompt

    @property
    def enabled(self) -> bool:
        return self.keep > 0

    def place(self, prompt: Sequence[int], free: List[int], taken: Dict[int, int],
              score_top: int = -1) -> Tuple[Placement, Row]:
        """Choose a row of `free` for `prompt` (removing it from `free`) and how much of the prompt it
        need not prefill; and the `Row` that its sequence keeps up to date as its tokens are written and
        read. `taken`: the rows taken earlier in this step -> the positions that stay valid in each
        (updated here). `score_top` >= 0: the prompt is scored with that many alternatives, and continues
        only from kept score entries (see the module's docstring)."""
        self.tick += 1
        best, source = 0, -1
        if self.enabled:  # the longest start of the prompt; a free row rather than a copy at a tie
            self.queries += len(prompt)
            candidates = [(self._reusable(row, prompt, taken.get(slot, len(prompt)), score_top), slot in free, slot)
                          for slot, row in self.held.items()]
            best, _, source = max(candidates, default=(0, False, -1))
        if best > 0 and source in free:
            slot, placement = source, Placement(source, best)
        else:
            slot = self._free_row(free)
            placement = Placement(slot, best, source) if best > 0 else Placement(slot)
        scores = None
        if best > 0:
            self.held[source].used = self.tick
            self.hits, self.cached_tokens = self.hits + 1, self.cached_tokens + best
            if score_top >= 0:
                scores = self.held[source].scores.first(best)
                placement = Placement(placement.slot, best, placement.copy_from, scores)
        if slot in self.held and not self.busy.get(slot) and slot != source:
            self.evictions += 1  # a kept row's tokens are overwritten
        free.remove(slot)
        taken[slot] = placement.cached
        row = Row(list(prompt), len(prompt), self.tick, scores)
        if self.enabled:
            self.busy[slot], self.held[slot] = True, row
        return placement, row

    def _reusable(self, row: Row, prompt: Sequence[int], valid: int, score_top: int) -> int:
        """How many of `prompt`'s first positions `row` serves (of which `valid` stay valid this step): the
        tokens it shares with the row's cache but the last; scored, only positions with kept entries for
        the same `top` whose scored tokens it shares too."""
        n = min(common_prefix(row.valid, prompt), len(prompt) - 1, valid)
        if score_top < 0:
            return n
        if row.scores is None or row.scores.top != score_top:
            return 0
        # from a multiple of SCORED_CHUNK, where its prefill of the rest scores as the whole prompt's does
        return min(n, len(row.scores), common_prefix(row.tokens, prompt) - 1) // SCORED_CHUNK * SCORED_CHUNK

    def _free_row(self, free: List[int]) -> int:
        """A free row to overwrite: one that holds nothing, else the kept row used least recently."""
        empty = [s for s in free if s not in self.held]
        if empty:
            return empty[0]
        return min(free, key=lambda s: self.held[s].used)

    def release(self, slot: int, kept: bool = True) -> None:
        """The row's sequence left it: keep what it holds (least recently used rows beyond `keep` are
        forgotten), or with `kept` False forget it (its sequence failed)."""
        self.busy.pop(slot, None)
        row = self.held.get(slot)
        if row is None:
            return
        if not (kept and self.enabled):
            del self.held[slot]
            return
        row.used = self.tick
        idle = sorted((s for s in self.held if not self.busy.get(s)), key=lambda s: self.held[s].used)
        for s in idle[:max(len(idle) - self.keep, 0)]:
            del self.held[s]
            self.evictions += 1

    def forget(self) -> None:
        """Nothing held is trusted any more (e.g. after a failed step)."""
        self.held.clear()
        self.busy.clear()

