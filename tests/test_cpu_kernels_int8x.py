"""The C kernels' int8-activation path (csrc/cpu_decode.c matvec_q): int8 and int4 weights times x
quantized to int8 per block of 32 (llama.cpp's Q8_0), with integer dot products per block.

Checked against plain torch doing the same arithmetic, on every build this CPU runs (AVX512-VNNI,
AVX-VNNI: vpdpbusd; AVX2: vpmaddubsw): the quantized x bit for bit; the block sums as exact integers
(the kernels' own dot product, and whole products with unit scales, whose float32 sums are exact); and
products with real scales within float32 rounding of the float64 sum of the same integers. A quantized
model decodes step for step as the PyTorch forward whose products take x quantized the same way. Every
build compiles, and the VNNI builds use vpdpbusd, on any x86-64 CPU."""

import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from llama_mp.kernels import cpu as cpu_kernels
from llama_mp.quant.scheme import Scheme, dequantize, pack_int4, quantize

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="the CPU kernels can't be built here")

ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in cpu_kernels.runnable_isas(),
                                                   reason=f"this CPU does not run {isa}"))
        for isa in cpu_kernels.ISAS]
INT_DOT = {"avx512bf16": 3, "avx512vnni": 3, "avx512": 1, "avxvnni": 2, "avx2": 1}
ROWS = (1, 2, 3, 4, 5, 7, 9, 17, 40)  # one (decode), tiles of 4 rows and remainders
OUTS = (1, 7, 13, 66)                 # none a multiple of every tile
EPS = 2.0 ** -24


def blocks_of(n):
    """The kernels' blocks per row: ceil(n / 32), padded to a multiple of 8."""
    return (n + 255) // 256 * 8


def reference_quantize_x(x):
    """(q [rows, blocks, 32] as float, d [rows, blocks]) as Q8_0: d = max|block| / 127, q = round(x * (1 / d))
    (ties to even), zeros past the row; a block with an inf or a NaN gets d = NaN."""
    rows, n = x.shape
    padded = torch.zeros(rows, blocks_of(n) * 32)
    padded[:, :n] = x
    b = padded.view(rows, -1, 32)
    d = b.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(b * inv[..., None])
    bad = ~torch.isfinite(b).all(-1)
    return torch.where(bad[..., None], 0.0, q), torch.where(bad, float("nan"), d)


def quantize_in_c(lib, x):
    rows, n = x.shape
    q = torch.empty(rows, blocks_of(n) * 32, dtype=torch.int8)
    d = torch.empty(rows, blocks_of(n))
    assert lib.quantize_x(x.data_ptr(), rows, n, q.data_ptr(), d.data_ptr()) == blocks_of(n)
    return q.view(rows, -1, 32), d


def int4_nibbles(q):
    """The stored nibbles (q + 8, 0..15) of int4 levels [out, in] (packing as quant/scheme.py does)."""
    return (q.long() + 8)


@pytest.mark.parametrize("isa", ISAS)
def test_x_is_quantized_per_block_of_32_bit_for_bit(isa):
    lib = cpu_kernels.load_isa(isa)
    g = torch.Generator().manual_seed(0)
    for n in (32, 40, 200, 768):
        x = torch.randn(6, n, generator=g) * torch.logspace(-3, 3, 6)[:, None]
        x[1, :32] = 0.0             # a block of zeros: d = 0, q = 0
        x[2, 5] = float("inf")      # non-finite blocks: d = NaN, the output NaN as in float
        x[3, 33 % n] = float("nan")
        x[4] = torch.round(x[4] * 4) / 8  # halves: ties round to even
        q, d = quantize_in_c(lib, x)
        ref_q, ref_d = reference_quantize_x(x)
        finite = torch.isfinite(ref_d)
        assert torch.equal(q.float()[finite], ref_q[finite]), n
        assert torch.equal(d[finite], ref_d[finite]) and bool(torch.isnan(d[~finite]).all()), n
        assert int(q.abs().max()) <= 127


def _int8_weights(out, n, g, extreme=False):
    w = torch.randint(-127, 128, (out, n), generator=g, dtype=torch.int8)
    if extreme:  # the saturation limit of vpmaddubsw's pairs: |w| = 128 (not stored by quantize) and 127
        w[0::2] = -128
        w[1::2] = 127
    return w


@pytest.mark.parametrize("isa", ISAS)
def test_block_sums_are_the_exact_integers(isa):
    """lib.block_dots: each block's sum by the build's dot product (int8: |w| times q with w's sign; int4:
    the stored nibbles times q) equals torch's int64 sum, at the extremes of both operands too."""
    lib = cpu_kernels.load_isa(isa)
    g = torch.Generator().manual_seed(1)
    for fmt, n in (("int8", 40), ("int8", 256), ("int4", 256)):
        for extreme in (False, True):
            x = torch.randn(3, n, generator=g)
            if extreme:
                x = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).repeat(3, 1)  # q = +-127 everywhere
            q, _ = quantize_in_c(lib, x)
            blocks = (n + 31) // 32
            if fmt == "int8":
                w = _int8_weights(5, n, g, extreme)
                levels = w.long()
            else:
                levels = torch.randint(-8, 8, (5, n), generator=g, dtype=torch.int8)
                if extreme:
                    levels[:] = 7
                w = pack_int4(levels)
                levels = int4_nibbles(levels)
            dots = torch.empty(3, 5, blocks, dtype=torch.int32)
            lib.block_dots(q.data_ptr(), w.data_ptr(), dots.data_ptr(), 3, n, 5, 2 if fmt == "int8" else 3)
            padded = torch.zeros(5, blocks * 32, dtype=torch.long)
            padded[:, :n] = levels
            expected = torch.einsum("rbi,obi->rob", q[:, :blocks].long(), padded.view(5, blocks, 32))
            assert torch.equal(dots.long(), expected), (fmt, n, extreme)


def _unit_case(fmt, out, n, g):
    """Integer x (each block's max 127, so d = 1) and weights whose scales are 1: every float32 sum in
    the kernels is an exact integer, so the product must equal torch's int64 product exactly."""
    x = torch.randint(-127, 128, (max(ROWS), n), generator=g).float()
    x[:, ::32] = 127.0
    if fmt == "int8":
        w = _int8_weights(out, n, g)
        return x, w, torch.ones(out), Scheme("int8"), w.long()
    group = int(fmt.split("g")[1])
    levels = torch.randint(-8, 8, (out, n), generator=g, dtype=torch.int8)
    return x, pack_int4(levels), torch.ones(out, n // group, dtype=torch.bfloat16), Scheme("int4", group), levels.long()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g64", "int4-g128"])
def test_every_product_with_unit_scales_is_the_exact_integer_product(isa, fmt):
    lib = cpu_kernels.load_isa(isa)
    g = torch.Generator().manual_seed(2)
    # 16: one partial block; int4 160 and 192: blocks past the last whole four (the wide single-row loop's tail)
    inputs = (16, 32, 40, 200, 768) if fmt == "int8" else (128, 384, 768) + {"int4-g32": (160,), "int4-g64": (192,)}.get(fmt, ())
    for n in inputs:
        for out in OUTS:
            x, w, scales, scheme, levels = _unit_case(fmt, out, n, g)
            for rows in ROWS:
                y = cpu_kernels.project(x[:rows], w, scales, scheme, lib=lib, int8_x=True)
                assert torch.equal(y.double(), (x[:rows].long() @ levels.T).double()), (n, out, rows)


def _check_int8_product(y, x, w, scales, scheme):
    """y is sum_b d_b g_b (sum over block b of q w) for x quantized as Q8_0, within float32 rounding: the
    integers are exact, so the error bound is (blocks + 8) roundings of the magnitudes summed, and for
    int4 of those of the offset term too (the kernels take sum n q - 8 sum q, n the stored nibbles)."""
    q, d = reference_quantize_x(x)
    rows, n = x.shape
    blocks = (n + 31) // 32
    q, d = q[:, :blocks].double(), d[:, :blocks].double()
    if scheme.mode == "int8":
        levels = torch.zeros(w.shape[0], blocks * 32, dtype=torch.float64)
        levels[:, :n] = w.double()
        levels = levels.view(-1, blocks, 32)
        sums = torch.einsum("rbi,obi->rob", q, levels) * d[:, None, :]
        expected = sums.sum(-1) * scales.double()
        magnitude = (torch.einsum("rbi,obi->rob", q.abs(), levels.abs()) * d[:, None, :]).sum(-1) * scales.double()
    else:
        levels = dequantize(w, torch.ones_like(scales), scheme).double().view(w.shape[0], blocks, 32)
        g = scales.double().repeat_interleave(scheme.group_size // 32, dim=1)  # [out, blocks]
        dg = d[:, None, :] * g[None]
        expected = (torch.einsum("rbi,obi->rob", q, levels) * dg).sum(-1)
        magnitude = ((torch.einsum("rbi,obi->rob", q.abs(), levels + 8) + 8 * q.sum(-1).abs()[:, None, :]) * dg).sum(-1)
    bound = 2 * (blocks + 8) * EPS * magnitude + 1e-30
    worst = float(((y.double() - expected).abs() / bound).max())
    assert y.dtype == torch.float32 and y.shape == expected.shape and worst <= 1, worst


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g64", "int4-g128"])
def test_every_product_is_the_quantized_x_times_the_weights_within_float32_rounding(isa, fmt):
    lib = cpu_kernels.load_isa(isa)
    scheme = Scheme("int8") if fmt == "int8" else Scheme("int4", int(fmt.split("g")[1]))
    g = torch.Generator().manual_seed(3)
    for n in (40, 768) if fmt == "int8" else (384, 640):  # 40: a partial block
        for out in (7, 66):
            w, scales = quantize(torch.randn(out, n, generator=g), scheme)
            x = torch.randn(max(ROWS), n, generator=g) * 3
            for rows in ROWS:
                _check_int8_product(cpu_kernels.project(x[:rows], w, scales, scheme, lib=lib, int8_x=True),
                                    x[:rows], w, scales, scheme)
            # leading dims are rows too, and round_x (a bfloat16 model) does not apply: x is quantized from float32
            y = cpu_kernels.project(x[:12].view(3, 4, -1), w, scales, scheme, lib=lib, round_x=True, int8_x=True)
            _check_int8_product(y.view(12, -1), x[:12], w, scales, scheme)


@pytest.mark.parametrize("isa", ISAS)
def test_a_nan_in_x_gives_nan_outputs(isa):
    lib = cpu_kernels.load_isa(isa)
    for n in (64, 256):  # 256, one row: the wide loop
        w, scales = quantize(torch.randn(8, n), Scheme("int4", 32))
        x = torch.randn(2, n)
        x[1, 40] = float("nan")
        y = cpu_kernels.project(x, w, scales, Scheme("int4", 32), lib=lib, int8_x=True)
        assert bool(torch.isfinite(y[0]).all()) and bool(torch.isnan(y[1]).all())
        assert bool(torch.isnan(cpu_kernels.project(x[1:], w, scales, Scheme("int4", 32), lib=lib, int8_x=True)).all())


@pytest.mark.slow  # two compilations: ~15 s on a 2-core machine
def test_the_vnni_builds_compile_and_use_vpdpbusd(tmp_path):
    """The two builds only VNNI CPUs run are compiled here to assembly (-O1, the two at once: this CPU
    may run neither), which must hold vpdpbusd; the builds this CPU runs report their dot product."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        pytest.skip("no C compiler")
    jobs = {isa: subprocess.Popen([compiler, "-O1", "-S", "-fopenmp", *cpu_kernels.ISAS[isa][0], str(cpu_kernels.SOURCE),
                                   "-o", str(tmp_path / f"{isa}.s")], stderr=subprocess.PIPE, text=True)
            for isa in ("avx512vnni", "avxvnni")}
    for isa, job in jobs.items():
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[:2000]
        assert "vpdpbusd" in (tmp_path / f"{isa}.s").read_text(), isa
    for isa in cpu_kernels.runnable_isas():
        assert cpu_kernels.load_isa(isa).int_dot() == INT_DOT[isa]


def test_the_activations_setting_picks_the_path_and_says_which_runs(monkeypatch):
    from llama_mp import LlamaMPError

    int8, int4 = Scheme("int8"), Scheme("int4", 32)
    monkeypatch.delenv(cpu_kernels.ACTIVATIONS_ENV, raising=False)  # auto: int8 x for int4 weights only
    assert cpu_kernels.int8_activations(int4) and not cpu_kernels.int8_activations(int8)
    assert not cpu_kernels.int8_activations(None)
    assert "float activations" in cpu_kernels.describe(int8)
    lib = cpu_kernels.library()
    assert cpu_kernels.describe(int4).endswith(
        f"int8 activations, {cpu_kernels.INT_DOTS[lib.int_dot()]} integer dot products")
    assert cpu_kernels.describe(None) == f"{cpu_kernels.chosen_isa()} build"
    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_ENV, "INT8")
    assert cpu_kernels.int8_activations(int8) and cpu_kernels.int8_activations(int4)
    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_ENV, "float")
    assert not cpu_kernels.int8_activations(int8) and not cpu_kernels.int8_activations(int4)
    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_ENV, "int16")
    with pytest.raises(LlamaMPError, match="LLAMA_MP_CPU_ACTIVATIONS=int16 is not one of auto, int8, float"):
        cpu_kernels.int8_activations(int8)


def fake_quantized_linear(x, matrix):
    """The products' arithmetic in torch: x quantized as Q8_0 and back, times the dequantised matrix."""
    rows = x.reshape(-1, x.shape[-1]).float()
    q, d = reference_quantize_x(rows)
    xq = (q * d[..., None]).reshape(rows.shape[0], -1)[:, :rows.shape[1]]
    return (xq.double() @ matrix.double().T).float().view(*x.shape[:-1], -1)


@pytest.mark.parametrize("quantize_mode,group_size", [("int8", None), ("int4", 32)])
def test_a_quantized_model_decodes_as_the_pytorch_forward_with_int8_activations(
        quantize_mode, group_size, make_checkpoint, tokenizer_path, monkeypatch):
    from llama_mp.runtime.projection import QuantizedProjection
    from test_cpu_kernels_quant import _build, _stepwise_logits

    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_ENV, "int8")
    ckpt_dir, args, _ = make_checkpoint(shards=1, dim=128, n_heads=8, n_kv_heads=2, multiple_of=64)
    prompts = torch.randint(3, args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0)).tolist()
    fast = _build(ckpt_dir, tokenizer_path, "auto", quantize_mode, group_size=group_size)
    assert fast.model.decoder.name == "C kernels"
    got = _stepwise_logits(fast.model, prompts, 4)
    slow = _build(ckpt_dir, tokenizer_path, "pytorch", quantize_mode, group_size=group_size)
    monkeypatch.setattr(QuantizedProjection, "__call__", lambda self, x: fake_quantized_linear(x, self.matrix()))
    expected = _stepwise_logits(slow.model, prompts, 4)
    monkeypatch.undo()
    plain = _stepwise_logits(slow.model, prompts, 4)  # weight-only: x in float
    # x reaches the quantizer through slightly different float sums, so a value on a rounding boundary
    # may round the other way: a few ulps of a level, far below what int8 activations change
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
    assert float((got - expected).abs().mean()) < 0.05 * float((plain - expected).abs().mean())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_auto_takes_int8_activations_for_int4_only_where_they_are_the_faster_arithmetic(monkeypatch):
    """auto's int4 products: integer dot products for single rows (decode) on every build, and for several
    rows except a bfloat16 model's on the avx512bf16 build, whose vdpbf16ps tiles on x rounded to bfloat16
    are faster there (so they give exactly the float-activation path's result)."""
    monkeypatch.delenv(cpu_kernels.ACTIVATIONS_ENV, raising=False)
    int4 = Scheme("int4", 32)
    assert cpu_kernels.int8_activations(int4) == cpu_kernels.INT8_X_WHERE_FASTER
    g = torch.Generator().manual_seed(3)
    w, scales = quantize(torch.randn(40, 256, generator=g), int4)
    x = torch.randn(5, 256, generator=g)
    for isa in cpu_kernels.runnable_isas():
        lib = cpu_kernels.load_isa(isa)
        for rows in (1, 5):
            for round_x in (False, True):
                def product(int8_x):
                    return cpu_kernels.project(x[:rows], w, scales, int4, lib=lib, round_x=round_x, int8_x=int8_x)
                floats = bool(lib.bf16_dot()) and round_x and rows > 1
                assert not torch.equal(product(True), product(False))  # the two arithmetics differ
                assert torch.equal(product(None), product(not floats)), (isa, rows, round_x)
        described = cpu_kernels.describe(int4, lib=lib, bfloat16=True)
        assert ("bfloat16 ones in products of several rows (vdpbf16ps)" in described) == bool(lib.bf16_dot()), isa
