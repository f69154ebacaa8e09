"""A grammar's mask (runtime/grammar.Constraint) and its application where the token is chosen
(runtime/sampling.choose_from_logits), against llguidance's own bitmask read bit by bit: the cap is +inf
at exactly the ids llguidance allows (the ends once the grammar is over) and -inf elsewhere, a greedy row takes the
likeliest allowed id and a sampled row only allowed ones, in both tokenizer families, and the answers
validate against their schema."""

import json
from dataclasses import replace

import jsonschema
import numpy as np
import pytest
import torch

from llama_mp.runtime.grammar import Constraint, schema_grammar
from llama_mp.runtime.sampling import RowSampling, choose_from_logits, make_generator
from llama_mp.runtime.tokenizer import Tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["a", "b"], "properties": {
    "a": {"type": "string", "maxLength": 6}, "b": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture(scope="module", params=["llama", "llama3"])
def tok(request, tokenizer_path, llama3_tokenizer_path):
    return Tokenizer(tokenizer_path if request.param == "llama" else llama3_tokenizer_path)


def allowed_by_llguidance(constraint: Constraint, vocab: int) -> torch.Tensor:
    """[vocab] bool: the ids llguidance's compute_bitmask allows (bit i of word k is id 32k + i), or the
    constraint's ends when it allows none (the grammar is over and the answer goes on)."""
    words = np.frombuffer(constraint.matcher.compute_bitmask(), dtype=np.uint32).astype(np.int64)
    bits = ((words[:, None] >> np.arange(32)) & 1).reshape(-1)[:vocab].astype(bool)
    if not bits.any():
        bits[constraint.ends] = True
    return torch.from_numpy(bits)


def test_only_what_the_grammar_allows_is_chosen_greedy_or_sampled(tok):
    ends = sorted(tok.stop_ids)
    grammar = schema_grammar(SCHEMA)
    constraints = [Constraint(grammar, tok, ends) for _ in range(2)]
    settings = [RowSampling(0.0), RowSampling(1.0, generator=make_generator("cpu", 3))]
    answers = [[], []]
    logits_of = torch.Generator().manual_seed(0)
    for _ in range(60):
        logits = torch.randn(2, tok.n_words, generator=logits_of) * 4
        rows, allowed = [], []
        for c, s, answer in zip(constraints, settings, answers):
            c.catch_up(answer)
            cap = c.logit_cap("cpu")
            assert cap.dtype == torch.float32 and cap.shape == (tok.n_words,)
            allowed.append(allowed_by_llguidance(c, tok.n_words))
            assert torch.equal(cap == float("inf"), allowed[-1]) and torch.equal(cap == float("-inf"), ~allowed[-1])
            if set(answer) & set(ends):  # over: it may only end again (ignore_eos)
                assert torch.flatten(torch.nonzero(allowed[-1])).tolist() == ends
            rows.append(replace(s, logit_cap=cap))
        ids = choose_from_logits(logits.clone(), rows).ids.tolist()
        assert ids[0] == int(logits[0].masked_fill(~allowed[0], float("-inf")).argmax())
        assert allowed[1][ids[1]]
        if all(set(answer) & set(ends) for answer in answers):  # both ended, and were asked once more
            break
        for answer, token in zip(answers, ids):
            answer.append(token)
    else:
        pytest.fail(f"the answers did not end in 60 tokens: {answers}")
    for answer in answers:
        end = next(i for i, t in enumerate(answer) if t in ends)
        jsonschema.validate(json.loads(tok.decode(answer[:end])), SCHEMA)


def test_rows_that_adjust_change_their_own_logits_and_the_logprobs_stay_the_models():
    """The choice changes the caller's logits in place where a row adjusts them (no copy of the batch's),
    leaves the other rows' alone, and scores the chosen ids by the model's own softmax."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    original = logits.clone()
    cap = torch.full((50,), float("-inf"))
    cap[[4, 9]] = float("inf")
    rows = [RowSampling(0.0, logprobs=1), RowSampling(0.0, logit_cap=cap, logprobs=1),
            RowSampling(0.7, generator=make_generator("cpu", 1), ban=torch.tensor([int(original[2].argmax())]))]
    choice = choose_from_logits(logits, rows)
    assert choice.ids[0] == original[0].argmax() and choice.ids[1] == (4 if original[1, 4] > original[1, 9] else 9)
    assert choice.ids[2] != original[2].argmax()
    assert torch.equal(logits[0], original[0])
    assert torch.equal(logits[1], original[1].masked_fill(cap < 0, float("-inf")))
    assert logits[2, original[2].argmax()] == float("-inf")
    expected = torch.log_softmax(original, -1).gather(-1, choice.ids[:, None])[:, 0]
    torch.testing.assert_close(choice.logprobs, expected, rtol=0, atol=0)
