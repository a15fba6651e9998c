"""kNN and linear probes of frozen encoder features (the ``features`` stage's files).

Both train on the train split's features and report top-1 (percent) on the validation split;
clips with an unknown label (-1) are left out. The class count is the largest label seen in
either split + 1.

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

``run_probe(train_path, val_path, probe_cfg, out_path)`` writes ``metrics.json``:
``knn_top1, linear_top1, majority_top1`` (always the train split's most common class: the
chance level), ``n_train, n_val, feature_dim, n_classes, knn_k``, the encoder and its source.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mofo.formats.featurefile import FeatureTable, read_features

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


def top1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of ``pred`` equal to ``labels`` (0 for no clips)."""
    return 100.0 * float((pred == labels).double().mean()) if len(labels) else 0.0


def labelled(table: FeatureTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of the clips whose label is known."""
    keep = table.label >= 0
    return torch.from_numpy(table.features[keep]), torch.from_numpy(table.label[keep])


def probe_metrics(train: FeatureTable, val: FeatureTable, probe_cfg: dict) -> dict:
    """kNN and linear top-1 of ``val`` from ``train`` (module doc)."""
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
    return {"knn_top1": top1(knn, val_y), "linear_top1": top1(lin, val_y),
            "majority_top1": top1(majority, val_y), "n_train": len(train_y), "n_val": len(val_y),
            "feature_dim": int(train_x.shape[1]), "n_classes": n_classes,
            "knn_k": min(k, len(train_y))}


def run_probe(train_path: str | Path, val_path: str | Path, probe_cfg: dict,
              out_path: str | Path) -> dict:
    """Probe the two features files and write ``out_path`` (metrics.json); returns it."""
    train, val = read_features(train_path), read_features(val_path)
    metrics = {**probe_metrics(train, val, probe_cfg),
               "encoder": train.meta.get("encoder"), "source": train.meta.get("source"),
               "dataset": train.meta.get("dataset")}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(metrics, indent=1))
    return metrics


def main(argv: list[str] | None = None) -> int:
    import argparse

    from mofo.config import load_config

    parser = argparse.ArgumentParser(description="kNN and linear probe of features files")
    parser.add_argument("--config", action="append", default=[], help="config overlay(s)")
    parser.add_argument("--train", required=True, help="features of the train split (.npz)")
    parser.add_argument("--val", required=True, help="features of the validation split (.npz)")
    parser.add_argument("--out", required=True, help="metrics.json to write")
    args = parser.parse_args(argv)
    metrics = run_probe(args.train, args.val, load_config(args.config)["probe"], args.out)
    print(json.dumps({k: metrics[k] for k in ("knn_top1", "linear_top1", "majority_top1")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
