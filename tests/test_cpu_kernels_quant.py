"""The C kernels' weight formats and instruction sets (llama_mp/kernels/csrc/cpu_decode.c).

Every product the kernels compute, for float32, bfloat16, int8 and int4 weights, on every build this
CPU runs (AVX-512 with bfloat16 products, AVX-512, AVX2), is x @ W.T for W = `quant.scheme.dequantize`
of the stored integers (for a bfloat16 model: x rounded to bfloat16 first), up to the rounding of
float32 sums: for any number of rows (one decode step, a batch, a prompt, rows short of a
register tile), outputs that are not a multiple of the tile, and inputs that are not a multiple of
the vector width. A quantized model decodes with the kernels step for step as the PyTorch
QuantizedProjection path does, and LLAMA_MP_CPU_ISA picks the build. These are the products with x in
float (LLAMA_MP_CPU_ACTIVATIONS=float); those with x quantized to int8 are test_cpu_kernels_int8x.py's.
"""


import pytest
import torch

from llama_mp import Llama, LlamaMPError
from llama_mp.kernels import cpu as cpu_kernels
from llama_mp.kernels.decoder import KernelQuantizedProjection
from llama_mp.quant.scheme import Scheme, dequantize, quantize

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="the CPU kernels can't be built here")

ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in cpu_kernels.runnable_isas(),
                                                   reason=f"this CPU does not run {isa}"))
        for isa in cpu_kernels.ISAS]
FORMATS = {
    "float32": None, "bfloat16": None, "int8": Scheme("int8"),
    "int4-g32": Scheme("int4", 32), "int4-g64": Scheme("int4", 64), "int4-g128": Scheme("int4", 128),
}
ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 14, 17, 23, 33, 40)  # tiles of 4 and 8 rows and remainders; int8 widened from 16


def _stored(fmt, out_features, in_features, seed):
    """(weight, scales, scheme, the float64 matrix they stand for) for a random [out, in] matrix."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    scheme = FORMATS[fmt]
    if scheme is None:
        weight = w.to(getattr(torch, fmt))
        return weight, None, None, weight.double()
    q, scales = quantize(w, scheme)
    return q, scales, scheme, dequantize(q, scales, scheme).double()


def _check_product(y, x, matrix):
    """y equals x @ matrix.T up to float32 summation order: |error| <= 2 n eps (|x| @ |matrix|.T)."""
    expected = x.double() @ matrix.T
    bound = 2 * x.shape[-1] * 2.0 ** -24 * (x.double().abs() @ matrix.abs().T) + 1e-30
    worst = float(((y.double() - expected).abs() / bound).max())
    assert y.dtype == torch.float32 and y.shape == expected.shape and worst <= 1, worst


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_product_is_the_dequantised_matrix_times_x(isa, fmt):
    lib = cpu_kernels.load_isa(isa)
    assert lib.isa_bits() == (512 if isa.startswith("avx512") else 256) and lib.bf16_dot() == (isa == "avx512bf16")
    scheme = FORMATS[fmt]
    inputs = [128, 384] if scheme is not None and scheme.mode == "int4" else [32, 40, 200]  # 40, 200: scalar tails
    for in_features in inputs:
        for out_features in (1, 7, 13, 66):  # none a multiple of every tile
            weight, scales, scheme, matrix = _stored(fmt, out_features, in_features, seed=in_features + out_features)
            x = torch.randn(max(ROWS), in_features, generator=torch.Generator().manual_seed(out_features))
            for rows in ROWS:
                y = cpu_kernels.project(x[:rows], weight, scales, scheme, lib=lib, int8_x=False)
                _check_product(y, x[:rows], matrix)
            # leading dims are rows too: [batch, seq, in], as a prompt's projection has them
            _check_product(cpu_kernels.project(x[:12].view(3, 4, -1), weight, scales, scheme, lib=lib,
                                               int8_x=False).view(12, -1),
                           x[:12], matrix)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_product_of_a_bfloat16_model_takes_x_rounded_to_bfloat16(isa, fmt):
    """round_x (the model's dtype is bfloat16): x @ W.T for x rounded to bfloat16 (round to nearest even,
    as torch's .bfloat16()), W widened or dequantised; the products are exact, the sums float32."""
    lib = cpu_kernels.load_isa(isa)
    scheme = FORMATS[fmt]
    inputs = [40, 200, 768]  # 40, 200: partial blocks; int4: whole groups, 288 and 320 with a partial 128-input chunk
    if scheme is not None and scheme.mode == "int4":
        inputs = [n for n in (288, 320, 640) if n % scheme.group_size == 0]
    for in_features in inputs:
        for out_features in (5, 66):
            weight, scales, scheme, matrix = _stored(fmt, out_features, in_features, seed=in_features + out_features)
            x = torch.randn(max(ROWS), in_features, generator=torch.Generator().manual_seed(out_features)) * 3
            rounded = x.bfloat16().float()
            for rows in range(1, 41):
                y = cpu_kernels.project(x[:rows], weight, scales, scheme, lib=lib, round_x=True, int8_x=False)
                _check_product(y, rounded[:rows], matrix)
            assert not torch.equal(rounded, x)  # so the check above can fail


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_builds_agree(fmt):
    isas = cpu_kernels.runnable_isas()
    if len(isas) < 2:
        pytest.skip("this CPU runs one build")
    weight, scales, scheme, matrix = _stored(fmt, 2304 // 8, 768, seed=5)
    x = torch.randn(33, 768, generator=torch.Generator().manual_seed(6))
    for round_x in (False, True):
        xr = x.bfloat16().float() if round_x else x
        bound = 4 * 768 * 2.0 ** -24 * (xr.abs() @ matrix.float().abs().T)
        for rows in (1, 4, 33):
            a, *others = (cpu_kernels.project(x[:rows], weight, scales, scheme, lib=cpu_kernels.load_isa(isa),
                                              round_x=round_x, int8_x=False) for isa in isas)
            for b in others:
                assert bool(((a - b).abs() <= bound[:rows]).all())


def test_a_quantized_projection_runs_the_kernels_on_its_own_storage(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_ENV, "float")
    holders = [torch.nn.Module() for _ in range(2)]
    for h, rows in zip(holders, (24, 40)):
        h.weight = torch.nn.Parameter(torch.empty(rows, 64, device="meta"), requires_grad=False)
    scheme = Scheme("int4", 32)
    proj = KernelQuantizedProjection(holders, torch.float32, torch.device("cpu"), scheme)
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    q, scales = quantize(w, scheme)
    with torch.no_grad():  # as loading does: through the holders' views
        for h, start, stop in ((holders[0], 0, 24), (holders[1], 24, 64)):
            h.weight.copy_(q[start:stop])
            h.scales.copy_(scales[start:stop])
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    y = proj(x)
    assert y.shape == (2, 5, 64) and y.dtype == torch.float32
    _check_product(y.view(10, 64), x.view(10, 64), dequantize(q, scales, scheme).double())


BUILT = {"avx512bf16": (512, 1), "avx512vnni": (512, 0), "avx512": (512, 0), "avxvnni": (256, 0),
         "avx2": (256, 0)}  # (isa_bits(), bf16_dot())


def test_the_instruction_set_is_the_best_the_cpu_runs_unless_one_is_forced(fresh_kernels, monkeypatch, capsys):
    def chosen(isa=None):
        """What a new process loads with LLAMA_MP_CPU_ISA=isa (unset: auto), sharing the built libraries."""
        if isa is None:
            monkeypatch.delenv(cpu_kernels.ISA_ENV, raising=False)
        else:
            monkeypatch.setenv(cpu_kernels.ISA_ENV, isa)
        fresh_kernels()
        lib = cpu_kernels.library()
        return None if lib is None else (lib.isa_bits(), lib.bf16_dot())

    capsys.readouterr()
    assert chosen() == BUILT[cpu_kernels.runnable_isas()[0]]
    for isa in cpu_kernels.runnable_isas():
        assert chosen(isa) == BUILT[isa]
    assert capsys.readouterr().err == ""
    assert chosen("sse2") is None
    err = capsys.readouterr().err
    assert err.count("CPU decode kernels unavailable") == 1
    assert f"{cpu_kernels.ISA_ENV}=sse2 is not one of avx512bf16, avx512vnni, avx512, avxvnni, avx2" in err


def test_forcing_an_instruction_set_the_cpu_lacks_is_refused(monkeypatch):
    avx512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: avx512)
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx512bf16")
    with pytest.raises(RuntimeError, match=r"lacks \(avx512_bf16, avx512_vnni\)"):
        cpu_kernels.chosen_isa()
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "auto")
    assert cpu_kernels.chosen_isa() == "avx512"
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: avx512 + ("avx512_vnni",))
    assert cpu_kernels.chosen_isa() == "avx512vnni"
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: avx512 + ("avx512_vnni", "avx512_bf16"))
    assert cpu_kernels.chosen_isa() == "avx512bf16"
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: ("avx2", "fma", "f16c", "avx_vnni"))
    assert cpu_kernels.chosen_isa() == "avxvnni"
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: ("avx2", "fma", "f16c"))
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx512")
    with pytest.raises(RuntimeError, match="avx512bw, avx512dq, avx512f, avx512vl"):
        cpu_kernels.chosen_isa()
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "auto")
    assert cpu_kernels.chosen_isa() == "avx2"
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: ())
    with pytest.raises(RuntimeError, match="not x86-64 with AVX2 and FMA"):
        cpu_kernels.chosen_isa()


def _build(ckpt_dir, tokenizer_path, decoder, quantize, dtype="float32", group_size=None):
    return Llama.build(ckpt_dir, tokenizer_path, 32, 5, seed=1, dtype=dtype, decoder=decoder, backend="gloo",
                       device="cpu", quantize=quantize, group_size=group_size)


def _stepwise_logits(model, prompts, steps):
    tokens = torch.tensor(prompts)
    out = []
    with torch.inference_mode():
        logits = model(tokens, 0)  # prefill: the kernels' multi-row products
        for step in range(steps):
            out.append(logits)
            logits = model(logits.argmax(-1, keepdim=True), tokens.shape[1] + step)  # decode steps in C
    return torch.stack(out)


@pytest.mark.parametrize("quantize,group_size", [("int8", None), ("int4", 32), ("int4", 64)])
def test_a_quantized_model_decodes_as_the_pytorch_quantized_path(quantize, group_size, make_checkpoint,
                                                                  tokenizer_path, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_ENV, "float")  # weight-only, as the PyTorch path
    ckpt_dir, args, _ = make_checkpoint(shards=1, dim=128, n_heads=8, n_kv_heads=2, multiple_of=64)
    prompts = torch.randint(3, args.vocab_size, (5, 6), generator=torch.Generator().manual_seed(0)).tolist()
    fast = _build(ckpt_dir, tokenizer_path, "auto", quantize, group_size=group_size)
    assert fast.model.decoder.name == "C kernels"
    assert isinstance(fast.model.layers[0].attention.qkv, KernelQuantizedProjection)
    assert fast.model.layers[0].attention.qkv.storage.dtype == (torch.int8 if quantize == "int8" else torch.uint8)
    assert fast.model.logits_of.scheme == Scheme("int8")  # the output layer: int8 in both modes
    slow = _build(ckpt_dir, tokenizer_path, "pytorch", quantize, group_size=group_size)
    expected = _stepwise_logits(slow.model, prompts, 8)
    got = _stepwise_logits(fast.model, prompts, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_a_quantized_bfloat16_model_rounds_the_inputs_of_its_products(make_checkpoint, tokenizer_path, monkeypatch):
    """The embedding and the norms stay in bfloat16 (the kernels read that embedding directly), and as
    in any bfloat16 model every product with x in float (LLAMA_MP_CPU_ACTIVATIONS=float) takes x rounded
    to bfloat16: the reference is the plain-torch forward under that rule with the dequantised matrices
    (int4 layers, int8 output layer)."""
    from test_cpu_kernels import assert_follows_bf16_rule, bf16_input_logits

    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_ENV, "float")

    ckpt_dir, args, _ = make_checkpoint(shards=1, dtype=torch.bfloat16, dim=128, n_heads=8, multiple_of=64)
    prompts = torch.randint(3, args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1)).tolist()
    half = _build(ckpt_dir, tokenizer_path, "auto", "int4", dtype="bfloat16")
    assert half.model.decoder.name == "C kernels" and half.model.tok_embeddings.weight.dtype == torch.bfloat16
    state = half.model.state_dict()
    matrices = {name[:-len(".scales")]: dequantize(state[name[:-len(".scales")] + ".weight"], state[name],
                                                   Scheme("int8") if state[name].dtype == torch.float32
                                                   else Scheme("int4", 32))
                for name in state if name.endswith(".scales")}
    state = {**state, **{name + ".weight": m for name, m in matrices.items()}}
    got = _stepwise_logits(half.model, prompts, 6)  # prefill (tiles), then decode steps (the C step)
    expected, tokens = [], prompts
    for step in range(6):
        with torch.inference_mode():
            expected.append(torch.stack([bf16_input_logits(state, args, t)[-1] for t in tokens]))
        tokens = [t + [int(g)] for t, g in zip(tokens, got[step].argmax(-1))]
    assert_follows_bf16_rule(got, torch.stack(expected))
    full = _build(ckpt_dir, tokenizer_path, "auto", "int4", dtype="float32")  # float32 math: not the same
    assert float((_stepwise_logits(full.model, prompts, 6) - got).abs().mean()) > 1e-4


def test_bench_measures_a_quantized_model(llama_mp_command):
    import json

    tiny = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--multiple_of", "32", "--vocab_size", "512"]
    code, out, err = llama_mp_command("bench", *tiny, "--quantize", "int4", "--group_size", "64", "--new_tokens",
                                      "8", "--runs", "1", "--json", "--device", "cpu", "--backend", "gloo")
    assert code == 0, err
    report = json.loads(out)
    assert report["weights"] == "int4 in groups of 64" and report["decode_path"] == "C kernels"
    assert report["decode_tok_s"] > 0 and report["prefill_tok_s"] > 0
    # What a step reads (tools/bench.py bytes_read_per_token), from the shape: per layer 4*64*64 + 3*64*192
    # int4 weights (half a byte each and a bfloat16 scale per 64) and two float32 norms; then the int8
    # output layer with a float32 scale per row, the final norm and one float32 embedding row.
    layer = 4 * 64 * 64 + 3 * 64 * 192
    expected = 2 * (layer // 2 + layer // 64 * 2 + 2 * 64 * 4) + (512 * 64 + 512 * 4) + 64 * 4 + 64 * 4
    assert report["weight_bytes_per_token_per_rank"] == expected  # 92928, 0.54 bytes a parameter
    code, _, err = llama_mp_command("bench", *tiny, "--quantize", "int8", "--group_size", "32", "--device", "cpu")
    assert code == 2 and "applies to int4 only" in err


def test_a_quantized_float16_model_reads_its_float16_embedding(tokenizer_path):
    """PyTorch's float16 products are no reference on a CPU; the same model in float32 is: its int4
    weights are the same integers, and its embedding and norms are the float16 values, widened."""
    from llama_mp import distributed
    from llama_mp.checkpoints.params import parse_params
    from llama_mp.kernels.decoder import CpuKernelDecoder
    from llama_mp.runtime.loading import random_model

    group = distributed.setup("gloo", "cpu")
    args = parse_params(dict(dim=128, n_layers=2, n_heads=4, multiple_of=64, vocab_size=300), where="test")
    scheme = Scheme("int4", 32)
    half, full = (random_model(args, group, dtype, CpuKernelDecoder(), 2, 16, seed=3, scheme=scheme)
                  for dtype in (torch.float16, torch.float32))
    with torch.no_grad():
        for name, tensor in half.state_dict().items():
            if tensor.dtype == torch.float16:  # the embedding and the norms
                full.state_dict()[name].copy_(tensor)
            else:
                assert torch.equal(full.state_dict()[name], tensor), name
    half.share_embedding(), full.share_embedding()  # one rank: starts the decoders
    prompts = [[5, 9, 200, 7], [1, 2, 3, 299]]
    torch.testing.assert_close(_stepwise_logits(half, prompts, 5), _stepwise_logits(full, prompts, 5),
                               rtol=0, atol=1e-5)


def test_a_float16_quantized_model_decodes_with_the_kernels():
    from llama_mp.kernels.decoder import CpuKernelDecoder
    from llama_mp.quant.scheme import parse_scheme
    from llama_mp.runtime.decode import choose_decoder

    cpu_device = torch.device("cpu")
    assert isinstance(choose_decoder("auto", cpu_device, torch.float16, parse_scheme("int8")), CpuKernelDecoder)
    assert not isinstance(choose_decoder("auto", cpu_device, torch.float16), CpuKernelDecoder)
    with pytest.raises(LlamaMPError, match="float32 or bfloat16 weights"):
        choose_decoder("cpu_kernels", cpu_device, torch.float16)
