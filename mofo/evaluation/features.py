"""Stage entry point: pooled encoder features per clip, for probes and for users' own use.

``run(config, manifest_path, results_dir, source, out_dir, splits, seed)`` embeds every
decoded clip of each split with a pretraining encoder and writes one file per split,
``<out_dir>/<split>.npz``.

The encoder is ``source``: a pretraining checkpoint (ours, an official VideoMAE / MOFO file
or a Hugging Face folder; its ``encoder.*`` weights, the decoder is dropped), or ``random``:
the pretraining model's own initialisation under ``seed`` (the same weights a pretraining run
with that seed starts from; None = the first of the config's ``seeds``, as for pretraining),
the reference row of the probes.

One view per clip, deterministic, as evaluation's single view: the temporal view of
``augment.test_clips = 1`` (the middle frame of each segment, or the centred window for dense
sampling; ``augment.finetune_sampling``), the short side resized to ``model.input_size`` and
the centre square crop. No box files are read (``with_boxes=False``): only decoded frames.

Feature = the mean over all ``N = t x h x w`` tokens (nothing masked) of the encoder's output
after its final LayerNorm (the pretraining encoder's ``norm``), float32 ``(D,)``, the mean taken
over the float32 tokens.

With ``probe.attentive.enabled`` the file also keeps those tokens themselves, the attentive
probe's input: float16 ``(N_clips, t*h*w, D)`` in token order (t, h, w), and ``meta`` holds the
grid ``token_grid`` ``[t, h, w]`` (always). Its size is ``N_clips x T x D x 2`` bytes, held in
memory while a split is embedded: ~6 MB for the demo's train split, but SSV2 train with ViT-B is
169k x 1568 x 768 x 2 B ~ 400 GB, which is why the real-data overlays may switch it off.

File layout: :mod:`mofo.formats.featurefile` (one row per clip: clip_id, label, split,
features, optional tokens; ``meta`` JSON).

``python -m mofo.evaluation.features --checkpoint <ckpt | random> --out <dir>`` is the CLI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mofo.config import load_config
from mofo.formats.featurefile import FeatureTable, write_features
from mofo.models.build import build_encoder, build_pretrain_model
from mofo.models.checkpoint import load_pretrained, pretrained_meta
from mofo.models.vit import VideoEncoder
from mofo.paths import FEATURES
from mofo.provenance import RANDOM_ENCODER
from mofo.runtime import data as data_io
from mofo.runtime.device import autocast_context, seed_everything, to_device
from mofo.runtime.distributed import apply_cpu_threads, rank_info, select_device
from mofo.stage_args import resolve_paths, stage_arg_parser

RANDOM = RANDOM_ENCODER  # --checkpoint random: the initial weights, no checkpoint
POOLING = "mean over all tokens of the encoder output after its final LayerNorm"


def load_encoder(config: dict, source: str | Path,
                 seed: int | None = None) -> tuple[VideoEncoder, dict]:
    """The encoder (final LayerNorm kept) for ``source``, and what it is (``meta``);
    ``seed`` only matters for ``random`` (module doc)."""
    model_cfg = config["model"]
    if str(source) == RANDOM:
        seed = int(config["seeds"][0] if seed is None else seed)
        seed_everything(seed)  # as mofo.training.pretrain does before building its model
        encoder = build_pretrain_model(model_cfg).encoder
        return encoder, {"source": RANDOM, "encoder": RANDOM, "seed": seed}
    encoder = build_encoder(model_cfg, final_norm=True)
    report = load_pretrained(encoder, source)
    masking = pretrained_meta(source).get("masking", "external")  # official files: no meta
    return encoder, {"source": str(source), "encoder": masking,
                     "checkpoint_format": report.checkpoint_format}


@torch.no_grad()
def pooled_features(encoder: VideoEncoder, loader, device: torch.device, engine_cfg: dict,
                    keep_tokens: bool = False
                    ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Clip ids, float32 ``(clips, D)`` features (the mean of the float32 tokens) and, with
    ``keep_tokens``, float16 ``(clips, t*h*w, D)`` tokens (order t, h, w; else None), in loader
    order."""
    encoder.eval().to(device)
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    token_chunks: list[np.ndarray] = []
    for batch in tqdm(loader, desc="features", file=sys.stderr, leave=False):
        batch = to_device(batch, device)
        with autocast_context(engine_cfg, device):
            tokens = encoder.forward_features(batch["frames"])
        tokens = tokens.float()
        chunks.append(tokens.mean(dim=1).cpu().numpy())
        if keep_tokens:
            token_chunks.append(tokens.half().cpu().numpy())
        ids.extend(batch["clip_id"])
    kept = np.concatenate(token_chunks) if keep_tokens else None
    return ids, np.concatenate(chunks).astype(np.float32), kept


def run(config: dict, manifest_path: str | Path, results_dir: str | Path, source: str | Path,
        out_dir: str | Path, splits: tuple[str, ...] = ("train", "validation"),
        seed: int | None = None) -> dict[str, Path]:
    """Embed every decoded clip of each of ``splits`` (with their tokens when
    ``probe.attentive.enabled``); returns ``{split: <out_dir>/<split>.npz}``."""
    probe_cfg, engine_cfg = config["probe"], config["engine"]
    keep_tokens = bool(probe_cfg["attentive"]["enabled"])
    encoder, meta = load_encoder(config, source, seed)
    apply_cpu_threads(engine_cfg)
    device = select_device(engine_cfg, rank_info())
    meta.update({"pooling": POOLING, "dataset": config["dataset"]["name"],
                 "model_size": config["model"]["size"], "feature_dim": encoder.embed_dim,
                 "token_grid": list(encoder.grid)})
    written = {}
    for split in splits:
        dataset = data_io.build_dataset(config, manifest_path, results_dir, split, "test",
                                        num_clips=1, num_crops=1, with_boxes=False)
        loader = data_io.build_loader(dataset, int(probe_cfg["batch_size"]),
                                      int(probe_cfg["num_workers"]), shuffle=False, seed=0,
                                      drop_last=False, distributed=False)
        ids, feats, tokens = pooled_features(encoder, loader, device, engine_cfg, keep_tokens)
        labels = dataset.clips.set_index("clip_id")["label"].loc[ids].to_numpy(np.int64)
        table = FeatureTable(np.asarray(ids), labels, np.full(len(ids), split), feats,
                             {**meta, "split": split, "n_skipped_clips": int(dataset.n_skipped)},
                             tokens)
        written[split] = write_features(Path(out_dir) / FEATURES.format(split=split), table)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = stage_arg_parser("pooled encoder features per clip (one .npz per split)")
    parser.add_argument("--checkpoint", required=True,
                        help=f"pretraining checkpoint (file or Hugging Face folder), or {RANDOM!r}")
    parser.add_argument("--splits", nargs="+", default=["train", "validation"],
                        choices=["train", "validation", "test"])
    parser.add_argument("--seed", type=int, default=None,
                        help=f"{RANDOM!r} only: the init seed (default: the first of the "
                             "config's seeds)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    manifest, results_dir = resolve_paths(config, args)
    for split, path in run(config, manifest, results_dir, args.checkpoint, args.out,
                           tuple(args.splits), args.seed).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
