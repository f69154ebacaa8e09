"""The launchers under torchrun with NCCL on GPUs (`--device cuda --backend nccl`), against the same
launcher run on the CPU in this process: greedy ids, and with `--logprobs --echo` the echoed prompt and
every token's log-probability."""

import json

import pytest

from gpu_common import LAUNCH, PROMPTS, needs_gpus
from launching import torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.spawn]

ARGS = ["--prompts", json.dumps(PROMPTS), "--max_gen_len", "10", "--temperature", "0", "--max_seq_len", "64",
        "--dtype", "float32", "--logprobs", "--echo", "--json"]


def predictions(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint(shards=2, n_kv_heads=2)[0]


@pytest.fixture
def on_cpu(one_process, checkpoint, tokenizer_path):
    done = one_process("text_completion.py", checkpoint, tokenizer_path, *ARGS)
    assert done.returncode == 0, done.stderr
    return predictions(done.stdout)


def check_against_cpu(job, cpu):
    assert job.returncode == 0 and "Traceback" not in job.stderr, job.stderr[-3000:]
    got = predictions(job.stdout)
    assert len(got) == len(cpu) == len(PROMPTS), job.stdout[-2000:]
    assert [p["token_ids"] for p in got] == [p["token_ids"] for p in cpu]
    assert [p["generation"] for p in got] == [p["generation"] for p in cpu]
    for g, c in zip(got, cpu):  # float32 both sides: only the order of the sums differs
        assert g["logprobs"] == pytest.approx(c["logprobs"], rel=1e-4, abs=1e-4)
        assert g["generation"].startswith(g["prompt"])  # --echo


def test_one_rank_under_torchrun_with_nccl_equals_the_cpu(checkpoint, tokenizer_path, on_cpu):
    job = torchrun("text_completion", [checkpoint, tokenizer_path, *ARGS, *LAUNCH], nproc=1, cpu=False, timeout=180)
    check_against_cpu(job, on_cpu)


@needs_gpus(2)
def test_two_ranks_on_two_gpus_equal_the_cpu(checkpoint, tokenizer_path, on_cpu):
    job = torchrun("text_completion", [checkpoint, tokenizer_path, *ARGS, *LAUNCH], nproc=2, cpu=False, timeout=180)
    check_against_cpu(job, on_cpu)
