"""Chat formats: dialogs to prompt tokens, with Meta's rules.

The format follows the tokenizer's family. Llama 2 wraps turns in [INST] tags written as text, so Meta
refuses a dialog whose text contains those tags (`has_special_tags`, answered with UNSAFE_ERROR). Llama 3
marks turns with special token ids that no text can produce, so its dialogs need no such guard: text
that looks like a special token is encoded as the plain text it is.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, TypedDict

from .. import families
from ..checks import described, read_json_input, text_problem
from ..errors import LlamaMPError
from .tokenizer import Tokenizer
from .tools import TOOL_ROLES, Tool, ToolCall, calls_text, offer_tools
from .tools import tool_format as _tool_format

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
ROLES = ("system", "user", "assistant")


class Message(TypedDict, total=False):
    role: str
    content: str
    tool_calls: List[ToolCall]  # an assistant turn's calls (Llama 3 only)


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
    an assistant turn would have that answer encoded as if the user had said it. With tools (Llama 3),
    tool results (role ipython or tool) may follow an assistant turn, one after another, and the model
    answers them: the dialog may end with them, and an assistant turn follows them otherwise."""
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise LlamaMPError(f"{where} must be a non-empty list of messages like "
                           f'{{"role": "user", "content": "..."}}; got {described(dialog)}.')
    roles_known = ROLES + TOOL_ROLES
    for j, msg in enumerate(dialog):
        if not isinstance(msg, dict) or msg.get("role") not in roles_known or not isinstance(msg.get("content"), str):
            raise LlamaMPError(f"{where}, message {j} must be an object with role one of {roles_known} and a "
                               f"string content; got {described(msg)}.")
        if text_problem(msg["content"]):
            raise LlamaMPError(f"{where}, message {j}'s content {text_problem(msg['content'])}. Send UTF-8 text.")
        calls = msg.get("tool_calls")
        if calls is not None and (msg["role"] != "assistant" or not isinstance(calls, list)
                                  or not all(isinstance(c, ToolCall) for c in calls)):
            raise LlamaMPError(f"{where}, message {j}: only an assistant message has tool_calls, a list of "
                               f"ToolCall; got {described(calls)} in a {msg['role']!r} message.")
    roles = [m["role"] for m in dialog]
    if any(r in TOOL_ROLES for r in roles):
        _check_tool_turns(where, roles)
        return
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if j % 2 == 0 else "assistant" for j in range(len(turns))]
    if turns != expected or not turns:
        raise LlamaMPError(f"{where} must alternate user/assistant turns after an optional system message and "
                           f"end with a user turn; its roles are {roles}.")
    if turns[-1] != "user":
        raise LlamaMPError(f"{where} ends with an assistant turn, but the model answers the user's last message "
                           f"(its roles are {roles}). End it with a user message: drop the last assistant "
                           "message, or add what the user says next.")


def _check_tool_turns(where: str, roles: List[str]) -> None:
    """The order of a dialog with tool results: after an optional system message, a user turn; after a
    user turn an assistant one; after an assistant turn a user turn or tool results; after tool results
    more of them or an assistant turn; the last message the user's or a tool's."""
    turns = [("ipython" if r in TOOL_ROLES else r) for r in (roles[1:] if roles[0] == "system" else roles)]
    follows = {"user": ("assistant",), "assistant": ("user", "ipython"), "ipython": ("ipython", "assistant")}
    ordered = bool(turns) and turns[0] == "user" and all(b in follows.get(a, ()) for a, b in zip(turns, turns[1:]))
    if not ordered or turns[-1] == "assistant":
        raise LlamaMPError(f"{where} has tool results, so after an optional system message it must start with a "
                           "user turn, give tool results (role ipython or tool) only after an assistant turn or "
                           "another result, follow them with an assistant turn, and end with a user message or "
                           f"a tool result; its roles are {roles}.")


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
    if tokenizer is not None and not families.named(tokenizer.family).text_turn_markers:
        return False
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog, tools: Sequence[Tool] = (), tool_format: Optional[str] = None,
                  choice_prompt: str = "", date: Optional[str] = None) -> List[int]:
    """Prompt tokens for a checked dialog, in the chat format of the tokenizer's family. `tools` (Llama 3
    and 4) are offered to the model in `tool_format` (runtime/tools.py: "json" for Llama 3.1, "python_list"
    for 3.2, 3.3 and 4; None: the family's own, tools.DEFAULT_FORMATS), with `choice_prompt` and the date
    line's `date` (today's by default)."""
    family = families.named(tokenizer.family)
    if family.tools is not None:
        fmt = _tool_format(tool_format, family.name) if tools or _has_tool_turns(dialog) else None
        offered = offer_tools(list(dialog), tools, fmt, choice_prompt, date, family.name)
        return family.encode_dialog(tokenizer, offered, fmt or family.tools.default_format)
    if tools or _has_tool_turns(dialog):
        raise LlamaMPError(f"Tool calling needs a Llama 3.1-3.3 or Llama 4 checkpoint (its tokenizer has the ipython "
                           f"role); this is a {family.name} tokenizer, whose chat format here has no tools. Put the "
                           "tool's description and results in user messages instead.")
    return family.encode_dialog(tokenizer, dialog, None)


def _has_tool_turns(dialog: Dialog) -> bool:
    return any(m["role"] in TOOL_ROLES or m.get("tool_calls") for m in dialog)


def encode_llama2_dialog(tokenizer: Tokenizer, dialog: Dialog, tool_format: Optional[str] = None) -> List[int]:
    """Llama 2's chat format (families/llama.py): each exchange is `<s>[INST] user [/INST] answer </s>`; a
    system message goes inside the first user turn, between <<SYS>> tags. It has no tools (`tool_format`
    None)."""
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


def encode_llama3_dialog(tokenizer: Tokenizer, dialog: Dialog, tool_format: str = "json") -> List[int]:
    """Llama 3's chat format (families/llama3.py): `<|begin_of_text|>`, then per message `<|start_header_id|>role<|end_header_id|>` a blank line, the
    stripped content and `<|eot_id|>`, then an open assistant header for the model to complete. Markers
    are ids; contents are encoded as plain text. A tool's result has the ipython role; an assistant turn's
    tool calls follow its content as Meta's chat format writes them (runtime/tools.calls_text: code for the
    interpreter after `<|python_tag|>`, built-in calls ending with `<|eom_id|>`)."""
    tokens = [tokenizer.bos_id]
    for message in dialog:
        tokens += _llama3_header(tokenizer, "ipython" if message["role"] in TOOL_ROLES else message["role"])
        calls, tag, eom = calls_text(message.get("tool_calls") or (), tool_format)
        if tag:
            tokens.append(tokenizer.special_id(families.named(tokenizer.family).tools.code_tags[0]))
        for text in [message["content"].strip()] + calls:
            tokens += tokenizer.encode(text, bos=False, eos=False)
        tokens.append(tokenizer.special_id("<|eom_id|>" if eom else "<|eot_id|>"))
    return tokens + _llama3_header(tokenizer, "assistant")


def fit_dialog(tokenizer: Tokenizer, dialog: Dialog, max_prompt_tokens: int, tools: Sequence[Tool] = (),
               tool_format: Optional[str] = None) -> Tuple[List[int], Dialog, int]:
    """(prompt tokens, dialog kept, exchanges dropped) for a checked dialog whose prompt (with `tools`
    offered in `tool_format`, as encode_dialog does) must fit in `max_prompt_tokens`: a conversation that
    grew too long forgets its oldest exchanges first (a user message and all that answered it: the
    assistant's turns, tool calls and results), as a person forgets the start of a long talk, but keeps
    the system message, which says how to answer at all. If even the last exchange alone (with the system
    message) is too long, a LlamaMPError says by how much, and nothing is dropped."""
    system = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = list(dialog[len(system):])
    dropped = 0
    while True:
        kept = system + turns
        tokens = encode_dialog(tokenizer, kept, tools, tool_format)
        if len(tokens) <= max_prompt_tokens:
            return tokens, kept, dropped
        later = next((j for j in range(1, len(turns)) if turns[j]["role"] == "user"), None)
        if later is None:
            with_system = " with the system message" if system else ""
            raise LlamaMPError(f"This message needs {len(tokens)} prompt tokens{with_system}, but at most "
                               f"{max_prompt_tokens} fit.")
        turns = turns[later:]
        dropped += 1


def load_dialogs(path: Optional[str]) -> List[Dialog]:
    """Dialogs from a JSON file (a list of dialogs, or one dialog), or the built-in examples."""
    if path is None:
        return EXAMPLE_DIALOGS
    data = read_json_input(path, "--dialogs", "Dialogs file",
                           'a list of dialogs, each a list of {"role": ..., "content": ...} messages')
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = [data]  # a single dialog
    if not isinstance(data, list) or not data:
        raise LlamaMPError(f"Dialogs file {path!r} must hold a non-empty JSON list of dialogs.")
    for i, dialog in enumerate(data):
        check_dialog(dialog, i)
    return data
