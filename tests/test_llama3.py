"""Llama 3.x checkpoints run like Llama 2 ones: the vocabulary-parallel embedding and scaled rope give the
same logits and greedy ids on 1, 2 and 4 ranks, from any shard count, as an independent reference and as
transformers' LlamaForCausalLM with llama3 rope scaling; generation stops on the family's stop tokens; a
tokenizer of the other family, or a context beyond the model's, is one clear error before any weight is read."""

import numpy as np
import pytest
import torch

from llama_mp import LlamaMPError
from llama_mp.checkpoints import layout
from llama_mp.checkpoints.params import ModelArgs
from llama_mp.checkpoints.reshard import save_consolidated
from llama_mp.checkpoints.synth import random_state_dict
from llama_mp.runtime.tokenizer import Tokenizer
from multiproc import run_ranks
from reference import reference_greedy, reference_logits
from test_model_parity import DECODERS
from workers import build, logits_and_greedy

STEPS = 10
LLAMA31 = dict(n_heads=8, n_kv_heads=4, use_scaled_rope=True, rope_theta=500000.0)  # head_dim 8: all 3 rope bands


@pytest.fixture(scope="module")
def tokenizer3(llama3_tokenizer_path):
    return Tokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint, tokenizer3):
    """The same Llama 3.1-shaped model saved with 1, 2 and 4 shards."""
    return {k: make_checkpoint(shards=k, vocab_size=tokenizer3.n_words, **LLAMA31) for k in (1, 2, 4)}


@pytest.fixture(scope="module")
def prompts(tokenizer3):
    texts = ["The capital of France is", "Once upon a time", "Model parallel inference splits every layer"]
    return [tokenizer3.encode(t, bos=True, eos=False) for t in texts]


def test_the_family_is_llama3_and_its_embedding_is_split_by_vocabulary_rows(checkpoints):
    _, args, _ = checkpoints[1]
    assert args.family == "llama3" and layout.split_dim("tok_embeddings.weight", args) == 0
    assert layout.shard_shapes(args, 4)["tok_embeddings.weight"] == (args.vocab_size // 4, args.dim)


@pytest.fixture(scope="module")
def independent(checkpoints, prompts):
    """The independent reference's logits of the first prompt and greedy ids of every prompt: computed once,
    the expectation of every decoder."""
    _, args, state = checkpoints[1]
    return reference_logits(state, args, prompts[0]).numpy(), [reference_greedy(state, args, p, STEPS) for p in prompts]


@pytest.mark.parametrize("decoder", DECODERS)
def test_one_rank_matches_the_independent_reference_with_scaled_rope(checkpoints, llama3_tokenizer_path, prompts,
                                                                    independent, decoder):
    (logits, ids), = logits_and_greedy([checkpoints[1][0]], llama3_tokenizer_path, prompts, STEPS, decoder)
    np.testing.assert_allclose(logits, independent[0], rtol=0, atol=1e-4)
    assert ids == independent[1]


@pytest.mark.spawn
def test_2_and_4_ranks_from_any_shard_count_give_the_same_logits_and_ids(checkpoints, llama3_tokenizer_path, prompts):
    one = logits_and_greedy([checkpoints[1][0], checkpoints[4][0]], llama3_tokenizer_path, prompts, STEPS)
    two = run_ranks(2, logits_and_greedy, [checkpoints[2][0], checkpoints[4][0]], llama3_tokenizer_path, prompts, STEPS)
    four = run_ranks(4, logits_and_greedy, [checkpoints[2][0]], llama3_tokenizer_path, prompts, 4)
    reference_logits_, reference_ids = one[0]
    assert one[1][1] == reference_ids  # 4 shards on 1 rank
    for rank_results in two:
        assert [ids for _, ids in rank_results] == [reference_ids] * 2
    np.testing.assert_allclose(two[0][0][0], reference_logits_, rtol=0, atol=2e-5)
    assert all(results[0][1] == [ids[:4] for ids in reference_ids] for results in four)
    np.testing.assert_allclose(four[0][0][0], reference_logits_, rtol=0, atol=2e-5)


def test_transformers_with_llama3_rope_scaling_gives_the_same_logits_and_ids(checkpoints, llama3_tokenizer_path,
                                                                              prompts):
    transformers = pytest.importorskip("transformers")
    ckpt_dir, args, state = checkpoints[1]
    (logits, ids), = logits_and_greedy([ckpt_dir], llama3_tokenizer_path, prompts, STEPS)
    hd = args.dim // args.n_heads

    def permute(w, heads):  # Meta's interleaved rotary pairs -> transformers' halves, written here anew
        return w.view(heads, hd // 2, 2, args.dim).transpose(1, 2).reshape(heads * hd, args.dim)

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": args.rope_theta}
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, rope_scaling=rope, rope_parameters=rope,
        max_position_embeddings=131072, tie_word_embeddings=False)
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["output.weight"]}
    for i in range(args.n_layers):
        for ours, theirs in names.items():
            w = state[f"layers.{i}.{ours}.weight"]
            if ours in ("attention.wq", "attention.wk"):
                w = permute(w, args.n_heads if ours == "attention.wq" else args.n_kv_heads)
            hf[f"model.layers.{i}.{theirs}.weight"] = w
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=True)
    with torch.inference_mode():
        np.testing.assert_allclose(logits, model(torch.tensor([prompts[0]])).logits[0].numpy(), rtol=0, atol=1e-4)
        for prompt, ours in zip(prompts, ids):
            seq = list(prompt)
            for _ in range(STEPS):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            assert seq[len(prompt):] == ours


@pytest.fixture(scope="module")
def always_stops(tmp_path_factory, tokenizer3):
    """A model whose greedy choice is always <|eot_id|> or <|eom_id|>: every output row is zero but
    theirs, which point in opposite directions, so one of them has the largest logit."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, multiple_of=32, vocab_size=tokenizer3.n_words,
                     rope_theta=500000.0, use_scaled_rope=True)
    state = random_state_dict(args, seed=5)
    direction = state["output.weight"][0].clone()
    state["output.weight"].zero_()
    state["output.weight"][tokenizer3.special_id("<|eot_id|>")] = direction
    state["output.weight"][tokenizer3.special_id("<|eom_id|>")] = -direction
    ckpt_dir = str(tmp_path_factory.mktemp("stops"))
    save_consolidated(ckpt_dir, args, state, num_shards=1)
    return ckpt_dir


def test_generation_stops_on_the_familys_stop_tokens(always_stops, llama3_tokenizer_path, tokenizer3):
    llama = build(always_stops, llama3_tokenizer_path)
    assert llama.engine.stop_ids == tokenizer3.stop_ids
    out = llama.text_completion(["Hello", "The capital of France is"], max_gen_len=8, temperature=0)
    assert [o["token_ids"] for o in out] == [[], []] and [o["generation"] for o in out] == ["", ""]
    answer = llama.chat_completion([[{"role": "user", "content": "Hi"}]], max_gen_len=8, temperature=0)
    assert answer[0]["generation"] == {"role": "assistant", "content": ""}


def test_a_tokenizer_of_the_other_family_is_refused_before_loading(checkpoints, make_checkpoint, tokenizer_path,
                                                                    llama3_tokenizer_path):
    with pytest.raises(LlamaMPError, match=r"is a LLaMA / Llama 2 / Code Llama tokenizer \(SentencePiece\), but .* "
                                           r"holds a Llama 3.x model .* needs a tiktoken one"):
        build(checkpoints[1][0], tokenizer_path)
    with pytest.raises(LlamaMPError, match=r"is a Llama 3.x tokenizer \(tiktoken\), but .* holds a LLaMA"):
        build(make_checkpoint(shards=1)[0], llama3_tokenizer_path)


def test_a_context_longer_than_the_model_was_made_for_is_refused(checkpoints, llama3_tokenizer_path):
    with pytest.raises(LlamaMPError, match="max_seq_len 131073 is longer than the 131072 tokens this model"):
        build(checkpoints[1][0], llama3_tokenizer_path, max_seq_len=131073)


def test_llama_3_presets_have_meta_shapes():
    from llama_mp.checkpoints.params import load_preset

    widths = {"llama-3-8b": 14336, "llama-3-70b": 28672, "llama-3.1-8b": 14336, "llama-3.1-70b": 28672,
              "llama-3.1-405b": 53248, "llama-3.2-1b": 8192, "llama-3.2-3b": 8192, "llama-3.3-70b": 28672}
    for name, width in widths.items():
        args, shards = load_preset(name)
        assert args.family == "llama3" and args.vocab_size == 128256 and args.ffn_hidden_dim == width, name
        assert shards in layout.valid_world_sizes(args), name
    assert load_preset("llama-3.2-1b")[0].rope_scale == 32 and load_preset("llama-3.1-8b")[0].rope_scale == 8
    assert load_preset("llama-3-8b")[0].max_context == 8192 and load_preset("llama-3.1-8b")[0].max_context == 131072
