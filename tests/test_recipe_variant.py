"""benchmarks/recipe_variant.py: an output folder is reused only for the run that wrote it."""

from __future__ import annotations

import argparse
import json

import pytest
from tiny_parts import load_benchmark


def test_resume_reuses_models_only_of_the_same_change_and_folds(tmp_path):
    variant = load_benchmark("recipe_variant")
    result = tmp_path / "recipe_variant.json"
    folds = tmp_path / "folds"
    args = argparse.Namespace(overrides=["num_train_epochs=2"], folds_dir=folds, resume=False, variant_folds_dir=None)
    variant.check_resumable(result, args)  # nothing there yet
    result.write_text(json.dumps({"overrides": ["num_train_epochs=2"], "folds_dir": str(folds)}))
    with pytest.raises(SystemExit, match="pass --resume"):
        variant.check_resumable(result, args)
    variant.check_resumable(result, argparse.Namespace(**{**vars(args), "resume": True}))
    for other in ({"overrides": ["num_train_epochs=3"]}, {"folds_dir": tmp_path / "other"},
                  {"overrides": None, "variant_folds_dir": tmp_path / "new"}):
        with pytest.raises(SystemExit, match="same --set and --folds-dir"):
            variant.check_resumable(result, argparse.Namespace(**{**vars(args), "resume": True, **other}))


def test_set_takes_name_value_pairs():
    variant = load_benchmark("recipe_variant")
    assert variant.recipe_overrides(["a=1", "b=x=y"]) == ["--a", "1", "--b", "x=y"]
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        variant.recipe_overrides(["num_train_epochs"])


def test_a_batch_size_below_one_is_refused_before_a_fold_trains(tmp_path, monkeypatch, capsys):
    """--batch-size 0 was first used to score the validation cells, after a fold's variant had trained."""
    import sys

    variant = load_benchmark("recipe_variant")
    monkeypatch.setattr(sys, "argv", ["recipe_variant.py", "--set", "num_train_epochs=2", "--out", str(tmp_path),
                                      "--folds-dir", str(tmp_path / "folds"), "--batch-size", "0"])
    with pytest.raises(SystemExit) as exit_info:
        variant.main()
    assert exit_info.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_a_change_that_would_prepare_another_encoder_is_refused(tmp_path):
    """The variant must reuse the fold's prepared encoder: a --set that changes what the encoder is prepared for
    (num_cell_tokens here) would make the recipe prepare and select its own, so it is refused before training, naming
    the setting; a change of the LLM side passes."""
    from dataclasses import asdict

    from tiny_parts import save_tiny_corpus

    from training.demo import sft_arguments
    from training.gene_encoder import PREPARED_ENCODER_DIR, SELECTION_FILE, EncoderSelection
    from training.sft import encoder_preparation, load_corpus

    variant = load_benchmark("recipe_variant")
    fold = tmp_path / "fold-0"
    corpus_dir = save_tiny_corpus(fold / "corpus")

    def arguments(*extra: str):
        return sft_arguments(["--corpus_dir", str(corpus_dir), "--text_model_name_or_path", "unused",
                              "--output_dir", str(tmp_path / "out"), "--seed", "0", *extra])

    args, config = arguments()
    selection = EncoderSelection(candidates=[], validation_accuracy=[], best=0, path="x",
                                 prepared_for=encoder_preparation(args, config, *load_corpus(corpus_dir, args)))
    (fold / "sft" / PREPARED_ENCODER_DIR).mkdir(parents=True)
    (fold / "sft" / PREPARED_ENCODER_DIR / SELECTION_FILE).write_text(json.dumps(asdict(selection)))
    variant.check_encoder_reused(fold, args, config, [])
    variant.check_encoder_reused(fold, *arguments("--cell_type_balance", "0.5"), ["cell_type_balance=0.5"])
    with pytest.raises(SystemExit, match=r"prepared for \(num_cell_tokens\)"):
        variant.check_encoder_reused(fold, *arguments("--num_cell_tokens", "32"), ["num_cell_tokens=32"])


def test_a_second_quality_run_is_paired_only_on_the_same_cells_and_encoder(tmp_path):
    """--variant-folds-dir pairs two quality runs' fold models: refused where a fold's validation cells or its
    prepared encoder's weights differ (the runs would differ by more than the recipe)."""
    from tiny_parts import save_tiny_corpus

    from training.gene_encoder import PREPARED_ENCODER_DIR

    variant = load_benchmark("recipe_variant")
    folds = {name: tmp_path / name / "fold-0" for name in ("reference", "variant")}
    for fold in folds.values():
        save_tiny_corpus(fold / "corpus")
        (fold / "sft" / PREPARED_ENCODER_DIR).mkdir(parents=True)
        (fold / "sft" / PREPARED_ENCODER_DIR / "model.safetensors").write_bytes(b"weights")
    variant.check_same_folds(folds["reference"], folds["variant"])
    (folds["variant"] / "sft" / PREPARED_ENCODER_DIR / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(SystemExit, match="in its prepared gene encoder"):
        variant.check_same_folds(folds["reference"], folds["variant"])
    from datasets import load_from_disk

    corpus = load_from_disk(str(folds["reference"] / "corpus"))
    corpus["validation"] = corpus["validation"].map(lambda row: {"cell_id": row["cell_id"] + "-other"})
    corpus.save_to_disk(str(tmp_path / "other" / "corpus"))  # checked before the encoder: none is needed here
    with pytest.raises(SystemExit, match="in its validation cells"):
        variant.check_same_folds(folds["reference"], tmp_path / "other")


def test_a_model_trained_on_another_build_of_the_folds_is_refused(tmp_path):
    """A variant model kept by --resume (or a fold's model) trained on another build of the fold's corpus (folds
    rebuilt since with another seed or commit) was scored on the validation cells with exit 0: cells it may have
    trained on, or tokens of another gene vocabulary. A variant of a second quality run is checked against its own
    fold's corpus, and must read the reference's cells as its own."""
    import shutil

    from tiny_parts import edit_json, save_tiny_corpus, save_tiny_model

    variant = load_benchmark("recipe_variant")
    corpus_dir = save_tiny_corpus(tmp_path / "fold-0" / "corpus")
    edit_json(corpus_dir / "summary.json", lambda s: s.update(fingerprints={"train": "a", "validation": "b"}))
    model_dir = save_tiny_model(tmp_path / "model", corpus_dir,
                                training_corpus_fingerprints={"train": "a", "validation": "b"})
    assert len(variant.validation_cell_types(model_dir, corpus_dir, 4, "fix")) == 8  # its own build: scored
    rebuilt = tmp_path / "rebuilt" / "fold-0" / "corpus"
    shutil.copytree(corpus_dir, rebuilt)
    edit_json(rebuilt / "summary.json", lambda s: s.update(fingerprints={"train": "c", "validation": "d"}))
    with pytest.raises(SystemExit, match="cannot be scored on the validation cells .* not the build the model was "
                                         "trained on.*\nRun this again"):
        variant.validation_cell_types(model_dir, rebuilt, 4, "Run this again")
    # a variant of a second quality run: trained on its own fold's build, scored on the reference's cells
    assert len(variant.validation_cell_types(model_dir, rebuilt, 4, "fix", trained_on=corpus_dir)) == 8
    with pytest.raises(SystemExit, match="not the build the model was trained on"):
        variant.validation_cell_types(model_dir, corpus_dir, 4, "fix", trained_on=rebuilt)


def test_the_variant_trains_on_the_folds_thread_count_and_precision(tmp_path, monkeypatch, capsys):
    """The variant trained on the process's threads while the fold's model had trained on those quality.py records
    (a training's weights depend on its thread count), and on a CPU whose lack of bf16 kernels turned the recipe's
    bf16 autocast off (float32 against the folds' bf16): both differences were reported as the --set change."""
    import sys

    import torch
    from tiny_parts import save_tiny_corpus

    import training.prepare_demo_llm
    import training.sft
    from training.adapters import cpu_bf16_is_fast
    from training.gene_encoder import PREPARED_ENCODER_DIR

    variant = load_benchmark("recipe_variant", monkeypatch)
    folds = tmp_path / "folds"
    save_tiny_corpus(folds / "fold-0" / "corpus")
    (folds / "fold-0" / "sft" / PREPARED_ENCODER_DIR).mkdir(parents=True)
    (folds / "fold-0" / "cell2text-demo").mkdir()
    (folds / "fold-0" / "cell2text-demo" / "config.json").write_text("{}")
    benchmark = {"seed": 0, "max_steps": None, "device": "CPU only (1 threads)",
                 "environment": {"cpu_bf16_kernels": cpu_bf16_is_fast()},
                 "folds": [{"fold": 0, "training_threads": {"cell2text": 1}}]}
    (folds / "quality_benchmark.json").write_text(json.dumps(benchmark))
    threads = []
    monkeypatch.setattr(training.sft, "main", lambda *args: threads.append(torch.get_num_threads()))
    monkeypatch.setattr(training.prepare_demo_llm, "prepare_demo_llm", lambda: tmp_path / "llm")
    monkeypatch.setattr(variant, "check_encoder_reused", lambda *args: None)
    monkeypatch.setattr(variant, "validation_cell_types", lambda model_dir, corpus_dir, *rest: ["B cell"] * 4)
    argv = ["recipe_variant.py", "--set", "num_train_epochs=2", "--folds-dir", str(folds)]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path / "out")])
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        variant.main()
        assert threads == [1] and torch.get_num_threads() == 3  # the fold's count, then the process's again
    finally:
        torch.set_num_threads(before)
    # folds trained where the recipe chose the other precision: refused, unless --set names it
    benchmark["environment"]["cpu_bf16_kernels"] = not cpu_bf16_is_fast()
    (folds / "quality_benchmark.json").write_text(json.dumps(benchmark))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, as the folds'
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="differ from the reference by its precision too"):
        variant.main()
    assert threads == [1]  # refused before training
    monkeypatch.setattr(sys, "argv", [*argv[:3], f"bf16={str(not cpu_bf16_is_fast()).lower()}", *argv[3:],
                                      "--out", str(tmp_path / "named")])
    variant.main()
    assert len(threads) == 2
    # folds trained on a GPU, the variant here on a CPU: refused, whatever --set says
    (folds / "quality_benchmark.json").write_text(json.dumps({**benchmark, "device": "GPU: NVIDIA H100"}))
    monkeypatch.setattr(sys, "argv", [*sys.argv[:-1], str(tmp_path / "gpu")])
    with pytest.raises(SystemExit, match="trained on GPU: NVIDIA H100, this machine has none"):
        variant.main()
    assert len(threads) == 2


def test_variant_folds_measured_in_another_environment_are_refused(tmp_path, monkeypatch):
    """A --variant-folds-dir run (nothing trained) paired the fold models of two quality runs whatever machines they
    trained on: folds of a GPU, or of a CPU without bf16 kernels (float32) or on other threads, against the
    reference's, and that difference was reported as the recipe's, exit 0."""
    import sys

    from tiny_parts import save_tiny_corpus

    import training.prepare_demo_llm

    variant = load_benchmark("recipe_variant", monkeypatch)
    environment = {"cpu": "a CPU", "cpu_bf16_kernels": True, "cpu_threads": 2, "gpu": None, "packages": {"torch": "2"}}
    for run in ("reference", "variant"):
        save_tiny_corpus(tmp_path / run / "fold-0" / "corpus")
        (tmp_path / run / "fold-0" / "cell2text-demo").mkdir()
        (tmp_path / run / "fold-0" / "cell2text-demo" / "config.json").write_text("{}")
        (tmp_path / run / "quality_benchmark.json").write_text(json.dumps(
            {"seed": 0, "max_steps": None, "device": "CPU only (2 threads)", "environment": environment,
             "folds": [{"fold": 0, "training_threads": {"cell2text": 2}}]}))
    monkeypatch.setattr(training.prepare_demo_llm, "prepare_demo_llm", lambda: tmp_path / "llm")
    monkeypatch.setattr(variant, "check_same_folds", lambda *args: None)
    monkeypatch.setattr(variant, "validation_cell_types", lambda model_dir, corpus_dir, *rest: ["B cell"] * 4)
    argv = ["recipe_variant.py", "--folds-dir", str(tmp_path / "reference"), "--variant-folds-dir",
            str(tmp_path / "variant")]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path / "same")])
    variant.main()  # the same environment: paired
    path = tmp_path / "variant" / "quality_benchmark.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "environment": {
        **environment, "cpu_bf16_kernels": False, "cpu_threads": 1}}))
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match=r"measured in another environment than .*reference \(cpu_bf16_kernels, "
                                         r"cpu_threads differ\)"):
        variant.main()
    assert not (tmp_path / "other" / "recipe_variant.json").exists()


def test_a_variant_is_not_trained_on_another_gpu_than_the_folds(monkeypatch):
    """Folds trained on one GPU model and the variant on another (an H100's kernels against an A100's): only a CPU
    against a GPU was refused, so the other GPU's kernels were reported as the --set change, exit 0."""
    import torch

    variant = load_benchmark("recipe_variant")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA A100")
    with pytest.raises(SystemExit, match="trained on GPU: NVIDIA H100, this machine has GPU: NVIDIA A100"):
        variant.check_same_machine_precision({"device": "GPU: NVIDIA H100"}, ["num_train_epochs=2"])
    variant.check_same_machine_precision({"device": "GPU: NVIDIA A100"}, ["num_train_epochs=2"])  # the same GPU
    with pytest.raises(SystemExit, match="trained on CPU only .*, this machine has GPU: NVIDIA A100"):
        variant.check_same_machine_precision({"device": "CPU only (2 threads)"}, ["num_train_epochs=2"])


def test_resume_with_every_variant_trained_scores_on_another_machine(tmp_path, monkeypatch):
    """--resume refused to run on another machine than the folds' (a CPU for folds trained on a GPU) even where every
    fold's variant was already trained and only scoring was left; it still refuses where a fold would be trained."""
    import sys

    import torch
    from tiny_parts import save_tiny_corpus

    import training.prepare_demo_llm
    import training.sft
    from training.gene_encoder import PREPARED_ENCODER_DIR

    variant = load_benchmark("recipe_variant", monkeypatch)
    folds = tmp_path / "folds"
    for fold in ("fold-0", "fold-1"):
        save_tiny_corpus(folds / fold / "corpus")
        (folds / fold / "sft" / PREPARED_ENCODER_DIR).mkdir(parents=True)
        (folds / fold / "cell2text-demo").mkdir()
        (folds / fold / "cell2text-demo" / "config.json").write_text("{}")
    (folds / "quality_benchmark.json").write_text(json.dumps({"seed": 0, "max_steps": None,
                                                              "device": "GPU: NVIDIA H100", "folds": []}))
    trained = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, the folds' a GPU
    monkeypatch.setattr(training.sft, "main", lambda *args: trained.append(args))
    monkeypatch.setattr(training.prepare_demo_llm, "prepare_demo_llm", lambda: tmp_path / "llm")
    monkeypatch.setattr(variant, "check_encoder_reused", lambda *args: None)
    monkeypatch.setattr(variant, "validation_cell_types", lambda model_dir, corpus_dir, *rest: ["B cell"] * 4)
    out = tmp_path / "out"
    (out / "fold-0" / "model").mkdir(parents=True)
    (out / "fold-0" / "model" / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["recipe_variant.py", "--set", "num_train_epochs=2", "--folds-dir", str(folds),
                                      "--out", str(out), "--resume"])
    with pytest.raises(SystemExit, match="trained on GPU: NVIDIA H100, this machine has none"):
        variant.main()  # fold-1's variant would be trained here
    (out / "fold-1" / "model").mkdir(parents=True)
    (out / "fold-1" / "model" / "model.safetensors").write_bytes(b"")
    variant.main()
    written = json.loads((out / "recipe_variant.json").read_text())
    assert trained == [] and written["complete"]
    # the machine that scored, not the folds' (recorded in quality_benchmark.json): it was recorded nowhere
    from benchmarks.quality import environment

    assert [fold["scoring_environment"] for fold in written["folds"]] == [environment()] * 2
    assert written["folds"][0]["scoring_environment"]["gpu"] is None
