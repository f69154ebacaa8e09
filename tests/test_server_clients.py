"""What the clients people point at an OpenAI endpoint need of the server (issue 24), in-process on the
stand-in model of test_server_inputs.py (both tokenizer families): any number of stop strings, the stop
token's logprobs entry, the tokenizer routes, OpenAI's sampling parameters and /metrics."""

import threading

import pytest
import torch

from llama_mp.runtime.tokenizer import Tokenizer
from llama_mp.server.protocol import MAX_STOP_CHARS, MAX_STOP_TOTAL_CHARS
from test_server_inputs import RandomModel, Served, continuation, error_of, sse


@pytest.fixture(scope="module", params=["llama", "llama3"])
def tokenizer_of_family(request, tokenizer_path, llama3_tokenizer_path):
    return Tokenizer(tokenizer_path if request.param == "llama" else llama3_tokenizer_path)


def forced(tokenizer, count, start=0):
    """`count` ordinary token ids inside any vocabulary (no special token among them)."""
    special = set(tokenizer.stop_ids) | {tokenizer.bos_id}
    ids = [3 + (297 + 337 * k) % (tokenizer.n_words - 3) for k in range(start, start + 4 * count)]
    return [t for t in ids if t not in special][:count]


def scripted(tokenizer, prompt, tokens):
    """A Served whose model answers `prompt` (a text) with `tokens`, and the prompt's ids."""
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    return Served(tokenizer, script={tuple(ids): tokens}), ids


# ------------------------------------------------------------------------------------------------
# Stop strings and stop tokens


def test_any_number_of_stop_strings_within_one_bound_on_their_size(tokenizer_of_family):
    tokenizer = tokenizer_of_family
    tokens = forced(tokenizer, 8)
    job, ids = scripted(tokenizer, "Q", tokens)
    try:
        text = job.client.post("/v1/completions", json={"prompt": "Q", "max_tokens": 8, "temperature": 0,
                                                        "ignore_eos": True}).json()["choices"][0]["text"]
        stop = text[3:5]
        # lm-eval sends a task's `until` list whole: seven strings, one of them in the text
        stops = ["\n\n", "Question:", "</s>", "<|im_end|>", "Q:", "\u00a7\u00a7", stop]
        body = {"prompt": "Q", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stop": stops}
        cut = job.client.post("/v1/completions", json=body).json()["choices"][0]
        want = text[:min(text.find(s) for s in stops if s in text)]
        assert cut["text"] == want and cut["finish_reason"] == "stop"
        streamed = sse(job.client.post("/v1/completions", json=dict(body, stream=True)))
        assert "".join(c["choices"][0]["text"] for c in streamed) == want
        assert streamed[-1]["choices"][0]["finish_reason"] == "stop"
        fits = ["x" * MAX_STOP_CHARS] * (MAX_STOP_TOTAL_CHARS // MAX_STOP_CHARS)
        assert job.client.post("/v1/completions", json=dict(body, stop=fits)).status_code == 200
        for over in (["x" * (MAX_STOP_CHARS + 1)], fits + ["y"]):
            error = error_of(job.client.post("/v1/completions", json=dict(body, stop=over)), 400)
            assert error["param"] == "stop"
            assert f"{MAX_STOP_CHARS} characters each and {MAX_STOP_TOTAL_CHARS} all together" in error["message"]
    finally:
        job.close()


def test_a_generated_stop_token_has_its_logprobs_entry_and_counts_in_usage(tokenizer_of_family):
    tokenizer = tokenizer_of_family
    tokens = forced(tokenizer, 3) + [tokenizer.eos_id]
    job, ids = scripted(tokenizer, "Hi", tokens)
    try:
        body = {"prompt": "Hi", "max_tokens": 10, "temperature": 0, "logprobs": 2}
        whole = job.client.post("/v1/completions", json=body).json()
        answer = whole["choices"][0]
        assert answer["finish_reason"] == "stop" and whole["usage"]["completion_tokens"] == 4
        lp = answer["logprobs"]
        # four entries: three tokens, then the stop token, which adds no text (its logprob: the forced ~0)
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
        assert lp["tokens"][-1] == "" and "".join(lp["tokens"]) == answer["text"]
        assert lp["token_logprobs"][-1] == pytest.approx(0.0, abs=1e-3)
        assert lp["text_offset"][-1] == len(answer["text"])
        chunks = sse(job.client.post("/v1/completions", json=dict(body, stream=True, stream_options={
            "include_usage": True})))
        streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
        for key in ("tokens", "token_logprobs", "text_offset"):
            assert sum((s[key] for s in streamed), []) == lp[key], key
        assert chunks[-1]["usage"]["completion_tokens"] == 4
        # lm-eval's loglikelihood request: echo, logprobs, one token; the stop token it generates has an
        # entry, so dropping the last entry leaves exactly the prompt's
        scoring = {"prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
        eos_first, _ = scripted(tokenizer, "Hi", [tokenizer.eos_id])
        try:
            scored = eos_first.client.post("/v1/completions", json=scoring).json()["choices"][0]["logprobs"]
            assert len(scored["token_logprobs"]) == len(ids) + 1 and scored["token_logprobs"][0] is None
        finally:
            eos_first.close()
        chat = job.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 10, "temperature": 0, "logprobs": True})
        assert chat.status_code == 200  # the chat prompt is another context: no script, but entries join
        content = chat.json()["choices"][0]
        assert "".join(e["token"] for e in content["logprobs"]["content"]) == content["message"]["content"]
    finally:
        job.close()


# ------------------------------------------------------------------------------------------------
# vLLM's tokenizer routes, as lm-eval's `local-completions` probes and uses them


@pytest.fixture(scope="module")
def served(tokenizer_of_family):
    job = Served(tokenizer_of_family)
    yield job
    job.close()


def test_tokenizer_info_and_tokenize_find_bos_and_eos_as_lm_eval_does(served):
    tokenizer, client = served.tokenizer, served.client
    info = client.get("/tokenizer_info").json()
    assert info["model_max_length"] == served.state.limits.max_seq_len and info["vocab_size"] == tokenizer.n_words
    for name, want in (("eos_token", tokenizer.eos_id), ("bos_token", tokenizer.bos_id)):
        # lm-eval's RemoteTokenizer: encode(info[name])[0] with add_special_tokens false is the token's id
        answer = client.post("/tokenize", json={"prompt": info[name], "add_special_tokens": False}).json()
        assert answer["tokens"] == [want] and answer["count"] == 1
    text = "The capital of France is Paris."
    plain = client.post("/tokenize", json={"prompt": text, "model": "m"}).json()
    assert plain == {"count": len(plain["tokens"]), "max_model_len": served.state.limits.max_seq_len,
                     "tokens": tokenizer.encode(text, bos=True, eos=False), "token_strs": None}
    named = client.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()["token_strs"]
    assert len(named) == plain["count"] and all(isinstance(s, str) for s in named)
    assert client.post("/detokenize", json={"tokens": plain["tokens"][1:]}).json() == {"prompt": text}
    # the same names in a completion's prompt are plain text: no text can forge a special token
    body = {"prompt": info["eos_token"], "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0}
    echoed = client.post("/v1/completions", json=body).json()["choices"][0]
    assert echoed["text"].startswith(info["eos_token"]) and len(echoed["logprobs"]["tokens"]) > 2


def test_special_token_names_in_the_text_become_their_ids(served):
    tokenizer = served.tokenizer
    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    names = {i: n for n, i in tokenizer.special_tokens.items()}
    text = f"Hi{names[eos]}there {names[bos]}"
    ids = served.client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    if tokenizer.byte_level:  # the independent reference: tiktoken's own reading of special tokens
        assert ids == tokenizer.model.encode(text, allowed_special="all")
    else:
        assert ids == tokenizer.encode("Hi", False, False) + [eos] + tokenizer.encode("there ", False, False) + [bos]
    assert tokenizer.decode(ids) == tokenizer.decode(tokenizer.encode("Hi", False, False) + [eos] +
                                                     tokenizer.encode("there ", False, False) + [bos])


def test_tokenizer_routes_refuse_what_they_cannot_do(served):
    client = served.client
    for path, body, param in [("/tokenize", {"prompt": 3}, "prompt"), ("/tokenize", {"prompt": "a", "x": 1}, "x"),
                              ("/tokenize", {"messages": [{"role": "user", "content": "a"}]}, "messages"),
                              ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
                              ("/detokenize", {"tokens": [served.tokenizer.n_words]}, "tokens"),
                              ("/detokenize", {"tokens": "1 2"}, "tokens")]:
        error = error_of(client.post(path, json=body), 404 if param == "model" else 400)
        assert error["param"] == param, error


# ------------------------------------------------------------------------------------------------
# OpenAI's (and vLLM's) parameters: each honoured, against a computation of its own


class SameLogits(RandomModel):
    """Logits that do not depend on the context: greedy repeats one token, unless the request changes the
    logits (bias, penalties, banned ids), which is then all that decides the answer."""

    def __init__(self, vocab, logits):
        super().__init__(vocab)
        self.fixed = logits

    def _logits(self, context):
        return self.fixed.clone()


@pytest.fixture
def same(tokenizer_of_family):
    """(a Served on SameLogits, its logits): the likeliest token `top` is an ordinary word."""
    tokenizer = tokenizer_of_family
    logits = torch.randn(tokenizer.n_words, generator=torch.Generator().manual_seed(4))
    top = tokenizer.encode("hello world", bos=False, eos=False)[-1]
    logits[top] = logits.max() + 0.5
    job = Served(tokenizer, run=False)
    job.scheduler.batcher = SameLogits(tokenizer.n_words, logits)
    job.loop = threading.Thread(target=job.scheduler.run, daemon=True)
    job.loop.start()
    yield job, logits, top
    job.close()


def greedy_ids(logits, steps, presence=0.0, frequency=0.0, bias=None):
    """The independent reference: greedy choice from the context-free logits with OpenAI's penalty rule."""
    counts, out = torch.zeros_like(logits), []
    for _ in range(steps):
        adjusted = logits - presence * (counts > 0) - frequency * counts + (0 if bias is None else bias)
        out.append(int(adjusted.argmax()))
        counts[out[-1]] += 1
    return out


def answer(job, **body):
    response = job.client.post("/v1/completions", json=dict({"prompt": "Q", "max_tokens": 6, "temperature": 0,
                                                             "ignore_eos": True}, **body))
    assert response.status_code == 200, response.text
    return response.json()


def text_of(job, ids):
    prompt = job.tokenizer.encode("Q", bos=True, eos=False)
    return continuation(job.tokenizer, prompt, ids)


def test_penalties_and_logit_bias_change_the_choice_as_openai_defines_them(same):
    job, logits, top = same
    assert answer(job)["choices"][0]["text"] == text_of(job, [top] * 6)
    for presence, frequency in [(0.7, 0.0), (0.0, 0.4), (1.5, -0.2), (-1.0, 2.0)]:
        want = greedy_ids(logits, 6, presence, frequency)
        got = answer(job, presence_penalty=presence, frequency_penalty=frequency)["choices"][0]["text"]
        assert got == text_of(job, want), (presence, frequency)
    assert len(set(greedy_ids(logits, 6, 2.0))) == 6  # the reference itself moves: the test can fail
    other = int(logits.argsort()[len(logits) // 2])
    bias = torch.zeros_like(logits)
    bias[[top, other]] = torch.tensor([-100.0, 30.0])
    biased = answer(job, logit_bias={str(top): -100, str(other): 30}, logprobs=1)["choices"][0]
    assert biased["text"] == text_of(job, greedy_ids(logits, 6, bias=bias))
    # logprobs stay the model's own: the biased token's, from the unbiased softmax
    assert biased["logprobs"]["token_logprobs"][0] == pytest.approx(float(torch.log_softmax(logits, -1)[other]),
                                                                   abs=1e-4)
    for bad in [{"x": 1}, {str(len(logits)): 1}, {"5": 101}, {"5": "1"}, [1]]:
        assert error_of(job.client.post("/v1/completions", json={"prompt": "Q", "logit_bias": bad}), 400)["param"] \
            == "logit_bias"
    for name, bad in [("presence_penalty", 2.5), ("frequency_penalty", -3), ("min_p", 1.5), ("top_k", -2),
                      ("min_tokens", -1), ("stop_token_ids", [-1]), ("n", 0)]:
        assert error_of(job.client.post("/v1/completions", json={"prompt": "Q", name: bad}), 400)["param"] == name


def test_top_k_1_and_min_p_1_sample_the_likeliest_token(same):
    job, logits, top = same
    greedy = text_of(job, [top] * 6)
    flat = answer(job, temperature=1.5, seed=3)["choices"][0]["text"]
    assert flat != greedy  # without a cut, sampling leaves the likeliest token
    assert answer(job, temperature=1.5, seed=3, top_k=1)["choices"][0]["text"] == greedy
    assert answer(job, temperature=1.5, seed=3, min_p=1.0)["choices"][0]["text"] == greedy
    assert answer(job, temperature=1.5, seed=3, top_k=-1)["choices"][0]["text"] == flat  # vLLM's "off"


def test_min_p_keeps_only_tokens_as_likely_as_min_p_times_the_likeliest():
    from llama_mp.runtime.sampling import RowSampling, choose_from_logits

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 2
    rows = [RowSampling(1.0, min_p=0.3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    probs = torch.softmax(logits, -1)
    kept = probs >= 0.3 * probs.max(-1, keepdim=True).values
    seen = set()
    for _ in range(200):
        ids = choose_from_logits(logits, rows).ids
        assert bool(kept.gather(1, ids[:, None]).all())
        seen |= {(r, int(t)) for r, t in enumerate(ids)}
    assert seen == {(r, int(t)) for r, t in kept.nonzero().tolist()}  # and every kept token can come


def test_min_tokens_and_stop_token_ids(same):
    job, logits, top = same
    eos = job.tokenizer.eos_id
    job.scheduler.batcher.fixed = logits.clone()
    job.scheduler.batcher.fixed[eos] = logits.max() + 5  # the end of text is the likeliest, then `top`
    body = {"ignore_eos": False, "max_tokens": 8}
    assert answer(job, **body)["usage"]["completion_tokens"] == 1
    held = answer(job, min_tokens=3, logprobs=0, **body)
    choice = held["choices"][0]
    assert choice["text"] == text_of(job, [top] * 3) and choice["finish_reason"] == "stop"
    assert held["usage"]["completion_tokens"] == 4 and choice["logprobs"]["tokens"][-1] == ""
    job.scheduler.batcher.fixed = logits
    stopped = answer(job, stop_token_ids=[top])  # even with ignore_eos
    assert stopped["choices"][0]["text"] == "" and stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 1
    word = text_of(job, [top])
    lead = word[:word.index(word.strip())]  # the word's leading space, if the family writes one
    assert answer(job, stop=[word.strip()])["choices"][0]["text"] == lead
    # stop strings count from the min_tokens-th token on
    assert answer(job, stop=[word.strip()], min_tokens=3)["choices"][0]["text"] == text_of(job, [top] * 2) + lead
    error = error_of(job.client.post("/v1/completions", json={"prompt": "Q", "max_tokens": 2, "min_tokens": 3}), 400)
    assert error["param"] == "min_tokens"


def test_n_samples_are_independent_rows_each_with_its_own_seed(same):
    job, logits, top = same
    base = {"temperature": 1.2, "max_tokens": 5}
    many = answer(job, n=3, seed=10, **base)
    texts = [c["text"] for c in sorted(many["choices"], key=lambda c: c["index"])]
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert texts == [answer(job, seed=10 + j, **base)["choices"][0]["text"] for j in range(3)]
    assert len(set(texts)) > 1
    prompt_tokens = len(job.tokenizer.encode("Q", bos=True, eos=False))
    assert many["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 15, "total_tokens": 15 + prompt_tokens,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    two = answer(job, prompt=["Q", "Q"], n=2, seed=10, **base)["choices"]  # prompt by prompt: index = p * n + j
    assert [c["text"] for c in two] == [texts[0], texts[1], texts[0], texts[1]]
    assert answer(job, n=2, best_of=2, seed=10, **base)["choices"][1]["text"] == texts[1]
    for best_of in (1, 3):
        assert error_of(job.client.post("/v1/completions", json={"prompt": "Q", "n": 2, "best_of": best_of}),
                        400)["param"] == "best_of"
    assert error_of(job.client.post("/v1/completions", json={"prompt": ["Q"] * 3, "n": 2}), 400)["param"] == "n"
    streamed = sse(job.client.post("/v1/completions", json={"prompt": "Q", "n": 3, "seed": 10, "stream": True,
                                                            "ignore_eos": True, **base}))
    for j in range(3):
        assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"][0]["index"] == j) == texts[j]
    chat = job.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Q"}], "n": 2,
                                                         "max_tokens": 4, "temperature": 0}).json()["choices"]
    assert [c["index"] for c in chat] == [0, 1] and chat[0]["message"] == chat[1]["message"]  # greedy: the same


def test_deprecated_functions_suffix_and_completion_formats_are_refused_by_name(tokenizer):
    # tools, tool_choice and chat's response_format are implemented (tests/test_server_tools.py)
    from llama_mp.server.protocol import ApiError, Limits, parse_chat, parse_completion

    limits = Limits("m", 64, 4)
    chat = {"messages": [{"role": "user", "content": "a"}]}
    for parse, base, name, value in [
            (parse_chat, chat, "functions", [{"name": "f"}]), (parse_chat, chat, "function_call", "auto"),
            (parse_chat, chat, "tool_choice", "auto"),  # with no tools to choose from
            (parse_completion, {"prompt": "a"}, "suffix", "end"),
            (parse_completion, {"prompt": "a"}, "response_format", {"type": "json_schema"})]:
        with pytest.raises(ApiError) as e:
            parse(dict(base, **{name: value}), tokenizer, limits)
        assert e.value.status == 400 and e.value.param == name and f"'{name}'" in e.value.message
    # `user` is accepted and changes nothing
    assert parse_chat(dict(chat, user="u-1"), tokenizer, limits).sequences == parse_chat(chat, tokenizer, limits).sequences


# ------------------------------------------------------------------------------------------------
# /metrics


def scrape(job):
    from prometheus_client.parser import text_string_to_metric_families

    response = job.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return samples


def test_metrics_parse_as_prometheus_text_and_move_as_requests_are_served(tokenizer):
    job = Served(tokenizer)
    try:
        before = scrape(job)
        assert before[("vllm:num_requests_running", ())] == 0 and before[("vllm:kv_cache_usage_perc", ())] == 0
        assert before[("llama_mp:kv_cache_slots", ())] == job.scheduler.batcher.slots
        assert ("vllm:prompt_tokens_total", ()) not in before  # no answer yet: the labelled series is not there
        prompt = tokenizer.encode("Hi", bos=True, eos=False)
        bodies = [{"prompt": "Hi", "max_tokens": 5, "temperature": 0, "ignore_eos": True},
                  {"prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": True, "n": 2}]
        for body in bodies:
            assert job.client.post("/v1/completions", json=body).status_code == 200
        after = scrape(job)
        assert after[("vllm:prompt_tokens_total", ())] == 2 * len(prompt)
        assert after[("vllm:generation_tokens_total", ())] == 5 + 2 * 3
        assert after[("vllm:request_success_total", (("finished_reason", "length"),))] == 3
        assert after[("vllm:e2e_request_latency_seconds_count", ())] == 3
        assert after[("vllm:time_to_first_token_seconds_count", ())] == 3
        # a piece per token after each answer's first (fewer where text is held back: a split character)
        assert 0 < after[("vllm:inter_token_latency_seconds_count", ())] <= (5 - 1) + 2 * (3 - 1)
        assert after[("vllm:e2e_request_latency_seconds_sum", ())] >= after[("vllm:time_to_first_token_seconds_sum", ())]
        assert after[("vllm:num_requests_waiting", ())] == 0
        # the batch loop's own counters: every generated token came from a row of a step; the steps are
        # within the loop's rounds that ran them
        moved = {name: after[(f"llama_mp:batch_{name}_total", ())] - before[(f"llama_mp:batch_{name}_total", ())]
                 for name in ("steps", "rows", "step_seconds", "loop_seconds")}
        assert moved["steps"] >= 5 + 3 and moved["rows"] >= 5 + 2 * 3
        assert moved["loop_seconds"] >= moved["step_seconds"] > 0
    finally:
        job.close()
