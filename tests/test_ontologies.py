"""Ontology facts from the bundled CELLxGENE ontologies (real terms, offline)."""

import csv

import networkx as nx
import pytest

from processing import ontologies as onto
from processing import presets


def test_b_cell_label_definition_and_parent():
    assert onto.term_label("CL:0000236") == "B cell"
    assert onto.term_definition("CL:0000236") == "A lymphocyte of B lineage that is capable of B cell mediated immunity."
    assert onto.term_parents("CL:0000236") == ["CL:0000945"]
    assert onto.term_label("CL:0000945") == "lymphocyte of B lineage"


@pytest.mark.parametrize(
    "term_id, label",
    [
        ("UBERON:0000178", "blood"),
        ("MONDO:0005015", "diabetes mellitus"),
        ("HsapDv:0000126", "32-year-old stage"),
        ("PATO:0000384", "male"),
        ("PATO:0000461", "normal"),
    ],
)
def test_labels_of_other_ontologies(term_id, label):
    assert onto.term_label(term_id) == label
    assert onto.term_definition(term_id)


@pytest.mark.parametrize("term_id", ["CL:9999999", "UBERON:9999999", "FOO:0000001", "B cell", ""])
def test_unknown_term_raises_key_error_with_fix(term_id):
    with pytest.raises(onto.UnknownTermError) as error:
        onto.term_label(term_id)
    assert isinstance(error.value, KeyError)
    assert repr(term_id) in str(error.value)
    assert not onto.is_known_term(term_id)


def test_deprecated_term_follows_replacement():
    assert onto.is_deprecated("CL:0000003")
    assert onto.resolve_term("CL:0000003") == "CL:0000000"
    assert onto.term_label("CL:0000003") == "cell"
    assert onto.term_label("CL:0000003", follow_replacement=False) == "obsolete native cell"
    assert onto.resolve_term("CL:0000236") == "CL:0000236"


def test_label_lookup_prefers_the_current_term_over_a_deprecated_one():
    # "1-month-old stage" labels the deprecated HsapDv:0000174 and the current HsapDv:0000273
    assert onto.term_id_of_label("HsapDv", "1-month-old stage") == "HsapDv:0000273"


def test_cell_ontology_graph_edges_child_to_parent():
    graph = onto.ontology_graph("CL")
    assert graph is onto.ontology_graph("CL")  # cached
    assert graph.has_edge("CL:0000236", "CL:0000945")
    assert not graph.has_edge("CL:0000945", "CL:0000236")
    assert graph.has_edge("CL:0001054", "CL:0000576")  # CD14-positive monocyte -> monocyte
    assert graph.nodes["CL:0000236"]["label"] == "B cell"
    assert "CL:0000003" not in graph  # deprecated terms are left out
    assert graph.number_of_nodes() > 3000
    assert nx.is_directed_acyclic_graph(graph)
    assert graph.out_degree("CL:0000000") == 0  # root "cell"


def test_graph_only_for_graph_ontologies():
    with pytest.raises(ValueError, match="HsapDv"):
        onto.ontology_graph("HsapDv")


@pytest.mark.parametrize(
    "term_id, bucket",
    [
        ("HsapDv:0000019", "early embryonic"),  # Carnegie stage 12
        ("HsapDv:0000057", "late embryonic"),  # 20th week post-fertilization stage
        ("HsapDv:0000262", "infancy"),  # newborn stage (0-28 days)
        ("HsapDv:0000175", "infancy"),  # 2-month-old stage
        ("HsapDv:0000246", "infancy"),  # 1-year-old stage
        ("HsapDv:0000097", "early childhood"),  # 3-year-old stage
        ("HsapDv:0000102", "childhood"),  # 8-year-old stage
        ("HsapDv:0000109", "adolescence"),  # 15-year-old stage
        ("HsapDv:0000117", "young adulthood"),  # 23-year-old stage
        ("HsapDv:0000126", "adulthood"),  # 32-year-old stage
        ("HsapDv:0000144", "middle age"),  # 50-year-old stage
        ("HsapDv:0000164", "elderly"),  # 70-year-old stage
        ("HsapDv:0000211", "advanced elderly"),  # 85-year-old stage
        ("HsapDv:0000272", None),  # 60-79 year-old stage: middle age (60-64) and elderly
        ("HsapDv:0000258", None),  # adult stage: any sexually mature human
        ("HsapDv:0000087", None),  # deprecated "adult stage" (over 19), no replacement
        ("HsapDv:0000226", None),  # prime adult stage
        ("HsapDv:0000227", None),  # late adult stage: over 60
        ("HsapDv:0000266", None),  # young adult stage: under 40
        ("HsapDv:0000264", None),  # pediatric stage: newborn to 14
        ("HsapDv:0000265", None),  # child stage (1-4 yo): infancy and early childhood
        ("HsapDv:0000239", None),  # fifth decade stage (40-49): adulthood and middle age
        ("HsapDv:0000241", None),  # seventh decade stage (60-69): middle age and elderly
        ("HsapDv:0000237", "young adulthood"),  # third decade stage (20-29)
        ("HsapDv:0000261", "infancy"),  # infant stage
        ("HsapDv:0000247", "advanced elderly"),  # centenarian stage
        ("HsapDv:0000004", "early embryonic"),  # deprecated cleavage stage -> Carnegie stage 02
        ("HsapDv:0000086", "adolescence"),  # deprecated adolescent stage (13-19), no replacement
    ],
)
def test_development_stage_buckets(term_id, bucket):
    assert onto.development_stage_to_age_bucket(term_id) == bucket


def test_every_current_stage_maps_to_a_bucket_or_none():
    for term_id in onto._terms("HsapDv"):
        assert onto.development_stage_to_age_bucket(term_id) in (*onto.AGE_BUCKETS, None)


@pytest.mark.parametrize("term_id", ["unknown", "na", "HsapDv:0000045", "HsapDv:0010000"])
def test_unknown_or_coarse_stage_is_none(term_id):
    assert onto.development_stage_to_age_bucket(term_id) is None


def test_non_human_stage_is_rejected():
    with pytest.raises(ValueError, match="HsapDv"):
        onto.development_stage_to_age_bucket("CL:0000236")


@pytest.mark.parametrize(
    "age, bucket",
    [(0.0, "infancy"), (1.99, "infancy"), (2, "early childhood"), (12.9, "childhood"), (13, "adolescence"),
     (29.5, "young adulthood"), (30, "adulthood"), (45, "middle age"), (64.9, "middle age"), (65, "elderly"),
     (80, "advanced elderly")],
)
def test_age_bucket_boundaries(age, bucket):
    assert onto.age_to_bucket(age) == bucket


def test_pbmc68k_mapping_terms_are_current_cell_ontology_terms():
    with open(presets.PBMC68K_BULK_LABELS_CSV, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["bulk_label"] for r in rows] == list(presets.pbmc68k_cell_type_ids())
    assert {r["bulk_label"] for r in rows} == {
        "Dendritic", "CD14+ Monocyte", "CD19+ B", "CD4+/CD25 T Reg", "CD8+ Cytotoxic T",
        "CD8+/CD45RA+ Naive Cytotoxic", "CD56+ NK", "CD4+/CD45RO+ Memory", "CD34+",
        "CD4+/CD45RA+/CD25- Naive T",
    }
    graph = onto.ontology_graph("CL")
    for row in rows:
        term_id = row["cell_type_ontology_term_id"]
        assert onto.ontology_name(term_id) == "CL"
        assert not onto.is_deprecated(term_id), term_id
        assert term_id in graph
        assert onto.term_label(term_id) == row["cell_type"]
        assert row["rationale"].strip()
    ids = presets.pbmc68k_cell_type_ids()
    assert ids["CD14+ Monocyte"] == "CL:0001054"
    # every T cell label sits below "T cell", the B label below "B cell"
    for label in ("CD4+/CD25 T Reg", "CD8+ Cytotoxic T", "CD4+/CD45RO+ Memory", "CD4+/CD45RA+/CD25- Naive T"):
        assert "CL:0000084" in onto.term_ancestors(ids[label])
    assert "CL:0000236" in onto.term_ancestors(ids["CD19+ B"])
