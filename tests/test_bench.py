"""The benchmark harness reports what it promises (no timing assertions: speed lives in `make bench`)."""

import json

import pytest

from llama_mp import LlamaMPError
from llama_mp.kernels import cpu as cpu_kernels
from llama_mp.tools.bench import bench

TINY = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--multiple_of", "32", "--vocab_size", "512"]


def test_bench_reports_speed_memory_and_bandwidth_as_json(llama_mp_command):
    code, out, err = llama_mp_command("bench", *TINY, "--new_tokens", "8", "--runs", "1", "--json", "--backend",
                                      "gloo", "--device", "cpu")
    assert code == 0, err
    report = json.loads(out)
    for key in ("load_s", "prefill_tok_s", "decode_tok_s", "ms_per_token", "peak_memory_per_rank_gib",
                "achieved_gb_s_per_rank", "read_gb_s_per_rank"):
        assert report[key] and all(v > 0 for v in (report[key] if isinstance(report[key], list) else [report[key]]))
    assert report["decode_path"] == ("C kernels" if cpu_kernels.library() is not None else "PyTorch")
    assert report["compiled_graphs"] == 0 and report["compile_s"] == 0  # only --decoder compiled compiles
    assert report["ranks"] == 1 and report["parameters"] == 2 * 512 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 192 + 128) + 64


def test_bench_compares_with_transformers_on_the_same_weights(capsys):
    pytest.importorskip("transformers")
    bench(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=512, new_tokens=4, runs=1,
          warmup=0, compare="transformers", json=True, backend="gloo", device="cpu")
    report = json.loads(capsys.readouterr().out)
    assert report["transformers_decode_tok_s"] > 0
    assert report["speedup_vs_transformers"] == pytest.approx(report["decode_tok_s"] / report["transformers_decode_tok_s"])


def test_bench_needs_exactly_one_model_source():
    with pytest.raises(LlamaMPError, match="exactly one"):
        bench(model="llama-2-7b", dim=64)
    with pytest.raises(LlamaMPError, match="exactly one"):
        bench()


def test_bench_times_sampling_when_asked(capsys):
    bench(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=512, new_tokens=4, runs=1, warmup=0,
          temperature=0.8, top_p=0.9, json=True, backend="gloo", device="cpu")
    report = json.loads(capsys.readouterr().out)
    assert report["decoding"] == "sampling (temperature 0.8, top_p 0.9)" and report["decode_tok_s"] > 0
    with pytest.raises(LlamaMPError, match="greedy"):
        bench(dim=64, n_layers=2, n_heads=4, temperature=0.5, compare="transformers")
    with pytest.raises(LlamaMPError, match="top_p"):
        bench(dim=64, n_layers=2, n_heads=4, temperature=0.5, top_p=1.5)
