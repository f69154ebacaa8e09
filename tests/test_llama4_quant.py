"""Llama 4 quantized (issue 23): int8 and int4 (groups of 32) of every linear layer, the routed experts
included (each expert quantized along its own inputs, stored in Meta's [E*in, out] layout), against
transformers' Llama4ForCausalLM on the dequantised weights (decoded here from the documented format) on
1, 2 and 4 ranks; quantizing while loading and `llama-mp quantize` / `reshard` agree bit for bit; the
refusals that remain; `plan`'s Scout and Maverick figures."""

import numpy as np
import pytest
import torch

from llama4_helpers import check_against_reference, hf_logits_and_greedy, hf_model, logits_and_greedy, tiny_args
from llama_mp.checkpoints import layout
from llama_mp.checkpoints import meta as checkpoint
from llama_mp.checkpoints.llama4 import expert_hidden_dim
from llama_mp.checkpoints.params import load_params, load_preset
from llama_mp.checkpoints.quantize import QuantizingSlices, quantize_checkpoint
from llama_mp.checkpoints.synth import write_random_checkpoint, write_tiny_tiktoken
from llama_mp.errors import LlamaMPError
from llama_mp.quant.scheme import Scheme, dequantize, quantize
from llama_mp.runtime.tokenizer import Tokenizer
from multiproc import run_ranks

STEPS = 6
SCHEMES = {"int8": Scheme("int8"), "int4": Scheme("int4", 32)}
EXPERTS = ("moe_w_in_eD_F", "moe_w_swiglu_eD_F", "moe_w_out_eF_D")


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    """(args, whole float state, dirs, prompts, tokenizer path): the tiny Llama 4 of test_llama4 with
    multiple_of 64 (F 64, dense FFN 192: int4 groups of 32 split over 1 or 2 ranks), written with 1 and 2
    shards (dirs[1], dirs[2]) and quantized by the tool from the 2 shards into one (dirs["int8"], dirs["int4"])."""
    tok_path = write_tiny_tiktoken(str(tmp_path_factory.mktemp("tok4q") / "tokenizer.model"))
    tok = Tokenizer(tok_path, "llama4")
    args = tiny_args(tok.n_words, multiple_of=64)
    assert (expert_hidden_dim(args), args.ffn_hidden_dim) == (64, 192)
    root = tmp_path_factory.mktemp("llama4q")
    dirs = {}
    for shards in (1, 2):
        dirs[shards] = str(root / f"float{shards}")
        state = write_random_checkpoint(dirs[shards], args, shards, seed=5)
    for mode in SCHEMES:
        dirs[mode] = str(root / mode)
        quantize_checkpoint(dirs[2], dirs[mode], mode, mp=1, progress=False)
    texts = ["The quick brown fox jumps over the lazy dog. A journey of a thousand",  # > 2 chunks of 8
             "Once upon a time", "Model parallel"]
    return args, state, dirs, [tok.encode(t, bos=True, eos=False) for t in texts], tok_path


def dequantized(qdir, args):
    """The whole float model a one-shard quantized folder stands for, decoded from docs/quantization.md's
    format: matrices [out, in] as quant/scheme.py's `dequantize`; expert stacks [E*in, out] written out
    here (int8: one scale per expert and output; int4: in each block of 16 rows of an expert, the low
    nibble is input j, the high one input j + 16, minus 8, times its group's scale)."""
    qargs = load_params(qdir).with_vocab(args.vocab_size)
    sd = checkpoint.load_shard(checkpoint.shard_paths(qdir)[0])
    e = args.llama4.num_experts
    out = {}
    for key, t in sd.items():
        scheme = layout.scheme_of(key, qargs)
        if key.endswith(".scales"):
            continue
        if scheme is None:
            out[key] = t.float()
            continue
        scales = sd[layout.scales_key(key, qargs)].float()
        if ".experts." not in key:
            out[key] = dequantize(t, scales, scheme)
            continue
        cols = t.shape[1]
        if scheme.mode == "int8":
            w = t.view(e, -1, cols).float() * scales.view(e, 1, cols)
        else:
            nibbles = t.view(e, -1, 16, cols)
            values = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=2).float() - 8    # [E, in / 32, 32, out]
            w = values.view(e, -1, scheme.group_size, cols) * scales.view(e, -1, 1, cols)
        out[key] = w.reshape(-1, cols)
    return out


@pytest.fixture(scope="module")
def references(q4):
    """{mode: (transformers' logits of prompts[0], greedy ids of every prompt)} on the dequantised weights."""
    args, _, dirs, prompts, _ = q4
    out = {}
    for mode in SCHEMES:
        model = hf_model(args, dequantized(dirs[mode], args))
        out[mode] = (hf_logits_and_greedy(model, prompts[0], 0)[0],
                     [hf_logits_and_greedy(model, p, STEPS)[1] for p in prompts])
    return out


# ----------------------------------------------------------------------------------------------
# The stored format


@pytest.mark.parametrize("mode", SCHEMES)
def test_each_expert_is_quantized_along_its_own_inputs(q4, mode):
    """Expert i's integers and scales are what the dense layers' scheme makes of its matrix [out, in]
    (no group or scale spans two experts); router, norms and embedding stay float."""
    args, state, dirs, _, _ = q4
    sd = checkpoint.load_shard(checkpoint.shard_paths(dirs[mode])[0])
    e, scheme = args.llama4.num_experts, SCHEMES[mode]
    for name in EXPERTS:
        key = f"layers.1.feed_forward.experts.{name}"
        q, scales = sd[key], sd[key + ".scales"]
        assert (q.dtype, scales.dtype) == (scheme.weight_dtype, scheme.scale_dtype)
        w = state[key].view(e, -1, state[key].shape[1])                            # [E, in, out]
        for i in range(e):
            q_i, scales_i = quantize(w[i].t(), scheme)
            assert torch.equal(q.view(e, -1, q.shape[1])[i].t(), q_i), (name, i)
            assert torch.equal(scales.view(e, -1, scales.shape[1])[i].t().reshape(scales_i.shape), scales_i)
    for key in ("layers.1.feed_forward.router_DE", "layers.1.feed_forward.norm.weight", "tok_embeddings.weight"):
        assert sd[key].dtype == torch.float32 and layout.scheme_of(key, load_params(dirs[mode])) is None
    assert sd["layers.0.feed_forward.mlp.fc1_weight"].dtype == scheme.weight_dtype
    assert "layers.0.feed_forward.mlp.fc1.scales" in sd and "layers.1.feed_forward.w_out_shared_DF.scales" in sd


@pytest.mark.parametrize("mode", SCHEMES)
def test_loading_and_the_tool_give_the_same_integers_on_any_rank_count(q4, mode, tmp_path):
    """--quantize on N ranks from 2 shards = the tool's 1-shard output split N ways; resharding that
    folder = the tool writing N shards."""
    args, _, dirs, _, _ = q4
    whole = checkpoint.load_shard(checkpoint.shard_paths(dirs[mode])[0])
    for ranks in (2, 4) if mode == "int8" else (2,):  # (one rank: the same logits exactly, test_one_rank_...)
        for rank in range(ranks):
            slices = QuantizingSlices(dirs[2], load_params(dirs[2]), rank, ranks, SCHEMES[mode])
            assert set(slices.keys()) == set(whole)
            for key in slices.keys():
                assert torch.equal(slices.tensor(key), layout.split(key, whole[key], slices.args, ranks, rank)), key
    from llama_mp.checkpoints.reshard import reshard
    from llama_mp.checkpoints.verify import structure_problems

    reshard(dirs[mode], str(tmp_path / "resharded"), 2, progress=False)
    quantize_checkpoint(dirs[1], str(tmp_path / "tool"), mode, mp=2, progress=False)
    for a, b in zip(*(checkpoint.shard_paths(str(tmp_path / d)) for d in ("resharded", "tool"))):
        left, right = checkpoint.load_shard(a), checkpoint.load_shard(b)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    assert structure_problems(str(tmp_path / "resharded")) == []


# ----------------------------------------------------------------------------------------------
# The model against transformers on the dequantised weights


@pytest.fixture(scope="module")
def one_rank(q4):
    """{mode: results} on one rank: the tool's folder (pytorch; static as a GPU gets it), and the float
    1-shard checkpoint quantized while loading (pytorch)."""
    _, _, dirs, prompts, tok_path = q4
    return {mode: logits_and_greedy([(dirs[mode], "pytorch"), (dirs[mode], "gpu:static"), (dirs[1], "pytorch", mode)],
                                    tok_path, prompts, STEPS) for mode in SCHEMES}


@pytest.mark.parametrize("mode", SCHEMES)
def test_one_rank_matches_transformers_on_the_dequantised_weights(q4, references, one_rank, mode):
    stops = Tokenizer(q4[4], "llama4").stop_ids
    check_against_reference(one_rank[mode], references[mode], stops)
    folder, _, loaded = one_rank[mode]
    np.testing.assert_array_equal(folder[0], loaded[0])  # the same integers, so the same logits exactly
    assert folder[2] == loaded[2]


@pytest.mark.spawn
@pytest.mark.parametrize("world_size,cases", [
    (2, [("int8", "static", None), ("int4", "pytorch", 2)]),   # the folder; --quantize int4 from 2 shards
    (4, [("int8", "pytorch", None), ("int8", "static", 2)]),   # int4 groups of 32 do not split F 64 four ways
])
def test_ranks_match_transformers_on_the_dequantised_weights(q4, references, one_rank, world_size, cases):
    _, _, dirs, prompts, tok_path = q4
    stops = Tokenizer(tok_path, "llama4").stop_ids
    runs = [(dirs[mode], decoder) if shards is None else (dirs[shards], decoder, mode) for mode, decoder, shards in cases]
    per_rank = run_ranks(world_size, logits_and_greedy, runs, tok_path, prompts, STEPS)
    for rank in per_rank:
        for (mode, _, _), result in zip(cases, rank):
            check_against_reference([result], references[mode], stops)
            assert result[2] == one_rank[mode][0][2]  # seeded samples as on one rank
    assert all(logits is None for r in per_rank[1:] for logits, *_ in r)


def test_gathered_and_every_expert_paths_agree_on_quantized_experts(q4, monkeypatch):
    """A MoE layer of int4 experts: reading the chosen experts only, or every expert with the unchosen
    inputs scaled by 0, and dequantising all experts at once or one at a time, give one answer."""
    from llama_mp.runtime import llama4
    from workers import build

    _, _, dirs, _, tok_path = q4
    moe = build(dirs["int4"], tok_path, decoder="pytorch").model.layers[1].feed_forward
    x = torch.randn(3, 1, moe.router_DE.weight.shape[0], generator=torch.Generator().manual_seed(0))
    assert moe.gathers(3 * moe.top_k)
    with torch.inference_mode():
        results = [moe(x)]
        monkeypatch.setattr(llama4, "DEQUANTIZED_VALUES", 1)  # one expert per block
        results.append(moe(x))
        monkeypatch.setattr(moe, "gathers", lambda pairs: False)
        results.append(moe(x))
        monkeypatch.undo()
        monkeypatch.setattr(moe, "gathers", lambda pairs: False)
        results.append(moe(x))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-5)


def test_a_random_quantized_llama4_draws_every_expert(q4):
    """`llama-mp bench`'s random weights: each expert drawn and quantized on its own (none left unset)."""
    from llama_mp.distributed.group import Group
    from llama_mp.quant import experts as quantized_experts
    from llama_mp.runtime.decode import Decoder
    from llama_mp.runtime.loading import random_model

    args = q4[0]
    model = random_model(args, Group(0, 1, 0, torch.device("cpu"), "gloo"), torch.float32, Decoder(), 1, 16,
                         scheme=SCHEMES["int4"])
    e = args.llama4.num_experts
    for name in EXPERTS:
        holder = getattr(model.layers[1].feed_forward.experts, name)
        w = quantized_experts.dequantize(holder.weight.view(e, -1, holder.weight.shape[1]),
                                         holder.scales.view(e, -1, holder.scales.shape[1]), SCHEMES["int4"],
                                         torch.float32)
        spread = w.flatten(1).std(dim=1) * w.shape[2] ** 0.5  # N(0, 1 / out) as drawn (fan_in: the last dim)
        assert ((spread > 0.8) & (spread < 1.2)).all(), (name, spread)


# ----------------------------------------------------------------------------------------------
# What is refused, and plan


def test_what_quantized_llama4_refuses_is_one_message_each(q4):
    from llama_mp.runtime.decode import choose_decoder
    from llama_mp.tools.plan import make_plan
    from workers import build

    args, _, dirs, _, tok_path = q4
    all_moe = tiny_args(args.vocab_size, moe_args={"num_experts": 32, "top_k": 2, "interleave_moe_layer_step": 1})
    assert layout.scheme_problem(all_moe, SCHEMES["int8"]) is None
    assert "do not divide the model's experts' width F 48" in layout.scheme_problem(all_moe, SCHEMES["int4"])
    with pytest.raises(LlamaMPError, match=r"each process's slice of the dim 64, dense FFN width 192, experts' "
                                           r"width F 64 must also be whole groups\. Valid process counts: \[1, 2\]"):
        layout.require_split(args.with_scheme(SCHEMES["int4"]), 4, "This checkpoint", "process")
    with pytest.raises(LlamaMPError, match="--decoder compiled cannot run a quantized Llama 4"):
        choose_decoder("compiled", torch.device("cpu"), torch.float32, SCHEMES["int8"], "llama4")
    with pytest.raises(LlamaMPError, match="--decoder compiled cannot run a quantized Llama 4"):
        make_plan(args, "tiny", 1, 80, quantize="int8", decoder="compiled")
    with pytest.raises(LlamaMPError, match="is already quantized"):
        build(dirs["int8"], tok_path, quantize="int4")


def test_plan_fits_scout_int4_on_one_80gb_card_and_maverick_quantized_on_eight():
    from llama_mp.runtime.footprint import GIB
    from llama_mp.tools.plan import make_plan

    scout, maverick = (load_preset(name)[0] for name in ("llama-4-scout-17b-16e", "llama-4-maverick-17b-128e"))
    one = make_plan(scout, "scout", 1, 80, quantize="int4")
    assert one["fits"] and 55 < one["per_rank"]["weights"] / GIB < 62  # 109B weights at 4.5 bits, embedding bf16
    assert not make_plan(scout, "scout", 1, 80, quantize="int8")["fits"]
    assert not make_plan(scout, "scout", 1, 80)["fits"]
    for mode, low, high in (("int8", 45, 52), ("int4", 25, 30)):  # 400B at 8 or 4.5 bits, over 8 ranks
        plan = make_plan(maverick, "maverick", 8, 80, quantize=mode)
        assert plan["fits"] and low < plan["per_rank"]["weights"] / GIB < high, (mode, plan["per_rank"])
    bf16 = make_plan(maverick, "maverick", 8, 80)
    assert not bf16["fits"] and {"mode": "int8"} in [o.get("quantization") for o in bf16["options"]]
