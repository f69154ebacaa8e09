"""Llama 4's tokenizer and chat format (Meta's models/llama4/tokenizer.py and chat_format.py).

The file is a tiktoken BPE file like Llama 3's (Meta's has 200,000 ranks); the code adds 2,048 special
tokens after them (202,048 ids): the basic five (`<|begin_of_text|>`, `<|end_of_text|>`, three fim
tokens), the text post-training ones (`<|header_start|>`, `<|header_end|>`, `<|eom|>`, `<|eot|>`, ...),
the vision and reasoning ones, then numbered reserved ones. Text is split by the o200k pattern. As for
Llama 3, typed special-token names stay text; only code puts special ids into a prompt.

Which tiktoken file is which: Meta's Llama 3 file has 128,000 ranks, Llama 4's 200,000; any other
(a small test file) is read as the family the checkpoint's params.json names (`is_llama4_file`).
"""

from __future__ import annotations

from typing import List, Optional

from .tokenizer import TiktokenTokenizer
from .tools import TOOL_ROLES, calls_text

LLAMA4_BASE_TOKENS = 200_000
LLAMA3_BASE_TOKENS = 128_000
LLAMA4_SPECIAL_COUNT = 2048


def _reserved(name: str, count: int, start: int = 0) -> List[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


_BASIC = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
_TEXT_POST_TRAIN = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"] + _reserved(
    "text_post_train", 6) + ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"] + _reserved(
    "text_post_train", 61, 8)
_VISION = ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
           "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"] + _reserved(
    "vision", 4, 2) + ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"] + _reserved("vision", 1041, 7)
_REASONING = _reserved("reasoning", 8) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
_NAMED = _BASIC + _TEXT_POST_TRAIN + _VISION + _REASONING
LLAMA4_SPECIALS = tuple(_NAMED + [f"<|reserved_special_token_{i}|>" for i in range(LLAMA4_SPECIAL_COUNT - len(_NAMED))])

# OpenAI's o200k pattern, as Meta's Llama 4 tokenizer uses it.
O200K_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def is_llama4_file(model_path: str, family: Optional[str] = None) -> bool:
    """Whether the tiktoken file at `model_path` is to be read as Llama 4's (see the module docstring)."""
    with open(model_path, "rb") as f:
        data = f.read()
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if lines == LLAMA4_BASE_TOKENS:
        return True
    if lines == LLAMA3_BASE_TOKENS:
        return False
    return family == "llama4"


class Llama4Tokenizer(TiktokenTokenizer):
    """Llama 4: byte-level BPE plus 2048 special tokens; stops at `<|end_of_text|>`, `<|eom|>`, `<|eot|>`."""

    family = "llama4"
    specials = LLAMA4_SPECIALS
    split_pattern = O200K_PATTERN

    def _set_special_ids(self) -> None:
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad|>"]
        self.stop_ids = [self.eos_id, self.special_tokens["<|eom|>"], self.special_tokens["<|eot|>"]]


def _header(tokenizer, role: str) -> List[int]:
    """`<|header_start|>role<|header_end|>` and a blank line, encoded on its own as Meta does."""
    return ([tokenizer.special_id("<|header_start|>")] + tokenizer.encode(role, bos=False, eos=False)
            + [tokenizer.special_id("<|header_end|>")] + tokenizer.encode("\n\n", bos=False, eos=False))


def encode_dialog(tokenizer, dialog, tool_format: str = "python_list") -> List[int]:
    """Meta's Llama 4 chat format: `<|begin_of_text|>`, per message its header, the content as plain text
    (not stripped: Meta's Llama 4 code keeps it as given) and `<|eot|>`, then an open assistant header for
    the model to complete. A tool's result (role ipython or tool) is headed "ipython"; it and an assistant
    turn with tool calls (each written after the content, runtime/tools.calls_text) end with `<|eom|>`."""
    tokens = [tokenizer.bos_id]
    for message in dialog:
        tool = message["role"] in TOOL_ROLES
        tokens += _header(tokenizer, "ipython" if tool else message["role"])
        calls, _, eom = calls_text(message.get("tool_calls") or (), tool_format, "llama4")
        for text in [message["content"]] + calls:
            tokens += tokenizer.encode(text, bos=False, eos=False)
        tokens.append(tokenizer.special_id("<|eom|>" if tool or eom else "<|eot|>"))
    return tokens + _header(tokenizer, "assistant")
