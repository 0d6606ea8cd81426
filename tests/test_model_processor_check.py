"""A model meets only the processor it was built with: every place they come together refuses another one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipeline import GENES, make_adata, tiny_processor
from tiny_parts import encoder_for_vocabulary, save_tiny_parts
from transformers import pipeline

from modeling_cell2text import (Cell2TextConfig, Cell2TextForConditionalGeneration, Cell2TextPipeline,
                                Cell2TextProcessor, save_model_folder, tl)
from modeling_cell2text.compatibility import (ModelProcessorMismatchError, check_model_and_processor,
                                            gene_vocabulary_sha256, holds_kept_subset)
from modeling_cell2text.cli import main as cli_main


@pytest.fixture(scope="module")
def composed_dir(tmp_path_factory) -> Path:
    """A tiny model composed as the recipe does (its encoder prepared for the processor's vocabulary, composed with
    the feature extractor), saved with its processor."""
    root = tmp_path_factory.mktemp("composed")
    encoder_dir, lm_dir = save_tiny_parts(root / "parts")
    processor = tiny_processor(lm_dir)
    prepared = encoder_for_vocabulary(encoder_dir, processor.feature_extractor, root / "prepared")
    torch.manual_seed(0)
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        prepared, lm_dir, cell_token_id=processor.cell_token_id, feature_extractor=processor.feature_extractor,
        num_cell_tokens=8, projector_hidden_size=16,
    )
    folder = root / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def edited_copy(folder: Path, target: Path, edit_processor=None, edit_config=None) -> Path:
    shutil.copytree(folder, target)
    for name, edit in (("processor_config.json", edit_processor), ("config.json", edit_config)):
        if edit is not None:
            path = target / name
            content = json.loads(path.read_text())
            edit(content)
            path.write_text(json.dumps(content))
    return target


def assert_a_folder_saved_before_the_part_loads(folder: Path, target: Path, part: str) -> None:
    """A copy of `folder` whose config records no checksum `part` (as saved before it was recorded) loads: its other
    parts are checked."""
    older = edited_copy(folder, target, edit_config=lambda config: config["processor_sha256"].pop(part))
    assert Cell2TextProcessor.from_pretrained(older)


def composed_model(tmp_path: Path) -> tuple[Cell2TextForConditionalGeneration, Cell2TextProcessor]:
    """A tiny model composed from its parts in memory, with its processor (not saved)."""
    encoder_dir, lm_dir = save_tiny_parts(tmp_path / "parts")
    processor = tiny_processor(lm_dir)
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16)
    return model, processor


def gene_token_ids(processor_config: dict) -> dict:
    return processor_config["feature_extractor"]["gene_token_ids"]


def swap_two_genes(processor_config: dict) -> None:
    ids = gene_token_ids(processor_config)
    ids[GENES[0]], ids[GENES[1]] = ids[GENES[1]], ids[GENES[0]]


def test_the_composed_model_records_its_processors_vocabulary(composed_dir):
    config = json.loads((composed_dir / "config.json").read_text())
    processor = Cell2TextProcessor.from_pretrained(composed_dir)
    assert config["gene_vocabulary_sha256"] == gene_vocabulary_sha256(processor.feature_extractor.gene_token_ids)


@pytest.mark.parametrize("record", ["model", "encoder"])
def test_a_permuted_gene_vocabulary_is_refused_naming_both_checksums(composed_dir, tmp_path, record):
    """The QA finding: same genes under swapped token ids ran with exit 0 and other embeddings. Refused whether the
    model's own config records the checksum or only its prepared encoder does (a model saved before the record)."""
    drop_own = (lambda config: config.pop("gene_vocabulary_sha256")) if record == "encoder" else None
    folder = edited_copy(composed_dir, tmp_path / "permuted", swap_two_genes, drop_own)
    original = Cell2TextProcessor.from_pretrained(composed_dir)
    expected = gene_vocabulary_sha256(original.feature_extractor.gene_token_ids)
    ids = json.loads((folder / "processor_config.json").read_text())["feature_extractor"]["gene_token_ids"]
    permuted = gene_vocabulary_sha256(ids)
    # The processor loaded from the model's folder, the pipeline, tl and the CLI all refuse it.
    with pytest.raises(ModelProcessorMismatchError, match=f"model {expected}, processor {permuted}"):
        Cell2TextProcessor.from_pretrained(folder)
    model = Cell2TextForConditionalGeneration.from_pretrained(composed_dir)
    foreign = Cell2TextProcessor.from_pretrained(composed_dir)
    foreign.feature_extractor.gene_token_ids = ids
    with pytest.raises(ModelProcessorMismatchError, match=permuted):
        pipeline("cell-to-text", model=model, processor=foreign)
    with pytest.raises(ModelProcessorMismatchError, match=permuted):
        tl.embed(make_adata(3), model, processor=foreign, progress=False)


def test_the_cli_refuses_a_permuted_vocabulary_in_one_line(composed_dir, tmp_path, capsys):
    folder = edited_copy(composed_dir, tmp_path / "permuted", swap_two_genes)
    h5ad = tmp_path / "cells.h5ad"
    make_adata(3).write_h5ad(h5ad)
    for command in ("describe", "embed"):
        code = cli_main([command, str(h5ad), "--model", str(folder), "--out", str(tmp_path / f"{command}.h5ad"),
                         "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 1 and "gene vocabulary checksum" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"{command}.h5ad").exists()


def test_token_ids_past_the_encoders_vocabulary_are_refused_not_an_index_error(composed_dir, tmp_path):
    def add_gene_past_the_end(processor_config: dict) -> None:
        extractor = processor_config["feature_extractor"]
        extractor["gene_token_ids"]["ENSG00000999999"] = 500
        extractor["gene_medians"]["ENSG00000999999"] = 1.0

    folder = edited_copy(composed_dir, tmp_path / "bigger", add_gene_past_the_end)
    model = Cell2TextForConditionalGeneration.from_pretrained(folder)
    with pytest.raises(ModelProcessorMismatchError, match="processor's run to 500, the gene encoder embeds 64"):
        tl.load(model, _processor_without_check(folder))


def _processor_without_check(folder: Path) -> Cell2TextProcessor:
    """The processor of `folder` loaded on its own (no model config beside it)."""
    alone = folder.parent / f"{folder.name}-processor-only"
    alone.mkdir()
    for path in folder.iterdir():
        if path.name != "config.json" and path.is_file():
            shutil.copy(path, alone / path.name)
    return Cell2TextProcessor.from_pretrained(alone)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("cell_token_id", 3, "cell placeholder token id: processor"),
    ("num_cell_tokens", 4, "cell tokens per cell: processor 8, model 4"),
])
def test_placeholder_settings_must_agree(composed_dir, tmp_path, field, value, message):
    folder = edited_copy(composed_dir, tmp_path / field, edit_config=lambda config: config.update({field: value}))
    with pytest.raises(ModelProcessorMismatchError, match=message):
        Cell2TextProcessor.from_pretrained(folder)


def test_provenance_records_the_processors_vocabulary(composed_dir):
    adata = make_adata(2)
    tl.embed(adata, composed_dir, device="cpu", progress=False)
    processor = Cell2TextProcessor.from_pretrained(composed_dir)
    assert adata.uns["X_cell2text"]["gene_vocabulary_sha256"] == gene_vocabulary_sha256(
        processor.feature_extractor.gene_token_ids)
    assert np.isfinite(adata.obsm["X_cell2text"]).all()


def test_more_tokens_per_cell_than_the_encoder_has_positions_keep_the_top_ranked_genes(composed_dir, tmp_path):
    """A processor reading 4096 tokens per cell with an encoder of 8 positions failed inside BERT, mid-run, at the
    first cell with more genes than positions (processors the recipe saved before it fitted them did so). Refusing
    the folder refused models that worked for every cell that fits (a reviewer's finding): cells keep their
    top-ranked genes instead, as Geneformer truncates to model_input_size."""
    model = Cell2TextForConditionalGeneration.from_pretrained(composed_dir)
    embeddings = model.model.gene_encoder.embeddings
    embeddings.position_embeddings = torch.nn.Embedding.from_pretrained(embeddings.position_embeddings.weight[:8])
    model.config.gene_encoder_config.max_position_embeddings = 8  # an encoder of 8 positions
    model, processor = tl.load(model, Cell2TextProcessor.from_pretrained(composed_dir))
    assert processor.feature_extractor.model_input_size == 8
    adata = make_adata(3)
    tl.embed(adata, model, processor=processor, progress=False)  # cells of up to 60 genes: was an error in BERT
    assert np.isfinite(adata.obsm["X_cell2text"]).all()
    full = processor(adata.X, GENES)
    assert full["gene_input_ids"].shape[1] == 8


def test_saving_a_model_without_a_recorded_vocabulary_records_its_processors(tmp_path):
    """The QA finding: a model composed without its feature extractor (Cell2TextConfig(...) or from_pretrained_parts
    without feature_extractor=) saved no checksum, so a processor with permuted gene ids was accepted later."""
    encoder_dir, lm_dir = save_tiny_parts(tmp_path / "parts")
    processor = tiny_processor(lm_dir)
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16)
    assert model.config.gene_vocabulary_sha256 is None
    save_model_folder(model, processor, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["gene_vocabulary_sha256"] == gene_vocabulary_sha256(processor.feature_extractor.gene_token_ids)
    folder = edited_copy(tmp_path / "model", tmp_path / "permuted", swap_two_genes)
    with pytest.raises(ModelProcessorMismatchError, match="gene vocabulary checksum"):
        Cell2TextProcessor.from_pretrained(folder)


@pytest.mark.parametrize("leftover", ["adapter_config.json", "adapter_model.safetensors", "pytorch_model.bin"])
def test_saving_into_a_folder_holding_adapter_or_pickle_files_is_refused(composed_dir, tmp_path, leftover):
    """The QA finding: saving over a folder left an old LoRA adapter beside the new weights, applied on loading."""
    model = Cell2TextForConditionalGeneration.from_pretrained(composed_dir)
    processor = Cell2TextProcessor.from_pretrained(composed_dir)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / leftover).write_text("{}")
    with pytest.raises(FileExistsError, match=f"holds \\['{leftover}'\\]"):
        save_model_folder(model, processor, tmp_path / "model")
    assert not (tmp_path / "model" / "config.json").exists()


@pytest.mark.parametrize(("leftover", "content"), [
    ("special_tokens_map.json", {"eos_token": "<|endoftext|>"}),  # an eos token of the earlier tokenizer
    ("added_tokens.json", {"<extra>": 401}),
    ("chat_template.json", {"chat_template": "{{ 'another template' }}"}),
])
def test_saving_over_a_folder_whose_earlier_tokenizer_files_change_the_processor_is_refused(composed_dir, tmp_path,
                                                                                             leftover, content):
    """Files of an earlier save (by transformers 4) that a save now never writes are still read when loading: the
    save ended with exit 0, and every load of the folder was then refused as "another processor"."""
    model = Cell2TextForConditionalGeneration.from_pretrained(composed_dir)
    processor = Cell2TextProcessor.from_pretrained(composed_dir)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / leftover).write_text(json.dumps(content))
    with pytest.raises(OSError, match=f"does not read back as the one saved: the folder holds \\['{leftover}'\\]"):
        save_model_folder(model, processor, tmp_path / "model")
    (tmp_path / "model" / leftover).unlink()
    save_model_folder(model, processor, tmp_path / "model")  # the fix the error names
    Cell2TextProcessor.from_pretrained(tmp_path / "model")


def test_a_processor_ranking_genes_otherwise_is_refused(tmp_path):
    """The QA finding: another processor with the same gene vocabulary but other gene medians (or no <cls>/<eos>)
    was accepted, every cell's genes ranked in another order."""
    model, processor = composed_model(tmp_path)
    save_model_folder(model, processor, tmp_path / "model")

    def double_a_median(processor_config: dict) -> None:
        medians = processor_config["feature_extractor"]["gene_medians"]
        medians[GENES[0]] *= 2

    for name, edit in (("medians", double_a_median),
                       ("specials", lambda config: config["feature_extractor"].update(special_tokens=False))):
        with pytest.raises(ModelProcessorMismatchError, match="gene ranking checksum: model .* ranked in another"):
            Cell2TextProcessor.from_pretrained(edited_copy(tmp_path / "model", tmp_path / name, edit))


def test_a_processor_of_another_model_with_other_labels_is_refused_a_kept_subset_is_not(tmp_path):
    """The label tables were not bound to the model: two models trained from one base LLM on a pretrained
    Geneformer's vocabulary agree on every other checksum, so the processor of a model trained on other cells
    (other cell types, tissues, pathways) was accepted and the decoder chose among labels the model never learnt to
    write, exit 0. A subset of the model's own labels, chosen with keep_labels, stays a use."""
    encoder_dir, lm_dir = save_tiny_parts(tmp_path / "parts")
    processor = tiny_processor(lm_dir)
    cell_types = {"B cell": "CL:0000236", "T cell": "CL:0000084"}
    processor.ontology_term_ids = {**processor.ontology_term_ids, "cell_type": cell_types}
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16)
    save_model_folder(model, processor, tmp_path / "model")

    def other_cell_type(config: dict) -> None:  # another model's tables: a label this model never learnt
        config["ontology_term_ids"]["cell_type"]["hepatocyte"] = "CL:0000182"

    for name, edit in (("other", other_cell_type),
                       ("fewer-by-hand", lambda config: config["ontology_term_ids"].update(
                           cell_type=dict(list(config["ontology_term_ids"]["cell_type"].items())[:1]))),
                       ("pathways", lambda config: config.update(pathway_names=["Glycolysis"]))):
        with pytest.raises(ModelProcessorMismatchError, match=r"labels checksum: .*another set of labels .*keep_"):
            Cell2TextProcessor.from_pretrained(edited_copy(tmp_path / "model", tmp_path / name, edit))
    given = Cell2TextProcessor.from_pretrained(tmp_path / "model")
    given.ontology_term_ids = {**given.ontology_term_ids, "cell_type": {**cell_types, "hepatocyte": "CL:0000182"}}
    with pytest.raises(ModelProcessorMismatchError, match="labels checksum"):  # given beside the model
        tl.describe(make_adata(2), str(tmp_path / "model"), processor=given, progress=False)

    kept = Cell2TextProcessor.from_pretrained(tmp_path / "model")
    first = sorted(cell_types)[0]
    kept.keep_labels(cell_type=[first])
    assert kept.ontology_term_ids["cell_type"] == {first: cell_types[first]}
    assert set(kept.cell_type_definitions) <= {first}
    adata = make_adata(2)
    tl.describe(adata, str(tmp_path / "model"), processor=kept, progress=False)
    assert set(adata.obs["cell2text_cell_type"]) == {first}
    kept.save_pretrained(tmp_path / "kept")  # saved and loaded again: still the model's subset
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "model" / name, tmp_path / "kept" / name)
    assert Cell2TextProcessor.from_pretrained(tmp_path / "kept").ontology_term_ids["cell_type"] == {
        first: cell_types[first]}
    with pytest.raises(ValueError, match=r"keep_labels: 'hepatocyte' is not among this processor's 2 cell_type "
                                         r"labels or their ontology ids"):
        Cell2TextProcessor.from_pretrained(tmp_path / "model").keep_labels(cell_type=["hepatocyte"])
    # a Cell Ontology id stands for its label (it was refused as no label); a near miss is named with its fix
    by_id = Cell2TextProcessor.from_pretrained(tmp_path / "model")
    by_id.keep_labels(cell_type=["CL:0000084"])
    assert by_id.ontology_term_ids["cell_type"] == {"T cell": "CL:0000084"}
    for near, meant in (("CL:0000085", "CL:0000084"), ("b cell", "B cell"), ("T cells", "T cell")):
        with pytest.raises(ValueError, match=rf"keep_labels: '{near}' \(did you mean '{meant}'\?\) is not among"):
            Cell2TextProcessor.from_pretrained(tmp_path / "model").keep_labels(cell_type=[near])
    with pytest.raises(ValueError, match="keep_labels: unknown field 'cell_types'"):
        kept.keep_labels(cell_types=[first])
    with pytest.raises(ValueError, match=r"'T cell' is not among this processor's 1 cell_type labels or their "
                                         r"ontology ids \(not the "
                                         r"model's, or left out by an earlier keep_labels\)"):
        kept.keep_labels(cell_type=["T cell"])


def test_a_kept_subset_is_not_saved_or_published_as_the_models_labels(tmp_path, caplog):
    """A model-folder hunt's finding: save_model_folder with a processor that had kept one cell type wrote a folder
    that loaded, and was ready to publish, without a word: every user of it described every cell as that type, score
    1.0, exit 0 (the model's own processor named another type for each)."""
    from hub_cards.publish import check_hub_ready

    encoder_dir, lm_dir = save_tiny_parts(tmp_path / "parts")
    processor = tiny_processor(lm_dir)
    processor.ontology_term_ids = {**processor.ontology_term_ids,
                                   "cell_type": {"B cell": "CL:0000236", "T cell": "CL:0000084"}}
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16)
    save_model_folder(model, processor, tmp_path / "model")
    kept = Cell2TextProcessor.from_pretrained(tmp_path / "model")
    kept.keep_labels(cell_type=["B cell"])
    with pytest.raises(ValueError, match=r"the processor holds a subset of the model's labels \(cell_type: 1 "
                                         r"kept\), kept with keep_labels.*tl.describe\(..., cell_types="):
        save_model_folder(model, kept, tmp_path / "kept")
    assert not (tmp_path / "kept").exists()
    everything = Cell2TextProcessor.from_pretrained(tmp_path / "model")
    everything.keep_labels(cell_type=["B cell", "T cell"])  # all of them: the model's labels, saved as they are
    save_model_folder(model, everything, tmp_path / "all")
    check_hub_ready(tmp_path / "all")
    kept.save_pretrained(tmp_path / "all")  # the processor alone saved over a model folder
    with caplog.at_level("WARNING", logger="modeling_cell2text.processing_cell2text"):
        assert Cell2TextProcessor.from_pretrained(tmp_path / "all").ontology_term_ids["cell_type"] == {
            "B cell": "CL:0000236"}  # still a use: loaded, with a warning
    assert "holds a subset of the model's labels (cell_type: 1 kept)" in caplog.text
    with pytest.raises(ValueError, match=r"processor holds a subset of the model's labels \(cell_type: 1 kept\), kept "
                                         "with keep_labels"):
        check_hub_ready(tmp_path / "all")
    grown = Cell2TextProcessor.from_pretrained(tmp_path / "model")
    grown.keep_labels(cell_type=["B cell"])
    grown.ontology_term_ids = {**grown.ontology_term_ids, "cell_type": {
        **grown.ontology_term_ids["cell_type"], "monocyte": "CL:0000576"}}  # as a fine-tuning adds its corpus's labels
    assert not holds_kept_subset(grown)  # the fine-tuned model's own labels: saved (training.sft saves them)


def test_a_kept_subset_names_the_fields_it_narrows(tmp_path, caplog):
    """The warning and refusals about a kept subset counted cell types always: a processor narrowed to some pathways
    only was said to hold "a subset of the model's labels (2 cell types)", all of them."""
    from hub_cards.publish import check_hub_ready

    encoder_dir, lm_dir = save_tiny_parts(tmp_path / "parts")
    processor = tiny_processor(lm_dir)
    processor.ontology_term_ids = {**processor.ontology_term_ids,
                                   "cell_type": {"B cell": "CL:0000236", "T cell": "CL:0000084"}}
    processor.pathway_names = ["HALLMARK_A", "HALLMARK_B", "HALLMARK_C"]
    processor.age_groups = ["adulthood", "childhood"]
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16)
    save_model_folder(model, processor, tmp_path / "model")
    kept = Cell2TextProcessor.from_pretrained(tmp_path / "model")
    kept.keep_labels(cell_type=["B cell", "T cell"], pathways=["HALLMARK_B"])  # all cell types: not narrowed
    with pytest.raises(ValueError, match=r"holds a subset of the model's labels \(pathways: 1 kept\), kept with"):
        save_model_folder(model, kept, tmp_path / "kept")
    kept.keep_labels(age_group=["childhood"])  # a second subset adds its field
    assert kept.kept_labels["fields"] == {"pathways": 1, "age_group": 1}
    kept.save_pretrained(tmp_path / "model")  # the processor alone saved over the model folder: the record travels
    with caplog.at_level("WARNING", logger="modeling_cell2text.processing_cell2text"):
        Cell2TextProcessor.from_pretrained(tmp_path / "model")
    assert "holds a subset of the model's labels (age_group: 1 kept; pathways: 1 kept), kept with" in caplog.text
    with pytest.raises(ValueError, match=r"\(age_group: 1 kept; pathways: 1 kept\), kept with keep_labels"):
        check_hub_ready(tmp_path / "model")
    # a record saved before the fields were recorded still loads, and names none
    config = json.loads((tmp_path / "model" / "processor_config.json").read_text())
    config["kept_labels"].pop("fields")
    (tmp_path / "model" / "processor_config.json").write_text(json.dumps(config))
    caplog.clear()
    with caplog.at_level("WARNING", logger="modeling_cell2text.processing_cell2text"):
        Cell2TextProcessor.from_pretrained(tmp_path / "model")
    assert "holds a subset of the model's labels, kept with" in caplog.text
    config["kept_labels"]["fields"] = {"pathways": "1"}
    (tmp_path / "model" / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match="kept_labels must be keep_labels' checksums"):
        Cell2TextProcessor.from_pretrained(tmp_path / "model")


def test_a_kept_subset_changed_afterwards_is_checked_as_it_is(tmp_path, caplog):
    """The second readers' findings: once keep_labels had run, any later change to the tables was accepted (a label
    added after keeping a subset, or the tables replaced after keep_labels()), as was a change to a pipeline's
    processor after the pipeline was built; the uns record could not tell a subset run from a full one; a model saved
    before labels were checked accepted any labels without a word; keep_labels(cell_type=[]) switched describing to
    free text."""
    encoder_dir, lm_dir = save_tiny_parts(tmp_path / "parts")
    processor = tiny_processor(lm_dir)
    cell_types = {"B cell": "CL:0000236", "T cell": "CL:0000084", "monocyte": "CL:0000576"}
    processor.ontology_term_ids = {**processor.ontology_term_ids, "cell_type": cell_types}
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16)
    save_model_folder(model, processor, tmp_path / "model")
    config = Cell2TextForConditionalGeneration.from_pretrained(tmp_path / "model").config

    kept = Cell2TextProcessor.from_pretrained(tmp_path / "model")
    kept.keep_labels(cell_type=np.array(["B cell", "T cell"]))  # any collection of labels
    kept.keep_labels(cell_type={"B cell"})  # a subset of a subset
    check_model_and_processor(config, kept)
    kept.ontology_term_ids["cell_type"]["hepatocyte"] = "CL:0000182"  # changed after keeping
    with pytest.raises(ModelProcessorMismatchError, match="labels checksum"):
        check_model_and_processor(config, kept)
    replaced = Cell2TextProcessor.from_pretrained(tmp_path / "model")
    replaced.keep_labels()
    replaced.ontology_term_ids = {**replaced.ontology_term_ids, "cell_type": {"hepatocyte": "CL:0000182"}}
    with pytest.raises(ModelProcessorMismatchError, match="labels checksum"):
        check_model_and_processor(config, replaced)

    records = []
    for keep in (None, ["T cell"]):
        adata, given = make_adata(2), Cell2TextProcessor.from_pretrained(tmp_path / "model")
        if keep:
            given.keep_labels(cell_type=keep)
        tl.describe(adata, str(tmp_path / "model"), processor=given, progress=False)
        records.append(adata.uns["cell2text"])
    assert records[0]["processor_sha256"] == records[1]["processor_sha256"]  # both fit the model
    assert records[0]["params"]["label_tables_sha256"] != records[1]["params"]["label_tables_sha256"]  # as they ran

    other = Cell2TextProcessor.from_pretrained(tmp_path / "model")
    other.ontology_term_ids = {**other.ontology_term_ids, "cell_type": {"hepatocyte": "CL:0000182"}}
    for name, edit in (("old", lambda content: content["processor_sha256"].pop("labels")),  # saved before the check
                       ("older", lambda content: content.pop("processor_sha256"))):  # before processor checksums
        old = edited_copy(tmp_path / "model", tmp_path / name, edit_config=edit)
        caplog.clear()
        with caplog.at_level("WARNING", logger="modeling_cell2text.compatibility"):
            tl.describe(make_adata(2), str(old), processor=other, progress=False)  # cannot be told apart: warned
        assert "records no checksum of its processor's labels" in caplog.text, name
    # saving it again with a processor records no labels: that processor may not be the one it was trained with
    for name in ("old", "older"):
        save_model_folder(Cell2TextForConditionalGeneration.from_pretrained(tmp_path / name), other,
                          tmp_path / f"resaved-{name}")
        assert "labels" not in json.loads((tmp_path / f"resaved-{name}" / "config.json").read_text())[
            "processor_sha256"], name

    pipe = Cell2TextPipeline(model=Cell2TextForConditionalGeneration.from_pretrained(tmp_path / "model"),
                             processor=Cell2TextProcessor.from_pretrained(tmp_path / "model"))  # its own: fits
    pipe.processor.ontology_term_ids = {**pipe.processor.ontology_term_ids, "cell_type": {"hepatocyte": "CL:0000182"}}
    with pytest.raises(ModelProcessorMismatchError, match="The processor's labels do not fit .*labels checksum"):
        pipe(make_adata(2))  # its tables changed after the pipeline was built
    with pytest.raises(ValueError, match=r"keep_labels\(cell_type=\[\]\) leaves no cell type to choose among"):
        Cell2TextProcessor.from_pretrained(tmp_path / "model").keep_labels(cell_type=[])
    with pytest.raises(TypeError, match="takes label strings"):
        Cell2TextProcessor.from_pretrained(tmp_path / "model").keep_labels(cell_type=[["B cell"]])


def test_pipeline_of_a_folder_names_why_its_processor_does_not_fit(composed_dir, tmp_path):
    """transformers' pipeline() swallowed the processor's error and passed none: the user read "none was found"."""
    folder = edited_copy(composed_dir, tmp_path / "permuted", swap_two_genes)
    with pytest.raises(ModelProcessorMismatchError, match="gene vocabulary checksum"):
        pipeline("cell-to-text", model=str(folder), device="cpu")


def test_a_saved_config_reading_another_layer_than_its_prepared_encoder_is_refused(composed_dir, tmp_path):
    """from_pretrained_parts refused another gene_encoder_layer than the prepared encoder's, but a saved folder whose
    config.json named another layer loaded and fed the projector states it was not trained on."""
    layers = json.loads((composed_dir / "config.json").read_text())["gene_encoder_config"]["num_hidden_layers"]

    def reading(layer: int):
        def edit(content: dict) -> None:  # an encoder prepared to be read at hidden state 1, read at `layer`
            content["gene_encoder_config"]["cell2text_prepared_encoder"]["feature_layer"] = 1
            content["gene_encoder_layer"] = layer
        return edit

    edited = edited_copy(composed_dir, tmp_path / "other-layer", edit_config=reading(0))
    with pytest.raises(ValueError, match=r"gene_encoder_layer=0, but the gene encoder was prepared on a corpus and "
                                         r"trained to be read at hidden state 1 .*or set it to 1 in config.json"):
        Cell2TextForConditionalGeneration.from_pretrained(edited)
    for layer in (1, 1 - layers - 1):  # the same state, also counted from the end
        Cell2TextForConditionalGeneration.from_pretrained(
            edited_copy(composed_dir, tmp_path / f"layer{layer}", edit_config=reading(layer)))


def test_a_processor_writing_other_text_or_reading_symbols_otherwise_is_refused(tmp_path, caplog):
    """The QA finding: models trained from one base LLM on one gene vocabulary agree on every gene checksum, so a
    processor of the other model, or one whose tokenizer.json had two token ids swapped ("B cell" read as "T cell",
    score 1.0), or whose symbol table was edited, was accepted. Labels stay free (a subset to choose among)."""
    encoder_dir, lm_dir = save_tiny_parts(tmp_path / "parts")
    processor = tiny_processor(lm_dir)
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16)
    with caplog.at_level("WARNING", logger="modeling_cell2text.compatibility"):
        save_model_folder(model, processor, tmp_path / "model")  # composed here, not loaded: nothing to warn about
    assert "records no checksum" not in caplog.text
    assert Cell2TextProcessor.from_pretrained(tmp_path / "model")  # its own processor fits

    def swap_two_symbols(config: dict) -> None:
        symbols = config["feature_extractor"]["symbol_to_gene"]
        first, second = list(symbols)[:2]
        symbols[first], symbols[second] = symbols[second], symbols[first]

    for name, edit, part in (
            ("prompt", lambda config: config.update(system_prompt="You are a pathologist."), "prompt"),
            ("definitions", lambda config: config.update(definitions_in_model_text=False), "prompt"),
            ("symbols", swap_two_symbols, "gene_symbols")):
        with pytest.raises(ModelProcessorMismatchError, match=rf"{part} checksum: model \w+, processor \w+ \(the processor has another "):
            Cell2TextProcessor.from_pretrained(edited_copy(tmp_path / "model", tmp_path / name, edit))
    swapped = edited_copy(tmp_path / "model", tmp_path / "tokens")
    tokenizer_file = swapped / "tokenizer.json"
    content = json.loads(tokenizer_file.read_text())
    vocab = content["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_file.write_text(json.dumps(content))
    with pytest.raises(ModelProcessorMismatchError, match=r"text_vocabulary checksum: .*another tokenizer vocabulary"):
        Cell2TextProcessor.from_pretrained(swapped)
    # another processor object given beside the model (tl, the pipeline)
    other = Cell2TextProcessor.from_pretrained(tmp_path / "model")
    other.system_prompt = "You are a pathologist."
    with pytest.raises(ModelProcessorMismatchError, match="prompt checksum"):
        tl.describe(make_adata(2), str(tmp_path / "model"), processor=other, progress=False)
    # a config whose gene checksums were deleted: accepted, with a warning that nothing could be checked
    bare = edited_copy(tmp_path / "model", tmp_path / "bare", edit_config=lambda config: [
        config.pop(key) for key in ("gene_vocabulary_sha256", "gene_ranking_sha256", "processor_sha256")])
    with caplog.at_level("WARNING", logger="modeling_cell2text.compatibility"):
        Cell2TextProcessor.from_pretrained(bare)
    assert "the model in " + str(bare) + " records no checksum of the gene vocabulary or ranking" in caplog.text
    caplog.clear()  # only the vocabulary checksum deleted (and two genes swapped): it was accepted without a word
    no_vocabulary = edited_copy(tmp_path / "model", tmp_path / "no-vocabulary",
                                edit_config=lambda config: config.pop("gene_vocabulary_sha256"))
    with caplog.at_level("WARNING", logger="modeling_cell2text.compatibility"):
        Cell2TextProcessor.from_pretrained(no_vocabulary)
    assert "records no checksum of the gene vocabulary or ranking" in caplog.text


def test_a_tokenizer_splitting_text_otherwise_or_other_tokens_per_cell_are_refused(tmp_path):
    """The reviewer's findings: a tokenizer.json with a lowercasing normalizer or fewer merges keeps the vocabulary
    (every cell then described as one type), and a processor whose model_input_size was edited (130 -> 512) kept
    other numbers of genes per cell (3 of 16 demo cells changed type), each with exit 0."""
    model, processor = composed_model(tmp_path)
    save_model_folder(model, processor, tmp_path / "model")

    def lowercasing(folder: Path) -> None:
        content = json.loads((folder / "tokenizer.json").read_text())
        content["normalizer"] = {"type": "Lowercase"}
        (folder / "tokenizer.json").write_text(json.dumps(content))

    def fewer_merges(folder: Path) -> None:
        content = json.loads((folder / "tokenizer.json").read_text())
        content["model"]["merges"] = content["model"]["merges"][: len(content["model"]["merges"]) // 3]
        (folder / "tokenizer.json").write_text(json.dumps(content))

    for name, edit in (("lower", lowercasing), ("merges", fewer_merges)):
        edited = edited_copy(tmp_path / "model", tmp_path / name)
        edit(edited)
        with pytest.raises(ModelProcessorMismatchError, match=r"text_tokenization checksum: .*way of splitting text"):
            Cell2TextProcessor.from_pretrained(edited)
    assert_a_folder_saved_before_the_part_loads(tmp_path / "model", tmp_path / "older", "description_tokenization")
    fewer = edited_copy(tmp_path / "model", tmp_path / "fewer-genes", edit_processor=lambda config: config[
        "feature_extractor"].update(model_input_size=config["feature_extractor"]["model_input_size"] - 3))
    with pytest.raises(ModelProcessorMismatchError, match=r"gene_tokens_per_cell checksum: .*number of gene tokens"):
        Cell2TextProcessor.from_pretrained(fewer)
    more = edited_copy(tmp_path / "model", tmp_path / "more-genes", edit_processor=lambda config: config[
        "feature_extractor"].update(model_input_size=100_000))  # fitted back to the encoder's positions: the same
    assert Cell2TextProcessor.from_pretrained(more).feature_extractor.model_input_size == \
        Cell2TextProcessor.from_pretrained(tmp_path / "model").feature_extractor.model_input_size


def test_a_tokenizer_ending_text_with_another_token_is_refused(tmp_path):
    """A bad-input hunt's finding: a tokenizer_config.json whose eos_token was edited (<|im_end|> to <|endoftext|>,
    both in the vocabulary, so no other checksum moved) loaded; every free description the model ended read as cut,
    unparsed, with a warning to raise max_new_tokens, which could not help."""
    model, processor = composed_model(tmp_path)
    save_model_folder(model, processor, tmp_path / "model")
    edited = edited_copy(tmp_path / "model", tmp_path / "edited")
    tokenizer_config = edited / "tokenizer_config.json"
    content = json.loads(tokenizer_config.read_text())
    assert content["eos_token"] == "<|im_end|>"
    tokenizer_config.write_text(json.dumps({**content, "eos_token": "<|endoftext|>"}))
    with pytest.raises(ModelProcessorMismatchError, match=r"end_of_text checksum: .*another end-of-text token"):
        Cell2TextProcessor.from_pretrained(edited)
    assert_a_folder_saved_before_the_part_loads(tmp_path / "model", tmp_path / "older", "end_of_text")


def test_a_tokenizer_splitting_the_prompt_otherwise_is_refused(tmp_path):
    """A model-folder hunt's finding: a tokenizer.json whose <|im_end|> was marked rstrip (the newline after it in the
    chat template then eaten) kept the vocabulary, the template and the tokens of every probe text, so it loaded;
    every prompt the model read had other token ids, and the scores and free descriptions changed, exit 0."""
    model, processor = composed_model(tmp_path)
    save_model_folder(model, processor, tmp_path / "model")
    edited = edited_copy(tmp_path / "model", tmp_path / "edited")
    content = json.loads((edited / "tokenizer.json").read_text())
    for token in content["added_tokens"]:
        if token["content"] == "<|im_end|>":
            token["rstrip"] = True
    (edited / "tokenizer.json").write_text(json.dumps(content))
    assert _processor_without_check(edited)._prompt_ids(8) != processor._prompt_ids(8)  # the newlines are gone
    with pytest.raises(ModelProcessorMismatchError, match=r"prompt_tokenization checksum: .*the prompt's special tokens"):
        Cell2TextProcessor.from_pretrained(edited)
    # a normalizer that changes only newlines, which no probe text holds but the chat template writes between its
    # special tokens: every other check passed, and the model read other prompt ids
    newlines = edited_copy(tmp_path / "model", tmp_path / "newlines")
    content = json.loads((newlines / "tokenizer.json").read_text())
    content["normalizer"] = {"type": "Replace", "pattern": {"String": "\n"}, "content": " \n"}
    (newlines / "tokenizer.json").write_text(json.dumps(content))
    assert _processor_without_check(newlines)._prompt_ids(8) != processor._prompt_ids(8)
    with pytest.raises(ModelProcessorMismatchError, match=r"prompt_tokenization checksum: .*template's own text"):
        Cell2TextProcessor.from_pretrained(newlines)
    # num_cell_tokens edited in both config files: the two agree, but the model learnt to read 8 cell tokens
    fewer = edited_copy(tmp_path / "model", tmp_path / "fewer", edit_processor=lambda config: config.update(
        num_cell_tokens=4), edit_config=lambda config: config.update(num_cell_tokens=4))
    with pytest.raises(ModelProcessorMismatchError, match=r"prompt_tokenization checksum: .*num_cell_tokens"):
        Cell2TextProcessor.from_pretrained(fewer)
    assert_a_folder_saved_before_the_part_loads(tmp_path / "model", tmp_path / "older", "prompt_tokenization")


def test_a_tokenizer_decoding_otherwise_is_refused(tmp_path):
    """A model-folder lead: the tokenizer's decoding (tokenizer.json's "decoder", tokenizer_config.json's
    clean_up_tokenization_spaces) was in no checksum, so a folder whose decoder rewrote text loaded with every part
    matching, and each free description the model wrote read otherwise ("B cell" as "T cell"), exit 0."""
    from modeling_cell2text.description_schema import CellDescription, parse_description, render_description

    model, processor = composed_model(tmp_path)
    save_model_folder(model, processor, tmp_path / "model")
    description = render_description(CellDescription(cell_type="B cell", tissue="blood",
                                                     pathways=("Hypoxia , stress",)))
    written = torch.tensor([processor.tokenizer(description, add_special_tokens=False)["input_ids"]])
    assert processor.post_process_generation(written, 0) == [description]

    def rewrite(folder: Path) -> None:
        path = folder / "tokenizer.json"
        content = json.loads(path.read_text())
        content["decoder"] = {"type": "Sequence", "decoders": [content["decoder"], {
            "type": "Replace", "pattern": {"String": "B cell"}, "content": "T cell"}]}
        path.write_text(json.dumps(content))

    rewritten = edited_copy(tmp_path / "model", tmp_path / "rewritten")
    rewrite(rewritten)
    read = _processor_without_check(rewritten).post_process_generation(written, 0)
    assert parse_description(read[0]).cell_type == "T cell"  # what the model wrote: a B cell
    with pytest.raises(ModelProcessorMismatchError, match=r"text_decoding checksum: .*decoder"):
        Cell2TextProcessor.from_pretrained(rewritten)
    # spaces before punctuation taken out on decoding ("Hypoxia , stress" read as "Hypoxia, stress"; transformers
    # does it for a BPE tokenizer where told to, as it does for others with clean_up_tokenization_spaces alone)
    cleaned = edited_copy(tmp_path / "model", tmp_path / "cleaned")
    settings_file = cleaned / "tokenizer_config.json"
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "clean_up_tokenization_spaces": True,
                                         "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True}))
    assert _processor_without_check(cleaned).post_process_generation(written, 0) != [description]
    with pytest.raises(ModelProcessorMismatchError, match=r"text_decoding checksum"):
        Cell2TextProcessor.from_pretrained(cleaned)
    assert_a_folder_saved_before_the_part_loads(tmp_path / "model", tmp_path / "older", "text_decoding")


def test_a_chat_template_writing_todays_date_itself_is_refused(tmp_path):
    """A template that formats today's date itself (transformers' `strftime_now`, called directly rather than as
    Llama 3's fallback for `date_string`) wrote another date into every prompt each day, so the model's descriptions
    and scores changed from one day to the next, exit 0. Refused with the fix; a template failing otherwise keeps
    its own error."""
    from tiny_parts import CHATML_TEMPLATE

    _, processor = composed_model(tmp_path)
    processor.chat_template = "{{ 'Today Date: ' + strftime_now('%d %b %Y') + '\\n' }}" + CHATML_TEMPLATE
    with pytest.raises(ValueError, match=r"writes today's date itself \(strftime_now.*Write a fixed date"):
        processor._prompt_ids(8)
    processor.chat_template = "{{ messages(1) }}" + CHATML_TEMPLATE
    with pytest.raises(TypeError, match="not callable"):
        processor._prompt_ids(8)


def test_a_chat_template_stating_the_date_writes_the_same_prompt_every_day(tmp_path, monkeypatch):
    """Llama 3's chat templates write "Today Date:" from `date_string`, else from today's date: the model's prompts, and
    so its descriptions and scores, changed from one day to the next. The processor passes a fixed date."""
    import datetime

    from transformers.utils import chat_template_utils

    from modeling_cell2text.processing_cell2text import PROMPT_DATE
    from tiny_parts import CHATML_TEMPLATE

    _, processor = composed_model(tmp_path)
    processor.chat_template = ("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
                               "{%- endif %}{{ 'Today Date: ' + date_string + '\\n' }}" + CHATML_TEMPLATE)

    class Tomorrow(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.now(tz) + datetime.timedelta(days=1)

    today = processor._prompt_ids(8)
    assert processor.tokenizer.decode(today).startswith(f"Today Date: {PROMPT_DATE}")
    monkeypatch.setattr(chat_template_utils, "datetime", Tomorrow)
    assert processor._prompt_ids(8) == today


def test_a_processor_with_other_current_symbols_is_refused(tmp_path):
    """A model-folder hunt's finding: a processor whose gene_symbols named a gene's previous symbol as its current one
    (symbol_to_gene unchanged, so every checksum matched) read, of an input naming that gene by both symbols, the
    other column: cells whose top gene it was changed type, with a warning that named the symbol not read, exit 0."""
    model, processor = composed_model(tmp_path)
    save_model_folder(model, processor, tmp_path / "model")
    gene = processor.feature_extractor.symbol_to_gene["TM4SF6"]  # TSPAN6's previous symbol
    assert processor.feature_extractor.gene_symbols[gene] == "TSPAN6"
    edited = edited_copy(tmp_path / "model", tmp_path / "edited", edit_processor=lambda config: config[
        "feature_extractor"]["gene_symbols"].update({gene: "TM4SF6"}))
    both = _processor_without_check(edited).feature_extractor.match_genes(["TSPAN6", "TM4SF6"]).column_tokens
    assert list(both >= 0) == [False, True]  # the previous symbol's column read, the current one's left out
    with pytest.raises(ModelProcessorMismatchError, match=r"current_gene_symbols checksum: .*current symbol"):
        Cell2TextProcessor.from_pretrained(edited)
    assert_a_folder_saved_before_the_part_loads(tmp_path / "model", tmp_path / "older", "current_gene_symbols")


def test_a_folder_saved_before_the_latest_checksum_parts_and_saved_again_records_them(tmp_path):
    """A folder saved before `prompt_tokenization` and `current_gene_symbols` were recorded, loaded and saved again,
    kept its older record, so the new folder still let a processor whose tokenizer.json splits the prompt otherwise
    through, exit 0. Saving takes the record anew from the pair saved (its recorded parts checked first); a folder
    that recorded no labels still records none."""
    model, processor = composed_model(tmp_path)
    save_model_folder(model, processor, tmp_path / "model")
    older = edited_copy(tmp_path / "model", tmp_path / "older", edit_config=lambda config: [config[
        "processor_sha256"].pop(name) for name in ("prompt_tokenization", "current_gene_symbols", "labels")])
    save_model_folder(Cell2TextForConditionalGeneration.from_pretrained(older),
                      Cell2TextProcessor.from_pretrained(older), tmp_path / "resaved")
    record = json.loads((tmp_path / "resaved" / "config.json").read_text())["processor_sha256"]
    full = json.loads((tmp_path / "model" / "config.json").read_text())["processor_sha256"]
    assert record == {name: value for name, value in full.items() if name != "labels"}
    # a processor changed after loading, against a part the folder recorded: refused before anything is written
    loaded, changed = Cell2TextForConditionalGeneration.from_pretrained(older), Cell2TextProcessor.from_pretrained(older)
    changed.system_prompt = "Describe the cell briefly."
    with pytest.raises(ModelProcessorMismatchError, match="prompt checksum"):
        save_model_folder(loaded, changed, tmp_path / "changed")
    assert not (tmp_path / "changed").exists()


def test_saving_a_model_with_peft_adapters_is_refused_before_writing(tmp_path):
    """The reviewer's finding: save_model_folder on a PeftModel wrote the adapter files and the code, then failed
    for want of config.json, leaving a partial folder."""
    from peft import LoraConfig, get_peft_model

    model, processor = composed_model(tmp_path)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"carries PEFT adapters.*merge_and_unload"):
        save_model_folder(adapted, processor, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_model_folder(adapted.merge_and_unload(), processor, tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.fixture(scope="module")
def saved_with_definitions(tmp_path_factory):
    """A tiny model saved with a processor that holds a cell-type definition (its checksums recorded)."""
    root = tmp_path_factory.mktemp("definitions")
    encoder_dir, lm_dir = save_tiny_parts(root / "parts")
    processor = tiny_processor(lm_dir)
    processor.cell_type_definitions = {"B cell": "A lymphocyte of B lineage."}
    torch.manual_seed(0)
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_dir, lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16)
    save_model_folder(model, processor, root / "model")
    return root / "model"


def test_a_processor_with_another_cell_type_definition_is_refused(saved_with_definitions):
    """The definitions are written into every description (and read by the model with definitions_in_model_text):
    a processor whose definitions were edited must not pass as the model's."""
    config = Cell2TextConfig.from_pretrained(saved_with_definitions)
    processor = Cell2TextProcessor.from_pretrained(saved_with_definitions)
    check_model_and_processor(config, processor)  # its own processor fits
    processor.cell_type_definitions = {"B cell": "A lymphocyte of T lineage."}
    with pytest.raises(ModelProcessorMismatchError, match="labels checksum"):
        check_model_and_processor(config, processor)


def test_a_processor_binning_expression_otherwise_is_refused(saved_with_definitions):
    """The model reads expression bins as token types: a processor with another number of bins gives each gene
    another bin (or bins to a model that reads none)."""
    config = Cell2TextConfig.from_pretrained(saved_with_definitions)
    processor = Cell2TextProcessor.from_pretrained(saved_with_definitions)
    processor.feature_extractor.num_expression_bins = 2
    with pytest.raises(ModelProcessorMismatchError, match="expression bins: processor 2, model 0"):
        check_model_and_processor(config, processor)


def test_weights_of_another_save_beside_a_config_are_refused(tmp_path):
    """A model-folder lead: another run's weights of the same shapes (same base parts, same labels, so every
    checksum of the processor matched) copied over a folder's model.safetensors loaded and described every cell as
    that run's model, exit 0. Each save writes a new weights_id into config.json and into its safetensors files'
    header metadata; a file of another save is refused, sharded too; a folder saved before ids loads."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from test_pipeline import save_tiny_model_folder

    from modeling_cell2text.modeling_cell2text import WEIGHTS_ID_KEY

    ours, theirs = (save_tiny_model_folder(tmp_path / name, trained=False, seed=seed)
                    for name, seed in (("ours", 0), ("theirs", 1)))
    assert (json.loads((ours / "config.json").read_text())["processor_sha256"]
            == json.loads((theirs / "config.json").read_text())["processor_sha256"])
    weights_id = json.loads((ours / "config.json").read_text())["weights_id"]
    with safe_open(ours / "model.safetensors", framework="pt") as weights:
        assert weights.metadata() == {"format": "pt", WEIGHTS_ID_KEY: weights_id}
    loaded = Cell2TextForConditionalGeneration.from_pretrained(ours)
    assert all(torch.equal(tensor, loaded.state_dict()[name])
               for name, tensor in load_file(ours / "model.safetensors").items())  # the tensors kept as saved

    swapped = edited_copy(ours, tmp_path / "swapped")
    shutil.copy(theirs / "model.safetensors", swapped / "model.safetensors")
    for use_safetensors in (True, None):  # None, transformers' default, skipped every check of the weights
        with pytest.raises(OSError, match=r"model.safetensors\) were not written by the save that wrote its config"):
            Cell2TextForConditionalGeneration.from_pretrained(swapped, use_safetensors=use_safetensors)
    # this model's weights written by a tool that drops the id (zero_to_fp32.py): refused, naming how to load them
    dropped = edited_copy(ours, tmp_path / "dropped")
    save_file(load_file(dropped / "model.safetensors"), dropped / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=r"weights id none in the file.*from_pretrained\(\.\.\., weights_id=None\)"):
        Cell2TextForConditionalGeneration.from_pretrained(dropped)
    Cell2TextForConditionalGeneration.from_pretrained(dropped, weights_id=None)
    with pytest.raises(ValueError, match="were not written by the save"):  # transformers' pipeline names our error
        pipeline("cell-to-text", model=str(swapped), trust_remote_code=True)  # the folder's own code

    # sharded: one shard of another save
    sharded, other = tmp_path / "sharded", tmp_path / "other"
    for folder in (sharded, other):
        loaded.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(path.name for path in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    Cell2TextForConditionalGeneration.from_pretrained(sharded)
    shutil.copy(other / shards[-1], sharded / shards[-1])
    with pytest.raises(OSError, match=rf"{shards[-1]}\) were not written by the save"):
        Cell2TextForConditionalGeneration.from_pretrained(sharded)

    # a folder saved before weights ids: neither config.json nor the weights hold one
    older = edited_copy(ours, tmp_path / "older", edit_config=lambda config: config.pop("weights_id"))
    save_file(load_file(older / "model.safetensors"), older / "model.safetensors", metadata={"format": "pt"})
    Cell2TextForConditionalGeneration.from_pretrained(older)
    # another run's weights, saved with an id, dropped into it (a reviewer's finding: loaded unchecked, exit 0)
    shutil.copy(theirs / "model.safetensors", older / "model.safetensors")
    with pytest.raises(OSError, match=r"weights id [0-9a-f]{32} in the file, none in config.json"):
        Cell2TextForConditionalGeneration.from_pretrained(older)
    with pytest.raises(ValueError, match="push_to_hub=True here would upload the weights before"):
        loaded.save_pretrained(tmp_path / "pushed", push_to_hub=True)


def test_only_the_rank_that_writes_the_weights_writes_their_id(tmp_path, monkeypatch):
    """A reviewer's finding: where torch.distributed runs, transformers writes a save on rank 0 alone, but every rank
    that called save_pretrained (is_main_process=True by default) wrote its own new weights_id into the weights rank
    0 wrote: the folder's config.json held rank 0's id, its model.safetensors another rank's, and it was refused."""
    import transformers.distributed.mixin as distributed
    from test_pipeline import save_tiny_model_folder

    model = Cell2TextForConditionalGeneration.from_pretrained(save_tiny_model_folder(tmp_path / "src", trained=False))
    monkeypatch.setattr(distributed, "_is_torch_distributed_initialized", lambda: True)
    for rank in (0, 1):  # each rank calls it in turn, as transformers allows
        monkeypatch.setattr(distributed, "_get_torch_distributed_rank", lambda rank=rank: rank)
        model.save_pretrained(tmp_path / "saved")
    monkeypatch.setattr(distributed, "_is_torch_distributed_initialized", lambda: False)
    Cell2TextForConditionalGeneration.from_pretrained(tmp_path / "saved")


def test_a_distributed_checkpoint_leaves_an_earlier_saves_weights_refused(tmp_path, monkeypatch):
    """A reviewer's finding: save_pretrained(distributed_checkpoint=True) writes config.json and DCP files, no
    safetensors file, yet the model.safetensors an earlier save left in the folder got the new weights_id: the folder
    loaded the earlier weights with the new config.json, exit 0. That file is now refused."""
    from test_pipeline import save_tiny_model_folder

    model = Cell2TextForConditionalGeneration.from_pretrained(save_tiny_model_folder(tmp_path / "src", trained=False))
    model.save_pretrained(tmp_path / "saved")  # an earlier save
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight.add_(1.0)  # trained further
    monkeypatch.setattr(model, "save_distributed_checkpoint", lambda *args, **kwargs: None)  # its DCP files
    model.save_pretrained(tmp_path / "saved", distributed_checkpoint=True)
    with pytest.raises(OSError, match=r"model.safetensors\) were not written by the save that wrote its config.json"):
        Cell2TextForConditionalGeneration.from_pretrained(tmp_path / "saved")


def test_saving_an_adapter_leaves_the_weights_and_their_id_alone(tmp_path):
    """A reviewer's finding: a model given an adapter (transformers' add_adapter) and saved into its own folder, as
    transformers saves adapters (no config.json), got a new weights_id written into the folder's model.safetensors:
    with the adapter files removed, as loading asks, the folder was refused as another save's weights."""
    from peft import LoraConfig
    from test_pipeline import save_tiny_model_folder

    folder = save_tiny_model_folder(tmp_path / "model", trained=False)
    model = Cell2TextForConditionalGeneration.from_pretrained(folder)
    model.add_adapter(LoraConfig(target_modules=["q_proj"], r=2))
    model.save_pretrained(folder)
    with pytest.raises(OSError, match="holds a PEFT adapter"):
        Cell2TextForConditionalGeneration.from_pretrained(folder)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).unlink()
    Cell2TextForConditionalGeneration.from_pretrained(folder)


def test_a_weights_id_that_fails_to_be_written_leaves_no_copy_of_the_weights(tmp_path, monkeypatch):
    """A reviewer's finding: writing the weights_id copies each weights file; a full disk failed the save and left
    the partial copy (.model.safetensors.writing, up to the model's size) hidden in the folder."""
    import errno

    from test_pipeline import save_tiny_model_folder

    import modeling_cell2text.modeling_cell2text as modeling

    model = Cell2TextForConditionalGeneration.from_pretrained(save_tiny_model_folder(tmp_path / "src", trained=False))

    def disk_full(source, target, length=0):
        target.write(source.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modeling.shutil, "copyfileobj", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "saved")
    assert not list((tmp_path / "saved").glob(".*"))
