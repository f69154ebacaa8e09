"""OpenAI's API shapes: request validation and the JSON of responses, chunks and errors.

Everything a client sends is checked here, on rank 0, before any work is queued: a bad request is
answered with OpenAI's error JSON (status 400, 404, ...) and never reaches the batch or the other
ranks. The rules for sampling values are the runtime's own (`check_sampling`), so the server and the
command line accept exactly the same values. Every field of a body is in one table (`FIELDS`): implemented,
refused unless its value asks for nothing (tools, suffix, ...: a 400 naming it, never silently
dropped), or ignored for a stated reason (`user`); a field the table does not know is a 400 too, as OpenAI
answers. An explicit JSON null means "not given", for every field.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, List, Optional, Sequence, Tuple

from .. import families
from ..checks import MAX_BATCH, MAX_SIZE, MAX_TOKENS, Domain, OptionError, described, is_finite_number, is_int, is_number
from ..errors import LlamaMPError
from ..runtime.chat import UNSAFE_ERROR, check_dialog, encode_dialog, has_special_tags
from ..runtime.tools import NAMED_PROMPT, REQUIRED_PROMPT, Tool, ToolCall, call_schema, parse_calls
from ..runtime.sampling import check_sampling
from ..runtime.tokenizer import Tokenizer, prompt_text

# `stop`: any number of strings (vLLM has no limit, and lm-eval sends its tasks' `until` lists whole), within
# a bound on each string and on all of them together, so the text held back and searched stays small
MAX_STOP_CHARS, MAX_STOP_TOTAL_CHARS = 256, 2048
MAX_LOGPROBS = 5             # completions: `logprobs` (top alternatives per token), OpenAI's maximum
MAX_TOP_LOGPROBS = 20        # chat: `top_logprobs`, OpenAI's maximum
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default `max_tokens` for /v1/completions


class ApiError(Exception):
    """A request refused with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


@dataclass(frozen=True)
class Limits:
    """What this server can take: the model's context, its name, and the bounds on a request."""

    model_name: str
    max_seq_len: int
    max_prompts: int  # prompts in one /v1/completions request (each takes a batch slot)
    # how tools are offered and called (runtime/tools.py): json (Llama 3.1) or python_list (3.2, 3.3, 4); None:
    # the family's own (json for Llama 3, python_list for Llama 4)
    tool_format: Optional[str] = None


@dataclass(frozen=True)
class Choosing:
    """OpenAI's and vLLM's further token choice settings of a sequence (runtime/sampling.py applies them;
    the defaults change nothing). `stop_token_ids` end it as the end-of-text token does (even with
    ignore_eos); before `min_tokens` tokens neither they nor the end-of-text token can be chosen, and
    stop strings are looked for only in the text from the min_tokens-th token on."""

    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Tuple[Tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop_token_ids: Tuple[int, ...] = ()


@dataclass
class SequenceSpec:
    """One prompt to continue, as validated: everything the scheduler needs to run and stop it."""

    prompt_ids: List[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: List[str]
    logprobs: Optional[int]   # None: no logprobs; k >= 0: the chosen token's, plus k alternatives
    ignore_eos: bool = False
    echo: bool = False          # the answer's text starts with the prompt's
    after_prompt: bool = True   # the text reads on from the prompt's (completions); chat: decoded alone
    choosing: Choosing = field(default_factory=Choosing)
    sample: int = 0             # which of the request's `n` samples of its prompt this is
    grammar: Optional[str] = None  # the grammar its answer must match (runtime/grammar.py), if any

    @property
    def score_prompt(self) -> bool:
        """`echo` with `logprobs`: the prompt's tokens get their logprobs too."""
        return self.echo and self.logprobs is not None


@dataclass
class Job:
    """A validated request: one sequence per prompt, and how to shape the answer."""

    kind: str  # "completion" or "chat"
    model: str
    sequences: List[SequenceSpec]
    stream: bool
    include_usage: bool = False
    echo_texts: List[str] = field(default_factory=list)  # completions with echo: each prompt's text
    tools: List[Tool] = field(default_factory=list)  # chat: the tools the answer may call (none: text only)
    parallel_tool_calls: bool = True                 # chat: whether an answer may make several calls
    family: str = "llama3"                           # chat with tools: whose rules read the calls (families/)
    id: str = ""
    created: int = 0

    def __post_init__(self):
        prefix = "cmpl-" if self.kind == "completion" else "chatcmpl-"
        self.id = self.id or prefix + uuid.uuid4().hex[:24]
        self.created = self.created or int(time.time())


# ----------------------------------------------------------------------------------------------------
# Field rules


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false, got {described(value)}.", name)
    return value


def _int(body: dict, name: str, default: Optional[int], low: int, high: int, meaning: str) -> Optional[int]:
    """An integer field from `low` to `high`, by the command line's rule (checks.Domain), in the request's
    spelling; the bound keeps a 400-digit number out of every later message and sum."""
    return _in_domain(body, name, default, Domain(True, low, high, meaning))


def _in_domain(body: dict, name: str, default, domain: Domain):
    """Field `name` of the request, checked against `domain` (a 400 naming it), or `default` when absent."""
    value = body.get(name)
    if value is None:
        return default
    try:
        domain.check(name, value, "'{}'")
    except OptionError as e:
        raise invalid(str(e), name) from None
    return value


def check_model(body: dict, limits: Limits) -> str:
    """The model the request names: this server's (the only one), or absent. Another name is a 404, as
    OpenAI answers for a model that does not exist."""
    model = body.get("model")
    if model is None:
        return limits.model_name
    if not isinstance(model, str):
        raise invalid(f"'model' must be a string, got {described(model)}.", "model")
    if model != limits.model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{limits.model_name}' "
                            "(GET /v1/models lists it).", "invalid_request_error", "model", "model_not_found")
    return model


@dataclass(frozen=True)
class Rule:
    """How the server treats one request field. "implemented": parsed and honoured. "refused": accepted only
    with one of `defaults` (values that ask for nothing more than leaving it out), else a 400 saying `why`.
    "ignored": accepted and without effect on the answer, for the reason `why`."""

    treatment: str
    why: str = ""
    defaults: tuple = ()


def _refused(why: str, *defaults) -> Rule:
    return Rule("refused", why, defaults)


IMPLEMENTED = Rule("implemented")
_BOTH = {
    "model": IMPLEMENTED, "temperature": IMPLEMENTED, "top_p": IMPLEMENTED, "seed": IMPLEMENTED,
    "stop": IMPLEMENTED, "stream": IMPLEMENTED, "stream_options": IMPLEMENTED, "max_tokens": IMPLEMENTED,
    "logprobs": IMPLEMENTED,
    "ignore_eos": IMPLEMENTED,  # vLLM's extension: generate max_tokens even past the end-of-text token
    "n": IMPLEMENTED, "presence_penalty": IMPLEMENTED, "frequency_penalty": IMPLEMENTED, "logit_bias": IMPLEMENTED,
    "top_k": IMPLEMENTED, "min_p": IMPLEMENTED, "min_tokens": IMPLEMENTED, "stop_token_ids": IMPLEMENTED,  # vLLM's
    "guided_json": IMPLEMENTED, "guided_regex": IMPLEMENTED, "guided_choice": IMPLEMENTED,  # vLLM's structured output
    "repetition_penalty": _refused("the repetition penalty is not implemented (presence_penalty and "
                                   "frequency_penalty are)", 1),
    "include_stop_str_in_output": _refused("a stop string is always cut from the text", False),
    "use_beam_search": _refused("beam search is not implemented", False),
    "user": Rule("ignored", "an end user's id for a provider's abuse monitoring: it changes no answer, and this "
                            "server keeps no record of it"),
}
COMPLETION_FIELDS = dict(_BOTH, **{
    "prompt": IMPLEMENTED, "echo": IMPLEMENTED,
    "best_of": IMPLEMENTED,  # only as n: ranking more samples than are returned is refused (parse_completion)
    "suffix": _refused("insertion (text after the completion) is not implemented", ""),
})
COMPLETION_FIELDS["response_format"] = _refused("structured output is for chat completions (response_format "
                                                "of /v1/chat/completions)", {"type": "text"})
CHAT_FIELDS = dict(_BOTH, **{
    "messages": IMPLEMENTED, "max_completion_tokens": IMPLEMENTED, "top_logprobs": IMPLEMENTED,
    "tools": IMPLEMENTED, "tool_choice": IMPLEMENTED, "parallel_tool_calls": IMPLEMENTED,
    "response_format": IMPLEMENTED,
    "functions": _refused("the deprecated function calls are not implemented; send `tools`", []),
    "function_call": _refused("the deprecated function calls are not implemented; send `tool_choice`", "none"),
    "modalities": _refused("this server writes text only", ["text"]),
    "audio": _refused("this server writes text only"),
    "prediction": _refused("predicted outputs are not implemented"),
    "reasoning_effort": _refused("these models have no reasoning setting"),
    "web_search_options": _refused("web search is not implemented"),
    "store": _refused("this server stores no completions", False),
    "metadata": Rule("ignored", "tags for stored completions; this server stores none"),
    "service_tier": Rule("ignored", "this server has one processing tier"),
})
MESSAGE_FIELDS = {
    "role": IMPLEMENTED, "content": IMPLEMENTED,
    "name": _refused("Meta's chat formats have no participant names"),
    "tool_calls": IMPLEMENTED,
    "tool_call_id": Rule("ignored", "Meta's format gives a tool's results in order after the turn that called it, "
                                    "without ids"),
    "function_call": _refused("the deprecated function calls are not implemented; send `tool_calls`"),
    "refusal": _refused("a refusal text of an earlier answer cannot be given to these models"),
    "audio": _refused("this server reads text only"),
}
PART_FIELDS = {"type": IMPLEMENTED, "text": IMPLEMENTED}  # a text part of a message's content
TOOL_FIELDS = {"type": IMPLEMENTED, "function": IMPLEMENTED}  # an entry of `tools`
FUNCTION_FIELDS = {"name": IMPLEMENTED, "description": IMPLEMENTED, "parameters": IMPLEMENTED, "strict": IMPLEMENTED}
CALL_FIELDS = {"id": IMPLEMENTED, "type": IMPLEMENTED, "function": IMPLEMENTED}  # an assistant message's tool call
CALLED_FIELDS = {"name": IMPLEMENTED, "arguments": IMPLEMENTED}
RESPONSE_FORMAT_FIELDS = {"type": IMPLEMENTED, "json_schema": IMPLEMENTED}
JSON_SCHEMA_FIELDS = {"name": IMPLEMENTED, "description": IMPLEMENTED, "schema": IMPLEMENTED, "strict": IMPLEMENTED}
STREAM_OPTION_FIELDS = {"include_usage": IMPLEMENTED}
# vLLM's /tokenize and /detokenize, which lm-eval's `local-completions` uses for its tokenizer
TOKENIZE_FIELDS = {
    "model": IMPLEMENTED, "prompt": IMPLEMENTED, "add_special_tokens": IMPLEMENTED, "return_token_strs": IMPLEMENTED,
    "messages": _refused("tokenizing a chat is not implemented here; /v1/chat/completions reports its prompt's "
                         "length in `usage`"),
}
DETOKENIZE_FIELDS = {"model": IMPLEMENTED, "tokens": IMPLEMENTED}


def _same(value, default) -> bool:
    """JSON equality that keeps true apart from 1 and "0" apart from 0."""
    if isinstance(value, bool) or isinstance(default, bool):
        return isinstance(value, bool) and isinstance(default, bool) and value == default
    if is_number(default):
        return is_number(value) and value == default
    return type(value) is type(default) and value == default


def given(obj: dict, table: dict, where: str, param: Optional[str] = None) -> dict:
    """The fields of `obj` that ask for something, checked against `table`: nulls are dropped ("not
    given"), unknown fields and refused fields with a value that asks for more are a 400 naming them,
    and what remains is what the parsers read. `where` names the object in messages."""
    out = {}
    for name, value in obj.items():
        if value is None:
            continue
        rule = table.get(name)
        if rule is None:
            raise invalid(f"{where} has an unknown field {name!r}: this server does not know what it asks for, so it "
                          f"cannot honour it. Leave it out (known fields: {', '.join(sorted(table))}).",
                          param or name, "unknown_field")
        if rule.treatment == "refused":
            if any(_same(value, d) for d in rule.defaults):
                continue
            allowed = f" (or send {' or '.join(json.dumps(d) for d in rule.defaults)})" if rule.defaults else ""
            raise invalid(f"'{name}' is not supported by this server: {rule.why}. Leave it out{allowed}; got "
                          f"{described(value)}.", param or name, "unsupported_field")
        if rule.treatment == "implemented":
            out[name] = value
    return out


def _stop(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"'stop' must be a string or a list of strings, got {described(stop)}.", "stop")
    longest, total = max(map(len, stops), default=0), sum(map(len, stops))
    if longest > MAX_STOP_CHARS or total > MAX_STOP_TOTAL_CHARS:
        raise invalid(f"'stop' strings may have at most {MAX_STOP_CHARS} characters each and "
                      f"{MAX_STOP_TOTAL_CHARS} all together; got {len(stops)} strings, the longest of {longest} "
                      f"characters, {total} in all.", "stop")
    return [s for s in stops if s]


def _sampling(body: dict, default_temperature: float = 1.0):
    temperature, top_p = body.get("temperature", default_temperature), body.get("top_p", 1.0)
    try:  # the runtime's own rule, in the request's spelling; a 400-digit integer is refused, not converted
        check_sampling(temperature, top_p, 0, "'{}'")
    except OptionError as e:
        raise invalid(str(e), e.option) from None
    seed = body.get("seed")
    if seed is not None and not is_int(seed):
        raise invalid(f"'seed' must be an integer, got {described(seed)}.", "seed")
    return float(temperature), float(top_p), None if seed is None else seed % (2 ** 64)


MAX_PENALTY = 2.0  # OpenAI's bound on presence_penalty and frequency_penalty (either sign)
MAX_BIAS = 100.0   # OpenAI's bound on a logit_bias value (either sign): -100 bans a token, 100 all but forces it


def _ranged(body: dict, name: str, default: float, low: float, high: float, meaning: str) -> float:
    """A number field from `low` to `high`, by the command line's rule (checks.Domain), in the request's spelling."""
    return float(_in_domain(body, name, default, Domain(False, low, high, meaning)))


def _token_id(value, tokenizer: Tokenizer) -> bool:
    return is_int(value) and 0 <= value < tokenizer.n_words


def _choosing(body: dict, tokenizer: Tokenizer) -> Choosing:
    """The further token choice settings of a request (see `Choosing`), checked."""
    vocab = tokenizer.n_words
    top_k = _int(body, "top_k", 0, -1, MAX_SIZE, "likeliest tokens kept; -1 or 0 keeps them all")
    bias = body.get("logit_bias", {})
    if not isinstance(bias, dict):
        raise invalid(f"'logit_bias' must be an object mapping token ids to numbers, got {described(bias)}.",
                      "logit_bias")
    pairs = []
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else None
        if token is None or not 0 <= token < vocab:
            raise invalid(f"'logit_bias' keys must be token ids in [0, {vocab}), got {key!r}.", "logit_bias")
        if not is_finite_number(value) or not -MAX_BIAS <= value <= MAX_BIAS:
            raise invalid(f"'logit_bias' values must be numbers from {-MAX_BIAS:g} to {MAX_BIAS:g}; token {key} has "
                          f"{described(value)}.", "logit_bias")
        pairs.append((token, float(value)))
    stop_ids = body.get("stop_token_ids", [])
    if not isinstance(stop_ids, list) or not all(_token_id(t, tokenizer) for t in stop_ids):
        raise invalid(f"'stop_token_ids' must be a list of token ids in [0, {vocab}), got {described(stop_ids)}.",
                      "stop_token_ids")
    return Choosing(max(top_k, 0), _ranged(body, "min_p", 0.0, 0.0, 1.0, "the least probability kept, relative to the likeliest"),
                    _ranged(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY, "subtracted once a token has appeared"),
                    _ranged(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY, "subtracted per time a token has appeared"), tuple(sorted(pairs)),
                    _int(body, "min_tokens", 0, 0, MAX_TOKENS, "tokens before a stop may end the answer"), tuple(sorted(set(stop_ids))))


def _samples(body: dict, specs: List[SequenceSpec], limits: Limits, best_of: bool) -> List[SequenceSpec]:
    """Each spec `n` times, as OpenAI orders choices (prompt by prompt): independent samples, each with its own
    seed (a request's `seed` s gives sample j the seed s + j), each prefilled on its own. `best_of` (completions)
    is accepted as n: ranking more samples than are returned is not implemented."""
    n = _int(body, "n", 1, 1, MAX_BATCH, "independent samples per prompt")
    if len(specs) * n > limits.max_prompts:
        raise invalid(f"'n' ({n}) times {len(specs)} prompt(s) asks for {len(specs) * n} sequences; one request may "
                      f"hold at most {limits.max_prompts} (each takes a batch slot: --max_batch_size).", "n")
    if best_of:
        most = _int(body, "best_of", n, 1, MAX_BATCH, "samples made per prompt")
        if most != n:
            raise invalid(f"'best_of' ({most}) must equal 'n' ({n}) here: "
                          + ("it cannot be below n." if most < n else "this server returns every sample it makes and "
                             "does not rank more of them than it returns."), "best_of")
    return [replace(spec, sample=j, seed=None if spec.seed is None else (spec.seed + j) % 2 ** 64)
            for spec in specs for j in range(n)]


def _check_min_tokens(specs: List[SequenceSpec]) -> None:
    for spec in specs:
        if spec.choosing.min_tokens and spec.grammar is not None:  # the grammar decides where the answer ends
            raise invalid("'min_tokens' cannot be combined with a constrained answer (tool_choice, response_format, "
                          "guided_*), whose grammar says where it may end.", "min_tokens")
        if spec.choosing.min_tokens > spec.max_tokens:
            raise invalid(f"'min_tokens' ({spec.choosing.min_tokens}) is more than the {spec.max_tokens} tokens this "
                          "answer may have (max_tokens, or the room the context leaves).", "min_tokens")


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid(f"'stream_options' must be an object, got {described(options)}.", "stream_options")
    if not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    return _bool(given(options, STREAM_OPTION_FIELDS, "'stream_options'", "stream_options"), "include_usage")


def _room(prompt: List[int], limits: Limits, max_tokens: Optional[int], index: Optional[int] = None,
          field: str = "max_tokens") -> int:
    """The number of tokens to generate: `max_tokens`, or (None) all the room the context leaves. A prompt
    that leaves no room, or max_tokens past it, is a 400 in OpenAI's words."""
    where = "" if index is None else f" (prompt {index})"
    context = limits.max_seq_len
    if len(prompt) >= context:
        raise invalid(f"This model's maximum context length is {context} tokens. However, your prompt{where} has "
                      f"{len(prompt)} tokens, which leaves no room for the completion. Please shorten it.",
                      "messages" if index is None else "prompt", "context_length_exceeded")
    if max_tokens is None:
        return context - len(prompt)
    if len(prompt) + max_tokens > context:
        raise invalid(f"This model's maximum context length is {context} tokens. However, you requested "
                      f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt{where}, {max_tokens} for the "
                      f"completion). Please reduce the prompt or {field}.", field, "context_length_exceeded")
    return max_tokens


def _prompts(prompt: Any, tokenizer: Tokenizer, limits: Limits) -> List[List[int]]:
    """`prompt` as token id lists: a string, a list of strings, a list of ids or a list of id lists."""
    vocab = tokenizer.n_words
    form = "'prompt' must be a string, a list of strings, a list of token ids, or a list of lists of token ids"
    if isinstance(prompt, str):
        items: List[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise invalid(f"{form}; got {described(prompt)}.", "prompt")
    if len(items) > limits.max_prompts:
        raise invalid(f"At most {limits.max_prompts} prompts fit in one request (the server's --max_batch_size); "
                      f"got {len(items)}. Send them in several requests.", "prompt")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(tokenizer.encode(item, bos=True, eos=False))
        elif isinstance(item, list) and item and all(is_int(t) for t in item):
            if min(item) < 0 or max(item) >= vocab:
                raise invalid(f"Prompt {i} has token ids outside the vocabulary [0, {vocab}).", "prompt")
            out.append(list(item))
        else:
            raise invalid(f"{form}; item {i} is {described(item)}.", "prompt")
    return out


# ----------------------------------------------------------------------------------------------------
# Requests


def parse_completion(body: Any, tokenizer: Tokenizer, limits: Limits) -> Job:
    """A /v1/completions body as a Job, or an ApiError."""
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, got {described(body)}.")
    body = given(body, COMPLETION_FIELDS, "A /v1/completions request")
    model = check_model(body, limits)
    if "prompt" not in body:
        raise invalid("'prompt' is required.", "prompt")
    prompts = _prompts(body["prompt"], tokenizer, limits)
    # 0 is allowed, as OpenAI's legacy API does: with `echo` and `logprobs` it scores a text (lm-eval)
    max_tokens = _int(body, "max_tokens", DEFAULT_COMPLETION_TOKENS, 0, MAX_TOKENS, "tokens to generate")
    temperature, top_p, seed = _sampling(body)
    stream = _bool(body, "stream")
    echo = _bool(body, "echo")
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS, "likeliest alternatives per token")
    stop, ignore_eos, choosing = _stop(body), _bool(body, "ignore_eos"), _choosing(body, tokenizer)
    grammar = _guided(body)
    sequences = _samples(body, [SequenceSpec(p, _room(p, limits, max_tokens, i), temperature, top_p, seed, stop,
                                             logprobs, ignore_eos, echo, choosing=choosing, grammar=grammar)
                                for i, p in enumerate(prompts)], limits, best_of=True)
    _check_min_tokens(sequences)
    # a text prompt: as it was sent
    echo_texts = [prompt_text(tokenizer, s.prompt_ids) for s in sequences] if echo else []
    return Job("completion", model, sequences, stream, _stream_options(body, stream), echo_texts)


def _message_text(content: Any, index: int) -> str:
    """A message's content: a string, or OpenAI's list of content parts (text parts only)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = []
        for j, part in enumerate(content):
            if part.get("type") == "text":
                part = given(part, PART_FIELDS, f"messages[{index}].content[{j}]", "messages")
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{index}] has a content part of type {part.get('type')!r}; this server "
                              "reads text parts only ({\"type\": \"text\", \"text\": ...}).", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"messages[{index}].content must be a string or a list of text parts, got {described(content)}.",
                  "messages")



FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def openai_tools(body: dict) -> List[Tool]:
    """`tools`: OpenAI's function tools (a function named like one of Meta's built-in tools, brave_search,
    wolfram_alpha, photogen or code_interpreter, is that tool, written in Meta's built-in form). Also the
    interactive chat's --tools file (cli/chat.py)."""
    tools = body.get("tools", [])
    if not isinstance(tools, list):
        raise invalid(f"'tools' must be a list of tools, got {described(tools)}.", "tools")
    out: List[Tool] = []
    for i, entry in enumerate(tools):
        if not isinstance(entry, dict):
            raise invalid(f"tools[{i}] must be an object, got {described(entry)}.", "tools")
        entry = given(entry, TOOL_FIELDS, f"tools[{i}]", "tools")
        function = entry.get("function")
        if entry.get("type") != "function" or not isinstance(function, dict):
            raise invalid(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}; this server '
                          "has function tools only.", "tools")
        function = given(function, FUNCTION_FIELDS, f"tools[{i}].function", "tools")
        name, description = function.get("name"), function.get("description", "")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise invalid(f"tools[{i}].function.name must be 1 to 64 letters, digits, _ or -, got {described(name)}.",
                          "tools")
        if name in (t.name for t in out):
            raise invalid(f"tools[{i}] repeats the name {name!r}; each tool needs its own.", "tools")
        if not isinstance(description, str) or not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function needs a string description and an object JSON schema as "
                          f"parameters; got {described(description)} and {described(parameters)}.", "tools")
        _bool(function, "strict")
        out.append(Tool(name, description, parameters))
    return out


def _tool_choice(body: dict, tools: List[Tool]) -> Tuple[List[Tool], List[Tool], str]:
    """(tools offered, tools a call is forced to, the system prompt's line for it) of `tool_choice`: "none"
    offers nothing, "auto" lets the model choose, "required" and a named function force one call, by the
    grammar of runtime/tools.call_schema. Strict functions need a forced call: only then is the schema enforced."""
    choice = body.get("tool_choice", "auto" if tools else "none")
    if isinstance(choice, dict):
        choice = given(choice, TOOL_FIELDS, "'tool_choice'", "tool_choice")
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        named = [t for t in tools if t.name == name]
        if choice.get("type") != "function" or not named:
            raise invalid("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": "
                          f"{{\"name\": ...}}}} naming one of the request's tools ({[t.name for t in tools]}); got "
                          f"{described(body.get('tool_choice'))}.", "tool_choice")
        return tools, named, NAMED_PROMPT.format(name)
    if choice not in ("none", "auto", "required"):
        raise invalid(f'\'tool_choice\' must be "none", "auto", "required" or a named function, got {described(choice)}.',
                      "tool_choice")
    if choice != "none" and not tools:
        raise invalid(f"'tool_choice' is {choice!r}, but the request offers no 'tools'.", "tool_choice")
    strict = [t.name for t, f in zip(tools, body.get("tools") or []) if f.get("function", {}).get("strict")]
    if strict and choice != "required":
        raise invalid(f"The tools {strict} are strict, but this server enforces a tool's schema only when a call is "
                      "forced: send 'tool_choice' \"required\" or a named function, or leave 'strict' out.", "tools")
    if choice == "required":
        return tools, tools, REQUIRED_PROMPT
    return (tools, [], "") if choice == "auto" else ([], [], "")


def _response_format(body: dict) -> Optional[dict]:
    """The JSON schema `response_format` asks the answer to match ({} for any JSON object), or None (text)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise invalid(f"'response_format' must be an object, got {described(fmt)}.", "response_format")
    fmt = given(fmt, RESPONSE_FORMAT_FIELDS, "'response_format'", "response_format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        spec = given(fmt["json_schema"], JSON_SCHEMA_FIELDS, "'response_format.json_schema'", "response_format")
        schema = spec.get("schema", {})
        if not isinstance(spec.get("name"), str) or not isinstance(schema, dict):
            raise invalid("'response_format.json_schema' needs a string 'name' and an object 'schema'.", "response_format")
        return schema
    raise invalid('\'response_format\' must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                  f'"json_schema": {{"name": ..., "schema": {{...}}}}}}; got {described(body.get("response_format"))}.',
                  "response_format")


def _grammar(schema: dict, param: str) -> str:
    from ..runtime.grammar import schema_grammar

    try:
        return schema_grammar(schema)
    except LlamaMPError as e:
        raise invalid(f"{e} (in '{param}').", param) from None


GUIDED = ("guided_json", "guided_regex", "guided_choice")


def _guided(body: dict) -> Optional[str]:
    """The grammar of vLLM's structured-output fields (at most one of them): `guided_json` a JSON schema,
    `guided_regex` a regular expression the whole answer matches, `guided_choice` a list of strings the answer
    is one of."""
    from ..runtime.grammar import regex_grammar

    asked = [name for name in GUIDED if name in body]
    if len(asked) > 1:
        raise invalid(f"{asked} each constrain the answer; send one of them.", asked[1])
    if not asked:
        return None
    name, value = asked[0], body[asked[0]]
    if name == "guided_json":
        if not isinstance(value, dict):
            raise invalid(f"'guided_json' must be a JSON schema (an object), got {described(value)}.", name)
        return _grammar(value, name)
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise invalid(f"'guided_choice' must be a non-empty list of non-empty strings, got {described(value)}.",
                          name)
        value = "(" + "|".join(re.escape(v) for v in value) + ")"
    elif not isinstance(value, str) or not value:
        raise invalid(f"'guided_regex' must be a regular expression (a string), got {described(value)}.", name)
    try:
        return regex_grammar(value)
    except LlamaMPError as e:
        raise invalid(f"{e} (in '{name}').", name) from None


def _asking_for(dialog: List[dict], request: str, tokenizer: Tokenizer) -> List[dict]:
    """`dialog` with `request` after it: llama-stack's last user message in Llama 3's and 4's formats; in
    Llama 2's, whose turns must alternate, the end of the last user message (after a blank line)."""
    if not families.named(tokenizer.family).text_turn_markers:
        return dialog + [{"role": "user", "content": request}]
    return dialog[:-1] + [dict(dialog[-1], content=dialog[-1]["content"] + "\n\n" + request)]


def _history_calls(calls: Any, index: int) -> List[ToolCall]:
    """An assistant message's `tool_calls` (OpenAI's: arguments as a JSON text) as calls to write back."""
    if not isinstance(calls, list):
        raise invalid(f"messages[{index}].tool_calls must be a list, got {described(calls)}.", "messages")
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{index}].tool_calls[{j}]"
        if not isinstance(call, dict):
            raise invalid(f"{where} must be an object, got {described(call)}.", "messages")
        call = given(call, CALL_FIELDS, where, "messages")
        function = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(function, dict):
            raise invalid(f'{where} must be {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}.',
                          "messages")
        function = given(function, CALLED_FIELDS, f"{where}.function", "messages")
        name, arguments = function.get("name"), function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else None
        except ValueError:
            arguments = None
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise invalid(f"{where}.function needs a string name and arguments that are a JSON object in a string; "
                          f"got {described(function)}.", "messages")
        out.append(ToolCall(name, arguments, call.get("id") if isinstance(call.get("id"), str) else ""))
    return out


def parse_chat(body: Any, tokenizer: Tokenizer, limits: Limits) -> Job:
    """A /v1/chat/completions body as a Job, or an ApiError. The dialog follows Meta's rules (optional
    system message, then user/assistant turns ending with the user's) in the checkpoint family's format."""
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, got {described(body)}.")
    body = given(body, CHAT_FIELDS, "A /v1/chat/completions request")
    model = check_model(body, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid(f"'messages' must be a non-empty list of messages, got {described(messages)}.", "messages")
    dialog = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object with 'role' and 'content', got {described(m)}.",
                          "messages")
        m = given(m, MESSAGE_FIELDS, f"messages[{i}]", "messages")
        role = "system" if m.get("role") == "developer" else m.get("role")  # OpenAI's newer name for system
        message = {"role": role, "content": _message_text(m.get("content", "" if "tool_calls" in m else None), i)}
        if "tool_calls" in m:
            if role != "assistant":
                raise invalid(f"messages[{i}] has tool_calls, which only an assistant message has.", "messages")
            message["tool_calls"] = _history_calls(m["tool_calls"], i)
        dialog.append(message)
    try:
        check_dialog(dialog, 0)
    except LlamaMPError as e:
        raise invalid(str(e).replace("dialog 0", "'messages'"), "messages") from None
    if has_special_tags(dialog, tokenizer):
        raise invalid(UNSAFE_ERROR + " (The Llama 2 chat tags [INST], <<SYS>> would let text forge turns.)",
                      "messages")
    offered, forced, choice_prompt = _tool_choice(body, openai_tools(body))
    parallel = _bool(body, "parallel_tool_calls", True)
    schema, grammar = _response_format(body), _guided(body)
    if schema is not None and forced:
        raise invalid("'response_format' asks for a JSON answer and 'tool_choice' for a tool call; send one of them.",
                      "response_format")
    if grammar is not None and (schema is not None or forced):
        guided, other = next(n for n in GUIDED if n in body), "response_format" if schema is not None else "tool_choice"
        raise invalid(f"'{guided}' and '{other}' each constrain the answer; send one of them.", guided)
    if schema is not None:
        grammar = _grammar(schema, "response_format")
        if schema != {"type": "object"}:  # the model is told the schema as Meta's stack tells it
            dialog = _asking_for(dialog, "Please respond in JSON format with the schema: " + json.dumps(schema),
                                 tokenizer)
    elif forced:
        grammar = _grammar(call_schema(forced), "tools")
    try:
        prompt = encode_dialog(tokenizer, dialog, offered, limits.tool_format, choice_prompt)
    except LlamaMPError as e:
        raise invalid(str(e), "tools" if offered else "messages") from None
    max_tokens = _int(body, "max_tokens", None, 1, MAX_TOKENS, "tokens to generate")
    newer = _int(body, "max_completion_tokens", None, 1, MAX_TOKENS, "tokens to generate")  # OpenAI's newer name for max_tokens
    if newer is not None and max_tokens is not None and newer != max_tokens:
        raise invalid(f"'max_completion_tokens' ({newer}) and 'max_tokens' ({max_tokens}) disagree; send one of them.",
                      "max_completion_tokens")
    field, max_tokens = ("max_completion_tokens", newer) if newer is not None else ("max_tokens", max_tokens)
    temperature, top_p, seed = _sampling(body)
    stream = _bool(body, "stream")
    logprobs = None
    if _bool(body, "logprobs"):
        logprobs = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, "likeliest alternatives per token")
    elif body.get("top_logprobs") is not None:
        raise invalid("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    spec = SequenceSpec(prompt, _room(prompt, limits, max_tokens, field=field), temperature, top_p, seed,
                        _stop(body), logprobs, _bool(body, "ignore_eos"), after_prompt=False,
                        choosing=_choosing(body, tokenizer), grammar=grammar)
    sequences = _samples(body, [spec], limits, best_of=False)
    _check_min_tokens(sequences)
    return Job("chat", model, sequences, stream, _stream_options(body, stream), tools=offered,
               parallel_tool_calls=parallel, family=tokenizer.family)


def _object(body: Any, where: str) -> None:
    if not isinstance(body, dict):
        raise invalid(f"The body of {where} must be a JSON object, got {described(body)}.")


def tokenize(body: Any, tokenizer: Tokenizer, limits: Limits) -> dict:
    """vLLM's POST /tokenize: `prompt` as ids, with BOS first unless `add_special_tokens` is false; a special
    token's name in the text stands for its id, as Hugging Face's tokenizers read it."""
    _object(body, "/tokenize")
    body = given(body, TOKENIZE_FIELDS, "A /tokenize request")
    check_model(body, limits)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise invalid(f"'prompt' must be a string, got {described(prompt)}.", "prompt")
    ids = tokenizer.encode_naming_specials(prompt, bos=_bool(body, "add_special_tokens", True))
    strs = [tokenizer.piece(i) for i in ids] if _bool(body, "return_token_strs") else None
    return {"count": len(ids), "max_model_len": limits.max_seq_len, "tokens": ids, "token_strs": strs}


def detokenize(body: Any, tokenizer: Tokenizer, limits: Limits) -> dict:
    """vLLM's POST /detokenize: the text of `tokens` (special tokens as the tokenizer writes them)."""
    _object(body, "/detokenize")
    body = given(body, DETOKENIZE_FIELDS, "A /detokenize request")
    check_model(body, limits)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_int(t) for t in tokens):
        raise invalid(f"'tokens' must be a list of token ids, got {described(tokens)}.", "tokens")
    if tokens and (min(tokens) < 0 or max(tokens) >= tokenizer.n_words):
        raise invalid(f"'tokens' has ids outside the vocabulary [0, {tokenizer.n_words}).", "tokens")
    return {"prompt": tokenizer.decode(tokens)}


def tokenizer_info(tokenizer: Tokenizer, limits: Limits) -> dict:
    """vLLM's GET /tokenizer_info: the tokenizer's settings in the names of Hugging Face's tokenizer_config.json
    (lm-eval reads `eos_token` and `bos_token`, then finds their ids with /tokenize)."""
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    return {"tokenizer_class": families.named(tokenizer.family).hf_tokenizer_class,
            "bos_token": names.get(tokenizer.bos_id), "eos_token": names.get(tokenizer.eos_id),
            "pad_token": names.get(tokenizer.pad_id), "model_max_length": limits.max_seq_len,
            "vocab_size": tokenizer.n_words, "add_bos_token": True, "add_eos_token": False}


# ----------------------------------------------------------------------------------------------------
# Responses


@dataclass
class TokenLogprob:
    """One token of `logprobs`: its text (what it adds to the text, so the tokens join into it), its
    log-probability and the likeliest alternatives; both None for a prompt's first token (no context)."""

    token: str
    logprob: Optional[float]
    top: Optional[List[tuple]]  # [(token text, logprob)], likeliest first


def _completion_logprobs(entries: Sequence[TokenLogprob], offset: int) -> dict:
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else _by_text(e.top) for e in entries], "text_offset": offsets}


def _by_text(top: List[tuple]) -> dict:
    """{text: logprob} of the alternatives, likeliest first; ids that read the same keep the likeliest's."""
    out: dict = {}
    for text, logprob in top:
        out.setdefault(text, logprob)
    return out


def _chat_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    def one(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {"content": [dict(one(e.token, e.logprob), top_logprobs=[one(t, lp) for t, lp in e.top])
                        for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's `usage`; `cached_tokens`: the prompt tokens a cached prefix held (not prefilled again)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def tool_calls(job: Job, text: str) -> List[dict]:
    """The calls of a chat answer that offered tools, in OpenAI's shape (arguments as JSON text), read by
    Meta's rules (runtime/tools.parse_calls); none when the text is no call, or calls a tool the request did
    not offer (then the answer is text). Without parallel_tool_calls, the first call only."""
    if not job.tools:
        return []
    _, calls = parse_calls(text, job.family)
    if not calls or any(c.name not in {t.name for t in job.tools} for c in calls):
        return []
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in (calls if job.parallel_tool_calls else calls[:1])]


def streamed_calls(job: Job, index: int, calls: List[dict], finish_reason: str) -> List[dict]:
    """The chunks' choices that stream `calls` as OpenAI does: per call its id, type and name with empty
    arguments, then the arguments; the last with finish_reason "tool_calls"."""
    pieces = []
    for k, c in enumerate(calls):
        head = {"index": k, "id": c["id"], "type": "function", "function": {"name": c["function"]["name"],
                                                                             "arguments": ""}}
        pieces += [{"tool_calls": [head]}, {"tool_calls": [{"index": k, "function": {
            "arguments": c["function"]["arguments"]}}]}]
    out = [{"index": index, "delta": p, "logprobs": None, "finish_reason": None} for p in pieces]
    out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": _call_finish(finish_reason)})
    return out


def _call_finish(finish_reason: Optional[str]) -> Optional[str]:
    """A call's finish reason: "tool_calls" when the model ended it; "length" when max_tokens cut it."""
    return "length" if finish_reason == "length" else "tool_calls"


def choice(job: Job, index: int, text: str, finish_reason: Optional[str], logprobs: Optional[List[TokenLogprob]],
           delta: bool, first: bool = False, text_offset: int = 0) -> dict:
    """One entry of `choices`: a whole answer, or (delta) a streamed piece of it."""
    if job.kind == "completion":
        lp = None if logprobs is None else _completion_logprobs(logprobs, text_offset)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
    lp = None if logprobs is None else _chat_logprobs(logprobs)
    if not delta:
        calls = tool_calls(job, text) if finish_reason is not None else []
        if calls:
            return {"index": index, "message": {"role": "assistant", "content": None, "tool_calls": calls},
                    "logprobs": lp, "finish_reason": _call_finish(finish_reason)}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                "finish_reason": finish_reason}
    piece = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"index": index, "delta": piece, "logprobs": lp, "finish_reason": finish_reason}


def envelope(job: Job, choices: List[dict], usage_counts: Optional[dict], chunk: bool) -> dict:
    """The response object (or one streamed chunk) around `choices`."""
    kind = {("completion", False): "text_completion", ("completion", True): "text_completion",
            ("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk"}[(job.kind, chunk)]
    out = {"id": job.id, "object": kind, "created": job.created, "model": job.model, "choices": choices}
    if usage_counts is not None or not chunk:
        out["usage"] = usage_counts
    return out


def models_list(limits: Limits, created: int) -> dict:
    return {"object": "list", "data": [model_card(limits, created)]}


def model_card(limits: Limits, created: int) -> dict:
    return {"id": limits.model_name, "object": "model", "created": created, "owned_by": "llama_mp",
            "max_model_len": limits.max_seq_len}
