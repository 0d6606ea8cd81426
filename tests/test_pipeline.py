"""The cell-to-text pipeline on a saved tiny model folder: AnnData and matrix input, batching, errors."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from tiny_parts import save_tiny_parts
from transformers import AutoTokenizer, GenerationConfig, pipeline

from modeling_cell2text import (
    Cell2TextConfig,
    Cell2TextFeatureExtractor,
    Cell2TextForConditionalGeneration,
    Cell2TextPipeline,
    Cell2TextProcessor,
    CellDescription,
    render_description,
    save_model_folder,
)

GENES = [f"ENSG{i:011d}" for i in range(1, 61)]
ONTOLOGY_IDS = {
    "cell_type": {"B cell": "CL:0000236"},
    "tissue": {"blood": "UBERON:0000178"},
    "disease": {"normal": "PATO:0000461"},
}
DESCRIPTION = render_description(CellDescription(cell_type="B cell", tissue="blood", disease="normal"))
FIELDS = ("description", "parsed", "cell_type", "tissue", "disease", "sex", "age_group", "pathways",
          "cell_type_ontology_term_id", "tissue_ontology_term_id", "disease_ontology_term_id")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_counts(n_cells: int, seed: int = 0, max_genes: int = 20) -> np.ndarray:
    """Integer counts; cells express 3 to max_genes genes, so prompts differ in length (padding is exercised)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_cells, len(GENES)), dtype=np.float32)
    for row in range(n_cells):
        n = int(rng.integers(3, max_genes + 1))
        counts[row, rng.choice(len(GENES), n, replace=False)] = rng.integers(1, 20, n)
    return counts


def make_adata(n_cells: int, seed: int = 0) -> ad.AnnData:
    obs = pd.DataFrame({"cell_type": ["unknown"] * n_cells}, index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(X=sp.csr_matrix(random_counts(n_cells, seed)), obs=obs, var=pd.DataFrame(index=GENES))


def tiny_processor(lm_dir: Path) -> Cell2TextProcessor:
    feature_extractor = Cell2TextFeatureExtractor.from_gene_medians({g: 1.0 + (i % 4) for i, g in enumerate(GENES)})
    return Cell2TextProcessor(
        feature_extractor, AutoTokenizer.from_pretrained(lm_dir), num_cell_tokens=8,
        system_prompt="Describe the cell.", user_prompt="Cell: ", ontology_term_ids=ONTOLOGY_IDS,
    )


def save_tiny_model_folder(root: Path, trained: bool = True, seed: int = 0, labels: dict | None = None) -> Path:
    """Save a tiny Cell2Text model + processor folder, as training does (model and processor saved separately).

    trained=True: a few optimizer steps teach it one description, so generations parse into fields with ontology
    IDs. trained=False: random weights with a large init, so generations differ from cell to cell. `labels`: the
    processor's label tables (attribute -> value, e.g. {"ontology_term_ids": ...}) the model is saved with (a model
    checks its processor's labels against them).
    """
    root = Path(root)
    encoder_dir, lm_dir = save_tiny_parts(root / "parts", seed=seed)
    processor = tiny_processor(lm_dir)
    for name, value in (labels or {}).items():
        setattr(processor, name, value)
    torch.manual_seed(seed)
    if trained:
        model = Cell2TextForConditionalGeneration.from_pretrained_parts(
            encoder_dir, lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16
        )
        teach_one_description(model, processor)
    else:
        from tiny_parts import tiny_bert_config, tiny_llama_config

        config = Cell2TextConfig(
            gene_encoder_config=tiny_bert_config(len(GENES) + 4),
            text_config=tiny_llama_config(len(processor.tokenizer), initializer_range=0.5),
            cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16,
        )
        model = Cell2TextForConditionalGeneration(config)
    model_dir = root / ("trained" if trained else "random")
    save_model_folder(model.eval(), processor, model_dir)
    return model_dir


def teach_one_description(model, processor, steps: int = 60) -> None:
    batch = processor(sp.csr_matrix(random_counts(8, seed=1)), GENES, descriptions=[DESCRIPTION] * 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (10x on a busy 2-core machine)
    try:
        model.train()
        for _ in range(steps):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("cell2text"), trained=True)


@pytest.fixture(scope="session")
def random_dir(tmp_path_factory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("cell2text"), trained=False)


def test_saved_folder_carries_the_pipeline(trained_dir):
    config = json.loads((trained_dir / "config.json").read_text())
    assert config["custom_pipelines"]["cell-to-text"]["impl"] == "pipeline_cell2text.Cell2TextPipeline"
    assert (trained_dir / "pipeline_cell2text.py").exists()
    assert (trained_dir / "processor_config.json").exists()


def test_pipeline_describes_an_anndata_with_fields_and_ontology_ids(trained_dir):
    describe = pipeline("cell-to-text", model=str(trained_dir), trust_remote_code=True, device="cpu")
    assert type(describe).__module__.startswith("transformers_modules.")  # loaded from the folder, as remote code
    adata = make_adata(6)
    results = describe(adata, batch_size=4, max_new_tokens=40)
    assert len(results) == 6
    for result in results:
        assert set(FIELDS) <= set(result)
        assert result["description"] == DESCRIPTION
        assert result["parsed"] and result["cell_type"] == "B cell" and result["tissue"] == "blood"
        assert result["cell_type_ontology_term_id"] == "CL:0000236"
        assert result["tissue_ontology_term_id"] == "UBERON:0000178"
    # a slice of an AnnData describes only those cells
    assert len(describe(adata[2:5], max_new_tokens=40)) == 3


def reference_descriptions(model_dir: Path, counts: np.ndarray, max_new_tokens: int) -> list[str]:
    """One cell at a time, straight through processor + model.generate: what the pipeline must reproduce."""
    processor = Cell2TextProcessor.from_pretrained(model_dir)
    model = Cell2TextForConditionalGeneration.from_pretrained(model_dir).eval()
    texts = []
    for row in counts:
        inputs = processor(sp.csr_matrix(row[None]), GENES)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        texts += processor.post_process_generation(ids, inputs["input_ids"].shape[1])
    return texts


def test_batch_sizes_agree_with_one_cell_at_a_time_on_matrix_input(random_dir):
    counts = random_counts(7, seed=3)
    expected = reference_descriptions(random_dir, counts, max_new_tokens=8)
    assert len(set(expected)) > 1, "the random model should describe cells differently"
    describe = pipeline("cell-to-text", model=str(random_dir), trust_remote_code=True, device="cpu")
    # sparse and dense rows with their gene ids; batches of 4 mix prompt lengths (left padding)
    for batch_size, matrix in ((1, sp.csr_matrix(counts)), (4, sp.csr_matrix(counts)), (4, counts)):
        results = describe(matrix, gene_ids=GENES, batch_size=batch_size, max_new_tokens=8,
                           constrained=False)  # free generation, as the reference
        assert [r["description"] for r in results] == expected, (batch_size, type(matrix))
        assert all(set(FIELDS) <= set(r) for r in results)


def test_generate_kwargs_pass_through(random_dir):
    describe = pipeline("cell-to-text", model=str(random_dir), trust_remote_code=True, device="cpu")
    counts = random_counts(2, seed=4)
    short = describe(counts, gene_ids=GENES, generate_kwargs={"max_new_tokens": 2}, constrained=False)
    longer = describe(counts, gene_ids=GENES, max_new_tokens=10, min_new_tokens=10, constrained=False)
    tokenizer = describe.processor.tokenizer
    assert all(len(tokenizer(r["description"])["input_ids"]) <= 3 for r in short)
    assert all(len(tokenizer(r["description"])["input_ids"]) > 3 for r in longer)


def test_empty_cells_raise_or_are_skipped(random_dir):
    describe = pipeline("cell-to-text", model=str(random_dir), trust_remote_code=True, device="cpu")
    adata = make_adata(3)
    adata.X = adata.X.toarray()
    adata.X[1] = 0
    with pytest.raises(ValueError, match=r"1 cells express no gene.*'cell1'.*skip_empty_cells=True"):
        describe(adata, max_new_tokens=4)
    results = describe(adata, max_new_tokens=4, skip_empty_cells=True)
    assert results[1] is None and results[0] is not None and results[2] is not None


def test_every_empty_cell_is_found_before_any_is_described(random_dir, monkeypatch, caplog):
    """The QA findings: a cell without vocabulary genes in the second 512-cell block stopped the run after the first
    block was generated, naming only the cells of that block; skipped cells were logged by their rows in a block."""
    describe = pipeline("cell-to-text", model=str(random_dir), trust_remote_code=True, device="cpu")
    adata = make_adata(600)
    counts = adata.X.toarray()
    counts[[10, 560]] = 0
    adata.X = sp.csr_matrix(counts)
    generated = []
    monkeypatch.setattr(describe.model, "generate", lambda *a, **k: generated.append(1) or pytest.fail("generated"))
    with pytest.raises(ValueError, match=r"2 cells express no gene .*10 \('cell10'\), 560 \('cell560'\).*"
                                         r"or pass skip_empty_cells=True\."):
        describe(adata, max_new_tokens=2, constrained=False)
    assert not generated
    monkeypatch.undo()
    results = describe(adata[505:600].copy(), max_new_tokens=2, constrained=False, skip_empty_cells=True)
    assert [i for i, r in enumerate(results) if r is None] == [55]
    assert "Skipping 1 of 95 cells that express no vocabulary gene: 55 ('cell560')" in caplog.text
    assert "Skipped" not in caplog.text  # no second report by rows within a block


def test_model_folder_without_processor_is_a_clear_error(tmp_path, random_dir):
    model = Cell2TextForConditionalGeneration.from_pretrained(random_dir)
    model.save_pretrained(tmp_path / "no-processor")  # the model alone (save_model_folder saves all three)
    with pytest.raises(ValueError, match="save_model_folder"):
        pipeline("cell-to-text", model=str(tmp_path / "no-processor"), device="cpu")


# -- no silent wrong results (issue 9) -----------------------------------------------------------------------------


def local_pipeline(model_dir: Path) -> Cell2TextPipeline:
    """The installed package's pipeline on the package's classes (no code from the folder runs)."""
    return Cell2TextPipeline(
        model=Cell2TextForConditionalGeneration.from_pretrained(model_dir).eval(),
        processor=Cell2TextProcessor.from_pretrained(model_dir), device="cpu",
    )


def counts_of_varied_prompts() -> np.ndarray:
    """Cells expressing 3, 20, 5 and 12 genes: with 8 cell tokens their prompts differ, so order is visible."""
    counts = np.zeros((4, len(GENES)), dtype=np.float32)
    for row, n in enumerate((3, 20, 5, 12)):
        counts[row, (np.arange(n) * 3 + row) % len(GENES)] = np.arange(1, n + 1)
    return counts


@pytest.fixture(scope="module")
def random_pipeline(random_dir) -> Cell2TextPipeline:
    return local_pipeline(random_dir)


@pytest.mark.parametrize("constrained", [False, True])
def test_num_beams_is_checked_in_both_modes(random_pipeline, constrained):
    """The reviewer's finding: free describing took num_beams=0 to a ZeroDivisionError inside generate, and 2.0 to
    a torch TypeError; constrained refused numpy's integers, which batch_size takes."""
    counts = counts_of_varied_prompts()
    for beams in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match=rf"num_beams must be an integer >= 1, got {re.escape(repr(beams))}"):
            random_pipeline(counts, gene_ids=GENES, max_new_tokens=2, num_beams=beams, constrained=constrained)
    assert len(random_pipeline(counts, gene_ids=GENES, max_new_tokens=2, num_beams=np.int64(2),
                               constrained=constrained)) == len(counts)


def test_several_sequences_per_cell_are_refused(random_pipeline, random_dir):
    counts = counts_of_varied_prompts()
    with pytest.raises(ValueError, match=r"num_return_sequences=2 .*one description per cell"):
        random_pipeline(counts, gene_ids=GENES, max_new_tokens=2, num_return_sequences=2, do_sample=True)
    with pytest.raises(ValueError, match=r"num_return_sequences=3"):
        random_pipeline(counts, gene_ids=GENES, generate_kwargs={"num_return_sequences": 3, "num_beams": 3})
    # a model whose generation_config.json asks for 2 sequences: refused too, unless the call says 1
    model = random_pipeline.model
    saved = model.generation_config
    model.generation_config = GenerationConfig(do_sample=True, num_return_sequences=2)
    try:
        with pytest.raises(ValueError, match=r"generation_config.json"):
            random_pipeline(counts, gene_ids=GENES, max_new_tokens=2)
        assert len(random_pipeline(counts, gene_ids=GENES, max_new_tokens=2, num_return_sequences=1)) == 4
    finally:
        model.generation_config = saved


@pytest.mark.parametrize("tamper", ["reversed", "doubled", "dropped"])
def test_outputs_that_do_not_line_up_with_the_cells_are_never_returned(random_pipeline, monkeypatch, tamper):
    generate = random_pipeline.model.generate

    def tampered(*args, **kwargs):
        ids = generate(*args, **kwargs)
        return {"reversed": ids.flip(0), "doubled": ids.repeat_interleave(2, dim=0), "dropped": ids[1:]}[tamper]

    monkeypatch.setattr(random_pipeline.model, "generate", tampered)
    with pytest.raises(RuntimeError, match="wrong cells"):
        random_pipeline(counts_of_varied_prompts(), gene_ids=GENES, batch_size=4, max_new_tokens=2,
                        constrained=False)


def test_a_prompt_and_description_past_the_llms_positions_are_refused_before_any_cell(random_dir, tmp_path):
    """An LLM of fewer positions than the prompt and description need wrote on past them (rotary positions it was
    never trained at), exit 0, in both modes."""
    folder = tmp_path / "few-positions"
    shutil.copytree(random_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 60
    (folder / "config.json").write_text(json.dumps(config))
    describe = local_pipeline(folder)
    prompt = len(describe.processor._prompt_ids(8))
    with pytest.raises(ValueError, match=rf"The prompt \({prompt} tokens: the chat template and 8 cell tokens\) and "
                                         rf"max_new_tokens=30 need {prompt + 30} positions, but the language model has 60"):
        describe(make_adata(2), constrained=False, max_new_tokens=30)
    with pytest.raises(ValueError, match=r"the longest schema-constrained description \(about \d+ tokens\) need .* has 60"):
        describe(make_adata(2))
    assert len(describe(make_adata(2), constrained=False, max_new_tokens=60 - prompt)) == 2
    # max_length counts the prompt: past the positions it is refused, up to them it runs
    with pytest.raises(ValueError, match=r"and the description up to max_length=61 need 61 positions, but the "
                                         r"language model has 60"):
        describe(make_adata(2), constrained=False, max_length=61)
    assert len(describe(make_adata(2), constrained=False, max_length=60)) == 2


def test_batch_size_zero_is_an_error(random_pipeline):
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            random_pipeline(random_counts(2), gene_ids=GENES, batch_size=bad, max_new_tokens=2)


@pytest.mark.parametrize("fmt", ["coo", "csc", "lil"])
def test_any_scipy_sparse_format_gives_the_csr_results(random_pipeline, fmt):
    counts = counts_of_varied_prompts()
    expected = [r["description"] for r in random_pipeline(sp.csr_matrix(counts), gene_ids=GENES, max_new_tokens=4)]
    results = random_pipeline(sp.csr_matrix(counts).asformat(fmt), gene_ids=GENES, max_new_tokens=4)
    assert [r["description"] for r in results] == expected


def test_dataframe_and_float16_inputs_give_the_matrix_results(random_pipeline):
    counts = counts_of_varied_prompts()  # small integers: exact in float16
    expected = [r["description"] for r in random_pipeline(counts, gene_ids=GENES, max_new_tokens=4)]
    frame = pd.DataFrame(counts, columns=GENES)  # scanpy's adata.to_df(): genes from the columns
    assert [r["description"] for r in random_pipeline(frame, max_new_tokens=4)] == expected
    half = counts.astype(np.float16)  # scipy.sparse holds no float16: read as float32
    assert [r["description"] for r in random_pipeline(half, gene_ids=GENES, max_new_tokens=4)] == expected


def test_counts_in_adata_raw(random_pipeline, tmp_path):
    adata = make_adata(4)
    describe = functools.partial(random_pipeline, max_new_tokens=4, constrained=False)  # free text tells cells apart
    expected = [r["description"] for r in describe(adata)]
    assert len(set(expected)) == len(expected)  # so a row read for another cell shows
    with_raw = adata.copy()
    with_raw.raw = adata  # CELLxGENE's layout: counts in raw, normalised values (of fewer genes) in X
    with_raw = with_raw[:, 10:].copy()
    with_raw.X = with_raw.X.log1p()
    results = describe(with_raw, use_raw=True)
    assert [r["description"] for r in results] == expected
    # backed, and a slice of it
    with_raw.write_h5ad(tmp_path / "raw.h5ad")
    backed = ad.read_h5ad(tmp_path / "raw.h5ad", backed="r")
    assert [r["description"] for r in describe(backed, use_raw=True)] == expected
    assert [r["description"] for r in describe(backed[1:3], use_raw=True)] == expected[1:3]
    # a reversed slice of a backed file, which anndata cannot read: its words (a reshape) named no fix
    for view, kwargs in ((backed[::-1], {"use_raw": True}), (ad.read_h5ad(tmp_path / "raw.h5ad", backed="r")[::-1], {})):
        with pytest.raises(ValueError, match=r"could not read these cells of the backed file.*negative.*increasing"):
            random_pipeline(view, max_new_tokens=4, **kwargs)
    with pytest.raises(ValueError, match="adata.raw is None"):
        random_pipeline(adata, use_raw=True)
    with pytest.raises(ValueError, match="cannot be combined with layer"):
        random_pipeline(with_raw, use_raw=True, layer="counts")




@pytest.mark.parametrize("to_format", ["tocsr", "tocsc"])
def test_a_slice_of_a_backed_file_that_anndata_reads_wrongly_is_refused(random_pipeline, tmp_path, to_format):
    """anndata reads slices with a negative bound of a backed sparse file (or of an AnnData whose X is a dataset of a
    file) wrongly, exit 0: `backed[-3:-1]` of a CSR file the counts of the cells after the ones named (each cell
    described with its neighbour's counts), and a reversed slice reaching the first gene or cell, spelt with a stop
    before it (`:-(n + 1):-1`), in the file's order under the view's reversed names (a CSR file's genes, a CSC file's
    cells)."""
    import h5py

    adata = make_adata(4)
    adata.X = getattr(adata.X, to_format)()
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    with h5py.File(tmp_path / "cells.h5ad", "r") as file:  # an AnnData whose X is read from the file, not backed
        from_file = ad.AnnData(X=ad.io.sparse_dataset(file["X"]), obs=adata.obs, var=adata.var)
        views = {"cells": [backed[-3:-1], backed[: -(backed.n_obs + 1) : -1], from_file[-3:-1]],
                 "genes": [backed[:, : -(backed.n_vars + 1) : -1]]}
        fixes = {"cells": r"backed\[n - 5 : n - 2\] with n = backed.n_obs\)",
                 "genes": r"backed\[:, m - 5 : m - 2\] with m = backed.n_vars\)"}
        for what, sliced in views.items():
            for view in sliced:
                with pytest.raises(ValueError, match=rf"could not read these {what} of the backed file.*negative "
                                                     rf"start, stop or step.*\({fixes[what]}"):
                    random_pipeline(view, constrained=False, max_new_tokens=4)
    # the same cells sliced with non-negative bounds are read as the cells named (free text tells cells apart)
    expected = [r["description"] for r in random_pipeline(adata, constrained=False, max_new_tokens=4)]
    assert len(set(expected)) == 4
    assert [r["description"] for r in random_pipeline(backed[1:3], constrained=False, max_new_tokens=4)] == expected[1:3]

def test_saving_refuses_push_to_hub_which_would_upload_half_a_folder(trained_dir, tmp_path):
    model = Cell2TextForConditionalGeneration.from_pretrained(trained_dir)
    describe = Cell2TextPipeline(model=model, processor=Cell2TextProcessor.from_pretrained(trained_dir))
    with pytest.raises(ValueError, match="upload it whole"):
        describe.save_pretrained(tmp_path / "folder", push_to_hub=True)
    assert not (tmp_path / "folder").exists()


@pytest.mark.parametrize("typo", [{"layers": "counts"}, {"raw": True}, {"constrain": False}, {"sort_by_len": True}])
def test_a_misspelt_option_is_refused_not_ignored(random_dir, typo):
    """The QA finding: the constrained decoder reads only the generation settings it uses, so `layers="counts"`
    described X instead of the layer, exit 0."""
    describe = pipeline("cell-to-text", model=str(random_dir), trust_remote_code=True, device="cpu")
    with pytest.raises(TypeError, match=re.escape(f"unknown option(s) ['{next(iter(typo))}']: the cell-to-text")):
        describe(make_adata(2), **typo)
    with pytest.raises(TypeError, match="unknown option"):
        describe(make_adata(2), generate_kwargs=typo)


def test_a_generation_setting_of_the_wrong_type_is_refused_not_read_as_true(random_pipeline):
    """do_sample="false" sampled (a non-empty string is true), exit 0."""
    with pytest.raises(ValueError, match="do_sample must be true or false, got 'false' .* in the call"):
        random_pipeline(make_adata(2), constrained=False, do_sample="false")
    config = GenerationConfig(max_new_tokens=4)
    config.do_sample = "false"
    with pytest.raises(ValueError, match="do_sample must be true or false, got 'false' .* in the generation_config"):
        random_pipeline(make_adata(2), constrained=False, generation_config=config)


def test_generate_arguments_outside_generation_config_pass_the_option_check(random_dir):
    """A reviewer's finding: `tokenizer=` (which `stop_strings` needs) was refused as an unknown option."""
    describe = pipeline("cell-to-text", model=str(random_dir), trust_remote_code=True, device="cpu")
    results = describe(make_adata(2), constrained=False, max_new_tokens=4, stop_strings=["."],
                       tokenizer=describe.processor.tokenizer)
    assert len(results) == 2


def test_a_row_of_nan_or_negative_values_is_named_as_such_not_as_empty(random_dir):
    """A reviewer's finding: the empty-cell pass counted only positive values, so a row of NaN (or of scaled,
    negative values) was called a cell without vocabulary genes, and the fix it named was skip_empty_cells."""
    describe = pipeline("cell-to-text", model=str(random_dir), trust_remote_code=True, device="cpu")
    for bad, message in ((np.nan, "NaN"), (-1.0, "negative values")):
        counts = random_counts(3, seed=1).astype(np.float64)
        counts[1] = bad
        with pytest.raises(ValueError, match=message):
            describe(counts, gene_ids=GENES, max_new_tokens=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "auto"])
def test_a_pipeline_loaded_in_another_dtype_saves_a_complete_folder(tmp_path, dtype):
    """The reviewer's finding: pipeline(..., dtype=torch.bfloat16).save_pretrained(out) stopped on the tokenizer's
    copy of the dtype after the weights were written (no processor saved); "auto" was written into
    tokenizer_config.json."""
    folder = save_tiny_model_folder(tmp_path / "model")
    describe = pipeline("cell-to-text", model=str(folder), dtype=dtype, device="cpu", trust_remote_code=True)
    describe.save_pretrained(tmp_path / "saved")
    assert "dtype" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    again = pipeline("cell-to-text", model=str(tmp_path / "saved"), device="cpu", trust_remote_code=True)
    assert again.processor.to_dict() == Cell2TextProcessor.from_pretrained(folder).to_dict()


def test_a_saved_folder_stops_at_the_tokenizers_end_of_text_where_the_llms_config_names_another(tmp_path):
    """The reviewer's finding: a composed model stops at the LLM config's eos_token_id, which may not be the
    tokenizer's end of text every description is trained to end with; the saved folder then ran each free description
    past its end to the length limit (generate wrote 80 tokens where the description ended at 35). Saving adds it."""
    from tiny_parts import tiny_bert_config, tiny_llama_config

    _, lm_dir = save_tiny_parts(tmp_path / "parts")
    processor = tiny_processor(lm_dir)
    text_config = tiny_llama_config(len(processor.tokenizer))
    text_config.eos_token_id = processor.tokenizer.pad_token_id  # another token than the tokenizer's eos
    model = Cell2TextForConditionalGeneration(Cell2TextConfig(
        gene_encoder_config=tiny_bert_config(len(GENES) + 4), text_config=text_config,
        cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16))
    assert model.generation_config.eos_token_id == processor.tokenizer.pad_token_id
    save_model_folder(model, processor, tmp_path / "model")
    stops = GenerationConfig.from_pretrained(tmp_path / "model").eos_token_id
    assert stops == [processor.tokenizer.pad_token_id, processor.tokenizer.eos_token_id]  # the LLM's own is kept


def test_free_describing_takes_generates_stop_strings_and_dict_output(tmp_path):
    """The reviewer's findings: stop_strings passed the option check but generate found no tokenizer;
    return_dict_in_generate=True gave an AttributeError. Both now describe as generate does."""
    folder = save_tiny_model_folder(tmp_path / "model")
    describe = pipeline("cell-to-text", model=str(folder), device="cpu", trust_remote_code=True)
    counts = sp.csr_matrix(random_counts(2, seed=4))
    plain = describe(counts, gene_ids=GENES, constrained=False, max_new_tokens=12)
    as_dict = describe(counts, gene_ids=GENES, constrained=False, max_new_tokens=12, return_dict_in_generate=True)
    assert [r["description"] for r in as_dict] == [r["description"] for r in plain]
    stop = plain[0]["description"].split()[1]  # a word the model writes early: its text ends there
    stopped = describe(counts, gene_ids=GENES, constrained=False, max_new_tokens=12, stop_strings=[stop])
    assert stopped[0]["description"].endswith(stop) and len(stopped[0]["description"]) < len(plain[0]["description"])


def test_a_value_error_names_the_cells_rows_in_the_whole_input(random_dir):
    """Cells are ranked in blocks of 512: a NaN at row 580 was reported in the "chunk starting at cell 0"."""
    describe = pipeline("cell-to-text", model=str(random_dir), trust_remote_code=True, device="cpu")
    counts = random_counts(600, seed=2)
    counts[580, :] = np.nan
    with pytest.raises(ValueError, match="NaN.*chunk starting at cell 512"):
        describe(counts, gene_ids=GENES, max_new_tokens=2)


# -- free describing: NaN logits, descriptions cut short, a DataFrame's genes (reviewer's findings) -----------------


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True}])
def test_nan_logits_stop_free_describing_as_they_stop_constrained(trained_dir, sampling):
    """The reviewer's finding: NaN logits (an overflowing float16 model) gave every cell an empty description with
    parsed=False and no error in free describing, where constrained describing raised FloatingPointError."""
    describe = local_pipeline(trained_dir)
    with torch.no_grad():
        describe.model.model.language_model.norm.weight[0] = float("nan")
    counts = random_counts(3)
    fix = r"\. Its weights may hold NaN.* float32 or bfloat16 \(dtype=\.\.\.\)"
    with pytest.raises(FloatingPointError, match=r"NaN logits, so the free description \(constrained=False\) cannot "
                                                 r"be written" + fix):
        describe(counts, gene_ids=GENES, constrained=False, max_new_tokens=6, **sampling)
    if not sampling:
        with pytest.raises(FloatingPointError, match=r"NaN logits, so no option of the description can be scored"
                                                     + fix):
            describe(counts, gene_ids=GENES)


def test_a_free_description_cut_short_is_not_parsed_and_says_why(trained_dir, caplog):
    """The reviewer's finding: a free description cut by max_new_tokens (or a stop id) at a sentence boundary
    parsed, its later fields silently missing. Only one that ends at the tokenizer's end of text parses now."""
    describe = local_pipeline(trained_dir)
    counts = random_counts(3)
    whole = describe(counts, gene_ids=GENES, constrained=False)
    assert all(r["description"] == DESCRIPTION and r["parsed"] and r["tissue"] == "blood" for r in whole)
    assert "were cut" not in caplog.text
    cut = describe(counts, gene_ids=GENES, constrained=False, max_new_tokens=14)
    for result in cut:
        assert DESCRIPTION.startswith(result["description"]) and result["description"].endswith(".")
        assert not result["parsed"] and result["cell_type"] is None and result["cell_type_ontology_term_id"] is None
    assert "3 of 3 free descriptions were cut" in caplog.text and "max_new_tokens=14" in caplog.text
    full_stop = describe.processor.tokenizer.convert_tokens_to_ids(".")
    stopped = describe(counts, gene_ids=GENES, constrained=False, eos_token_id=full_stop)  # a stop id of the user's
    assert all(not r["parsed"] and r["description"].endswith(".") for r in stopped)
    # without a stop at the end of text the model writes on past it: the description is what came before it (the
    # run-on text parsed into the tissue: "blood of a healthy donor. It or. It or. consists from the blood")
    for stops in (None, 7):
        run_on = describe(counts, gene_ids=GENES, constrained=False, max_new_tokens=75, eos_token_id=stops)
        assert all(r["description"] == DESCRIPTION and r["parsed"] and r["tissue"] == "blood" for r in run_on)
    caplog.clear()
    # max_time stops every description still being written: cut, and the warning named max_new_tokens alone
    timed = describe(counts, gene_ids=GENES, constrained=False, max_time=1e-6)
    assert all(not r["parsed"] and r["cell_type"] is None and DESCRIPTION.startswith(r["description"]) for r in timed)
    assert "3 of 3 free descriptions were cut" in caplog.text and "max_time=1e-06s" in caplog.text
    assert "pass a larger max_new_tokens (or max_time)." in caplog.text
    with pytest.raises(ValueError, match=r"\['max_time'\]: generation settings that schema-constrained describing "
                                         "does not use"):  # it cannot stop a description halfway: never partial
        describe(counts, gene_ids=GENES, max_time=1e-6)
    caplog.clear()
    constrained = describe(counts, gene_ids=GENES, max_new_tokens=14)  # the schema decoder has no token limit
    assert all(r["parsed"] and r["tissue"] == "blood" for r in constrained) and "were cut" not in caplog.text


def test_an_end_of_text_forced_at_the_token_limit_is_a_cut(trained_dir, caplog):
    """A bad-input hunt's finding: `forced_eos_token_id` (a generation setting, from the call or a hand-edited
    generation_config.json) writes the end of text on the last token the limit allows, so a description cut there
    at a sentence's end read as ended and parsed, its tissue and disease silently missing, without a warning."""
    describe = local_pipeline(trained_dir)
    eos = describe.processor.tokenizer.eos_token_id
    counts = random_counts(3)
    prompt_length = describe.processor(counts, GENES)["input_ids"].shape[1]
    from_the_call = dict(max_new_tokens=14, forced_eos_token_id=eos)
    from_the_folder = dict(max_length=prompt_length + 14)  # the model's generation config, a limit as max_length
    for settings in (from_the_call, from_the_folder):
        if settings is from_the_folder:
            describe.model.generation_config.forced_eos_token_id = eos
        caplog.clear()
        for result in describe(counts, gene_ids=GENES, constrained=False, **settings):
            assert DESCRIPTION.startswith(result["description"]) and result["description"].endswith(".")
            assert not result["parsed"] and result["tissue"] is None and result["cell_type"] is None
        assert "3 of 3 free descriptions were cut" in caplog.text
    whole = describe(counts, gene_ids=GENES, constrained=False)  # ended by the model before the limit: parsed
    assert all(r["description"] == DESCRIPTION and r["parsed"] and r["tissue"] == "blood" for r in whole)


def test_settings_that_move_where_a_free_description_ends_are_refused(trained_dir, tmp_path):
    """min_new_tokens=60 (a call's or a folder's) made the model write on past its description's end, and the run-on
    text parsed into its last field: tissue "blood of a healthy donor. It or.......... It or.. consists from the
    blood", exit 0."""
    describe = local_pipeline(trained_dir)
    eos = describe.processor.tokenizer.eos_token_id
    for setting in ({"min_new_tokens": 60}, {"min_length": 80}, {"exponential_decay_length_penalty": (10, 3.0)},
                    {"sequence_bias": {(eos,): 4.0}}, {"sequence_bias": [[[5, eos], -8.0]]}):
        with pytest.raises(ValueError, match="move where a free description ends"):
            describe(make_adata(1), constrained=False, **setting)
    # a bias not on the end of text, or of 0 on it, moves no end
    assert len(describe(make_adata(1), constrained=False, sequence_bias={(5,): 1.0, (eos,): 0.0})) == 1
    # suppress_tokens=[eos] let no description end: each ran to max_new_tokens, reported as cut, asking for a larger
    # max_new_tokens
    for setting in ({"suppress_tokens": [eos]}, {"begin_suppress_tokens": [eos]}, {"bad_words_ids": [[5, eos]]},
                    {"suppress_tokens": torch.tensor([eos])}):  # a tensor's elements were not seen as token ids
        with pytest.raises(ValueError, match=r"\['(begin_)?(suppress_tokens|bad_words_ids) \(.*the end of text\)'\]: "
                                             "generation settings that move where a free description ends"):
            describe(make_adata(1), constrained=False, **setting)
    assert describe(make_adata(1), constrained=False, suppress_tokens=[5], bad_words_ids=[[5, 6]])[0]["parsed"]
    # another stop id suppressed (Llama-3's eos list holds several) is no harm: a description ends at the end of text
    assert describe(make_adata(1), constrained=False, suppress_tokens=[5], eos_token_id=[eos, 5])[0]["parsed"]
    # a malformed setting is left to generate's own check, which names its form: this check failed first on
    # "'int' object is not iterable" (a list of ids as bad_words_ids, an id as a sequence_bias key), or recursed
    # without end on a string
    for setting, named in (({"bad_words_ids": [eos]}, "`bad_words_ids` has to be a list of lists"),
                           ({"bad_words_ids": [["x"]]}, "Each list in `bad_words_ids` has to be a list of positive"),
                           ({"sequence_bias": {eos: -1.0}}, "`sequence_bias` has to be a dict with tuples as keys")):
        with pytest.raises(ValueError, match=re.escape(named)):
            describe(make_adata(1), constrained=False, **setting)
    timed = describe(make_adata(1), constrained=False, min_new_tokens=30, max_new_tokens=30)  # benchmarks' fixed length
    assert not timed[0]["parsed"]  # never ended at the end of text: cut, so unparsed
    folder = tmp_path / "min-new-tokens"
    shutil.copytree(trained_dir, folder)
    saved = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**saved, "min_new_tokens": 60}))
    describe = local_pipeline(folder)
    with pytest.raises(ValueError, match=re.escape("['min_new_tokens']: generation settings that move where")):
        describe(make_adata(1), constrained=False)
    result = describe(make_adata(1), constrained=False, min_new_tokens=None)[0]  # the folder's setting overridden
    assert result["parsed"] and result["tissue"] == "blood"


def test_a_rows_first_stop_token_tells_whether_it_ended_at_end_of_text():
    """Rows that stopped are padded, here with the end-of-text id itself (a tokenizer without a pad token): a row
    stopped at another stop id (5) is cut though end-of-text follows it; a row without any stop was cut by the
    token limit."""
    from modeling_cell2text.pipeline_cell2text import ended_at_end_of_text

    eos, other_stop = 9, 5
    rows = torch.tensor([[1, 2, 9, 9], [1, 5, 9, 9], [1, 2, 3, 4], [9, 9, 9, 9]])
    assert ended_at_end_of_text(rows, eos, [other_stop, eos]).tolist() == [True, False, False, True]
    assert ended_at_end_of_text(rows, eos, eos).tolist() == [True, True, False, True]  # 5 is text then
    assert ended_at_end_of_text(rows, None, None).tolist() == [True] * 4  # nothing to tell by
    assert ended_at_end_of_text(rows[:, :0], eos, None).tolist() == [False] * 4


def test_a_row_stopped_at_a_stop_string_is_cut_though_end_of_text_pads_it(trained_dir):
    """The finding left at stop 40: with a tokenizer whose pad token is its end of text, a row stopped by
    `stop_strings` while others went on was padded with end-of-text and read as ended, so a description cut at a
    sentence boundary parsed with its later fields missing."""
    from modeling_cell2text.pipeline_cell2text import ended_at_end_of_text, ends_at_a_stop_string

    describe = local_pipeline(trained_dir)
    tokenizer = describe.processor.tokenizer
    eos = tokenizer.eos_token_id
    first_sentence = DESCRIPTION.split(" It ")[0]
    cut = tokenizer(first_sentence, add_special_tokens=False)["input_ids"]
    whole = tokenizer(DESCRIPTION, add_special_tokens=False)["input_ids"]
    rows = torch.tensor([cut + [eos] * (len(whole) + 1 - len(cut)), whole + [eos]])
    assert describe.processor.parse_descriptions([first_sentence])[0]["parsed"]  # what the stop would give
    assert ended_at_end_of_text(rows, eos, eos).tolist() == [True, True]  # the end-of-text padding misleads
    assert ends_at_a_stop_string(rows, tokenizer, ["cell."]).tolist() == [True, False]
    assert ends_at_a_stop_string(rows, tokenizer, "cell.").tolist() == [True, False]
    assert ends_at_a_stop_string(rows, tokenizer, None).tolist() == [False, False]
    assert ends_at_a_stop_string(rows, tokenizer, ["blood"]).tolist() == [False, False]
    # generation also stops where the stop string's last token runs past it (the second reader's finding)
    past = tokenizer("This sample consists of a B cell", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(past[-1:]).endswith("cell")
    past_rows = torch.tensor([past + [eos], whole[:len(past) + 1]])
    assert ends_at_a_stop_string(past_rows, tokenizer, ["B ce"]).tolist() == [True, False]
    assert ends_at_a_stop_string(rows[:, :0], tokenizer, ["."]).tolist() == [False, False]

    # Through the pipeline: generate as it returns a batch where only the first row met the stop string.
    real_generate = describe.model.generate

    def first_row_stopped(**kwargs):
        kwargs.pop("stop_strings")
        generated = real_generate(**kwargs)
        prompt = kwargs["input_ids"].shape[1]
        generated[0, prompt + len(cut):] = eos
        return generated

    describe.model.generate = first_row_stopped
    results = describe(random_counts(2), gene_ids=GENES, constrained=False, stop_strings=["cell."])
    assert [r["description"] for r in results] == [first_sentence, DESCRIPTION]
    assert [r["parsed"] for r in results] == [False, True] and results[0]["cell_type"] is None


def test_gene_ids_with_a_dataframe_must_be_its_columns(random_pipeline):
    """The reviewer's finding: gene_ids given with a DataFrame were used instead of its columns, so the values of
    one gene were read as another's."""
    counts = counts_of_varied_prompts()
    frame = pd.DataFrame(counts, columns=GENES)
    expected = [r["description"] for r in random_pipeline(frame, max_new_tokens=4)]
    assert [r["description"] for r in random_pipeline(frame, GENES, max_new_tokens=4)] == expected  # its columns
    with pytest.raises(ValueError, match=r"DataFrame.*Rename the columns.*frame\.to_numpy\(\) with gene_ids"):
        random_pipeline(frame, GENES[::-1], max_new_tokens=4)
    with pytest.raises(ValueError, match="Rename the columns"):
        random_pipeline(frame.iloc[:, :10], gene_ids=GENES[:9], max_new_tokens=4)


def test_options_of_a_call_given_when_building_the_pipeline_are_named_as_such(random_dir):
    # the reviewer's finding: "unknown option(s) ['sort_by_length']: the pipeline takes ..., sort_by_length, ..."
    with pytest.raises(TypeError, match=r"\['progress', 'sort_by_length'\]: options of a call, not of the pipeline"):
        pipeline("cell-to-text", model=str(random_dir), pipeline_class=Cell2TextPipeline, sort_by_length=True,
                 progress=True)


def test_num_workers_is_refused_when_building_the_pipeline_as_in_a_call(random_dir):
    # the reviewer's finding: pipeline(..., num_workers=4) was kept by transformers' Pipeline and never used, exit 0
    for where in ("build", "call"):
        with pytest.raises(TypeError, match=r"unknown option\(s\) \['num_workers'\]: the cell-to-text pipeline takes"):
            if where == "build":
                pipeline("cell-to-text", model=str(random_dir), pipeline_class=Cell2TextPipeline, num_workers=4)
            else:
                local_pipeline(random_dir)(random_counts(2), gene_ids=GENES, num_workers=4)


def test_the_generation_benchmark_refuses_two_modes_and_batch_sizes_label_scaling_would_not_use(capsys, monkeypatch):
    """benchmarks/generation.py ran --sort-by-length alone when --label-scaling was asked for too, and timed
    --label-scaling at batch 16 whatever --batch-sizes said."""
    import sys
    from tiny_parts import load_benchmark

    benchmark = load_benchmark("generation")
    for argv, words in ((["--label-scaling", "--sort-by-length"], "separate runs"),
                        (["--label-scaling", "--batch-sizes", "1", "16"], "one batch size"),
                        (["--cells", "0"], "--cells")):
        small = ["--cells", "2", "--new-tokens", "1", "--genes-per-cell", "8"]  # a short run where not refused
        monkeypatch.setattr(sys, "argv", ["generation.py", *small, *argv])
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and words in err[-1], err
    assert benchmark.parse_args(["--label-scaling", "--batch-sizes", "4"]).batch_sizes == [4]
    assert benchmark.parse_args(["--label-scaling"]).batch_sizes == [16]
    assert benchmark.parse_args([]).batch_sizes == [1, 16]


def test_the_generation_benchmark_times_label_scaling_at_the_batch_size_asked_for(tmp_path, monkeypatch, capsys):
    """--label-scaling timed every decoder at batch 16 whatever --batch-sizes said."""
    import sys
    from tiny_parts import load_benchmark

    benchmark = load_benchmark("generation")
    sizes = []
    monkeypatch.setattr(benchmark, "label_scaling", lambda *args: sizes.append(args[-1]))
    monkeypatch.setattr(sys, "argv", ["generation.py", "--model", str(tmp_path / "no-model"), "--cells", "2",
                                      "--new-tokens", "1", "--genes-per-cell", "8", "--label-scaling",
                                      "--batch-sizes", "4"])
    benchmark.main()
    assert sizes == [4]


def test_the_generation_benchmark_leaves_no_fallback_model_behind(tmp_path, monkeypatch, capsys):
    """Without the main job's model, benchmarks/generation.py saves a tiny random one: every run left it in /tmp."""
    import sys
    import tempfile
    from tiny_parts import load_benchmark

    benchmark = load_benchmark("generation")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["generation.py", "--model", str(tmp_path / "no-model"), "--cells", "2",
                                      "--new-tokens", "1", "--genes-per-cell", "8", "--batch-sizes", "2"])
    benchmark.main()
    assert "FALLBACK" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
