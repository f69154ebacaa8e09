"""lm-evaluation-harness 0.4.13 (`local-completions` and `local-chat-completions`, the standard ways to evaluate
a served model) against one 2-rank CPU server with 32 slots, on tiny tasks written here: loglikelihood
(multiple choice), loglikelihood_rolling and generate_until with six stop strings, batched token-id prompts,
two concurrent requests, lm-eval's own discovery of the tokenizer routes, and generate_until through the chat
route with lm-eval's chat template. Every number equals an in-process computation on the same weights
(tests/reference.py), on the token ids lm-eval got from the server's /tokenize. The same server then takes
32 concurrent requests: none is lost, and each greedy answer is its twin's, asked alone."""

import concurrent.futures
import json
import os

import httpx
import pytest
import torch

from reference import reference_logits
from test_server import start_torchrun

lm_eval = pytest.importorskip("lm_eval")


def logprobs_of(state, args, ids):
    return torch.log_softmax(reference_logits(state, args, ids), dim=-1)


def score(state, args, context, continuation):
    """Sum of log p(continuation token | everything before it)."""
    lp = logprobs_of(state, args, context + continuation)
    return float(sum(lp[len(context) + i - 1, t] for i, t in enumerate(continuation)))


def greedy_ids(state, args, tokenizer, context, steps):
    ids = []
    for _ in range(steps):
        t = int(logprobs_of(state, args, context + ids)[-1].argmax())
        if t == tokenizer.eos_id:
            break
        ids.append(t)
    return ids


def cut(text, stops):
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def greedy_text(state, args, tokenizer, context, steps, stops):
    """A completion's greedy text: it reads on from the prompt (" Paris"), cut at the first stop string."""
    ids = greedy_ids(state, args, tokenizer, context, steps)
    return cut(tokenizer.decode(context + ids)[len(tokenizer.decode(context)):], stops)


def write_task(folder, name, rows, spec):
    with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/{name}.jsonl\n" \
           "test_split: test\n"
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        f.write(head + spec)


@pytest.fixture(scope="module")
def model(make_checkpoint, tokenizer_path):
    from llama_mp.runtime.tokenizer import Tokenizer

    ckpt, args, state = make_checkpoint(shards=2, n_kv_heads=2)
    return ckpt, args, state, Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model, tokenizer_path):
    job = start_torchrun(tmp_path_factory.mktemp("lm_eval_server"), model[0], tokenizer_path, "--model_name", "tiny",
                         max_batch_size=32)
    yield job
    job.stop()


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.spawn
def test_lm_eval_local_completions_equals_an_in_process_computation(tmp_path, model, server, offline):
    from lm_eval.tasks import TaskManager

    _, args, state, tokenizer = model
    encode = lambda text: tokenizer.encode(text, bos=False, eos=False)  # noqa: E731  (lm-eval: no special tokens)
    questions = [("Q: Is fire hot?\nA:", ["yes", "no"]), ("Q: What color is the sky?\nA:", ["blue", "green", "red"]),
                 ("Q: Two and two?\nA:", ["four", "five"])]
    texts = ["The cat sat on the mat.", "Hello world, again and again."]
    prompts = ["Once upon a time", "The capital of France is", "Model parallel"]
    first = greedy_text(state, args, tokenizer, encode(prompts[0]), 8, [])
    stops = ["\n\n", "Question:", "</s>", "<|im_end|>", "Q:"] + ([first[3:5]] if len(first) > 5 and first[3:5].strip()
                                                                   else ["zq"])
    folder = str(tmp_path)
    write_task(folder, "tiny_mc", [{"question": q, "choices": c, "answer": 0} for q, c in questions],
               'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
               'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    write_task(folder, "tiny_roll", [{"text": t} for t in texts],
               'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
               'metric_list:\n  - metric: word_perplexity\n')
    write_task(folder, "tiny_gen", [{"question": p, "answer": "x"} for p in prompts],
               f'output_type: generate_until\ndoc_to_text: "{{{{question}}}}"\ndoc_to_target: "{{{{answer}}}}"\n'
               f'generation_kwargs:\n  until: {json.dumps(stops)}\n  max_gen_toks: 8\n  do_sample: false\n'
               '  temperature: 0\nmetric_list:\n  - metric: exact_match\n')
    results = lm_eval.simple_evaluate(
        model="local-completions", batch_size=2, log_samples=True,
        model_args=f"base_url={server.url}/v1/completions,model=tiny,num_concurrent=2,max_retries=1,max_length=96",
        tasks=["tiny_mc", "tiny_roll", "tiny_gen"], task_manager=TaskManager(include_path=folder,
                                                                           include_defaults=False))
    samples = results["samples"]
    for sample, (question, choices) in zip(sorted(samples["tiny_mc"], key=lambda s: s["doc_id"]), questions):
        context = encode(question)
        for (ll, _), choice in zip(sample["filtered_resps"], choices):
            whole = encode(question + " " + choice)
            assert whole[:len(context)] == context
            assert ll == pytest.approx(score(state, args, context, whole[len(context):]), abs=1e-3)
    for sample, text in zip(sorted(samples["tiny_roll"], key=lambda s: s["doc_id"]), texts):
        # one window: every token given BOS (lm-eval's prefix token, found with /tokenize) and those before it
        assert sample["filtered_resps"][0] == pytest.approx(score(state, args, [tokenizer.bos_id], encode(text)),
                                                            abs=1e-3)
    generated = [s["filtered_resps"][0] for s in sorted(samples["tiny_gen"], key=lambda s: s["doc_id"])]
    assert generated == [greedy_text(state, args, tokenizer, encode(p), 8, stops + ["</s>"]) for p in prompts]
    assert results["results"]["tiny_mc"]["acc,none"] >= 0


@pytest.mark.spawn
def test_lm_eval_local_chat_completions_equals_an_in_process_computation(tmp_path, model, server, offline):
    """generate_until through /v1/chat/completions: lm-eval's chat template makes each question a user
    message, which the server puts in the checkpoint family's chat format; the answer is decoded alone."""
    from lm_eval.tasks import TaskManager

    from llama_mp.runtime.chat import encode_dialog

    _, args, state, tokenizer = model
    questions = ["What is a llama?", "Name a colour.", "Count to three."]
    # lm-eval's chat client sends the first four of a task's stop strings
    stops = ["\n\n", "Question:", "</s>", "A:", "never sent"]
    write_task(str(tmp_path), "tiny_chat", [{"question": q, "answer": "x"} for q in questions],
               f'output_type: generate_until\ndoc_to_text: "{{{{question}}}}"\ndoc_to_target: "{{{{answer}}}}"\n'
               f'generation_kwargs:\n  until: {json.dumps(stops)}\n  max_gen_toks: 8\n  do_sample: false\n'
               '  temperature: 0\nmetric_list:\n  - metric: exact_match\n')
    results = lm_eval.simple_evaluate(
        model="local-chat-completions", apply_chat_template=True, log_samples=True,
        model_args=f"base_url={server.url}/v1/chat/completions,model=tiny,num_concurrent=3,max_retries=1",
        tasks=["tiny_chat"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    generated = [s["filtered_resps"][0] for s in sorted(results["samples"]["tiny_chat"], key=lambda s: s["doc_id"])]
    expected = []
    for question in questions:
        prompt = encode_dialog(tokenizer, [{"role": "user", "content": question}])
        expected.append(cut(tokenizer.decode(greedy_ids(state, args, tokenizer, prompt, 8)), stops[:4]))
    assert all(expected) and generated == expected  # all: no empty answer compared


@pytest.mark.spawn
def test_32_concurrent_requests_none_lost_each_greedy_answer_its_twins_alone(model, server):
    """32 requests at once fill the 32 slots (half streamed): every one is answered, once, and each greedy
    answer is the one its prompt gets alone, which is the in-process computation's."""
    _, args, state, tokenizer = model
    prompts = ["The quick brown fox", "Once upon a time there was", "Model parallel", "Hello", "A B C D E F G",
               "Continuous batching lets requests", "Q: Is fire hot?\nA:", "1, 2, 3,"]
    url = server.url + "/v1/completions"

    def ask(client, i):
        body = {"model": "tiny", "prompt": prompts[i % len(prompts)], "max_tokens": 12, "temperature": 0}
        if i % 2 == 0:
            return client.post(url, json=body).json()["choices"][0]["text"]
        with client.stream("POST", url, json=dict(body, stream=True)) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        return "".join(c["choices"][0]["text"] for c in chunks)

    def served():
        text = httpx.get(server.url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:request_success_total"))

    with httpx.Client(timeout=120) as client:
        alone = [ask(client, i) for i in range(len(prompts))]
        before = served()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            together = list(pool.map(lambda i: ask(client, i), range(32)))
        assert served() - before == 32  # each answered once: none lost, none twice
    assert alone == [greedy_text(state, args, tokenizer, tokenizer.encode(p, bos=True, eos=False), 12, [])
                     for p in prompts]
    assert together == [alone[i % len(prompts)] for i in range(32)]
