"""`make gpu-check` (`python -m llama_mp.tools.gpu_check`): everything we check whenever there is a GPU, in
one run that fits in 8 minutes on one H100/H200, with one markdown report.

Steps, each with its own time limit (a step that fails or runs out of time is marked FAILED in the report
and the next one runs; a step the overall budget no longer allows is marked SKIPPED):
1. the environment: torch and CUDA versions, the GPU's name, memory, bfloat16 support;
2. the GPU test lane, `pytest -m gpu tests/gpu`;
3. the GPU's memory bandwidth, measured here: a 4 GiB device-to-device copy timed with CUDA events
   (bytes read plus bytes written, per second: the rate at which a decode step could stream its weights);
4. `llama-mp bench` on the Llama 2 7B and Llama 3.1 8B shapes with random weights, in bfloat16, int8 and
   int4, at batch 1 and 16: tok/s, ms per token (per decode step) and the fraction of the measured
   bandwidth a step reaches (the weight bytes a step reads x steps per second / the copy's rate); after
   each weight format, `--decoder compiled` on the Llama 3.1 8B shape at batch 1, its compile time
   reported apart (not in the dry run: compiling there would be most of its time).

Writes report.md, results.json, pytest.log and bench.log into --out (default $OUT when set, else
build/gpu-check/) and prints the report's tables last. Exits 0 when every step passed, 1 when one failed or
was skipped, 2 without a CUDA device. `--device cpu --dry` runs the same steps on the CPU over a tiny shape, batch 1 only (the lane
with LLAMA_MP_GPU_LANE_ON_CPU=1): a check of this script and its report, never a GPU figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEEDS_GPU = ("gpu-check needs an NVIDIA GPU: torch {torch} sees no CUDA device here (built for CUDA {cuda}). "
             "Run it on a machine with one; `--device cpu --dry` only checks this script on the CPU.")
BUDGET_S = 450.0          # the whole run: 7.5 minutes, under the 8 the check promises
LANE_TIMEOUT_S = 300.0    # pytest -m gpu: ~21 tiny-model tests (Llama 2, 3 and 4) and one torchrun job
BENCH_TIMEOUT_S = 60.0    # one `llama-mp bench` process: start, random weights, 3 timed generations
COPY_GIB = 4              # the bandwidth probe's buffer (twice that in memory: source and destination)
MODELS = ("llama-2-7b", "llama-3.1-8b")
WEIGHTS = ("bf16", "int8", "int4")
BATCHES = (1, 16)
COMPILED_MODEL = "llama-3.1-8b"  # `--decoder compiled` runs on this shape only: each compile takes minutes
COMPILED_BENCH_TIMEOUT_S = 240.0  # compiling (and capturing) every bucket at load, then the timed runs
# The dry run's shape: tiny, so the whole run takes seconds on a CPU.
DRY_SHAPE = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--multiple_of", "32", "--vocab_size", "512"]


@dataclass
class Step:
    """One step of the run as the report shows it."""

    name: str
    status: str = "PASSED"  # PASSED, FAILED or SKIPPED
    seconds: float = 0.0
    detail: str = ""
    data: Dict = field(default_factory=dict)


class Run:
    """The steps so far, the folder they write to and the time left."""

    def __init__(self, out: str, budget_s: float, device: str, dry: bool):
        self.out, self.device, self.dry = out, device, dry
        self.deadline = time.monotonic() + budget_s
        self.steps: List[Step] = []
        os.makedirs(out, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log_path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def step(self, name: str, fn: Callable[[Step], None], needs_s: float = 1.0) -> Step:
        """Run `fn(step)`; an exception marks it FAILED with its message, and the run goes on."""
        s = Step(name)
        if self.left() < needs_s:
            s.status, s.detail = "SKIPPED", f"the run's budget was spent ({self.left():.0f} s left)"
        else:
            started = time.monotonic()
            try:
                fn(s)
            except Exception as e:  # noqa: BLE001 - a failed step is reported, and the next one runs
                s.status, s.detail = "FAILED", f"{type(e).__name__}: {e}".strip()[:500]
            s.seconds = time.monotonic() - started
        self.steps.append(s)
        print(f"[gpu-check] {s.status:<7} {s.name} ({s.seconds:.1f} s) {s.detail[:200]}", file=sys.stderr, flush=True)
        return s

    def command(self, step: Step, argv: Sequence[str], log: str, timeout_s: float, env: Optional[Dict] = None) -> str:
        """Run `argv` with a time limit, append its output to the log `log`; its stdout, or an exception
        (FAILED) if it ran out of time or exited non-zero."""
        limit = max(1.0, min(timeout_s, self.left()))
        started = time.monotonic()
        try:
            done = subprocess.run(list(argv), cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                                  text=True, timeout=limit)
            out, err, code = done.stdout, done.stderr, done.returncode
        except subprocess.TimeoutExpired as e:
            out, err, code = _text(e.stdout), _text(e.stderr), None
        with open(self.log_path(log), "a") as f:
            f.write(f"\n===== {step.name}: {' '.join(argv)}\n"
                    f"===== exit {code if code is not None else f'TIMEOUT after {limit:.0f} s'}, "
                    f"{time.monotonic() - started:.1f} s\n{out}\n----- stderr\n{err}\n")
        if code is None:
            raise RuntimeError(f"ran out of its {limit:.0f} s (log: {log})")
        if code != 0:
            last = [line for line in err.strip().splitlines() if line.strip()][-1:] or ["no message"]
            raise RuntimeError(f"exit {code}: {last[0][:300]} (log: {log})")
        return out


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# --- the steps ------------------------------------------------------------------------------------------------


def environment(step: Step, device: str) -> None:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    else:
        info.update(gpu=f"none (CPU dry run, {os.cpu_count()} cores)", gpus=0)
    step.data = info
    step.detail = f"{info['gpu']}, torch {info['torch']}, CUDA {info['cuda']}"


def test_lane(run: Run, step: Step) -> None:
    if not os.path.isdir(os.path.join(ROOT, "tests", "gpu")):
        raise RuntimeError(f"no tests/gpu/ under {ROOT}: run from a checkout of llama_mp")
    env = {"LLAMA_MP_GPU_LANE_ON_CPU": "1"} if run.device == "cpu" else {}
    try:
        out = run.command(step, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs",
                                 "tests/gpu"], "pytest.log", LANE_TIMEOUT_S, env)
    finally:
        step.data = {"summary": _pytest_summary(run.log_path("pytest.log"))}
    step.detail = step.data["summary"]
    if out and " passed" not in step.detail:
        raise RuntimeError(f"no test passed: {step.detail}")


def _pytest_summary(path: str) -> str:
    """pytest's last summary line ("12 passed, 1 skipped in 80.1s"), or a note that there is none."""
    try:
        lines = [line.strip("= \n") for line in open(path) if " in " in line and
                 any(w in line for w in (" passed", " failed", " error", " skipped"))]
    except OSError:
        return "no pytest output"
    return lines[-1] if lines else "no pytest summary line"


def copy_bandwidth(device: str, gib: float) -> float:
    """Bytes per second moved (read + written) by a copy of `gib` GiB within the device: the best of 5,
    timed with CUDA events on a GPU."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (first-touch, clocks)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return moved / best


def bench_argv(model: str, weights: str, batch: int, device: str, dry: bool, decoder: Optional[str] = None) -> List[str]:
    shape = DRY_SHAPE if dry else ["--model", model]
    quant = {"bf16": [], "int8": ["--quantize", "int8"], "int4": ["--quantize", "int4", "--group_size", "32"]}[weights]
    tokens = ["--prompt_len", "8", "--new_tokens", "32", "--runs", "1"] if dry else \
        ["--prompt_len", "16", "--new_tokens", "64", "--runs", "2"]
    backend = "nccl" if device == "cuda" else "gloo"
    return [sys.executable, "-m", "llama_mp", "bench", *shape, "--dtype", "bfloat16", *quant, "--batch", str(batch),
            *tokens, "--warmup", "1", "--json", "--device", device, "--backend", backend,
            *(["--decoder", decoder] if decoder else [])]


def bench_one(run: Run, step: Step, model: str, weights: str, batch: int, bandwidth: Optional[float],
              decoder: Optional[str] = None) -> None:
    timeout = COMPILED_BENCH_TIMEOUT_S if decoder == "compiled" else BENCH_TIMEOUT_S
    out = run.command(step, bench_argv(model, weights, batch, run.device, run.dry, decoder), "bench.log", timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError("bench printed no JSON line (log: bench.log)")
    r = json.loads(lines[-1])
    steps_per_s = r["decode_tok_s"] / r["batch"]
    step.data = {"model": model, "weights": weights, "batch": batch, "tok_s": r["decode_tok_s"],
                 "ms_per_token": r["ms_per_token"], "weight_bytes_per_step": r["weight_bytes_per_token_per_rank"],
                 "gb_s": r["weight_bytes_per_token_per_rank"] * steps_per_s / 1e9,
                 "bandwidth_fraction": None if not bandwidth else
                 r["weight_bytes_per_token_per_rank"] * steps_per_s / bandwidth,
                 "peak_memory_gib": r["peak_memory_per_rank_gib"][0], "decode_path": r["decode_path"],
                 "device": r["device"], "compile_s": r.get("compile_s", 0.0)}
    step.detail = f"{r['decode_tok_s']:.1f} tok/s, {r['ms_per_token']:.2f} ms/token"
    if r.get("compiled_graphs"):
        step.detail += f", {r['compiled_graphs']} graphs compiled in {r['compile_s']:.1f} s"


# --- the report -----------------------------------------------------------------------------------------------


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def bench_table(steps: List[Step]) -> List[str]:
    rows = ["| model | weights | batch | tok/s | ms/token (a step) | GB read/step | GB/s | of measured bandwidth "
            "| status |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in steps:
        if not s.name.startswith("bench "):
            continue
        d, (model, weights, batch), decoder = s.data, s.name.split()[1:4], s.name.split()[4:]
        model += f" ({decoder[0]})" if decoder else ""
        frac = d.get("bandwidth_fraction")
        rows.append(f"| {model} | {weights} | {batch.removeprefix('batch=')} | {_fmt(d.get('tok_s'), '.1f')} | "
                    f"{_fmt(d.get('ms_per_token'), '.2f')} | "
                    f"{_fmt(d['weight_bytes_per_step'] / 1e9 if d else None, '.2f')} | {_fmt(d.get('gb_s'), '.0f')} | "
                    f"{_fmt(None if frac is None else 100 * frac, '.0f')}{'%' if frac is not None else ''} | "
                    f"{s.status}{': ' + s.detail if s.status != 'PASSED' else ''} |")
    return rows


def write_report(run: Run, argv: Sequence[str]) -> str:
    """report.md and results.json in the run's folder; returns the report's text."""
    env = next((s.data for s in run.steps if s.name == "environment"), {})
    bandwidth = next((s for s in run.steps if s.name == "bandwidth"), None)
    title = "CPU dry run (no GPU figures)" if run.dry else env.get("gpu", "unknown GPU")
    lines = [f"# gpu-check: {title}", "",
             f"Command: `{' '.join(argv)}`; finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "## Steps", "", "| step | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail.replace('|', '/')} |" for s in run.steps]
    lines += ["", "## Decode speed (`llama-mp bench`, random weights)", ""]
    if bandwidth is not None and bandwidth.status == "PASSED":
        gbs = bandwidth.data["bytes_per_s"] / 1e9
        lines += [f"Measured bandwidth: {gbs:.0f} GB/s ({bandwidth.data['gib']} GiB device-to-device copy, bytes "
                  "read + written per second, best of 5). \"Of measured bandwidth\" = weight bytes one decode step "
                  "reads x steps per second / that figure (KV-cache reads, small at these lengths, not counted).",
                  ""]
    lines += bench_table(run.steps)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(run.out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(run.out, "results.json"), "w") as f:
        json.dump({"dry": run.dry, "device": run.device, "steps": [asdict(s) for s in run.steps]}, f, indent=1)
    return text


def check(out: str, device: str, dry: bool, budget_s: float, argv: Sequence[str]) -> int:
    run = Run(out, budget_s, device, dry)
    run.step("environment", lambda s: environment(s, device))
    run.step("pytest -m gpu", lambda s: test_lane(run, s), needs_s=30)

    def measure(s: Step) -> None:
        gib = COPY_GIB if device == "cuda" else 0.25
        s.data = {"bytes_per_s": copy_bandwidth(device, gib), "gib": gib}
        s.detail = f"{s.data['bytes_per_s'] / 1e9:.0f} GB/s"

    bw = run.step("bandwidth", measure)
    bandwidth = bw.data.get("bytes_per_s") if bw.status == "PASSED" else None
    # bfloat16 first for both shapes: if the budget runs short, the figures that matter most are in.
    for weights in WEIGHTS:
        for model in ("tiny",) if dry else MODELS:
            for batch in (1,) if dry else BATCHES:  # the dry run checks the script: one batch is enough
                run.step(f"bench {model} {weights} batch={batch}",
                         lambda s, m=model, w=weights, b=batch: bench_one(run, s, m, w, b, bandwidth), needs_s=20)
        if not dry:  # the compiled decoder at batch 1, its compile time apart (as far as the budget allows)
            run.step(f"bench {COMPILED_MODEL} {weights} batch=1 compiled",
                     lambda s, w=weights: bench_one(run, s, COMPILED_MODEL, w, 1, bandwidth, "compiled"), needs_s=90)
    text = write_report(run, argv)
    print(text.split("## Steps", 1)[1] if "## Steps" in text else text)
    print(f"[gpu-check] report: {os.path.join(out, 'report.md')}", file=sys.stderr)
    return 0 if all(s.status == "PASSED" for s in run.steps) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m llama_mp.tools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "build", "gpu-check"),
                        help="folder for report.md, results.json and the logs (default $OUT, else build/gpu-check)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dry", action="store_true", help="with --device cpu: a tiny shape, to check this script")
    parser.add_argument("--budget_s", type=float, default=BUDGET_S, help="the whole run's time limit (s)")
    args = parser.parse_args(argv)
    if not 1 <= args.budget_s <= 3600:
        parser.error(f"--budget_s must be from 1 to 3600 seconds, got {args.budget_s:g}")
    if args.device == "cpu" and not args.dry:
        parser.error("--device cpu is only a dry run of this script: add --dry")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NEEDS_GPU.format(torch=torch.__version__, cuda=torch.version.cuda or "none"), file=sys.stderr)
        return 2
    return check(args.out, args.device, args.dry, args.budget_s, ["python -m llama_mp.tools.gpu_check", *argv])


if __name__ == "__main__":
    sys.exit(main())
