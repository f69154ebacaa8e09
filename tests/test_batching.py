"""Continuous batching at the rank level (runtime/batching.py): sequences join a running batch in free
KV-cache slots, each row decodes at its own position, and slots are freed and reused; every sequence's
greedy ids equal what `Llama.generate` gives it alone, with either decoder, on 2 ranks."""

import pytest
from multiproc import run_ranks

pytestmark = pytest.mark.spawn  # every test here runs ranks in processes of their own

PROMPTS = ["The quick brown fox", "Once upon a time there was", "Model parallel", "", "A B C D E F G H I J"]
STEPS = 10
# step -> admissions (prompt index, slot). Prompt 2 (a few tokens: shorter than the step's free rows)
# starts alone in slot 2; others join while it decodes, at other positions; prompt 3 (the bos token
# alone) and 4 reuse slots freed by earlier sequences.
SCHEDULE = {0: [(2, 2)], 1: [(1, 0)], 3: [(0, 1), (3, 3)], STEPS + 1: [(4, 2)]}


def batched_and_alone(ckpt_dir, tokenizer_path, decoder, gather_every):
    """On every rank: each prompt alone through `generate`, then all of them through the Batcher on the
    schedule above (every `gather_every`-th step gathers the logits on rank 0, which picks the argmax and
    the chosen tokens' logprobs)."""
    import workers
    from llama_mp.runtime.batching import Admission, Batcher, Plan
    from llama_mp.runtime.sampling import RowSampling

    llama = workers.build(ckpt_dir, tokenizer_path, max_seq_len=48, max_batch_size=4, decoder=decoder)
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    alone = [llama.generate([p], STEPS, temperature=0)[0][0] for p in prompts]
    batcher = Batcher(llama.engine)
    if not llama.group.is_main:
        llama.engine.serve()
        return alone, None
    produced = {i: [] for i in range(len(prompts))}
    slot_of = {}
    step = 0
    while step == 0 or slot_of:
        release = [slot_of.pop(i) for i in list(slot_of) if len(produced[i]) == STEPS]
        admit = []
        for i, slot in SCHEDULE.get(step, []):
            slot_of[i] = slot
            admit.append(Admission(slot, tuple(prompts[i])))
        plan = Plan(tuple(release), tuple(admit), gather=step % gather_every == gather_every - 1)
        result = batcher.run(plan, lambda slots: [RowSampling(0.0, logprobs=0)] * len(slots)).on_host()
        owner = {slot: i for i, slot in slot_of.items()}
        for slot, token in zip(result.slots, result.tokens):
            produced[owner[slot]].append(token)
        step += 1
    batcher.pause()
    llama.engine.stop()
    stops = set(llama.tokenizer.stop_ids)
    cut = [next((ids[:j] for j, t in enumerate(ids) if t in stops), ids) for ids in produced.values()]
    return alone, cut


def batched_and_alone_with_each_decoder(ckpt_dir, tokenizer_path, decoders):
    return [batched_and_alone(ckpt_dir, tokenizer_path, decoder, gather_every) for decoder, gather_every in decoders]


@pytest.fixture(scope="module")
def runs(make_checkpoint, tokenizer_path):
    """{decoder: (alone, batched) per rank} of one 2-rank job that runs every decoder: the PyTorch one with
    some steps gathering logits on rank 0, the C kernels gathering every step, the static step every other."""
    from llama_mp.kernels import cpu

    decoders = [("pytorch", 3), ("static", 2)] + ([("cpu_kernels", 1)] if cpu.library() is not None else [])
    ckpt_dir = make_checkpoint(shards=2, n_kv_heads=2)[0]
    per_rank = run_ranks(2, batched_and_alone_with_each_decoder, ckpt_dir, tokenizer_path, decoders)
    return {name: [rank[i] for rank in per_rank] for i, (name, _) in enumerate(decoders)}


def test_rows_at_their_own_positions_equal_each_sequence_alone_with_either_decoder(runs):
    """Sequences that join, decode at different positions and leave a running batch get the ids they get
    alone, on 2 ranks, with the PyTorch decoder and with the C kernels; and the two decoders agree."""
    decoders = [d for d in ("pytorch", "cpu_kernels") if d in runs]
    for name in decoders:
        (alone, batched), (alone_1, _) = runs[name]
        assert alone == alone_1
        assert batched == alone
    assert all(runs[name][0][1] == runs["pytorch"][0][1] for name in decoders)


def test_continuous_batching_with_the_static_step_gives_each_sequence_its_own_ids(runs):
    """The static decoder's step (test_static_step) in the same batches: each sequence's own ids."""
    (alone, batched), _ = runs["static"]
    assert batched == alone == runs["pytorch"][0][0]
