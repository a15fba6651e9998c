"""Held-out reconstruction: does pretraining beat the "predict the patch mean" floor?

``validation_reconstruction`` runs a pretrained autoencoder on the validation split, one
deterministic view per clip (segment sampling, centre crop: the test path's first view) and
FIXED masks (the pretraining's own strategy and ratios, drawn from a generator seeded by the
clip's position alone, so every seed and every rerun sees the same masks). Per masked token it
compares the squared error of the prediction with the squared error of predicting the token's
own mean (the floor: with VideoMAE's per-patch normalised targets that is predicting 0, which
is where an autoencoder that learned nothing sits). Reported over all masked tokens and split
by the motion box (tokens whose tubelet overlaps the box, ``mofo.masking.grid.inbox_tokens``),
because MOFO's claim is about the motion region.

``ratio`` = loss / floor: 1 = nothing learned, 0 = perfect; the sums are over all masked
tokens of all clips (a token-weighted mean, not a mean of per-clip ratios).

A model-side strategy (``everest``) selects from the model's own embeddings, so its masks
depend on the weights; only its random draw is fixed (a generator seeded by the clip's
position), and the tokens scored are its reconstructed ones (the most-moving tokens, not the
dropped ones), so its ratio is not comparable one to one with a loader-side strategy's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mofo.masking import is_model_side, mask_from_config, needs_token_flow, select_from_config
from mofo.masking.grid import token_grid
from mofo.runtime import data as data_io
from mofo.runtime.device import device_frames
from mofo.training.losses import patch_normalized_target

MASK_SEED = 20231215  # one fixed base seed for the validation masks of every run


def _part(loss: float, floor: float, tokens: int) -> dict:
    return {"loss": loss / max(tokens, 1), "floor": floor / max(tokens, 1),
            "ratio": loss / floor if floor > 0 else float("nan"), "tokens": int(tokens)}


def validation_masks(model: torch.nn.Module, masking_cfg: dict, frames: torch.Tensor,
                     items: list[dict], inbox: np.ndarray, grid: tuple[int, int, int],
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden, target)`` bool ``(B, N)`` on ``frames``' device for the clips ``items``: a
    loader-side strategy's mask from a generator seeded by ``(MASK_SEED, index)`` (hidden =
    target), or a model-side one selected clip by clip with a torch generator seeded by
    ``MASK_SEED + index``."""
    if is_model_side(masking_cfg["strategy"]):
        embeddings = model.encoder.embed(frames)
        pairs = [select_from_config(
            masking_cfg, embeddings[i:i + 1], grid,
            torch.Generator(device=frames.device).manual_seed(MASK_SEED + int(it["index"])))
            for i, it in enumerate(items)]
        return torch.cat([h for h, _ in pairs]), torch.cat([t for _, t in pairs])
    masks = np.stack([  # mgmae: from the view's own flow (the dataset's token_flow)
        mask_from_config(masking_cfg, grid, box, np.random.default_rng([MASK_SEED, it["index"]]),
                         token_flow=it["token_flow"].numpy() if "token_flow" in it else None)
        for it, box in zip(items, inbox, strict=True)])
    mask = torch.from_numpy(masks).to(frames.device)
    return mask, mask


@torch.no_grad()
def validation_reconstruction(model: torch.nn.Module, config: dict, manifest_path: str | Path,
                              results_dir: str | Path, device: torch.device,
                              split: str = "validation", batch_size: int = 16) -> dict:
    """Reconstruction loss vs the floor on ``split`` (see the module docstring).

    Returns ``{loss, floor, ratio, tokens, inbox: {...}, outbox: {...}, n_clips, masking,
    split}``; ``inbox`` / ``outbox`` hold the same four numbers for the masked tokens inside /
    outside the motion box.
    """
    model_cfg, pre = config["model"], config["pretrain"]
    patch, tubelet = int(model_cfg["patch_size"]), int(model_cfg["tubelet_size"])
    dataset = data_io.build_dataset(config, manifest_path, results_dir, split, "test",
                                    test_view=(0, 0), num_clips=1, num_crops=1,
                                    token_flow=needs_token_flow(config["masking"]["strategy"]))
    grid = token_grid(model_cfg)
    sums = {"all": [0.0, 0.0, 0], "inbox": [0.0, 0.0, 0], "outbox": [0.0, 0.0, 0]}
    was_training = model.training
    model.eval()
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        frames = device_frames(torch.stack([it["frames"] for it in items]), device)
        inbox = torch.stack([it["inbox"] for it in items]).numpy()
        hidden, mask = validation_masks(model, config["masking"], frames, items, inbox, grid)
        masks = mask.cpu().numpy()
        pred = model(frames, hidden, mask).float()
        target = patch_normalized_target(frames, patch, tubelet, bool(pre["normalize_target"]))
        target = target[mask].reshape(pred.shape)
        err = ((pred - target) ** 2).mean(-1).flatten().cpu().numpy()
        floor = ((target - target.mean(-1, keepdim=True)) ** 2).mean(-1).flatten().cpu().numpy()
        in_box = inbox[masks]  # the masked tokens' in-box flags, in the same (clip, token) order
        for name, sel in (("all", slice(None)), ("inbox", in_box), ("outbox", ~in_box)):
            sums[name][0] += float(err[sel].sum())
            sums[name][1] += float(floor[sel].sum())
            sums[name][2] += int(np.ones_like(err)[sel].sum())
    model.train(was_training)
    out = _part(*sums["all"])
    out.update(inbox=_part(*sums["inbox"]), outbox=_part(*sums["outbox"]), n_clips=len(dataset),
               masking=config["masking"]["strategy"], split=split)
    return out
