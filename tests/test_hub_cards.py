"""Tests for hub_cards: model and dataset cards rendered from real-shaped results, saved and reloaded."""

import math

import pytest
from huggingface_hub import DatasetCard, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from hub_cards import render_dataset_card, render_model_card

REPO = "demo-org/cell2text-smollm2-pbmc"
DATASET = "demo-org/pbmc68k-cell2text"


def _field(acc, f1, prec, rec, missing=0, **extra):
    return {"accuracy": acc, "weighted_f1": f1, "macro_precision": prec, "macro_recall": rec, "num_missing": missing, **extra}


@pytest.fixture
def results():
    return {
        "model": REPO,
        "dataset": DATASET,
        "split": "test",
        "num_cells": 140,
        "parse_rate": 0.9857,
        "num_unparsed": 2,
        "fields": {
            "cell_type": _field(0.6214, 0.5876, 0.5123, 0.4987, 4, ontology_similarity=0.8123),
            "tissue": _field(1.0, 1.0, 1.0, 1.0),
            "disease": _field(1.0, 1.0, 1.0, 1.0),
            "sex": {"accuracy": float("nan"), "weighted_f1": None},  # unknown sex in the source: left out
        },
        "pathways": {"subset_accuracy": 0.2143, "jaccard": 0.5512, "f1": 0.6034},
        "text": {"bleu_signature": "nrefs:1|case:lc|eff:no|tok:13a|smooth:none|version:2.6.0",
                 "bleu1": 0.7101, "bleu4": 0.4213, "rouge1": 0.7511, "rouge2": 0.6012, "rougeL": 0.7034,
                 "meteor": float("nan"), "embedding_similarity": 0.9132},
        "baselines": {
            "majority": {"cell_type": {"accuracy": 0.3429, "weighted_f1": 0.1751}},
            "logistic_regression": {"cell_type": {"accuracy": 0.8286, "weighted_f1": 0.8207}},
            "knn": {"cell_type": {"accuracy": 0.7929, "weighted_f1": 0.7811}},
        },
    }


@pytest.fixture
def summary():
    return {
        "name": "PBMC68k Cell2Text (demo)",
        "source": "scanpy pbmc68k_reduced (10x Genomics PBMC)",
        "num_cells_in": 700,
        "splits": {"train": 560, "validation": 70, "test": 70},
        "rejected": {"no_known_genes": 0, "missing_cell_type": 0},
        "label_counts": {
            "cell_type": {
                "train": {"dendritic cell": 192, "CD14-positive monocyte": 103, "B cell": 76},
                "validation": {"dendritic cell": 24, "CD14-positive monocyte": 13, "B cell": 10},
                "test": {"dendritic cell": 24, "CD14-positive monocyte": 13, "B cell": 9},
            },
            "tissue": {"train": {"blood": 560}, "validation": {"blood": 70}, "test": {"blood": 70}},
        },
        "gene_vocabulary_size": 700,
        "pathway_library": "WikiPathway_2023_Human",
        "seed": 0,
    }


def _model_card(results, tmp_path):
    card = render_model_card(
        results,
        repo_id=REPO,
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        encoder="random-init BertConfig (no pretrained Geneformer offline)",
        dataset_id=DATASET,
        training_config={"learning_rate": 2e-4, "lora_r": 16, "num_train_epochs": 3, "max_steps": None},
    )
    path = tmp_path / "README.md"
    card.save(path)
    return ModelCard.load(path), path.read_text()


def test_model_card_metadata_round_trips_with_metric_values(results, tmp_path):
    card, _ = _model_card(results, tmp_path)
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers"
    assert "pipeline_tag" not in data and data["inference"] is False  # no widget: it cannot feed a cell
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["datasets"] == [DATASET]
    assert {"cell-to-text", "single-cell", "custom_code"} <= set(data["tags"])

    name, evals = model_index_to_eval_results(data["model-index"])  # the Hub's own parser
    assert name == "cell2text-smollm2-pbmc"
    values = {(e.metric_type, e.metric_config): e.metric_value for e in evals}
    assert values[("accuracy", "cell_type")] == 0.6214
    assert values[("f1", "cell_type")] == 0.5876
    assert values[("ontology_similarity", "cell_type")] == 0.8123
    assert values[("accuracy", "tissue")] == 1.0
    assert values[("parse_rate", None)] == 0.9857
    assert values[("bleu", "bleu4")] == 0.4213
    assert values[("rouge", "rougeL")] == 0.7034
    assert values[("jaccard", "pathways")] == 0.5512
    assert all(e.task_type == "text-generation" and e.task_name == "Cell to text" for e in evals)
    assert all(e.dataset_type == DATASET and e.dataset_split == "test" for e in evals)
    assert all(isinstance(e.metric_value, float) and math.isfinite(e.metric_value) for e in evals)
    # Absent or NaN metrics are left out, not written as nan.
    assert ("accuracy", "sex") not in values and ("meteor", "meteor") not in values


def test_model_card_body_has_usage_limits_and_tables(results, tmp_path):
    card, text = _model_card(results, tmp_path)
    assert "nan" not in text.lower()
    assert f'pipeline("cell-to-text", model="{REPO}", trust_remote_code=True)' in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", trust_remote_code=True)' in card.text
    assert f"cell2text describe cells.h5ad --model {REPO} --out cells_described.h5ad" in card.text
    assert "pip install cell2text" not in card.text and "pip install ./cell2text" in card.text
    assert "METEOR (exact + stem, no synonyms)" not in card.text  # NaN: left out, but the note stays
    assert "Porter stems only" in card.text
    assert "Demo scale: evaluated on 140 cells" in card.text
    assert "not initialised from pretrained Geneformer weights" in card.text
    assert "| Cell type | 0.621 | 0.588 | 0.512 | 0.499 | 0.812 | 4 |" in card.text
    assert "| Cell type | Logistic regression | 0.829 | 0.821 |" in card.text
    assert "| Sex |" not in card.text
    assert "98.6% of them parsed (2 did not)" in card.text
    assert "| `lora_r` | `16` |" in card.text and "max_steps" not in card.text
    assert "BLEU by sacrebleu (`nrefs:1|case:lc|eff:no|tok:13a|smooth:none|version:2.6.0`)" in card.text


def test_the_card_of_a_smoke_run_says_so(results, tmp_path):
    """The main job's --max-steps (results.json's max_steps): the report said "1 training steps only", the card
    stated the figures of a model trained one step as the model's, with no word of the cap, exit 0."""
    _, text = _model_card({**results, "max_steps": 1}, tmp_path)
    assert "A smoke run: trained 1 step only (--max-steps), not the recipe's training" in text
    _, text = _model_card(results, tmp_path)
    assert "smoke run" not in text


def test_model_card_with_local_paths_keeps_them_out_of_metadata(results, tmp_path):
    card = render_model_card(
        {"split": "test", "num_cells": 5000, "fields": {"cell_type": {"accuracy": 0.9}}},
        repo_id=REPO,
        base_model=str(tmp_path),  # a local checkpoint, not a Hub id
        encoder="ctheodoris/Geneformer",
        dataset_id=DATASET,
        training_config={},
    )
    data = card.data.to_dict()
    assert "base_model" not in data
    _, evals = model_index_to_eval_results(data["model-index"])
    assert [(e.metric_type, e.metric_value) for e in evals] == [("accuracy", 0.9)]
    assert "Demo scale" not in card.text and "not initialised from pretrained" not in card.text


def test_the_encoder_claim_follows_the_evaluated_models_record(tmp_path):
    # "not initialised from pretrained Geneformer weights" was keyed on the encoder's name: a local folder of
    # pretrained Geneformer was said to be untrained
    def claims_untrained(encoder, prepared):
        results = {"split": "test", "num_cells": 5000, "fields": {}, "gene_encoder_prepared_on_corpus": prepared}
        card = render_model_card(results, repo_id=REPO, base_model="b", encoder=encoder, dataset_id=DATASET,
                                 training_config={})
        return "not initialised from pretrained" in card.text

    assert not claims_untrained(str(tmp_path / "Geneformer-V2-316M"), False)
    assert claims_untrained("ctheodoris/Geneformer", True)
    assert claims_untrained(str(tmp_path / "gene_encoder"), None)  # an evaluation without the record: by the name


def test_dataset_card_round_trips_with_counts_and_label_tables(summary, tmp_path):
    card = render_dataset_card(summary, repo_id=DATASET, license="cc-by-4.0")
    path = tmp_path / "README.md"
    card.save(path)
    loaded = DatasetCard.load(path)
    data = loaded.data.to_dict()
    assert data["license"] == "cc-by-4.0"
    assert data["pretty_name"] == "PBMC68k Cell2Text (demo)"
    assert data["size_categories"] == ["n<1K"]
    assert "text-generation" in data["task_categories"]
    text = loaded.text
    assert "| train | 560 | 80.0% |" in text and "| **total** | 700 | 100.0% |" in text
    assert "| Label | train | validation | test | Total |" in text
    assert "| dendritic cell | 192 | 24 | 24 | 240 |" in text
    assert "| B cell | 76 | 10 | 9 | 95 |" in text
    assert "| blood | 560 | 70 | 70 | 700 |" in text
    assert "no_known_genes" not in text  # zero-count rejection reasons are not listed
    assert 'load_dataset("demo-org/pbmc68k-cell2text")' in text
    assert "WikiPathway_2023_Human" in text and "scanpy pbmc68k_reduced" in text
    assert "cross-validation" not in text
    # A corpus built as one fold of a k-fold cross-validation says so beside its splits.
    text = render_dataset_card({**summary, "fold": {"fold": 2, "num_folds": 5}, "seed": 7}, repo_id=DATASET).text
    assert "Fold 2 of 5 of a k-fold cross-validation (seed 7):" in text
    assert "the test splits of folds 0 to 4 partition the cells" in text


def test_the_dataset_card_records_the_values_the_corpus_was_read_as(summary):
    """docs/corpus.md says the card records `input_values` (pbmc68k_reduced is read as log1p, not counts): it did
    not."""
    text = render_dataset_card({**summary, "input_values": "log1p"}, repo_id=DATASET).text
    assert "- **Expression values read as:** `log1p`" in text
    assert "Expression values" not in render_dataset_card(summary, repo_id=DATASET).text  # a summary without it


def test_a_dataset_card_without_a_repo_loads_the_corpus_from_its_folder(summary, tmp_path):
    text = render_dataset_card(summary, repo_id=None, folder=str(tmp_path / "pbmc-corpus")).text
    assert 'from datasets import load_from_disk\n\ncorpus = load_from_disk("pbmc-corpus")' in text
    assert "load_dataset(" not in text and str(tmp_path) not in text


def test_dataset_card_license_defaults_to_unknown_and_long_label_tails_are_summed(tmp_path):
    counts = {f"type {i:02d}": 100 - i for i in range(45)}
    summary = {"name": "big", "splits": {"train": sum(counts.values())}, "label_counts": {"cell_type": {"train": counts}}}
    card = render_dataset_card(summary, repo_id=DATASET)
    assert card.data.to_dict()["license"] == "unknown"
    assert "| type 39 | 61 | 61 |" in card.text and "type 40" not in card.text
    assert "| *5 more labels* | 290 | 290 |" in card.text  # 60 + 59 + 58 + 57 + 56


def test_size_categories():
    from hub_cards.render import size_category

    assert [size_category(n) for n in (0, 999, 1000, 54_321, 2_000_000)] == ["n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]


def test_no_local_path_reaches_the_model_card(tmp_path):
    """The demo passes its corpus folder, encoder folder and argument values: the card names none of them."""
    corpus, encoder = tmp_path / "outputs" / "corpus", tmp_path / "outputs" / "sft" / "gene_encoder"
    results = {"dataset": str(corpus), "split": "test", "num_cells": 70,
               "fields": {"cell_type": {"accuracy": 0.6}}, "text": {"meteor": 0.8}}
    card = render_model_card(
        results, repo_id=REPO, base_model=str(tmp_path / "SmolLM2"), encoder=str(encoder),
        dataset_id="pbmc68k_reduced (scanpy)",
        training_config={"corpus_dir": str(corpus), "output_dir": "outputs/demo/sft", "lora_r": 16},
        ontology_versions={"cellxgene_schema": "7.1.0", "CL": "v2026-03-26"},
    )
    path = tmp_path / "README.md"
    card.save(path)
    text = path.read_text()
    assert str(tmp_path) not in text and "/tmp" not in text and "outputs/" not in text
    data = ModelCard.load(path).data.to_dict()
    assert "datasets" not in data  # "pbmc68k_reduced (scanpy)" is no Hub dataset id
    _, evals = model_index_to_eval_results(data["model-index"])
    assert {(e.dataset_type, e.dataset_name) for e in evals} == {("corpus", "corpus")}
    assert "| METEOR (exact + stem, no synonyms) | 0.800 |" in text
    assert "| `corpus_dir` | `corpus` |" in text and "The gene encoder (gene_encoder)" in text
    assert "| CELLxGENE schema | `7.1.0` |" in text and "| CL | `v2026-03-26` |" in text


def test_saved_card_inputs_rerender_for_another_repo(results, tmp_path):
    from hub_cards.render import rerender_model_card, save_model_card

    save_model_card(tmp_path, results, repo_id=REPO, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                    encoder=str(tmp_path / "enc"), dataset_id=DATASET, training_config={"output_dir": str(tmp_path)})
    assert str(tmp_path) not in (tmp_path / "model_card_inputs.json").read_text()
    card = rerender_model_card(tmp_path, "another-org/cell2text")
    assert 'model="another-org/cell2text"' in card.text and REPO not in (tmp_path / "README.md").read_text()
    assert rerender_model_card(tmp_path / "missing", "another-org/cell2text") is None


def test_the_model_card_says_which_suspension_types_the_model_was_trained_on(results, tmp_path):
    """A model trained on cells and nuclei (or cells only) said neither: its card named no suspension type, so a
    reader describing nuclei with a model trained on cells had no word of it. The corpus summary's counts are shown,
    kept through a re-render for another repo."""
    from hub_cards.render import rerender_model_card, save_model_card

    inputs = dict(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", encoder="enc", dataset_id=DATASET,
                  training_config={})
    save_model_card(tmp_path, results, repo_id=REPO, suspension_types={"cell": 17, "nucleus": 5}, **inputs)
    for text in ((tmp_path / "README.md").read_text(), rerender_model_card(tmp_path, "another-org/c2t").text):
        assert "### Cells and nuclei" in text and "| cell | 17 |" in text and "| nucleus | 5 |" in text
        assert "not seen in\ntraining" in text
    unrecorded = render_model_card(results, repo_id=REPO, suspension_types={}, **inputs).text
    assert "does not say whether its profiles are of cells or nuclei" in unrecorded
    assert "Cells and nuclei" not in render_model_card(results, repo_id=REPO, **inputs).text  # not given


def test_dataset_card_pushed_after_the_data_keeps_the_datasets_metadata(summary, monkeypatch):
    from hub_cards import render

    written_by_datasets = DatasetCard(
        "---\ndataset_info:\n  features:\n  - name: cell_id\n    dtype: string\n  splits:\n  - name: train\n"
        "    num_examples: 560\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/train-*\n---\n"
    )
    pushed = []
    monkeypatch.setattr(DatasetCard, "load", classmethod(lambda cls, repo_id, **kw: written_by_datasets))
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, repo_id, **kw: pushed.append((repo_id, self)))
    summary = {**summary, "ontology_versions": {"cellxgene_schema": "7.1.0", "CL": "v2026-03-26"}}
    render.push_dataset_card(render_dataset_card(summary, repo_id=DATASET, license="cc-by-4.0"), DATASET)
    (repo_id, card), = pushed
    data = card.data.to_dict()
    assert repo_id == DATASET and data["license"] == "cc-by-4.0" and data["pretty_name"] == "PBMC68k Cell2Text (demo)"
    assert data["configs"][0]["data_files"][0]["path"] == "data/train-*"
    assert data["dataset_info"]["splits"][0]["num_examples"] == 560
    assert "| dendritic cell | 192 | 24 | 24 | 240 |" in card.text and "| CL | `v2026-03-26` |" in card.text


def test_no_local_path_reaches_the_dataset_card(summary, tmp_path):
    source = tmp_path / "data" / "cells.h5ad"
    card = render_dataset_card({**summary, "source": str(source), "name": str(tmp_path / "corpus")}, repo_id=DATASET)
    path = tmp_path / "README.md"
    card.save(path)
    text = path.read_text()
    assert str(tmp_path) not in text and "/tmp" not in text
    assert "cells.h5ad" in text and DatasetCard.load(path).data.to_dict()["pretty_name"] == "corpus"


def test_model_card_shows_the_confidence_of_each_field(results, tmp_path):
    calibrated = {**results, "field_calibration": {
        "cell_type": {"num_labels": 10, "ece": 0.089, "mean_confidence": 0.789, "accuracy": 0.7, "num_cells": 70},
        "tissue": {"num_labels": 1, "ece": 0.0, "mean_confidence": 1.0, "accuracy": 1.0, "num_cells": 70}}}
    card, _ = _model_card(calibrated, tmp_path)
    assert "### Confidence of each field" in card.text
    assert "| Cell type | 10 | 0.089 | 0.789 | 0.700 |" in card.text and "| Tissue | 1 |" in card.text
    plain, _ = _model_card(results, tmp_path)
    assert "### Confidence of each field" not in plain.text  # no table without the evaluation's figures


def test_the_card_shows_the_pathway_baseline_beside_the_model(results, tmp_path):
    results["pathway_baseline"] = {"pathways": ["TCA Cycle"], "subset_accuracy": 0.1, "jaccard": 0.5512, "f1": 0.6}
    _, text = _model_card(results, tmp_path)
    assert "| Metric | Cell2Text | Most frequent in training, every cell |" in text
    assert "| Jaccard | 0.551 | 0.551 |" in text
