"""Load-time resharding: any checkpoint on any valid number of processes.

A rank of an N-way job assembles exactly `layout.split(key, whole, args, N, rank)` of every tensor from the
K shards on disk, opening only the shards that overlap its slice; the model it runs is the same model,
so greedy generation gives the same tokens as with N == K.
"""

import os

import pytest
import torch

from llama_mp.checkpoints import layout, meta as checkpoint
from llama_mp.errors import LlamaMPError
from llama_mp.checkpoints.params import load_params
from multiproc import on_ranks, run_ranks
from workers import greedy_ids

GQA = dict(n_kv_heads=2)


@pytest.mark.parametrize("num_shards,world_size", [(2, 1), (1, 2), (2, 4), (4, 2), (4, 1), (2, 3), (3, 2), (4, 6), (6, 4), (3, 3)])
def test_rank_share_equals_split_of_the_whole_tensor(num_shards, world_size):
    whole = torch.arange(12 * 5 * 2, dtype=torch.float32).reshape(12, 5 * 2).repeat(1, 6)  # 12 x 60
    for dim in (0, 1):
        pieces = list(whole.chunk(num_shards, dim))
        for rank in range(world_size):
            needed = checkpoint.overlapping_shards(rank, world_size, num_shards)
            got = checkpoint.joined(dim, checkpoint.rank_pieces({k: pieces[k] for k in needed}, dim, num_shards, rank, world_size))
            assert torch.equal(got, whole.chunk(world_size, dim)[rank]), (dim, rank)


@pytest.mark.parametrize("num_shards,world_size,kv", [(2, 1, None), (1, 2, None), (2, 4, None), (4, 2, None),
                                                      (4, 1, None), (1, 4, None), (2, 1, 2), (1, 2, 2)])
def test_every_rank_gets_exactly_its_split_of_every_tensor(make_checkpoint, num_shards, world_size, kv):
    ckpt_dir, args, full = make_checkpoint(shards=num_shards, n_kv_heads=kv)
    for rank in range(world_size):
        got_args, state = checkpoint.load_rank_state_dict(ckpt_dir, load_params(ckpt_dir), rank, world_size)
        assert got_args.vocab_size == args.vocab_size
        assert set(state) == set(layout.full_shapes(args))
        for key, whole in full.items():
            assert torch.equal(state[key], layout.split(key, whole, args, world_size, rank)), key


def test_a_rank_opens_only_the_shards_that_overlap_its_slice(make_checkpoint, monkeypatch):
    ckpt_dir, _, _ = make_checkpoint(shards=4)
    opened = []
    real = checkpoint.load_shard
    monkeypatch.setattr(checkpoint, "load_shard", lambda path: opened.append(path[-6:-4]) or real(path))
    checkpoint.load_rank_state_dict(ckpt_dir, load_params(ckpt_dir), 1, 2)
    assert opened == ["02", "03"]


def test_rank_share_of_more_shards_than_overlap_ignores_the_extra_ones():
    pieces = {k: torch.full((2, 3), float(k)) for k in range(4)}
    got = checkpoint.joined(0, checkpoint.rank_pieces(pieces, 0, 4, 0, 2))  # rank 0 of 2 needs shards 0 and 1 only
    assert torch.equal(got, torch.cat([pieces[0], pieces[1]]))


@pytest.mark.parametrize("world_size", [3, 8])
def test_a_process_count_that_cannot_split_the_model_lists_the_valid_ones(make_checkpoint, world_size):
    ckpt_dir, _, _ = make_checkpoint(shards=2)
    with pytest.raises(LlamaMPError, match=r"Valid process counts: \[1, 2, 4\]"):
        checkpoint.load_rank_state_dict(ckpt_dir, load_params(ckpt_dir), 0, world_size)


@pytest.mark.spawn
def test_greedy_tokens_are_the_same_whatever_the_shard_and_process_counts(make_checkpoint, tokenizer_path):
    # One model (same seed, same params) saved with 1, 2 and 4 shards; a GQA model with 1 and 2.
    a = {k: make_checkpoint(shards=k)[0] for k in (1, 2, 4)}
    b = {k: make_checkpoint(shards=k, **GQA)[0] for k in (1, 2)}
    on1 = on_ranks(1, greedy_ids, [a[1], a[2], a[4], b[1], b[2]], tokenizer_path)[0]
    on2 = run_ranks(2, greedy_ids, [a[2], a[4], a[1], b[2], b[1]], tokenizer_path)[0]
    # 4 ranks on this 2-core machine are slow (gloo polls), so only the case the brief names runs there.
    on4 = run_ranks(4, greedy_ids, [a[2]], tokenizer_path, 6)[0]
    ref_a, ref_b = on2[0], on2[3]  # N == K == 2
    assert all(len(ids) > 0 for ids in ref_a)
    assert on1[0] == ref_a  # N == K == 1 agrees with N == K == 2: one model
    assert on1[1] == on1[2] == ref_a  # 2 and 4 shards on 1 process
    assert on2[1] == on2[2] == ref_a  # 4 shards and 1 shard on 2 processes
    assert on4[0] == [ids[:6] for ids in ref_a]  # 2 shards on 4 processes (6 new tokens)
    assert on1[3] == ref_b and on1[4] == on2[4] == ref_b  # GQA: 2 shards on 1, 1 shard on 2
    assert ref_b != ref_a  # a different model really gives different tokens


# ----------------------------------------------------------------------------------------------
# Memory: the model is built as shapes only, and each tensor goes straight to its place


def test_a_model_built_on_the_meta_device_takes_no_memory():
    from llama_mp.checkpoints.params import load_preset
    from llama_mp.runtime.model import Transformer

    with torch.device("meta"):
        model = Transformer(load_preset("llama-2-70b")[0])  # 69B weights: nothing may be allocated
    assert all(p.is_meta for p in model.parameters())


def test_loading_copies_each_piece_into_its_place_without_joining_slices_in_host_memory(make_checkpoint, monkeypatch):
    from llama_mp.distributed import Group
    from llama_mp.runtime.decode import Decoder
    from llama_mp.runtime.loading import load_checkpoint

    ckpt_dir, args, full = make_checkpoint(shards=4, dtype=torch.bfloat16)
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("a rank slice was joined in host memory"))
    group = Group(0, 1, 0, torch.device("cpu"), "gloo")
    model = load_checkpoint(ckpt_dir, group, torch.float32, Decoder(), 1, 8)  # 4 shards on 1 rank, widened
    monkeypatch.undo()
    for key, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, full[key].float()), key


def _resident_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_random_weights_are_made_in_the_target_dtype_one_tensor_at_a_time():
    """bench's random models: a bfloat16 model must never exist in float32 first (7B: 25 GiB for 13)."""
    from llama_mp.checkpoints.params import ModelArgs
    from llama_mp.distributed import Group
    from llama_mp.runtime.decode import Decoder
    from llama_mp.runtime.loading import random_model
    from llama_mp.tools.bench import reset_peak_memory

    args = ModelArgs(dim=512, n_layers=8, n_heads=8, multiple_of=256, vocab_size=32000)
    reset_peak_memory(torch.device("cpu"))
    before = _resident_bytes("VmRSS:")
    model = random_model(args, Group(0, 1, 0, torch.device("cpu"), "gloo"), torch.bfloat16, Decoder(), 1, 8)
    kept, peak = _resident_bytes("VmRSS:") - before, _resident_bytes("VmHWM:") - before
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert all(t.dtype == torch.bfloat16 for t in model.state_dict().values())
    # Beyond the model itself, only a few rows' draws: a float32 copy first would add twice its weights.
    assert peak - kept < 0.5 * weights, (peak, kept, weights)
