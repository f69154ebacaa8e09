"""What the model and the tokenizer can hold: a model that cannot fit is refused before anything is
allocated, with the numbers; a vocabulary padded beyond the tokenizer never yields an id it cannot decode."""

import time

import pytest
import torch

from llama_mp import LlamaMPError
from llama_mp.checkpoints.params import ModelArgs
from llama_mp.checkpoints.reshard import save_consolidated
from llama_mp.checkpoints.synth import random_state_dict
from llama_mp.distributed import Group
from llama_mp.runtime.decode import Decoder
from llama_mp.runtime.footprint import available_bytes
from llama_mp.runtime.loading import random_model
from multiproc import on_ranks
from workers import build, generated_ids_and_text

CPU_GROUP = Group(0, 1, 0, torch.device("cpu"), "gloo")


@pytest.fixture(scope="module")
def padded_checkpoint(tmp_path_factory, tokenizer):
    """A checkpoint whose vocabulary has 64 rows more than the tokenizer, made the likeliest outputs."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=tokenizer.n_words + 64)
    state = random_state_dict(args, seed=3)
    state["output.weight"][tokenizer.n_words:] *= 50  # left alone, these ids would win every step
    ckpt_dir = str(tmp_path_factory.mktemp("padded"))
    save_consolidated(ckpt_dir, args.with_vocab(-1), state, num_shards=2)
    return ckpt_dir


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.spawn)])
def test_a_padded_vocabulary_never_yields_an_id_the_tokenizer_cannot_decode(padded_checkpoint, tokenizer,
                                                                           tokenizer_path, ranks):
    results = on_ranks(ranks, generated_ids_and_text, padded_checkpoint, tokenizer_path)
    ids, texts = results[0]
    assert all(rank_result == results[0] for rank_result in results)
    assert all(0 < len(row) <= 24 and max(row) < tokenizer.n_words for row in ids)  # 24 steps (workers.py)
    assert texts == [tokenizer.decode(row) for row in ids[:len(texts)]]  # the greedy rows come first


def test_a_sequence_length_that_cannot_fit_is_refused_before_allocating(make_checkpoint, tokenizer_path):
    ckpt_dir = make_checkpoint(shards=1)[0]
    start = time.monotonic()
    with pytest.raises(LlamaMPError) as refused:
        build(ckpt_dir, tokenizer_path, max_seq_len=10 ** 12, max_batch_size=2)
    message = str(refused.value)
    assert time.monotonic() - start < 10
    for words in ("KV cache", "max_batch_size 2 x max_seq_len 1000000000000", "GiB is free",
                  "Lower --max_seq_len", "llama-mp plan"):
        assert words in message, message


def test_weights_that_cannot_fit_are_refused_with_what_would_help():
    huge = ModelArgs(dim=8192, n_layers=10 ** 6, n_heads=64, multiple_of=256, vocab_size=32000)
    with pytest.raises(LlamaMPError, match="The weights alone do not fit: use more ranks"):
        random_model(huge, CPU_GROUP, torch.bfloat16, Decoder(), 1, 16)


def test_the_free_memory_of_a_cpu_host_is_shared_by_its_ranks(monkeypatch):
    alone = available_bytes(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert alone is not None and abs(available_bytes(torch.device("cpu")) * 4 - alone) < alone * 0.1
