"""The cell-to-text pipeline with the cell type constrained to the processor's known labels (the default)."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import scipy.sparse as sp
from test_pipeline import GENES, ONTOLOGY_IDS, random_counts, save_tiny_model_folder
from transformers import pipeline

from modeling_cell2text.label_scoring import cell_type_sentence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CELL_TYPES = {**ONTOLOGY_IDS["cell_type"], "T cell": "CL:0000084", "monocyte": "CL:0000576"}


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    """A random model whose processor knows three cell types."""
    return save_tiny_model_folder(tmp_path_factory.mktemp("constrained"), trained=False,
                                  labels={"ontology_term_ids": {**ONTOLOGY_IDS, "cell_type": CELL_TYPES}})


def test_pipeline_constrains_the_cell_type_by_default_with_a_score(random_dir):
    describe = pipeline("cell-to-text", model=str(random_dir), trust_remote_code=True, device="cpu")
    assert type(describe).__module__.startswith("transformers_modules.")  # label_scoring travelled with it
    assert (random_dir / "label_scoring.py").exists()
    counts = random_counts(5, seed=3)
    results = describe(counts, gene_ids=GENES, batch_size=2, max_new_tokens=4)
    for result in results:
        assert result["cell_type"] in CELL_TYPES
        assert result["cell_type_ontology_term_id"] == CELL_TYPES[result["cell_type"]]
        assert result["description"].startswith(cell_type_sentence(result["cell_type"]))
        assert 1 / 3 <= result["cell_type_score"] <= 1
    # batching does not change labels or scores (left padding is handled)
    one_by_one = describe(sp.csr_matrix(counts), gene_ids=GENES, batch_size=1, max_new_tokens=4)
    assert [r["cell_type"] for r in one_by_one] == [r["cell_type"] for r in results]
    np.testing.assert_allclose([r["cell_type_score"] for r in one_by_one], [r["cell_type_score"] for r in results],
                               rtol=1e-4)
    free = describe(counts, gene_ids=GENES, max_new_tokens=4, constrained=False)
    assert all(r["cell_type_score"] is None for r in free)
    assert [r["description"] for r in free] != [r["description"] for r in results]


@pytest.mark.parametrize("setting", [dict(repetition_penalty=50.0), dict(no_repeat_ngram_size=2),
                                     dict(temperature=0.5), dict(eos_token_id=3), dict(streamer=object()),
                                     dict(logits_processor=[lambda ids, scores: 1 / 0]),
                                     dict(generate_kwargs={"stop_strings": ["."]})])
def test_settings_the_constrained_decoder_does_not_use_are_refused(random_dir, setting):
    # the reviewer's finding: they were accepted, did nothing, and tl recorded them as run
    describe = pipeline("cell-to-text", model=str(random_dir), trust_remote_code=True, device="cpu")
    counts = random_counts(2, seed=3)
    name = next(iter(setting.get("generate_kwargs", setting)))
    with pytest.raises(ValueError, match=rf"\['{name}'\]: generation settings that schema-constrained describing "
                                         r"does not use .* or pass constrained=False"):
        describe(counts, gene_ids=GENES, **setting)
    # what it takes: its search width, and free text's settings at the values it runs with or its length bounds
    describe(counts, gene_ids=GENES, num_beams=1, do_sample=False, num_return_sequences=1, max_new_tokens=3)
    # and a copy of the model's own generation config with its search width set (the second reader's finding)
    config = copy.deepcopy(describe.model.generation_config)
    config.num_beams, config.use_cache = 3, True
    describe(counts, gene_ids=GENES, generation_config=config, eos_token_id=describe.model.generation_config.eos_token_id)


def test_a_generation_configs_settings_count_in_constrained_describing_as_if_passed_one_by_one(random_dir):
    """The settings of a `generation_config` passed to a constrained call are read as loose ones: one the decoder
    does not use is refused as it is loose (taken from the config alone, it would be ignored, exit 0)."""
    from transformers import GenerationConfig

    describe = pipeline("cell-to-text", model=str(random_dir), trust_remote_code=True, device="cpu")
    with pytest.raises(ValueError, match=r"\['repetition_penalty'\]: generation settings that schema-constrained "
                                         "describing does not use"):
        describe(random_counts(1, seed=3), gene_ids=GENES, generation_config=GenerationConfig(repetition_penalty=50.0))
