"""Shared fixtures: a tokenizer and small random checkpoints in Meta's exact layout.

The real LLaMA tokenizer from ../shared/assets is used when present; otherwise a tiny SentencePiece
model is trained once per session. Checkpoints are written once per configuration and reused.
"""

import contextlib
import inspect
import multiprocessing.process
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from llama_mp.checkpoints.params import ModelArgs  # noqa: E402
from llama_mp.checkpoints.synth import find_or_make_tokenizer, write_random_checkpoint  # noqa: E402
from llama_mp.runtime.tokenizer import Tokenizer  # noqa: E402

# Small shapes that still exercise every split: 4 heads (so 1, 2 and 4 ranks), GQA with 2 kv heads.
TINY = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """../shared's real tokenizer, or a tiny trained one (always, with LLAMA_MP_TEST_TOKENIZER=tiny)."""
    fallback = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    if os.environ.get("LLAMA_MP_TEST_TOKENIZER") == "tiny":
        return find_or_make_tokenizer(fallback, shared=None)
    return find_or_make_tokenizer(fallback)


@pytest.fixture(scope="session")
def llama3_tokenizer_path(tmp_path_factory):
    """Meta's Llama 3 tokenizer from ../shared, or a tiny tiktoken file (always, with LLAMA_MP_TEST_TOKENIZER=tiny)."""
    fallback = str(tmp_path_factory.mktemp("tok3") / "tokenizer.model")
    if os.environ.get("LLAMA_MP_TEST_TOKENIZER") == "tiny":
        return find_or_make_tokenizer(fallback, shared=None, family="llama3")
    return find_or_make_tokenizer(fallback, family="llama3")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer):
    """make_checkpoint(shards=1, n_kv_heads=None, dtype=torch.float32, seed=0, **params) ->
    (ckpt_dir, ModelArgs with the real vocab, whole-model state dict). Cached per arguments."""
    cache = {}

    def make(shards=1, dtype=torch.float32, seed=0, **overrides):
        key = (shards, dtype, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            fields = dict(TINY, vocab_size=tokenizer.n_words)
            fields.update(overrides)
            args = ModelArgs(**fields)
            name = f"ckpt_mp{shards}_{str(dtype).split('.')[-1]}_s{seed}_" + "_".join(
                f"{k}{v}" for k, v in sorted(overrides.items()))
            ckpt_dir = str(tmp_path_factory.mktemp(name))
            state = write_random_checkpoint(ckpt_dir, args, shards, seed=seed, dtype=dtype)
            cache[key] = (ckpt_dir, args, state)
        return cache[key]

    return make


@pytest.fixture
def llama_mp_command(monkeypatch, capsys):
    """llama_mp_command(*argv) -> (exit code, stdout, stderr) of `llama-mp ARGV`, run in this process
    through the same runner as the installed command (starting Python and torch again would add seconds
    per call and test nothing more)."""
    from llama_mp.cli import main

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["llama-mp", *map(str, argv)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as ended:
            main()
        out = capsys.readouterr()
        return ended.value.code, out.out, out.err

    return run


@pytest.fixture
def one_process(monkeypatch, capsys):
    """one_process(launcher, *args): the launcher as one plain process runs it (no torchrun), but in this
    process, through the same runner (starting Python and torch again would only add seconds): its exit
    code and output as a subprocess.CompletedProcess. The plain process itself: test_failures."""
    from llama_mp import distributed
    from llama_mp.cli import completion
    from llama_mp.cli.runner import run

    def go(launcher, *args):
        monkeypatch.setattr(sys, "argv", [launcher, *args, "--backend", "gloo", "--device", "cpu"])
        capsys.readouterr()
        try:
            with pytest.raises(SystemExit) as ended:
                run(getattr(completion, launcher.removesuffix(".py")))
        finally:
            distributed.teardown()
        out = capsys.readouterr()
        return subprocess.CompletedProcess(sys.argv, ended.value.code, out.out, out.err)

    return go


@pytest.fixture
def fresh_kernels(monkeypatch):
    """fresh_kernels(): the CPU kernels' module as a new process finds it (nothing loaded, nothing found
    against them, no library variant open), each time it is called; the session's state comes back after
    the test. The kernels are chosen once per process: this is what checking that choice in process needs."""
    from llama_mp.kernels import cpu

    def reset():
        monkeypatch.setattr(cpu, "_loaded", None)
        monkeypatch.setattr(cpu, "_why_not", None)
        monkeypatch.setattr(cpu, "_variants", {})

    return reset


# --- The `spawn` mark, enforced -----------------------------------------------------------------------------
# A test that starts a process (torchrun, a launcher in a subprocess, multiprocessing ranks) costs seconds and
# belongs to `make test`, not to the quick lane. So a test without @pytest.mark.spawn gets process creation
# that fails at once, naming the rule: forgetting the mark is a red test, not a slow quick lane.
# A C compiler is let through: the CPU kernels (llama_mp/kernels/cpu.py) and torch.compile's C++ code are
# built by calling one, a tool run by the code under test rather than a rank or a launcher; refusing it would
# not even fail loudly, as a failed kernel build falls back to PyTorch and the test would check the wrong path.
# The guard covers each test's setup, call and teardown, so a module fixture that starts a server counts
# against the first test that asks for it.
SPAWN_RULE = "this test starts a process: mark it @pytest.mark.spawn"
_COMPILER = re.compile(r"^(cc|c\+\+|gcc|g\+\+|clang|clang\+\+)(-[0-9.]+)?$")


def _is_compiler(args, shell) -> bool:
    """Whether Popen's `args` run a C or C++ compiler (by its name, or the one $CC / $CXX names)."""
    if isinstance(args, (str, bytes, os.PathLike)):
        args = [args]
    words = [os.fsdecode(a) for a in args]
    if shell and words:  # the shell runs the first item as a command line
        words = shlex.split(words[0])
    name = os.path.basename(words[0]) if words else ""
    named = {os.path.basename(os.environ.get(v, "")) for v in ("CC", "CXX")} - {""}
    return bool(_COMPILER.match(name)) or name in named


class UnmarkedSpawn(BaseException):
    """Raised where an unmarked test starts a process; a BaseException so `except Exception` fallbacks in
    the code under test cannot swallow it."""


@contextlib.contextmanager
def _no_processes(item):
    refused = []

    def refuse(what):
        refused.append(what)
        raise UnmarkedSpawn(f"{SPAWN_RULE} ({what}; {item.nodeid})")

    execute_child = subprocess.Popen._execute_child

    signature = inspect.signature(execute_child)

    def guarded_execute_child(self, args, *rest, **kwargs):
        shell = signature.bind(self, args, *rest, **kwargs).arguments["shell"]
        if not _is_compiler(args, shell):
            refuse(f"subprocess {args if isinstance(args, str) else ' '.join(map(str, args))[:120]!r}")
        return execute_child(self, args, *rest, **kwargs)

    patches = [(subprocess.Popen, "_execute_child", guarded_execute_child),
               (multiprocessing.process.BaseProcess, "start", lambda self: refuse("multiprocessing Process.start"))]
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            patches.append((os, name, lambda *a, _name=name, **k: refuse(f"os.{_name}")))
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    if refused:  # raised again here in case the code under test caught it
        pytest.fail(f"{SPAWN_RULE} ({refused[0]})", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with (contextlib.nullcontext() if item.get_closest_marker("spawn") else _no_processes(item)):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with (contextlib.nullcontext() if item.get_closest_marker("spawn") else _no_processes(item)):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    with (contextlib.nullcontext() if item.get_closest_marker("spawn") else _no_processes(item)):
        return (yield)
