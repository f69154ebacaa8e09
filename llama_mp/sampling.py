"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

Runs on rank 0 only; the chosen ids are then broadcast, so every rank continues with the same tokens
and the output for a given seed does not depend on the number of ranks.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import LlamaMPError


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not _number(temperature) or not temperature >= 0:
        raise LlamaMPError(f"temperature must be >= 0 (0 means greedy), got {temperature}.")
    if not _number(top_p) or not 0 < top_p <= 1:
        raise LlamaMPError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise LlamaMPError(f"top_k must be an integer >= 0 (0 turns it off), got {top_k!r}.")


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
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it
        # already does. The most likely token always survives.
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
