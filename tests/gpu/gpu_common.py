"""What the GPU lane's tests share: the device and backend they run on, and one-rank builds in process."""

import contextlib
import os

import pytest
import torch

from llama_mp import Llama, distributed

ON_CPU = os.environ.get("LLAMA_MP_GPU_LANE_ON_CPU") == "1"  # a dry run of the lane's code (see conftest)
if torch.cuda.is_available():
    DEVICE, BACKEND = "cuda", "nccl"
else:
    DEVICE, BACKEND = ("cpu", "gloo") if ON_CPU else (None, None)
LAUNCH = ["--device", DEVICE or "cuda", "--backend", BACKEND or "nccl"]  # the launchers' flags for this lane
CPU = ["--device", "cpu", "--backend", "gloo"]
PROMPTS = ["The quick brown fox", "Once upon a time there was", "Model parallel"]


def needs_gpus(n: int):
    """Skip below `n` CUDA devices (NCCL refuses two ranks on one GPU)."""
    count = torch.cuda.device_count() if DEVICE == "cuda" else 0
    return pytest.mark.skipif(count < n, reason=f"needs {n} GPUs, this machine has {count}")


@contextlib.contextmanager
def built(ckpt_dir, tokenizer_path, on_gpu: bool, dtype="float32", max_batch_size=4, max_seq_len=64,
          decoder="auto", **kwargs):
    """A one-rank Llama in this process, on the lane's device (`on_gpu`) or the CPU reference (gloo), with
    its process group torn down afterwards so the next build can start one."""
    device, backend = (DEVICE, BACKEND) if on_gpu else ("cpu", "gloo")
    try:
        yield Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, dtype=dtype, decoder=decoder,
                          backend=backend, device=device, **kwargs)
    finally:
        distributed.teardown()


def prompt_ids(llama):
    return [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]


def all_logits(llama, tokens):
    """Teacher-forced float32 logits [len, vocab] of one sequence, on the host."""
    with torch.inference_mode():
        logits = llama.model(torch.tensor([tokens], device=llama.group.device), 0, all_positions=True)
    return logits[0].float().cpu()
