"""Cell-type label scoring and constrained descriptions on a tiny random model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from tiny_parts import make_tiny_tokenizer, tiny_bert_config, tiny_llama_config

from modeling_cell2text import (
    Cell2TextConfig,
    Cell2TextFeatureExtractor,
    Cell2TextForConditionalGeneration,
    Cell2TextProcessor,
)
from modeling_cell2text.label_scoring import (
    cell_type_candidates,
    cell_type_sentence,
    fit_temperature,
    score_cell_types,
    shared_prefix_length,
)

GENES = [f"ENSG{i:011d}" for i in range(1, 61)]
CELL_TYPES = {
    "B cell": "CL:0000236",
    "T cell": "CL:0000084",
    "monocyte": "CL:0000576",
    "erythrocyte": "CL:0000232",
    "CD14-positive monocyte": "CL:0001054",
}


def counts(n_cells: int, seed: int = 0) -> sp.csr_matrix:
    """Cells expressing 3-20 genes, so prompts differ in length and batches are left padded."""
    rng = np.random.default_rng(seed)
    matrix = np.zeros((n_cells, len(GENES)), dtype=np.float32)
    for row in range(n_cells):
        n = int(rng.integers(3, 21))
        matrix[row, rng.choice(len(GENES), n, replace=False)] = rng.integers(1, 20, n)
    return sp.csr_matrix(matrix)


@pytest.fixture(scope="module")
def model_and_processor():
    feature_extractor = Cell2TextFeatureExtractor.from_gene_medians({g: 1.0 + (i % 4) for i, g in enumerate(GENES)})
    processor = Cell2TextProcessor(
        feature_extractor, make_tiny_tokenizer(), num_cell_tokens=8, system_prompt="Describe the cell.",
        user_prompt="Cell: ", ontology_term_ids={"cell_type": CELL_TYPES},
    )
    torch.manual_seed(0)
    config = Cell2TextConfig(
        gene_encoder_config=tiny_bert_config(len(GENES) + 4),
        text_config=tiny_llama_config(len(processor.tokenizer), initializer_range=0.5),
        cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16,
    )
    return Cell2TextForConditionalGeneration(config).eval(), processor


def sentence_log_likelihood(model, processor, cell: sp.csr_matrix, label: str) -> float:
    """Log-likelihood of the whole first sentence after one cell's prompt: one plain forward pass, no cache."""
    inputs = processor(cell, GENES)
    sentence = processor.tokenizer(cell_type_sentence(label), add_special_tokens=False)["input_ids"]
    input_ids = torch.cat([inputs["input_ids"], torch.tensor([sentence])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, gene_input_ids=inputs["gene_input_ids"],
                       gene_attention_mask=inputs["gene_attention_mask"],
                       gene_token_mask=inputs["gene_token_mask"]).logits[0]
    log_probs = logits.log_softmax(-1)
    start = inputs["input_ids"].shape[1]
    return sum(float(log_probs[start - 1 + t, token]) for t, token in enumerate(sentence))


def test_confidence_equals_a_direct_log_likelihood_and_sums_to_one(model_and_processor):
    model, processor = model_and_processor
    cells = counts(3, seed=1)
    inputs = processor(cells, GENES)
    assert (inputs["attention_mask"] == 0).any(), "the batch should be left padded"
    # max_rows=3 with 5 candidates: candidates in two chunks, one cell per chunk (the cache copied and repeated)
    scores = score_cell_types(model, processor, inputs, max_rows=3)
    assert scores.candidates == sorted(CELL_TYPES)
    probabilities = scores.probabilities
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))
    for i in range(3):
        direct = torch.tensor([sentence_log_likelihood(model, processor, cells[i], c) for c in scores.candidates])
        torch.testing.assert_close(probabilities[i], direct.softmax(0), atol=1e-5, rtol=1e-4)
        # the span scores differ from whole-sentence log-likelihoods only by the shared start, the same for all
        torch.testing.assert_close(scores.log_likelihoods[i] - scores.log_likelihoods[i, 0], direct - direct[0],
                                   atol=1e-4, rtol=1e-4)
        assert scores.labels[i] == scores.candidates[int(direct.argmax())]
        assert scores.scores[i] == pytest.approx(float(direct.softmax(0).max()), abs=1e-5)
    # one forward for all rows gives the same figures as the chunked one
    torch.testing.assert_close(score_cell_types(model, processor, inputs, max_rows=64).log_likelihoods,
                               scores.log_likelihoods, atol=1e-4, rtol=1e-4)


def test_the_benchmarks_former_describe_writes_the_best_label_first(model_and_processor):
    """benchmarks/former_describe.py (the baseline the schema decoder is timed against): each text starts with its
    cell's most likely known label, and the model writes on after it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.former_describe import generate_with_cell_type

    model, processor = model_and_processor
    inputs = processor(counts(6, seed=2), GENES)
    free = processor.parse_descriptions(processor.post_process_generation(
        model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id),
        inputs["input_ids"].shape[1]))
    assert not any(r["cell_type"] in CELL_TYPES for r in free), "a random model writes no known label freely"
    texts = generate_with_cell_type(model, processor, inputs, max_new_tokens=6, do_sample=False)
    labels = score_cell_types(model, processor, inputs).labels
    assert len(texts) == 6 and all(label in CELL_TYPES for label in labels)
    for text, label in zip(texts, labels):
        assert text.startswith(cell_type_sentence(label))
        assert len(text) > len(cell_type_sentence(label)), "the model writes on after the forced sentence"
    with pytest.raises(RuntimeError, match="wrong cells.*num_return_sequences=1"):
        generate_with_cell_type(model, processor, inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2)


def test_score_of_labels_outside_the_candidates_is_none(model_and_processor):
    model, processor = model_and_processor
    scores = score_cell_types(model, processor, processor(counts(2), GENES), candidates=["B cell", "T cell"])
    values = scores.score_of(["T cell", "platelet"])
    assert values[0] == pytest.approx(float(scores.probabilities[0, 1])) and values[1] is None


def test_candidates_need_known_labels(model_and_processor):
    _, processor = model_and_processor
    assert cell_type_candidates(processor) == sorted(CELL_TYPES)
    bare = Cell2TextProcessor(processor.feature_extractor, processor.tokenizer, num_cell_tokens=8)
    with pytest.raises(ValueError, match="constrained=False"):
        cell_type_candidates(bare)
    model, _ = model_and_processor
    with pytest.raises(ValueError, match="remove it from the candidates"):
        score_cell_types(model, processor, processor(counts(1), GENES), candidates=["B cell", "cell type. 2"])


def test_a_label_sentence_tokenizes_as_it_starts_a_training_description(model_and_processor):
    """Scoring reads the tokens training put the loss on: the sentence's tokens begin the description's."""
    from modeling_cell2text import CellDescription, render_description

    _, processor = model_and_processor
    tokenize = processor.tokenizer
    for label in [*CELL_TYPES, "CD4-positive, alpha-beta memory T cell", "T cell (CD4+)"]:
        sentence = tokenize(cell_type_sentence(label), add_special_tokens=False)["input_ids"]
        description = render_description(CellDescription(cell_type=label, cell_type_definition="A blood cell",
                                                         tissue="blood", disease="normal"))
        assert tokenize(description, add_special_tokens=False)["input_ids"][: len(sentence)] == sentence, label


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at(true_temperature):
    generator = torch.Generator().manual_seed(0)
    log_likelihoods = torch.randn(20000, 11, generator=generator) * 4
    targets = torch.multinomial((log_likelihoods / true_temperature).softmax(-1), 1, generator=generator)[:, 0]
    assert fit_temperature(log_likelihoods, targets) == pytest.approx(true_temperature, rel=0.03)


def test_the_models_temperature_calibrates_scores_without_changing_labels(model_and_processor):
    model, processor = model_and_processor
    inputs = processor(counts(4), GENES)
    plain = score_cell_types(model, processor, inputs)
    model.config.cell_type_temperature = 4.0
    try:
        scaled = score_cell_types(model, processor, inputs)
    finally:
        model.config.cell_type_temperature = 1.0
    assert scaled.labels == plain.labels and torch.equal(scaled.log_likelihoods, plain.log_likelihoods)
    assert torch.allclose(scaled.probabilities, (plain.log_likelihoods / 4.0).softmax(-1))
    assert torch.allclose(scaled.probabilities.sum(-1), torch.ones(4))
    assert max(scaled.scores) < max(plain.scores)  # a higher temperature spreads the probability


@pytest.mark.parametrize("temperature", [0.0, float("inf"), float("nan")])
def test_a_temperature_that_is_not_finite_and_positive_is_refused(temperature):
    """Infinity made every score 1 / (number of labels), exit 0."""
    with pytest.raises(ValueError, match="cell_type_temperature must be a finite number > 0"):
        Cell2TextConfig(gene_encoder_config=tiny_bert_config(64), text_config=tiny_llama_config(64),
                        cell_type_temperature=temperature)
    with pytest.raises(ValueError, match="expected a finite number > 0"):
        Cell2TextConfig(gene_encoder_config=tiny_bert_config(64), text_config=tiny_llama_config(64),
                        field_temperatures={"tissue": temperature})


def test_shared_prefix_leaves_each_list_a_token_of_its_own():
    """A single candidate (a processor kept to one cell type) keeps its last token to score: shared tokens stop one
    short of the shortest list."""
    assert shared_prefix_length([[5, 6, 7]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1
    assert shared_prefix_length([[1, 2, 3], [1, 4, 3]]) == 1
