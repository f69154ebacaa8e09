"""What a hostile user can type or pass: every validator of the CLI and the Python API, property by
property (hypothesis, in process), and one launcher run per class of problem that only shows there.

The rule everywhere: a value is used as given or refused with a LlamaMPError that says what is wrong;
never rewritten (a prompt `1.50` stays `1.50`), never a traceback from deep inside torch.
"""

import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Optional

import fire
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from launching import CPU, ROOT, script
from llama_mp import LlamaMPError
from llama_mp.checks import JsonProblem, parse_json, parse_json_bytes, require_seconds, require_seed
from llama_mp.cli.completion import EXAMPLE_PROMPTS, prompts_from_text, text_completion
from llama_mp.cli.runner import check_options, exact_text
from llama_mp.runtime.chat import ROLES, check_dialog, check_dialogs
from llama_mp.runtime.engine import Request
from llama_mp.runtime.llama import Llama, check_build_arguments, check_prompts
from llama_mp.runtime.sampling import check_sampling, sample
from workers import build

FAST = settings(max_examples=50, deadline=None)
ERROR = "llama_mp: error:"


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint(shards=1)[0]


@pytest.fixture(scope="module")
def llama(ckpt, tokenizer_path):
    return build(ckpt, tokenizer_path, max_seq_len=32, max_batch_size=3)


def refused(fn, *args, **kwargs) -> str:
    """The message of the LlamaMPError `fn(*args, **kwargs)` raises: one paragraph, no other exception."""
    with pytest.raises(LlamaMPError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.endswith((".", ")")), message
    return message


# ----------------------------------------------------------------------------------------------
# 1. The command line keeps text as typed


def not_json_looking(text: str) -> bool:
    return text.lstrip()[:1] not in ("[", "{")


typed_text = st.one_of(
    st.text(),
    st.lists(st.text(alphabet="ab 1.,", max_size=4), min_size=2).map(", ".join),  # commas
    st.floats(allow_nan=True, allow_infinity=True).map(repr),                    # numbers
    st.sampled_from(["1.50", "007", "1e3", "-0", "0x1F", "1_000", "True", "None", "null", "()", "'q'"]),
    st.text(min_size=1).map(lambda t: "--" + t),                                  # flags
    st.text().map(lambda t: "[INST] " + t),                                       # chat markup, not JSON
)


@FAST
@given(typed_text)
def test_a_prompt_is_exactly_the_text_typed(text):
    assume(not_json_looking(text) or text.startswith("[INST]"))
    assert prompts_from_text(text) == [text]


@FAST
@given(st.lists(st.text(), min_size=1, max_size=5))
def test_a_json_list_of_strings_is_the_list_form(prompts):
    assert prompts_from_text(json.dumps(prompts)) == prompts


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)


@FAST
@given(st.lists(json_values, min_size=1, max_size=4))
def test_a_json_list_with_anything_but_strings_is_refused(items):
    assume(not all(isinstance(x, str) for x in items))
    message = refused(prompts_from_text, json.dumps(items))
    assert "JSON list" in message and "not a string" in message


@FAST
@given(st.dictionaries(st.text(), json_values, max_size=3))
def test_a_json_object_is_refused_with_how_to_send_it_as_text(obj):
    text = json.dumps(obj)
    message = refused(prompts_from_text, text)
    assert "JSON object" in message and "wrap it in a JSON list" in message
    assert prompts_from_text(json.dumps([text])) == [text]  # the advice works


def test_no_prompts_option_means_the_examples_and_an_empty_list_is_refused():
    assert prompts_from_text(None) == EXAMPLE_PROMPTS
    assert "empty JSON list" in refused(prompts_from_text, "[]")
    assert "must be text" in refused(prompts_from_text, ["a"])


def cli(ckpt_dir: str, tokenizer_path: str, prompts: Optional[str] = None, max_gen_len: int = 4,
        json: bool = False):
    """A stand-in with the entry points' kinds of options: text, integers, a flag."""
    return ckpt_dir, tokenizer_path, prompts, max_gen_len, json


def through_fire(argv):
    check_options(cli, argv)
    seen = []
    fire.Fire(lambda *a, **k: seen.append(cli(*a, **k)), command=exact_text(cli, argv))
    return seen[0]


argv_text = st.one_of(typed_text, st.sampled_from(["--help", "-h", "--", "--json", "[1, 2]", "{a: b}"])).filter(
    lambda t: "\x00" not in t)


@FAST
@given(argv_text, argv_text, argv_text)
def test_fire_receives_text_options_exactly_as_typed_in_every_form(path, tok, prompt):
    assume(not path.startswith("-") and not tok.startswith("-"))  # positional values cannot look like flags
    assert through_fire(["--ckpt_dir", path, "--tokenizer_path", tok, "--prompts", prompt]) == (
        path, tok, prompt, 4, False)
    assert through_fire([path, f"--tokenizer_path={tok}", f"--prompts={prompt}", "--max_gen_len", "7", "--json"]) == (
        path, tok, prompt, 7, True)
    assert through_fire(["--max_gen_len", "3", path, tok]) == (path, tok, None, 3, False)


def test_one_letter_shortcuts_and_a_text_option_without_value_are_refused():
    assert "write options in full" in refused(check_options, cli, ["x", "t", "-p", "1.50"])
    assert "--prompts needs a value" in refused(exact_text, cli, ["x", "t", "--prompts"])


def test_the_launcher_keeps_a_prompt_with_commas_and_digits_as_typed(ckpt, tokenizer_path, one_process):
    prompt = "1.50, None, --x"
    job = one_process("text_completion", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
                      "--prompts", prompt, "--max_gen_len", "2", "--temperature", "0", "--json")
    assert job.returncode == 0, job.stderr
    assert [json.loads(line)["prompt"] for line in job.stdout.splitlines()] == [prompt]


# ----------------------------------------------------------------------------------------------
# 2. Numbers at the edges

odd_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-300, max_value=1e-300),            # denormals and tiny values
    st.sampled_from([5e-324, -0.0, 1e-3, 100.0, 1e308, 0.5, 1.0, 1, 0, 2 ** 64, 10 ** 400]),
    st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.booleans(), st.text(max_size=5), st.none(),
    st.tuples(st.floats()), st.builds(torch.tensor, st.floats(width=32)),
)


@FAST
@given(odd_numbers, odd_numbers, odd_numbers)
def test_accepted_sampling_parameters_always_sample_a_real_token(temperature, top_p, top_k):
    """check_sampling is the whole guard: whatever it lets through samples valid ids from logits like a
    model's (tens, float32), and whatever else it refuses with a LlamaMPError."""
    try:
        check_sampling(temperature, top_p, top_k)
    except LlamaMPError:
        return
    assert not isinstance(temperature, bool) and not isinstance(top_p, bool) and not isinstance(top_k, bool)
    logits = torch.randn(2, 500, generator=torch.Generator().manual_seed(0)) * 30
    ids = sample(logits, temperature, top_p, top_k, torch.Generator().manual_seed(1))
    assert ids.shape == (2,) and bool(((ids >= 0) & (ids < 500)).all())
    if temperature:
        assert torch.isfinite(torch.softmax(logits / temperature, dim=-1)).all()


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-4, float("nan"), float("inf"), -float("inf"), 1e308,
                                         101, True, False, "0.6", None, (0.6,), 10 ** 400, -1])
def test_temperatures_outside_0_or_its_range_are_refused(temperature):
    assert "temperature must be a number from 0.001 to 100" in refused(check_sampling, temperature, 0.9, 0)


@pytest.mark.parametrize("top_p, top_k", [(0, 0), (-0.0, 0), (1.0000001, 0), (float("nan"), 0), (True, 0),
                                          ("1", 0), (0.9, True), (0.9, 1.0), (0.9, -1), (0.9, "3")])
def test_top_p_outside_0_1_and_top_k_not_a_count_are_refused(top_p, top_k):
    assert "top_" in refused(check_sampling, 0.6, top_p, top_k)


def test_greedy_is_zero_of_either_sign():
    check_sampling(0, 1, 0)
    check_sampling(-0.0, 1, 0)


@FAST
@given(st.one_of(st.integers(min_value=-2 ** 66, max_value=2 ** 66), st.sampled_from([2 ** 64 - 1, 2 ** 64, -1]),
                 st.floats(), st.booleans(), st.text(max_size=3)))
def test_a_seed_is_a_64_bit_unsigned_integer(seed):
    try:
        require_seed("seed", seed)
    except LlamaMPError as e:
        assert "seed must be an integer from 0 to 2**64 - 1" in str(e)
        assert not (type(seed) is int and 0 <= seed < 2 ** 64)
        return
    assert torch.Generator().manual_seed(seed).initial_seed() == seed


@FAST
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-10, max_value=10 ** 20),
                 st.sampled_from([5e-324, 1e-4, 1e-3, 604800, 604800.1, 1e15, 1e308]), st.booleans(), st.text(max_size=3)))
def test_a_timeout_is_a_finite_positive_bound(timeout_s):
    try:
        require_seconds("timeout_s", timeout_s)
    except LlamaMPError as e:
        assert "timeout_s must be a number of seconds from 0.001 to 604800" in str(e)
        return
    assert not isinstance(timeout_s, bool) and math.isfinite(timeout_s)
    assert datetime.timedelta(seconds=timeout_s) >= datetime.timedelta(milliseconds=1)  # gloo counts ms
    assert time.monotonic() + timeout_s < 2 ** 53


@pytest.mark.parametrize("kwargs, words", [
    ({"seed": 2 ** 64}, "seed must be an integer"), ({"seed": -1}, "seed must be"), ({"seed": 1.0}, "seed must be"),
    ({"seed": True}, "seed must be"), ({"timeout_s": float("inf")}, "timeout_s must be"),
    ({"load_timeout_s": 0}, "load_timeout_s must be"), ({"load_timeout_s": -5}, "load_timeout_s must be"),
    ({"load_timeout_s": 1e20}, "load_timeout_s must be"), ({"ckpt_dir": 7}, "ckpt_dir must be a path"),
    ({"tokenizer_path": None}, "tokenizer_path must be a path"),
])
def test_build_arguments_are_refused_before_the_process_group_starts(ckpt, tokenizer_path, kwargs, words):
    args = {"ckpt_dir": ckpt, "tokenizer_path": tokenizer_path, "max_seq_len": 32, "max_batch_size": 1, **kwargs}
    assert words in refused(Llama.build, **args, backend="gloo", device="cpu")
    assert not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1


def test_a_pathlib_path_is_a_path(tmp_path):
    assert check_build_arguments(tmp_path, tmp_path / "t.model", 0, 1, 1) == (str(tmp_path), str(tmp_path / "t.model"))


# ----------------------------------------------------------------------------------------------
# 3. Chat: Meta's rule, the last message is the user's


def meta_accepts(roles) -> bool:
    """Meta's llama/generation.py rule, written out: [system] first if any, then user and assistant
    alternating, starting and ending with user."""
    if roles and roles[0] == "system":
        roles = roles[1:]
    return (bool(roles) and all(r == "user" for r in roles[::2]) and all(r == "assistant" for r in roles[1::2])
            and roles[-1] == "user")


@FAST
@given(st.lists(st.sampled_from(ROLES), min_size=1, max_size=7))
def test_a_dialog_is_accepted_exactly_when_meta_would_accept_it(roles):
    dialog = [{"role": r, "content": f"m{i}"} for i, r in enumerate(roles)]
    if meta_accepts(roles):
        check_dialog(dialog, 0)
    else:
        message = refused(check_dialog, dialog, 0)
        assert "dialog 0" in message and str(roles) in message


def test_a_dialog_ending_with_the_assistant_is_refused_by_chat_completion(llama):
    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    message = refused(llama.chat_completion, [dialog], max_gen_len=2)
    assert "ends with an assistant turn" in message and "End it with a user message" in message


@pytest.mark.parametrize("dialogs, words", [
    ("hi", "non-empty list of dialogs"), ([], "non-empty list of dialogs"), (None, "non-empty list of dialogs"),
    ([{"role": "user", "content": "hi"}], "this is one dialog"), ([["hi"]], "message 0 must be an object"),
    ([[{"role": "user", "content": torch.ones(2)}]], "string content"),
])
def test_dialogs_that_are_not_a_list_of_dialogs_are_refused(dialogs, words):
    assert words in refused(check_dialogs, dialogs)


# ----------------------------------------------------------------------------------------------
# 5. The Python API: ids and prompts


bad_ids = st.one_of(st.floats(allow_nan=True), st.none(), st.text(max_size=3), st.booleans(),
                    st.builds(torch.tensor, st.integers(0, 100)), st.lists(st.integers(0, 5), max_size=2),
                    st.tuples(st.integers(0, 5)))


def check_request(llama, prompt_tokens):
    return llama.engine.check(Request(prompt_tokens, 4))


@FAST
@given(ids=st.lists(st.integers(1, 500), min_size=1, max_size=5), bad=bad_ids, where=st.integers(0, 5))
def test_a_token_id_that_is_not_a_python_int_is_refused(llama, ids, bad, where):
    ids.insert(min(where, len(ids)), bad)
    message = refused(check_request, llama, [ids])
    assert "prompt 0 has" in message and "not a token id" in message


@FAST
@given(prompt_tokens=st.one_of(
    st.text(max_size=3), st.none(), st.integers(), st.builds(torch.tensor, st.lists(st.integers(1, 9), min_size=1)),
    st.lists(st.one_of(st.text(max_size=3), st.none(), st.builds(torch.tensor, st.integers(1, 9))), min_size=1,
             max_size=2)))
def test_prompt_tokens_that_are_not_lists_of_lists_are_refused(llama, prompt_tokens):
    assert "prompt_tokens must be a list of prompts" in refused(check_request, llama, prompt_tokens)


some_ids = st.lists(st.integers(0, 255), min_size=1, max_size=5)  # within any test vocabulary (>= 320)


@FAST
@given(prompt_tokens=st.lists(some_ids | some_ids.map(tuple), min_size=1, max_size=3) | st.lists(
    some_ids, min_size=1, max_size=3).map(tuple))
def test_lists_and_tuples_of_ints_are_accepted_as_lists(llama, prompt_tokens):
    checked = check_request(llama, prompt_tokens)
    assert checked.prompt_tokens == [list(p) for p in prompt_tokens]
    assert all(type(p) is list for p in checked.prompt_tokens)


@pytest.mark.parametrize("prompt_tokens", [[[1, 2.0]], [[1, float("nan")]], [[1, None]], [["1"]], [[True, 2]],
                                           [torch.tensor([1, 2])], torch.tensor([[1, 2]]), "hello", [[1, -1]]])
def test_generate_refuses_bad_ids_with_a_message(llama, prompt_tokens):
    refused(llama.generate, prompt_tokens, max_gen_len=2)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": "0.6"}, "temperature must be a number"), ({"temperature": (0.6,)}, "temperature must be"),
    ({"top_p": [0.9]}, "top_p must be"), ({"logprobs": "yes"}, "logprobs must be True or False"),
    ({"echo": 1}, "echo must be True or False"), ({"temperature": 1e-300}, "from 0.001 to 100"),
])
def test_generate_refuses_odd_options_with_a_message(llama, kwargs, words):
    assert words in refused(llama.generate, [[1, 2]], max_gen_len=2, **kwargs)


@pytest.mark.parametrize("prompts, words", [
    ("hello", "got one string: wrap it in a list"), ([1, 2], "prompt 0 is 1"), ([[1, 2]], "generate(prompt_tokens"),
    (None, "non-empty list of strings"), ([], "non-empty list of strings"), (["ok", None], "prompt 1 is None"),
])
def test_text_completion_wants_a_list_of_strings(llama, prompts, words):
    assert words in refused(llama.text_completion, prompts, max_gen_len=2)
    assert words in refused(check_prompts, prompts)


# ----------------------------------------------------------------------------------------------
# 4. Output: nothing streamed for a refused request; a reader that goes away ends the run quietly


def test_a_refused_streamed_request_prints_nothing_on_stdout(ckpt, tokenizer_path, capsys):
    with pytest.raises(LlamaMPError, match="max_seq_len"):
        text_completion(ckpt, tokenizer_path, prompts="hello " * 40, max_seq_len=16, backend="gloo", device="cpu")
    assert capsys.readouterr().out == ""


@pytest.mark.spawn
def test_stdout_closed_by_its_reader_ends_the_run_quietly(ckpt, tokenizer_path):
    cmd = [sys.executable, script("text_completion"), "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
           "--prompts", "first line\nsecond", "--max_seq_len", "4096", "--max_gen_len", "4000", "--temperature", "1",
           *CPU]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.stdout.readline() == b"first line\n"
    proc.stdout.close()  # what `| head -1` does
    try:
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert ERROR not in err
    assert time.monotonic() - started < 60


# ------------------------------------------------------------------------------------------------
# One JSON reader (checks.parse_json) for request bodies, dialog files, --prompts, params.json,
# config.json and --compare files: whatever the text, a value or a JsonProblem, never another error.

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=12)


def _pieces_of_json(value):
    text = json.dumps(value)
    return st.sampled_from([text, text[:len(text) // 2], text + "x", "[" * 5000 + text + "]" * 5000,
                            "[" * 100000, '{"a": 1, "a": %s}' % text, "[1%s]" % ("0" * 4400), text.replace(":", ",")])


@FAST
@given(st.data())
def test_any_text_is_json_read_as_python_reads_it_or_one_named_problem(data):
    text = data.draw(JSON_VALUES.flatmap(_pieces_of_json) | st.text(max_size=40))
    try:
        value = parse_json(text)
    except JsonProblem as e:
        assert e.reason and "\n" not in e.reason and len(e.reason) < 400
        try:
            json.loads(text)
        except (ValueError, RecursionError):
            return  # Python refuses it too
        assert e.field is not None and f"{e.field!r} twice" in e.reason  # accepted by Python, one value lost
        return
    assert value == json.loads(text) or value != value  # the same value (NaN aside)


@FAST
@given(st.binary(max_size=40))
def test_bytes_that_are_not_utf8_are_named_by_their_offset(raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        with pytest.raises(JsonProblem, match=f"not UTF-8 text \\(byte {raw[e.start]:#04x} at offset {e.start} "):
            parse_json_bytes(raw)
        return
    try:
        assert parse_json_bytes(raw) == parse_json(text)
    except JsonProblem:
        pytest.raises(JsonProblem, parse_json, text)


@pytest.mark.parametrize("text, words", [('{"dim": 1, "dim": 2}', "names the field 'dim' twice"),
                                         ("[" * 100000 + "]" * 100000, "nested deeper"),
                                         ("[1%s]" % ("0" * 4400), "more than 4300 digits"),
                                         ("\xff", "not UTF-8 text (byte 0xff")])
def test_every_json_file_reader_names_the_problem(tmp_path, text, words):
    from llama_mp.checkpoints import hf
    from llama_mp.checkpoints.params import load_params
    from llama_mp.runtime.chat import load_dialogs
    from llama_mp.tools.perplexity import Scores

    path = tmp_path / "params.json"
    path.write_bytes(text.encode("latin-1") if text == "\xff" else text.encode())
    for read in (load_dialogs, lambda p: load_params(os.path.dirname(p)), hf._read_json, Scores.load):
        with pytest.raises(LlamaMPError) as e:
            read(str(path))
        assert words in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 600, str(e.value)
    if text != "\xff":
        with pytest.raises(LlamaMPError, match="--prompts reads as JSON but"):
            prompts_from_text(text)
