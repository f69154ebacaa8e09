"""lm-evaluation-harness 0.4.13 (`local-completions`, the standard way to evaluate a served model) against a
2-rank CPU server, on tiny tasks written here: loglikelihood (multiple choice), loglikelihood_rolling and
generate_until with six stop strings, batched token-id prompts, two concurrent requests, and lm-eval's own
discovery of the tokenizer routes. Every number equals an in-process computation on the same weights
(tests/reference.py), on the token ids lm-eval got from the server's /tokenize."""

import json
import os

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


def greedy_text(state, args, tokenizer, context, steps, stops):
    ids = []
    for _ in range(steps):
        t = int(logprobs_of(state, args, context + ids)[-1].argmax())
        if t == tokenizer.eos_id:
            break
        ids.append(t)
    text = tokenizer.decode(context + ids)[len(tokenizer.decode(context)):]
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def write_task(folder, name, rows, spec):
    with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/{name}.jsonl\n" \
           "test_split: test\n"
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        f.write(head + spec)


@pytest.mark.spawn
def test_lm_eval_local_completions_equals_an_in_process_computation(tmp_path, make_checkpoint, tokenizer_path,
                                                                    monkeypatch):
    from lm_eval.tasks import TaskManager

    from llama_mp.runtime.tokenizer import Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ckpt, args, state = make_checkpoint(shards=2, n_kv_heads=2)
    tokenizer = Tokenizer(tokenizer_path)
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
    server = start_torchrun(tmp_path, ckpt, tokenizer_path, "--model_name", "tiny")
    try:
        results = lm_eval.simple_evaluate(
            model="local-completions", batch_size=2, log_samples=True,
            model_args=f"base_url={server.url}/v1/completions,model=tiny,num_concurrent=2,max_retries=1,max_length=96",
            tasks=["tiny_mc", "tiny_roll", "tiny_gen"], task_manager=TaskManager(include_path=folder,
                                                                               include_defaults=False))
    finally:
        server.stop()
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
