"""`llama-mp plan`: per-rank memory, a verdict, and what would fit instead."""

import json

import pytest

from llama_mp.checkpoints import layout
from llama_mp.errors import LlamaMPError
from llama_mp.checkpoints.params import load_preset
from llama_mp.tools.plan import CUDA_CONTEXT_BYTES, GIB, estimate, make_plan, plan_to_text
from llama_mp.cli.commands import plan as plan_command


def test_7b_bfloat16_does_not_fit_one_12gb_card_and_two_is_the_way_out():
    args, _ = load_preset("llama-2-7b")
    plan = make_plan(args, "llama-2-7b", gpus=1, gpu_mem_gb=12)
    assert plan["fits"] is False
    assert "weights alone need 12.55 GiB" in plan["reason"]
    assert {"change": "ranks", "ranks": 2} == {k: plan["options"][0][k] for k in ("change", "ranks")}
    two = make_plan(args, "llama-2-7b", gpus=2, gpu_mem_gb=12)
    assert two["fits"] is True and two["options"] == []
    assert two["per_rank"]["total"] <= 12 * GIB < plan["per_rank"]["total"]


def test_weights_and_kv_cache_follow_the_split():
    args, _ = load_preset("llama-2-70b")  # GQA: 8 kv heads
    one, eight = estimate(args, 1, "bfloat16", 4, 512), estimate(args, 8, "bfloat16", 4, 512)
    assert one.weights == 2 * args.parameter_count()
    embedding_rest = args.vocab_size * args.dim * 7 // 8
    assert eight.weights == 2 * (sum(map(_numel, layout.shard_shapes(args, 8).values())) + embedding_rest)
    # Only the rank's own kv heads: 2 (k and v) * layers * batch * seq * (8 / 8) * head_dim * 2 bytes.
    assert eight.kv_cache == 2 * 80 * 4 * 512 * 1 * 128 * 2 == one.kv_cache // 8
    assert eight.cuda_context == CUDA_CONTEXT_BYTES
    assert estimate(args, 8, "float32", 4, 512).weights == 2 * eight.weights


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def test_options_name_a_smaller_batch_sequence_or_dtype_that_fits():
    args, _ = load_preset("llama-2-13b")
    # float32 weights of 13B on 2 x 24 GiB do not fit, bfloat16 does.
    plan = make_plan(args, "llama-2-13b", gpus=2, gpu_mem_gb=24, dtype="float32")
    assert not plan["fits"] and {"change": "dtype", "dtype": "bfloat16"} in [
        {k: o[k] for k in ("change", "dtype")} for o in plan["options"] if o["change"] == "dtype"]
    # A long context for a large batch: a smaller batch or sequence fits on the same GPUs.
    plan = make_plan(args, "llama-2-13b", gpus=2, gpu_mem_gb=24, max_seq_len=4096, max_batch_size=16)
    changes = {o["change"]: o for o in plan["options"]}
    assert not plan["fits"] and {"batch", "seq", "ranks"} <= set(changes)
    assert make_plan(args, "x", 2, 24, max_seq_len=4096, max_batch_size=changes["batch"]["max_batch_size"])["fits"]
    assert not make_plan(args, "x", 2, 24, max_seq_len=4096, max_batch_size=changes["batch"]["max_batch_size"] + 1)["fits"]
    assert make_plan(args, "x", 2, 24, max_seq_len=changes["seq"]["max_seq_len"], max_batch_size=16)["fits"]


def test_plan_reads_a_checkpoint_folder(make_checkpoint, capsys):
    ckpt_dir, args, _ = make_checkpoint(shards=2)
    plan_command(gpus=4, gpu_mem_gb=2, ckpt_dir=ckpt_dir, json=True)
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["vocab_size"] == args.vocab_size and out["valid_gpu_counts"] == [1, 2, 4]
    assert out["fits"] is True


@pytest.mark.parametrize("kwargs,words", [
    (dict(gpus=3, gpu_mem_gb=24, model="llama-2-7b"), r"Valid GPU counts: \[1, 2, 4, 8"),
    (dict(gpus=1, gpu_mem_gb=24, model="llama-5"), "Unknown model preset"),
    (dict(gpus=1, gpu_mem_gb=24), "exactly one of"),
    (dict(gpus=1, gpu_mem_gb=-1, model="llama-7b"), "--gpu_mem_gb must be a positive"),
    (dict(gpus=1, gpu_mem_gb=24, model="llama-7b", dtype="int4"), "Unknown --dtype"),
])
def test_bad_input_is_an_error(kwargs, words):
    with pytest.raises(LlamaMPError, match=words):
        plan_command(**kwargs)


def test_command_line_prints_a_table_and_exits_zero_whether_or_not_it_fits(llama_mp_command):
    base = ["plan", "--model", "llama-2-7b", "--gpu_mem_gb", "12"]
    code, out, err = llama_mp_command(*base, "--gpus", "1")
    assert code == 0, err
    assert "Fits: NO" in out and "torchrun --nproc_per_node 2" in out
    code, out, _ = llama_mp_command(*base, "--gpus", "2", "--json")
    assert code == 0 and json.loads(out)["fits"] is True
    code, _, err = llama_mp_command(*base, "--gpus", "3")
    assert code == 2 and "Valid GPU counts" in err


def test_subcommand_options_are_checked_and_kept_as_typed(llama_mp_command):
    code, _, err = llama_mp_command("plan", "--model", "7", "--gpus", "1", "--gpu_mem_gb", "12")
    assert code == 2 and "Unknown model preset '7'" in err  # a name, not the number fire would make of it
    code, _, err = llama_mp_command("plan", "--modl", "llama-2-7b", "--gpus", "1", "--gpu_mem_gb", "12")
    assert code == 2 and "Unknown option --modl; did you mean --model?" in err


def test_a_model_too_big_for_its_largest_split_says_how_many_gpus_its_weights_fill():
    args, _ = load_preset("llama-3.1-405b")  # valid up to 64 ranks (kv heads replicated past 8)
    plan = make_plan(args, "llama-3.1-405b", 64, 8)
    need = plan["gpus_the_weights_need"]
    assert not plan["fits"] and plan["options"] == [] and need > 64
    text = plan_to_text(plan, as_json=False)
    assert f"fill at least {need} GPUs of this size, but the model splits over at most 64 ranks" in text
