"""`serve`: the OpenAI-compatible server as a command, on every rank of a torchrun job (launch/serve.py,
`llama-mp serve`), or in one plain process.

Rank 0 binds the port first (a port in use is reported before anything loads), starts HTTP in a thread
(answering 503 while loading), loads its part of the model with the others, then runs the batch loop on
its main thread. The other ranks load theirs and wait in `Engine.serve()` for the steps rank 0 sends.

Ending. SIGTERM (which torchrun forwards to every rank): rank 0 stops taking requests, lets those in
flight finish for up to --drain_s seconds, answers 503 to what is left, releases the other ranks and
exits 0; they exit 0 too. Under torchrun the drain is cut to fit torchrun's own grace before it SIGKILLs
the ranks (`drain_within_launcher`). The other ranks ignore SIGTERM, since rank 0 still needs them to
finish the work in flight; should rank 0 never release them, they end themselves after --drain_s plus a
margin, or at once if rank 0's process (on this host) has ended. A rank that dies: the step in progress
fails (gloo sees the closed connection, the shared-memory exchange sees the process gone), rank 0
answers 503 to everything pending and exits non-zero (4), and the other ranks exit when they find rank
0 gone.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Optional

from .. import distributed
from ..checks import described, option_domain
from ..distributed.failure import WAIT_FOR_PERSON_S, process_alive
from ..errors import LlamaMPError, PeerLostError
from ..runtime.batching import Batcher
from ..runtime.llama import Llama, check_build_arguments, log
from ..runtime.tools import FORMATS as TOOL_FORMATS
from .protocol import Limits
from .scheduler import Scheduler
from .state import DRAINING, FAILED, ServerState

if TYPE_CHECKING:
    from .app import HttpServer

RELEASE_MARGIN_S = 15.0   # beyond --drain_s, how long a rank other than 0 waits for rank 0 after SIGTERM
SWITCH_INTERVAL_S = 0.001
FLUSH_S = 2.0             # how long rank 0 lets the last answers go out before HTTP stops
# What the ranks need after the drain, before torchrun's SIGKILL: the flush, HTTP's stop (up to 2 s for
# open connections), releasing the other ranks and exiting (measured: well under 1 s on 2 CPU ranks).
END_MARGIN_S = FLUSH_S + 3.0


def check_serve_options(host, port, max_batch_size, max_seq_len, api_key, model_name, max_queue,
                        max_body_bytes, drain_s, receive_timeout_s, prefix_cache_rows=None, tool_format=None) -> None:
    """The server's own options, checked on every rank before the process group starts."""
    if tool_format is not None and tool_format not in TOOL_FORMATS:
        raise LlamaMPError(f"--tool_format must be one of {TOOL_FORMATS} (Llama 3.1: json; Llama 3.2, 3.3 and 4: "
                           f"python_list), got {described(tool_format)}.")
    if not isinstance(host, str) or not host:
        raise LlamaMPError(f"--host must be a host name or address, got {described(host)}.")
    # the command line's domains (checks.OPTION_DOMAINS), for callers from Python too; None is refused here
    for name, value in dict(port=port, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                            max_queue=max_queue, max_body_bytes=max_body_bytes, drain_s=drain_s,
                            receive_timeout_s=receive_timeout_s).items():
        option_domain("serve", name).check(name, value)
    if prefix_cache_rows is not None:
        option_domain("serve", "prefix_cache_rows").check("prefix_cache_rows", prefix_cache_rows)
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise LlamaMPError("--api_key must be a non-empty string (clients send it as 'Authorization: Bearer KEY').")
    if model_name is not None and (not isinstance(model_name, str) or not model_name):
        raise LlamaMPError(f"--model_name must be a non-empty string, got {described(model_name)}.")


def serve(
    ckpt_dir: str,
    tokenizer_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_seq_len: int = 512,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    max_queue: int = 64,
    max_body_bytes: int = 1 << 20,
    drain_s: float = 30.0,
    receive_timeout_s: float = 30.0,
    prefix_cache_rows: Optional[int] = None,
    tool_format: Optional[str] = None,
    seed: int = 1,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    decoder: str = "auto",
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    load_timeout_s: float = distributed.DEFAULT_LOAD_TIMEOUT_S,
) -> None:
    """Serve a LLaMA checkpoint over HTTP with OpenAI's API, on every process of this torchrun job.

    Rank 0 listens on --host (default 127.0.0.1, loopback only) and --port (0: any free port; the address
    is printed on stderr) and answers GET /health, GET /v1/models, POST /v1/completions and POST
    /v1/chat/completions (streamed as server-sent events with "stream": true). Requests join the running
    batch at the next step and leave when done: up to --max_batch_size at once, each with up to
    --max_seq_len tokens (prompt and answer); --max_queue more may wait (then 503). --api_key KEY makes
    every /v1 route need 'Authorization: Bearer KEY' (a non-loopback --host without it prints a warning).
    --model_name is the name clients use (default: the checkpoint folder's name). --max_body_bytes bounds
    a request body (413); --receive_timeout_s (default 30) how long a request's line and headers, and then
    its body, may each take to arrive (408: a client trickling bytes cannot hold a connection). SIGTERM stops taking requests and gives those in flight --drain_s seconds (under
    torchrun at most its --shutdown_timeout less 5 s, so that no rank is SIGKILLed mid-answer).
    --prefix_cache_rows N: how many free KV-cache rows keep their tokens for a later prompt that starts the
    same way (default: every free row; 0 turns prefix caching off).
    --tool_format: how `tools` are offered to the model and its calls read (runtime/tools.py): json (Llama 3.1,
    the default for Llama 3) or python_list (Llama 3.2 and 3.3, whose calls are `[f(a=1), g()]`; Llama 4's
    only format, its default).
    --seed seeds requests that bring no seed. --backend, --device, --dtype, --decoder, --quantize,
    --group_size, --timeout_s and --load_timeout_s are text_completion's (see its --help).
    """
    def check() -> None:
        check_serve_options(host, port, max_batch_size, max_seq_len, api_key, model_name, max_queue,
                            max_body_bytes, drain_s, receive_timeout_s, prefix_cache_rows, tool_format)
        check_build_arguments(ckpt_dir, tokenizer_path, seed, timeout_s, load_timeout_s, quantize, group_size)

    try:
        check()
        app = _server_side()
    except LlamaMPError as e:
        raise distributed.said_once(e, lambda _: (check(), _server_side()), distributed.env_ranks()[2]) from None
    rank = distributed.env_ranks()[0]
    name = model_name or os.path.basename(os.path.normpath(str(ckpt_dir)))
    state = http = None
    if rank == 0:
        state = ServerState(api_key, max_body_bytes, receive_timeout_s=receive_timeout_s)
        http = app.HttpServer(app.make_app(state), app.bind(host, port), receive_timeout_s)
        http.start()
        app.say(f"llama_mp server: listening on {http.address} (model {name!r}; loading, /health answers 503 until "
            "ready)")
        if not app.is_loopback(host) and api_key is None:
            app.say(f"warning: --host {host} is reachable from other machines and no --api_key is set: anyone who can "
                "reach this port can use the model. Set --api_key KEY, or serve on 127.0.0.1.")
    try:
        llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed, backend=backend,
                            device=device, dtype=dtype, decoder=decoder, timeout_s=timeout_s,
                            load_timeout_s=load_timeout_s, quantize=quantize, group_size=group_size)
    except BaseException:
        if http is not None:
            state.phase, state.reason = FAILED, "the model failed to load."
            http.stop(1.0)
        raise
    batcher = Batcher(llama.engine)  # on every rank: registers the step op before rank 0 sends one
    drain_s = drain_within_launcher(drain_s, llama.group.launcher_grace_s, rank == 0)
    if rank != 0:
        _outlast_sigterm(drain_s + RELEASE_MARGIN_S, llama.group.local_peer_pids()[0])
        llama.engine.serve(idle_timeout_s=WAIT_FOR_PERSON_S)
        return
    _serve_on_rank_0(llama, batcher, state, http, name, max_seq_len, max_batch_size, max_queue, drain_s, seed,
                     prefix_cache_rows, tool_format)


def drain_within_launcher(drain_s: float, grace_s: Optional[float], say: bool) -> float:
    """--drain_s, cut so that the drain and the ending fit in torchrun's grace after SIGTERM (`grace_s`,
    None outside torchrun): a rank torchrun SIGKILLs drops its connections mid-answer. `say`: print
    the cut (rank 0)."""
    if grace_s is None or drain_s <= grace_s - END_MARGIN_S:
        return drain_s
    capped = max(0.0, grace_s - END_MARGIN_S)
    if say:
        print(f"llama_mp server: --drain_s {drain_s:g} is cut to {capped:g} s: torchrun SIGKILLs the ranks "
              f"{grace_s:g} s after it forwards SIGTERM and the ending needs {END_MARGIN_S:g} s; for a longer drain give "
              f"torchrun --shutdown_timeout {math.ceil(drain_s + END_MARGIN_S)} (before the script).", file=sys.stderr, flush=True)
    return capped


def _server_side():
    """The HTTP side (app.py), whose FastAPI and uvicorn come with the `server` extra."""
    try:
        from . import app
    except ImportError as e:
        raise LlamaMPError(f"The server needs FastAPI and uvicorn ({e}): pip install -e '.[server]' (or "
                           "pip install fastapi 'uvicorn[standard]').") from None
    return app


def _grammar_vocabulary(tokenizer) -> None:
    """Make the grammar engine's view of the vocabulary now (about 2 s for Llama 3's), not on the event loop
    when the first constrained request comes; without llguidance such requests are refused, saying so."""
    from ..runtime.grammar import vocabulary

    try:
        vocabulary(tokenizer, sorted(tokenizer.stop_ids))
    except LlamaMPError as e:
        log(None, f"llama_mp server: {e} Requests for forced tool calls or structured output are refused.")


def _serve_on_rank_0(llama: Llama, batcher: Batcher, state: ServerState, http: "HttpServer", name: str,
                     max_seq_len: int, max_batch_size: int, max_queue: int, drain_s: float, seed: int,
                     prefix_cache_rows: Optional[int] = None, tool_format: Optional[str] = None) -> None:
    # The HTTP thread must get the interpreter between the batch loop's calls within a millisecond, not
    # Python's default 5: its events then go out as each step ends, instead of two steps at a time.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    scheduler = Scheduler(batcher, llama.tokenizer, max_queue, seed, prefix_cache_rows)
    _grammar_vocabulary(llama.tokenizer)
    state.ready(scheduler, llama.tokenizer, Limits(name, max_seq_len, max_batch_size, tool_format))
    watch = PeerWatch(llama.group, scheduler)

    def on_sigterm(signum, frame):
        if watch.lost is not None:  # the watch's signal: stop the step that waits for the lost rank
            if scheduler.stepping:
                raise PeerLostError(f"rank 0 lost contact with the other ranks ({watch.lost}).")
            return  # between steps the loop sees the failure itself
        if state.phase != FAILED:
            state.phase = DRAINING
        scheduler.drain(drain_s)

    signal.signal(signal.SIGTERM, on_sigterm)
    watch.start()
    log(llama.group, f"llama_mp server: ready on {http.address}")
    try:
        scheduler.run()
    except (Exception, KeyboardInterrupt) as e:
        state.phase, state.reason = FAILED, scheduler.failure or str(e)
        _flush(state)
        http.stop(1.0)
        if watch.lost is not None:
            raise PeerLostError(f"rank 0 lost contact with the other ranks ({watch.lost}). Every pending request "
                                "was answered 503; restart the server.") from None
        if isinstance(e, KeyboardInterrupt):
            raise
        lost = e if isinstance(e, LlamaMPError) else distributed.peer_lost(e)
        if lost is not None:
            raise lost from None
        raise
    finally:
        watch.stop()
    batcher.pause()
    llama.engine.stop()
    _flush(state)
    http.stop()
    mean = f"{1e3 * scheduler.step_s / scheduler.steps:.2f} ms and {scheduler.rows / scheduler.steps:.1f} rows" \
        if scheduler.steps else "-"
    log(llama.group, f"llama_mp server: stopped after {scheduler.steps} steps (mean {mean} per step)")


def _flush(state: ServerState) -> None:
    """Let answers still being sent go out (bounded), before HTTP stops."""
    deadline = time.monotonic() + FLUSH_S
    while state.open_requests and time.monotonic() < deadline:
        time.sleep(0.02)


def _outlast_sigterm(release_s: float, rank_0_pid: Optional[int]) -> None:
    """Ranks other than 0: keep serving after SIGTERM until rank 0 releases this rank, for at most
    `release_s` seconds, and no longer than rank 0's process runs, where it runs on this host
    (`rank_0_pid`; torchrun's SIGTERM after rank 0 died would otherwise wait for its SIGKILL); then end
    with SIGTERM's usual status."""
    def end():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def wait_then_end():
        deadline = time.monotonic() + release_s
        while time.monotonic() < deadline and (rank_0_pid is None or process_alive(rank_0_pid)):
            time.sleep(0.05)
        end()

    def on_sigterm(signum, frame):
        if rank_0_pid is not None and not process_alive(rank_0_pid):
            end()
            return
        threading.Thread(target=wait_then_end, daemon=True, name="llama_mp-release").start()

    signal.signal(signal.SIGTERM, on_sigterm)


class PeerWatch:
    """Rank 0: notice at once when another rank of this host has died (its process ended). A step may be
    waiting for it in the shared-memory exchange, which only gives up after --timeout_s; the watch
    answers 503 to everything pending and interrupts the main thread instead. Ranks on other hosts are
    noticed by gloo/NCCL (their connections close) and by torchrun."""

    PERIOD_S = 0.2

    def __init__(self, group, scheduler: Scheduler):
        self.pids = list(filter(None, group.local_peer_pids()))
        self.scheduler = scheduler
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="llama_mp-peers")

    def start(self) -> None:
        if self.pids:
            self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.PERIOD_S):
            gone = [pid for pid in self.pids if not process_alive(pid)]
            if gone:
                self.lost = f"the rank with process id {gone[0]} ended"
                self.scheduler.fail(f"another rank of the job died ({self.lost}).")
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # its handler raises
                return

