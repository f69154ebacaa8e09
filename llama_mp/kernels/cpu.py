"""The CPU decode kernels of csrc/cpu_decode.c: built once with the system C compiler, called via ctypes.

Used on x86-64 CPUs with AVX2 and FMA for models in float32 or bfloat16, and for quantized (int8, int4)
models whatever their dtype (see the C file for why they are faster). A bfloat16 model keeps its
weights in bfloat16 (half the memory and half the bytes per token); quantized weights are dequantised
in registers. Precision: a float32 or float16 model computes in float32 throughout (the exact-parity
path). When the model's dtype is bfloat16, the input of every matrix product (x) is rounded to
bfloat16 (round to nearest even) once per call, as PyTorch, Meta's reference and llama.cpp do for
bfloat16 models; weights (bfloat16, or int8 / int4 levels, exact in bfloat16) times bfloat16 x are
exact products and all sums stay float32; norms, rotary, attention, softmax, the residual stream and
the KV cache stay float32 (`project(..., round_x=True)`, and the C decode step by the embedding's dtype).
The source is compiled for five instruction sets: AVX-512 (F, BW, VL, DQ) with AVX512_BF16 (and
AVX512-VNNI), whose vdpbf16ps multiplies bfloat16 pairs (the fast path for bfloat16 models), AVX-512 with
AVX512-VNNI, plain AVX-512, AVX2 + FMA with AVX-VNNI, and AVX2 + FMA; all follow the same rule (those
without AVX512_BF16 round x and use float32 multiply-adds: the same products). The best this CPU runs is
loaded (by /proc/cpuinfo); LLAMA_MP_CPU_ISA=avx512bf16|avx512vnni|avx512|avxvnni|avx2 forces one (for
tests and benchmarks). Products of int8 / int4 weights may instead quantize x to int8 per block of 32
and take integer dot products (vpdpbusd with VNNI, vpmaddubsw on AVX2): LLAMA_MP_CPU_ACTIVATIONS, below,
on by default for int4 where faster (not in a bfloat16 model's multi-row products on the avx512bf16
build); `describe` says which build and which arithmetic run. A library is compiled on first use (about a second) into a cache folder
keyed by the source, flags and compiler, so every later run and every rank just loads it. Without a
compiler, on another CPU, or with LLAMA_MP_CPU_KERNELS=0, the model decodes with PyTorch operators
instead: the same math, about half as fast in float32 and far slower in bfloat16 (which PyTorch then
computes in). LLAMA_MP_CPU_KERNELS=1 makes their absence an error instead (for tests and benchmarks).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import LlamaMPError
from ..quant.scheme import Scheme

SOURCE = Path(__file__).with_name("csrc") / "cpu_decode.c"
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
# The instruction sets a library is built for: the compiler flags, and the /proc/cpuinfo flags the CPU
# must list to run it, best first (the first this CPU runs is loaded).
_AVX512 = (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
           ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"))
# Every CPU with AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4) has AVX512-VNNI too, so that build
# has both; avx512vnni is Cascade Lake and Ice Lake, avxvnni AVX2 machines with AVX-VNNI (Alder Lake on).
_AVX2 = (["-mavx2", "-mfma", "-mf16c"], ("avx2", "fma", "f16c"))
ISAS: Dict[str, Tuple[List[str], Tuple[str, ...]]] = {
    "avx512bf16": (_AVX512[0] + ["-mavx512vnni", "-mavx512bf16"], _AVX512[1] + ("avx512_vnni", "avx512_bf16")),
    "avx512vnni": (_AVX512[0] + ["-mavx512vnni"], _AVX512[1] + ("avx512_vnni",)),
    "avx512": _AVX512,
    "avxvnni": (_AVX2[0] + ["-mavxvnni"], _AVX2[1] + ("avx_vnni",)),
    "avx2": _AVX2,
}
ENV = "LLAMA_MP_CPU_KERNELS"
ISA_ENV = "LLAMA_MP_CPU_ISA"
# int8 / int4 weights: whether products quantize x to int8 per block of 32 and take integer dot
# products ("int8"), or multiply the weights, widened, by x in float ("float"; see csrc's matvec_q).
# "auto" (the default) is int8 for int4 weights and float for int8 ones: measured by teacher forcing
# (docs/quantization.md), int8 activations add 1-4% to int4's |delta log-prob| but 40-50% to int8's.
# For int4, auto takes them only where they are faster: everywhere but a bfloat16 model's products of
# several rows on the avx512bf16 build, whose bfloat16 dot products win there (csrc's matvec).
ACTIVATIONS_ENV = "LLAMA_MP_CPU_ACTIVATIONS"
ACTIVATIONS = ("auto", "int8", "float")
# matvec's int8_x: float activations, int8 ones, int8 ones where faster (csrc's INT8_X_WHERE_FASTER)
FLOAT_X, INT8_X, INT8_X_WHERE_FASTER = 0, 1, 2
# The integer dot product each build uses (csrc's int_dot()).
INT_DOTS = {1: "AVX2 vpmaddubsw", 2: "AVX-VNNI vpdpbusd", 3: "AVX512-VNNI vpdpbusd"}

_loaded: Optional[ctypes.CDLL] = None
_why_not: Optional[str] = None  # set once the library was found unusable


def cpu_flags() -> Tuple[str, ...]:
    """The instruction-set flags /proc/cpuinfo lists (none off x86-64 or where it can't be read)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    try:
        with open("/proc/cpuinfo") as f:
            return tuple(next((line.split() for line in f if line.startswith("flags")), []))
    except OSError:
        return ()


def runnable_isas() -> List[str]:
    """The instruction sets of ISAS this CPU runs, best first."""
    flags = set(cpu_flags())
    return [isa for isa, (_, needs) in ISAS.items() if set(needs) <= flags]


def _cpu_has_avx2_fma() -> bool:
    return "avx2" in runnable_isas()


def chosen_isa() -> str:
    """The instruction set to load: LLAMA_MP_CPU_ISA if set (checked against the CPU), else the best
    this CPU runs. Raises RuntimeError (turned into the kernels' unavailability) where none fits."""
    asked = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    runnable = runnable_isas()
    if asked == "auto":
        if not runnable:
            raise RuntimeError("this CPU is not x86-64 with AVX2 and FMA")
        return runnable[0]
    if asked not in ISAS:
        raise RuntimeError(f"{ISA_ENV}={asked} is not one of {', '.join(ISAS)} (or auto)")
    if asked not in runnable:
        missing = sorted(set(ISAS[asked][1]) - set(cpu_flags()))
        raise RuntimeError(f"{ISA_ENV}={asked} asks for instructions this CPU lacks ({', '.join(missing)})")
    return asked


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("LLAMA_MP_CACHE", os.path.join(base, "llama_mp")))


def _build(compiler: str, isa: str) -> Path:
    """Compile the source for `isa` unless a library built from the same source, flags and compiler exists."""
    flags = FLAGS + ISAS[isa][0]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags + [compiler]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_decode-{isa}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # ranks may build at once
    try:
        run = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(scratch), "-lm"],
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(run.stderr.strip() or run.stdout.strip())[:400]}")
        os.replace(scratch, target)  # atomic: a reader sees no library or a whole one
    finally:
        scratch.unlink(missing_ok=True)
    return target


_variants: Dict[str, ctypes.CDLL] = {}


def load_isa(isa: str) -> ctypes.CDLL:
    """The library built for `isa` (one of ISAS), built if need be; the caller checks the CPU runs it.
    Tests load both variants side by side with this; decoding uses `library()`."""
    if isa in _variants:
        return _variants[isa]
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC to use another)")
    lib = ctypes.CDLL(str(_build(compiler, isa)))
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "matvec": ([pointer, pointer, pointer, pointer, i64, i64, i64, i64, i64, i64, i64, i64], None),
        "quantize_x": ([pointer, i64, i64, pointer, pointer], i64),
        "block_dots": ([pointer, pointer, pointer, i64, i64, i64, i64], None),
        "int_dot": ([], i64),
        "attention_block": ([pointer, i64, i64, i64, pointer, pointer, pointer, pointer, pointer], None),
        "ffn_block": ([pointer, i64, i64, pointer, pointer, pointer], None),
        "finish": ([pointer, i64, pointer, pointer, pointer], None),
        "embed": ([pointer, pointer, i64, i64, pointer], i64),
        "decode": ([pointer, pointer, i64, i64, i64, pointer, pointer, pointer, pointer, pointer], i64),
        "isa_bits": ([], i64),
        "bf16_dot": ([], i64),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    _variants[isa] = lib
    return lib


def _load() -> ctypes.CDLL:
    return load_isa(chosen_isa())


def _setting() -> str:
    return os.environ.get(ENV, "auto").strip().lower()


def _probe() -> None:
    """Load the kernels once per process, or find out why they can't be (kept in `_why_not`)."""
    global _loaded, _why_not
    if _loaded is not None or _why_not is not None:
        return
    if _setting() in ("0", "off", "false", "no"):
        _why_not = f"turned off by {ENV}={_setting()}"
    else:
        try:
            _loaded = _load()
        except Exception as e:  # noqa: BLE001 - any build or load failure means: decode with PyTorch
            _why_not = f"{type(e).__name__}: {e}"
        else:
            return
        if os.environ.get("RANK", "0") == "0" and _setting() not in ("1", "on", "true", "yes"):
            print(f"llama_mp: CPU decode kernels unavailable ({_why_not}); decoding with PyTorch operators, "
                  f"about half as fast. Install gcc (or set CC), point LLAMA_MP_CACHE at a writable folder, or "
                  f"set {ENV}=0 to silence this.", file=sys.stderr, flush=True)


def library(required: bool = False) -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None where they can't be used (the reason is said once, on stderr).
    `required` (or LLAMA_MP_CPU_KERNELS=1) makes their absence an error instead."""
    _probe()
    if _loaded is None and (required or _setting() in ("1", "on", "true", "yes")):
        fix = "Install a C compiler (gcc) or set CC" if _cpu_has_avx2_fma() else "Use another decoder"
        asked = "--decoder cpu_kernels" if required else f"{ENV}={_setting()}"
        raise LlamaMPError(f"{asked} asks for the CPU decode kernels, but they are unusable here: "
                           f"{_why_not}. {fix}, or unset {ENV} and use --decoder auto.")
    return _loaded


def int8_activations(scheme: Optional[Scheme]) -> int:
    """Whether products of weights quantized by `scheme` (None: float weights, never) take x quantized to
    int8, by LLAMA_MP_CPU_ACTIVATIONS (ACTIVATIONS_ENV above), as matvec's int8_x: FLOAT_X, INT8_X, or
    INT8_X_WHERE_FASTER (auto's int4). Raises LlamaMPError for another value."""
    asked = os.environ.get(ACTIVATIONS_ENV, "auto").strip().lower() or "auto"
    if asked not in ACTIVATIONS:
        raise LlamaMPError(f"{ACTIVATIONS_ENV}={asked} is not one of {', '.join(ACTIVATIONS)}: int8 quantizes the "
                           f"inputs of int8 / int4 products per block of 32 for integer dot products (faster, a "
                           f"little further from the float model), float keeps them in float, auto (the default) "
                           f"takes int8 for int4 weights where it is the faster arithmetic and float for int8 ones. Unset it "
                           f"for auto.")
    if scheme is None or asked == "float":
        return FLOAT_X
    if asked == "int8":
        return INT8_X
    return INT8_X_WHERE_FASTER if scheme.mode == "int4" else FLOAT_X


def describe(scheme: Optional[Scheme] = None, lib: Optional[ctypes.CDLL] = None, bfloat16: bool = False) -> str:
    """Which kernels run: the build, and for a quantized model (scheme; `bfloat16`: the model's dtype is
    bfloat16) its products' arithmetic. The one place that says so (bench reports it)."""
    lib = lib or library()
    if lib is None:
        return "none (PyTorch operators)"
    isa = next((name for name, built in _variants.items() if built is lib), "?")
    if scheme is None:
        return f"{isa} build"
    int8_x = int8_activations(scheme)
    if int8_x == INT8_X_WHERE_FASTER and bfloat16 and lib.bf16_dot():
        return (f"{isa} build, int8 activations in single-row products ({INT_DOTS[lib.int_dot()]} integer dot "
                f"products), bfloat16 ones in products of several rows (vdpbf16ps)")
    if int8_x:
        return f"{isa} build, int8 activations, {INT_DOTS[lib.int_dot()]} integer dot products"
    return f"{isa} build, float activations, {scheme.mode} weights widened"


WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
# The model dtypes whose embedding table the kernels read: a quantized model's matrices are int8 or
# int4 whatever its dtype, and only the embedding (and the norms, widened once) stay in it.
EMBEDDING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Weight formats, as csrc/cpu_decode.c numbers them.
F32, BF16, INT8, INT4 = 0, 1, 2, 3


def usable(device: torch.device, dtype: torch.dtype, scheme: Optional[Scheme] = None) -> bool:
    """Whether a model on `device` in `dtype`, its matrices quantized by `scheme` if given, can decode
    with the kernels (loading them if so)."""
    dtypes = WEIGHT_DTYPES if scheme is None else EMBEDDING_DTYPES
    return device.type == "cpu" and dtype in dtypes and library() is not None


def weight_format(weight: torch.Tensor, scheme: Optional[Scheme] = None) -> Tuple[int, int]:
    """(format, group size) of a weight matrix for the C code: float32 or bfloat16 [out, in], or the
    integers of `scheme` (int8 [out, in], int4 packed [out, in / 2])."""
    if scheme is None:
        assert weight.dtype in WEIGHT_DTYPES, weight.dtype
        return (BF16 if weight.dtype == torch.bfloat16 else F32), 0
    assert weight.dtype == scheme.weight_dtype, (weight.dtype, scheme)
    return (INT8, 0) if scheme.mode == "int8" else (INT4, scheme.group_size)


# Up to this many rows of x, `project` beats MKL's F.linear on float32 weights on the CPUs we measured
# (at 1 row by 1.6-2x, at 4-8 rows by 3-4x); beyond ~64 rows MKL's blocked matrix product is faster.
# For bfloat16 and quantized weights it is always used: PyTorch's own bfloat16 products ran ~100x
# slower here, and a quantized matrix would have to be dequantised first.
PROJECT_MAX_ROWS = 32


def project(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor] = None,
            scheme: Optional[Scheme] = None, lib: Optional[ctypes.CDLL] = None, round_x: bool = False,
            int8_x: Optional[bool] = None) -> torch.Tensor:
    """x [..., in] @ W.T in float32 for CPU tensors: W [out, in] contiguous in float32 or bfloat16, or
    quantized by `scheme` with its `scales` (quant/scheme.py's layout). `round_x`: the model's dtype is
    bfloat16, so x is rounded to bfloat16 before the products (the module docstring's rule); otherwise
    x is used as it is (float32 math). `int8_x` (None: `int8_activations(scheme)`): quantized weights take x
    quantized to int8 per block of 32 instead, and integer dot products (round_x then does not apply).
    `lib`: a variant from `load_isa` instead of the loaded kernels."""
    fmt, group = weight_format(weight, scheme)
    in_features = x.shape[-1]
    assert weight.is_contiguous() and weight.shape[1] == (in_features // 2 if fmt == INT4 else in_features)
    if scales is not None:
        assert scales.is_contiguous() and scales.dtype == scheme.scale_dtype
    x = x.float().contiguous()
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32, device="cpu")
    (lib or _loaded).matvec(x.data_ptr(), weight.data_ptr(), None if scales is None else scales.data_ptr(),
                            y.data_ptr(), x.numel() // in_features, in_features, weight.shape[0],
                            torch.get_num_threads(), fmt, group, int(round_x),
                            int(scheme is not None and (int8_activations(scheme) if int8_x is None else int8_x)))
    return y
