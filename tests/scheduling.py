"""Running the server's scheduler to the end in this process, without HTTP: the tests' one way to do it."""

import asyncio
import contextlib

from llama_mp.server.scheduler import Sink


def run_to_end(scheduler, specs, drain_s: float, around=contextlib.nullcontext):
    """Submit `specs` as one request, let the batch loop finish them (a drain of `drain_s` ends it once they
    are done), and return (their Generations, the events sent to the request's sink). `around()` is a
    context entered for the scheduler's own work (submit and the loop), e.g. a default device."""
    loop = asyncio.new_event_loop()
    queue = asyncio.Queue()
    try:
        with around():
            seqs = scheduler.submit(specs, Sink(loop, queue))
            scheduler.drain(drain_s)
            scheduler.run()
        loop.run_until_complete(asyncio.sleep(0))  # deliver what the loop thread queued
        events = []
        while not queue.empty():
            events.append(queue.get_nowait())
    finally:
        loop.close()
    return seqs, events
