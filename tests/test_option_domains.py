"""Every number and every text a command line can hand over ends in a clear refusal or is used as given.

Class 4 of round 3: every count, size and rate of every `llama-mp` command and launcher has a domain
(checks.OPTION_DOMAINS), checked before any work: an absurd value (10**12, negative, 0 where invalid, NaN,
a float for a count) is one line naming the option, exit 2, at once. Class 6 (the command-line half): a
text option that is not UTF-8 text (lone surrogates, as Python hands over bytes that are not UTF-8) is
exit 2 with one message, never a traceback; file names keep working whatever their bytes.
All in process (the `llama_mp_command` fixture and `runner.run` on the launchers' functions).
"""

import inspect
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from launching import ROOT
from llama_mp.checks import OPTION_DOMAINS, option_domain, text_problem
from llama_mp.checkpoints import layout
from llama_mp.checkpoints.params import ModelArgs
from llama_mp.cli import runner
from llama_mp.cli.chat import chat
from llama_mp.cli.commands import COMMANDS
from llama_mp.cli.completion import chat_completion, prompts_from_text, text_completion
from llama_mp.errors import LlamaMPError
from llama_mp.runtime.chat import check_dialogs, load_dialogs
from llama_mp.server.protocol import ApiError, Limits, parse_completion
from llama_mp.tools.bench_serve import bench_serve, parse_levels
from llama_mp.torchrun import process_count_problem

# The `command` fixture is safe to reuse between examples: each call sets argv anew and reads its own output.
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LAUNCHERS = {"text_completion": text_completion, "chat_completion": chat_completion, "chat": chat}
ALL = {**COMMANDS, **LAUNCHERS}
NUMERIC = (int, float, Optional[int], Optional[float], "int", "float", "Optional[int]", "Optional[float]")
# Required options get a placeholder: the domain check runs before the command does anything with them.
POSITIONAL = {"synth": ["/nonexistent/out"], "reshard": ["/nonexistent/a", "/nonexistent/b"],
              "verify": ["/nonexistent"], "convert": ["/nonexistent/a", "/nonexistent/b"],
              "quantize": ["/nonexistent/a", "/nonexistent/b"]}
NOWHERE = {"ckpt_dir": "/nonexistent", "tokenizer_path": "/nonexistent"}
REQUIRED = {"reshard": {"mp": 1}, "quantize": {"mode": "int8"}, "plan": {"gpus": 1, "gpu_mem_gb": 24},
            "perplexity": {**NOWHERE, "text": "/nonexistent"}, "serve": NOWHERE, "text_completion": NOWHERE,
            "chat_completion": NOWHERE, "chat": NOWHERE}


def numeric_options():
    return sorted((command, name) for command, fn in ALL.items()
                  for name, p in inspect.signature(fn).parameters.items() if p.annotation in NUMERIC)


def domain(command, name):
    """The domain the runner checks: keyed by the command's function name (bench-serve: bench_serve)."""
    return option_domain(ALL[command].__name__, name)


def text_options():
    return sorted((command, name) for command, fn in ALL.items() for name in runner.text_options(fn)
                  if name not in runner.PATH_OPTIONS)


@pytest.fixture
def command(monkeypatch, capsys):
    """command(NAME, *argv) -> (exit code, stdout, stderr) of `llama-mp NAME ARGV`, or of a launcher."""

    def run(name, *argv):
        argv = list(map(str, argv))
        given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
        argv = POSITIONAL.get(name, []) + argv
        for option, placeholder in REQUIRED.get(name, {}).items():
            if option not in given:
                argv += [f"--{option}", str(placeholder)]
        if name in COMMANDS:
            monkeypatch.setattr(sys, "argv", ["llama-mp", name, *argv])
            component = COMMANDS
        else:
            monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
            component = LAUNCHERS[name]
        capsys.readouterr()
        with pytest.raises(SystemExit) as ended:
            runner.run(component, name="llama-mp" if name in COMMANDS else None)
        out = capsys.readouterr()
        # a message that quotes a cause ending in a period must not end it twice ('ftp://'.. Check)
        assert not re.search(r"[^.]\.\.(\s|$)", out.err), out.err
        return ended.value.code, out.out, out.err

    return run


def test_every_numeric_option_of_every_command_has_a_domain():
    missing = [f"{c} --{n}" for c, n in numeric_options() if domain(c, n) is None]
    assert not missing
    assert all(d.low <= d.high and math.isfinite(d.high) for d in OPTION_DOMAINS.values())


@pytest.mark.parametrize("command_name, name", numeric_options())
def test_every_default_is_inside_its_domain(command_name, name):
    default = inspect.signature(ALL[command_name]).parameters[name].default
    if default is not None and default is not inspect.Parameter.empty:
        domain(command_name, name).check(name, default)


def outside(d):
    """Values outside Domain `d`: beyond each end, far beyond, NaN and infinities, and a float for a count."""
    beyond = [d.high + 1, d.low - 1, 10 ** 12 if d.high < 10 ** 12 else -10 ** 12, 10 ** 30, -(10 ** 30)]
    values = st.sampled_from([repr(v) for v in beyond] + ["nan", "inf", "-inf", "1e308", "-1e308", "'12'", "9" * 401])
    if d.integer:
        values |= st.floats(min_value=d.low, max_value=min(d.high, 1e6)).filter(lambda f: f != int(f)).map(repr)
    else:
        values |= st.floats(min_value=d.high, exclude_min=True, allow_infinity=False).map(repr)
    return values


@pytest.mark.parametrize("command_name, name", numeric_options())
@FAST
@given(data=st.data())
def test_an_out_of_domain_number_is_one_line_naming_the_option_at_once(command, command_name, name, data):
    value = data.draw(outside(domain(command_name, name)))
    start = time.monotonic()
    code, out, err = command(command_name, f"--{name}", value)
    assert time.monotonic() - start < 5
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama_mp: error: ") and f"--{name}" in lines[0], err
    assert "Traceback" not in err and out == ""
    d = domain(command_name, name)
    if d.integer:  # both bounds exactly, never rounded (16777216, not 1.67772e+07)
        assert f"from {int(d.low)} to {int(d.high)} " in lines[0], lines[0]
    assert len(lines[0]) < 400, lines[0]  # a 401-digit value is described, not quoted


def test_sampling_errors_name_the_option_as_each_front_end_spells_it(command, tokenizer):
    """check_sampling is shared by the command line, the Python API and the server; each names the value
    the way its user wrote it."""
    for option, value in (("temperature", 1e-300), ("top_p", 0), ("top_k", -1)):
        code, _, err = command("text_completion", f"--{option}", value)
        assert code == 2 and f"error: --{option} must be" in err, err
    code, _, err = command("chat", "--temperature", 1e-300)
    assert code == 2 and "error: --temperature must be a number from 0.001 to 100" in err, err
    for option, value in (("temperature", 1e-300), ("top_p", 0), ("temperature", 10 ** 400)):
        with pytest.raises(ApiError) as e:
            parse_completion({"prompt": "a", option: value}, tokenizer, Limits("m", 64, 1))
        assert e.value.status == 400 and e.value.param == option and e.value.message.startswith(f"'{option}' must be")


def test_the_domain_check_comes_before_any_work(command, tmp_path):
    # synth would write a folder; plan would enumerate GPU counts up to 10**12; bench would loop 10**12 runs
    code, _, err = command("synth", tmp_path / "out", "--mp", 10 ** 12)
    assert code == 2 and "--mp must be an integer from 1 to 1024" in err and not (tmp_path / "out").exists()
    code, _, err = command("bench", "--dim", 64, "--n_layers", 1, "--n_heads", 4, "--runs", 10 ** 12)
    assert code == 2 and "--runs" in err


def test_a_rank_count_is_judged_without_counting_up_to_it():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, multiple_of=32, vocab_size=256)
    start = time.monotonic()
    for count in (10 ** 12, 2 ** 63, 5, 0, -4):
        with pytest.raises(LlamaMPError, match=r"Valid shard counts: \[1, 2, 4\]"):
            layout.require_split(args, count, "this model", "shard")
    assert time.monotonic() - start < 1
    assert layout.valid_world_sizes(args) == [n for n in range(1, 65) if layout.splits(args, n)] == [1, 2, 4]


@FAST
@given(st.one_of(st.integers(min_value=1025), st.integers(max_value=0)).map(str))
def test_bench_serve_concurrency_is_bounded(level):
    with pytest.raises(LlamaMPError, match="--concurrency must be an integer from 1 to 1024"):
        parse_levels(f"1,{level}")


@pytest.mark.parametrize("argv, words", [
    (["--nproc_per_node", "100000"], "--nproc_per_node must be from 1 to 1024"),
    (["--nproc_per_node", "0"], "--nproc_per_node must be from 1 to 1024"),
    (["--nnodes", "1:5000"], "--nnodes must be from 1 to 1024"),
])
def test_torchrun_process_counts_are_bounded_before_anything_starts(argv, words):
    from torch.distributed import run as torchrun

    args = torchrun.parse_args([*argv, "x.py"])
    assert words in process_count_problem(args.nproc_per_node, args.nnodes)
    ok = torchrun.parse_args(["--nproc_per_node", "auto", "--nnodes", "1:2", "x.py"])
    assert process_count_problem(ok.nproc_per_node, ok.nnodes) is None


def test_a_benchmark_that_measured_nothing_exits_2_with_the_cause(command):
    code, out, err = command("bench-serve", "--url", "http://127.0.0.1:1", "--warmup", 0, "--concurrency", 2,
                             "--requests", 3, "--json")
    assert code == 2 and "nothing was measured" in err and "ConnectError" in err and "Traceback" not in err
    row = json.loads(out.strip().splitlines()[0])  # what it did see is still printed, as valid JSON
    assert row["requests"] == 0 and row["errors"] == 3 and row["ttft_p50_ms"] is None
    code, out, err = command("bench-serve", "--url", "http://127.0.0.1:1", "--warmup", 1)
    assert code == 2 and "Every request of the warmup failed" in err and out == ""


@pytest.mark.parametrize("url, words", [("ftp://x", "not an http:// or https:// address"), ("notaurl", "with a host"),
                                        ("http://[::1", "Invalid IPv6 URL"), ("http://h:99999", "Port out of range"),
                                        ("http://:80", "with a host")])
def test_bench_serve_refuses_an_address_that_is_not_a_servers_before_any_request(command, url, words):
    start = time.monotonic()
    code, out, err = command("bench-serve", "--url", url, "--warmup", 1)
    assert code == 2 and f"--url {url!r} is not a server's address" in err and words in err, err
    assert time.monotonic() - start < 1 and out == ""


@pytest.mark.parametrize("levels", ["1.5,2", "1,true", (1.5, 2), (True, 2), "1,,2", " "])
def test_bench_serve_concurrency_levels_are_whole_numbers(levels):
    with pytest.raises(LlamaMPError, match="--concurrency must be an integer from 1 to 1024"):
        parse_levels(levels)


# ----------------------------------------------------------------------------------------------
# Text that is not text

not_utf8 = st.tuples(st.text(max_size=8), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                     st.text(max_size=8)).map("".join)


def test_text_options_are_known_and_paths_are_not_among_them():
    names = {n for _, n in text_options()}
    assert {"prompts", "system", "model", "model_name", "api_key", "url", "mode"} <= names
    assert not names & runner.PATH_OPTIONS


@pytest.mark.parametrize("command_name, name", text_options())
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=not_utf8)
def test_a_text_option_that_is_not_utf8_is_one_message_exit_2(command, command_name, name, text):
    code, out, err = command(command_name, f"--{name}", text)
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"--{name}" in lines[0] and "not UTF-8" in lines[0], err


@FAST
@given(not_utf8)
def test_prompts_and_dialogs_that_are_not_text_are_refused(text):
    problem = text_problem(text)
    assert problem and "not text" in problem
    escaped = json.dumps([text])  # JSON's \udXXX escapes come back as lone surrogates
    with pytest.raises(LlamaMPError, match="prompt 0"):
        prompts_from_text(escaped)
    with pytest.raises(LlamaMPError, match="dialog 0, message 0"):
        check_dialogs([[{"role": "user", "content": text}]])


def test_a_dialogs_file_with_bytes_that_are_not_utf8_or_escaped_surrogates_is_refused(tmp_path):
    raw = tmp_path / "bytes.json"
    latin1 = b'[[{"role": "user", "content": "caf\xe9"}]]'
    raw.write_bytes(latin1)
    with pytest.raises(LlamaMPError, match=f"is not UTF-8 text \\(byte 0xe9 at offset {latin1.index(0xe9)} "):
        load_dialogs(str(raw))
    escaped = tmp_path / "escaped.json"
    escaped.write_text('[[{"role": "user", "content": "a \\udcff b"}]]')
    with pytest.raises(LlamaMPError, match="not text"):
        load_dialogs(str(escaped))


@pytest.mark.spawn
def test_a_file_name_that_is_not_utf8_is_still_a_file_name(tmp_path):
    """Its bytes reach the file system and come back in the output as they are (stdout and stderr)."""
    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(folder)
    done = subprocess.run([sys.executable, "-m", "llama_mp", "verify", folder, "--quiet"], capture_output=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2 and b"Traceback" not in done.stderr, done.stderr
    assert b"problem(s) in " + folder in done.stdout and b"no consolidated.NN.pth" in done.stdout
    assert b"note: " + folder + b" has no checklist.chk" in done.stderr
