"""The description template: rendering, parsing, round trips, and refusal of missing-value words."""

from __future__ import annotations

import itertools

import pytest

from modeling_cell2text.description_schema import (
    AGE_GROUPS,
    CellDescription,
    DescriptionParseError,
    parse_description,
    render_description,
    set_definition,
)

B_CELL_DEFINITION = "A lymphocyte of B lineage that is capable of B cell mediated immunity."


def test_full_description_reads_as_the_template():
    d = CellDescription(
        cell_type="B cell", cell_type_definition=B_CELL_DEFINITION, tissue="blood", sex="female",
        disease="normal", age_group="adulthood", pathways=("Glycolysis and Gluconeogenesis WP534", "Apoptosis WP254"),
    )
    assert render_description(d) == (
        "This sample consists of a B cell. Cell Ontology definition: A lymphocyte of B lineage that is capable of "
        "B cell mediated immunity. It originates from the blood of a healthy female donor during adulthood. "
        'This cell is associated with the pathway "Glycolysis and Gluconeogenesis WP534". '
        'Additionally, it involves the pathway "Apoptosis WP254".'
    )


@pytest.mark.parametrize(
    "tissue,sex,disease,age",
    itertools.product([None, "wall of a blood vessel"], [None, "male"], [None, "normal", "COVID-19"], [None, *AGE_GROUPS]),
)
def test_every_combination_of_missing_fields_round_trips(tissue, sex, disease, age):
    d = CellDescription(cell_type="erythrocyte", tissue=tissue, sex=sex, disease=disease, age_group=age,
                        pathways=("Apoptosis WP254",) if age else ())
    text = render_description(d)
    assert "nan" not in text.split() and "unknown" not in text
    assert parse_description(text) == d


@pytest.mark.parametrize("bad", ["nan", "unknown", "", "NaN"])
def test_missing_value_words_are_refused(bad):
    with pytest.raises(ValueError, match="not a usable label"):
        CellDescription(cell_type="B cell", tissue=bad)


@pytest.mark.parametrize(
    "text",
    ["", "A cell.", "This sample consists of a B cell. It originates from the blood of a purple donor.",
     'This sample consists of a B cell. Additionally, it involves the pathway "x".',
     # healthy and a disease at once: reading it as healthy would score a sick donor's cell as healthy
     "This sample consists of a B cell. It originates from the blood of a healthy donor with COVID-19.",
     # two first-pathway sentences: the template opens only the first with "This cell is associated with"
     'This sample consists of a B cell. This cell is associated with the pathway "x". '
     'This cell is associated with the pathway "y".'],
)
def test_text_off_the_template_is_a_parse_error(text):
    with pytest.raises(DescriptionParseError):
        parse_description(text)


def test_article_follows_the_label():
    assert render_description(CellDescription(cell_type="erythrocyte")) == "This sample consists of an erythrocyte."
    # the article reads the sound, not the case: CL labels can open with a capital vowel
    assert render_description(CellDescription(cell_type="IgA plasma cell")) == (
        "This sample consists of an IgA plasma cell.")


@pytest.mark.parametrize("name", ["cell_type", "tissue", "disease"])
def test_free_text_labels_with_outer_whitespace_are_refused(name):
    # "COVID-19 " would never equal the reference label "COVID-19": a silent miss in every exact-match score
    with pytest.raises(ValueError, match="leading or trailing whitespace"):
        CellDescription(**{"cell_type": "B cell", name: "COVID-19 "})


def test_label_spans_cover_exactly_the_labels():
    from modeling_cell2text.description_schema import label_spans

    text = render_description(CellDescription(
        cell_type="B cell", cell_type_definition="A lymphocyte of B lineage", tissue="lung", sex="female",
        disease="COVID-19", age_group="elderly", pathways=("TCA Cycle", "Glycolysis")))
    assert [text[a:b] for a, b in label_spans(text)] == [
        "B cell", "lung", "female", "COVID-19", "the elderly stage", "TCA Cycle", "Glycolysis"]
    healthy = render_description(CellDescription(cell_type="T cell", tissue="blood", disease="normal"))
    # "healthy" without its space: a label-only loss kept the " donor" after it (the reviewer's finding)
    assert [healthy[a:b] for a, b in label_spans(healthy)] == ["T cell", "blood", "healthy"]


def test_set_definition_removes_or_replaces_only_the_definition_sentence():
    full = CellDescription(cell_type="B cell", cell_type_definition="A lymphocyte of B lineage", tissue="blood",
                           disease="normal", pathways=("TCA Cycle",))
    text = render_description(full)
    short = set_definition(text, None)
    assert "definition" not in short and parse_description(short) == CellDescription(
        cell_type="B cell", tissue="blood", disease="normal", pathways=("TCA Cycle",))
    assert set_definition(short, "A lymphocyte of B lineage.") == text
    assert set_definition(text, "A lymphocyte of B lineage") is text  # already so: unchanged
    no_cell_type = render_description(CellDescription(tissue="blood"))
    assert set_definition(no_cell_type, "anything") == no_cell_type
    with pytest.raises(DescriptionParseError):
        set_definition("free text", None)


def test_cell_ontology_labels_with_a_period_round_trip():
    """18 CL labels hold a period ("NK1.1-positive ..."): their descriptions read back as unparsed, or as the cell
    type "NK1" (free evaluation scored those cells wrong), and the constrained decoder refused them."""
    from modeling_cell2text.label_scoring import _check_candidates
    from processing.ontologies import _terms

    labels = sorted(t["label"] for t in _terms("CL").values() if "." in (t.get("label") or ""))
    assert len(labels) >= 10
    for label in labels:
        d = CellDescription(cell_type=label, cell_type_definition="A cell. With a period inside", tissue="thymus",
                            pathways=("Apoptosis WP254",))
        assert parse_description(render_description(d)) == d
        assert parse_description(render_description(CellDescription(cell_type=label))).cell_type == label
    assert _check_candidates(labels) == labels


@pytest.mark.parametrize("origin", [
    {"tissue": "hypothalamus", "sex": "male", "disease": "normal", "age_group": "adulthood"},
    {"tissue": "brain", "disease": "Kallmann syndrome"}, {"sex": "female"}, {},
])
def test_a_definition_holding_an_origin_sentence_reads_back(origin):
    """CL:0011111's definition says "It originates from the olfactory placode ...": its descriptions were read back
    with that text and the next two sentences as the tissue, and the definition cut before it."""
    from processing.ontologies import _terms

    holding = {term_id: t for term_id, t in _terms("CL").items() if "It originates from" in (t.get("description") or "")}
    assert "CL:0011111" in holding
    for term in holding.values():
        d = CellDescription(cell_type=term["label"], cell_type_definition=term["description"].rstrip("."),
                            pathways=("Apoptosis WP254", "Glycolysis WP534"), **origin)
        assert parse_description(render_description(d)) == d


@pytest.mark.parametrize("text", [
    "This sample consists of a B cell. It is round. It originates from the blood of a donor.",
    "This sample consists of a B cell.This sample consists of a T cell.",
    "This sample consists of a T cell.Cell Ontology definition: A cell.",
    'This sample consists of a B cell."junk".',
])
def test_text_after_the_cell_type_sentence_is_still_off_the_template(text):
    """A period inside a label is read only between digits: "T cell.Cell Ontology definition: A cell" was read as
    one cell type by a first version."""
    with pytest.raises(DescriptionParseError):
        parse_description(text)


def test_parsing_long_adversarial_text_stays_fast():
    import time

    text = "This sample consists of a x." + "It originates from the y of a donor with z." * 250 + " !"
    start = time.perf_counter()
    with pytest.raises(DescriptionParseError):
        parse_description(text)
    assert time.perf_counter() - start < 2.0  # 3.4 s with any period followed by a character allowed in a label


def test_every_cell_ontology_definition_reads_back_as_the_corpus_stores_it():
    """Two CL definitions end in " ." (CL:0002486, CL:1001598): the stored definition kept the space, the text read
    back without it, so parse(render(d)) != d and the decoder's definition sentence differed from the training text."""
    from modeling_cell2text.description_schema import definition_text
    from processing.corpus import description_fields
    from processing.ontologies import _terms

    terms = {term_id: t for term_id, t in _terms("CL").items() if t.get("description") and not t.get("deprecated")}
    assert {"CL:0002486", "CL:1001598"} <= set(terms) and len(terms) > 2000
    for term_id, term in terms.items():
        d = description_fields(term["label"], term_id, "blood", "female", "normal", None, ("Apoptosis",))
        text = render_description(d)
        assert parse_description(text) == d, term_id
        assert definition_text(d.cell_type_definition) in text, term_id


def test_every_current_id_of_the_bundled_ontologies_is_in_its_form():
    """The fields' ids are checked against their ontology's form (`TERM_ID_FORMS`): FBdv's 7-digit ids (FBdv:0010001
    "day 61 of adulthood" ...) were left out of fly cells' records as "wrong_ontology_development_stage_term", and
    their cells rejected where the stage is required. Obsolete terms may be of other forms (UBERON:60005380)."""
    from modeling_cell2text.description_schema import TERM_ID_FORMS, is_term_id_of
    from processing.ontologies import _terms

    ontologies = {prefix: "ZFA" if prefix == "ZFS:" else prefix.rstrip(":_") for prefix in TERM_ID_FORMS}
    for prefix, name in ontologies.items():
        ids = [term_id for term_id, term in _terms(name).items() if term_id.startswith(prefix)
               and not term.get("deprecated") and not term.get("label", "").startswith("obsolete")]
        assert len(ids) > 40, prefix
        assert [term_id for term_id in ids if not is_term_id_of(term_id, (prefix,))] == [], prefix
    assert is_term_id_of("FBdv:0010001", ("FBdv:",)) and not is_term_id_of("UBERON:lung", ("UBERON:",))
