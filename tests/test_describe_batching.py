"""Describing at scale in one process: batches sorted by length (`sort_by_length`) and compiled static-cache
decoding (`compile`, CUDA only: on the CPU it must change nothing)."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from test_pipeline import GENES, save_tiny_model_folder
from transformers import CompileConfig, GenerationConfig

from modeling_cell2text import Cell2TextPipeline, Cell2TextProcessor, tl

CELL_TYPES = {"B cell": "CL:0000236", "T cell": "CL:0000084", "monocyte": "CL:0000576",
              "natural killer cell": "CL:0000623"}


def save_scoring_model(root: Path) -> Path:
    """The random tiny model (descriptions differ from cell to cell) with four cell-type labels, so that
    `cell_type_score` varies too; the token that decodes to a NUL character is suppressed (h5ad cannot store it)."""
    model_dir = save_tiny_model_folder(root, trained=False, labels={"ontology_term_ids": {"cell_type": CELL_TYPES}})
    tokenizer = Cell2TextProcessor.from_pretrained(model_dir).tokenizer
    generation_config = GenerationConfig.from_pretrained(model_dir)
    generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if "\x00" in tokenizer.decode([i])]
    generation_config.save_pretrained(model_dir)
    return model_dir


def mixed_adata(n_cells: int, seed: int = 3) -> ad.AnnData:
    """Cells expressing 1, 2, 3, 30 or all 60 genes: prompts and gene tokens of very different lengths."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_cells, len(GENES)), dtype=np.float32)
    for row in range(n_cells):
        n = int(rng.choice([1, 2, 3, 30, 60]))
        counts[row, rng.choice(len(GENES), n, replace=False)] = rng.integers(1, 20, n)
    obs = pd.DataFrame({"sample": np.arange(n_cells)}, index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=GENES))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_scoring_model(tmp_path_factory.mktemp("scoring-model"))


def described(model_dir: Path, adata: ad.AnnData, **kwargs) -> pd.DataFrame:
    tl.describe(adata, model_dir, **{"device": "cpu", "max_new_tokens": 6, "batch_size": 4, "progress": False, **kwargs})
    return adata.obs


def test_sorted_batches_give_the_same_obs_in_the_same_order(model_dir):
    # float64: results do not depend on a cell's batch neighbours, so sorting must change nothing at all
    plain = described(model_dir, mixed_adata(24), dtype=torch.float64)
    ordered = described(model_dir, mixed_adata(24), dtype=torch.float64, sort_by_length=True)
    # cells are told apart (by their cell-type probability), so a misplaced result shows
    assert plain["cell2text_cell_type_score"].nunique() > 10
    pd.testing.assert_frame_equal(plain, ordered, check_exact=True)
    # float32 (the CPU default): the same texts and labels; other padding moves the scores' last digits only
    plain = described(model_dir, mixed_adata(24))
    ordered = described(model_dir, mixed_adata(24), sort_by_length=True)
    scores = [column for column in plain.columns if column.endswith("_score")]
    pd.testing.assert_frame_equal(plain.drop(columns=scores), ordered.drop(columns=scores), check_exact=True)
    np.testing.assert_allclose(plain[scores], ordered[scores], rtol=1e-5)


def test_sorted_batches_pad_less(model_dir, monkeypatch):
    widths: list[tuple[int, int]] = []
    preprocess = Cell2TextPipeline.preprocess

    def recording(self, cell_tokens, cell_bins=None, **kwargs):
        inputs = preprocess(self, cell_tokens, cell_bins, **kwargs)
        widths.append(tuple(inputs["gene_input_ids"].shape))
        return inputs

    monkeypatch.setattr(Cell2TextPipeline, "preprocess", recording)
    adata = mixed_adata(24)
    described(model_dir, adata, constrained=False)
    padded_plain = sum(rows * width for rows, width in widths)
    widths.clear()
    described(model_dir, adata, constrained=False, sort_by_length=True)
    padded_sorted = sum(rows * width for rows, width in widths)
    assert [width for _, width in widths] == sorted((width for _, width in widths), reverse=True)  # longest first
    assert padded_sorted < 0.75 * padded_plain
    assert adata.uns["cell2text"]["params"]["sort_by_length"] is True


@pytest.mark.parametrize(("constrained", "notice"), [(False, "needs a CUDA GPU"),
                                                     (True, "applies to free describing")])
def test_compile_on_the_cpu_changes_nothing_and_says_so(model_dir, caplog, constrained, notice):
    plain = described(model_dir, mixed_adata(8), constrained=constrained)
    adata = mixed_adata(8)
    with caplog.at_level(logging.WARNING, logger="modeling_cell2text.tl"):
        compiled = described(model_dir, adata, compile=True, constrained=constrained)
    pd.testing.assert_frame_equal(plain, compiled, check_exact=True)
    notices = [record.getMessage() for record in caplog.records if "compile" in record.getMessage()]
    assert len(notices) == 1 and notice in notices[0]
    assert adata.uns["cell2text"]["params"]["compile"] is False  # what ran, not what was asked


def test_the_gpu_settings_are_a_static_cache_and_compile_config_and_give_the_same_obs(model_dir):
    settings = tl.compiled_decoding_kwargs(torch.device("cuda"))
    assert settings["cache_implementation"] == "static"
    assert isinstance(settings["compile_config"], CompileConfig)
    # the static cache itself runs on the CPU (transformers compiles only on a GPU): same obs as the dynamic cache
    plain = described(model_dir, mixed_adata(8), constrained=False)
    static = described(model_dir, mixed_adata(8), constrained=False, generate_kwargs=settings)
    pd.testing.assert_frame_equal(plain, static, check_exact=True)
    # the schema-constrained decoder does not use them: refused (they were accepted and ignored)
    with pytest.raises(ValueError, match=r"\['cache_implementation', 'compile_config'\]: generation settings that "
                                         r"schema-constrained describing does not use"):
        described(model_dir, mixed_adata(8), constrained=True, generate_kwargs=settings)


def test_a_generation_config_given_to_tl_is_honoured_and_recorded(model_dir):
    """The reviewer's finding: tl's loose max_new_tokens=160 and do_sample=False overrode a generation_config in
    generate_kwargs (160 tokens ran where it said 3), and the record said 160."""
    from transformers import GenerationConfig

    adata = mixed_adata(4)
    obs = described(model_dir, adata, constrained=False, max_new_tokens=None,  # given twice is refused (test_tl)
                    generate_kwargs={"generation_config": GenerationConfig(max_new_tokens=3, do_sample=False)})
    assert adata.uns["cell2text"]["params"]["max_new_tokens"] == 3
    three, six = (described(model_dir, mixed_adata(4), constrained=False, max_new_tokens=n) for n in (3, 6))
    assert list(obs["cell2text_description"]) == list(three["cell2text_description"])
    assert list(obs["cell2text_description"]) != list(six["cell2text_description"])
    # a max_length of the caller's bounds the text, not tl's default of 160 new tokens
    options = tl.DescribeOptions(constrained=False, generate_kwargs={"max_length": 50})
    assert options.pipeline_generate_kwargs(False, {}) == {"max_length": 50, "do_sample": False}


def test_free_describing_follows_the_folders_generation_length(model_dir, tmp_path):
    """A folder's generation_config.json that sets the length of a description (3 new tokens here) bounds tl's free
    descriptions as it bounds the pipeline's; tl wrote 160 over it, and recorded 160."""
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    config = GenerationConfig.from_pretrained(folder)
    config.max_new_tokens = 3
    config.save_pretrained(folder)
    obs = described(folder, mixed_adata(4), constrained=False, max_new_tokens=None)
    three = described(model_dir, mixed_adata(4), constrained=False, max_new_tokens=3)
    assert list(obs["cell2text_description"]) == list(three["cell2text_description"])
    from transformers import pipeline

    pipe = pipeline("cell-to-text", model=str(folder), trust_remote_code=True, device="cpu")
    texts = [r["description"] for r in pipe(mixed_adata(4), constrained=False, batch_size=4, progress=False)]
    assert texts == list(three["cell2text_description"])
    adata = mixed_adata(4)
    tl.describe(adata, folder, device="cpu", constrained=False, progress=False)
    assert adata.uns["cell2text"]["params"]["max_new_tokens"] == 3
    options = tl.DescribeOptions(constrained=False)
    assert options.pipeline_generate_kwargs(False, {}, config) == {"do_sample": False}
    assert options.pipeline_generate_kwargs(False, {}, GenerationConfig()) == {"do_sample": False,
                                                                                "max_new_tokens": 160}
