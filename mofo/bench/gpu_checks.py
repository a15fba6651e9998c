"""Correctness checks of ``mofo bench gpu``: what must hold on the device, not how fast it runs.

Each check returns a :class:`CheckResult` (name, passed, measured value, tolerance, detail);
none raises on a mismatch, so the benchmark can report every check and then exit non-zero.

- :func:`check_bf16_agreement`: the same batch through the same weights gives the same loss
  under bf16 autocast as in fp32, within ``BF16_LOSS_RTOL`` · |fp32 loss| + ``BF16_LOSS_ATOL``.
- :func:`check_mca_batched`: the batched MCA head (one masked attention over the whole batch)
  equals a per-clip computation with explicit query / key sets, within ``MCA_ATOL``
  (scaled by the largest output), on the device, including the edge cases (every token in the
  box, none, a single one).
- :func:`check_checkpoint_to_cpu`: a run trained on the device stops with
  ``checkpoint-last.pt``; on the CPU the file loads bit-identical weights, gives the device's
  outputs within ``CKPT_OUTPUT_RTOL``, and the training loop resumes from it and continues.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mofo.bench.gpu_presets import (
    BenchPreset,
    build_finetuner,
    build_pretrainer,
    finetune_batch,
    finetune_heads,
    pretrain_batch,
)
from mofo.runtime.device import autocast_context, seed_everything, to_device

BF16_LOSS_RTOL = 2e-2  # bf16 keeps 8 mantissa bits (~0.4 % per value); a loss averages many
BF16_LOSS_ATOL = 1e-3
MCA_ATOL = 1e-4  # fp32, relative to max(1, largest |logit|)
CKPT_OUTPUT_RTOL = 1e-3  # device fp32 vs CPU fp32 outputs, relative to the largest |output|


@dataclass
class CheckResult:
    """One correctness check: ``value`` is the measured error, ``tolerance`` its bound."""

    name: str
    passed: bool
    value: float
    tolerance: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "value": self.value,
                "tolerance": self.tolerance, "detail": self.detail}


@contextlib.contextmanager
def strict_fp32():
    """fp32 matmuls and convolutions without TF32 (cuDNN allows TF32 by default)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@torch.no_grad()
def losses_by_precision(model: torch.nn.Module, task, batch: dict,
                        device: torch.device) -> dict[str, float]:
    """The loss of ``task(model, batch)`` in eval mode under fp32 and under bf16 autocast."""
    model.to(device).eval()
    batch = to_device(batch, device)
    out = {}
    with strict_fp32():
        for precision in ("fp32", "bf16"):
            with autocast_context({"precision": precision}, device):
                loss, _ = task(model, batch)
            out[precision] = float(loss.float().item())
    return out


def check_bf16_agreement(preset: BenchPreset, config: dict, device: torch.device) -> list[CheckResult]:
    """bf16-vs-fp32 loss agreement for pretraining (tube masks) and both fine-tuning heads."""
    from mofo.training.finetune import finetune_task
    from mofo.training.pretrain import pretrain_task

    cases = [("pretrain", lambda: build_pretrainer(preset), pretrain_task(preset.model, True),
              lambda: pretrain_batch(preset, config["masking"], "tube"))]
    for head in ("mean", "mca"):
        cases.append((f"finetune {head}",
                      lambda head=head: build_finetuner(preset, head, config["finetune"]),
                      finetune_task(finetune_heads(), None, 0.0), lambda: finetune_batch(preset)))
    results = []
    for name, build, task, make_batch in cases:
        seed_everything(0)
        model = build()
        losses = losses_by_precision(model, task, make_batch(), device)
        diff = abs(losses["bf16"] - losses["fp32"])
        bound = BF16_LOSS_RTOL * abs(losses["fp32"]) + BF16_LOSS_ATOL
        results.append(CheckResult(
            f"bf16 vs fp32 loss, {name}", math.isfinite(diff) and diff <= bound, diff, bound,
            f"fp32 {losses['fp32']:.5f}, bf16 {losses['bf16']:.5f}"))
        del model
    return results


def mca_per_sample(head: torch.nn.Module, tokens: torch.Tensor, inbox: torch.Tensor):
    """What ``head(tokens, inbox)`` returns (eval mode), computed one clip at a time with
    ``mofo.models.heads.mca_per_sample``: no padding, no attention mask, so on a GPU the
    batched head's packing and masked attention kernels are checked against plain ones."""
    from mofo.models.heads import apply_output_layers
    from mofo.models.heads import mca_per_sample as pooled_per_sample

    return apply_output_layers(head.head, head.fc_norm(pooled_per_sample(head, tokens, inbox)))


def edge_case_inbox(inbox: torch.Tensor) -> torch.Tensor:
    """The batch's in-box flags with rows 0-2 replaced by: all in, none in, a single token."""
    inbox = inbox.bool().clone()
    rows = inbox.shape[0]
    if rows > 0:
        inbox[0] = True
    if rows > 1:
        inbox[1] = False
    if rows > 2:
        inbox[2] = False
        inbox[2, inbox.shape[1] // 2] = True
    return inbox


@torch.no_grad()
def check_mca_batched(preset: BenchPreset, config: dict, device: torch.device) -> CheckResult:
    """The batched MCA head equals :func:`mca_per_sample` on the encoder's tokens (fp32)."""
    seed_everything(0)
    model = build_finetuner(preset, "mca", config["finetune"], head_init_scale=1.0)
    gen = torch.Generator().manual_seed(0)
    for p in model.pool_head.parameters():  # non-trivial norms and biases exercise every term
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.to(device).eval()
    batch = to_device(finetune_batch(preset, n=max(4, min(preset.finetune_batch, 8))), device)
    inbox = edge_case_inbox(batch["inbox"])
    with strict_fp32():
        tokens = model.forward_features(batch["frames"])
        batched = model.pool_head(tokens, inbox)
        looped = mca_per_sample(model.pool_head, tokens, inbox)
    scale = max(1.0, float(batched.abs().max()))
    err = float((batched - looped).abs().max()) / scale
    return CheckResult("MCA batched == per-sample", math.isfinite(err) and err <= MCA_ATOL,
                       err, MCA_ATOL, f"{inbox.shape[0]} clips x {inbox.shape[1]} tokens "
                       f"on {device.type} (incl. all / none / one token in the box)")


def _checkpoint_run(preset: BenchPreset, config: dict, device: torch.device, out_dir: Path,
                    model: torch.nn.Module, max_steps: int, precision: str):
    """``engine.train`` of the pretraining model on ``device`` for 4 steps of one epoch
    (stopping at ``max_steps``), resuming from ``out_dir/checkpoint-last.pt`` when there."""
    from mofo.bench.synthetic import SyntheticClipDataset
    from mofo.runtime.distributed import DistContext, RankInfo
    from mofo.runtime.loader import make_loader
    from mofo.training.engine import train
    from mofo.training.pretrain import pretrain_task

    b = preset.checkpoint_batch
    stage_cfg = {**config["pretrain"], "epochs": 1, "warmup_epochs": 0.5, "batch_size": b,
                 "accum_steps": 1, "checkpoint_every": 1, "log_interval": 1, "seed": 0}
    dataset = SyntheticClipDataset(4 * b, preset.model, mask_ratio=float(config["masking"]["ratio"]))
    loader = make_loader(dataset, b, 0, shuffle=True, seed=0, drop_last=True, distributed=False)
    ctx = DistContext(RankInfo(0, 0, 1, "single"), device, None, "torch")
    return train(model, loader, pretrain_task(preset.model, True), stage_cfg=stage_cfg,
                 engine_cfg={**config["engine"], "precision": precision, "resume": True},
                 ctx=ctx, out_dir=out_dir,
                 hash_config={"bench-gpu-checkpoint": preset.name, "stage": stage_cfg},
                 max_steps=max_steps, stage="bench-gpu-checkpoint")


@torch.no_grad()
def _probe_outputs(model: torch.nn.Module, probe: dict, device: torch.device) -> torch.Tensor:
    """fp32 predictions of the pretraining model on ``probe`` (eval mode), on the CPU."""
    model.to(device).eval()
    with strict_fp32():
        out = model(probe["frames"].to(device), probe["mask"].bool().to(device))
    return out.float().cpu()


def check_checkpoint_to_cpu(preset: BenchPreset, config: dict, device: torch.device,
                            out_dir: str | Path) -> list[CheckResult]:
    """Train 2 steps on ``device`` (engine precision ``auto``), then on the CPU: load the
    checkpoint (bit-identical weights), compare outputs, resume and train steps 3-4."""
    import shutil

    from mofo.paths import LAST_CHECKPOINT
    from mofo.training import resume_state as ckpt_io

    run_dir = Path(out_dir) / "checkpoint-check"
    shutil.rmtree(run_dir, ignore_errors=True)
    seed_everything(0)
    model = build_pretrainer(preset)
    first = _checkpoint_run(preset, config, device, run_dir, model, 2, "auto")
    probe = pretrain_batch(preset, config["masking"], "tube", n=2, seed=5)
    want = _probe_outputs(model, probe, device)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    del model
    seed_everything(1)  # different initial weights: only the checkpoint can make them equal
    cpu_model = build_pretrainer(preset)
    cpu_model.load_state_dict(ckpt_io.load_checkpoint(run_dir / LAST_CHECKPOINT)["model"])
    differing = [k for k, v in cpu_model.state_dict().items() if not torch.equal(v, state[k])]
    got = _probe_outputs(cpu_model, probe, torch.device("cpu"))
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    seed_everything(2)
    resumed = _checkpoint_run(preset, config, torch.device("cpu"), run_dir,
                              build_pretrainer(preset), 4, "fp32")
    continued = resumed.global_step - first.global_step
    ok_resume = (first.status == "stopped" and first.global_step == 2 and continued == 2
                 and len(resumed.losses) == 2 and all(map(math.isfinite, resumed.losses)))
    where = f"written on {device.type}, read on cpu"
    return [
        CheckResult("checkpoint: weights load bit-identical on CPU", not differing,
                    float(len(differing)), 0.0, f"{where}; differing: {differing[:3]}"),
        CheckResult("checkpoint: CPU outputs == device outputs", math.isfinite(err)
                    and err <= CKPT_OUTPUT_RTOL, err, CKPT_OUTPUT_RTOL, f"{where}, fp32"),
        CheckResult("checkpoint: CPU resumes and continues", ok_resume, float(abs(continued - 2)),
                    0.0,
                    f"stopped at step {first.global_step} on {device.type}, resumed on cpu to "
                    f"step {resumed.global_step}, losses {[round(x, 4) for x in resumed.losses]}"),
    ]
