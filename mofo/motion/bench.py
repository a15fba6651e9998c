"""Speed (frames per second per core) and box agreement of the motion stages.

``run_motion_benchmark(config)`` renders demo clips (``mofo.data.demo.render_clip``, which
also gives ground-truth boxes) at the demo size and at 224 x 298 (the size of the
issue's figure: TV-L1 ~1.3 s per pair, DIS ~10 ms), writes them as H.264 files to time
decoding with decord, then times every flow variant, the motion map and the box rule with
``cv2.setNumThreads(1)`` and decord with one thread: per-core figures, measured as process CPU
time (robust on a shared machine), medians over ``repeats``. For each variant it
also reports the token-grid IoU of its boxes against the boxes of full-resolution TV-L1
(the paper's setting) and the pixel IoU against ground truth.

Timings are printed, never asserted: this is a measuring command, not a test.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from mofo.motion.boundaries import motion_map_from_cfg
from mofo.motion.boxes import boxes_for_clip, scale_boxes
from mofo.motion.flow import compute_flow
from mofo.motion.quality import box_iou_many, token_grid_iou_many


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU seconds of ``fn`` over ``repeats`` runs.

    CPU time of this process (``time.process_time``), not wall time: with one OpenCV thread
    it is the single-core cost, and it stays honest on a machine shared with other jobs,
    where wall time would count the time spent waiting for a core.
    """
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return max(statistics.median(times), 1e-9)


def flow_variants(flow_cfg: dict) -> list[tuple[str, dict]]:
    """(name, flow config) of every option compared: TV-L1 at full and reduced scales
    (0.5, 0.25 and the configured one), DIS (each preset at full scale, medium at 0.5) and
    Farneback at full and half scale."""
    out = [("tvl1@1.0", dict(flow_cfg, method="tvl1", scale=1.0))]
    for s in sorted({0.5, 0.25, float(flow_cfg["scale"])} - {1.0}, reverse=True):
        out.append((f"tvl1@{s:g}", dict(flow_cfg, method="tvl1", scale=s)))
    for preset in ("medium", "fast", "ultrafast"):
        out.append(
            (f"dis-{preset}@1.0", dict(flow_cfg, method="dis", scale=1.0, dis={"preset": preset}))
        )
    out.append(
        ("dis-medium@0.5", dict(flow_cfg, method="dis", scale=0.5, dis={"preset": "medium"}))
    )
    out.append(("farneback@1.0", dict(flow_cfg, method="farneback", scale=1.0)))
    out.append(("farneback@0.5", dict(flow_cfg, method="farneback", scale=0.5)))
    return out


def _decode_fps(clips: list[np.ndarray], fps: float, repeats: int) -> float:
    """Frames per second of decord decoding the clips written as H.264 mp4 (one thread)."""
    import decord

    from mofo.data.video import write_video

    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_video(Path(tmp) / f"c{i}.mp4", c, fps=fps) for i, c in enumerate(clips)]

        def decode_all() -> None:
            for p in paths:
                vr = decord.VideoReader(str(p), num_threads=1)
                vr.get_batch(list(range(len(vr)))).asnumpy()

        seconds = _median_time(decode_all, repeats)
    return sum(len(c) for c in clips) / seconds


def _boxes(flow: np.ndarray, n_frames: int, frame_hw: tuple[int, int], config: dict) -> np.ndarray:
    maps = motion_map_from_cfg(flow, config["motion_map"])
    df = boxes_for_clip(maps, n_frames, config["motion_boxes"])
    return scale_boxes(df, maps.shape[1:], frame_hw)[["x1", "y1", "x2", "y2"]].to_numpy(float)


def _bench_size(
    config: dict, height: int, width: int, n_clips: int, repeats: int, max_pairs: int
) -> dict:
    """All figures for clips rendered at ``height x width`` (at most ``max_pairs`` flow pairs
    per clip, to keep full-size TV-L1 affordable)."""
    from mofo.data.demo import render_clip

    demo_cfg = dict(config["dataset"]["demo"], height=height, width=width)
    clips, gts = [], []
    for i in range(n_clips):
        frames, gt, _ = render_clip(demo_cfg, "train", i)
        n = min(len(frames), max_pairs + 1)
        clips.append(frames[:n])
        gts.append(gt[:n].astype(float))
    n_frames = sum(len(c) for c in clips)
    n_pairs = sum(len(c) - 1 for c in clips)
    model = config["model"]
    res: dict = {
        "size": f"{height}x{width}",
        "clips": n_clips,
        "frames": n_frames,
        "pairs": n_pairs,
    }
    res["decode_fps"] = _decode_fps(clips, float(demo_cfg["fps"]), repeats)

    ref_boxes: list[np.ndarray] = []
    ref_flows: list[np.ndarray] = []
    variants = {}
    for name, fcfg in flow_variants(config["optical_flow"]):
        is_ref = name == "tvl1@1.0"
        reps = 1 if fcfg["method"] == "tvl1" else repeats  # TV-L1 is the slow one; one pass
        holder: dict[str, list[np.ndarray]] = {}

        def run_flow(fcfg: dict = fcfg, holder: dict = holder) -> None:
            holder["flows"] = [compute_flow(c, fcfg) for c in clips]

        seconds = _median_time(run_flow, reps)
        flows = holder["flows"]
        boxes = [_boxes(f, len(c), c.shape[1:3], config) for f, c in zip(flows, clips)]
        entry = {
            "pairs_per_s": n_pairs / seconds,
            "ms_per_pair": 1000 * seconds / n_pairs,
            "grid": f"{flows[0].shape[1]}x{flows[0].shape[2]}",
        }
        entry["gt_iou"] = float(np.mean([box_iou_many(b, g).mean() for b, g in zip(boxes, gts)]))
        if is_ref:
            ref_boxes = boxes
            ref_flows = flows
        entry["token_iou_vs_tvl1_full"] = float(
            np.mean(
                [
                    token_grid_iou_many(
                        b, r, c.shape[1:3], int(model["input_size"]), int(model["patch_size"])
                    ).mean()
                    for b, r, c in zip(boxes, ref_boxes, clips)
                ]
            )
        )
        variants[name] = entry
        print(
            f"  [{res['size']}] {name}: {entry['ms_per_pair']:.1f} ms/pair",
            file=sys.stderr,
            flush=True,
        )
    res["flow"] = variants
    # Motion map and boxes: their cost depends only on the grid, so time them on the
    # configured flow grid (and the map also on the full-size grid).
    cfg_flows = [compute_flow(c, config["optical_flow"]) for c in clips]
    t_map = _median_time(
        lambda: [motion_map_from_cfg(f, config["motion_map"]) for f in cfg_flows], repeats
    )
    maps = [motion_map_from_cfg(f, config["motion_map"]) for f in cfg_flows]
    t_box = _median_time(
        lambda: [boxes_for_clip(m, len(c), config["motion_boxes"]) for m, c in zip(maps, clips)],
        repeats,
    )
    t_map_full = _median_time(
        lambda: [motion_map_from_cfg(f, config["motion_map"]) for f in ref_flows], repeats
    )
    res["motion_map_fps"] = n_pairs / t_map
    res["motion_map_full_res_fps"] = n_pairs / t_map_full
    res["boxes_fps"] = n_frames / t_box
    return res


def run_motion_benchmark(
    config: dict,
    n_clips: int = 4,
    repeats: int = 3,
    big_size: tuple[int, int] = (224, 298),
    big_max_pairs: int = 3,
) -> dict:
    """Measure the motion stages on demo-size clips and on ``big_size`` clips; print a table.

    Returns ``{"threads": 1, "sizes": [per-size dict, ...]}`` (see ``_bench_size``).
    """
    old_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        demo = config["dataset"]["demo"]
        sizes = [
            _bench_size(
                config,
                int(demo["height"]),
                int(demo["width"]),
                n_clips,
                repeats,
                int(demo["num_frames"]) - 1,
            ),
            _bench_size(
                config, big_size[0], big_size[1], max(1, n_clips // 2), repeats, big_max_pairs
            ),
        ]
    finally:
        cv2.setNumThreads(old_threads)
    result = {"threads": 1, "sizes": sizes}
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    """The benchmark as a plain-text table."""
    lines = []
    for s in result["sizes"]:
        lines.append(
            f"\n== {s['size']} frames: {s['clips']} clips, {s['pairs']} flow pairs, "
            "1 thread, CPU time =="
        )
        lines.append(f"decode (decord)        {s['decode_fps']:10.1f} frames/s")
        lines.append(
            f"motion map (cfg grid)  {s['motion_map_fps']:10.1f} frames/s   (full grid {s['motion_map_full_res_fps']:.1f})"
        )
        lines.append(f"boxes (cfg grid)       {s['boxes_fps']:10.1f} frames/s")
        lines.append(
            f"{'flow variant':22s} {'grid':>8s} {'ms/pair':>10s} {'pairs/s':>9s} {'tokIoU vs TV-L1@1':>18s} {'IoU vs GT':>10s}"
        )
        for name, e in s["flow"].items():
            lines.append(
                f"{name:22s} {e['grid']:>8s} {e['ms_per_pair']:10.1f} {e['pairs_per_s']:9.1f} "
                f"{e['token_iou_vs_tvl1_full']:18.3f} {e['gt_iou']:10.3f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m mofo.motion.bench [n_clips] [repeats]
    from mofo.config import load_config

    args = [int(a) for a in sys.argv[1:3]]
    run_motion_benchmark(load_config(), *args)
