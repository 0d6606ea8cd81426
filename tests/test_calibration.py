"""Expected calibration error and reliability bins of per-cell confidences."""

import pytest

from training.evaluation.metrics import calibration_report


def test_calibration_report_hand_computed():
    # bin [0.2, 0.3): 0.25 (right) -> |1 - 0.25|; bin [0.9, 1.0]: 0.9 right, 1.0 wrong -> |0.5 - 0.95|
    r = calibration_report([0.25, 0.9, 1.0], [True, True, False], num_bins=10)
    assert r["ece"] == pytest.approx(1 / 3 * 0.75 + 2 / 3 * 0.45)
    assert [b["count"] for b in r["bins"]] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 2]
    assert r["bins"][9]["mean_confidence"] == pytest.approx(0.95) and r["bins"][9]["accuracy"] == 0.5
    assert r["bins"][0]["accuracy"] is None
    assert r["accuracy"] == pytest.approx(2 / 3) and r["mean_confidence"] == pytest.approx(2.15 / 3)
    assert calibration_report([0.5, 0.5], [True, False], num_bins=2)["ece"] == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_report([1.5], [True])


def test_calibration_report_refuses_correct_values_that_are_not_bools():
    """None or NaN made the ECE NaN and a 2 an ECE of 1.1, silently."""
    import pandas as pd

    for value in (None, float("nan"), 2, "True", pd.NA):
        with pytest.raises(ValueError, match="one bool per cell"):
            calibration_report([0.5, 0.9], [True, value])
    assert calibration_report([0.5, 0.9], [1, 0])["accuracy"] == 0.5


def test_each_confidence_lies_within_its_bins_stated_edges():
    """conf * num_bins rounded the float just below 0.9 (and 5/6 for 6 bins) up into the bin above."""
    import numpy as np

    for num_bins in range(1, 41):
        edges = [b / num_bins for b in range(num_bins + 1)]
        values = [float(v) for e in edges for v in (np.nextafter(e, -1), e, np.nextafter(e, 2)) if 0 <= v <= 1]
        for value in values:
            (b,) = [b for b in calibration_report([value], [True], num_bins)["bins"] if b["count"]]
            assert b["lower"] <= value and (value < b["upper"] or value == b["upper"] == 1.0), (num_bins, value, b)
