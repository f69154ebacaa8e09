"""Run the real launchers in a subprocess, with a timeout, and read how every rank ended.

`torchrun(...)` starts `python -m torch.distributed.run` (or `llama_mp.torchrun`) with the venv's
Python. The ranks' exit codes come from torchrun's failure report, which names every rank that
failed: a rank listed there has ended, so "all ranks exited non-zero" is checked from it.
"""

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from multiproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
OUR_TORCHRUN = [sys.executable, "-m", "llama_mp.torchrun"]
CPU = ["--backend", "gloo", "--device", "cpu"]


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    rank_pids: List[int] = field(default_factory=list)

    @property
    def rank_exit_codes(self) -> Dict[int, int]:
        """{global rank: exit code} from torchrun's ChildFailedError report."""
        found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", self.stderr)
        return {int(r): int(c) for r, c in found}

    def count(self, text: str) -> int:
        return self.stderr.count(text)


def script(name: str) -> str:
    return os.path.join(ROOT, "launch", f"{name}.py")


def start(cmd: List[str], env: Optional[dict] = None) -> subprocess.Popen:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, started: float, timeout: float, rank_pids=()) -> Job:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own: kill them too, or their pipes stay open.
        for pid in set(rank_pids) | set(children(proc.pid)):
            kill_quietly(pid)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"job did not end within {timeout} s (a hang):\n{err[-3000:]}")
    return Job(proc.returncode, out, err, time.monotonic() - started, list(rank_pids))


def run(cmd: List[str], timeout: float = 90, env: Optional[dict] = None) -> Job:
    started = time.monotonic()
    return finish(start(cmd, env), started, timeout)


def torchrun(launcher: str, args: List[str], nproc: int = 2, timeout: float = 90, runner=TORCHRUN,
             env: Optional[dict] = None, cpu: bool = True) -> Job:
    cmd = runner + ["--nproc_per_node", str(nproc), "--master_port", str(free_port()), script(launcher)]
    return run(cmd + args + (CPU if cpu else []), timeout, env)


def children(pid: int) -> List[int]:
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except FileNotFoundError:  # it has ended meanwhile
        pass
    return kids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def kill_quietly(pid: int, sig=signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, what: str) -> float:
    """Poll until `predicate()`; return the seconds it took."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def no_traceback(text: str) -> bool:
    """No Python traceback from our ranks (torchrun's agent prints its own, outside our control)."""
    return "[rank" not in text and not re.search(r'File "[^"]*llama_mp/', text)
