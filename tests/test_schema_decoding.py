"""Schema-constrained decoding on tiny models: every field a known label, the exhaustive choice, bounded model calls."""

from __future__ import annotations

import copy
import logging

import pytest
import scipy.sparse as sp
import torch
from transformers import GenerationConfig
from test_pipeline import GENES, random_counts, save_tiny_model_folder

from modeling_cell2text import Cell2TextForConditionalGeneration, Cell2TextProcessor, parse_description, render_description
from modeling_cell2text.description_schema import CellDescription, schema_options
from modeling_cell2text.label_scoring import score_cell_types
from modeling_cell2text.schema_decoding import (CHOICE_FIELDS, OptionTree, SchemaDecoder, SchemaDescriptions,
                                                 schema_results, tokens_in_context)

CELL_TYPES = {"B cell": "CL:0000236", "T cell": "CL:0000084", "endothelial cell": "CL:0000115",
              "monocyte": "CL:0000576", "natural killer cell": "CL:0000623", "CD14-positive monocyte": "CL:0001054"}
PATHWAYS = ["Glycolysis And Gluconeogenesis", "TCA Cycle", "Cytoplasmic Ribosomal Proteins", "Natural Killer Cell"]


@pytest.fixture(scope="module")
def random_model_and_processor(tmp_path_factory):
    labels = {"ontology_term_ids": {"cell_type": CELL_TYPES, "tissue": {"blood": "UBERON:0000178", "lung":
                                    "UBERON:0002048"}, "disease": {"normal": "PATO:0000461", "COVID-19": "MONDO:0100096"},
                                    "sex": {"female": "PATO:0000383", "male": "PATO:0000384"}},
              "age_groups": ["adulthood", "elderly"], "pathway_names": PATHWAYS,
              "cell_type_definitions": {"B cell": "A lymphocyte of B lineage", "T cell": "A type of lymphocyte"}}
    folder = save_tiny_model_folder(tmp_path_factory.mktemp("schema"), trained=False, labels=labels)
    model = Cell2TextForConditionalGeneration.from_pretrained(folder, dtype=torch.float64).eval()
    return model, Cell2TextProcessor.from_pretrained(folder)


def cells(processor, n=6, seed=3):
    return processor(sp.csr_matrix(random_counts(n, seed=seed)), GENES)


def test_the_options_render_exactly_the_template():
    """The decoder's texts are the corpus's: any labels, concatenated, give `render_description`'s text."""
    options = schema_options({"cell_type": ["endothelial cell"], "tissue": ["lung"], "disease": ["COVID-19"],
                              "sex": ["male"], "age_group": ["elderly"], "pathways": ["A", "B"]})
    text = "".join(options[choice][0].text for choice in ("cell_type", "tissue", "donor", "pathway_1"))
    text += options["pathway_2"][1].text
    expected = CellDescription(cell_type="endothelial cell", tissue="lung", disease="COVID-19", sex="male",
                               age_group="elderly", pathways=("A", "B"))
    assert text == render_description(expected)
    no_tissue = schema_options({"cell_type": ["B cell"], "disease": ["normal"]})
    assert no_tissue["cell_type"][0].text + no_tissue["donor"][0].text == render_description(
        CellDescription(cell_type="B cell", disease="normal"))


SEARCHES = pytest.mark.parametrize("max_tree_tokens", [0, 10_000], ids=["beam search", "whole tree"])


@SEARCHES
def test_every_field_is_a_known_label_and_every_description_parses(random_model_and_processor, max_tree_tokens):
    model, processor = random_model_and_processor
    decoder = SchemaDecoder(processor, max_tree_tokens=max_tree_tokens)
    described = decoder.describe(model, cells(processor, 8))
    results = schema_results(processor, described)
    assert len(results) == 8
    for result in results:
        parsed = parse_description(result["description"])
        assert result["parsed"] and parsed.cell_type in CELL_TYPES and parsed.tissue in ("blood", "lung")
        assert parsed.disease in ("normal", "COVID-19") and parsed.sex in ("female", "male")
        assert parsed.age_group in ("adulthood", "elderly")
        assert len(parsed.pathways) == 2 and parsed.pathways[0] != parsed.pathways[1]
        assert set(parsed.pathways) <= set(PATHWAYS)
        assert result["cell_type_ontology_term_id"] == CELL_TYPES[result["cell_type"]]
        if result["cell_type"] in processor.cell_type_definitions:
            assert parsed.cell_type_definition == processor.cell_type_definitions[result["cell_type"]]
        for name in ("cell_type", "tissue", "sex", "disease", "age_group", "pathways"):
            assert 0 < result[f"{name}_score"] <= 1, name


def test_the_whole_tree_is_exhaustive_scoring(random_model_and_processor):
    """A tree scored whole in one pass completes every label: the chosen cell type, every label's log-likelihood and
    the probability are exhaustive scoring's (`label_scoring.score_cell_types`)."""
    model, processor = random_model_and_processor
    inputs = cells(processor, 8, seed=5)
    exhaustive = score_cell_types(model, processor, inputs)
    assert len(set(exhaustive.labels)) > 1  # the random model tells cells apart
    described = SchemaDecoder(processor, max_tree_tokens=10_000).describe(model, inputs)
    assert [labels["cell_type"] for labels in described.labels] == exhaustive.labels
    assert [s["cell_type"] for s in described.scores] == pytest.approx(exhaustive.scores, rel=1e-5)
    for row, likelihoods in enumerate(described.log_likelihoods):
        completed = {parse_description(text).cell_type: ll for text, ll in likelihoods["cell_type"].items()}
        assert set(completed) == set(CELL_TYPES)
        for label, ll in completed.items():
            j = exhaustive.candidates.index(label)
            assert ll == pytest.approx(float(exhaustive.log_likelihoods[row, j]), abs=1e-4)  # theirs: float32


@pytest.mark.parametrize("width", [1, 2, 4])
def test_the_search_finds_exhaustive_scorings_argmax(random_model_and_processor, width):
    """Best-first search, any width: the chosen cell type is exhaustive scoring's argmax wherever the search proves
    it (on this random model, every cell), each option it completes has exhaustive scoring's log-likelihood, and the
    score is the chosen label's share of the decoder's distribution (completed and unexplored options), which sums
    to 1."""
    model, processor = random_model_and_processor
    inputs = cells(processor, 8, seed=5)
    exhaustive = score_cell_types(model, processor, inputs)
    decoder = SchemaDecoder(processor, num_beams=width, max_tree_tokens=0)
    described = decoder.describe(model, inputs)
    assert all("cell_type" not in choices for choices in described.not_exact)
    assert [labels["cell_type"] for labels in described.labels] == exhaustive.labels
    temperature = float(model.config.cell_type_temperature)
    for row, likelihoods in enumerate(described.log_likelihoods):
        completed = {parse_description(text).cell_type: ll for text, ll in likelihoods["cell_type"].items()}
        for label, ll in completed.items():
            j = exhaustive.candidates.index(label)
            assert ll == pytest.approx(float(exhaustive.log_likelihoods[row, j]), abs=1e-4)
        unexplored = [ll for _, ll in described.unexplored[row]["cell_type"]]
        assert all(u <= max(completed.values()) + 1e-9 for u in unexplored)  # none could beat the choice
        values = torch.tensor([*completed.values(), *unexplored], dtype=torch.float64) / temperature
        probabilities = values.softmax(dim=0)
        assert float(probabilities.sum()) == pytest.approx(1.0)
        chosen = list(completed).index(described.labels[row]["cell_type"])
        assert described.scores[row]["cell_type"] == pytest.approx(float(probabilities[chosen]))


def test_a_narrow_search_still_gives_probabilities_that_sum_to_one(random_model_and_processor):
    model, processor = random_model_and_processor
    described = SchemaDecoder(processor, num_beams=1, max_tree_tokens=0).describe(model, cells(processor, 4))
    for labels, scores, likelihoods in zip(described.labels, described.scores, described.log_likelihoods):
        for choice, completed in likelihoods.items():
            probabilities = torch.tensor(list(completed.values()), dtype=torch.float64).softmax(dim=0)
            assert float(probabilities.sum()) == pytest.approx(1.0)
        assert 0 < scores["cell_type"] <= 1


def test_model_calls_do_not_grow_with_the_number_of_labels(random_model_and_processor):
    model, processor = random_model_and_processor
    words = ["B", "T", "dendritic", "monocyte", "killer", "natural", "regulatory", "progenitor", "stem", "blood"]
    many = {f"{a} {b} {c} cell": f"CL:{i:07d}" for i, (a, b, c) in enumerate(
        (a, b, c) for a in words for b in words for c in words[:3])}  # 300 labels
    inputs = cells(processor, 4)
    tokens = {}
    for name, labels in (("few", dict(list(many.items())[:10])), ("many", many)):
        processor.ontology_term_ids = {**processor.ontology_term_ids, "cell_type": labels}
        decoder = SchemaDecoder(processor, num_beams=4, max_tree_tokens=0)  # a search, as for a Census label set
        described = decoder.describe(model, inputs)
        exhaustive = score_cell_types(model, processor, inputs, list(labels))
        for chosen, not_exact, best in zip(described.labels, described.not_exact, exhaustive.labels):
            assert chosen["cell_type"] == best or "cell_type" in not_exact  # proven choices are the argmax
        # the prefill, one write before each choice, at most one call per level of each choice's tree
        assert decoder.calls <= 1 + sum(1 + tree.max_depth for tree in decoder.trees.values())
        tokens[name] = decoder.tokens
    # one partial option per step on this flat random model: the search is cut to a beam after the tree's depth,
    # and a cell whose choice was not proven is said to be so
    processor.ontology_term_ids = {**processor.ontology_term_ids, "cell_type": many}
    narrow = SchemaDecoder(processor, num_beams=1, max_tree_tokens=0).describe(model, inputs)
    assert any("cell_type" in not_exact for not_exact in narrow.not_exact)
    for chosen, not_exact, best in zip(narrow.labels, narrow.not_exact, exhaustive.labels):
        assert chosen["cell_type"] == best or "cell_type" in not_exact
    # the pipeline's results (and tl's obs) say which cells' choices are not proven
    assert [r["exact_choice"] for r in schema_results(processor, narrow)] == [not c for c in narrow.not_exact]
    assert not all(r["exact_choice"] for r in schema_results(processor, narrow))
    processor.ontology_term_ids = {**processor.ontology_term_ids, "cell_type": CELL_TYPES}
    assert len(many) == 300
    # 30x the labels; exhaustive scoring runs 30x the label tokens. (A trained model's search stops far sooner than
    # this random one's, whose flat distributions leave many partial options able to beat the best: docs/results.md.)
    assert tokens["many"] <= 2 * tokens["few"]


def test_a_label_is_tokenized_as_inside_its_sentence(random_model_and_processor):
    _, processor = random_model_and_processor
    tokenizer = processor.tokenizer
    alone = tokenizer("B cell", add_special_tokens=False)["input_ids"]
    option = "This sample consists of a B cell."
    inside = tokens_in_context(tokenizer, "", option)
    assert not any(inside[i : i + len(alone)] == alone for i in range(len(inside)))  # differs inside the sentence
    decoder = SchemaDecoder(processor)
    index = [o.text for o in decoder.options["cell_type"]].index(option)
    assert decoder.shared_tokens["cell_type"] + decoder.option_tokens["cell_type"][index] == inside


def test_the_taught_description_is_reachable_and_chosen(tmp_path):
    """A tiny model taught one description writes it, word for word, through the constrained decoder."""
    folder = save_tiny_model_folder(tmp_path, trained=True)
    model = Cell2TextForConditionalGeneration.from_pretrained(folder).eval()
    processor = Cell2TextProcessor.from_pretrained(folder)
    processor.ontology_term_ids["cell_type"] = CELL_TYPES
    described = SchemaDecoder(processor).describe(model, cells(processor, 3))
    assert described.texts == [render_description(CellDescription(cell_type="B cell", tissue="blood",
                                                                   disease="normal"))] * 3


def test_option_tree_shares_prefixes_and_marks_ends():
    tree = OptionTree([[1, 2, 3], [1, 2], [1, 4]])
    assert tree.max_depth == 3 and len(tree.children) == 5
    node = tree.children[tree.children[0][1]][2]
    assert tree.ends[node] == [1] and tree.children[node] == {3: 3}


def test_a_processor_without_cell_type_labels_describes_freely_with_a_warning(tmp_path, caplog):
    from transformers import pipeline

    folder = save_tiny_model_folder(tmp_path, trained=False, labels={"ontology_term_ids": {
        "tissue": {"blood": "UBERON:0000178"}}})  # a model whose corpus named no cell type
    model, processor = Cell2TextForConditionalGeneration.from_pretrained(folder), Cell2TextProcessor.from_pretrained(
        folder)
    with pytest.raises(ValueError, match="constrained=False"):
        SchemaDecoder(processor)
    pipe = pipeline("cell-to-text", model=model, processor=processor)
    with caplog.at_level(logging.WARNING):
        results = pipe(sp.csr_matrix(random_counts(2)), gene_ids=GENES, constrained=True, max_new_tokens=4)
    assert len(results) == 2 and results[0]["cell_type_score"] is None
    assert "knows no cell-type labels" in caplog.text


def test_a_field_without_known_labels_is_left_out_with_a_warning(random_model_and_processor, caplog):
    """The rule for every field: stated with a known label or left out; the fields left out are named."""
    model, processor = random_model_and_processor
    saved = processor.ontology_term_ids
    processor.ontology_term_ids = {**saved, "sex": {}, "tissue": {}}
    try:
        with caplog.at_level(logging.WARNING):
            decoder = SchemaDecoder(processor)
        assert "knows no labels for tissue, sex" in caplog.text
        for result in schema_results(processor, decoder.describe(model, cells(processor, 3))):
            assert result["parsed"] and result["sex"] is None and result["tissue"] is None
            assert result["disease"] in ("normal", "COVID-19") and result["cell_type"] in CELL_TYPES
    finally:
        processor.ontology_term_ids = saved


@pytest.mark.parametrize("pathways", [False, True], ids=["no pathways", "pathways"])
def test_a_tissue_without_donor_labels_ends_its_sentence_with_the_donor(random_model_and_processor, pathways):
    """A processor knowing tissues but no sex, disease or age group (a corpus without them, or keep_labels keeping
    none) wrote "It originates from the blood of a This cell is associated with ...": the tissue option ends at the
    donor's article and no donor clause followed, so the text was off the template (parsed False, exit 0) and the
    pathways were chosen after it. Every description is the template's text of its chosen fields."""
    model, processor = random_model_and_processor
    saved = processor.ontology_term_ids, processor.age_groups, processor.pathway_names
    processor.ontology_term_ids = {name: saved[0][name] for name in ("cell_type", "tissue")}
    processor.age_groups, processor.pathway_names = [], saved[2] if pathways else []
    try:
        results = schema_results(processor, SchemaDecoder(processor).describe(model, cells(processor, 3)))
    finally:
        processor.ontology_term_ids, processor.age_groups, processor.pathway_names = saved
    for result in results:
        chosen = CellDescription(cell_type=result["cell_type"], cell_type_definition=result["cell_type_definition"],
                                 tissue=result["tissue"], pathways=tuple(result["pathways"]))
        assert result["description"] == render_description(chosen) and result["parsed"]
        assert "of a donor." in result["description"] and result["sex"] is None and result["sex_score"] is None
        assert len(result["pathways"]) == (2 if pathways else 0)


def test_an_attention_implementation_without_4d_masks_is_refused_with_the_fix(random_model_and_processor):
    """The decoder's passes take 4D masks (tree attention): a float32 model loaded with attn_implementation=
    "flex_attention" aborted the whole process on the CPU at the first masked pass ("free(): invalid next size"; this
    float64 one failed inside torch's compiler); flash attention takes a 2D padding mask only. Refused before any
    pass, and SDPA, as the message says, describes as before."""
    model, processor = random_model_and_processor
    inputs = cells(processor, 2)
    expected = SchemaDecoder(processor).describe(model, inputs)
    other = copy.deepcopy(model)
    other.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match=r"attn_implementation='flex_attention', which does not take the "
                                         r"schema-constrained decoder's 4D attention masks .*set_attn_implementation"):
        SchemaDecoder(processor).describe(other, inputs)
    other.set_attn_implementation("sdpa")
    assert SchemaDecoder(processor).describe(other, inputs).labels == expected.labels


def test_sampling_is_refused_when_constrained(random_model_and_processor):
    from transformers import pipeline

    model, processor = random_model_and_processor
    pipe = pipeline("cell-to-text", model=model, processor=processor)
    with pytest.raises(ValueError, match="does not sample"):
        pipe(sp.csr_matrix(random_counts(2)), gene_ids=GENES, do_sample=True)
    # the reviewer's finding: inside a GenerationConfig, sampling was ignored (greedy, without a word)
    with pytest.raises(ValueError, match="does not sample"):
        pipe(sp.csr_matrix(random_counts(2)), gene_ids=GENES, generation_config=GenerationConfig(do_sample=True))


def test_a_generation_configs_search_width_is_the_decoders(random_model_and_processor, monkeypatch):
    """num_beams in a GenerationConfig sets the constrained search's width, as num_beams= does (it was ignored)."""
    from transformers import pipeline

    model, processor = random_model_and_processor
    pipe = pipeline("cell-to-text", model=model, processor=processor)
    widths, schema_decoder = [], pipe.schema_decoder
    monkeypatch.setattr(pipe, "schema_decoder", lambda width: widths.append(width) or schema_decoder(width))
    cells = sp.csr_matrix(random_counts(2))
    pipe(cells, gene_ids=GENES, num_beams=1)
    pipe(cells, gene_ids=GENES, generation_config=GenerationConfig(num_beams=1))
    pipe(cells, gene_ids=GENES, generation_config=GenerationConfig(num_beams=3), num_beams=1)  # the keyword wins
    assert widths == [1] * 6  # each call's: its check of the positions needed, and its decoding


def test_one_pathway_name_is_stated_once(random_model_and_processor):
    model, processor = random_model_and_processor
    saved = processor.pathway_names
    processor.pathway_names = ["TCA Cycle"]
    try:
        results = schema_results(processor, SchemaDecoder(processor).describe(model, cells(processor, 2)))
    finally:
        processor.pathway_names = saved
    assert all(result["pathways"] == ["TCA Cycle"] and result["pathways_score"] == 1.0 for result in results)


def test_the_pipeline_rebuilds_its_decoder_when_the_labels_change(random_model_and_processor):
    from transformers import pipeline

    model, processor = random_model_and_processor
    pipe = pipeline("cell-to-text", model=model, processor=processor)
    first = pipe.schema_decoder()
    assert pipe.schema_decoder() is first
    saved = processor.ontology_term_ids
    processor.ontology_term_ids = {**saved, "cell_type": {"B cell": "CL:0000236", "T cell": "CL:0000084"}}
    try:
        assert pipe.schema_decoder() is not first
        assert pipe.schema_decoder().options_labels("cell_type") == ["B cell", "T cell"]
    finally:
        processor.ontology_term_ids = saved


def test_a_label_with_a_period_is_still_given_with_its_ontology_id(random_model_and_processor):
    """A few ontology labels hold the template's punctuation ("St. Louis encephalitis"): the text cannot be read
    back, but the chosen fields come from the choices, so nothing is lost or misread."""
    model, processor = random_model_and_processor
    saved = processor.ontology_term_ids
    processor.ontology_term_ids = {**saved, "cell_type": {"cell of St. Mary": "CL:9999999"}}
    try:
        results = schema_results(processor, SchemaDecoder(processor).describe(model, cells(processor, 2)))
    finally:
        processor.ontology_term_ids = saved
    assert [r["cell_type"] for r in results] == ["cell of St. Mary"] * 2
    assert all(r["cell_type_ontology_term_id"] == "CL:9999999" and r["parsed"] is False for r in results)
    assert all(r["tissue"] in ("blood", "lung") and len(r["pathways"]) == 2 for r in results)


def test_each_choice_uses_its_own_temperature(random_model_and_processor):
    model, processor = random_model_and_processor
    inputs = cells(processor, 3)
    plain = SchemaDecoder(processor).describe(model, inputs)
    model.config.field_temperatures = {"pathway_1": 0.5}
    try:
        sharper = SchemaDecoder(processor).describe(model, inputs)
    finally:
        model.config.field_temperatures = None
    for before, after, likelihoods in zip(plain.scores, sharper.scores, sharper.log_likelihoods):
        values = torch.tensor(list(likelihoods["pathway_1"].values()), dtype=torch.float64)
        assert after["pathway_1"] == pytest.approx(float((values / 0.5).softmax(0).max()))
        assert after["tissue"] == pytest.approx(before["tissue"])  # other choices keep theirs


def test_field_temperatures_are_fitted_on_cells_with_known_labels(random_model_and_processor):
    from datasets import Dataset

    from training.evaluation.evaluate import fit_field_temperatures

    model, processor = random_model_and_processor
    inputs = cells(processor, 6, seed=4)
    rows = [{"gene_input_ids": [int(t) for t, m in zip(ids, mask) if m], "tissue": tissue,
             "pathways": ["TCA Cycle", "Natural Killer Cell"], "sex": "female", "disease": "normal",
             "age_group": "adulthood"}
            for ids, mask, tissue in zip(inputs["gene_input_ids"].tolist(), inputs["gene_attention_mask"].tolist(),
                                         ["blood", "lung"] * 3)]
    fitted = fit_field_temperatures(model, processor, Dataset.from_list(rows), batch_size=3)
    assert set(fitted) == {"tissue", "donor", "pathway_1", "pathway_2"}
    for fit in fitted.values():
        assert fit["num_cells"] >= 1 and 0.05 <= fit["temperature"] <= 100
        assert fit["nll_after"] <= fit["nll_before"] + 1e-9  # the fit never makes the truth less likely
    assert fitted["tissue"]["num_cells"] == 6  # both tissues scored whole: every cell counts


def test_field_temperatures_count_cells_whose_truth_the_search_left_unexplored(random_model_and_processor,
                                                                               monkeypatch):
    """A narrow search often leaves the true option unexplored: the truth is then the unexplored partial option it
    lies under, so cells the search got wrong still count (else the fit would see mostly right cells)."""
    import math

    from datasets import Dataset

    from training.evaluation import evaluate

    model, processor = random_model_and_processor
    real = SchemaDecoder(processor)
    options = real.options["pathway_1"]
    truth = next(i for i, o in enumerate(options) if o.labels[0][1] == PATHWAYS[1])
    chosen = next(i for i, o in enumerate(options) if o.labels[0][1] == PATHWAYS[0])
    first_node = min(real.trees["pathway_1"].option_nodes[truth])  # the truth's first token: a partial option

    class SearchThatMissedTheTruth:  # the real options; every cell chose PATHWAYS[0], the truth left unexplored
        def __init__(self, processor):
            self.options, self.trees = real.options, real.trees

        def describe(self, model, inputs):
            n = inputs["input_ids"].shape[0]
            return SchemaDescriptions([""] * n, [{} for _ in range(n)], [{} for _ in range(n)],
                                      [{"pathway_1": {options[chosen].text: -1.0}} for _ in range(n)],
                                      [{"pathway_1": [(first_node, -2.0)]} for _ in range(n)])

    monkeypatch.setattr(evaluate, "SchemaDecoder", SearchThatMissedTheTruth)
    inputs = cells(processor, 4, seed=4)
    rows = [{"gene_input_ids": [int(t) for t, m in zip(ids, mask) if m], "tissue": "blood",
             "pathways": [PATHWAYS[1], PATHWAYS[2]], "sex": "female", "disease": "normal", "age_group": "adulthood"}
            for ids, mask in zip(inputs["gene_input_ids"].tolist(), inputs["gene_attention_mask"].tolist())]
    fitted = evaluate.fit_field_temperatures(model, processor, Dataset.from_list(rows), batch_size=2)
    assert set(fitted) == {"pathway_1"} and fitted["pathway_1"]["num_cells"] == 4
    assert fitted["pathway_1"]["nll_before"] == pytest.approx(math.log(1 + math.e))  # -log softmax([-1, -2])[1]


def test_the_search_agrees_with_the_whole_tree_on_every_choice(random_model_and_processor):
    """Every choice (the donor clause, both pathways, with the first pathway excluded from the second) is the whole
    tree's where the search proves it; no unexplored partial option stands only for the excluded pathway."""
    model, processor = random_model_and_processor
    inputs = cells(processor, 8, seed=6)
    whole = SchemaDecoder(processor, max_tree_tokens=10_000).describe(model, inputs)
    searched_decoder = SchemaDecoder(processor, num_beams=2, max_tree_tokens=0)
    searched = searched_decoder.describe(model, inputs)
    pathways = searched_decoder.options["pathway_2"]
    for row in range(8):
        for name in ("cell_type", "tissue", "sex", "disease", "age_group", "pathway_1", "pathway_2"):
            choice = next(c for c, names in CHOICE_FIELDS.items() if name in names)
            if choice not in searched.not_exact[row]:
                assert searched.labels[row][name] == whole.labels[row][name], (row, name)
        tree = searched_decoder.trees["pathway_2"]
        first = next(i for i, option in enumerate(pathways) if option.labels[0][1] == searched.labels[row]["pathway_1"])
        for node, _ in searched.unexplored[row].get("pathway_2", []):
            assert not (tree.options_under[node] == 1 and node in tree.option_nodes[first])


def test_an_unexplored_option_counts_for_the_label_every_option_under_it_states(random_model_and_processor):
    """The QA finding: with one sex label, every donor-clause option states it, yet a search left options
    unexplored scored it below 1 (their mass counted against it); a disease shared by all options scored 0.567
    where the whole tree gives 1.0."""
    model, processor = random_model_and_processor
    saved = processor.ontology_term_ids
    processor.ontology_term_ids = {**saved, "sex": {"female": "PATO:0000383"}, "disease": {
        "normal": "PATO:0000461", "COVID-19": "MONDO:0100096", "asthma": "MONDO:0004979",
        "influenza": "MONDO:0005812", "lung cancer": "MONDO:0008903"}}
    try:
        inputs = cells(processor, 4, seed=5)
        searched = SchemaDecoder(processor, num_beams=1, max_tree_tokens=0).describe(model, inputs)
        whole = SchemaDecoder(processor, max_tree_tokens=10_000).describe(model, inputs)
    finally:
        processor.ontology_term_ids = saved
    assert all(searched.unexplored[row].get("donor") for row in range(4))  # the search left options unexplored
    for row in range(4):
        assert searched.scores[row]["sex"] == pytest.approx(1.0) == whole.scores[row]["sex"]
        assert searched.scores[row]["disease"] <= whole.scores[row]["disease"] + 1e-9 or \
            searched.labels[row]["disease"] != whole.labels[row]["disease"]


@pytest.mark.parametrize("beams", [0, -1, "4", 2.5])
def test_a_bad_search_width_is_refused_not_replaced(random_model_and_processor, beams):
    from transformers import pipeline

    model, processor = random_model_and_processor
    pipe = pipeline("cell-to-text", model=model, processor=processor)
    with pytest.raises(ValueError, match="num_beams must be"):
        pipe(sp.csr_matrix(random_counts(2)), gene_ids=GENES, num_beams=beams)


class _ScriptedState:
    """A `_DecodingState` whose model is a table: the log-probabilities after a token depend on that token only.
    It records the tokens each call feeds."""

    VOCABULARY = 10

    def __init__(self, after: dict[int, dict[int, float]], first: dict[int, float]):
        from modeling_cell2text.schema_decoding import _DecodingState

        self.state = object.__new__(_DecodingState)
        state = self.state
        state.visible = torch.ones((1, 3), dtype=torch.bool)
        state.next_position = torch.tensor([3])
        state.log_probs = self.row(first)[None]
        state.calls = state.tokens = 0
        self.fed: list[int] = []
        length = {"n": 3}

        class Cache:
            def get_seq_length(self):
                return length["n"]

            def crop(self, count):
                length["n"] += count  # negative: tokens removed

        state.cache = Cache()

        def forward(ids, allowed, positions, real, keep):
            from modeling_cell2text.schema_decoding import _KeptLogProbs

            self.fed += ids[real].tolist()
            length["n"] += ids.shape[1]
            rows = [self.row(after.get(int(token), {})) for token in ids[keep]]
            return _KeptLogProbs(torch.stack(rows), keep)

        state._forward = forward

    def row(self, values: dict[int, float]) -> torch.Tensor:
        row = torch.full((self.VOCABULARY,), -20.0)
        for token, value in values.items():
            row[token] = value
        return row


def test_the_search_never_explores_a_subtree_holding_only_the_excluded_option():
    """pathway_2 may not repeat pathway_1: a partial option leading only to it is neither fed nor left as
    unexplored mass; the search proves the best other option."""
    tree = OptionTree([[1, 2, 3], [1, 4, 5], [6, 7]])  # option 0 (excluded) and 1 share their first token
    scripted = _ScriptedState(after={1: {2: -0.1, 4: -2.0}, 2: {3: -0.1}, 4: {5: -0.1}, 6: {7: -0.1}},
                              first={1: -0.1, 6: -3.0})
    result = scripted.state.choose(tree, 1, [0], pad_id=0)
    assert result.chosen == [1] and result.exact == [True]
    assert result.completed[0] == pytest.approx({1: -2.2})
    assert 2 not in scripted.fed and scripted.fed == [1, 4]
    node_6 = tree.children[0][6]
    assert result.unexplored == [[(node_6, -3.0)]]
    assert scripted.state.cache.get_seq_length() == 3  # the cache is left as it was


def test_the_prompt_start_every_cell_shares_runs_once_and_changes_nothing(random_model_and_processor, monkeypatch):
    """The system message and the text before the cell tokens run once for the batch (one row, its cache copied to
    every row): the descriptions and their log-likelihoods are those of a prefill of every row's whole prompt."""
    from modeling_cell2text import schema_decoding

    model, processor = random_model_and_processor
    inputs = cells(processor, 4)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    shared = schema_decoding.shared_prompt_length(ids, mask, model.config.cell_token_id)
    first_cell = int((ids[0] == model.config.cell_token_id).nonzero()[0])
    assert 0 < shared <= first_cell and (ids[:, :shared] == ids[:1, :shared]).all()
    assert schema_decoding.shared_prompt_length(ids[:1], mask[:1], model.config.cell_token_id) == 0  # one row
    padded = mask.clone()
    padded[0, 0] = 0  # a left-padded row: nothing is shared from the first column on
    assert schema_decoding.shared_prompt_length(ids, padded, model.config.cell_token_id) == 0

    decoder = SchemaDecoder(processor)
    once = decoder.describe(model, inputs)
    calls_once = decoder.calls
    monkeypatch.setattr(schema_decoding, "shared_prompt_length", lambda *args: 0)
    every_row = decoder.describe(model, inputs)
    assert decoder.calls == calls_once - 1  # the shared start's own call
    assert once.texts == every_row.texts and once.labels == every_row.labels
    for a, b in zip(once.log_likelihoods, every_row.log_likelihoods):
        assert a.keys() == b.keys()
        for choice in a:
            assert a[choice].keys() == b[choice].keys()
            assert all(abs(a[choice][k] - b[choice][k]) < 1e-9 for k in a[choice])  # float64 model


def test_cells_whose_choice_is_settled_skip_the_search_steps_and_change_nothing(random_model_and_processor,
                                                                                monkeypatch):
    """A search step runs only the cells that still have a partial option to extend (the others' cache grows with
    keys they never see): descriptions, log-likelihoods and unexplored options are those of running every cell, and
    fewer token slots run (the padded-rows path, which a model that cannot run packed steps takes)."""
    from modeling_cell2text import schema_decoding

    monkeypatch.setattr(schema_decoding, "PACK_TOKENS", False)
    model, processor = random_model_and_processor
    inputs = cells(processor, 8, seed=5)
    decoder = SchemaDecoder(processor, num_beams=1, max_tree_tokens=0)
    slots = []
    forward = schema_decoding._DecodingState._forward

    def counted(self, ids, *args):
        slots.append(ids.shape[0])
        return forward(self, ids, *args)

    monkeypatch.setattr(schema_decoding._DecodingState, "_forward", counted)
    some_rows = decoder.describe(model, inputs)
    assert min(slots) < 8  # the settled cells were left out of some step
    runs_of_some = len(slots)
    slots.clear()
    monkeypatch.setattr(schema_decoding._DecodingState, "_forward_rows", counted)
    every_row = decoder.describe(model, inputs)
    assert min(slots) == 8 and len(slots) == runs_of_some
    assert some_rows.texts == every_row.texts and some_rows.labels == every_row.labels
    assert some_rows.not_exact == every_row.not_exact
    for a, b in zip(some_rows.log_likelihoods, every_row.log_likelihoods):
        assert a.keys() == b.keys()
        for choice in a:
            assert a[choice].keys() == b[choice].keys()
            assert all(abs(a[choice][k] - b[choice][k]) < 1e-9 for k in a[choice])  # float64 model
    for a, b in zip(some_rows.unexplored, every_row.unexplored):
        assert a.keys() == b.keys()
        for choice in a:
            assert [node for node, _ in a[choice]] == [node for node, _ in b[choice]]
            assert all(abs(x - y) < 1e-9 for (_, x), (_, y) in zip(a[choice], b[choice]))


def _same_descriptions(a, b, tolerance: float) -> None:
    """Two decoders' outputs for the same batch agree: texts, labels, and every log-likelihood within `tolerance`."""
    assert a.texts == b.texts and a.labels == b.labels and a.not_exact == b.not_exact
    for x, y in zip(a.log_likelihoods, b.log_likelihoods):
        assert x.keys() == y.keys()
        for choice in x:
            assert x[choice].keys() == y[choice].keys()
            assert max(abs(x[choice][k] - y[choice][k]) for k in x[choice]) < tolerance, choice


@pytest.mark.parametrize("method, real", [
    ("_forward_rows", [[1, 1, 1], [0, 0, 0], [1, 1, 0], [0, 0, 0]]),
    ("_forward_packed", [[1, 1, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0]]),
])
def test_a_step_with_padding_gives_each_cell_its_own_keys(random_model_and_processor, method, real):
    """A step whose rows hold padding, run on the cells with tokens only (`_forward_rows`) or on the real tokens
    packed into one row (`_forward_packed`; tiny Llama with grouped-query attention): its log-probabilities, and what
    a later token of each cell reads back from the cache, equal running every cell with padding (`_forward`; a key
    put in another cell's row or slot fails it)."""
    from modeling_cell2text.schema_decoding import _DecodingState

    model, processor = random_model_and_processor
    inputs = cells(processor, 4)
    tested, padded = _DecodingState(model, inputs), _DecodingState(model, inputs)
    assert tested._packable()
    real = torch.tensor(real, dtype=torch.bool)
    n, width = real.shape
    ids = torch.randint(5, 100, (n, width), generator=torch.Generator().manual_seed(0))
    new = torch.ones(width, width, dtype=torch.bool).tril()[None] & real[:, None, :]
    new |= torch.eye(width, dtype=torch.bool)[None]
    runs = []
    for state, run in ((tested, getattr(tested, method)), (padded, padded._forward)):
        allowed = torch.cat([state.visible[:, None, :].expand(n, width, -1), new], dim=2)
        positions = state.next_position[:, None] + torch.arange(width)
        runs.append(run(ids, allowed, positions, real, real))
        state.visible = torch.cat([state.visible, real], dim=1)
        state.next_position = state.next_position + real.sum(dim=1)
        state.write([[7, 8]] * n, pad_id=0)  # every cell, reading what the step left in the cache
    assert tested.calls == padded.calls and tested.tokens == padded.tokens
    assert tested.cache.get_seq_length() == padded.cache.get_seq_length()
    assert torch.equal(runs[0].index, runs[1].index)
    assert torch.allclose(runs[0].values, runs[1].values, atol=1e-9)
    assert torch.allclose(tested.log_probs, padded.log_probs, atol=1e-9)
    assert model.model.language_model.config._attn_implementation == "sdpa"  # restored after a packed pass


def test_packed_decoding_describes_as_padded_rows_do(random_model_and_processor, monkeypatch):
    """The decoder's default (packed steps) and padded rows give the same descriptions and log-likelihoods, and a
    model whose language model does not attend with SDPA decodes with padded rows."""
    from modeling_cell2text import schema_decoding

    model, processor = random_model_and_processor
    inputs = cells(processor, 8, seed=5)
    decoder = SchemaDecoder(processor, num_beams=2, max_tree_tokens=0)
    packed_steps = []
    forward_packed = schema_decoding._DecodingState._forward_packed

    def counted(self, *args):
        packed_steps.append(args[0].shape)
        return forward_packed(self, *args)

    monkeypatch.setattr(schema_decoding._DecodingState, "_forward_packed", counted)
    packed = decoder.describe(model, inputs)
    assert packed_steps  # the writes and the search ran packed
    monkeypatch.setattr(schema_decoding, "PACK_TOKENS", False)
    _same_descriptions(packed, decoder.describe(model, inputs), 1e-9)  # float64 model
    monkeypatch.setattr(schema_decoding, "PACK_TOKENS", True)
    inputs = cells(processor, 4)  # prompts of one length: a float64 model under eager attention gets NaN at padding
    packed = decoder.describe(model, inputs)
    packed_steps.clear()
    monkeypatch.setattr(model.model.language_model.config, "_attn_implementation", "eager")
    _same_descriptions(packed, decoder.describe(model, inputs), 1e-4)  # float32 log-softmax of other float64 sums
    assert not packed_steps


def test_nan_logits_stop_the_decoder_instead_of_leaving_a_cell_without_labels(random_model_and_processor):
    """A NaN log-likelihood never beats another option: before this check a cell whose logits were NaN got an empty
    description and no labels, silently (seen with a float64 model under eager attention, whose left-padded prompt
    positions turn NaN). Now the decoder refuses, naming the causes."""

    model, processor = random_model_and_processor
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.language_model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN logits"):
        SchemaDecoder(processor).describe(broken, cells(processor, 4))


def test_a_packed_pass_that_fails_leaves_the_model_and_cache_as_they_were(random_model_and_processor, monkeypatch):
    """The packed pass switches the language model's attention implementation and marks the cache's layers for its
    call only: an error inside it leaves the model attending with SDPA (else every later call of the model would run
    the packed attention) and the cache unmarked."""
    from modeling_cell2text.schema_decoding import _DecodingState

    model, processor = random_model_and_processor
    state = _DecodingState(model, cells(processor, 2))
    real = torch.ones(2, 1, dtype=torch.bool)
    allowed = torch.cat([state.visible[:, None, :], real[:, :, None]], dim=2)

    def failing(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model.model.language_model, "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        state._forward_packed(torch.full((2, 1), 7), allowed, state.next_position[:, None], real, real)
    assert model.model.language_model.config._attn_implementation == "sdpa"
    assert all(layer.packing is None for layer in state.cache.layers)


def test_packed_attention_without_its_layout_names_the_fix(monkeypatch):
    """An architecture that does not hand its keyword arguments to its attention function would give the packed
    attention no layout: a clear error naming the setting that turns packing off, not a shape error."""
    from modeling_cell2text import schema_decoding

    states = torch.zeros(1, 2, 3, 4)
    monkeypatch.setattr(schema_decoding._RUNNING, "packing", object(), raising=False)  # a packed pass runs here
    with pytest.raises(RuntimeError, match="PACK_TOKENS = False"):
        schema_decoding.packed_attention(torch.nn.Module(), states, states, states, None)


def test_the_growing_cache_layer_holds_what_a_dynamic_layer_holds():
    """The decoder's cache layer writes in place instead of concatenating; after appending, cropping, selecting rows
    and appending to some rows it holds exactly what `DynamicLayer` holds, and a row-selected copy (a search step of
    some cells) writes into buffers of its own, never into the layer it was copied from."""

    from transformers.cache_utils import DynamicLayer

    from modeling_cell2text.schema_decoding import _GrowingLayer

    generator = torch.Generator().manual_seed(0)

    def states(rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(rows, 2, width, 4, generator=generator), torch.randn(rows, 2, width, 4, generator=generator))

    plain = DynamicLayer()
    plain.update(*states(3, 5))
    growing = _GrowingLayer.taking_over(plain)
    for width in (4, 9, 1):  # the last appends outgrow the first buffers (capacity 10)
        new = states(3, width)
        assert [torch.equal(a, b) for a, b in zip(growing.update(*new), plain.update(*new))] == [True, True]
    growing.crop(-6)
    plain.crop(-6)
    assert growing.get_seq_length() == plain.get_seq_length() == 13
    rows = torch.tensor([2, 0])
    subset = copy.copy(growing)
    subset.batch_select_indices(rows)
    before = growing.keys.clone()
    new = states(2, 3)
    subset.update(*new)
    assert torch.equal(growing.keys, before)  # the copy wrote into its own buffers
    growing.append_rows(rows, new[0], new[1])
    assert torch.equal(growing.keys[rows, :, -3:], new[0]) and torch.equal(growing.values[rows, :, -3:], new[1])
    assert not growing.keys[1, :, -3:].any()  # the cell not run: zeros, finite
    assert torch.equal(growing.keys[:, :, :13], plain.keys) and torch.equal(growing.values[:, :, :13], plain.values)


def test_a_write_of_cells_of_different_lengths_in_two_passes_changes_nothing(random_model_and_processor,
                                                                           monkeypatch):
    """On padded rows a write whose cells' lengths differ runs the longest cells' ends in a second pass (fewer padding
    slots); every cell's next-token distribution, and what a later token reads back from the cache, equal one pass.
    Packed, the same write is one pass."""
    from modeling_cell2text import schema_decoding
    from modeling_cell2text.schema_decoding import _DecodingState, first_pass_width

    assert first_pass_width([2, 30, 30, 30], pass_cost=32) == 30  # 4 x 2 + 3 x 28 + 32 slots: more than 4 x 30
    assert first_pass_width([2, 2, 2, 30], pass_cost=4) == 2  # one long cell: 4 x 2 + 28 + 4 slots, not 120
    assert first_pass_width([], pass_cost=4) == 0
    model, processor = random_model_and_processor
    inputs = cells(processor, 4)
    split, whole = _DecodingState(model, inputs), _DecodingState(model, inputs)
    token_lists = [[11, 12], [13], [], list(range(20, 60))]  # one long cell: written in two passes
    packed = _DecodingState(model, inputs)
    calls = packed.calls
    packed.write(token_lists, pad_id=0)
    assert packed.calls == calls + 1
    monkeypatch.setattr(schema_decoding, "PACK_TOKENS", False)
    split.write(token_lists, pad_id=0)
    assert split.calls == calls + 2
    whole._write_pass(token_lists, pad_id=0)
    assert torch.allclose(split.log_probs, whole.log_probs, atol=1e-9)
    assert torch.equal(split.next_position, whole.next_position)
    assert torch.allclose(packed.log_probs, whole.log_probs, atol=1e-9)
    for state in (split, whole, packed):
        state.write([[7, 8]] * 4, pad_id=0)  # every cell, reading what the write left in the cache
    assert torch.allclose(split.log_probs, whole.log_probs, atol=1e-9)
    assert torch.allclose(packed.log_probs, whole.log_probs, atol=1e-9)


def test_one_cell_type_label_is_written_whole_after_the_prompt(random_model_and_processor):
    """With one known cell type every token of its sentence but the last is shared by "all" options, so it runs with
    the prompt (the opening) and the last with the next text: the description is whole, and the same as when the
    whole sentence is written with the next text."""
    model, processor = random_model_and_processor
    saved = processor.ontology_term_ids
    processor.ontology_term_ids = {**saved, "cell_type": {"B cell": "CL:0000236"}}
    inputs = cells(processor, 3)
    try:
        decoder = SchemaDecoder(processor)
        assert decoder.shared_tokens["cell_type"]  # the sentence's tokens but its last: the opening
        described = decoder.describe(model, inputs)
        unopened = SchemaDecoder(processor)  # no opening: the whole sentence is the option's own tokens
        unopened.option_tokens["cell_type"] = [unopened.shared_tokens["cell_type"] + tokens
                                               for tokens in unopened.option_tokens["cell_type"]]
        unopened.shared_tokens["cell_type"] = []
        reference = unopened.describe(model, inputs)
    finally:
        processor.ontology_term_ids = saved
    results = schema_results(processor, described)
    assert all(r["cell_type"] == "B cell" and r["cell_type_ontology_term_id"] == "CL:0000236" and r["parsed"]
               for r in results)
    assert described.texts == reference.texts and described.labels == reference.labels
    for a, b in zip(described.log_likelihoods, reference.log_likelihoods):
        assert a.keys() == b.keys()
        for choice in a:
            assert all(abs(a[choice][k] - b[choice][k]) < 1e-9 for k in a[choice])


def test_a_model_trained_without_definitions_is_not_fed_them_and_its_descriptions_hold_them(
        random_model_and_processor):
    """With `definitions_in_model_text` False the decoder reads what a processor without definitions would have it
    read (the same choices and log-likelihoods, fewer tokens), and each description still states its cell type's
    definition, written in by the code."""
    model, processor = random_model_and_processor
    definitions = processor.cell_type_definitions
    inputs = cells(processor, 6)
    try:
        processor.cell_type_definitions = {}
        unfed = SchemaDecoder(processor)
        reference = unfed.describe(model, inputs)
        processor.cell_type_definitions = definitions
        processor.definitions_in_model_text = False
        decoder = SchemaDecoder(processor)
        described = decoder.describe(model, inputs)
        fed = SchemaDecoder(processor)
        processor.definitions_in_model_text = True
        fed.describe(model, inputs)
    finally:
        processor.cell_type_definitions = definitions
        processor.definitions_in_model_text = True
    assert described.labels == reference.labels
    for a, b in zip(described.log_likelihoods, reference.log_likelihoods):
        for choice in a:
            assert all(abs(a[choice][k] - b[choice][k]) < 1e-9 for k in a[choice])
    assert decoder.tokens == unfed.tokens < fed.tokens
    with_definition = [labels["cell_type"] in definitions for labels in described.labels]
    assert any(with_definition)
    for text, labels, stated in zip(described.texts, described.labels, with_definition):
        parsed = parse_description(text)
        assert parsed.cell_type == labels["cell_type"]
        assert parsed.cell_type_definition == (definitions[labels["cell_type"]] if stated else None)


def test_a_forward_from_another_thread_during_a_packed_pass_is_plain_sdpa(random_model_and_processor):
    """A packed pass sets the packed attention in the language model's config, which every thread shares. The
    reviewer's finding: a free generate in another thread meanwhile stopped with the packing error (a mask-less
    forward would have been wrong). Here the config is left as a pass in another thread leaves it: a left-padded
    forward in this thread gives SDPA's logits."""
    from modeling_cell2text import schema_decoding

    model, processor = random_model_and_processor
    inputs = cells(processor, 3, seed=7)
    assert (inputs["attention_mask"] == 0).any()  # left padding, so a missing mask would show
    with torch.no_grad():
        expected = model(**inputs).logits
    config = model.model.language_model.config
    SchemaDecoder(processor, max_tree_tokens=0).describe(model, inputs)  # registers what its packed passes run
    config._attn_implementation = schema_decoding.PACKED_ATTENTION
    try:
        with torch.no_grad():
            during = model(**inputs).logits
    finally:
        config._attn_implementation = "sdpa"
    torch.testing.assert_close(during, expected, rtol=0, atol=1e-10)


def test_two_threads_describe_with_one_model_as_one_thread_does(random_model_and_processor):
    """One model serving two threads (a web server's thread pool): constrained and free describing side by side give
    each call the results it gives alone (the reviewer's runs failed 4 of 8 constrained calls, 6 of 6 free ones)."""
    from concurrent.futures import ThreadPoolExecutor

    model, processor = random_model_and_processor
    decoder = SchemaDecoder(processor, num_beams=2, max_tree_tokens=0)
    inputs = [cells(processor, 4, seed=seed) for seed in (11, 12)]

    def constrained(batch):
        described = decoder.describe(model, batch)
        return described.texts, described.labels, [sorted(score.items()) for score in described.scores]

    def free(batch):
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=6, do_sample=False).tolist()

    jobs = [(constrained, inputs[0]), (free, inputs[1]), (constrained, inputs[1]), (free, inputs[0])] * 3
    alone = [job(batch) for job, batch in jobs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(lambda pair: pair[0](pair[1]), jobs))
    assert together == alone


def test_packed_passes_take_turns(random_model_and_processor, monkeypatch):
    """A packed pass holds the shared config's attention implementation for its whole forward (two at once
    restored each other's setting mid-pass): the language model runs under the decoder's lock."""
    from modeling_cell2text import schema_decoding

    model, processor = random_model_and_processor
    language_model = model.model.language_model
    forward, held = language_model.forward, []

    def watched(*args, **kwargs):
        if "cell2text_packing" in kwargs:  # a packed pass (the prefill runs as any forward does)
            held.append(schema_decoding._PACKED_PASS.locked())
        return forward(*args, **kwargs)

    monkeypatch.setattr(language_model, "forward", watched)
    SchemaDecoder(processor, max_tree_tokens=0).describe(model, cells(processor, 3))
    assert held and all(held)


def test_a_tissue_that_starts_another_tissues_label_stays_apart_from_it(random_model_and_processor):
    """The QA finding: the tissue option ended at " of", so "lamina propria" was the start of "lamina propria of
    mucosa of colon": the longer one could never be chosen (it only adds log-probabilities) and the search gave the
    shorter one half its probability. The donor's article now ends the tissue option."""
    model, processor = random_model_and_processor
    saved = processor.ontology_term_ids
    tissues = {"lamina propria": "UBERON:0000030", "lamina propria of mucosa of colon": "UBERON:0000314"}
    processor.ontology_term_ids = {**saved, "tissue": tissues}
    try:
        inputs = cells(processor, 4)
        chosen, scores = {}, {}
        for max_tree_tokens in (0, 10_000):  # search, whole tree (exhaustive)
            decoder = SchemaDecoder(processor, max_tree_tokens=max_tree_tokens)
            short, long = decoder.option_tokens["tissue"]
            assert long[:len(short)] != short
            described = decoder.describe(model, inputs)
            chosen[max_tree_tokens] = [cell["tissue"] for cell in described.labels]
            scores[max_tree_tokens] = [cell["tissue"] for cell in described.scores]
            for result in schema_results(processor, described):  # the text still reads as the template's
                assert parse_description(result["description"]).tissue == result["tissue"]
        assert chosen[0] == chosen[10_000]
        # the search's score is at most the exhaustive one (unexplored options keep their share), no longer exactly
        # half of it (the shorter option was counted twice)
        for searched, exhaustive in zip(scores[0], scores[10_000]):
            assert 0.5 + 1e-3 < searched <= exhaustive + 1e-9
    finally:
        processor.ontology_term_ids = saved


def test_options_written_with_the_same_tokens_or_one_starting_another_are_refused(random_model_and_processor):
    """The QA finding: a pathway listed twice after the processor was built was chosen twice for one cell; a label
    whose option is the start of another's (in any choice) left the other out of every description."""
    _, processor = random_model_and_processor
    saved = processor.pathway_names, processor.ontology_term_ids
    try:
        processor.pathway_names = [PATHWAYS[0], PATHWAYS[0], PATHWAYS[1]]
        with pytest.raises(ValueError, match=r"The pathway_1 options pathway_1='Glycolysis And Gluconeogenesis' and "
                                             r"pathway_1='Glycolysis And Gluconeogenesis' are written with the same "
                                             r"tokens, so .* could never choose the second: rename or remove one"):
            SchemaDecoder(processor)
        processor.pathway_names = PATHWAYS
        processor.ontology_term_ids = {**saved[1], "tissue": {"skin": "UBERON:0002097",
                                                              "skin of a finger": "UBERON:0000001"}}
        with pytest.raises(ValueError, match=r"The tissue options tissue='skin' and tissue='skin of a finger' are "
                                             r"written with the same tokens up to the end of the first"):
            SchemaDecoder(processor)
    finally:
        processor.pathway_names, processor.ontology_term_ids = saved


def test_a_donor_fields_search_score_is_a_lower_bound_of_exhaustive_scorings_at_temperature_one(
        random_model_and_processor):
    """Review finding: an unexplored partial option under which every option states the chosen sex counted its whole
    prefix probability for that sex, which bounds those options from above, so the search's score could lie far
    above exhaustive scoring's (0.719 against 0.547 for a sex at temperature 1); docs/describing.md promises a lower
    bound before temperature scaling."""
    model, processor = random_model_and_processor
    saved = processor.ontology_term_ids, processor.age_groups
    processor.ontology_term_ids = {**saved[0], "disease": {
        "normal": "PATO:0000461", "COVID-19": "MONDO:0100096", "lung cancer": "MONDO:0008903",
        "asthma": "MONDO:0004979", "influenza": "MONDO:0005812", "chronic obstructive pulmonary disease": "MONDO:0005002"}}
    processor.age_groups = ["adulthood", "elderly", "childhood", "infancy", "adolescence"]
    try:
        inputs = cells(processor, 16, seed=21)
        searched = SchemaDecoder(processor, num_beams=1, max_tree_tokens=0).describe(model, inputs)
        whole = SchemaDecoder(processor, max_tree_tokens=10**6).describe(model, inputs)
    finally:
        processor.ontology_term_ids, processor.age_groups = saved
    above = {(row, name): searched.scores[row][name] - whole.scores[row][name] for row in range(16)
             for name in ("sex", "disease", "age_group") if searched.labels[row][name] == whole.labels[row][name]}
    assert len(above) >= 40
    assert max(above.values()) < 1e-4, max(above.items(), key=lambda item: item[1])  # log-probabilities: float32


def test_the_search_never_completes_the_excluded_option_even_as_the_most_likely_leaf():
    """pathway_2 may not repeat pathway_1, also where the excluded option is one token, a leaf under the root that
    the search completes on its first look: the best other option is chosen, and the excluded one is not among the
    completed options (it would be chosen: it is the most likely)."""
    tree = OptionTree([[1], [2, 3], [4, 5]])  # option 0 (excluded) is the single token 1
    scripted = _ScriptedState(after={2: {3: -0.1}, 4: {5: -0.1}}, first={1: -0.01, 2: -1.0, 4: -2.0})
    result = scripted.state.choose(tree, 2, [0], pad_id=0)
    assert result.chosen == [1]
    assert 0 not in result.completed[0]
    assert result.completed[0][1] == pytest.approx(-1.1)


def test_the_pathways_score_is_the_product_of_its_two_labels_scores():
    """`pathways_score` is the probability of the pair: pathway_1's score times pathway_2's (each a probability of
    its own choice), documented as their product; the cell's fields are the chosen labels with their ids."""
    from types import SimpleNamespace

    processor = SimpleNamespace(cell_type_definitions={}, ontology_term_ids={"cell_type": {"B cell": "CL:0000236"}})
    text = 'This sample consists of a B cell. This cell is associated with the pathway "P1". Additionally, it ' \
           'involves the pathway "P2".'
    described = SchemaDescriptions(
        texts=[text], labels=[{"cell_type": "B cell", "pathway_1": "P1", "pathway_2": "P2"}],
        scores=[{"cell_type": 0.9, "pathway_1": 0.5, "pathway_2": 0.4}], not_exact=[[]])
    (result,) = schema_results(processor, described)
    assert result["pathways_score"] == pytest.approx(0.2)
    assert result["cell_type_score"] == 0.9 and result["pathways"] == ["P1", "P2"]
    assert result["cell_type_ontology_term_id"] == "CL:0000236" and result["parsed"] and result["exact_choice"]


def test_an_unexplored_option_whose_options_state_different_labels_counts_against_the_chosen_one():
    """The score leaves out an unexplored partial option only where every option under it states the chosen label.
    One whose options state different labels (here male, then female) stands for options of another label too, so
    its mass counts against the chosen label: male's score is softmax([-1.0, -0.5])[0], not 1."""
    import math

    from modeling_cell2text.description_schema import SchemaOption
    from modeling_cell2text.schema_decoding import ChoiceResult, _labels_under

    def donor(sex):
        return SchemaOption((("sex", sex), ("disease", None), ("age_group", None)), f" a {sex} donor.")

    options = [donor("male"), donor("female"), donor("male")]
    tree = OptionTree([[1, 2], [1, 3], [4]])  # options 0 (male) and 1 (female) share token 1
    decoder = object.__new__(SchemaDecoder)
    decoder.options = {"donor": options}
    decoder.labels_under = {"donor": _labels_under(tree, options, CHOICE_FIELDS["donor"])}
    mixed = tree.children[0][1]
    result = ChoiceResult(chosen=[2], completed=[{2: -1.0}], exact=[True], unexplored=[[(mixed, -0.5)]])
    labels = [{"sex": "male", "disease": None, "age_group": None}]
    scores, _ = decoder._scores({"donor": result}, labels, {})
    expected = math.exp(-1.0) / (math.exp(-1.0) + math.exp(-0.5))
    assert scores[0]["sex"] == pytest.approx(expected)


def test_each_options_log_likelihood_is_that_of_its_tokens_after_the_whole_text_before_it(random_model_and_processor):
    """Exhaustive scoring of the tissue and donor choices by plain forward passes of the prompt and the whole text
    (template words, definition and earlier labels): each option's log-likelihood in the decoder is the sum of its
    own tokens' log-probabilities there. The template words every option shares are written (fed), not left out."""
    model, processor = random_model_and_processor
    inputs = processor(sp.csr_matrix(random_counts(1, seed=4)), GENES)
    decoder = SchemaDecoder(processor, max_tree_tokens=10_000)
    described = decoder.describe(model, inputs)
    text, chosen_labels = described.texts[0], described.labels[0]
    tokenizer = processor.tokenizer
    checked = 0
    for choice in ("tissue", "donor"):
        options = decoder.options[choice]
        chosen = next(o for o in options if all(chosen_labels.get(f) == v for f, v in o.labels))
        before = text[: text.index(chosen.text)]
        for option, own in zip(options, decoder.option_tokens[choice]):
            tokens = tokenizer(before + option.text, add_special_tokens=False)["input_ids"]
            input_ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               gene_input_ids=inputs["gene_input_ids"],
                               gene_attention_mask=inputs["gene_attention_mask"],
                               gene_token_mask=inputs["gene_token_mask"]).logits[0]
            log_probs = logits.double().log_softmax(-1)
            end = input_ids.shape[1]
            expected = sum(float(log_probs[p - 1, input_ids[0, p]]) for p in range(end - len(own), end))
            # the decoder's log-softmax is float32
            assert described.log_likelihoods[0][choice][option.text] == pytest.approx(expected, abs=1e-4), option
            checked += 1
    assert checked == 2 + 8


def test_a_write_advances_each_cells_position_by_its_own_tokens(random_model_and_processor):
    """Cells of a batch write texts of different lengths (cell types of different lengths, a definition or none):
    each cell's next position id grows by its own tokens, not by the pass's width (padding is no position: a gap
    moves the rotary positions of everything the cell reads next), and only its real tokens become visible."""
    from modeling_cell2text.schema_decoding import _DecodingState
    from modeling_cell2text.text_padding import text_pad_token_id

    model, processor = random_model_and_processor
    inputs = processor(sp.csr_matrix(random_counts(3, seed=5)), GENES)
    state = _DecodingState(model, inputs)
    positions, visible = state.next_position.clone(), state.visible.clone()
    state.write([[5, 6, 7, 8], [9], [10, 11]], text_pad_token_id(processor.tokenizer))
    assert (state.next_position - positions).tolist() == [4, 1, 2]
    assert state.visible[:, visible.shape[1]:].sum(dim=1).tolist() == [4, 1, 2]
    assert torch.equal(state.next_position, state.visible.long().sum(dim=1))  # left-padded positions, as generate's


def test_the_decoder_benchmark_refuses_a_malformed_search_or_a_missing_model_before_loading_it(tmp_path, capsys,
                                                                                                 monkeypatch):
    """benchmarks/schema_decoder.py --searches 4 (or 0:16) failed with a traceback after the model loaded and every
    label was scored, and a missing model folder with a Hub error: now both are refused in one line, before anything
    loads."""
    import sys
    from tiny_parts import load_benchmark

    benchmark = load_benchmark("schema_decoder")
    for setting in ("4", "0:16", "4:-1", "4:x"):
        monkeypatch.setattr(sys, "argv", ["schema_decoder.py", "--model", str(tmp_path / "no-model"), "--searches",
                                          "2:16", setting])
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and "--searches" in err[-1] and repr(setting) in err[-1], err
    assert benchmark.search_setting("4:128") == (4, 128)
    monkeypatch.setattr(sys, "argv", ["schema_decoder.py", "--model", str(tmp_path / "no-model")])
    with pytest.raises(SystemExit) as exit_info:  # was a Hub error: "Repo id must be in the form 'repo_name'"
        benchmark.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "no-model not found: run the main job" in err[-1], err


def test_the_longest_description_bounds_every_description_the_labels_render(random_model_and_processor):
    """`longest_description_tokens` (the positions the pipeline checks a constrained call against) is at least, give or
    take a token, the longest description any of the processor's labels render with their definition (it adds each
    choice's longest option and the longest definition, so it may exceed it): shorter, a model of too few positions
    would write past them, exit 0. Checked with every label, and with a defined cell type alone."""
    import itertools

    _, processor = random_model_and_processor

    def longest_rendered(processor) -> int:
        tables, definitions = processor.ontology_term_ids, processor.cell_type_definitions
        longest = 0
        for cell_type, tissue, disease, sex, age_group, pathways in itertools.product(
                tables["cell_type"], tables["tissue"], tables["disease"], tables["sex"], processor.age_groups,
                itertools.permutations(processor.pathway_names, 2)):
            description = CellDescription(cell_type=cell_type, cell_type_definition=definitions.get(cell_type),
                                          tissue=tissue, disease=disease, sex=sex, age_group=age_group,
                                          pathways=pathways)
            text = processor.model_text(render_description(description))
            longest = max(longest, len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]))
        return longest

    assert SchemaDecoder(processor, 2).longest_description_tokens >= longest_rendered(processor) - 1
    defined = copy.deepcopy(processor)
    defined.keep_labels(cell_type=["B cell"])
    assert SchemaDecoder(defined, 2).longest_description_tokens >= longest_rendered(defined) - 1
