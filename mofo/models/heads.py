"""Classification heads on top of the encoder tokens: VideoMAE mean pooling and MOFO's MCA.

Both take tokens ``(B, N, D)`` and an optional in-box flag ``(B, N)`` and return logits
``(B, C)``, or a dict of logits when built with several outputs (EPIC-KITCHENS verb + noun:
two linear layers on the same pooled feature). Sub-module names (``fc_norm``, ``head``,
``cross_block``) are the parameter names the classifier exposes (see ``VideoClassifier``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from mofo.models.layers import LAYER_NORM_EPS, Block, init_trunc_normal


def make_output_layers(dim: int, outputs: int | Mapping[str, int], init_scale: float) -> nn.Module:
    """One linear layer, or a ``ModuleDict`` of them (``head.verb.weight``, ...).

    Weights ~ N(0, .02) truncated, then scaled by ``init_scale`` (VideoMAE's head init scale,
    0.001, keeps the first logits near zero so the pretrained features are not disturbed).
    """

    def linear(n: int) -> nn.Linear:
        if n <= 0:
            raise ValueError(f"a classifier output needs at least one class, got {n}")
        layer = nn.Linear(dim, n)
        trunc_normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
        with torch.no_grad():
            layer.weight.mul_(init_scale)
        return layer

    if isinstance(outputs, Mapping):
        if not outputs:
            raise ValueError("a multi-output head needs at least one output")
        return nn.ModuleDict({name: linear(int(n)) for name, n in outputs.items()})
    return linear(int(outputs))


def apply_output_layers(head: nn.Module, features: Tensor) -> Tensor | dict[str, Tensor]:
    if isinstance(head, nn.ModuleDict):
        return {name: layer(features) for name, layer in head.items()}
    return head(features)


def masked_mean(tokens: Tensor, weights: Tensor) -> Tensor:
    """Mean of ``tokens (B, N, D)`` over the tokens where ``weights (B, N)`` is 1.

    Rows with no selected token give 0 (callers choose another feature for them).
    """
    w = weights.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)


class MeanPoolHead(nn.Module):
    """VideoMAE head: mean over tokens -> ``fc_norm`` -> dropout -> linear."""

    def __init__(
        self,
        dim: int,
        outputs: int | Mapping[str, int],
        fc_dropout: float = 0.0,
        init_scale: float = 0.001,
    ):
        super().__init__()
        self.fc_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.fc_dropout = nn.Dropout(fc_dropout) if fc_dropout > 0 else nn.Identity()
        self.head = make_output_layers(dim, outputs, init_scale)

    def forward(self, tokens: Tensor, inbox: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        return apply_output_layers(self.head, self.fc_dropout(self.fc_norm(tokens.mean(1))))


class MotionCrossAttentionHead(nn.Module):
    """MOFO's motion cross-attention (MCA) head, batched over the clips.

    In-box tokens are the queries and out-of-box tokens the keys/values of one pre-norm
    cross-attention block (``cross_block``: attention + MLP, drop path); the result is
    averaged over the in-box tokens -> ``fc_norm`` -> dropout -> linear. A clip without
    out-of-box tokens lets its in-box tokens attend among themselves; a clip without in-box
    tokens uses the mean of all its (encoder) tokens.

    Batching: every token goes through the block as a query, with a boolean attention mask
    that allows exactly the keys above; queries that are not in the box are computed but
    never pooled. This costs one extra transformer block's worth of compute instead of a
    Python loop with batch size 1 (the published code).
    """

    def __init__(
        self,
        dim: int,
        outputs: int | Mapping[str, int],
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        fc_dropout: float = 0.0,
        init_scale: float = 0.001,
    ):
        super().__init__()
        self.cross_block = Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path)
        self.cross_block.apply(init_trunc_normal)
        self.fc_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.fc_dropout = nn.Dropout(fc_dropout) if fc_dropout > 0 else nn.Identity()
        self.head = make_output_layers(dim, outputs, init_scale)

    def pooled_features(self, tokens: Tensor, inbox: Tensor) -> Tensor:
        """The pooled feature ``(B, D)`` before ``fc_norm``."""
        if inbox is None:
            raise ValueError("the MCA head needs the in-box token flags (B, N)")
        if inbox.shape != tokens.shape[:2]:
            raise ValueError(
                f"inbox flags {tuple(inbox.shape)} do not match tokens {tuple(tokens.shape[:2])}"
            )
        inbox = inbox.to(device=tokens.device, dtype=torch.bool)
        outbox = ~inbox
        has_in = inbox.any(1)
        has_out = outbox.any(1)
        # Keys: the out-of-box tokens, or the in-box ones when the clip has none outside.
        keys = torch.where(has_out[:, None], outbox, inbox)  # never empty: N >= 1
        attended = self.cross_block(tokens, attn_mask=keys[:, None, None, :])
        in_mean = masked_mean(attended, inbox)
        all_mean = tokens.mean(1)
        return torch.where(has_in[:, None], in_mean, all_mean)

    def forward(self, tokens: Tensor, inbox: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        feats = self.pooled_features(tokens, inbox)
        return apply_output_layers(self.head, self.fc_dropout(self.fc_norm(feats)))
