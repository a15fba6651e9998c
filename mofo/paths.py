"""The results layout: where every stage's files lie under a dataset's results folder.

One owner per fact (issue 25): the rules (``rules/*.smk``, through ``P`` / ``filled`` in
``rules/common.smk``), the workflow scripts, the stage modules and the resume check
(``mofo.runtime.data.input_files``) all take their results paths from here, so each path is
spelled once, and the DAG and the resume check cannot disagree about what a training stage
reads (:func:`training_inputs` is the one list both use).

``LAYOUT`` maps a name to a pattern relative to the dataset's results folder
(:func:`results_root`: ``<results_dir>/<dataset name>``), with the DAG's wildcards
``{shard}`` (:func:`shard_name`), ``{masking}`` (a pretraining name, ``scratch`` or
``random``), ``{head}`` and ``{seed}``. ``BESIDE`` names the files that a writer puts beside
another and names from that one path (a frame store's pack, index and decode status beside
its prefix; the raw-flow boxes and the box report beside the boxes CSV), so the writers
(``mofo.formats.framestore``, ``mofo.data.decode``, ``mofo.motion.boxes``) and the rules
name them the same way. The names of the files inside a run folder are constants below.

Changing a pattern here moves that file for the whole pipeline; the files of earlier runs
then no longer count (tests/test_paths.py dry-runs the DAG with a changed layout).

Layer 0: the standard library only.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable, Mapping
from typing import Any

#: name -> path pattern relative to the dataset's results folder.
LAYOUT: dict[str, str] = {
    "manifest": "manifest.csv",
    # decode: a frame store per shard, named by its prefix (files: BESIDE below)
    "frames": "frames/{shard}",
    # optical_flow: the dense flow (temporary unless optical_flow.keep), the picture clips'
    # flow and every clip's pooled flow (mgmae masking; mofo.formats.tokenflow)
    "flow": "flow/{shard}.npz",
    "picture_flow": "flow/{shard}.pictures.npz",
    "pooled_flow": "flow/{shard}.pooled.npz",
    "trajectories": "trajectories/{shard}.npz",  # MME's target
    "motion_map": "motion_map/{shard}.npz",
    "raw_flow_map": "motion_map/{shard}.rawflow.npz",
    "boxes": "boxes/{shard}.csv",  # raw-flow boxes and report: BESIDE below
    "motion_pictures": "motion/pictures/{shard}",
    "box_quality": "motion/box_quality.json",
    # run folders (files: the constants below)
    "pretrain": "pretrain/{masking}/s{seed}",
    "finetune": "finetune/{masking}-{head}/s{seed}",
    "eval": "eval/{masking}-{head}/s{seed}",
    "features": "features/{masking}/s{seed}",
    "probe": "probe/{masking}/s{seed}",
    "table": "table.csv",
    "table_md": "table.md",
    "table_seeds": "table_seeds.csv",
    # snakemake --report: copies and figures of what the stages wrote
    "report_pretrain": "report/pretrain-{masking}/s{seed}",
    "report_variant": "report/{masking}-{head}/s{seed}",
    "report_table": "report/table.png",
    # Snakemake's logs and benchmarks (their per-rule names are in the rules), the workflow's
    # MLflow record, `mofo clip`'s output folder
    "logs": "logs",
    "benchmarks": "benchmarks",
    "workflow_run": "tracking/workflow_run.json",
    "clip": "clips/{clip}",
}

#: name -> (the LAYOUT name it lies beside, the suffix of that path it replaces, its suffix):
#: files a writer is not given a path for but derives from another (see :func:`beside`).
BESIDE: dict[str, tuple[str, str, str]] = {
    "frames_pack": ("frames", "", ".jpgpack"),  # mofo.formats.framestore
    "frames_index": ("frames", "", ".index.csv"),
    "frames_status": ("frames", "", ".status.csv"),  # mofo.data.decode
    "raw_flow_boxes": ("boxes", ".csv", ".rawflow.csv"),  # mofo.motion.boxes
    "boxes_report": ("boxes", ".csv", ".report.json"),
}

# Files inside a run folder (LAYOUT's pretrain / finetune / eval / features / probe and the
# report folders).
CHECKPOINT = "checkpoint.pt"  # the final weights: a training rule's output
LAST_CHECKPOINT = "checkpoint-last.pt"  # the resumable state (not a declared output)
METRICS_LOG = "metrics.jsonl"  # a training run's records (not a declared output)
LABEL_SUBSET = "label_subset.csv"  # fine-tuning on a share of the labels: the clips it used
VALIDATION = "validation.json"  # pretraining's held-out reconstruction
RECONSTRUCTIONS = "reconstructions"  # pretraining's pictures (a folder)
METRICS = "metrics.json"  # evaluation and probe results
PREDICTIONS = "predictions.csv"  # evaluation, one row per clip
CONFUSION = "confusion.png"  # evaluation's confusion matrix; also the report's copy
CURVES = "curves.png"  # the report's training curves
FEATURES = "{split}.npz"  # features of one split (train, validation)

#: The ``{shard}`` wildcard's values (:func:`shard_name`).
SHARD_PREFIX = "shard-"
SHARD_WILDCARD = SHARD_PREFIX + r"\d{4}"


def shard_name(index: int) -> str:
    """``3`` -> ``"shard-0003"``: a shard's name in every per-shard path."""
    return f"{SHARD_PREFIX}{int(index):04d}"


def shard_index(name: str | int) -> int:
    """``"shard-0003"`` (or 3) -> 3."""
    if isinstance(name, int):
        return name
    text = str(name)
    digits = text[len(SHARD_PREFIX):]
    if not text.startswith(SHARD_PREFIX) or not digits.isdigit():
        raise ValueError(f"not a shard name: {name!r} (expected shard-0000 style)")
    return int(digits)


def results_root(config: Mapping[str, Any]) -> str:
    """``<results_dir>/<dataset name>``: the folder every LAYOUT pattern is relative to."""
    return f"{config['results_dir']}/{config['dataset']['name']}"


def _relative(key: str) -> str:
    if key in BESIDE:
        base, old, new = BESIDE[key]
        return _relative(base).removesuffix(old) + new
    if key not in LAYOUT:
        raise KeyError(f"no results path named {key!r} (mofo.paths LAYOUT / BESIDE: "
                       f"{sorted({**LAYOUT, **BESIDE})})")
    return LAYOUT[key]


def wildcards(key: str, file: str = "") -> list[str]:
    """The wildcard names of a pattern (and of ``file`` inside it), in order."""
    text = _relative(key) + (f"/{file}" if file else "")
    return list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(text) if name))


class _Keep(dict):
    def __missing__(self, name: str) -> str:
        return "{" + name + "}"


def pattern(key: str, root: str | os.PathLike = "", *, file: str = "", **fixed: Any) -> str:
    """The path of ``key`` (a LAYOUT or BESIDE name) under ``root`` ("" = relative to the
    results folder), with ``file`` inside it (a run folder's file), the wildcards in
    ``fixed`` filled and the others left as ``{name}`` (a Snakemake pattern).

    >>> pattern("boxes", "results/demo")
    'results/demo/boxes/{shard}.csv'
    >>> pattern("pretrain", file=CHECKPOINT, masking="tube", seed=0)
    'pretrain/tube/s0/checkpoint.pt'
    """
    names = wildcards(key, file)
    unknown = sorted(set(fixed) - set(names))
    if unknown:
        raise KeyError(f"results path {key!r} has no wildcard {unknown} (it has {names})")
    rel = _relative(key) + (f"/{file}" if file else "")
    rel = rel.format_map(_Keep({name: str(value) for name, value in fixed.items()}))
    root = os.fspath(root)
    return f"{root}/{rel}" if root else rel


def beside(path: str | os.PathLike, key: str) -> str:
    """The BESIDE file ``key`` of a concrete ``path`` of the file it lies beside:
    ``beside("out/frames/shard-0000", "frames_pack")`` -> ``out/frames/shard-0000.jpgpack``;
    ``beside("r/boxes/shard-0001.csv", "boxes_report")`` -> ``r/boxes/shard-0001.report.json``."""
    _, old, new = BESIDE[key]
    return os.fspath(path).removesuffix(old) + new


def base_of(path: str | os.PathLike, key: str) -> str:
    """The inverse of :func:`beside`: the path that BESIDE file ``key`` at ``path`` lies beside
    (``base_of(".../shard-0000.status.csv", "frames_status")`` -> ``.../shard-0000``)."""
    _, old, new = BESIDE[key]
    text = os.fspath(path)
    if not text.endswith(new):
        raise ValueError(f"{text}: not a {key!r} path (it ends in {new!r})")
    return text.removesuffix(new) + old


def sibling(path: str | os.PathLike, key: str, other: str) -> str:
    """From ``path`` of BESIDE file ``key`` to its BESIDE sibling ``other`` (the same base):
    a frame pack's index, ``sibling(".../shard-0000.jpgpack", "frames_pack", "frames_index")``."""
    if BESIDE[other][0] != BESIDE[key][0]:
        raise ValueError(f"{other!r} does not lie beside what {key!r} lies beside")
    return beside(base_of(path, key), other)


def training_inputs(root: str | os.PathLike, shards: Iterable[str], *, boxes: bool = True,
                    trajectories: bool = False, pooled_flow: bool = False
                    ) -> dict[str, str | list[str]]:
    """What a training stage reads from the results folder, by input name: the manifest, every
    shard's frame pack, and (``boxes``) motion boxes, (``trajectories``) MME's trajectory
    files, (``pooled_flow``) the pooled flow of a flow-guided masking. The rules declare it as
    their inputs (``unpack``), and the resume check digests the same list
    (``mofo.runtime.data.input_files``, a frame pack by its index). ``root`` "" names the files
    relative to the results folder."""
    shards = list(shards)

    def each(key: str) -> list[str]:
        return [pattern(key, root, shard=shard) for shard in shards]

    inputs: dict[str, str | list[str]] = {"manifest": pattern("manifest", root),
                                          "frames": each("frames_pack")}
    if boxes:
        inputs["boxes"] = each("boxes")
    if trajectories:
        inputs["trajectories"] = each("trajectories")
    if pooled_flow:
        inputs["pooled_flow"] = each("pooled_flow")
    return inputs
