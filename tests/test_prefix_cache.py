"""Prefix caching (runtime/prefixes.py): a prompt that starts as a cache row's tokens continues from them,
in that row or from a copy, and the answer is the one it gets with the cache off.

The table's one promise, checked over random histories against a model of what each row really holds:
whatever positions it says a row holds, the row holds (copies of a step run first, in admission order).
Then the server's batch loop with the cache on and off on the same model: greedy ids, seeded samples and
logprobs equal, with hits in the same row and copies from a busy row, for each decoder, on 1 and 2 ranks.
"""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

from llama_mp import distributed
from llama_mp.runtime.prefixes import KeptScores, PrefixCache, common_prefix
from llama_mp.runtime.scoring import SCORED_CHUNK, TokenScores
from llama_mp.server.protocol import SequenceSpec, usage
from scheduling import run_to_end

ROWS = 3


@st.composite
def histories(draw):
    """Steps of a batch: each releases some busy rows, admits prompts and chooses a token for every row."""
    prompts = st.tuples(st.lists(st.integers(1, 3), min_size=1, max_size=7),  # few values: many shared starts
                        st.booleans())  # scored
    return draw(st.lists(st.tuples(st.lists(st.integers(0, ROWS - 1), max_size=2), st.lists(prompts, max_size=3),
                                   st.integers(1, 3)), min_size=1, max_size=12)), draw(st.integers(0, ROWS))


@settings(max_examples=300, deadline=None)
@given(histories())
def test_what_the_table_says_a_row_holds_the_row_holds(history):
    steps, keep = history
    with mock.patch("llama_mp.runtime.prefixes.SCORED_CHUNK", 2):  # scored prompts resume at even positions
        _follow_a_history(steps, keep)


def _follow_a_history(steps, keep):
    cache = PrefixCache(ROWS, keep)

    def entries(prompt, n):  # stand-ins for the score entries of a prompt's first n positions: each its tokens
        code = [float(int("".join(map(str, prompt[:i + 2])), 4)) for i in range(n)]
        return TokenScores(torch.tensor(code, dtype=torch.float64), torch.zeros(n, 0), torch.zeros(n, 0))

    truth = {slot: [] for slot in range(ROWS)}  # the tokens whose keys and values each row holds
    running = {}  # slot -> its Row (what the table is told)
    for release, prompts, token in steps:
        for slot in release:
            if slot in running:
                del running[slot]
                cache.release(slot)
        for slot, row in running.items():  # this step feeds each running row the token it chose last
            truth[slot].append(row.tokens[-1])
            row.written += 1
        free, taken, written = [s for s in range(ROWS) if s not in running], {}, []
        for prompt, scored in prompts:
            if not free:
                break
            place, row = cache.place(prompt, free, taken, 0 if scored else -1)
            assert 0 <= place.cached < len(prompt)
            if scored:  # the entries it reuses are those of its own first positions
                assert (place.scores is None) == (place.cached == 0)
                if place.cached:
                    assert place.cached % 2 == 0
                    assert torch.equal(place.scores.scores.logprobs, entries(prompt, place.cached).logprobs)
            if place.copy_from >= 0:  # copies first, in order, before the step writes
                truth[place.slot][:place.cached] = truth[place.copy_from][:place.cached]
            assert truth[place.slot][:place.cached] == prompt[:place.cached]
            assert len(truth[place.slot]) >= place.cached
            written.append((place.slot, prompt, scored, row))
            running[place.slot] = row
        for slot, prompt, scored, row in written:
            truth[slot] = list(prompt)
            if scored:  # its step scored it (at the earliest: the end of the step that admitted it)
                row.scores = KeptScores(0, entries(prompt, len(prompt) - 1))
        for slot, row in running.items():  # the token each row chose is read at once (at worst: it is
            row.tokens.append(token)       # known before a step has written it)
    if keep == 0:
        assert cache.hits == 0 and not cache.held


def test_a_prompt_goes_to_the_free_row_with_its_longest_start_else_copies_it_from_a_busy_row():
    cache = PrefixCache(3, keep=3)
    free, taken = [0, 1, 2], {}
    a, _ = cache.place([1, 2, 3, 4], free, taken)
    b, _ = cache.place([7, 8], free, taken)
    assert (a.slot, a.cached, b.slot, b.cached) == (0, 0, 1, 0)
    cache.release(1)  # row 1 keeps [7, 8]; row 0 is busy with [1, 2, 3, 4]
    place, _ = cache.place([7, 8, 9], [1, 2], {})
    assert (place.slot, place.cached, place.copy_from) == (1, 2, -1)
    place, _ = cache.place([1, 2, 3, 5], [2], {})
    assert (place.slot, place.cached, place.copy_from) == (2, 3, 0)
    cache.release(2)  # the whole prompt held: its last token is still prefilled, for its hidden state
    place, _ = cache.place([1, 2, 3, 5], [2], {})
    assert (place.slot, place.cached) == (2, 3)
    assert common_prefix([1, 2], [1, 2, 3]) == 2 and cache.hits == 3 and cache.cached_tokens == 8


def test_kept_rows_beyond_the_budget_are_forgotten_least_recently_used_first():
    cache = PrefixCache(3, keep=1)
    free = [0, 1, 2]
    for prompt in ([1, 1], [2, 2], [3, 3]):
        cache.place(prompt, free, {})
    cache.release(0)
    cache.release(2)
    assert sorted(cache.held) == [1, 2]  # row 0, released first, is forgotten; row 1 is busy
    place, _ = cache.place([1, 1, 5], [0, 2], {})
    assert place.cached == 0


def test_usage_reports_the_cached_prompt_tokens():
    assert usage(10, 3, 7)["prompt_tokens_details"] == {"cached_tokens": 7}


def _specs(tokenizer):
    """Prompts sharing a start, in an order that makes a 3-row batch reuse kept rows and copy from busy ones."""
    system = "You are a helpful assistant who answers briefly and well."
    encode = lambda text: tokenizer.encode(text, bos=True, eos=False)  # noqa: E731
    sea, rain = encode(system + " Tell me about the sea"), encode(system + " What is rain")
    return [SequenceSpec(sea, 12, 0, 1.0, None, [], None, ignore_eos=True),
            SequenceSpec(encode("Unrelated words"), 2, 0, 1.0, None, [], None, ignore_eos=True),
            SequenceSpec(rain, 3, 0.9, 0.95, 7, [], None, ignore_eos=True),                # seeded sample
            SequenceSpec(encode(system + " Tell me about the sea and sky"), 4, 0, 1.0, None, [], 2, ignore_eos=True),
            SequenceSpec(sea, 5, 0, 1.0, None, [], 1, ignore_eos=True),                    # the same prompt again
            SequenceSpec(rain, 3, 0.9, 0.95, 7, [], None, ignore_eos=True),
            SequenceSpec(rain, 2, 0, 1.0, None, [], 1, ignore_eos=True, echo=True),          # scored: whole
            SequenceSpec(encode(system + " Tell me about the sea, the sky and the wind"), 3, 0, 1.0, None, [], None,
                         ignore_eos=True)]


def _answers(events):
    """What a client sees of each sequence: its text, logprobs entries, finish and counts."""
    out = {}
    for e in events:
        text, entries, end = out.get(e.index, ("", [], None))
        entries = entries + [(t.token, t.logprob, t.top) for t in (e.logprobs or [])]
        out[e.index] = (text + e.text, entries, (e.finish_reason, e.completion_tokens) if e.finish_reason else end)
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for i in a:
        (text, entries, end), (text_b, entries_b, end_b) = a[i], b[i]
        assert (text, end, [e[0] for e in entries]) == (text_b, end_b, [e[0] for e in entries_b]), i
        for (_, lp, top), (_, lp_b, top_b) in zip(entries, entries_b):
            assert (lp is None) == (lp_b is None) and (lp is None or abs(lp - lp_b) < 1e-4)
            assert [t for t, _ in top or []] == [t for t, _ in top_b or []]


def _on_rank_0(llama, runs):
    """`runs(batcher, release)` on rank 0, one batcher for all of them, while the other ranks follow its
    steps; then every rank stops. `release()` sends the row releases a drained loop had not sent."""
    from llama_mp.runtime.batching import Batcher, Plan

    batcher = Batcher(llama.engine)
    if not llama.group.is_main:
        llama.engine.serve()
        return None
    out = runs(batcher, lambda: batcher.run(Plan(release=tuple(range(ROWS))), None))
    batcher.pause()
    llama.engine.stop()
    return out


def served_with_and_without_the_cache(llama):
    """Rank 0: the specs' answers with the cache off, then on (the same batcher and cache rows), and the
    cached prompt tokens of each sequence; the other ranks follow."""
    from llama_mp.server.scheduler import Scheduler

    def runs(batcher, release):
        out = []
        for rows in (0, None):
            scheduler = Scheduler(batcher, llama.tokenizer, max_queue=16, seed=3, prefix_rows=rows)
            seqs, events = run_to_end(scheduler, _specs(llama.tokenizer), 120)
            out.append((_answers(events), [s.cached for s in seqs], scheduler.stats()))
            release()
        return out
    return _on_rank_0(llama, runs)


def _scored_requests(tokenizer):
    """lm-eval's multiple choice, as its local-completions sends it: a question and each of its answers,
    scored (`echo`, `logprobs`, max_tokens 0), one request after another; two `logprobs` counts, a prompt
    sent twice (every entry kept), and two choices in one request (admitted together)."""
    encode = lambda text: tokenizer.encode(text, bos=False, eos=False)  # noqa: E731  (lm-eval: no special tokens)
    # long enough (~100 tokens) to resume from position SCORED_CHUNK
    story = "The river runs past old stone walls, under a bridge and through a field, toward the sea. " * 4
    question = f"{story}Question: which way does the river run?\nAnswer:"
    other = f"{story}Question: how many bridges does it pass under?\nAnswer:"

    def scored(text, top=1):
        return SequenceSpec(encode(text), 0, 0, 1.0, None, [], top, echo=True)

    choices = [" toward the sea", " up the hill", " nowhere at all", " the sea"]
    return ([[scored(question + c)] for c in choices] + [[scored(question + choices[0])]]
            + [[scored(question + c, top=3)] for c in choices[:2]]
            + [[scored(other + " seven"), scored(other + " three")], [scored(other + " seven llamas")]])


def scored_with_and_without_the_cache(llama):
    """Rank 0: the prompt scores of `_scored_requests`, each request run to its end before the next (a new
    scheduler each, on one batcher and, with the cache on, one table), with the cache off, then on; and the
    cached positions of each sequence. The other ranks follow."""
    from llama_mp.server.scheduler import Scheduler

    def runs(batcher, release):
        out = []
        for rows in (0, ROWS):
            table, scores, cached = None, [], []
            for specs in _scored_requests(llama.tokenizer):
                scheduler = Scheduler(batcher, llama.tokenizer, max_queue=16, seed=3, prefix_rows=rows)
                table = scheduler.prefixes = table or scheduler.prefixes
                seqs, events = run_to_end(scheduler, specs, 60)
                scores += [tuple(t.tolist() for t in (e.prompt_scores.logprobs, e.prompt_scores.top_logprobs,
                                                      e.prompt_scores.top_ids))  # lists: they leave a rank's process
                           for e in sorted(events, key=lambda e: e.index) if e.prompt_scores is not None]
                cached += [s.cached for s in seqs]
                release()
            out.append((scores, cached))
        return out
    return _on_rank_0(llama, runs)


def _check_scored(runs):
    """Every entry equal, bit for bit: a hit reuses what the same computation gave the request before."""
    (off, off_cached), (on, on_cached) = runs
    assert len(off) == len(on) == 10 and off_cached == [0] * 10
    assert on == off  # floats compared exactly
    # every prompt after the first continues from the story its row kept, but the first with the other count
    # of alternatives (only the entries computed for its own count serve it); from a multiple of SCORED_CHUNK
    assert on_cached[0] == on_cached[5] == 0 and all(n > 0 for i, n in enumerate(on_cached) if i not in (0, 5))
    assert all(n % SCORED_CHUNK == 0 for n in on_cached), on_cached


def _check(runs, tokenizer):
    (off, off_cached, off_stats), (on, on_cached, on_stats) = runs
    _same(off, on)
    assert off_cached == [0] * 8 and off_stats["prefix_hits"] == 0
    assert on_cached[:3] == [0, 0, 0] and on_cached[6] == 0  # the first three start together; 6 is scored
    assert all(n > 0 for n in on_cached[3:6] + on_cached[7:]), on_cached
    assert on_cached[4] == len(_specs(tokenizer)[0].prompt_ids) - 1  # the same prompt: all but its last token
    assert all(a[2] is not None for a in on.values())
    assert on_stats["prefix_hits"] == 4 and on_stats["cached_tokens"] == sum(on_cached)


@pytest.mark.parametrize("decoder", ["pytorch", "static", "cpu_kernels"])
def test_the_batch_loop_answers_the_same_with_the_cache_on_one_rank(decoder, make_checkpoint, tokenizer_path):
    from llama_mp import Llama
    from llama_mp.kernels import cpu

    if decoder == "cpu_kernels" and cpu.library() is None:
        pytest.skip("the C kernels do not build here")
    llama = Llama.build(make_checkpoint(n_kv_heads=2)[0], tokenizer_path, 64, ROWS, seed=3, backend="gloo",
                        device="cpu", decoder=decoder)
    try:
        _check(served_with_and_without_the_cache(llama), llama.tokenizer)
    finally:
        distributed.teardown()


@pytest.mark.parametrize("decoder", ["pytorch", "cpu_kernels"])  # static: its prefill is pytorch's
def test_scored_prompts_continue_from_kept_entries_and_score_the_same_on_one_rank(decoder, make_checkpoint,
                                                                                  tokenizer_path):
    from llama_mp import Llama
    from llama_mp.kernels import cpu

    if decoder == "cpu_kernels" and cpu.library() is None:
        pytest.skip("the C kernels do not build here")
    llama = Llama.build(make_checkpoint(n_kv_heads=2)[0], tokenizer_path, 160, ROWS, seed=3, backend="gloo",
                        device="cpu", decoder=decoder)
    try:
        _check_scored(scored_with_and_without_the_cache(llama))
    finally:
        distributed.teardown()


def _two_ranks(ckpt_dir, tokenizer_path):
    """Every rank: the batch loop's runs (rank 0's), then generate's."""
    import workers

    llama = workers.build(ckpt_dir, tokenizer_path, max_seq_len=160, max_batch_size=ROWS, decoder="pytorch")
    return (served_with_and_without_the_cache(llama), generated_with_and_without_the_rows_held(llama),
            scored_with_and_without_the_cache(llama))


@pytest.fixture(scope="module")
def two_ranks(make_checkpoint, tokenizer_path):
    from multiproc import run_ranks

    return run_ranks(2, _two_ranks, make_checkpoint(shards=2, n_kv_heads=2)[0], tokenizer_path)


@pytest.mark.spawn
def test_the_batch_loop_answers_the_same_with_the_cache_on_two_ranks(two_ranks, tokenizer):
    assert two_ranks[1][0] is None
    _check(two_ranks[0][0], tokenizer)


def generated_with_and_without_the_rows_held(llama):
    """Every rank: calls of `generate` that continue what the call before left in the cache rows (a batch
    sharing a start, then prompts that extend it with its answer), each also run with nothing held; the
    seeded generator reset before each so that samples compare: the first prompts, their answers and
    ((ids, logprobs, cached tokens) with the rows, the same without) per call."""
    tok = llama.tokenizer
    first = [tok.encode(t, bos=True, eos=False) for t in ("Once upon a time, in a land far away", "Once upon a time")]
    out = []

    def run(prompts, cached: bool, **sampling):
        if not cached:
            llama.engine.rows_hold = []
        llama.engine.generator.manual_seed(11)
        ids, logprobs = llama.generate(prompts, 6, logprobs=True, **sampling)
        return ids, logprobs, llama.engine.cached_tokens

    ids, _, _ = run(first, cached=False, temperature=0)
    follow = [p + a + tok.encode(" and then", bos=False, eos=False) for p, a in zip(first, ids)]
    for prompts, sampling in ((follow, dict(temperature=0)), (follow, dict(temperature=0.9, top_p=0.9)),
                              (first, dict(temperature=0))):
        with_rows = run(prompts, cached=True, **sampling)
        run(first, cached=False, temperature=0)  # the same rows again, for the call without them
        llama.engine.rows_hold = []
        out.append((with_rows, run(prompts, cached=False, **sampling)))
        run(first, cached=False, temperature=0)
    return first, ids, out


def _check_generate(first, answers, pairs):
    for (ids, lps, cached), (ids_b, lps_b, cached_b) in pairs:
        assert ids == ids_b and cached_b == 0
        assert all(abs(a - b) < 1e-4 for row, row_b in zip(lps, lps_b) for a, b in zip(row, row_b))
    # prompts that extend the first ones with their answers hold both in every row (the rows went on past
    # the answers); the first prompts again: all of the shorter one but its last token, in both rows
    held = min(len(p) + len(a) for p, a in zip(first, answers))
    assert [p[0][2] for p in pairs] == [2 * held, 2 * held, 2 * (min(map(len, first)) - 1)]


@pytest.mark.parametrize("decoder", ["pytorch", "cpu_kernels"])  # static: its step is the batch loop test's
def test_generate_continues_what_the_rows_hold_and_answers_the_same(decoder, make_checkpoint, tokenizer_path):
    from llama_mp import Llama
    from llama_mp.kernels import cpu

    if decoder == "cpu_kernels" and cpu.library() is None:
        pytest.skip("the C kernels do not build here")
    llama = Llama.build(make_checkpoint(n_kv_heads=2)[0], tokenizer_path, 64, 2, seed=3, backend="gloo",
                        device="cpu", decoder=decoder)
    try:
        _check_generate(*generated_with_and_without_the_rows_held(llama))
    finally:
        distributed.teardown()


@pytest.mark.spawn
def test_scored_prompts_continue_from_kept_entries_and_score_the_same_on_two_ranks(two_ranks):
    assert two_ranks[1][2] is None
    _check_scored(two_ranks[0][2])


@pytest.mark.spawn
def test_generate_continues_what_the_rows_hold_on_two_ranks(two_ranks):
    generated = [rank[1] for rank in two_ranks]
    _check_generate(*generated[0])
    assert [p[0][2] for p in generated[1][2]] == [p[0][2] for p in generated[0][2]]  # every rank decided alike


def test_a_chats_next_turn_continues_from_the_last_and_answers_the_same(make_checkpoint, tokenizer_path):
    from llama_mp import Llama

    llama = Llama.build(make_checkpoint(n_kv_heads=2)[0], tokenizer_path, 96, 1, seed=3, backend="gloo",
                        device="cpu")
    try:
        dialog = [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Hello there"}]
        answer = llama.chat_completion([dialog], max_gen_len=8, temperature=0)[0]["generation"]
        turn = dialog + [answer, {"role": "user", "content": "And then?"}]
        again = llama.chat_completion([turn], max_gen_len=8, temperature=0)[0]
        assert llama.engine.cached_tokens > 0
        llama.engine.rows_hold = []
        assert llama.chat_completion([turn], max_gen_len=8, temperature=0)[0] == again
        assert llama.engine.cached_tokens == 0
    finally:
        distributed.teardown()
