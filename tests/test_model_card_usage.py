"""The model card's usage lines, run as written against a saved tiny model (only the repo id points at the folder)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest
from test_pipeline import make_adata, save_tiny_model_folder

from hub_cards import render_model_card

REPO = "demo-org/cell2text-tiny"
N_CELLS = 4
_BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def card_blocks(tmp_path_factory) -> tuple[list[tuple[str, str]], Path]:
    model_dir = save_tiny_model_folder(tmp_path_factory.mktemp("card-model"), trained=True)
    card = render_model_card(
        {"split": "test", "num_cells": N_CELLS, "fields": {"cell_type": {"accuracy": 1.0}}},
        repo_id=REPO, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", encoder="ctheodoris/Geneformer",
        dataset_id="demo-org/tiny-corpus", training_config={},
    )
    # A user who downloaded the repo: its id is the only thing that changes.
    return [(kind, code.replace(REPO, str(model_dir))) for kind, code in _BLOCK.findall(card.text)], model_dir


@pytest.fixture()
def cells(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    make_adata(N_CELLS).write_h5ad(tmp_path / "cells.h5ad")
    return tmp_path


def test_the_card_has_an_install_line_python_blocks_and_a_cli_line(card_blocks):
    blocks, _ = card_blocks
    kinds = [kind for kind, _ in blocks]
    assert kinds == ["bash", "python", "bash", "python"]
    assert "pip install ./cell2text" in blocks[0][1] and "pip install cell2text" not in blocks[0][1]


def test_the_installed_package_lines_describe_the_cells(card_blocks, cells):
    (_, code), = [b for b in card_blocks[0] if "pipeline_class=Cell2TextPipeline" in b[1]]
    namespace: dict = {}
    exec(compile(code, "model card", "exec"), namespace)  # noqa: S102 - the card's own lines
    results = namespace["results"]
    assert len(results) == N_CELLS and all(r["description"] for r in results)
    assert type(namespace["describe"]).__module__ == "modeling_cell2text.pipeline_cell2text"  # no remote code


def test_the_command_line_writes_the_annotated_file(card_blocks, cells):
    (_, line), = [b for b in card_blocks[0] if b[0] == "bash" and "cell2text describe" in b[1]]
    argv = shlex.split(line.strip())
    executable = shutil.which("cell2text", path=str(Path(sys.executable).parent))
    command = [executable] if executable else [sys.executable, "-m", "modeling_cell2text.cli"]
    done = subprocess.run(command + argv[1:], cwd=cells, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = ad.read_h5ad(cells / argv[argv.index("--out") + 1])
    assert out.n_obs == N_CELLS and any(column.endswith("_description") for column in out.obs.columns)


def test_the_plain_transformers_lines_load_model_processor_and_pipeline(card_blocks, cells):
    """Run here, where the package is installed; tests/test_pipeline_fresh_venv.py covers a bare environment."""
    (_, code), = [b for b in card_blocks[0] if "trust_remote_code=True" in b[1]]
    namespace: dict = {}
    exec(compile(code, "model card", "exec"), namespace)  # noqa: S102 - the card's own lines
    assert type(namespace["model"]).__name__ == "Cell2TextForConditionalGeneration"
    assert type(namespace["processor"]).__name__ == "Cell2TextProcessor"
    adata = ad.read_h5ad(cells / "cells.h5ad")
    assert len(namespace["describe"](adata)) == N_CELLS
