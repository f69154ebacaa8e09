"""How much constrained rows (a json_schema answer) slow the unconstrained rows of the same batch (issue 25:
"by no more than 10%").

Two measurements, with Meta's Llama 3 tokenizer (128256 ids, the vocabulary the grammar masks):

1. Rank 0's token choice for a batch of 4 sampled rows, alone and with 2 of them constrained (the grammar's
   state, its mask and the changed logits), one torch thread: `choice` below.
2. A 2-rank CPU server of a tiny random-weight Llama 3 model (dim 64: the vocabulary-wide work of a step is
   most of it, so a mask's cost shows as large as it can), 4 streamed answers of 96 tokens (ignore_eos) at
   once: batch A, 4 unconstrained; batch B, 2 unconstrained and 2 json_schema ones (which stay in the batch
   for all 96 tokens too, so both batches hold 4 rows throughout). What is compared is what an
   unconstrained row sees: its time per token after the first (decode steps only, no admission or
   prefill), the mean of the batch's 2 first unconstrained rows.

On a shared CPU the speed drifts with the other work, so both are paired and interleaved: each rep runs A
and B back to back (AB, then BA, alternately), the ratio B/A is taken pair by pair, and the report gives
the median ratio with its quartiles and extremes over REPS pairs.

    .venv/bin/python tests/bench_constrained.py [TOKENIZER] [REPS]

Not a test: a measurement, recorded in docs/server.md.
"""

import concurrent.futures
import os
import pathlib
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import httpx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_mp.checkpoints.params import ModelArgs  # noqa: E402
from llama_mp.checkpoints.synth import write_random_checkpoint  # noqa: E402
from llama_mp.runtime.grammar import Constraint, schema_grammar  # noqa: E402
from llama_mp.runtime.sampling import RowSampling, choose_from_logits, make_generator  # noqa: E402
from llama_mp.runtime.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {"type": "object", "required": ["a", "b"], "properties": {"a": {"type": "string", "maxLength": 40},
                                                                   "b": {"type": "integer"}}}


def choice(tok, constrained, steps=96):
    """The median time (ms) of one batch choice of 4 sampled rows, `constrained` of them by SCHEMA."""
    grammar = schema_grammar(SCHEMA)
    rows = [RowSampling(1.0, 1.0, 0, make_generator("cpu", k)) for k in range(4)]
    grammars = [Constraint(grammar, tok, sorted(tok.stop_ids)) for _ in range(constrained)]
    answers = [[] for _ in rows]
    logits_of = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        logits = torch.randn(len(rows), tok.n_words, generator=logits_of)
        started = time.perf_counter()
        sampling = list(rows)
        for i, g in enumerate(grammars):
            g.catch_up(answers[i])
            sampling[i] = replace(rows[i], logit_cap=g.logit_cap("cpu"))
        ids = choose_from_logits(logits, sampling).ids.tolist()
        times.append(time.perf_counter() - started)
        for i, t in enumerate(ids):
            answers[i].append(t)
    return statistics.median(times) * 1e3


def spread(ratios) -> str:
    """A list of B/A ratios as slowdowns: median, quartiles, extremes, and how many pairs were over +10%."""
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    pct = [100 * (r - 1) for r in (med, q1, q3, min(ratios), max(ratios))]
    over = sum(r > 1.10 for r in ratios)
    return (f"median {pct[0]:+.1f}% (quartiles {pct[1]:+.1f}% .. {pct[2]:+.1f}%, extremes {pct[3]:+.1f}% .. "
            f"{pct[4]:+.1f}%; {over} of {len(ratios)} pairs over +10%)")


def served(tok, tokenizer_path, reps):
    from conftest import TINY
    from test_server import start_torchrun

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_constrained_"))
    ckpt = str(root / "ckpt")
    write_random_checkpoint(ckpt, ModelArgs(**dict(TINY, vocab_size=tok.n_words, n_heads=8, n_kv_heads=4)), 2)
    server = start_torchrun(root, ckpt, tokenizer_path, "--max_seq_len", "1024")
    plain = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 96, "temperature": 1.0,
             "ignore_eos": True, "stream": True}
    shaped = dict(plain, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})

    def one(body):
        """(wall time, time per token after the first) of one streamed answer."""
        started, stamps = time.perf_counter(), []
        with httpx.Client(timeout=300) as client, client.stream("POST", server.url + "/v1/chat/completions",
                                                                json=body) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    stamps.append(time.perf_counter())
        return time.perf_counter() - started, (stamps[-1] - stamps[1]) / (len(stamps) - 2)

    def batch(bodies):
        """The batch's first 2 (unconstrained) answers: their mean (wall time, time per token)."""
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            times = list(pool.map(one, bodies))
        return tuple((times[0][k] + times[1][k]) / 2 for k in range(2))

    try:
        batch([plain, plain, shaped, shaped])  # warm: the grammar's vocabulary is made once
        per_token, wall = [], []
        for rep in range(reps):
            runs = {}
            for name in ("AB" if rep % 2 == 0 else "BA"):
                runs[name] = batch([plain] * 4 if name == "A" else [plain] * 2 + [shaped] * 2)
            per_token.append(runs["B"][1] / runs["A"][1])
            wall.append(runs["B"][0] / runs["A"][0])
            print(f"server pair {rep}: unconstrained rows {1e3 * runs['A'][1]:.2f} ms/token beside unconstrained, "
                  f"{1e3 * runs['B'][1]:.2f} ms/token beside constrained ({100 * (per_token[-1] - 1):+.1f}%)",
                  flush=True)
        print(f"server, time per token of unconstrained rows beside 2 constrained ones: {spread(per_token)}")
        print(f"server, wall time of the same answers: {spread(wall)}")
    finally:
        server.stop()


def main(tokenizer_path="/work/shared/assets/llama3-tokenizer.model", reps="30"):
    torch.set_num_threads(1)
    tok, reps = Tokenizer(tokenizer_path), int(reps)
    free, mixed = [], []
    for rep in range(reps):  # interleaved pairs, as the server's
        for constrained in ((0, 2) if rep % 2 == 0 else (2, 0)):
            (free if constrained == 0 else mixed).append(choice(tok, constrained))
    print(f"rank 0's choice of 4 rows: {statistics.median(free):.2f} ms unconstrained, {statistics.median(mixed):.2f} ms "
          f"with 2 constrained (medians over {reps} pairs of 96 steps each); per pair "
          f"{spread([m / f for m, f in zip(mixed, free)])}", flush=True)
    served(tok, tokenizer_path, reps)


if __name__ == "__main__":
    main(*sys.argv[1:])
