"""How a server job ends under a real torchrun: SIGTERM to torchrun drains within torchrun's own grace
(--shutdown_timeout) instead of being SIGKILLed mid-answer, and a rank 0 killed mid-request ends the job
within seconds, not after torchrun's grace.

(tests/test_server.py starts the ranks itself to see their exit codes; these go through torchrun, whose
timer is what is tested.)
"""

import json
import os
import re
import signal
import subprocess
import time

import httpx
import pytest

from launching import ROOT, TORCHRUN, children, kill_quietly, no_traceback, script
from multiproc import free_port

pytestmark = pytest.mark.spawn

GRACE_S = 8
LONG = 4096  # answers of up to ~4000 steps: several seconds, longer than the cut drain
START_S = 60


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint(shards=2, n_kv_heads=2)[0]


class Job:
    def __init__(self, tmp_path, ckpt_dir, tokenizer_path, *launcher_args):
        self.err = str(tmp_path / "torchrun.err")
        cmd = TORCHRUN + ["--nproc_per_node", "2", "--master_port", str(free_port()), *launcher_args,
                          script("serve"), "--ckpt_dir", ckpt_dir, "--tokenizer_path", tokenizer_path,
                          "--max_seq_len", str(LONG), "--max_batch_size", "2", "--port", "0", "--backend", "gloo",
                          "--device", "cpu", "--drain_s", "30"]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.err, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=f,
                                         start_new_session=True)
        self.url = None
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://\S+)", self.stderr())
            if found:
                self.url = found.group(1)
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            assert self.proc.poll() is None, f"the job ended while starting:\n{self.stderr()[-3000:]}"
            time.sleep(0.1)
        else:
            raise AssertionError(f"the server did not get ready in {START_S} s:\n{self.stderr()[-3000:]}")
        self.ranks = self._ranks()

    def stderr(self) -> str:
        return open(self.err).read()

    def _ranks(self) -> dict:
        """{rank: pid} of torchrun's children, from their environment."""
        ranks = {}
        for pid in children(self.proc.pid):
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            ranks[int(env[b"RANK"])] = pid
        assert sorted(ranks) == [0, 1], ranks
        return ranks

    def end(self) -> None:
        for pid in list(self.ranks.values()):
            kill_quietly(pid)
        kill_quietly(self.proc.pid)
        self.proc.wait()


def stream(job, max_tokens):
    body = {"prompt": "Once", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    return httpx.stream("POST", job.url + "/v1/completions", json=body, timeout=30)


def test_sigterm_to_torchrun_drains_within_its_shutdown_timeout(tmp_path, ckpt, tokenizer_path):
    """--drain_s 30 under `torchrun --shutdown_timeout 8`: the drain is cut (and said), the answer in flight
    ends cleanly (whole, or an error event then [DONE]), and the job is over before torchrun's SIGKILL."""
    job = Job(tmp_path, ckpt, tokenizer_path, "--shutdown_timeout", str(GRACE_S))
    try:
        assert f"--drain_s 30 is cut to {GRACE_S - 5} s" in job.stderr()
        assert "--shutdown_timeout 35" in job.stderr()
        # Longer than the cut drain: the first answer keeps running after SIGTERM (8 steps/s would do).
        with stream(job, LONG - 8) as response:
            lines = response.iter_lines()
            next(lines)
            job.proc.send_signal(signal.SIGTERM)  # the documented way: torchrun forwards it to the ranks
            sent = time.monotonic()
            data = [line[6:] for line in lines if line.startswith("data: ")]  # a dropped connection raises
        code = job.proc.wait(timeout=GRACE_S + 5)
        took = time.monotonic() - sent
        log = job.stderr()
        assert data[-1] == "[DONE]", data[-3:]
        last = json.loads(data[-2])
        assert last.get("error", {}).get("type") == "server_error" or last["choices"][0]["finish_reason"] == "length"
        assert "forcefully exiting" not in log, log[-3000:]  # torchrun's words when it SIGKILLs a rank
        assert took < GRACE_S, (took, log[-3000:])
        assert code != 0 and no_traceback(log), log[-3000:]  # plain torchrun ends with its own traceback, 1
        print(f"SIGTERM to torchrun: job over in {took:.2f} s; last event {data[-2][-120:]}")
    finally:
        job.end()


def test_a_dead_rank_0_ends_the_job_within_seconds_while_a_request_runs(tmp_path, ckpt, tokenizer_path):
    """kill -9 of rank 0 mid-step: rank 1, waiting in the shared-memory exchange, sees rank 0's process
    gone and ends itself, instead of outlasting torchrun's SIGTERM until its SIGKILL (30 s)."""
    job = Job(tmp_path, ckpt, tokenizer_path)
    try:
        with stream(job, LONG - 8) as response:
            lines = response.iter_lines()
            next(lines)
            os.kill(job.ranks[0], signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(httpx.TransportError):  # rank 0 held the connection
                list(lines)
        job.proc.wait(timeout=15)
        took = time.monotonic() - killed
        log = job.stderr()
        assert took < 10, (took, log[-3000:])
        assert "forcefully exiting" not in log, log[-3000:]
        print(f"kill -9 of rank 0: job over in {took:.2f} s")
    finally:
        job.end()
