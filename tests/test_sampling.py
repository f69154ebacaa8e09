"""Sampling draws from the distribution it promises: temperature-scaled softmax, cut to the top k and
to the nucleus of mass top_p (computed as if the whole vocabulary were sorted), seeded and repeatable;
in a batch, each row by its own settings and generator, with its logprobs on request."""

import pytest
import torch

from llama_mp.runtime import sampling
from llama_mp.runtime.sampling import RowSampling, _nucleus, choose_from_logits, draw, sample

DRAWS = 40000  # one row per draw: frequencies within ~0.006 (3 sigma) of the probabilities


def _frequencies(logits_row, temperature, top_p=1.0, top_k=0, seed=0):
    logits = logits_row.expand(DRAWS, -1)
    ids = sample(logits, temperature, top_p, top_k, torch.Generator().manual_seed(seed))
    return torch.bincount(ids, minlength=logits_row.shape[-1]).double() / DRAWS


def _nucleus_by_full_sort(probs, top_p):
    """The nucleus written the obvious way, over the whole vocabulary: walk the tokens from the most
    likely, keep each one until the mass kept before it exceeds top_p. [vocab] probs, the rest zero."""
    out = torch.zeros_like(probs)
    mass = 0.0
    for i in torch.argsort(probs, descending=True).tolist():
        if mass > top_p:
            break
        out[i] = probs[i]
        mass += float(probs[i])
    return out


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    for temperature in (1.0, 0.5, 2.0):
        expected = torch.softmax(logits.double() / temperature, dim=-1)
        assert torch.allclose(_frequencies(logits, temperature), expected, atol=0.01)


# nucleus of ~4 tokens (the first top-k of 128 holds it), ~600 (the top-k of 2048) and ~4450 (the full
# sort)
@pytest.mark.parametrize("spread", [8.0, 2.5, 0.05])
def test_nucleus_is_exactly_the_full_sort_nucleus(spread):
    probs = torch.softmax(torch.randn(2, 5000, generator=torch.Generator().manual_seed(1)) * spread, dim=-1)
    got = _nucleus(probs, 0.9)
    for row in range(2):
        expected = _nucleus_by_full_sort(probs[row].double(), 0.9).float()
        assert torch.equal(got[row] > 0, expected > 0)
        torch.testing.assert_close(got[row], expected, rtol=0, atol=0)


def test_sampling_with_top_p_draws_from_the_renormalised_nucleus():
    logits = torch.tensor([3.0, 2.5, 1.0, 0.0, -2.0, -3.0])
    expected = _nucleus_by_full_sort(torch.softmax(logits.double(), dim=-1), 0.8)
    assert torch.allclose(_frequencies(logits, 1.0, top_p=0.8), expected / expected.sum(), atol=0.01)


def test_top_k_keeps_only_the_k_likeliest():
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0, 2.5, 0.0])
    got = _frequencies(logits, 1.0, top_k=3)
    expected = torch.softmax(torch.tensor([3.0, 2.0, 2.5]).double(), dim=-1)
    assert torch.allclose(got[[1, 2, 4]], expected, atol=0.01) and got[[0, 3, 5]].sum() == 0


def test_greedy_and_seeds():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample(logits, 0.0, 0.9, 0), logits.argmax(dim=-1))
    first = [sample(logits, 0.8, 0.95, 0, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*first)
    many = torch.stack([sample(logits, 5.0, 1.0, 0, torch.Generator().manual_seed(s)) for s in range(20)])
    assert len(set(many[:, 0].tolist())) > 1  # different seeds, different draws


def test_a_token_with_zero_probability_is_never_drawn():
    logits = torch.full((1, 1000), float("-inf"))
    logits[0, [0, 999]] = 0.0  # only the first and last ids are possible
    got = _frequencies(logits[0], 1.0)
    assert got[0] + got[999] == 1.0 and abs(float(got[0]) - 0.5) < 0.01


# --- Per-row settings: the server's batch, where each row is its own request -----------------------------


def test_each_row_draws_from_its_own_settings_in_one_batch():
    """Greedy, temperature, top-k and nucleus rows sampled together: each row's frequencies follow its own
    distribution (the same ones the tests above check one setting at a time)."""
    logits = torch.tensor([3.0, 2.5, 1.0, 0.0, -2.0, -3.0])
    rows = [RowSampling(0.0), RowSampling(1.0), RowSampling(0.5, top_k=3), RowSampling(1.0, top_p=0.8),
            RowSampling(2.0, top_p=0.9, top_k=4)]
    ids = draw(logits.expand(DRAWS, -1).repeat_interleave(len(rows), dim=0), rows * DRAWS)
    got = [torch.bincount(ids[i::len(rows)], minlength=6).double() / DRAWS for i in range(len(rows))]
    p = torch.softmax(logits.double(), dim=-1)
    assert torch.equal(got[0], torch.eye(6, dtype=torch.float64)[0])
    assert torch.allclose(got[1], p, atol=0.01)
    top3 = torch.full((6,), float("-inf"), dtype=torch.float64)
    top3[:3] = logits[:3].double() / 0.5
    assert torch.allclose(got[2], torch.softmax(top3, dim=-1), atol=0.01)
    nucleus = _nucleus_by_full_sort(p, 0.8)
    assert torch.allclose(got[3], nucleus / nucleus.sum(), atol=0.01)
    cut = torch.full((6,), float("-inf"), dtype=torch.float64)
    cut[:4] = logits[:4].double() / 2.0
    nucleus = _nucleus_by_full_sort(torch.softmax(cut, dim=-1), 0.9)
    assert torch.allclose(got[4], nucleus / nucleus.sum(), atol=0.01)


def test_a_seeded_row_draws_the_same_whatever_rows_share_its_batch():
    """A request's seed fixes its tokens: alone, or beside greedy rows, other temperatures, other top_p and
    other generators, its row draws the same id (its generator is the only randomness it uses)."""
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(4)) * 3
    for seed in range(30):
        mine = RowSampling(0.9, top_p=0.95, generator=torch.Generator().manual_seed(seed))
        alone = draw(logits[2:3], [mine])
        mine.generator.manual_seed(seed)
        others = [RowSampling(0.0), RowSampling(1.3, generator=torch.Generator().manual_seed(99)), mine,
                  RowSampling(0.7, top_p=0.5), RowSampling(0.0), RowSampling(1.0, top_k=50)]
        assert draw(logits, others)[2] == alone[0]


def test_rows_sharing_one_generator_draw_as_sample_does():
    """The engine's case (every row alike, one generator) is `sample`: one draw for the batch."""
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(6))
    rows = [RowSampling(0.8, 0.9, 10, torch.Generator().manual_seed(3))] * 4
    assert torch.equal(draw(logits, rows), sample(logits, 0.8, 0.9, 10, torch.Generator().manual_seed(3)))


def test_the_nucleus_shortcut_and_the_full_sort_draw_the_same_ids(monkeypatch):
    """A CPU tries the 128 likeliest tokens first; a GPU sorts everything (no host read): same draws."""
    scales = torch.tensor([[8.0], [2.5], [0.05], [1.0]] * 2)
    logits = torch.randn(8, 5000, generator=torch.Generator().manual_seed(5)) * scales
    rows = [RowSampling(1.0, top_p=p, generator=torch.Generator().manual_seed(i)) for i, p in enumerate([0.9, 0.5] * 4)]
    shortcut = draw(logits, rows)
    for i, r in enumerate(rows):
        r.generator.manual_seed(i)
    monkeypatch.setattr(sampling, "_reads_are_free", lambda device: False)
    assert torch.equal(draw(logits, rows), shortcut)


def test_logprobs_come_with_the_choice():
    """Rows that ask get the chosen token's log-probability (of the unscaled softmax) and the likeliest
    alternatives, as many as the most any row asked for; forced ids are the ones scored."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(8))
    rows = [RowSampling(0.0, logprobs=2), RowSampling(0.9, generator=torch.Generator().manual_seed(1), logprobs=0),
            RowSampling(0.0)]
    forced = (torch.tensor([False, False, True]), torch.tensor([0, 0, 7]))
    choice = choose_from_logits(logits, rows, forced)
    lp = torch.log_softmax(logits, dim=-1)
    assert choice.ids[0] == logits[0].argmax() and choice.ids[2] == 7
    torch.testing.assert_close(choice.logprobs, lp.gather(-1, choice.ids[:, None])[:, 0], rtol=0, atol=0)
    values, ids = lp.topk(2, dim=-1)
    assert torch.equal(choice.top_ids, ids) and torch.equal(choice.top_logprobs, values)
    assert choose_from_logits(logits, [RowSampling(0.0)] * 3).logprobs is None


def test_a_draw_does_not_depend_on_how_nearly_equal_probabilities_sort():
    """Another rank count or decoder sums the logits in another order; in a flat distribution that
    reorders nearly equal tokens, which must not move the seeded draw (it runs in vocabulary order)."""
    logits = torch.randn(4, 32000, generator=torch.Generator().manual_seed(3)) * 0.3
    nudged = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(4)) * 1e-6
    same = 0
    for seed in range(50):
        a, b = (sample(x, 0.8, 0.95, 0, torch.Generator().manual_seed(seed)) for x in (logits, nudged))
        same += int(torch.equal(a, b))
    assert same >= 48
