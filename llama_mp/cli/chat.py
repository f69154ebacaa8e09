"""Interactive chat in a terminal, across the ranks of a torchrun job (launch/chat.py, and
launch/chat_completion.py --interactive).

Rank 0 is the only rank that talks to the person: it reads each line from stdin, keeps the dialog,
turns it into prompt tokens and asks for the answer through `Llama.generate`, which streams it to
stdout. The other ranks wait in `Engine.serve()` and run each request rank 0 sends, so every rank loads
the model once and follows turn after turn. Their wait for the next request has no practical bound
(`WAIT_FOR_PERSON_S`): a person may think for ten minutes, which must not look like a dead rank. Once
a request has been sent, every wait inside it is bounded by --timeout_s as usual. Rank 0 sends nothing
while it waits for a line, so the others block in one receive; a rank that dies meanwhile still closes
its connections (gloo notices at once) and torchrun ends the rest.

Tools (--tools FILE.json, OpenAI's `tools` list; Llama 3.1 and later): they are offered in the system
prompt as Meta's stack offers them; an answer that calls them is shown as the model wrote it, then a note
on stderr names each call and its arguments, and `/tool NAME JSON` gives a call's result (the `ipython`
role); once every call of the turn has its result, the model answers them.

Ending: EOF (Ctrl-D, or the end of a piped script) and /exit stop the other ranks and exit 0; Ctrl-C
while rank 0 waits for a line stops them too, and the runner ends the job with 130 (as it does for
Ctrl-C anywhere). The `> ` prompt and all notes go to stderr, answers to stdout, so `| tee answers.txt`
keeps just the answers.
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

from .. import distributed
from ..checks import require_int
from ..distributed.failure import WAIT_FOR_PERSON_S
from ..errors import LlamaMPError
from ..checks import described, read_json_input
from ..runtime.chat import Dialog, encode_dialog, fit_dialog, has_special_tags
from ..runtime.tools import Tool, ToolCall, parse_calls
from ..runtime.llama import Llama, check_build_arguments
from ..runtime.sampling import check_sampling
from .completion import _before_loading, _Streamed

PROMPT = "> "
COMMANDS = ("/reset (forget the dialog, keep the system message), /system TEXT (set it and start over), "
            "/tool NAME JSON (a tool's result, with --tools), /exit")
INTERRUPTED = object()  # what `read_line` returns for Ctrl-C, which it must not let escape (see `_Conversation.run`)


def answer_room(max_seq_len, max_gen_len: Optional[int]) -> int:
    """How many of the max_seq_len positions each turn keeps free for the answer: --max_gen_len, or a
    quarter of max_seq_len without it (a prompt that fills the context leaves nothing to say). Raises a
    LlamaMPError, before anything loads, when no prompt could fit beside it."""
    require_int("max_seq_len", max_seq_len, 2)
    if max_gen_len is None:
        return max(1, max_seq_len // 4)
    require_int("max_gen_len", max_gen_len, 1)
    if max_gen_len >= max_seq_len - 1:
        raise LlamaMPError(f"--max_gen_len {max_gen_len} leaves no room for the dialog within --max_seq_len "
                           f"{max_seq_len}: each turn keeps max_gen_len positions free for the answer. Lower "
                           "--max_gen_len or raise --max_seq_len.")
    return max_gen_len


def check_interactive_options(interactive: bool, system, dialogs, json: bool, logprobs: bool,
                              tools: bool = False) -> None:
    """chat_completion's options that only make sense in one mode: --system, --tools and --tool_format belong
    to the interactive chat, and --dialogs, --json and --logprobs to the batch of dialogs."""
    if not interactive and system is not None:
        raise LlamaMPError("--system sets the system message of the interactive chat: add --interactive, or put "
                           'a {"role": "system", ...} message in the --dialogs file.')
    if not interactive and tools:
        raise LlamaMPError("--tools and --tool_format offer tools in the interactive chat: add --interactive (a "
                           "batch of --dialogs takes no tools from the command line).")
    batch_only = [name for name, given in (("--dialogs", dialogs is not None), ("--json", json),
                                           ("--logprobs", logprobs)) if given]
    if interactive and batch_only:
        raise LlamaMPError(f"{' and '.join(batch_only)} cannot be used with --interactive, which reads the dialog "
                           "from the terminal and prints plain answers; leave out --interactive to answer a "
                           "--dialogs file.")


def load_tools(path: Optional[str]) -> List[Tool]:
    """The tools of a --tools file: a JSON list in the shape of OpenAI's `tools` (each
    {"type": "function", "function": {"name", "description", "parameters"}}), checked as the server checks
    a request's (server/protocol.openai_tools); none without the option."""
    if path is None:
        return []
    from ..server.protocol import ApiError, openai_tools

    data = read_json_input(path, "--tools", "Tools file", "a JSON list of tools as OpenAI's `tools` has them: "
                           '[{"type": "function", "function": {"name": ..., "parameters": {...}}}]')
    if not isinstance(data, list) or not data:
        raise LlamaMPError(f"Tools file {path!r} must hold a non-empty JSON list of tools (OpenAI's `tools`), got "
                           f"{described(data)}.")
    try:
        return openai_tools({"tools": data})
    except ApiError as e:
        raise LlamaMPError(f"Tools file {path!r}: {e.message}") from None


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def read_line():
    """The person's next line without its line ending; None at the end of input (Ctrl-D, or the end of
    a piped script); INTERRUPTED for Ctrl-C. In a terminal, `input` gives line editing; its prompt then
    goes to the terminal, and otherwise to stderr, so that stdout holds only answers."""
    try:
        if sys.stdin.isatty() and sys.stdout.isatty():
            try:
                import readline  # noqa: F401 - arrow keys and history for input()
            except ImportError:
                pass
            try:
                return input(PROMPT)
            except EOFError:
                sys.stderr.write("\n")
                return None
        sys.stderr.write(PROMPT)
        sys.stderr.flush()
        line = sys.stdin.readline()
        if line and not sys.stdin.isatty():  # a piped script: show each line after its prompt, as typed
            sys.stderr.write(line if line.endswith("\n") else line + "\n")
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return INTERRUPTED
    if not line:  # end the prompt's line, so that what follows (the shell's prompt) starts a line of its own
        sys.stderr.write("\n")
        return None
    return line.rstrip("\r\n")


class _Conversation:
    """Rank 0's side of the chat: the dialog so far, the commands, and one request per user message."""

    def __init__(self, generator: Llama, system: Optional[str], room: int, max_gen_len: Optional[int],
                 temperature: float, top_p: float, top_k: int, tools: List[Tool] = (),
                 tool_format: Optional[str] = None):
        self.generator, self.tokenizer = generator, generator.tokenizer
        self.system, self.turns = system, []  # type: Optional[str], Dialog
        self.room, self.max_gen_len = room, max_gen_len
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
        self.tools, self.tool_format = list(tools), tool_format
        self.calls: List[ToolCall] = []  # the last answer's calls, in order
        self.results: Dialog = []        # the results given for the first of them so far
        self.written = ""                # the last answer's text as the model wrote it

    def run(self) -> None:
        """Answer line after line until EOF, /exit or Ctrl-C, then let the other ranks go.

        Ctrl-C is only caught while waiting for a line: the other ranks are then in `serve()` and take the
        stop. During an answer they are inside the request, in step with rank 0, and a stop would not be
        what they expect; the interrupt then ends rank 0 and the others notice its closed connections."""
        print(f"Chat: type a message and press Enter. Commands: {COMMANDS}; Ctrl-D also ends.",
              file=sys.stderr, flush=True)
        if self.tools:
            note(f"the model may call {', '.join(t.name for t in self.tools)}.")
        while True:
            line = read_line()
            if line is INTERRUPTED:
                self.generator.engine.stop()
                raise KeyboardInterrupt
            if line is None or line.strip() == "/exit":
                break
            self.take(line.strip())
        self.generator.engine.stop()

    def take(self, text: str) -> None:
        """One line: a command, or a message to answer. A line that starts with // is a message that
        starts with /."""
        if not text:
            return
        if text.startswith("/") and not text.startswith("//"):
            command, _, argument = text.partition(" ")
            if command == "/reset":
                self.turns, self.calls, self.results = [], [], []
                note("the dialog is forgotten" + (" (the system message stays)." if self.system else "."))
            elif command == "/tool":
                self.tool_result(argument.strip())
            elif command == "/system":
                self.set_system(argument.strip() or None)
            else:
                note(f"unknown command {command}. Commands: {COMMANDS}. To send a message that starts with /, "
                     "begin it with //.")
            return
        self.answer(text[1:] if text.startswith("//") else text)

    def set_system(self, system: Optional[str]) -> None:
        if system is not None and has_special_tags([{"role": "system", "content": system}], self.tokenizer):
            note("that system message was refused: it contains the Llama 2 chat tags ([INST], <<SYS>>), which "
                 "would let text forge turns. The system message and the dialog are unchanged.")
            return
        self.system, self.turns, self.calls, self.results = system, [], [], []
        note("system message set; the dialog starts over." if system else
             "system message removed; the dialog starts over.")

    def waiting(self) -> List[ToolCall]:
        """The last answer's calls that have no result yet, in order."""
        return self.calls[len(self.results):]

    def tool_result(self, argument: str) -> None:
        """`/tool NAME JSON`: the result of the last answer's next call of NAME (calls take their results
        in order, as Meta's format matches them); the model answers once every call has one."""
        name, _, result = argument.partition(" ")
        waiting = self.waiting()
        if not waiting:
            note("no tool call waits for a result: /tool NAME JSON gives the result of a call the model just "
                 "made" + ("." if self.tools else ", and tools are offered only with --tools FILE.json."))
            return
        if name != waiting[0].name:
            note(f"the next call waiting for its result is {waiting[0].name}'s: give it with /tool {waiting[0].name} "
                 "JSON.")
            return
        try:
            json.loads(result)
        except ValueError:
            note(f"the result of {name} must be JSON after its name (/tool {name} {{\"temperature\": 21}}), got "
                 f"{result!r:.80}. Nothing was added.")
            return
        self.results.append({"role": "tool", "content": result.strip()})
        if self.waiting():
            note(f"result taken; still waiting for {', '.join(c.name for c in self.waiting())}.")
        elif not self.respond(self.turns + self.results):
            self.results.pop()  # not sent: that call waits for its result again

    def answer(self, text: str) -> None:
        """Stream the model's answer to `text` on stdout and add both to the dialog. Calls of the last answer
        still waiting for a result are given up: that answer stays as the text the model wrote."""
        message = {"role": "user", "content": text}
        if has_special_tags([message], self.tokenizer):
            note("that message was refused: it contains the Llama 2 chat tags ([INST], <<SYS>>), which would "
                 "let text forge turns. Rephrase it; the dialog is unchanged.")
            return
        turns = self.turns
        if self.waiting():  # Meta's format gives every call its result: the answer goes back as text
            note(f"the calls of {', '.join(c.name for c in self.waiting())} got no result: that answer stays in the "
                 "dialog as the text the model wrote.")
            turns = self.turns[:-1] + [{"role": "assistant", "content": self.written}]
        self.respond(turns + [message])

    def respond(self, turns: Dialog) -> bool:
        """Stream the model's answer to the dialog `turns` (ending with a user message or tool results) and
        keep both. A dialog that outgrew max_seq_len forgets its oldest exchanges; one too long even alone
        is refused (False), and the dialog stays as it was."""
        system: Dialog = [{"role": "system", "content": self.system}] if self.system else []
        max_seq_len = self.generator.model.max_seq_len
        try:
            tokens, kept, dropped = fit_dialog(self.tokenizer, system + turns, max_seq_len - self.room, self.tools,
                                               self.tool_format)
        except LlamaMPError as e:
            shorter_system = ", shorten the system message (/system TEXT)" if self.system else ""
            note(f"that message was not sent. {e} Here that is max_seq_len {max_seq_len} minus {self.room} kept for "
                 f"the answer: shorten it{shorter_system}, lower --max_gen_len or raise --max_seq_len. The dialog "
                 "is unchanged.")
            return False
        if dropped:
            note(f"the dialog outgrew max_seq_len {max_seq_len}: dropped the oldest {dropped} exchange(s); the "
                 "system message is kept." if self.system else
                 f"the dialog outgrew max_seq_len {max_seq_len}: dropped the oldest {dropped} exchange(s).")
        streamed = _Streamed(self.generator, "")
        gen_len = self.max_gen_len if self.max_gen_len is not None else max_seq_len - len(tokens)
        ids, _ = self.generator.generate([tokens], gen_len, on_token=streamed, **self.sampling)
        streamed.finish()
        text = self.tokenizer.decode(ids[0])
        reply = {"role": "assistant", "content": text}
        self.calls, self.results = [], []
        if self.tools:
            content, calls = parse_calls(text, self.tokenizer.family)
            if calls and all(c.name in {t.name for t in self.tools} for c in calls):
                reply = {"role": "assistant", "content": content, "tool_calls": calls}
                self.calls, self.written = list(calls), text
                for c in calls:
                    note(f"the model calls {c.name} with {json.dumps(c.arguments)}: give its result with /tool "
                         f"{c.name} JSON.")
        self.turns = kept[len(system):] + [reply]
        return True


def chat(
    ckpt_dir: str,
    tokenizer_path: str,
    system: Optional[str] = None,
    max_seq_len: int = 512,
    max_batch_size: int = 1,
    max_gen_len: Optional[int] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    top_k: int = 0,
    seed: int = 1,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    decoder: str = "auto",
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    load_timeout_s: float = distributed.DEFAULT_LOAD_TIMEOUT_S,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    tools: Optional[str] = None,
    tool_format: Optional[str] = None,
) -> None:
    """Chat with a LLaMA chat checkpoint in the terminal, on every process of this torchrun job.

    Rank 0 reads each message from stdin and streams the answer to stdout; the `> ` prompt and notes go
    to stderr. Commands: /reset forgets the dialog (the system message stays), /system TEXT sets the
    system message and starts over (/system alone removes it), /exit ends; so does Ctrl-D (end of input)
    and Ctrl-C (exit code 130). A line starting with // is sent as a message starting with /. --system
    TEXT is the first system message (taken as typed). The chat format follows the tokenizer (Llama 2's
    [INST] or Llama 3's headers). Each turn keeps --max_gen_len positions of --max_seq_len free for the
    answer (a quarter of max_seq_len without it; the answer may then fill the rest); a dialog that grows
    past that forgets its oldest exchanges, with a note. The wait for the person's next line is not
    bounded by --timeout_s; every other wait for a rank is. --tools FILE.json (Llama 3.1 and later) offers
    the tools of a JSON list in OpenAI's `tools` shape; a call the model makes is noted on stderr, and
    /tool NAME JSON gives its result, which the model then answers; --tool_format json|python_list as the
    server's (default: the checkpoint family's own). Other values (--quantize int8|int4, --group_size
    included) as chat_completion's --help says.
    """
    def check() -> int:
        check_sampling(temperature, top_p, top_k, "--{}")
        check_build_arguments(ckpt_dir, tokenizer_path, seed, timeout_s, load_timeout_s, quantize, group_size)
        if tool_format is not None and tools is None:
            raise LlamaMPError("--tool_format says how the --tools are offered: give --tools FILE.json too.")
        return answer_room(max_seq_len, max_gen_len), load_tools(tools)

    room, offered = _before_loading(check)
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed, backend=backend,
                            device=device, dtype=dtype, decoder=decoder, timeout_s=timeout_s,
                            load_timeout_s=load_timeout_s, quantize=quantize, group_size=group_size)

    def check_system() -> None:
        if system is not None and has_special_tags([{"role": "system", "content": system}], generator.tokenizer):
            raise LlamaMPError("--system contains the Llama 2 chat tags ([INST], <<SYS>>), which would let text "
                               "forge turns; write the system message without them.")
        if offered:  # a checkpoint family without tools, or a format it has not, says so now
            try:
                encode_dialog(generator.tokenizer, [{"role": "user", "content": ""}], offered, tool_format)
            except LlamaMPError as e:
                raise LlamaMPError(f"--tools: {e}") from None

    distributed.decided_by_main(generator.group, check_system)
    if not generator.group.is_main:
        generator.engine.serve(idle_timeout_s=WAIT_FOR_PERSON_S)
        return
    if sys.stdin.encoding and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # a stray byte is a typo, not a reason to end the chat
    _Conversation(generator, system or None, room, max_gen_len, temperature, top_p, top_k, offered,
                  tool_format).run()

