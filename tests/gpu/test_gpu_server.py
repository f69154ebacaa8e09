"""The server on a GPU, in this process (the real app, scheduler and Batcher on a model on the GPU): a sampled
and a greedy request in the same batch step (a sampled request crashed on a GPU when its generator was a
CPU one), and one plain HTTP completion, which samples (temperature 1 by default)."""

import threading

import pytest
from fastapi.testclient import TestClient

from gpu_common import DEVICE, built
from llama_mp.runtime.batching import Batcher
from llama_mp.server.app import make_app
from llama_mp.server.protocol import Limits, SequenceSpec
from llama_mp.server.scheduler import Scheduler
from llama_mp.server.state import ServerState
from scheduling import run_to_end
from test_server_inputs import continuation

pytestmark = pytest.mark.gpu

SEQ_LEN, SLOTS, TOKENS = 64, 4, 8


def test_a_sampled_and_a_greedy_request_in_one_step_and_over_http(make_checkpoint, tokenizer_path):
    with built(make_checkpoint(n_kv_heads=2)[0], tokenizer_path, on_gpu=True, max_batch_size=SLOTS,
               max_seq_len=SEQ_LEN) as llama:
        tok = llama.tokenizer
        prompt = tok.encode("The quick brown fox", bos=True, eos=False)
        greedy_ids = llama.generate([prompt], TOKENS, temperature=0)[0][0]
        scheduler = Scheduler(Batcher(llama.engine), tok, max_queue=8, seed=3)
        specs = [SequenceSpec(prompt, TOKENS, 1.0, 0.95, 7, [], None, ignore_eos=True),
                 SequenceSpec(prompt, TOKENS, 0, 1.0, None, [], None)]  # stops where generate stops
        seqs, events = run_to_end(scheduler, specs, 120)  # both admitted at once: one step, mixed rows
        assert all(s.generator.device.type == DEVICE for s in seqs)
        assert not [e.error for e in events if e.error], [e.error for e in events]
        texts = {i: "".join(e.text for e in events if e.index == i) for i in (0, 1)}
        ends = {e.index: e for e in events if e.finish_reason}
        assert sorted(ends) == [0, 1] and [ends[i].completion_tokens for i in (0, 1)] == [TOKENS, len(greedy_ids)]
        assert texts[1] == continuation(tok, prompt, greedy_ids)  # the server's greedy = the engine's

        # HTTP: the real app, its batch loop in a thread, a plain completion (it samples)
        scheduler = Scheduler(Batcher(llama.engine), tok, max_queue=8, seed=4)
        state = ServerState(api_key=None, max_body_bytes=1 << 16, receive_timeout_s=30.0)
        state.ready(scheduler, tok, Limits("m", SEQ_LEN, SLOTS))
        batch_loop = threading.Thread(target=scheduler.run, daemon=True)
        batch_loop.start()
        try:
            client = TestClient(make_app(state), raise_server_exceptions=False)
            response = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": TOKENS, "seed": 1})
            greedy = client.post("/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": TOKENS,
                                                          "temperature": 0})
        finally:
            scheduler.drain(0)
            batch_loop.join(30)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
        assert greedy.status_code == 200, greedy.text
        answer = greedy.json()["choices"][0]["text"]
        assert continuation(tok, prompt, greedy_ids).startswith(answer) and (answer or not greedy_ids), answer
