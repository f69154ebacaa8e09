"""The decode step's collectives: exact, identical on every rank, bounded in time."""

import os

import pytest
import torch

from llama_mp.distributed.shm import SharedMemoryExchange
from llama_mp.errors import PeerLostError
from multiproc import run_ranks
from workers import collective_results


@pytest.mark.spawn
def test_sums_argmax_gather_and_broadcast_are_exact_and_identical_on_every_rank():
    rounds = 5  # more rounds than the exchange has buffer sets
    results = run_ranks(2, collective_results, rounds)
    assert results[0][1:4] == results[1][1:4] and results[0][5] == results[1][5]
    used_exchange, sums, argmax, big, gathered, tokens = results[0]
    assert sums == [[3.0 * (i + 1)] * 8 for i in range(rounds)]
    assert argmax == [1, 5]  # the tie goes to id 1 (rank 0); the maximum is id 1 of rank 1, i.e. 4 + 1
    assert big == 2.0
    # logits to rank 0 only, rank-major along the last dimension (small: shared memory; big: gloo)
    assert gathered == [((2, 6), [0.0, 1.0]), ((2, 1 << 17), [0.0, 1.0])] and results[1][4] == [None, None]
    assert tokens == [[0, 0, 0], [10, 10, 10], [20, 20, 20], [7, 7]]  # rank 0's values everywhere
    if len(os.sched_getaffinity(0)) >= 2:  # two local ranks with a core each use shared memory
        assert used_exchange and results[1][0]


def test_a_peer_that_never_arrives_is_given_up_on_after_the_timeout(tmp_path):
    path = tmp_path / "exchange"
    path.write_bytes(b"\0" * (2 * SharedMemoryExchange.LINE + 4 * SharedMemoryExchange.SLOT_BYTES))
    alone = SharedMemoryExchange(rank=0, world_size=2, path=str(path), timeout_s=0.3)
    with pytest.raises(PeerLostError, match=r"Timed out waiting 300ms for rank\(s\) \[1\]"):
        alone.gather(torch.ones(4))
    alone.close()
