"""What the clients people point at an OpenAI endpoint need of the server (issue 24), in-process on the
stand-in model of test_server_inputs.py (both tokenizer families): any number of stop strings, the stop
token's logprobs entry, the tokenizer routes, OpenAI's sampling parameters and /metrics."""

import pytest

from llama_mp.runtime.tokenizer import Tokenizer
from llama_mp.server.protocol import MAX_STOP_CHARS, MAX_STOP_TOTAL_CHARS
from test_server_inputs import Served, error_of, sse


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
