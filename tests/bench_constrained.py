"""How much constrained rows (a json_schema answer) slow the unconstrained rows of the same batch (issue 25).

Two measurements, with Meta's Llama 3 tokenizer (128256 ids, the vocabulary the grammar masks):

1. Rank 0's token choice for a batch of 4 sampled rows, alone and with 2 of them constrained (the grammar's
   state, its limits and the changed logits), one torch thread: `choice` below.
2. A 2-rank CPU server of a tiny random-weight Llama 3 model: the wall time of 2 streamed unconstrained
   answers of 96 tokens (ignore_eos) next to 2 more unconstrained ones, then next to 2 json_schema ones.

    .venv/bin/python tests/bench_constrained.py [TOKENIZER] [REPS]

Not a test: on a shared CPU the numbers move with the load, so each is a median over REPS runs.
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
            allowed, banned = g.limits("cpu")
            sampling[i] = replace(rows[i], allowed=allowed, ban=banned)
        ids = choose_from_logits(logits, sampling).ids.tolist()
        times.append(time.perf_counter() - started)
        for i, t in enumerate(ids):
            answers[i].append(t)
    return statistics.median(times) * 1e3


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
        started = time.perf_counter()
        with httpx.Client(timeout=300) as client, client.stream("POST", server.url + "/v1/chat/completions",
                                                                json=body) as answer:
            for _ in answer.iter_lines():
                pass
        return time.perf_counter() - started

    def batch(bodies):
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            times = list(pool.map(one, bodies))
        return (times[0] + times[1]) / 2  # the two unconstrained answers'

    try:
        batch([plain, plain, shaped, shaped])  # warm: the grammar's vocabulary is made once
        ratios = []
        for rep in range(reps):
            alone, mixed = batch([plain] * 4), batch([plain] * 2 + [shaped] * 2)
            ratios.append(mixed / alone)
            print(f"server rep {rep}: unconstrained answers {alone:.2f} s beside unconstrained, {mixed:.2f} s beside "
                  f"constrained ({100 * (mixed / alone - 1):+.0f}%)", flush=True)
        print(f"server: median slowdown of unconstrained rows {100 * (statistics.median(ratios) - 1):+.1f}% over {reps}")
    finally:
        server.stop()


def main(tokenizer_path="/work/shared/assets/llama3-tokenizer.model", reps="5"):
    torch.set_num_threads(1)
    tok, reps = Tokenizer(tokenizer_path), int(reps)
    free = [choice(tok, 0) for _ in range(reps)]
    mixed = [choice(tok, 2) for _ in range(reps)]
    print(f"rank 0's choice of 4 rows: {statistics.median(free):.2f} ms unconstrained, {statistics.median(mixed):.2f} ms "
          f"with 2 constrained (medians of {reps} x 96 steps)", flush=True)
    served(tok, tokenizer_path, reps)


if __name__ == "__main__":
    main(*sys.argv[1:])
