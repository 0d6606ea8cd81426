"""`cell2text describe`: annotates a new h5ad, leaves the input untouched, and stops on bad input with one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_pipeline import DESCRIPTION, GENES, make_adata, save_tiny_model_folder

from modeling_cell2text.cli import main
from modeling_cell2text.pipeline_cell2text import check_switches

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
    assert "Genes matched: 60 of 60 genes in the file (100%) are in the model's gene vocabulary; they are 100% of its 60 genes" in result.stdout
    assert "Describing cells" in result.stderr  # the progress bar
    assert sha256(h5ad) == before

    annotated, original = ad.read_h5ad(out), ad.read_h5ad(h5ad)
    # every cell gets the fields of its (here: the same) description, and absent fields stay missing
    expected = {
        "cell2text_description": DESCRIPTION, "cell2text_parsed": True,
        "cell2text_cell_type": "B cell", "cell2text_cell_type_ontology_term_id": "CL:0000236",
        "cell2text_tissue": "blood", "cell2text_tissue_ontology_term_id": "UBERON:0000178",
        "cell2text_disease": "normal", "cell2text_disease_ontology_term_id": "PATO:0000461",
        "cell2text_sex": None, "cell2text_sex_ontology_term_id": None, "cell2text_age_group": None,
        "cell2text_pathways": None,
    }
    assert set(expected) == set(NEW_COLUMNS)
    for column, value in expected.items():
        values = annotated.obs[column]
        assert (values.isna().all() if value is None else (values == value).all()), (column, list(values))
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


# -- no silent wrong results, nothing run or overwritten unasked (issues 9 and 11) --------------------------------


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("cell2text")
    return [str(script)] if script.exists() else [sys.executable, "-m", "modeling_cell2text.cli"]


def describe_args(h5ad: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["describe", str(h5ad), "--model", str(model), "--out", str(out), "--layer", "counts",
            "--max-new-tokens", "40", "--device", "cpu", *extra]


def plant_code(model_dir: Path, folder: Path, marker: Path) -> Path:
    """A copy of the model whose code files (named in auto_map) write `marker` when imported."""
    shutil.copytree(model_dir, folder)
    for code in folder.glob("*.py"):
        code.write_text(code.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    return folder


def test_model_folder_code_runs_only_with_trust_remote_code(model_dir, h5ad, tmp_path):
    marker = tmp_path / "marker"
    planted = plant_code(model_dir, tmp_path / "planted", marker)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = tmp_path / "annotated.h5ad"
    result = subprocess.run([*cli_command(), *describe_args(h5ad, planted, out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists(), "the model folder's code ran without --trust-remote-code"
    assert (ad.read_h5ad(out).obs["cell2text_description"] == DESCRIPTION).all()
    result = subprocess.run([*cli_command(), *describe_args(h5ad, planted, out, "--overwrite", "--trust-remote-code")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()  # the opt-in does run it


def test_an_input_that_is_no_h5ad_is_one_line_naming_it(model_dir, tmp_path, capsys):
    import h5py

    path = tmp_path / "other.h5ad"
    with h5py.File(path, "w") as file:
        file.create_dataset("values", data=np.ones(3))
    code, err = run_cli(["describe", str(path), "--model", str(model_dir), "--out", str(tmp_path / "o.h5ad")], capsys)
    assert_one_line_error(code, err, f"cannot read {path} as an .h5ad file (truncated, or another format?)")


def test_a_refusal_by_the_model_folders_own_code_is_one_line(model_dir, h5ad, tmp_path, capsys):
    """With --trust-remote-code the folder's copy of this package refuses a bad config.json (transformers imports it
    as transformers_modules...): that refusal ended in a traceback, as another library's ValueError does."""
    import json

    folder = shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_cell_tokens": 0}))
    for trusted in ([], ["--trust-remote-code"]):
        code, err = run_cli(["describe", str(h5ad), "--model", str(folder), "--out", str(tmp_path / "out.h5ad"),
                             *trusted], capsys)
        assert_one_line_error(code, err, "num_cell_tokens must be >= 1, got 0")


def test_a_value_error_from_another_models_remote_code_is_not_taken_for_this_projects():
    """Under transformers_modules only this package's modules (a model folder's copy) are this project's: a
    ValueError raised by another model's remote code keeps its traceback, as another library's does."""
    from modeling_cell2text.argument_types import raised_by_this_project

    def raised_in(module: str) -> ValueError:
        namespace = {"__name__": module}
        exec("def refuse():\n    raise ValueError('refused')", namespace)
        with pytest.raises(ValueError) as raised:
            namespace["refuse"]()
        return raised.value

    assert raised_by_this_project(raised_in("transformers_modules.model.configuration_cell2text"))
    assert not raised_by_this_project(raised_in("transformers_modules.other.modeling_other"))


def test_existing_out_needs_overwrite(model_dir, h5ad, tmp_path, capsys, monkeypatch):
    out = tmp_path / "annotated.h5ad"
    out.write_bytes(b"precious")
    monkeypatch.setattr("modeling_cell2text.tl.load", fail_if_called)
    code, err = run_cli(describe_args(h5ad, model_dir, out), capsys)
    assert_one_line_error(code, err, "exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    monkeypatch.undo()
    assert main(describe_args(h5ad, model_dir, out, "--overwrite")) == 0
    assert (ad.read_h5ad(out).obs["cell2text_description"] == DESCRIPTION).all()


def test_a_dangling_link_as_out_is_refused_before_loading(model_dir, h5ad, tmp_path, capsys, monkeypatch):
    """The reviewer's finding: it passed the check (exists() follows the link) and stopped after every cell."""
    out = tmp_path / "link.h5ad"
    out.symlink_to(tmp_path / "nowhere.h5ad")
    monkeypatch.setattr("modeling_cell2text.tl.load", fail_if_called)
    code, err = run_cli(describe_args(h5ad, model_dir, out), capsys)
    assert_one_line_error(code, err, "exists", "--overwrite")


def fail_if_called(*args, **kwargs):
    raise AssertionError("the model was loaded before the paths were checked")


def test_out_folder_or_missing_parent_is_refused_before_loading(model_dir, h5ad, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("modeling_cell2text.tl.load", fail_if_called)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    code, err = run_cli(describe_args(h5ad, model_dir, folder, "--overwrite"), capsys)
    assert_one_line_error(code, err, "is a folder")
    code, err = run_cli(describe_args(h5ad, model_dir, tmp_path / "missing" / "out.h5ad"), capsys)
    assert_one_line_error(code, err, "does not exist")


def test_an_out_folder_without_room_for_the_copy_is_refused_before_loading(model_dir, h5ad, tmp_path, capsys,
                                                                           monkeypatch):
    """The output copies the input: a full disk used to be found only when writing, after describing every cell."""
    monkeypatch.setattr("modeling_cell2text.tl.load", fail_if_called)
    size = h5ad.stat().st_size
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=size - 1))
    code, err = run_cli(describe_args(h5ad, model_dir, tmp_path / "out.h5ad"), capsys)
    assert_one_line_error(code, err, "free", "needs more than", "another folder")
    assert not (tmp_path / "out.h5ad").exists()


@pytest.mark.parametrize("name", ["annotated.csv", "annotated.jsonl", "annotated.zarr", "annotated"])
def test_out_named_as_another_format_is_refused_before_loading(model_dir, h5ad, tmp_path, capsys, monkeypatch, name):
    """The finding: --out annotated.csv wrote an HDF5 file under that name and exited 0."""
    monkeypatch.setattr("modeling_cell2text.tl.load", fail_if_called)
    for command in ("describe", "embed"):
        code, err = run_cli([command, str(h5ad), "--model", str(model_dir), "--out", str(tmp_path / name)], capsys)
        assert_one_line_error(code, err, "writes an .h5ad file", "*.h5ad", ".obs.to_csv")
        assert not (tmp_path / name).exists()


def leftovers(folder: Path, *keep: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p not in keep)


def test_a_failed_write_leaves_no_temporary_file(model_dir, h5ad, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("anndata.io.write_elem", fail)
    code, err = run_cli(describe_args(h5ad, model_dir, out_dir / "annotated.h5ad"), capsys)
    assert code == 1 and err.splitlines()[-1] == "cell2text: error: disk full"  # after the progress bar
    assert leftovers(out_dir) == []


def test_out_file_gets_a_new_files_permissions(model_dir, h5ad, tmp_path, capsys):
    out = tmp_path / "annotated.h5ad"
    umask = os.umask(0o022)
    try:
        code, _ = run_cli(describe_args(h5ad, model_dir, out), capsys)
    finally:
        os.umask(umask)
    assert code == 0 and out.stat().st_mode & 0o777 == 0o644  # not the temporary file's private 0600


def test_a_nul_in_a_description_does_not_make_the_file_unwritable(tmp_path):
    from modeling_cell2text.tl import annotation_columns

    columns = annotation_columns([{"description": "B\x00 cell", "parsed": False}, {"description": "ok", "parsed": True}],
                                 "cell2text")
    assert list(columns["cell2text_description"]) == ["B\ufffd cell", "ok"]
    adata = ad.AnnData(np.zeros((2, 1), dtype=np.float32))
    for name, values in columns.items():
        adata.obs[name] = values
    adata.write_h5ad(tmp_path / "out.h5ad")
    assert list(ad.read_h5ad(tmp_path / "out.h5ad").obs["cell2text_description"]) == ["B\ufffd cell", "ok"]


SIGTERM_SCRIPT = """
import sys, time
from pathlib import Path
import anndata.io
from modeling_cell2text import cli

def slow_write(*args, **kwargs):
    Path(sys.argv[1]).write_text("writing")
    time.sleep(60)

anndata.io.write_elem = slow_write
sys.exit(cli.main(sys.argv[2:]))
"""


def test_sigterm_while_writing_leaves_no_temporary_file(model_dir, h5ad, tmp_path):
    import signal
    import time

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(ready), *describe_args(h5ad, model_dir, out_dir / "a.h5ad")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.monotonic() + 240
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.exists(), process.communicate()[1][-3000:]
    assert len(leftovers(out_dir)) == 1  # the temporary copy, in the destination folder
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM" in err
    assert leftovers(out_dir) == []


def test_several_sequences_per_cell_from_generation_config_are_refused(model_dir, h5ad, tmp_path, capsys):
    import json

    sampling = tmp_path / "sampling"
    shutil.copytree(model_dir, sampling)
    config = json.loads((sampling / "generation_config.json").read_text())
    config.update(do_sample=True, num_return_sequences=2)
    (sampling / "generation_config.json").write_text(json.dumps(config))
    out = tmp_path / "out.h5ad"
    code, err = run_cli(describe_args(h5ad, sampling, out), capsys)
    assert_one_line_error(code, err, "num_return_sequences=2", "one description per cell")
    assert not out.exists()


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--max-new-tokens", "0"], ["--batch-size", "x"]])
def test_non_positive_numbers_are_argparse_errors(model_dir, h5ad, tmp_path, capsys, option):
    with pytest.raises(SystemExit) as caught:
        main(["describe", str(h5ad), "--model", str(model_dir), "--out", str(tmp_path / "o.h5ad"), *option])
    assert caught.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


def test_counts_in_raw(model_dir, tmp_path, capsys):
    adata = make_adata(4)
    adata.raw = adata.copy()
    adata.X = adata.X.log1p()
    path = tmp_path / "cellxgene.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "out.h5ad"
    code, err = run_cli(["describe", str(path), "--model", str(model_dir), "--out", str(out), "--layer", "raw"],
                        capsys)
    assert_one_line_error(code, err, "'raw'", "--use-raw")
    # X read as counts (the default): the error named --input-values log1p, not the counts the file keeps in raw
    for command in ("describe", "embed"):
        code, err = run_cli([command, str(path), "--model", str(model_dir), "--out", str(out)], capsys)
        last = err.strip().splitlines()[-1]  # after the progress bar: the cells' values are checked as they are read
        assert code == 1 and last.startswith("cell2text: error: --input-values counts but the values are not"), err
        assert last.endswith("The file has adata.raw, where CELLxGENE files keep the counts: --use-raw reads them")
    assert main(["describe", str(path), "--model", str(model_dir), "--out", str(out), "--use-raw",
                 "--max-new-tokens", "40"]) == 0
    annotated = ad.read_h5ad(out)
    assert (annotated.obs["cell2text_description"] == DESCRIPTION).all()
    params = annotated.uns["cell2text"]["params"]
    assert params["use_raw"] and "layer" not in params  # .raw, not a layer named "raw"


def test_scaled_x_names_the_option_that_reads_the_counts(model_dir, tmp_path, capsys):
    """X scaled by sc.pp.scale (negative values) was refused naming 'adata.raw or a counts layer', not the CLI's
    --use-raw / --layer, nor the layers the file holds."""
    adata = make_adata(4)
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.toarray() - 1.0
    path = tmp_path / "scaled.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "out.h5ad"
    code, err = run_cli(["describe", str(path), "--model", str(model_dir), "--out", str(out)], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("cell2text: error: input holds negative values"), err
    assert last.endswith("The file's layers: counts: --layer NAME reads the one holding the counts")
    adata.raw = ad.AnnData(adata.layers["counts"], var=adata.var)
    adata.write_h5ad(path)
    code, err = run_cli(["embed", str(path), "--model", str(model_dir), "--out", str(out)], capsys)
    assert code == 1 and err.strip().endswith("--use-raw reads them. The file's layers: counts: --layer NAME reads "
                                              "the one holding the counts"), err  # it named only --use-raw
    assert main(["embed", str(path), "--model", str(model_dir), "--out", str(out), "--layer", "counts"]) == 0
    # the scaled values read from a layer the command named: the error is the values', naming no other source
    adata.layers["scaled"] = adata.X
    adata.write_h5ad(path)
    code, err = run_cli(["embed", str(path), "--model", str(model_dir), "--out", str(tmp_path / "new.h5ad"), "--layer",
                         "scaled"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("cell2text: error: input holds negative values"), err
    assert "--use-raw" not in last and "--layer NAME" not in last


def test_file_without_x_points_to_layer(model_dir, tmp_path, capsys):
    adata = make_adata(3)
    adata.layers["counts"] = adata.X
    adata.X = None
    path = tmp_path / "no-x.h5ad"
    adata.write_h5ad(path)
    code, err = run_cli(["describe", str(path), "--model", str(model_dir), "--out", str(tmp_path / "o.h5ad")], capsys)
    assert_one_line_error(code, err, "no X", "--layer", "counts")


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_unreadable_input_names_the_path(model_dir, h5ad, tmp_path, capsys, kind):
    bad = tmp_path / f"{kind}.h5ad"
    if kind == "truncated":
        bad.write_bytes(h5ad.read_bytes()[: h5ad.stat().st_size // 2])
    else:
        bad.write_text("gene,cell\nA,1\n")
    code, err = run_cli(["describe", str(bad), "--model", str(model_dir), "--out", str(tmp_path / "o.h5ad")], capsys)
    assert_one_line_error(code, err, str(bad), "h5ad")


def test_corrupted_weights_are_one_short_line(model_dir, h5ad, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = run_cli(describe_args(h5ad, broken, tmp_path / "o.h5ad"), capsys)
    assert_one_line_error(code, err, str(broken), "safetensors")
    assert len(err) < 500


def test_embed_and_key_added(model_dir, h5ad, tmp_path, capsys):
    out = tmp_path / "embedded.h5ad"
    assert main(["embed", str(h5ad), "--model", str(model_dir), "--out", str(out), "--layer", "counts",
                 "--key-added", "X_c2t", "--batch-size", "2"]) == 0
    assert "Embedded 5 of 5 cells (32 dimensions)" in capsys.readouterr().out
    embedded = ad.read_h5ad(out)
    assert embedded.obsm["X_c2t"].shape == (5, 32) and np.isfinite(embedded.obsm["X_c2t"]).all()
    assert embedded.uns["X_c2t"]["params"]["pooling"] == "mean over gene positions"
    assert list(embedded.obs.columns) == ["cell_type"]
    out = tmp_path / "described.h5ad"
    assert main([*describe_args(h5ad, model_dir, out), "--key-added", "mine"]) == 0
    described = ad.read_h5ad(out)
    assert (described.obs["mine_description"] == DESCRIPTION).all()
    assert described.uns["mine"]["model"] == str(model_dir)
    # describing the embedded file under the embedding's key would replace its record: refused before any work
    capsys.readouterr()
    code, err = run_cli([*describe_args(tmp_path / "embedded.h5ad", model_dir, tmp_path / "again.h5ad"),
                         "--key-added", "X_c2t"], capsys)
    assert_one_line_error(code, err, "--key-added 'X_c2t'", "records a run of embed", "another --key-added")
    assert not (tmp_path / "again.h5ad").exists()


def test_version(capsys):
    from modeling_cell2text.tl import package_version

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"cell2text {package_version()}"


# A fresh interpreter runs the console script's entry point and lists the heavy modules it imported.
_ENTRY_POINT = """
import json, sys
from cell2text_cli import main
try:
    main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
heavy = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "modeling_cell2text"})
print(json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["describe", "--help"], ["embed", "--help"],
                                  ["describe", "cells.h5ad", "--model", "m", "--out", "o.h5ad", "--batch-size", "0"]])
def test_version_help_and_usage_errors_import_neither_torch_nor_transformers(argv):
    """`cell2text --version` took 5-30 s: the console script imported modeling_cell2text, whose __init__ imports torch
    and transformers to register the Auto classes. Its parser now answers from cell2text_cli, which imports neither."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cell2text"] == "cell2text_cli:main"  # what `pip install` makes the `cell2text` command run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _ENTRY_POINT, *argv], capture_output=True, text=True, timeout=120,
                          env=env, cwd=repo)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["code"] == (2 if argv[-1] == "0" else 0)  # --batch-size 0: argparse's usage error, as before
    if argv == ["--version"]:
        from modeling_cell2text.tl import package_version

        assert done.stdout.splitlines()[0] == f"cell2text {package_version()}"


# A fresh interpreter where only the package's own folder is importable (cell2text_cli blocked, whatever an editable
# install maps): the library imports nothing of the checkout beside it.
_PACKAGE_ALONE = """
import importlib.abc, json, sys

class BlockConsoleModule(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cell2text_cli":
            raise ImportError("cell2text_cli is blocked in this process")
        return None

sys.meta_path.insert(0, BlockConsoleModule())
from modeling_cell2text import tl
print(json.dumps({"module": tl.__file__, "version": tl.package_version(), "dtypes": sorted(tl.DTYPES)}))
"""


def test_the_library_imports_nothing_outside_its_package_folder(tmp_path):
    """`from modeling_cell2text import tl` raised ModuleNotFoundError: No module named 'cell2text_cli' where the
    package's folder alone is on the path (a copy of it, test_pipeline_fresh_venv's base install): tl took the dtype
    names and the version from the console script's module beside the package. They are package_info's, which
    cell2text_cli reads without the package's __init__."""
    source = tmp_path / "source"
    shutil.copytree(Path(__file__).resolve().parents[1] / "modeling_cell2text", source / "modeling_cell2text",
                    ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = tmp_path / "user"
    elsewhere.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(source)}
    done = subprocess.run([sys.executable, "-c", _PACKAGE_ALONE], capture_output=True, text=True, timeout=300,
                          env=env, cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["module"].startswith(str(source))
    assert result["dtypes"] == ["bfloat16", "float16", "float32"]
    from modeling_cell2text.tl import package_version

    assert result["version"] == package_version()


def test_the_console_script_runs_the_command_as_modeling_cell2text_cli_does(model_dir, h5ad, tmp_path):
    """cell2text_cli.main parses, then hands the same arguments to modeling_cell2text.cli.main."""
    from cell2text_cli import main as console_main

    out = tmp_path / "via-console-script.h5ad"
    assert console_main(["embed", str(h5ad), "--model", str(model_dir), "--out", str(out), "--layer", "counts",
                         "--device", "cpu"]) == 0
    assert ad.read_h5ad(out).obsm["X_cell2text"].shape[0] == 5


def test_cell_type_score_and_free_cell_type(model_dir, h5ad, tmp_path, capsys):
    out = tmp_path / "constrained.h5ad"
    assert main(describe_args(h5ad, model_dir, out)) == 0
    scores = ad.read_h5ad(out).obs["cell2text_cell_type_score"]
    assert ((scores > 0) & (scores <= 1)).all()
    out = tmp_path / "free.h5ad"
    assert main([*describe_args(h5ad, model_dir, out), "--free-cell-type"]) == 0
    free = ad.read_h5ad(out)
    assert free.uns["cell2text"]["params"]["constrained"] is False
    assert "cell2text_cell_type_score" not in free.obs or free.obs["cell2text_cell_type_score"].isna().all()


def test_bad_input_is_one_line_but_a_bug_keeps_its_traceback(monkeypatch, capsys, tmp_path):
    import modeling_cell2text.cli as cli

    h5ad_path, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"

    def bad_input(args):  # a refusal of the package's own (its message names the fix)
        check_switches(use_raw="false")

    monkeypatch.setattr(cli, "run", bad_input)
    assert main(["describe", str(h5ad_path), "--model", "x", "--out", str(out)]) == 1
    assert capsys.readouterr().err == "cell2text: error: use_raw must be True or False, got 'false'\n"

    def foreign_value_error(args):  # another library's ValueError was one line, without where it came from
        json.loads("{not json")  # json.JSONDecodeError, raised in the json module

    monkeypatch.setattr(cli, "run", foreign_value_error)
    with pytest.raises(json.JSONDecodeError):
        main(["describe", str(h5ad_path), "--model", "x", "--out", str(out)])

    def bug(args):  # a KeyError, TypeError or RuntimeError inside describing is a bug, not a message
        raise KeyError("cell_type_score")

    monkeypatch.setattr(cli, "run", bug)
    with pytest.raises(KeyError, match="cell_type_score"):
        main(["describe", str(h5ad_path), "--model", "x", "--out", str(out)])


def test_running_out_of_memory_names_the_batch_size(model_dir, h5ad, tmp_path, capsys, monkeypatch):
    import torch

    import modeling_cell2text.tl as tl

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tl, "describe_cells", out_of_memory)
    out = tmp_path / "out.h5ad"
    assert main(["describe", str(h5ad), "--model", str(model_dir), "--out", str(out), "--batch-size", "64"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("cell2text: error: out of memory describing 64 cells at a time on cpu; pass a smaller --batch-size")
    assert not out.exists()


def test_errors_name_the_commands_options(model_dir, tmp_path, capsys):
    """The reviewer's finding: log-normalised X read as counts was refused naming input_values='log1p', a Python
    keyword, where the command's option is --input-values log1p."""
    from modeling_cell2text.cli import as_command_line

    adata = make_adata(4)
    adata.X = adata.X.log1p()
    path = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(path)
    code, err = run_cli(["describe", str(path), "--model", str(model_dir), "--out", str(tmp_path / "out.h5ad")],
                        capsys)
    last = err.strip().splitlines()[-1]  # after the progress bar: the cells' values are checked as they are read
    assert code == 1 and last.startswith("cell2text: error: --input-values counts but the values are not integer"), err
    assert "pass --input-values normalized" in last and "input_values=" not in err
    assert as_command_line("Describe with constrained=False, or pass skip_empty_cells=True; layer='counts'") == \
        "Describe with --free, or pass --skip-empty-cells; --layer counts"
    assert as_command_line("use_raw=True but adata.raw is None; read X (leave use_raw out) or pass layer=...") == \
        "--use-raw but adata.raw is None; read X (leave --use-raw out) or pass --layer NAME"
    message = "Expected input batch_size (4) to match target batch_size (8)"  # torch's words stay as they are
    assert as_command_line(message) == message
    assert as_command_line("obs_map names columns not in obs: ['x']") == "--obs-map names columns not in obs: ['x']"
    assert as_command_line("max_new_tokens=30 need 69 positions: pass a smaller max_new_tokens, or") == \
        "--max-new-tokens 30 need 69 positions: pass a smaller --max-new-tokens, or"


@pytest.mark.parametrize("word", ["obs_map", "use_raw", "layer", "input_values", "batch_size"])
def test_a_path_or_column_holding_an_option_word_is_named_as_it_is(word):
    """A second reader's finding: a folder called obs_map was named "/tmp/--obs-map/cells.h5ad" in every error."""
    from modeling_cell2text.argument_types import as_command_line

    for message in (f"input file /tmp/{word}/cells.h5ad does not exist",
                    f"obs has no column {word!r}; available: ['{word}', '{word}.1']"):
        assert as_command_line(message) == message


def test_nan_logits_are_one_line_naming_the_dtype_option(model_dir, h5ad, tmp_path, capsys, monkeypatch):
    """The reviewer's finding: the FloatingPointError of NaN logits (an overflowing float16 model) ended the command
    with a traceback, where its message names the fix."""
    import modeling_cell2text.tl as tl
    from modeling_cell2text.schema_decoding import nan_logits_error

    def overflowing(*args, **kwargs):
        raise nan_logits_error("the free description (constrained=False) cannot be written")

    monkeypatch.setattr(tl, "describe_cells", overflowing)
    out = tmp_path / "out.h5ad"
    code, err = run_cli([*describe_args(h5ad, model_dir, out), "--free"], capsys)
    assert_one_line_error(code, err, "NaN logits", "the free description (--free)", "bfloat16 (--dtype NAME)")
    assert code == 1 and not out.exists()



def test_nan_embeddings_are_refused_not_written_as_skipped_cells(model_dir, h5ad, tmp_path, capsys):
    """An encoder weight that overflowed (inf) made every embedding NaN: embed wrote them, exit 0, and said "Embedded 0
    of 5 cells (5 skipped with --skip-empty-cells: their rows are NaN)" without that option."""
    from safetensors.torch import load_file
    from tiny_parts import rewrite_weights

    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(key for key in weights if key.startswith("model.gene_encoder.") and key.endswith("dense.weight"))
    weights[name][0, 0] = float("inf")
    rewrite_weights(broken / "model.safetensors", weights)
    out = tmp_path / "embedded.h5ad"
    code = main(["embed", str(h5ad), "--model", str(broken), "--out", str(out), "--layer", "counts", "--device", "cpu"])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("cell2text: error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in captured.err, captured.err
    assert "NaN or infinite states for 5 of the 5 cells" in errors[0] and "bfloat16 (--dtype NAME)" in errors[0]
    assert "Embedded" not in captured.out and not out.exists()

def test_free_descriptions_cut_by_max_new_tokens_are_counted_as_not_parsed(model_dir, h5ad, tmp_path, capsys,
                                                                             caplog):
    """The reviewer's finding: `--free --max-new-tokens 14` cut every description after its first sentence, which
    parsed (tissue and disease missing): "Described 3 of 3 cells", exit 0, nothing said the texts were cut."""
    from modeling_cell2text.argument_types import as_command_line

    out = tmp_path / "out.h5ad"
    assert main(describe_args(h5ad, model_dir, out, "--free", "--max-new-tokens", "14")) == 0  # the last one counts
    assert "Described 5 of 5 cells (5 of them not parsed into fields: cell2text_parsed is False)" in \
        capsys.readouterr().out
    obs = ad.read_h5ad(out).obs
    assert not obs["cell2text_parsed"].any() and obs["cell2text_cell_type"].isna().all()
    warning = as_command_line(caplog.text)
    assert "5 of 5 free descriptions were cut" in warning and "--max-new-tokens 14" in warning
    assert "pass a larger --max-new-tokens." in warning
    whole = tmp_path / "whole.h5ad"
    assert main(describe_args(h5ad, model_dir, whole, "--free")) == 0  # 40 tokens: whole
    assert "Described 5 of 5 cells; wrote" in capsys.readouterr().out
    assert ad.read_h5ad(whole).obs["cell2text_parsed"].all()
    caplog.clear()  # without --free the option has no effect, and the pipeline (the one owner of that warning) says so
    assert main(describe_args(h5ad, model_dir, tmp_path / "constrained.h5ad", "--max-new-tokens", "14")) == 0
    assert "--max-new-tokens 14 bounds free descriptions (--free) only" in as_command_line(caplog.text)


def test_skipped_cells_and_empty_descriptions_are_told_apart(model_dir, tmp_path, capsys, monkeypatch):
    """A skipped cell (--skip-empty-cells) was written as "" like a description the model left empty, and the summary
    counted cells by non-empty text: an empty description was called not described. Skipped now reads missing."""
    from modeling_cell2text import tl

    adata = make_adata(3)
    counts = adata.X.toarray()
    counts[1] = 0  # expresses none of the model's genes: skipped
    adata.layers["counts"] = counts
    h5ad = tmp_path / "cells.h5ad"
    adata.write_h5ad(h5ad)
    out = tmp_path / "out.h5ad"
    assert main(describe_args(h5ad, model_dir, out, "--skip-empty-cells")) == 0
    assert "Described 2 of 3 cells; wrote" in capsys.readouterr().out
    descriptions = ad.read_h5ad(out).obs["cell2text_description"]
    assert list(descriptions.isna()) == [False, True, False]

    def empty_texts(cells, model, processor, options=None, **keywords):
        results, params = describe_cells(cells, model, processor, options, **keywords)
        return [None if r is None else {"description": "", "parsed": False} for r in results], params

    describe_cells = tl.describe_cells
    monkeypatch.setattr(tl, "describe_cells", empty_texts)
    empty = tmp_path / "empty.h5ad"
    assert main(describe_args(h5ad, model_dir, empty, "--skip-empty-cells")) == 0
    assert "Described 2 of 3 cells (2 of them not parsed into fields" in capsys.readouterr().out
    assert list(ad.read_h5ad(empty).obs["cell2text_description"].isna()) == [False, True, False]
    # embed: a skipped cell's row is NaN, and the summary said "Embedded 3 cells" (also where every cell was skipped)
    embedded = tmp_path / "embedded.h5ad"
    assert main(["embed", str(h5ad), "--model", str(model_dir), "--out", str(embedded), "--layer", "counts",
                 "--skip-empty-cells"]) == 0
    assert "Embedded 2 of 3 cells (1 skipped with --skip-empty-cells: their rows are NaN)" in capsys.readouterr().out
    assert list(np.isnan(ad.read_h5ad(embedded).obsm["X_cell2text"]).all(axis=1)) == [False, True, False]


def test_cell_types_chooses_among_those_labels_only(tmp_path, capsys, monkeypatch):
    """Cells known to be of a few types (sorted populations): --cell-types narrows the model's labels to them;
    another label, or with --free, is a one-line error before any cell is described."""
    from test_pipeline import ONTOLOGY_IDS

    cell_types = {"B cell": "CL:0000236", "T cell": "CL:0000084", "monocyte": "CL:0000576"}
    model = save_tiny_model_folder(tmp_path / "model", trained=False,
                                   labels={"ontology_term_ids": {**ONTOLOGY_IDS, "cell_type": cell_types}})
    h5ad = tmp_path / "cells.h5ad"
    adata = make_adata(3)
    adata.layers["counts"] = adata.X.copy()
    adata.write_h5ad(h5ad)
    out = tmp_path / "out.h5ad"
    assert main(describe_args(h5ad, model, out, "--cell-types", "monocyte", "T cell")) == 0
    written = ad.read_h5ad(out)
    assert set(written.obs["cell2text_cell_type"]) <= {"monocyte", "T cell"}
    assert sorted(written.uns["cell2text"]["params"]["cell_types"]) == ["T cell", "monocyte"]
    again = tmp_path / "again.h5ad"  # the option given twice: both lists (argparse kept the last one only)
    assert main(describe_args(h5ad, model, again, "--cell-types", "monocyte", "--cell-types", "T cell")) == 0
    assert list(ad.read_h5ad(again).uns["cell2text"]["params"]["cell_types"]) == ["T cell", "monocyte"]
    by_id = tmp_path / "by_id.h5ad"  # Cell Ontology ids stand for their labels (refused as no label before)
    assert main(describe_args(h5ad, model, by_id, "--cell-types", "CL:0000576", "T cell")) == 0
    assert list(ad.read_h5ad(by_id).obs["cell2text_cell_type"]) == list(written.obs["cell2text_cell_type"])
    capsys.readouterr()
    from modeling_cell2text import tl

    monkeypatch.setattr(tl, "load", fail_if_called)  # refused before the model is loaded
    for extra, words in ((["--cell-types", "hepatocyte"], ("--cell-types: 'hepatocyte' is not among",)),
                         (["--cell-types", "CL:0000577"], ("--cell-types: 'CL:0000577' (did you mean 'CL:0000576'?)",)),
                         (["--cell-types", "T cell", "--free"], ("--cell-types chooses", "leave --free out, or "
                                                                  "--cell-types"))):
        code, err = run_cli(describe_args(h5ad, model, tmp_path / "refused.h5ad", *extra), capsys)
        assert_one_line_error(code, err, *words)
        assert not (tmp_path / "refused.h5ad").exists()


def test_cell_types_before_the_input_file_says_it_took_the_input(capsys):
    """The reviewer's finding: --cell-types takes every value after it, the input's path too, and argparse said only
    that the input was missing."""
    with pytest.raises(SystemExit) as stopped:
        main(["describe", "--cell-types", "T cell", "in.h5ad", "--model", "m", "--out", "o.h5ad"])
    assert stopped.value.code == 2
    assert "required: input (--cell-types takes every value after it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["embed", "--model", "m", "--out", "o.h5ad"])  # embed has no --cell-types: argparse's own message
    assert "--cell-types" not in capsys.readouterr().err.splitlines()[-1]


def test_genes_matched_reports_the_share_of_the_models_vocabulary(capsys):
    from modeling_cell2text import Cell2TextFeatureExtractor
    from modeling_cell2text.cli import report_genes_matched

    extractor = Cell2TextFeatureExtractor.from_gene_medians({gene: 1.0 for gene in GENES})
    report_genes_matched(extractor, pd.DataFrame(index=GENES[:30] + ["ENSG99999999999"]))
    assert ("Genes matched: 30 of 31 genes in the file (97%) are in the model's gene vocabulary; they are 50% of its "
            "60 genes") in capsys.readouterr().out


def test_embed_reads_log1p_values_as_declared(tmp_path):
    """--input-values reaches the feature extractor: log1p values declared so embed as their counts do (counts
    chosen without ties in count / median, so float rounding of expm1 cannot reorder genes)."""
    import scipy.sparse as sp

    folder = save_tiny_model_folder(tmp_path / "model", trained=False)
    rng = np.random.default_rng(0)
    medians = np.array([1.0 + (i % 4) for i in range(len(GENES))])  # tiny_processor's gene medians
    counts = np.zeros((4, len(GENES)), dtype=np.float32)
    for row in range(4):
        genes = rng.choice(len(GENES), 12, replace=False)
        counts[row, genes] = (rng.permutation(12) + 1) * medians[genes]  # count / median: 1..12, all distinct
    adata = make_adata(4)
    adata.X = sp.csr_matrix(np.log1p(counts))
    adata.layers["counts"] = sp.csr_matrix(counts)
    cells = tmp_path / "cells.h5ad"
    adata.write_h5ad(cells)
    common = ["--model", str(folder), "--device", "cpu", "--dtype", "float32"]
    assert main(["embed", str(cells), "--out", str(tmp_path / "counts.h5ad"), "--layer", "counts", *common]) == 0
    assert main(["embed", str(cells), "--out", str(tmp_path / "log1p.h5ad"), "--input-values", "log1p", *common]) == 0
    from_counts = ad.read_h5ad(tmp_path / "counts.h5ad").obsm["X_cell2text"]
    from_log1p = ad.read_h5ad(tmp_path / "log1p.h5ad").obsm["X_cell2text"]
    assert np.allclose(from_counts, from_log1p, atol=1e-5)
