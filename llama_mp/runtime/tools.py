"""Llama 3.1, 3.2 and 3.3 tool calling: the prompt that offers tools, how calls and results are written
into a dialog, and how what the model writes is read back as calls.

The text follows what Meta's own stack renders (meta-llama/llama-models `models/llama3/prompt_templates/`
and `chat_format.py`, as llama-stack puts them together) and its documented examples (`prompt_format.md`
of Llama 3.1/3.3, `text_prompt_format.md` of Llama 3.2), written out here as plain strings so that the
whitespace is exactly what Meta's templates produce:

- Built-in tools (brave_search, wolfram_alpha, photogen, code_interpreter) are turned on by system lines:
  `Environment: ipython` (which alone turns on the code interpreter) and `Tools: brave_search, ...`. The
  model calls them as `<|python_tag|>brave_search.call(query="...")` and ends that message with
  `<|eom_id|>`, waiting for the tool's answer; written back into a dialog (Meta's `encode_message`), the
  tag stays only before code for the interpreter.
- Custom tools, Llama 3.1 ("json"): the system message says `Environment: ipython` and the knowledge
  cut-off and date, and a user message before the dialog lists the functions in Meta's JSON layout; the
  model answers `{"type": "function", "name": ..., "parameters": {...}}`.
- Custom tools, Llama 3.2 and 3.3 ("python_list"): the system message lists the functions and asks for
  the pythonic list `[f(a=1), g()]`, which allows several calls at once.
- Custom tools, Llama 4 (its only format, "python_list"): the same pythonic list and system message
  layout, with Llama 4's longer instructions (llama-stack's `llama4/prompt_templates`).
- A tool's result is a message of the `ipython` role (OpenAI's `tool` role).

Llama 4's chat format (Meta's `models/llama4/chat_format.py`) writes an assistant turn that calls
tools without a tag and ends it with `<|eom|>`, and the model marks code for the interpreter with
`<|python_start|>` ... `<|python_end|>` instead of Llama 3's `<|python_tag|>`.

Parsing is Meta's `decode_assistant_message` rules: a leading `<|python_tag|>` is dropped (Llama 4: a
leading `<|python_start|>`, and every `<|python_end|>`); then a
`<function=NAME>{...}` call, a whole-JSON call, a pythonic list (every call in it; Meta's code keeps
the first), a built-in `NAME.call(query="...")`, or, after `<|python_tag|>`, code for the interpreter.
Anything else is text.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import families
from ..errors import LlamaMPError

# Meta's BuiltinTool: brave_search, wolfram_alpha and photogen take a query; code_interpreter takes code.
QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
BUILTIN_TOOLS = QUERY_TOOLS + ("code_interpreter",)
FORMATS = ("json", "python_list")  # Llama 3.1 (and 3.2 vision) / Llama 3.2 text, 3.3 and 4
# A family's default format, the formats it has and how it marks code for the interpreter are its
# families.ToolRules (`_rules`).
# Llama 3.1's tool calling adds a role for a tool's output: "ipython" in Meta's format ("tool" in Meta's
# Python API and OpenAI's, written as "ipython"). It answers an assistant turn, which may carry `tool_calls`.
TOOL_ROLES = ("ipython", "tool")
KNOWLEDGE_LINE = "Cutting Knowledge Date: December 2023"

REQUIRED_PROMPT = "You MUST use one of the provided functions/tools to answer the user query."
NAMED_PROMPT = "You MUST use the tool `{}` to answer the user query."

_BUILTIN_CALL = re.compile(r'\b(?P<tool_name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_FUNCTION_TAG_CALL = re.compile(r"<function=(?P<function_name>[^}]+)>(?P<args>{.*?})")


@dataclass(frozen=True)
class Tool:
    """A tool offered to the model: a built-in one (by Meta's name) or a function with a description
    and a JSON schema for its arguments (an object schema: `properties`, `required`)."""

    name: str
    description: str = ""
    parameters: Dict[str, Any] = field(default_factory=dict)

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_TOOLS

    def arguments_schema(self) -> Dict[str, Any]:
        """The JSON schema a call's arguments must match (a built-in's are Meta's `query` or `code`)."""
        if self.builtin:
            key = "code" if self.name == "code_interpreter" else "query"
            return {"type": "object", "properties": {key: {"type": "string"}}, "required": [key],
                    "additionalProperties": False}
        return self.parameters or {"type": "object", "properties": {}}


@dataclass
class ToolCall:
    """A call the model made (or an earlier one given back in a dialog): a tool's name and its arguments."""

    name: str
    arguments: Dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


def today() -> str:
    """The date line's date as Meta writes it ("04 December 2026"), in UTC."""
    return datetime.now(timezone.utc).strftime("%d %B %Y")


# ----------------------------------------------------------------------------------------------------
# The prompt that offers tools


def _tojson(value) -> str:
    """Jinja's `tojson`, as Meta's templates write the list of required parameters."""
    text = json.dumps(value, sort_keys=True)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("'", "\\u0027"))


def _params(tool: Tool) -> List[Tuple[str, dict, bool]]:
    """(name, schema, required) of each parameter, in the schema's order (Meta's ToolParamDefinition)."""
    schema = tool.parameters or {}
    required = set(schema.get("required") or ())
    return [(name, prop if isinstance(prop, dict) else {}, name in required)
            for name, prop in (schema.get("properties") or {}).items()]


def _environment(tools: Sequence[Tool]) -> str:
    """The built-in tools' system lines: `Environment: ipython` when any tool is offered, and the
    built-ins other than the code interpreter (which the environment line alone turns on)."""
    text = "Environment: ipython\n" if tools else ""
    named = [t.name for t in tools if t.builtin and t.name != "code_interpreter"]
    if named:
        text += "Tools: " + ", ".join(named).strip()
    return text


def _json_functions(tools: Sequence[Tool]) -> str:
    """Llama 3.1's list of custom functions (a user message), in Meta's layout: each parameter shown as
    an object with its description, the required ones listed after."""
    text = ("Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            "Here is a list of functions in JSON format:\n")
    for tool in tools:
        params = _params(tool)
        text += ('{\n    "type": "function",\n    "function": {\n'
                 f'        "name": "{tool.name}",\n        "description": "{tool.description}",\n'
                 '        "parameters": {\n            "type": "object",\n            "properties": [')
        for i, (name, prop, _) in enumerate(params):
            text += ('\n                {\n'
                     f'                    "{name}": {{\n'
                     '                        "type": "object",\n'
                     f'                        "description": "{prop.get("description", "")}"\n'
                     '                    }\n                }' + ("," if i < len(params) - 1 else ""))
        text += ('\n            ],\n'
                 f'            "required": {_tojson([n for n, _, r in params if r])}\n'
                 '        }\n    }\n}\n')
    return text + "\nReturn function calls in JSON format."


def _rules(family: str) -> families.ToolRules:
    """The tool rules of the family called `family`, or an error if its chat format has none."""
    found = families.named(family)
    if found.tools is None:
        raise LlamaMPError(f"The {found.title} chat format has no tool calling; tools need a Llama 3.1-3.3 or "
                           "Llama 4 checkpoint.")
    return found.tools


def _python_list_functions(tools: Sequence[Tool], family: str = "llama3") -> str:
    """The system prompt for custom functions in the pythonic format (Llama 3.2/3.3's or Llama 4's): how to
    call them, and the list of them."""
    text = "[\n    "
    for j, tool in enumerate(tools):
        params = _params(tool)
        text += ('{\n'
                 f'        "name": "{tool.name}",\n        "description": "{tool.description}",\n'
                 '        "parameters": {\n            "type": "dict",\n'
                 f'            "required": {_tojson([n for n, _, r in params if r])},\n'
                 '            "properties": {')
        for i, (name, prop, _) in enumerate(params):
            text += (f'\n                "{name}": {{\n'
                     f'                    "type": "{_jinja_str(prop.get("type"))}",\n'
                     f'                    "description": "{_jinja_str(prop.get("description"))}"')
            if prop.get("default"):
                text += f',\n                    "default": "{_jinja_str(prop["default"])}"'
            text += "\n                }" + ("," if i < len(params) - 1 else "")
        text += "\n            }\n        }\n    }" + (",\n    " if j < len(tools) - 1 else "")
    return _rules(family).python_list_prompt + text + "\n]"


def _jinja_str(value) -> str:
    """A value as a Jinja template writes it: None as "None", anything else as str() does."""
    return str(value)


def tool_format(fmt: Optional[str], family: str) -> str:
    """The format tools are offered in for a tokenizer `family` ("llama3", "llama4"): `fmt`, or the family's
    own when None (its ToolRules.default_format); a LlamaMPError for one the family has not."""
    rules = _rules(family)
    fmt = rules.default_format if fmt is None else fmt
    if fmt not in FORMATS:
        raise LlamaMPError(f"The tool format must be one of {FORMATS} (Llama 3.1: json; 3.2, 3.3 and 4: "
                           f"python_list), got {fmt!r}.")
    if fmt not in rules.formats:
        raise LlamaMPError(f"{families.named(family).title} calls tools in {rules.formats_text} only (Meta's "
                           f"stack offers it no other format), but the tool format asked for is {fmt!r}: ask "
                           f"for {' or '.join(rules.formats)}, or leave the format out.")
    return fmt


def offer_tools(dialog: List[dict], tools: Sequence[Tool], fmt: str, choice_prompt: str = "",
                date: Optional[str] = None, family: str = "llama3") -> List[dict]:
    """`dialog` (checked, plain messages) with the messages that offer `tools` in format `fmt` (checked by
    tool_format), as Meta's stack writes them for Llama 3.1 ("json"), 3.2/3.3 ("python_list") or, with
    `family` "llama4", Llama 4; `choice_prompt` (one of REQUIRED_PROMPT, NAMED_PROMPT) ends the system
    message. Without tools the dialog is unchanged."""
    if not tools:
        return list(dialog)
    system = dialog[0]["content"] if dialog[0]["role"] == "system" else None
    rest = list(dialog[1:] if system is not None else dialog)
    custom = [t for t in tools if not t.builtin]
    if fmt == "json":
        text = _environment(tools) + "\n" + KNOWLEDGE_LINE + "\nToday Date: " + (date or today())
        if system is not None:
            text += "\n" + system
        if choice_prompt:
            text += "\n" + choice_prompt
        offered = [{"role": "system", "content": text}]
        if custom:
            offered.append({"role": "user", "content": _json_functions(custom)})
        return offered + rest
    builtins = [t for t in tools if t.builtin]
    text = _environment(builtins) + "\n" if builtins else ""
    if custom:
        text += _python_list_functions(custom, family) + "\n"
    if system is not None:
        text += system
    if choice_prompt:
        text += "\n" + choice_prompt
    return [{"role": "system", "content": text.strip("\n")}] + rest


# ----------------------------------------------------------------------------------------------------
# Calls in a dialog


def _python_value(value) -> str:
    """A value in Meta's pythonic call: strings in double quotes (as they are), lists, and objects as
    `{k=v}`."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (bool, int, float)) or value is None:
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_python_value(v)}" for k, v in value.items()) + "}"
    raise LlamaMPError(f"A tool call's argument cannot be {type(value).__name__} {value!r:.60}.")


def call_text(call: ToolCall, fmt: str) -> str:
    """One call as the model writes it (without `<|python_tag|>`), by Meta's `encode_tool_call`."""
    if call.name in QUERY_TOOLS:
        return f'{call.name}.call(query="{call.arguments.get("query", "")}")'
    if call.name == "code_interpreter":
        return str(call.arguments.get("code", ""))
    if fmt == "python_list":
        return f"[{call.name}(" + ", ".join(f"{k}={_python_value(v)}" for k, v in call.arguments.items()) + ")]"
    return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})


def calls_text(calls: Sequence[ToolCall], fmt: str, family: str = "llama3") -> Tuple[List[str], bool, bool]:
    """(texts, python_tag, eom) of an assistant turn's calls, each text encoded on its own after the content,
    as Meta's chat formats write them. Llama 3: `<|python_tag|>` before the content when the first call is
    the code interpreter's, and `<|eom_id|>` ending a turn of built-in calls (the stop reason the model gives
    them: it waits for the tool), `<|eot_id|>` any other. Llama 4: no tag, and `<|eom|>` ending any turn
    that calls. Several pythonic calls are one list, as the model writes them (Meta's code writes each as a
    list of its own)."""
    rules = _rules(family)
    eom = bool(calls) and (rules.eom_after_any_call or calls[0].name in BUILTIN_TOOLS)
    tag = bool(calls) and rules.code_interpreter_tag and calls[0].name == "code_interpreter"
    if fmt == "python_list" and len(calls) > 1 and not any(c.name in BUILTIN_TOOLS for c in calls):
        return ["[" + ", ".join(call_text(c, fmt)[1:-1] for c in calls) + "]"], tag, eom
    return [call_text(c, fmt) for c in calls], tag, eom


# ----------------------------------------------------------------------------------------------------
# Reading the model's answer


def _json_object(text: str) -> Optional[dict]:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _python_list(text: str) -> Optional[List[Tuple[str, dict]]]:
    """The calls of a pythonic list `[f(a=1), g()]` (keyword arguments of literal values), or None."""
    try:
        tree = ast.parse(text.strip())
    except (SyntaxError, ValueError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr) or not isinstance(tree.body[0].value, ast.List):
        return None
    calls = []
    for node in tree.body[0].value.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            calls.append((node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    return calls or None


def parse_calls(text: str, family: str = "llama3") -> Tuple[str, List[ToolCall]]:
    """(content, calls) of an assistant answer's text (its code tags, the family's ToolRules.code_tags,
    written as their names), by Meta's rules (see the module's docstring). With calls, the content is ""."""
    start, end = _rules(family).code_tags
    content = text.strip(" ")
    ipython = content.startswith(start)
    if ipython:
        content = content[len(start):]
        if end:
            content = content.replace(end, "")
    found: List[Tuple[str, dict]] = []
    tagged = _FUNCTION_TAG_CALL.search(content)
    whole = _json_object(content) if tagged is None else None
    if tagged is not None:
        args = _json_object(tagged.group("args").replace("'", '"'))
        if args is not None:
            found = [(tagged.group("function_name"), args)]
    elif whole is not None:
        if (whole.get("type") == "function" or "name" in whole) and isinstance(whole.get("name"), str) \
                and isinstance(whole.get("parameters"), dict):
            found = [(whole["name"], whole["parameters"])]
    elif _python_list(content) is not None:
        found = _python_list(content)
    else:
        builtin = _BUILTIN_CALL.search(content)
        if builtin is not None:
            found = [(builtin.group("tool_name"), {"query": builtin.group("query")})]
        elif ipython:
            found = [("code_interpreter", {"code": content})]
    calls = []
    for name, args in found:
        if name in QUERY_TOOLS and list(args) != ["query"] and args:  # a built-in called as a custom tool
            args = {"query": list(args.values())[0]}
        calls.append(ToolCall(name, args))
    return ("", calls) if calls else (content, [])


def call_schema(tools: Sequence[Tool]) -> Dict[str, Any]:
    """The JSON schema of one call to one of `tools`, in the whole-JSON form Meta's parser reads in every
    format: what a required or named tool choice constrains the answer to."""
    forms = [{"type": "object",
              "properties": {"type": {"const": "function"}, "name": {"const": t.name},
                             "parameters": t.arguments_schema()},
              "required": ["type", "name", "parameters"], "additionalProperties": False} for t in tools]
    return forms[0] if len(forms) == 1 else {"anyOf": forms}
