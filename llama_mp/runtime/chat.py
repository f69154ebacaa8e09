"""Llama 2 chat format: dialogs to prompt tokens, with Meta's rules and its special-tag guard."""

from __future__ import annotations

import json
import os
from typing import List, Optional, TypedDict

from ..checks import described
from ..errors import LlamaMPError
from .tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
ROLES = ("system", "user", "assistant")


class Message(TypedDict):
    role: str
    content: str


Dialog = List[Message]

EXAMPLE_DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "What is the recipe of mayonnaise?"}],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": "The Eiffel Tower, the Louvre and Notre-Dame are the classics."},
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
]


def check_dialog(dialog, index: int) -> None:
    """Raise a clear error unless `dialog` is [system?] user (assistant user)* with string contents:
    Meta's rule. The model answers the last message, so it must be the user's: a dialog that ended with
    an assistant turn would have that answer encoded as if the user had said it."""
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise LlamaMPError(f"{where} must be a non-empty list of messages like "
                           f'{{"role": "user", "content": "..."}}; got {described(dialog)}.')
    for j, msg in enumerate(dialog):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise LlamaMPError(f"{where}, message {j} must be an object with role one of {ROLES} and a string "
                               f"content; got {described(msg)}.")
    roles = [m["role"] for m in dialog]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if j % 2 == 0 else "assistant" for j in range(len(turns))]
    if turns != expected or not turns:
        raise LlamaMPError(f"{where} must alternate user/assistant turns after an optional system message and "
                           f"end with a user turn; its roles are {roles}.")
    if turns[-1] != "user":
        raise LlamaMPError(f"{where} ends with an assistant turn, but the model answers the user's last message "
                           f"(its roles are {roles}). End it with a user message: drop the last assistant "
                           "message, or add what the user says next.")


def check_dialogs(dialogs) -> None:
    """Raise a clear error unless `dialogs` is a non-empty list of dialogs, each valid (`check_dialog`)."""
    if isinstance(dialogs, (list, tuple)) and dialogs and all(isinstance(m, dict) for m in dialogs):
        raise LlamaMPError("dialogs must be a list of dialogs, but this is one dialog (a list of messages): "
                           "wrap it in a list, [dialog].")
    if not isinstance(dialogs, (list, tuple)) or not dialogs:
        raise LlamaMPError("dialogs must be a non-empty list of dialogs, each a list of "
                           f'{{"role": ..., "content": ...}} messages; got {described(dialogs)}.')
    for i, dialog in enumerate(dialogs):
        check_dialog(dialog, i)


def has_special_tags(dialog: Dialog) -> bool:
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Prompt tokens for a checked dialog: each exchange is `<s>[INST] user [/INST] answer </s>`."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    tokens: List[int] = []
    for user, answer in zip(dialog[:-1:2], dialog[1::2]):
        tokens += tokenizer.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                   bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def load_dialogs(path: Optional[str]) -> List[Dialog]:
    """Dialogs from a JSON file (a list of dialogs, or one dialog), or the built-in examples."""
    if path is None:
        return EXAMPLE_DIALOGS
    if not isinstance(path, str):
        raise LlamaMPError(f"--dialogs must be the path of a JSON file, got {described(path)}.")
    if not os.path.isfile(path):
        raise LlamaMPError(f"Dialogs file {path!r} does not exist.")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamaMPError(f"Dialogs file {path!r} is not valid JSON ({e}). It should hold a list of dialogs, "
                           'each a list of {"role": ..., "content": ...} messages.') from None
    except OSError as e:
        raise LlamaMPError(f"Dialogs file {path!r} cannot be read ({e.strerror or e}).") from None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = [data]  # a single dialog
    if not isinstance(data, list) or not data:
        raise LlamaMPError(f"Dialogs file {path!r} must hold a non-empty JSON list of dialogs.")
    for i, dialog in enumerate(data):
        check_dialog(dialog, i)
    return data
