"""Tool calling and structured output through the server (issue 25): OpenAI's `tools`, `tool_choice`,
`parallel_tool_calls` and `response_format`, answered by Meta's formats (runtime/tools.py) and enforced by
constrained decoding (runtime/grammar.py).

Most checks run in-process on the stand-in model of test_server_inputs.py (random logits fixed by the
context); the issue's done-when checks run on one 2-rank server of a random-weight Llama 3 model, shared
by the module: forced calls' arguments and json_schema answers validate against their schemas on 50
seeded samples each, and "auto" answers text or a call, never an error."""

import json
import platform

import httpx
import jsonschema
import pytest
import torch

from llama_mp.runtime.tokenizer import Tokenizer
from llama_mp.server.protocol import Limits, parse_chat
from test_server_inputs import SLOTS, Served, error_of, sse

# openai's client reads platform.processor() (`uname -p`, a subprocess) once and keeps it: read at collection,
# so that the in-process round trip starts no process
platform.processor()
CONTEXT = 1024
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit", "days"], "properties": {
    "city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
SEARCH = {"type": "object", "additionalProperties": False, "required": ["q"],
          "properties": {"q": {"type": "string", "maxLength": 8}, "exact": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": SEARCH}}]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
ANSWER = {"type": "object", "additionalProperties": False, "required": ["answer", "sure"], "properties": {
    "answer": {"type": "string", "maxLength": 6}, "sure": {"type": "boolean"},
    "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b"]}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The stand-in model's 128k-entry rows, one torch thread: on a shared CPU two threads wait on each other
    ten times longer than the work takes (the servers' ranks run with OMP_NUM_THREADS=1 too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["llama", "llama3"])
def family(request, tokenizer_path, llama3_tokenizer_path):
    return Tokenizer(tokenizer_path if request.param == "llama" else llama3_tokenizer_path)


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_path):
    return Tokenizer(llama3_tokenizer_path)


def served(tokenizer, script=None, tool_format="json"):
    job = Served(tokenizer, script=script)
    job.state.limits = Limits("m", CONTEXT, SLOTS, tool_format)
    return job


@pytest.fixture(scope="module")
def job3(llama3):
    job = served(llama3)
    yield job
    job.close()


def chat(job, **body):
    return job.client.post("/v1/chat/completions", json=dict({"messages": ASK, "max_tokens": 48}, **body))


def validated_calls(answer, names=SCHEMAS):
    """The calls of a whole answer, each checked: a tool offered, arguments that match its schema."""
    assert answer["finish_reason"] == "tool_calls", answer
    message = answer["message"]
    assert message["content"] is None and message["tool_calls"]
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    return message["tool_calls"]


# ------------------------------------------------------------------------------------------------
# In-process: the request fields, the answers' shapes


def test_forced_answers_match_their_schema_in_both_tokenizer_families(family):
    """Calls (Llama 3: Llama 2 has no tools) and json_schema answers, by each family's vocabulary."""
    job = served(family)
    try:
        for seed in range(2):
            if family.family == "llama3":
                named = chat(job, tools=TOOLS, seed=seed, tool_choice={"type": "function", "function": {"name": "search"}})
                assert [c["function"]["name"] for c in validated_calls(named.json()["choices"][0])] == ["search"]
                validated_calls(chat(job, tools=TOOLS, seed=seed, tool_choice="required").json()["choices"][0])
            fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
            answer = chat(job, response_format=fmt, seed=seed).json()["choices"][0]
            jsonschema.validate(json.loads(answer["message"]["content"]), ANSWER)
    finally:
        job.close()


def test_a_streamed_call_comes_as_openai_streams_it(job3):
    body = dict(tools=TOOLS, tool_choice="required", seed=5)
    whole = validated_calls(chat(job3, **body).json()["choices"][0])
    chunks = sse(chat(job3, stream=True, **body))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""} and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    calls = {}
    for delta in deltas[1:]:  # how OpenAI's client puts streamed calls together
        for part in delta.get("tool_calls", []):
            call = calls.setdefault(part["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = part.get("id", call["id"])
            call["name"] += part.get("function", {}).get("name", "")
            call["arguments"] += part["function"].get("arguments", "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole]


def test_auto_and_none_answer_text_or_a_call_never_an_error(job3):
    for seed in range(2):
        for choice in ("auto", "none"):
            answer = chat(job3, tools=TOOLS, tool_choice=choice, seed=seed, max_tokens=8)
            assert answer.status_code == 200, answer.text
            first = answer.json()["choices"][0]
            if first["finish_reason"] == "tool_calls":
                validated_calls(first)
            else:
                assert isinstance(first["message"]["content"], str)


def script_for(tokenizer, body, text, tool_format="json"):
    """A Served whose model writes `text` then <|eot_id|> for the chat `body` (its prompt as parse_chat makes it)."""
    prompt = parse_chat(body, tokenizer, Limits("m", CONTEXT, SLOTS, tool_format)).sequences[0].prompt_ids
    ids = tokenizer.encode(text, bos=False, eos=False) + [tokenizer.special_id("<|eot_id|>")]
    return served(tokenizer, {tuple(prompt): ids}, tool_format)


@pytest.mark.parametrize("tool_format, text, calls", [
    ("python_list", '[get_weather(city="Oslo", unit="celsius", days=2), search(q="oslo")]',
     [("get_weather", {"city": "Oslo", "unit": "celsius", "days": 2}), ("search", {"q": "oslo"})]),
    ("json", '{"type": "function", "name": "search", "parameters": {"q": "oslo"}}', [("search", {"q": "oslo"})]),
    ("json", '{"type": "function", "name": "search", "parameters": {"q": ', []),   # cut short: text
    ("json", '{"type": "function", "name": "delete_all", "parameters": {}}', []),  # no such tool: text
    ("python_list", "[get_weather(city=Oslo)]", []),                                # not a literal: text
])
def test_what_the_model_writes_is_read_as_calls_or_comes_back_as_text(llama3, tool_format, text, calls):
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 64, "temperature": 0}
    job = script_for(llama3, body, text, tool_format)
    try:
        for parallel in (True, False):
            answer = job.client.post("/v1/chat/completions", json=dict(body, parallel_tool_calls=parallel))
            assert answer.status_code == 200, answer.text
            first = answer.json()["choices"][0]
            want = calls if parallel else calls[:1]
            if want:
                assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                        for c in first["message"]["tool_calls"]] == want
            else:
                assert first["message"] == {"role": "assistant", "content": text} and first["finish_reason"] == "stop"
            streamed = sse(job.client.post("/v1/chat/completions", json=dict(body, stream=True,
                                                                              parallel_tool_calls=parallel)))
            if not want:
                assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == text
            else:
                assert len([c for c in streamed if c["choices"][0]["delta"].get("tool_calls", [{}])[0].get("id")]) \
                    == len(want)
    finally:
        job.close()


def test_calls_and_results_in_the_history_are_accepted(job3, llama3):
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius", "days": 1})}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}]
    answer = chat(job3, messages=history, tools=TOOLS, max_tokens=4)
    assert answer.status_code == 200, answer.text
    prompt = parse_chat({"messages": history, "tools": TOOLS}, llama3, Limits("m", CONTEXT, SLOTS)).sequences[0].prompt_ids
    text = llama3.decode(prompt)
    assert text.endswith('"parameters": {"city": "Paris", "unit": "celsius", "days": 1}}<|eot_id|>'
                         "<|start_header_id|>ipython<|end_header_id|>\n\n21 C and sunny<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    bad = dict(history[1], tool_calls=[{"type": "function", "function": {"name": "f", "arguments": "{not json"}}])
    assert error_of(chat(job3, messages=ASK + [bad, history[2]], tools=TOOLS), 400)["param"] == "messages"


@pytest.mark.parametrize("body, param, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "naming one"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"tool_choice": "required"}, "tool_choice", "offers no 'tools'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": WEATHER, "strict": True}}]}, "tools",
     "strict"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "function tools only"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "repeats the name"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "letters, digits"),
    ({"tools": [{"type": "function", "function": {"name": "f", "examples": []}}]}, "tools", "unknown field"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "JSON schema cannot be used"),
    ({"response_format": {"type": "yaml"}}, "response_format", "must be"),
    ({"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"}, "response_format",
     "send one of them"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens", "grammar says where"),
])
def test_bad_tool_and_format_fields_are_a_400_naming_them(job3, body, param, words):
    error = error_of(chat(job3, **body), 400)
    assert error["param"] == param and words in error["message"], error


def test_the_model_is_told_the_schema_in_its_familys_format(tokenizer, llama3):
    from llama_mp.runtime.chat import encode_dialog

    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    ask = "Please respond in JSON format with the schema: " + json.dumps(ANSWER)  # llama-stack's words
    for tok, dialog in [(llama3, ASK + [{"role": "user", "content": ask}]),  # llama-stack's user message
                        (tokenizer, [{"role": "user", "content": ASK[0]["content"] + "\n\n" + ask}])]:  # Llama 2: turns alternate
        job = parse_chat({"messages": ASK, "response_format": fmt}, tok, Limits("m", CONTEXT, SLOTS))
        assert job.sequences[0].prompt_ids == encode_dialog(tok, dialog) and job.sequences[0].grammar
        assert parse_chat({"messages": ASK, "response_format": {"type": "json_object"}}, tok,
                          Limits("m", CONTEXT, SLOTS)).sequences[0].prompt_ids == encode_dialog(tok, ASK)


def test_llama2_checkpoints_have_structured_output_but_no_tools(tokenizer):
    job = served(tokenizer)
    try:
        error = error_of(chat(job, tools=TOOLS), 400)
        assert error["param"] == "tools" and "Llama 3.1-3.3" in error["message"]
        answer = chat(job, response_format={"type": "json_object"}, max_tokens=200, seed=1).json()["choices"][0]
        if answer["finish_reason"] == "stop":  # an object a random model closed within max_tokens
            assert isinstance(json.loads(answer["message"]["content"]), dict)
        else:
            assert answer["message"]["content"].startswith("{")
    finally:
        job.close()


# ------------------------------------------------------------------------------------------------
# Llama 4: a tiny random Llama 4 (tests/llama4_helpers.py) behind the server in-process, on one rank


CONTEXT4 = 4096  # Meta's Llama 4 tool prompt is ~3,000 tokens of the tiny tokenizer's mostly single bytes


@pytest.fixture(scope="module")
def job4(tmp_path_factory):
    from llama4_helpers import tiny_args
    from llama_mp.checkpoints.synth import write_random_checkpoint, write_tiny_tiktoken
    from llama_mp.runtime.batching import Batcher
    from workers import build

    tok_path = write_tiny_tiktoken(str(tmp_path_factory.mktemp("tok4") / "tokenizer.model"))
    tok = Tokenizer(tok_path, "llama4")
    ckpt = str(tmp_path_factory.mktemp("llama4_tools"))
    write_random_checkpoint(ckpt, tiny_args(tok.n_words), 1, seed=3)
    llama = build(ckpt, tok_path, max_seq_len=CONTEXT4, max_batch_size=SLOTS)
    job = Served(llama.tokenizer, batcher=Batcher(llama.engine))
    job.state.limits = Limits("m", CONTEXT4, SLOTS)
    yield job
    job.close()


def test_llama4_forced_calls_match_their_schema(job4):
    """tool_choice "required" and a named function on a random Llama 4: calls of offered tools whose
    arguments validate, several answers of one request decoded together in the batch."""
    named = {"type": "function", "function": {"name": "search"}}
    for choice in ("required", named):
        answer = chat(job4, tools=TOOLS, tool_choice=choice, seed=7, n=2, temperature=1.0, max_tokens=200)
        assert answer.status_code == 200, answer.text
        for each in answer.json()["choices"]:
            calls = validated_calls(each)
            assert len(calls) == 1 and (choice == "required" or calls[0]["function"]["name"] == "search")


def test_llama4_history_is_metas_llama4_format(job4):
    """A call and its result given back: the call as the pythonic list, ended by <|eom|>, the result headed
    ipython and ended by <|eom|> (Meta's llama4 ChatFormat; its ids: tests/test_tools.py's fixture)."""
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius", "days": 1})}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}]
    tok = job4.tokenizer
    prompt = parse_chat({"messages": history, "tools": TOOLS}, tok, Limits("m", CONTEXT4, SLOTS)).sequences[0].prompt_ids
    assert tok.decode(prompt).endswith(
        '<|header_start|>assistant<|header_end|>\n\n[get_weather(city="Paris", unit="celsius", days=1)]<|eom|>'
        "<|header_start|>ipython<|header_end|>\n\n21 C and sunny<|eom|><|header_start|>assistant<|header_end|>\n\n")
    answer = chat(job4, messages=history, tools=TOOLS, max_tokens=4)
    assert answer.status_code == 200, answer.text


def test_llama4_answers_are_read_by_its_rules_and_json_is_not_its_format(job4):
    """What a Llama 4 writes (scripted): code between <|python_start|> and <|python_end|> is a call of the
    interpreter; a server started with --tool_format json refuses tools for a Llama 4 (a 400 naming them)."""
    tok = job4.tokenizer
    tools = TOOLS + [{"type": "function", "function": {"name": "code_interpreter", "description": "Runs Python",
                                                       "parameters": {"type": "object"}}}]
    body = {"messages": ASK, "tools": tools, "max_tokens": 64, "temperature": 0}
    prompt = parse_chat(body, tok, Limits("m", CONTEXT4, SLOTS)).sequences[0].prompt_ids
    written = [tok.special_id("<|python_start|>")] + tok.encode("print(2 + 2)", bos=False, eos=False) + [
        tok.special_id("<|python_end|>"), tok.special_id("<|eom|>")]
    job = Served(tok, {tuple(prompt): written})
    job.state.limits = Limits("m", CONTEXT4, SLOTS)
    try:
        first = job.client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert first["finish_reason"] == "tool_calls", first
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in first["message"]["tool_calls"]] \
            == [("code_interpreter", {"code": "print(2 + 2)"})]
        job.state.limits = Limits("m", CONTEXT4, SLOTS, "json")
        error = error_of(job.client.post("/v1/chat/completions", json=body), 400)
        assert error["param"] == "tools" and "Llama 4 calls tools in the pythonic list" in error["message"]
    finally:
        job.close()


# ------------------------------------------------------------------------------------------------
# The done-when checks: 2 CPU ranks, a random-weight Llama 3 model

SAMPLES = 50


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, make_checkpoint, llama3, llama3_tokenizer_path):
    from test_server import start_torchrun

    ckpt = make_checkpoint(shards=2, vocab_size=llama3.n_words, n_heads=8, n_kv_heads=4, use_scaled_rope=True,
                           rope_theta=500000.0)[0]
    job = start_torchrun(tmp_path_factory.mktemp("tools"), ckpt, llama3_tokenizer_path, "--max_seq_len", str(CONTEXT))
    yield job
    job.stop()


def post_all(url, bodies):
    """The answers to `bodies`, sent at once (they share the batch)."""
    import concurrent.futures

    with httpx.Client(timeout=120) as client, concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: client.post(url + "/v1/chat/completions", json=b), bodies))
    for a in answers:
        assert a.status_code == 200, a.text
    return [c for a in answers for c in a.json()["choices"]]


@pytest.mark.spawn
def test_on_two_ranks_forced_calls_and_schemas_validate_and_auto_never_fails(ranks):
    base = {"messages": ASK, "max_tokens": 64, "temperature": 1.0, "n": SLOTS}
    per = SAMPLES // SLOTS + 1
    named = {"type": "function", "function": {"name": "get_weather"}}
    forced = post_all(ranks.url, [dict(base, tools=TOOLS, seed=1000 + 10 * k, tool_choice=named if k % 2 else "required")
                                  for k in range(per)])[:SAMPLES]
    for k, answer in enumerate(forced):
        calls = validated_calls(answer)
        assert len(calls) == 1 and (calls[0]["function"]["name"] == "get_weather" or (k // SLOTS) % 2 == 0)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    for answer in post_all(ranks.url, [dict(base, response_format=fmt, seed=2000 + 10 * k) for k in range(per)])[:SAMPLES]:
        assert answer["finish_reason"] == "stop"
        jsonschema.validate(json.loads(answer["message"]["content"]), ANSWER)
    for answer in post_all(ranks.url, [dict(base, tools=TOOLS, seed=3000, max_tokens=16)]):
        assert answer["finish_reason"] in ("stop", "length", "tool_calls")


def docs_example(heading="## Tool calling and structured output"):
    """The first python block after `heading` in docs/server.md, as written there."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "server.md").read_text()
    after = text[text.index(heading):]
    return after[after.index("```python\n") + len("```python\n"):after.index("\n```", after.index("```python"))]


def test_the_docs_openai_round_trip_runs_as_written(llama3, monkeypatch, capsys):
    """docs/server.md's example, executed as written with the official `openai` client, its requests going
    to the app in-process (the one change: the client's transport). The model's answers are scripted (its
    first a call, so that the whole round trip runs: the call, the tool's result given back, the final
    answer; the json_schema one), except the forced call's, which its schema constrains."""
    import openai

    from llama_mp.runtime import tools as tools_module

    # The date line is in every prompt: the stand-in model's constrained call must not change with the day.
    monkeypatch.setattr(tools_module, "today", lambda: "04 December 2026")
    code = docs_example()
    name = "llama-3.1-8b-instruct"
    limits = Limits(name, 512, SLOTS)
    first_body = {"model": name, "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    namespace: dict = {}
    exec(code.split("\nmessages = ")[0], namespace)  # the example's `tools`, to script the first answer
    first_body["tools"] = namespace["tools"]
    call = '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}'
    said = "It is 18 C in Paris."
    given_back = first_body["messages"] + [  # the history the example sends next (call ids are not in the prompt)
        {"role": "assistant", "tool_calls": [{"id": "x", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "x", "content": json.dumps({"city": "Paris", "temperature": 18})}]
    place = '{"city":"Paris","country":"France"}'  # the json_schema answer, as its grammar allows it (compact)
    asked = {"type": "json_schema", "json_schema": {"name": "place", "schema": {
        "type": "object", "required": ["city", "country"],
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}}}}}
    bodies = [(first_body, call), (dict(first_body, messages=given_back), said),
              ({"model": name, "messages": [{"role": "user", "content": "Name a city and its country."}],
                "response_format": asked}, place)]
    script = {tuple(parse_chat(body, llama3, limits).sequences[0].prompt_ids):
              llama3.encode(text, bos=False, eos=False) + [llama3.special_id("<|eot_id|>")] for body, text in bodies}
    job = served(llama3, script)
    job.state.limits, job.state.api_key = limits, "KEY"
    real = openai.OpenAI
    monkeypatch.setattr(openai, "OpenAI", lambda **kw: real(**kw, http_client=job.client))
    try:
        namespace = {}
        exec(code, namespace)
        streamed = namespace["client"].chat.completions.create(  # the forced call streamed, as the client joins it
            model=name, messages=namespace["messages"][:1], tools=namespace["tools"], stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        arguments = "".join(c.choices[0].delta.tool_calls[0].function.arguments or ""
                            for c in streamed if c.choices and c.choices[0].delta.tool_calls)
    finally:
        job.close()
    assert namespace["first"].choices[0].finish_reason == "tool_calls"  # the round trip was taken
    assert namespace["messages"][-1] == {"role": "tool", "tool_call_id": namespace["call"].id,
                                         "content": json.dumps({"city": "Paris", "temperature": 18})}
    assert capsys.readouterr().out == said + "\n"  # the final answer, printed
    forced = namespace["forced"].choices[0].message.tool_calls[0].function
    schema = namespace["tools"][0]["function"]["parameters"]
    assert forced.name == "get_weather" and jsonschema.validate(json.loads(forced.arguments), schema) is None
    jsonschema.validate(json.loads(arguments), schema)
    assert namespace["answer"].choices[0].message.content == place  # the json_schema request as the example sends it


def test_vllms_guided_fields_constrain_completions_and_chats(job3):
    import re

    choices = ["yes", "no", "it depends"]
    for seed in range(3):
        text = job3.client.post("/v1/completions", json={"prompt": "Is it?", "max_tokens": 8, "seed": seed,
                                                         "guided_choice": choices}).json()["choices"][0]
        assert text["text"] in choices and text["finish_reason"] == "stop"
        answer = chat(job3, guided_regex=r"[0-9]{2,4}-[a-z]{1,3}", seed=seed, max_tokens=12).json()["choices"][0]
        assert re.fullmatch(r"[0-9]{2,4}-[a-z]{1,3}", answer["message"]["content"]), answer
    for body, param in [({"guided_regex": "("}, "guided_regex"), ({"guided_choice": []}, "guided_choice"),
                        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
                        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex")]:
        assert error_of(chat(job3, **body), 400)["param"] == param
