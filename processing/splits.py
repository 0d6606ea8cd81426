"""Train/validation/test splits: by donor (no donor in two splits), or stratified by label.

Both are deterministic for a seed (numpy's default_rng over sorted unique values, so the input
order of cells does not matter for which group goes where).

* :func:`donor_split`: whole donors go to one split. First, for each label (rarest first) that
  no train donor carries yet, one donor carrying it goes to train, so every label is in train
  where the data allow; then the remaining donors, largest first (random order among equal
  sizes), each go to the split furthest below its target share of cells.
* :func:`stratified_split`: for data without donors; within each label, cells are shuffled and
  ``round(n * fraction)`` go to validation and test, the rest (at least one) to train.
* :func:`assign_splits` picks one: donor_split when any donor is known (cells without a donor
  are then units of their own), stratified_split otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions.tolist()}")
    return fractions


def stratified_split(labels: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) per cell, stratified by label."""
    fractions = _check_fractions(fractions)
    labels = np.asarray(labels, dtype=object).astype(str)
    rng = np.random.default_rng(seed)
    result = np.zeros(len(labels), dtype=np.int8)
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n = len(members)
        n_val, n_test = (int(round(n * f)) for f in fractions[1:])
        while n - n_val - n_test < 1 and (n_val or n_test):
            if n_test >= n_val and n_test:
                n_test -= 1
            else:
                n_val -= 1
        result[members[n - n_val - n_test : n - n_test]] = 1
        result[members[n - n_test :]] = 2
    return result


def donor_split(
    donors: Sequence[str], labels: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> np.ndarray:
    """Split index per cell with every donor in exactly one split (see module doc)."""
    fractions = _check_fractions(fractions)
    donors = np.asarray(donors, dtype=object).astype(str)
    labels = np.asarray(labels, dtype=object).astype(str)
    units, unit_of_cell = np.unique(donors, return_inverse=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(units))
    sizes = np.bincount(unit_of_cell, minlength=len(units))
    split_of_unit = np.full(len(units), -1, dtype=np.int8)
    label_units: dict[str, set[int]] = {}
    for label, unit in set(zip(labels.tolist(), unit_of_cell.tolist())):
        label_units.setdefault(label, set()).add(unit)
    rank = np.empty(len(units), dtype=np.int64)
    rank[order] = np.arange(len(units))
    for label in sorted(label_units, key=lambda lab: (len(label_units[lab]), lab)):
        carriers = label_units[label]
        if not any(split_of_unit[u] == 0 for u in carriers):
            split_of_unit[min(carriers, key=lambda u: rank[u])] = 0
    filled = np.array([sizes[split_of_unit == s].sum() for s in range(3)], dtype=np.float64)
    targets = fractions * len(donors)
    remaining = [u for u in order.tolist() if split_of_unit[u] < 0]
    for unit in sorted(remaining, key=lambda u: (-sizes[u], rank[u])):
        split = int(np.argmax(targets - filled))
        split_of_unit[unit] = split
        filled[split] += sizes[unit]
    return split_of_unit[unit_of_cell]


def assign_splits(
    labels: Sequence[str],
    donors: Sequence[str | None],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    cell_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """Split index per cell: by donor where donors are known, else stratified by label."""
    donors = list(donors)
    if all(d is None for d in donors):
        return stratified_split(labels, fractions, seed)
    if cell_ids is None:
        cell_ids = [str(i) for i in range(len(donors))]
    units = [f"donor:{d}" if d is not None else f"cell:{c}" for d, c in zip(donors, cell_ids)]
    return donor_split(units, labels, fractions, seed)
