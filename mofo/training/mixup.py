"""Mixup / CutMix for video clips that also keeps the in-box token flags consistent.

timm's ``Mixup`` decides per batch (``_params_per_batch``: numpy RNG, mixup vs cutmix, lam;
a private method, hence timm's pin in pyproject.toml)
and its helpers give the CutMix box (``cutmix_bbox_and_lam``) and the soft targets
(``mixup_target``, with label smoothing). What timm cannot do for us:

- clips are ``(B, C, T, H, W)``: timm's ``x[:, :, y0:y1, x0:x1]`` would cut T and H; the box
  here is cut in H and W over every frame (the whole tube);
- the MCA head needs in-box flags for the *mixed* clip. Partner = the batch flipped (timm's
  "batch" mode). Mixup (pixel blend): both clips' moving objects are visible, so the flags are
  the union of both clips' flags. CutMix: tokens whose patch centre lies inside the pasted box
  take the partner's flag, the others keep their own.
- EPIC-KITCHENS: the same partner and lam mix every head's targets (verb and noun; with
  ``dataset.epic100.classifier: action`` the one ``action`` head is mixed like any head).
"""

from __future__ import annotations

import torch
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, mixup_target


class VideoMixup:
    def __init__(self, finetune_cfg: dict, num_classes: dict[str, int],
                 grid: tuple[int, int, int], patch_size: int):
        """``num_classes``: target name -> class count (``{"label": 8}`` or verb/noun)."""
        self.num_classes = dict(num_classes)
        self.smoothing = float(finetune_cfg["label_smoothing"])
        self.grid = grid
        self.patch_size = patch_size
        self._timm = Mixup(
            mixup_alpha=float(finetune_cfg["mixup"]), cutmix_alpha=float(finetune_cfg["cutmix"]),
            prob=float(finetune_cfg["mixup_prob"]),
            switch_prob=float(finetune_cfg["mixup_switch_prob"]), mode="batch",
            label_smoothing=self.smoothing, num_classes=max(self.num_classes.values()),
        )

    @property
    def enabled(self) -> bool:
        t = self._timm
        return t.mixup_enabled and t.mix_prob > 0 and (t.mixup_alpha > 0 or t.cutmix_alpha > 0)

    def cut_tokens(self, bbox: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
        """bool ``(N,)``: tokens whose patch centre is inside the CutMix box (all tubelets)."""
        y0, y1, x0, x1 = bbox
        t, h, w = self.grid
        centres_y = (torch.arange(h, device=device) + 0.5) * self.patch_size
        centres_x = (torch.arange(w, device=device) + 0.5) * self.patch_size
        inside = ((centres_y >= y0) & (centres_y < y1))[:, None] & \
                 ((centres_x >= x0) & (centres_x < x1))[None, :]
        return inside.reshape(1, h * w).expand(t, -1).reshape(-1)

    def __call__(
        self, frames: torch.Tensor, inbox: torch.Tensor | None, targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Mixed clips, their in-box flags and soft targets (one per head)."""
        lam, use_cutmix = self._timm._params_per_batch() if self.enabled else (1.0, False)
        frames = frames.clone()
        partner_inbox = inbox.flip(0) if inbox is not None else None
        if lam < 1.0:
            if use_cutmix:
                bbox, lam = cutmix_bbox_and_lam(
                    frames.shape, lam, ratio_minmax=self._timm.cutmix_minmax,
                    correct_lam=self._timm.correct_lam,
                )
                y0, y1, x0, x1 = bbox
                frames[..., y0:y1, x0:x1] = frames.flip(0)[..., y0:y1, x0:x1]
                if inbox is not None:
                    cut = self.cut_tokens(bbox, inbox.device)[None, :]
                    inbox = torch.where(cut, partner_inbox, inbox)
            else:
                frames = frames * lam + frames.flip(0) * (1.0 - lam)
                if inbox is not None:
                    inbox = inbox | partner_inbox
        soft = {
            name: mixup_target(targets[name], n, lam, self.smoothing)
            for name, n in self.num_classes.items()
        }
        return frames, inbox, soft

