"""The tools on quantized checkpoints: `llama-mp quantize`, `verify`, `reshard`, `convert` and `plan`.

* quantize writes a complete Meta-layout folder (scales beside the weights, the scheme in params.json,
  tokenizer.model, checklist.chk) that verify accepts, all or nothing;
* reshard moves quantized tensors exactly (int4 groups never straddle shards); convert refuses them;
* plan counts bytes per weight from the scheme, and its answers for real models come out true.
"""

import json
import os

import pytest
import torch

from llama_mp.checkpoints import layout
from llama_mp.checkpoints import meta as checkpoint
from llama_mp.checkpoints.params import load_params, load_preset
from llama_mp.quant.scheme import Scheme, dequantize
from llama_mp.tools.plan import make_plan

SHAPE = dict(dim=128, multiple_of=128, n_kv_heads=2)


def merged(ckpt_dir):
    """The whole model of a checkpoint folder, as stored (integers stay integers)."""
    return checkpoint.load_rank_state_dict(ckpt_dir, load_params(ckpt_dir), 0, 1)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """A float checkpoint with its tokenizer.model, as `llama-mp synth` writes it (2 shards)."""
    from llama_mp.cli.commands import synth

    out = str(tmp_path_factory.mktemp("synth") / "float")
    synth(out, mp=2, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=128)
    return out


@pytest.mark.parametrize("mode,extra,scheme", [("int8", [], Scheme("int8")),
                                               ("int4", ["--group_size", "64"], Scheme("int4", 64))])
def test_quantize_writes_a_complete_quantized_folder(llama_mp_command, synth_dir, tmp_path, mode, extra, scheme):
    dst = str(tmp_path / "q")
    code, out, err = llama_mp_command("quantize", synth_dir, dst, "--mode", mode, *extra)
    assert code == 0, err
    assert f"wrote {dst}: 2 shard(s)" in out
    assert sorted(os.listdir(dst)) == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json",
                                       "tokenizer.model"]
    with open(os.path.join(dst, "params.json")) as f:
        params = json.load(f)
    with open(os.path.join(synth_dir, "params.json")) as f:
        assert params == {**json.load(f), "quantization": scheme.to_json()}
    code, out, _ = llama_mp_command("verify", dst, "--quiet")
    assert code == 0 and out.startswith("OK"), out

    args, stored = merged(dst)
    _, original = merged(synth_dir)
    assert set(stored) == set(layout.full_shapes(args))
    for key, whole in original.items():
        kind = layout.scheme_of(key, args)
        if kind is None:  # embedding and norms: as they were
            assert torch.equal(stored[key], whole), key
            continue
        assert kind == (scheme if key != "output.weight" else Scheme("int8")), key
        assert stored[key].dtype == kind.weight_dtype and stored[key].shape == kind.weight_shape(*whole.shape)
        scales = stored[key[:-len(".weight")] + ".scales"]
        assert scales.dtype == kind.scale_dtype and scales.shape == kind.scale_shape(*whole.shape)
        back = dequantize(stored[key], scales, kind)
        if kind.mode == "int8":  # round to nearest within the row's range: at most half a step off
            assert ((back - whole).abs() <= scales[:, None] / 2 + 1e-7).all(), key
        else:  # int4 may clip a group's extreme to gain elsewhere: judge the whole tensor
            assert (back - whole).norm() < 0.15 * whole.norm(), key


def test_quantize_refuses_bad_input_and_leaves_nothing_behind(llama_mp_command, make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=1)  # dim 64, FFN 192
    dst = str(tmp_path / "q")
    for argv, says in [
        (["--mode", "int3"], "--mode 'int3' is not a quantization mode; use one of int8, int4"),
        (["--mode", "int4", "--group_size", "48"], "--group_size 48 is not supported for int4"),
        (["--mode", "int8", "--group_size", "32"], "--group_size 32 applies to int4 only"),
        (["--mode", "int4", "--group_size", "128"], "int4 groups of 128 do not divide the model's dim 64"),
        (["--mode", "int4", "--mp", "4"], "must also be whole groups of 32. Valid shard counts: [1, 2]"),
    ]:
        code, _, err = llama_mp_command("quantize", src, dst, *argv)
        assert code == 2 and says in " ".join(err.split()), (argv, err)
        assert not os.path.exists(dst), argv
    assert llama_mp_command("quantize", src, dst, "--mode", "int8")[0] == 0
    code, _, err = llama_mp_command("quantize", dst, str(tmp_path / "again"), "--mode", "int4")
    assert code == 2 and "is already quantized (int8 per output channel" in err
    assert not os.path.exists(tmp_path / "again")


def test_reshard_moves_quantized_tensors_exactly(llama_mp_command, synth_dir, tmp_path):
    q2, q1, q4 = (str(tmp_path / name) for name in ("q2", "q1", "q4"))
    assert llama_mp_command("quantize", synth_dir, q2, "--mode", "int4")[0] == 0
    assert llama_mp_command("reshard", q2, q1, "--mp", "1")[0] == 0
    assert llama_mp_command("reshard", q1, q4, "--mp", "4")[0] == 0
    for out in (q1, q4):
        assert llama_mp_command("verify", out, "--quiet")[0] == 0
    (_, a), (_, b), (_, c) = merged(q2), merged(q1), merged(q4)
    for key in a:
        assert a[key].dtype == b[key].dtype == c[key].dtype and torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    # every shard of q4 is what the 2-shard folder quantized straight into 4 would hold
    direct = str(tmp_path / "direct4")
    assert llama_mp_command("quantize", synth_dir, direct, "--mode", "int4", "--mp", "4")[0] == 0
    for i in range(4):
        x, y = (checkpoint.load_shard(os.path.join(d, checkpoint.shard_name(i))) for d in (q4, direct))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_reshard_of_quantized_folders_refuses_splits_of_groups_and_dtype_changes(llama_mp_command, make_checkpoint,
                                                                               tmp_path):
    src, _, _ = make_checkpoint(shards=1)  # dim 64
    q = str(tmp_path / "q")
    assert llama_mp_command("quantize", src, q, "--mode", "int4")[0] == 0
    code, _, err = llama_mp_command("reshard", q, str(tmp_path / "r4"), "--mp", "4")
    assert code == 2 and "whole groups of 32. Valid shard counts: [1, 2]" in " ".join(err.split())
    code, _, err = llama_mp_command("reshard", q, str(tmp_path / "bf"), "--mp", "1", "--dtype", "bfloat16")
    assert code == 2 and "--dtype bfloat16 converts float weights" in err
    assert not os.path.exists(tmp_path / "r4") and not os.path.exists(tmp_path / "bf")


def test_convert_refuses_a_quantized_source(llama_mp_command, make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=1)
    q = str(tmp_path / "q")
    assert llama_mp_command("quantize", src, q, "--mode", "int8")[0] == 0
    code, _, err = llama_mp_command("convert", q, str(tmp_path / "hf"), "--to", "hf")
    assert code == 2 and "is a quantized checkpoint (int8 per output channel" in err
    assert not os.path.exists(tmp_path / "hf")


def test_verify_lists_damaged_scales_and_wrong_dtypes(llama_mp_command, make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=2, **SHAPE)
    q = str(tmp_path / "q")
    assert llama_mp_command("quantize", src, q, "--mode", "int4")[0] == 0
    path = os.path.join(q, checkpoint.shard_name(1))
    sd = torch.load(path, weights_only=True)
    sd["layers.0.attention.wk.scales"][0, 0] = float("nan")
    sd["layers.1.feed_forward.w1.weight"] = sd["layers.1.feed_forward.w1.weight"].float()
    sd["layers.1.attention.wo.scales"] = sd["layers.1.attention.wo.scales"].float()
    torch.save(sd, path)
    code, out, _ = llama_mp_command("verify", q, "--quiet")
    assert code == 2
    assert "consolidated.01.pth: layers.0.attention.wk.scales holds 1 scale(s) that are NaN, infinite or negative" in out
    assert ("consolidated.01.pth: layers.1.feed_forward.w1.weight is float32, but int4 in groups of 32 checkpoints "
            "store it as uint8") in out
    assert "layers.1.attention.wo.scales is float32, but int4 in groups of 32 checkpoints store it as bfloat16" in out


def test_integers_outside_a_quantized_checkpoint_are_still_refused(make_checkpoint, tmp_path):
    from llama_mp.checkpoints.reshard import save_consolidated
    from llama_mp.errors import LlamaMPError

    _, args, state = make_checkpoint(shards=1)
    bad = dict(state, **{"layers.0.attention.wq.weight": state["layers.0.attention.wq.weight"].to(torch.int8)})
    save_consolidated(str(tmp_path / "bad"), args, bad, 1)
    with pytest.raises(LlamaMPError, match="wq.weight is int8, not a floating-point weight.*llama-mp quantize"):
        checkpoint.RankSlices(str(tmp_path / "bad"), load_params(str(tmp_path / "bad")), 0, 1)


# ----------------------------------------------------------------------------------------------
# plan


@pytest.mark.parametrize("model,gpus,gpu_mem_gb,fits_with,does_not_fit_with", [
    ("llama-2-7b", 1, 12, {"quantize": "int8"}, {}),                 # bf16: 12.6 GiB of weights alone
    ("llama-2-13b", 1, 12, {"quantize": "int4"}, {"quantize": "int8"}),
    ("llama-2-70b", 2, 24, {"quantize": "int4"}, {"quantize": "int8"}),
    ("llama-3.1-405b", 8, 80, {"quantize": "int8"}, {}),             # bf16 needs 16 such GPUs
])
def test_plan_answers_for_real_models(model, gpus, gpu_mem_gb, fits_with, does_not_fit_with):
    args = load_preset(model)[0]
    yes = make_plan(args, model, gpus, gpu_mem_gb, **fits_with)
    no = make_plan(args, model, gpus, gpu_mem_gb, **does_not_fit_with)
    assert yes["fits"] and not no["fits"], (yes["reason"], no["reason"])
    if not does_not_fit_with:  # a float model that does not fit is told which quantization would
        assert {"change": "quantize", "quantization": {"mode": "int8"}} in [
            {k: v for k, v in o.items() if k != "total_bytes"} for o in no["options"]]


def test_plan_counts_bytes_per_weight_from_the_scheme():
    args = load_preset("llama-2-7b")[0]
    d, h, n, vocab = 4096, 11008, 32, 32000
    linears = n * (4 * d * d + 3 * d * h)           # wq wk wv wo w1 w2 w3 (no GQA in 7B)
    rows = n * (5 * d + 2 * h)                       # their output rows
    output = vocab * d + vocab * 4                   # int8 in both modes, a float32 scale per row
    float_part = 2 * (vocab * d + n * 2 * d + d)     # embedding and norms in bfloat16
    assert make_plan(args, "m", 1, 80, quantize="int8")["per_rank"]["weights"] == linears + 4 * rows + output + float_part
    assert make_plan(args, "m", 1, 80, quantize="int4")["per_rank"]["weights"] == \
        linears // 2 + 2 * linears // 32 + output + float_part
    assert make_plan(args, "m", 1, 80, quantize="int4", group_size=128)["per_rank"]["weights"] == \
        linears // 2 + 2 * linears // 128 + output + float_part


def test_plan_of_a_quantized_folder_and_plan_options(llama_mp_command, make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=1, **SHAPE)
    q = str(tmp_path / "q")
    assert llama_mp_command("quantize", src, q, "--mode", "int4")[0] == 0
    code, out, _ = llama_mp_command("plan", "--ckpt_dir", q, "--gpus", "1", "--gpu_mem_gb", "8", "--json")
    planned = json.loads(out)
    assert code == 0 and planned["quantization"] == {"mode": "int4", "group_size": 32}
    code, out, _ = llama_mp_command("plan", "--ckpt_dir", src, "--gpus", "1", "--gpu_mem_gb", "8", "--json",
                                    "--quantize", "int4")
    assert code == 0 and json.loads(out)["per_rank"] == planned["per_rank"]
    code, _, err = llama_mp_command("plan", "--ckpt_dir", q, "--gpus", "1", "--gpu_mem_gb", "8", "--quantize", "int8")
    assert code == 2 and "already quantized" in err
    code, _, err = llama_mp_command("plan", "--model", "llama-2-7b", "--gpus", "1", "--gpu_mem_gb", "12",
                                    "--quantize", "int4", "--group_size", "96")
    assert code == 2 and "--group_size 96 is not supported for int4" in err
    code, out, _ = llama_mp_command("plan", "--model", "llama-2-7b", "--gpus", "1", "--gpu_mem_gb", "12")
    assert "Fits: NO" in out and "--quantize int8" in out
    code, out, _ = llama_mp_command("plan", "--model", "llama-2-7b", "--gpus", "1", "--gpu_mem_gb", "12",
                                    "--quantize", "int8")
    assert "Fits: YES" in out and "int8 per output channel layer weights, output int8" in out
