"""kNN, linear and attentive probes of frozen encoder features (the ``features`` stage's files).

All train on the train split and report top-1 (percent) on the validation split; clips with an
unknown label (-1) are left out. The class count is the largest label seen in either split + 1.
kNN and linear read the pooled ``features``; the attentive probe reads the ``tokens``.

- **kNN** (:func:`knn_predict`): cosine similarity between L2-normalised features; each
  validation clip takes its ``probe.knn_k`` most similar train clips (fewer when the train split
  is smaller), and each votes for its label with weight ``exp(similarity /
  probe.knn_temperature)``; the class with the largest summed weight wins (the weighted kNN of
  InstDisc / DINO). Ties between equal similarities follow ``torch.topk``'s order.
- **Linear** (:func:`linear_probe`): multinomial logistic regression on the features
  standardised with the train split's mean and standard deviation; minimises the mean
  cross-entropy + ``probe.linear_l2 / 2 x ||W||^2`` (the bias is not penalised) from zero
  weights with full-batch L-BFGS (strong Wolfe line search) for at most
  ``probe.linear_max_iter`` iterations, in float64 on the CPU: deterministic, no lr, no
  schedule, no random draws.
- **Attentive** (:func:`attentive_probe`, only with ``probe.attentive.enabled``; V-JEPA's
  frozen-feature protocol): the frozen tokens ``(T = t x h x w, D)`` of a clip, token order
  (t, h, w) as the encoder's output, plus the encoder's fixed sine-cosine position table, are
  attended by ``num_queries`` learned queries (:class:`AttentivePooler`: one cross-attention
  with LayerNorm-ed keys/values, residual, an MLP block, LayerNorm and a linear classifier on the
  mean of the query outputs). Everything of the pooler is trained, the encoder is not: cross-
  entropy, AdamW, a linear warm-up then cosine decay per step, shuffled mini-batches, float32 on
  the CPU; deterministic for a ``seed`` (the init and the batch order). Needs features files
  made with ``probe.attentive.enabled`` (they carry ``tokens`` and ``meta.token_grid``).

``run_probe(train_path, val_path, probe_cfg, out_path, seed)`` writes ``metrics.json``:
``knn_top1, linear_top1, majority_top1`` (always the train split's most common class: the
chance level), ``attentive_top1`` (only with ``probe.attentive.enabled``), ``n_train, n_val,
feature_dim, n_classes, knn_k, seed``, the encoder and its source.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mofo.formats.featurefile import FeatureTable, read_features
from mofo.models.layers import sincos_position_table

KNN_CHUNK = 1024  # validation rows per similarity block: memory ~ chunk x n_train floats


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int,
                temperature: float, num_classes: int) -> torch.Tensor:
    """Weighted-vote cosine kNN: int64 ``(n_test,)`` predicted classes (see the module doc)."""
    train_n = F.normalize(train_x.float(), dim=1)
    test_n = F.normalize(test_x.float(), dim=1)
    k = min(int(k), len(train_n))
    preds = []
    for start in range(0, len(test_n), KNN_CHUNK):
        sim = test_n[start:start + KNN_CHUNK] @ train_n.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, train_y[top_idx], (top_sim.double() / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 num_classes: int, l2: float, max_iter: int) -> torch.Tensor:
    """L2-regularised logistic regression on standardised features (module doc); returns the
    predicted classes of ``test_x``, int64 ``(n_test,)``."""
    x = train_x.double()
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(1e-8)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=int(max_iter), history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, train_y) + 0.5 * l2 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((test_x.double() - mean) / std @ weight + bias).argmax(dim=1)


class AttentivePooler(nn.Module):
    """Learned queries attend over a clip's frozen tokens ``(B, T, D)`` -> class logits.

    ``x = q + MHA(q, LN(tokens + pos))``; ``x = x + MLP(LN(x))``; logits = ``Linear(LN(mean_q
    x))``, ``pos`` the encoder's fixed sine-cosine table over the ``T = t*h*w`` tokens.
    """

    def __init__(self, grid: tuple[int, int, int], dim: int, num_classes: int, num_queries: int,
                 num_heads: int, mlp_ratio: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"probe.attentive.num_heads {num_heads} must divide the token "
                             f"width D = {dim}")
        # The encoder added this same table at its input, but its output tokens need not keep
        # it readable. Without positions a single-query attention pool is permutation
        # invariant over the tokens: it could not tell "A then B" from "B then A" in time.
        self.register_buffer("pos", sincos_position_table(math.prod(grid), dim),
                             persistent=False)
        self.query = nn.Parameter(torch.zeros(1, num_queries, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.kv_norm(tokens + self.pos)
        q = self.query.expand(len(tokens), -1, -1)
        x = q + self.attn(q, kv, kv, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.head(self.norm(x.mean(dim=1)))


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The lr factor of ``step`` (0-based): linear from 1/warmup up to 1 over ``warmup`` steps,
    then a cosine from 1 down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def attentive_probe(train_tokens: torch.Tensor, train_y: torch.Tensor,
                    test_tokens: torch.Tensor, grid: tuple[int, int, int], num_classes: int,
                    cfg: dict, seed: int) -> torch.Tensor:
    """Train an :class:`AttentivePooler` on ``train_tokens`` ``(n, t*h*w, D)`` (token order
    t, h, w; any float dtype, used as float32) and ``train_y``; returns the predicted classes of
    ``test_tokens``, int64 ``(n_test,)``. ``cfg``: the ``probe.attentive`` section (module doc).
    """
    n, n_tokens, dim = train_tokens.shape
    if n_tokens != math.prod(grid) or test_tokens.shape[1:] != train_tokens.shape[1:]:
        raise ValueError(f"attentive probe: tokens {tuple(train_tokens.shape[1:])} (train), "
                         f"{tuple(test_tokens.shape[1:])} (test) do not fit the grid {grid}")
    torch.manual_seed(seed)
    model = AttentivePooler(grid, dim, num_classes, int(cfg["num_queries"]),
                            int(cfg["num_heads"]), float(cfg["mlp_ratio"]))
    decay = [p for p in model.parameters() if p.ndim > 1]  # weight matrices and the queries
    rest = [p for p in model.parameters() if p.ndim <= 1]  # biases and norms: no decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(cfg["weight_decay"])},
                             {"params": rest, "weight_decay": 0.0}], lr=float(cfg["lr"]))
    batch = int(cfg["batch_size"])
    steps_per_epoch = math.ceil(n / batch)
    total, warmup = int(cfg["epochs"]) * steps_per_epoch, int(cfg["warmup_epochs"]) * steps_per_epoch
    order = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(total):
        if step % steps_per_epoch == 0:
            perm = torch.randperm(n, generator=order)
        idx = perm[(step % steps_per_epoch) * batch:][:batch]
        for group in opt.param_groups:
            group["lr"] = float(cfg["lr"]) * warmup_cosine(step, total, warmup)
        loss = F.cross_entropy(model(train_tokens[idx].float()), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        preds = [model(test_tokens[i:i + batch].float()).argmax(dim=1)
                 for i in range(0, len(test_tokens), batch)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def top1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of ``pred`` equal to ``labels`` (0 for no clips)."""
    return 100.0 * float((pred == labels).double().mean()) if len(labels) else 0.0


def labelled(table: FeatureTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of the clips whose label is known."""
    keep = table.label >= 0
    return torch.from_numpy(table.features[keep]), torch.from_numpy(table.label[keep])


def labelled_tokens(table: FeatureTable) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Tokens ``(n, t*h*w, D)`` (the file's dtype) of the clips whose label is known, and the
    grid ``(t, h, w)``; a clear error for a file without them."""
    if table.tokens is None or "token_grid" not in table.meta:
        split = table.meta.get("split", "?")
        raise ValueError(f"attentive probe: the {split} features file has no tokens (or no "
                         "meta.token_grid); probe.attentive.enabled must be true when the "
                         "features are made (rerun the features stage)")
    grid = tuple(int(v) for v in table.meta["token_grid"])
    return torch.from_numpy(table.tokens[table.label >= 0]), grid


def attentive_top1(train: FeatureTable, val: FeatureTable, num_classes: int, cfg: dict,
                   seed: int) -> float:
    """Top-1 of the attentive probe (module doc) trained on ``train``, tested on ``val``."""
    train_t, grid = labelled_tokens(train)
    val_t, val_grid = labelled_tokens(val)
    if grid != val_grid:
        raise ValueError(f"attentive probe: token grids differ: train {grid}, validation "
                         f"{val_grid}")
    pred = attentive_probe(train_t, labelled(train)[1], val_t, grid, num_classes, cfg, seed)
    return top1(pred, labelled(val)[1])


def probe_metrics(train: FeatureTable, val: FeatureTable, probe_cfg: dict,
                  seed: int = 0) -> dict:
    """kNN, linear (and, with ``probe.attentive.enabled``, attentive) top-1 of ``val`` from
    ``train`` (module doc); ``seed`` draws the attentive probe's init and batch order."""
    train_x, train_y = labelled(train)
    val_x, val_y = labelled(val)
    if len(train_y) == 0 or len(val_y) == 0:
        raise ValueError(f"probe: needs labelled clips in both splits, got {len(train_y)} "
                         f"train and {len(val_y)} validation")
    if train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"probe: feature sizes differ: train {train_x.shape[1]}, "
                         f"validation {val_x.shape[1]}")
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    k = int(probe_cfg["knn_k"])
    knn = knn_predict(train_x, train_y, val_x, k, float(probe_cfg["knn_temperature"]), n_classes)
    lin = linear_probe(train_x, train_y, val_x, n_classes, float(probe_cfg["linear_l2"]),
                       int(probe_cfg["linear_max_iter"]))
    majority = torch.full_like(val_y, int(torch.bincount(train_y).argmax()))
    metrics = {"knn_top1": top1(knn, val_y), "linear_top1": top1(lin, val_y),
               "majority_top1": top1(majority, val_y)}
    attentive = probe_cfg["attentive"]
    if attentive["enabled"]:
        metrics["attentive_top1"] = attentive_top1(train, val, n_classes, attentive, int(seed))
    return {**metrics, "n_train": len(train_y), "n_val": len(val_y),
            "feature_dim": int(train_x.shape[1]), "n_classes": n_classes,
            "knn_k": min(k, len(train_y)), "seed": int(seed)}


def run_probe(train_path: str | Path, val_path: str | Path, probe_cfg: dict,
              out_path: str | Path, seed: int = 0) -> dict:
    """Probe the two features files and write ``out_path`` (metrics.json); returns it.
    ``seed``: the ``{seed}`` wildcard (the attentive probe's init and batch order)."""
    train, val = read_features(train_path), read_features(val_path)
    metrics = {**probe_metrics(train, val, probe_cfg, seed),
               "encoder": train.meta.get("encoder"), "source": train.meta.get("source"),
               "dataset": train.meta.get("dataset")}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(metrics, indent=1))
    return metrics


def main(argv: list[str] | None = None) -> int:
    import argparse

    from mofo.config import load_config

    parser = argparse.ArgumentParser(description="kNN, linear and attentive probe of features "
                                                 "files")
    parser.add_argument("--config", action="append", default=[], help="config overlay(s)")
    parser.add_argument("--train", required=True, help="features of the train split (.npz)")
    parser.add_argument("--val", required=True, help="features of the validation split (.npz)")
    parser.add_argument("--out", required=True, help="metrics.json to write")
    parser.add_argument("--seed", type=int, default=0,
                        help="the attentive probe's init and batch-order seed (default 0)")
    args = parser.parse_args(argv)
    metrics = run_probe(args.train, args.val, load_config(args.config)["probe"], args.out,
                        args.seed)
    keys = ("knn_top1", "linear_top1", "attentive_top1", "majority_top1")
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
