"""SentencePiece tokenizer of LLaMA / Llama 2 (`tokenizer.model`), with streaming decode."""

from __future__ import annotations

import os
from typing import List, Sequence

from ..errors import LlamaMPError


class Tokenizer:
    """Encodes text to token ids and back. LLaMA's model has bos=1, eos=2 and no pad id (-1)."""

    def __init__(self, model_path: str):
        from sentencepiece import SentencePieceProcessor

        if not os.path.isfile(model_path):
            raise LlamaMPError(f"Tokenizer file {model_path!r} does not exist. Pass --tokenizer_path the "
                               "tokenizer.model that came with the LLaMA download.")
        try:
            self.sp = SentencePieceProcessor(model_file=model_path)
        except Exception as e:
            raise LlamaMPError(f"{model_path!r} is not a SentencePiece model ({str(e).splitlines()[0]}). "
                               "LLaMA and Llama 2 ship one as tokenizer.model; Llama 3's tiktoken file is "
                               "not supported.") from None
        self.path = model_path
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, text: str, bos: bool, eos: bool) -> List[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


class TextStream:
    """Turns a growing list of token ids into text pieces that are safe to print.

    SentencePiece represents rare characters as several byte tokens; until all of them have arrived,
    decoding gives U+FFFD. We hold such a tail back and print it once it decodes completely. Decoding is
    done from a recent anchor, not from the start, so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.anchor = 0       # ids before this index are fully printed
        self.printed = ""     # text printed since the anchor

    def _since_anchor(self) -> str:
        # Decode one already-printed token before the anchor too: SentencePiece drops the leading space
        # of the first piece, and that token tells us whether a space belongs there.
        lead = max(self.anchor - 1, 0)
        prefix = self.tokenizer.decode(self.ids[lead:self.anchor]) if lead < self.anchor else ""
        return self.tokenizer.decode(self.ids[lead:])[len(prefix):]

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can be printed now (possibly empty)."""
        self.ids.append(token_id)
        text = self._since_anchor()
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.printed):]
        self.printed = text
        if len(self.ids) - self.anchor > 16:  # move the anchor: everything so far is printed
            self.anchor, self.printed = len(self.ids), ""
        return new

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character prints as U+FFFD)."""
        new = self._since_anchor()[len(self.printed):]
        self.anchor, self.printed = len(self.ids), ""
        return new
