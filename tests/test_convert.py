"""`llama-mp convert`: Hugging Face and llama2.c checkpoints become Meta checkpoints that run the same
model, and Meta checkpoints become Hugging Face folders that transformers loads and runs the same way.

The parity checks compare greedy token ids with transformers' own LlamaForCausalLM (float32), and the
llama2.c reader with the Meta weights the test file was written from.
"""

import json
import os
import shutil

import pytest
import torch

from llama_mp.checkpoints import layout, meta as checkpoint
from llama_mp.checkpoints.convert import convert, detect
from llama_mp.errors import LlamaMPError
from llama_mp.checkpoints.hf import from_hf_rows, to_hf_rows
from llama_mp.checkpoints.params import load_params
from reference import write_llama2c
from workers import PROMPTS, greedy_ids, prompt_ids

transformers = pytest.importorskip("transformers")

MAX_NEW = 12


def meta_state(ckpt_dir):
    """The whole model of a Meta folder, merged from its shards."""
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in checkpoint.shard_paths(ckpt_dir)]
    return {k: layout.merge(k, [s[k] for s in shards], None) for k in shards[0]}


def random_hf_model(vocab_size, tie=False):
    """A tiny LlamaForCausalLM with GQA, re-initialised at a scale where greedy choices are clear-cut."""
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=192,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    model.generation_config.pad_token_id = 2
    return model


def hf_greedy(model, prompts):
    """transformers' greedy continuations, cut at eos like ours."""
    out = []
    for ids in prompts:
        new = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW)[0, len(ids):].tolist()
        out.append(new[:new.index(2)] if 2 in new else new)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_checkpoint, tokenizer, tokenizer_path):
    """Every conversion the parity tests need, and the greedy ids each converted model generates."""
    root = tmp_path_factory.mktemp("convert")
    hf_model = random_hf_model(tokenizer.n_words)
    hf_model.save_pretrained(str(root / "hf"))
    convert(str(root / "hf"), str(root / "meta_from_hf"), mp=2, progress=False)

    meta_src, args, full = make_checkpoint(shards=2, n_kv_heads=2)
    convert(meta_src, str(root / "hf_from_meta"), to="hf", progress=False)
    write_llama2c(str(root / "model.bin"), full, args.n_heads, args.kv_heads)
    convert(str(root / "model.bin"), str(root / "meta_from_l2c"), mp=2, progress=False)

    dirs = [str(root / "meta_from_hf"), meta_src, str(root / "meta_from_l2c")]
    # The conversions are under test, not the ranks: one rank in this process loads each 2-shard folder
    # (any shard count on any rank count is test_load_resharding's subject).
    ids = dict(zip(["from_hf", "meta", "from_l2c"], greedy_ids(dirs, tokenizer_path, MAX_NEW)))
    return {"root": root, "hf_model": hf_model, "meta_src": meta_src, "args": args, "full": full,
            "ids": ids, "prompts": prompt_ids(tokenizer_path)}


@pytest.mark.slow  # builds and runs transformers models (fixtures `world`, `llama3_world`)
def test_hf_to_meta_generates_what_transformers_generates(world):
    expected = hf_greedy(world["hf_model"], world["prompts"])
    assert all(expected) and world["ids"]["from_hf"] == expected  # all: no empty row compared


@pytest.mark.slow  # builds and runs transformers models (fixtures `world`, `llama3_world`)
def test_meta_to_hf_loads_in_transformers_and_generates_what_we_generate(world):
    model = transformers.LlamaForCausalLM.from_pretrained(str(world["root"] / "hf_from_meta")).eval()
    model.generation_config.pad_token_id = 2
    assert hf_greedy(model, world["prompts"]) == world["ids"]["meta"]


@pytest.mark.slow  # builds and runs transformers models (fixtures `world`, `llama3_world`)
def test_llama2c_to_meta_is_the_model_it_was_written_from(world):
    converted = meta_state(str(world["root"] / "meta_from_l2c"))
    for key, whole in world["full"].items():
        assert torch.equal(converted[key], whole), key
    assert world["ids"]["from_l2c"] == world["ids"]["meta"]


@pytest.mark.slow  # builds and runs transformers models (fixtures `world`, `llama3_world`)
def test_hf_to_meta_writes_params_checklist_and_tokenizer(world, tmp_path, tokenizer_path):
    meta = str(world["root"] / "meta_from_hf")
    params = load_params(meta)
    assert (params.dim, params.n_layers, params.n_heads, params.kv_heads, params.ffn_hidden_dim) == (64, 2, 4, 2, 192)
    assert params.norm_eps == 1e-5 and params.rope_theta == 10000.0
    assert len(checkpoint.shard_paths(meta)) == 2
    from llama_mp.checkpoints.verify import verify_checkpoint
    assert verify_checkpoint(meta, progress=False) == []
    # A tokenizer.model in the source folder travels along.
    shutil.copyfile(tokenizer_path, world["root"] / "hf" / "tokenizer.model")
    convert(str(world["root"] / "hf"), str(tmp_path / "with_tok"), mp=1, progress=False)
    assert os.path.isfile(tmp_path / "with_tok" / "tokenizer.model")


@pytest.mark.slow  # builds and runs transformers models (fixtures `world`, `llama3_world`)
def test_sharded_safetensors_and_pytorch_bin_sources_give_the_same_tensors(world, tmp_path):
    reference = meta_state(str(world["root"] / "meta_from_hf"))
    model = world["hf_model"]
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="300KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    os.makedirs(tmp_path / "bin")
    shutil.copyfile(world["root"] / "hf" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(model.state_dict(), str(tmp_path / "bin" / "pytorch_model.bin"))
    for name in ("sharded", "bin"):
        convert(str(tmp_path / name), str(tmp_path / f"{name}_meta"), mp=1, progress=False)
        got = meta_state(str(tmp_path / f"{name}_meta"))
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in got), name


# Texts whose ids transformers must agree on: spaces at the start, in runs and at the end, digits, bytes
# outside the vocabulary (byte fallback), and special-token names, which Hugging Face's tokenizers read as
# the special ids (as our /tokenize does: `encode_naming_specials`), the text after each encoded on its own.
TOKENIZER_TEXTS = PROMPTS + ["The capital of France is   Paris!\n\n 12345 ça va? 日本語 🦙", " leading space",
                             "  two  spaces  ", "tabs\tand\nnewlines\n\n\n", "", "a</s>b<s> c<unk>d"]
LLAMA3_SPECIAL_TEXT = "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|reserved_special_token_7|> x"


def assert_transformers_reads_it_as_we_do(hf_dir, tok, texts):
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in texts:
        ids = tok.encode_naming_specials(text, bos=True)
        assert hf_tok(text)["input_ids"] == ids, text
        if ids == tok.encode(text, bos=True, eos=False):  # no special token in it: decoded, the text again
            assert hf_tok.decode(ids[1:]) == tok.decode(ids[1:]) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)


@pytest.mark.slow  # builds a transformers tokenizer of the 32000-piece vocabulary
def test_a_sentencepiece_tokenizer_beside_the_source_travels_to_hf_and_transformers_reads_it(
        tmp_path, make_checkpoint, tokenizer_path):
    from llama_mp.runtime.tokenizer import Tokenizer

    meta_src, _, _ = make_checkpoint(shards=1)
    src = tmp_path / "meta"
    shutil.copytree(meta_src, src)
    shutil.copyfile(tokenizer_path, src / "tokenizer.model")  # no --tokenizer: the one in the folder
    convert(str(src), str(tmp_path / "hf"), to="hf", progress=False)
    # tokenizer.json made by convert: transformers needs no protobuf to read a SentencePiece model then
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "hf"))
    assert_transformers_reads_it_as_we_do(str(tmp_path / "hf"), Tokenizer(tokenizer_path), TOKENIZER_TEXTS)


def test_tied_embeddings_become_a_separate_output_matrix(tmp_path, tokenizer):
    model = random_hf_model(tokenizer.n_words, tie=True)
    model.save_pretrained(str(tmp_path / "tied"))
    convert(str(tmp_path / "tied"), str(tmp_path / "meta"), progress=False)
    state = meta_state(str(tmp_path / "meta"))
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])


def test_rotary_row_order_round_trips_and_keeps_head_boundaries():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)  # 4 heads of 8 rows
    hf = to_hf_rows(w, 4)
    assert torch.equal(from_hf_rows(hf, 4), w)
    # Head 0 in HF order: the even rows of Meta's head 0, then its odd rows.
    assert hf[:8, 0].tolist() == w[[0, 2, 4, 6, 1, 3, 5, 7], 0].tolist()


def test_llama2c_shared_classifier_and_bad_files(tmp_path, make_checkpoint):
    _, args, full = make_checkpoint(shards=1)
    path = str(tmp_path / "shared.bin")
    write_llama2c(path, full, args.n_heads, args.kv_heads, shared=True)
    assert detect(path) == "llama2c"
    convert(path, str(tmp_path / "meta"), progress=False)
    state = meta_state(str(tmp_path / "meta"))
    assert torch.equal(state["output.weight"], full["tok_embeddings.weight"])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(LlamaMPError, match="truncated"):
        convert(path, str(tmp_path / "again"), progress=False)
    assert not (tmp_path / "again").exists()


@pytest.mark.slow  # builds and runs transformers models (fixtures `world`, `llama3_world`)
def test_unsupported_sources_are_refused_with_a_reason(tmp_path, world):
    with pytest.raises(LlamaMPError, match="Cannot tell what"):
        convert(str(tmp_path), str(tmp_path / "out"), progress=False)
    scaled = tmp_path / "scaled"
    shutil.copytree(world["root"] / "hf", scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlamaMPError, match="rope scaling 'linear'"):
        convert(str(scaled), str(tmp_path / "out"), progress=False)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    config["intermediate_size"] = 256  # the weights say 192
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlamaMPError, match=r"inconsistent with its own config: .*w1.weight has shape \[192, 64\]"):
        convert(str(scaled), str(tmp_path / "out"), progress=False)
    with pytest.raises(LlamaMPError, match=r"Valid shard counts: \[1, 2, 4\]"):
        convert(str(world["root"] / "hf"), str(tmp_path / "out"), mp=3, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # builds and runs transformers models (fixtures `world`, `llama3_world`)
def test_command_line_convert_exit_codes(world, tmp_path, llama_mp_command):
    code, out, err = llama_mp_command("convert", world["root"] / "model.bin", tmp_path / "m", "--mp", "2",
                                      "--dtype", "bfloat16")
    assert code == 0, err
    assert "from the llama2c checkpoint" in out
    assert torch.load(checkpoint.shard_paths(str(tmp_path / "m"))[1], weights_only=True)["norm.weight"].dtype == torch.bfloat16
    code, _, err = llama_mp_command("convert", tmp_path / "nothing", tmp_path / "n")
    assert code == 2 and "Cannot tell what" in err


# ----------------------------------------------------------------------------------------------
# Llama 3.x: scaled rope, the 128256-token tiktoken vocabulary, tied embeddings.

LLAMA31 = dict(n_heads=8, n_kv_heads=4, use_scaled_rope=True, rope_theta=500000.0)  # head_dim 8: all 3 rope bands


def hf_greedy_until(model, prompts, stop_ids):
    """transformers' greedy continuations, cut at the first of `stop_ids` like ours."""
    out = []
    for ids in prompts:
        new = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW)[0, len(ids):].tolist()
        ends = [i for i, t in enumerate(new) if t in stop_ids]
        out.append(new[:ends[0]] if ends else new)
    return out


def hf_tensors(hf_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(hf_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def llama3_world(tmp_path_factory, make_checkpoint, llama3_tokenizer_path):
    from llama_mp.runtime.tokenizer import Tokenizer

    tok = Tokenizer(llama3_tokenizer_path)
    root = tmp_path_factory.mktemp("convert3")
    meta_src, args, full = make_checkpoint(shards=2, vocab_size=tok.n_words, **LLAMA31)
    shutil.copyfile(llama3_tokenizer_path, os.path.join(meta_src, "tokenizer.model"))
    convert(meta_src, str(root / "hf"), to="hf", progress=False)
    return {"root": root, "meta_src": meta_src, "args": args, "full": full, "tok": tok,
            "ids": greedy_ids([meta_src], llama3_tokenizer_path, MAX_NEW)[0]}


@pytest.mark.slow  # builds and runs transformers models (fixtures `world`, `llama3_world`)
def test_llama31_meta_to_hf_loads_in_transformers_and_generates_what_we_generate(llama3_world):
    hf_dir, tok = str(llama3_world["root"] / "hf"), llama3_world["tok"]
    config = json.loads(open(os.path.join(hf_dir, "config.json")).read())
    assert config["rope_parameters"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                         "rope_theta": 500000.0}
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["max_position_embeddings"] == 131072
    assert config["bos_token_id"] == tok.bos_id and config["eos_token_id"] == tok.stop_ids
    base = tok.n_words - 256  # the first special id: 128000 in Meta's file
    assert tok.bos_id == base and sorted(tok.stop_ids) == [base + 1, base + 8, base + 9]
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer.model"))
    # transformers reads the tiktoken tokenizer.model (not as SentencePiece) and encodes text as we do.
    assert_transformers_reads_it_as_we_do(hf_dir, tok, TOKENIZER_TEXTS + [LLAMA3_SPECIAL_TEXT])
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    assert model.config.rope_parameters["rope_type"] == "llama3"
    model.generation_config.pad_token_id = tok.eos_id
    prompts = [tok.encode(p, bos=True, eos=False) for p in PROMPTS]
    ours = llama3_world["ids"]
    assert all(ours) and hf_greedy_until(model, prompts, tok.stop_ids) == ours  # all: no empty row compared


@pytest.mark.slow  # builds and runs transformers models (fixtures `world`, `llama3_world`)
def test_llama31_hf_to_meta_reproduces_params_tensors_and_tokenizer(llama3_world, tmp_path, llama3_tokenizer_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(llama3_world["root"] / "hf", hf_dir)
    # Hugging Face's Llama 3 repos keep Meta's tiktoken file under original/, not beside config.json.
    os.makedirs(hf_dir / "original")
    os.replace(hf_dir / "tokenizer.model", hf_dir / "original" / "tokenizer.model")
    convert(str(hf_dir), str(tmp_path / "meta"), mp=2, progress=False)
    with open(tmp_path / "meta" / "params.json") as f:
        written = json.load(f)
    with open(os.path.join(llama3_world["meta_src"], "params.json")) as f:
        source = json.load(f)
    # The same fields (use_scaled_rope, rope_theta 500000, vocab 128256, no factor: 8 is inferred), and
    # a multiple_of that may differ but gives the same FFN width.
    assert {k: v for k, v in written.items() if k != "multiple_of"} == \
        {k: v for k, v in source.items() if k != "multiple_of"}
    assert load_params(str(tmp_path / "meta")).ffn_hidden_dim == llama3_world["args"].ffn_hidden_dim
    assert written["use_scaled_rope"] is True and "rope_scaling_factor" not in written
    with open(tmp_path / "meta" / "tokenizer.model", "rb") as f, open(llama3_tokenizer_path, "rb") as g:
        assert f.read() == g.read()
    shards = [torch.load(p, weights_only=True) for p in checkpoint.shard_paths(str(tmp_path / "meta"))]
    for key, whole in llama3_world["full"].items():
        assert torch.equal(layout.merge(key, [s[key] for s in shards], llama3_world["args"]),
                           whole), key


@pytest.mark.slow  # builds and runs transformers models (fixtures `world`, `llama3_world`)
def test_llama3_rope_variants_become_the_params_that_reproduce_them(llama3_world, tmp_path):
    def convert_with(name, **changes):
        hf_dir = tmp_path / name
        shutil.copytree(llama3_world["root"] / "hf", hf_dir)
        config = json.loads((hf_dir / "config.json").read_text())
        config.update(changes)
        (hf_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
        convert(str(hf_dir), str(tmp_path / f"{name}_meta"), progress=False)
        with open(tmp_path / f"{name}_meta" / "params.json") as f:
            return json.load(f)

    rope32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    # transformers 4.x style: rope_scaling beside a top-level rope_theta. 32 is not what Meta's rule
    # infers for this shape (only the 3.2 1B/3B shapes get 32), so params.json states it.
    params = convert_with("factor32", rope_parameters=None, rope_scaling=rope32)
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 32.0
    assert load_params(str(tmp_path / "factor32_meta")).rope_scale == 32.0
    # Llama 3.0: no rope scaling, the 128256-token vocabulary, theta 500000.
    params = convert_with("llama30", rope_scaling=None,
                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    hf_vocab = json.loads((llama3_world["root"] / "hf" / "config.json").read_text())["vocab_size"]  # 128256 with Meta's tokenizer
    assert "use_scaled_rope" not in params and params["vocab_size"] == hf_vocab and params["rope_theta"] == 500000.0
    for field, value in (("low_freq_factor", 2.0), ("original_max_position_embeddings", 4096)):
        with pytest.raises(LlamaMPError, match=rf"{field} {value!r} \(Meta's: .*only Meta's Llama 3.1 scheme"):
            convert_with(f"bad_{field}", rope_parameters={**rope32, field: value, "rope_theta": 500000.0})


@pytest.mark.slow  # builds and runs transformers models (fixtures `world`, `llama3_world`)
def test_tied_llama3_hf_folder_round_trips_through_meta(llama3_world, tmp_path):
    args = llama3_world["args"]
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, rope_parameters=rope, max_position_embeddings=131072, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(tmp_path / "hf"))
    assert "lm_head.weight" not in hf_tensors(str(tmp_path / "hf"))
    convert(str(tmp_path / "hf"), str(tmp_path / "meta"), mp=2, progress=False)
    state = meta_state(str(tmp_path / "meta"))
    merged_embedding = torch.cat([torch.load(p, weights_only=True)["tok_embeddings.weight"]
                                  for p in checkpoint.shard_paths(str(tmp_path / "meta"))])
    assert torch.equal(merged_embedding, model.model.embed_tokens.weight)
    assert torch.equal(state["output.weight"], model.model.embed_tokens.weight)
    convert(str(tmp_path / "meta"), str(tmp_path / "hf_again"), to="hf", progress=False)
    before, after = hf_tensors(str(tmp_path / "hf")), hf_tensors(str(tmp_path / "hf_again"))
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(after["lm_head.weight"], before["model.embed_tokens.weight"])
