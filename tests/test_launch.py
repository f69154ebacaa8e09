"""End to end: the torchrun launchers on a random 2-shard checkpoint, as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

from multiproc import free_port

pytestmark = pytest.mark.spawn  # every test here runs ranks in processes of their own

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = json.dumps(["The capital of France is", "Once upon a time, in a land far away"])


def launch(script, *args, ranks=None, timeout=240):
    runner = [sys.executable]
    if ranks:
        runner += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    cmd = runner + [os.path.join(ROOT, "launch", script), *args, "--backend", "gloo", "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint, tokenizer_path):
    return ["--ckpt_dir", make_checkpoint(shards=2)[0], "--tokenizer_path", tokenizer_path]


def json_lines(result):
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_torchrun_two_ranks_give_the_same_greedy_ids_as_one_process(ckpt, one_process):
    greedy = ["--prompts", PROMPTS, "--temperature", "0", "--max_gen_len", "10", "--json", "--logprobs"]
    two = json_lines(launch("text_completion.py", *ckpt, *greedy, ranks=2))
    one = json_lines(one_process("text_completion.py", *ckpt, *greedy))
    assert [r["prompt"] for r in two] == json.loads(PROMPTS)
    assert [r["token_ids"] for r in two] == [r["token_ids"] for r in one]
    assert all(0 < len(r["token_ids"]) <= 10 and len(r["logprobs"]) == len(r["token_ids"]) for r in two)
    assert [r["generation"] for r in two] == [r["generation"] for r in one]


def test_one_prompt_streams_the_same_text_that_json_reports(ckpt, one_process):
    prompt = "Simply put, the theory of relativity"
    common = ["--prompts", prompt, "--temperature", "0", "--max_gen_len", "12"]
    streamed = launch("text_completion.py", *ckpt, *common, ranks=2)
    assert streamed.returncode == 0, streamed.stderr
    record = json_lines(one_process("text_completion.py", *ckpt, *common, "--json"))[0]
    assert streamed.stdout == prompt + record["generation"] + "\n"
    assert "Loaded" in streamed.stderr and "tok/s" in streamed.stderr  # logs go to stderr


def test_chat_completion_runs_on_two_ranks(ckpt, tmp_path, one_process):
    dialogs = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello?"}],
               [{"role": "user", "content": "Why is the sky blue?"}]]
    path = tmp_path / "dialogs.json"
    path.write_text(json.dumps(dialogs))
    out = json_lines(launch("chat_completion.py", *ckpt, "--dialogs", str(path), "--max_gen_len", "6",
                            "--temperature", "0", "--json", ranks=2))
    assert [r["dialog"] for r in out] == dialogs
    assert all(r["generation"]["role"] == "assistant" and r["token_ids"] for r in out)
    builtin = one_process("chat_completion.py", *ckpt, "--max_gen_len", "4")  # built-in example dialogs
    assert builtin.returncode == 0, builtin.stderr
    assert builtin.stdout.count("> Assistant:") == 3
