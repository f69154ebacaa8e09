"""`make gpu-check` (llama_mp/tools/gpu_check.py) on a machine without a GPU: it says it needs one and exits 2;
its report marks failed, timed-out and skipped steps and computes the bandwidth fraction from the bench's
figures; and its CPU dry run goes through every step (the lane included) and writes the report."""

import json
import os
import subprocess
import sys

import pytest
import torch

from llama_mp.tools import gpu_check


def test_without_cuda_it_says_in_one_line_that_it_needs_an_nvidia_gpu_and_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs an NVIDIA GPU" in err and torch.__version__ in err
    assert not os.listdir(tmp_path)  # nothing ran


@pytest.mark.parametrize("argv,says", [(["--device", "cpu"], "add --dry"), (["--budget_s", "0"], "--budget_s must be")])
def test_bad_options_are_refused(capsys, argv, says):
    with pytest.raises(SystemExit) as ended:
        gpu_check.main(argv)
    assert ended.value.code == 2 and says in capsys.readouterr().err


BENCH_JSON = {"decode_tok_s": 160.0, "batch": 16, "ms_per_token": 100.0, "weight_bytes_per_token_per_rank": 2e9,
              "peak_memory_per_rank_gib": [15.0], "decode_path": "PyTorch", "device": "Fake GPU"}


def test_the_report_has_every_step_and_the_fraction_of_the_measured_bandwidth(monkeypatch, tmp_path):
    run = gpu_check.Run(str(tmp_path), budget_s=100, device="cpu", dry=True)
    run.step("environment", lambda s: gpu_check.environment(s, "cpu"))
    run.step("bandwidth", lambda s: s.data.update(bytes_per_s=1e12, gib=4))

    def command(step, argv, log, timeout_s, env=None):
        assert argv[1:4] == ["-m", "llama_mp", "bench"] and "--batch" in argv
        return "loading...\n" + json.dumps(BENCH_JSON) + "\n"

    monkeypatch.setattr(run, "command", command)
    run.step("bench m bf16 batch=16", lambda s: gpu_check.bench_one(run, s, "m", "bf16", 16, 1e12))
    monkeypatch.undo()

    def timed_out(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], 5, output=b"half a line", stderr=b"")

    monkeypatch.setattr(gpu_check.subprocess, "run", timed_out)
    run.step("bench m int8 batch=1", lambda s: gpu_check.bench_one(run, s, "m", "int8", 1, 1e12))
    run.deadline = 0  # the budget is spent: the next step does not start
    run.step("bench m int4 batch=1", lambda s: pytest.fail("a step past the budget ran"), needs_s=20)
    text = gpu_check.write_report(run, ["gpu_check", "--dry"])

    assert text == (tmp_path / "report.md").read_text()
    assert "# gpu-check: CPU dry run (no GPU figures)" in text and "Measured bandwidth: 1000 GB/s" in text
    # 2e9 bytes a step x (160 tok/s / 16 rows = 10 steps/s) = 20 GB/s, 2% of 1000 GB/s
    assert "| m | bf16 | 16 | 160.0 | 100.00 | 2.00 | 20 | 2% | PASSED |" in text
    assert "| m | int8 | 1 | - | - | - | - | - | FAILED: RuntimeError: ran out of its" in text
    assert "| m | int4 | 1 | - | - | - | - | - | SKIPPED: the run's budget was spent" in text
    assert "exit TIMEOUT after" in (tmp_path / "bench.log").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [s["status"] for s in saved["steps"]] == ["PASSED", "PASSED", "PASSED", "FAILED", "SKIPPED"]
    assert saved["steps"][2]["data"]["bandwidth_fraction"] == pytest.approx(0.02)


@pytest.mark.spawn
def test_the_cpu_dry_run_goes_through_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu-check"
    done = subprocess.run([sys.executable, "-m", "llama_mp.tools.gpu_check", "--device", "cpu", "--dry", "--out",
                           str(out)], cwd=gpu_check.ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["bench.log", "pytest.log", "report.md", "results.json"]
    steps = json.loads((out / "results.json").read_text())["steps"]
    assert [s["name"] for s in steps][:3] == ["environment", "pytest -m gpu", "bandwidth"]
    assert len(steps) == 3 + 3 and all(s["status"] == "PASSED" for s in steps), steps
    assert " passed" in steps[1]["detail"] and " failed" not in steps[1]["detail"]
    assert all(s["data"]["tok_s"] > 0 and s["data"]["bandwidth_fraction"] > 0 for s in steps[3:])
    assert "| tiny | int4 | 1 |" in (out / "report.md").read_text() and "| tiny | int4 | 1 |" in done.stdout
