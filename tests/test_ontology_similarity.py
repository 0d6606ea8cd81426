"""PageRank ontology similarity on the real Cell Ontology and a hand-checked toy graph."""

import math

import networkx as nx
import numpy as np
import pytest

from training.evaluation.ontology_similarity import OntologySimilarity

CD14_MONOCYTE = "CL:0001054"
MONOCYTE = "CL:0000576"
CLASSICAL_MONOCYTE = "CL:0000860"
CD14_CD16_NEG_CLASSICAL = "CL:0002057"  # child of CD14-positive monocyte
NEURON = "CL:0000540"


@pytest.fixture(scope="module")
def cl():
    return OntologySimilarity("CL")


def test_exact_match_is_one(cl):
    assert cl.score(CD14_MONOCYTE, CD14_MONOCYTE) == 1.0
    assert cl.score(NEURON, NEURON) == 1.0


def test_near_misses_beat_unrelated_types(cl):
    parent = cl.score(CD14_MONOCYTE, MONOCYTE)
    child = cl.score(CD14_MONOCYTE, CD14_CD16_NEG_CLASSICAL)
    sibling = cl.score(CD14_MONOCYTE, CLASSICAL_MONOCYTE)
    unrelated = cl.score(CD14_MONOCYTE, NEURON)
    assert 1.0 > parent > unrelated > 0.0
    assert 1.0 > child > unrelated
    assert 1.0 > sibling > unrelated
    assert cl.score("CL:0000236", "CL:0000945") > cl.score("CL:0000236", NEURON)  # B cell: parent vs neuron


@pytest.mark.parametrize("predicted", [None, "CL:9999999", "not a cell type", "UBERON:0000178"])
def test_unknown_prediction_scores_zero(cl, predicted):
    assert cl.score(CD14_MONOCYTE, predicted) == 0.0


@pytest.mark.parametrize("true_id", ["CL:9999999", "B cell", "UBERON:0000178"])
def test_unknown_true_term_is_a_value_error(cl, true_id):
    with pytest.raises(ValueError, match="not in the CL graph"):
        cl.score(true_id, CD14_MONOCYTE)


def test_evaluation_scores_a_true_term_unknown_to_the_graph_by_exact_match(cl):
    """The QA finding: a corpus keeps cells with unknown ids (counted, by design); evaluation then generated every
    description and stopped with "True term ... is not in the graph", writing nothing."""
    from training.evaluation.evaluate import _ExactOrOntology

    scorer = _ExactOrOntology("CL")
    scorer.similarity = cl
    assert cl.contains(CD14_MONOCYTE) and not cl.contains("CL:9999999")
    assert scorer.score("CL:9999999", "CL:9999999") == 1.0 and scorer.score("CL:9999999", CD14_MONOCYTE) == 0.0
    assert scorer.score(MONOCYTE, CD14_MONOCYTE) == cl.score(MONOCYTE, CD14_MONOCYTE) > 0  # known terms: graded


def test_deprecated_prediction_is_replaced(cl):
    assert cl.score("CL:0000236", "CL:0000003") == cl.score("CL:0000236", "CL:0000000")


def test_pagerank_matches_networkx(cl):
    undirected = cl._graph.to_undirected()
    expected = nx.pagerank(undirected, alpha=0.9, personalization={CD14_MONOCYTE: 1.0}, tol=1e-12, max_iter=5000)
    got = cl.pagerank(CD14_MONOCYTE)
    assert got.sum() == pytest.approx(1.0)
    assert np.abs(got - np.array([expected[n] for n in cl.nodes])).max() < 1e-9


def test_scores_are_cached_per_true_term(cl):
    cl.score("CL:0000084", "CL:0000236")
    hits = cl.normalized_scores.cache_info().hits
    cl.score("CL:0000084", NEURON)
    assert cl.normalized_scores.cache_info().hits == hits + 1


def test_mean_over_pairs(cl):
    assert cl.mean([(CD14_MONOCYTE, CD14_MONOCYTE), (CD14_MONOCYTE, None)]) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        cl.mean([])


def test_hand_checked_toy_graph():
    # child -> parent: a1 -> a -> root <- b ; "island" is not connected.
    graph = nx.DiGraph([("a1", "a"), ("a", "root"), ("b", "root")])
    graph.add_node("island")
    sim = OntologySimilarity(graph, alpha=0.9)
    # Undirected walk from "a": x = 0.1 e_a + 0.9 P^T x, solved by hand:
    # x_a1 = 0.45 x_a, x_root = 0.45 x_a + 0.9 x_b, x_b = 0.45 x_root, x_a = 0.1 + 0.9 x_a1 + 0.45 x_root.
    x_root_over_a = 0.45 / (1 - 0.9 * 0.45)
    x_a = 0.1 / (1 - 0.9 * 0.45 - 0.45 * x_root_over_a)
    pagerank = {"a": x_a, "a1": 0.45 * x_a, "root": x_root_over_a * x_a, "b": 0.45 * x_root_over_a * x_a}
    got = sim.pagerank("a")
    for node, value in pagerank.items():
        assert got[sim.index[node]] == pytest.approx(value)
    low, high = math.log(pagerank["b"]), math.log(pagerank["a"])
    assert sim.score("a", "root") == pytest.approx((math.log(pagerank["root"]) - low) / (high - low))
    assert sim.score("a", "b") == 0.0  # the farthest reachable term is the bottom of the scale
    assert sim.score("a", "island") == 0.0  # unreachable
    assert sim.score("island", "island") == 1.0
    assert sim.score("island", "a") == 0.0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        OntologySimilarity("CL", alpha=1.0)
    with pytest.raises(TypeError):
        OntologySimilarity(42)


def test_predicted_labels_outside_the_training_vocabulary_are_scored_as_their_ontology_term(cl):
    from training.evaluation.evaluate import predicted_term_id

    training_ids = {"CD4-positive, alpha-beta memory T cell, CD45RO-positive": "CL:0001204"}
    # a real CL label the model was not trained on (the parent of the true type): scored as that term
    parent = predicted_term_id("CD4-positive, alpha-beta memory T cell", training_ids, "CL")
    assert parent == "CL:0000897"
    assert 0 < cl.score("CL:0001204", parent) < 1
    assert predicted_term_id("CD4-positive, alpha-beta memory T cell, CD45RO-positive", training_ids, "CL") == "CL:0001204"
    # an invented label names no term: None, which scores 0
    invented = predicted_term_id("CD14-positive, alpha-beta T cell", training_ids, "CL")
    assert invented is None and cl.score("CL:0001204", invented) == 0.0


def test_a_true_label_without_a_graded_id_is_scored_by_its_label():
    """The QA findings: a true disease stated without an id (None) stopped the evaluation after every cell was
    generated; the right tissue label scored 0 against its unknown id (its label names another term)."""
    from training.evaluation.evaluate import label_similarity_scores

    scores = label_similarity_scores([None, None, "UBERON:9999999", "UBERON:9999999"],
                                     ["COVID-19", "normal", "blood", "lung"], {"normal": "PATO:0000461"}, "UBERON",
                                     true_labels=["COVID-19", "COVID-19", "blood", "blood"])
    assert scores == [1.0, 0.0, 1.0, 0.0]
    assert label_similarity_scores([None], ["COVID-19"], {}, "MONDO") == [0.0]  # no true label: ids compared
    with pytest.raises(ValueError, match="1 true labels for 2 predicted labels"):
        label_similarity_scores(["UBERON:0000178"] * 2, ["blood"] * 2, {}, "UBERON", true_labels=["blood"])


def test_tissue_similarity_compares_each_cell_with_its_own_true_tissue():
    """score_descriptions, where some cells have no tissue (left out of their description): each cell's tissue is
    scored against its own true id (mutation testing: with the true ids shifted by a row, no test failed)."""
    import datasets

    from modeling_cell2text.description_schema import CellDescription, render_description
    from training.evaluation.evaluate import score_descriptions

    tissues = [(None, None), ("blood", "UBERON:0000178"), ("lung", "UBERON:0002048"), ("lung", "UBERON:0002048")]
    rows = {"cell_id": [], "description": [], "cell_type": [], "cell_type_ontology_term_id": [], "tissue": [],
            "tissue_ontology_term_id": [], "pathways": []}
    for i, (tissue, term) in enumerate(tissues):
        rows["cell_id"].append(f"c{i}")
        rows["description"].append(render_description(CellDescription(cell_type="B cell", tissue=tissue)))
        rows["cell_type"].append("B cell")
        rows["cell_type_ontology_term_id"].append("CL:0000236")
        rows["tissue"].append(tissue)
        rows["tissue_ontology_term_id"].append(term)
        rows["pathways"].append([])
    split = datasets.Dataset.from_dict(rows)
    ids = {"cell_type": {"B cell": "CL:0000236"}, "tissue": {"blood": "UBERON:0000178", "lung": "UBERON:0002048"}}
    results, _ = score_descriptions(split, list(split["description"]), ids)  # every text states its own truth
    assert results["fields"]["tissue"]["accuracy"] == 1.0
    assert results["fields"]["tissue"]["ontology_similarity"] == pytest.approx(1.0)
