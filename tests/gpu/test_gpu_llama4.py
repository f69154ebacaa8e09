"""Llama 4 on a GPU against the CPU, one rank in this process (the tiny model of tests/llama4_helpers.py: MoE
and dense layers, NoPE, chunked attention, qk norm): float32 greedy ids and logits equal the CPU's, whose MoE
calls group by expert while the GPU's gather (torch._grouped_mm's CUDA kernel takes bfloat16 only); in
bfloat16 every MoE call groups by expert where the GPU has that kernel (compute capability 9.x or 10.x:
`grouped_mm_runs`) and the logits stay within bfloat16's rounding of the float32 model; the decode loop
waits for the device only at its stop checks, grouped MoE included."""

import pytest
import torch

from gpu_common import DEVICE, all_logits, built
from llama4_helpers import moe_paths, only_grouped, tiny_args
from llama_mp.checkpoints.synth import write_random_checkpoint, write_tiny_tiktoken
from llama_mp.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.gpu

STEPS = 10
TEXTS = ["The quick brown fox jumps over the lazy dog. A journey of a thousand", "Once upon a time", "Model parallel"]


def has_grouped_kernel() -> bool:
    """Whether this lane's device runs torch._grouped_mm without a host read in bfloat16 (the CPU always)."""
    return DEVICE != "cuda" or torch.cuda.get_device_capability()[0] in (9, 10)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """(checkpoint dir, tokenizer path, prompts): the tiny random Llama 4 in Meta's layout, one shard."""
    root = tmp_path_factory.mktemp("gpu_llama4")
    tok_path = write_tiny_tiktoken(str(root / "tokenizer.model"))
    tok = Tokenizer(tok_path, "llama4")
    write_random_checkpoint(str(root), tiny_args(tok.n_words), 1, seed=3)
    return str(root), tok_path, [tok.encode(t, bos=True, eos=False) for t in TEXTS]


@pytest.fixture(scope="module")
def cpu_float32(tiny4):
    """(greedy ids, teacher-forced logits along prompt 0 and its continuation) on the CPU, float32."""
    ckpt, tok_path, prompts = tiny4
    with built(ckpt, tok_path, on_gpu=False, decoder="pytorch") as llama:
        ids, _ = llama.generate(prompts, STEPS, temperature=0)
        return ids, all_logits(llama, prompts[0] + ids[0])


# No `--decoder compiled` here: its buckets would compile for minutes of the lane's few (the compiled Llama 4
# step is tests/test_llama4.py's, on the CPU).
@pytest.mark.parametrize("decoder", ["auto", "static"])
def test_float32_llama4_greedy_ids_and_logits_equal_the_cpus(tiny4, cpu_float32, decoder):
    ckpt, tok_path, prompts = tiny4
    cpu_ids, cpu_logits = cpu_float32
    with built(ckpt, tok_path, on_gpu=True, decoder=decoder) as llama:
        ids, _ = llama.generate(prompts, STEPS, temperature=0)
        logits = all_logits(llama, prompts[0] + cpu_ids[0])
    assert ids == cpu_ids
    torch.testing.assert_close(logits, cpu_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decoder", ["auto", "static"])
def test_bfloat16_llama4_groups_by_expert_and_stays_within_its_rounding(tiny4, cpu_float32, decoder):
    """The tolerance as tests/gpu/test_gpu_generation.py measures it: 3 x the CPU's own bfloat16 error + 0.02."""
    ckpt, tok_path, prompts = tiny4
    cpu_ids, ref = cpu_float32
    tokens = prompts[0] + cpu_ids[0]
    with built(ckpt, tok_path, on_gpu=False, dtype="bfloat16", decoder="pytorch") as llama:
        err_cpu = float((all_logits(llama, tokens) - ref).abs().max())
    with moe_paths() as paths, built(ckpt, tok_path, on_gpu=True, dtype="bfloat16", decoder=decoder) as llama:
        gpu = all_logits(llama, tokens)
        llama.generate(prompts, STEPS, temperature=0)
    assert torch.isfinite(gpu).all()
    assert float((gpu - ref).abs().max()) <= 3 * err_cpu + 0.02, (float((gpu - ref).abs().max()), err_cpu)
    assert only_grouped(paths) == has_grouped_kernel(), paths


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA's sync debug mode needs CUDA")
@pytest.mark.parametrize("decoder", ["pytorch", "static"])
def test_llama4_decode_loop_waits_for_the_device_only_at_its_stop_checks(tiny4, decoder):
    from test_gpu_syncs import synchronizing_calls

    ckpt, tok_path, prompts = tiny4
    with built(ckpt, tok_path, on_gpu=True, dtype="bfloat16", decoder=decoder) as llama:
        every = llama.model.decoder.steps_per_stop_check
        llama.engine.stop_ids = []  # every step runs

        def generate():
            llama.generate(prompts, 32, temperature=0.8, top_p=0.9)

        generate()  # warm
        steps = 32 + max(map(len, prompts)) - min(map(len, prompts))
        assert every > 1 and synchronizing_calls(generate) <= steps // every + 2
