"""``mofo bench gpu``: the GPU half of the pipeline, timed and checked in one prepared run.

On one GPU (``--size base``: VideoMAE ViT-B, 16 x 224², tubelet 2, patch 16) it times, on
synthetic clips held in memory:

- pretraining steps with ``tube`` and ``mofo`` masks and fine-tuning steps with the ``mean``
  and ``mca`` heads, each in bf16 autocast and in fp32 (``mofo.bench.train.time_model_steps``);
- a few evaluation batches (the evaluation stage's forward: no grad, softmax on the host);
- the data loader with the configured workers, beside the model's clips/s (the real loader
  when ``<results>/<dataset>/manifest.csv`` exists, else the synthetic clips);
- a one-process DDP step under ``torchrun`` (NCCL) and a DeepSpeed step, in their own
  processes (:mod:`mofo.bench.gpu_worker`);
- which attention kernel ``scaled_dot_product_attention`` dispatched to (the profiler's op).

and checks (:mod:`mofo.bench.gpu_checks`): bf16 and fp32 losses agree; the batched
MCA head equals the per-clip computation; a checkpoint written on the GPU loads and resumes
on the CPU. On a machine without a GPU the same command runs every path that has a CPU
equivalent at ``--size tiny`` (DDP with gloo, DeepSpeed on CPU) and names what it skipped.

Results: a markdown table on stdout and in ``<out>/bench-gpu.md``, everything in
``<out>/bench-gpu.json``. Exit status 0 when every check passed and every part ran, 1
otherwise (the failures are listed), 2 for a bad request (e.g. ``--device cuda`` without one).
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mofo.bench.flops import device_peak, parse_peak, utilisation
from mofo.bench.gpu_checks import (
    CheckResult,
    check_bf16_agreement,
    check_checkpoint_to_cpu,
    check_mca_batched,
)
from mofo.bench.gpu_presets import (
    BenchPreset,
    build_finetuner,
    build_pretrainer,
    finetune_batch,
    finetune_heads,
    get_preset,
    pretrain_batch,
)
from mofo.runtime.device import AUTOCAST_DTYPE, uses_autocast

PARTS = ("checks", "train", "sdpa", "eval", "loader", "ddp", "deepspeed")
PRECISIONS = ("bf16", "fp32")
GPU_ONLY = {
    "peak_memory": "peak GPU memory (torch.cuda.max_memory_allocated): GPU only",
    "nccl": "NCCL: GPU only (on the CPU the DDP step uses gloo)",
    "sdpa": "SDPA fused-kernel selection (flash / memory-efficient / cuDNN): GPU only -- "
            "the CPU kernel is listed for reference",
}
SUBPROCESS_TIMEOUT_S = 600  # DeepSpeed on CPU compiles a comm op on first use (minutes)
# Parts not started by then are reported as not run, so that the table is printed before a
# session's `timeout 480` (8 minutes) ends the command.
TIME_LIMIT_S = 450


class BenchRequestError(ValueError):
    """The command cannot run as asked (unknown part, no GPU for ``--device cuda``)."""


@dataclass
class Report:
    """Everything one run measured and checked; ``ok`` is what the exit status reports."""

    info: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    sdpa: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"info": self.info, "ok": self.ok, "rows": self.rows,
                "checks": [c.to_dict() for c in self.checks], "sdpa": self.sdpa,
                "skipped": self.skipped, "errors": self.errors}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first GPU when visible, else the CPU; ``cuda`` without a GPU is an error."""
    if name not in ("auto", "cpu", "cuda"):
        raise BenchRequestError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchRequestError("--device cuda: no CUDA device is visible to torch")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def run_info(preset: BenchPreset, device: torch.device) -> dict[str, Any]:
    """Where the figures come from: date, device, torch / CUDA versions, preset."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": str(device), "gpu": gpu, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "size": preset.name, "model": preset.model,
            "overrides": preset.overrides}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_row(report: Report, part: str, precision: str, timing: dict, device: torch.device,
            note: str = "") -> None:
    """One table row from a timing dict (clips_per_s, step_s, batch, peak_memory_mb and, for
    model steps, gflop_per_clip): achieved TFLOP/s and the share of the device's dense peak
    in ``precision`` (``report.info["peak_tflops"]``, :func:`mofo.bench.flops.device_peak`)."""
    peak = device_peak(report.info["gpu"], precision, report.info["peak_tflops"])
    tflops, share = utilisation(timing.get("gflop_per_clip"), timing.get("clips_per_s"), peak)
    report.rows.append({
        "gflop_per_clip": timing.get("gflop_per_clip"), "tflops": tflops, "peak_pct": share,
        "part": part, "precision": precision, "batch": timing.get("batch"),
        "clips_per_s": timing.get("clips_per_s"), "step_ms": 1000 * timing["step_s"]
        if timing.get("step_s") is not None else None,
        "peak_mb": timing.get("peak_memory_mb") if device.type == "cuda" else None,
        "note": note})


def engine_precision(device: torch.device) -> str:
    """What training runs in with ``engine.precision: auto``: bf16 on GPU, fp32 on CPU."""
    return "bf16" if uses_autocast({"precision": "auto"}, device) else "fp32"


def run_train_part(report: Report, preset: BenchPreset, config: dict, device: torch.device,
                   steps: int) -> None:
    """Pretraining (tube, mofo masks) and fine-tuning (mean, mca heads) steps in bf16 and fp32."""
    from mofo.bench.train import time_model_steps
    from mofo.masking import token_grid
    from mofo.runtime.device import seed_everything
    from mofo.training.finetune import finetune_task
    from mofo.training.mixup import VideoMixup
    from mofo.training.pretrain import pretrain_task

    pre = {**config["pretrain"], "batch_size": preset.pretrain_batch}
    ft = {**config["finetune"], "batch_size": preset.finetune_batch}
    heads = finetune_heads()
    mixer = VideoMixup(ft, heads, token_grid(preset.model), int(preset.model["patch_size"]))
    cases = [(f"pretrain {s}", build_pretrainer, pre,
              pretrain_task(preset.model, bool(pre["normalize_target"])),
              pretrain_batch(preset, config["masking"], s)) for s in ("tube", "mofo")]
    cases += [(f"finetune {h}", lambda p, h=h: build_finetuner(p, h, ft), ft,
               finetune_task(heads, mixer, float(ft["label_smoothing"])),
               finetune_batch(preset)) for h in ("mean", "mca")]
    for name, build, stage_cfg, task, batch in cases:
        for precision in PRECISIONS:
            seed_everything(0)
            engine_cfg = {**config["engine"], "precision": precision}
            timing = time_model_steps(build(preset), task, batch, stage_cfg, engine_cfg,
                                      device, steps)
            note = (f"compiled ({engine_cfg['compile_backend']}), first step "
                    f"{timing['first_step_s']:.1f} s" if engine_cfg["compile"] else "")
            add_row(report, name, precision, timing, device, note)
            free_memory(device)


def sdpa_ops(fn) -> str:
    """The private aten op(s) ``scaled_dot_product_attention`` dispatched to while ``fn`` ran,
    e.g. ``_scaled_dot_product_flash_attention`` (names as the profiler records them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = sorted({e.name.removeprefix("aten::") for e in prof.events()
                    if "scaled_dot_product" in e.name
                    and e.name != "aten::scaled_dot_product_attention"})
    return ", ".join(names) or "none recorded"


@torch.no_grad()
def run_sdpa_part(report: Report, preset: BenchPreset, config: dict,
                  device: torch.device) -> None:
    """The SDPA kernel of the encoder (no mask) and of the MCA head (boolean key mask)."""
    from mofo.runtime.device import autocast_context, to_device

    model = build_finetuner(preset, "mca", config["finetune"]).to(device).eval()
    batch = to_device(finetune_batch(preset, n=2), device)
    inbox = batch["inbox"].bool()
    for precision in PRECISIONS:
        with autocast_context({"precision": precision}, device):
            tokens = model.forward_features(batch["frames"])
            report.sdpa[f"encoder self-attention, {precision}"] = sdpa_ops(
                lambda: model.forward_features(batch["frames"]))
            report.sdpa[f"MCA head (masked keys), {precision}"] = sdpa_ops(
                lambda tokens=tokens: model.pool_head(tokens, inbox))


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: list[dict], device: torch.device) -> int:
    """The evaluation stage's forward on ``batches``: eval mode, no grad, engine precision,
    softmax probabilities copied to the host. Returns the clip count; raises
    ``FloatingPointError`` on a non-finite probability."""
    from mofo.runtime.device import autocast_context, to_device

    model.eval().to(device)
    clips = 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast_context({"precision": "auto"}, device):
            logits = model(batch["frames"], batch["inbox"].bool())
        probs = logits.float().softmax(-1).cpu()
        if not bool(torch.isfinite(probs).all()):
            raise FloatingPointError("evaluation probabilities are not finite")
        clips += int(probs.shape[0])
    return clips


def run_eval_part(report: Report, preset: BenchPreset, config: dict,
                  device: torch.device) -> None:
    """A few evaluation batches (MCA head, engine precision), after one warm-up batch."""
    model = build_finetuner(preset, "mca", config["finetune"])
    batches = [finetune_batch(preset, seed=10 + i) for i in range(preset.eval_batches + 1)]
    evaluate_batches(model, batches[:1], device)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    clips = evaluate_batches(model, batches[1:], device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    add_row(report, "evaluate (mca head, no grad)", engine_precision(device),
            {"clips_per_s": clips / seconds, "step_s": seconds / preset.eval_batches,
             "batch": preset.finetune_batch, "peak_memory_mb": peak}, device,
            f"{preset.eval_batches} batches")


def model_rate(report: Report, part: str, precision: str) -> float | None:
    """clips/s of an already measured row (None when that row did not run)."""
    for row in report.rows:
        if row["part"] == part and row["precision"] == precision:
            return row["clips_per_s"]
    return None


def time_synthetic_loader(preset: BenchPreset, batch_size: int, workers: int,
                          batches: int) -> dict:
    """clips/s a ``DataLoader`` with ``workers`` delivers from the synthetic clips (first
    batch excluded: worker start-up)."""
    from torch.utils.data import DataLoader

    from mofo.bench.synthetic import SyntheticClipDataset

    ds = SyntheticClipDataset((batches + 1) * batch_size, preset.model)
    it = iter(DataLoader(ds, batch_size=batch_size, num_workers=workers))
    next(it)
    t0, clips = time.perf_counter(), 0
    for batch in it:
        clips += int(batch["frames"].shape[0])
    return {"clips_per_s": clips / max(time.perf_counter() - t0, 1e-9), "batch": batch_size}


def run_loader_part(report: Report, preset: BenchPreset, config: dict, device: torch.device,
                    workers: int | None) -> None:
    """The loader's clips/s with the configured workers (``<stage>.num_workers``, or
    ``workers``), beside the model's clips/s at the engine precision."""
    from mofo.bench.train import time_loader
    from mofo.paths import pattern, results_root

    root = results_root(config)
    real = Path(pattern("manifest", root)).exists() and Path(pattern("boxes", root)).parent.exists()
    precision = engine_precision(device)
    for mode, model_part, batch in (("pretrain", "pretrain tube", preset.pretrain_batch),
                                    ("finetune", "finetune mca", preset.finetune_batch)):
        n_workers = int(config[mode]["num_workers"]) if workers is None else workers
        if real:
            timing = time_loader(config, mode, batch, n_workers, preset.loader_batches)
            source = (f"{root} clips at {config['model']['num_frames']} x "
                      f"{config['model']['input_size']}²")
        else:
            timing = time_synthetic_loader(preset, batch, n_workers, preset.loader_batches)
            source = f"synthetic clips (no {pattern('manifest', root)})"
        rate = model_rate(report, model_part, precision)
        beside = (f"model {rate:.1f} clips/s ({model_part}, {precision}): the "
                  f"{'loader' if timing['clips_per_s'] < rate else 'model'} limits"
                  if rate else "model: -")
        add_row(report, f"loader {mode}, {n_workers} workers", "-", {**timing, "batch": batch},
                device, f"{beside}; {source}")


def worker_env() -> dict[str, str]:
    """This environment without rank variables (the worker must not think it is a rank of
    this process) and with the single-node settings torchrun / DeepSpeed need."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch_worker(kind: str, spec: dict, out_dir: Path, timeout_s: int) -> dict:
    """Run :mod:`mofo.bench.gpu_worker` ``kind`` (ddp under torchrun, deepspeed as
    one process); its output goes to ``<out>/<kind>.log``; returns its result JSON."""
    spec_path, result_path = out_dir / f"{kind}-spec.json", out_dir / f"{kind}.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path.unlink(missing_ok=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node=1"] if kind == "ddp" else [sys.executable])
    cmd = [*launcher, "-m", "mofo.bench.gpu_worker", kind, str(spec_path),
           str(result_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=worker_env(), check=False)
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"{kind} worker did not finish in {timeout_s} s") from exc
    (out_dir / f"{kind}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"{kind} worker exited with {proc.returncode} (log: "
                           f"{out_dir / f'{kind}.log'}): {proc.stderr.strip()[-1500:]}")
    return json.loads(result_path.read_text())


def worker_spec(preset: BenchPreset, config: dict, device: torch.device, steps: int) -> dict:
    """What the DDP / DeepSpeed worker needs to rebuild this run's model and batch."""
    return {"preset": preset.name, "device": device.type, "precision": "auto", "steps": steps,
            "threads": torch.get_num_threads(), "masking": config["masking"],
            "stage_cfg": {**config["pretrain"], "batch_size": preset.pretrain_batch},
            "torch_extensions_dir": config["engine"].get("torch_extensions_dir",
                                                         "~/.cache/mofo/torch_extensions")}


DDP_GRAD_RTOL = 1e-4  # world size 1: DDP's all-reduced gradient is the local one (cuDNN's
# weight-gradient kernels may sum in another order from one backward to the next)


def run_launched_part(report: Report, kind: str, preset: BenchPreset, config: dict,
                      device: torch.device, steps: int, out_dir: Path, timeout_s: int,
                      deadline: float) -> None:
    """A DDP (torchrun, world size 1) or DeepSpeed pretraining step in its own process,
    given at most ``timeout_s`` and never past ``deadline`` (``time.perf_counter``)."""
    timeout_s = max(1, min(timeout_s, int(deadline - time.perf_counter())))
    result = launch_worker(kind, worker_spec(preset, config, device, steps), out_dir, timeout_s)
    bad = sum(not math.isfinite(x) for x in result["losses"])
    label = ("DDP step, torchrun world 1" if kind == "ddp" else "DeepSpeed step, ZeRO 0")
    add_row(report, f"{label} ({result['backend']})", engine_precision(device), result, device,
            "pretrain tube")
    report.checks.append(CheckResult(f"{label}: losses finite", bad == 0, float(bad), 0.0,
                                     f"losses {[round(x, 4) for x in result['losses']]}"))
    precision = engine_precision(device)
    want = str(AUTOCAST_DTYPE).removeprefix("torch.") if precision == "bf16" else "off"
    got = result["forward_autocast"]
    report.checks.append(CheckResult(f"{label}: the model's forward runs in {precision}",
                                     got == want, 0.0, 0.0,
                                     f"autocast inside the forward: {got}, expected {want}"))
    if kind == "ddp":
        diff = float(result["grad_max_diff"])
        report.checks.append(CheckResult("DDP gradients == plain backward", diff <= DDP_GRAD_RTOL,
                                         diff, DDP_GRAD_RTOL, "fp32, relative to the largest "
                                         "gradient"))
        if device.type == "cuda":
            report.checks.append(CheckResult("DDP backend is NCCL", result["backend"] == "nccl",
                                             0.0, 0.0, f"backend {result['backend']}"))




def run_part(report: Report, label: str, fn, device: torch.device) -> None:
    """Run one part; an exception is recorded (the other parts still run) and printed."""
    print(f"[mofo bench gpu] {label} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # every part is reported, then the exit status
        import traceback

        traceback.print_exc(file=sys.stderr)
        report.errors.append(f"{label}: {type(exc).__name__}: {exc}")
    finally:
        free_memory(device)
    print(f"[mofo bench gpu] {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
          flush=True)


def plan_parts(report: Report, preset: BenchPreset, config: dict, device: torch.device,
               steps: int, out_dir: Path, workers: int | None, timeout_s: int,
               deadline: float) -> list:
    """``(part, label, fn)`` in the order they run: the checks first (they matter most)."""
    p, c, d = preset, config, device
    return [
        ("checks", "bf16 vs fp32", lambda: report.checks.extend(check_bf16_agreement(p, c, d))),
        ("checks", "MCA batched vs per-clip",
         lambda: report.checks.append(check_mca_batched(p, c, d))),
        ("checks", "checkpoint to CPU",
         lambda: report.checks.extend(check_checkpoint_to_cpu(p, c, d, out_dir))),
        ("train", "training steps", lambda: run_train_part(report, p, c, d, steps)),
        ("sdpa", "SDPA kernels", lambda: run_sdpa_part(report, p, c, d)),
        ("eval", "evaluation", lambda: run_eval_part(report, p, c, d)),
        ("loader", "loader", lambda: run_loader_part(report, p, c, d, workers)),
        ("ddp", "DDP (torchrun)", lambda: run_launched_part(
            report, "ddp", p, c, d, steps, out_dir, timeout_s, deadline)),
        ("deepspeed", "DeepSpeed", lambda: run_launched_part(
            report, "deepspeed", p, c, d, steps, out_dir, timeout_s, deadline)),
    ]


def run_gpu_benchmark(config: dict, device: str = "auto", size: str | None = None,
                      out: str | Path = "results/bench-gpu", steps: int | None = None,
                      skip: tuple[str, ...] = (), workers: int | None = None,
                      timeout_s: int = SUBPROCESS_TIMEOUT_S,
                      time_limit_s: float = TIME_LIMIT_S, peak_tflops: str | None = None) -> Report:
    """Run every part not in ``skip``; print the table; write ``<out>/bench-gpu.{json,md}``
    (also after every part, so a killed run leaves what it measured).

    ``size`` defaults to ``base`` on a GPU and ``tiny`` on the CPU. A part not started within
    ``time_limit_s`` is reported as an error (not run); workers never run past it. Raises
    :class:`BenchRequestError` for a request that cannot run; part failures are not raised
    but recorded in ``Report.errors`` (``Report.ok`` is False then).
    """
    dev = resolve_device(device)
    unknown = sorted(set(skip) - set(PARTS))
    if unknown:
        raise BenchRequestError(f"--skip: unknown part(s) {unknown}; parts are {list(PARTS)}")
    try:
        preset = get_preset(size or ("base" if dev.type == "cuda" else "tiny"))
    except ValueError as exc:
        raise BenchRequestError(str(exc)) from exc
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        peaks = parse_peak(peak_tflops)
    except ValueError as exc:
        raise BenchRequestError(str(exc)) from exc
    report = Report(run_info(preset, dev))
    report.info["peak_tflops"] = peaks
    if dev.type != "cuda":
        report.skipped.extend(GPU_ONLY.values())
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    for part, label, fn in plan_parts(report, preset, config, dev, steps or preset.steps,
                                      out_dir, workers, timeout_s, deadline):
        if part in skip:
            line = f"{part}: skipped by --skip"
            if line not in report.skipped:
                report.skipped.append(line)
        elif time.perf_counter() >= deadline:
            report.errors.append(f"{label}: not run, the time limit of {time_limit_s:g} s "
                                 "was reached")
        else:
            run_part(report, label, fn, dev)
        report.info["seconds"] = round(time.perf_counter() - t0, 1)
        write_outputs(report, out_dir)
    text = write_outputs(report, out_dir)
    print(text, end="")
    return report


def write_outputs(report: Report, out_dir: Path) -> str:
    """Write ``bench-gpu.md`` (returned) and ``bench-gpu.json`` into ``out_dir``."""
    text = format_report(report)
    (out_dir / "bench-gpu.md").write_text(text)
    (out_dir / "bench-gpu.json").write_text(json.dumps(report.to_dict(), indent=1))
    return text


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_report(report: Report) -> str:
    """The markdown a session pastes: header, timing table, SDPA kernels, checks, skipped."""
    i = report.info
    where = i["gpu"] or "CPU"
    m = i["model"]
    header = (f"## mofo bench gpu: size {i['size']} on {where} ({i['device']}), torch "
              f"{i['torch']}, CUDA {i['cuda']}, {i['date']}, {i.get('seconds', '?')} s")
    overrides = f" {i['overrides']}" if i["overrides"] else ""
    model = (f"Model: {m['size']}{overrides}, {m['num_frames']} x "
             f"{m['input_size']}², patch {m['patch_size']}, tubelet {m['tubelet_size']}; "
             f"{i['threads']} torch threads.")
    peaks = ", ".join(f"{k} {v:g}" for k, v in i["peak_tflops"].items()) or (
        "the table in mofo/bench/flops.py" if i["gpu"] else "none known for a CPU (--peak-tflops)")
    lines = [header, "", model, f"FLOPs counted per clip (forward + backward); dense peak "
             f"TFLOP/s: {peaks}.", "",
             "| part | precision | batch | clips/s | step ms | GFLOP/clip | TFLOP/s | % of peak "
             "| peak GPU MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        lines.append(f"| {r['part']} | {r['precision']} | {_fmt(r['batch'])} | "
                     f"{_fmt(r['clips_per_s'])} | {_fmt(r['step_ms'])} | "
                     f"{_fmt(r.get('gflop_per_clip'), 3)} | {_fmt(r.get('tflops'), 3)} | "
                     f"{_fmt(r.get('peak_pct'))} | {_fmt(r['peak_mb'], 0)} | {r['note']} |")
    lines += ["", "SDPA kernels:"] + [f"- {k}: {v}" for k, v in report.sdpa.items()]
    lines += ["", "Checks:"] + [
        f"- {'PASS' if c.passed else 'FAIL'} {c.name}: {c.value:.3g} (tolerance {c.tolerance:.3g})"
        f"{'; ' + c.detail if c.detail else ''}" for c in report.checks]
    lines += ["", "Skipped:"] + ([f"- skipped: {s}" for s in report.skipped] or ["- nothing"])
    if report.errors:
        lines += ["", "Errors:"] + [f"- ERROR {e}" for e in report.errors]
    failed = sum(not c.passed for c in report.checks)
    lines += ["", "Result: OK" if report.ok else
              f"Result: FAILED ({failed} check(s) failed, {len(report.errors)} part(s) errored)"]
    return "\n".join(lines) + "\n"
