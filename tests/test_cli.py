"""`cell2text describe`: annotates a new h5ad, leaves the input untouched, and stops on bad input with one line."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from test_pipeline import DESCRIPTION, GENES, make_adata, save_tiny_model_folder

from modeling_cell2text.cli import main

NEW_COLUMNS = (
    "cell2text_description", "cell2text_parsed", "cell2text_cell_type", "cell2text_cell_type_ontology_term_id",
    "cell2text_tissue", "cell2text_tissue_ontology_term_id", "cell2text_disease", "cell2text_disease_ontology_term_id",
    "cell2text_sex", "cell2text_sex_ontology_term_id", "cell2text_age_group", "cell2text_pathways",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("cli-model"), trained=True)


@pytest.fixture()
def h5ad(tmp_path) -> Path:
    """Counts in layers['counts'], log-normalised values in X, and an existing CELLxGENE cell_type column."""
    adata = make_adata(5)
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.log1p()
    adata.obs["cell_type"] = ["B cell", "T cell", "B cell", "monocyte", "B cell"]
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_describe_writes_a_new_annotated_file_and_leaves_the_input_unchanged(model_dir, h5ad, tmp_path):
    before = sha256(h5ad)
    out = tmp_path / "annotated.h5ad"
    script = Path(sys.executable).with_name("cell2text")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "modeling_cell2text.cli"]
    result = subprocess.run(
        [*command, "describe", str(h5ad), "--model", str(model_dir), "--out", str(out), "--layer", "counts",
         "--batch-size", "2", "--max-new-tokens", "40", "--dtype", "float32", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Genes matched: 60 of 60 genes" in result.stdout
    assert "Describing cells" in result.stderr  # the progress bar
    assert sha256(h5ad) == before

    annotated, original = ad.read_h5ad(out), ad.read_h5ad(h5ad)
    for column in NEW_COLUMNS:
        assert column in annotated.obs, column
        assert annotated.obs[column].notna().sum() in (0, 5), column  # filled for every cell, or empty field
    assert (annotated.obs["cell2text_description"] == DESCRIPTION).all()
    assert annotated.obs["cell2text_parsed"].all()
    assert (annotated.obs["cell2text_cell_type_ontology_term_id"] == "CL:0000236").all()
    assert (annotated.obs["cell2text_tissue"] == "blood").all()
    # everything else is as it was: the existing CELLxGENE column, X, layers, names
    assert list(annotated.obs["cell_type"]) == list(original.obs["cell_type"])
    assert list(annotated.obs_names) == list(original.obs_names)
    assert np.array_equal(annotated.X.toarray(), original.X.toarray())
    assert np.array_equal(annotated.layers["counts"].toarray(), original.layers["counts"].toarray())


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cell2text: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_output_path_equal_to_input_is_refused(model_dir, h5ad, tmp_path, capsys):
    before = sha256(h5ad)
    code, err = run_cli(["describe", str(h5ad), "--model", str(model_dir), "--out", str(h5ad)], capsys)
    assert_one_line_error(code, err, "is the input file")
    link = tmp_path / "link.h5ad"
    link.symlink_to(h5ad)
    code, err = run_cli(["describe", str(h5ad), "--model", str(model_dir), "--out", str(link)], capsys)
    assert_one_line_error(code, err, "is the input file")
    dotted = tmp_path / "." / h5ad.name
    code, err = run_cli(["describe", str(h5ad), "--model", str(model_dir), "--out", str(dotted)], capsys)
    assert_one_line_error(code, err, "is the input file")
    assert sha256(h5ad) == before


def test_missing_layer_lists_the_layers(model_dir, h5ad, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    code, err = run_cli(["describe", str(h5ad), "--model", str(model_dir), "--out", str(out), "--layer", "raw"],
                        capsys)
    assert_one_line_error(code, err, "'raw'", "counts")
    assert not out.exists()


@pytest.mark.parametrize("device, words", [
    ("cuda", ("cuda", "no CUDA GPU")), ("cuda:1", ("cuda:1",)), ("mps", ("mps", "not available")),
    ("tpu", ("tpu",)),
])
def test_device_that_is_not_there(model_dir, h5ad, tmp_path, capsys, device, words):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 1:
        pytest.skip("this machine has the requested GPU")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    out = tmp_path / "out.h5ad"
    code, err = run_cli(["describe", str(h5ad), "--model", str(model_dir), "--out", str(out), "--device", device],
                        capsys)
    assert_one_line_error(code, err, *words)
    assert not out.exists()


def test_model_folder_without_processor(model_dir, h5ad, tmp_path, capsys):
    bare = tmp_path / "model-only"
    bare.mkdir()
    for name in os.listdir(model_dir):
        if name.startswith(("config", "model", "generation")) or name.endswith(".py"):
            shutil.copy(model_dir / name, bare / name)
    out = tmp_path / "out.h5ad"
    code, err = run_cli(["describe", str(h5ad), "--model", str(bare), "--out", str(out)], capsys)
    assert_one_line_error(code, err, "no processor", "processor.save_pretrained")


def test_file_with_none_of_the_models_genes(model_dir, tmp_path, capsys):
    adata = make_adata(3)
    adata.var_names = [g.replace("ENSG", "ENSMUSG") for g in GENES]
    path = tmp_path / "mouse.h5ad"
    adata.write_h5ad(path)
    code, err = run_cli(["describe", str(path), "--model", str(model_dir), "--out", str(tmp_path / "o.h5ad")], capsys)
    assert_one_line_error(code, err, "none of the 60 genes", "vocabulary")
