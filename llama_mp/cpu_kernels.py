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
import mmap
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import torch

from .errors import LlamaMPError

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


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None where they can't be used (the reason is said once, on stderr)."""
    global _loaded, _why_not
    if _loaded is not None or _why_not is not None:
        return _loaded
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        _why_not = f"turned off by {ENV}={setting}"
        return None
    if not _cpu_has_avx2_fma():
        _why_not = "this CPU is not x86-64 with AVX2 and FMA"
    else:
        try:
            _loaded = _load()
            return _loaded
        except Exception as e:  # noqa: BLE001 - any build or load failure means: decode with PyTorch
            _why_not = f"{type(e).__name__}: {e}"
    if setting in ("1", "on", "true", "yes"):
        fix = "Install a C compiler (gcc) or unset" if _cpu_has_avx2_fma() else "Unset"
        raise LlamaMPError(f"{ENV}={setting} asks for the CPU decode kernels, but they are unusable here: "
                           f"{_why_not}. {fix} {ENV}.")
    if os.environ.get("RANK", "0") == "0" and _cpu_has_avx2_fma():
        print(f"llama_mp: CPU decode kernels unavailable ({_why_not}); decoding with PyTorch operators, "
              f"about half as fast. Install gcc (or set CC), point LLAMA_MP_CACHE at a writable folder, or "
              f"set {ENV}=0 to silence this.", file=sys.stderr, flush=True)
    return None


WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def wanted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on `device` with weights in `dtype` decodes with the kernels (loading them if so)."""
    return device.type == "cpu" and dtype in WEIGHT_DTYPES and library() is not None


HUGE_PAGE = 2 << 20


def empty_for_streaming(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for data that every decode step reads through (weights, KV cache).

    On a Linux CPU it lives in transparent huge pages (2 MiB instead of 4 KiB, so the page walks of a
    long stream nearly vanish): a plain read measured 27.7 GB/s from huge pages against 21.4 GB/s
    from ordinary ones on our 2-core machine. Elsewhere, or where the kernel says no, a torch.empty."""
    if device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = max(1, torch.Size(shape).numel()) * dtype.itemsize
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        return torch.empty(shape, dtype=dtype, device=device)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % HUGE_PAGE  # align to a huge page
    # The tensor keeps `region` alive; the mapping goes when the tensor does.
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=start)
    return flat.view(dtype)[:torch.Size(shape).numel()].view(shape)


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


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("attention_norm", "ffn_norm", "wqkv", "wo", "w13", "w2", "cache_k", "cache_v")]


class _Model(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_int64) for name in
                 ("dim", "n_layers", "heads", "kv_heads", "head_dim", "hidden", "vocab", "max_rows",
                  "max_seq_len", "threads", "bf16")]
                + [("eps", ctypes.c_float)]
                + [(name, ctypes.c_void_p) for name in ("rotation", "norm", "embedding")]
                + [("vocab_total", ctypes.c_int64), ("layers", ctypes.POINTER(_Layer))]
                + [(name, ctypes.c_void_p) for name in ("x", "qkv", "att", "scores", "ffn", "act")])


class CpuDecoder:
    """Decode steps of one prepared `Transformer` (weights [out, in]) through the C kernels.

    Holds pointers into the model's tensors, so it must be made after the last of them is in place
    (the whole embedding table included) and dropped with the model. `hidden` runs one new token per
    row; with several ranks it sums the partial results between the C calls, like model.py does."""

    def __init__(self, model, sum_across_ranks, ranks: int):
        self.lib = library()
        assert self.lib is not None
        a, first = model.args, model.layers[0]
        att, ffn = first.attention, first.feed_forward
        rows, seq = model.max_batch_size, model.max_seq_len
        self.sum, self.ranks, self.dim = sum_across_ranks, ranks, a.dim
        self.n_layers = a.n_layers
        f32 = dict(dtype=torch.float32)
        qkv_dim = (att.n_local_heads + 2 * att.n_local_kv_heads) * a.head_dim
        hidden = ffn.w13.shape[0] // 2
        self._keep: List[torch.Tensor] = [
            torch.view_as_real(model.rotation).contiguous(),
            *(torch.empty(rows * n, **f32) for n in (a.dim, qkv_dim, att.n_local_heads * a.head_dim,
                                                    att.n_local_heads * seq, 2 * hidden, hidden)),
        ]
        rotation, x, qkv, attn, scores, ffn_buf, act = self._keep

        def norm(weight: torch.Tensor) -> int:  # the C code reads norm weights as float32
            self._keep.append(weight.float().contiguous())
            return _ptr(self._keep[-1])

        self._layers = (_Layer * a.n_layers)(*(
            _Layer(norm(layer.attention_norm.weight), norm(layer.ffn_norm.weight),
                   *(_ptr(t) for t in (layer.attention.wqkv, layer.attention.wo_w, layer.feed_forward.w13,
                                       layer.feed_forward.w2_w, layer.attention.cache_k, layer.attention.cache_v)))
            for layer in model.layers))
        embedding = model.tok_embeddings.weight
        assert embedding.dtype == model.output_w.dtype and embedding.dtype in WEIGHT_DTYPES
        assert all(layer.attention.cache_k.dtype == torch.float32 for layer in model.layers)
        self.model = _Model(
            a.dim, a.n_layers, att.n_local_heads, att.n_local_kv_heads, a.head_dim, hidden, model.output_w.shape[0],
            rows, seq, torch.get_num_threads(), embedding.dtype == torch.bfloat16, a.norm_eps, _ptr(rotation),
            norm(model.norm.weight), _ptr(embedding), embedding.shape[0], self._layers,
            *(_ptr(t) for t in (x, qkv, attn, scores, ffn_buf, act)))
        self.ref = ctypes.byref(self.model)
        self.h = torch.empty(rows, a.dim, **f32)        # the residual stream
        self.partial = torch.empty(rows, a.dim, **f32)  # this rank's share of a row-parallel product

    def hidden(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Final normed hidden states [rows, 1, dim] for one new token per row (tokens [rows, 1], int64)
        at position `pos`, appending to the KV cache."""
        rows = tokens.shape[0]
        if rows > self.model.max_rows or not 0 <= pos < self.model.max_seq_len:  # C checks no bounds
            raise ValueError(f"{rows} rows at position {pos} do not fit the cache of {self.model.max_rows} rows "
                             f"x {self.model.max_seq_len} positions")
        tokens = tokens.long()
        lib, m, h, partial = self.lib, self.ref, _ptr(self.h), self.partial
        out = torch.empty(rows, 1, self.dim, dtype=torch.float32)
        if self.ranks == 1:
            bad = lib.decode(m, tokens.data_ptr(), tokens.stride(0), rows, pos, h, _ptr(partial), out.data_ptr())
        else:
            bad = lib.embed(m, tokens.data_ptr(), tokens.stride(0), rows, h)  # the same ids on every rank
            incoming = None
            for layer in range(self.n_layers if bad < 0 else 0):
                lib.attention_block(m, layer, rows, pos, h, _ptr(incoming), _ptr(partial))
                incoming = self.sum(partial[:rows])
                lib.ffn_block(m, layer, rows, h, _ptr(incoming), _ptr(partial))
                incoming = self.sum(partial[:rows])
            if bad < 0:
                lib.finish(m, rows, h, _ptr(incoming), out.data_ptr())
        if bad >= 0:
            raise IndexError(f"token id {int(tokens[bad, 0])} is outside the vocabulary "
                             f"(0..{self.model.vocab_total - 1})")
        return out
