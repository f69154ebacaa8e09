"""The C decode kernels (llama_mp/kernels/csrc/cpu_decode.c) compute what the PyTorch decoder computes.

Step by step their logits equal the PyTorch decoder's for multi-head and grouped-query attention,
batches, and sizes that are not multiples of the SIMD width (the parity tests run both decoders on 1, 2
and 4 ranks against the reference and transformers). A bfloat16 model rounds the input of every matrix
product to bfloat16 and is checked against a plain-torch forward under that rule. Without a compiler the model falls back to PyTorch
with one note; asked for explicitly, their absence is a clear error.
"""

import math
import sys

import pytest
import torch

from llama_mp.kernels import cpu as cpu_kernels
from llama_mp.runtime import memory
from reference import _rms, _rotate
from workers import build, prompt_ids

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="the CPU kernels can't be built here")

SHAPES = {
    "mha": dict(),
    "gqa": dict(n_heads=8, n_kv_heads=2),
    "odd": dict(dim=40, n_heads=4, multiple_of=24),  # head_dim 10, FFN 120: scalar tails everywhere
}
STEPS = 10


def _stepwise_logits(model, prompts, steps):
    """Greedy decode of a batch of equal-length prompts; the logits of every step [steps, batch, vocab]."""
    tokens = torch.tensor(prompts)
    out = []
    with torch.inference_mode():
        logits = model(tokens, 0)  # prefill
        for step in range(steps):
            out.append(logits)
            logits = model(logits.argmax(-1, keepdim=True), tokens.shape[1] + step)
    return torch.stack(out)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_decode_steps_match_the_pytorch_decoder(shape, make_checkpoint, tokenizer_path):
    ckpt_dir, args, _ = make_checkpoint(shards=1, **SHAPES[shape])
    # 5 rows: the kernels take rows four at a time, then one by one
    prompts = torch.randint(3, args.vocab_size, (5, 6), generator=torch.Generator().manual_seed(0)).tolist()
    fast = build(ckpt_dir, tokenizer_path, max_batch_size=5)
    assert fast.model.decoder.name == "C kernels"  # what auto picks here
    slow = build(ckpt_dir, tokenizer_path, max_batch_size=5, decoder="pytorch")
    expected = _stepwise_logits(slow.model, prompts, STEPS)
    got = _stepwise_logits(fast.model, prompts, STEPS)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_a_prompt_that_fits_a_step_is_prefilled_by_the_kernels_as_the_pytorch_forward_does(make_checkpoint,
                                                                                           tokenizer_path):
    """Prompts of up to a step's rows run as rows of one C step (each token at its own position in its
    row's slot, from any start and first cache row); longer ones take the PyTorch forward. Either way the
    hidden states of every position equal the PyTorch decoder's, and so does the cache they leave."""
    from llama_mp.runtime.decode import Decoder

    ckpt_dir, args, _ = make_checkpoint(shards=1, **SHAPES["gqa"])
    fast = build(ckpt_dir, tokenizer_path, max_seq_len=96, max_batch_size=3).model
    slow = build(ckpt_dir, tokenizer_path, max_seq_len=96, max_batch_size=3, decoder="pytorch").model
    capacity = fast.decoder.step_capacity(fast)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for batch, seq, start, first_row in [(3, 7, 0, 0), (1, 20, 5, 2), (2, capacity // 2 + 1, 0, 1)]:
            tokens = torch.randint(3, args.vocab_size, (batch, seq), generator=g)
            if start:  # something in the cache before the prompt, the same in both models
                for model in (fast, slow):
                    model.hidden_in_slot(torch.randint(3, args.vocab_size, (1, start), generator=torch.Generator()
                                                       .manual_seed(2)), first_row)
            got = fast.decoder.prefill(fast, tokens, start, all_positions=True, first_row=first_row)
            want = slow.decoder.prefill(slow, tokens, start, all_positions=True, first_row=first_row)
            assert got.shape == (batch, seq, args.dim)
            torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)
            last = fast.decoder.prefill(fast, tokens, start, first_row=first_row)
            torch.testing.assert_close(last, got[:, -1:], rtol=0, atol=1e-5)
            rows = slice(first_row, first_row + batch)
            for a, b in zip(fast.layers, slow.layers):
                torch.testing.assert_close(a.attention.cache_k[rows, :, :start + seq],
                                           b.attention.cache_k[rows, :, :start + seq].float(), rtol=0, atol=1e-5)
    assert type(fast.decoder).prefill is not Decoder.prefill


def _usable():
    return cpu_kernels.usable(torch.device("cpu"), torch.float32)


@pytest.mark.slow  # compiles the kernels again, into a cache of its own
def test_the_library_is_built_once_into_the_cache(fresh_kernels, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_MP_CACHE", str(tmp_path / "cache"))
    fresh_kernels()
    assert _usable()
    built = list((tmp_path / "cache").glob("cpu_decode-*.so"))
    assert len(built) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    fresh_kernels()  # as the next process
    assert _usable()
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_without_a_compiler_decoding_falls_back_with_one_note(fresh_kernels, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LLAMA_MP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "no-such-compiler")
    fresh_kernels()
    capsys.readouterr()
    assert _usable() is False and _usable() is False  # asked twice, said once
    err = capsys.readouterr().err
    assert err.count("CPU decode kernels unavailable") == 1
    assert "no-such-compiler" in err and "Traceback" not in err


def test_turned_off_they_are_not_built_and_nothing_is_said(fresh_kernels, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LLAMA_MP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    fresh_kernels()
    capsys.readouterr()
    assert _usable() is False
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("setting, option, asked", [("1", [], f"{cpu_kernels.ENV}=1"),
                                                     ("auto", ["--decoder", "cpu_kernels"], "--decoder cpu_kernels")])
def test_asked_for_but_unavailable_is_one_clear_error(fresh_kernels, monkeypatch, tmp_path, llama_mp_command,
                                                      setting, option, asked):
    monkeypatch.setenv("LLAMA_MP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv(cpu_kernels.ENV, setting)
    fresh_kernels()
    code, _, err = llama_mp_command("bench", "--dim", "64", "--n_layers", "1", "--n_heads", "4", "--new_tokens", "2",
                                    "--runs", "1", "--device", "cpu", *option)
    assert code == 2 and "Traceback" not in err, err
    assert err.count(f"{asked} asks for the CPU decode kernels") == 1 and "no-such-compiler" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_weights_and_cache_sit_in_huge_page_aligned_memory_that_is_freed_with_them():
    import resource

    cpu = torch.device("cpu")
    t = memory.empty_for_streaming((3, 5, 7), torch.float32, cpu)
    assert t.shape == (3, 5, 7) and t.is_contiguous() and t.data_ptr() % memory.HUGE_PAGE == 0
    t.fill_(2.0)
    assert float(t.sum()) == 2.0 * 105
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(20):  # 20 x 64 MiB, touched: a leak would show in the peak RSS
        memory.empty_for_streaming((1 << 24,), torch.float32, cpu).fill_(1.0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 400 * 1024  # KiB


def test_a_prepared_model_keeps_its_state_dict_and_streams_from_aligned_memory(make_checkpoint, tokenizer_path):
    ckpt_dir, _, state = make_checkpoint(shards=1, **SHAPES["gqa"])
    model = build(ckpt_dir, tokenizer_path).model
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    if sys.platform.startswith("linux"):
        attention = model.layers[0].attention
        for t in (attention.qkv.storage, attention.cache_k, model.layers[1].feed_forward.gate_up.storage,
                  model.logits_of.storage):
            assert t.data_ptr() % memory.HUGE_PAGE == 0


def test_steps_outside_the_cache_are_refused_not_written(make_checkpoint, tokenizer_path):
    ckpt_dir, _, _ = make_checkpoint(shards=1, **SHAPES["mha"])
    model = build(ckpt_dir, tokenizer_path, max_seq_len=16, max_batch_size=2).model
    with pytest.raises(ValueError, match="do not fit"):
        model.hidden(torch.ones(3, 1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="do not fit"):
        model.hidden(torch.ones(1, 1, dtype=torch.long), 16)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        model.hidden(torch.full((1, 1), 10**6), 0)
    assert model.hidden(torch.ones(2, 1, dtype=torch.int32), 15).shape == (2, 1, model.args.dim)


def bf16_input_logits(state, args, tokens):
    """Logits [seq, vocab] of one sequence under the kernels' bfloat16-model rule, in plain torch (the
    shape of reference.py): every matrix product takes its input rounded to bfloat16 and multiplies it,
    in float64, by the float32 weights of `state` (widened bfloat16, or dequantised); norms, rotary,
    attention and the residual stream stay float32."""
    sd = {k: v.float() for k, v in state.items()}

    def mm(x, name):
        return (x.bfloat16().double() @ sd[name].double().T).float()

    n_kv, hd, seq = args.n_kv_heads or args.n_heads, args.dim // args.n_heads, len(tokens)
    pos = torch.arange(seq)
    x = sd["tok_embeddings.weight"][torch.tensor(tokens)]
    future = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        h = _rms(x, sd[p + "attention_norm.weight"], args.norm_eps)
        q, k, v = (mm(h, p + f"attention.{n}.weight").view(seq, -1, hd) for n in ("wq", "wk", "wv"))
        q, k = _rotate(q, pos, args.rope_theta), _rotate(k, pos, args.rope_theta)
        heads = [torch.softmax(q[:, j] @ k[:, j // (args.n_heads // n_kv)].T / math.sqrt(hd) + future, dim=-1)
                 @ v[:, j // (args.n_heads // n_kv)] for j in range(args.n_heads)]
        x = x + mm(torch.cat(heads, dim=-1), p + "attention.wo.weight")
        h = _rms(x, sd[p + "ffn_norm.weight"], args.norm_eps)
        gate = mm(h, p + "feed_forward.w1.weight")
        x = x + mm(gate * torch.sigmoid(gate) * mm(h, p + "feed_forward.w3.weight"), p + "feed_forward.w2.weight")
    return mm(_rms(x, sd["norm.weight"], args.norm_eps), "output.weight")


def assert_follows_bf16_rule(got, expected):
    """got (the kernels) equals expected (bf16_input_logits) to 1e-5 but where float32 sums taken in
    another order flipped the bfloat16 rounding of an input (rare: the input must lie within float32
    rounding of a tie; one bfloat16 step, 2^-8 of that value), which moves its row and any row that
    reads it later a little. So 3 rows (positions, steps) in 4 must match, and none may move further
    than such a flip; without the rounding (float32 math) no row matches."""
    rows = (got - expected).abs().reshape(-1, got.shape[-1]).amax(-1)
    assert float((rows <= 1e-5).float().mean()) >= 0.75 and float(rows.max()) < 0.02 * float(expected.abs().max()), rows


def test_a_bfloat16_model_keeps_bfloat16_weights_and_rounds_the_inputs_of_its_products(make_checkpoint,
                                                                                       tokenizer_path):
    ckpt_dir, args, state = make_checkpoint(shards=1, dtype=torch.bfloat16, **SHAPES["gqa"])
    prompts = prompt_ids(tokenizer_path)
    half = build(ckpt_dir, tokenizer_path, dtype="bfloat16")
    assert half.model.decoder.name == "C kernels" and half.model.logits_of.storage.dtype == torch.bfloat16
    assert half.model.layers[0].attention.cache_k.dtype == torch.float32
    full = build(ckpt_dir, tokenizer_path, dtype="float32")  # the same weights, widened: float32 math
    with torch.inference_mode():
        for prompt in prompts:
            got = half.model(torch.tensor([prompt]), 0, all_positions=True)[0]
            assert_follows_bf16_rule(got, bf16_input_logits(state, args, prompt))
            exact = full.model(torch.tensor([prompt]), 0, all_positions=True)[0]
            assert float((got - exact).abs().mean()) > 1e-3  # the rounding is there: not the float32 model
    ids, _ = half.generate(prompts, STEPS, temperature=0)
    for prompt, got in zip(prompts, ids):  # decode steps (the C step) follow the rule too
        with torch.inference_mode():
            logits = bf16_input_logits(state, args, prompt + got[:-1])[len(prompt) - 1:]
        assert got == logits.argmax(-1).tolist()
    # PyTorch's own bfloat16 path (GPUs, other CPUs) still runs: close in bulk, as bfloat16 goes
    eager = build(ckpt_dir, tokenizer_path, dtype="bfloat16", decoder="pytorch")
    with torch.inference_mode():
        rough = eager.model(torch.tensor([prompts[0]]), 0, all_positions=True).float()
        exact = full.model(torch.tensor([prompts[0]]), 0, all_positions=True)
    assert (rough - exact).abs().mean() < 0.05 * exact.abs().mean()
