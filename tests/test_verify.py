"""`llama-mp verify`: every problem in a checkpoint folder is reported, in one run."""

import json
import os
import shutil

import pytest

from llama_mp.cli.commands import verify as verify_command
from llama_mp.errors import LlamaMPError
from llama_mp.checkpoints.verify import verify_checkpoint


@pytest.fixture
def ckpt(make_checkpoint, tmp_path):
    """A private copy of a clean 2-shard GQA checkpoint, free to damage."""
    src, _, _ = make_checkpoint(shards=2, n_kv_heads=2)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return str(dst)


def problems_of(path):
    return verify_checkpoint(path, progress=False)


def test_a_clean_checkpoint_passes(ckpt, capsys):
    assert problems_of(ckpt) == []
    verify_command(ckpt, quiet=True)
    assert capsys.readouterr().out.startswith("OK")


def test_a_flipped_byte_fails_its_md5(ckpt):
    path = os.path.join(ckpt, "consolidated.01.pth")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)  # inside tensor data: the file still opens
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = problems_of(ckpt)
    assert len(problems) == 1 and "consolidated.01.pth has md5" in problems[0]


def test_a_missing_shard_is_named(ckpt):
    os.remove(os.path.join(ckpt, "consolidated.00.pth"))
    problems = problems_of(ckpt)
    assert any("consolidated.00.pth is listed in checklist.chk but does not exist" in p for p in problems)
    assert any("consolidated.00.pth is missing" in p for p in problems)


def test_a_truncated_shard_fails_both_checks(ckpt):
    path = os.path.join(ckpt, "consolidated.00.pth")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    problems = problems_of(ckpt)
    assert any("consolidated.00.pth has md5" in p for p in problems)
    assert any("Cannot read shard" in p and "consolidated.00.pth" in p for p in problems)


def test_params_that_do_not_match_the_tensors_list_every_mismatch(ckpt):
    params_path = os.path.join(ckpt, "params.json")
    with open(params_path) as f:
        params = json.load(f)
    params["n_layers"] = 3  # the shards hold 2 layers
    params["n_kv_heads"] = 4  # and 2 kv heads
    with open(params_path, "w") as f:
        json.dump(params, f)
    os.remove(os.path.join(ckpt, "checklist.chk"))  # isolate the structure check
    problems = problems_of(ckpt)
    for shard in ("consolidated.00.pth", "consolidated.01.pth"):
        assert any(p.startswith(f"{shard}: missing layers.2.") for p in problems), problems
        assert any(p.startswith(f"{shard}: layers.0.attention.wk.weight has shape [16, 64]") for p in problems)
        assert any(p.startswith(f"{shard}: layers.1.attention.wv.weight has shape") for p in problems)


def test_without_a_checklist_the_structure_is_still_checked(ckpt, capsys):
    os.remove(os.path.join(ckpt, "checklist.chk"))
    assert problems_of(ckpt) == []
    verify_command(ckpt, quiet=True)
    assert "no checklist.chk" in capsys.readouterr().err
    os.remove(os.path.join(ckpt, "consolidated.01.pth"))
    os.rename(os.path.join(ckpt, "consolidated.00.pth"), os.path.join(ckpt, "consolidated.01.pth"))
    assert any("consolidated.00.pth is missing" in p for p in problems_of(ckpt))


def test_invalid_params_and_unlisted_files_are_reported_together(ckpt):
    with open(os.path.join(ckpt, "params.json"), "w") as f:
        f.write('{"dim": 64, "n_heads": 4}')
    with open(os.path.join(ckpt, "checklist.chk")) as f:
        lines = [line for line in f if "consolidated.01.pth" not in line]
    with open(os.path.join(ckpt, "checklist.chk"), "w") as f:
        f.writelines(lines)
    problems = problems_of(ckpt)
    assert any("params.json has md5" in p for p in problems)
    assert any("missing field(s) ['n_layers']" in p for p in problems)
    assert any("consolidated.01.pth is not listed" in p for p in problems)


def test_the_command_prints_every_problem_and_exits_non_zero(ckpt, llama_mp_command):
    os.remove(os.path.join(ckpt, "consolidated.01.pth"))
    with open(os.path.join(ckpt, "consolidated.00.pth"), "ab") as f:
        f.write(b"junk")
    with pytest.raises(LlamaMPError, match="3 problem"):
        verify_command(ckpt, quiet=True)
    code, out, err = llama_mp_command("verify", ckpt)
    assert code == 2
    assert "consolidated.00.pth has md5" in out
    assert "consolidated.01.pth is listed in checklist.chk but does not exist" in out
    # The last shard leaves no gap in the names; the halved tensors in shard 0 give it away.
    assert "consolidated.01.pth is missing (1 of 2 shards present)" in out
    assert "failed verification" in err and "Traceback" not in err


def test_checklist_lines_naming_files_outside_the_folder_are_reported_and_not_read(ckpt, tmp_path, monkeypatch):
    from llama_mp.checkpoints import meta

    (tmp_path / "secret").write_text("not yours")
    os.mkdir(os.path.join(ckpt, "sub"))
    with open(os.path.join(ckpt, "sub", "x"), "w") as f:
        f.write("x")
    with open(os.path.join(ckpt, "checklist.chk"), "a") as f:
        for name in ("../secret", str(tmp_path / "secret"), "sub/x", "*../secret", ".."):
            f.write(f"{'0' * 32}  {name}\n")
    read = []
    real_md5 = meta.md5_file
    monkeypatch.setattr(meta, "md5_file", lambda path, *a, **k: read.append(path) or real_md5(path, *a, **k))
    problems = problems_of(ckpt)
    assert sorted(os.path.basename(p) for p in read) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    for name in ("../secret", str(tmp_path / "secret"), "sub/x", ".."):
        assert any(f"names {name!r}, which is not a file of this folder" in p and "it was not read" in p
                   for p in problems), problems
    assert len(problems) == 5
