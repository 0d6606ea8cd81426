"""benchmarks/encoder_probe.py: one row per split and input size, the means, the JSON (probe runs stubbed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import encoder_probe  # noqa: E402


def test_encoder_probe_prints_each_split_and_the_means(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_probe_split(out_dir, seed, size):
        calls.append((out_dir.name, seed, size))
        return {"seed": seed, "model_input_size": size, "seconds_per_candidate": 1.0,
                "probes": {"rank-value, 2 layer(s)": 0.8 + seed / 10},
                "baselines": {"logistic_regression": 0.85, "knn": 0.8, "majority": 0.3}}

    monkeypatch.setattr(encoder_probe, "probe_split", fake_probe_split)
    rows = encoder_probe.main(["--seeds", "0", "1", "--out", str(tmp_path)])
    assert calls == [("seed-0-input-130", 0, 130), ("seed-1-input-130", 1, 130)]
    assert json.loads((tmp_path / "encoder_probe.json").read_text()) == rows
    printed = capsys.readouterr().out
    assert "| Split seed | Input | Logistic regression | kNN | Majority class | Probe: rank-value, 2 layer(s) |" in printed
    assert "| 1 | 130 | 0.850 | 0.800 | 0.300 | 0.900 | 1.0 |" in printed
    assert "| mean of 2 | 130 | **0.850** | **0.800** | **0.300** | **0.850** | |" in printed

    # A second run does not replace the first one's figures unless asked.
    with pytest.raises(SystemExit, match="pass --overwrite"):
        encoder_probe.main(["--seeds", "3", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "encoder_probe.json").read_text()) == rows
    assert encoder_probe.main(["--seeds", "3", "--out", str(tmp_path), "--overwrite"])[0]["seed"] == 3


def test_a_split_named_twice_is_refused_before_it_is_probed(tmp_path, monkeypatch, capsys):
    """--seeds 0 0 probed one split twice and printed its figures as the "mean of 2" splits."""
    monkeypatch.setattr(encoder_probe, "probe_split", lambda *args: pytest.fail("probed"))
    for argv in (["--seeds", "0", "0"], ["--input-sizes", "130", "130"]):
        with pytest.raises(SystemExit) as exit_info:
            encoder_probe.main([*argv, "--out", str(tmp_path)])
        assert exit_info.value.code == 2 and f"{argv[0]} names a value twice" in capsys.readouterr().err


def test_candidates_are_each_input_kind_at_each_depth():
    from training.demo import sft_arguments
    from training.sft import encoder_candidates

    args, _ = sft_arguments(["--corpus_dir", "c", "--text_model_name_or_path", "m"])
    candidates = encoder_candidates(args)
    assert [(c.value_aware, c.num_hidden_layers) for c in candidates] == [(False, 1), (False, 2), (True, 1), (True, 2)]
    args.encoder_candidate_inputs = ["ranks"]
    with pytest.raises(ValueError, match=r"encoder_candidate_inputs must be a non-empty list of \('rank'"):
        encoder_candidates(args)
    args.encoder_candidate_inputs = "rank"  # a YAML scalar where a list is meant
    with pytest.raises(ValueError, match=r"encoder_candidate_inputs must be a list \(YAML: \[rank\]\)"):
        encoder_candidates(args)


@pytest.mark.parametrize("layers", [3, [], [0], ["2"]])
def test_encoder_candidate_layers_that_are_not_a_list_of_depths_are_refused(layers):
    """A reviewer's finding: `encoder_candidate_layers: 3` in a training YAML was accepted and failed later."""
    from training.demo import sft_arguments
    from training.sft import encoder_candidates

    args, _ = sft_arguments(["--corpus_dir", "c", "--text_model_name_or_path", "m"])
    args.encoder_candidate_layers = layers
    with pytest.raises(ValueError, match="encoder_candidate_layers must be a non-empty list of layer counts"):
        encoder_candidates(args)
