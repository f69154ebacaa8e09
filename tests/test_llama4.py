"""Llama 4 (issue 23): params.json recognised, Meta's shard layout (fused wqkv, experts split inside every
expert, router replicated, dense mlp.fc1/fc2, `_extra_state` entries), resharding at load, and the model
(MoE + dense layers, NoPE with temperature tuning, chunked attention past one chunk, qk norm) against
transformers' Llama4ForCausalLM in float32 on 1 and 2 ranks; Llama 4's tokenizer and chat format."""

import io
import json
import os

import pytest
import torch

from llama4_helpers import (check_against_reference, greedy_in_slots, hf_logits_and_greedy, hf_model,
                            logits_and_greedy, moe_paths, only_grouped, tiny_args, with_moe_paths)
from llama_mp.checkpoints import layout
from llama_mp.checkpoints import meta as checkpoint
from llama_mp.checkpoints.llama4 import expert_hidden_dim
from llama_mp.checkpoints.params import parse_params
from llama_mp.checkpoints.synth import SHARED_TOKENIZERS, write_random_checkpoint, write_tiny_tiktoken
from llama_mp.errors import LlamaMPError
from llama_mp.runtime.tokenizer import Tokenizer
from multiproc import run_ranks

STEPS = 6
SCOUT = {"dim": 5120, "n_layers": 48, "n_heads": 40, "n_kv_heads": 8, "vocab_size": 202048, "multiple_of": 2048,
         "ffn_dim_multiplier": 1.2, "ffn_exp": 4.0, "norm_eps": 1e-05, "rope_theta": 500000.0,
         "use_scaled_rope": True, "attention_chunk_size": 8192, "nope_layer_interval": 4, "use_qk_norm": True,
         "moe_args": {"num_experts": 16, "capacity_factor": 1.0, "auto_scale_F": True, "top_k": 1,
                      "interleave_moe_layer_step": 1},
         "vision_args": {"image_size": {"height": 336, "width": 336}, "patch_size": {"height": 14, "width": 14},
                         "dim": 1408, "n_layers": 34, "n_heads": 16, "mlp_ratio": 4.0, "output_dim": 4096,
                         "pixel_shuffle_ratio": 0.5}}


@pytest.fixture(scope="module")
def l4_tokenizer_path(tmp_path_factory):
    """A tiny tiktoken file (320 ranks), read as Llama 4's (+ 2048 special tokens) for a Llama 4 model."""
    return write_tiny_tiktoken(str(tmp_path_factory.mktemp("tok4") / "tokenizer.model"))


@pytest.fixture(scope="module")
def l4(tmp_path_factory, l4_tokenizer_path):
    """(args, whole state dict, {shards: checkpoint dir}, prompts): one random tiny Llama 4 written with 1, 2
    and 4 shards, the 2-shard one also holding Meta's `_extra_state` entries and gate statistics."""
    tok = Tokenizer(l4_tokenizer_path, "llama4")
    args = tiny_args(tok.n_words)
    dirs = {}
    for shards in (1, 2, 4):
        dirs[shards] = str(tmp_path_factory.mktemp(f"llama4_mp{shards}"))
        state = write_random_checkpoint(dirs[shards], args, shards, seed=3)
    add_meta_extras(dirs[2], args)
    texts = ["The quick brown fox jumps over the lazy dog. A journey of a thousand",  # > 2 chunks of 8
             "Once upon a time", "Model parallel"]
    prompts = [tok.encode(t, bos=True, eos=False) for t in texts]
    chunk = args.llama4.attention_chunk_size
    assert len(prompts[0]) > 2 * chunk and len(prompts[0]) // chunk < (len(prompts[0]) + STEPS - 1) // chunk
    return args, state, dirs, prompts


def add_meta_extras(ckpt_dir, args):
    """What Meta's Llama 4 shards hold besides the text weights: io.BytesIO `_extra_state` entries, gate
    statistics and the vision encoder's weights."""
    for path in checkpoint.shard_paths(ckpt_dir):
        shard = torch.load(path, weights_only=True)
        shard["vision_embeddings.vision_encoder.conv1._linear.weight"] = torch.ones(8, 12)
        shard["vision_projection.weight"] = torch.ones(args.dim // 2, 16)
        for i in range(args.n_layers):
            shard[f"layers.{i}.attention.wqkv._extra_state"] = io.BytesIO(b"\x00" * 8)
            shard[f"layers.{i}.attention.wo._extra_state"] = io.BytesIO(b"state")
            if args.llama4.is_moe_layer(i):
                shard[f"layers.{i}.feed_forward.global_gate_stats_3E"] = torch.zeros(3, args.llama4.num_experts)
        torch.save(shard, path)


@pytest.fixture(scope="module")
def reference(l4):
    """transformers' logits of prompts[0] and greedy ids of every prompt."""
    args, state, _, prompts = l4
    model = hf_model(args, state)
    logits = hf_logits_and_greedy(model, prompts[0], 0)[0]
    return logits, [hf_logits_and_greedy(model, p, STEPS)[1] for p in prompts]


# ----------------------------------------------------------------------------------------------
# params.json


def test_scout_params_are_llama4_with_meta_defaults():
    args = parse_params(SCOUT)
    assert args.family == "llama4" and args.llama4.num_experts == 16 and args.llama4.has_vision
    assert args.rope_scale == 16.0 and args.llama4.rope_high_freq_factor is None  # Meta's defaults: 16 and 1
    assert expert_hidden_dim(args) == 8192 and args.head_dim == 128
    from llama_mp.runtime.model import rotary_tables

    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    long = 2 * torch.pi / freqs.double() >= 8192  # Meta's Llama 4 scaling: these divided by 16, the rest kept
    table = rotary_tables(128, 2, 500000.0, torch.device("cpu"), args.rope_scale, args.rope_high_freq_factor)
    angles = table[1].angle()
    torch.testing.assert_close(angles, torch.where(long, freqs / 16, freqs), rtol=1e-6, atol=0)
    assert [args.llama4.is_nope_layer(i) for i in range(4)] == [False, False, False, True]
    assert layout.valid_world_sizes(args) == [1, 2, 4, 8]
    maverick = parse_params({**SCOUT, "use_scaled_rope": False, "moe_args": {**SCOUT["moe_args"], "num_experts": 128,
                                                                             "interleave_moe_layer_step": 2}})
    assert maverick.ffn_hidden_dim == 16384 and not maverick.llama4.is_moe_layer(0) and maverick.llama4.is_moe_layer(1)
    # Llama 3 stays Llama 3; Meta's default rope_theta for Llama 4 when a file leaves it out
    assert parse_params({"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 128256}).family == "llama3"
    no_theta = {k: v for k, v in SCOUT.items() if k != "rope_theta"}
    assert parse_params(no_theta).rope_theta == 500000.0
    args = tiny_args(2368)
    assert parse_params(json.loads(json.dumps(args.to_json_dict()))) == args


def test_bad_llama4_params_name_every_problem():
    bad = {**SCOUT, "moe_args": {"num_experts": 2, "top_k": 3, "experts_per_gpu": 1}, "use_qk_norm": "yes",
           "attention_chunk_size": 0}
    with pytest.raises(LlamaMPError) as e:
        parse_params(bad)
    text = str(e.value)
    for part in ("experts_per_gpu", "use_qk_norm must be true or false", "attention_chunk_size must be a positive"):
        assert part in text
    with pytest.raises(LlamaMPError, match=r"quantization_args .* \(Maverick's FP8 experts"):
        parse_params({**SCOUT, "quantization_args": {"scheme": "fp8_mixed"}})
    assert parse_params({**SCOUT, "quantization_args": None, "lora_args": None}).family == "llama4"
    with pytest.raises(LlamaMPError, match="top_k 3 is more than num_experts 2"):
        parse_params({**SCOUT, "moe_args": {"num_experts": 2, "top_k": 3}})


# ----------------------------------------------------------------------------------------------
# Layout and loading


def test_fused_and_expert_tensors_split_per_part_and_load_on_any_rank_count(l4, tmp_path):
    args, state, dirs, _ = l4
    key = "layers.1.feed_forward.experts.moe_w_out_eF_D"
    f, e = expert_hidden_dim(args), args.llama4.num_experts
    pieces = [layout.split(key, state[key], args, 2, i) for i in range(2)]
    # each shard holds half of every expert's F rows, expert by expert (Meta's layout)
    assert torch.equal(pieces[1].view(e, f // 2, -1), state[key].view(e, f, -1)[:, f // 2:])
    assert torch.equal(layout.merge(key, pieces, args), state[key])
    qkv = "layers.0.attention.wqkv.weight"
    hd = args.head_dim
    shard1 = layout.split(qkv, state[qkv], args, 2, 1)
    q, k, v = state[qkv].split([args.n_heads * hd, args.kv_heads * hd, args.kv_heads * hd])
    assert torch.equal(shard1, torch.cat([q.chunk(2)[1], k.chunk(2)[1], v.chunk(2)[1]]))
    # 2 shards on 1 rank and 1 shard on 2 ranks: the rank's share is what a split says
    _, whole = checkpoint.load_rank_state_dict(dirs[2], args, 0, 1)
    assert set(whole) == set(state) and all(torch.equal(whole[k], state[k]) for k in state)
    from llama_mp.checkpoints.reshard import reshard

    out = str(tmp_path / "mp1")
    reshard(dirs[2], out, 1, progress=False)  # the text weights, whole; the vision ones and the extras left out
    written = checkpoint.load_shard(checkpoint.shard_paths(out)[0])
    assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)
    for shards, ranks in ((1, 2), (2, 4)):
        for rank in range(ranks):
            _, share = checkpoint.load_rank_state_dict(dirs[shards], args, rank, ranks)
            assert all(torch.equal(share[k], layout.split(k, state[k], args, ranks, rank)) for k in state)


def unfused(shard, args, shards):
    """A shard of the shipped layout in Meta's unfused names (its model's parameter names)."""
    out, hd, e = {}, args.head_dim, args.llama4.num_experts
    for key, t in shard.items():
        layer, _, name = key.partition(".")[2].partition(".") if key.startswith("layers.") else ("", "", key)
        p = f"layers.{layer}." if layer else ""
        if name == "attention.wqkv.weight":
            sizes = [args.n_heads * hd // shards, args.kv_heads * hd // shards, args.kv_heads * hd // shards]
            out.update(zip((p + "attention.wq.weight", p + "attention.wk.weight", p + "attention.wv.weight"),
                           t.split(sizes)))
        elif name == "feed_forward.mlp.fc1_weight":
            out[p + "feed_forward.w1.weight"], out[p + "feed_forward.w3.weight"] = t.chunk(2)
        elif name.startswith("feed_forward.experts.moe_w_"):
            inner = {"in": "w1", "swiglu": "w3", "out": "w2"}[name.split("_")[3]]
            out[p + "feed_forward.experts." + inner] = t.reshape(e, -1, t.shape[-1])
        else:
            renamed = {"attention.wqkv.layer_norm_weight": "attention_norm.weight",
                       "feed_forward.norm.weight": "ffn_norm.weight", "feed_forward.mlp.layer_norm_weight": "ffn_norm.weight",
                       "feed_forward.mlp.fc2_weight": "feed_forward.w2.weight",
                       "feed_forward.w_in_shared_FD.weight": "feed_forward.shared_expert.w1.weight",
                       "feed_forward.w_swiglu_FD.weight": "feed_forward.shared_expert.w3.weight",
                       "feed_forward.w_out_shared_DF.weight": "feed_forward.shared_expert.w2.weight"}
            out[p + renamed.get(name, name)] = t
    return out


def test_metas_unfused_names_load_as_the_shipped_layout(l4, tmp_path):
    args, state, dirs, _ = l4
    for path in checkpoint.shard_paths(dirs[2]):
        torch.save(unfused(checkpoint.load_shard(path), args, 2), tmp_path / os.path.basename(path))
    with open(tmp_path / "params.json", "w") as f:
        json.dump(args.to_json_dict(), f)
    assert "layers.1.feed_forward.experts.w2" in torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    _, whole = checkpoint.load_rank_state_dict(str(tmp_path), args, 0, 1)
    assert set(whole) == set(state) and all(torch.equal(whole[k], state[k]) for k in state)


def test_only_extra_state_bytes_are_dropped(l4, tmp_path):
    _, _, dirs, _ = l4
    shard = checkpoint.load_shard(checkpoint.shard_paths(dirs[2])[0])
    assert not any(k.endswith("_extra_state") for k in shard)
    other = dict(shard, **{"layers.0.attention.wo.notes": io.BytesIO(b"x")})
    torch.save(other, tmp_path / "consolidated.00.pth")
    with pytest.raises(LlamaMPError, match="does not hold a state dict of tensors"):
        checkpoint.load_shard(str(tmp_path / "consolidated.00.pth"))


def test_bad_llama4_inputs_are_one_message_each(l4, tmp_path, l4_tokenizer_path):
    args, _, _, _ = l4
    with pytest.raises(LlamaMPError, match=r"Llama 4 model .*the experts' width F 48.*Valid process counts: \[1, 2, 4\]"):
        layout.require_split(args, 3, "This checkpoint", "process")
    # params.json says 32 experts, the shards hold 16
    write_random_checkpoint(str(tmp_path), tiny_args(args.vocab_size, moe_args={"num_experts": 16, "top_k": 2,
                                                                                "interleave_moe_layer_step": 2}), 1)
    with open(tmp_path / "params.json", "w") as f:
        json.dump(args.to_json_dict(), f)
    from workers import build

    with pytest.raises(LlamaMPError, match=r"num_experts 32, but the shard's routers choose among 16 experts .*"
                                           r"moe_w_in_eD_F has shape \[1024, 48\] but params.json implies \[2048, 48\]"):
        build(str(tmp_path), l4_tokenizer_path, decoder="pytorch")
    with pytest.raises(LlamaMPError, match="cpu_kernels cannot run Llama 4"):
        build(str(tmp_path), l4_tokenizer_path, decoder="cpu_kernels")


# ----------------------------------------------------------------------------------------------
# The model against transformers


@pytest.fixture(scope="module")
def one_rank(l4, l4_tokenizer_path):
    """The PyTorch decoder from the 2-shard checkpoint (with Meta's extras), the static one as a GPU gets it;
    and the MoE paths they took."""
    _, _, dirs, prompts = l4
    return with_moe_paths(logits_and_greedy, [(dirs[2], "pytorch"), (dirs[1], "gpu:static")], l4_tokenizer_path,
                          prompts, STEPS)


def test_one_rank_matches_transformers(one_rank, reference, l4_tokenizer_path):
    results, paths = one_rank
    check_against_reference(results, reference, Tokenizer(l4_tokenizer_path, "llama4").stop_ids)
    assert results[0][2] == results[1][2]  # seeded samples: the same whatever the decoder
    assert only_grouped(paths), paths  # prompts and decode steps, every MoE call grouped by expert


@pytest.mark.parametrize("decoder", ["pytorch", "static"])
def test_the_servers_scattered_rows_match_transformers(l4, reference, l4_tokenizer_path, decoder):
    """Continuous batching's calls: prompts prefilled into rows 2, 0 and 1, then decoded together, out of order."""
    _, _, dirs, prompts = l4
    with moe_paths() as paths:
        ids = greedy_in_slots(dirs[1], l4_tokenizer_path, prompts, [2, 0, 1], STEPS, decoder)
    assert ids == reference[1]
    assert only_grouped(paths), paths


@pytest.mark.spawn  # inductor starts processes of its own
def test_the_compiled_step_decodes_transformers_ids(l4, reference, l4_tokenizer_path):
    """--decoder compiled on Llama 4's layers (MoE with its shared expert, dense, NoPE and chunked ones; the
    8-token prompt decodes into its second chunk): one row of 16 positions, a single graph to compile."""
    _, _, dirs, prompts = l4
    assert len(prompts[2]) + STEPS <= 16
    assert greedy_in_slots(dirs[1], l4_tokenizer_path, prompts[2:], [0], STEPS, "compiled", max_batch_size=1,
                           max_seq_len=16) == reference[1][2:]


@pytest.mark.spawn
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_compiled_step_groups_by_expert_in_bfloat16_only(l4, l4_tokenizer_path, dtype):
    """--decoder compiled: its traced step calls torch._grouped_mm in bfloat16 and not in float32 (the
    operator's meta function takes bfloat16 only), and its logits agree with the eager decoder's, which
    groups in both. (Seen by the profiler: a counting wrapper traced into the step would recompile it.)"""
    from workers import build

    _, _, dirs, prompts = l4
    prompt, logits, kernels = prompts[2], [], {}
    for decoder in ("compiled", "pytorch"):
        model = build(dirs[1], l4_tokenizer_path, max_seq_len=16, max_batch_size=1, dtype=dtype, decoder=decoder).model
        with torch.inference_mode():
            model.hidden(torch.tensor([prompt[:-3]]), 0)
            with torch.profiler.profile() as profile:  # decode steps only
                logits.append(torch.cat([model.logits(model.hidden(torch.tensor([[prompt[pos]]]), pos))
                                         for pos in range(len(prompt) - 3, len(prompt))], dim=1))
        kernels[decoder] = {event.name for event in profile.events()}
    assert ("aten::_grouped_mm" in kernels["compiled"]) == (dtype == "bfloat16")
    assert "aten::_grouped_mm" in kernels["pytorch"]
    scale = logits[1].abs().max().item()
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=(4e-2 if dtype == "bfloat16" else 1e-5) * scale)


@pytest.mark.spawn
@pytest.mark.parametrize("world_size,shards", [(2, (2, 1)), (4, (4, 2))])
def test_ranks_match_transformers_from_any_shard_count(l4, reference, one_rank, l4_tokenizer_path, world_size, shards):
    """2 ranks from 2 and 1 shards, 4 ranks from 4 and 2: each rank holds its F/N slice of every expert
    (4 ranks: 12 values, 48 bytes a row in float32, still grouped by expert)."""
    args, _, dirs, prompts = l4
    stops = Tokenizer(l4_tokenizer_path, "llama4").stop_ids
    per_rank = run_ranks(world_size, with_moe_paths, logits_and_greedy,
                         [(dirs[shards[0]], "static"), (dirs[shards[1]], "pytorch")], l4_tokenizer_path, prompts, STEPS)
    for rank, paths in per_rank:
        check_against_reference(rank, reference, stops)
        assert [sampled for *_, sampled in rank] == [one_rank[0][0][2]] * 2  # seeded samples as on one rank
        assert only_grouped(paths), paths
    assert all(logits is None for r, _ in per_rank[1:] for logits, *_ in r)  # gathered on rank 0 only


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat format


@pytest.fixture(scope="module")
def meta_tokenizer():
    path = SHARED_TOKENIZERS["llama4"]
    if not os.path.isfile(path):
        pytest.skip("Meta's Llama 4 tokenizer is not in ../shared/assets")
    return Tokenizer(path)


def test_llama4_tokenizer_specials_and_stops(meta_tokenizer):
    tok = meta_tokenizer
    assert (tok.family, tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == ("llama4", 202048, 200000, 200001, 200018)
    named = {n: tok.special_id(n) for n in ("<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|patch|>",
                                            "<|reasoning_thinking_end|>", "<|reserved_special_token_903|>")}
    assert named == {"<|header_start|>": 200005, "<|header_end|>": 200006, "<|eom|>": 200007, "<|eot|>": 200008,
                     "<|patch|>": 200092, "<|reasoning_thinking_end|>": 201143, "<|reserved_special_token_903|>": 202047}
    assert tok.stop_ids == [200001, 200007, 200008]
    text = "Hello, world! It's 2025.\n\n  Ünïcode 日本語 <|eot|>"
    ids = tok.encode(text, bos=True, eos=False)
    assert ids[0] == 200000 and 200008 not in ids and tok.decode(ids[1:]) == text  # typed specials stay text
    from llama_mp.runtime.chat import encode_dialog

    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    def text(t):
        return tok.encode(t, bos=False, eos=False)

    def header(role):
        return [200005] + text(role) + [200006] + text("\n\n")  # header_start role header_end, a blank line

    expected = [200000] + header("system") + text("Be brief.") + [200008] + header("user") + text("Hi") + [200008]
    expected += header("assistant")
    assert encode_dialog(tok, dialog) == expected


def test_wrong_tokenizer_for_llama4_is_refused(l4, tmp_path):
    _, _, dirs, _ = l4
    path = SHARED_TOKENIZERS["llama3"]
    if not os.path.isfile(path):
        pytest.skip("Meta's Llama 3 tokenizer is not in ../shared/assets")
    from workers import build

    with pytest.raises(LlamaMPError, match="is a Llama 3.x tokenizer .* holds a Llama 4 model"):
        build(dirs[1], path, decoder="pytorch")


# ----------------------------------------------------------------------------------------------
# No host sync in a Llama 4 decode step (routing, chunk masks and temperature stay on the device)

from test_host_syncs import K, _count_steps, _mark_model, syncs  # noqa: E402,F401 - the fixture too


@pytest.mark.parametrize("decoder,quantize", [("pytorch", None), ("static", None), ("static", "int8")])
def test_llama4_decode_steps_read_nothing_on_the_host(l4, l4_tokenizer_path, syncs, monkeypatch, decoder,  # noqa: F811
                                                      quantize):
    """Through the grouped path (float experts), and with quantized experts (int8: dequantised per step,
    only the chosen ones while decoding)."""
    from llama4_helpers import one_thread
    from workers import build

    _, _, dirs, prompts = l4
    with one_thread():
        llama = build(dirs[1], l4_tokenizer_path, max_seq_len=64, max_batch_size=2, decoder=decoder,
                      quantize=quantize)
        _mark_model(llama.model)
        monkeypatch.setattr(llama.model.decoder, "steps_per_stop_check", K)
        monkeypatch.setattr(llama.engine, "stop_ids", [])
        _count_steps(monkeypatch, syncs, llama.model.decoder, ("step", "prefill"))
        real_results = llama.engine._results
        monkeypatch.setattr(llama.engine, "_results", lambda *a: (setattr(syncs, "counting", False), real_results(*a))[1])
        with syncs, moe_paths() as paths:
            llama.generate([prompts[1], prompts[2]], 10, temperature=0)
    reads = syncs.reads()
    assert [r[1] for r in reads] == ["__bool__"] * (syncs.steps // K), reads  # the stop check only
    assert syncs.uploads() == []
    # float experts group their pairs by expert; quantized ones are dequantised per call, never grouped
    assert only_grouped(paths) if quantize is None else paths["grouped"] == 0 and paths["gathered"] > 0, paths


def test_bench_counts_only_the_chosen_experts_of_a_decode_step(l4, l4_tokenizer_path, monkeypatch):
    """Grouped, a step of r rows reads min(E, r * top_k) experts at most; gathering (a compiled float32 step),
    r * top_k while that is at most E / 3, else all."""
    from llama_mp.tools.bench import bytes_read_per_token
    from workers import build

    args, state, dirs, _ = l4
    model = build(dirs[1], l4_tokenizer_path, decoder="pytorch").model
    layer_bytes = sum(t.numel() * 4 for k, t in state.items() if ".experts." in k) // 2  # float32, 2 MoE layers
    e, k = args.llama4.num_experts, args.llama4.top_k

    def unread(read):  # bytes of routed experts two MoE layers do not read when each reads `read` experts
        return 2 * (layer_bytes * (e - read) // e)

    every = bytes_read_per_token(model, batch=100)  # 200 pairs: every expert may be chosen
    assert bytes_read_per_token(model, batch=1) == every - unread(k)
    assert bytes_read_per_token(model, batch=8) == every - unread(8 * k)  # 16 pairs > E / 3, half the experts
    assert bytes_read_per_token(model, batch=16) == every
    for moe in (layer.feed_forward for layer in model.layers if hasattr(layer.feed_forward, "grouped")):
        monkeypatch.setattr(moe, "steps_traced", True)  # as --decoder compiled's float32 steps: not grouped
    assert bytes_read_per_token(model, batch=1) == every - unread(k)
    assert bytes_read_per_token(model, batch=8) == every


# ----------------------------------------------------------------------------------------------
# Grouping (token, choice) pairs by expert


def routed_to(moe, wanted, seed=0):
    """Tokens [rows, 1, D] that moe's router (replaced here) sends to the experts `wanted[i]`, in that order
    of score: row i is mostly the unit vector i, whose router row favours those experts by 1.0, 0.5, ..."""
    g = torch.Generator().manual_seed(seed)
    dim, e = moe.router_DE.weight.shape
    router = torch.randn(dim, e, generator=g) * 0.01
    tokens = torch.randn(len(wanted), 1, dim, generator=g) * 0.05
    for i, experts in enumerate(wanted):
        tokens[i, 0, i] += 1.0
        for rank, expert in enumerate(experts):
            router[i, expert] = 1.0 / (1 + rank)
    moe.router_DE.weight.copy_(router)
    return tokens


def moe_by_hand(moe, tokens):
    """The MoE layer token by token from Meta's stored experts: each chosen expert's SwiGLU on the token
    scaled by the sigmoid of its score, plus the shared expert."""
    from llama_mp.runtime.model import swiglu

    e, dim = moe.num_experts, tokens.shape[-1]
    w_in, w_swiglu, w_out = (getattr(moe.experts, name).weight.view(e, -1, getattr(moe.experts, name).weight.shape[1])
                             for name in ("moe_w_in_eD_F", "moe_w_swiglu_eD_F", "moe_w_out_eF_D"))
    rows = []
    for x in tokens.reshape(-1, dim):
        scores, chosen = torch.topk(x @ moe.router_DE.weight, moe.top_k)
        y = swiglu(moe.shared_gate_up, moe.shared_down, x[None])[0]
        for score, expert in zip(scores, chosen.tolist()):
            routed = torch.sigmoid(score) * x
            y = y + (torch.nn.functional.silu(routed @ w_in[expert]) * (routed @ w_swiglu[expert])) @ w_out[expert]
        rows.append(y)
    return torch.stack(rows).view(tokens.shape)


@pytest.fixture(scope="module")
def moe32(l4, l4_tokenizer_path):
    """A float32 MoE layer of the tiny model on one rank (32 experts, top 2)."""
    from workers import build

    _, _, dirs, _ = l4
    return build(dirs[1], l4_tokenizer_path, decoder="pytorch").model.layers[1].feed_forward


@pytest.mark.parametrize("wanted", [
    [(5, 7), (7, 5), (5, 7), (31, 0), (7, 30)],  # 5 and 7 chosen by 4 rows each; 27 experts by none
    [(12, 3)] * 4,                                # every row the same two experts
    [(0, 1), (30, 31), (15, 16)],                 # the first, last and middle groups; empty ones between
])
def test_grouped_experts_match_the_layer_computed_by_hand(moe32, monkeypatch, wanted):
    moe = moe32
    assert moe.grouped == (True, False)  # float32 on a CPU: eagerly yes, in a compiled step no
    with torch.inference_mode():
        tokens = routed_to(moe, wanted)
        assert torch.topk(tokens.reshape(len(wanted), -1) @ moe.router_DE.weight, 2).indices.tolist() == \
            [list(w) for w in wanted]
        expected = moe_by_hand(moe, tokens)
        with moe_paths() as paths, torch.profiler.profile() as profile:
            grouped = moe(tokens)
        assert paths == {"grouped": 1, "gathered": 0, "every": 0}
        kernels = [event.name for event in profile.events() if "mm" in event.name]
        assert kernels.count("aten::_grouped_mm") == 3 and "aten::bmm" not in kernels, kernels  # w_in, w_swiglu, w_out
        monkeypatch.setattr(moe, "grouped", (False, False))
        assert moe.gathers(2 * len(wanted))
        gathered = moe(tokens)
        monkeypatch.setattr(moe, "gathers", lambda pairs: False)
        every = moe(tokens)
    for out in (grouped, gathered, every):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_a_prompt_groups_by_expert_instead_of_running_every_expert(moe32, monkeypatch):
    moe = moe32
    x = torch.randn(2, 9, moe.router_DE.weight.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert not moe.gathers(x.shape[0] * x.shape[1] * moe.top_k)
        with moe_paths() as paths:
            grouped = moe(x)
        assert only_grouped(paths), paths
        expected = moe_by_hand(moe, x)
        monkeypatch.setattr(moe, "grouped", (False, False))
        every = moe(x)
    torch.testing.assert_close(grouped, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(every, expected, rtol=0, atol=1e-5)


def test_grouped_mm_runs_where_pytorch_says():
    from llama_mp.runtime.llama4 import grouped_mm_runs

    cpu = torch.device("cpu")
    assert grouped_mm_runs(torch.float32, cpu, (64, 12), 32, traced=False)       # 48-byte rows
    assert not grouped_mm_runs(torch.bfloat16, cpu, (64, 12), 32, traced=False)  # 24-byte rows
    assert grouped_mm_runs(torch.bfloat16, cpu, (64, 24), 32, traced=False)
    assert not grouped_mm_runs(torch.float32, cpu, (64, 48), 32, traced=True)    # the meta function: bf16 only
    assert grouped_mm_runs(torch.bfloat16, cpu, (64, 48), 32, traced=True)
    assert not grouped_mm_runs(torch.float64, cpu, (64, 48), 32, traced=False)
    # what the CPU accepts is what the predicate says: a 24-byte bfloat16 row is refused by the kernel
    offs = torch.tensor([2, 4], dtype=torch.int32)
    torch._grouped_mm(torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(2, 64, 24, dtype=torch.bfloat16), offs)
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
        torch._grouped_mm(torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(2, 64, 12, dtype=torch.bfloat16), offs)


@pytest.fixture(scope="module")
def moe_bf16(l4, l4_tokenizer_path):
    from workers import build

    _, _, dirs, _ = l4
    return build(dirs[1], l4_tokenizer_path, decoder="pytorch", dtype="bfloat16").model.layers[1].feed_forward


@pytest.mark.parametrize("rows,seq", [(3, 1), (2, 9)])  # a decode step (gathers) and a prompt (every expert)
def test_bfloat16_grouped_experts_match_the_other_paths(moe_bf16, monkeypatch, rows, seq):
    moe = moe_bf16
    assert moe.grouped == (True, True)  # bfloat16 rows of 128 and 96 bytes: eagerly and compiled
    x = torch.randn(rows, seq, moe.router_DE.weight.shape[0], generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        x = x.to(torch.bfloat16)
        with moe_paths() as paths:
            grouped = moe(x)
        assert only_grouped(paths)
        monkeypatch.setattr(moe, "grouped", (False, False))
        other = moe(x)
    assert grouped.dtype == torch.bfloat16
    torch.testing.assert_close(grouped.float(), other.float(), rtol=2e-2, atol=2e-2 * other.float().abs().max().item())


@pytest.mark.parametrize("decoder", ["static", "gpu:static"])
def test_a_static_steps_idle_rows_read_no_expert_of_their_own(l4, reference, l4_tokenizer_path, monkeypatch, decoder):
    """The static decoder runs every cache row; rows no sequence holds follow a live row's experts with gate
    0, so a step with one live row groups top_k experts per MoE layer, not up to rows * top_k."""
    from llama4_helpers import one_thread
    from llama_mp.runtime.llama4 import MoE
    from workers import build

    _, _, dirs, prompts = l4
    k, calls, grouped = 2, [], MoE._grouped

    def recording(self, tokens, chosen, gates):
        raw = torch.topk(tokens @ self.router_DE.weight, self.top_k).indices  # the router's own choice
        calls.append((raw, chosen.clone(), gates.clone()))
        return grouped(self, tokens, chosen, gates)

    monkeypatch.setattr(MoE, "_grouped", recording)
    with one_thread():
        llama = build(dirs[1], l4_tokenizer_path, max_batch_size=4, decoder=decoder)
        ids, _ = llama.generate([prompts[1]], STEPS, temperature=0)
    assert ids == [reference[1][1]]
    steps = [call for call in calls if call[1].shape[0] == 4]  # 4 cache rows x 1 token: decode steps
    assert steps
    for raw, chosen, gates in steps:
        assert len(set(chosen.flatten().tolist())) <= k and (gates[1:] == 0).all()  # slot 0 holds the sequence
    assert any(len(set(raw.flatten().tolist())) > k for raw, _, _ in steps)  # the idle rows would have chosen more
