"""Small random models in Meta's exact layout, and a tiny tokenizer, for tests, the demo and benches.

No weights can be downloaded here, so everything that needs a checkpoint makes one: a whole-model state
dict with random values of a sensible scale (activations stay O(1), so greedy choices are not
near-ties), split into Meta shards by `reshard.save_consolidated`.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Optional

import torch

from .. import families
from . import layout
from .meta import StateDict
from .params import ModelArgs
from .reshard import save_consolidated

REPO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SHARED_TOKENIZER = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "assets", "tokenizer.model"))
# Meta's real tokenizer of each family, where ../shared/assets has them
SHARED_TOKENIZERS = {f.name: os.path.join(os.path.dirname(SHARED_TOKENIZER), f.synth_tokenizer) for f in families.FAMILIES}


def random_tensor(key: str, shape, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """Float32 random values for (a slice of) weight `key`: norms near 1, the embedding N(0, 1), linear
    weights N(0, 1/fan_in) with `fan_in` the whole matrix's input size, so activations stay O(1)."""
    noise = torch.randn(shape, generator=generator, device=generator.device)
    if len(shape) == 1:
        return noise.mul_(0.1).add_(1.0)
    if key == "tok_embeddings.weight":
        return noise
    return noise.mul_(fan_in ** -0.5)


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> StateDict:
    """A whole (unsplit) model with Meta's key names and `random_tensor` values."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return {key: random_tensor(key, shape, shape[-1], g).to(dtype) for key, shape in layout.full_shapes(args).items()}


def write_random_checkpoint(ckpt_dir: str, args: ModelArgs, num_shards: int, seed: int = 0,
                            dtype: torch.dtype = torch.float32, vocab_in_params: bool = False) -> StateDict:
    """Write a random checkpoint; return its whole state dict. params.json says vocab_size -1 like
    Meta's files unless `vocab_in_params`."""
    state = random_state_dict(args, seed, dtype)
    written = args if vocab_in_params or families.family_of(args).vocab_in_params else args.with_vocab(-1)  # as Meta's
    save_consolidated(ckpt_dir, written, state, num_shards)
    return state


_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Model parallel inference splits every layer across processes, and each process holds one shard.
Simply put, the theory of relativity states that time and space are relative to the observer.
Once upon a time there was a small language model that wanted to run on every machine it could find.
Translate English to French: sea otter => loutre de mer, peppermint => menthe poivree, cheese => fromage.
Hi everyone, I just wanted to congratulate the team on the launch of the new release.
What is the recipe of mayonnaise? Whisk an egg yolk with mustard, then add oil drop by drop.
I believe the meaning of life is to learn, to help others, and to enjoy the small things.
"""


def train_tiny_tokenizer(path: str, vocab_size: int = 320) -> str:
    """Train a small SentencePiece BPE model with LLaMA's special ids (unk 0, bos 1, eos 2, no pad)
    and byte fallback, so any text round-trips. Used where the real tokenizer.model is absent."""
    import sentencepiece as spm

    lines = [line for line in _CORPUS.splitlines() if line] * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        # LLaMA's settings: text kept as is (newlines, repeated spaces), digits split one by one.
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def write_tiny_tiktoken(path: str, merges: int = 64) -> str:
    """A small Llama 3-style tiktoken file (`base64-token rank` lines): the 256 single bytes, then the
    `merges` most frequent adjacent pairs of the corpus, merged greedily one after another (plain BPE
    training). Llama 3's 256 special tokens come after these ranks, as in Meta's file."""
    words = [word.encode() for line in _CORPUS.splitlines() for word in line.split(" ")]
    pieces = [[bytes([b]) for b in (b" " + w if i else w)] for i, w in enumerate(words)]
    vocab = [bytes([b]) for b in range(256)]
    for _ in range(merges):
        counts: dict = {}
        for word in pieces:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda pair: (counts[pair], pair))
        vocab.append(best[0] + best[1])
        for k, word in enumerate(pieces):
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            pieces[k] = merged
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.writelines(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(vocab))
    return path


def find_or_make_tokenizer(fallback_path: str, shared: Optional[str] = SHARED_TOKENIZER, family: str = "llama") -> str:
    """The family's real tokenizer from ../shared when it exists (`shared`, or the family's file), else a
    freshly made tiny one: a SentencePiece model for LLaMA / Llama 2, a tiktoken file for Llama 3 and 4
    (a Llama 4 model reads it with Llama 4's 2048 special tokens)."""
    shared = SHARED_TOKENIZERS[family] if shared is SHARED_TOKENIZER else shared
    if shared and os.path.isfile(shared):
        return os.path.abspath(shared)
    if not os.path.isfile(fallback_path):
        tiktoken = families.named(family).tokenizer_format == "tiktoken"
        (write_tiny_tiktoken if tiktoken else train_tiny_tokenizer)(fallback_path)
    return fallback_path
