"""Prefix caching under load, as a server's clients see it: 32 concurrent mixed requests (chat turns on a
shared system prompt, completions sharing a start, lm-eval's scored echo prompts, streams whose clients go
away mid-answer; the scored ones each after the one before, as lm-eval sends them) against a 2-rank server
whose small --prefix_cache_rows budget forces evictions, and the same requests against one with the cache
off. No request is lost, every answer equals its twin (greedy text; the scored prompts' logprobs and
alternatives exactly), and /metrics shows hits and evictions."""

import concurrent.futures
import json
import re
import subprocess
import time

import httpx
import pytest

from launching import ROOT, TORCHRUN, script
from multiproc import free_port
from test_server import Server, _env, server_args

SYSTEM = "You are a helpful assistant who answers in one short line, always politely and well."
STORY = "The river runs past old stone walls, under a bridge and through a field, toward the sea. " * 4


def _start(folder, ckpt_dir, tokenizer_path, rows):
    err = str(folder / f"server{rows}.err")
    cmd = TORCHRUN + ["--nproc_per_node", "2", "--master_port", str(free_port()), script("serve"), "--ckpt_dir",
                      ckpt_dir, "--tokenizer_path", tokenizer_path, *server_args(192), "--model_name", "tiny",
                      "--prefix_cache_rows", str(rows)]
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)
    return Server([proc], [err])


@pytest.fixture(scope="module")
def servers(tmp_path_factory, make_checkpoint, tokenizer_path):
    """(cache on keeping two rows of the four, cache off), started together."""
    folder, ckpt = tmp_path_factory.mktemp("prefix_servers"), make_checkpoint(shards=2, n_kv_heads=2)[0]
    jobs = [_start(folder, ckpt, tokenizer_path, rows) for rows in (2, 0)]
    try:
        yield [job.wait_ready() for job in jobs]
    finally:
        for job in jobs:
            job.stop()


def _requests():
    """32 requests: (kind, path, body); kind "cut" is a stream its client leaves after two chunks."""
    out = []
    for i in range(8):  # chat: a shared system prompt, and turns that continue a conversation
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Tell me about llama {i}"}]
        if i % 2:
            messages += [{"role": "assistant", "content": "Llamas graze on the hill."},
                         {"role": "user", "content": f"And what of llama {i} in the rain?"}]
        out.append(("chat", "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0,
                                                     "stream": i % 4 == 0}))
    for i in range(8):  # completions sharing a start, some streamed
        out.append(("completion", "/v1/completions", {"prompt": f"Once upon a time, in a land far away, {i}",
                                                       "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                                       "stream": i % 3 == 0}))
    for i in range(8):  # lm-eval's multiple choice: a story and each answer, scored
        out.append(("scored", "/v1/completions", {"prompt": f"{STORY}Question {i % 2}: where does it run?\nAnswer: "
                                                            + ["the sea", "the hill", "a bridge", "a field"][i // 2],
                                                  "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}))
    for i in range(8):  # streams whose client goes away after two chunks
        out.append(("cut", "/v1/completions", {"prompt": f"{SYSTEM} Story {i}:", "max_tokens": 150, "temperature": 0,
                                                "ignore_eos": True, "stream": True}))
    return out


def _ask(url, kind, path, body):
    """What the client got: the answer's text (or the scored entries), its finish reason and usage."""
    if not body.get("stream"):
        r = httpx.post(url + path, json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if kind == "scored":
            lp = choice["logprobs"]
            return lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], r.json()["usage"]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        return text, choice["finish_reason"]
    text, finish, chunks = "", None, 0
    with httpx.stream("POST", url + path, json=dict(body, stream_options={"include_usage": True}),
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks += 1
            if kind == "cut" and chunks == 2:
                return None  # the client goes away mid-answer
            for c in json.loads(line[6:])["choices"]:
                text += (c["delta"].get("content") or "") if kind == "chat" else c["text"]
                finish = c.get("finish_reason") or finish
    return text, finish


def _metric(url, name):
    found = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(found.group(1))


@pytest.mark.spawn
def test_32_concurrent_mixed_requests_lose_nothing_and_answer_as_with_the_cache_off(servers):
    requests = _requests()
    scored = [i for i, r in enumerate(requests) if r[0] == "scored"]
    answers = []
    for server in servers:
        def scored_in_turn():  # as lm-eval sends them: each after the one before, the others meanwhile
            return [_ask(server.url, *requests[i]) for i in scored]

        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            turns = pool.submit(scored_in_turn)
            others = {i: pool.submit(_ask, server.url, *r) for i, r in enumerate(requests) if i not in scored}
            got = {**dict(zip(scored, turns.result())), **{i: f.result() for i, f in others.items()}}
        answers.append([got[i] for i in range(len(requests))])
    on, off = answers
    for (kind, _, body), a, b in zip(requests, on, off):
        if kind == "cut":
            assert a is None and b is None
        elif kind == "scored":
            assert a[:3] == b[:3], body["prompt"]  # tokens, logprobs, alternatives: exactly
        else:
            assert a == b and a[1] in ("length", "stop"), (body, a, b)
    # scored prompts after the first continued from the story a kept row held, with its entries (not all:
    # while requests wait, a row left free is taken at once, kept or not)
    held = [on[i][3]["prompt_tokens_details"]["cached_tokens"] for i in scored]
    assert held[0] == 0 and any(n > 0 for n in held[1:]), held
    cached, off_cached = servers[0].url, servers[1].url
    assert _metric(cached, "vllm:prefix_cache_hits_total") > 0
    assert _metric(cached, "llama_mp:prefix_cache_hit_prompts_total") > 0
    assert _metric(cached, "llama_mp:prefix_cache_evictions_total") > 0  # two kept rows of four: evictions
    assert _metric(off_cached, "vllm:prefix_cache_hits_total") == 0
    deadline = time.monotonic() + 10
    for server in servers:  # the cut streams are cancelled once their server sees the client gone
        while _metric(server.url, "vllm:num_requests_running") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(server.url, "vllm:num_requests_running") == 0
