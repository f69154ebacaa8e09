"""What rank 0's HTTP side reads of the server: its phase (loading, ready, draining, failed) and, once
ready, the scheduler, tokenizer and limits. Written by the main thread, read by the HTTP thread."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from ..runtime.tokenizer import Tokenizer
from .metrics import Metrics
from .protocol import ApiError, Limits
from .scheduler import Scheduler

LOADING, READY, DRAINING, FAILED = "loading", "ready", "draining", "failed"


@dataclass
class ServerState:
    """The server as the routes see it (see the module's docstring)."""

    api_key: Optional[str]
    max_body_bytes: int
    phase: str = LOADING
    reason: str = ""
    scheduler: Optional[Scheduler] = None
    tokenizer: Optional[Tokenizer] = None
    limits: Optional[Limits] = None
    created: int = field(default_factory=lambda: int(time.time()))
    open_requests: int = 0  # requests whose answer is still being sent
    receive_timeout_s: float = 30.0  # how long a request's head, then its body, may take to arrive (then 408)
    metrics: Metrics = field(init=False)

    def __post_init__(self):
        self.metrics = Metrics(lambda: self.limits.model_name if self.limits else "",
                               lambda: self.scheduler.stats() if self.scheduler else None)

    def ready(self, scheduler: Scheduler, tokenizer: Tokenizer, limits: Limits) -> None:
        self.scheduler, self.tokenizer, self.limits = scheduler, tokenizer, limits
        self.phase = READY

    def unavailable(self) -> Optional[ApiError]:
        """The 503 to answer now, if the server cannot take a request."""
        if self.phase == LOADING:
            return ApiError(503, "The model is still loading; retry in a moment (GET /health says when it is "
                                 "ready).", "server_error")
        if self.phase == DRAINING:
            return ApiError(503, "The server is shutting down and takes no new requests.", "server_error")
        if self.phase == FAILED:
            return ApiError(503, f"The server cannot take requests: {self.reason}", "server_error")
        return None
