"""FLOPs per clip as the GPU bench counts them, against a hand count, and the peak table."""

from __future__ import annotations

import pytest
import torch

from mofo.bench.flops import device_peak, parse_peak, step_flops, utilisation
from mofo.models.layers import Block

CPU = torch.device("cpu")
FP32 = {"precision": "fp32"}


def hand_count(batch: int, tokens: int, dim: int) -> int:
    """One pre-norm block, forward + backward, 2 FLOPs per multiply-add. Forward: qkv
    ``6 N D^2``, projection ``2 N D^2``, MLP (ratio 4) ``16 N D^2``, attention scores and
    weighted sum ``4 N^2 D``. Backward: twice the forward for every linear layer (the input's
    and the weights' gradients); attention as torch counts its fused kernels, five products
    (the scores recomputed), ``10 N^2 D``."""
    linear = 24 * tokens * dim**2
    return batch * (3 * linear + 4 * tokens**2 * dim + 10 * tokens**2 * dim)


@pytest.mark.parametrize("batch, tokens, dim, heads", [(2, 16, 48, 3), (1, 40, 64, 4)])
def test_one_block_is_counted_as_by_hand(batch, tokens, dim, heads):
    block = Block(dim, heads)
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    flops = step_flops(block, lambda m, b: (m(b).sum(), {}), x, FP32, CPU)
    assert flops == hand_count(batch, tokens, dim)
    assert all(p.grad is None for p in block.parameters())  # counting leaves no gradients


def test_attention_on_the_cpu_is_counted():
    """torch's counter has no formula for the CPU attention kernel; without ours the count
    would be the linear layers alone."""
    block = Block(48, 3)
    x = torch.randn(2, 16, 48, requires_grad=True)
    linear_only = 2 * 3 * 24 * 16 * 48**2
    assert step_flops(block, lambda m, b: (m(b).sum(), {}), x, FP32, CPU) > linear_only


def test_peaks_come_from_the_table_or_the_override():
    assert device_peak("NVIDIA H200", "bf16") == 989.4
    assert device_peak("NVIDIA H100 PCIe", "bf16") == 756.0  # not the SXM figure
    assert device_peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5  # not A10's
    assert device_peak(None, "bf16") is None  # the CPU
    assert device_peak(None, "bf16", parse_peak("2.5")) == 2.5
    assert parse_peak("bf16=900,fp32=60") == {"bf16": 900.0, "fp32": 60.0}
    for bad, message in (("fast", "not a number"), ("fp16=3", "not bf16 or fp32"),
                         ("0", "must be > 0")):
        with pytest.raises(ValueError, match=message):
            parse_peak(bad)


def test_utilisation_is_flops_times_rate_over_peak():
    tflops, share = utilisation(159.0, 293.7, 989.4)
    assert tflops == pytest.approx(46.70, abs=0.01) and share == pytest.approx(4.72, abs=0.01)
    assert utilisation(None, 10.0, 989.4) == (None, None)
    assert utilisation(1.0, 10.0, None) == (0.01, None)
