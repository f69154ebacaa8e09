"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

Runs on rank 0 only; the chosen ids are then broadcast, so every rank continues with the same tokens
and the output for a given seed does not depend on the number of ranks.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..checks import described, is_finite_number, is_int, is_number, require_number
from ..errors import LlamaMPError


# Temperatures below this divide real logits (tens, in float32) into a distribution that is already
# greedy to the last bit, and far below it into inf and NaN; above the upper bound every token is as
# likely as any other to within float precision, so larger values only hide a typo.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """The one rule for sampling parameters: temperature 0 (greedy) or in [1e-3, 100]; top_p in (0, 1];
    top_k an integer >= 0 (0 turns it off). Bools and strings are not numbers."""
    if not (is_number(temperature) and temperature == 0):
        require_number("temperature", temperature, MIN_TEMPERATURE, MAX_TEMPERATURE,
                       " (or 0 for greedy decoding)")
    if not is_finite_number(top_p) or not 0 < top_p <= 1:
        raise LlamaMPError(f"top_p must be a number in (0, 1] (1 keeps every token), got {described(top_p)}.")
    if not is_int(top_k) or top_k < 0:
        raise LlamaMPError(f"top_k must be an integer >= 0 (0 turns it off), got {described(top_k)}.")


def make_generator(device, seed: int) -> torch.Generator:
    """A random generator seeded with `seed` on `device`, the device of the tensors it draws for (a draw
    with a generator on another device fails there: "Expected a 'cuda' device type for generator"). The
    one place such a generator is made: the engine's and each server request's, on the logits' device,
    and random weights' (runtime/loading.py), on the model's."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids, shape [batch], from float logits of shape [batch, vocab]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        probs, ids = _nucleus(probs, top_p)
        return ids.gather(-1, _draw(probs, generator)).squeeze(-1)
    return _draw(probs, generator).squeeze(-1)


def _nucleus(probs: torch.Tensor, top_p: float):
    """(probs, ids) of the likeliest tokens in descending order, with every token zeroed that comes
    after the smallest prefix whose mass reaches top_p. The most likely token always survives.

    Sorting a 32000-token vocabulary costs ~3 ms on a CPU, as much as a whole decode step of a small
    model. There, the 128 likeliest tokens (a top-k, ~0.15 ms) are tried first: when they hold more
    than top_p, every later token would be dropped anyway, so the result is exactly the full sort's;
    only a flatter distribution needs more. On a GPU the sort is cheap and the check would cost a
    host sync."""
    vocab = probs.shape[-1]
    k = min(vocab, 128) if probs.device.type == "cpu" else vocab
    while True:
        if k < vocab:
            top, ids = torch.topk(probs, k, dim=-1)
        else:
            top, ids = torch.sort(probs, dim=-1, descending=True)
        if k == vocab or bool((top.sum(dim=-1) > top_p).all()):
            break
        k = min(vocab, k * 16)
    drop = (torch.cumsum(top, dim=-1) - top) > top_p  # the mass before this token already reaches top_p
    return top.masked_fill(drop, 0.0), ids


def _draw(weights: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One index per row [batch, 1], drawn with probability proportional to `weights` [batch, n].

    Inverse-CDF sampling: one uniform number per row against the running sum (in float64). The
    same distribution as torch.multinomial, which on a CPU spends ~1.2 ms per 32000-token row."""
    cdf = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    u = torch.rand((weights.shape[0], 1), generator=generator, dtype=torch.float64, device=weights.device)
    # right=True: the first index whose cdf exceeds u * total, which never has zero weight.
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=weights.shape[-1] - 1)
