"""Run a function on N local ranks (spawned processes, gloo on CPU), as torchrun would.

`run_ranks(n, fn, *args)` returns each rank's return value, in rank order. A rank that raises makes the
call fail with that rank's traceback; a job that runs past `timeout` is killed and fails the test, so a
distributed bug shows up as a red test, never as a hung suite.
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


def _child(rank, world_size, port, fn, args, results):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    try:
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        from llama_mp import distributed
        distributed.teardown()


def run_ranks(world_size, fn, *args, timeout=180):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            got[rank] = value
    except queue.Empty:
        raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(got))} did not finish in {timeout} s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [got[r] for r in range(world_size)]


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
