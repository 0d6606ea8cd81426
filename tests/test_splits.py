"""Splits: donor-disjoint with every label in train, stratified without donors, deterministic."""

import numpy as np
import pytest

from processing.splits import assign_fold_splits, assign_splits, donor_split, stratified_split


def _donor_data(seed=0, n=3000, n_donors=30):
    rng = np.random.default_rng(seed)
    donors = np.array([f"d{i}" for i in rng.integers(0, n_donors, n)], dtype=object)
    labels = np.array([f"type{i}" for i in rng.integers(0, 12, n)], dtype=object)
    labels[donors == "d7"] = "rare"  # a label carried by one donor only
    return donors, labels


def test_donor_split_is_disjoint_complete_and_deterministic():
    donors, labels = _donor_data()
    split = donor_split(donors, labels, seed=3)
    for donor in set(donors):
        assert len(set(split[donors == donor])) == 1
    assert set(labels) == set(labels[split == 0])
    shares = np.bincount(split, minlength=3) / len(split)
    np.testing.assert_allclose(shares, [0.8, 0.1, 0.1], atol=0.05)
    np.testing.assert_array_equal(split, donor_split(donors, labels, seed=3))
    assert not np.array_equal(split, donor_split(donors, labels, seed=4))
    # the input order of cells does not change where a donor goes
    order = np.random.default_rng(9).permutation(len(donors))
    np.testing.assert_array_equal(donor_split(donors[order], labels[order], seed=3), split[order])


def test_stratified_split_keeps_every_label_in_train():
    labels = np.array(["a"] * 240 + ["b"] * 13 + ["c"] * 8 + ["d"] * 2 + ["e"], dtype=object)
    split = stratified_split(labels, seed=0)
    for label in set(labels):
        members = split[labels == label]
        assert (members == 0).sum() >= 1
        assert abs((members == 1).sum() - round(0.1 * len(members))) <= 1
    assert (split[labels == "a"] == 1).sum() == 24 and (split[labels == "a"] == 2).sum() == 24
    np.testing.assert_array_equal(split, stratified_split(labels, seed=0))


def test_assign_splits_chooses_by_donor_presence():
    donors, labels = _donor_data(n=500)
    np.testing.assert_array_equal(assign_splits(labels, [None] * 500, seed=1), stratified_split(labels, seed=1))
    mixed = list(donors[:400]) + [None] * 100  # cells without a donor are units of their own
    split = assign_splits(labels, mixed, seed=1)
    for donor in set(donors[:400]):
        assert len(set(split[:400][donors[:400] == donor])) == 1
    assert len(set(split[400:])) > 1


def test_kfold_test_splits_partition_the_cells_and_never_train_or_validate_on_them():
    rng = np.random.default_rng(3)
    labels = rng.choice(["B", "T", "NK", "mono", "rare"], size=700, p=[0.2, 0.4, 0.2, 0.19, 0.01]).tolist()
    donors = [None] * 700
    splits = [assign_fold_splits(labels, donors, fold, 5, seed=7) for fold in range(5)]
    tested = np.stack([s == 2 for s in splits])
    assert (tested.sum(axis=0) == 1).all()  # every cell is tested in exactly one fold
    assert sorted(tested.sum(axis=1)) == [140] * 5
    for s in splits:  # the rest trains or validates, 1/8 of it validates, stratified
        assert ((s == 0) | (s == 1) | (s == 2)).all()
        assert (s == 1).sum() == pytest.approx(70, abs=3)
        for label in set(labels):  # each label's share of the test fold differs by at most one cell across folds
            counts = [int(((np.asarray(labels) == label) & (t == 2)).sum()) for t in splits]
            assert max(counts) - min(counts) <= 1
    again = assign_fold_splits(labels, donors, 2, 5, seed=7)
    assert (again == splits[2]).all()
    assert not (assign_fold_splits(labels, donors, 2, 5, seed=8) == splits[2]).all()


def test_kfold_by_donor_keeps_each_donor_in_one_fold_and_refuses_too_few_donors():
    labels = ["B", "T"] * 30
    donors = [f"d{i % 6}" for i in range(60)]
    splits = [assign_fold_splits(labels, donors, fold, 3, seed=0) for fold in range(3)]
    tested = np.stack([s == 2 for s in splits])
    assert (tested.sum(axis=0) == 1).all()
    for s in splits:
        for donor in set(donors):  # a donor's cells are all in one split of each fold
            assert len({int(x) for x, d in zip(s, donors) if d == donor}) == 1
    with pytest.raises(ValueError, match="6 donors cannot fill 7 folds"):
        assign_fold_splits(labels, donors, 0, 7)
    with pytest.raises(ValueError, match="fold must be in 0 .. 2"):
        assign_fold_splits(labels, donors, 3, 3)


def test_kfold_refuses_folds_it_cannot_fill():
    with pytest.raises(ValueError, match="num_folds must be between 2 and the number of cells \\(3\\)"):
        assign_fold_splits(["B", "T", "B"], [None] * 3, 0, 4)
    with pytest.raises(ValueError, match="num_folds must be between 2"):
        assign_fold_splits(["B", "T", "B"], [None] * 3, 0, 1)


def test_hashed_splits_put_a_donor_in_the_same_split_in_every_shard():
    """Shards built apart (the documented way past one machine) split each donor from the shard's own cells: two
    shards of the same 10 donors put 5 of them in two splits of the joined corpus, silently."""
    from processing.splits import assign_splits

    rng = np.random.default_rng(0)
    donors = [f"d{i}" for i in range(200)]
    shards = []
    for _ in range(2):  # two datasets of the same donors, other cells and cell types
        cells = rng.choice(donors, size=600)
        labels = rng.choice(["B cell", "T cell", "NK cell", "monocyte"], size=600, p=[0.1, 0.5, 0.1, 0.3])
        ids = [f"c{rng.integers(1e9)}" for _ in cells]
        shards.append((cells, assign_splits(labels, cells, seed=3, cell_ids=ids, hashed=True)))
        balanced = assign_splits(labels, cells, seed=3, cell_ids=ids)
    split_of = {}
    for cells, splits in shards:
        for donor, split in zip(cells, splits):
            assert split_of.setdefault(donor, split) == split, donor
    shares = np.bincount(list(split_of.values()), minlength=3) / len(split_of)
    assert np.allclose(shares, [0.8, 0.1, 0.1], atol=0.07)
    # the order of cells does not matter, nor do cells without a donor (split by their own id)
    cells, splits = shards[1]
    assert (assign_splits(["x"] * 600, cells[::-1], seed=3, hashed=True) == splits[::-1]).all()
    alone = assign_splits(["x"] * 3, [None] * 3, seed=3, cell_ids=["a", "b", "c"], hashed=True)
    assert (assign_splits(["x"] * 3, [None] * 3, seed=3, cell_ids=["c", "b", "a"], hashed=True) == alone[::-1]).all()
    assert len(set(map(str, balanced))) == 3  # the default stays the balanced split


def test_donor_split_puts_a_rare_cell_types_only_donor_in_train():
    """Without the first loop of donor_split (one carrier of each label to train), a small donor carrying
    the only cells of a cell type is placed last, into the split furthest below its share (validation or test),
    so that cell type is in no training cell and is no candidate label of the trained model."""
    donors = [f"d{i}" for i in range(7) for _ in range(10)] + ["rare_donor"] * 5
    labels = ["T cell"] * 70 + ["plasma cell"] * 5
    split = donor_split(donors, labels, seed=0)
    assert split[-1] == 0  # the rare label's only donor trains
    assert set(np.asarray(labels)[split == 0]) == {"T cell", "plasma cell"}
    for donor in set(donors):
        assert len(set(split[np.asarray(donors) == donor])) == 1


def test_stratified_split_keeps_one_training_cell_where_rounding_takes_them_all():
    """A label whose rounded validation and test shares add up to all its cells still keeps one in train (the
    docstring: the rest, at least one, to train)."""
    split = stratified_split(["a", "a", "b", "b", "b", "b", "b"], fractions=(0.2, 0.4, 0.4), seed=0)
    assert (split[:2] == 0).sum() == 1 and sorted(split[:2].tolist()) == [0, 1]  # a: 2 cells, round(0.8) = 1 each


def test_kfold_by_donor_balances_the_folds():
    """Mutation testing: with `np.argmax(filled)` for `np.argmin(filled)` every donor went to fold 0, so folds
    1 .. k-1 tested no cell (and fold 0 trained on none) while every check of the suite (each cell tested once,
    each donor in one split) still held."""
    labels = ["B", "T"] * 30
    donors = [f"d{i % 6}" for i in range(60)]  # 6 donors of 10 cells
    tested = [int((assign_fold_splits(labels, donors, fold, 3, seed=0) == 2).sum()) for fold in range(3)]
    assert tested == [20, 20, 20]
