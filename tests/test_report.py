"""The evaluation report writer: tables, JSON and plots from a results dict."""

import json


from training.evaluation.report import _collapse_labels, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results():
    return {
        "model": "cell2text-test",
        "dataset": "pbmc68k_reduced",
        "split": "test",
        "num_cells": 4,
        "parse_rate": 0.75,
        "num_unparsed": 1,
        "fields": {
            "cell_type": {"accuracy": 0.5, "weighted_f1": 0.4, "macro_precision": 0.3,
                          "macro_recall": 0.35, "num_missing": 1, "ontology_similarity": 0.8},
            "sex": {"accuracy": 1.0, "weighted_f1": 1.0, "macro_precision": float("nan"),
                    "macro_recall": 1.0, "num_missing": 0},
        },
        "text": {"bleu1": 0.61, "rougeL": 0.7, "meteor": float("nan")},
        "baselines": {
            "majority": {"cell_type": {"accuracy": 0.25, "weighted_f1": 0.1}},
            "knn": {"cell_type": {"accuracy": 0.75, "weighted_f1": 0.7}},
        },
    }


def _per_cell():
    return {
        "cell_type_true": ["T cell", "T cell", "B cell", "monocyte"],
        "cell_type_pred": ["T cell", "B cell", None, "platelet"],
        "ontology_similarity": [1.0, 0.6, 0.0, 0.3],
    }


def test_write_report_tables_leave_out_absent_and_nan(tmp_path):
    report = write_report(_results(), _per_cell(), tmp_path / "out")
    text = report.read_text()
    assert report.name == "report.md"
    assert "nan" not in text.lower()
    assert "| cell_type | 0.500 | 0.400 | 0.300 | 0.350 | 0.800 | 1 |" in text
    assert "| sex | 1.000 | 1.000 | – | 1.000 | – | 0 |" in text
    for absent in ("tissue", "Pathways", "METEOR", "BLEU-2"):
        assert absent not in text
    assert "| BLEU-1 | ROUGE-L |" in text
    assert "- Parse rate: 0.750" in text
    # Cell2Text and baselines side by side on the same field, only shared-or-present columns
    assert "| Method | Accuracy | Weighted F1 | Macro precision | Macro recall |" in text
    assert "| Cell2Text | 0.500 | 0.400 | 0.300 | 0.350 |" in text
    assert "| majority | 0.250 | 0.100 | – | – |" in text
    assert "| knn | 0.750 | 0.700 | – | – |" in text


def test_write_report_json_and_plots(tmp_path):
    write_report(_results(), _per_cell(), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["fields"]["sex"]["macro_precision"] is None  # strict JSON: nan -> null
    assert saved["baselines"]["knn"]["cell_type"]["accuracy"] == 0.75
    assert json.loads((tmp_path / "per_cell.json").read_text())["cell_type_pred"][2] is None
    text = (tmp_path / "report.md").read_text()
    for name in ("confusion_matrix.png", "per_class_accuracy.png", "ontology_similarity.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text


def test_write_report_without_per_cell_has_no_plots(tmp_path):
    write_report({"model": "m", "pathways": {"subset_accuracy": 0.5, "jaccard": 0.6, "f1": 0.7}},
                 {}, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| 0.500 | 0.600 | 0.700 |" in text
    assert "Plots" not in text
    assert not list(tmp_path.glob("*.png"))


def test_the_pathway_table_shows_the_baseline_beside_the_model(tmp_path):
    """The reviewer's finding: the demo model named the training split's two most frequent pathways for all 140
    test cells, and its Jaccard (0.257) was that constant's; nothing in the report said so."""
    pathways = {"subset_accuracy": 0.0, "jaccard": 0.257, "f1": 0.3, "num_distinct_predicted": 1}
    write_report({"model": "m", "pathways": pathways,
                  "pathway_baseline": {**pathways, "pathways": ["Ribosome Biogenesis", "TCA Cycle"]}}, {}, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| Cell2Text | 0.000 | 0.257 | 0.300 | 1 |" in text
    assert "| Most frequent in training, every cell | 0.000 | 0.257 | 0.300 | 1 |" in text
    assert "names Ribosome Biogenesis, TCA Cycle for every cell" in text


def test_confusion_matrix_is_normalised_per_true_class(tmp_path, monkeypatch):
    """Each row (a true class) sums to 1: a column-normalised matrix draws the same picture for other numbers."""
    from matplotlib.axes import Axes

    from training.evaluation.report import plot_confusion_matrix

    shown, imshow = [], Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, data, *a, **k: shown.append(data) or imshow(self, data, *a, **k))
    plot_confusion_matrix(["a", "a", "a", "b"], ["a", "a", "b", "b"], tmp_path / "confusion.png")
    assert [[round(x, 6) for x in row] for row in shown[0].tolist()] == [[0.666667, 0.333333], [0.0, 1.0]]


def test_confusion_labels_collapse_rare_classes_and_missing():
    true = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", None, "c", "b", "z", "a"]
    t, p, rows = _collapse_labels(true, pred, max_classes=2)
    assert rows == ["a", "b", "(other)"]
    assert t == ["a", "a", "a", "b", "b", "(other)"]
    assert p == ["a", "(unparsed)", "(other, not the true type)", "b", "(other, not the true type)", "a"]


def test_two_rare_types_swapped_for_each_other_are_not_shown_correct():
    """The QA finding: with more true types than the matrix shows, two rare types always swapped for each other
    landed on (other) -> (other), shown as correct."""
    true = ["a", "a", "a", "b", "b", "c", "d", "d"]
    pred = ["a", "a", "a", "b", "b", "d", "c", "d"]  # c and d swapped, one d right
    t, p, rows = _collapse_labels(true, pred, max_classes=2)
    assert list(zip(t, p))[5:] == [("(other)", "(other, not the true type)"), ("(other)", "(other, not the true type)"),
                                   ("(other)", "(other)")]


def test_report_lists_the_encoder_candidates_and_the_chosen_one(tmp_path):
    selection = {
        "candidates": [{"num_hidden_layers": 2, "hidden_size": 128, "value_aware": False},
                       {"num_hidden_layers": 2, "hidden_size": 128, "value_aware": True}],
        "validation_accuracy": [0.8, 0.9], "best": 1, "path": "x", "num_expression_bins": 8,
    }
    text = write_report({"num_cells": 3, "gene_encoder_selection": selection}, {}, tmp_path).read_text()
    assert "| 2 | 128 | rank-value | 0.800 |  |" in text
    assert "| 2 | 128 | value-aware (rank + expression bin) | 0.900 | chosen |" in text
    assert "Chosen by the" not in text  # a selection recorded before the rule was
    from training.gene_encoder import SELECTION_RULE

    selection.update(validation_accuracy=[0.87, 0.9], best=0, selection_rule=SELECTION_RULE)
    text = write_report({"num_cells": 3, "gene_encoder_selection": selection}, {}, tmp_path, overwrite=True).read_text()
    assert f"Chosen by the {SELECTION_RULE}" in text and "| 2 | 128 | rank-value | 0.870 | chosen |" in text


def test_report_shows_the_cross_validated_benchmark_beside_this_split(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from quality import paired_summary, pooled_figures

    from training.evaluation.report import method_figures

    results = _results()
    results["split_seed"] = 0
    folds = [
        {"fold": 0, "methods": method_figures(results),
         "cells": {"cell_id": ["a", "b"], "cell_type_true": ["T", "B"],
                   "predictions": {"cell2text": ["T", "T"], "knn": ["T", "B"], "majority": ["T", "T"]}}},
        {"fold": 1, "methods": {"cell2text": {"accuracy": 1.0, "parse_rate": 1.0}, "knn": {"accuracy": 0.5},
                                "majority": {"accuracy": 0.5}},
         "cells": {"cell_id": ["c", "d"], "cell_type_true": ["T", "B"],
                   "predictions": {"cell2text": ["T", "B"], "knn": ["T", "T"], "majority": ["T", "T"]}}},
    ]
    results["quality_benchmark"] = {"date": "2026-11-30", "commit": "0123456789abcdef", "device": "GPU: H200",
                                    "num_folds": 2, "complete": True, "folds": folds, "pooled": pooled_figures(folds)}
    text = write_report(results, {}, tmp_path).read_text()
    assert ("the same recipe in 2-fold cross-validation, every one of its 4 test cells tested once, measured "
            "2026-11-30 at commit 0123456789 (GPU: H200)") in text
    assert "| Method | Metric | This run (one split, seed 0) | Cross-validated (pooled) |" in text
    # 3 of 4 right: the Wilson interval of 3/4; the parse rate is the folds' mean weighted by their cells.
    assert "| Cell2Text | Cell-type accuracy | 0.500 | 0.750 [0.301, 0.954] |" in text
    assert "| Cell2Text | Parse rate | 0.750 | 0.875 |" in text
    assert "| kNN | Cell-type accuracy | 0.750 | 0.750 [0.301, 0.954] |" in text
    assert "Paired on the same test cells" not in text
    results["quality_benchmark"]["paired"] = paired_summary(folds)
    text = write_report(results, {}, tmp_path, overwrite=True).read_text()
    assert ("- Cell2Text - kNN: +0.000 accuracy on 4 cells (Cell2Text alone right on 1, kNN alone on 1; "
            "exact McNemar p = 1)") in text
    # An interrupted benchmark says which folds it measured.
    results["quality_benchmark"].update(num_folds=5, complete=False)
    text = write_report(results, {}, tmp_path, overwrite=True).read_text()
    assert "5-fold cross-validation (incomplete: folds 0, 1 of 5)" in text
    # A fold run of the benchmark, capped for a smoke test, says so (it read "one split, seed 0", "the same recipe")
    results.update(fold={"fold": 1, "num_folds": 5}, max_steps=2)
    text = write_report(results, {}, tmp_path, overwrite=True).read_text()
    assert "| This run (fold 1 of 5), 2 training steps only |" in text
    assert "the recipe (this run capped its training steps) in 5-fold" in text and "the same recipe" not in text
    # A benchmark measured with --max-steps (a smoke run) beside a run of the whole recipe read "the same recipe"
    # and its figures as the recipe's cross-validated ones.
    results.pop("max_steps")
    results["quality_benchmark"]["max_steps"] = 2
    text = write_report(results, {}, tmp_path, overwrite=True).read_text()
    assert "the recipe (the benchmark's folds capped at 2 training steps) in 5-fold" in text
    assert "the same recipe" not in text and "| Cross-validated (pooled), 2 training steps only |" in text


def test_report_constraint_section_and_reliability_diagram(tmp_path):
    from training.evaluation.metrics import calibration_report

    results = _results()
    results["cell_type_constraint"] = {
        "num_candidates": 11, "num_invented": 2, "invented_labels": {"CD14-positive, alpha-beta T cell": 2},
        "num_free_unparsed": 0, "free_accuracy": 0.25, "constrained_accuracy": 0.5,
        "calibration": calibration_report([0.9, 0.6, 0.55, 0.95], [True, False, True, False]),
    }
    text = write_report(results, _per_cell(), tmp_path).read_text()
    assert "most likely of the 11 cell-type labels" in text
    assert "| Free generation (same model, greedy) | 0.250 |" in text
    assert '- "CD14-positive, alpha-beta T cell": 2' in text
    assert "expected calibration error 0.475" in text
    assert (tmp_path / "reliability_diagram.png").read_bytes()[:8] == PNG_MAGIC


def test_the_header_names_the_dataset_split_and_gene_vocabulary(tmp_path):
    results = {"model": "m", "dataset": "outputs/demo/corpus", "split": "test", "num_cells": 3,
               "gene_vocabulary_sha256": "ab" * 32}
    text = write_report(results, {}, tmp_path / "report").read_text()
    assert "- Dataset: outputs/demo/corpus" in text and "- Split: test" in text
    assert f"- Gene vocabulary sha256: {'ab' * 32}" in text


def test_the_header_states_a_smoke_runs_step_cap(tmp_path):
    """The main job's --max-steps (results' max_steps) was stated only beside the benchmark's figures: without
    docs/quality_benchmark.json the report of a 1-step model read as the recipe's, exit 0."""
    results = {"model": "m", "split": "test", "num_cells": 3, "max_steps": 1}
    text = write_report(results, {}, tmp_path / "report").read_text()
    assert "- Training steps (a smoke run's --max-steps, not the recipe's): 1\n" in text
    text = write_report({**results, "max_steps": None}, {}, tmp_path / "other").read_text()
    assert "smoke run" not in text
