"""Run a function on N local ranks (spawned processes, gloo on CPU), as torchrun would.

`run_ranks(n, fn, *args)` returns each rank's return value, in rank order. A rank that raises makes the
call fail with that rank's traceback; a job that runs past `timeout` is killed and fails the test, so a
distributed bug shows up as a red test, never as a hung suite. The rank processes are kept between
calls of the same size (`_Ranks`), so a job pays for its work, not for starting Python and torch again.
"""

import multiprocessing as mp
import os
import queue
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Ranks:
    """`world_size` spawned rank processes kept for the whole session: each job is one function call on
    every rank, in its own process group (a fresh port), torn down after it. Starting a rank costs seconds
    (Python, torch, fairscale); a suite runs dozens of multi-rank jobs. Between jobs a rank restores what a
    fresh process would have: the parent's environment at the call, torch's initial random state, one
    thread. A job that fails or runs late discards its ranks (their state is unknown); the next job starts
    new ones."""

    def __init__(self, world_size):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.procs = [ctx.Process(target=_serve_jobs, args=(r, world_size, self.jobs[r], self.results), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def alive(self):
        return all(p.is_alive() for p in self.procs)

    def run(self, fn, args, timeout):
        port, env = free_port(), dict(os.environ)
        for jobs in self.jobs:
            jobs.put((port, env, fn, args))
        got = {}
        try:
            for _ in range(self.world_size):
                rank, ok, value = self.results.get(timeout=timeout)
                if not ok:
                    raise AssertionError(f"rank {rank} failed:\n{value}")
                got[rank] = value
        except queue.Empty:
            raise AssertionError(f"ranks {sorted(set(range(self.world_size)) - set(got))} did not finish in {timeout} s")
        return [got[r] for r in range(self.world_size)]

    def close(self):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join(timeout=10)


def _serve_jobs(rank, world_size, jobs, results):
    import random

    import torch

    fresh_seed = torch.initial_seed()
    while True:
        port, env, fn, args = jobs.get()
        os.environ.clear()
        os.environ.update(env)
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                           "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
        torch.set_num_threads(1)
        torch.manual_seed(fresh_seed)
        random.seed(fresh_seed)
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, traceback.format_exc()))
        finally:
            from llama_mp import distributed
            distributed.teardown()


_kept = {}


def run_ranks(world_size, fn, *args, timeout=180):
    ranks = _kept.pop(world_size, None)
    if ranks is None or not ranks.alive():
        if ranks is not None:
            ranks.close()
        ranks = _Ranks(world_size)
    try:
        values = ranks.run(fn, args, timeout)
    except BaseException:
        ranks.close()
        raise
    _kept[world_size] = ranks
    return values


def on_ranks(world_size, fn, *args, timeout=180):
    """`run_ranks`, except that one rank runs in this process: starting a process (and torch in it) for a
    single rank costs seconds and tests nothing a call does not. Mark the multi-rank cases `spawn`."""
    if world_size > 1:
        return run_ranks(world_size, fn, *args, timeout=timeout)
    from llama_mp import distributed

    try:
        return [fn(*args)]
    finally:
        distributed.teardown()
