"""FLOPs per clip, counted, and the share of a device's peak that a measured rate reaches.

A training step's FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one real
forward + backward of the model and task being timed (matrix products, convolutions and
scaled-dot-product attention; 2 FLOPs per multiply-add; element-wise work is not counted, as
in every published utilisation figure). Counting does not depend on the device or the
precision, so the CPU run prints the same GFLOP per clip as a GPU run of the same sizes.

The peaks are the vendors' dense (no structured sparsity) datasheet figures in TFLOP/s: bf16
on the tensor cores, and plain fp32 (no TF32: torch's default matmul precision is "highest").
``--peak-tflops`` overrides them, e.g. for a GPU not in the table or a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mofo.runtime.device import autocast_context

# name fragment of torch.cuda.get_device_name -> {precision: dense peak TFLOP/s}; the first
# fragment found in the name wins, so the more specific names come first.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp32": 66.9},  # SXM
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.2, "fp32": 82.6},
}


def parse_peak(text: str | None) -> dict[str, float]:
    """``--peak-tflops``: ``"989"`` (every precision) or ``"bf16=989,fp32=67"``; {} for None."""
    if not text:
        return {}
    peaks: dict[str, float] = {}
    for part in str(text).split(","):
        name, sep, value = part.strip().rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--peak-tflops {text!r}: {value!r} is not a number") from None
        if number <= 0:
            raise ValueError(f"--peak-tflops {text!r}: a peak must be > 0")
        for precision in ((name,) if sep else ("bf16", "fp32")):
            if precision not in ("bf16", "fp32"):
                raise ValueError(f"--peak-tflops {text!r}: precision {precision!r} is not "
                                 "bf16 or fp32")
            peaks[precision] = number
    return peaks


def device_peak(gpu_name: str | None, precision: str,
                override: dict[str, float] | None = None) -> float | None:
    """Dense peak TFLOP/s of ``gpu_name`` (None on the CPU) in ``precision``: the override
    first, then :data:`PEAK_TFLOPS`; None when neither knows it."""
    if override and precision in override:
        return override[precision]
    for fragment, peaks in PEAK_TFLOPS.items():
        if gpu_name and fragment in gpu_name:
            return peaks.get(precision)
    return None


# torch's counter knows the GPU attention kernels (flash, memory-efficient, cuDNN) but not the
# CPU one that scaled_dot_product_attention dispatches to here, so a CPU count would leave the
# attention out; these give the CPU kernel the same formula as the GPU ones.
# (torch's counter hands the formulas the tensors' shapes.)
def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def step_flops(model: torch.nn.Module, task: Callable[[torch.nn.Module, Any], tuple],
               batch: Any, engine_cfg: dict, device: torch.device) -> int:
    """FLOPs of one forward + backward of ``task(model, batch)`` (the gradients it leaves are
    cleared). The batch must already be on ``device``."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        with autocast_context(engine_cfg, device):
            loss, _ = task(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def utilisation(gflop_per_clip: float | None, clips_per_s: float | None,
                peak_tflops: float | None) -> tuple[float | None, float | None]:
    """(achieved TFLOP/s, percent of ``peak_tflops``); None where an input is missing."""
    if gflop_per_clip is None or clips_per_s is None:
        return None, None
    tflops = gflop_per_clip * clips_per_s / 1000.0
    return tflops, (100.0 * tflops / peak_tflops if peak_tflops else None)
