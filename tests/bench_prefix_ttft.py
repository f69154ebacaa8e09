"""Time to first token of each of 10 chat turns (each adds ~140 words: ~180 tokens) against a running server,
to compare prefix caching off and on (docs/server.md "Prefix caching"). The server, e.g. the 110M shape on
2 CPU ranks:

    llama-mp synth /tmp/m110 --mp 2 --dim 768 --n_layers 12 --n_heads 12 --multiple_of 32
    torchrun --nproc_per_node 2 launch/serve.py --ckpt_dir /tmp/m110 --tokenizer_path /tmp/m110/tokenizer.model \
        --backend gloo --device cpu --max_seq_len 2048 --max_batch_size 4 --prefix_cache_rows ROWS --port PORT

then `python tests/bench_prefix_ttft.py ROWS PORT` prints: rows, turn, TTFT (s), prompt tokens, cached tokens,
the answer's start (equal with the cache off and on)."""
import json, sys, time, urllib.request
rows, port = sys.argv[1], int(sys.argv[2])
words = ("the quick brown fox jumps over a lazy dog while seven llamas graze on the hill and a river runs "
         "past old stone walls toward the sea ").split()
def post(body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter(); first = None; text = ""; usage = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    first = first or time.perf_counter() - t0
                    text += c["delta"]["content"]
    return first, text, usage
msgs = [{"role": "system", "content": "You are a helpful assistant."}]
out = []
for turn in range(10):
    msgs.append({"role": "user", "content": " ".join(words[(turn * 7 + i) % len(words)] for i in range(140))})
    first, text, usage = post({"messages": msgs, "max_tokens": 8, "temperature": 0, "stream": True,
                               "stream_options": {"include_usage": True}})
    out.append((turn + 1, round(first, 3), usage["prompt_tokens"], usage.get("prompt_tokens_details", {}).get("cached_tokens"), text))
    msgs.append({"role": "assistant", "content": text})
for o in out:
    print(rows, *o[:4], repr(o[4][:30]))
