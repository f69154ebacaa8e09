"""`llama-mp convert` for Llama 4 (issue 23): Meta's Llama 4 becomes a Hugging Face `Llama4ForCausalLM` folder
that transformers loads and runs as our model does, and Hugging Face's Llama 4 folders (Llama4ForCausalLM, and
the Hub's Llama4ForConditionalGeneration with its text model under `language_model.`) become Meta's layout, on
any shard count, tensor for tensor. Hub configs of Scout and Maverick give Meta's params; what params.json
cannot state is refused by name.

The transformers model the converted folder is compared with is built by tests/llama4_helpers.py's own
mapping from Meta's names, written apart from llama_mp's (checkpoints/hf_llama4.py)."""

import json
import os
import shutil

import numpy as np
import pytest
import tiktoken
import torch

from llama4_helpers import hf_logits_and_greedy, hf_model, logits_and_greedy, one_thread, tiny_args
from llama_mp.checkpoints import layout, meta as checkpoint
from llama_mp.checkpoints.convert import convert
from llama_mp.checkpoints.hf import args_from_config
from llama_mp.checkpoints.llama4 import expert_hidden_dim
from llama_mp.checkpoints.params import load_params, parse_params
from llama_mp.checkpoints.synth import SHARED_TOKENIZERS, write_random_checkpoint, write_tiny_tiktoken
from llama_mp.errors import LlamaMPError
from llama_mp.runtime.tokenizer import LLAMA3_SPLIT_PATTERN, Tokenizer
from test_llama4 import SCOUT, add_meta_extras

transformers = pytest.importorskip("transformers")

STEPS = 4

# text_config of Meta's repositories on the Hugging Face Hub (meta-llama/Llama-4-Scout-17B-16E-Instruct and
# Llama-4-Maverick-17B-128E-Instruct), the fields a model's shape and math depend on, as transformers 4.51
# wrote them (rope_scaling, attn_temperature_tuning as a number).
SCOUT_HF_TEXT = {
    "model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 202048, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "moe_layers": list(range(48)),
    "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(48)], "attention_chunk_size": 8192,
    "use_qk_norm": True, "attn_temperature_tuning": 4, "floor_scale": 8192, "attn_scale": 0.1,
    "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 200000,
    "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018, "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0, "output_router_logits": False, "max_position_embeddings": 10485760}
MAVERICK_HF_TEXT = {**SCOUT_HF_TEXT, "num_local_experts": 128, "interleave_moe_layer_step": 2,
                    "moe_layers": list(range(1, 48, 2)), "use_qk_norm": False, "rope_scaling": None,
                    "max_position_embeddings": 1048576}


def multimodal(text_config):
    """A Llama4ForConditionalGeneration config.json as the Hub's repositories have it."""
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text_config,
            "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 1408}, "boi_token_index": 200080}


def meta_state(ckpt_dir):
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in checkpoint.shard_paths(ckpt_dir)]
    args = load_params(ckpt_dir)
    return {k: layout.merge(k, [s[k] for s in shards], args) for k in shards[0]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random Llama 4 (MoE + dense, NoPE, chunks, qk norm, temperature tuning) in Meta's layout with 2
    shards (with what Meta's shards hold besides the text weights), converted to Hugging Face, and that folder converted back to Meta with 1 and 4 shards."""
    root = tmp_path_factory.mktemp("llama4_hf")
    tok_path = write_tiny_tiktoken(str(root / "tokenizer.model"))
    tok = Tokenizer(tok_path, "llama4")
    args = tiny_args(tok.n_words)
    meta = str(root / "meta")
    os.makedirs(meta)
    state = write_random_checkpoint(meta, args, 2, seed=5)
    add_meta_extras(meta, args)  # _extra_state entries, gate statistics and vision weights: not converted
    shutil.copy(tok_path, os.path.join(meta, "tokenizer.model"))
    convert(meta, str(root / "hf"), to="hf", progress=False)
    for mp in (1, 4):
        convert(str(root / "hf"), str(root / f"back{mp}"), mp=mp, progress=False)
    prompts = [tok.encode(t, bos=True, eos=False) for t in
               ["The quick brown fox jumps over the lazy dog. A journey of a thousand", "Once upon a time"]]
    return {"root": root, "args": args, "state": state, "meta": meta, "tok": tok, "prompts": prompts}


def test_meta_to_hf_loads_in_transformers_and_runs_as_the_meta_checkpoint(world):
    """transformers' Llama4ForCausalLM from the converted folder (from_pretrained, strict) gives the logits and
    greedy ids of the model built by the test's own mapping, and of llama_mp on the Meta folder."""
    hf_dir = world["root"] / "hf"
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "llama4_text" and config["architectures"] == ["Llama4ForCausalLM"]
    loaded = transformers.Llama4ForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    expected = hf_model(world["args"], world["state"])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), expected.state_dict().values()))
    prompt = world["prompts"][0]
    logits, ids = hf_logits_and_greedy(loaded, prompt, STEPS)
    ref_logits, ref_ids = hf_logits_and_greedy(expected, prompt, STEPS)
    np.testing.assert_array_equal(logits, ref_logits)
    assert ids == ref_ids
    ours_logits, ours_ids, _ = logits_and_greedy([(world["meta"], "pytorch")], str(hf_dir / "tokenizer.model"),
                                                 [prompt], STEPS)[0]
    np.testing.assert_allclose(ours_logits, logits, rtol=0, atol=1e-4)
    assert ours_ids == [ids]


def test_hf_to_meta_gives_back_every_tensor_and_the_model_on_any_shard_count(world):
    """Meta -> HF -> Meta (1 and 4 shards): the same tensors bit for bit, params of the same shapes and
    math, Meta's shard layout (fused parts split on their own), the tokenizer."""
    for mp in (1, 4):
        back = str(world["root"] / f"back{mp}")
        assert len(checkpoint.shard_paths(back)) == mp
        args = load_params(back)
        assert args.llama4 == world["args"].llama4 and layout.full_shapes(args) == layout.full_shapes(world["args"])
        got = meta_state(back)
        assert got.keys() == world["state"].keys()
        assert all(torch.equal(got[k], world["state"][k]) for k in got)
        for i, path in enumerate(checkpoint.shard_paths(back)):
            shard = torch.load(path, weights_only=True)
            assert all(torch.equal(shard[k], layout.split(k, world["state"][k], args, mp, i)) for k in shard)
        assert open(os.path.join(back, "tokenizer.model"), "rb").read() == open(
            os.path.join(world["meta"], "tokenizer.model"), "rb").read()


def test_the_hubs_multimodal_folder_converts_its_text_model(world, tmp_path):
    """A Llama4ForConditionalGeneration folder (config under text_config, tensors under language_model.,
    vision tensors beside them, sharded safetensors) converts to the same Meta tensors."""
    from safetensors.torch import load_file, save_file

    hf_dir = world["root"] / "hf"
    src = tmp_path / "multimodal"
    src.mkdir()
    text = json.loads((hf_dir / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(multimodal(text)))
    tensors = {"language_model." + k: v for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    tensors["vision_model.patch_embedding.linear.weight"] = torch.ones(8, 12)
    tensors["multi_modal_projector.linear_1.weight"] = torch.ones(4, 8)
    names = sorted(tensors)
    weight_map = {}
    for part, chunk in enumerate((names[::2], names[1::2])):
        file = f"model-{part + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in chunk}, str(src / file))
        weight_map.update({k: file for k in chunk})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(hf_dir / "tokenizer.model", src / "tokenizer.model")
    convert(str(src), str(tmp_path / "meta"), mp=2, progress=False)
    got = meta_state(str(tmp_path / "meta"))
    assert got.keys() == world["state"].keys() and all(torch.equal(got[k], world["state"][k]) for k in got)


@pytest.mark.parametrize("text", [SCOUT_HF_TEXT, MAVERICK_HF_TEXT], ids=["scout", "maverick"])
def test_the_hubs_scout_and_maverick_configs_are_metas_params(text):
    """Both Hub configs (and the multimodal wrapper of each) give the params of Meta's own params.json, with
    the attention temperature tuning the Hub's config turns on (transformers applies it; it changes no query
    before position 8191)."""
    maverick = text is MAVERICK_HF_TEXT
    tuning = {"attn_temperature_tuning": True, "floor_scale": 8192.0, "attn_scale": 0.1}
    meta = parse_params({**{k: v for k, v in SCOUT.items() if k != "vision_args"}, **tuning,
                         **({"use_scaled_rope": False, "use_qk_norm": False,
                             "moe_args": {**SCOUT["moe_args"], "num_experts": 128, "interleave_moe_layer_step": 2}}
                            if maverick else {})})
    for config in (text, multimodal(text)):
        args = args_from_config(config, "config.json")
        assert layout.full_shapes(args) == layout.full_shapes(meta)
        assert expert_hidden_dim(args) == 8192 and args.ffn_hidden_dim == 16384
        assert args.llama4 == meta.llama4 and args.use_scaled_rope == meta.use_scaled_rope
        assert (args.rope_scale, args.rope_high_freq_factor, args.rope_theta) == (
            meta.rope_scale, meta.rope_high_freq_factor, meta.rope_theta)
        assert (args.multiple_of, args.ffn_dim_multiplier, args.llama4.ffn_exp) == (2048, 1.2, 4.0)


@pytest.mark.parametrize("dense,experts", [(2816, 1536), (2817, 1537), (4096, 704)])
def test_hf_widths_that_metas_own_values_do_not_give_are_found_as_params(dense, experts):
    """A config with widths of its own gets params fields that give both by Meta's formulas."""
    text = {**SCOUT_HF_TEXT, "hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 128, "intermediate_size": experts, "intermediate_size_mlp": dense,
            "interleave_moe_layer_step": 2, "moe_layers": list(range(1, 48, 2))}
    args = args_from_config(text, "config.json")
    assert (expert_hidden_dim(args), args.ffn_hidden_dim) == (experts, dense)
    assert parse_params(args.to_json_dict()) == args  # as params.json states them


def test_what_params_json_cannot_state_is_refused_by_name():
    bad = {**SCOUT_HF_TEXT, "moe_layers": [0, 1, 5], "no_rope_layers": [1, 0] + [1] * 46, "head_dim": 64,
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "hidden_act": "gelu",
           "quantization_config": {"quant_method": "fbgemm_fp8"}}
    with pytest.raises(LlamaMPError) as info:
        args_from_config(bad, "x/config.json")
    message = str(info.value)
    for part in ("moe_layers [0, 1, 5]", "no_rope_layers [1]", "head_dim 64", "rope scaling 'yarn'",
                 "hidden_act 'gelu'", "quantization_config", "cannot be converted"):
        assert part in message, part
    assert "\n" not in message and message.startswith("x/config.json describes a Llama 4")
    with pytest.raises(LlamaMPError, match=r"low_freq_factor 2.0 \(Meta's: 1\)"):
        args_from_config({**SCOUT_HF_TEXT, "rope_scaling": {**SCOUT_HF_TEXT["rope_scaling"], "low_freq_factor": 2.0}},
                         "config.json")
    with pytest.raises(LlamaMPError, match="no integer hidden_size"):
        args_from_config({"model_type": "llama4_text"}, "config.json")


def test_a_truncated_or_misshapen_hf_llama4_folder_is_one_message_naming_the_tensor(world, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "hf"
    shutil.copytree(world["root"] / "hf", src)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.feed_forward.experts.gate_up_proj"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(LlamaMPError, match=r"lacks 1 tensor\(s\) a Llama 4 model needs, e.g. "
                                           r"model.layers.1.feed_forward.experts.gate_up_proj"):
        convert(str(src), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    tensors["model.layers.1.feed_forward.experts.gate_up_proj"] = torch.zeros(32, 64, 90)  # not 2 x 48
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(LlamaMPError, match=r"Hugging Face tensors model.layers.1.feed_forward.experts.gate_up_proj "
                                           r"\[32, 64, 90\] do not make Meta's .*moe_w_in_eD_F, .*moe_w_swiglu_eD_F of "
                                           r"this config \(\[2048, 48\], \[2048, 48\]\)"):
        convert(str(src), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


TEXTS = ["Hello, world! It's 2025.\n\n  Ünïcode 日本語", "HELLO'S WORLD'S don't", "x = 12345678;\t\ty",
         "<|header_start|>user<|header_end|>\n\nHi<|eot|>"]


@pytest.mark.slow  # builds transformers' tokenizer of 200,000 ranks
@pytest.mark.skipif(not os.path.isfile(SHARED_TOKENIZERS["llama4"]), reason="Meta's Llama 4 tokenizer is in ../shared")
def test_metas_llama4_tokenizer_travels_to_hf_and_transformers_reads_it_as_we_do(tmp_path):
    """transformers' own reading of a tiktoken file splits by Llama 3's pattern; the tokenizer.json convert
    writes has Llama 4's, so texts that the two patterns split differently get Meta's ids."""
    tok = Tokenizer(SHARED_TOKENIZERS["llama4"], "llama4")
    args = tiny_args(tok.n_words)
    meta = tmp_path / "meta"
    meta.mkdir()
    write_random_checkpoint(str(meta), args, 1, seed=2)
    shutil.copy(SHARED_TOKENIZERS["llama4"], meta / "tokenizer.model")
    convert(str(meta), str(tmp_path / "hf"), to="hf", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (200000, [200001, 200007, 200008])
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode_naming_specials(text, bos=True), text
    # The texts do tell the patterns apart: Llama 3's split of them gives other ids.
    from tiktoken.load import load_tiktoken_bpe

    llama3_split = tiktoken.Encoding("llama3 split", pat_str=LLAMA3_SPLIT_PATTERN,
                                     mergeable_ranks=load_tiktoken_bpe(SHARED_TOKENIZERS["llama4"]), special_tokens={})
    assert any(llama3_split.encode(t) != tok.encode(t, bos=False, eos=False) for t in TEXTS[:3])
