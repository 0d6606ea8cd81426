"""Evaluation with the cell type constrained to the known labels, on a tiny random model and a tiny corpus."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_parts import save_tiny_corpus, save_tiny_model

from modeling_cell2text import save_model_folder
from training.evaluation.evaluate import evaluate_model, free_cell_type, load_model
from training.evaluation.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_and_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("constrained")
    corpus_dir = save_tiny_corpus(root / "corpus")
    return save_tiny_model(root / "model", corpus_dir), corpus_dir


def test_load_model_runs_no_folder_code_by_default(model_and_corpus):
    model_dir, _ = model_and_corpus
    model, processor = load_model(model_dir, device="cpu")
    assert type(model).__module__ == "modeling_cell2text.modeling_cell2text"
    assert type(processor).__module__ == "modeling_cell2text.processing_cell2text"


def test_load_model_keeps_the_saved_dtype(model_and_corpus, tmp_path):
    # the second reader's finding: loading through tl in float32 doubled a bf16 model's memory and moved its figures
    model_dir, _ = model_and_corpus
    model, processor = load_model(model_dir, device="cpu")
    assert model.dtype == torch.float32
    save_model_folder(model.to(torch.bfloat16), processor, tmp_path / "bf16")
    assert load_model(tmp_path / "bf16", device="cpu")[0].dtype == torch.bfloat16


def test_load_model_runs_the_folder_code_when_trusted(model_and_corpus, tmp_path, monkeypatch):
    # the Auto classes picked this package's registered classes even with trust_remote_code=True: the README's
    # "runs the code saved with it" did not hold, and nothing said so
    model_dir, _ = model_and_corpus
    model, processor = load_model(model_dir, device="cpu")
    folder = tmp_path / "with-code"
    save_model_folder(model, processor, folder)
    marker = tmp_path / "marker"
    for code in ("modeling_cell2text.py", "processing_cell2text.py"):
        (folder / code).write_text((folder / code).read_text() + f"\nopen({str(marker)!r}, 'a').write('ran')\n")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    load_model(folder, device="cpu")
    assert not marker.exists()
    model, processor = load_model(folder, trust_remote_code=True, device="cpu")
    assert marker.exists()
    assert type(model).__module__.startswith("transformers_modules.")
    assert type(processor).__module__.startswith("transformers_modules.")


def test_constrained_evaluation_predicts_known_labels_with_confidence(model_and_corpus, tmp_path):
    model_dir, corpus_dir = model_and_corpus
    results, per_cell, texts = evaluate_model(model_dir, corpus_dir, "test", batch_size=3, max_new_tokens=4,
                                              device="cpu")
    known = {"B cell", "T cell"}
    assert len(texts) == 8 and set(per_cell["cell_type_pred"]) <= known
    from modeling_cell2text.tl import weights_sha256

    assert results["weights_sha256"] == weights_sha256(model_dir) is not None  # which weights the figures are of
    assert results["trust_remote_code"] is False and results["dtype"] == "torch.float32"  # which code ran, how
    assert results["gene_encoder_prepared_on_corpus"] is False  # what the card says of the encoder
    from datasets import load_from_disk

    assert per_cell["cell_id"] == list(load_from_disk(str(corpus_dir))["test"]["cell_id"])  # which cell is which
    assert per_cell["cell_type_row"] == list(range(8))  # the split's rows (every test cell has a known type)
    assert all(0.5 <= s <= 1 for s in per_cell["cell_type_score"])  # the chosen one of two labels
    constraint = results["cell_type_constraint"]
    assert constraint["num_candidates"] == 2
    # a random model writes no known label freely: every parsed free label is invented
    assert constraint["num_invented"] + constraint["num_free_unparsed"] == 8
    assert sum(constraint["invented_labels"].values()) == constraint["num_invented"]
    assert constraint["constrained_accuracy"] == results["fields"]["cell_type"]["accuracy"]
    assert constraint["calibration"]["num_cells"] == 8
    calibration = results["field_calibration"]  # every chosen field's probability, against the true labels
    assert set(calibration) == {"cell_type", "tissue", "disease"} and calibration["cell_type"]["num_labels"] == 2
    assert calibration["cell_type"]["ece"] == pytest.approx(constraint["calibration"]["ece"])
    assert calibration["tissue"]["accuracy"] == 1.0 and calibration["tissue"]["num_cells"] == 8
    assert results["fields"]["cell_type"]["ontology_similarity"] > 0  # known labels have CL ids
    report = write_report(results, per_cell, tmp_path)
    text = report.read_text()
    assert "## Cell type constrained to the known labels" in text and "expected calibration error" in text
    assert "| Tissue | 1 |" in text  # the per-field calibration table
    assert (tmp_path / "reliability_diagram.png").read_bytes()[:8] == PNG_MAGIC
    assert "](reliability_diagram.png)" in text



def test_cells_of_labels_the_model_lacks_are_counted_per_field():
    """evaluate --other-corpus gave 0.667 for 6 T and B cells of a model knowing only "B cell", without saying that 2
    cells carried a label no choice of the model's could match."""
    import datasets

    from hub_cards.names import FIELD_METRICS
    from modeling_cell2text import CellDescription, render_description
    from training.evaluation.evaluate import score_descriptions
    from training.evaluation.report import _fields_section

    text = render_description(CellDescription(cell_type="B cell", tissue="blood"))
    types = ["B cell"] * 4 + ["T cell"] * 2
    split = datasets.Dataset.from_dict({
        "cell_id": [f"c{i}" for i in range(6)], "description": [text] * 6, "cell_type": types,
        "cell_type_ontology_term_id": ["CL:0000236" if t == "B cell" else "CL:0000084" for t in types],
        "tissue": ["blood"] * 6, "tissue_ontology_term_id": ["UBERON:0000178"] * 6, "pathways": [[]] * 6})
    ids = {"cell_type": {"B cell": "CL:0000236"}, "tissue": {"blood": "UBERON:0000178"}}
    fields = score_descriptions(split, [text] * 6, ids)[0]["fields"]
    assert fields["cell_type"]["accuracy"] == pytest.approx(4 / 6)
    assert fields["cell_type"]["num_labels_unknown_to_model"] == 2
    assert fields["tissue"]["num_labels_unknown_to_model"] == 0
    title = next(m.title for m in FIELD_METRICS if m.key == "num_labels_unknown_to_model")
    table = "\n".join(_fields_section(fields))
    assert title in table and "| cell_type |" in table


def test_a_free_description_cut_at_max_new_tokens_counts_as_unparsed(model_and_corpus):
    """evaluate --free parsed a description cut at a sentence's end as whole: parse rate 1.0 with its later fields
    missing; the pipeline returns such a text unparsed, and the evaluation now scores it so."""
    import datasets

    from modeling_cell2text import CellDescription, render_description
    from training.evaluation.evaluate import generate_descriptions, score_descriptions

    text = render_description(CellDescription(cell_type="B cell", tissue="blood", disease="normal"))
    split = datasets.Dataset.from_dict({"cell_id": ["c0", "c1"], "description": [text] * 2,
                                        "cell_type": ["B cell"] * 2, "cell_type_ontology_term_id": ["CL:0000236"] * 2,
                                        "tissue": ["blood"] * 2, "tissue_ontology_term_id": ["UBERON:0000178"] * 2,
                                        "pathways": [[], []]})
    first = text[:text.index(".") + 1]  # cut after the cell-type sentence: parses, tissue missing
    ids = {"cell_type": {"B cell": "CL:0000236"}, "tissue": {"blood": "UBERON:0000178"}}
    results, _ = score_descriptions(split, [text, first], ids, whole=[True, False])
    assert results["parse_rate"] == 0.5 and results["fields"]["cell_type"]["accuracy"] == 0.5
    assert score_descriptions(split, [text, first], ids)[0]["parse_rate"] == 1.0  # as before: every text whole
    for whole in ([True], [True, True, False]):  # one flag per text: another count was misread or ignored
        with pytest.raises(ValueError, match="pass one per cell"):
            score_descriptions(split, [text, first], ids, whole=whole)

    model_dir, corpus_dir = model_and_corpus
    model, processor = load_model(model_dir, device="cpu")
    cells = datasets.load_from_disk(str(corpus_dir))["test"]["gene_input_ids"][:2]
    texts, whole = generate_descriptions(model, processor, cells, batch_size=2, max_new_tokens=3)
    assert len(texts) == 2 and whole == processor.descriptions_ended(
        model.generate(**processor(gene_input_ids=cells), max_new_tokens=3, do_sample=False),
        processor(gene_input_ids=cells)["input_ids"].shape[1], model.generation_config.eos_token_id)

def test_evaluate_free_passes_whether_each_description_ended_to_its_scoring(model_and_corpus, monkeypatch):
    """evaluate_model(constrained=False) scores with generate_descriptions' `whole`: a description cut at a sentence's
    end is unparsed there too (the tests above call the two functions, not the evaluation that joins them)."""
    from modeling_cell2text import CellDescription, render_description
    from training.evaluation import evaluate

    text = render_description(CellDescription(cell_type="B cell", tissue="blood", disease="normal"))
    first = text[:text.index(".") + 1]  # parses, its later fields missing
    model_dir, corpus_dir = model_and_corpus
    for ended, parse_rate in ((True, 1.0), (False, 0.0)):
        monkeypatch.setattr(evaluate, "generate_descriptions",
                            lambda model, processor, cells, *args: ([first] * len(cells), [ended] * len(cells)))
        results, _, _ = evaluate_model(model_dir, corpus_dir, "test", constrained=False, device="cpu")
        assert results["parse_rate"] == parse_rate


def test_free_cell_type_reads_the_first_sentence_only():
    assert free_cell_type("This sample consists of a B cell. It orig") == "B cell"
    label = "Dx5-negative, NK1.1-positive immature natural killer cell, mouse"  # it read "Dx5-negative, NK1"
    assert free_cell_type(f"This sample consists of a {label}. It orig") == label
    assert free_cell_type(f"This sample consists of a {label}.") == label
    assert free_cell_type("This sample consists of a T cell.It originates from somewhere odd.") == "T cell"
    assert free_cell_type("A B cell.") is None
    # Cut by the token limit before its period (stop 40's finding): "erythroid cell" may be the start of
    # "erythroid cell lineage"; it counted as an invented label, now as unparsed.
    assert free_cell_type("This sample consists of an erythroid cell") is None
    assert free_cell_type("This sample consists of a Dx5-negative, NK1.1") is None


def _corpus_copy(corpus_dir, target, summary=None, feature_extractor=None):
    import shutil

    shutil.copytree(corpus_dir, target)
    for path, edit in ((target / "summary.json", summary),
                       (target / "feature_extractor" / "preprocessor_config.json", feature_extractor)):
        if edit is not None:
            content = json.loads(path.read_text())
            edit(content)
            path.write_text(json.dumps(content))
    return target


def test_another_build_of_the_corpus_is_refused_unless_asked_for(model_and_corpus, tmp_path):
    """The QA finding: a model trained on one build evaluated on the same cells rebuilt with another seed or fold
    (52 of 70 test cells were training cells) ran with exit 0; the vocabulary check alone could not tell."""
    from training.evaluation.evaluate import check_corpus_fits_model

    model_dir, corpus_dir = model_and_corpus
    model, processor = load_model(model_dir, device="cpu")
    trained_on = {"train": "aaaa", "validation": "bbbb", "test": "cccc"}
    model.config.training_corpus_fingerprints = trained_on  # as training.sft records it
    same = _corpus_copy(corpus_dir, tmp_path / "same", summary=lambda s: s.update(fingerprints=trained_on))
    rebuilt = _corpus_copy(corpus_dir, tmp_path / "rebuilt",
                           summary=lambda s: s.update(fingerprints={**trained_on, "test": "dddd"}))
    check_corpus_fits_model(same, model.config, processor)
    with pytest.raises(ValueError, match="is not the build the model was trained on .* pass --other-corpus"):
        check_corpus_fits_model(rebuilt, model.config, processor)
    check_corpus_fits_model(rebuilt, model.config, processor, other_corpus=True)  # the user's word: new cells


def test_a_model_fine_tuned_with_init_from_records_every_corpus_it_trained_on(model_and_corpus, tmp_path, caplog):
    """The reviewer's finding: fine-tuning on corpus B (init_from) overwrote the record of corpus A, so evaluation
    on B, rebuilt from A's cells with another seed, passed without a word."""
    from training.evaluation.evaluate import check_corpus_fits_model
    from training.sft import record_training_corpus

    model_dir, corpus_dir = model_and_corpus
    model, processor = load_model(model_dir, device="cpu")
    first, second, third = ({"train": name} for name in ("aaaa", "bbbb", "cccc"))
    model.config.training_corpus_fingerprints, model.config.earlier_training_corpus_fingerprints = None, None
    record_training_corpus(model.config, first)
    assert model.config.earlier_training_corpus_fingerprints is None
    record_training_corpus(model.config, first)  # trained again on the same corpus: nothing earlier
    assert model.config.earlier_training_corpus_fingerprints is None
    record_training_corpus(model.config, second)
    record_training_corpus(model.config, third)
    assert model.config.training_corpus_fingerprints == third
    assert model.config.earlier_training_corpus_fingerprints == [first, second]
    last = _corpus_copy(corpus_dir, tmp_path / "last", summary=lambda s: s.update(fingerprints=third))
    with caplog.at_level("WARNING", logger="training.evaluation.evaluate"):
        check_corpus_fits_model(last, model.config, processor)
    assert "trained on 2 other corpora before this one" in caplog.text
    earlier = _corpus_copy(corpus_dir, tmp_path / "earlier", summary=lambda s: s.update(fingerprints=first))
    with pytest.raises(ValueError, match="trained on it before being fine-tuned on that one"):
        check_corpus_fits_model(earlier, model.config, processor)
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.evaluation.evaluate"):
        check_corpus_fits_model(earlier, model.config, processor, other_corpus=True)
    assert "other_corpus (--other-corpus) was given, but the model was trained on the corpus" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.evaluation.evaluate"):
        check_corpus_fits_model(last, model.config, processor, other_corpus=True)  # the last one: nothing to say
    assert "other_corpus" not in caplog.text


def test_a_corpus_ranked_with_other_gene_medians_is_refused(model_and_corpus, tmp_path):
    """The QA finding: the same gene ids with other medians (a corpus built without --feature-extractor) passed,
    and every test cell's gene order differed from the model's processor's."""
    from training.evaluation.evaluate import check_corpus_fits_model

    model_dir, corpus_dir = model_and_corpus
    model, processor = load_model(model_dir, device="cpu")

    def other_medians(config):
        gene = next(iter(config["gene_medians"]))
        config["gene_medians"][gene] *= 2

    other = _corpus_copy(corpus_dir, tmp_path / "other", feature_extractor=other_medians)
    with pytest.raises(ValueError, match="not tokenized as the model .* reads cells: other gene medians or special tokens"):
        check_corpus_fits_model(other, model.config, processor, other_corpus=True)


@pytest.mark.parametrize(("split", "max_cells", "message"), [
    ("tets", None, r"has no split 'tets'; its splits: \['test', 'train', 'validation'\]"),
    ("test", 0, "max_cells must be an integer >= 1"),
    ("test", -5, "max_cells must be an integer >= 1"),
])
def test_a_misspelt_split_or_no_cells_is_named_before_the_model_loads(model_and_corpus, monkeypatch, split,
                                                                       max_cells, message):
    """The QA finding: `--split tets` gave a bare KeyError and `--max-cells 0` "No texts to evaluate" after the
    model loaded."""
    import training.evaluation.evaluate as evaluate

    model_dir, corpus_dir = model_and_corpus
    monkeypatch.setattr(evaluate, "load_model", lambda *args: pytest.fail("the model loaded first"))
    with pytest.raises(ValueError, match=message):
        evaluate_model(model_dir, corpus_dir, split, max_cells=max_cells, device="cpu")


def test_a_split_folder_given_as_the_corpus_is_named_with_the_corpus_folder(model_and_corpus, monkeypatch):
    """`--corpus corpus/test` (the split's folder) ended with a TypeError traceback ("'<' not supported between
    instances of 'dict' and 'dict'"); a folder of no corpus with datasets' words, not the fix."""
    import training.evaluation.evaluate as evaluate

    model_dir, corpus_dir = model_and_corpus
    monkeypatch.setattr(evaluate, "load_model", lambda *args: pytest.fail("the model loaded first"))
    with pytest.raises(FileNotFoundError, match=rf"is a split of the corpus {corpus_dir}: pass the corpus folder"):
        evaluate_model(model_dir, corpus_dir / "test", "test", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"is not a corpus folder \(no dataset_dict.json\)"):
        evaluate_model(model_dir, model_dir, "test", device="cpu")


def test_the_pathway_baseline_names_the_training_splits_most_frequent_pathways_for_every_cell():
    from datasets import Dataset

    from training.evaluation.evaluate import pathway_baseline

    train = Dataset.from_dict({"pathways": [["TCA Cycle", "Glycolysis"], ["TCA Cycle", "Ribosome"],
                                            ["Glycolysis", "TCA Cycle"]]})
    test = Dataset.from_dict({"pathways": [["TCA Cycle", "Glycolysis"], ["Ribosome", "Apoptosis"]]})
    baseline = pathway_baseline(train, test)
    assert baseline["pathways"] == ["TCA Cycle", "Glycolysis"]
    assert baseline["subset_accuracy"] == 0.5 and baseline["jaccard"] == pytest.approx((1 + 0) / 2)
    assert baseline["num_distinct_predicted"] == 1


def test_the_evaluation_reports_the_pathway_baseline_where_the_corpus_has_pathways(model_and_corpus, tmp_path):
    """The evaluation attaches the baseline (a reviewer: deleting it passed the suite, the tiny corpus has no
    pathways); a training split without pathways gives none."""
    import shutil

    from datasets import load_from_disk

    model_dir, corpus_dir = model_and_corpus
    corpus = load_from_disk(str(corpus_dir))
    named = ["TCA Cycle", "Glycolysis", "Ribosome"]
    with_pathways = corpus.map(lambda row, i: {"pathways": [named[i % 3], named[(i + 1) % 3]]}, with_indices=True)
    with_pathways.save_to_disk(str(tmp_path / "corpus"))
    for extra in ("feature_extractor", "summary.json"):
        source = corpus_dir / extra
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / "corpus" / extra)
    results, _, _ = evaluate_model(model_dir, tmp_path / "corpus", "test", batch_size=4, max_new_tokens=4,
                                   device="cpu", other_corpus=True)
    assert results["pathway_baseline"]["num_cells"] == results["pathways"]["num_cells"] == len(corpus["test"])
    assert results["pathway_baseline"]["num_distinct_predicted"] == 1
    assert len(results["pathway_baseline"]["pathways"]) == 2
    results, _, _ = evaluate_model(model_dir, corpus_dir, "test", batch_size=4, max_new_tokens=4, device="cpu")
    assert "pathway_baseline" not in results
