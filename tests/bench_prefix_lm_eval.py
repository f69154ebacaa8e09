"""lm-eval 0.4.13's multiple choice (`local-completions`: each choice a scored prompt, context + " " + choice,
`echo` + `logprobs`, max_tokens 0) against two running servers, prefix caching off and on, to compare their
times and check that every loglikelihood is the same (docs/server.md "Prefix caching"). 32 questions, each a
~250-token story and 4 one-word choices; the stories' lengths differ by question, so lm-eval's order (longest
prompt first) sends each question's choices one after another. The servers, e.g. the 110M shape on 2 CPU ranks:

    llama-mp synth /tmp/m110 --mp 2 --dim 768 --n_layers 12 --n_heads 12 --multiple_of 32
    torchrun --nproc_per_node 2 --master_port 29511 launch/serve.py --ckpt_dir /tmp/m110 \
        --tokenizer_path /tmp/m110/tokenizer.model --backend gloo --device cpu --max_seq_len 1024 \
        --max_batch_size 4 --model_name m --prefix_cache_rows 0 --port 8101
    (the same with --master_port 29512 --prefix_cache_rows 4 --port 8102)

then `python tests/bench_prefix_lm_eval.py 8101 8102` runs the task on each twice (off, on, off, on) and
prints each run's seconds, the speed-up (best off / best on) and whether the loglikelihoods are equal."""
import json, os, sys, tempfile, time
import lm_eval
from lm_eval.tasks import TaskManager

off_port, on_port = int(sys.argv[1]), int(sys.argv[2])
words = ("the quick brown fox jumps over a lazy dog while seven llamas graze on the hill and a river runs "
         "past old stone walls toward the sea ").split()
choices = ["river", "llamas", "fox", "walls"]
rows = [{"question": " ".join(words[(q * 5 + i) % len(words)] for i in range(150 + 6 * q))
         + f"\nQuestion {q}: what runs toward the sea?\nAnswer:", "choices": choices, "answer": 0} for q in range(32)]
folder = tempfile.mkdtemp()
with open(os.path.join(folder, "story_mc.jsonl"), "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows))
with open(os.path.join(folder, "story_mc.yaml"), "w") as f:
    f.write(f"task: story_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/story_mc.jsonl\n"
            'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
            'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')


def run(port):
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="local-completions", batch_size=1, log_samples=True,
        model_args=f"base_url=http://127.0.0.1:{port}/v1/completions,model=m,num_concurrent=1,max_retries=1,"
                   "max_length=1024", tasks=["story_mc"], task_manager=TaskManager(include_path=folder,
                                                                                   include_defaults=False))
    seconds = time.perf_counter() - t0
    return seconds, [s["filtered_resps"] for s in sorted(out["samples"]["story_mc"], key=lambda s: s["doc_id"])]


times, results = {"off": [], "on": []}, {}
for name, port in (("off", off_port), ("on", on_port)) * 2:
    seconds, resps = run(port)
    times[name].append(round(seconds, 1))
    results.setdefault(name, resps)
    assert results[name] == resps, f"cache {name}: two runs differ"
print("seconds, cache off:", times["off"], "on:", times["on"])
print("speed-up (best off / best on): %.2fx" % (min(times["off"]) / min(times["on"])))
print("loglikelihoods equal (exactly):", results["off"] == results["on"])
