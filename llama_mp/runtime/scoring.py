"""Teacher forcing: how likely the model finds given tokens, from the hidden states before them.

Used by `Engine.score` (perplexity) and by the server's `echo` with `logprobs` (the log-probability of
each prompt token). The logits of a long sequence over a large vocabulary are big (4096 positions of
Llama 3's 128256 ids are 2 GiB in float32), so they are made, gathered on rank 0 and reduced a chunk of
positions at a time: what is kept is one log-probability per position and its `top` likeliest ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Logits made at once, in elements: positions per chunk = this // vocabulary size (64 MiB of float32).
CHUNK_ELEMENTS = 1 << 24
# A scored prompt is prefilled and scored in calls of this many positions, at multiples of it, the last
# padded (`Transformer.hidden_scored`): a position's bits then do not depend on the prompt's length or on
# where a cached prefix ends (prefix caching resumes scored prompts at multiples of it).
SCORED_CHUNK = 64


@dataclass
class TokenScores:
    """Per position i: the log-probability of the token that follows it, and the `top` likeliest ids."""

    logprobs: torch.Tensor      # [n] float32: log p(targets[i] | the tokens up to position i)
    top_logprobs: torch.Tensor  # [n, top] float32, likeliest first
    top_ids: torch.Tensor       # [n, top] int64


@torch.inference_mode()
def score_hidden(model, h: torch.Tensor, targets: torch.Tensor, top: int = 1,
                 chunk: Optional[int] = None) -> Optional[TokenScores]:
    """Every rank (it gathers logits): `h` [n, dim], final normed hidden states of n positions; `targets`
    [n] on h's device, the id that follows each; `chunk`: positions per logits call (default: by
    CHUNK_ELEMENTS). Rank 0 gets TokenScores on h's device (nothing is read on the host: the
    server's batch step scores prompts, and the callers copy them when they need them); the others None."""
    n, vocab = h.shape[0], model.args.vocab_size
    chunk = chunk or max(1, CHUNK_ELEMENTS // vocab)
    logprobs, top_logprobs, top_ids = [], [], []
    for start in range(0, n, chunk):
        logits = model.logits(h[start:start + chunk, None])  # [c, 1, vocab] float32 on rank 0
        if logits is None:
            continue
        lp = torch.log_softmax(logits[:, 0], dim=-1)                                # [c, vocab]
        logprobs.append(lp.gather(-1, targets[start:start + chunk, None])[:, 0])
        values, ids = torch.topk(lp, top, dim=-1)                                    # [c, top]
        top_logprobs.append(values)
        top_ids.append(ids)
    if model.comm.rank != 0:
        return None
    if not logprobs:  # no positions
        return TokenScores(torch.empty(0, device=h.device), torch.empty(0, top, device=h.device),
                           torch.empty(0, top, dtype=torch.long, device=h.device))
    return TokenScores(torch.cat(logprobs), torch.cat(top_logprobs), torch.cat(top_ids))
