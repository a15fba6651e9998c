"""Classification metrics on clip-level scores: top-k, per-class accuracy, confusion, EPIC.

Clips whose label is -1 (unknown, e.g. the SSV2 test split) are left out of every metric
(and counted in ``n_unlabelled``); their predictions are still written.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def aggregate_views(
    clip_ids: Sequence[str], scores: np.ndarray, how: str = "softmax"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Average the view scores of each clip.

    ``scores`` (V_total, C) are logits, one row per view; ``how`` = ``softmax`` averages
    probabilities (VideoMAE's test), ``logits`` averages raw logits. Returns the clip ids in
    first-seen order, the averaged scores (clips, C) and the number of views per clip.
    """
    if how not in ("softmax", "logits"):
        raise ValueError(f"evaluate.average must be 'softmax' or 'logits', got {how!r}")
    scores = np.asarray(scores, dtype=np.float64)
    if len(clip_ids) != scores.shape[0]:
        raise ValueError(f"{len(clip_ids)} clip ids for {scores.shape[0]} score rows")
    if how == "softmax":
        scores = torch.softmax(torch.from_numpy(scores), dim=1).numpy()
    order: dict[str, int] = {}
    rows = np.array([order.setdefault(c, len(order)) for c in clip_ids], dtype=np.int64)
    sums = np.zeros((len(order), scores.shape[1]))
    np.add.at(sums, rows, scores)
    counts = np.bincount(rows, minlength=len(order))
    return list(order), sums / counts[:, None], counts


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """bool per clip: the label is among the ``k`` highest scores (ties broken by index)."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (top == np.asarray(labels)[:, None]).any(1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict:
    """``{"top1": %, "top5": %}`` over labelled clips (labels >= 0), in percent."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    keep = labels >= 0
    out = {}
    for k in ks:
        hits = topk_correct(scores[keep], labels[keep], k) if keep.any() else np.zeros(0, bool)
        out[f"top{k}"] = float(100.0 * hits.mean()) if hits.size else float("nan")
    return out


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``(num_classes, num_classes)``: rows = true class, columns = predicted class."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    keep = labels >= 0
    flat = labels[keep] * num_classes + pred[keep]
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class in percent; NaN for classes without labelled clips."""
    confusion = np.asarray(confusion, dtype=float)
    support = confusion.sum(1)
    return np.where(support > 0, 100.0 * np.diag(confusion) / np.maximum(support, 1), np.nan)


def classification_metrics(scores: np.ndarray, labels: np.ndarray, num_classes: int,
                           ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k, mean per-class accuracy, per-class accuracy list and the confusion matrix."""
    labels = np.asarray(labels)
    pred = np.asarray(scores).argmax(1)
    conf = confusion_matrix(pred, labels, num_classes)
    per_class = per_class_accuracy(conf)
    out = topk_accuracy(scores, labels, ks)
    out["mean_class_accuracy"] = float(np.nanmean(per_class)) if np.isfinite(per_class).any() \
        else float("nan")
    out["per_class_accuracy"] = [None if np.isnan(v) else float(v) for v in per_class]
    out["n_clips"] = int((labels >= 0).sum())
    out["n_unlabelled"] = int((labels < 0).sum())
    out["confusion"] = conf
    return out


def action_metrics(verb_scores: np.ndarray, noun_scores: np.ndarray, verb_labels: np.ndarray,
                   noun_labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict:
    """EPIC-KITCHENS action accuracy: an action is right when verb and noun both are.

    Action scores are the outer product of the verb and noun probabilities (rows are
    expected to be probabilities already); top-1 is then exactly "both arg-maxes right",
    top-k ranks (verb, noun) pairs.
    """
    verb_labels, noun_labels = np.asarray(verb_labels), np.asarray(noun_labels)
    keep = (verb_labels >= 0) & (noun_labels >= 0)
    out: dict[str, float] = {}
    if not keep.any():
        return {f"action_top{k}": float("nan") for k in ks}
    v, n = np.asarray(verb_scores)[keep], np.asarray(noun_scores)[keep]
    n_nouns = n.shape[1]
    joint = (v[:, :, None] * n[:, None, :]).reshape(len(v), -1)
    action_labels = verb_labels[keep] * n_nouns + noun_labels[keep]
    for k in ks:
        out[f"action_top{k}"] = float(100.0 * topk_correct(joint, action_labels, k).mean())
    return out


def marginalize_actions(action_probs: np.ndarray, actions: Sequence[Sequence[int]],
                        num_verbs: int, num_nouns: int) -> tuple[np.ndarray, np.ndarray]:
    """Verb and noun scores of EPIC-KITCHENS' one-softmax ``action`` classifier (the MOFO
    authors' ``utils.marginalize``).

    ``action_probs`` (N, A): probabilities over the action vocabulary ``actions``, a sequence
    of A ``(verb_class, noun_class)`` pairs (action ``i`` is ``actions[i]``). Returns
    ``verb_scores`` (N, ``num_verbs``), where column ``v`` is the sum of the probabilities of
    all actions with verb ``v``, and ``noun_scores`` (N, ``num_nouns``) likewise; verbs and
    nouns no action uses score 0. Rows that sum to 1 keep summing to 1.
    """
    probs = np.asarray(action_probs, dtype=np.float64)
    pairs = np.asarray(actions, dtype=np.int64).reshape(-1, 2)
    if probs.ndim != 2 or probs.shape[1] != len(pairs):
        raise ValueError(f"action scores {probs.shape} do not fit {len(pairs)} action classes")
    if len(pairs) and not ((pairs >= 0).all() and (pairs[:, 0] < num_verbs).all()
                           and (pairs[:, 1] < num_nouns).all()):
        raise ValueError(f"action classes outside {num_verbs} verbs x {num_nouns} nouns")
    verb_scores = np.zeros((len(probs), num_verbs))
    noun_scores = np.zeros((len(probs), num_nouns))
    np.add.at(verb_scores.T, pairs[:, 0], probs.T)
    np.add.at(noun_scores.T, pairs[:, 1], probs.T)
    return verb_scores, noun_scores


def action_labels(verb_labels: np.ndarray, noun_labels: np.ndarray,
                  actions: Sequence[Sequence[int]]) -> np.ndarray:
    """Action class of each clip in the vocabulary ``actions`` ((verb, noun) pairs): the
    pair's index; ``len(actions)`` (a class no score column has, so never predicted) for a
    labelled pair outside the vocabulary; -1 where the verb or noun label is unknown (-1)."""
    verb_labels, noun_labels = np.asarray(verb_labels), np.asarray(noun_labels)
    index = {(int(v), int(n)): i for i, (v, n) in enumerate(actions)}
    unseen = len(index)
    return np.array([-1 if v < 0 or n < 0 else index.get((int(v), int(n)), unseen)
                     for v, n in zip(verb_labels, noun_labels)], dtype=np.int64)


def vocabulary_action_metrics(action_probs: np.ndarray, verb_labels: np.ndarray,
                              noun_labels: np.ndarray, actions: Sequence[Sequence[int]],
                              ks: Sequence[int] = (1, 5)) -> dict:
    """Action top-k of the one-softmax ``action`` classifier: the clip's (verb, noun) pair
    is among the k highest-scoring actions (k above the vocabulary size counts every action).

    A labelled clip whose pair is not in the vocabulary (a validation action the train split
    never shows) counts as wrong at every k: it stays in the denominator, as in the MOFO
    authors' evaluation. Clips with an unknown verb or noun (-1) are left out. Also returns
    ``n_unseen_actions``, how many clips had such a pair.
    """
    labels = action_labels(verb_labels, noun_labels, actions)
    keep = labels >= 0
    out: dict = {"n_unseen_actions": int((labels == len(actions)).sum())}
    for k in ks:
        hits = topk_correct(np.asarray(action_probs)[keep], labels[keep], k)
        out[f"action_top{k}"] = float(100.0 * hits.mean()) if hits.size else float("nan")
    return out
