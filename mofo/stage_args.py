"""The command line shared by the stage modules (pretrain, finetune, evaluate).

``python -m mofo.training.pretrain|finetune`` and ``python -m mofo.evaluation.evaluate`` all
take ``--config`` overlays, ``--manifest``, ``--results-dir`` and ``--out``; this module owns
those arguments so that neither stage imports the other for them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mofo.paths import pattern, results_root


def stage_arg_parser(description: str) -> argparse.ArgumentParser:
    """Arguments shared by the stage modules' command lines."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="config overlay file(s) merged over config/config.yaml (repeatable)",
    )
    parser.add_argument(
        "--manifest", help="manifest.csv (default <results>/<dataset>/manifest.csv)"
    )
    parser.add_argument(
        "--results-dir", help="dataset results folder (default <results>/<dataset>)"
    )
    parser.add_argument("--out", required=True, help="output folder of this stage")
    return parser


def resolve_paths(config: dict, args: argparse.Namespace) -> tuple[Path, Path]:
    """``(manifest, results_dir)``: the arguments, or the dataset's results folder defaults."""
    root = results_root(config)
    return (
        Path(args.manifest) if args.manifest else Path(pattern("manifest", root)),
        Path(args.results_dir) if args.results_dir else Path(root),
    )
