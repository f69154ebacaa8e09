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
# Float32 matrix products (MKL's here) compute a row of the output the same way, bit for bit, for any
# number of rows from about a dozen on, but take other paths for fewer (and the C kernels' projections,
# tiles of a few rows, take up to 32). So logits are made for at least LOGIT_ROWS rows (padded), and a
# scored prompt continued from a cached prefix prefills at least SAME_ROWS positions
# (`Decoder.scored_resume`): its scores then equal those of the whole prompt exactly.
SAME_ROWS = 16
LOGIT_ROWS = 48


@dataclass
class TokenScores:
    """Per position i: the log-probability of the token that follows it, and the `top` likeliest ids."""

    logprobs: torch.Tensor      # [n] float32: log p(targets[i] | the tokens up to position i)
    top_logprobs: torch.Tensor  # [n, top] float32, likeliest first
    top_ids: torch.Tensor       # [n, top] int64


@torch.inference_mode()
def score_hidden(model, h: torch.Tensor, targets: torch.Tensor, top: int = 1) -> Optional[TokenScores]:
    """Every rank (it gathers logits): `h` [n, dim], final normed hidden states of n positions; `targets`
    [n] on h's device, the id that follows each. Rank 0 gets TokenScores on h's device (nothing is read on the host: the
    server's batch step scores prompts, and the callers copy them when they need them); the others None."""
    n, vocab = h.shape[0], model.args.vocab_size
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    logprobs, top_logprobs, top_ids = [], [], []
    for start in range(0, n, chunk):
        rows = h[start:start + chunk]
        if rows.shape[0] < LOGIT_ROWS:  # see LOGIT_ROWS; the padding's logits are dropped
            rows = torch.cat((rows, rows.new_zeros(LOGIT_ROWS - rows.shape[0], rows.shape[1])))
        logits = model.logits(rows[:, None])  # [c, 1, vocab] float32 on rank 0
        if logits is None:
            continue
        lp = torch.log_softmax(logits[:min(chunk, n - start), 0], dim=-1)           # [c, vocab]
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
