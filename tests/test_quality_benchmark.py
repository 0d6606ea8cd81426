"""benchmarks/quality.py: k-fold figures, pooled accuracy with intervals, the paired test and the JSON, with the
main job's run stubbed (hours)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402

# Four test cells per fold; Cell2Text gets fold f's first f + 1 cells right, logistic regression all but the last.
TRUTH = ["B cell", "T cell", "B cell", "NK cell"]
TRUTH_IDS = ["CL:0000236", "CL:0000084", "CL:0000236", "CL:0000623"]


def fake_results(fold: int) -> dict:
    """What the main job's results.json holds, reduced to what the benchmark reads."""
    return {
        "parse_rate": 1.0,
        "fields": {"cell_type": {"accuracy": (fold + 1) / 4, "weighted_f1": 0.5, "ontology_similarity": 0.9 + fold / 100}},
        "cell_type_constraint": {"free_accuracy": 0.7, "num_invented": fold, "calibration": {"ece": 0.05}},
        "baselines": {
            "logistic_regression": {"cell_type": {"accuracy": 0.75, "weighted_f1": 0.7}},
            "encoder_head": {"cell_type": {"accuracy": 0.5, "weighted_f1": 0.4}},
            "majority": {"cell_type": {"accuracy": 0.5, "weighted_f1": 0.33}},
        },
        "training_threads": {"cell2text": 1, "cell2sentence": None},
    }


def fake_cells(fold: int) -> dict:
    wrong = {"B cell": "T cell", "T cell": "B cell", "NK cell": "T cell"}
    return {
        "cell_id": [f"f{fold}-c{i}" for i in range(4)],
        "cell_type_true": TRUTH,
        "predictions": {
            "cell2text": [t if i <= fold else wrong[t] for i, t in enumerate(TRUTH)],
            "logistic_regression": TRUTH[:3] + ["T cell"],
            "encoder_head": [TRUTH[0], wrong[TRUTH[1]], TRUTH[2], wrong[TRUTH[3]]],
            "majority": ["B cell"] * 4,
        },
    }


def fake_main_job(calls: list, fail_at: int | None = None):
    def run(out_dir, seed, max_steps, max_new_tokens, skip_cell2sentence, fold, one_training_at_a_time):
        if fold[0] == fail_at:
            raise KeyboardInterrupt  # the session ends mid-fold
        calls.append((Path(out_dir).name, seed, fold, max_steps, skip_cell2sentence, one_training_at_a_time))
        report = Path(out_dir) / "report" / "report.md"
        report.parent.mkdir(parents=True, exist_ok=True)  # a rerun's too, as the main job's --out
        (report.parent / "results.json").write_text(json.dumps(fake_results(fold[0])))
        return report

    return run


@pytest.fixture
def stubbed(monkeypatch):
    import training.demo

    calls: list = []
    monkeypatch.setattr(training.demo, "run", fake_main_job(calls))
    monkeypatch.setattr(quality, "fold_cells", lambda fold_dir: fake_cells(int(Path(fold_dir).name.split("-")[1])))
    monkeypatch.setattr(quality, "git_commit", lambda: "0" * 40)
    return calls


def test_every_fold_runs_once_and_the_pooled_figures_count_every_cell(tmp_path, stubbed, capsys):
    benchmark = quality.main(["--folds", "3", "--out", str(tmp_path)])
    assert stubbed == [(f"fold-{f}", 0, (f, 3), None, True, False) for f in range(3)]
    saved = json.loads((tmp_path / "quality_benchmark.json").read_text())
    assert saved == json.loads(json.dumps(benchmark))
    assert saved["num_folds"] == 3 and saved["commit"] == "0" * 40 and saved["complete"]
    # each fold's training thread count, on which its weights and figures depend
    assert [fold["training_threads"] for fold in saved["folds"]] == [{"cell2text": 1, "cell2sentence": None}] * 3
    import torch  # the machine the figures are from: the same seed trains other weights elsewhere
    assert saved["environment"]["packages"]["torch"] == torch.__version__ and saved["environment"]["cpu"]
    from training.adapters import cpu_bf16_is_fast  # whether the recipe trained in bf16 autocast or float32 here
    assert saved["environment"]["cpu_bf16_kernels"] is cpu_bf16_is_fast()
    # Cell2Text: 1 + 2 + 3 of 12 cells right; its interval is the Wilson interval of 6/12.
    pooled = saved["pooled"]["cell2text"]
    assert pooled["accuracy"] == 0.5 and pooled["num_cells"] == 12
    assert pooled["accuracy_ci95"] == pytest.approx([0.2538, 0.7462], abs=1e-4)
    assert pooled["ontology_similarity"] == pytest.approx(0.91)  # the folds' mean, weighted by cells
    assert pooled["num_invented"] == 0 + 1 + 2  # a count: the folds' total
    assert saved["pooled"]["logistic_regression"]["accuracy"] == 0.75
    assert saved["summary"]["cell2text"]["accuracy"]["mean"] == pytest.approx(0.5)
    # Paired over the 12 cells: the head on the same encoder is a baseline like the others.
    head = saved["paired"]["encoder_head"]
    assert (head["num_cells"], head["both"], head["cell2text_only"], head["baseline_only"]) == (12, 4, 2, 2)
    lr = saved["paired"]["logistic_regression"]
    assert (lr["cell2text_only"], lr["baseline_only"]) == (0, 3)
    assert lr["accuracy_difference"] == pytest.approx(-3 / 12)
    assert lr["mcnemar_p"] == pytest.approx(2 * math.comb(3, 0) / 2 ** 3)
    printed = capsys.readouterr().out
    assert "| Cell2Text | Cell-type accuracy | 0.250 | 0.500 | 0.750 | 0.500 [0.254, 0.746] |" in printed
    assert "- Cell2Text - Head on the same encoder (probe): +0.000 accuracy on 12 cells" in printed


def test_one_training_at_a_time_reaches_every_fold_and_is_a_setting_of_the_benchmark(tmp_path, stubbed):
    """With --with-cell2sentence the two trainings run side by side on half the threads each, so Cell2Text's figures
    differ from a run without the baseline; the main job's --one-training-at-a-time keeps them, and the benchmark
    could not pass it. Folds measured one way do not resume the other."""
    argv = ["--folds", "2", "--with-cell2sentence", "--out", str(tmp_path)]
    benchmark = quality.main([*argv, "--one-training-at-a-time"])
    assert stubbed == [(f"fold-{f}", 0, (f, 2), None, False, True) for f in range(2)]
    assert benchmark["one_training_at_a_time"] is True
    with pytest.raises(SystemExit, match="other settings"):
        quality.main([*argv, "--resume"])
    earlier = json.loads((tmp_path / "quality_benchmark.json").read_text())  # measured before the option existed
    del earlier["one_training_at_a_time"]
    (tmp_path / "quality_benchmark.json").write_text(json.dumps(earlier))
    stubbed.clear()
    assert quality.main([*argv, "--resume"])["one_training_at_a_time"] is False and stubbed == []
    # without the baseline there is one training: the option changed nothing, yet the JSON recorded it
    with pytest.raises(SystemExit):
        quality.main(["--folds", "2", "--out", str(tmp_path / "alone"), "--one-training-at-a-time"])
    assert not (tmp_path / "alone").exists()


def test_bad_fold_arguments_are_refused(tmp_path, stubbed):
    for argv in (["--folds", "1"], ["--folds", "3", "--only-folds", "3"], ["--only-folds", "0", "0"]):
        with pytest.raises(SystemExit):
            quality.main([*argv, "--out", str(tmp_path)])
    assert stubbed == []  # refused before a fold trains (an accepted one ran the whole recipe here)


def test_a_max_steps_that_caps_nothing_is_refused_before_a_fold_trains(tmp_path, stubbed):
    # 0 was read as no cap and -1 is the trainer's: the whole recipe trained, recorded as a smoke run
    for steps in ("0", "-1"):
        with pytest.raises(SystemExit):
            quality.main(["--folds", "2", "--max-steps", steps, "--out", str(tmp_path / steps)])
    assert stubbed == []


def test_a_cell_tested_in_two_folds_is_refused(tmp_path, stubbed, monkeypatch):
    monkeypatch.setattr(quality, "fold_cells", lambda fold_dir: fake_cells(0))  # every fold: the same cells
    with pytest.raises(ValueError, match="tested in more than one fold"):
        quality.main(["--folds", "2", "--out", str(tmp_path)])


def test_an_interrupted_benchmark_keeps_its_folds_and_resumes_from_them(tmp_path, stubbed, monkeypatch):
    import training.demo

    calls = []
    monkeypatch.setattr(training.demo, "run", fake_main_job(calls, fail_at=2))
    with pytest.raises(KeyboardInterrupt):
        quality.main(["--folds", "3", "--out", str(tmp_path)])
    partial = json.loads((tmp_path / "quality_benchmark.json").read_text())
    assert [f["fold"] for f in partial["folds"]] == [0, 1] and partial["complete"] is False
    assert partial["pooled"]["cell2text"]["num_cells"] == 8

    # Without --resume the file is not overwritten.
    with pytest.raises(SystemExit, match="pass --resume"):
        quality.main(["--folds", "3", "--out", str(tmp_path)])
    # Other settings (here: with the Cell2Sentence baseline) cannot reuse the folds.
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(["--folds", "3", "--out", str(tmp_path), "--resume", "--with-cell2sentence"])

    calls.clear()
    monkeypatch.setattr(training.demo, "run", fake_main_job(calls))
    benchmark = quality.main(["--folds", "3", "--out", str(tmp_path), "--resume"])
    assert [c[2] for c in calls] == [(2, 3)] and benchmark["complete"]
    assert benchmark["pooled"]["cell2text"]["accuracy"] == 0.5

    # Another commit cannot reuse them either, nor can uncommitted changes.
    monkeypatch.setattr(quality, "git_commit", lambda: "b" * 40)
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(["--folds", "3", "--out", str(tmp_path), "--resume"])
    monkeypatch.setattr(quality, "git_commit", lambda: "0" * 40 + "+dirty")
    with pytest.raises(SystemExit, match="uncommitted changes"):
        quality.main(["--folds", "3", "--out", str(tmp_path), "--resume"])


def test_folds_measured_in_another_environment_are_not_resumed(tmp_path, stubbed, monkeypatch):
    """Folds are merged with --resume from several processes; one measured on another machine (bf16 kernels there,
    float32 here) or with other library releases was pooled with the others, and the JSON recorded only the last
    process's environment. Each fold records its own, and a fold of another is refused."""
    quality.main(["--folds", "2", "--only-folds", "0", "--out", str(tmp_path)])
    here = quality.environment()
    saved = json.loads((tmp_path / "quality_benchmark.json").read_text())
    assert saved["folds"][0]["environment"] == here == saved["environment"]
    monkeypatch.setattr(quality, "environment", lambda: {**here, "cpu_bf16_kernels": not here["cpu_bf16_kernels"]})
    with pytest.raises(SystemExit, match=r"Fold 0 of .* another machine or with other packages \(cpu_bf16_kernels "
                                         "differ\)"):
        quality.main(["--folds", "2", "--only-folds", "1", "--out", str(tmp_path), "--resume"])
    monkeypatch.setattr(quality, "environment", lambda: here)
    before_gpu = {k: v for k, v in here.items() if k != "gpu"}  # a fold recorded before the GPU was: none then
    saved["folds"][0]["environment"] = saved["environment"] = before_gpu
    (tmp_path / "quality_benchmark.json").write_text(json.dumps(saved))
    assert [fold["fold"] for fold in quality.main(["--folds", "2", "--out", str(tmp_path), "--resume"])["folds"]] \
        == [0, 1]


def test_folds_measured_on_another_thread_count_are_not_resumed(tmp_path, stubbed, monkeypatch):
    """A fold's training threads are torch's thread count of its process (or half of it, `training.demo`), and its
    weights depend on them: a fold measured with 1 thread resumed by a process of 2 on the same CPU (another VM size,
    OMP_NUM_THREADS) was pooled with folds trained on 2, exit 0."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on a GPU the CPU's threads do not train
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        quality.main(["--folds", "2", "--only-folds", "0", "--out", str(tmp_path)])
        torch.set_num_threads(2)
        with pytest.raises(SystemExit, match=r"Fold 0 of .* \(cpu_threads differ\)"):
            quality.main(["--folds", "2", "--only-folds", "1", "--out", str(tmp_path), "--resume"])
        torch.set_num_threads(1)
        assert [f["fold"] for f in quality.main(["--folds", "2", "--out", str(tmp_path), "--resume"])["folds"]] \
            == [0, 1]
    finally:
        torch.set_num_threads(before)


def test_a_benchmark_cut_off_while_written_keeps_the_folds_written_before(tmp_path, stubbed, monkeypatch):
    """The JSON is rewritten after every fold of a run of hours: one cut off mid-write (a session's time limit) was
    left half written, every fold lost, and --resume ended in a JSONDecodeError traceback."""
    quality.main(["--folds", "2", "--only-folds", "0", "--out", str(tmp_path)])
    path = tmp_path / "quality_benchmark.json"
    before = path.read_text()

    real_write_text = Path.write_text

    def written_in_part(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", written_in_part)
    with pytest.raises(KeyboardInterrupt):
        quality.main(["--folds", "2", "--only-folds", "1", "--out", str(tmp_path), "--resume"])
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert path.read_text() == before
    resumed = quality.main(["--folds", "2", "--out", str(tmp_path), "--resume"])
    assert [fold["fold"] for fold in resumed["folds"]] == [0, 1]
    with pytest.raises(SystemExit, match=r"benchmark.json does not read \(No such file or directory\); pass the --out"):
        quality.main(["--rescore", "--out", str(tmp_path / "elsewhere")])
    for content in ("{\"folds\": [", "[]"):
        path.write_text(content)
        for argv in (["--folds", "2", "--resume"], ["--rescore"]):
            with pytest.raises(SystemExit, match="quality_benchmark.json is not a benchmark this script wrote"):
                quality.main([*argv, "--out", str(tmp_path)])


def save_fold(root: Path, ids: list, truth: list, true_ids: list, per_cell: dict, baselines: dict) -> None:
    """A main job's --out folder as `quality.fold_cells` reads it: the corpus (test cells `ids`), Cell2Text's per-cell
    report and the baselines' predictions."""
    from datasets import Dataset, DatasetDict

    from training.demo import BASELINE_PREDICTIONS

    DatasetDict({
        "train": Dataset.from_dict({"cell_type": ["B cell"], "cell_id": ["e"]}),
        "validation": Dataset.from_dict({"cell_type": ["T cell"], "cell_id": ["f"]}),
        "test": Dataset.from_dict({"cell_type": truth, "cell_id": ids, "cell_type_ontology_term_id": true_ids}),
    }).save_to_disk(str(root / "corpus"))
    (root / "report").mkdir()
    (root / "report" / "per_cell.json").write_text(json.dumps(per_cell))
    (root / BASELINE_PREDICTIONS).write_text(json.dumps(baselines))


def test_fold_cells_read_each_method_on_the_folds_test_cells_and_refuse_a_mismatch(tmp_path):
    from datasets import Dataset, DatasetDict

    from training.demo import BASELINE_PREDICTIONS

    ids = ["a", "b", "c", "d"]
    per_cell = {"cell_id": ids, "cell_type_true": TRUTH, "cell_type_pred": ["B cell", "T cell", "T cell", None],
                "cell_type_score": [0.9, 0.8, 0.6, 0.3]}
    baselines = {"cell_id": ids, "cell_type_true": TRUTH, "predictions": {"knn": ["B cell"] * 4}}
    save_fold(tmp_path, ids, TRUTH, TRUTH_IDS, per_cell, baselines)
    cells = quality.fold_cells(tmp_path)
    assert cells["predictions"] == {"cell2text": per_cell["cell_type_pred"], "knn": ["B cell"] * 4}
    assert cells["cell_id"] == ids
    assert cells["cell_type_score"] == {"cell2text": per_cell["cell_type_score"]}
    # every method's ontology similarity per cell (the baselines had none), scored as Cell2Text's is
    from training.evaluation.evaluate import label_similarity_scores

    assert cells["ontology_similarity"]["cell2text"] == label_similarity_scores(TRUTH_IDS, per_cell["cell_type_pred"],
                                                                                {})
    assert cells["ontology_similarity"]["cell2text"][:2] == [1.0, 1.0]
    assert cells["ontology_similarity"]["cell2text"][3] == 0.0  # no prediction
    assert cells["ontology_similarity"]["knn"][0] == 1.0 and 0 < cells["ontology_similarity"]["knn"][1] < 1
    # A report (or baseline file) of other cells, or in another order, is refused, not compared.
    per_cell["cell_id"] = ["a", "b", "d", "c"]
    (tmp_path / "report" / "per_cell.json").write_text(json.dumps(per_cell))
    with pytest.raises(ValueError, match="not the corpus's test cells"):
        quality.fold_cells(tmp_path)
    per_cell["cell_id"] = ids
    (tmp_path / "report" / "per_cell.json").write_text(json.dumps(per_cell))
    baselines["cell_type_true"] = TRUTH[::-1]
    (tmp_path / BASELINE_PREDICTIONS).write_text(json.dumps(baselines))
    with pytest.raises(ValueError, match="not the corpus's test cells"):
        quality.fold_cells(tmp_path)
    # A test cell that also trained is refused.
    DatasetDict({
        "train": Dataset.from_dict({"cell_type": ["B cell"], "cell_id": ["a"]}),
        "validation": Dataset.from_dict({"cell_type": ["T cell"], "cell_id": ["f"]}),
        "test": Dataset.from_dict({"cell_type": TRUTH, "cell_id": ids}),
    }).save_to_disk(str(tmp_path / "corpus2"))
    (tmp_path / "corpus").rename(tmp_path / "old")
    (tmp_path / "corpus2").rename(tmp_path / "corpus")
    with pytest.raises(ValueError, match="1 test cells also train or validate"):
        quality.fold_cells(tmp_path)


def test_fold_cells_score_a_true_type_without_a_graded_id_by_its_label_as_the_evaluation_does(tmp_path):
    """The folds' per-cell similarity (and the main job's baselines') compared ids only: a right label whose true type
    has no id, or one unknown to the Cell Ontology, scored 0 there and 1 in Cell2Text's own evaluation."""
    from training.evaluation.evaluate import label_similarity_scores

    ids, truth, true_ids = ["a", "b", "c"], ["my cell", "their cell", "B cell"], [None, "CL:9999999", "CL:0000236"]
    per_cell = {"cell_id": ids, "cell_type_true": truth, "cell_type_pred": truth, "cell_type_score": [0.9] * 3}
    wrong = ["their cell", "my cell", "B cell"]
    save_fold(tmp_path, ids, truth, true_ids, per_cell,
              {"cell_id": ids, "cell_type_true": truth, "predictions": {"knn": wrong}})
    similarity = quality.fold_cells(tmp_path)["ontology_similarity"]
    assert similarity["cell2text"] == [1.0, 1.0, 1.0]
    assert similarity["knn"] == [0.0, 0.0, 1.0]
    assert similarity["cell2text"] == label_similarity_scores(true_ids, truth, {}, "CL", truth)


def test_fold_cells_read_a_label_by_the_corpus_label_table(tmp_path):
    """A corpus label other than its term's ontology label names its term through the corpus's label -> term table,
    as in Cell2Text's own evaluation: read without the table, a right prediction of it scored 0."""
    ids, truth, true_ids = ["a", "b"], ["B lymphocyte (ours)", "T cell"], ["CL:0000236", "CL:0000084"]
    per_cell = {"cell_id": ids, "cell_type_true": truth, "cell_type_pred": truth, "cell_type_score": [0.9] * 2}
    save_fold(tmp_path, ids, truth, true_ids, per_cell,
              {"cell_id": ids, "cell_type_true": truth, "predictions": {"knn": truth}})
    (tmp_path / "corpus" / "summary.json").write_text(json.dumps(
        {"ontology_term_ids": {"cell_type": {"B lymphocyte (ours)": "CL:0000236", "T cell": "CL:0000084"}}}))
    assert quality.fold_cells(tmp_path)["ontology_similarity"] == {"cell2text": [1.0, 1.0], "knn": [1.0, 1.0]}


def test_pooled_ece_and_similarity_are_those_of_the_pooled_cells():
    """The pooled ECE was the folds' ECEs averaged (0.076 for the checked-in run), not the pooled cells' (0.049);
    the baselines had no ontology similarity."""
    from training.evaluation.metrics import calibration_report

    folds = []
    for fold, scores in enumerate(([0.75, 0.75, 0.25, 0.25], [0.75, 0.75, 0.25, 0.25])):
        cells = fake_cells(fold)
        cells["cell_type_score"] = {"cell2text": scores}
        cells["ontology_similarity"] = {name: [1.0 if p == t else 0.5 for p, t in zip(predicted, TRUTH)]
                                        for name, predicted in cells["predictions"].items()}
        results = fake_results(fold)
        results["cell_type_constraint"]["calibration"]["ece"] = calibration_report(
            scores, [p == t for p, t in zip(cells["predictions"]["cell2text"], TRUTH)])["ece"]
        folds.append({"fold": fold, "methods": quality.method_figures(results), "cells": cells})
    pooled = quality.pooled_figures(folds)
    correct = [p == t for f in folds for p, t in zip(f["cells"]["predictions"]["cell2text"], TRUTH)]
    expected = calibration_report([0.75, 0.75, 0.25, 0.25] * 2, correct)["ece"]
    fold_mean = sum(f["methods"]["cell2text"]["ece"] for f in folds) / 2
    assert pooled["cell2text"]["ece"] == pytest.approx(expected) == 0.125 and fold_mean == pytest.approx(0.25)
    assert pooled["majority"]["ontology_similarity"] == pytest.approx((1 + 0.5 + 1 + 0.5) * 2 / 8)
    assert pooled["logistic_regression"]["ontology_similarity"] == pytest.approx(0.875)


def test_rescore_pools_again_from_the_fold_folders_and_refuses_other_predictions(tmp_path, stubbed, monkeypatch):
    quality.main(["--folds", "2", "--out", str(tmp_path)])

    def cells_with_scores(fold_dir):
        cells = fake_cells(int(Path(fold_dir).name.split("-")[1]))
        cells["cell_type_score"] = {"cell2text": [0.75, 0.75, 0.25, 0.25]}
        cells["ontology_similarity"] = {name: [0.5] * 4 for name in cells["predictions"]}
        return cells

    monkeypatch.setattr(quality, "fold_cells", cells_with_scores)
    rescored = quality.main(["--out", str(tmp_path), "--rescore"])
    assert rescored["pooled"]["cell2text"]["ece"] == pytest.approx(0.125)  # the pooled cells', not 0.05
    assert json.loads((tmp_path / "quality_benchmark.json").read_text())["pooled"] == json.loads(
        json.dumps(rescored["pooled"]))
    assert rescored["rescored"]["commit"] == "0" * 40
    # each fold's figure too where its run kept none (the baselines'), from the same cells
    assert all(fold["methods"]["majority"]["ontology_similarity"] == 0.5 for fold in rescored["folds"])
    assert rescored["summary"]["majority"]["ontology_similarity"]["mean"] == 0.5

    def other_predictions(fold_dir):
        cells = cells_with_scores(fold_dir)
        cells["predictions"]["cell2text"] = ["B cell"] * 4
        return cells

    monkeypatch.setattr(quality, "fold_cells", other_predictions)
    with pytest.raises(SystemExit, match="its predictions are not those"):
        quality.main(["--out", str(tmp_path), "--rescore"])

    def other_scores(fold_dir):  # the fold folder evaluated again: the same labels, other probabilities
        cells = cells_with_scores(fold_dir)
        cells["cell_type_score"] = {"cell2text": [0.95, 0.95, 0.05, 0.05]}
        return cells

    monkeypatch.setattr(quality, "fold_cells", other_scores)
    with pytest.raises(SystemExit, match="its cell_type_score are not those"):  # its ECE was that evaluation's
        quality.main(["--out", str(tmp_path), "--rescore"])


def test_a_fold_without_one_prediction_per_test_cell_is_refused():
    """One fold's record a cell short and the next's a cell long paired every later prediction with another cell's
    truth, silently (the totals agreed)."""
    folds = [{"fold": fold, "methods": quality.method_figures(fake_results(fold)), "cells": fake_cells(fold)}
             for fold in range(2)]
    folds[0]["cells"]["predictions"]["majority"] = ["B cell"] * 3
    folds[1]["cells"]["predictions"]["majority"] = ["B cell"] * 5
    with pytest.raises(ValueError, match="fold 0: 3 predictions of majority for its 4 test cells"):
        quality.pooled_figures(folds)
    with pytest.raises(ValueError, match="fold 0: 3 predictions of majority"):
        quality.paired_summary(folds)


def test_a_method_some_folds_kept_no_predictions_of_is_left_out_of_the_paired_tests():
    """Folds measured before the main job wrote the Cell2Sentence baseline's predictions kept none of them: beside a
    fold that did, the paired tests stopped with a bare TypeError."""
    folds = [{"fold": f, "methods": {}, "cells": fake_cells(f)} for f in range(2)]
    folds[1]["cells"]["predictions"]["cell2sentence"] = TRUTH
    assert "cell2sentence" not in quality.paired_summary(folds)
    folds[0]["cells"]["predictions"]["cell2sentence"] = ["B cell"] * 4
    paired = quality.paired_summary(folds)["cell2sentence"]
    assert paired["num_cells"] == 8 and paired["baseline_only"] == 1 + 2  # fold 0: its cell 2; fold 1: cells 2, 3
