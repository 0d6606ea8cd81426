"""Classification metrics for fields parsed back out of generated cell descriptions.

A generated description may not parse, or may lack a field: its prediction is then ``None``.
``None`` always counts as a wrong prediction (never as a crash) and the number of them is
reported as ``num_missing``, so a model that writes unparseable text cannot look better by
being evaluated on fewer cells.

Labels are compared as exact strings: the parser that turns text back into fields is the
place to canonicalise them (the same schema that wrote the descriptions reads them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

# Stands in for a missing prediction; it never equals a true label.
_MISSING = "\x00<missing>"


class _Similarity(Protocol):
    def score(self, true_id: str, predicted_id: str) -> float: ...


def _check_lengths(true: Sequence, pred: Sequence) -> None:
    if len(true) != len(pred):
        raise ValueError(
            f"true and pred must have one entry per cell: got {len(true)} true and "
            f"{len(pred)} predicted; pass None for a cell whose prediction is missing."
        )
    if len(true) == 0:
        raise ValueError("No cells to evaluate: pass at least one (true, pred) pair.")


def _fill_missing(pred: Sequence[str | None]) -> tuple[list[str], int]:
    """Replace None by a sentinel that matches no true label; count the Nones."""
    filled = [_MISSING if p is None else p for p in pred]
    return filled, sum(p is None for p in pred)


def classification_report(true: Sequence[str], pred: Sequence[str | None]) -> dict:
    """Accuracy, weighted F1 and macro precision/recall of one field over cells.

    Per-class scores are taken over the classes present in ``true`` (the test set's classes):
    a prediction outside them (a hallucinated label, or None) is simply wrong. A class that is
    never predicted gets precision 0.
    """
    _check_lengths(true, pred)
    if any(t is None for t in true):
        raise ValueError("true labels contain None: drop cells without a ground-truth label first.")
    filled, num_missing = _fill_missing(pred)
    labels = sorted(set(true))
    return {
        "accuracy": float(accuracy_score(true, filled)),
        "weighted_f1": float(
            f1_score(true, filled, labels=labels, average="weighted", zero_division=0)
        ),
        "macro_precision": float(
            precision_score(true, filled, labels=labels, average="macro", zero_division=0)
        ),
        "macro_recall": float(
            recall_score(true, filled, labels=labels, average="macro", zero_division=0)
        ),
        "num_missing": int(num_missing),
        "num_cells": len(true),
        "num_classes": len(labels),
    }


def per_class_accuracy(true: Sequence[str], pred: Sequence[str | None]) -> dict[str, dict]:
    """For each true class: its support and the fraction of its cells predicted right (recall)."""
    _check_lengths(true, pred)
    support = Counter(true)
    correct = Counter(t for t, p in zip(true, pred) if p is not None and t == p)
    return {
        label: {"support": n, "accuracy": correct[label] / n}
        for label, n in sorted(support.items(), key=lambda kv: (-kv[1], kv[0]))
    }


def ontology_similarity_scores(
    true_ids: Sequence[str], pred_ids: Sequence[str | None], similarity: _Similarity
) -> list[float]:
    """Per-cell ontology similarity (e.g. ``OntologySimilarity.score``); a missing prediction scores 0."""
    _check_lengths(true_ids, pred_ids)
    return [0.0 if p is None else float(similarity.score(t, p)) for t, p in zip(true_ids, pred_ids)]


def _names(items: Iterable[str]) -> Iterable[str]:
    """A cell's pathway names; a bare string refused (its letters would be taken for names and scored)."""
    if isinstance(items, str):
        raise ValueError(f"A cell's pathways must be a list of names, got the string {items!r}: wrap it, [{items!r}].")
    return items


def _as_set(items: Iterable[str] | None) -> set[str]:
    return set() if items is None else set(_names(items))


def _set_f1(true: set[str], pred: set[str]) -> float:
    if not true and not pred:
        return 1.0
    return 2 * len(true & pred) / (len(true) + len(pred))


def pathway_report(
    true_sets: Sequence[Iterable[str]], pred_sets: Sequence[Iterable[str] | None]
) -> dict:
    """Multi-label metrics for the pathway names of each cell.

    - ``subset_accuracy``: fraction of cells whose predicted set equals the true set.
    - ``jaccard``: mean |T & P| / |T | P| over cells (1 when both are empty).
    - ``f1``: micro F1 (true positives, false positives and false negatives pooled over cells);
      ``f1_samples``: mean of the per-cell F1.
    - ``num_distinct_predicted``: how many different sets were predicted (1: the same pathways for every cell).
    A missing prediction (None: the text did not parse) is counted in ``num_missing`` and is wrong: it scores 0 for
    the cell, also where the true set is empty (an empty prediction then scores 1); in the micro F1 its true names
    are false negatives, and where there are none it is one false positive.
    """
    _check_lengths(true_sets, pred_sets)
    if any(t is None for t in true_sets):
        raise ValueError("true_sets contain None: drop cells without ground-truth pathways first (an empty list is "
                         "a cell with none).")
    trues = [_as_set(t) for t in true_sets]
    preds = [_as_set(p) for p in pred_sets]
    given = [p is not None for p in pred_sets]
    num_missing = given.count(False)
    tp = sum(len(t & p) for t, p in zip(trues, preds))
    # a missing prediction misses its true names; where there are none, it still states nothing right: one error
    fp = sum(len(p - t) for t, p in zip(trues, preds)) + sum(not t for t, g in zip(trues, given) if not g)
    fn = sum(len(t - p) for t, p in zip(trues, preds))
    jaccard = [(1.0 if not (t | p) else len(t & p) / len(t | p)) if g else 0.0 for t, p, g in zip(trues, preds, given)]
    return {
        "subset_accuracy": float(np.mean([g and t == p for t, p, g in zip(trues, preds, given)])),
        "jaccard": float(np.mean(jaccard)),
        "f1": 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn),
        "f1_samples": float(np.mean([_set_f1(t, p) if g else 0.0 for t, p, g in zip(trues, preds, given)])),
        "num_missing": num_missing,
        "num_distinct_predicted": len({frozenset(p) for p, given in zip(preds, pred_sets) if given is not None}),
        "num_cells": len(trues),
    }


def most_frequent_pathways(pathway_sets: Sequence[Iterable[str]]) -> list[str]:
    """The baseline a pathway prediction must beat: the names most often among ``pathway_sets`` (a training split's),
    as many as its cells most often have (ties by name)."""
    sets = [list(dict.fromkeys(_names(names))) for names in pathway_sets]
    sizes = Counter(len(names) for names in sets if names)
    if not sizes:
        return []
    size = max(sizes.items(), key=lambda item: (item[1], -item[0]))[0]
    counts = Counter(name for names in sets for name in names)
    return [name for name, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]]


def calibration_report(confidences: Sequence[float], correct: Sequence[bool], num_bins: int = 10) -> dict:
    """Expected calibration error and the reliability-diagram bins of per-cell confidences.

    Confidences in [0, 1] fall into ``num_bins`` equal-width bins (the last one closed: 1.0 is in it). ECE is
    ``sum over bins of (n_bin / n) * |accuracy_bin - mean confidence_bin|``. Bins without cells are listed with
    count 0 and no accuracy or confidence.
    """
    _check_lengths(confidences, correct)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
    conf = np.asarray(confidences, dtype=np.float64)
    if ((conf < 0) | (conf > 1) | np.isnan(conf)).any():
        raise ValueError("Confidences must be probabilities in [0, 1].")
    wrong = [c for c in correct if not isinstance(c, (bool, np.bool_)) and not (
        isinstance(c, (int, float, np.integer, np.floating)) and c in (0, 1))]
    if wrong:  # None or NaN made the ECE NaN, and a 2 an ECE above 1, without a word
        raise ValueError(f"correct must be one bool per cell (True where the prediction is right), got {wrong[0]!r}.")
    hits = np.asarray(correct, dtype=np.float64)
    # by the edges the bins state: conf * num_bins rounds 0.8999999999999999 up into [0.9, 1.0]
    index = np.minimum(np.searchsorted(np.arange(num_bins + 1) / num_bins, conf, side="right") - 1, num_bins - 1)
    bins, ece = [], 0.0
    for b in range(num_bins):
        members = index == b
        n = int(members.sum())
        entry = {"lower": b / num_bins, "upper": (b + 1) / num_bins, "count": n,
                 "mean_confidence": None, "accuracy": None}
        if n:
            entry["mean_confidence"] = float(conf[members].mean())
            entry["accuracy"] = float(hits[members].mean())
            ece += n / len(conf) * abs(entry["accuracy"] - entry["mean_confidence"])
        bins.append(entry)
    return {"ece": float(ece), "mean_confidence": float(conf.mean()), "accuracy": float(hits.mean()),
            "num_cells": len(conf), "bins": bins}
