"""Quantized models: loading a float checkpoint with `--quantize`, loading a folder `llama-mp quantize`
wrote, and what both compute.

The specification, in tests:
* quantizing while loading gives every rank exactly, bit for bit, the integers and scales it gets from
  the folder `llama-mp quantize` wrote, on 1, 2 and 4 ranks, whatever the shard counts;
* a quantized model computes the model its dequantised weights describe: logits and greedy ids equal
  the independent float32 reference (tests/reference.py) run on the dequantised state dict;
* every bad input is one clear error (all ranks non-zero), and a damaged scale tensor is caught;
* int4's scale search is never worse than plain round-to-nearest in groups of 32.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from llama_mp import Llama, distributed
from llama_mp.checkpoints import layout
from llama_mp.checkpoints import meta as checkpoint
from llama_mp.checkpoints.params import load_params
from llama_mp.checkpoints.quantize import QuantizingSlices, quantize_checkpoint
from llama_mp.errors import LlamaMPError, RemoteRankError
from llama_mp.quant.scheme import Scheme, dequantize, pack_int4, parse_scheme, quantize
from llama_mp.runtime.llama import quantize_scheme
from llama_mp.runtime.projection import QuantizedProjection
from multiproc import run_ranks
from reference import reference_greedy, reference_logits

# Shapes whose int4 groups of 32 stay whole on 1, 2 and 4 ranks: dim 128 and FFN 384 split 4 ways are
# 32 and 96 inputs. GQA (2 kv heads) so that wk/wv scales follow the kv rule too.
SHAPE = dict(dim=128, multiple_of=128, n_kv_heads=2)
PROMPT_TEXTS = ["The quick brown fox", "Once upon a time there was", "Model parallel"]
STEPS = 8


@pytest.fixture(scope="module")
def float_ckpt(make_checkpoint):
    return make_checkpoint(shards=2, **SHAPE)


@pytest.fixture(scope="module")
def quantized_dirs(float_ckpt, tmp_path_factory):
    """{mode: folder}: the float checkpoint quantized by the tool, int8 into 1 shard and int4 into 2."""
    src = float_ckpt[0]
    out = {}
    for mode, mp in (("int8", 1), ("int4", 2)):
        dst = str(tmp_path_factory.mktemp("q") / mode)
        quantize_checkpoint(src, dst, mode, mp=mp, progress=False)
        out[mode] = dst
    return out


def dequantized_state(ckpt_dir):
    """The whole model a quantized folder stands for, float32 (the reference's input)."""
    args, state = checkpoint.load_rank_state_dict(ckpt_dir, load_params(ckpt_dir), 0, 1)
    whole = {}
    for key, t in state.items():
        scheme = layout.scheme_of(key, args)
        if key.endswith(".scales"):
            continue
        whole[key] = t.float() if scheme is None else dequantize(t, state[key[:-len(".weight")] + ".scales"], scheme)
    return args, whole


# ----------------------------------------------------------------------------------------------
# Functions run on each rank (module level, for spawn)


def build(ckpt_dir, tokenizer_path, quantize=None, group_size=None, dtype="float32"):
    return Llama.build(ckpt_dir, tokenizer_path, 64, len(PROMPT_TEXTS), dtype=dtype, decoder="pytorch",
                       backend="gloo", device="cpu", quantize=quantize, group_size=group_size)


def rank_results(cases, tokenizer_path):
    """Per (ckpt_dir, quantize, group_size) case: this rank's quantized tensors, logits of the first
    prompt at every position (rank 0; None elsewhere) and greedy ids of every prompt."""
    out = []
    for ckpt_dir, mode, group_size in cases:
        llama = build(ckpt_dir, tokenizer_path, mode, group_size)
        prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPT_TEXTS]
        tensors = {k: v.clone() for k, v in llama.model.state_dict().items()
                   if layout.scheme_of(k, llama.model.args) is not None}
        with torch.inference_mode():
            logits = llama.model(torch.tensor([prompts[0]]), 0, all_positions=True)
        ids, _ = llama.generate(prompts, STEPS, temperature=0.0)
        out.append((tensors, None if logits is None else logits[0], ids, prompts))
    return as_bytes(out)


def as_bytes(value):
    """`value` saved by torch: tensors cross from a spawned rank as plain bytes (a tensor put on the queue
    would be shared memory that ends with the rank)."""
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def from_bytes(data):
    import io

    return torch.load(io.BytesIO(data), weights_only=True)


def load_error(ckpt_dir, tokenizer_path, quantize=None):
    """The error a rank ends with when loading fails: (its class name, its first sentence)."""
    try:
        build(ckpt_dir, tokenizer_path, quantize)
    except (LlamaMPError, RemoteRankError) as e:
        return type(e).__name__, str(e)
    return None


def in_process(fn, *args):
    """Run a one-rank job in this process (and leave no process group behind)."""
    try:
        return fn(*args)
    finally:
        distributed.teardown()


CASE_SCHEMES = ["int8", "int8", "int4", "int4"]  # of `cases_for`'s cases, in order


def check_against_reference(results, quantized_dirs, cases):
    reference = {}  # per scheme: the reference's logits and greedy ids, computed once
    for (ckpt_dir, mode, _), scheme, (_, logits, ids, prompts) in zip(cases, CASE_SCHEMES, results[0]):
        if scheme not in reference:
            args, whole = dequantized_state(quantized_dirs[scheme])
            reference[scheme] = (reference_logits(whole, args, prompts[0]),
                                 [reference_greedy(whole, args, p, STEPS) for p in prompts])
        torch.testing.assert_close(logits, reference[scheme][0], rtol=1e-4, atol=1e-4)
        assert ids == reference[scheme][1], (ckpt_dir, mode)


def cases_for(float_ckpt, quantized_dirs):
    """Each scheme twice: the tool's folder as it is, and the float checkpoint quantized while loading."""
    src = float_ckpt[0]
    return [(quantized_dirs["int8"], None, None), (src, "int8", None),
            (quantized_dirs["int4"], None, None), (src, "int4", 32)]


def check_load_time_equals_folder(per_rank, cases):
    for rank_out in per_rank:
        for folder_case, loaded_case in ((0, 1), (2, 3)):
            folder, on_the_fly = rank_out[folder_case][0], rank_out[loaded_case][0]
            assert folder.keys() == on_the_fly.keys()
            for key in folder:
                assert folder[key].dtype == on_the_fly[key].dtype, key
                assert torch.equal(folder[key], on_the_fly[key]), (cases[loaded_case], key)


def test_one_rank_quantized_model_equals_the_reference_and_the_folder(float_ckpt, quantized_dirs, tokenizer_path):
    cases = cases_for(float_ckpt, quantized_dirs)
    results = [from_bytes(in_process(rank_results, cases, tokenizer_path))]
    check_load_time_equals_folder(results, cases)
    check_against_reference(results, quantized_dirs, cases)


@pytest.mark.spawn
@pytest.mark.parametrize("world_size", [2, 4])
def test_several_ranks_quantized_model_equals_the_reference_and_the_folder(float_ckpt, quantized_dirs,
                                                                           tokenizer_path, world_size):
    cases = cases_for(float_ckpt, quantized_dirs)
    results = [from_bytes(r) for r in run_ranks(world_size, rank_results, cases, tokenizer_path)]
    check_load_time_equals_folder(results, cases)
    check_against_reference(results, quantized_dirs, cases)
    for rank_out in results[1:]:  # every rank generated the same
        assert [c[2] for c in rank_out] == [c[2] for c in results[0]]


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_rank_slice_quantized_on_the_fly_equals_the_folders_slice(float_ckpt, quantized_dirs, mode, world_size):
    src = float_ckpt[0]
    scheme = load_params(quantized_dirs[mode]).scheme
    for rank in range(world_size):
        _, stored = checkpoint.load_rank_state_dict(quantized_dirs[mode], load_params(quantized_dirs[mode]), rank,
                                                    world_size)
        slices = QuantizingSlices(src, load_params(src), rank, world_size, scheme)
        assert slices.keys() == list(stored)
        for key in slices.keys():
            got = slices.tensor(key)
            assert got.dtype == stored[key].dtype and torch.equal(got, stored[key]), (rank, key)


def test_the_quantized_model_holds_integers_and_scales_only_where_the_design_says(float_ckpt, tokenizer_path):
    llama = in_process(build, float_ckpt[0], tokenizer_path, "int4", 64, "bfloat16")
    state, args = llama.model.state_dict(), llama.model.args
    assert args.scheme == Scheme("int4", 64)
    assert state["layers.1.feed_forward.w2.weight"].dtype == torch.uint8
    assert state["layers.1.feed_forward.w2.scales"].dtype == torch.bfloat16
    assert state["layers.1.feed_forward.w2.scales"].shape == (128, 384 // 64)
    assert state["output.weight"].dtype == torch.int8 and state["output.scales"].dtype == torch.float32
    for key in ("tok_embeddings.weight", "norm.weight", "layers.0.attention_norm.weight"):
        assert state[key].dtype == torch.bfloat16, key


def test_random_model_with_a_scheme_draws_quantized_weights(tokenizer):
    from llama_mp.checkpoints.params import ModelArgs
    from llama_mp.runtime.decode import Decoder
    from llama_mp.runtime.loading import random_model

    args = ModelArgs(dim=128, n_layers=1, n_heads=4, multiple_of=128, vocab_size=tokenizer.n_words)

    def make():
        group = distributed.setup("gloo", "cpu")
        model = random_model(args, group, torch.float32, Decoder(), 1, 16, scheme=Scheme("int4", 32))
        model.share_embedding()
        with torch.inference_mode():
            return model, model(torch.tensor([[1, 2, 3]]), 0)

    model, logits = in_process(make)
    assert model.state_dict()["layers.0.attention.wq.weight"].dtype == torch.uint8
    assert logits.shape == (1, tokenizer.n_words) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------
# The quantized projection's own arithmetic


@pytest.mark.parametrize("scheme", [Scheme("int8"), Scheme("int4", 32), Scheme("int4", 128)])
@pytest.mark.parametrize("dtype,rows", [(torch.float32, 1), (torch.float32, 5), (torch.bfloat16, 1), (torch.bfloat16, 5)])
def test_quantized_projection_multiplies_by_the_dequantised_matrix(scheme, dtype, rows):
    g = torch.Generator().manual_seed(3)
    holders = [torch.nn.Module(), torch.nn.Module()]
    weights = [torch.randn(48, 256, generator=g) / 16, torch.randn(16, 256, generator=g) / 16]
    for h, w in zip(holders, weights):
        h.weight = torch.nn.Parameter(torch.empty(w.shape, device="meta"), requires_grad=False)
    proj = QuantizedProjection(holders, dtype, torch.device("cpu"), scheme)
    for h, w in zip(holders, weights):
        q, s = quantize(w, scheme)
        h.weight.data.copy_(q)
        h.scales.data.copy_(s)
    x = torch.randn(rows, 256, generator=g).to(dtype)
    expected = F.linear(x.float(), dequantize(proj.storage, proj.scales, scheme))
    # float32: float32 rounding of the sums; bfloat16 activations: the result's bfloat16 rounding.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(proj(x).float(), expected, **tol)


# ----------------------------------------------------------------------------------------------
# int4's scale search


def rtn_int4_error(w, group=32):
    groups = w.view(w.shape[0], -1, group)
    scale = (groups.abs().amax(-1) / 7).to(torch.bfloat16).float()
    q = torch.round(groups / torch.where(scale > 0, scale, 1.0)[..., None]).clamp(-8, 7)
    return ((q * scale[..., None] - groups) ** 2).sum()


@pytest.mark.parametrize("kind", ["normal", "outliers", "uniform", "zeros_and_constants"])
def test_int4_is_never_worse_than_round_to_nearest_in_groups_of_32(kind):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=g)
    if kind == "outliers":
        w[torch.rand(w.shape, generator=g) < 0.01] *= 20
    elif kind == "uniform":
        w = torch.rand(64, 256, generator=g) * 2 - 1
    elif kind == "zeros_and_constants":
        w[:8] = 0
        w[8:16] = 0.5
    scheme = Scheme("int4", 32)
    q, scales = quantize(w, scheme)
    ours = ((dequantize(q, scales, scheme) - w) ** 2).sum()
    assert ours <= rtn_int4_error(w)
    if kind in ("normal", "outliers"):
        assert ours < 0.97 * rtn_int4_error(w)  # and the search pays off on real-looking weights


def test_int4_packing_layout_is_the_documented_one():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2).view(1, 32)  # inputs 0..31
    packed = pack_int4(q)
    assert packed.shape == (1, 16)
    assert int(packed[0, 3]) == (q[0, 3] + 8) | ((q[0, 19] + 8) << 4)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear message each


@pytest.mark.parametrize("quantize,group_size,says", [
    ("int3", None, "not a quantization mode"),
    ("int4", 48, "not supported for int4"),
    ("int8", 32, "applies to int4 only"),
    (None, 64, "add --quantize int4"),
])
def test_bad_quantize_options_are_refused_before_loading(quantize, group_size, says):
    with pytest.raises(LlamaMPError, match=says):
        quantize_scheme(quantize, group_size)


def test_launcher_options_are_checked_before_anything_runs(monkeypatch, capsys, tmp_path):
    import sys

    from llama_mp.cli.completion import text_completion
    from llama_mp.cli.runner import run

    monkeypatch.setattr(sys, "argv", ["text_completion.py", "--ckpt_dir", str(tmp_path), "--tokenizer_path",
                                      str(tmp_path / "t.model"), "--quantize", "int8", "--group_size", "64"])
    with pytest.raises(SystemExit) as ended:
        run(text_completion)
    assert ended.value.code != 0
    assert "applies to int4 only" in capsys.readouterr().err


def test_launchers_quantize_while_loading(monkeypatch, capsys, float_ckpt, quantized_dirs, tokenizer_path):
    """text_completion --quantize int4 prints what the tool's folder, loaded without --quantize, prints."""
    import sys

    from llama_mp.cli.completion import text_completion
    from llama_mp.cli.runner import run

    outputs = []
    for ckpt_dir, extra in ((float_ckpt[0], ["--quantize", "int4", "--group_size", "32"]),
                            (quantized_dirs["int4"], [])):
        monkeypatch.setattr(sys, "argv", ["text_completion.py", "--ckpt_dir", ckpt_dir, "--tokenizer_path",
                                          tokenizer_path, "--prompts", PROMPT_TEXTS[0], "--temperature", "0",
                                          "--max_gen_len", "6", "--json", "--decoder", "pytorch", "--backend",
                                          "gloo", "--device", "cpu", *extra])
        with pytest.raises(SystemExit) as ended:
            run(text_completion)
        captured = capsys.readouterr()
        assert ended.value.code == 0, captured.err
        assert "weights int4 in groups of 32" in captured.err
        outputs.append(json.loads(captured.out)["token_ids"])
    assert outputs[0] == outputs[1] and len(outputs[0]) > 0


def test_quantize_on_an_already_quantized_folder_is_refused(quantized_dirs, tokenizer_path):
    with pytest.raises(LlamaMPError, match="already quantized"):
        in_process(build, quantized_dirs["int8"], tokenizer_path, "int4")


def test_a_group_that_does_not_divide_the_rows_is_refused(make_checkpoint, tokenizer_path):
    src, _, _ = make_checkpoint(shards=1)  # dim 64: groups of 128 cannot cut it
    with pytest.raises(LlamaMPError, match="groups of 128 do not divide the model's dim 64"):
        in_process(build, src, tokenizer_path, "int4", 128)


def test_a_rank_count_that_splits_int4_groups_is_refused_with_the_valid_counts(make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=1)  # dim 64 over 4 ranks: 16 inputs of wo per rank
    with pytest.raises(LlamaMPError, match=r"whole groups of 32. Valid process counts: \[1, 2\]"):
        QuantizingSlices(src, load_params(src), 0, 4, Scheme("int4", 32))
    dst = str(tmp_path / "q")
    quantize_checkpoint(src, dst, "int4", progress=False)
    with pytest.raises(LlamaMPError, match=r"whole groups of 32. Valid process counts: \[1, 2\]"):
        checkpoint.RankSlices(dst, load_params(dst), 0, 4)


def damaged_copy(src_dir, dst_dir, shard, key, change):
    """A copy of quantized folder `src_dir` whose `key` in shard `shard` went through `change`."""
    import shutil

    shutil.copytree(src_dir, dst_dir)
    path = os.path.join(dst_dir, checkpoint.shard_name(shard))
    sd = torch.load(path, weights_only=True)
    sd[key] = change(sd[key])
    torch.save(sd, path)
    return dst_dir


def set_first(value):
    def change(t):
        t = t.clone()
        t.view(-1)[0] = value
        return t
    return change


@pytest.mark.parametrize("change,says", [
    (set_first(float("nan")), "NaN, infinite or negative"),
    (set_first(float("inf")), "NaN, infinite or negative"),
    (set_first(-1.0), "NaN, infinite or negative"),
    (lambda t: t.half(), "is float16, but int4 in groups of 32 checkpoints store it as bfloat16"),
    (lambda t: t[:, :1].clone(), "layers.1.attention.wo.scales has shape"),
])
def test_damaged_scales_are_one_clear_error(quantized_dirs, tokenizer_path, tmp_path, change, says):
    bad = damaged_copy(quantized_dirs["int4"], str(tmp_path / "bad"), 0, "layers.1.attention.wo.scales", change)
    with pytest.raises(LlamaMPError, match=says):
        in_process(build, bad, tokenizer_path)


@pytest.mark.spawn
def test_a_damaged_scale_on_one_rank_stops_every_rank(quantized_dirs, tokenizer_path, tmp_path):
    bad = damaged_copy(quantized_dirs["int4"], str(tmp_path / "bad"), 1, "layers.0.feed_forward.w1.scales",
                       set_first(float("nan")))
    results = run_ranks(2, load_error, bad, tokenizer_path)
    assert results[1][0] == "LlamaMPError" and "layers.0.feed_forward.w1.scales holds 1 scale(s)" in results[1][1]
    assert results[0][0] == "RemoteRankError"  # rank 0's shard is sound; it stops too, and says who failed


def test_params_record_is_parsed_strictly(quantized_dirs):
    path = os.path.join(quantized_dirs["int4"], "params.json")
    with open(path) as f:
        raw = json.load(f)
    assert raw["quantization"] == {"mode": "int4", "group_size": 32}
    from llama_mp.checkpoints.params import parse_params

    assert parse_params(raw).scheme == parse_scheme("int4", 32)
    assert parse_params(raw).to_json_dict() == raw
    for bad in ({"mode": "int5"}, {"mode": "int4", "group_size": 24}, {"mode": "int8", "group_size": 32},
                "int4", {"mode": "int4", "bits": 4}):
        with pytest.raises(LlamaMPError, match="quantization"):
            parse_params({**raw, "quantization": bad})
