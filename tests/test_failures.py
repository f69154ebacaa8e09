"""How llama_mp fails: one clear message, every rank ends non-zero within seconds, never a hang.

Two kinds of tests. Launch tests run the real launcher under torchrun (2 ranks, gloo, CPU) and check
the user's view: exit codes of all ranks (from torchrun's report), the elapsed bound, the message's
key words, that it is printed once and without a traceback. There is one per way a failure travels:
a check every rank makes alike before the process group exists (said once per node), a failure while
loading on any rank (agreed), a request rank 0 refuses (decided by rank 0), a dead, silent or
interrupted peer, and torchrun's own failures. In-process tests check every other input error against
the functions that raise it, where a subprocess would add only time.
"""

import json
import os
import shutil
import signal
import socket
import sys
import time

import pytest
import torch

from launching import (CPU, OUR_TORCHRUN, TORCHRUN, alive, children, finish, kill_quietly, no_traceback, run, script,
                       start, torchrun, wait_for)
from llama_mp import distributed
from llama_mp.runtime.chat import load_dialogs
from llama_mp.checkpoints.meta import load_rank_state_dict, shard_paths
from llama_mp.cli.completion import text_completion
from llama_mp.cli.runner import check_options
from llama_mp.errors import LlamaMPError, RemoteRankError
from llama_mp.runtime.llama import Llama
from llama_mp.checkpoints.params import load_params
from llama_mp.runtime.tokenizer import Tokenizer
from multiproc import free_port, run_ranks

BOUND_S = 60  # "within seconds": generous, the test machine is small and shared
ERROR = "llama_mp: error:"
# A rank stopped by another's failure exits 3, unless torchrun's SIGTERM (sent as soon as one rank
# fails) gets there first.
STOPPED = (RemoteRankError.exit_code, -signal.SIGTERM)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint(shards=2)[0]


def copy_of(ckpt_dir, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(ckpt_dir, dst)
    return str(dst)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def args_for(ckpt_dir, tokenizer_path, *extra):
    return ["--ckpt_dir", ckpt_dir, "--tokenizer_path", tokenizer_path, "--max_gen_len", "4",
            "--temperature", "0", "--json", *extra]


def assert_failed_once(job, *key_words, reporter=0, code=2):
    """Every rank ended non-zero, `reporter` said it once (key words in it), no traceback, in time."""
    assert job.returncode != 0
    codes = job.rank_exit_codes
    assert sorted(codes) == [0, 1], job.stderr[-3000:]
    assert codes[reporter] == code and all(c != 0 for c in codes.values()), codes
    assert job.count(ERROR) == 1, job.stderr
    message = job.stderr[job.stderr.index(ERROR):].splitlines()[0]
    for word in key_words:
        assert word in message, message
    assert no_traceback(job.stderr), job.stderr
    assert job.elapsed < BOUND_S
    assert job.stdout == ""
    return message


# ----------------------------------------------------------------------------------------------
# Launch tests: bad input under torchrun, 2 ranks


@pytest.mark.spawn
def test_missing_checkpoint_dir_is_reported_once_and_all_ranks_stop(tmp_path, tokenizer_path):
    job = torchrun("text_completion", args_for(str(tmp_path / "nope"), tokenizer_path))
    assert_failed_once(job, "does not exist", "--ckpt_dir")
    assert job.rank_exit_codes[1] in STOPPED


@pytest.mark.spawn
def test_a_corrupt_shard_on_rank_1_only_is_reported_by_rank_1_and_stops_rank_0(ckpt, tmp_path, tokenizer_path):
    bad = copy_of(ckpt, tmp_path)
    truncate(os.path.join(bad, "consolidated.01.pth"))
    job = torchrun("text_completion", args_for(bad, tokenizer_path))
    assert_failed_once(job, "consolidated.01.pth", "truncated or corrupt", "verify", reporter=1)
    assert job.rank_exit_codes[0] in STOPPED


@pytest.mark.spawn
def test_a_bad_request_is_rejected_by_rank_0_after_loading(ckpt, tokenizer_path):
    # Only the tokenizer, once loaded, can tell that the prompt leaves no room within max_seq_len.
    job = torchrun("text_completion", args_for(ckpt, tokenizer_path, "--prompts", "hello " * 600))
    assert_failed_once(job, "Prompt 0 has", "max_seq_len")


@pytest.mark.spawn
def test_device_errors_found_before_the_group_exists_are_printed_by_one_rank(ckpt, tokenizer_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    job = torchrun("text_completion", args_for(ckpt, tokenizer_path, "--device", "cuda"), cpu=False)
    assert_failed_once(job, "--device cuda", "no CUDA", "--device cpu")


@pytest.mark.spawn
def test_our_torchrun_ends_a_failed_job_with_one_summary_line(tmp_path, tokenizer_path):
    job = torchrun("text_completion", args_for(str(tmp_path / "nope"), tokenizer_path), runner=OUR_TORCHRUN)
    assert job.returncode == 2
    assert job.count(ERROR) == 1 and "does not exist" in job.stderr
    summary = job.stderr.splitlines()[-1]
    assert summary.startswith("llama_mp: the job failed: rank 0 reported the error above (exit code 2); rank 1 ")
    assert ("rank 1 stopped because another rank failed (exit code 3)" in summary
            or "rank 1 was killed by SIGTERM (exit code -15)" in summary), summary
    assert "Traceback" not in job.stderr and "ChildFailedError" not in job.stderr


def busy_port():
    """A listening socket on a free port, as a leftover job would hold it."""
    s = socket.socket()
    s.bind(("0.0.0.0", 0))  # torchrun's store listens on every interface
    s.listen()
    return s


@pytest.mark.spawn
def test_a_port_in_use_gives_one_paragraph_not_a_traceback(ckpt, tokenizer_path):
    with busy_port() as s:
        port = s.getsockname()[1]
        # torchrun's agent hosts the store: our wrapper explains its failure.
        job = run(OUR_TORCHRUN + ["--nproc_per_node", "2", "--master_port", str(port), script("text_completion")]
                  + args_for(ckpt, tokenizer_path) + CPU)
        # A single process told to use MASTER_ADDR/MASTER_PORT hosts the store itself.
        alone = run([sys.executable, script("text_completion")] + args_for(ckpt, tokenizer_path) + CPU,
                    env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    for j in (job, alone):
        assert j.returncode == 2 and j.count(ERROR) == 1, j.stderr
        assert f"Port {port} is already in use" in j.stderr and "--master_port" in j.stderr
        assert "Traceback" not in j.stderr and j.elapsed < BOUND_S


# ----------------------------------------------------------------------------------------------
# Launch tests: faults during a run


def generating(ckpt, tokenizer_path, *extra):
    """Start a 2-rank job that generates for a long time; return (proc, start time, rank pids) once
    the first token is out."""
    cmd = TORCHRUN + ["--nproc_per_node", "2", "--master_port", str(free_port()), script("text_completion"),
                      "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path, "--prompts", "Once upon",
                      "--max_seq_len", "6000", "--max_gen_len", "5000", "--temperature", "0", *CPU, *extra]
    t0 = time.monotonic()
    proc = start(cmd)
    os.set_blocking(proc.stdout.fileno(), False)
    first = []
    wait_for(lambda: first.append(proc.stdout.read(1)) or any(first), 60, "the first generated text")
    ranks = children(proc.pid)
    assert len(ranks) == 2
    return proc, t0, ranks


@pytest.mark.spawn
def test_a_rank_killed_mid_generation_ends_the_job_quickly(ckpt, tokenizer_path):
    proc, t0, ranks = generating(ckpt, tokenizer_path)
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    job = finish(proc, t0, BOUND_S, ranks)
    assert time.monotonic() - killed < BOUND_S
    assert not any(alive(pid) for pid in ranks)
    assert job.rank_exit_codes[1] == -signal.SIGKILL and job.rank_exit_codes[0] != 0
    assert job.count(ERROR) <= 1 and no_traceback(job.stderr), job.stderr
    if job.count(ERROR):  # rank 0 may get torchrun's SIGTERM before it notices
        assert "rank 0 lost contact with the other ranks" in job.stderr


@pytest.mark.spawn
def test_a_silent_rank_is_given_up_on_after_timeout_s_and_the_job_ends_soon_after(ckpt, tokenizer_path):
    proc, t0, ranks = generating(ckpt, tokenizer_path, "--timeout_s", "3")
    os.kill(ranks[1], signal.SIGSTOP)  # alive but silent: its sockets stay open, only a timeout helps
    stopped = time.monotonic()
    try:
        # Rank 0 wakes its stopped peer as it gives up, so torchrun's SIGTERM ends it at once instead
        # of after torchrun's 30 s grace before SIGKILL.
        job = finish(proc, t0, BOUND_S, ranks)
        ended = time.monotonic() - stopped
    finally:
        kill_quietly(ranks[1], signal.SIGCONT)
    assert 2.5 < ended < 3 + 12, ended
    assert job.rank_exit_codes[0] == 4 and job.count(ERROR) == 1, job.stderr
    assert "rank 0 lost contact with the other ranks (Timed out waiting 3000ms" in job.stderr
    assert no_traceback(job.stderr)


@pytest.mark.spawn
def test_ctrl_c_stops_every_rank_promptly_and_quietly(ckpt, tokenizer_path):
    proc, t0, ranks = generating(ckpt, tokenizer_path)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends torchrun's process group
    interrupted = time.monotonic()
    job = finish(proc, t0, BOUND_S, ranks)
    assert time.monotonic() - interrupted < BOUND_S
    assert job.returncode != 0
    assert not any(alive(pid) for pid in ranks)
    assert ERROR not in job.stderr and no_traceback(job.stderr), job.stderr


# ----------------------------------------------------------------------------------------------
# In process: each input error raises a LlamaMPError that names it and says what to do


def raises(*key_words):
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(LlamaMPError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self.ctx.__exit__(*exc)
            for word in key_words:
                assert word in str(self.info.value), str(self.info.value)
            return suppressed

    return Check()


def test_checkpoint_folder_errors(ckpt, tmp_path):
    with raises("does not exist", "--ckpt_dir"):
        shard_paths(str(tmp_path / "nope"))
    with raises("No consolidated.*.pth", "download"):
        shard_paths(str(tmp_path))
    bad = copy_of(ckpt, tmp_path)
    truncate(os.path.join(bad, "consolidated.00.pth"))
    with raises("consolidated.00.pth", "truncated or corrupt", "download it again"):
        load_rank_state_dict(bad, load_params(bad), 0, 2)
    with raises("cannot be split over 3 processes", "Valid process counts"):
        load_rank_state_dict(ckpt, load_params(ckpt), 0, 3)


@pytest.mark.parametrize("content, key_words", [
    (None, ["params.json does not exist"]),
    ("{not json", ["not valid JSON", "Restore it"]),
    ('{"dim": 64, "n_layers": 2}', ["missing field(s) ['n_heads']"]),
    ('{"dim": 64, "n_layers": 2, "n_heads": 4, "rope_scaling": 8}', ["unknown field(s) ['rope_scaling']"]),
    ('{"dim": 64, "n_layers": 2, "n_heads": 5}', ["not divisible by n_heads 5"]),
])
def test_params_json_errors(ckpt, tmp_path, content, key_words):
    bad = copy_of(ckpt, tmp_path)
    path = os.path.join(bad, "params.json")
    if content is None:
        os.remove(path)
    else:
        with open(path, "w") as f:
            f.write(content)
    with raises(*key_words):
        load_params(bad)


def test_params_that_disagree_with_the_tensors(ckpt, tmp_path):
    bad = copy_of(ckpt, tmp_path)
    path = os.path.join(bad, "params.json")
    params = json.load(open(path))
    params["n_layers"] += 1
    json.dump(params, open(path, "w"))
    with raises("does not match params.json", "missing layers.2."):
        load_rank_state_dict(bad, load_params(bad), 0, 2)


def test_tokenizer_errors(ckpt, tmp_path, make_checkpoint, tokenizer_path):
    with raises("does not exist", "--tokenizer_path"):
        Tokenizer(str(tmp_path / "nope.model"))
    (tmp_path / "fake.model").write_text("not a model")
    with raises("is not a SentencePiece model"):
        Tokenizer(str(tmp_path / "fake.model"))
    small_vocab = make_checkpoint(shards=1, vocab_size=256)[0]
    with raises("only has 256 token embeddings", "Use the tokenizer.model shipped with this checkpoint"):
        Llama.build(small_vocab, tokenizer_path, 64, 2, device="cpu", backend="gloo")


@pytest.mark.parametrize("kwargs, key_words", [
    ({"dtype": "float8"}, ["Unknown --dtype 'float8'"]),
    ({"backend": "mpi"}, ["Unknown --backend 'mpi'"]),
    ({"device": "tpu"}, ["Unknown --device 'tpu'"]),
    ({"timeout_s": 0}, ["timeout_s must be a number of seconds from 0.001"]),
    ({"load_timeout_s": -1}, ["load_timeout_s must be a number of seconds"]),
    ({"seed": 2 ** 64}, ["seed must be an integer from 0 to 2**64 - 1"]),
    ({"temperature": 1e-300}, ["temperature must be a number from 0.001 to 100"]),
    ({"decoder": "fast"}, ["Unknown --decoder 'fast'"]),
])
def test_option_errors(ckpt, tokenizer_path, kwargs, key_words):
    with raises(*key_words):
        text_completion(ckpt, tokenizer_path, **{"backend": "gloo", "device": "cpu", **kwargs})


def test_environment_errors():
    if not torch.distributed.is_nccl_available():
        with raises("--backend nccl", "no NCCL", "--backend gloo"):
            distributed.choose_backend("nccl", torch.device("cpu"))
    if not torch.cuda.is_available():
        with raises("--device cuda", "no CUDA GPU", "--device cpu"):
            distributed.choose_device("cuda", 0)


@pytest.mark.parametrize("content, key_words", [
    (None, ["does not exist"]),
    ("[[{", ["is not valid JSON"]),
    ("[]", ["non-empty JSON list"]),
    ('[[{"role": "robot", "content": "hi"}]]', ["message 0", "role one of"]),
    ('[[{"role": "assistant", "content": "hi"}]]', ["alternate user/assistant"]),
    ('[[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]', ["ends with an assistant"]),
])
def test_dialogs_file_errors(tmp_path, content, key_words):
    path = tmp_path / "dialogs.json"
    if content is not None:
        path.write_text(content)
    with raises(*key_words):
        load_dialogs(str(path))


def test_misspelt_options_are_caught_and_correct_ones_pass():
    check_options(text_completion, ["--ckpt_dir", "x", "--tokenizer_path", "t", "--json", "--nojson",
                                    "--top-p=0.5", "--prompts", "--x"])
    check_options(text_completion, ["ckpt", "tok.model", "--max_gen_len", "3"])  # positional, as fire allows
    with raises("Unknown option --max_gen", "did you mean --max_gen_len?"):
        check_options(text_completion, ["--max_gen", "3"])


def test_missing_required_options_are_named_before_anything_runs():
    with raises("needs --tokenizer_path"):
        check_options(text_completion, ["--ckpt_dir", "x", "--max_gen_len", "3"])
    with raises("needs --ckpt_dir and --tokenizer_path"):
        check_options(text_completion, ["--json"])


def test_only_the_first_local_rank_to_fail_a_node_check_reports_it():
    def no_gpu_above_1(local_rank):
        if local_rank > 1:
            raise LlamaMPError(f"local rank {local_rank} has no GPU")

    def bad_argument(local_rank):
        raise LlamaMPError("Unknown --device 'tpu'")

    error = LlamaMPError("x")
    assert distributed.said_once(error, no_gpu_above_1, 2) is error
    assert isinstance(distributed.said_once(error, no_gpu_above_1, 3), RemoteRankError)
    assert distributed.said_once(error, bad_argument, 0) is error
    assert isinstance(distributed.said_once(error, bad_argument, 1), RemoteRankError)


# ----------------------------------------------------------------------------------------------
# Bounded waits, in spawned ranks


def _slow_rank_1(load_delay_s, step_delay_s):
    """Rank 1 is late twice: to the agreement after loading (a slow shard read), which may wait
    `load_timeout_s`, and to an all-reduce of the job's group (what every layer's sums use on gloo and
    NCCL), where rank 0 must give up after `timeout_s` (1 s here), not after torch's default 30 min."""
    group = distributed.setup("gloo", "cpu", timeout_s=1)
    if group.rank == 1:
        time.sleep(load_delay_s)
    distributed.agree(group, None, timeout_s=30)
    if group.rank == 1:
        time.sleep(step_delay_s)
    t0 = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1))
        return "no timeout"
    except Exception as e:  # noqa: BLE001
        return time.monotonic() - t0, str(distributed.peer_lost(e))


@pytest.mark.spawn
def test_every_collective_is_bounded_by_timeout_s_and_loading_by_its_own_bound():
    waited, message = run_ranks(2, _slow_rank_1, 2.0, 3.0, timeout=60)[0]
    assert 0.8 < waited < 2.5
    assert "rank 0 lost contact with the other ranks (Timed out waiting 1000ms" in message


@pytest.mark.spawn
def test_a_single_process_needs_no_port_and_exits_zero(ckpt, tokenizer_path):
    job = run([sys.executable, script("text_completion")] + args_for(ckpt, tokenizer_path, "--prompts", "hi") + CPU)
    assert job.returncode == 0, job.stderr
    assert json.loads(job.stdout)["prompt"] == "hi"



@pytest.mark.spawn
def test_one_bad_input_of_each_class_ends_the_real_launcher_with_one_message(ckpt, tokenizer_path, tmp_path):
    """A representative of each class of bad input, through launch/*.py in plain processes started
    together (each would cost a Python start alone): exit 2, one message naming the problem, no
    traceback, nothing on stdout, within seconds."""
    nan_params = copy_of(ckpt, tmp_path, "nan")
    params = json.load(open(os.path.join(nan_params, "params.json")))
    params.pop("norm_eps", None)  # written once below, as NaN (a field named twice is a problem of its own)
    with open(os.path.join(nan_params, "params.json"), "w") as f:
        f.write(json.dumps(params)[:-1] + ', "norm_eps": NaN}')
    int_tensor = copy_of(ckpt, tmp_path, "int8")
    shard = os.path.join(int_tensor, "consolidated.00.pth")
    state = torch.load(shard, weights_only=True)
    state["layers.0.attention.wq.weight"] = state["layers.0.attention.wq.weight"].to(torch.int8)
    torch.save(state, shard)
    dialogs = tmp_path / "ends_with_the_assistant.json"
    dialogs.write_text(json.dumps([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]))
    cases = {  # class: (launcher, arguments, words the message must hold)
        "numbers": ("text_completion", args_for(ckpt, tokenizer_path, "--temperature", "1e-300"),
                    ["temperature must be a number from 0.001 to 100"]),
        "seeds": ("text_completion", args_for(ckpt, tokenizer_path, "--seed", str(2 ** 64)), ["seed must be"]),
        "sizes": ("text_completion", args_for(ckpt, tokenizer_path, "--max_seq_len", str(2 ** 24)),
                  ["KV cache", "Lower --max_seq_len"]),  # inside --max_seq_len's domain, past any memory
        "params": ("text_completion", args_for(nan_params, tokenizer_path), ["norm_eps must be a finite number"]),
        "tensors": ("text_completion", args_for(int_tensor, tokenizer_path), ["is int8, not a floating-point weight"]),
        "chat": ("chat_completion", ["--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path, "--dialogs", str(dialogs)],
                 ["ends with an assistant turn"]),
    }
    started = {name: (start([sys.executable, script(launcher)] + args + CPU), time.monotonic())
               for name, (launcher, args, _) in cases.items()}
    for name, (proc, t0) in started.items():
        job = finish(proc, t0, 120)
        assert job.returncode == 2 and job.count(ERROR) == 1, (name, job.stderr[-2000:])
        message = job.stderr[job.stderr.index(ERROR):]
        assert all(words in message for words in cases[name][2]), (name, message)
        assert no_traceback(job.stderr) and "Traceback" not in job.stderr and job.stdout == "", name
        assert job.elapsed < BOUND_S, name
