"""What no CPU can show: on a GPU the decode loops make the host wait for the device only where they say
they do. CUDA's sync debug mode warns at every synchronizing call PyTorch makes (a `.item()`, a blocking
copy either way, a `nonzero`); the waits for `Readback`'s events are the loops' own, one step late, and not
among them. `generate`: the stop check every `steps_per_stop_check` steps and the results at the end.
The server's batch loop: none (tests/test_host_syncs.py follows the same code on the CPU, tensor by tensor)."""

import warnings

import pytest
import torch

from gpu_common import DEVICE, built, prompt_ids
from llama_mp.runtime.batching import Batcher
from llama_mp.server.protocol import SequenceSpec
from llama_mp.server.scheduler import Scheduler
from scheduling import run_to_end

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE != "cuda", reason="CUDA's sync debug mode needs CUDA")]

STEPS = 32


def synchronizing_calls(run) -> int:
    """How many synchronizing CUDA calls `run()` makes (the sync debug mode's warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("decoder", ["pytorch", "static", pytest.param("compiled", marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="compiles on CUDA only here: tests/test_compiled.py is its CPU check"))])
def test_the_decode_loops_wait_for_the_device_only_where_they_say(make_checkpoint, tokenizer_path, decoder):
    with built(make_checkpoint(n_kv_heads=2)[0], tokenizer_path, on_gpu=True, decoder=decoder,
               dtype="bfloat16") as llama:
        prompts, every = prompt_ids(llama), llama.model.decoder.steps_per_stop_check
        llama.engine.stop_ids = []  # every step runs
        streamed = []

        def generate():
            llama.generate(prompts, STEPS, temperature=0.8, top_p=0.9, on_token=streamed.append)

        generate()  # warm: the caching allocators, pinned memory included
        steps = STEPS + max(map(len, prompts)) - min(map(len, prompts))  # the shortest prompt goes first
        # one stop check per `every` steps, plus the results read at the end (tokens; a slack of 2)
        assert every > 1 and synchronizing_calls(generate) <= steps // every + 2

        scheduler = Scheduler(Batcher(llama.engine), llama.tokenizer, max_queue=8, seed=1)
        specs = [SequenceSpec(prompts[0], 12, 0.9, 0.95, 5, [], None, ignore_eos=True),
                 SequenceSpec(prompts[1], 12, 0, 1.0, None, [], 2, ignore_eos=True)]
        run_to_end(scheduler, specs, 60)  # warm
        assert synchronizing_calls(lambda: run_to_end(scheduler, specs, 60)) == 0
