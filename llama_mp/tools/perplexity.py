"""`llama-mp perplexity`: how well a model predicts a text file, so users can check a model (a quantized one
above all) on their own data, on any number of ranks.

The text is tokenized once (with a leading bos) and scored by teacher forcing in sliding windows: each
window holds up to `window` tokens and scores only the targets no earlier window scored, so every token
after the first is scored exactly once, with at least `window - stride` tokens of context once the
first window is past. Perplexity is exp(mean negative log-likelihood) over those targets.

`--per_token FILE` saves each target's log-probability and the model's own most likely token there;
`--compare FILE` (a file saved from another run on the same text, e.g. the full-precision model) reports
the mean |difference| of the log-probabilities and how often the two models' most likely tokens agree.
Rank 0 reads and tokenizes the text and drives the other ranks through the engine's rank protocol.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from ..checkpoints.staging import check_output_file, staged_output_file
from ..checks import JsonProblem, read_json_file, require_int
from ..dtypes import largest_finite
from ..errors import LlamaMPError


def windows(n_tokens: int, window: int, stride: int) -> List[Tuple[int, int, int]]:
    """(begin, end, first): the window tokens[begin:end] scores the targets at positions first..end-1.
    Together the windows score positions 1..n_tokens-1, each once. Needs 1 <= stride < window."""
    assert 1 <= stride < window, (stride, window)
    out, first, begin = [], 1, 0
    while first < n_tokens:
        end = min(begin + window, n_tokens)
        out.append((begin, end, first))
        first, begin = end, begin + stride
    return out


@dataclass
class Scores:
    """Per scored target (positions 1..n-1 of the text): its log-probability and the argmax token."""

    logprobs: torch.Tensor  # float32 [targets]
    argmax: torch.Tensor    # int64 [targets]

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprobs.double().mean().item())

    def save(self, path: str) -> None:
        """Written whole or not at all (staging.py): a killed run leaves no half file behind."""
        with staged_output_file(path) as staging, open(staging, "w") as f:
            json.dump({"logprobs": self.logprobs.tolist(), "argmax": self.argmax.tolist()}, f)

    def nonfinite_problem(self) -> Optional[str]:
        """Where the log-probabilities are NaN or infinite (a perplexity of nan or inf says nothing), or None."""
        bad = ~torch.isfinite(self.logprobs)
        if not bool(bad.any()):
            return None
        first = int(bad.nonzero()[0])
        return (f"{int(bad.sum())} of {bad.numel()} log-probabilities are NaN or infinite (the first at scored "
                f"token {first}: {self.logprobs[first].item()})")

    @classmethod
    def load(cls, path: str) -> "Scores":
        try:
            data = read_json_file(path)
        except JsonProblem as e:
            raise LlamaMPError(f"--compare {path!r} {e.reason}, so it is not a file written by `llama-mp perplexity "
                               "--per_token`. Score the reference model with --per_token FILE first.") from None
        except OSError as e:
            raise LlamaMPError(f"--compare {path!r} cannot be read ({e.strerror or e}).") from None
        try:
            scores = cls(torch.tensor(data["logprobs"], dtype=torch.float32), torch.tensor(data["argmax"]))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise LlamaMPError(f"--compare {path!r} is not a file written by `llama-mp perplexity --per_token` "
                               f"({type(e).__name__}: {e}). Score the reference model with --per_token FILE first.")
        if scores.nonfinite_problem():
            raise LlamaMPError(f"--compare {path!r}: {scores.nonfinite_problem()}, so nothing can be compared with "
                               "it. Score the reference model again with --per_token FILE.")
        return scores


def agreement(scores: Scores, reference: Scores) -> Dict[str, float]:
    """How close `scores` are to `reference` on the same targets: mean |Δ logprob| and greedy agreement."""
    if scores.logprobs.shape != reference.logprobs.shape:
        raise LlamaMPError(f"The runs scored different numbers of tokens ({scores.logprobs.numel()} and "
                           f"{reference.logprobs.numel()}): compare runs on the same text, tokenizer and window.")
    return {"mean_abs_delta_logprob": (scores.logprobs - reference.logprobs).abs().mean().item(),
            "greedy_agreement": (scores.argmax == reference.argmax).double().mean().item()}


def score_tokens(llama, tokens: List[int], window: int, stride: int, progress: bool = True) -> Optional[Scores]:
    """Rank 0: score `tokens` in sliding windows on every rank of `llama`'s group (the others must be in
    `llama.engine.serve()`); returns the Scores on rank 0."""
    engine = llama.engine
    logprobs, argmax = [], []
    for begin, end, first in tqdm(windows(len(tokens), window, stride), desc="scoring", unit="window",
                                  file=sys.stderr, disable=not progress or None):
        piece = tokens[begin:end]
        lp, top = engine.call("score", lambda: engine.check_score(piece))
        logprobs.append(lp[first - begin - 1:])
        argmax.append(top[first - begin - 1:])
    return Scores(torch.cat(logprobs), torch.cat(argmax))


def check_window(window, stride, max_seq_len: int) -> Tuple[int, int]:
    """(window, stride) with their defaults (max_seq_len, half the window), checked."""
    window = max_seq_len if window is None else require_int("--window", window, 2)
    if window > max_seq_len:
        raise LlamaMPError(f"--window {window} is longer than --max_seq_len {max_seq_len}; raise --max_seq_len "
                           "(more KV cache memory) or use a shorter window.")
    stride = max(window // 2, 1) if stride is None else require_int("--stride", stride, 1)
    if stride >= window:
        raise LlamaMPError(f"--stride {stride} is not shorter than --window {window}: a window must keep at least "
                           "one token of the previous one as context. Use a stride below the window (default: half).")
    return window, stride


def read_text(path) -> str:
    if not isinstance(path, str) or not os.path.isfile(path):
        raise LlamaMPError(f"--text {path!r} is not a file. Pass a UTF-8 text file to score.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise LlamaMPError(f"--text {path!r} is not UTF-8 text ({e}).")
    if not text.strip():
        raise LlamaMPError(f"--text {path!r} is empty: there is nothing to score.")
    return text


def perplexity(llama, text_path: str, window: Optional[int] = None, stride: Optional[int] = None,
               per_token: Optional[str] = None, compare: Optional[str] = None) -> Optional[Dict]:
    """Every rank: score the file on the ranks of `llama`; rank 0 returns the report (None elsewhere)."""
    engine = llama.engine
    if not engine.group.is_main:
        engine.serve()
        return None
    try:
        window, stride = check_window(window, stride, llama.model.max_seq_len)
        if per_token is not None:  # before the run whose results it will hold
            check_output_file("--per_token", per_token)
        reference = Scores.load(compare) if compare is not None else None
        tokens = llama.tokenizer.encode(read_text(text_path), bos=True, eos=False)
        if len(tokens) < 2:
            raise LlamaMPError(f"--text {text_path!r} is a single token: there is nothing to predict.")
        scores = score_tokens(llama, tokens, window, stride)
    finally:
        engine.stop()
    if scores.nonfinite_problem():
        raise LlamaMPError(f"The model scored {text_path!r} but {scores.nonfinite_problem()}: its activations "
                           f"overflowed ({largest_finite(llama.model.act_dtype)}) or its weights are damaged, so "
                           "there is no perplexity to report. Run with --dtype float32 or bfloat16, and check the checkpoint "
                           "with `llama-mp verify`.")
    report = {"text": text_path, "tokens": len(tokens), "scored": scores.logprobs.numel(), "window": window,
              "stride": stride, "perplexity": scores.perplexity,
              "mean_nll": -scores.logprobs.double().mean().item()}
    if reference is not None:
        report.update(agreement(scores, reference), compared_to=compare)
    if per_token is not None:
        scores.save(per_token)
    return report


def format_report(report: Dict) -> str:
    lines = [f"perplexity {report['perplexity']:.4f} (mean NLL {report['mean_nll']:.4f}) over {report['scored']} "
             f"tokens of {report['text']}, windows of {report['window']} tokens, stride {report['stride']}"]
    if "compared_to" in report:
        lines.append(f"against {report['compared_to']}: mean |delta logprob| {report['mean_abs_delta_logprob']:.5f}, "
                     f"greedy agreement {100 * report['greedy_agreement']:.2f}%")
    return "\n".join(lines)
