"""Sampling draws from the distribution it promises: temperature-scaled softmax, cut to the top k and
to the nucleus of mass top_p (computed as if the whole vocabulary were sorted), seeded and repeatable."""

import pytest
import torch

from llama_mp.runtime.sampling import _nucleus, sample

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
    kept, ids = _nucleus(probs, 0.9)
    got = torch.zeros_like(probs).scatter_(-1, ids, kept)
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
