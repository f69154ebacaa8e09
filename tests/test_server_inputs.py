"""The server's HTTP side in-process, on a stand-in model: the real app, protocol, scheduler and tokenizers
(both families), with a `Batcher` whose "model" gives each context its own fixed random logits. What it
proves does not depend on the model: the text answered is the continuation as it reads after the prompt
(echoed, streamed, with logprobs, cut by stops), every field is honoured or refused, and every body a client
can send ends in a 4xx with OpenAI's error JSON (issue 20, classes 1, 2, 6 and 8)."""

import json
import os
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st

from llama_mp.runtime.batching import StepResult
from llama_mp.runtime.sampling import choose_from_logits
from llama_mp.runtime.scoring import TokenScores
from llama_mp.runtime.tokenizer import Tokenizer, prompt_pieces, prompt_text
from llama_mp.server.app import HttpServer, bind, make_app
from llama_mp.server.protocol import CHAT_FIELDS, COMPLETION_FIELDS, ApiError, Limits, parse_chat, parse_completion
from llama_mp.server.scheduler import Scheduler, StopText
from llama_mp.server.state import ServerState

SEQ_LEN, SLOTS = 64, 4
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)


class RandomModel:
    """A Batcher stand-in: the logits after a context are random but fixed by the context, so greedy
    answers repeat (streamed or not, alone or batched). `script`: tokens to force after a given prompt."""

    def __init__(self, vocab: int, script=None):
        self.vocab, self.slots, self.script = vocab, SLOTS, dict(script or {})
        self.device = torch.device("cpu")  # where its logits are (the scheduler's generators go there)
        self.contexts = {}

    def _logits(self, context) -> torch.Tensor:
        return torch.randn(self.vocab, generator=torch.Generator().manual_seed(hash(tuple(context)) % 2 ** 61))

    def run(self, plan, sampling_of) -> StepResult:
        for slot in plan.release:
            self.contexts.pop(slot, None)
        scores = {}
        for a in plan.admit:
            self.contexts[a.slot] = (list(a.prompt), list(a.prompt))
            if a.score_top >= 0:
                rows = torch.stack([torch.log_softmax(self._logits(a.prompt[:i]), -1) for i in range(1, len(a.prompt))]) \
                    if len(a.prompt) > 1 else torch.zeros(0, self.vocab)
                targets = torch.tensor(a.prompt[1:], dtype=torch.long)
                top = rows.topk(max(a.score_top, 1), -1) if len(a.prompt) > 1 else None
                scores[a.slot] = TokenScores(rows.gather(1, targets[:, None])[:, 0] if len(a.prompt) > 1 else
                                             torch.zeros(0), top.values if top else torch.zeros(0, 1),
                                             top.indices if top else torch.zeros(0, 1, dtype=torch.long))
        slots = sorted(self.contexts)
        logits = []
        for slot in slots:
            prompt, context = self.contexts[slot]
            forced = self.script.get(tuple(prompt))
            row = self._logits(context)
            done = len(context) - len(prompt)
            if forced and done < len(forced):
                row[forced[done]] = 1e4
            logits.append(row)
        choice = choose_from_logits(torch.stack(logits), sampling_of(slots))
        for slot, token in zip(slots, choice.ids.tolist()):
            self.contexts[slot][1].append(token)
        return StepResult(slots, choice, scores)

    def pause(self) -> None:
        pass


class Served:
    """The app with a scheduler on a RandomModel (or on `batcher`, a real model's), its batch loop in a thread."""

    def __init__(self, tokenizer, script=None, max_queue=16, receive_timeout_s=30.0, max_body=1 << 16, run=True,
                 batcher=None):
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(batcher or RandomModel(tokenizer.n_words, script), tokenizer, max_queue)
        self.state = ServerState(api_key=None, max_body_bytes=max_body, receive_timeout_s=receive_timeout_s)
        self.state.ready(self.scheduler, tokenizer, Limits("m", SEQ_LEN, SLOTS))
        self.app = make_app(self.state)
        self.client = TestClient(self.app, raise_server_exceptions=False)
        self.loop = threading.Thread(target=self.scheduler.run, daemon=True) if run else None
        if self.loop:
            self.loop.start()

    def close(self):
        self.scheduler.drain(0)
        if self.loop:
            self.loop.join(10)


@pytest.fixture(scope="module", params=["llama", "llama3"])
def served(request, tokenizer_path, llama3_tokenizer_path):
    job = Served(Tokenizer(tokenizer_path if request.param == "llama" else llama3_tokenizer_path))
    yield job
    job.close()


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def sse(response):
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def continuation(tokenizer, prompt_ids, generated):
    """The independent reference: the text `generated` adds after the prompt, from one decode of all."""
    start = 1 if prompt_ids[:1] == [tokenizer.bos_id] else 0
    before = tokenizer.decode(prompt_ids[start:])
    whole = tokenizer.decode(prompt_ids[start:] + generated)
    assert whole.startswith(before)
    return whole[len(before):]


# ------------------------------------------------------------------------------------------------
# Class 1: the text is the continuation as it reads after the prompt


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_a_text_prompt_reads_back_as_sent_in_both_families(served, text):
    ids = served.tokenizer.encode(text, bos=True, eos=False)
    pieces = prompt_pieces(served.tokenizer, ids)
    assert len(pieces) == len(ids) and pieces[0] == "" and "".join(pieces) == prompt_text(served.tokenizer, ids) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stop_text_is_the_continuation_cut_at_the_first_stop_with_entries_that_join(served, data):
    tokenizer = served.tokenizer
    prompt = tokenizer.encode(data.draw(TEXT), bos=True, eos=False)
    special = set(tokenizer.stop_ids) | {tokenizer.bos_id}
    token = st.integers(0, tokenizer.n_words - 1).filter(lambda t: t not in special)
    generated = data.draw(st.lists(token, max_size=12))
    full = continuation(tokenizer, prompt, generated)
    stops = data.draw(st.lists(st.one_of(st.text(max_size=3), st.sampled_from([full[i:i + 3] for i in
                                                                              range(len(full))] or [""])),
                               max_size=3).map(lambda ss: [s for s in ss if s and "\ufffd" not in s]))
    text = StopText(tokenizer, stops, prompt, entries=True)
    sent, entries, stopped = "", [], False
    for t in generated:
        piece = text.push(t)
        assert "".join(e.token for e in piece.entries) == piece.text  # every chunk: tokens join into its text
        sent, entries = sent + piece.text, entries + piece.entries
        if piece.stopped:
            stopped = True
            break
    if not stopped:
        piece = text.flush()
        sent, entries = sent + piece.text, entries + piece.entries
    # The reference: generation stops at the first token after which a stop string is in the text (its
    # complete characters), and the text is cut where the earliest stop string found then starts.
    want = full
    for j in range(1, len(generated) + 1):
        upto = os.path.commonprefix([continuation(tokenizer, prompt, generated[:j]), full])
        cuts = [upto.find(s) for s in stops if upto.find(s) >= 0]
        if cuts:
            want = full[:min(cuts)]
            break
    assert sent == want
    assert "".join(e.token for e in entries) == sent and len(entries) <= len(generated)
    assert not any(s in sent for s in stops)


def completion(served, **body):
    response = served.client.post("/v1/completions", json=dict({"max_tokens": 8, "temperature": 0}, **body))
    assert response.status_code == 200, response.text
    return response


def test_the_first_piece_keeps_its_leading_space(served):
    tokenizer = served.tokenizer
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    paris = tokenizer.encode(prompt + " Paris", bos=True, eos=False)[len(ids):]
    job = Served(tokenizer, script={tuple(ids): paris})
    try:
        answer = job.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": len(paris), "temperature": 0,
                                                          "logprobs": 1}).json()["choices"][0]
        assert answer["text"] == " Paris" and "".join(answer["logprobs"]["tokens"]) == " Paris"
        echoed = job.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": len(paris), "temperature": 0,
                                                          "echo": True}).json()["choices"][0]
        assert echoed["text"] == prompt + " Paris"
        chunks = sse(job.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": len(paris),
                                                              "temperature": 0, "stream": True}))
        assert "".join(c["choices"][0]["text"] for c in chunks) == " Paris"
    finally:
        job.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=TEXT, echo=st.booleans(), logprobs=st.sampled_from([None, 0, 2]), stop=st.lists(st.text(
    st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=2), max_size=2), max_tokens=st.integers(0, 10))
def test_completions_echo_logprobs_offsets_and_streaming_agree(served, prompt, echo, logprobs, stop, max_tokens):
    tokenizer = served.tokenizer
    if max_tokens == 0 and not (echo and logprobs is not None):
        max_tokens = 1
    body = {"prompt": prompt, "echo": echo, "logprobs": logprobs, "stop": stop or None, "max_tokens": max_tokens}
    whole = completion(served, **body).json()["choices"][0]
    text = whole["text"]
    if echo:
        assert text.startswith(prompt)  # the prompt exactly as sent: no <|begin_of_text|>
    generated = text[len(prompt):] if echo else text
    assert not any(s in generated for s in stop)
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    if logprobs is not None:
        lp = whole["logprobs"]
        assert "".join(lp["tokens"]) == text
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
        if echo:
            assert lp["tokens"][:len(ids)] == prompt_pieces(tokenizer, ids) and lp["token_logprobs"][0] is None
    chunks = sse(served.client.post("/v1/completions", json=dict({"temperature": 0, "stream": True}, **body)))
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    if logprobs is not None:
        streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
        for c in chunks:
            lp = c["choices"][0]["logprobs"]
            assert "".join(lp["tokens"]) == c["choices"][0]["text"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert sum((lp[key] for lp in streamed), []) == whole["logprobs"][key], key


def test_completion_text_equals_one_decode_of_prompt_and_answer(served):
    """Against the independent reference: the stand-in's tokens, decoded once with the prompt."""
    tokenizer = served.tokenizer
    for prompt in ["Hello", "Hello ", "", "x\n"]:
        ids = tokenizer.encode(prompt, bos=True, eos=False)
        forced = [3 + (297 + 337 * k) % (tokenizer.n_words - 3) for k in range(8)]  # inside any vocabulary
        job = Served(tokenizer, script={tuple(ids): forced})
        try:
            answer = job.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": len(forced),
                                                              "temperature": 0, "ignore_eos": True}).json()
            assert answer["choices"][0]["text"] == continuation(tokenizer, ids, forced)
        finally:
            job.close()


def test_chat_answers_stream_as_they_are_whole_with_logprobs(served):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    whole = served.client.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = whole["message"]["content"]
    assert "".join(e["token"] for e in whole["logprobs"]["content"]) == content
    chunks = sse(served.client.post("/v1/chat/completions", json=dict(body, stream=True)))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == content
    assert sum((c["choices"][0]["logprobs"]["content"] for c in chunks if c["choices"][0]["logprobs"]), []) \
        == whole["logprobs"]["content"]


# ------------------------------------------------------------------------------------------------
# Class 2: every field is honoured or refused; null is "not given"


REFUSED_VALUES = {"n": 2, "best_of": 3, "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
                  "logit_bias": {"1": 5}, "top_k": 40, "min_p": 0.1, "min_tokens": 3, "stop_token_ids": [2],
                  "include_stop_str_in_output": True, "use_beam_search": True, "suffix": "end",
                  "response_format": {"type": "json_object"}, "tools": [{"type": "function"}],
                  "tool_choice": "auto", "functions": [{"name": "f"}], "function_call": "auto",
                  "modalities": ["text", "audio"], "audio": {"voice": "alloy"}, "prediction": {"type": "content"},
                  "reasoning_effort": "low", "web_search_options": {}, "store": True}


def test_every_refused_field_is_a_400_naming_it_and_its_default_is_accepted(tokenizer):
    limits = Limits("m", SEQ_LEN, 2)
    for table, parse, base in [(COMPLETION_FIELDS, parse_completion, {"prompt": "a"}),
                               (CHAT_FIELDS, parse_chat, {"messages": [{"role": "user", "content": "a"}]})]:
        refused = {name: rule for name, rule in table.items() if rule.treatment == "refused"}
        assert set(refused) <= set(REFUSED_VALUES)
        for name, rule in refused.items():
            with pytest.raises(ApiError) as e:
                parse(dict(base, **{name: REFUSED_VALUES[name]}), tokenizer, limits)
            assert e.value.status == 400 and e.value.param == name and f"'{name}'" in e.value.message
            for default in rule.defaults:  # asks for nothing: the same sequences as without it
                assert parse(dict(base, **{name: default}), tokenizer, limits).sequences == \
                    parse(base, tokenizer, limits).sequences
        assert parse(dict(base, user="someone"), tokenizer, limits).sequences == parse(base, tokenizer, limits).sequences
        with pytest.raises(ApiError) as e:
            parse(dict(base, temprature=0), tokenizer, limits)
        assert e.value.status == 400 and e.value.param == "temprature"
    with pytest.raises(ApiError) as e:  # a field of a message
        parse_chat({"messages": [{"role": "user", "content": "a", "name": "bob"}]}, tokenizer, limits)
    assert e.value.param == "messages" and "'name'" in e.value.message
    with pytest.raises(ApiError) as e:
        parse_completion({"prompt": "a", "stream": True, "stream_options": {"continuous_usage_stats": True}},
                         tokenizer, limits)
    assert e.value.param == "stream_options"


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_an_explicit_null_is_not_given_for_every_field(tokenizer, data):
    limits = Limits("m", SEQ_LEN, 2)
    for table, parse, base in [(COMPLETION_FIELDS, parse_completion, {"prompt": "a", "max_tokens": 5, "seed": 3}),
                               (CHAT_FIELDS, parse_chat, {"messages": [{"role": "user", "content": "a"}],
                                                          "max_tokens": 5, "seed": 3})]:
        nulls = data.draw(st.lists(st.sampled_from(sorted(set(table) - set(base))), unique=True))
        with_nulls = dict(base, **{name: None for name in nulls})
        assert parse(with_nulls, tokenizer, limits).sequences == parse(base, tokenizer, limits).sequences
    chat = parse_chat({"messages": [{"role": "user", "content": "a"}], "max_tokens": 5,
                       "max_completion_tokens": None}, tokenizer, limits)
    assert chat.sequences[0].max_tokens == 5
    with pytest.raises(ApiError):
        parse_chat({"messages": [{"role": "user", "content": "a"}], "max_tokens": 5, "max_completion_tokens": 6},
                   tokenizer, limits)


NUMERIC_FIELDS = {"completion": ["max_tokens", "temperature", "top_p", "logprobs", "seed"],
                  "chat": ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_logprobs", "seed"]}
ANY_NUMBER = st.one_of(st.integers(), st.integers(min_value=10 ** 300, max_value=10 ** 1000), st.floats(),
                       st.sampled_from([-0.0, 2 ** 64, -(2 ** 64), 1e-300, 5e-324, 10 ** 400]))


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["completion", "chat"]), data=st.data())
def test_any_number_in_a_numeric_field_is_used_or_a_short_400_naming_it(tokenizer, kind, data):
    """Class 4 and 6: whatever number a client sends (huge, tiny, negative, NaN, a float for a count), the
    field is used as it reads or refused with a 400 naming it in the request's spelling, in a message that
    describes a long number instead of quoting it."""
    name = data.draw(st.sampled_from(NUMERIC_FIELDS[kind]))
    value = data.draw(ANY_NUMBER)
    base = {"prompt": "a"} if kind == "completion" else {"messages": [{"role": "user", "content": "a"}]}
    if name == "top_logprobs":
        base["logprobs"] = True
    parse = parse_completion if kind == "completion" else parse_chat
    try:
        job = parse(dict(base, **{name: value}), tokenizer, Limits("m", SEQ_LEN, 2))
    except ApiError as e:
        said = f"'{name}'" if e.code != "context_length_exceeded" else name  # OpenAI's words for that one
        assert e.status == 400 and e.param == name and said in e.message and len(e.message) < 400, e.message
        return
    spec = job.sequences[0]
    if name in ("max_tokens", "max_completion_tokens"):
        assert spec.max_tokens == value
    elif name in ("temperature", "top_p"):
        assert getattr(spec, name) == value and type(getattr(spec, name)) is float
    elif name == "seed":
        assert spec.seed == value % 2 ** 64
    else:
        assert spec.logprobs == value


def test_a_field_named_twice_or_an_unknown_part_field_is_a_400(served):
    error = error_of(served.client.post("/v1/completions", content=b'{"prompt": "a", "prompt": "b"}'), 400)
    assert error["param"] == "prompt" and "twice" in error["message"]
    error = error_of(served.client.post("/v1/completions", content=b'{"prompt": "a", "seed": 1' + b"0" * 4400 + b"}"),
                     400)
    assert "4300 digits" in error["message"] and "sys." not in error["message"]
    part = {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}
    error = error_of(served.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]}),
                     400)
    assert error["param"] == "messages" and "'cache_control'" in error["message"]


# ------------------------------------------------------------------------------------------------
# Class 6: any text or JSON a client can send ends in a 4xx


SURROGATE = "\\ud800"


def test_lone_surrogates_anywhere_are_a_400(served):
    raw = [('{"prompt": "a%sb"}' % SURROGATE, "prompt"), ('{"prompt": ["ok", "%s"]}' % SURROGATE, "prompt"),
           ('{"prompt": "a", "model": "%s"}' % SURROGATE, "model"), ('{"prompt": "a", "stop": "%s"}' % SURROGATE, "stop"),
           ('{"prompt": "a", "%s": 1}' % SURROGATE, None)]
    for body, param in raw:
        error = error_of(served.client.post("/v1/completions", content=body.encode()), 400)
        assert "surrogate" in error["message"] and (param is None or error["param"] == param), error
    chat = '{"messages": [{"role": "system", "content": "%s"}, {"role": "user", "content": "hi"}]}' % SURROGATE
    assert error_of(served.client.post("/v1/chat/completions", content=chat.encode()), 400)["param"] == "messages"
    assert served.client.post("/v1/completions", content='{"prompt": "\\ud83d\\ude00", "max_tokens": 1}'.encode()) \
        .status_code == 200  # a pair is one character
    error_of(served.client.get("/v1/models/%ED%A0%80"), 404)
    error_of(served.client.get("/v1/models/%FF"), 404)


def test_invalid_utf8_and_deep_nesting_are_a_400(served):
    for body in [b'{"prompt": "\xff\xfe"}', b'{"prompt": "\xed\xa0\x80"}', b'{"prompt": "a\xc3"}', b"\xef\xbb\xbf{}"]:
        error_of(served.client.post("/v1/completions", content=body), 400)
    for depth in (40, 3000, 30000):
        error = error_of(served.client.post("/v1/completions", content=b"[" * depth + b"]" * depth), 400)
        assert "nested" in error["message"]
        error_of(served.client.post("/v1/completions", content=b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"), 400)
    for body in [b"", b"null", b"[]", b'"x"', b"1e999", b'{"prompt": NaN}']:
        error_of(served.client.post("/v1/completions", content=body), 400)


@pytest.fixture(scope="module")
def http(tokenizer_path):
    """A real uvicorn (in this process) for what a TestClient cannot send: cut and slow bodies."""
    job = Served(Tokenizer(tokenizer_path), receive_timeout_s=1.0)
    server = HttpServer(job.app, bind("127.0.0.1", 0), job.state.receive_timeout_s)
    server.start()
    yield server, job
    server.stop()
    job.close()


def _raw(server, data: bytes, pause_s=0.0, then=b"", hold=False) -> bytes:
    """What the server sends back on one connection that sends `data` (then, after `pause_s`, `then`) and
    closes its side, or (`hold`) keeps it open, until the server closes it."""
    host, port = server.sock.getsockname()[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(data)
        if pause_s:
            time.sleep(pause_s)
        if then:
            s.sendall(then)
        s.shutdown(socket.SHUT_WR) if not (pause_s or hold) else None
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
        return out


def test_a_cut_off_or_slow_body_ends_cleanly_and_the_server_goes_on(http, capfd):
    server, job = http
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    _raw(server, head + b'{"prompt": "ab')                  # cut off: the client closes mid-body
    slow = _raw(server, head + b'{"prompt"', pause_s=2.0)  # slow loris: more than the 1 s the body may take
    assert b" 408 " in slow.split(b"\r\n")[0] and b'"request_timeout"' in slow
    assert b"connection: close" in slow.lower()  # the rest of that body is not read as a next request
    for trickle in (b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"):  # silent, or a head never ended
        started = time.monotonic()
        slow = _raw(server, trickle, hold=True)
        assert 0.9 < time.monotonic() - started < 3, slow
        assert b" 408 " in slow.split(b"\r\n")[0] and b"request line and headers" in slow, slow
    # the head's bound holds for the next request of a kept-alive connection too, and not within a request
    host, port = server.sock.getsockname()[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\n")
        started = time.monotonic()
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and 0.9 < time.monotonic() - started < 3, answer
    ok = httpx.post(server.address + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0},
                    timeout=30)
    assert ok.status_code == 200
    time.sleep(0.2)
    assert "Traceback" not in capfd.readouterr().err


# ------------------------------------------------------------------------------------------------
# Class 8: refusals say what is true


def test_more_prompts_than_the_queue_holds_is_a_400_and_a_full_queue_a_503(tokenizer):
    job = Served(tokenizer, max_queue=1, run=False)  # no batch loop: what is queued stays queued
    error = error_of(job.client.post("/v1/completions", json={"prompt": ["a", "b"]}), 400)
    assert error["param"] == "prompt" and "--max_queue" in error["message"]
    spec = parse_completion({"prompt": "a"}, tokenizer, job.state.limits).sequences
    job.scheduler.submit(spec, None)
    error = error_of(job.client.post("/v1/completions", json={"prompt": "b"}), 503)
    assert error["type"] == "server_error" and "full" in error["message"]


def test_a_failed_step_names_its_cause(tokenizer):
    class Broken(RandomModel):
        def run(self, plan, choose):
            raise ValueError("shapes [3] and [4] differ")

    job = Served(tokenizer, run=False)
    job.scheduler.batcher = Broken(tokenizer.n_words)
    loop = threading.Thread(target=lambda: pytest.raises(ValueError, job.scheduler.run), daemon=True)
    loop.start()
    error = error_of(job.client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}), 503)
    assert "shapes [3] and [4] differ" in error["message"] and "log" not in error["message"]
    loop.join(10)
