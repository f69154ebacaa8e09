"""Faults and hostile inputs on the checkpoint side end in one message, never in a traceback, a silently
wrong result or lost data: tensors that are not weights, folders that cannot be written, a full disk,
SIGTERM half way through writing, and two writers aimed at one destination."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from llama_mp.checkpoints import meta as checkpoint, reshard as reshard_mod, staging
from llama_mp.checkpoints.convert import convert
from llama_mp.checkpoints.hf import write_hf
from llama_mp.checkpoints.params import load_params
from llama_mp.checkpoints.reshard import reshard
from llama_mp.checkpoints.verify import verify_checkpoint
from llama_mp.errors import LlamaMPError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ckpt(make_checkpoint, tmp_path):
    """A private copy of a clean 2-shard checkpoint, free to damage."""
    src, _, _ = make_checkpoint(shards=2)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return str(dst)


def leftovers(folder):
    """Hidden staging folders and lock files a writer left in `folder`."""
    return [n for n in os.listdir(folder) if ".partial-" in n or n.endswith(".lock") or ".old-" in n]


# ----------------------------------------------------------------------------------------------
# Tensors that are not weights


def replace_tensors(path, **changes):
    shard = torch.load(path, map_location="cpu", weights_only=True)
    for key, dtype in changes.items():
        key = key.replace("__", ".")
        shard[key] = shard[key].to(dtype) if dtype is not torch.complex64 else torch.complex(shard[key], shard[key])
    torch.save(shard, path)


def test_a_shard_with_integer_bool_or_complex_tensors_is_refused_by_loader_reshard_and_verify(ckpt, tmp_path):
    shard1 = os.path.join(ckpt, "consolidated.01.pth")
    replace_tensors(shard1, layers__0__attention__wq__weight=torch.int8, norm__weight=torch.bool,
                    layers__1__feed_forward__w2__weight=torch.complex64)
    os.remove(os.path.join(ckpt, "checklist.chk"))  # isolate the structure check
    with pytest.raises(LlamaMPError, match=r"consolidated\.01\.pth holds tensors that are not weights: "
                                           r"layers\.0\.attention\.wq\.weight is int8") as info:
        checkpoint.load_rank_state_dict(ckpt, load_params(ckpt), rank=1, world_size=2)
    assert "norm.weight is bool" in str(info.value) and "complex64" in str(info.value)
    assert "\n" not in str(info.value) and "float32, bfloat16, float16" in str(info.value)
    with pytest.raises(LlamaMPError, match=r"consolidated\.01\.pth holds tensors that are not weights"):
        reshard(ckpt, str(tmp_path / "out"), 1, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    problems = verify_checkpoint(ckpt, progress=False)
    for key, dtype in [("layers.0.attention.wq.weight", "int8"), ("norm.weight", "bool"),
                       ("layers.1.feed_forward.w2.weight", "complex64")]:
        assert f"consolidated.01.pth: {key} is {dtype}, not a floating-point weight" in problems, problems
    assert not any("but consolidated.00.pth has" in p for p in problems)  # reported once, not twice


@pytest.fixture
def hf_dir(make_checkpoint, tmp_path):
    _, args, state = make_checkpoint(shards=1)
    root = tmp_path / "hf"
    root.mkdir()
    write_hf(str(root), args, list(state), lambda k: state[k])
    return root


def test_convert_refuses_quantised_hugging_face_tensors_before_writing(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = hf_dir / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].to(torch.int8)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(LlamaMPError, match=r"holds tensors that are not weights: model\.safetensors: "
                                           r"model\.layers\.0\.self_attn\.q_proj\.weight is I8") as info:
        convert(str(hf_dir), str(tmp_path / "out"), mp=1, progress=False)
    assert "quantised" in str(info.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    weights.unlink()  # the same through a pytorch_model.bin, whose dtypes are torch's
    torch.save(tensors, str(hf_dir / "pytorch_model.bin"))
    with pytest.raises(LlamaMPError, match=r"pytorch_model\.bin: model\.layers\.0\.self_attn\.q_proj\.weight is int8"):
        convert(str(hf_dir), str(tmp_path / "out"), mp=1, progress=False)


# ----------------------------------------------------------------------------------------------
# Folders that cannot be written, and a full disk


def refuse_writes_under(monkeypatch, folder):
    """Make creating anything in `folder` fail as a folder without write permission does (running as root,
    chmod does not stop us, so the refusal is simulated at the system calls)."""
    folder = str(folder)
    real_open, real_makedirs = os.open, os.makedirs

    def guarded_open(path, flags, *a, **k):
        if str(path).startswith(folder + os.sep) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    def guarded_makedirs(path, *a, **k):
        if str(path).startswith(folder + os.sep) and not os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", folder)
        return real_makedirs(path, *a, **k)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "makedirs", guarded_makedirs)


def test_a_destination_in_a_folder_that_cannot_be_written_is_one_message(make_checkpoint, tmp_path, monkeypatch,
                                                                       llama_mp_command):
    src, _, _ = make_checkpoint(shards=2)
    locked = tmp_path / "locked"
    locked.mkdir()
    refuse_writes_under(monkeypatch, locked)
    for dst in (locked / "out", locked / "new" / "out"):  # its parent exists / must be made
        code, out, err = llama_mp_command("reshard", src, dst, "--mp", "1")
        assert code == 2 and "Traceback" not in err, err
        assert f"the folder {locked} is not writable (Permission denied)" in err
        assert err.count("llama_mp: error:") == 1 and os.listdir(locked) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_read_only_folder_for_real(make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=2)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(LlamaMPError, match="is not writable"):
            reshard(src, str(locked / "out"), 1, progress=False)
    finally:
        locked.chmod(0o755)


def test_a_full_disk_is_one_message_and_leaves_nothing(make_checkpoint, tmp_path, monkeypatch, llama_mp_command):
    src, _, _ = make_checkpoint(shards=2)
    real_save = torch.save

    def save_until_full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if f.name.endswith("consolidated.01.pth"):  # the disk fills while the second shard is written
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reshard_mod.torch, "save", save_until_full)
    source_bytes = sum(os.path.getsize(p) for p in checkpoint.shard_paths(src))
    code, out, err = llama_mp_command("reshard", src, tmp_path / "out", "--mp", "2")
    assert code == 2 and "Traceback" not in err and err.count("llama_mp: error:") == 1
    assert f"No space left on device while writing {tmp_path / 'out'}" in err
    assert f"needs about {staging._size(source_bytes)}" in err and "were written before" in err
    assert os.listdir(tmp_path) == []


def test_a_full_disk_while_writing_hugging_face_files(make_checkpoint, tmp_path, monkeypatch):
    import safetensors.torch

    src, _, _ = make_checkpoint(shards=2)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(LlamaMPError, match="No space left on device while writing"):
        convert(src, str(tmp_path / "hf"), to="hf", progress=False)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Two writers, and a destination that appears while writing


def test_a_second_writer_to_the_same_destination_fails_and_the_first_output_is_intact(make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=2)
    dst = tmp_path / "out"
    with staging.staged_output_dir(str(dst)) as out:
        open(os.path.join(out, "first.txt"), "w").close()
        with pytest.raises(LlamaMPError, match=rf"Another llama_mp command \(PID {os.getpid()}\) is writing "
                                               rf"{dst} right now") as info:
            reshard(src, str(dst), 1, progress=False)
        assert "\n" not in str(info.value)
    assert os.listdir(dst) == ["first.txt"] and leftovers(tmp_path) == []


@pytest.mark.spawn
def test_a_lock_left_by_a_dead_writer_is_taken_over(make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=2)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / ".out.lock").write_text(f"{gone.pid}\n")
    reshard(src, str(tmp_path / "out"), 1, progress=False)
    assert verify_checkpoint(str(tmp_path / "out"), progress=False) == [] and leftovers(tmp_path) == []


def test_a_destination_created_while_writing_is_never_replaced_without_overwrite(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(LlamaMPError, match="already exists and is not empty.*--overwrite"):
        with staging.staged_output_dir(str(dst)) as out:
            open(os.path.join(out, "new.txt"), "w").close()
            dst.mkdir()  # another program writes there meanwhile
            (dst / "theirs.txt").write_text("theirs")
    assert os.listdir(dst) == ["theirs.txt"] and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# SIGTERM in the middle of writing, and a writer in another process


def start_synth(out_dir, tokenizer_path):
    """`python -m llama_mp synth` of a model big enough (about 60 MB) to take a second or more to write."""
    return subprocess.Popen([sys.executable, "-m", "llama_mp", "synth", str(out_dir), "--dim", "512",
                             "--n_layers", "8", "--n_heads", "8", "--tokenizer", tokenizer_path],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.spawn
def test_sigterm_while_writing_leaves_no_staging_folder(tmp_path, tokenizer_path):
    writer = start_synth(tmp_path / "out", tokenizer_path)
    try:
        wait_for(lambda: any(".partial-" in n for n in os.listdir(tmp_path)) or writer.poll() is not None)
        assert writer.poll() is None, writer.communicate()
        writer.send_signal(signal.SIGTERM)
        _, err = writer.communicate(timeout=60)
    finally:
        writer.kill()
    assert writer.returncode > 0, err  # cleaned up and exited, not killed outright (-15)
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.spawn
def test_a_writer_in_another_process_holds_the_destination(tmp_path, tokenizer_path, llama_mp_command):
    dst = tmp_path / "out"
    writer = start_synth(dst, tokenizer_path)
    try:
        wait_for(lambda: (tmp_path / ".out.lock").exists() or writer.poll() is not None)
        code, _, err = llama_mp_command("synth", dst, "--tokenizer", tokenizer_path)
        _, first_err = writer.communicate(timeout=120)
    finally:
        writer.kill()
    assert code == 2 and f"(PID {writer.pid}) is writing {dst} right now" in err and "Traceback" not in err
    assert writer.returncode == 0, first_err
    assert verify_checkpoint(str(dst), progress=False) == [] and leftovers(tmp_path) == []
