"""More ranks than kv heads (Llama 3.1 405B, 8 kv heads, on 2 nodes x 8 GPUs): wk and wv are cut by kv
head and each head is held by N / n_kv_heads neighbouring ranks, and by as many shards in a checkpoint
written that way (Meta's MP16 layout). Every tool reads and writes that layout, and the model computes
the same thing on any valid rank count."""

import json

import numpy as np
import pytest
import torch

from llama_mp.checkpoints import layout, meta as checkpoint
from llama_mp.checkpoints.params import load_preset
from llama_mp.checkpoints.reshard import reshard
from llama_mp.checkpoints.verify import verify_checkpoint
from llama_mp.errors import LlamaMPError
from multiproc import run_ranks
from workers import logits_and_greedy, prompt_ids

GQA = dict(n_kv_heads=2)  # 4 query heads, 2 kv heads: 4 ranks or shards replicate each kv head twice
MQA = dict(n_kv_heads=1)


def test_405b_splits_over_16_ranks_with_one_kv_head_each_shared_by_two():
    args, _ = load_preset("llama-3.1-405b")
    assert 16 in layout.valid_world_sizes(args) and 8 in layout.valid_world_sizes(args)
    shapes = layout.shard_shapes(args, 16)
    assert shapes["layers.0.attention.wk.weight"] == (128, 16384)  # one whole kv head
    assert shapes["layers.0.attention.wq.weight"] == (1024, 16384)  # 8 query heads, all of which use it
    assert layout.local_kv_heads(args, 16) == 1 and layout.local_kv_heads(args, 4) == 2
    assert [layout.pieces("layers.3.attention.wv.weight", args, 16, r) for r in (0, 1, 2, 15)] == \
        [(8, 0), (8, 0), (8, 1), (8, 7)]
    assert layout.pieces("layers.3.attention.wq.weight", args, 16, 5) == (16, 5)


def test_a_count_that_neither_divides_nor_is_a_multiple_of_the_kv_heads_is_refused():
    args, _ = load_preset("llama-2-70b")  # 64 heads, 8 kv heads
    assert 16 in layout.valid_world_sizes(args) and 32 in layout.valid_world_sizes(args)
    with pytest.raises(LlamaMPError, match="multiple of it"):
        layout.require_split(args, 12, "Llama 2 70B", "process")  # divides 64 heads, but 12 ∤ 8 and 8 ∤ 12


def test_split_and_merge_round_trip_through_replicated_heads(make_checkpoint):
    _, args, full = make_checkpoint(**GQA)
    key = "layers.1.attention.wk.weight"
    shards = [layout.split(key, full[key], args, 4, i) for i in range(4)]
    heads = full[key].chunk(2)
    assert [torch.equal(s, heads[i // 2]) for i, s in enumerate(shards)] == [True] * 4
    assert torch.equal(layout.merge(key, shards, args), full[key])
    assert [layout.first_replica(key, args, 4, i) for i in range(4)] == [0, 0, 2, 2]


@pytest.mark.parametrize("num_shards,world_size", [(1, 4), (4, 1), (4, 2), (2, 4), (4, 4)])
def test_every_rank_reads_exactly_its_split_from_a_replicated_or_plain_checkpoint(make_checkpoint, num_shards,
                                                                                   world_size):
    ckpt_dir, args, full = make_checkpoint(shards=num_shards, **GQA)
    for rank in range(world_size):
        _, state = checkpoint.load_rank_state_dict(ckpt_dir, args, rank, world_size)
        for key, whole in full.items():
            assert torch.equal(state[key], layout.split(key, whole, args, world_size, rank)), (key, rank)


@pytest.mark.spawn
def test_4_ranks_compute_what_1_rank_does_with_2_kv_heads_and_with_1(make_checkpoint, tokenizer_path):
    prompts = prompt_ids(tokenizer_path)
    cases = [make_checkpoint(shards=4, **GQA)[0], make_checkpoint(shards=1, **MQA)[0]]
    one = logits_and_greedy(cases, tokenizer_path, prompts, 6)
    four = run_ranks(4, logits_and_greedy, cases, tokenizer_path, prompts, 6)
    for case, (logits, ids) in enumerate(one):
        assert all(rank[case][1] == ids for rank in four)
        np.testing.assert_allclose(four[0][case][0], logits, rtol=0, atol=2e-5)


def test_reshard_writes_and_reads_replicated_heads_bit_for_bit(make_checkpoint, tmp_path):
    src, args, full = make_checkpoint(shards=1, **GQA)
    four, back = str(tmp_path / "mp4"), str(tmp_path / "mp1")
    reshard(src, four, 4, progress=False)
    reshard(four, back, 1, progress=False)
    shards = [torch.load(f"{four}/consolidated.{i:02d}.pth") for i in range(4)]
    key = "layers.0.attention.wv.weight"
    assert torch.equal(shards[2][key], shards[3][key]) and torch.equal(shards[2][key], full[key].chunk(2)[1])
    restored = torch.load(f"{back}/consolidated.00.pth")
    assert all(torch.equal(restored[k], v) for k, v in full.items())
    assert verify_checkpoint(four, progress=False) == []


def test_verify_names_a_replica_that_differs_from_its_twin(make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=1, **GQA)
    out = str(tmp_path / "mp4")
    reshard(src, out, 4, progress=False)
    path = f"{out}/consolidated.03.pth"
    shard = torch.load(path)
    shard["layers.1.attention.wk.weight"] = shard["layers.1.attention.wk.weight"] + 1
    torch.save(shard, path)
    problems = verify_checkpoint(out, progress=False)
    assert any("consolidated.03.pth: layers.1.attention.wk.weight should repeat the kv head of "
               "consolidated.02.pth" in p for p in problems), problems


def test_plan_puts_405b_on_two_nodes_of_eight(llama_mp_command):
    code, out, err = llama_mp_command("plan", "--model", "llama-3.1-405b", "--gpus", 16, "--gpu_mem_gb", 80,
                                      "--max_batch_size", 1)
    assert code == 0, err
    assert "Fits: YES" in out and "1 of 8 kv heads per rank, each shared by 2 ranks" in out
    code, out, _ = llama_mp_command("plan", "--model", "llama-3.1-405b", "--gpus", 8, "--gpu_mem_gb", 80,
                                    "--json")
    plan = json.loads(out)
    assert not plan["fits"] and {"change": "ranks", "ranks": 16} in [
        {k: o[k] for k in ("change", "ranks")} for o in plan["options"] if o["change"] == "ranks"]
