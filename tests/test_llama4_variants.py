"""The tiny Llama 4 (tests/llama4_helpers.py) and the switches it leaves at one setting, qk norm off
(Maverick) and Meta's scaled rope (Scout: factor 16 over an original 8192-position context, which divides
the low frequencies even at short positions), against transformers' Llama4ForCausalLM in float32 and
against the independent reference (tests/reference.py, `reference_llama4_logits`), which must agree."""

import numpy as np
import pytest

from llama4_helpers import check_against_reference, hf_logits_and_greedy, hf_model, logits_and_greedy, tiny_args
from llama_mp.checkpoints.synth import write_random_checkpoint, write_tiny_tiktoken
from llama_mp.runtime.tokenizer import Tokenizer
from reference import reference_llama4_logits

pytest.importorskip("transformers")

STEPS = 5


@pytest.mark.parametrize("changes", [{}, {"use_qk_norm": False}, {"use_scaled_rope": True},
                                     {"use_scaled_rope": True, "rope_scaling_factor": 4.0, "rope_high_freq_factor": 2.0}],
                         ids=["tiny", "no_qk_norm", "scout_rope", "other_rope_factors"])
def test_llama4_switches_match_transformers(tmp_path, changes):
    tok_path = write_tiny_tiktoken(str(tmp_path / "tokenizer.model"))
    tok = Tokenizer(tok_path, "llama4")
    args = tiny_args(tok.n_words, rope_theta=10000.0, **changes)  # a small theta: more frequencies past 8192
    state = write_random_checkpoint(str(tmp_path), args, 2, seed=11)
    prompts = [tok.encode(t, bos=True, eos=False) for t in ["The quick brown fox jumps over the lazy dog again", "Hi"]]
    model = hf_model(args, state)
    reference = (hf_logits_and_greedy(model, prompts[0], 0)[0], [hf_logits_and_greedy(model, p, STEPS)[1] for p in prompts])
    results = logits_and_greedy([(str(tmp_path), "pytorch"), (str(tmp_path), "gpu:static")], tok_path, prompts, STEPS)
    check_against_reference(results, reference, tok.stop_ids)
    independent = reference_llama4_logits(state, args, prompts[0]).numpy()
    np.testing.assert_allclose(independent, reference[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("theta", [10000.0, 500000.0, 1e6])
def test_a_llama4_params_json_reads_back_its_own_rope_theta(theta):
    """Llama 4's params.json means theta 500000 when it leaves the field out, so 10000 must be written."""
    from llama_mp.checkpoints.params import parse_params

    args = tiny_args(320, rope_theta=theta)
    assert parse_params(args.to_json_dict()).rope_theta == theta
    assert ("rope_theta" in args.to_json_dict()) == (theta != 500000.0)
