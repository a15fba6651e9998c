"""Classification heads on top of the encoder tokens: VideoMAE mean pooling and MOFO's MCA.

Both take tokens ``(B, N, D)`` and an optional in-box flag ``(B, N)`` and return logits
``(B, C)``, or a dict of logits when built with several outputs (EPIC-KITCHENS verb + noun:
two linear layers on the same pooled feature). Sub-module names (``fc_norm``, ``head``,
``cross_block``) are the parameter names the classifier exposes (see ``VideoClassifier``).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from mofo.models.layers import LAYER_NORM_EPS, Block, init_trunc_normal

# The MCA head's attention is padded per group of clips of similar in-box counts; more groups
# pad less but call the attention kernel more often (see attend_in_groups).
ATTENTION_GROUPS = 4


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


def pack_flagged(flags: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The flagged tokens of a bool ``(B, N)`` as one packed list, clip after clip.

    Returns ``flat`` (indices into the ``B * N`` tokens, ascending: grouped by clip, token
    order inside), ``clip`` (the clip of each), ``counts (B,)`` and ``starts (B,)`` (where each
    clip's run begins in the packed list).
    """
    n = flags.shape[1]
    flat = flags.reshape(-1).nonzero().squeeze(1)
    counts = flags.sum(1)
    starts = counts.cumsum(0) - counts
    return flat, torch.div(flat, n, rounding_mode="floor"), counts, starts


def pad_packed(packed: Tensor, counts: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    """Packed rows ``(P, ...)`` -> ``(B, M, ...)`` padded to the largest count, and its bool
    ``(B, M)`` validity; padded rows repeat row 0 and must be masked out by the caller."""
    m = int(counts.max())
    r = torch.arange(m, device=packed.device)
    valid = r[None, :] < counts[:, None]
    index = torch.where(valid, starts[:, None] + r[None, :], 0)
    return packed.index_select(0, index.reshape(-1)).reshape(*valid.shape, *packed.shape[1:]), valid


def clip_drop_path(block: Block, clips: int, like: Tensor) -> Tensor | None:
    """One drop-path scale per clip ``(clips, 1)`` (0 or ``1 / keep``), the draw that
    ``block.drop_path`` makes on ``(clips, N, D)``; None when the block has no drop path."""
    if isinstance(block.drop_path, nn.Identity):
        return None
    ones = torch.ones(clips, 1, 1, dtype=like.dtype, device=like.device)
    return block.drop_path(ones).reshape(clips, 1)


def attend_in_groups(
    attn: nn.Module, q: Tensor, kv: Tensor, queries: tuple[Tensor, ...], keys: tuple[Tensor, ...]
) -> Tensor:
    """Per-clip attention of packed queries ``q (Q, D)`` to packed keys and values
    ``kv (K, 2D)``; ``queries`` = ``(clip, counts, starts)`` of the query rows and ``keys`` =
    ``(counts, starts)`` of the key rows (:func:`pack_flagged`), the clips sorted by query
    count. Returns ``(Q, D)`` in the rows' order.

    The sorted clips are cut into at most :data:`ATTENTION_GROUPS` runs; each run's attention
    is padded to its own largest query and key counts (a key-padding mask hides the padded
    keys). One group would pad the whole batch to its largest counts (~1.4x the attention's
    FLOPs at 25 % in-box tokens); four groups pad ~1.1x. A run's rows are a contiguous piece
    of ``q`` and ``kv`` (split, so the backward pass fills no full-size gradient per group).
    A loop over those few groups, not over the clips.
    """
    q_clip, q_counts, q_starts = queries
    k_counts, k_starts = keys
    b, d = q_counts.shape[0], q.shape[1]
    heads, hd = attn.num_heads, d // attn.num_heads
    runs = min(ATTENTION_GROUPS, b)  # cut as torch.tensor_split cuts b items into runs
    firsts = [i * (b // runs) + min(i, b % runs) for i in range(runs + 1)]
    q_rows, k_rows = q_counts.tolist(), k_counts.tolist()
    cut = list(pairwise(firsts))
    q_pieces = q.split([sum(q_rows[a:z]) for a, z in cut])
    kv_pieces = kv.split([sum(k_rows[a:z]) for a, z in cut])
    clip_pieces = q_clip.split([sum(q_rows[a:z]) for a, z in cut])
    outs = []
    for (a, z), q_i, kv_i, clip_i in zip(cut, q_pieces, kv_pieces, clip_pieces, strict=True):
        if q_i.shape[0] == 0:  # no clip of the run has a query
            outs.append(q_i)
            continue
        q_first = q_starts[a:z] - q_starts[a]
        q_pad, _ = pad_packed(q_i, q_counts[a:z], q_first)  # (G, M, D)
        kv_pad, k_valid = pad_packed(kv_i, k_counts[a:z], k_starts[a:z] - k_starts[a])
        g, m, k_len = z - a, q_pad.shape[1], kv_pad.shape[1]
        k_pad, v_pad = kv_pad.reshape(g, k_len, 2, heads, hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q_pad.reshape(g, m, heads, hd).transpose(1, 2),
            k_pad,
            v_pad,
            attn_mask=k_valid[:, None, None, :],
            dropout_p=attn.attn_drop if attn.training else 0.0,
        )
        local = clip_i - a
        rank = torch.arange(q_i.shape[0], device=q.device) - q_first[local]
        outs.append(out.transpose(1, 2).reshape(g * m, d).index_select(0, local * m + rank))
    return torch.cat(outs)


def cross_attend_packed(
    block: Block, tokens: Tensor, queries: Tensor, keys: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The attention half of ``block``: the flagged ``queries`` attend to the flagged ``keys``
    of the same clip, on packed tokens.

    ``tokens (B, N, D)``; ``queries``, ``keys`` bool ``(B, N)``, every clip with at least one
    key. Returns ``x = query + drop_path(proj(attention))`` packed ``(Q, D)`` (the clips
    sorted by query count, stable; token order inside), the clip of each row ``(Q,)`` and
    the query counts ``(B,)``. The norm and projections run on the packed query and key tokens
    only (gathered together; k/v for the keys, q for the queries: the FLOPs of a per-clip
    loop, in big matrix products); only the attention itself is padded, per group of clips
    (:func:`attend_in_groups`). Drop path: one draw per clip, the draw ``block(x)`` makes
    first on ``(B, N, D)``.
    """
    attn = block.attn
    b, n, d = tokens.shape
    counts = queries.sum(1)
    order = torch.argsort(counts, stable=True)  # the groups' order
    q_flat, q_clip, q_counts, q_starts = pack_flagged(queries.index_select(0, order))
    k_flat, k_clip, k_counts, k_starts = pack_flagged(keys.index_select(0, order))
    # Sorted-clip token indices -> the tokens' own; one gather and one norm for queries and
    # keys (the same rows only in clips without out-of-box tokens).
    rows = torch.cat((q_flat + (order[q_clip] - q_clip) * n, k_flat + (order[k_clip] - k_clip) * n))
    x = tokens.reshape(b * n, d).index_select(0, rows)
    x_q = x[: q_flat.numel()]
    normed_q, normed_k = block.norm1(x).split((q_flat.numel(), k_flat.numel()))
    w_q, w_kv = attn.qkv.weight[:d], attn.qkv.weight[d:]
    bias = attn.qkv_bias()
    b_q, b_kv = (None, None) if bias is None else (bias[:d], bias[d:])
    out = attend_in_groups(
        attn,
        F.linear(normed_q, w_q, b_q),
        F.linear(normed_k, w_kv, b_kv),
        (q_clip, q_counts, q_starts),
        (k_counts, k_starts),
    )
    out = attn.proj_drop(attn.proj(out))
    clip = order[q_clip]
    scale = clip_drop_path(block, b, out)
    return x_q + (out if scale is None else out * scale.index_select(0, clip)), clip, counts


def clip_means(rows: Tensor, clip: Tensor, counts: Tensor) -> Tensor:
    """Mean of the packed ``rows (Q, F)`` of each clip -> ``(B, F)`` (0 for a clip without
    rows). Summed in float32: ``index_add`` adds row by row, and in bf16 ~400 rows would lose
    digits; returned in the rows' dtype."""
    total = torch.zeros(counts.shape[0], rows.shape[1], dtype=torch.float32, device=rows.device)
    total = total.index_add(0, clip, rows.float())
    return (total / counts.clamp_min(1)[:, None]).to(rows.dtype)


def cross_block_mean_packed(block: Block, tokens: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
    """Per clip, the mean over its ``queries`` of ``block``'s output when they attend to its
    ``keys`` (:func:`cross_attend_packed`), ``(B, D)``; 0 for a clip without queries.

    The MLP's last linear layer (``fc2``) runs once per clip on the mean of its hidden
    activations instead of once per query: ``mean_i(W h_i + c) = W mean_i(h_i) + c``, so the
    result is the block's (to float rounding) for ~21 % fewer FLOPs than a per-clip loop of
    the whole block at ViT-B shapes with 25 % in-box tokens (``fc2``'s share of them, forward
    and backward; see ``mofo.bench.train.mca_head_flops``). The drop path scale
    (one draw per clip, after the attention's) is constant over a clip, so it commutes with
    the mean too. The dropout after ``fc2`` would not: it must be off (the MCA head's is).
    """
    mlp = block.mlp
    if mlp.drop2.p > 0 and mlp.training:
        raise ValueError("the pooled cross block needs the MLP's output dropout off (drop=0)")
    x, q_clip, q_counts = cross_attend_packed(block, tokens, queries, keys)
    hidden = mlp.norm(mlp.drop1(mlp.act(mlp.fc1(block.norm2(x)))))
    out = mlp.drop2(mlp.fc2(clip_means(hidden, q_clip, q_counts)))
    scale = clip_drop_path(block, tokens.shape[0], out)
    return clip_means(x, q_clip, q_counts) + (out if scale is None else out * scale)


def cross_block_forward(
    block: Block, queries: Tensor, keys: Tensor, key_valid: Tensor | None = None
) -> Tensor:
    """``block`` (pre-norm attention + MLP) with separate query and key/value tokens.

    ``queries (B, M, D)``, ``keys (B, K, D)``, ``key_valid`` bool ``(B, K)`` (every clip needs
    at least one valid key; None: all are). The same weights and the same terms as ``block(x, attn_mask)``
    with the keys among the tokens of ``x``: ``queries + attn(norm1(queries), norm1(keys))``,
    then ``+ mlp(norm2(.))``; only the queries go through the MLP.
    """
    attn = block.attn
    b, m, d = queries.shape
    heads = attn.num_heads
    w_q, w_kv = attn.qkv.weight[:d], attn.qkv.weight[d:]
    bias = attn.qkv_bias()
    b_q, b_kv = (None, None) if bias is None else (bias[:d], bias[d:])
    q = F.linear(block.norm1(queries), w_q, b_q).reshape(b, m, heads, d // heads).transpose(1, 2)
    k, v = (
        F.linear(block.norm1(keys), w_kv, b_kv)
        .reshape(b, keys.shape[1], 2, heads, d // heads)
        .permute(2, 0, 3, 1, 4)
    )
    x = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=None if key_valid is None else key_valid[:, None, None, :],
        dropout_p=attn.attn_drop if attn.training else 0.0,
    )
    x = queries + block.drop_path(attn.proj_drop(attn.proj(x.transpose(1, 2).reshape(b, m, d))))
    return x + block.drop_path(block.mlp(block.norm2(x)))


def mca_per_sample(head: MotionCrossAttentionHead, tokens: Tensor, inbox: Tensor) -> Tensor:
    """The MCA head's pooled features ``(B, D)`` one clip at a time (the published code's way).

    The reference that the batched head equals and that ``mofo bench train`` times it
    against: per clip, the in-box tokens attend to the out-of-box ones (or among themselves
    when there are none outside) and are averaged; a clip without in-box tokens gives the
    mean of its tokens.
    """
    feats = []
    for toks, flags in zip(tokens, inbox.to(torch.bool), strict=True):
        inside, outside = toks[flags], toks[~flags]
        if inside.shape[0] == 0:
            feats.append(toks.mean(0))
            continue
        keys = outside if outside.shape[0] else inside
        feats.append(cross_block_forward(head.cross_block, inside[None], keys[None])[0].mean(0))
    return torch.stack(feats)


class MeanPoolHead(nn.Module):
    """VideoMAE head: mean over tokens -> ``fc_norm`` -> dropout -> linear.

    ``drop_ratio`` (EVEREST's fine-tuning option, 0 = off): the classifier keeps only the
    most-moving tokens for this head, dropping ``round(drop_ratio * N)`` before the encoder
    (``VideoClassifier.forward``); the head then averages the tokens it is given.
    """

    def __init__(
        self,
        dim: int,
        outputs: int | Mapping[str, int],
        fc_dropout: float = 0.0,
        init_scale: float = 0.001,
        drop_ratio: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"mean head drop_ratio must lie in [0, 1), got {drop_ratio}")
        self.drop_ratio = float(drop_ratio)
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

    Batching: the in-box tokens of all clips are packed into one ``(Q, D)`` list and the key
    tokens into another; the block's projections, norms and first MLP layer run on those (no
    out-of-box queries, no padding), only the attention is padded, per group of clips of
    similar in-box counts, with a key-padding mask (:func:`attend_in_groups`), and the MLP's
    last layer runs once per clip on the mean hidden row (:func:`cross_block_mean_packed`).
    No Python loop over the clips (one over at most :data:`ATTENTION_GROUPS` groups). The result differs from a per-clip loop (:func:`mca_per_sample`) only in float
    rounding (summation order: padded key length, pooled sums by ``index_add``, ``fc2``
    after the mean).
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
        # Keys: the out-of-box tokens, or the in-box ones when the clip has none outside.
        keys = torch.where(outbox.any(1, keepdim=True), outbox, inbox)  # never empty: N >= 1
        queries = inbox
        if not bool(has_in.any()):
            # No clip has a box: one dummy query (never pooled), so that no attention kernel
            # sees an empty query set and the block still gives (zero) gradients.
            queries = torch.zeros_like(inbox)
            queries[0, 0] = True
        # A clip without queries needs no keys; its first token keeps its key set non-empty.
        first = torch.zeros_like(inbox)
        first[:, 0] = True
        keys = torch.where(queries.any(1, keepdim=True), keys, first)
        in_mean = cross_block_mean_packed(self.cross_block, tokens, queries, keys)
        all_mean = tokens.mean(1)
        return torch.where(has_in[:, None], in_mean, all_mean)

    def forward(self, tokens: Tensor, inbox: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        feats = self.pooled_features(tokens, inbox)
        return apply_output_layers(self.head, self.fc_dropout(self.fc_norm(feats)))
