"""Splits: donor-disjoint with every label in train, stratified without donors, deterministic."""

import numpy as np

from processing.splits import assign_splits, donor_split, stratified_split


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
