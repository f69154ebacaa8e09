"""Class 3 of round 3: non-finite weights never produce output. A NaN or an infinity in a float
checkpoint is reported by `verify` (tensor and shard named), refused by `quantize` and by loading (one
message naming the tensor and the shard, found while the tensors are copied: decoding pays nothing), and
perplexity never reports nan with exit 0. All in process."""

import math
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from llama_mp.checkpoints import layout
from llama_mp.checkpoints.hf import hf_name
from llama_mp.checkpoints.meta import nonfinite_problem
from llama_mp.checkpoints.quantize import quantize_checkpoint
from llama_mp.checkpoints.verify import verify_checkpoint
from llama_mp.distributed import Group
from llama_mp.errors import LlamaMPError
from llama_mp.quant.scheme import parse_scheme
from llama_mp.runtime.decode import Decoder
from llama_mp.runtime.loading import load_checkpoint
from llama_mp.tools import perplexity as perplexity_mod
from reference import write_llama2c
from workers import build

CPU_GROUP = Group(0, 1, 0, torch.device("cpu"), "gloo")
SOME = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BAD = [float("nan"), float("inf"), float("-inf")]


@pytest.fixture(scope="module")
def clean(make_checkpoint):
    return make_checkpoint(shards=2)  # (dir, args, state)


def damaged_copy(clean, tmp_path, key, shard, flat_index, value, name="ckpt"):
    """A copy of the clean checkpoint with one value of `key` in `shard` set to `value` (no checklist, so
    that the values check is what speaks)."""
    src, args, _ = clean
    dst = tmp_path / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    os.remove(dst / "checklist.chk")
    path = dst / f"consolidated.{shard:02d}.pth"
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd[key].view(-1)[flat_index % sd[key].numel()] = value
    torch.save(sd, path)
    return str(dst), f"consolidated.{shard:02d}.pth"


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(LlamaMPError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@st.composite
def damages(draw, args):
    keys = sorted(layout.shard_shapes(args, 2))
    return draw(st.sampled_from(keys)), draw(st.integers(0, 1)), draw(st.integers(0, 10 ** 6)), draw(st.sampled_from(BAD))


@SOME
@given(data=st.data())
def test_a_nan_or_infinity_anywhere_is_named_by_verify_and_refused_by_loading_and_quantize(clean, tmp_path, data):
    key, shard, index, value = data.draw(damages(clean[1]))
    ckpt, shard_name = damaged_copy(clean, tmp_path, key, shard, index, value)
    n = torch.Size(layout.shard_shapes(clean[1], 2)[key]).numel()
    problems = verify_checkpoint(ckpt, progress=False)
    assert f"{shard_name}: {key} holds 1 NaN or infinite value(s) of {n}: the file is damaged" in problems
    replicated = layout.split_dim(key, clean[1]) is None
    assert len(problems) == 1 + replicated, problems  # a damaged copy of a norm also differs from the other
    if replicated and shard != 0:  # a copy the loader never reads: what loads is sound
        assert f"{shard_name}: replicated tensor {key} differs from consolidated.00.pth" in problems
        load_checkpoint(ckpt, CPU_GROUP, torch.float32, Decoder(), 1, 16)
        return
    for dtype in (torch.float32, torch.bfloat16):
        message = refused(load_checkpoint, ckpt, CPU_GROUP, dtype, Decoder(), 1, 16)
        assert message.startswith(f"{key} in {os.path.join(ckpt, shard_name)} is damaged"), message
        assert "NaN or infinite" in message
    message = refused(quantize_checkpoint, ckpt, str(tmp_path / "q"), "int8", progress=False)
    assert f"{key} in " in message and shard_name in message and not (tmp_path / "q").exists()


def test_verify_counts_the_values_and_names_the_tensor(clean, tmp_path):
    ckpt, shard_name = damaged_copy(clean, tmp_path, "layers.1.feed_forward.w2.weight", 1, 5, float("nan"))
    sd = torch.load(os.path.join(ckpt, shard_name), weights_only=True)
    n = sd["layers.1.feed_forward.w2.weight"].numel()
    assert verify_checkpoint(ckpt, progress=False) == [
        f"{shard_name}: layers.1.feed_forward.w2.weight holds 1 NaN or infinite value(s) of {n}: the file is damaged"]


def test_a_value_that_overflows_the_load_dtype_is_named_as_such(clean, tmp_path):
    ckpt, _ = damaged_copy(clean, tmp_path, "layers.0.attention.wo.weight", 0, 3, 1e6)
    assert verify_checkpoint(ckpt, progress=False) == []  # finite in the file
    message = refused(load_checkpoint, ckpt, CPU_GROUP, torch.float16, Decoder(), 1, 16)
    assert message.startswith("layers.0.attention.wo.weight of ") and "does not fit in float16" in message
    load_checkpoint(ckpt, CPU_GROUP, torch.float32, Decoder(), 1, 16)  # and loads as it is stored


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32), min_size=1, max_size=64), st.sampled_from([torch.float32, torch.bfloat16]))
def test_the_one_reduction_check_agrees_with_an_elementwise_one(values, dtype):
    t = torch.tensor(values, dtype=torch.float32).to(dtype)
    assert (nonfinite_problem(t) is None) == bool(torch.isfinite(t).all())
    assert nonfinite_problem(torch.full((8,), 3e38)) is None  # its float32 sum overflows; the values are finite


def test_perplexity_never_reports_nan(make_checkpoint, tokenizer_path, tmp_path, monkeypatch):
    llama = build(make_checkpoint(shards=1)[0], tokenizer_path, max_seq_len=32, max_batch_size=1)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    real = perplexity_mod.score_tokens

    def with_a_nan(*args, **kwargs):
        scores = real(*args, **kwargs)
        scores.logprobs[2] = float("nan")
        return scores

    monkeypatch.setattr(perplexity_mod, "score_tokens", with_a_nan)
    message = refused(perplexity_mod.perplexity, llama, str(text), per_token=str(tmp_path / "out.json"))
    assert "1 of" in message and "NaN or infinite" in message and "--dtype float32" in message
    assert not (tmp_path / "out.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"logprobs": [NaN, -1.0], "argmax": [1, 2]}')
    assert "NaN or infinite" in refused(perplexity_mod.Scores.load, str(bad))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_converting_tools_refuse_a_nan_or_infinity_naming_the_tensor(clean, tmp_path, data):
    """reshard, convert (to Meta and to HF) never copy a non-finite weight through; nothing is written."""
    from llama_mp.checkpoints.convert import convert
    from llama_mp.checkpoints.reshard import reshard

    key, _, index, value = data.draw(damages(clean[1]))
    ckpt, _ = damaged_copy(clean, tmp_path, key, 0, index, value)
    for name, write in (("reshard", lambda dst: reshard(ckpt, dst, 1, progress=False)),
                        ("hf", lambda dst: convert(ckpt, dst, to="hf", progress=False))):
        dst = tmp_path / f"out-{name}"
        message = refused(write, str(dst))
        assert message.startswith(f"{key} of {ckpt} is damaged") and "NaN or infinite" in message, message
        assert not dst.exists()


def test_a_weight_that_overflows_the_converted_dtype_is_refused_by_reshard(clean, tmp_path):
    from llama_mp.checkpoints.reshard import reshard

    ckpt, _ = damaged_copy(clean, tmp_path, "layers.0.attention.wo.weight", 0, 3, 1e6)
    message = refused(reshard, ckpt, str(tmp_path / "half"), 2, dtype="float16", progress=False)
    assert message.startswith("layers.0.attention.wo.weight of ") and "does not fit in float16" in message
    reshard(ckpt, str(tmp_path / "same"), 2, progress=False)  # finite as stored: copied as it is


FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stored=st.sampled_from(FLOATS), loaded=st.sampled_from(FLOATS), data=st.data())
def test_a_stored_value_loads_exactly_when_it_is_finite_in_the_run_dtype(make_checkpoint, tmp_path, stored, loaded,
                                                                          data):
    """Whatever the stored and the run's dtype, a finite stored value loads iff its conversion is finite;
    otherwise the message names the tensor, the dtype and that dtype's own bound (torch.finfo's)."""
    value = data.draw(st.floats(allow_nan=False, allow_infinity=False, width=16 if stored == torch.float16 else 32))
    value = float(torch.tensor(value, dtype=torch.float32).to(stored))  # as the file holds it
    if not math.isfinite(value):  # bfloat16 rounds float32's largest values up to inf: not a finite value
        return
    clean = make_checkpoint(shards=1, dtype=stored)
    ckpt, _ = damaged_copy(clean, tmp_path, "layers.1.feed_forward.w3.weight", 0, 7, value)
    converts = bool(torch.isfinite(torch.tensor(value, dtype=stored).to(loaded)))
    if converts:
        load_checkpoint(ckpt, CPU_GROUP, loaded, Decoder(), 1, 16)
        return
    message = refused(load_checkpoint, ckpt, CPU_GROUP, loaded, Decoder(), 1, 16)
    name = str(loaded).replace("torch.", "")
    assert message.startswith("layers.1.feed_forward.w3.weight of ") and f"does not fit in {name}" in message
    assert f"{name} holds at most {torch.finfo(loaded).max:g}" in message, message


@pytest.fixture(scope="module")
def sources(clean, tmp_path_factory):
    """The clean model as the other formats a user loads or imports: an int8 folder, HF, llama2.c."""
    from llama_mp.checkpoints.convert import convert

    root = tmp_path_factory.mktemp("sources")
    quantize_checkpoint(clean[0], str(root / "int8"), "int8", progress=False)
    convert(clean[0], str(root / "hf"), to="hf", progress=False)
    full = {k: v for k, v in clean[2].items()}
    write_llama2c(str(root / "model.bin"), full, clean[1].n_heads, clean[1].kv_heads)
    return root


def _damaged_file(src, tmp_path, key, index, value):
    """A damaged copy of an HF folder (its safetensors) or of a llama2.c file, one value of `key` changed."""
    from safetensors.torch import load_file, save_file

    if os.path.isdir(src):
        dst = tmp_path / "damaged_hf"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        path = str(dst / "model.safetensors")
        tensors = load_file(path)
        name = hf_name(key)
        tensors[name].view(-1)[index % tensors[name].numel()] = value
        save_file(tensors, path, metadata={"format": "pt"})
        return str(dst)
    return None


@SOME
@given(data=st.data())
def test_every_load_and_import_path_refuses_a_nan_naming_the_tensor(clean, sources, tmp_path, data):
    """Loading with --quantize, loading a quantized folder, and importing from HF and llama2.c each refuse a
    NaN or an infinity with one message naming the tensor; an import writes nothing."""
    from llama_mp.checkpoints.convert import convert

    key, _, index, value = data.draw(damages(clean[1]))
    ckpt, shard_name = damaged_copy(clean, tmp_path, key, 0, index, value)
    message = refused(load_checkpoint, ckpt, CPU_GROUP, torch.float32, Decoder(), 1, 16, parse_scheme("int8"))
    assert message.startswith(f"{key} in {os.path.join(ckpt, shard_name)} is damaged"), message

    if key.endswith("norm.weight") or key in ("tok_embeddings.weight",):  # kept in float by quantizing
        q = str(tmp_path / "int8")
        shutil.rmtree(q, ignore_errors=True)
        shutil.copytree(sources / "int8", q)
        os.remove(os.path.join(q, "checklist.chk"))
        path = os.path.join(q, "consolidated.00.pth")
        sd = torch.load(path, weights_only=True)
        sd[key].view(-1)[index % sd[key].numel()] = value
        torch.save(sd, path)
        message = refused(load_checkpoint, q, CPU_GROUP, torch.float32, Decoder(), 1, 16)
        assert message.startswith(f"{key} in {path} is damaged"), message

    hf = _damaged_file(str(sources / "hf"), tmp_path, key, index, value)
    full = {k: v.clone() for k, v in clean[2].items()}
    full[key].view(-1)[index % full[key].numel()] = value
    l2c = str(tmp_path / "damaged.bin")
    write_llama2c(l2c, full, clean[1].n_heads, clean[1].kv_heads)
    for src in (hf, l2c):
        dst = tmp_path / "imported"
        message = refused(convert, src, str(dst), progress=False)
        assert message.startswith(f"{key} of {src} is damaged") and "NaN or infinite" in message, message
        assert not dst.exists()
