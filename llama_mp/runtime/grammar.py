"""Constrained decoding: which tokens may come next so that the answer matches a grammar (a JSON schema),
with llguidance as the grammar engine.

Why llguidance (compared with xgrammar and outlines-core, docs/server.md "Tool calling and structured
output"): it installs as one CPU wheel from pip with no other dependency (xgrammar 0.2 requires triton,
transformers and apache-tvm-ffi; outlines-core compiles a schema, as one regular expression, into an index
over the whole vocabulary first), it takes any vocabulary given as the bytes of each id, which is what both of
Meta's tokenizer families give (SentencePiece's pieces with their byte fallback, tiktoken's byte-level
tokens), and it computes each mask lazily from a context-free grammar. It is kept by the guidance team and
used by llama.cpp, vLLM and SGLang.

A `Constraint` lives on rank 0 with its sequence: before each choice it has consumed every token chosen
so far (`catch_up`) and gives the ids it allows next as a cap on each logit (`logit_cap`: +inf where
allowed, -inf where not, expanded on the logits' device from the bitmask llguidance writes into the
constraint's own buffer), which `sampling.choose_from_logits` applies with the row's other adjustments, in
place. The server's scheduler computes them when the step asks for
its rows' settings: after the step's forward is queued, so on a GPU they overlap it; on a CPU the forward
is already done, and no thread of their own competes with the ranks for the cores. Ending the answer (a
stop token) is allowed only where the grammar is complete.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import families
from ..errors import LlamaMPError
from .tokenizer import Tokenizer
from .transfer import upload

_VOCABULARIES: Dict[tuple, object] = {}  # (tokenizer path, end ids) -> llguidance.LLTokenizer
_CAP_TABLES: Dict[torch.device, torch.Tensor] = {}  # device -> [256, 8] float32 (see `_cap_table`)


def _llguidance():
    """The grammar engine, or a LlamaMPError saying how to install it."""
    try:
        import llguidance
        import llguidance.tiktoken  # noqa: F401
    except ImportError:
        raise LlamaMPError("Constrained output needs the llguidance package, which is not installed here: "
                           "pip install llguidance (or the server extra, pip install -e '.[server]').") from None
    return llguidance


def _sentencepiece_bytes(tokenizer) -> List[bytes]:
    """Each id's bytes: "▁" is a space, "<0x0A>" the byte it names, control pieces their own names."""
    sp, out = tokenizer.sp, []
    for i in range(tokenizer.n_words):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))
        elif sp.is_control(i) or sp.is_unknown(i):
            out.append(piece.encode("utf-8"))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


class _SentencePieceForGuidance:
    """What llguidance's TokenizerWrapper reads of a tokenizer: every id's bytes, the special ids, and
    encoding (used to tokenize forced text)."""

    def __init__(self, tokenizer, ends: Sequence[int]):
        self.tokenizer = tokenizer
        self.tokens = _sentencepiece_bytes(tokenizer)
        self.eos_token_id, self.bos_token_id = ends[0], tokenizer.bos_id
        sp = tokenizer.sp
        self.special_token_ids = [i for i in range(tokenizer.n_words) if sp.is_control(i) or sp.is_unknown(i)]

    def __call__(self, text) -> List[int]:
        """`text` as ids in the middle of a text: SentencePiece puts a space before a text's start, so the
        text is encoded after a newline (a byte piece, which merges with nothing) and that is cut off."""
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        sp = self.tokenizer.sp
        lead, ids = sp.encode("\n"), sp.encode("\n" + text)
        return ids[len(lead):] if ids[:len(lead)] == lead else ids


def vocabulary(tokenizer: Tokenizer, ends: Sequence[int]):
    """llguidance's view of `tokenizer` whose answers end with `ends` (made once per tokenizer: ~1 s)."""
    llguidance = _llguidance()

    key = (tokenizer.path, tuple(ends))
    if key not in _VOCABULARIES:
        if families.named(tokenizer.family).tokenizer_format == "tiktoken":  # special ids after the ranks
            made = llguidance.tiktoken.lltokenizer_from_encoding(tokenizer.model, n_vocab=tokenizer.n_words, eos_token=list(ends))
        else:
            made = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SentencePieceForGuidance(tokenizer, ends)),
                                          n_vocab=tokenizer.n_words, eos_token=list(ends))
        _VOCABULARIES[key] = made
    return _VOCABULARIES[key]


def schema_grammar(schema: dict) -> str:
    """The llguidance grammar of JSON text matching `schema` (whitespace between items kept compact), or a
    LlamaMPError saying why the schema cannot be one."""
    llguidance = _llguidance()
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as e:
        raise LlamaMPError(f"The JSON schema cannot be used: {e}") from None
    return _checked(grammar, "The JSON schema")


def regex_grammar(regex: str) -> str:
    """The llguidance grammar of text matching the regular expression `regex` (the whole text), or a
    LlamaMPError saying why it cannot be one."""
    return _checked(_llguidance().LLMatcher.grammar_from_regex(regex), "The regular expression")


def _checked(grammar: str, what: str) -> str:
    is_error, problems = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise LlamaMPError(f"{what} cannot be used: {' '.join(problems[0].split())}")
    return grammar


def check_grammar(grammar: str, tokenizer: Tokenizer, ends: Sequence[int]) -> None:
    """Raise a LlamaMPError unless `grammar` makes a working matcher (a request's schema, at validation)."""
    Constraint(grammar, tokenizer, ends)


class Constraint:
    """One sequence's grammar state (rank 0): what it has consumed and the mask of ids allowed next."""

    def __init__(self, grammar: str, tokenizer: Tokenizer, ends: Sequence[int]):
        llguidance = _llguidance()
        self.vocab, self.ends = tokenizer.n_words, list(ends)
        self.matcher = llguidance.LLMatcher(vocabulary(tokenizer, ends), grammar, log_level=0)
        if self.matcher.is_error():
            raise LlamaMPError(f"The grammar cannot be used: {self.matcher.get_error()}")
        self.consumed = 0      # tokens of the answer fed to the matcher
        # the mask, one bit per id, rewritten each step: bit i of word k is id 32k + i, so byte j of the
        # words (little-endian) holds ids 8j to 8j + 7, its bit i id 8j + i
        self.words = np.zeros((self.vocab + 31) // 32, dtype="<u4")
        self.bytes = torch.from_numpy(self.words.view(np.uint8))  # the same memory
        self.index = torch.empty(self.words.nbytes, dtype=torch.int32, device="cpu")  # its bytes, as table rows
        self.caps: Optional[torch.Tensor] = None  # [bytes, 8] on the logits' device, made at the first step
        self.failed: Optional[str] = None  # why it stopped constraining (a token it refused)

    def catch_up(self, tokens: Sequence[int]) -> None:
        """Feed the answer's tokens after the ones already consumed (`tokens` is the answer so far)."""
        for token in tokens[self.consumed:]:
            if self.failed is None and not self.matcher.is_stopped() and not self.matcher.consume_token(token):
                self.failed = self.matcher.get_error() or f"token {token} was not allowed"
            self.consumed += 1

    def logit_cap(self, device) -> Optional[torch.Tensor]:
        """The next choice's cap on each logit, [vocab] float32 on `device`: +inf at the ids the grammar allows
        (they keep their logits), -inf at the others. None when the constraint no longer applies (it failed,
        which a matcher never does on tokens from its own masks)."""
        if self.failed is not None or self.matcher.is_error():
            return None
        words = self.words
        self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        if not words.any():  # the grammar is over (an end was chosen and the answer goes on: ignore_eos)
            for end in self.ends:
                words[end >> 5] |= np.uint32(1 << (end & 31))
        # each mask byte's 8 caps from a table (no per-id branch: a masked_fill by a bool mask is ~10x slower),
        # into buffers made once (fresh ones cost page faults, as much again)
        self.index.copy_(self.bytes)
        table = _cap_table(device)
        if self.caps is None or self.caps.device != table.device:
            self.caps = torch.empty((len(self.index), 8), dtype=torch.float32, device=table.device)
        torch.index_select(table, 0, upload(self.index, device, torch.int32), out=self.caps)
        return self.caps.view(-1)[:self.vocab]


def _cap_table(device) -> torch.Tensor:
    """[256, 8] float32 on `device`: row b holds, for i = 0..7, +inf where bit i of b is set, -inf where not."""
    device = torch.device(device)
    if device not in _CAP_TABLES:
        bits = (torch.arange(256, device="cpu")[:, None] >> torch.arange(8, device="cpu")) & 1
        host = torch.where(bits == 1, float("inf"), float("-inf"))
        _CAP_TABLES[device] = upload(host, device, torch.float32)
    return _CAP_TABLES[device]
