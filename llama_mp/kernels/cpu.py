"""The CPU decode kernels of csrc/cpu_decode.c: built once with the system C compiler, called via ctypes.

Used on x86-64 CPUs with AVX2 and FMA for models in float32 or bfloat16 (see the C file for why they
are faster). A bfloat16 model then keeps its weights in bfloat16 (half the memory and half the bytes
per token) and computes in float32: its activations and KV cache are float32.
The shared library is compiled on first use (well under a second) into a cache folder keyed by the
source, flags and compiler, so every later run and every rank just loads it. Without a compiler, on
another CPU, or with LLAMA_MP_CPU_KERNELS=0, the model decodes with PyTorch operators instead: the same
math, about half as fast in float32 and far slower in bfloat16 (which PyTorch then computes in). LLAMA_MP_CPU_KERNELS=1 makes their absence an error instead (for tests and benchmarks).
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
from typing import Optional

import torch

from ..errors import LlamaMPError

SOURCE = Path(__file__).with_name("csrc") / "cpu_decode.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
ENV = "LLAMA_MP_CPU_KERNELS"

_loaded: Optional[ctypes.CDLL] = None
_why_not: Optional[str] = None  # set once the library was found unusable


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("LLAMA_MP_CACHE", os.path.join(base, "llama_mp")))


def _build(compiler: str) -> Path:
    """Compile the source unless a library built from the same source, flags and compiler exists."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + [compiler]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # ranks may build at once
    try:
        run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(scratch), "-lm"],
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(run.stderr.strip() or run.stdout.strip())[:400]}")
        os.replace(scratch, target)  # atomic: a reader sees no library or a whole one
    finally:
        scratch.unlink(missing_ok=True)
    return target


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC to use another)")
    lib = ctypes.CDLL(str(_build(compiler)))
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "matvec": ([pointer, pointer, pointer, i64, i64, i64, i64, i64], None),
        "attention_block": ([pointer, i64, i64, i64, pointer, pointer, pointer], None),
        "ffn_block": ([pointer, i64, i64, pointer, pointer, pointer], None),
        "finish": ([pointer, i64, pointer, pointer, pointer], None),
        "embed": ([pointer, pointer, i64, i64, pointer], i64),
        "decode": ([pointer, pointer, i64, i64, i64, pointer, pointer, pointer], i64),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def _setting() -> str:
    return os.environ.get(ENV, "auto").strip().lower()


def _probe() -> None:
    """Load the kernels once per process, or find out why they can't be (kept in `_why_not`)."""
    global _loaded, _why_not
    if _loaded is not None or _why_not is not None:
        return
    if _setting() in ("0", "off", "false", "no"):
        _why_not = f"turned off by {ENV}={_setting()}"
    elif not _cpu_has_avx2_fma():
        _why_not = "this CPU is not x86-64 with AVX2 and FMA"
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


WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on `device` with weights in `dtype` can decode with the kernels (loading them if so)."""
    return device.type == "cpu" and dtype in WEIGHT_DTYPES and library() is not None


# Up to this many rows of x, `project` beats MKL's F.linear on float32 weights on the CPUs we measured
# (at 1 row by 1.6-2x, at 4-8 rows by 3-4x); beyond ~64 rows MKL's blocked matrix product is faster.
# For bfloat16 weights it is always used: PyTorch's own bfloat16 products ran ~100x slower here.
PROJECT_MAX_ROWS = 32


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight.T in float32 for CPU tensors, weight [out, in] contiguous in float32 or
    bfloat16 (kernels loaded)."""
    x = x.float().contiguous()
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
    _loaded.matvec(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], weight.shape[1],
                   weight.shape[0], torch.get_num_threads(), weight.dtype == torch.bfloat16)
    return y
