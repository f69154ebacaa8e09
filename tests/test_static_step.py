"""The static-shape decode step (the `static` decoder: `Transformer.step` over every cache row, its attention
reading a bucket of positions): same shapes and operators at every position of a bucket, so it compiles into
one graph; and it decodes exactly what the `pytorch` decoder's steps (the same `Transformer.step` over the
rows and positions a step needs) decode, for `generate` and for rows at their own positions in their own
cache slots, greedy and sampled alike, on 1, 2 and 4 ranks."""

import pytest
import torch

from multiproc import on_ranks

PROMPTS = [[1, 306, 4658, 29871, 12], [1, 15043], [1, 450, 4996, 17354, 1701, 29916, 432, 17204], [1]]


def prompts_in(vocab):
    """PROMPTS as ids of a vocabulary of `vocab` (the tiny test tokenizer's is smaller than LLaMA's)."""
    return [[t % vocab for t in p] for p in PROMPTS]
STEPS = 6
SLOTS = [2, 0, 3, 1]  # prompt i decodes in cache row SLOTS[i], not in row order


def _rows_decode(llama):
    """Greedy ids of PROMPTS decoded together by the decoder's `step_rows`, each prompt prefilled into its
    slot and then decoding at its own position."""
    model = llama.model
    last, positions = [], []
    with torch.inference_mode():
        for prompt, slot in zip(prompts_in(model.args.vocab_size), SLOTS):
            h = model.hidden_in_slot(torch.tensor([prompt]), slot)
            last.append(int(model.greedy_next(h)[0]))
            positions.append(len(prompt))
        slots, tokens, pos = torch.tensor(SLOTS), torch.tensor(last), torch.tensor(positions)
        out = [tokens.tolist()]
        for _ in range(STEPS):
            tokens = model.greedy_next(model.hidden_rows(tokens[:, None], slots, pos))
            out.append(tokens.tolist())
            pos = pos + 1
    return out


def with_each_decoder(ckpt_dir, tokenizer_path):
    """On every rank, for the `static` and the `pytorch` decoder: generate's ids (greedy, then sampled
    with the same seed) and the ids of rows at different positions."""
    import workers

    results = {}
    for decoder in ("static", "pytorch"):
        llama = workers.build(ckpt_dir, tokenizer_path, max_seq_len=32, max_batch_size=4, decoder=decoder)
        prompts = prompts_in(llama.model.args.vocab_size)
        greedy = llama.generate(prompts, STEPS, temperature=0)[0]
        llama.engine.generator.manual_seed(7)
        sampled = llama.generate(prompts, STEPS, temperature=0.9, top_p=0.95)[0]
        results[decoder] = (greedy, sampled, _rows_decode(llama))
    return results


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.spawn), pytest.param(4, marks=pytest.mark.spawn)])
def test_static_step_decodes_what_the_sliced_steps_decode(make_checkpoint, tokenizer_path, ranks):
    ckpt_dir, _, _ = make_checkpoint(shards=ranks, seed=3)
    for results in on_ranks(ranks, with_each_decoder, ckpt_dir, tokenizer_path):
        assert results["static"] == results["pytorch"]
        rows = results["static"][2]
        assert len({tuple(r) for r in rows}) > 1  # the rows really decode different things


# Continuous batching with the static step: test_batching (one 2-rank job runs every decoder there).


def _compiler_found() -> bool:
    """Whether torch inductor finds a C++ compiler the way it looks for one (config.cpp.cxx, $CXX)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return True
    except Exception:  # noqa: BLE001 - any failure to find one means the CPU backend cannot compile
        return False


@pytest.mark.spawn  # torch.compile starts Python processes of its own (an instruction-set probe, compile workers)
@pytest.mark.skipif(not _compiler_found(), reason="torch inductor finds no C++ compiler")
@pytest.mark.parametrize("kv_heads", [2, 1])  # each head its own kv head; both heads sharing one (GQA)
def test_static_step_compiles_as_one_graph_with_the_eager_logits(make_checkpoint, tokenizer_path, kv_heads):
    """The static decoder's device side (`padded_step`: every cache row, rows out of order, positions as
    tensors) compiles with fullgraph=True (a graph break raises), gives the eager logits, and serves every
    position of a span bucket without compiling again."""
    import workers

    ckpt_dir, _, _ = make_checkpoint(seed=5, dim=32, n_layers=1, n_heads=2, n_kv_heads=kv_heads)
    llama = workers.build(ckpt_dir, tokenizer_path, max_seq_len=40, max_batch_size=3, decoder="static")
    model, decoder = llama.model, llama.model.decoder
    torch._dynamo.reset()
    compiled = torch.compile(decoder.padded_step, fullgraph=True)
    slots = torch.tensor([2, 0])  # out of order, and row 1 free
    with torch.inference_mode():
        for slot, prompt in zip(slots.tolist(), prompts_in(model.args.vocab_size)):
            model.hidden_in_slot(torch.tensor([prompt]), slot)
        tokens, positions = torch.tensor([[29871], [450]]) % model.args.vocab_size, torch.tensor([5, 2])
        for i in range(4):  # positions 5..8 and 2..5: one bucket (16 positions), one graph
            span = decoder.span(model, int(positions.max()))
            assert span == 16
            eager = model.logits(decoder.padded_step(model, tokens, slots, positions, span))
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                fast = model.logits(compiled(model, tokens, slots, positions, span))
            torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5)
            tokens, positions = eager[:, -1].argmax(-1)[:, None], positions + 1
    torch._dynamo.reset()


@pytest.mark.slow  # generates 6 times over, to compare stop checks every step and every 4th
def test_checking_for_stops_every_few_steps_changes_no_output(make_checkpoint, tokenizer_path):
    import workers

    ckpt_dir, _, _ = make_checkpoint(seed=4)
    llama = workers.build(ckpt_dir, tokenizer_path, max_seq_len=32, max_batch_size=2, decoder="static")
    decoder, prompts = llama.model.decoder, prompts_in(llama.model.args.vocab_size)[:2]
    stop_token = llama.generate(prompts, 8, temperature=0)[0][0][2]  # prompt 0 stops before its 3rd token
    llama.engine.stop_ids = [stop_token]
    steps = []
    step = decoder.step
    decoder.step = lambda model, tokens, pos: steps.append(pos) or step(model, tokens, pos)

    def run(every):
        decoder.steps_per_stop_check = every
        llama.engine.forget_rows()  # both runs prefill whole prompts (a cached start rounds differently)
        out = []
        for temperature in (0, 0.9):
            llama.engine.generator.manual_seed(11)
            out.append(llama.generate(prompts, 8, temperature=temperature, logprobs=True))
        steps.clear()
        llama.engine.forget_rows()  # a whole prefill, so the steps counted are the decode steps alone
        out.append(llama.generate(prompts[:1], 8, temperature=0))  # stops after 2 of 8 tokens
        return out, len(steps)

    (every_step, ran), (every_fourth, ran_on) = run(1), run(4)
    assert every_fourth == every_step
    assert every_step[0][0][0] == llama.generate(prompts, 2, temperature=0)[0][0]  # the stop was met
    # The prefill gives token 1, steps tokens 2 and 3 (the stop): checking every step ends there; checking
    # every 4th ends after token 4, one step more, whose token is discarded.
    assert (ran, ran_on) == (2, 3)


# Top-level PyTorch operators of one float32 decode step (tools/bench.py `ops_per_decode_step`), with torch
# pinned by the Makefile: per layer, and outside the layers (embedding, positions, rotary rows, final norm,
# output, argmax; the static step also places the rows in every cache row, masks the bucket's positions and
# picks the rows back out). 49 per layer before `F.rms_norm` and fused projections; a change either way is a
# change to the decode step, so the figure is exact, not a bound.
OPS = {"pytorch": (36, 8), "static": (37, 22)}


@pytest.mark.parametrize("decoder", sorted(OPS))
def test_bench_counts_the_operators_of_a_decode_step(llama_mp_command, decoder):
    import json

    n_layers = 2
    tiny = ["--dim", "64", "--n_layers", str(n_layers), "--n_heads", "4", "--multiple_of", "32", "--vocab_size", "512"]
    code, out, err = llama_mp_command("bench", *tiny, "--new_tokens", "2", "--runs", "1", "--warmup", "0", "--json",
                                      "--backend", "gloo", "--device", "cpu", "--decoder", decoder, "--profile_ops")
    assert code == 0, err
    report = json.loads(out)
    per_layer, outside = OPS[decoder]
    assert (report["ops_per_layer"], report["ops_per_step"]) == (per_layer, outside + n_layers * per_layer)
