"""Two "nodes" on one machine (two torchrun agents on 127.0.0.1, c10d rendezvous, gloo) give exactly
the output of one process: global rank picks the shard, local rank the device."""

import json
import time

import pytest

from launching import CPU, TORCHRUN, finish, script, start
from multiproc import free_port

pytestmark = pytest.mark.spawn  # every test here runs ranks in processes of their own

PROMPTS = json.dumps(["The quick brown fox", "Simply put, the theory of relativity"])


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint(shards=2)[0]


def completion_args(ckpt_dir, tokenizer_path):
    return ["--ckpt_dir", ckpt_dir, "--tokenizer_path", tokenizer_path, "--prompts", PROMPTS,
            "--max_gen_len", "8", "--temperature", "0", "--json"]


def test_two_nodes_on_loopback_match_one_node(ckpt, tokenizer_path, one_process):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for node_rank in (0, 1):
        cmd = TORCHRUN + ["--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
                          "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, script("text_completion")]
        nodes.append((start(cmd + completion_args(ckpt, tokenizer_path) + CPU), time.monotonic()))
    jobs = [finish(proc, t0, 120) for proc, t0 in nodes]
    assert [j.returncode for j in jobs] == [0, 0], [j.stderr[-2000:] for j in jobs]
    # Rank 0 (wherever the rendezvous put it) prints; the other node prints nothing on stdout.
    two_nodes = "".join(j.stdout for j in jobs)

    # The reference: one rank in this process (as many ranks give the same ids: test_model_parity).
    one_node = one_process("text_completion", *completion_args(ckpt, tokenizer_path))
    assert one_node.returncode == 0, one_node.stderr
    assert two_nodes == one_node.stdout
    assert len(two_nodes.splitlines()) == 2 and all(json.loads(line)["token_ids"] for line in two_nodes.splitlines())
