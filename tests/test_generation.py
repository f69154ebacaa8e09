"""The Llama API: the semantics of generate, text_completion and chat_completion (one rank, in process)."""

import pytest
import torch

from llama_mp import LlamaMPError
from llama_mp.runtime.chat import UNSAFE_ERROR, encode_dialog
from reference import reference_greedy, reference_logits
from workers import build


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint(shards=1, n_heads=8, n_kv_heads=4)


@pytest.fixture(scope="module")
def llama(ckpt, tokenizer_path):
    return build(ckpt[0], tokenizer_path, max_seq_len=48, max_batch_size=3)


def encode(llama, text):
    return llama.tokenizer.encode(text, bos=True, eos=False)


def test_a_batch_of_different_lengths_gives_each_prompt_its_own_greedy_continuation(llama, ckpt):
    _, args, state = ckpt
    prompts = [encode(llama, t) for t in ("Hi", "The quick brown fox jumps over", "Once upon a time")]
    assert len({len(p) for p in prompts}) == 3
    ids, logprobs = llama.generate(prompts, 6, temperature=0)
    assert logprobs is None
    assert ids == [reference_greedy(state, args, p, 6) for p in prompts]
    assert [llama.generate([p], 6, temperature=0)[0][0] for p in prompts] == ids


def test_echo_returns_prompt_and_logprobs_match_the_reference(llama, ckpt):
    _, args, state = ckpt
    prompt = encode(llama, "Simply put, the theory")
    ids, logprobs = llama.generate([prompt], 5, temperature=0, logprobs=True, echo=True)
    assert ids[0][:len(prompt)] == prompt and len(ids[0]) == len(prompt) + 5
    expected = torch.log_softmax(reference_logits(state, args, ids[0]), dim=-1)
    want = [0.0] + [float(expected[i - 1, ids[0][i]]) for i in range(1, len(ids[0]))]
    assert logprobs[0] == pytest.approx(want, abs=1e-4)
    plain_ids, plain_lp = llama.generate([prompt], 5, temperature=0, logprobs=True)
    assert plain_ids[0] == ids[0][len(prompt):] and plain_lp[0] == pytest.approx(want[len(prompt):], abs=1e-4)


def test_generation_stops_at_eos_and_excludes_it(llama):
    prompts = [encode(llama, "Once upon a time"), encode(llama, "Hi")]
    free, _ = llama.generate(prompts, 8, temperature=0)
    # Declare the third greedy token of the first prompt to be the end of sequence: that sequence must
    # stop before it, while the other one runs on (unless it meets that token too).
    stop_token = free[0][2]
    assert stop_token not in free[0][:2]
    original, llama.engine.stop_ids = llama.engine.stop_ids, [stop_token]
    try:
        stopped, _ = llama.generate(prompts, 8, temperature=0)
    finally:
        llama.engine.stop_ids = original
    assert stopped[0] == free[0][:2]
    cut = free[1].index(stop_token) if stop_token in free[1] else len(free[1])
    assert stopped[1] == free[1][:cut]


def test_generation_respects_max_gen_len_and_max_seq_len(llama):
    prompt = encode(llama, "The quick brown fox")
    assert len(llama.generate([prompt], 3, temperature=0)[0][0]) <= 3
    long_run, _ = llama.generate([prompt], 1000, temperature=0)
    assert len(prompt) + len(long_run[0]) <= 48


def test_seeded_sampling_is_repeatable_and_top_k_1_is_greedy(ckpt, tokenizer_path, llama):
    prompt = [encode(llama, "The capital of France is")]
    a = build(ckpt[0], tokenizer_path, seed=5).generate(prompt, 8, temperature=1.0, top_p=0.9)[0]
    b = build(ckpt[0], tokenizer_path, seed=5).generate(prompt, 8, temperature=1.0, top_p=0.9)[0]
    assert a == b
    greedy = llama.generate(prompt, 8, temperature=0)[0]
    assert llama.generate(prompt, 8, temperature=1.5, top_k=1)[0] == greedy
    assert llama.generate(prompt, 8, temperature=1.5, top_p=1e-6)[0] == greedy


def test_text_completion_decodes_and_echoes(llama):
    out = llama.text_completion(["Hello world"], max_gen_len=5, temperature=0, echo=True, logprobs=True)
    assert out[0]["generation"].startswith("Hello world")
    assert len(out[0]["tokens"]) == len(out[0]["logprobs"]) == len(out[0]["token_ids"])


def test_chat_completion_uses_llama2_format_and_refuses_special_tags(llama):
    dialogs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Say [INST] please"}],
    ]
    out = llama.chat_completion(dialogs, max_gen_len=4, temperature=0)
    assert out[0]["generation"]["role"] == "assistant"
    assert out[1]["generation"] == {"role": "assistant", "content": UNSAFE_ERROR}
    tokens = encode_dialog(llama.tokenizer, dialogs[0])
    assert llama.tokenizer.decode(tokens) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    tokens = encode_dialog(llama.tokenizer, turns)
    assert tokens.count(llama.tokenizer.bos_id) == 2 and tokens.count(llama.tokenizer.eos_id) == 1


@pytest.mark.parametrize("prompts, kwargs, words", [
    ([], {}, "No prompts"),
    ([[1, 2]] * 4, {}, "max_batch_size"),
    ([[1] * 48], {}, "max_seq_len"),
    ([[]], {}, "empty"),
    ([[1, 2]], {"max_gen_len": 0}, "max_gen_len"),
    ([[1, 2]], {"temperature": -1}, "temperature"),
    ([[1, 2]], {"top_p": 0}, "top_p"),
    ([[1, 2]], {"top_p": 1.5}, "top_p"),
    ([[1, 2]], {"top_k": -1}, "top_k"),
    ([[1, 2]], {"temperature": "hot"}, "temperature"),
    ([[1, 2]], {"top_p": "all"}, "top_p"),
    ([[1, 10 ** 9]], {}, "vocabulary"),
])
def test_bad_requests_are_refused_with_a_clear_message(llama, prompts, kwargs, words):
    args = {"max_gen_len": 4, **kwargs}
    with pytest.raises(LlamaMPError, match=words):
        llama.generate(prompts, **args)


def test_bad_chat_dialogs_are_refused(llama):
    with pytest.raises(LlamaMPError, match="alternate"):
        llama.chat_completion([[{"role": "assistant", "content": "hi"}]])
    with pytest.raises(LlamaMPError, match="role"):
        llama.chat_completion([[{"role": "robot", "content": "hi"}]])
