"""A Meta checkpoint without output.weight (a tied output layer, as Llama 3.2 1B and 3B have) runs as
the same model with output.weight = the embedding: on 1 and 2 ranks, from 1 and 2 shards, through
reshard, verify and convert. The LLaMA / Llama 2 layout splits the embedding by columns, so there a
several-shard checkpoint without output.weight is refused with the reason, and a single-shard one works.
"""

import os

import pytest
import torch

from llama_mp import LlamaMPError
from llama_mp.checkpoints import meta as checkpoint
from llama_mp.checkpoints.convert import convert
from llama_mp.checkpoints.params import ModelArgs, load_params
from llama_mp.checkpoints.reshard import reshard, save_consolidated
from llama_mp.checkpoints.synth import random_state_dict
from llama_mp.checkpoints.verify import verify_checkpoint
from llama_mp.runtime.tokenizer import Tokenizer
from multiproc import run_ranks
from workers import greedy_ids

MAX_NEW = 8
LLAMA31 = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, multiple_of=32, rope_theta=500000.0,
               use_scaled_rope=True)
LLAMA2 = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)


def save_pair(root, name, args, shards):
    """The same model saved with output.weight = embedding ("explicit") and without it ("tied")."""
    state = random_state_dict(args, seed=3)
    state["output.weight"] = state["tok_embeddings.weight"].clone()
    explicit, tied = str(root / f"{name}_explicit_{shards}"), str(root / f"{name}_tied_{shards}")
    save_consolidated(explicit, args, state, shards)
    save_consolidated(tied, args, {k: v for k, v in state.items() if k != "output.weight"}, shards)
    return explicit, tied


@pytest.fixture(scope="module")
def llama3(tmp_path_factory, llama3_tokenizer_path):
    root = tmp_path_factory.mktemp("tied3")
    args = ModelArgs(vocab_size=Tokenizer(llama3_tokenizer_path).n_words, **LLAMA31)
    return {shards: save_pair(root, "l3", args, shards) for shards in (1, 2)}


def shard_keys(ckpt_dir):
    return [set(torch.load(p, map_location="cpu", weights_only=True, mmap=True))
            for p in checkpoint.shard_paths(ckpt_dir)]


@pytest.mark.spawn
def test_llama3_without_output_weight_generates_like_the_explicit_model(llama3, llama3_tokenizer_path):
    assert all("output.weight" not in keys for keys in shard_keys(llama3[2][1]))
    dirs = [llama3[1][0], llama3[1][1], llama3[2][1]]
    one = greedy_ids(dirs, llama3_tokenizer_path, MAX_NEW)
    two = run_ranks(2, greedy_ids, dirs, llama3_tokenizer_path, MAX_NEW)
    reference = one[0]
    assert all(reference)  # every prompt generated: no comparison below is of empty lists
    assert one == [reference] * 3
    assert all(rank == [reference] * 3 for rank in two)


def test_reshard_verify_and_convert_keep_a_tied_llama3_checkpoint(llama3, llama3_tokenizer_path, tmp_path):
    explicit, tied = llama3[2]
    assert verify_checkpoint(tied, progress=False) == []
    reshard(tied, str(tmp_path / "one"), 1, progress=False)
    assert "output.weight" not in shard_keys(str(tmp_path / "one"))[0]  # still tied, no extra copy
    reshard(str(tmp_path / "one"), str(tmp_path / "two"), 2, progress=False)
    for a, b in zip(checkpoint.shard_paths(tied), checkpoint.shard_paths(str(tmp_path / "two"))):
        sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert greedy_ids([str(tmp_path / "one")], llama3_tokenizer_path, MAX_NEW) == \
        greedy_ids([explicit], llama3_tokenizer_path, MAX_NEW)

    convert(tied, str(tmp_path / "hf"), to="hf", progress=False)
    with open(tmp_path / "hf" / "config.json") as f:
        assert '"tie_word_embeddings": true' in f.read()
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    convert(str(tmp_path / "hf"), str(tmp_path / "back"), mp=2, progress=False)
    back = [torch.load(p, weights_only=True) for p in checkpoint.shard_paths(str(tmp_path / "back"))]
    for index, path in enumerate(checkpoint.shard_paths(explicit)):
        original = torch.load(path, weights_only=True)
        assert all(torch.equal(original[k], back[index][k]) for k in original)  # output.weight written out


@pytest.fixture(scope="module")
def llama2(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("tied2")
    args = ModelArgs(vocab_size=tokenizer.n_words, **LLAMA2)
    return {shards: save_pair(root, "l2", args, shards) for shards in (1, 2)}


@pytest.mark.spawn
def test_llama2_single_shard_without_output_weight_runs_and_reshards(llama2, tokenizer_path, tmp_path):
    explicit, tied = llama2[1]
    reference = greedy_ids([explicit], tokenizer_path, MAX_NEW)[0]
    assert all(reference)  # every prompt generated: no comparison below is of empty lists
    assert greedy_ids([tied], tokenizer_path, MAX_NEW) == [reference]
    assert all(rank == [reference] for rank in run_ranks(2, greedy_ids, [tied], tokenizer_path, MAX_NEW))
    assert verify_checkpoint(tied, progress=False) == []
    # Two LLaMA-layout shards split the embedding by columns: the output layer must be written out.
    reshard(tied, str(tmp_path / "two"), 2, progress=False)
    for mine, theirs in zip(checkpoint.shard_paths(str(tmp_path / "two")), checkpoint.shard_paths(llama2[2][0])):
        got, want = torch.load(mine, weights_only=True), torch.load(theirs, weights_only=True)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_llama2_several_shards_without_output_weight_are_refused_with_the_reason(llama2, tokenizer_path, tmp_path):
    tied = llama2[2][1]
    why = "output.weight is missing, and it cannot be taken from the embedding"
    with pytest.raises(LlamaMPError, match=why):
        checkpoint.load_rank_state_dict(tied, load_params(tied), 0, 1)
    with pytest.raises(LlamaMPError, match=why):
        reshard(tied, str(tmp_path / "out"), 1, progress=False)
    with pytest.raises(LlamaMPError, match=why):
        convert(tied, str(tmp_path / "out"), to="hf", progress=False)
    assert not os.path.exists(tmp_path / "out")
    problems = verify_checkpoint(tied, progress=False)
    assert len(problems) == 2 and all(why in p for p in problems), problems
