"""Shared fixtures: a tokenizer and small random checkpoints in Meta's exact layout.

The real LLaMA tokenizer from ../shared/assets is used when present; otherwise a tiny SentencePiece
model is trained once per session. Checkpoints are written once per configuration and reused.
"""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from llama_mp.checkpoints.params import ModelArgs  # noqa: E402
from llama_mp.checkpoints.synth import find_or_make_tokenizer, write_random_checkpoint  # noqa: E402
from llama_mp.runtime.tokenizer import Tokenizer  # noqa: E402

# Small shapes that still exercise every split: 4 heads (so 1, 2 and 4 ranks), GQA with 2 kv heads.
TINY = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """../shared's real tokenizer, or a tiny trained one (always, with LLAMA_MP_TEST_TOKENIZER=tiny)."""
    fallback = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    if os.environ.get("LLAMA_MP_TEST_TOKENIZER") == "tiny":
        return find_or_make_tokenizer(fallback, shared=None)
    return find_or_make_tokenizer(fallback)


@pytest.fixture(scope="session")
def llama3_tokenizer_path(tmp_path_factory):
    """Meta's Llama 3 tokenizer from ../shared, or a tiny tiktoken file (always, with LLAMA_MP_TEST_TOKENIZER=tiny)."""
    fallback = str(tmp_path_factory.mktemp("tok3") / "tokenizer.model")
    if os.environ.get("LLAMA_MP_TEST_TOKENIZER") == "tiny":
        return find_or_make_tokenizer(fallback, shared=None, family="llama3")
    return find_or_make_tokenizer(fallback, family="llama3")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer):
    """make_checkpoint(shards=1, n_kv_heads=None, dtype=torch.float32, seed=0, **params) ->
    (ckpt_dir, ModelArgs with the real vocab, whole-model state dict). Cached per arguments."""
    cache = {}

    def make(shards=1, dtype=torch.float32, seed=0, **overrides):
        key = (shards, dtype, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            fields = dict(TINY, vocab_size=tokenizer.n_words)
            fields.update(overrides)
            args = ModelArgs(**fields)
            name = f"ckpt_mp{shards}_{str(dtype).split('.')[-1]}_s{seed}_" + "_".join(
                f"{k}{v}" for k, v in sorted(overrides.items()))
            ckpt_dir = str(tmp_path_factory.mktemp(name))
            state = write_random_checkpoint(ckpt_dir, args, shards, seed=seed, dtype=dtype)
            cache[key] = (ckpt_dir, args, state)
        return cache[key]

    return make


@pytest.fixture
def llama_mp_command(monkeypatch, capsys):
    """llama_mp_command(*argv) -> (exit code, stdout, stderr) of `llama-mp ARGV`, run in this process
    through the same runner as the installed command (starting Python and torch again would add seconds
    per call and test nothing more)."""
    from llama_mp.cli import main

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["llama-mp", *map(str, argv)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as ended:
            main()
        out = capsys.readouterr()
        return ended.value.code, out.out, out.err

    return run
