"""Class 5 of round 3: outputs are checked before the work that fills them, and what a writer killed
outright (SIGKILL) leaves behind is removed or named by the next run.

* `perplexity --per_token FILE` to a missing folder, a folder, a file's "folder" or a folder that cannot
  be written fails at once, before the model loads; the file is written whole or not at all.
* checkpoint writers (synth, reshard, convert, quantize) refuse an output the disk cannot hold before
  writing; a dead writer's `.NAME.partial-PID@HOST-*` staging folder, stale lock and half-done replace are
  sorted out by the next writer of that destination, which says what it did.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llama_mp.checkpoints import staging
from llama_mp.checkpoints.reshard import reshard
from llama_mp.checkpoints.verify import verify_checkpoint
from llama_mp.errors import LlamaMPError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOME = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if ".partial-" in n or ".lock" in n or ".old-" in n)


def dead_pid() -> int:
    """A PID no process of this host has (found without starting one)."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) - 1
    while pid > 1:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1
    raise AssertionError("no free PID")


@pytest.fixture(scope="module")
def scored(make_checkpoint, tmp_path_factory):
    ckpt = make_checkpoint(shards=1)[0]
    text = tmp_path_factory.mktemp("text") / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    return ckpt, str(text)


BAD_DESTINATIONS = {
    "missing folder": ("{tmp}/no/such/folder/out.json", "does not exist"),
    "a folder": ("{tmp}", "is a folder"),
    "a file as folder": ("{tmp}/file.txt/out.json", "is a file, not a folder"),
    "read-only system folder": ("/sys/out.json", "is not writable"),
}


@SOME
@given(kind=st.sampled_from(sorted(BAD_DESTINATIONS)))
def test_an_unwritable_per_token_file_fails_at_once_before_loading(llama_mp_command, scored, tokenizer_path,
                                                                    tmp_path, kind):
    ckpt, text = scored
    (tmp_path / "file.txt").write_text("x")
    path, words = BAD_DESTINATIONS[kind]
    start = time.monotonic()
    code, out, err = llama_mp_command("perplexity", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
                                      "--text", text, "--per_token", path.format(tmp=tmp_path))
    assert time.monotonic() - start < 5
    assert code == 2 and out == "" and "Traceback" not in err and "Loaded" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--per_token" in lines[0] and words in lines[0] and "nothing was run" in lines[0]


def test_per_token_is_written_whole_and_a_dead_writers_half_file_is_removed(llama_mp_command, scored,
                                                                            tokenizer_path, tmp_path):
    ckpt, text = scored
    out = tmp_path / "scores.json"
    half = tmp_path / f".scores.json.partial-{dead_pid()}@{staging._host()}-abcd1234"
    half.write_text('{"logprobs": [-1.0, ')  # what a SIGKILL in the middle of json.dump leaves
    code, _, err = llama_mp_command("perplexity", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
                                    "--text", text, "--per_token", out, "--max_seq_len", 32)
    assert code == 0, err
    assert f"removed {half}" in err and leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["scores.json"]
    code, printed, err = llama_mp_command("perplexity", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
                                          "--text", text, "--compare", out, "--max_seq_len", 32)
    assert code == 0 and "greedy agreement 100.00%" in printed, err


def test_an_output_the_disk_cannot_hold_is_refused_before_writing(make_checkpoint, tmp_path, monkeypatch):
    src = make_checkpoint(shards=2, dim=256)[0]  # over the 1 MiB slack whatever the test tokenizer's vocabulary
    real = staging.shutil.disk_usage
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(LlamaMPError, match=r"needs about .* but only 1000 bytes are free .* nothing was written"):
        reshard(src, str(tmp_path / "out"), 1, progress=False)
    assert os.listdir(tmp_path) == []


def test_what_dead_writers_left_is_removed_and_what_cannot_be_told_is_named(make_checkpoint, tmp_path, capsys):
    src = make_checkpoint(shards=2)[0]
    pid, host = dead_pid(), staging._host()
    ours = tmp_path / f".out.partial-{pid}@{host}-aaaa1111"
    ours.mkdir()
    (ours / "consolidated.00.pth").write_bytes(b"half")
    elsewhere = tmp_path / f".out.partial-{pid}@some_other_host-bbbb2222"
    elsewhere.mkdir()
    (tmp_path / ".out.lock").write_text(f"{pid}\n")
    (tmp_path / f".out.lock.stale-{pid}-1").write_text(f"{pid}\n")
    other = tmp_path / ".other.partial-1@x-cccc"  # another destination's: not this writer's business
    other.mkdir()
    reshard(src, str(tmp_path / "out"), 1, progress=False)
    err = capsys.readouterr().err
    assert verify_checkpoint(str(tmp_path / "out"), progress=False) == []
    assert f"removed {ours}" in err and f"{elsewhere} is the unfinished output of another writer" in err
    assert leftovers(tmp_path) == sorted([elsewhere.name, other.name])


def test_a_replace_killed_half_way_gets_the_previous_folder_back(make_checkpoint, tmp_path, capsys):
    """Killed between moving the old folder aside and moving the new one in: the next run puts it back,
    so without --overwrite it is never lost, and with --overwrite it is replaced as asked."""
    src = make_checkpoint(shards=2)[0]
    aside = tmp_path / ".out.old-dddd4444" / "replaced"
    aside.mkdir(parents=True)
    (aside / "mine.txt").write_text("previous")
    with pytest.raises(LlamaMPError, match="already exists and is not empty"):
        reshard(src, str(tmp_path / "out"), 1, progress=False)
    assert "put the previous" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["mine.txt"] and leftovers(tmp_path) == []
    reshard(src, str(tmp_path / "out"), 1, overwrite=True, progress=False)
    assert verify_checkpoint(str(tmp_path / "out"), progress=False) == [] and leftovers(tmp_path) == []


@pytest.mark.spawn
def test_a_writer_killed_with_sigkill_leaves_nothing_the_next_run_does_not_clear(tmp_path, tokenizer_path,
                                                                                 llama_mp_command):
    dst = tmp_path / "out"
    writer = subprocess.Popen([sys.executable, "-m", "llama_mp", "synth", str(dst), "--dim", "512", "--n_layers",
                               "8", "--n_heads", "8", "--tokenizer", tokenizer_path], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(".partial-" in n for n in os.listdir(tmp_path)) and writer.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert writer.poll() is None
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
    assert any(".partial-" in n for n in leftovers(tmp_path)) and not dst.exists()
    code, _, err = llama_mp_command("synth", dst, "--dim", 64, "--n_layers", 1, "--n_heads", 4,
                                    "--tokenizer", tokenizer_path)
    assert code == 0 and "removed " in err and "Traceback" not in err, err
    assert leftovers(tmp_path) == [] and verify_checkpoint(str(dst), progress=False) == []
