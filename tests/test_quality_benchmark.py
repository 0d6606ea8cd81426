"""benchmarks/quality.py: per-split figures, mean +- sd and the JSON, with the main job's run stubbed (hours)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402


def fake_results(seed: int) -> dict:
    """What the main job's results.json holds, reduced to what the benchmark reads."""
    return {
        "parse_rate": 1.0,
        "fields": {"cell_type": {"accuracy": 0.8 + seed / 100, "weighted_f1": 0.78, "ontology_similarity": 0.95}},
        "cell_type_constraint": {"free_accuracy": 0.7, "num_invented": seed, "calibration": {"ece": 0.05}},
        "cell2sentence_parse_rate": 0.9,
        "baselines": {
            "logistic_regression": {"cell_type": {"accuracy": 0.83, "weighted_f1": 0.82}},
            "knn": {"cell_type": {"accuracy": 0.71, "weighted_f1": 0.7}},
            "majority": {"cell_type": {"accuracy": 0.34, "weighted_f1": 0.17}},
            "cell2sentence": {"cell_type": {"accuracy": 0.5, "weighted_f1": 0.45, "ontology_similarity": 0.8}},
        },
    }


def test_quality_benchmark_runs_each_seed_and_writes_the_summary(tmp_path, monkeypatch, capsys):
    import training.demo

    calls = []

    def fake_run(out_dir, seed, max_steps, max_new_tokens, skip_cell2sentence):
        calls.append((Path(out_dir).name, seed, max_steps, skip_cell2sentence))
        report = Path(out_dir) / "report" / "report.md"
        report.parent.mkdir(parents=True)
        (report.parent / "results.json").write_text(json.dumps(fake_results(seed)))
        return report

    monkeypatch.setattr(training.demo, "run", fake_run)
    monkeypatch.setattr(quality, "git_commit", lambda: "0" * 40)
    paired = {"logistic_regression": {"both": 50, "cell2text_only": 1, "baseline_only": 5, "neither": 14}}
    monkeypatch.setattr(quality, "paired_counts", lambda out_dir: paired)
    benchmark = quality.main(["--seeds", "0", "1", "2", "--out", str(tmp_path), "--skip-cell2sentence"])
    assert calls == [("seed-0", 0, None, True), ("seed-1", 1, None, True), ("seed-2", 2, None, True)]
    saved = json.loads((tmp_path / "quality_benchmark.json").read_text())
    assert saved == json.loads(json.dumps(benchmark))
    assert saved["seeds"] == [0, 1, 2] and saved["commit"] == "0" * 40 and saved["complete"]
    accuracy = saved["summary"]["cell2text"]["accuracy"]
    assert accuracy["mean"] == pytest.approx(0.81) and accuracy["sd"] == pytest.approx(0.01) and accuracy["n"] == 3
    assert saved["summary"]["cell2sentence"]["parse_rate"]["mean"] == 0.9
    assert saved["summary"]["cell2text"]["num_invented"]["mean"] == 1.0
    printed = capsys.readouterr().out
    assert "| Cell2Text | Cell-type accuracy | 0.800 | 0.810 | 0.820 | 0.810 +- 0.010 |" in printed
    assert "| Logistic regression | Cell-type accuracy | 0.830 | 0.830 | 0.830 | 0.830 +- 0.000 |" in printed
    # Pooled over the 3 splits: 3 cells Cell2Text alone got right, 15 logistic regression alone, of 210.
    lr = saved["paired"]["logistic_regression"]
    assert (lr["num_cells"], lr["cell2text_only"], lr["baseline_only"]) == (210, 3, 15)
    assert lr["accuracy_difference"] == pytest.approx(-12 / 210)
    assert lr["mcnemar_p"] == pytest.approx(2 * sum(math.comb(18, k) for k in range(4)) / 2 ** 18)
    assert ("- Cell2Text - Logistic regression: -0.057 accuracy on 210 cells (Cell2Text alone right on 3, "
            "Logistic regression alone on 15; exact McNemar p = 0.00754)") in printed


def test_repeated_seeds_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        quality.main(["--seeds", "0", "0", "--out", str(tmp_path)])


def fake_main_job(calls: list, fail_at: int | None = None):
    def run(out_dir, seed, max_steps, max_new_tokens, skip_cell2sentence):
        if seed == fail_at:
            raise KeyboardInterrupt  # the session ends mid-split
        calls.append(seed)
        report = Path(out_dir) / "report" / "report.md"
        report.parent.mkdir(parents=True)
        (report.parent / "results.json").write_text(json.dumps(fake_results(seed)))
        return report

    return run


def test_an_interrupted_benchmark_keeps_its_splits_and_resumes_from_them(tmp_path, monkeypatch):
    import training.demo

    monkeypatch.setattr(quality, "git_commit", lambda: "a" * 40)
    monkeypatch.setattr(quality, "paired_counts", lambda out_dir: {})
    calls = []
    monkeypatch.setattr(training.demo, "run", fake_main_job(calls, fail_at=2))
    with pytest.raises(KeyboardInterrupt):
        quality.main(["--seeds", "0", "1", "2", "--out", str(tmp_path)])
    partial = json.loads((tmp_path / "quality_benchmark.json").read_text())
    assert [s["seed"] for s in partial["splits"]] == [0, 1] and partial["complete"] is False
    assert partial["summary"]["cell2text"]["accuracy"]["n"] == 2

    # Without --resume the file is not overwritten.
    with pytest.raises(SystemExit, match="pass --resume"):
        quality.main(["--seeds", "0", "1", "2", "--out", str(tmp_path)])
    # Other settings (here: the Cell2Sentence baseline left out) cannot reuse the splits.
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(["--seeds", "0", "1", "2", "--out", str(tmp_path), "--resume", "--skip-cell2sentence"])

    calls.clear()
    monkeypatch.setattr(training.demo, "run", fake_main_job(calls))
    benchmark = quality.main(["--seeds", "0", "1", "2", "--out", str(tmp_path), "--resume"])
    assert calls == [2] and benchmark["complete"]
    assert benchmark["summary"]["cell2text"]["accuracy"]["mean"] == pytest.approx(0.81)

    # Another commit cannot reuse them either, nor can uncommitted changes.
    monkeypatch.setattr(quality, "git_commit", lambda: "b" * 40)
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(["--seeds", "0", "1", "2", "--out", str(tmp_path), "--resume"])
    monkeypatch.setattr(quality, "git_commit", lambda: "a" * 40 + "+dirty")
    with pytest.raises(SystemExit, match="uncommitted changes"):
        quality.main(["--seeds", "0", "1", "2", "--out", str(tmp_path), "--resume"])


def test_paired_counts_compare_each_test_cell_of_the_split(tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict

    import training.demo

    truth = ["B cell", "T cell", "B cell", "NK cell"]
    DatasetDict({"test": Dataset.from_dict({"cell_type": truth, "cell_id": ["a", "b", "c", "d"]})}).save_to_disk(
        str(tmp_path / "corpus"))
    (tmp_path / "report").mkdir()
    per_cell = {"cell_type_true": truth, "cell_type_pred": ["B cell", "T cell", "T cell", "T cell"]}
    (tmp_path / "report" / "per_cell.json").write_text(json.dumps(per_cell))
    monkeypatch.setattr(training.demo, "expression_predictions", lambda corpus, split: {
        "logistic_regression": ["B cell", "B cell", "B cell", "T cell"]})
    assert quality.paired_counts(tmp_path) == {
        "logistic_regression": {"both": 1, "cell2text_only": 1, "baseline_only": 1, "neither": 1}}
    # A report of other cells (or another order) is refused, not compared: by cell id where the report has them,
    # by the label sequence otherwise.
    per_cell["cell_id"] = ["a", "b", "c", "e"]
    (tmp_path / "report" / "per_cell.json").write_text(json.dumps(per_cell))
    with pytest.raises(ValueError, match="not the corpus's test cells"):
        quality.paired_counts(tmp_path)
    per_cell["cell_id"] = ["a", "b", "c", "d"]
    (tmp_path / "report" / "per_cell.json").write_text(json.dumps(per_cell))
    assert quality.paired_counts(tmp_path)["logistic_regression"]["both"] == 1
    del per_cell["cell_id"]
    per_cell["cell_type_true"] = truth[::-1]
    (tmp_path / "report" / "per_cell.json").write_text(json.dumps(per_cell))
    with pytest.raises(ValueError, match="not the corpus's test cells"):
        quality.paired_counts(tmp_path)
