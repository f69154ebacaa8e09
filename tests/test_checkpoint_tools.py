"""The checkpoint tools' edges: synth validates and writes all-or-nothing, a damaged Hugging Face
download is one LlamaMPError naming the file, an explicit --tokenizer must exist, a failed final
rename puts the old folder back, and one dtype table/parser serves every tool."""

import json
import os

import pytest
import torch

from llama_mp.checkpoints import reshard as reshard_mod, staging as output_dir
from llama_mp.cli.commands import synth
from llama_mp.checkpoints.convert import convert
from llama_mp.dtypes import DTYPES, parse_dtype
from llama_mp.errors import LlamaMPError
from llama_mp.dtypes import choose_dtype
from llama_mp.checkpoints.hf import write_hf
from llama_mp.checkpoints.params import load_params
from llama_mp.checkpoints.reshard import reshard
from llama_mp.checkpoints.verify import verify_checkpoint

SMALL = dict(dim=48, n_layers=1, n_heads=6, vocab_size=96, multiple_of=16)


def test_synth_refuses_a_shard_count_that_does_not_split_before_writing_anything(tmp_path, tokenizer_path):
    with pytest.raises(LlamaMPError, match=r"--mp 3: this model .* cannot be split over 3 shards.*Valid shard counts: \[1, 2\]"):
        synth(str(tmp_path / "x"), mp=3, tokenizer=tokenizer_path, **SMALL)
    assert os.listdir(tmp_path) == []  # no folder, no staging left behind


def test_synth_writes_a_checkpoint_verify_accepts_all_or_nothing(tmp_path, tokenizer_path, monkeypatch):
    import llama_mp.checkpoints.synth as synthetic

    out = tmp_path / "ckpt"
    real = synthetic.write_random_checkpoint

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synthetic, "write_random_checkpoint", crash)
    with pytest.raises(LlamaMPError, match="No space left on device"):
        synth(str(out), mp=2, tokenizer=tokenizer_path, **SMALL)
    assert os.listdir(tmp_path) == []  # the next run is not refused by a half folder
    monkeypatch.setattr(synthetic, "write_random_checkpoint", real)
    synth(str(out), mp=2, tokenizer=tokenizer_path, dtype="bfloat16", **SMALL)
    assert verify_checkpoint(str(out), progress=False) == []
    assert sorted(os.listdir(out)) == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth",
                                       "params.json", "tokenizer.model"]
    assert load_params(str(out)).vocab_size == -1
    with pytest.raises(LlamaMPError, match="--overwrite"):
        synth(str(out), mp=1, tokenizer=tokenizer_path, **SMALL)
    with pytest.raises(LlamaMPError, match="Unknown --dtype 'float8'"):
        synth(str(tmp_path / "y"), dtype="float8", tokenizer=tokenizer_path, **SMALL)
    with pytest.raises(LlamaMPError, match="--tokenizer .* is not a file"):
        synth(str(tmp_path / "y"), tokenizer=str(tmp_path / "nope.model"), **SMALL)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_an_explicit_tokenizer_that_is_not_a_file_is_an_error(make_checkpoint, tmp_path):
    src, _, _ = make_checkpoint(shards=2)
    with pytest.raises(LlamaMPError, match="--tokenizer .*missing.model.* is not a file"):
        reshard(src, str(tmp_path / "out"), 1, tokenizer=str(tmp_path / "missing.model"), progress=False)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def hf_dir(make_checkpoint, tmp_path):
    """A small Hugging Face folder written from a Meta state dict, with each tensor fetched once."""
    _, args, state = make_checkpoint(shards=1)
    fetched = []
    root = tmp_path / "hf"
    root.mkdir()
    write_hf(str(root), args, list(state), lambda k: fetched.append(k) or state[k])
    assert sorted(fetched) == sorted(state)  # the first tensor is not read a second time
    return root


def test_a_damaged_hugging_face_download_is_one_error_naming_the_file(hf_dir, tmp_path):
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()

    def fails(match):
        with pytest.raises(LlamaMPError, match=match) as info:
            convert(str(hf_dir), str(tmp_path / "out"), mp=1, progress=False)
        assert "download" in str(info.value) and "\n" not in str(info.value)
        assert not (tmp_path / "out").exists()

    weights.write_bytes(data[: len(data) // 2])  # truncated
    fails(r"Cannot read .*model\.safetensors: SafetensorError")
    weights.write_bytes(data)
    config = (hf_dir / "config.json").read_text()
    (hf_dir / "config.json").write_text(config[:-20])
    fails(r"config\.json: it is not valid JSON \(Expecting property name")
    (hf_dir / "config.json").write_text("[1, 2]")
    fails(r"config\.json: it holds a JSON list")
    (hf_dir / "config.json").write_text(config)
    index = hf_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    fails(r"index\.json: it has no \"weight_map\"")
    index.write_text("{not json")
    fails(r"index\.json: it is not valid JSON")
    index.write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in _hf_names(hf_dir)}}))
    convert(str(hf_dir), str(tmp_path / "ok"), mp=1, progress=False)  # a sound index still works
    index.unlink()
    weights.unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    fails(r"pytorch_model\.bin: ")


def _hf_names(hf_dir):
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def test_a_failed_final_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    real = os.rename

    def rename(a, b):
        if os.path.basename(a).startswith(".out.partial-"):
            raise OSError(13, "Permission denied")
        return real(a, b)

    monkeypatch.setattr(output_dir.os, "rename", rename)
    with pytest.raises(LlamaMPError, match=r"the folder .* is not writable \(Permission denied\)"):
        with output_dir.staged_output_dir(str(dst), overwrite=True) as out:
            open(os.path.join(out, "new.txt"), "w").close()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(dst) == ["keep.txt"]


def test_one_dtype_table_and_parser_for_every_tool():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(None, optional=True) is None
    with pytest.raises(LlamaMPError, match="Unknown --dtype None; use one of float32, bfloat16, float16"):
        parse_dtype(None)
    with pytest.raises(LlamaMPError, match="leave it out to keep the source's dtype"):
        parse_dtype("fp8", optional=True)
    assert choose_dtype("auto", torch.device("cpu")) is torch.float32
    assert choose_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(LlamaMPError, match="Unknown --dtype 'int8'; use one of auto, float32"):
        choose_dtype("int8", torch.device("cpu"))
    assert reshard_mod.parse_dtype is parse_dtype and set(DTYPES) == {"float32", "bfloat16", "float16"}
