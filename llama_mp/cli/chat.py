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

Ending: EOF (Ctrl-D, or the end of a piped script) and /exit stop the other ranks and exit 0; Ctrl-C
while rank 0 waits for a line stops them too, and the runner ends the job with 130 (as it does for
Ctrl-C anywhere). The `> ` prompt and all notes go to stderr, answers to stdout, so `| tee answers.txt`
keeps just the answers.
"""

from __future__ import annotations

import sys
from typing import Optional

from .. import distributed
from ..checks import require_int
from ..distributed.failure import WAIT_FOR_PERSON_S
from ..errors import LlamaMPError
from ..runtime.chat import Dialog, fit_dialog, has_special_tags
from ..runtime.llama import Llama, check_build_arguments
from ..runtime.sampling import check_sampling
from .completion import _before_loading, _Streamed

PROMPT = "> "
COMMANDS = "/reset (forget the dialog, keep the system message), /system TEXT (set it and start over), /exit"
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


def check_interactive_options(interactive: bool, system, dialogs, json: bool, logprobs: bool) -> None:
    """chat_completion's options that only make sense in one mode: --system belongs to the interactive
    chat, and --dialogs, --json and --logprobs to the batch of dialogs."""
    if not interactive and system is not None:
        raise LlamaMPError("--system sets the system message of the interactive chat: add --interactive, or put "
                           'a {"role": "system", ...} message in the --dialogs file.')
    batch_only = [name for name, given in (("--dialogs", dialogs is not None), ("--json", json),
                                           ("--logprobs", logprobs)) if given]
    if interactive and batch_only:
        raise LlamaMPError(f"{' and '.join(batch_only)} cannot be used with --interactive, which reads the dialog "
                           "from the terminal and prints plain answers; leave out --interactive to answer a "
                           "--dialogs file.")


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
                 temperature: float, top_p: float, top_k: int):
        self.generator, self.tokenizer = generator, generator.tokenizer
        self.system, self.turns = system, []  # type: Optional[str], Dialog
        self.room, self.max_gen_len = room, max_gen_len
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)

    def run(self) -> None:
        """Answer line after line until EOF, /exit or Ctrl-C, then let the other ranks go.

        Ctrl-C is only caught while waiting for a line: the other ranks are then in `serve()` and take the
        stop. During an answer they are inside the request, in step with rank 0, and a stop would not be
        what they expect; the interrupt then ends rank 0 and the others notice its closed connections."""
        print(f"Chat: type a message and press Enter. Commands: {COMMANDS}; Ctrl-D also ends.",
              file=sys.stderr, flush=True)
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
                self.turns = []
                note("the dialog is forgotten" + (" (the system message stays)." if self.system else "."))
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
        self.system, self.turns = system, []
        note("system message set; the dialog starts over." if system else
             "system message removed; the dialog starts over.")

    def answer(self, text: str) -> None:
        """Stream the model's answer to `text` on stdout and add both to the dialog. A dialog that outgrew
        max_seq_len forgets its oldest exchanges; a message too long even alone is refused, and the
        dialog stays as it was."""
        message = {"role": "user", "content": text}
        if has_special_tags([message], self.tokenizer):
            note("that message was refused: it contains the Llama 2 chat tags ([INST], <<SYS>>), which would "
                 "let text forge turns. Rephrase it; the dialog is unchanged.")
            return
        system: Dialog = [{"role": "system", "content": self.system}] if self.system else []
        max_seq_len = self.generator.model.max_seq_len
        try:
            tokens, kept, dropped = fit_dialog(self.tokenizer, system + self.turns + [message],
                                               max_seq_len - self.room)
        except LlamaMPError as e:
            shorter_system = ", shorten the system message (/system TEXT)" if self.system else ""
            note(f"that message was not sent. {e} Here that is max_seq_len {max_seq_len} minus {self.room} kept for "
                 f"the answer: shorten it{shorter_system}, lower --max_gen_len or raise --max_seq_len. The dialog "
                 "is unchanged.")
            return
        if dropped:
            note(f"the dialog outgrew max_seq_len {max_seq_len}: dropped the oldest {dropped} exchange(s); the "
                 "system message is kept." if self.system else
                 f"the dialog outgrew max_seq_len {max_seq_len}: dropped the oldest {dropped} exchange(s).")
        streamed = _Streamed(self.generator, "")
        gen_len = self.max_gen_len if self.max_gen_len is not None else max_seq_len - len(tokens)
        ids, _ = self.generator.generate([tokens], gen_len, on_token=streamed, **self.sampling)
        streamed.finish()
        self.turns = kept[len(system):] + [{"role": "assistant", "content": self.tokenizer.decode(ids[0])}]


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
    bounded by --timeout_s; every other wait for a rank is. Other values (--quantize int8|int4, --group_size
    included) as chat_completion's --help says.
    """
    def check() -> int:
        check_sampling(temperature, top_p, top_k, "--{}")
        check_build_arguments(ckpt_dir, tokenizer_path, seed, timeout_s, load_timeout_s, quantize, group_size)
        return answer_room(max_seq_len, max_gen_len)

    room = _before_loading(check)
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, seed=seed, backend=backend,
                            device=device, dtype=dtype, decoder=decoder, timeout_s=timeout_s,
                            load_timeout_s=load_timeout_s, quantize=quantize, group_size=group_size)

    def check_system() -> None:
        if system is not None and has_special_tags([{"role": "system", "content": system}], generator.tokenizer):
            raise LlamaMPError("--system contains the Llama 2 chat tags ([INST], <<SYS>>), which would let text "
                               "forge turns; write the system message without them.")

    distributed.decided_by_main(generator.group, check_system)
    if not generator.group.is_main:
        generator.engine.serve(idle_timeout_s=WAIT_FOR_PERSON_S)
        return
    if sys.stdin.encoding and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # a stray byte is a typo, not a reason to end the chat
    _Conversation(generator, system or None, room, max_gen_len, temperature, top_p, top_k).run()

