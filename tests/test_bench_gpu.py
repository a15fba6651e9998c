"""``mofo bench gpu`` on the CPU at the tiny size: every part with a CPU equivalent runs, the
table has its rows, the GPU-only parts are named as skipped, and a failed correctness check
(or a part that errors) makes the command exit non-zero.

The first test starts real ``torchrun`` and DeepSpeed processes; DeepSpeed compiles its CPU
comm op on first use (1-3 min, cached under ``engine.torch_extensions_dir``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mofo import cli
from mofo.bench import gpu as bench_gpu
from mofo.bench import gpu_checks as bench_gpu_checks

EXPECTED_ROWS = [
    "| pretrain tube | bf16 |", "| pretrain tube | fp32 |",
    "| pretrain mofo | bf16 |", "| pretrain mofo | fp32 |",
    "| finetune mean | bf16 |", "| finetune mean | fp32 |",
    "| finetune mca | bf16 |", "| finetune mca | fp32 |",
    "| evaluate (mca head, no grad) | fp32 |",
    "| loader pretrain, 0 workers |", "| loader finetune, 0 workers |",
    "| DDP step, torchrun world 1 (gloo) | fp32 |",
    "| DeepSpeed step, ZeRO 0 (gloo) | fp32 |",
]
EXPECTED_CHECKS = [
    "bf16 vs fp32 loss, pretrain", "bf16 vs fp32 loss, finetune mean",
    "bf16 vs fp32 loss, finetune mca", "MCA batched == per-sample",
    "checkpoint: weights load bit-identical on CPU", "checkpoint: CPU outputs == device outputs",
    "checkpoint: CPU resumes and continues", "DDP gradients == plain backward",
    "DDP step, torchrun world 1: losses finite", "DeepSpeed step, ZeRO 0: losses finite",
    "DDP step, torchrun world 1: the model's forward runs in fp32",
    "DeepSpeed step, ZeRO 0: the model's forward runs in fp32",
]
# Everything but the in-process correctness checks: the failure tests stay fast.
NOT_CHECKS = "train,sdpa,eval,loader,ddp,deepspeed"


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared CPU, OpenMP spinning makes 2 threads slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.distributed
def test_cpu_run_prints_every_row_check_and_skipped_gpu_part(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "mofo.cli", "bench", "gpu", "--device", "cpu", "--size", "tiny",
         "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    for row in EXPECTED_ROWS:
        assert row in table, f"missing row {row!r}:\n{table}"
    for name in EXPECTED_CHECKS:
        assert f"- PASS {name}:" in table, f"check {name!r} did not pass:\n{table}"
    assert "FAIL" not in table and "ERROR" not in table
    for gpu_only in ("peak GPU memory", "NCCL", "SDPA fused-kernel selection"):
        assert any(line.startswith("- skipped: " + gpu_only) for line in table.splitlines())
    assert "encoder self-attention, fp32: _scaled_dot_product" in table
    assert table.rstrip().endswith("Result: OK")
    result = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert result["ok"] and result["info"]["size"] == "tiny" and len(result["rows"]) == 13
    assert all(r["clips_per_s"] > 0 for r in result["rows"])
    assert (tmp_path / "bench-gpu.md").read_text() == table
    # Utilisation (issue 24): every model step has its counted FLOPs and achieved rate; a CPU
    # has no known peak, so its share is empty and the header says how to give one.
    steps = [r for r in result["rows"] if r["part"].startswith(("pretrain", "finetune"))]
    assert len(steps) == 8 and all(r["gflop_per_clip"] > 0 and r["tflops"] > 0 for r in steps)
    assert all(r["peak_pct"] is None for r in result["rows"])
    assert "none known for a CPU (--peak-tflops)" in table
    assert "| GFLOP/clip | TFLOP/s | % of peak |" in table
    loaders = [r["note"] for r in result["rows"] if r["part"].startswith("loader")]
    assert len(loaders) == 2 and all(" limits; " in note for note in loaders), loaders


# DeepSpeed decides whether to switch the caller's autocast off with torch.is_autocast_enabled(),
# which reads the CUDA flag only. Raising that flag (no GPU needed: it is a thread-local switch)
# makes DeepSpeed take, on the CPU, the branch it takes under a GPU run's bf16 autocast.
AS_UNDER_CUDA_AUTOCAST = ("import sys, torch; torch.set_autocast_enabled('cuda', True); "
                          "from mofo.bench.gpu_worker import main; "
                          "sys.exit(main(sys.argv[1:]))")


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["ddp", "deepspeed"])
def test_bf16_training_runs_the_forward_in_bf16_under_each_engine(tmp_path, kind):
    """``engine.precision: bf16`` (on a GPU: auto) must reach the model's forward under
    torchrun and under DeepSpeed. DeepSpeed's engine switches the caller's autocast off unless
    its own config turns ``torch_autocast`` on: the H200 run trained "bf16" in fp32 at half
    the clips/s until ``deepspeed_config`` did."""
    from mofo.config import load_config

    preset = bench_gpu.get_preset("tiny")
    spec = {**bench_gpu.worker_spec(preset, load_config(), torch.device("cpu"), steps=1),
            "precision": "bf16", "threads": 1}
    if kind == "ddp":
        result = bench_gpu.launch_worker(kind, spec, tmp_path, timeout_s=900)
    else:
        spec_path, out = tmp_path / "spec.json", tmp_path / "result.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-c", AS_UNDER_CUDA_AUTOCAST, kind,
                               str(spec_path), str(out)], capture_output=True, text=True,
                              timeout=900, env=bench_gpu.worker_env(), check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(out.read_text())
    assert result["forward_autocast"] == "bfloat16"
    assert all(map(torch.isfinite, torch.tensor(result["losses"])))


def run_cli(tmp_path, *extra: str) -> int:
    return cli.main(["bench", "gpu", "--device", "cpu", "--size", "tiny", "--out",
                     str(tmp_path), *extra])


def test_only_the_checks_pass_and_skipped_parts_are_named(tmp_path, capsys, one_thread):
    assert run_cli(tmp_path, "--skip", NOT_CHECKS) == 0
    out = capsys.readouterr().out
    assert out.count("- PASS ") == 7 and "Result: OK" in out
    for part in NOT_CHECKS.split(","):
        assert f"- skipped: {part}: skipped by --skip" in out


def _broken_mca_reference(original):
    def broken(head, tokens, inbox):
        return original(head, tokens, inbox) + 1e-2  # a mismatch the check must catch

    return broken


@pytest.mark.parametrize("break_what", ["mca", "bf16", "checkpoint"])
def test_a_failed_check_exits_nonzero(tmp_path, capsys, monkeypatch, one_thread, break_what):
    if break_what == "mca":
        monkeypatch.setattr(bench_gpu_checks, "mca_per_sample",
                            _broken_mca_reference(bench_gpu_checks.mca_per_sample))
        failing = "- FAIL MCA batched == per-sample"
    elif break_what == "bf16":
        monkeypatch.setattr(bench_gpu_checks, "BF16_LOSS_RTOL", 0.0)
        monkeypatch.setattr(bench_gpu_checks, "BF16_LOSS_ATOL", 0.0)
        failing = "- FAIL bf16 vs fp32 loss, pretrain"
    else:
        monkeypatch.setattr(bench_gpu_checks, "CKPT_OUTPUT_RTOL", -1.0)
        failing = "- FAIL checkpoint: CPU outputs == device outputs"
    assert run_cli(tmp_path, "--skip", NOT_CHECKS) == 1
    out = capsys.readouterr().out
    assert failing in out and "Result: FAILED" in out
    assert json.loads((tmp_path / "bench-gpu.json").read_text())["ok"] is False


def test_a_part_that_errors_is_reported_and_exits_nonzero(tmp_path, capsys, monkeypatch):
    def boom(*_args, **_kwargs):
        raise RuntimeError("injected evaluation failure")

    monkeypatch.setattr(bench_gpu, "run_eval_part", boom)
    assert run_cli(tmp_path, "--skip", "checks,train,sdpa,loader,ddp,deepspeed") == 1
    out = capsys.readouterr().out
    assert "- ERROR evaluation: RuntimeError: injected evaluation failure" in out
    assert "Result: FAILED (0 check(s) failed, 1 part(s) errored)" in out


def test_bad_requests_exit_2(tmp_path, capsys):
    assert run_cli(tmp_path, "--skip", "nonsense") == 2
    assert "unknown part(s) ['nonsense']" in capsys.readouterr().err
    assert run_cli(tmp_path, "--peak-tflops", "fp16=3") == 2
    assert "precision 'fp16' is not bf16 or fp32" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["bench", "gpu", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_parts_past_the_time_limit_are_reported_as_not_run(tmp_path, capsys):
    assert run_cli(tmp_path, "--time-limit", "0", "--skip",
                   "checks,train,sdpa,loader,ddp,deepspeed") == 1
    out = capsys.readouterr().out
    assert "- ERROR evaluation: not run, the time limit of 0 s was reached" in out
    assert "Result: FAILED" in out and (tmp_path / "bench-gpu.md").read_text() == out
