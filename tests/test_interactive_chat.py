"""The interactive chat (launch/chat.py, launch/chat_completion.py --interactive) as a person uses it:
lines on stdin, answers on stdout, prompt and notes on stderr, every rank ending cleanly.

Each launcher run costs a Python start and a model load, so the module starts all of them at once
(`jobs`) and each test then reads the one it needs."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from launching import ROOT, script, no_traceback
from llama_mp.errors import LlamaMPError
from llama_mp.runtime.chat import encode_dialog, fit_dialog
from llama_mp.runtime.tokenizer import Tokenizer
from multiproc import free_port
from workers import build

CPU = ["--backend", "gloo", "--device", "cpu"]
GREEDY = ["--temperature", "0", "--max_gen_len", "8"]
TIMEOUT_S = 1.0          # --timeout_s of the torchrun job: the person below thinks longer than that
THINKING_S = 2.5


def user(text):
    return {"role": "user", "content": text}


def start(cmd, output_path):
    """The command with its stdout in `output_path`.out and its stderr in `output_path`.err: files, which
    the test can read while the chat goes on, and which leave stdin alone (communicate() would close it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(f"{output_path}.out", "w") as out, open(f"{output_path}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True,
                                start_new_session=True)


class Job:
    def __init__(self, cmd, output_path, script_text=None):
        self.output_path, self.started = output_path, time.monotonic()
        self.proc = start(cmd, output_path)
        if script_text is not None:  # the whole script, then the end of input
            self.proc.stdin.write(script_text)
            self.proc.stdin.close()

    def read(self, stream):
        with open(f"{self.output_path}.{stream}", newline="") as f:  # a generated "\r" stays one
            return f.read()

    @property
    def stderr(self):
        return self.read("err")

    def wait_for_prompts(self, count, timeout=60):
        """Block until rank 0 has shown `count` `> ` prompts (it then waits for a line)."""
        deadline = time.monotonic() + timeout
        while self.stderr.count("> ") < count:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.stderr[-2000:]
            time.sleep(0.05)

    def finish(self, timeout=60):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"the chat did not end within {timeout} s (a hang):\n{self.stderr[-3000:]}")
        return self.proc.returncode, self.read("out"), self.stderr, time.monotonic() - self.started


@pytest.fixture(scope="module")
def llama2_ckpt(make_checkpoint):
    return make_checkpoint(shards=2)[0]


@pytest.fixture(scope="module")
def llama3_ckpt(make_checkpoint, llama3_tokenizer_path):
    return make_checkpoint(shards=2, vocab_size=Tokenizer(llama3_tokenizer_path).n_words, use_scaled_rope=True,
                           rope_theta=500000.0, n_heads=8, n_kv_heads=4)[0]


def tools_file(folder):
    path = folder / "tools.json"
    path.write_text(json.dumps([WEATHER_TOOL]))
    return str(path)


@pytest.fixture(scope="module")
def jobs(llama2_ckpt, llama3_ckpt, tokenizer_path, llama3_tokenizer_path, tmp_path_factory):
    """Every launcher run of this module, started together; each test finishes its own."""
    tmp = tmp_path_factory.mktemp("chat")
    plain = [sys.executable, script("chat")]
    llama2 = ["--ckpt_dir", llama2_ckpt, "--tokenizer_path", tokenizer_path]
    started = {
        "script": Job(plain + llama2 + GREEDY + CPU + ["--max_seq_len", "128"], tmp / "script",
                      "Hello there\n/system Be brief\nWhat is 2+2?\n/reset\n\nTell me more\n/exit\nnever read\n"),
        "overflow": Job([sys.executable, script("chat_completion"), "--interactive", "--system", "Be brief"]
                        + llama2 + GREEDY + CPU + ["--max_seq_len", "64"], tmp / "overflow",
                        "Hi\nHello again\nAnd once more\n" + "word " * 80 + "\nBye\n/exit\n"),
        "ctrl_c": Job(plain + llama2 + GREEDY + CPU, tmp / "ctrl_c"),
        "tools": Job(plain + ["--ckpt_dir", llama3_ckpt, "--tokenizer_path", llama3_tokenizer_path, "--tools",
                              tools_file(tmp), "--max_seq_len", "512"] + GREEDY + CPU, tmp / "tools",
                     "Weather in Oslo?\n/tool get_weather {}\n/exit\n"),
        "torchrun": Job([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         str(free_port()), script("chat"), "--ckpt_dir", llama3_ckpt, "--tokenizer_path",
                         llama3_tokenizer_path, "--max_seq_len", "512", "--timeout_s", str(TIMEOUT_S)]
                        + GREEDY + CPU, tmp / "torchrun"),
    }
    yield started
    for job in started.values():
        if job.proc.poll() is None:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()


def expected_answers(ckpt_dir, tokenizer_path, dialogs):
    llama = build(ckpt_dir, tokenizer_path, max_seq_len=512, max_batch_size=len(dialogs))
    results = llama.chat_completion(dialogs, temperature=0, max_gen_len=8)
    return [r["generation"]["content"] for r in results]


@pytest.mark.spawn
def test_a_piped_script_gets_its_answers_on_stdout_and_commands_shape_the_dialog(jobs, llama2_ckpt, tokenizer_path):
    code, out, err, elapsed = jobs["script"].finish()
    assert code == 0, err
    system = {"role": "system", "content": "Be brief"}
    # /system starts the dialog over with the system message; /reset forgets the dialog but keeps it.
    answers = expected_answers(llama2_ckpt, tokenizer_path,
                               [[user("Hello there")], [system, user("What is 2+2?")], [system, user("Tell me more")]])
    assert out == "".join(a + "\n" for a in answers)  # only the answers: prompt and notes are on stderr
    assert "system message set" in err and "the dialog is forgotten (the system message stays)" in err
    assert "never read" not in err  # /exit ended it
    assert no_traceback(err) and elapsed < 30


@pytest.mark.spawn
def test_two_ranks_keep_the_dialog_follow_every_turn_and_end_at_eof_after_a_long_pause(
        jobs, llama3_ckpt, llama3_tokenizer_path):
    job = jobs["torchrun"]
    job.proc.stdin.write("Hello there\n")
    job.proc.stdin.flush()

    def person():  # thinks longer than --timeout_s at the second prompt, then ends the input (Ctrl-D)
        job.wait_for_prompts(2)
        time.sleep(THINKING_S)
        job.proc.stdin.write("What is 2+2?\n")
        job.proc.stdin.close()

    feeder = threading.Thread(target=person, daemon=True)
    feeder.start()
    code, out, err, _ = job.finish()
    feeder.join(timeout=5)
    assert code == 0, err
    first = expected_answers(llama3_ckpt, llama3_tokenizer_path, [[user("Hello there")]])[0]
    dialog = [user("Hello there"), {"role": "assistant", "content": first}, user("What is 2+2?")]
    second = expected_answers(llama3_ckpt, llama3_tokenizer_path, [dialog])[0]
    assert out == f"{first}\n{second}\n"
    assert no_traceback(err) and "lost contact" not in err


@pytest.mark.spawn
def test_a_dialog_that_outgrows_max_seq_len_drops_its_oldest_exchanges_and_a_too_long_message_is_refused(jobs):
    code, out, err, _ = jobs["overflow"].finish()
    assert code == 0, err
    assert "dropped the oldest" in err and "the system message is kept" in err
    refused = err.index("that message was not sent")
    assert "raise --max_seq_len" in err[refused:]
    assert err.index("> Bye") > refused and out.endswith("\n") and out.strip()  # the chat went on
    assert no_traceback(err)


@pytest.mark.spawn
def test_ctrl_c_at_the_prompt_ends_quietly_with_130(jobs):
    job = jobs["ctrl_c"]
    job.wait_for_prompts(1)
    os.kill(job.proc.pid, signal.SIGINT)
    code, out, err, _ = job.finish()
    assert code == 130 and out == "" and no_traceback(err) and "Traceback" not in err, err


@pytest.mark.spawn
def test_tools_from_a_file_reach_the_prompt(jobs, llama3_ckpt, llama3_tokenizer_path):
    from llama_mp.cli.chat import load_tools

    code, out, err, _ = jobs["tools"].finish()
    assert code == 0, err
    llama = build(llama3_ckpt, llama3_tokenizer_path, max_seq_len=512, max_batch_size=1)
    tools = load_tools(tools_file(jobs["tools"].output_path.parent))
    want = llama.chat_completion([[user("Weather in Oslo?")]], temperature=0, max_gen_len=8, tools=tools)[0]
    assert "tool_calls" not in want["generation"]  # a random model writes no call: the answer is text
    assert out == want["generation"]["content"] + "\n" and "the model may call get_weather" in err
    assert "no tool call waits for a result" in err and no_traceback(err)


def test_trimming_keeps_the_system_message_and_the_newest_exchanges(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    system = {"role": "system", "content": "Be brief"}
    dialog = [system]
    for i in range(4):
        dialog += [user(f"question number {i}"), {"role": "assistant", "content": f"answer number {i}"}]
    dialog.append(user("last question"))
    newest = [system] + dialog[-3:]
    tokens, kept, dropped = fit_dialog(tokenizer, dialog, len(encode_dialog(tokenizer, newest)))
    assert kept == newest and dropped == 3 and tokens == encode_dialog(tokenizer, newest)
    assert fit_dialog(tokenizer, dialog, 10_000) == (encode_dialog(tokenizer, dialog), dialog, 0)
    alone = [system, user("last question")]
    with pytest.raises(LlamaMPError, match="needs .* prompt tokens with the system message"):
        fit_dialog(tokenizer, dialog, len(encode_dialog(tokenizer, alone)) - 1)


def test_trimming_drops_a_whole_exchange_with_its_tool_calls_and_results(llama3_tokenizer_path):
    from llama_mp.runtime.tools import Tool, ToolCall

    tokenizer, tools = Tokenizer(llama3_tokenizer_path), [Tool("brave_search")]
    called = {"role": "assistant", "content": "", "tool_calls": [ToolCall("brave_search", {"query": "oslo"})]}
    dialog = [user("Weather?"), called, {"role": "tool", "content": "cold"}, {"role": "assistant", "content": "Cold."},
              user("And now?"), called, {"role": "tool", "content": "warm"}]
    newest = dialog[4:]
    tokens, kept, dropped = fit_dialog(tokenizer, dialog, len(encode_dialog(tokenizer, newest, tools)), tools)
    assert (kept, dropped) == (newest, 1) and tokens == encode_dialog(tokenizer, newest, tools)


# ------------------------------------------------------------------------------------------------
# Tools: --tools FILE.json offers them, a call is shown and noted, /tool NAME JSON gives its result

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string", "description": "City"}}}}}


@pytest.fixture(scope="module")
def scripted_chat(make_checkpoint, llama3_tokenizer_path):
    """A one-rank Llama 3 whose answers are scripted: (conversation factory, the prompts it was asked)."""
    tok = Tokenizer(llama3_tokenizer_path)
    ckpt = make_checkpoint(shards=1, vocab_size=tok.n_words, use_scaled_rope=True, rope_theta=500000.0,
                           n_heads=8, n_kv_heads=4)[0]
    llama = build(ckpt, llama3_tokenizer_path, max_seq_len=2048, max_batch_size=1)
    asked, answers = [], []

    def generate(prompts, gen_len, on_token=None, **sampling):
        asked.append(prompts[0])
        ids = tok.encode(answers.pop(0), bos=False, eos=False)
        for t in ids:
            on_token([t])
        return [ids], None

    llama.generate = generate

    def conversation(tools, script, tool_format=None):
        from llama_mp.cli.chat import _Conversation

        asked.clear()
        answers[:] = script
        return _Conversation(llama, None, 256, 16, 0.0, 1.0, 0, tools, tool_format), asked
    return conversation, tok


def test_a_call_is_shown_and_its_result_given_with_slash_tool(scripted_chat, tmp_path, capsys):
    from llama_mp.cli.chat import load_tools
    from llama_mp.runtime.tools import ToolCall

    conversation, tok = scripted_chat
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER_TOOL]))
    tools = load_tools(str(path))
    chat, asked = conversation(tools, ['{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}',
                                       "It is -3 C in Oslo.", "Bergen too?", "Welcome."])
    chat.take("Weather in Oslo?")
    chat.take("/tool search {}")                      # not the call that waits: refused
    chat.take("/tool get_weather not json")           # not JSON: refused
    chat.take('/tool get_weather {"temp": "-3 C"}')   # the result: the model answers it
    chat.take("/tool get_weather {}")                 # no call waits any more
    out, err = capsys.readouterr()
    assert out.splitlines() == ['{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}',
                                "It is -3 C in Oslo."]
    assert 'the model calls get_weather with {"city": "Oslo"}: give its result with /tool get_weather JSON' in err
    assert "the next call waiting for its result is get_weather's" in err and "must be JSON" in err
    assert "no tool call waits for a result" in err
    call = ToolCall("get_weather", {"city": "Oslo"})
    dialog = [user("Weather in Oslo?")]
    assert asked == [encode_dialog(tok, dialog, tools),
                     encode_dialog(tok, dialog + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                                  {"role": "tool", "content": '{"temp": "-3 C"}'}], tools)]
    # a message while a call waits for its result: the call stays as the text the model wrote
    chat.take("Weather in Bergen?")
    chat.take("Thanks")
    assert "got no result" not in capsys.readouterr().err
    chat2, asked = conversation(tools, ['{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}',
                                        "Hello."])
    chat2.take("Weather in Oslo?")
    chat2.take("Never mind")
    assert "got no result" in capsys.readouterr().err
    written = '{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert asked[1] == encode_dialog(tok, [user("Weather in Oslo?"), {"role": "assistant", "content": written},
                                           user("Never mind")], tools)


def test_bad_tools_files_and_options_are_one_message_each(tmp_path):
    from llama_mp.cli.chat import check_interactive_options, load_tools

    for content, words in [("[", "is not valid JSON"), ("[]", "non-empty JSON list"),
                           ('[{"type": "retrieval"}]', "function tools only"),
                           (json.dumps([WEATHER_TOOL, WEATHER_TOOL]), "repeats the name")]:
        path = tmp_path / "tools.json"
        path.write_text(content)
        with pytest.raises(LlamaMPError, match=words):
            load_tools(str(path))
    with pytest.raises(LlamaMPError, match="does not exist"):
        load_tools(str(tmp_path / "missing.json"))
    with pytest.raises(LlamaMPError, match="add --interactive"):
        check_interactive_options(False, None, None, False, False, tools=True)


def test_parallel_calls_take_their_results_in_order_then_the_model_answers(scripted_chat, capsys):
    from llama_mp.runtime.tools import Tool, ToolCall

    conversation, tok = scripted_chat
    tools = [Tool("get_weather", "Weather now", WEATHER_TOOL["function"]["parameters"])]
    chat, asked = conversation(tools, ['[get_weather(city="Oslo"), get_weather(city="Rome")]', "Cold, then warm."],
                               "python_list")
    chat.take("Oslo and Rome?")
    chat.take('/tool get_weather "-3 C"')
    assert len(asked) == 1 and "still waiting for get_weather" in capsys.readouterr().err
    chat.take('/tool get_weather "25 C"')
    calls = [ToolCall("get_weather", {"city": "Oslo"}), ToolCall("get_weather", {"city": "Rome"})]
    assert asked[1] == encode_dialog(tok, [user("Oslo and Rome?"), {"role": "assistant", "content": "", "tool_calls": calls},
                                           {"role": "tool", "content": '"-3 C"'}, {"role": "tool", "content": '"25 C"'}],
                                     tools, "python_list")
    assert capsys.readouterr().out.splitlines()[-1] == "Cold, then warm."
