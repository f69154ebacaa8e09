"""`llama-mp reshard`: a new folder with M shards, the same tensors, written all-or-nothing."""

import os

import pytest
import torch

from llama_mp.checkpoints import layout, meta as checkpoint, reshard as reshard_mod
from llama_mp.errors import LlamaMPError
from llama_mp.checkpoints.reshard import reshard
from llama_mp.checkpoints.verify import verify_checkpoint


def shard_tensors(ckpt_dir):
    return [torch.load(p, map_location="cpu", weights_only=True) for p in checkpoint.shard_paths(ckpt_dir)]


def test_reshard_writes_m_shards_that_split_the_same_model(make_checkpoint, tmp_path):
    src, args, full = make_checkpoint(shards=2)
    dst = str(tmp_path / "mp4")
    reshard(src, dst, 4, progress=False)
    assert sorted(os.listdir(dst)) == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth",
                                       "consolidated.02.pth", "consolidated.03.pth", "params.json"]
    with open(os.path.join(src, "params.json")) as a, open(os.path.join(dst, "params.json")) as b:
        assert a.read() == b.read()
    for index, shard in enumerate(shard_tensors(dst)):
        assert list(shard) == list(full)  # Meta's key order kept
        for key, whole in full.items():
            assert torch.equal(shard[key], layout.split(key, whole, None, 4, index))
    assert verify_checkpoint(dst, progress=False) == []  # fresh checklist.chk matches


@pytest.mark.parametrize("k,m", [(2, 4), (4, 1), (1, 2)])
def test_round_trip_k_to_m_to_k_is_bit_identical(make_checkpoint, tmp_path, k, m):
    src, _, _ = make_checkpoint(shards=k)
    reshard(src, str(tmp_path / "m"), m, progress=False)
    reshard(str(tmp_path / "m"), str(tmp_path / "back"), k, progress=False)
    before, after = shard_tensors(src), shard_tensors(str(tmp_path / "back"))
    assert len(before) == len(after) == k
    for a, b in zip(before, after):
        assert list(a) == list(b)
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # Same tensors saved the same way: even the files are byte-identical.
    for p, q in zip(checkpoint.shard_paths(src), checkpoint.shard_paths(str(tmp_path / "back"))):
        assert checkpoint.md5_file(p) == checkpoint.md5_file(q)


def test_gqa_and_bfloat16_reshard_and_dtype_conversion(make_checkpoint, tmp_path):
    src, _, full = make_checkpoint(shards=1, n_kv_heads=2, dtype=torch.bfloat16)
    reshard(src, str(tmp_path / "mp2"), 2, progress=False)
    reshard(src, str(tmp_path / "f32"), 1, dtype="float32", progress=False)
    two = shard_tensors(str(tmp_path / "mp2"))
    assert two[1]["layers.0.attention.wk.weight"].shape == (16, 64)  # one of two kv heads of 16
    assert torch.equal(two[1]["layers.0.attention.wk.weight"], full["layers.0.attention.wk.weight"][16:])
    f32 = shard_tensors(str(tmp_path / "f32"))[0]
    assert f32["output.weight"].dtype == torch.float32
    assert torch.equal(f32["output.weight"], full["output.weight"].float())


def test_output_shards_are_compact_not_views_of_the_whole_tensor(make_checkpoint, tmp_path):
    src, _, full = make_checkpoint(shards=1)
    reshard(src, str(tmp_path / "mp4"), 4, progress=False)
    sizes = [os.path.getsize(p) for p in checkpoint.shard_paths(str(tmp_path / "mp4"))]
    whole = os.path.getsize(checkpoint.shard_paths(src)[0])
    assert max(sizes) < whole / 3  # a saved view would drag its whole storage along


def test_only_the_overlapping_input_shards_are_opened_for_each_output_shard(make_checkpoint, tmp_path, monkeypatch):
    src, _, _ = make_checkpoint(shards=4)
    opened = []
    real = checkpoint.load_shard
    monkeypatch.setattr(checkpoint, "load_shard", lambda p: opened.append(p[-6:-4]) or real(p))
    reshard(src, str(tmp_path / "mp2"), 2, progress=False)
    writing = opened[4:]  # the first four opens are the up-front shape check of every input shard
    assert writing == ["00", "01", "02", "03"]


def test_refuses_a_non_empty_destination_unless_overwrite(make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=2)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(LlamaMPError, match="--overwrite"):
        reshard(src, str(dst), 1, progress=False)
    assert (dst / "keep.txt").read_text() == "mine"
    reshard(src, str(dst), 1, overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and len(checkpoint.shard_paths(str(dst))) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    reshard(src, str(empty), 2, progress=False)  # an empty folder is fine without --overwrite
    with pytest.raises(LlamaMPError, match="source folder itself"):
        reshard(src, src, 2, overwrite=True, progress=False)


def test_a_failure_half_way_leaves_no_destination_and_no_staging_folder(make_checkpoint, tmp_path, monkeypatch):
    src, _, _ = make_checkpoint(shards=2)
    calls = []
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(reshard_mod.torch, "save", failing_save)
    with pytest.raises(LlamaMPError, match="No space left on device while writing .*out.* needs about"):
        reshard(src, str(tmp_path / "out"), 2, progress=False)
    assert os.listdir(tmp_path) == []
    # With --overwrite, the old folder survives a failed attempt untouched.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    calls.clear()
    with pytest.raises(LlamaMPError, match="No space left on device"):
        reshard(src, str(tmp_path / "old"), 2, overwrite=True, progress=False)
    assert os.listdir(tmp_path) == ["old"] and os.listdir(tmp_path / "old") == ["keep.txt"]


def test_an_invalid_shard_count_lists_the_valid_ones(make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=2, n_kv_heads=2)
    with pytest.raises(LlamaMPError, match=r"Valid shard counts: \[1, 2, 4\]"):
        reshard(src, str(tmp_path / "x"), 3, progress=False)
    assert not (tmp_path / "x").exists()


def test_command_line_exit_codes(make_checkpoint, tmp_path, llama_mp_command):
    src, _, _ = make_checkpoint(shards=2)
    run = ["reshard", src, tmp_path / "one", "--mp", "1"]
    code, out, err = llama_mp_command(*run)
    assert code == 0, err
    assert "wrote" in out and "writing" in err  # result on stdout, progress bar on stderr
    code, _, err = llama_mp_command(*run)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
