"""The GPU lane (`pytest -m gpu`, `make gpu-check`): every test in tests/gpu/ is marked `gpu` and skipped
where torch sees no CUDA device; multi-GPU tests are skipped below their GPU count (`gpu_common.needs_gpus`).

LLAMA_MP_GPU_LANE_ON_CPU=1 runs the lane's code on the CPU instead (gloo, "cpu"), where it compares the
CPU with itself: a check that the tests themselves run, never evidence about a GPU."""

import os

import pytest

import gpu_common

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    # This hook sees every collected item of the session, not only this folder's.
    for item in items:
        if not str(item.path).startswith(HERE + os.sep):
            continue
        item.add_marker(pytest.mark.gpu)
        if gpu_common.DEVICE is None:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU: torch.cuda.is_available() is False"))
