"""The tokenizer files of a Hugging Face folder written by `convert --to hf`, made from Meta's tokenizer.model,
so that `transformers.AutoTokenizer.from_pretrained(folder)` reads it and encodes text as llama_mp does.

Both families load as transformers' PreTrainedTokenizerFast (the `tokenizers` library, which every
transformers install has):

* SentencePiece (LLaMA 1, Llama 2): transformers can turn a tokenizer.model into a fast tokenizer only
  with the protobuf package installed, which transformers does not require. So convert writes the
  tokenizer.json itself, from what the SentencePiece model says of each piece: a BPE model whose merges
  are ordered as SentencePiece applies them (the pair whose merged piece scores highest first), with byte
  fallback, the space marker "▁" put before the text and before the text after each special token (as
  SentencePiece's dummy prefix does for each text encoded on its own), and a BOS before every text.
* tiktoken (Llama 3.x): transformers 5 builds a fast tokenizer from the tiktoken file itself when the
  config names PreTrainedTokenizerFast (after a logged failed attempt to read it as SentencePiece),
  given the special tokens in id order after the BPE ranks, which is how Meta numbers them.
* tiktoken with another split pattern (Llama 4's o200k): transformers' own reading of the file splits
  text by Llama 3's pattern, so convert writes tokenizer.json with the right one, made by transformers'
  tiktoken converter (the library's own, so its merges are exactly what transformers would build);
  writing it needs transformers installed, as using the folder does.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

from .. import families
from ..errors import LlamaMPError
from ..runtime.tokenizer import LLAMA3_SPLIT_PATTERN

SPACE = "\u2581"  # SentencePiece's space marker


def write_hf_tokenizer(out_dir: str, tokenizer) -> None:
    """tokenizer_config.json (every family) and, where transformers could not build the tokenizer from the
    tokenizer.model copied into `out_dir` itself, tokenizer.json."""
    if families.named(tokenizer.family).tokenizer_format == "sentencepiece":
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(sentencepiece_tokenizer_json(tokenizer.sp), f, ensure_ascii=False)
    elif tokenizer.split_pattern != LLAMA3_SPLIT_PATTERN:
        tiktoken_tokenizer_json(os.path.join(out_dir, "tokenizer.model"), tokenizer).save(
            os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(hf_tokenizer_config(tokenizer), f, indent=2)


def hf_tokenizer_config(tokenizer) -> dict:
    """tokenizer_config.json: the class, the special tokens and Meta's leading BOS (add_bos_token)."""
    common = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
              "model_input_names": ["input_ids", "attention_mask"]}
    if families.named(tokenizer.family).tokenizer_format == "sentencepiece":
        sp = tokenizer.sp
        return {**common, "bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
                "unk_token": sp.id_to_piece(sp.unk_id())}
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    return {**common, "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
            "extra_special_tokens": specials}


def sentencepiece_merges(sp) -> List[Tuple[str, str]]:
    """Every pair of pieces that SentencePiece's BPE can join into a piece of the vocabulary, in the order
    it joins them: by the joined piece's score, highest first (ties: the lower id), then by the ids of
    the two halves. Only ordinary pieces take part (no control, byte, unknown or unused piece)."""
    ordinary: Dict[str, int] = {}
    for i in range(sp.vocab_size()):
        if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i) or sp.is_unused(i)):
            ordinary[sp.id_to_piece(i)] = i
    ranked = []
    for piece, joined in ordinary.items():
        for cut in range(1, len(piece)):
            left, right = ordinary.get(piece[:cut]), ordinary.get(piece[cut:])
            if left is not None and right is not None:
                ranked.append((-sp.get_score(joined), joined, left, right, piece[:cut], piece[cut:]))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_tokenizer_json(sp) -> dict:
    """The `tokenizers` library's description of a SentencePiece BPE model with byte fallback (Meta's
    LLaMA / Llama 2 tokenizer.model, and the tiny one of `synth`)."""
    specials = [i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()) if i >= 0]
    bos, unk = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.unk_id())
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in specials],
        # The space marker before each text between special tokens (SentencePiece's dummy prefix, added to
        # every text it encodes), and for every space; no cut at spaces: SentencePiece keeps a run of them
        # with the word after it, joined into one piece where the vocabulary has one ("▁▁").
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE}, {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {sp.id_to_piece(i): i for i in range(sp.vocab_size())},
                  "merges": [[left, right] for left, right in sentencepiece_merges(sp)]},
    }


def tiktoken_tokenizer_json(model_path: str, tokenizer):
    """A `tokenizers.Tokenizer` of the tiktoken file at `model_path` with `tokenizer`'s split pattern and its
    special tokens (in id order, after the ranks), built by transformers' TikTokenConverter."""
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        raise LlamaMPError(f"Writing a {families.named(tokenizer.family).title} tokenizer for Hugging Face needs the "
                           "transformers package, which builds its tokenizer.json (its split pattern is not the "
                           "one transformers assumes for a tiktoken file): `pip install transformers`, then run "
                           "convert again.") from None
    from tokenizers import processors

    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    built = TikTokenConverter(vocab_file=model_path, pattern=tokenizer.split_pattern,
                              extra_special_tokens=specials).converted()
    # Meta's leading BOS, which transformers' add_bos_token does not add to a tokenizer.json's texts.
    bos = "<|begin_of_text|>"
    built.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tokenizer.bos_id)])])
    return built
