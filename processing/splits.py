"""Train/validation/test splits: by donor (no donor in two splits), or stratified by label.

Both are deterministic for a seed (numpy's default_rng). donor_split draws over the sorted donors, so the input
order of cells does not matter; stratified_split shuffles each label's cells in their input order, so the same
cells in another order split differently (hashed_split does not depend on the order; the default is kept because
the checked-in benchmarks' splits come from it).

* :func:`donor_split`: whole donors go to one split. First, for each label (rarest first) that
  no train donor carries yet, one donor carrying it goes to train, so every label is in train
  where the data allow; then the remaining donors, largest first (random order among equal
  sizes), each go to the split furthest below its target share of cells.
* :func:`stratified_split`: for data without donors; within each label, cells are shuffled and
  ``round(n * fraction)`` go to validation and test, the rest (at least one) to train.
* :func:`hashed_split`: each unit's split from a hash of its id and the seed alone, so every shard of a corpus
  built on several machines puts a donor in the same split (the two above decide from the whole input: the same
  donor in two shards could land in two splits). Split sizes are then only near the fractions.
* :func:`assign_splits` picks one: donor_split when any donor is known (cells without a donor
  are then units of their own), stratified_split otherwise; with ``hashed=True``, hashed_split over the same units
  (donors, else cells).
* :func:`assign_fold_splits`: k-fold cross-validation, so every cell is tested once over the folds.
  Cells are dealt into ``num_folds`` folds stratified by label (whole donors, where donors are known,
  balanced by size only); fold ``fold`` is the test split, and validation is drawn from the other folds
  by the same rule as above (stratified, or by donor), ``KFOLD_VALIDATION_FRACTION`` of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
# k-fold: the share of the non-test cells that validates (5 folds of 700 cells: 490 train, 70 validation, 140 test)
KFOLD_VALIDATION_FRACTION = 0.125


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


def hashed_split(units: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> np.ndarray:
    """Split index per cell from a hash of its unit (donor or cell id) and `seed`: the same unit gets the same split
    in any input (see module doc)."""
    cumulative = np.cumsum(_check_fractions(fractions))
    split_of_unit = {}
    for unit in dict.fromkeys(units):
        digest = hashlib.sha256(f"{seed}\0{unit}".encode()).digest()
        split_of_unit[unit] = min(int(np.searchsorted(cumulative, int.from_bytes(digest[:8], "big") / 2**64,
                                                      side="right")), 2)
    return np.array([split_of_unit[u] for u in units], dtype=np.int8)


def assign_splits(
    labels: Sequence[str],
    donors: Sequence[str | None],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    cell_ids: Sequence[str] | None = None,
    hashed: bool = False,
) -> np.ndarray:
    """Split index per cell: by donor where donors are known, else stratified by label; `hashed`: `hashed_split`
    of the donors (cells without one by their id), else of the cells (`cell_ids` needed)."""
    units = _units(donors, cell_ids)
    if hashed:
        if units is None and cell_ids is None:
            raise ValueError("hashed splits of cells without donors need their cell_ids.")
        return hashed_split(units if units is not None else [f"cell:{c}" for c in cell_ids], fractions, seed)
    if units is None:
        return stratified_split(labels, fractions, seed)
    return donor_split(units, labels, fractions, seed)


def _units(donors: Sequence[str | None], cell_ids: Sequence[str] | None) -> list[str] | None:
    """One unit per donor (cells without a donor are units of their own); None when no donor is known."""
    donors = list(donors)
    if all(d is None for d in donors):
        return None
    if cell_ids is None:
        cell_ids = [str(i) for i in range(len(donors))]
    return [f"donor:{d}" if d is not None else f"cell:{c}" for d, c in zip(donors, cell_ids)]


def fold_of_cells(labels: Sequence[str], units: Sequence[str] | None, num_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0 .. num_folds - 1) per cell.

    Without units: within each label (sorted), cells are shuffled and dealt in turn into the folds, the turn
    carrying over from label to label, so every fold has each label's share (+- 1 cell) and sizes differ by at
    most one. With units (donors): whole units, largest first (random order among equal sizes), each to the fold
    with the fewest cells.
    """
    labels = np.asarray(labels, dtype=object).astype(str)
    if num_folds < 2 or num_folds > len(labels):
        raise ValueError(f"num_folds must be between 2 and the number of cells ({len(labels)}), got {num_folds}.")
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(labels), dtype=np.int64)
    if units is None:
        turn = 0
        for label in sorted(set(labels)):
            members = np.flatnonzero(labels == label)
            members = members[rng.permutation(len(members))]
            folds[members] = (turn + np.arange(len(members))) % num_folds
            turn = (turn + len(members)) % num_folds
        return folds
    names, unit_of_cell = np.unique(np.asarray(units, dtype=object).astype(str), return_inverse=True)
    if len(names) < num_folds:
        raise ValueError(f"{len(names)} donors cannot fill {num_folds} folds (whole donors go to one fold); pass "
                         f"at most {len(names)} folds.")
    sizes = np.bincount(unit_of_cell, minlength=len(names))
    rank = np.empty(len(names), dtype=np.int64)
    rank[rng.permutation(len(names))] = np.arange(len(names))
    filled = np.zeros(num_folds, dtype=np.int64)
    fold_of_unit = np.empty(len(names), dtype=np.int64)
    for unit in sorted(range(len(names)), key=lambda u: (-sizes[u], rank[u])):
        fold_of_unit[unit] = int(np.argmin(filled))
        filled[fold_of_unit[unit]] += sizes[unit]
    return fold_of_unit[unit_of_cell]


def check_fold(fold: int, num_folds: int) -> None:
    """Refuse a fold outside 0 .. num_folds - 1."""
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0 .. {num_folds - 1}, got {fold}.")


def assign_fold_splits(
    labels: Sequence[str],
    donors: Sequence[str | None],
    fold: int,
    num_folds: int,
    seed: int = 0,
    cell_ids: Sequence[str] | None = None,
    validation_fraction: float = KFOLD_VALIDATION_FRACTION,
) -> np.ndarray:
    """Split index per cell for fold `fold` of `num_folds`: that fold is the test split; validation is
    `validation_fraction` of the other cells (by donor where donors are known, else stratified); the rest train.

    The same seed gives the same folds for every `fold`, so the test splits of folds 0 .. num_folds - 1
    partition the cells."""
    check_fold(fold, num_folds)
    labels = np.asarray(labels, dtype=object).astype(str)
    units = _units(donors, cell_ids)
    is_test = fold_of_cells(labels, units, num_folds, seed) == fold
    rest = np.flatnonzero(~is_test)
    fractions = (1.0 - validation_fraction, validation_fraction, 0.0)
    result = np.full(len(labels), 2, dtype=np.int8)
    if units is None:
        result[rest] = stratified_split(labels[rest], fractions, seed)
    else:
        result[rest] = donor_split([units[i] for i in rest], labels[rest], fractions, seed)
    return result
