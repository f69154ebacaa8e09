"""Choosing the next token: greedy, temperature, top-k, min-p and nucleus (top-p) sampling, with OpenAI's
logit bias and penalties, each row with its own settings (`RowSampling`); the one place it happens, for `Engine.generate` (every row alike) and the server's
continuous batch (each request its own settings and generator).

`choose_tokens` is every rank's side: greedy rows that want no logprobs need only the distributed argmax
(each rank's best (logit, id), exchanged; no logits move); otherwise the logits are gathered on rank 0,
which chooses every row's token (`choose_from_logits`) and broadcasts the ids. Only rank 0 draws, so the
output for a seed does not depend on the number of ranks, and it draws from the gathered logits, which
are the same whichever decoder made them (to float precision). Everything stays on the logits' device:
the draw, the logprobs and the ids; nothing is read on the host (see `_nucleus` for the CPU's one
shortcut), so a step queued on a GPU never waits for the host.

The draw is inverse-CDF: one uniform number per row against the running sum of its kept probabilities.
It uses the same random number whatever the number of candidates, so the CPU's shortcut to the nucleus
(the 128 likeliest tokens first) draws exactly what a full sort draws; the exponential race,
argmax(p / Exponential(1)), needs one random number per vocabulary entry (0.7 ms per 32000-token row on
a CPU, a tenth of a small model's step) and would change with the candidate count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..checks import OptionError, described, is_finite_number, is_int, is_number, require_number
from ..errors import LlamaMPError
from .transfer import upload


# Temperatures below this divide real logits (tens, in float32) into a distribution that is already
# greedy to the last bit, and far below it into inf and NaN; above the upper bound every token is as
# likely as any other to within float precision, so larger values only hide a typo.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0


def check_sampling(temperature: float, top_p: float, top_k: int, spelled: str = "{}") -> None:
    """The one rule for sampling parameters: temperature 0 (greedy) or in [1e-3, 100]; top_p in (0, 1];
    top_k an integer >= 0 (0 turns it off). Bools and strings are not numbers. `spelled` writes a name as
    the caller's front end spells it ("--{}" on the command line, "'{}'" in a server request), so the
    message names what the user typed; the error's `option` is the plain name."""
    try:
        if not (is_number(temperature) and temperature == 0):
            require_number(spelled.format("temperature"), temperature, MIN_TEMPERATURE, MAX_TEMPERATURE,
                           " (or 0 for greedy decoding)")
    except LlamaMPError as e:
        raise OptionError("temperature", str(e)) from None
    if not is_finite_number(top_p) or not 0 < top_p <= 1:
        raise OptionError("top_p", f"{spelled.format('top_p')} must be a number in (0, 1] (1 keeps every token), "
                                   f"got {described(top_p)}.")
    if not is_int(top_k) or top_k < 0:
        raise OptionError("top_k", f"{spelled.format('top_k')} must be an integer >= 0 (0 turns it off), got "
                                   f"{described(top_k)}.")


def make_generator(device, seed: int) -> torch.Generator:
    """A random generator seeded with `seed` on `device`, the device of the tensors it draws for (a draw
    with a generator on another device fails there: "Expected a 'cuda' device type for generator"). The
    one place such a generator is made: the engine's and each server request's, on the logits' device,
    and random weights' (runtime/loading.py), on the model's."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


@dataclass(frozen=True)
class RowSampling:
    """How one row's next token is chosen: greedy (temperature 0) or sampled from the temperature-scaled
    softmax cut to the `top_k` likeliest (0: no cut) and to the nucleus of mass `top_p`, drawn with
    `generator` (on the logits' device; None: torch's default). `logprobs` >= 0 also asks for the chosen
    token's log-probability and the `logprobs` likeliest alternatives (of the unscaled softmax); -1: none."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generator: Optional[torch.Generator] = None
    logprobs: int = -1
    # What OpenAI's and vLLM's requests add (the server's), all applied to the logits before the choice, greedy
    # or sampled, on their device; `logprobs` stay those of the model's own logits. `min_p`: drop the tokens
    # less likely than min_p times the likeliest (after temperature; sampling only). `bias` [vocab]: added
    # (logit_bias). `counts` [vocab] float: how often each id was chosen so far, which `choose_from_logits`
    # adds this step's choice to; with it, `presence_penalty` is taken from every id chosen before and
    # `frequency_penalty` times its count. `ban` [n] ids: never chosen (stop tokens before min_tokens).
    # `logit_cap` [vocab]: each logit is capped at it, +inf where a grammar allows the id (its logit stays what
    # it is) and -inf where it excludes it (runtime/grammar.py).
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    bias: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    ban: Optional[torch.Tensor] = None
    logit_cap: Optional[torch.Tensor] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts(self) -> bool:
        """Whether the logits are changed before the choice (bias, penalties, banned ids, a grammar's cap)."""
        return self.bias is not None or self.counts is not None or self.ban is not None or \
            self.logit_cap is not None

    @property
    def needs_logits(self) -> bool:
        """Whether this row's choice needs the whole vocabulary's logits on rank 0 (not just the argmax)."""
        return not self.greedy or self.logprobs >= 0 or self.adjusts


@dataclass
class Choice:
    """A step's token choice: the ids [rows] (on the device, every rank) and, on rank 0, what came with them:
    the gathered float32 logits [rows, seq, vocab] (None when greedy rows needed only the argmax; at the last
    position as the choice adjusted them, see `choose_from_logits`), and when a row asked for logprobs,
    each chosen id's log-probability [rows] and the likeliest ids with theirs [rows, n] (n: the most any
    row asked for; None when that is 0)."""

    ids: torch.Tensor
    logits: Optional[torch.Tensor] = None
    logprobs: Optional[torch.Tensor] = None
    top_logprobs: Optional[torch.Tensor] = None
    top_ids: Optional[torch.Tensor] = None


# (mask [rows], ids [rows]): rows where the mask is set take these ids instead of the chosen ones (prompt
# tokens still being fed).
Forced = Tuple[torch.Tensor, torch.Tensor]


def choose_tokens(model, h: torch.Tensor, rows: Optional[Sequence[RowSampling]], gather: bool,
                  forced: Optional[Forced] = None) -> Choice:
    """Every rank: the next token of each row of `h` [rows, seq, dim] (final hidden states; the last position
    counts). `gather` must be the same on every rank: whether any row `needs_logits`. Without it every rank
    finds the argmax itself; with it rank 0 chooses by `rows` (needed there only) and broadcasts."""
    if not gather:
        ids = model.greedy_next(h)
        return Choice(ids if forced is None else torch.where(forced[0], forced[1], ids))
    logits = model.logits(h)  # rank 0 only
    if logits is None:  # rank 0's choice arrives
        return Choice(model.comm.broadcast_from_main_(torch.empty(h.shape[0], dtype=torch.long, device=h.device)))
    if rows is None:
        raise LlamaMPError("internal error: rank 0 gathered the logits without the rows' sampling settings.")
    choice = choose_from_logits(logits[:, -1], rows, forced)
    choice.ids, choice.logits = model.comm.broadcast_from_main_(choice.ids), logits
    return choice


def choose_from_logits(logits: torch.Tensor, rows: Sequence[RowSampling], forced: Optional[Forced] = None) -> Choice:
    """Rank 0's choice from float logits [rows, vocab], each row by its own settings, on their device: the
    ids, and the logprobs some row asked for (of the unscaled softmax, like Meta's: taken before the rows'
    adjustments). The logits are the caller's own, made for this choice: rows that adjust them (`_adjust`)
    are changed in place, which spares a copy of the batch's logits (2 MB for 4 rows of 128k) per step."""
    alternatives = max(r.logprobs for r in rows)
    lp = torch.log_softmax(logits, dim=-1) if alternatives >= 0 else None
    _adjust(logits, rows)
    ids = draw(logits, rows)
    if forced is not None:
        ids = torch.where(forced[0], forced[1], ids)
    for i, r in enumerate(rows):
        if r.counts is not None:  # the choice counts from the next step on (a device op: no read)
            r.counts.index_add_(0, ids[i:i + 1], torch.ones(1, dtype=r.counts.dtype, device=r.counts.device))
    if lp is None:
        return Choice(ids)
    choice = Choice(ids, logprobs=lp.gather(-1, ids[:, None])[:, 0])
    if alternatives:
        choice.top_logprobs, choice.top_ids = torch.topk(lp, alternatives, dim=-1)
    return choice


def _adjust(logits: torch.Tensor, rows: Sequence[RowSampling]) -> None:
    """Change `logits` in place into those the choice is made from: rows that ask for it get their bias
    added, penalties taken, banned ids at -inf and a grammar's cap applied (see `RowSampling`)."""
    for i, r in enumerate(rows):
        if not r.adjusts:
            continue
        row = logits[i]
        if r.bias is not None:
            row += r.bias
        if r.counts is not None:
            row -= r.presence_penalty * (r.counts > 0) + r.frequency_penalty * r.counts
        if r.ban is not None:
            row.index_fill_(0, r.ban, float("-inf"))
        if r.logit_cap is not None:
            row.clamp_(max=r.logit_cap)


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [batch] from float logits [batch, vocab], every row with the same settings."""
    return draw(logits, [RowSampling(temperature, top_p, top_k, generator)] * logits.shape[0])


def draw(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """Next token ids [rows] from float logits [rows, vocab], row i by rows[i]: the argmax where greedy."""
    sampled = [i for i, r in enumerate(rows) if not r.greedy]
    if len(sampled) == len(rows):
        return _sampled(logits, rows)
    ids = logits.argmax(dim=-1)
    if not sampled:
        return ids
    at = upload(sampled, logits.device)
    return ids.index_copy_(0, at, _sampled(logits.index_select(0, at), [rows[i] for i in sampled]))


def _sampled(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """Sampled ids [rows] (every row samples). Rows that all share a setting use it as a number (the
    engine's case: no per-row tensors); rows that differ get a column of per-row values."""
    vocab = logits.shape[-1]
    logits = logits / _per_row([r.temperature for r in rows], logits)
    if any(r.min_p > 0 for r in rows):  # p < min_p * p_max is logit < max logit + log(min_p)
        floor = _per_row([math.log(r.min_p) if r.min_p > 0 else float("-inf") for r in rows], logits)
        logits = logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True) + floor, float("-inf"))
    ks = [r.top_k if r.top_k < vocab else 0 for r in rows]
    if any(ks):
        kth = torch.topk(logits, max(ks), dim=-1).values  # [rows, largest k], descending
        if len(set(ks)) == 1:
            kth = kth[:, -1:]
        else:  # each row's own k-th value; rows without a cut compare with -inf (keep everything)
            k = upload(ks, logits.device)[:, None]
            kth = torch.where(k > 0, kth.gather(-1, (k - 1).clamp_(min=0)), float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th stay in
    probs = torch.softmax(logits, dim=-1)
    u = _uniforms(rows, logits.device)
    cut = [i for i, r in enumerate(rows) if r.top_p < 1.0]
    if not cut:
        return _draw(probs, u)
    if len(cut) == len(rows):
        return _draw(_nucleus(probs, _per_row([r.top_p for r in rows], probs)), u)
    at = upload(cut, logits.device)
    kept = _nucleus(probs.index_select(0, at), _per_row([rows[i].top_p for i in cut], probs))
    return _draw(probs, u).index_copy_(0, at, _draw(kept, u.index_select(0, at)))


def _per_row(values: List[float], like: torch.Tensor):
    """`values` (one per row) as the number they all are, or as a column [rows, 1] in `like`'s dtype."""
    if len(set(values)) == 1:
        return values[0]
    return upload(values, like.device, like.dtype)[:, None]


def _uniforms(rows: Sequence[RowSampling], device: torch.device) -> torch.Tensor:
    """One uniform number per row [rows, 1] (float64), each from its row's generator; rows that share a
    generator take theirs from one draw, in row order (the engine: one draw for the batch)."""
    by_generator: Dict[int, Tuple[Optional[torch.Generator], List[int]]] = {}
    for i, r in enumerate(rows):
        by_generator.setdefault(id(r.generator), (r.generator, []))[1].append(i)
    if len(by_generator) == 1:
        return torch.rand((len(rows), 1), generator=rows[0].generator, dtype=torch.float64, device=device)
    u = torch.empty((len(rows), 1), dtype=torch.float64, device=device)
    for generator, at in by_generator.values():
        u.index_copy_(0, upload(at, device),
                      torch.rand((len(at), 1), generator=generator, dtype=torch.float64, device=device))
    return u


def _nucleus(probs: torch.Tensor, top_p):
    """`probs` with every token zeroed that is less likely than the smallest prefix of the likeliest
    tokens whose mass reaches top_p (a number, or a column [rows, 1] of per-row values) holds; tokens
    as likely as its last one stay too. The most likely token always survives.

    The kept tokens stay in vocabulary order, and the draw runs over that order: a draw over the sorted
    order would depend on how nearly equal probabilities sort, which float rounding (another rank count
    or decoder: sums in another order) changes, and in a flat distribution that moves most draws. In
    vocabulary order a draw moves only where the uniform number or the nucleus edge lies within rounding.

    Sorting a 32000-token vocabulary costs ~3 ms on a CPU, as much as a whole decode step of a small
    model. There, the 128 likeliest tokens (a top-k, ~0.15 ms) are tried first: when they hold more
    than top_p, every later token would be dropped anyway, so the result is exactly the full sort's;
    only a flatter distribution needs more. Knowing that is a read on the host, free on a CPU (there is
    no device to wait for); elsewhere the sort is cheap, and the read would make the host wait for the
    device, so the whole vocabulary is sorted at once."""
    vocab = probs.shape[-1]
    k = min(vocab, 128) if _reads_are_free(probs.device) else vocab
    while True:
        if k < vocab:
            top, ids = torch.topk(probs, k, dim=-1)
        else:
            top, ids = torch.sort(probs, dim=-1, descending=True)
        if k == vocab or bool((top.sum(dim=-1, keepdim=True) > top_p).all()):
            break
        k = min(vocab, k * 16)
    drop = (torch.cumsum(top, dim=-1) - top) > top_p  # the mass before this token already reaches top_p
    edge = top.masked_fill(drop, float("inf")).amin(dim=-1, keepdim=True)  # the least likely kept token's
    return probs.masked_fill(probs < edge, 0.0)


def _reads_are_free(device: torch.device) -> bool:
    """Whether reading a value of a tensor on `device` on the host costs no wait: on the CPU only. (The
    host-sync tests turn it off to run what a GPU runs.)"""
    return device.type == "cpu"


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row [rows], drawn with probability proportional to `weights` [rows, n], by the
    uniform numbers u [rows, 1] against the running sum (in float64): the same distribution as
    torch.multinomial, which on a CPU spends ~1.2 ms per 32000-token row."""
    cdf = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    # right=True: the first index whose cdf exceeds u * total, which never has zero weight.
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=weights.shape[-1] - 1)[:, 0]
