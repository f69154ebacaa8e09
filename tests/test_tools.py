"""Llama 3.1/3.2/3.3 tool calling in the chat format (runtime/tools.py): prompts that offer tools, calls and
tool results encode to the ids of Meta's documented prompts, and what the model writes is read back by
Meta's rules. The expected prompts are written out here from Meta's prompt_format.md (Llama 3.1/3.3) and
text_prompt_format.md (Llama 3.2) as text, and turned into ids the way Meta's ChatFormat does: a special
token's name is its id, a header's role and its blank line are encoded apart, and each content is encoded
on its own. Meta's real Llama 3 tokenizer is used when ../shared has it (a tiny tiktoken file otherwise)."""

import json
import os
import re

import pytest

from llama_mp.errors import LlamaMPError
from llama_mp.runtime.chat import check_dialog, encode_dialog
from llama_mp.runtime.tokenizer import Tokenizer
from llama_mp.runtime.tools import NAMED_PROMPT, REQUIRED_PROMPT, Tool, ToolCall, call_schema, parse_calls
from tool_texts import DATE, SONGS_JSON, WEATHER_PYTHONIC


SPECIAL = re.compile(r"(<\|begin_of_text\|>|<\|start_header_id\|>|<\|end_header_id\|>|<\|eot_id\|>|<\|eom_id\|>"
                     r"|<\|python_tag\|>)")


@pytest.fixture(scope="module")
def tok(llama3_tokenizer_path):
    return Tokenizer(llama3_tokenizer_path)


def meta_ids(tok, prompt):
    """The ids of a prompt written as Meta's documents write it (special tokens by name)."""
    ids, parts = [], SPECIAL.split(prompt)
    for i, part in enumerate(parts):
        if i % 2:
            ids.append(tok.special_id(part))
        elif part and i and parts[i - 1] == "<|end_header_id|>":  # the blank line, then the content
            assert part.startswith("\n\n"), part
            ids += tok.encode("\n\n", bos=False, eos=False) + tok.encode(part[2:], bos=False, eos=False)
        elif part:
            ids += tok.encode(part, bos=False, eos=False)
    return ids


WEATHER = Tool("get_weather", "Get weather info for places", {
    "type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The name of the city to get the weather for"},
        "metric": {"type": "string", "description": "The metric for weather. Options are: celsius, fahrenheit",
                   "default": "celsius"}}})
SONGS = Tool("trending_songs", "Returns the trending songs on a Music site", {
    "type": "object", "required": ["n"], "properties": {
        "n": {"type": "int", "description": "The number of songs to return"},
        "genre": {"type": "str", "description": "The genre of the songs to return"}}})

def test_llama31_custom_tools_prompt_is_metas(tok):
    dialog = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "Use tools to get latest trending songs"}]
    want = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\n"
            f"Cutting Knowledge Date: December 2023\nToday Date: {DATE}\nYou are a helpful assistant.<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{SONGS_JSON}<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nUse tools to get latest trending songs<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert encode_dialog(tok, dialog, [SONGS], "json", date=DATE) == meta_ids(tok, want)


def test_llama31_builtin_tools_call_and_result_are_metas(tok):
    """Llama 3.3's "Built-in tools full interaction": the system lines, the call ending with <|eom_id|>, the
    tool's answer in the ipython role (OpenAI's `tool`). The document shows the call after <|python_tag|>, as
    the model writes it; Meta's ChatFormat writes it back without (the tag only before interpreter code),
    and that is what is followed (test_dialogs_with_tools_encode_to_the_ids_of_metas_own_code)."""
    result = '{"queryresult": {"success": true, "plaintext": "7"}}'
    dialog = [{"role": "user", "content": "What is the 100th decimal of pi?"},
              {"role": "assistant", "content": "",
               "tool_calls": [ToolCall("wolfram_alpha", {"query": "100th decimal of pi"})]},
              {"role": "tool", "content": result}]
    check_dialog(dialog, 0)
    want = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
            f"Tools: brave_search, wolfram_alpha\nCutting Knowledge Date: December 2023\nToday Date: {DATE}<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is the 100th decimal of pi?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
            'wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>'
            f"<|start_header_id|>ipython<|end_header_id|>\n\n{result}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    tools = [Tool("brave_search"), Tool("wolfram_alpha")]
    assert encode_dialog(tok, dialog, tools, "json", date=DATE) == meta_ids(tok, want)
    # the code interpreter alone is the environment line alone
    assert tok.decode(encode_dialog(tok, dialog[:1], [Tool("code_interpreter")], "json", date=DATE)).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\nCutting Knowledge")


def test_llama32_pythonic_tools_calls_and_results_are_metas(tok):
    """Llama 3.2's "Zero shot function calling E2E format" (the call written as the model writes it, in
    one list), with tool_choice "required"'s line ending the system message (llama-stack adds a newline
    after the function list, then one before the line)."""
    dialog = [{"role": "user", "content": "What is the weather in SF and Seattle?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  ToolCall("get_weather", {"city": "San Francisco", "metric": "celsius"}),
                  ToolCall("get_weather", {"city": "Seattle"})]},
              {"role": "ipython", "content": '"25 C"'}, {"role": "ipython", "content": '"19 C"'}]
    check_dialog(dialog, 0)
    want = (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{WEATHER_PYTHONIC}\n\n{REQUIRED_PROMPT}"
            "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is the weather in SF and Seattle?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
            '[get_weather(city="San Francisco", metric="celsius"), get_weather(city="Seattle")]<|eot_id|>'
            '<|start_header_id|>ipython<|end_header_id|>\n\n"25 C"<|eot_id|>'
            '<|start_header_id|>ipython<|end_header_id|>\n\n"19 C"<|eot_id|>'
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert encode_dialog(tok, dialog, [WEATHER], "python_list", REQUIRED_PROMPT) == meta_ids(tok, want)


def test_a_system_message_follows_the_pythonic_prompt(tok):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{WEATHER_PYTHONIC}\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert encode_dialog(tok, dialog, [WEATHER], "python_list") == meta_ids(tok, want)
    assert encode_dialog(tok, dialog) == encode_dialog(tok, dialog, [], "python_list")  # no tools: unchanged


def test_a_json_call_in_the_history_is_metas_encode_tool_call(tok):
    dialog = [{"role": "user", "content": "songs?"},
              {"role": "assistant", "content": "", "tool_calls": [ToolCall("trending_songs", {"n": 10})]},
              {"role": "tool", "content": "[]"}]
    ids = encode_dialog(tok, dialog, [SONGS], "json", date=DATE)
    call = '{"type": "function", "name": "trending_songs", "parameters": {"n": 10}}'
    tail = (f"<|start_header_id|>assistant<|end_header_id|>\n\n{call}<|eot_id|>"
            "<|start_header_id|>ipython<|end_header_id|>\n\n[]<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids[-len(meta_ids(tok, tail)):] == meta_ids(tok, tail)


@pytest.mark.parametrize("text, calls", [
    # Meta's documented answers
    ('<|python_tag|>brave_search.call(query="latest price of 1oz gold")', [("brave_search", {"query": "latest price of 1oz gold"})]),
    ('<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n        "n": "10",\n'
     '        "genre": "all"\n    }\n}', [("trending_songs", {"n": "10", "genre": "all"})]),
    ('<function=trending_songs>{"n": 10}</function>', [("trending_songs", {"n": 10})]),
    ("[get_weather(city='San Francisco', metric='celsius'), get_weather(city='Seattle', metric='celsius')]",
     [("get_weather", {"city": "San Francisco", "metric": "celsius"}), ("get_weather", {"city": "Seattle", "metric": "celsius"})]),
    ("<|python_tag|>print(is_prime(7))", [("code_interpreter", {"code": "print(is_prime(7))"})]),
    ('{"name": "brave_search", "parameters": {"q": "x"}}', [("brave_search", {"query": "x"})]),  # built-in as custom
    # text
    ("The 100th decimal of pi is 7.", []), ("[1, 2]", []), ("[f(1)]", []), ('{"name": "f"}', []),
    ('<function=f>{"a": </function>', []), ("", []),
])
def test_answers_are_read_by_metas_rules(text, calls):
    content, found = parse_calls(text)
    assert [(c.name, c.arguments) for c in found] == calls
    assert content == ("" if calls else text.replace("<|python_tag|>", ""))


def test_tool_results_follow_an_assistant_turn_and_llama2_has_no_tools(tokenizer):
    for roles in (["user", "ipython"], ["ipython"], ["user", "assistant", "tool", "user", "tool"],
                  ["user", "assistant", "tool", "tool", "assistant"]):
        with pytest.raises(LlamaMPError, match="has tool results"):
            check_dialog([{"role": r, "content": "x"} for r in roles], 0)
    check_dialog([{"role": r, "content": "x"} for r in ["system", "user", "assistant", "tool", "assistant", "user"]], 0)
    with pytest.raises(LlamaMPError, match="only an assistant message has tool_calls"):
        check_dialog([{"role": "user", "content": "x", "tool_calls": []}], 0)
    with pytest.raises(LlamaMPError, match="needs a Llama 3.1-3.3 or Llama 4 checkpoint"):
        encode_dialog(tokenizer, [{"role": "user", "content": "x"}], [WEATHER])


def test_a_forced_call_is_one_of_the_tools_with_its_schema():
    schema = call_schema([WEATHER, Tool("brave_search")])
    names = [form["properties"]["name"]["const"] for form in schema["anyOf"]]
    assert names == ["get_weather", "brave_search"]
    assert schema["anyOf"][0]["properties"]["parameters"] == WEATHER.parameters
    assert schema["anyOf"][1]["properties"]["parameters"]["required"] == ["query"]


def test_chat_completion_offers_tools_and_returns_calls_as_metas_decode_assistant_message(make_checkpoint, tok,
                                                                                           llama3_tokenizer_path,
                                                                                           monkeypatch):
    from workers import build

    ckpt = make_checkpoint(shards=1, vocab_size=tok.n_words, n_heads=8, n_kv_heads=4, use_scaled_rope=True,
                           rope_theta=500000.0)[0]
    llama = build(ckpt, llama3_tokenizer_path, max_seq_len=512, max_batch_size=2)
    dialog = [{"role": "user", "content": "Weather in Oslo?"}]
    seen = []

    def scripted(request):  # the model's answer, as the engine gives it: the ids before the stop token
        seen.append(request.prompt_tokens)
        texts = ['[get_weather(city="Oslo")]', "It is cold."]
        return [tok.encode(t, bos=False, eos=False) for t in texts], None

    monkeypatch.setattr(llama.engine, "generate", scripted)
    call, text = llama.chat_completion([dialog, dialog], tools=[WEATHER], tool_format="python_list", max_gen_len=8)
    assert seen[0][0] == encode_dialog(tok, dialog, [WEATHER], "python_list")
    assert call["generation"]["content"] == "" and [(c.name, c.arguments) for c in call["generation"]["tool_calls"]] \
        == [("get_weather", {"city": "Oslo"})]
    assert text["generation"] == {"role": "assistant", "content": "It is cold."}
    # the answer goes back into the dialog as it came, with the tool's result after it
    check_dialog(dialog + [call["generation"], {"role": "ipython", "content": "-3 C"}], 0)


FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tool_prompt_ids.json")
CODE = "print(all(7 % d for d in range(2, 7)))"
FIXTURE_DIALOGS = {  # name -> (dialog, tools offered, format, tool_choice's line): as the fixture's script has them
    "llama31_json": ([{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "Use tools to get latest trending songs"},
                      {"role": "assistant", "content": "", "tool_calls": [ToolCall("trending_songs", {"n": 10, "genre": "all"})]},
                      {"role": "tool", "content": '["Song A", "Song B"]'}], [SONGS], "json", ""),
    "llama31_builtin": ([{"role": "user", "content": "What is the 100th decimal of pi?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             ToolCall("wolfram_alpha", {"query": "100th decimal of pi"})]},
                         {"role": "tool", "content": '{"result": "7"}'}],
                        [Tool("brave_search"), Tool("wolfram_alpha")], "json", ""),
    "llama31_code_interpreter": ([{"role": "user", "content": "Is 7 prime?"},
                                  {"role": "assistant", "content": "", "tool_calls": [
                                      ToolCall("code_interpreter", {"code": CODE})]},
                                  {"role": "tool", "content": "True"}], [Tool("code_interpreter")], "json", ""),
    "llama32_python_list": ([{"role": "user", "content": "What is the weather in SF?"},
                             {"role": "assistant", "content": "", "tool_calls": [
                                 ToolCall("get_weather", {"city": "San Francisco", "metric": "celsius"})]},
                             {"role": "tool", "content": '"25 C"'}], [WEATHER], "python_list", REQUIRED_PROMPT),
}


@pytest.mark.parametrize("name", sorted(FIXTURE_DIALOGS))
def test_dialogs_with_tools_encode_to_the_ids_of_metas_own_code(tok, name):
    """tests/fixtures/tool_prompt_ids.json: the ids llama-models' ChatFormat gives (the command that made
    them is in tests/fixtures/make_tool_prompt_ids.py), for Meta's tokenizer."""
    with open(FIXTURE) as f:
        want = json.load(f)["cases"][name]
    if tok.n_words != 128256:
        pytest.skip("the fixture's ids are those of Meta's Llama 3 tokenizer, which ../shared does not have here")
    dialog, tools, fmt, line = FIXTURE_DIALOGS[name]
    check_dialog(dialog, 0)
    assert encode_dialog(tok, dialog, tools, fmt, line, date=DATE) == want


# ------------------------------------------------------------------------------------------------
# Llama 4: the pythonic format (its only one), the ipython role, <|eom|> after calls and results


@pytest.fixture(scope="module")
def tok4():
    from llama_mp.checkpoints.synth import SHARED_TOKENIZERS

    if not os.path.isfile(SHARED_TOKENIZERS["llama4"]):
        pytest.skip("the fixture's Llama 4 ids are those of Meta's Llama 4 tokenizer, which ../shared/assets does "
                    "not have here")
    return Tokenizer(SHARED_TOKENIZERS["llama4"])


LLAMA4_DIALOGS = {  # name -> (dialog, tools offered, tool_choice's line): as the fixture's script has them
    "llama4_python_list": ([{"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": "What is the weather in SF?"},
                            {"role": "assistant", "content": "", "tool_calls": [
                                ToolCall("get_weather", {"city": "San Francisco", "metric": "celsius"})]},
                            {"role": "tool", "content": '"25 C"'}], [WEATHER], REQUIRED_PROMPT),
    "llama4_builtin": ([{"role": "user", "content": "What is the 100th decimal of pi?"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            ToolCall("wolfram_alpha", {"query": "100th decimal of pi"})]},
                        {"role": "ipython", "content": '{"result": "7"}'}],
                       [Tool("brave_search"), Tool("wolfram_alpha")], ""),
    "llama4_code_interpreter_named": ([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Is 7 prime? "},
                                       {"role": "assistant", "content": "Let me check.", "tool_calls": [
                                           ToolCall("code_interpreter", {"code": CODE})]},
                                       {"role": "tool", "content": "True"},
                                       {"role": "assistant", "content": "Yes, 7 is prime."},
                                       {"role": "user", "content": "And 9?"}],
                                      [Tool("code_interpreter"), WEATHER], NAMED_PROMPT.format("get_weather")),
}


@pytest.mark.parametrize("name", sorted(LLAMA4_DIALOGS))
def test_llama4_dialogs_with_tools_encode_to_the_ids_of_metas_own_code(tok4, name):
    """The fixture's Llama 4 ids: llama-models' Llama 4 ChatFormat on the system message llama-stack writes
    for a Llama 4 model (tests/fixtures/make_tool_prompt_ids.py). The format is the family's own unasked."""
    with open(FIXTURE) as f:
        want = json.load(f)["cases"][name]
    dialog, tools, line = LLAMA4_DIALOGS[name]
    check_dialog(dialog, 0)
    assert encode_dialog(tok4, dialog, tools, None, line) == want
    assert encode_dialog(tok4, dialog, tools, "python_list", line) == want
    with pytest.raises(LlamaMPError, match="Llama 4 calls tools in the pythonic list"):
        encode_dialog(tok4, dialog, tools, "json", line)


@pytest.mark.parametrize("text, calls", [
    ('[get_weather(city="Oslo"), get_weather(city="Bergen")]',
     [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Bergen"})]),
    ("<|python_start|>print(is_prime(7))<|python_end|>", [("code_interpreter", {"code": "print(is_prime(7))"})]),
    ('<|python_start|>brave_search.call(query="gold price")<|python_end|>', [("brave_search", {"query": "gold price"})]),
    ('{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}', [("get_weather", {"city": "Oslo"})]),
    ("<|python_tag|>print(1)", []),  # Llama 3's tag is text to Llama 4
    ("Oslo is cold.", []),
])
def test_llama4_answers_are_read_by_metas_rules(text, calls):
    """Meta's llama4 ChatFormat.decode_assistant_message: `<|python_start|>` opens code (its `<|python_end|>`
    dropped), then Llama 3's rules."""
    content, found = parse_calls(text, "llama4")
    assert [(c.name, c.arguments) for c in found] == calls
    assert content == ("" if calls else text)


def test_llama4_chat_completion_offers_tools_in_its_format_and_returns_calls(tmp_path, monkeypatch):
    """chat_completion(tools=) on a tiny random Llama 4: the prompt is Llama 4's (no format asked), and
    interpreter code between <|python_start|> and <|python_end|> comes back as a call."""
    from llama4_helpers import tiny_args
    from llama_mp.checkpoints.synth import write_random_checkpoint, write_tiny_tiktoken
    from workers import build

    tok_path = write_tiny_tiktoken(str(tmp_path / "tokenizer.model"))
    tok = Tokenizer(tok_path, "llama4")
    write_random_checkpoint(str(tmp_path), tiny_args(tok.n_words), 1, seed=3)
    llama = build(str(tmp_path), tok_path, max_seq_len=4096, max_batch_size=2)
    dialog = [{"role": "user", "content": "Is 7 prime?"}]
    seen = []

    def scripted(request):  # the ids before the stop token
        seen.append(request.prompt_tokens)
        code = [tok.special_id("<|python_start|>")] + tok.encode("print(7 % 2)", bos=False, eos=False) + [
            tok.special_id("<|python_end|>")]
        return [code, tok.encode('[get_weather(city="Oslo")]', bos=False, eos=False)], None

    monkeypatch.setattr(llama.engine, "generate", scripted)
    tools = [Tool("code_interpreter"), WEATHER]
    code, call = llama.chat_completion([dialog, dialog], tools=tools, max_gen_len=8)
    assert seen[0][0] == encode_dialog(tok, dialog, tools, "python_list")
    assert [(c.name, c.arguments) for c in code["generation"]["tool_calls"]] == [("code_interpreter", {"code": "print(7 % 2)"})]
    assert [(c.name, c.arguments) for c in call["generation"]["tool_calls"]] == [("get_weather", {"city": "Oslo"})]
    check_dialog(dialog + [call["generation"], {"role": "tool", "content": "-3 C"}], 0)
