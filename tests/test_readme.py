"""The README and docs/ say only what works: every `llama-mp` command, launcher, `make` target and option
they name exists and answers `--help`; every docs/ link resolves; the README stays short; and its shell
blocks either run here (in this process, without weights or a GPU) or say why they cannot.

Shell blocks of README.md are marked by the HTML comment on the line before them:
`<!-- readme: run -->` (every line is a `llama-mp` command; they run in order in an empty folder and
must exit 0) or `<!-- readme: skip REASON -->` (REASON says what it needs that a test machine lacks).
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_BYTES = 12_800  # 12.5 KiB: the README is the five-minute read; the rest lives in docs/

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!--\s*readme:\s*(run|skip)\b\s*(.*?)\s*-->")
INLINE = re.compile(r"`([^`\n][^`]*)`")
COMMAND = re.compile(r"(?:\bllama-mp|-m llama_mp)\s+([a-z][a-z-]*)")
LAUNCHER = re.compile(r"\blaunch/([A-Za-z_]+\.py)")
MAKE = re.compile(r"(?<![\w-])make\s+([a-z][\w-]*)")
OPTION = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")


def _code(text: str) -> list:
    """The command lines in `text`: each line of every fenced block (continuations joined) and every
    inline code span, with comments after `#` dropped."""
    lines = []
    for _, body in FENCE.findall(text):
        lines += body.replace("\\\n", " ").splitlines()
    outside = FENCE.sub("", text)
    lines += [span.replace("\n", " ") for span in INLINE.findall(outside)]
    return [line.split(" #")[0] for line in lines if not line.lstrip().startswith("#")]


def _names(pattern: re.Pattern) -> dict:
    """name -> the pages that name it, over README.md and docs/*.md."""
    found: dict = {}
    for page in PAGES:
        for name in pattern.findall(page.read_text()):
            found.setdefault(name, set()).add(page.name)
    return found


def _launcher_function(name: str):
    """The function launch/NAME hands to the runner (its `run(fn)` line)."""
    path = ROOT / "launch" / name
    fn_name = re.search(r"\brun\((\w+)\)", path.read_text()).group(1)
    return runpy.run_path(str(path), run_name="llama_mp_docs")[fn_name]


def _commands():
    from llama_mp.cli.commands import COMMANDS
    return COMMANDS


def _run_llama_mp(monkeypatch, *argv) -> int:
    from llama_mp.cli import main

    monkeypatch.setattr(sys, "argv", ["llama-mp", *argv])
    with pytest.raises(SystemExit) as ended:
        main()
    return ended.value.code


def _invocations():
    """(page, line, function, options after the command) for every command line naming a command."""
    commands = _commands()
    for page in PAGES:
        for line in _code(page.read_text()):
            for match in COMMAND.finditer(line):
                rest = line[match.end():]
                yield page.name, line, commands.get(match.group(1)), OPTION.findall(rest.split(" | ")[0])
            for match in LAUNCHER.finditer(line):
                if (ROOT / "launch" / match.group(1)).is_file():
                    rest = line[match.end():]
                    yield page.name, line, _launcher_function(match.group(1)), OPTION.findall(rest.split(" | ")[0])


def test_every_llama_mp_command_named_exists_and_answers_help(monkeypatch, capfd):
    named = _names(COMMAND)
    assert {"serve", "plan", "verify"} <= set(named)  # the extraction itself works
    unknown = {name: pages for name, pages in named.items() if name not in _commands()}
    assert not unknown, f"commands named in the docs that `llama-mp` lacks: {unknown}"
    for name in named:
        capfd.readouterr()
        assert _run_llama_mp(monkeypatch, name, "--help") == 0, name
        shown = capfd.readouterr()
        assert f"llama-mp {name}" in shown.out + shown.err, name  # fire writes help to stderr off a terminal


def test_every_launcher_named_exists_and_answers_help(monkeypatch, capfd):
    named = _names(LAUNCHER)
    assert {"text_completion.py", "serve.py"} <= set(named)
    missing = {name: pages for name, pages in named.items() if not (ROOT / "launch" / name).is_file()}
    assert not missing, f"launchers named in the docs that launch/ lacks: {missing}"
    for name in named:
        monkeypatch.setattr(sys, "argv", [str(ROOT / "launch" / name), "--help"])
        capfd.readouterr()
        with pytest.raises(SystemExit) as ended:
            runpy.run_path(str(ROOT / "launch" / name), run_name="__main__")
        assert ended.value.code == 0, name
        shown = capfd.readouterr()
        assert f"{name} - " in shown.out + shown.err, name


def test_the_torchrun_wrapper_answers_help(monkeypatch, capfd):
    assert any("llama_mp.torchrun" in page.read_text() for page in PAGES)
    monkeypatch.setattr(sys, "argv", ["torchrun", "--help"])
    with pytest.raises(SystemExit) as ended:
        runpy.run_module("llama_mp.torchrun", run_name="__main__", alter_sys=True)
    assert ended.value.code == 0
    assert "--nproc-per-node" in capfd.readouterr().out


def test_every_option_in_a_command_line_is_one_its_command_takes():
    wrong, checked = [], 0
    for page, line, fn, options in _invocations():
        if fn is None:  # an unknown command: the test above names it
            continue
        params = inspect.signature(fn).parameters
        for option in options:
            checked += 1
            if option != "help" and option.replace("-", "_") not in params:
                wrong.append(f"{page}: --{option} in `{line.strip()}`")
    assert checked > 50  # the docs' command lines were found
    assert not wrong, "options the commands do not take:\n" + "\n".join(wrong)


def test_every_make_target_named_is_in_the_makefile():
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:", (ROOT / "Makefile").read_text(), re.M))
    named = {}
    for page in PAGES:
        for line in _code(page.read_text()):
            for target in MAKE.findall(line):
                named.setdefault(target, set()).add(page.name)
    assert {"demo", "test", "test-quick"} <= set(named)
    missing = {t: pages for t, pages in named.items() if t not in targets}
    assert not missing, f"make targets named in the docs that the Makefile lacks: {missing}"


def test_links_resolve_and_the_readme_links_every_docs_page():
    readme = README.read_text()
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", readme))
    assert linked, "the README links no docs/ page"
    for target in linked:
        assert (ROOT / target).is_file(), f"README links {target}, which does not exist"
    assert {f"docs/{page.name}" for page in DOCS} <= linked, "a docs/ page the README does not link"
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_the_readme_is_a_short_read():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md has {size} bytes; move detail into docs/ (limit {README_MAX_BYTES})"


def test_python_blocks_are_python():
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text()):
            if lang == "python":
                ast.parse(body, filename=page.name)


def _readme_shell_blocks():
    """(marker kind, reason, body) of every bash block of the README, None for an unmarked one."""
    text = README.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) not in ("bash", "sh", "shell"):
            continue
        before = text[:match.start()].rstrip().splitlines()[-1]
        marker = MARKER.search(before)
        blocks.append((marker.group(1), marker.group(2), match.group(2)) if marker else (None, "", match.group(2)))
    return blocks


def test_every_readme_shell_block_runs_or_says_why_not():
    blocks = _readme_shell_blocks()
    assert len(blocks) >= 3
    unmarked = [body.splitlines()[0] for kind, _, body in blocks if kind is None]
    assert not unmarked, f"README shell blocks without a `<!-- readme: run|skip REASON -->` line: {unmarked}"
    for kind, reason, body in blocks:
        if kind == "skip":
            assert len(reason.split()) >= 3, f"a skipped README block must say why: {body.splitlines()[0]}"
    assert any(kind == "run" for kind, _, _ in blocks), "no README shell block runs"


def test_the_readme_shell_blocks_marked_run_work_as_written(monkeypatch, tmp_path, capfd):
    monkeypatch.chdir(tmp_path)
    ran = 0
    for kind, _, body in _readme_shell_blocks():
        if kind != "run":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            argv = shlex.split(line)
            assert argv[0] == "llama-mp", f"a README block marked run holds `{line}`: only llama-mp commands run here"
            capfd.readouterr()
            code = _run_llama_mp(monkeypatch, *argv[1:])
            out, err = capfd.readouterr()
            assert code == 0, f"`{line}` exited {code}:\n{err[-2000:]}"
            if argv[1] == "verify":
                assert out.startswith("OK:"), out
            ran += 1
    assert ran >= 3
    assert [p.name for p in tmp_path.glob("*/params.json")]  # the block wrote a checkpoint
