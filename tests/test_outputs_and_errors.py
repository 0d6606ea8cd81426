"""No result lost to a second writer, nothing half-written left by a stop, and bad inputs refused where they enter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import pytest
import torch
from test_cli import NEW_COLUMNS, assert_one_line_error, describe_args, run_cli
from test_pipeline import make_adata, save_tiny_model_folder
from tiny_parts import run_as_command

from modeling_cell2text import Cell2TextConfig, Cell2TextForConditionalGeneration, Cell2TextProcessor, tl
from modeling_cell2text.output_files import OutputExistsError, check_new_output, publish_file, publish_folder

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("errors-model"), trained=True)


@pytest.fixture()
def h5ad(tmp_path) -> Path:
    adata = make_adata(4)
    adata.layers["counts"] = adata.X.copy()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path


# ----------------------------------------------------------------------------- a second writer

RACER = """
import sys, time
from pathlib import Path
from modeling_cell2text.output_files import OutputExistsError, publish_file
temporary, target, start = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
temporary.write_text(sys.argv[1])
while time.time() < start:
    pass
try:
    publish_file(temporary, target, overwrite=False)
except OutputExistsError as error:
    temporary.unlink()
    print(error)
    sys.exit(1)
"""


def test_two_processes_publishing_one_file_leave_one_result_and_one_error(tmp_path):
    target = tmp_path / "out.h5ad"
    start = time.time() + 3  # both processes publish at the same instant
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / f".tmp-{i}"), str(target), str(start)],
                               stdout=subprocess.PIPE, text=True, env=ENV) for i in range(2)]
    codes = sorted(racer.wait(timeout=60) for racer in racers)
    outputs = [racer.stdout.read() for racer in racers]
    assert codes == [0, 1], outputs
    assert any("out.h5ad exists; pass --overwrite to replace it" in output for output in outputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"]
    assert target.read_text() in (str(tmp_path / ".tmp-0"), str(tmp_path / ".tmp-1"))


def test_a_file_published_meanwhile_is_kept_unless_overwrite(tmp_path):
    target, temporary = tmp_path / "out.h5ad", tmp_path / ".new"
    target.write_text("the other run's result")
    temporary.write_text("this run's result")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        publish_file(temporary, target, overwrite=False)
    assert target.read_text() == "the other run's result"
    publish_file(temporary, target, overwrite=True)
    assert target.read_text() == "this run's result" and not temporary.exists()


def test_a_folder_published_meanwhile_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "corpus"
    target.mkdir()
    (target / "summary.json").write_text("other")
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "summary.json").write_text("mine")
    with pytest.raises(OutputExistsError):
        publish_folder(staging, target, overwrite=False)
    assert (target / "summary.json").read_text() == "other"
    publish_folder(staging, target, overwrite=True)
    assert (target / "summary.json").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_a_replacement_that_fails_to_move_in_puts_the_old_output_back(tmp_path, monkeypatch):
    """With --overwrite the old folder is set aside first; where the new one then fails to move in (a full disk, a
    signal), the old one is put back, not lost with the new."""
    from modeling_cell2text import output_files

    target, staging = tmp_path / "corpus", tmp_path / ".staging"
    for folder, text in ((target, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "summary.json").write_text(text)

    def failing_rename(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output_files, "_rename_no_replace", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        publish_folder(staging, target, overwrite=True, holds="summary.json")
    assert (target / "summary.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging", "corpus"]  # nothing set aside is left


def test_overwrite_replaces_only_an_output_of_the_same_kind(tmp_path):
    """The QA finding: the evaluation report with --overwrite pointed at a folder holding a model and a corpus
    deleted them and left only the report."""
    from training.evaluation.report import write_report

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_text("weights")
    with pytest.raises(OutputExistsError, match="holds files but no results.json.*choose a new or empty folder"):
        write_report({"num_cells": 1}, {}, model, overwrite=True)
    with pytest.raises(OutputExistsError, match="holds files but no results.json"):
        check_new_output(model, overwrite=True, holds="results.json")
    with pytest.raises(OutputExistsError, match="exists; pass --overwrite"):  # up front, not after hours of work
        check_new_output(model, overwrite=False)
    check_new_output(tmp_path / "empty", overwrite=False)  # missing, or (below) an empty folder: free
    (tmp_path / "empty").mkdir()
    check_new_output(tmp_path / "empty", overwrite=True, holds="results.json")
    staging = tmp_path / ".staging"
    staging.mkdir()
    with pytest.raises(OutputExistsError, match="holds files but no config.json"):
        publish_folder(staging, model, overwrite=True, holds="config.json")
    assert (model / "model.safetensors").read_text() == "weights"
    report = write_report({"num_cells": 1}, {}, tmp_path / "report")
    assert write_report({"num_cells": 2}, {}, tmp_path / "report", overwrite=True) == report  # an earlier report
    assert json.loads((tmp_path / "report" / "results.json").read_text())["num_cells"] == 2


def test_two_describe_runs_with_one_out_leave_one_result_and_one_clear_error(model_dir, h5ad, tmp_path):
    """The QA finding: both runs exited 0 and the file held one run's columns. Now the run that finds --out taken
    (at the start or when publishing) fails with the usual error and leaves no temporary file."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "race.h5ad"
    command = [sys.executable, "-m", "modeling_cell2text.cli", *describe_args(h5ad, model_dir, out)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
            for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    error = next(err for code, err in results if code == 1)
    assert "race.h5ad exists; pass --overwrite to replace it" in error and "Traceback" not in error
    assert sorted(p.name for p in out_dir.iterdir()) == ["race.h5ad"]
    assert set(NEW_COLUMNS) <= set(ad.read_h5ad(out).obs.columns)


def test_a_report_published_meanwhile_is_kept(tmp_path, monkeypatch):
    from training.evaluation import report

    out = tmp_path / "report"

    def other_run_publishes_first(results, per_cell, staging):
        out.mkdir()
        (out / "report.md").write_text("the other run's report")
        (staging / "report.md").write_text("this run's report")

    monkeypatch.setattr(report, "_write_report_files", other_run_publishes_first)
    with pytest.raises(OutputExistsError):
        report.write_report({}, {}, out)
    assert (out / "report.md").read_text() == "the other run's report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


# ----------------------------------------------------------------------------- stopped writers

SLOW_CORPUS_BUILD = """
import sys, time
import processing.build_corpus as build

real_build = build._build

def slow_build(source, staging, options):
    summary = real_build(source, staging, options)
    open(sys.argv[1], "w").close()
    time.sleep(120)
    return summary

build._build = slow_build
build.main(sys.argv[2:])
"""


def test_a_corpus_build_stopped_by_sigterm_leaves_nothing(tmp_path):
    from test_corpus_inputs import _tiny_adata

    h5ad = tmp_path / "cells.h5ad"
    _tiny_adata().write_h5ad(h5ad)
    ready, out = tmp_path / "ready", tmp_path / "corpora" / "corpus"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_CORPUS_BUILD, str(ready), "--h5ad", str(h5ad), "--out", str(out), "--gmt", "none",
         "--no-progress"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), process.communicate()[1][-3000:]
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0 and "stopped; nothing was written" in err, err[-2000:]
    assert not (tmp_path / "corpora").exists()  # neither the corpus, its staging folder nor the folder it made


# ----------------------------------------------------------------------------- bad inputs, where they enter


def test_a_config_without_text_config_is_refused_not_built_full_size(model_dir, tmp_path, h5ad, capsys):
    folder = tmp_path / "no-text-config"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["text_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no text_config"):
        Cell2TextForConditionalGeneration.from_pretrained(folder)
    capsys.readouterr()  # the loading bars above, shown where no earlier command turned them off
    code, err = run_cli(describe_args(h5ad, folder, tmp_path / "out.h5ad"), capsys)
    assert_one_line_error(code, err)
    assert "has no text_config" in err


def test_a_misspelt_setting_in_config_json_is_refused_not_left_at_its_default(model_dir, tmp_path):
    # transformers kept "cell_type_temprature" as an unused attribute: scores used the default 1.0, exit 0
    folder = tmp_path / "misspelt"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["cell_type_temprature"] = config.pop("cell_type_temperature")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'cell_type_temprature' \(did you mean 'cell_type_temperature'\?\)"):
        Cell2TextConfig.from_pretrained(folder)
    config["cell_type_temperature"] = 2.0  # a key of the user's own beside every setting is theirs to keep
    (folder / "config.json").write_text(json.dumps(config))
    assert Cell2TextConfig.from_pretrained(folder).cell_type_temperature == 2.0


@pytest.mark.parametrize(("field", "value"), [("num_cell_tokens", "8"), ("projector_dropout", "0.1"),
                                               ("num_cell_tokens", 8.0),
                                               # "false" froze the encoder (a non-empty string is true)
                                               ("freeze_gene_encoder", "false"),
                                               # an AttributeError mid-load
                                               ("field_temperatures", [1.0]),
                                               # read as no recorded parts: the processor went unchecked
                                               ("processor_sha256", "abc"), ("processor_sha256", {"labels": None}),
                                               ("gene_vocabulary_sha256", 5), ("gene_ranking_sha256", 5)])
def test_config_fields_of_the_wrong_type_are_refused_by_name(model_dir, field, value):
    config = Cell2TextConfig.from_pretrained(model_dir).to_dict()
    config[field] = value
    with pytest.raises(ValueError, match=f"{field} must be"):
        Cell2TextConfig.from_dict(config)


@pytest.mark.parametrize(("part", "key"), [(None, "dtype"), ("text_config", "dtype"),
                                           ("gene_encoder_config", "torch_dtype")])
def test_a_dtype_in_config_json_that_names_no_torch_dtype_is_refused_by_name(model_dir, tmp_path, h5ad, capsys, part,
                                                                            key):
    """transformers failed with "AttributeError: module 'torch' has no attribute 'bfloat'" (a traceback in the CLI)."""
    folder = tmp_path / "bad-dtype"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (config if part is None else config[part])[key] = "bfloat"
    (folder / "config.json").write_text(json.dumps(config))
    where = key if part is None else f"{part}.{key}"
    with pytest.raises(ValueError, match=rf"^{where} in config.json is 'bfloat', which names no torch dtype: use "
                                         "float32, bfloat16 or float16.$"):
        Cell2TextConfig.from_pretrained(folder)
    code, err = run_cli(describe_args(h5ad, folder, tmp_path / "out.h5ad"), capsys)
    assert_one_line_error(code, err)
    assert f"{where} in config.json is 'bfloat'" in err


@pytest.mark.parametrize("model_type", ["llava", None])
def test_a_config_json_of_another_model_type_is_refused_not_loaded_as_cell2text(model_dir, tmp_path, model_type):
    """transformers only warned and loaded it (exit 0), while tl, AutoConfig and pipeline() read it as another
    model's (or none), so publishing passed a folder that transformers' pipeline could not load."""
    folder = tmp_path / "other-type"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(ValueError, match=f"model_type {model_type!r}, not 'cell2text'.*Restore"):
        Cell2TextForConditionalGeneration.from_pretrained(folder)


def test_a_config_json_that_holds_no_object_is_refused(model_dir, tmp_path):
    """A JSON list ended from_pretrained (training's --init_from, evaluation, pipeline()) in an AttributeError."""
    folder = tmp_path / "list"
    shutil.copytree(model_dir, folder)
    (folder / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match="This config.json holds a JSON list, not an object: restore it"):
        Cell2TextForConditionalGeneration.from_pretrained(folder)


def test_a_malformed_config_json_is_named(model_dir, tmp_path, h5ad, capsys):
    folder = tmp_path / "bad-json"
    shutil.copytree(model_dir, folder)
    (folder / "config.json").write_text('{"model_type": "cell2text", "text_config": {"vocab')
    code, err = run_cli(describe_args(h5ad, folder, tmp_path / "out.h5ad"), capsys)
    assert_one_line_error(code, err)
    assert "config.json is not a valid JSON object" in err and "restore the file" in err


def test_pickled_weights_are_refused_with_the_conversion(model_dir, tmp_path, h5ad, capsys):
    folder = tmp_path / "pickled"
    shutil.copytree(model_dir, folder)
    weights = Cell2TextForConditionalGeneration.from_pretrained(model_dir).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="loads safetensors only.*use_safetensors=False"):
        Cell2TextForConditionalGeneration.from_pretrained(folder)
    with pytest.raises(OSError, match="loads safetensors only"):  # None, transformers' default, unpickled it
        Cell2TextForConditionalGeneration.from_pretrained(folder, use_safetensors=None)
    capsys.readouterr()  # the loading bars above, shown where no earlier command turned them off
    code, err = run_cli(describe_args(h5ad, folder, tmp_path / "out.h5ad"), capsys)
    assert_one_line_error(code, err)
    assert "safetensors only" in err
    # The conversion the message gives makes a complete folder that describes.
    from modeling_cell2text import Cell2TextProcessor, save_model_folder

    converted = tmp_path / "converted"
    save_model_folder(Cell2TextForConditionalGeneration.from_pretrained(folder, use_safetensors=False),
                      Cell2TextProcessor.from_pretrained(folder), converted)
    assert (converted / "model.safetensors").is_file()
    code, err = run_cli(describe_args(h5ad, converted, tmp_path / "converted.h5ad"), capsys)
    assert code == 0, err


def test_an_input_folder_is_called_a_folder(model_dir, tmp_path, capsys):
    code, err = run_cli(describe_args(tmp_path, model_dir, tmp_path / "out.h5ad"), capsys)
    assert_one_line_error(code, err)
    assert "is a folder; give the path of an .h5ad file" in err


def test_generate_refuses_a_cell_without_gene_tokens(model_dir):
    model = Cell2TextForConditionalGeneration.from_pretrained(model_dir)
    processor = Cell2TextProcessor.from_pretrained(model_dir)
    fe = processor.feature_extractor
    cells = [[fe.gene_token_ids["<cls>"], 10, 11, fe.eos_token_id], [fe.gene_token_ids["<cls>"], fe.eos_token_id]]
    inputs = processor(gene_input_ids=cells)
    with pytest.raises(ValueError, match=r"Cells \[1\] of the batch hold no gene token"):
        model.generate(**inputs, max_new_tokens=2)


@pytest.mark.parametrize("key", ["a/b", ".", ".."])
def test_key_added_with_a_slash_or_a_path_component_is_refused(model_dir, tmp_path, h5ad, capsys, key):
    """'.' (the QA finding) passed the check, and writing the h5ad failed after every cell was described."""
    with pytest.raises(ValueError, match="without '/'"):
        tl.embed(make_adata(2), model_dir, key_added=key, progress=False)
    with pytest.raises(ValueError, match="without '/'"):
        tl.describe(make_adata(2), model_dir, key_added=key, progress=False)
    code, err = run_cli([*describe_args(h5ad, model_dir, tmp_path / "out.h5ad"), "--key-added", key], capsys)
    assert_one_line_error(code, err)
    assert f"--key-added {key!r} must be a non-empty name without '/'" in err


def test_a_published_folder_and_its_files_are_readable_as_new_files_are(tmp_path):
    """`tempfile.mkdtemp` makes a staging folder private and transformers writes weights 0600: the corpus folder
    was published 0700 and the model's weights 0600 (unreadable to the user's group on a shared machine)."""
    import tempfile

    from modeling_cell2text.output_files import publish_folder

    staging = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".out.partial-"))
    (staging / "model.safetensors").write_bytes(b"weights")
    (staging / "model.safetensors").chmod(0o600)
    (staging / "split").mkdir()
    (staging / "split" / "data.arrow").write_bytes(b"cells")
    publish_folder(staging, tmp_path / "out", overwrite=False)
    mask = os.umask(0)
    os.umask(mask)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {0o666 & ~mask}


@pytest.mark.parametrize("flag", ["--batch-size", "--max-new-tokens", "--max-cells"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_evaluate_refuses_a_count_below_one_before_loading_the_model(tmp_path, capsys, flag, value):
    """--batch-size 0 ended the evaluation with "range() arg 3 must not be zero" and -1 with "0 descriptions for 8
    cells", after the model was loaded."""
    from training.evaluation.evaluate import main as evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate(["--model", str(tmp_path / "no-model"), "--corpus", str(tmp_path / "no-corpus"), "--out",
                  str(tmp_path / "report"), flag, value])
    assert exit_info.value.code == 2 and f"{flag}: expected an integer >= 1, got" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["-m", "processing.build_corpus", "--h5ad", "missing.h5ad", "--out", "corpus"],
    ["-m", "training.evaluation.evaluate", "--model", "missing-model", "--corpus", "missing-corpus", "--out", "r"],
    ["-m", "hub_cards.publish", "--model", "missing-model", "--repo", "org/x"],
    # raised in the module run with -m (its __name__ is __main__): this project's refusal all the same
    ["-m", "hub_cards.publish", "--model", "missing-model", "--repo", "org/x/y"],
    # the recipes ended a missing corpus and a refused setting with a traceback
    ["-m", "training.sft", "--corpus_dir", "missing-corpus", "--text_model_name_or_path", "llm", "--output_dir", "o"],
    ["-m", "training.sft", "--corpus_dir", "c", "--text_model_name_or_path", "llm", "--output_dir", "o",
     "--num_cell_tokens", "0"],
    ["-m", "training.baselines.cell2sentence", "--corpus_dir", "missing-corpus", "--text_model_name_or_path", "llm",
     "--output_dir", "o"],
    # TRL's and transformers' refusals of the command line (a misspelt option, options that contradict each other)
    ["-m", "training.sft", "--corpus_dir", "c", "--text_model_name_or_path", "llm", "--output_dir", "o",
     "--num_cel_tokens", "8"],
    ["-m", "training.sft", "--corpus_dir", "c", "--text_model_name_or_path", "llm", "--output_dir", "o",
     "--load_best_model_at_end", "true"],
    ["-m", "training.baselines.cell2sentence", "--corpus_dir", "c", "--text_model_name_or_path", "llm",
     "--output_dir", "o", "--num_cel_tokens", "8"],
])
def test_commands_end_refused_input_with_one_line(tmp_path, monkeypatch, capsys, command):
    """The reviewer's finding: a missing input file or folder ended these commands with a traceback (the message
    was there, at its end); the cell2text command already ended with one line. Run as `python -m` runs them, in
    this process (`run_as_command`)."""
    import logging

    def levels() -> dict:  # read without getLogger, which would make a logger of a placeholder before the run
        loggers = logging.root.manager.loggerDict
        return {name: getattr(loggers.get(name), "level", logging.NOTSET)
                for name in ("modeling_cell2text", "processing", "training")}

    before = levels()
    result = run_as_command(command, tmp_path, monkeypatch, capsys)
    # as after a process: build_corpus's level for modeling_cell2text (a placeholder before) stayed set for the rest
    # of the session
    assert levels() == before
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].split(": error: ")[1].strip(), result.stderr


def test_a_command_run_in_process_logs_to_stderr_as_a_process_does(tmp_path, monkeypatch, capsys):
    """`run_as_command` in a pytest test: the command's `logging.basicConfig` did nothing (pytest's handlers were on
    the root logger), so what it logged, a traceback included, was not on the stderr the tests assert on."""
    script = tmp_path / "command.py"
    script.write_text("import logging, sys\nlogging.basicConfig()\n"
                      "logging.getLogger('command').warning('a warning', exc_info=ValueError('logged'))\n"
                      "sys.exit('command: error: refused')\n")
    result = run_as_command([str(script)], tmp_path, monkeypatch, capsys)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == "command: error: refused"
    assert "WARNING:command:a warning" in result.stderr and "ValueError: logged" in result.stderr


def test_the_demo_ends_refused_input_with_one_line(monkeypatch, tmp_path):
    """`python -m training.demo` ended a refusal (--reuse-models of a model trained on another corpus build, an --out
    that is a file) with a traceback; its refusals come minutes in, so `run` stands in for them here."""
    import json

    from training import demo

    (tmp_path / "config.json").write_text(json.dumps({"training_corpus_fingerprints": {"train": "a"}}))

    def refused(*args, **kwargs):  # the demo's own refusal
        demo.check_trained_on(tmp_path, {"train": "b"})

    monkeypatch.setattr(demo, "run", refused)
    with pytest.raises(SystemExit, match=r"^demo: error: --reuse-models: the model in .* was trained on another"):
        demo.main(["--out", str(tmp_path), "--reuse-models"])

    def bug(*args, **kwargs):  # another library's ValueError inside the run keeps its traceback: it is no refusal
        json.loads("{not json")

    monkeypatch.setattr(demo, "run", bug)
    with pytest.raises(json.JSONDecodeError):
        demo.main(["--out", str(tmp_path), "--reuse-models"])


@pytest.mark.parametrize("option", ["--max-steps", "--max-new-tokens"])
def test_the_demo_refuses_a_size_below_one_before_it_runs(monkeypatch, capsys, tmp_path, option):
    """`--max-steps 0` read as no cap: the whole recipe trained for its hours where a smoke run was asked for."""
    from training import demo

    monkeypatch.setattr(demo, "run", lambda *args, **kwargs: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit) as refused:
        demo.main(["--out", str(tmp_path), option, "0"])
    assert refused.value.code == 2 and f"{option}: " in capsys.readouterr().err
