"""The examples run as a newcomer runs them (`python examples/X.py`), here on tiny random models.

test_examples_build_finetune_and_describe runs each example as its own process; the tests of one option or refusal
run the script in this process (`example_in_process`: the same script, argv, working directory, exit status and
output), as a process each would pay ~6 s of imports and check nothing more.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_cell2text import Cell2TextFeatureExtractor
from tiny_parts import encoder_for_vocabulary, run_as_command, save_tiny_parts

REPO = Path(__file__).resolve().parents[1]


def example_process(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # the checkout's package, the one under test (what an editable install of it gives; a venv shared by several
    # checkouts would otherwise run another checkout's package)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "examples" / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def run_example(name: str, *args: str, cwd: Path) -> str:
    result = example_process(name, *args, cwd=cwd)
    assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture
def example_in_process(monkeypatch, capsys):
    """`example_process` in this process (`tiny_parts.run_as_command`), asserted on as on a process."""

    def run(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        return run_as_command([str(REPO / "examples" / f"{name}.py"), *args], cwd, monkeypatch, capsys)

    return run


@pytest.fixture(scope="module")
def stand_in_corpus(tmp_path_factory) -> tuple[Path, str]:
    """The corpus example run as is (no --h5ad: it writes scanpy's pbmc68k as a stand-in file), once, beside a
    user's own corpus.h5ad; (its working directory, its stdout). The tests copy what they change."""
    cwd = tmp_path_factory.mktemp("stand_in")
    (cwd / "corpus.h5ad").write_text("the user's own file")  # the stand-in data was written over it
    return cwd, run_example("build_corpus_from_h5ad", "--out", str(cwd / "corpus"), cwd=cwd)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny trained model folder, for the tests that only read it."""
    from test_pipeline import save_tiny_model_folder

    return save_tiny_model_folder(tmp_path_factory.mktemp("model"))


def test_the_corpus_example_renames_columns_and_replaces_its_corpus_only_with_overwrite(
        tmp_path, stand_in_corpus, example_in_process):
    """Run twice, the example ended with a traceback saying to pass --overwrite, which it did not have; a file whose
    columns need renaming could not be read (no --obs-map)."""
    import anndata

    stand_in_dir, _ = stand_in_corpus
    corpus = tmp_path / "corpus"
    shutil.copytree(stand_in_dir / "corpus", corpus)  # the example's first run
    adata = anndata.read_h5ad(stand_in_dir / "corpus.stand-in.h5ad")
    adata.obs = adata.obs.rename(columns={"donor_id": "patient"})
    adata.write_h5ad(tmp_path / "cells.h5ad")
    command = ["--h5ad", "cells.h5ad", "--input-values", "log1p", "--out", str(corpus)]
    refused = example_in_process("build_corpus_from_h5ad", *command, cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"build_corpus_from_h5ad: error: --out {corpus} is not empty; pass --overwrite")
    replaced = example_in_process("build_corpus_from_h5ad", *command, "--obs-map", "patient=donor_id", "--overwrite",
                                  cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((corpus / "summary.json").read_text())["split_by"] == "donor"  # the renamed column was read


def test_examples_build_finetune_and_describe(tmp_path, stand_in_corpus):
    stand_in_dir, out = stand_in_corpus
    corpus = stand_in_dir / "corpus"
    assert '"num_cells_in": 700' in out and (corpus / "dataset_dict.json").exists()
    assert (stand_in_dir / "corpus.h5ad").read_text() == "the user's own file"
    splits = json.loads(out[: out.index("corpus written")])["splits"]
    assert set(splits) == {"train", "validation", "test"} and all(splits.values()), splits  # none left empty

    # A tiny random encoder standing in for one prepared on this corpus: its vocabulary, recorded as such (composing
    # refuses a corpus vocabulary with an encoder that was not built for it).
    feature_extractor = Cell2TextFeatureExtractor.from_pretrained(corpus / "feature_extractor")
    random_encoder, lm_dir = save_tiny_parts(tmp_path / "parts", gene_vocab_size=feature_extractor.vocab_size)
    encoder_dir = encoder_for_vocabulary(random_encoder, feature_extractor, tmp_path / "parts" / "prepared_encoder")
    out = run_example("finetune_cell2text", "--corpus", str(corpus), "--gene-encoder", str(encoder_dir),
                      "--text-model", str(lm_dir), "--out", str(tmp_path / "from_parts"), "--max-steps", "2",
                      "--num-cell-tokens", "8", cwd=tmp_path)
    assert "fine-tuned model saved" in out
    model_dir = tmp_path / "from_parts" / "final"
    out = run_example("finetune_cell2text", "--corpus", str(corpus), "--init-from", str(model_dir),
                      "--out", str(tmp_path / "again"), "--max-steps", "2", cwd=tmp_path)
    assert "fine-tuned model saved" in out

    out = run_example("describe_cells", "--model", str(tmp_path / "again" / "final"), "--cells", "3", cwd=tmp_path)
    descriptions = [line for line in out.splitlines() if line.startswith("    ")]
    assert len(descriptions) == 3  # one description per cell, under its "name: cell type (term)" line


def test_the_describe_example_bounds_free_descriptions_only(tmp_path, tiny_model_dir, example_in_process):
    """Its --max-new-tokens (default 160) went to constrained describing, which writes each description whole: the
    option did nothing. It goes with --free now, and alone it is refused."""
    from test_pipeline import make_adata

    make_adata(3).write_h5ad(tmp_path / "cells.h5ad")
    command = ["--model", str(tiny_model_dir), "--h5ad", "cells.h5ad", "--max-new-tokens", "3"]
    refused = example_in_process("describe_cells", *command, cwd=tmp_path)
    assert refused.returncode == 2 and "--max-new-tokens bounds free descriptions: add --free" in refused.stderr
    described = example_in_process("describe_cells", *command, "--free", cwd=tmp_path)
    assert described.returncode == 0, described.stderr[-3000:]
    assert "'constrained': False" in described.stdout and "'max_new_tokens': 3" in described.stdout


def test_the_describe_example_reads_counts_in_raw_and_refuses_other_values_in_one_line(
        tmp_path, tiny_model_dir, example_in_process):
    """The finding: a CELLxGENE-layout file (normalised X, counts in adata.raw) could not be described (no --use-raw),
    and the refusal of its X as counts ended in a multi-KB traceback."""
    import numpy as np
    from test_pipeline import make_adata

    adata = make_adata(3)
    adata.raw = adata.copy()
    adata.X = np.log1p(adata.X.toarray())
    adata.write_h5ad(tmp_path / "cells.h5ad")
    command = ["--model", str(tiny_model_dir), "--h5ad", "cells.h5ad"]
    refused = example_in_process("describe_cells", *command, cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "describe_cells: error: --input-values counts but the values are not integer counts")
    described = example_in_process("describe_cells", *command, "--use-raw", cwd=tmp_path)
    assert described.returncode == 0, described.stderr[-3000:]
    assert described.stdout.count("B cell (CL:0000236)") == 3 and "'use_raw': True" in described.stdout


def test_the_describe_example_refuses_a_cell_count_below_one_and_a_missing_file_in_one_line(
        tmp_path, example_in_process):
    """--cells -1 described every cell but the last (adata[:-1]), exit 0; --cells 0 none; a mistyped --h5ad ended
    in a traceback."""
    for count in ("-1", "0"):
        refused = example_in_process("describe_cells", "--cells", count, cwd=tmp_path)
        assert refused.returncode == 2 and "argument --cells: expected an integer >= 1" in refused.stderr, (
            refused.stderr[-3000:])
    missing = example_in_process("describe_cells", "--h5ad", "mistyped.h5ad", cwd=tmp_path)  # was a traceback
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    assert missing.stderr.strip().splitlines()[-1].startswith("describe_cells: error: ") and (
        "mistyped.h5ad" in missing.stderr)
    import h5py

    with h5py.File(tmp_path / "other.h5ad", "w") as other:  # HDF5, but no AnnData: anndata's or h5py's traceback
        other["values"] = [1, 2, 3]
    foreign = example_in_process("describe_cells", "--h5ad", "other.h5ad", cwd=tmp_path)
    assert foreign.returncode == 1 and "Traceback" not in foreign.stderr, foreign.stderr[-3000:]
    assert "cannot read other.h5ad as an .h5ad file" in foreign.stderr.strip().splitlines()[-1]


def test_the_finetune_example_passes_num_cell_tokens_with_init_from(tmp_path, tiny_model_dir, example_in_process):
    """With --init-from it dropped --num-cell-tokens without a word (the run kept the model's); now the recipe refuses
    a value other than the model's, as it does from the command line."""
    from tiny_parts import save_tiny_corpus

    corpus = save_tiny_corpus(tmp_path / "corpus")
    shutil.rmtree(corpus / "feature_extractor")  # tokenized as the model reads cells
    Cell2TextFeatureExtractor.from_pretrained(tiny_model_dir).save_pretrained(corpus / "feature_extractor")
    refused = example_in_process("finetune_cell2text", "--corpus", str(corpus), "--init-from", str(tiny_model_dir),
                                 "--num-cell-tokens", "64", "--out", str(tmp_path / "out"), "--max-steps", "1",
                                 cwd=tmp_path)
    assert refused.returncode == 1 and "num_cell_tokens=64 (the model's: 8) would be ignored" in refused.stderr
