"""Transformer building blocks shared by the encoder, the decoder and the MCA head.

Tubelet embedding, VideoMAE's attention (q and v biases, no k bias) and pre-norm block on
timm's ``Mlp`` / ``DropPath`` and PyTorch's fused ``scaled_dot_product_attention``, the fixed
sine-cosine position table, stochastic-depth rates and the two VideoMAE initialisations.
Sub-module names (``proj``, ``qkv``, ``q_bias``, ``norm1``, ``mlp.fc1`` ...) are the ones in
VideoMAE / MOFO checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn

LAYER_NORM_EPS = 1e-6  # VideoMAE uses LayerNorm(eps=1e-6) everywhere


def sincos_position_table(num_positions: int, dim: int) -> Tensor:
    """VideoMAE's fixed 1-D sine-cosine table over all tokens, shape ``(1, num_positions, dim)``.

    Entry ``[p, j] = sin/cos(p / 10000 ** (2 * (j // 2) / dim))`` with sin on even and cos on
    odd ``j``; computed in float64 so that it matches the numpy table in released checkpoints.
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


class PositionTableModule(nn.Module):
    """A module with a ``pos_embed`` position table buffer, fixed or loaded.

    The table starts as the fixed sine-cosine one, a non-persistent buffer: not in
    ``state_dict()``, as in VideoMAE's checkpoints. A learned table loaded from a checkpoint
    (:func:`mofo.models.checkpoint.load_pretrained`, or a state dict that has ``pos_embed``)
    turns it persistent, so that it is saved with the weights and a fresh model loading that
    state dict gets it back. State dicts without the key load as before.
    """

    def keep_pos_embed(self) -> None:
        """Save ``pos_embed`` in ``state_dict()`` from now on (it holds a loaded table)."""
        self.register_buffer("pos_embed", self.pos_embed, persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "pos_embed" in state_dict:
            self.keep_pos_embed()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PatchEmbed3D(nn.Module):
    """Tubelet embedding: one Conv3d with kernel = stride = (tubelet, patch, patch)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, tubelet_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        k = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=k, stride=k)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, t, h, w) -> (B, t*h*w, D)


class Attention(nn.Module):
    """Multi-head self-attention with q and v biases but no k bias (VideoMAE/BEiT).

    ``attn_mask`` (bool, True = may attend) broadcasts to ``(B, heads, N_query, N_key)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        # Separate q/v biases (no k bias: it cancels in the softmax) keep the checkpoint names.
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_bias(self) -> Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``drop_path`` over the blocks (VideoMAE)."""
    # Plain Python (not torch.linspace(...).item()) so that models also build on the meta device.
    return [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def init_trunc_normal(module: nn.Module) -> None:
    """Fine-tuning init (VideoMAE): linear weights ~ N(0, .02) truncated, zero biases, unit LN."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_xavier(module: nn.Module) -> None:
    """Pretraining init (VideoMAE/MAE): Xavier-uniform linear weights, zero biases, unit LN."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
