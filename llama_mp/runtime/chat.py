"""Chat formats: dialogs to prompt tokens, with Meta's rules.

The format follows the tokenizer's family. Llama 2 wraps turns in [INST] tags written as text, so Meta
refuses a dialog whose text contains those tags (`has_special_tags`, answered with UNSAFE_ERROR). Llama 3
marks turns with special token ids that no text can produce, so its dialogs need no such guard: text
that looks like a special token is encoded as the plain text it is.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple, TypedDict

from ..checks import JsonProblem, described, read_json_file, text_problem
from ..errors import LlamaMPError
from .tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
ROLES = ("system", "user", "assistant")
# Llama 3.1's tool calling adds a role for tool output ("ipython" in Meta's format); it needs tool
# definitions in the system prompt and eom_id handling, which this runner does not do.
TOOL_ROLES = ("ipython", "tool")


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
        if isinstance(msg, dict) and msg.get("role") in TOOL_ROLES:
            raise LlamaMPError(f"{where}, message {j} has role {msg['role']!r}: tool calls and tool output "
                               f"are not supported, only the roles {ROLES}. Give the tool's result to the "
                               "model as part of a user message instead.")
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise LlamaMPError(f"{where}, message {j} must be an object with role one of {ROLES} and a string "
                               f"content; got {described(msg)}.")
        if text_problem(msg["content"]):
            raise LlamaMPError(f"{where}, message {j}'s content {text_problem(msg['content'])}. Send UTF-8 text.")
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


def has_special_tags(dialog: Dialog, tokenizer: Optional[Tokenizer] = None) -> bool:
    """Whether Meta's Llama 2 guard refuses `dialog`: its text contains the [INST] / <<SYS>> tags, which
    would let a user forge turns. Never for a Llama 3 tokenizer, whose turn markers are special ids that
    text cannot produce."""
    if tokenizer is not None and tokenizer.family in ("llama3", "llama4"):
        return False
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Prompt tokens for a checked dialog, in the chat format of the tokenizer's family."""
    if tokenizer.family == "llama3":
        return _encode_llama3_dialog(tokenizer, dialog)
    if tokenizer.family == "llama4":
        from .llama4_tokenizer import encode_dialog as encode_llama4_dialog

        return encode_llama4_dialog(tokenizer, dialog)
    return _encode_llama2_dialog(tokenizer, dialog)


def _encode_llama2_dialog(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Each exchange is `<s>[INST] user [/INST] answer </s>`; a system message goes inside the first
    user turn, between <<SYS>> tags."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    tokens: List[int] = []
    for user, answer in zip(dialog[:-1:2], dialog[1::2]):
        tokens += tokenizer.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                   bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def _llama3_header(tokenizer: Tokenizer, role: str) -> List[int]:
    # The blank line after the header is encoded on its own, as Meta does, so that it never merges with
    # the first characters of the content into other tokens.
    return ([tokenizer.special_id("<|start_header_id|>")] + tokenizer.encode(role, bos=False, eos=False)
            + [tokenizer.special_id("<|end_header_id|>")] + tokenizer.encode("\n\n", bos=False, eos=False))


def _encode_llama3_dialog(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """`<|begin_of_text|>`, then per message `<|start_header_id|>role<|end_header_id|>` a blank line, the
    stripped content and `<|eot_id|>`, then an open assistant header for the model to complete. Markers
    are ids; contents are encoded as plain text."""
    tokens = [tokenizer.bos_id]
    for message in dialog:
        tokens += _llama3_header(tokenizer, message["role"])
        tokens += tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        tokens.append(tokenizer.special_id("<|eot_id|>"))
    return tokens + _llama3_header(tokenizer, "assistant")


def fit_dialog(tokenizer: Tokenizer, dialog: Dialog, max_prompt_tokens: int) -> Tuple[List[int], Dialog, int]:
    """(prompt tokens, dialog kept, exchanges dropped) for a checked dialog whose prompt must fit in
    `max_prompt_tokens`: a conversation that grew too long forgets its oldest user/assistant exchanges
    first, as a person forgets the start of a long talk, but keeps the system message, which says how to
    answer at all. If even the last user message alone (with the system message) is too long, a
    LlamaMPError says by how much, and nothing is dropped."""
    system = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = list(dialog[len(system):])
    dropped = 0
    while True:
        kept = system + turns
        tokens = encode_dialog(tokenizer, kept)
        if len(tokens) <= max_prompt_tokens:
            return tokens, kept, dropped
        if len(turns) == 1:
            with_system = " with the system message" if system else ""
            raise LlamaMPError(f"This message needs {len(tokens)} prompt tokens{with_system}, but at most "
                               f"{max_prompt_tokens} fit.")
        turns = turns[2:]
        dropped += 1


def load_dialogs(path: Optional[str]) -> List[Dialog]:
    """Dialogs from a JSON file (a list of dialogs, or one dialog), or the built-in examples."""
    if path is None:
        return EXAMPLE_DIALOGS
    if not isinstance(path, str):
        raise LlamaMPError(f"--dialogs must be the path of a JSON file, got {described(path)}.")
    if not os.path.isfile(path):
        raise LlamaMPError(f"Dialogs file {path!r} does not exist.")
    try:
        data = read_json_file(path)
    except JsonProblem as e:
        raise LlamaMPError(f"Dialogs file {path!r} {e.reason}. It should hold a list of dialogs, each a list of "
                           '{"role": ..., "content": ...} messages.') from None
    except OSError as e:
        raise LlamaMPError(f"Dialogs file {path!r} cannot be read ({e.strerror or e}).") from None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = [data]  # a single dialog
    if not isinstance(data, list) or not data:
        raise LlamaMPError(f"Dialogs file {path!r} must hold a non-empty JSON list of dialogs.")
    for i, dialog in enumerate(data):
        check_dialog(dialog, i)
    return data
