"""Ranks of one job: the process group and what a rank knows of it (group.py), agreeing to fail
(failure.py), the decode step's collectives (collectives.py) over gloo, NCCL or shared memory (shm.py)."""

from .failure import agree, broadcast_from_main, decided_by_main, peer_lost, said_once
from .group import (BACKENDS, DEFAULT_LOAD_TIMEOUT_S, DEFAULT_TIMEOUT_S, DEVICES, Group, choose_backend,
                    choose_device, env_ranks, setup, teardown)

__all__ = ["Group", "setup", "teardown", "agree", "broadcast_from_main", "decided_by_main", "peer_lost",
           "said_once", "choose_backend", "choose_device", "env_ranks", "BACKENDS", "DEVICES",
           "DEFAULT_TIMEOUT_S", "DEFAULT_LOAD_TIMEOUT_S"]
