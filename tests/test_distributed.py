"""The training loop under torchrun (2 CPU processes, gloo) and under DeepSpeed (CPU).

Both start real subprocesses. DeepSpeed compiles a small C++ op on its first start (minutes);
it is cached under ``~/.cache/mofo/torch_extensions`` (or ``$TORCH_EXTENSIONS_DIR``), which
no test changes, so the session (and every later one) compiles it once. The plain DeepSpeed
run is shared by the two DeepSpeed tests (module fixture ``deepspeed_plain``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.distributed


def run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the subprocess must not think it is a rank of this process
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def summaries(out, world: int) -> list[dict]:
    return [json.loads((out / f"selfcheck-rank{r}.json").read_text()) for r in range(world)]


def weights(out, summary: dict) -> dict[str, torch.Tensor]:
    from mofo.bench.selfcheck import load_weights

    return load_weights(out / summary["weights"])


def initial_weights() -> dict[str, torch.Tensor]:
    from mofo.bench.selfcheck import TINY_MODEL
    from mofo.models.build import build_pretrain_model
    from mofo.runtime.device import seed_everything

    seed_everything(0)
    model = build_pretrain_model(TINY_MODEL, depth=1, decoder_depth=1)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Tensor by tensor: the same names, shapes and values (exactly, by default)."""
    assert sorted(a) == sorted(b)
    differ = [name for name in a if a[name].shape != b[name].shape
              or not torch.allclose(a[name], b[name], rtol=rtol, atol=atol)]
    assert not differ, f"tensors that differ: {differ}"


def assert_trained(final: dict, initial: dict) -> None:
    """Every trained tensor moved away from its initialisation."""
    assert sorted(final) == sorted(initial)
    unchanged = [name for name in final if torch.equal(final[name], initial[name])]
    assert not unchanged, f"tensors left at their initialisation: {unchanged}"


def test_weight_comparison_sees_swapped_and_offsetting_weights():
    """What a sum of all parameters misses, the tensor-by-tensor comparison does not."""
    a = initial_weights()
    swapped = dict(a)
    rows = a["decoder.head.weight"]
    swapped["decoder.head.weight"] = rows[[1, 0, *range(2, len(rows))]]  # two rows swapped
    offset = dict(a)
    w = a["decoder.head.weight"].clone()
    w[0, 0] += 1.0
    w[0, 1] -= 1.0
    offset["decoder.head.weight"] = w
    for other in (swapped, offset):
        with pytest.raises(AssertionError, match="tensors that differ"):
            assert_same_weights(a, other, rtol=1e-6, atol=1e-6)
    assert_same_weights(a, dict(a))


def test_torchrun_two_cpu_processes_train_in_sync(tmp_path):
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "mofo.bench.selfcheck", "--out", str(tmp_path)], timeout=300)
    a, b = summaries(tmp_path, 2)
    assert a["world_size"] == b["world_size"] == 2 and a["backend"] == "gloo"
    # 16 clips / 2 ranks / batch 4 = 2 steps per epoch, 2 epochs
    assert a["steps"] == b["steps"] == 4
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-6)  # all-reduced mean loss
    final = weights(tmp_path, a)
    assert_same_weights(final, weights(tmp_path, b))  # DDP kept every tensor equal
    assert_trained(final, initial_weights())
    assert (tmp_path / "checkpoint.pt").exists()


def deepspeed_selfcheck(out, batch: int, accum: int):
    """``mofo.bench.selfcheck`` under DeepSpeed (one CPU process) into ``out``."""
    run([sys.executable, "-m", "mofo.bench.selfcheck", "--engine", "deepspeed",
         "--batch-size", str(batch), "--accum-steps", str(accum), "--out", str(out)],
        timeout=900)
    return out


@pytest.fixture(scope="module")
def deepspeed_plain(tmp_path_factory):
    """The self-check's DeepSpeed run at its defaults (micro-batches of 4, no accumulation),
    read, not written, by the two DeepSpeed tests: one DeepSpeed start instead of two."""
    return deepspeed_selfcheck(tmp_path_factory.mktemp("deepspeed-plain"), 4, 1)


@pytest.mark.slow
def test_deepspeed_engine_takes_optimizer_steps_on_cpu(deepspeed_plain):
    (s,) = summaries(deepspeed_plain, 1)
    assert s["engine"] == "deepspeed" and s["steps"] == 8 and s["status"] == "finished"
    assert all(math.isfinite(v) for v in s["losses"])
    assert_trained(weights(deepspeed_plain, s), initial_weights())
    final = torch.load(deepspeed_plain / "checkpoint.pt", weights_only=True)
    assert final["global_step"] == 8


def test_ddp_accumulation_all_reduces_once_per_optimizer_step(tmp_path):
    """2 ranks x 1 micro-batch of 4 vs 2 ranks x 2 micro-batches of 2 (accum_steps 2): the same
    clips per optimizer step, so the same weights; DDP's gradient all-reduces (counted by a
    communication hook) happen once per optimizer step, not once per micro-batch."""
    from mofo.bench.selfcheck import load_weights

    probe = os.path.join(os.path.dirname(__file__), "cluster", "accum_probe.py")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         probe, str(tmp_path)], timeout=300)
    ranks = [json.loads((tmp_path / f"accum-rank{r}.json").read_text()) for r in range(2)]
    for rec in ranks:
        plain, acc = rec["plain"], rec["accumulated"]
        assert rec["world_size"] == 2 and plain["steps"] == acc["steps"] == 4
        assert plain["allreduces"] > 0 and acc["allreduces"] == plain["allreduces"]
        assert_same_weights(load_weights(acc["weights"]), load_weights(plain["weights"]),
                            rtol=1e-5, atol=1e-6)
        assert acc["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert_same_weights(load_weights(ranks[0]["accumulated"]["weights"]),
                        load_weights(ranks[1]["accumulated"]["weights"]))


@pytest.mark.slow
def test_deepspeed_accumulation_matches_one_larger_micro_batch(deepspeed_plain, tmp_path):
    """DeepSpeed with gradient_accumulation_steps 2 on micro-batches of 2 trains the same
    weights as micro-batches of 4: its backward divides by the accumulation steps and its
    step() updates only at the window's end."""
    out = {1: deepspeed_plain, 2: deepspeed_selfcheck(tmp_path / "accum2", 2, 2)}
    (plain,), (acc,) = summaries(out[1], 1), summaries(out[2], 1)
    assert plain["steps"] == acc["steps"] == 8
    assert acc["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    final = weights(out[2], acc)
    assert_same_weights(final, weights(out[1], plain), rtol=1e-5, atol=1e-6)
    assert_trained(final, initial_weights())
