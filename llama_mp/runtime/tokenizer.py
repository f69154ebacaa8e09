"""The tokenizers of Meta's checkpoints, with streaming decode.

Meta ships every family's tokenizer as `tokenizer.model`, in one of two formats: LLaMA 1 and Llama 2 use
a SentencePiece model (a protobuf), Llama 3, 3.1, 3.2 and 3.3 a tiktoken byte-level BPE file (text lines
`base64-of-the-token-bytes rank`, without the 256 special tokens, which the code adds). `Tokenizer(path)`
looks at the file and returns the tokenizer for its format, so callers never name the family.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence

from .. import families
from ..errors import LlamaMPError

# Llama 3's special tokens, ids from the number of BPE tokens on (128000 with Meta's file), named as
# Meta's Llama 3.1 code names them. Llama 3.0 called 128004, 128005, 128008 and 128010 reserved tokens:
# only the names differ; the ids, which is what a checkpoint knows, are the same.
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",          # end of a message after which a tool answers (3.1)
    "<|eot_id|>",          # end of a turn
    "<|python_tag|>",
)
LLAMA3_SPECIAL_COUNT = 256
# The rest are reserved, numbered on from 2, since reserved 0 and 1 are named above.
LLAMA3_SPECIALS = LLAMA3_NAMED_SPECIALS + tuple(
    f"<|reserved_special_token_{n}|>" for n in range(2, 2 + LLAMA3_SPECIAL_COUNT - len(LLAMA3_NAMED_SPECIALS)))

# How Llama 3 cuts text into pieces before BPE (the cl100k pattern of OpenAI, which Meta reuses):
# contractions, letter runs with one leading non-letter, numbers of up to 3 digits, punctuation runs,
# newlines, and spaces that stay with the following word.
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tiktoken fails on very long inputs, and its BPE slows down badly on one huge piece (a long run of
# letters or of spaces is one piece for the pattern above). Meta's code therefore encodes text in
# slices of at most this many characters, cutting runs longer than the second limit; we cut at the
# same places, so ids are the same as Meta's.
MAX_CHARS_PER_ENCODE = 400_000
MAX_CHARS_PER_RUN = 25_000
_RUNS = re.compile(r"\s+|\S+")  # Python's \s is str.isspace, as in Meta's cut


def _bounded_slices(text: str, max_chars: int = MAX_CHARS_PER_ENCODE,
                    max_run: int = MAX_CHARS_PER_RUN) -> Iterator[str]:
    """`text` in consecutive slices, each at most `max_chars` long and holding no run of whitespace or
    of non-whitespace longer than `max_run` (a longer run is cut every `max_run` characters from its
    start; a run crossing a `max_chars` cut starts anew there)."""
    for chunk_start in range(0, len(text), max_chars):
        chunk = text[chunk_start:chunk_start + max_chars]
        slice_start = 0
        for run in _RUNS.finditer(chunk):
            for cut in range(run.start() + max_run, run.end(), max_run):
                yield chunk[slice_start:cut]
                slice_start = cut
        if slice_start < len(chunk):
            yield chunk[slice_start:]


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise LlamaMPError(f"Only text can be encoded, got a {type(text).__name__}: {text!r:.80}.")


class Tokenizer:
    """Encodes text to token ids and back; `Tokenizer(path)` returns the one for the file's format.

    Every tokenizer has Meta's `encode(text, bos, eos)` and `decode(ids)` and these attributes:
    `n_words` (ids are 0 .. n_words-1), `bos_id`, `eos_id`, `pad_id`, `stop_ids` (the ids that end
    generation), `family` (its model family's name, families/: "llama", "llama3", "llama4"), `special_tokens`
    (name -> id) with `special_id(name)`, `text_after(previous, id)` (the text an id adds after another:
    how an alternative token reads in `logprobs`), and `byte_level` (whether each id stands for fixed bytes, which
    is what lets `TextStream` decode incrementally).
    """

    family: str
    byte_level: bool
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: List[int]
    special_tokens: Dict[str, int]

    def __new__(cls, model_path: str, family: Optional[str] = None):
        if cls is Tokenizer:  # the factory: pick the class for the file's format (and the model's family)
            fmt = "tiktoken" if _looks_like_tiktoken(model_path) else "sentencepiece"
            chosen = families.tokenizer_family(fmt, model_path, family)
            cls = families.piece(chosen.tokenizer_class)
        return super().__new__(cls)

    def encode_naming_specials(self, text: str, bos: bool) -> List[int]:
        """`text` as ids where a special token's name ("</s>", "<|eot_id|>") stands for its id, as
        Hugging Face's tokenizers read text: what a client asks of /tokenize (lm-eval finds BOS and EOS
        that way). The text between names is encoded as text of its own. Never for a prompt: there a
        name is plain text (`encode`), so no text can forge a turn."""
        _check_text(text)
        names = sorted(self.special_tokens, key=len, reverse=True)  # the longest name wins where two start
        ids = [self.bos_id] if bos else []
        for i, part in enumerate(re.split("(" + "|".join(map(re.escape, names)) + ")", text) if names else [text]):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self.encode(part, bos=False, eos=False)
        return ids

    def special_id(self, name: str) -> int:
        """The id of special token `name` (e.g. "<|eot_id|>"), or an error listing the known ones."""
        try:
            return self.special_tokens[name]
        except KeyError:
            shown = [n for n in self.special_tokens if "reserved" not in n]
            raise LlamaMPError(f"The {self.family} tokenizer {self.path!r} has no special token {name!r}; "
                               f"its special tokens include {shown}.") from None


def _looks_like_tiktoken(model_path: str) -> bool:
    """Whether the file starts like a tiktoken BPE file: a first line `base64 integer`. A SentencePiece
    model is a protobuf, whose first byte (0x0a) is not base64, so the two cannot be confused."""
    if not os.path.isfile(model_path):
        raise LlamaMPError(f"Tokenizer file {model_path!r} does not exist. Pass --tokenizer_path the "
                           "tokenizer.model that came with the checkpoint download.")
    try:
        with open(model_path, "rb") as f:
            first_line = f.readline(4096)
    except OSError as e:
        raise LlamaMPError(f"Tokenizer file {model_path!r} cannot be read ({e.strerror or e}).") from None
    return _parse_bpe_line(first_line) is not None


def _parse_bpe_line(line: bytes):
    """(token bytes, rank) from a line of a tiktoken file, or None if it is not such a line."""
    fields = line.split()
    if len(fields) != 2 or not fields[1].isdigit():
        return None
    try:
        return base64.b64decode(fields[0], validate=True), int(fields[1])
    except (binascii.Error, ValueError):
        return None


def _neither_format(model_path: str, detail: str) -> LlamaMPError:
    return LlamaMPError(f"{model_path!r} is not a SentencePiece model (LLaMA, Llama 2) nor a tiktoken BPE file "
                        f"(Llama 3.x): {detail}. Pass --tokenizer_path the tokenizer.model that came with "
                        "the checkpoint download.")


class SentencePieceTokenizer(Tokenizer):
    """LLaMA 1 and Llama 2: a SentencePiece model with bos=1, eos=2 and no pad id (-1)."""

    family = "llama"
    byte_level = False  # pieces start with a space marker that decode drops at the start of a text

    def __init__(self, model_path: str, family: Optional[str] = None):
        from sentencepiece import SentencePieceProcessor

        try:
            self.sp = SentencePieceProcessor(model_file=model_path)
        except Exception as e:
            raise _neither_format(model_path, f"SentencePiece says {str(e).splitlines()[0]!r}, and its first "
                                              "line is not `base64-token rank`") from None
        self.path = model_path
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        self.stop_ids = [self.eos_id]
        self.special_tokens = {self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.bos_id, self.eos_id)
                               if 0 <= i < self.n_words}

    def encode(self, text: str, bos: bool, eos: bool) -> List[int]:
        _check_text(text)
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def piece(self, token_id: int) -> str:
        """The id's piece as the model file names it ("▁Hello", "<0x0A>")."""
        return self.sp.id_to_piece(token_id)

    def text_after(self, previous: int, token_id: int) -> str:
        """The text `token_id` adds after `previous` (a piece's leading space shows only after a piece)."""
        before = self.sp.decode([previous])
        return self.sp.decode([previous, token_id])[len(before):]


class TiktokenTokenizer(Tokenizer):
    """Llama 3.x: byte-level BPE (tiktoken) plus 256 special tokens numbered after the BPE tokens.

    Text is always encoded as plain text: a user who types "<|eot_id|>" gets the tokens of those
    characters, never the special id, so no text can end a turn or forge a header. Special ids enter a
    prompt only where code puts them (`special_id`, the chat format).
    """

    family = "llama3"
    byte_level = True
    specials = LLAMA3_SPECIALS
    split_pattern = LLAMA3_SPLIT_PATTERN

    def __init__(self, model_path: str, family: Optional[str] = None):
        import tiktoken

        self.path = model_path
        ranks = self._read_ranks(model_path)
        n_base = len(ranks)
        self.special_tokens = {name: n_base + i for i, name in enumerate(self.specials)}
        self.model = tiktoken.Encoding(name=os.path.basename(model_path), pat_str=self.split_pattern,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.n_words = n_base + len(self.specials)
        self._set_special_ids()

    def _set_special_ids(self) -> None:
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]  # Meta's from 3.1 on (3.0: -1)
        # A base model ends a text with end_of_text; an instruct model ends its turn with eot_id, or with
        # eom_id when it expects a tool's answer (3.1). Any of them ends generation, as in Meta's code.
        self.stop_ids = [self.eos_id, self.special_tokens["<|eom_id|>"], self.special_tokens["<|eot_id|>"]]

    @staticmethod
    def _read_ranks(model_path: str) -> Dict[bytes, int]:
        """The BPE tokens and their ranks. Read here rather than with tiktoken.load, which may look
        elsewhere than the given file (URLs, a cache directory); this only reads the file."""
        with open(model_path, "rb") as f:
            lines = f.read().splitlines()
        ranks: Dict[bytes, int] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            parsed = _parse_bpe_line(line)
            if parsed is None:
                raise _neither_format(model_path, f"it starts like a tiktoken file, but line {number} is "
                                                  f"{line[:60]!r}, not `base64-token rank`")
            token, rank = parsed
            if token in ranks:
                raise _neither_format(model_path, f"line {number} repeats the token of rank {ranks[token]}")
            ranks[token] = rank
        if sorted(ranks.values()) != list(range(len(ranks))):
            # Special ids are numbered from len(ranks) on, so a gap or repeat would give two tokens one id.
            raise _neither_format(model_path, f"its {len(ranks)} ranks are not exactly 0 to {len(ranks) - 1}")
        return ranks

    def encode(self, text: str, bos: bool, eos: bool) -> List[int]:
        _check_text(text)
        ids = [self.bos_id] if bos else []
        for piece in _bounded_slices(text):
            ids += self.model.encode(piece, allowed_special=set(), disallowed_special=())
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 (half a character) become U+FFFD."""
        return self.model.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one id stands for (a special token's are its name)."""
        return self.model.decode_single_token_bytes(token_id)

    def piece(self, token_id: int) -> str:
        """The id's bytes as text (a byte that is part of a character: U+FFFD)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def text_after(self, previous: int, token_id: int) -> str:
        """The text `token_id` adds after `previous`: its own bytes, whatever comes before."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")


class TextStream:
    """Turns a growing list of token ids into text pieces that are safe to print.

    A character may be spread over several tokens (SentencePiece's byte pieces, or any multi-byte
    character in byte-level BPE); until all of them have arrived it cannot be printed, so it is held
    back. What is printed, joined, is exactly `tokenizer.decode(ids)`. `after`: ids the text continues
    (not printed), so that the first piece reads as it does after them (SentencePiece's leading space).

    Byte-level tokenizers (Llama 3) are decoded incrementally: each id's bytes go through a UTF-8 decoder
    that keeps an incomplete character until it completes. SentencePiece is decoded from a recent anchor
    instead (the cost per token stays constant), because its decode depends on the neighbouring pieces.
    """

    def __init__(self, tokenizer: Tokenizer, after: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: List[int] = list(after)[-1:]
        # Same replacement rule as bytes.decode(errors="replace"), which tiktoken's decode uses.
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace") if tokenizer.byte_level else None
        self.anchor = len(self.ids)  # ids before this index are fully printed
        self.printed = ""     # text printed since the anchor

    def _since_anchor(self) -> str:
        # Decode one already-printed token before the anchor too: SentencePiece drops the leading space
        # of the first piece of a text, and that token tells it that a space belongs there.
        lead = max(self.anchor - 1, 0)
        prefix = self.tokenizer.decode(self.ids[lead:self.anchor]) if lead < self.anchor else ""
        return self.tokenizer.decode(self.ids[lead:])[len(prefix):]

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can be printed now (possibly empty)."""
        self.ids.append(token_id)
        if self.utf8 is not None:
            return self.utf8.decode(self.tokenizer.token_bytes(token_id))
        text = self._since_anchor()
        if text.endswith("\ufffd"):  # maybe a character whose other bytes are still to come
            return ""
        new = text[len(self.printed):]
        self.printed = text
        if len(self.ids) - self.anchor > 16:  # move the anchor: everything so far is printed
            self.anchor, self.printed = len(self.ids), ""
        return new

    @property
    def holding(self) -> bool:
        """Whether part of a character is held back (the next push or `flush` writes it)."""
        if self.utf8 is not None:
            return bool(self.utf8.getstate()[0])
        return len(self.ids) > self.anchor and self._since_anchor() != self.printed

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character prints as U+FFFD)."""
        if self.utf8 is not None:
            return self.utf8.decode(b"", final=True)
        new = self._since_anchor()[len(self.printed):]
        self.anchor, self.printed = len(self.ids), ""
        return new


def _text_start(tokenizer: Tokenizer, ids: Sequence[int]) -> int:
    """Where a prompt's text starts: after a leading BOS, which marks the start of a sequence and is no
    text (the server adds it to a prompt sent as text; SentencePiece writes it as nothing anyway)."""
    return 1 if len(ids) and ids[0] == tokenizer.bos_id else 0


def prompt_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text of prompt `ids`: for a prompt encoded from a text, exactly that text (both families)."""
    return tokenizer.decode(list(ids[_text_start(tokenizer, ids):]))


def prompt_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> List[str]:
    """The text each id of a prompt adds; joined, they are `prompt_text(ids)` (a leading BOS adds "")."""
    start = _text_start(tokenizer, ids)
    stream = TextStream(tokenizer, ids[:start])
    texts = [""] * start + [stream.push(t) for t in ids[start:]]
    texts[-1] += stream.flush()
    return texts
