"""Cell2Text processor: prompts, placeholders, labels, padding, and agreement with the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from tiny_parts import edit_json, make_tiny_tokenizer, tiny_bert_config, tiny_llama_config

from modeling_cell2text import (
    Cell2TextConfig,
    Cell2TextFeatureExtractor,
    Cell2TextForConditionalGeneration,
    Cell2TextProcessor,
    CellDescription,
    render_description,
)

GENES = [f"ENSG{i:011d}" for i in range(1, 41)]


@pytest.fixture()
def processor():
    feature_extractor = Cell2TextFeatureExtractor.from_gene_medians({g: 1.0 + (i % 3) for i, g in enumerate(GENES)})
    return Cell2TextProcessor(feature_extractor, make_tiny_tokenizer(), num_cell_tokens=8)


def counts_with_genes(numbers_of_genes, seed=0):
    rng = np.random.default_rng(seed)
    counts = np.zeros((len(numbers_of_genes), len(GENES)), dtype=np.float32)
    for row, n in enumerate(numbers_of_genes):
        counts[row, rng.choice(len(GENES), n, replace=False)] = rng.integers(1, 30, n)
    return sp.csr_matrix(counts)


def model_for(processor, num_cell_tokens=8, initializer_range=0.02):
    torch.manual_seed(0)
    config = Cell2TextConfig(
        gene_encoder_config=tiny_bert_config(len(GENES) + 4),
        text_config=tiny_llama_config(len(processor.tokenizer), initializer_range=initializer_range),
        cell_token_id=processor.cell_token_id,
        num_cell_tokens=num_cell_tokens,
        projector_hidden_size=16,
    )
    return Cell2TextForConditionalGeneration(config).eval()


def test_one_placeholder_per_cell_token_capped_at_top_k(processor):
    batch = processor(counts_with_genes([3, 8, 20]), GENES)
    placeholders = (batch["input_ids"] == processor.cell_token_id).sum(dim=1)
    assert placeholders.tolist() == [3, 8, 8]
    assert batch["gene_token_mask"].sum(dim=1).tolist() == [3, 8, 20]
    # generation prompts are left padded and end with the assistant turn
    assert (batch["attention_mask"][:, -1] == 1).all()
    text = processor.tokenizer.decode(batch["input_ids"][2])
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_labels_cover_only_the_description_and_eos(processor):
    description = render_description(CellDescription(cell_type="B cell", tissue="blood", disease="normal"))
    batch = processor(counts_with_genes([5, 12]), GENES, descriptions=[description, description])
    labels, ids = batch["labels"], batch["input_ids"]
    for row in range(2):
        kept = labels[row][labels[row] != -100]
        assert processor.tokenizer.decode(kept[:-1]) == description
        assert kept[-1].item() == processor.tokenizer.eos_token_id
        assert not (labels[row] == processor.cell_token_id).any()
    # training batches are right padded; padding carries no loss
    assert batch["attention_mask"][:, 0].tolist() == [1, 1]
    assert (labels[batch["attention_mask"] == 0] == -100).all()
    assert torch.equal(ids[labels != -100], labels[labels != -100])


def test_pretokenized_cells_give_the_same_inputs(processor):
    counts = counts_with_genes([4, 9])
    tokens = processor.feature_extractor.tokenize(counts, GENES)
    from_counts = processor(counts, GENES)
    from_tokens = processor(gene_input_ids=[list(t) for t in tokens])
    for key in from_counts:
        assert torch.equal(from_counts[key], from_tokens[key]), key


def test_processor_inputs_run_through_the_model_and_generate(processor):
    model = model_for(processor, initializer_range=0.5)
    batch = processor(counts_with_genes([3, 8, 20]), GENES)
    cached = model.generate(**batch, max_new_tokens=10, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    texts = processor.post_process_generation(cached, batch["input_ids"].shape[1])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_processor_and_model_disagreeing_on_cell_tokens_is_an_error(processor):
    model = model_for(processor, num_cell_tokens=4)
    with pytest.raises(ValueError, match="num_cell_tokens=4"):
        model(**processor(counts_with_genes([3, 8]), GENES))


def test_parse_descriptions_gives_fields_and_ontology_ids(processor):
    processor.ontology_term_ids = {"cell_type": {"B cell": "CL:0000236"}, "tissue": {"blood": "UBERON:0000178"}}
    text = render_description(CellDescription(cell_type="B cell", tissue="blood", disease="normal"))
    good, bad = processor.parse_descriptions([text, "not a description"])
    assert good["parsed"] and good["cell_type"] == "B cell" and good["cell_type_ontology_term_id"] == "CL:0000236"
    assert good["tissue_ontology_term_id"] == "UBERON:0000178" and good["disease_ontology_term_id"] is None
    assert not bad["parsed"] and bad["cell_type"] is None



def test_a_description_cut_at_max_new_tokens_is_told_from_an_ended_one_and_not_parsed(processor):
    """README's plain-transformers path parsed a description cut at max_new_tokens at a sentence's end as whole:
    parsed True, its later fields silently None."""
    text = render_description(CellDescription(cell_type="B cell", tissue="blood", disease="normal"))
    first = text[:text.index(".") + 1]  # "This sample consists of a B cell."
    eos, prompt = processor.tokenizer.eos_token_id, [7, 7]
    tokens = processor.tokenizer(first, add_special_tokens=False)["input_ids"]
    cut, ended = torch.tensor([[*prompt, *tokens]]), torch.tensor([[*prompt, *tokens, eos, eos]])
    assert processor.descriptions_ended(cut, 2) == [False] and processor.descriptions_ended(ended, 2) == [True]
    other_stop = torch.tensor([[*prompt, *tokens, 5, eos]])  # stopped at another stop id, padded with the eos
    assert processor.descriptions_ended(other_stop, 2, eos_token_id=[5, eos]) == [False]
    # a numpy array, as post_process_generation takes (an AttributeError: no new_tensor)
    assert processor.descriptions_ended(ended.numpy(), 2) == [True]
    assert processor.descriptions_ended(cut.numpy(), 2) == [False]
    texts = processor.post_process_generation(cut, 2)
    assert processor.parse_descriptions(texts)[0]["parsed"]  # taken as whole it parses, tissue and disease missing
    assert not processor.parse_descriptions(texts, processor.descriptions_ended(cut, 2))[0]["parsed"]

def test_keep_labels_of_a_corpus_without_ontology_ids_names_no_id(processor):
    """A corpus may state labels without a known ontology id (None): such a label is kept by its name, and None is
    no id to keep it by or to offer as the closest ("'none' (did you mean None?) ... labels or their ontology ids")."""
    processor.ontology_term_ids = {"cell_type": {"B cell": None, "T cell": None, "monocyte": "CL:0000576"}}
    processor.keep_labels(cell_type=["B cell", "CL:0000576"])
    assert processor.ontology_term_ids["cell_type"] == {"B cell": None, "monocyte": "CL:0000576"}
    processor.ontology_term_ids = {"cell_type": {"B cell": None, "T cell": None}}
    with pytest.raises(ValueError, match=r"keep_labels: 'none' is not among this processor's 2 cell_type labels \(not"):
        processor.keep_labels(cell_type=["none"])


def test_processor_needs_a_chat_template():
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = None
    feature_extractor = Cell2TextFeatureExtractor.from_gene_medians({g: 1.0 for g in GENES})
    with pytest.raises(ValueError, match="chat template"):
        Cell2TextProcessor(feature_extractor, tokenizer)


def test_processor_round_trips_through_save_pretrained(processor, tmp_path):
    processor.ontology_term_ids = {"cell_type": {"B cell": "CL:0000236"}}
    processor.save_pretrained(tmp_path)
    reloaded = Cell2TextProcessor.from_pretrained(tmp_path)
    assert reloaded.num_cell_tokens == 8 and reloaded.cell_token_id == processor.cell_token_id
    assert reloaded.ontology_term_ids == processor.ontology_term_ids
    assert reloaded.feature_extractor.gene_token_ids == processor.feature_extractor.gene_token_ids
    counts = counts_with_genes([6, 15])
    for key, value in processor(counts, GENES).items():
        assert torch.equal(value, reloaded(counts, GENES)[key]), key


def test_a_processor_without_definitions_in_the_model_text_trains_without_them_and_writes_them_back(
        processor, tmp_path):
    """`definitions_in_model_text=False`: the training targets leave the definition sentence out, free generation's
    text gets it back from `cell_type_definitions`, and the setting survives save_pretrained."""
    description = render_description(CellDescription(
        cell_type="B cell", cell_type_definition="A lymphocyte of B lineage", tissue="blood", disease="normal"))
    short = render_description(CellDescription(cell_type="B cell", tissue="blood", disease="normal"))
    processor.cell_type_definitions = {"B cell": "A lymphocyte of B lineage"}
    processor.definitions_in_model_text = False
    batch = processor(counts_with_genes([5]), GENES, descriptions=[description])
    kept = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.decode(kept[:-1]) == short
    assert processor.reader_text(short) == description and processor.reader_text("not a description") == \
        "not a description"
    generated = processor.tokenizer(" " + short, return_tensors="pt")["input_ids"]
    assert processor.post_process_generation(torch.cat([torch.zeros_like(generated), generated], 1),
                                             generated.shape[1]) == [description]
    processor.save_pretrained(tmp_path)
    assert Cell2TextProcessor.from_pretrained(tmp_path).definitions_in_model_text is False
    with pytest.raises(ValueError, match="follow the Cell2Text template"):
        processor(counts_with_genes([5]), GENES, descriptions=["Some free text."])
    processor.definitions_in_model_text = True  # the default: the model reads and writes the definition
    labels = processor(counts_with_genes([5]), GENES, descriptions=[description])["labels"][0]
    assert processor.tokenizer.decode(labels[labels != -100][:-1]) == description


def test_a_generated_description_ends_at_its_first_end_of_text(processor):
    """A bad-input hunt's finding: free describing with `eos_token_id=None` (or another stop id) wrote on past the
    model's end of text, and the run-on text after it parsed into the last field, exit 0 (tissue "blood of a healthy
    donor. It or. It or. consists from the blood"). The description is what comes before the first end of text."""
    description = render_description(CellDescription(cell_type="B cell", tissue="blood", disease="normal"))
    tokenizer = processor.tokenizer
    written = tokenizer(" " + description, add_special_tokens=False)["input_ids"]
    run_on = tokenizer(" It or. consists from the blood of a healthy donor.", add_special_tokens=False)["input_ids"]
    prompt = [7, 8, 9]
    rows = torch.tensor([prompt + written + [tokenizer.eos_token_id] + run_on,
                         prompt + written + [tokenizer.eos_token_id] * (len(run_on) + 1)])
    texts = processor.post_process_generation(rows, len(prompt))
    assert texts == [description, description]
    assert processor.parse_descriptions(texts)[0]["tissue"] == "blood"


def test_a_definitions_setting_that_is_not_a_bool_is_refused_not_read_as_true(processor, tmp_path):
    """A processor_config.json saying "definitions_in_model_text": "false" (a string, truthy) would feed the model
    text it was never trained on: refused on load."""
    import json

    processor.definitions_in_model_text = False
    processor.save_pretrained(tmp_path)
    config_file = next(f for f in tmp_path.glob("*.json") if "definitions_in_model_text" in f.read_text())
    config = json.loads(config_file.read_text())
    config["definitions_in_model_text"] = "false"
    config_file.write_text(json.dumps(config))
    with pytest.raises(TypeError, match="definitions_in_model_text must be True or False"):
        Cell2TextProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("num_cell_tokens", "8", r"num_cell_tokens must be an integer >= 1, got '8'"),  # a TypeError on a comparison
    ("num_cell_tokens", 8.0, r"num_cell_tokens must be an integer >= 1, got 8\.0"),
    ("system_prompt", 5, "system_prompt must be a string, got 5"),  # the tokenizer's error about batches of text
    ("user_prompt", None, "user_prompt must be a string, got None"),
])
def test_processor_settings_of_the_wrong_type_in_a_saved_config_are_named(processor, tmp_path, setting, value,
                                                                           message):
    processor.save_pretrained(tmp_path)
    config_file = tmp_path / "processor_config.json"
    saved = json.loads(config_file.read_text())
    saved[setting] = value
    config_file.write_text(json.dumps(saved))
    with pytest.raises((TypeError, ValueError), match=message):
        Cell2TextProcessor.from_pretrained(tmp_path)


def test_unknown_processor_settings_are_refused_not_dropped(processor):
    # A misspelt setting was silently dropped: the processor then used 256 cell tokens instead of 8.
    with pytest.raises(TypeError, match=r"no setting 'num_cel_tokens' \(did you mean 'num_cell_tokens'\?\)"):
        Cell2TextProcessor(processor.feature_extractor, processor.tokenizer, num_cel_tokens=8)


@pytest.mark.parametrize(("edit", "message"), [
    # transformers dropped the processor's unknown keys: definitions went on being written, exit 0
    (lambda saved: saved.update(definition_in_model_text=False),
     r"Cell2TextProcessor has no setting 'definition_in_model_text' \(did you mean 'definitions_in_model_text'"),
    # and kept the feature extractor's as attributes: cells went on being cut to the default 4096 genes
    (lambda saved: saved["feature_extractor"].update(model_input_sise=3),
     r"Cell2TextFeatureExtractor has no setting 'model_input_sise' \(did you mean 'model_input_size'"),
])
def test_misspelt_settings_in_a_saved_processor_config_are_refused(processor, tmp_path, edit, message):
    processor.save_pretrained(tmp_path)
    edit_json(tmp_path / "processor_config.json", edit)
    with pytest.raises(TypeError, match=message):
        Cell2TextProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_tokenizer_file_that_does_not_parse_is_named(processor, tmp_path, name):
    """json's words only ("Expecting property name enclosed in double quotes: line 1 column 2"), naming no file:
    a command showed them as a traceback (transformers names a config file that does not parse; not these)."""
    processor.save_pretrained(tmp_path)
    (tmp_path / name).write_text("{not json")
    with pytest.raises(ValueError, match=rf"^{tmp_path}: {name} does not parse as JSON \(Expecting .*save the model "
                                         "again$"):
        Cell2TextProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("content", ["[1]", "5"])
@pytest.mark.parametrize("name", ["processor_config.json", "tokenizer_config.json", "tokenizer.json"])
def test_a_json_file_that_holds_no_object_is_named(processor, tmp_path, name, content):
    """A JSON list (or number) ended loading in an AttributeError ('list' object has no attribute 'get') or TypeError
    traceback inside transformers."""
    processor.save_pretrained(tmp_path)
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=rf"^{tmp_path}: {name} holds no JSON object \(.*save the model again$"):
        Cell2TextProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize(("tables", "error", "message"), [
    (dict(pathway_names="TCA Cycle"), TypeError, "pathway_names must be a list of names"),  # was split into letters
    (dict(pathway_names=["TCA", "TCA"]), ValueError, r"lists \['TCA'\] more than once"),  # was chosen twice
    (dict(pathway_names=['A "quoted" name']), ValueError, "contains a double quote"),
    (dict(ontology_term_ids={"cell_type": {" B cell": "CL:0000236"}}), ValueError, "leading or trailing whitespace"),
    (dict(ontology_term_ids={"cell_type": {"unknown": "CL:0000236"}}), ValueError, "is not a usable label"),
    (dict(ontology_term_ids={"sex": {"M": "PATO:0000384"}}), ValueError, "expected one of"),
    (dict(ontology_term_ids={"cell_type": {"B cell": None}}), ValueError, "None is not a cell_type term id"),
    # an id of another ontology (an edited or mis-mapped table): stated as the field's id, exit 0
    (dict(ontology_term_ids={"cell_type": {"B cell": "UBERON:0000178"}}), ValueError,
     r"\['B cell'\] = 'UBERON:0000178' is not a cell_type term id \(CL:\.\.\. "),
    (dict(ontology_term_ids={"disease": {"COVID-19": "CL:0000236"}}), ValueError,
     r"'CL:0000236' is not a disease term id \(MONDO: / PATO:0000461\.\.\. "),
    # an id not in its ontology's form (an edited table): stated as the cell's id, exit 0
    (dict(ontology_term_ids={"cell_type": {"B cell": "CL:banana"}}), ValueError,
     r"'CL:banana' is not a cell_type term id \(CL:\.\.\. and the ontology's digits"),
    # several ids joined as CELLxGENE joins diseases, in a field that names one term
    (dict(ontology_term_ids={"cell_type": {"B cell": "CL:0000236 || CL:0000084"}}), ValueError,
     "is not a cell_type term id"),
    (dict(ontology_term_ids={"tissue": {"lung": "UBERON:lung"}}), ValueError, "'UBERON:lung' is not a tissue term id"),
    (dict(ontology_term_ids={"disease": {"COVID-19": "MONDO:0100096 || MONDO:01"}}), ValueError,
     "is not a disease term id"),
    (dict(ontology_term_ids={"cell_type": {"B cell": "CL:0000236", "B-cell": "CL:0000236"}}), ValueError,
     r"gives the ids \['CL:0000236'\] to several labels"),
    (dict(ontology_term_ids={"cell_type": ["B cell"]}), ValueError, "must be a mapping label -> term id"),
    (dict(age_groups=["adult"]), ValueError, "expected one of"),
])
def test_label_tables_the_schema_cannot_write_are_refused_when_built(processor, tables, error, message):
    """The QA findings: such labels built a decoder and stopped a run only when first chosen (after hours), with a
    message naming no file; a pathway string was split into characters and a duplicated name chosen twice."""
    with pytest.raises(error, match=message) as caught:
        Cell2TextProcessor(processor.feature_extractor, processor.tokenizer, num_cell_tokens=8, **tables)
    assert "processor_config.json" in str(caught.value)


def test_labels_stated_without_an_id_are_candidates_that_round_trip(processor, tmp_path):
    """A corpus states a tissue or disease given without a known id as given; its label table now holds it with
    the id None (it was left out, so a trained model could never choose it), and the processor keeps it."""
    tables = {"cell_type": {"B cell": "CL:0000236"}, "disease": {"COVID-19": None, "normal": "PATO:0000461"},
              "tissue": {"blood": None, "lung": None}}
    built = Cell2TextProcessor(processor.feature_extractor, processor.tokenizer, num_cell_tokens=8,
                               ontology_term_ids=tables)
    built.save_pretrained(tmp_path)
    assert Cell2TextProcessor.from_pretrained(tmp_path).ontology_term_ids == tables


def test_learn_new_labels_gives_a_label_stated_without_an_id_the_id_another_corpus_gives():
    from types import SimpleNamespace

    from training.sft import learn_new_labels

    processor = SimpleNamespace(ontology_term_ids={"disease": {"COVID-19": None, "normal": "PATO:0000461"}},
                                pathway_names=[], age_groups=[], cell_type_definitions={})
    vocabulary = {"ontology_term_ids": {"disease": {"COVID-19": "MONDO:0100096", "control": None}},
                  "pathway_names": [], "age_groups": [], "cell_type_definitions": {}}
    learn_new_labels(processor, vocabulary)
    assert processor.ontology_term_ids["disease"] == {"COVID-19": "MONDO:0100096", "control": None,
                                                      "normal": "PATO:0000461"}
    vocabulary["ontology_term_ids"]["disease"] = {"COVID-19": None}  # an id is never lost to a corpus without it
    learn_new_labels(processor, vocabulary)
    assert processor.ontology_term_ids["disease"]["COVID-19"] == "MONDO:0100096"
    vocabulary["ontology_term_ids"]["disease"] = {"COVID-19": "MONDO:0005015"}  # another id: refused
    with pytest.raises(ValueError, match="have other ids or labels"):
        learn_new_labels(processor, vocabulary)


def test_zero_cells_are_a_clear_error(processor):
    with pytest.raises(ValueError, match="Got 0 cells"):
        processor(sp.csr_matrix((0, len(GENES)), dtype=np.float32), GENES)
    with pytest.raises(ValueError, match="Got 0 cells"):
        processor(gene_input_ids=[])
    empty = sp.csr_matrix((2, len(GENES)), dtype=np.float32)
    with pytest.raises(ValueError, match="All 2 cells were skipped"):
        processor(empty, GENES, skip_empty_cells=True)



def test_descriptions_of_the_input_cells_follow_the_cells_kept_by_skip_empty_cells(processor):
    """One description per input cell with skip_empty_cells=True was refused as "Got 3 descriptions for 2 cells";
    the skipped cell's description is left out, each kept cell keeps its own."""
    counts = counts_with_genes([5, 0, 7]).toarray()
    texts = [render_description(CellDescription(cell_type=label, tissue="blood", disease="normal"))
             for label in ("B cell", "T cell", "monocyte")]
    batch = processor(sp.csr_matrix(counts), GENES, skip_empty_cells=True, descriptions=texts)
    expected = processor(sp.csr_matrix(counts[[0, 2]]), GENES, descriptions=[texts[0], texts[2]])
    assert batch["skipped_cell_indices"].tolist() == [1]
    assert torch.equal(batch["labels"], expected["labels"]) and torch.equal(batch["input_ids"], expected["input_ids"])
    kept_only = processor(sp.csr_matrix(counts), GENES, skip_empty_cells=True, descriptions=[texts[0], texts[2]])
    assert torch.equal(kept_only["labels"], expected["labels"])
    with pytest.raises(ValueError, match=r"Got 1 descriptions for 2 cells \(1 of the input cells skipped"):
        processor(sp.csr_matrix(counts), GENES, skip_empty_cells=True, descriptions=texts[:1])
    with pytest.raises(ValueError, match=r"Got 4 descriptions for 2 cells \(1 of the input cells skipped"):
        processor(sp.csr_matrix(counts), GENES, skip_empty_cells=True, descriptions=[*texts, texts[0]])

def test_a_huge_token_id_in_a_processor_config_is_refused_before_any_allocation(processor, tmp_path):
    import json

    processor.save_pretrained(tmp_path)
    config_file = tmp_path / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["feature_extractor"]["gene_token_ids"][GENES[0]] = 2**31
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 4194304\).*2147483648"):
        Cell2TextProcessor.from_pretrained(tmp_path)
