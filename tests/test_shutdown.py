"""In-process pieces of how a job ends: torchrun's grace as a rank reads it, the drain cut to fit it, and
the shared-memory exchange giving up at once on a peer whose process has ended.
(tests/test_shutdown_torchrun.py runs them under a real torchrun.)"""

import math
import os
import time

import pytest
import torch

from llama_mp.distributed.failure import launcher_grace_s, process_alive
from llama_mp.distributed.shm import SharedMemoryExchange
from llama_mp.errors import PeerLostError, RemoteRankError
from llama_mp.server.command import END_MARGIN_S, drain_within_launcher

TORCHRUN = ["/venv/bin/python", "/venv/bin/torchrun"]
MODULE = ["/venv/bin/python", "-u", "-m", "torch.distributed.run"]
OURS = ["/venv/bin/python", "-m", "llama_mp.torchrun"]
SCRIPT = ["launch/serve.py", "--ckpt_dir", "x", "--drain_s", "30"]


def never_a_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())  # process ids stay below it


@pytest.fixture
def under_torchrun(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    return monkeypatch


def test_outside_torchrun_there_is_no_grace(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "9")
    assert launcher_grace_s(TORCHRUN + ["--shutdown_timeout", "8"] + SCRIPT) is None


@pytest.mark.parametrize("launcher", [TORCHRUN, MODULE, OURS])
@pytest.mark.parametrize("option", [["--shutdown_timeout", "8"], ["--shutdown-timeout=8"], ["--shutdown_timeout=8"]])
def test_the_command_line_wins_over_both_variables(under_torchrun, launcher, option):
    under_torchrun.setenv("PET_SHUTDOWN_TIMEOUT", "11")
    under_torchrun.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "12")
    assert launcher_grace_s(launcher + ["--nproc_per_node", "2"] + option + SCRIPT) == 8.0


def test_then_pet_then_torch_elastic_then_30(under_torchrun):
    argv = TORCHRUN + ["--nproc_per_node", "2"] + SCRIPT
    assert launcher_grace_s(argv) == 30.0
    under_torchrun.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "12")
    assert launcher_grace_s(argv) == 12.0
    under_torchrun.setenv("PET_SHUTDOWN_TIMEOUT", "11")
    assert launcher_grace_s(argv) == 11.0
    assert launcher_grace_s(["/usr/bin/someones-launcher"]) == 11.0  # a command line not torchrun's: the variables


def test_the_scripts_own_arguments_are_not_torchruns(under_torchrun):
    assert launcher_grace_s(TORCHRUN + ["launch/x.py", "--shutdown_timeout", "8"]) == 30.0


def test_the_real_parent_is_read_when_no_command_line_is_given(under_torchrun):
    assert launcher_grace_s() == 30.0  # pytest is no launcher: the default


@pytest.mark.parametrize("drain_s, grace_s, expected", [(30, None, 30), (30, 30, 30 - END_MARGIN_S),
                                                         (30, 8, 8 - END_MARGIN_S), (30, 3, 0), (2, 30, 2), (30, 35, 30),
                                                         (30.5, 8, 8 - END_MARGIN_S)])
def test_the_drain_fits_torchruns_grace(drain_s, grace_s, expected, capsys):
    assert drain_within_launcher(drain_s, grace_s, say=True) == expected
    said = capsys.readouterr().err
    assert ("is cut to" in said) == (expected != drain_s)
    if expected != drain_s:
        assert f"--shutdown_timeout {math.ceil(drain_s + END_MARGIN_S)} (" in said  # torchrun takes whole seconds
    drain_within_launcher(drain_s, grace_s, say=False)
    assert capsys.readouterr().err == ""


def test_process_alive():
    assert process_alive(os.getpid()) and process_alive(1)
    assert not process_alive(never_a_pid()) and not process_alive(0) and not process_alive(-1)


def exchange(tmp_path, pids, timeout_s):
    path = tmp_path / "exchange"
    path.write_bytes(b"\0" * SharedMemoryExchange.file_size(2))
    return SharedMemoryExchange(rank=0, world_size=2, path=str(path), timeout_s=timeout_s, pids=pids)


def test_a_peer_whose_process_ended_is_given_up_on_at_once(tmp_path):
    dead = never_a_pid()
    alone = exchange(tmp_path, [None, dead], timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(PeerLostError, match=f"the process of rank 1, id {dead}, ended"):
        alone.gather(torch.ones(4))
    assert time.monotonic() - t0 < 1.0
    alone.close()


def test_a_live_silent_peer_still_gets_the_timeout(tmp_path):
    alone = exchange(tmp_path, [None, os.getpid()], timeout_s=0.3)
    with pytest.raises(PeerLostError, match=r"Timed out waiting 300ms for rank\(s\) \[1\]"):
        alone.gather(torch.ones(4))
    alone.close()


def test_a_peer_that_wrote_its_part_then_ended_is_not_lost(tmp_path):
    alone = exchange(tmp_path, [None, never_a_pid()], timeout_s=60)
    alone.counters[1] = 1  # rank 1's round 1 is in; then its process ended
    assert alone.gather(torch.ones(4)).shape == (2, 4)
    alone.close()


def test_a_rank_that_gives_up_tells_the_others_which_stop_quietly(tmp_path):
    path = tmp_path / "exchange"
    path.write_bytes(b"\0" * SharedMemoryExchange.file_size(2))
    first = SharedMemoryExchange(rank=0, world_size=2, path=str(path), timeout_s=0.2, pids=[None, never_a_pid()])
    with pytest.raises(PeerLostError):  # says why: rank 1's process is gone
        first.gather(torch.ones(4))
    second = SharedMemoryExchange(rank=1, world_size=2, path=str(path), timeout_s=60)
    with pytest.raises(RemoteRankError, match="rank 0 gave up"):  # no second message for the job
        second.gather(torch.ones(4))
    first.close()
    second.close()
