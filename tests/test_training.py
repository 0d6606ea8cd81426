"""The SFT recipe with tiny random parts: in process, under accelerate with 2 CPU processes, and kill + resume."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_parts import edit_json, encoder_for_vocabulary, run_as_command, save_tiny_corpus, save_tiny_parts
from transformers import AutoModelForCausalLM, AutoProcessor
from datasets import load_from_disk
from trl import SFTConfig

from training.sft import Cell2TextArguments, Cell2TextSFTTrainer, language_model_lora_targets, main

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = [
    "--num_cell_tokens", "8", "--projector_hidden_size", "16", "--encoder_hidden_size", "16",
    "--encoder_epochs", "2", "--encoder_candidate_layers", "1", "--per_device_train_batch_size", "4",
    "--bf16", "false", "--activation_checkpointing", "false", "--report_to", "none", "--logging_steps", "1",
    "--use_cpu", "true", "--seed", "0",
]


@pytest.fixture(scope="module")
def parts_and_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    encoder_dir, lm_dir = save_tiny_parts(root / "parts")
    return lm_dir, save_tiny_corpus(root / "corpus")


def sft_command(lm_dir, corpus_dir, out_dir, *extra):
    return ["-m", "training.sft", "--corpus_dir", str(corpus_dir), "--text_model_name_or_path", str(lm_dir),
            "--output_dir", str(out_dir), *TINY_ARGS, *extra]


def run_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def logged_losses(output: str) -> list[float]:
    return [float(x) for x in re.findall(r"\{'loss': '([0-9.]+)'", output)]


def test_recipe_trains_lora_and_projector_and_saves_a_loadable_model(parts_and_corpus, tmp_path):
    lm_dir, corpus_dir = parts_and_corpus
    args = Cell2TextArguments(
        corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8,
        projector_hidden_size=16, encoder_hidden_size=16, encoder_epochs=2, encoder_candidate_layers=[1, 2],
        projector_learning_rate=1e-2,
    )
    config = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
        eval_strategy="steps", eval_steps=3, save_steps=3, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", bf16=False, activation_checkpointing=False, report_to="none",
        use_cpu=True, logging_steps=1,
    )
    final_dir = main(args, config)
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in final_dir.iterdir() if p.is_file()} == {0o666 & ~mask}  # all readable

    selection = json.loads((tmp_path / "out" / "gene_encoder" / "encoder_selection.json").read_text())
    assert len(selection["validation_accuracy"]) == 2 and selection["best"] in (0, 1)
    state = json.loads((final_dir / "training_state.json").read_text())
    assert state["global_step"] == 6 and state["best_model_checkpoint"] is not None
    assert state["max_steps"] == 6  # the step cap, which the main job's --reuse-models checks
    calibration = state["cell_type_calibration"]  # fitted on the validation cells, saved in the model's config
    assert calibration["num_cells"] == len(load_from_disk(str(corpus_dir))["validation"]) > 0
    assert calibration["nll_after"] <= calibration["nll_before"]
    saved_config = json.loads((final_dir / "config.json").read_text())
    assert saved_config["cell_type_temperature"] == calibration["cell_type_temperature"] != 1.0
    # the tiny corpus has one tissue and one disease and no pathways: no other choice to calibrate
    assert state["field_calibration"] is None and saved_config["field_temperatures"] is None

    model = AutoModelForCausalLM.from_pretrained(final_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(final_dir, trust_remote_code=True)
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged
    test = load_from_disk(str(corpus_dir))["test"]
    inputs = processor(gene_input_ids=test["gene_input_ids"][:2])
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert generated.shape == (2, prompt_length + 5)  # one row per cell, 5 new tokens each
    assert (generated[:, :prompt_length] == inputs["input_ids"]).all()  # each row continues its own cell's prompt
    assert processor.ontology_term_ids["cell_type"]["B cell"] == "CL:0000236"
    # A cell longer than the prepared encoder's positions keeps its top-ranked genes instead of failing in BERT.
    positions = model.config.gene_encoder_config.max_position_embeddings
    assert processor.feature_extractor.model_input_size == positions < 4096


@pytest.mark.parametrize("favour", ["rank", "value_aware"])
def test_validation_chooses_the_encoder_input_and_the_model_reads_what_it_chose(tmp_path, monkeypatch, favour):
    import training.gene_encoder as gene_encoder

    _, lm_dir = save_tiny_parts(tmp_path / "parts")
    corpus_dir = save_tiny_corpus(tmp_path / "corpus", expression_bins=4)
    real_train = gene_encoder.train_candidate

    def train_and_favour(candidate, *args, **kwargs):  # make validation prefer one input, to test both outcomes
        encoder, _ = real_train(candidate, *args, **kwargs)
        return encoder, float(candidate.value_aware == (favour == "value_aware"))

    monkeypatch.setattr(gene_encoder, "train_candidate", train_and_favour)
    args = Cell2TextArguments(
        corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8, projector_hidden_size=16,
        encoder_hidden_size=16, encoder_epochs=1, encoder_candidate_layers=[1],
        encoder_candidate_inputs=["rank", "value_aware"],
    )
    config = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                       eval_strategy="no", save_strategy="no", bf16=False, report_to="none", use_cpu=True)
    final_dir = main(args, config)

    selection = json.loads((tmp_path / "out" / "gene_encoder" / "encoder_selection.json").read_text())
    assert [c["value_aware"] for c in selection["candidates"]] == [False, True]
    bins = 4 if favour == "value_aware" else 0
    assert selection["num_expression_bins"] == bins
    model = AutoModelForCausalLM.from_pretrained(final_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(final_dir, trust_remote_code=True)
    assert model.config.num_expression_bins == processor.feature_extractor.num_expression_bins == bins
    assert model.config.gene_encoder_config.type_vocab_size == bins + 1
    from datasets import load_from_disk

    from training.evaluation.evaluate import generate_descriptions

    test = load_from_disk(str(corpus_dir))["test"]
    values = test["gene_value_ids"][:3] if bins else None
    texts, whole = generate_descriptions(model, processor, test["gene_input_ids"][:3], 2, 4, values)
    assert len(texts) == len(whole) == 3

    # The heads on the same encoder (the evaluation's baselines) read what the model reads: the chosen encoder's
    # own probe head, and logistic regression on the soft tokens.
    from processing.corpus import corpus_feature_extractor
    from training.baselines.heads import projector_head_predictions
    from training.gene_encoder import probe_predictions

    corpus = load_from_disk(str(corpus_dir))
    train_labels = set(corpus["train"]["cell_type"])
    by_probe = probe_predictions(tmp_path / "out" / "gene_encoder", test, corpus_feature_extractor(corpus_dir))
    by_projector = projector_head_predictions(final_dir, corpus)
    assert len(by_probe) == len(by_projector) == len(test)
    assert set(by_probe) <= train_labels and set(by_projector) <= train_labels


def test_value_aware_encoder_needs_a_value_aware_corpus(parts_and_corpus, tmp_path, monkeypatch):
    import training.gene_encoder as gene_encoder

    lm_dir, corpus_dir = parts_and_corpus  # built without expression bins
    trained = []
    monkeypatch.setattr(gene_encoder, "train_candidate", lambda candidate, *a, **k: trained.append(candidate))
    args = Cell2TextArguments(
        corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8, projector_hidden_size=16,
        encoder_hidden_size=16, encoder_epochs=1, encoder_candidate_layers=[1],
        encoder_candidate_inputs=["rank", "value_aware"],  # as demo.yaml: refused before the rank candidate trains
    )
    config = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, eval_strategy="no", report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="--expression-bins B .*, or pass --encoder_candidate_inputs rank"):
        main(args, config)
    assert trained == []
    args.encoder_candidate_inputs = ["binned"]
    with pytest.raises(ValueError, match="encoder_candidate_inputs"):
        main(args, config)


def test_optimizer_has_one_learning_rate_per_part_and_no_decay_on_biases_and_norms(parts_and_corpus, tmp_path):
    from peft import LoraConfig, get_peft_model

    from training.sft import build_model, build_processor, load_corpus

    lm_dir, corpus_dir = parts_and_corpus
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8,
                              projector_hidden_size=16, freeze_gene_encoder=False)
    corpus, summary = load_corpus(corpus_dir, args)
    processor = build_processor(args, Path(corpus_dir), summary)
    encoder_dir = encoder_for_vocabulary(Path(lm_dir).parent / "encoder", processor.feature_extractor, tmp_path / "enc")
    model = build_model(args, str(encoder_dir), processor)
    targets = language_model_lora_targets(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets,
                                                  modules_to_save=["multi_modal_projector", "gene_encoder"]))
    lora_names = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    trainer = Cell2TextSFTTrainer(
        model=peft_model, args=SFTConfig(output_dir=str(tmp_path), learning_rate=1e-4, bf16=False, use_cpu=True,
                                         report_to="none", remove_unused_columns=False, weight_decay=0.1,
                                         dataset_kwargs={"skip_prepare_dataset": True}),
        train_dataset=corpus["train"], processing_class=processor, projector_learning_rate=1e-3,
        gene_encoder_learning_rate=1e-5, data_collator=lambda x: x,
    )
    optimizer = trainer.create_optimizer()
    rates, decay = {}, {}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        for name, p in peft_model.named_parameters():
            if id(p) in ids:
                rates.setdefault(Cell2TextSFTTrainer.part_of(name), set()).add(group["lr"])
                decay[name] = group["weight_decay"]
    assert rates == {"projector": {1e-3}, "gene_encoder": {1e-5}, "language_model": {1e-4}}
    # transformers' rule within each part: weight decay on weights, none on biases and norms
    decayed = set(trainer.get_decay_parameter_names(peft_model))
    assert decayed and {name for name, value in decay.items() if value == 0.1} == decayed & set(decay)
    assert any(value == 0.0 for value in decay.values())


def test_a_model_composed_for_training_stops_at_the_tokenizers_end_of_text(parts_and_corpus, tmp_path):
    """The reviewer's finding: the composed model stopped only at the LLM config's eos_token_id, which may not be the
    tokenizer's end of text the descriptions are trained to end with, so evaluation's free descriptions ran on to the
    length limit. The LLM's own stop id is kept."""
    from training.sft import build_model, build_processor, load_corpus

    lm_dir, corpus_dir = parts_and_corpus
    other_lm = shutil.copytree(lm_dir, tmp_path / "lm")
    config = json.loads((other_lm / "config.json").read_text())
    (other_lm / "config.json").write_text(json.dumps({**config, "eos_token_id": 0}))
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(other_lm), num_cell_tokens=8,
                              projector_hidden_size=16)
    processor = build_processor(args, Path(corpus_dir), load_corpus(corpus_dir, args)[1])
    encoder_dir = encoder_for_vocabulary(Path(lm_dir).parent / "encoder", processor.feature_extractor, tmp_path / "enc")
    assert processor.tokenizer.eos_token_id != 0
    model = build_model(args, str(encoder_dir), processor)
    assert model.generation_config.eos_token_id == [0, processor.tokenizer.eos_token_id]


def test_training_under_accelerate_with_two_cpu_processes(parts_and_corpus, tmp_path):
    lm_dir, corpus_dir = parts_and_corpus
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "training/configs/accelerate/cpu_2proc.yaml"), "--main_process_port", "29531",
               *sft_command(lm_dir, corpus_dir, tmp_path / "out", "--max_steps", "4", "--save_steps", "4",
                            "--eval_strategy", "no")]
    result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    # 32 training cells, 4 per process and step: two processes cover one epoch in 4 steps (one would need 8).
    assert state["global_step"] == 4 and state["epoch"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_stopped_training_leaves_no_model_and_resumes_to_the_same_weights(parts_and_corpus, tmp_path):
    """SIGTERM mid-training: exit 143, checkpoints kept, no final model and no half-saved folder; resumed from its
    last checkpoint, the run ends with the uninterrupted run's losses and weights."""
    lm_dir, corpus_dir = parts_and_corpus
    steps = ["--max_steps", "24", "--save_steps", "2", "--eval_strategy", "no", "--learning_rate", "1e-3"]
    full = subprocess.run([sys.executable, *sft_command(lm_dir, corpus_dir, tmp_path / "full", *steps)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    full_losses = logged_losses(full.stderr + full.stdout)
    assert len(full_losses) == 24

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *sft_command(lm_dir, corpus_dir, out, *steps)], cwd=REPO,
                               env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-4" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "training ended before its first checkpoints"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert not (out / "final").exists() and not list(out.glob(".final.partial-*"))
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                         if (p / "trainer_state.json").exists())
    resumed_from = checkpoints[-1]
    assert 4 <= resumed_from < 24

    resumed = subprocess.run(
        [sys.executable, *sft_command(lm_dir, corpus_dir, out, *steps, "--resume_from_checkpoint",
                                      str(out / f"checkpoint-{resumed_from}"))],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_losses = logged_losses(resumed.stderr + resumed.stdout)
    assert len(resumed_losses) == 24 - resumed_from  # it went on from the checkpoint, not from step 0
    assert json.loads((out / "final" / "training_state.json").read_text())["global_step"] == 24
    # and along the same trajectory as the uninterrupted run, to the same weights
    assert resumed_losses == pytest.approx(full_losses[resumed_from:], abs=2e-3)
    full_weights = load_file(tmp_path / "full" / "final" / "model.safetensors")
    resumed_weights = load_file(out / "final" / "model.safetensors")
    assert full_weights.keys() == resumed_weights.keys()
    for name, tensor in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-4, rtol=1e-3, msg=name)


def test_a_run_resumed_in_a_later_epoch_with_cell_type_balance_ends_with_the_same_weights(parts_and_corpus, tmp_path):
    """32 training cells at 4 a step: epoch 1 starts at step 9. Resumed from step 10, the balanced sampler must draw
    epoch 1's cells (it replayed epoch 0's draws: other cells, other weights, exit 0)."""
    lm_dir, corpus_dir = parts_and_corpus
    steps = ["--max_steps", "12", "--save_steps", "10", "--eval_strategy", "no", "--learning_rate", "1e-3",
             "--cell_type_balance", "0.5"]
    full = subprocess.run([sys.executable, *sft_command(lm_dir, corpus_dir, tmp_path / "full", *steps)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    resumed = subprocess.run(
        [sys.executable, *sft_command(lm_dir, corpus_dir, tmp_path / "resumed", *steps, "--resume_from_checkpoint",
                                      str(tmp_path / "full" / "checkpoint-10"))],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full_losses, resumed_losses = (logged_losses(run.stderr + run.stdout) for run in (full, resumed))
    assert len(resumed_losses) == 2 and resumed_losses == pytest.approx(full_losses[10:], abs=1e-4)
    full_weights = load_file(tmp_path / "full" / "final" / "model.safetensors")
    resumed_weights = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    for name, tensor in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_an_existing_final_model_is_refused_before_training(parts_and_corpus, tmp_path):
    lm_dir, corpus_dir = parts_and_corpus
    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_text("an earlier run's model")
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir),
                              final_model_dir=str(final))
    with pytest.raises(FileExistsError, match="pass --overwrite_final_model_dir to replace it"):
        main(args, SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True))
    assert (final / "model.safetensors").read_text() == "an earlier run's model"
    assert not (tmp_path / "out").exists()  # refused before anything was prepared or trained


@pytest.mark.parametrize("final", ["out", "."])
def test_a_final_model_dir_that_is_or_holds_the_output_dir_is_refused_before_training(parts_and_corpus, tmp_path,
                                                                                      final):
    """It trained, then failed at saving and lost the merged model."""
    lm_dir, corpus_dir = parts_and_corpus
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir),
                              final_model_dir=str(tmp_path / final))
    with pytest.raises(ValueError, match="is --output_dir .* or holds it.*pass another --final_model_dir"):
        main(args, SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True))
    assert not (tmp_path / "out").exists()


def test_temperature_fit_cells_0_leaves_temperatures_of_1_also_after_init_from():
    """init_from's temperatures were kept with temperature_fit_cells=0 (the help says 1.0): they fit the model before
    this training."""
    from types import SimpleNamespace

    from training.sft import calibrate

    model = SimpleNamespace(config=SimpleNamespace(cell_type_temperature=2.5, field_temperatures={"tissue": 1.7}))
    args = Cell2TextArguments(corpus_dir="unused", init_from="parent", temperature_fit_cells=0)
    assert calibrate(model, None, args, None, validation=[]) == {"cell_type_calibration": None,
                                                                "field_calibration": None}
    assert model.config.cell_type_temperature == 1.0 and model.config.field_temperatures is None


def test_prepared_encoder_is_reused_only_for_the_same_corpus_and_settings(parts_and_corpus, tmp_path, monkeypatch):
    import training.sft as sft_module

    lm_dir, corpus_dir = parts_and_corpus
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8,
                              encoder_hidden_size=16, encoder_epochs=1, encoder_candidate_layers=[1])
    config = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    corpus, summary = sft_module.load_corpus(corpus_dir, args)
    processor = sft_module.build_processor(args, corpus_dir, summary)
    calls = []
    real_prepare = sft_module.prepare_gene_encoder
    monkeypatch.setattr(sft_module, "prepare_gene_encoder", lambda *a, **k: calls.append(1) or real_prepare(*a, **k))

    def prepare(summary_, **changes):
        for name, value in changes.items():
            setattr(args, name, value)
        sft_module.gene_encoder_path(args, config, corpus, processor, summary_)
        return len(calls)

    assert prepare({"fingerprints": {"train": "a"}}) == 1
    assert prepare({"fingerprints": {"train": "a"}}) == 1  # same corpus and settings (a resumed run): reused
    assert prepare({"fingerprints": {"train": "b"}}) == 2  # the corpus changed
    assert prepare({"fingerprints": {"train": "b"}}, encoder_epochs=2) == 3  # the settings changed


def test_encoder_candidates_of_one_hidden_size_share_one_decomposition(parts_and_corpus, tmp_path, monkeypatch):
    """The gene embeddings' SVD (minutes at Census scale) ran once per candidate; the candidates differ in depth and
    input, not in the matrix or the size, so the decompositions were the same."""
    import training.gene_encoder as gene_encoder
    import training.sft as sft_module

    lm_dir, corpus_dir = parts_and_corpus
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8)
    corpus, summary = sft_module.load_corpus(corpus_dir, args)
    processor = sft_module.build_processor(args, corpus_dir, summary)
    sizes = []
    real_svd = gene_encoder.svd_gene_embeddings
    monkeypatch.setattr(gene_encoder, "svd_gene_embeddings",
                        lambda matrix, dim, seed=0: sizes.append(dim) or real_svd(matrix, dim, seed))
    candidates = [gene_encoder.EncoderCandidate(num_hidden_layers=n, hidden_size=16, num_attention_heads=heads)
                  for n, heads in ((1, 4), (2, 4), (1, 2))]
    candidates.append(gene_encoder.EncoderCandidate(num_hidden_layers=1, hidden_size=8, num_attention_heads=2))
    selection = gene_encoder.prepare_gene_encoder(corpus, processor.feature_extractor, tmp_path / "encoder", candidates,
                                                  num_cell_tokens=8, epochs=1)
    assert sizes == [16, 8] and len(selection.validation_accuracy) == 4


def test_prepared_encoder_is_prepared_again_for_other_caps_or_another_corpus_without_fingerprints(
        parts_and_corpus, tmp_path, monkeypatch):
    """max_train_samples / max_eval_samples change what the encoder is trained and chosen on; a corpus whose build
    recorded no fingerprints is told apart by datasets' own (both were reused: None == None)."""
    import training.sft as sft_module

    lm_dir, corpus_dir = parts_and_corpus
    other_dir = save_tiny_corpus(tmp_path / "other_corpus", seed=1)
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8,
                              encoder_hidden_size=16, encoder_epochs=1, encoder_candidate_layers=[1])
    config = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    processor = sft_module.build_processor(args, corpus_dir, sft_module.load_corpus(corpus_dir, args)[1])
    calls = []
    real_prepare = sft_module.prepare_gene_encoder
    monkeypatch.setattr(sft_module, "prepare_gene_encoder", lambda *a, **k: calls.append(1) or real_prepare(*a, **k))

    def prepare(corpus_dir_, summary, **changes):
        for name, value in changes.items():
            setattr(args, name, value)
        sft_module.gene_encoder_path(args, config, sft_module.load_corpus(corpus_dir_, args)[0], processor, summary)
        return len(calls)

    fingerprinted = {"fingerprints": {"train": "a"}}
    assert prepare(corpus_dir, fingerprinted) == 1
    assert prepare(corpus_dir, fingerprinted, max_train_samples=4) == 2
    assert prepare(corpus_dir, fingerprinted, max_eval_samples=2) == 3
    assert prepare(corpus_dir, fingerprinted) == 3  # the same caps: reused
    assert prepare(corpus_dir, {}, max_train_samples=None, max_eval_samples=None) == 4
    assert prepare(corpus_dir, {}) == 4  # the same corpus without fingerprints: reused
    assert prepare(other_dir, {}) == 5  # another corpus without fingerprints


def test_a_resume_with_another_encoder_or_lora_settings_is_refused_and_keeps_the_encoder(parts_and_corpus, tmp_path):
    """A checkpoint's projector and adapters fit the encoder and LoRA settings it was trained with: a resume with
    others was silent (another lora_alpha), or trained them on a newly prepared encoder that overwrote theirs."""
    lm_dir, corpus_dir = parts_and_corpus
    out = tmp_path / "out"
    tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final", max_steps=2, save_strategy="steps", save_steps=2,
                temperature_fit_cells=0)
    checkpoint = str(out / "checkpoint-2")
    encoder = (out / "gene_encoder" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint-2 was trained with another lora_alpha .*new --output_dir"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=checkpoint, lora_alpha=64)
    with pytest.raises(ValueError, match=r"checkpoint-2 was trained with another lora_alpha"):  # True: the last one
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=True, lora_alpha=64)
    # another batch over processes x accumulation steps skipped other cells than were trained on, exit 0
    with pytest.raises(ValueError, match=r"another global_batch_size than this run's \(global_batch_size: (\d+) "
                                         r"there, (\d+) now\)"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=checkpoint,
                    gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"another data_seed than this run's"):  # another sampler order
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=checkpoint, data_seed=5)
    # another LLM of the same shape (another text_model_name_or_path or init_from) took the checkpoint's adapters
    # and projector and trained on, exit 0
    _, other_lm = save_tiny_parts(tmp_path / "other-parts", seed=1)
    with pytest.raises(ValueError, match=r"another language_model_sha256 than this run's .*; resume with the corpus, "
                                         r"encoder, language model \(text_model_name_or_path or init_from\)"):
        tiny_recipe(other_lm, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=checkpoint)
    # the checkpoint's optimizer state replaced the learning rates given: a resume at 10x trained at 1x, exit 0
    with pytest.raises(ValueError, match=r"another learning_rate, projector_learning_rate than this run's "
                                         r"\(learning_rate: 0.001 there, 0.01 now; projector_learning_rate"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=checkpoint,
                    learning_rate=1e-2, projector_learning_rate=1e-2)
    with pytest.raises(ValueError, match=r"another weight_decay than this run's"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=checkpoint,
                    weight_decay=0.1)
    # the loss, dropout and cell-type stage are no part of a checkpoint: the steps left trained with the ones given
    # (the stage was skipped), exit 0
    for setting, value in (("cell_type_loss_weight", 4.0), ("label_smoothing_factor", 0.1), ("lora_dropout", 0.2),
                           ("projector_dropout", 0.2), ("cell_type_stage_steps", 1)):
        with pytest.raises(ValueError, match=rf"another {setting} than this run's .* data, loss, optimizer"):
            tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=checkpoint,
                        **{setting: value})
    with pytest.raises(ValueError, match=r"another greater_is_better, metric_for_best_model than this run's"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=checkpoint,
                    metric_for_best_model="eval_mean_token_accuracy", greater_is_better=True)
    # another projector or auxiliary head failed in torch's loading of the state dict or optimizer, naming no fix
    for setting, value, names, named in (
            ("projector_hidden_size", 32, "projector_hidden_size", "projector_hidden_size: 16 there, 32 now"),
            ("cell_type_head_loss_weight", 0.5, "cell_type_head, cell_type_head_loss_weight",
             'cell_type_head: null there, "linear" now; cell_type_head_loss_weight: 0.0 there, 0.5 now')):
        with pytest.raises(ValueError, match=rf"another {names} than this run's \({named}\); resume with the "
                                             r"corpus, encoder, language model .*, projector"):
            tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=checkpoint,
                        **{setting: value})
    with pytest.raises(ValueError, match=r"prepared in .* for another epochs; .* would overwrite it.*--output_dir"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=checkpoint,
                    encoder_epochs=3)
    assert (out / "gene_encoder" / "model.safetensors").read_bytes() == encoder
    assert not (tmp_path / "final-2").exists()
    recorded = json.loads((out / "checkpoint-2" / "cell2text_trained_with.json").read_text())
    assert set(recorded["corpus_fingerprints"]) == {"train", "validation", "test"}
    assert recorded["max_train_samples"] is None
    assert recorded["learning_rate"] == 1e-3 and recorded["optim"] == "adamw_torch_fused"


@pytest.mark.parametrize("cap", ["max_train_samples", "max_eval_samples"])
def test_a_cap_below_one_cell_is_refused_naming_it(parts_and_corpus, cap):
    """The reviewer's finding: 0 failed inside scipy's svds ("'A' must not be empty"), or named a missing
    validation split the corpus has."""
    from training.sft import load_corpus

    _, corpus_dir = parts_and_corpus
    for value in (0, -1):
        with pytest.raises(ValueError, match=rf"--{cap} {value}: a split capped below 1 cell is empty"):
            load_corpus(corpus_dir, Cell2TextArguments(corpus_dir=str(corpus_dir), **{cap: value}))


def test_a_corpus_without_label_tables_is_refused(parts_and_corpus, tmp_path):
    """The reviewer's finding: a corpus without summary.json (shards joined by hand) trained a model that knew no
    labels, so it could not describe constrained, with no warning."""
    import shutil

    from training.sft import load_corpus

    _, corpus_dir = parts_and_corpus
    copy = tmp_path / "corpus"
    shutil.copytree(corpus_dir, copy)
    load_corpus(copy, Cell2TextArguments(corpus_dir=str(copy)))
    (copy / "summary.json").unlink()
    with pytest.raises(ValueError, match="has no summary.json with label tables.*python -m processing.join_corpus"):
        load_corpus(copy, Cell2TextArguments(corpus_dir=str(copy)))
    (copy / "summary.json").write_text('{"ontology_term_ids": ["B cell"]}')  # an AttributeError before
    with pytest.raises(ValueError, match=r"summary.json is not a corpus summary .*: ontology_term_ids is \['B cell'\]"):
        load_corpus(copy, Cell2TextArguments(corpus_dir=str(copy)))


def test_a_resume_on_another_corpus_is_refused(tmp_path):
    """The reviewer's finding: a checkpoint of corpus A resumed on corpus B (a pretrained encoder, so nothing was
    prepared on either) trained on, and the model recorded only B: evaluation's check that the test cells are not
    training cells then passed on B rebuilt from A's cells."""
    from training.adapters import TRAINED_WITH_FILE, check_resume

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    record = {"gene_encoder_sha256": "e", "lora_r": 8, "corpus_fingerprints": {"train": "aaaa"},
              "max_train_samples": None}
    (checkpoint / TRAINED_WITH_FILE).write_text(json.dumps(record))
    check_resume(str(checkpoint), record, str(tmp_path))
    with pytest.raises(ValueError, match=r"trained with another corpus_fingerprints than this run's"):
        check_resume(str(checkpoint), {**record, "corpus_fingerprints": {"train": "bbbb"}}, str(tmp_path))
    with pytest.raises(ValueError, match=r"trained with another max_train_samples"):
        check_resume(str(checkpoint), {**record, "max_train_samples": 10}, str(tmp_path))
    # a run stopped between a checkpoint's weights and its record (the suite's SIGTERM test found it): the record
    # of the run's other checkpoints is checked; one cut short is named
    later = tmp_path / "checkpoint-4"
    later.mkdir()
    with pytest.raises(ValueError, match=r"trained with another max_train_samples"):
        check_resume(str(later), {**record, "max_train_samples": 10}, str(tmp_path))
    (later / TRAINED_WITH_FILE).write_text("")
    with pytest.raises(ValueError, match=r"checkpoint-4/cell2text_trained_with.json does not read .* stopped while "
                                         r"writing it"):
        check_resume(str(later), record, str(tmp_path))
    (later / TRAINED_WITH_FILE).unlink()
    del record["corpus_fingerprints"], record["max_train_samples"]  # saved before they were recorded: not checked
    (checkpoint / TRAINED_WITH_FILE).write_text(json.dumps(record))
    check_resume(str(checkpoint), {**record, "corpus_fingerprints": {"train": "bbbb"}}, str(tmp_path))


def test_the_weights_checksum_is_of_the_names_and_bytes_as_checkpoints_recorded_it():
    """`state_dict_sha256` hashes the tensors' memory without copying it (a copy of each tensor doubled its time), and
    gives the checksum checkpoints recorded before: of each name and the tensor's bytes, in name order (slices,
    transposes, bf16 and scalars too)."""
    import hashlib

    from training.adapters import state_dict_sha256

    weights = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"b": weights[1:], "a": weights.t(), "c": weights.to(torch.bfloat16), "d": torch.tensor(3.5)}
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert state_dict_sha256(state) == digest.hexdigest()


def test_a_resume_with_other_schedule_or_clipping_settings_is_refused_and_older_records_still_resume(tmp_path):
    """The scheduler's state holds its step only: a resume with another lr_scheduler_kwargs (cosine_with_min_lr's
    min_lr 1e-4 -> 5e-4: the fourth step at 5.7e-4 instead of 2.3e-4), scheduler, warmup, max_grad_norm or
    optim_args trained on with those, exit 0. A record written before they were recorded resumes unchecked."""
    from training.adapters import TRAINED_WITH_FILE, check_resume, optimizer_settings

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    settings = dict(output_dir=str(tmp_path), lr_scheduler_type="cosine_with_min_lr",
                    lr_scheduler_kwargs={"min_lr": 1e-4}, optim_args="foreach=False", use_cpu=True)
    record = optimizer_settings(SFTConfig(**settings), projector_learning_rate=1e-3)
    (checkpoint / TRAINED_WITH_FILE).write_text(json.dumps(record))
    check_resume(str(checkpoint), optimizer_settings(SFTConfig(**settings), projector_learning_rate=1e-3),
                 str(tmp_path))
    for changed, named in (({"lr_scheduler_kwargs": '{"min_lr": 5e-4}'},  # as the command line gives it
                            r'lr_scheduler_kwargs: \{"min_lr": 0.0001\} there, \{"min_lr": 0.0005\} now'),
                           ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": None},
                            r"lr_scheduler_kwargs, lr_scheduler_type than this run's"),
                           ({"warmup_steps": 0.1}, r"warmup_steps: 0 there, 0.1 now"),
                           ({"max_grad_norm": 0.5}, r"max_grad_norm: 1.0 there, 0.5 now"),
                           ({"optim_args": None}, r'optim_args: "foreach=False" there, null now')):
        with pytest.raises(ValueError, match=rf"checkpoint-2 was trained with another .*{named}.*; resume "
                                             r"with .* optimizer, schedule, clipping"):
            check_resume(str(checkpoint), optimizer_settings(SFTConfig(**{**settings, **changed}),
                                                             projector_learning_rate=1e-3), str(tmp_path))
    older = {k: v for k, v in record.items() if k not in ("optim_args", "lr_scheduler_type", "lr_scheduler_kwargs",
                                                          "warmup_steps", "max_grad_norm")}
    (checkpoint / TRAINED_WITH_FILE).write_text(json.dumps(older))
    check_resume(str(checkpoint), optimizer_settings(SFTConfig(**{**settings, "max_grad_norm": 0.5}),
                                                     projector_learning_rate=1e-3), str(tmp_path))


def test_a_resume_that_chooses_the_best_checkpoint_otherwise_is_refused(tmp_path):
    """The checkpoint's trainer state holds its best value so far: resumed with metric_for_best_model
    eval_mean_token_accuracy (greater is better) instead of eval_loss, the accuracies (0 to 1) were compared with its
    eval_loss of 5.97, and the checkpoint best by loss was loaded at the end, exit 0."""
    from training.adapters import TRAINED_WITH_FILE, best_checkpoint_choice, check_resume

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    settings = dict(output_dir=str(tmp_path), eval_strategy="steps", save_strategy="steps", load_best_model_at_end=True,
                    metric_for_best_model="eval_loss", use_cpu=True)
    (checkpoint / TRAINED_WITH_FILE).write_text(json.dumps(best_checkpoint_choice(SFTConfig(**settings))))
    check_resume(str(checkpoint), best_checkpoint_choice(SFTConfig(**{**settings, "metric_for_best_model": "loss"})),
                 str(tmp_path))  # the Trainer's name for it
    accuracy = SFTConfig(**{**settings, "metric_for_best_model": "eval_mean_token_accuracy"})
    with pytest.raises(ValueError, match=r"another greater_is_better, metric_for_best_model than this run's "
                                         r"\(greater_is_better: false there, true now; metric_for_best_model: "
                                         r'"eval_loss" there, "eval_mean_token_accuracy" now\).* best-checkpoint'):
        check_resume(str(checkpoint), best_checkpoint_choice(accuracy), str(tmp_path))


def test_a_checkpoint_of_the_weights_alone_is_refused(parts_and_corpus, tmp_path):
    """A checkpoint saved with save_only_model holds no optimizer, scheduler or random state: the Trainer resumed from
    it with Adam's moments and the schedule restarted (info-level logs only), and the final weights differed from
    the uninterrupted run's by 3e-3, exit 0."""
    lm_dir, corpus_dir = parts_and_corpus
    out = tmp_path / "out"
    steps = dict(max_steps=2, save_strategy="steps", save_steps=2, temperature_fit_cells=0, save_only_model=True)
    tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final", **steps)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    with pytest.raises(ValueError, match=r"checkpoint-2 holds the weights only, no optimizer, scheduler or random "
                                         r"state \(saved with --save_only_model true\).*--save_only_model false"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", resume_from_checkpoint=str(out / "checkpoint-2"),
                    **{**steps, "max_steps": 4})
    assert not (tmp_path / "final-2").exists()


def test_a_resume_with_another_validation_cap_is_refused_with_a_pretrained_encoder(parts_and_corpus, tmp_path):
    """With a pretrained encoder nothing is prepared on the corpus (whose record refused another cap): a resume with
    another --max_eval_samples went on, and the best checkpoint was chosen among losses on other validation cells."""
    from processing.corpus import corpus_feature_extractor

    lm_dir, tiny_corpus = parts_and_corpus
    corpus_dir = tmp_path / "corpus"  # with a build's fingerprints, which a cap does not change (datasets' does)
    shutil.copytree(tiny_corpus, corpus_dir)
    edit_json(corpus_dir / "summary.json", lambda summary: summary.update(
        fingerprints={"train": "a", "validation": "b", "test": "c"}))
    geneformer = str(encoder_for_vocabulary(Path(lm_dir).parent / "encoder", corpus_feature_extractor(corpus_dir),
                                            tmp_path / "encoder"))
    out, settings = tmp_path / "out", dict(gene_encoder_name_or_path=geneformer, save_strategy="steps", save_steps=2,
                                           temperature_fit_cells=0)
    tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final", max_steps=2, **settings)
    with pytest.raises(ValueError, match=r"another max_eval_samples than this run's \(max_eval_samples: null there, "
                                         r"2 now\)"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final-2", max_steps=4, max_eval_samples=2,
                    resume_from_checkpoint=str(out / "checkpoint-2"), **settings)


def test_value_aware_extractor_needs_the_corpus_bins_column(parts_and_corpus):
    from datasets import load_from_disk

    from modeling_cell2text import Cell2TextFeatureExtractor
    from processing.corpus import split_value_lists

    _, corpus_dir = parts_and_corpus  # a rank-only corpus
    split = load_from_disk(str(corpus_dir))["test"]
    extractor = Cell2TextFeatureExtractor.from_pretrained(corpus_dir / "feature_extractor")
    assert split_value_lists(split, extractor) is None
    extractor.num_expression_bins = 4
    with pytest.raises(ValueError, match="no gene_value_ids column; build the corpus with the same --expression-bins"):
        split_value_lists(split, extractor)


def test_recipe_refuses_a_pretrained_encoder_with_a_corpus_vocabulary(parts_and_corpus, tmp_path):
    import shutil

    from modeling_cell2text import Cell2TextFeatureExtractor

    lm_dir, corpus_dir = parts_and_corpus
    corpus_copy = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus_copy)
    extractor = Cell2TextFeatureExtractor.from_pretrained(corpus_copy / "feature_extractor")
    extractor.vocabulary_source = {"kind": "corpus", "genes": 60}  # what the corpus builder records for its own genes
    extractor.save_pretrained(corpus_copy / "feature_extractor")
    args = Cell2TextArguments(corpus_dir=str(corpus_copy), text_model_name_or_path=str(lm_dir),
                              gene_encoder_name_or_path=str(Path(lm_dir).parent / "encoder"), num_cell_tokens=8,
                              projector_hidden_size=16)
    config = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, eval_strategy="no", report_to="none",
                       use_cpu=True)
    with pytest.raises(ValueError, match=r"derived from a corpus.*--token-dictionary .* --gene-median-file"):
        main(args, config)


def tiny_recipe(lm_dir, corpus_dir, out_dir, final_dir, **overrides):
    args = Cell2TextArguments(
        corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8, projector_hidden_size=16,
        encoder_hidden_size=16, encoder_epochs=2, encoder_candidate_layers=[1], final_model_dir=str(final_dir),
    )
    config = SFTConfig(output_dir=str(out_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                       eval_strategy="no", save_strategy="no", bf16=False, report_to="none", use_cpu=True, seed=0)
    for name, value in overrides.items():
        setattr(args if hasattr(args, name) else config, name, value)
    return main(args, config)


def test_recipe_reads_a_prepared_one_layer_encoder_at_its_trained_layer(parts_and_corpus, tmp_path):
    lm_dir, corpus_dir = parts_and_corpus  # gene_encoder_layer unset: -2 would be the embeddings of a 1-layer encoder
    final_dir = tiny_recipe(lm_dir, corpus_dir, tmp_path / "out", tmp_path / "final", max_steps=1)
    config = json.loads((final_dir / "config.json").read_text())
    assert config["gene_encoder_config"]["num_hidden_layers"] == 1
    assert config["gene_encoder_layer"] == -1
    assert config["gene_encoder_config"]["cell2text_prepared_encoder"]["feature_layer"] == -1


def test_same_seed_gives_the_same_weights(parts_and_corpus, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    lm_dir, corpus_dir = parts_and_corpus
    for name in ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG", "ASCEND_LAUNCH_BLOCKING", "HCCL_DETERMINISTIC",
                 "FLASH_ATTENTION_DETERMINISTIC"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # full_determinism sets them; restored after the test
    finals = []
    try:
        # the second run reuses the prepared encoder, as a rerun of the same command does, and adds
        # full_determinism (deterministic algorithms only), which must not change the result on the CPU
        for run, full_determinism in ((1, False), (2, True)):
            torch.manual_seed(run)  # whatever ran before (other code, another process) must not matter
            finals.append(tiny_recipe(lm_dir, corpus_dir, tmp_path / "out", tmp_path / f"final-{run}",
                                      full_determinism=full_determinism))
    finally:
        torch.use_deterministic_algorithms(False)
    first, second = (load_file(final / "model.safetensors") for final in finals)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first), "weights differ between runs"


def test_the_determinism_benchmark_refuses_one_run_per_setting(tmp_path, monkeypatch, capsys):
    """benchmarks/determinism.py --repeats 1 trained once per setting and printed "runs bitwise equal: True" for
    runs compared with nothing; --steps 0 trains nothing: both are refused in one line before anything trains
    (--steps 1 first: a refusal lost trains one step per run, not 60)."""
    for option in (["--repeats", "1"], ["--steps", "0"]):
        result = run_as_command([str(REPO / "benchmarks" / "determinism.py"), "--steps", "1", *option], tmp_path,
                                monkeypatch, capsys)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and option[0] in lines[-1] and "Traceback" not in result.stderr, result.stderr


def test_a_bf16_llms_projector_trains_in_float32_and_is_saved_in_bf16(parts_and_corpus, tmp_path, monkeypatch):
    """The projector of a bf16 LLM trained in bf16, where updates below its rounding are lost (its first LayerNorm's
    gain stayed unchanged): it trains in float32, as LoRA does, and the merged model is saved in bf16."""
    import shutil

    lm_dir, corpus_dir = parts_and_corpus
    bf16_dir = tmp_path / "lm_bf16"
    shutil.copytree(lm_dir, bf16_dir)
    AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    initial = {}
    create_optimizer = Cell2TextSFTTrainer.create_optimizer

    def recording_initial_projector(self, model=None):
        initial.update({name.split("multi_modal_projector.")[1].replace("modules_to_save.default.", ""): p.detach().clone()
                        for name, p in self.model.named_parameters()
                        if p.requires_grad and "multi_modal_projector" in name})
        return create_optimizer(self, model)

    monkeypatch.setattr(Cell2TextSFTTrainer, "create_optimizer", recording_initial_projector)
    final_dir = tiny_recipe(bf16_dir, corpus_dir, tmp_path / "out", tmp_path / "final", max_steps=20, bf16=True,
                            learning_rate=1e-4, temperature_fit_cells=0)
    assert initial and {p.dtype for p in initial.values()} == {torch.float32}
    saved = load_file(final_dir / "model.safetensors")
    assert {saved[name].dtype for name in saved if ".gene_encoder." not in name} == {torch.bfloat16}  # the LLM's
    for name, before in initial.items():
        assert not torch.equal(saved["model.multi_modal_projector." + name].float(), before), f"{name} did not train"


def test_init_from_runs_no_code_from_the_folder_unless_asked(parts_and_corpus, tmp_path, monkeypatch):
    import training.sft as sft_module
    from modeling_cell2text import Cell2TextFeatureExtractor, Cell2TextForConditionalGeneration, Cell2TextProcessor
    from transformers import AutoTokenizer

    lm_dir, corpus_dir = parts_and_corpus
    processor = Cell2TextProcessor(Cell2TextFeatureExtractor.from_pretrained(corpus_dir / "feature_extractor"),
                                   AutoTokenizer.from_pretrained(lm_dir), num_cell_tokens=8)
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        Path(lm_dir).parent / "encoder", lm_dir, cell_token_id=processor.cell_token_id, num_cell_tokens=8,
        projector_hidden_size=16)
    model_dir, marker = tmp_path / "trained", tmp_path / "code-ran"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    planted = list(model_dir.glob("*.py"))
    assert planted
    for code_file in planted:  # code planted in the folder: it leaves a marker when run
        code_file.write_text(code_file.read_text() + f"\nimport pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    trusted = []  # every load the recipe asks to trust the folder's code

    class Spy:
        def __init__(self, auto_class):
            self.auto_class = auto_class

        def from_pretrained(self, *args, **kwargs):
            trusted.append(kwargs.get("trust_remote_code", False))
            return self.auto_class.from_pretrained(*args, **kwargs)

    for name in ("AutoModelForCausalLM", "AutoProcessor", "AutoConfig", "AutoTokenizer"):
        if hasattr(sft_module, name):
            monkeypatch.setattr(sft_module, name, Spy(getattr(sft_module, name)))

    args = Cell2TextArguments(corpus_dir=str(corpus_dir), init_from=str(model_dir))
    assert isinstance(sft_module.build_processor(args, Path(corpus_dir), {}), Cell2TextProcessor)
    assert isinstance(sft_module.build_model(args, None, processor), Cell2TextForConditionalGeneration)
    assert not any(trusted) and not marker.exists()
    # the opt-in (SFTConfig's --trust_remote_code): the loaders may run the folder's code, as transformers decides
    sft_module.build_model(args, None, processor, trust_remote_code=True)
    assert trusted == [True]


def test_definitions_in_model_text_is_the_new_models_choice_and_init_froms_setting(parts_and_corpus, tmp_path):
    """Unset, a new processor keeps the definitions in the model's text and init_from's folder keeps its own
    setting; asking init_from for the other one is refused (the model was trained on the other text)."""
    import training.sft as sft_module
    from modeling_cell2text import Cell2TextFeatureExtractor, Cell2TextProcessor
    from transformers import AutoTokenizer

    lm_dir, corpus_dir = parts_and_corpus
    new = Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8)
    assert sft_module.build_processor(new, Path(corpus_dir), {}).definitions_in_model_text is True
    new.definitions_in_model_text = False
    assert sft_module.build_processor(new, Path(corpus_dir), {}).definitions_in_model_text is False
    Cell2TextProcessor(Cell2TextFeatureExtractor.from_pretrained(corpus_dir / "feature_extractor"),
                       AutoTokenizer.from_pretrained(lm_dir), num_cell_tokens=8,
                       definitions_in_model_text=False).save_pretrained(tmp_path / "trained")
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), init_from=str(tmp_path / "trained"))
    assert sft_module.build_processor(args, Path(corpus_dir), {}).definitions_in_model_text is False
    args.definitions_in_model_text = True
    with pytest.raises(ValueError, match="leave it unset"):
        sft_module.build_processor(args, Path(corpus_dir), {})


def test_candidate_labels_are_the_training_cells_and_init_from_learns_the_new_ones(parts_and_corpus, tmp_path):
    """The QA findings: a cell type only in the test split (a donor fold) was a candidate label; fine-tuning a
    model (init_from) on a corpus with new cell types kept its old labels, so every cell was described as an old
    type (accuracy 0) without a word."""
    import json

    from datasets import load_from_disk

    import training.sft as sft_module
    from modeling_cell2text import Cell2TextFeatureExtractor, Cell2TextProcessor
    from transformers import AutoTokenizer

    lm_dir, corpus_dir = parts_and_corpus
    train = load_from_disk(str(corpus_dir))["train"]
    summary = json.loads((Path(corpus_dir) / "summary.json").read_text())
    trained_types = summary["ontology_term_ids"]["cell_type"]
    assert set(trained_types) == set(train["cell_type"])
    summary["ontology_term_ids"]["cell_type"] = {**trained_types, "natural killer cell": "CL:0000623"}  # test only
    new = Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8)
    processor = sft_module.build_processor(new, Path(corpus_dir), summary, train_split=train)
    assert processor.ontology_term_ids["cell_type"] == trained_types
    Cell2TextProcessor(Cell2TextFeatureExtractor.from_pretrained(corpus_dir / "feature_extractor"),
                       AutoTokenizer.from_pretrained(lm_dir), num_cell_tokens=8,
                       ontology_term_ids={"cell_type": {"dendritic cell": "CL:0000451"}},
                       pathway_names=["Old Pathway"]).save_pretrained(tmp_path / "trained")
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), init_from=str(tmp_path / "trained"))
    fine_tuned = sft_module.build_processor(args, Path(corpus_dir), summary, train_split=train)
    assert fine_tuned.ontology_term_ids["cell_type"] == {"dendritic cell": "CL:0000451", **trained_types}
    assert fine_tuned.pathway_names == ["Old Pathway"]  # kept (the tiny corpus states no pathway)
    Cell2TextProcessor(Cell2TextFeatureExtractor.from_pretrained(corpus_dir / "feature_extractor"),
                       AutoTokenizer.from_pretrained(lm_dir), num_cell_tokens=8,
                       ontology_term_ids={"cell_type": {next(iter(trained_types)): "CL:0000451"}}
                       ).save_pretrained(tmp_path / "clash")
    args.init_from = str(tmp_path / "clash")
    with pytest.raises(ValueError, match="have other ids or labels in the model's processor than in the corpus"):
        sft_module.build_processor(args, Path(corpus_dir), summary, train_split=train)
    label, term = next(iter(trained_types.items()))
    Cell2TextProcessor(Cell2TextFeatureExtractor.from_pretrained(corpus_dir / "feature_extractor"),
                       AutoTokenizer.from_pretrained(lm_dir), num_cell_tokens=8,
                       ontology_term_ids={"cell_type": {f"renamed {label}": term}}).save_pretrained(tmp_path / "renamed")
    args.init_from = str(tmp_path / "renamed")  # the same id under another label: another ontology release
    with pytest.raises(ValueError, match="build the corpus with the ontology versions the model's corpus was built"):
        sft_module.build_processor(args, Path(corpus_dir), summary, train_split=train)


def test_cell_type_stage_trains_on_the_first_sentence_then_on_full_descriptions(parts_and_corpus, tmp_path,
                                                                                 monkeypatch):
    import training.sft as sft_module
    from training.collator import Cell2TextDataCollator

    targets = []  # (stage, target text) of every collated batch

    class RecordingCollator(Cell2TextDataCollator):
        def __call__(self, examples):
            batch = super().__call__(examples)
            tokenizer = self.processor.tokenizer
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                targets.append((self.cell_type_only, tokenizer.decode(ids[labels != -100])))
            return batch

    trainers = []

    class RecordingTrainer(sft_module.Cell2TextSFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append((self, kwargs["peft_config"]))

    monkeypatch.setattr(sft_module, "Cell2TextDataCollator", RecordingCollator)
    monkeypatch.setattr(sft_module, "Cell2TextSFTTrainer", RecordingTrainer)
    lm_dir, corpus_dir = parts_and_corpus
    final_dir = tiny_recipe(lm_dir, corpus_dir, tmp_path / "out", tmp_path / "final", max_steps=1,
                            cell_type_stage_steps=2)

    state = json.loads((final_dir / "training_state.json").read_text())
    assert state["cell_type_stage_steps"] == 2 and state["global_step"] == 1
    assert state["cell_type_stage_runtime"] > 0 and state["train_runtime"] > 0
    stage_one = [text for cell_type_only, text in targets if cell_type_only]
    stage_two = [text for cell_type_only, text in targets if not cell_type_only]
    assert len(stage_one) >= 2 * 4 and len(stage_two) >= 4  # two steps of 4 cells, then one (the loader reads ahead)
    assert targets[: len(stage_one)] == [(True, text) for text in stage_one]  # stage 1 comes first
    assert set(stage_one) <= {f"This sample consists of a {t} cell.<|im_end|>" for t in ("B", "T")}
    assert all(text.startswith("This sample consists of a ") and "It originates from" in text for text in stage_two)
    (stage, stage_lora), (full, full_lora) = trainers
    assert stage_lora is not None and full_lora is None
    assert full.model is stage.model  # stage 2 goes on with the adapters and projector stage 1 trained


def test_the_cell_type_stage_puts_the_loss_on_the_labels_only_where_asked(parts_and_corpus, tmp_path, monkeypatch):
    """The reviewer's finding: with --loss_on_labels_only the cell-type stage's collator was not told, so the stage
    trained on the whole first sentence ("This sample consists of a B cell." and EOS) where the label was asked."""
    import training.sft as sft_module
    from training.collator import Cell2TextDataCollator

    targets = []  # (stage, target text) of every collated batch

    class RecordingCollator(Cell2TextDataCollator):
        def __call__(self, examples):
            batch = super().__call__(examples)
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                targets.append((self.cell_type_only, self.processor.tokenizer.decode(ids[labels != -100])))
            return batch

    monkeypatch.setattr(sft_module, "Cell2TextDataCollator", RecordingCollator)
    lm_dir, corpus_dir = parts_and_corpus
    tiny_recipe(lm_dir, corpus_dir, tmp_path / "out", tmp_path / "final", max_steps=1, cell_type_stage_steps=1,
                loss_on_labels_only=True)
    stage_one = {text.strip() for cell_type_only, text in targets if cell_type_only}
    assert stage_one and stage_one <= {"B cell", "T cell"}


def test_recipe_reads_a_corpus_published_to_the_hub(parts_and_corpus, tmp_path, monkeypatch):
    """corpus_dir may be the Hub dataset id hub_cards.publish pushed to: the splits as `datasets` pushed them
    (parquet), the feature extractor and summary beside them (the Hub is a local folder here)."""
    import shutil

    import datasets
    import huggingface_hub

    lm_dir, corpus_dir = parts_and_corpus
    repo = tmp_path / "hub" / "your-org" / "tiny-corpus"
    local = datasets.load_from_disk(str(corpus_dir))
    for split, rows in local.items():  # what DatasetDict.push_to_hub uploads
        rows.to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    shutil.copytree(corpus_dir / "feature_extractor", repo / "feature_extractor")
    shutil.copy(corpus_dir / "summary.json", repo / "summary.json")
    requested, load_parquet = [], datasets.load_dataset

    def snapshot_download(repo_id, repo_type, allow_patterns):
        requested.append((repo_id, repo_type, tuple(allow_patterns)))
        return str(tmp_path / "hub" / repo_id)

    def load_dataset(path, *args, **kwargs):
        assert path == "your-org/tiny-corpus" and not args
        files = {split: str(repo / "data" / f"{split}-00000-of-00001.parquet") for split in local}
        return load_parquet("parquet", data_files=files)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = Cell2TextArguments(corpus_dir="your-org/tiny-corpus", text_model_name_or_path=str(lm_dir),
                              num_cell_tokens=8, projector_hidden_size=16, encoder_hidden_size=16, encoder_epochs=1,
                              encoder_candidate_layers=[1])
    config = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, bf16=False,
                       activation_checkpointing=False, report_to="none", use_cpu=True, eval_strategy="no",
                       save_strategy="no")
    final_dir = main(args, config)

    assert json.loads((final_dir / "training_state.json").read_text())["global_step"] == 2
    assert {(r, t) for r, t, _ in requested} == {("your-org/tiny-corpus", "dataset")}
    processor = AutoProcessor.from_pretrained(final_dir, trust_remote_code=True)
    summary = json.loads((corpus_dir / "summary.json").read_text())
    assert processor.ontology_term_ids == summary["ontology_term_ids"]  # the summary came from the Hub folder


def test_a_missing_local_corpus_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from processing.corpus import is_hub_corpus, open_corpus

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    assert is_hub_corpus("your-org/tiny-corpus") and not is_hub_corpus("outputs/corpus")
    with pytest.raises(FileNotFoundError, match="outputs/corpus is not a corpus folder"):
        open_corpus("outputs/corpus")


def peft_model_and_trainer_settings(parts_and_corpus, tmp_path):
    """A tiny PEFT Cell2Text model on the tiny corpus, its processor and corpus, and the trainer's keyword arguments
    for it (the losses' tests)."""
    from peft import LoraConfig, get_peft_model

    from training.sft import build_model, build_processor, load_corpus

    lm_dir, corpus_dir = parts_and_corpus
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir), num_cell_tokens=8,
                              projector_hidden_size=16)
    corpus, summary = load_corpus(corpus_dir, args)
    processor = build_processor(args, Path(corpus_dir), summary)
    encoder_dir = encoder_for_vocabulary(Path(lm_dir).parent / "encoder", processor.feature_extractor, tmp_path / "enc")
    torch.manual_seed(0)
    base = build_model(args, str(encoder_dir), processor)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=language_model_lora_targets(base),
                                            modules_to_save=["multi_modal_projector"]))
    settings = SFTConfig(output_dir=str(tmp_path), learning_rate=1e-4, bf16=False, use_cpu=True, report_to="none",
                         remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                         activation_checkpointing=False)
    common = dict(model=model, args=settings, train_dataset=corpus["train"], processing_class=processor,
                  projector_learning_rate=1e-3, gene_encoder_learning_rate=1e-5, data_collator=lambda x: x)
    return model, processor, corpus, common


def test_trls_checkpointing_settings_reach_the_trainer(parts_and_corpus, tmp_path, monkeypatch):
    """TRL's SFTTrainer sets reentrant checkpointing for PEFT under DeepSpeed ZeRO-3 in `gradient_checkpointing_kwargs`
    (a new dict where none was given), which transformers' Trainer no longer reads: it checkpointed non-reentrantly,
    with which TRL says PEFT under ZeRO-3 does not train correctly. No DeepSpeed here: the setting is made as TRL
    makes it."""
    from trl import SFTTrainer

    sft_init = SFTTrainer.__init__

    def as_under_zero3(self, *args, **kwargs):
        sft_init(self, *args, **kwargs)
        self.args.gradient_checkpointing_kwargs = self.args.gradient_checkpointing_kwargs or {}  # TRL's own lines
        self.args.gradient_checkpointing_kwargs["use_reentrant"] = True

    monkeypatch.setattr(SFTTrainer, "__init__", as_under_zero3)
    _, _, _, common = peft_model_and_trainer_settings(parts_and_corpus, tmp_path)
    trainer = Cell2TextSFTTrainer(**{**common, "args": dataclasses.replace(common["args"],
                                                                          activation_checkpointing=True)})
    assert trainer.args.activation_checkpointing_kwargs == {"use_reentrant": True}


def test_the_auxiliary_cell_type_head_adds_its_loss_and_trains_with_the_projector(parts_and_corpus, tmp_path):
    """cell_type_head_loss_weight: the loss is the text loss plus the weighted cross-entropy of a linear head on each
    cell's mean projected token; the head is in the optimizer at the projector's learning rate."""
    from training.collator import Cell2TextDataCollator

    model, processor, corpus, common = peft_model_and_trainer_settings(parts_and_corpus, tmp_path)
    trainer = Cell2TextSFTTrainer(**common, cell_type_head_loss_weight=0.5)
    labels = sorted(processor.ontology_term_ids["cell_type"])
    assert trainer.cell_type_head.out_features == len(labels) >= 2
    head_rates = {group["lr"] for group in trainer.create_optimizer().param_groups
                  if any(p is trainer.cell_type_head.weight for p in group["params"])}
    assert head_rates == {1e-3}
    assert sum(p is trainer.cell_type_head.weight or p is trainer.cell_type_head.bias
               for group in trainer.create_optimizer().param_groups for p in group["params"]) == 2

    rows = [corpus["train"][i] for i in range(4)]
    batch = Cell2TextDataCollator(processor, cell_type_index=True)(rows)
    assert batch["cell_type_index"].tolist() == [labels.index(row["cell_type"]) for row in rows]
    model.train()
    torch.manual_seed(0)
    with_head = trainer.compute_loss(model, dict(batch))
    plain = Cell2TextSFTTrainer(**common)
    torch.manual_seed(0)
    text_only = plain.compute_loss(model, {k: v for k, v in batch.items() if k != "cell_type_index"})
    torch.manual_seed(0)
    outputs = model(**{k: v for k, v in batch.items() if k not in ("labels", "cell_type_index")})
    head = trainer.cell_type_head_loss(outputs, batch["input_ids"], batch["cell_type_index"])
    assert head > 0
    torch.testing.assert_close(with_head, text_only + 0.5 * head)

    # a batch without the head's targets is refused in training (the head would silently not train), and a batch
    # whose cells all have unknown labels adds no loss rather than NaN
    with pytest.raises(ValueError, match="cell_type_index=True"):
        trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "cell_type_index"})
    unknown = trainer.cell_type_head_loss(outputs, batch["input_ids"], torch.full_like(batch["cell_type_index"], -100))
    assert float(unknown) == 0.0

    # the label-embedding head: fixed label directions from the LLM's input embeddings, a learnt scale
    tied = Cell2TextSFTTrainer(**common, cell_type_head_loss_weight=0.5, cell_type_head="label_embeddings")
    assert [p.numel() for p in tied.cell_type_head.parameters()] == [1]
    first = processor.tokenizer(" " + labels[0], add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[first].mean(dim=0)
    torch.testing.assert_close(tied.cell_type_head.labels[0], torch.nn.functional.normalize(expected, dim=0))
    assert any(p is tied.cell_type_head.scale for group in tied.create_optimizer().param_groups for p in group["params"])
    with pytest.raises(ValueError, match="'linear' or 'label_embeddings'"):
        Cell2TextSFTTrainer(**common, cell_type_head="tied")


def test_the_auxiliary_heads_gradients_are_zeroed_each_step_and_a_resume_goes_on_with_the_trained_head(
        parts_and_corpus, tmp_path):
    """The head is no part of the model: the Trainer's model.zero_grad() left its gradients summing over every step,
    and a checkpoint did not hold it, so a resumed run went on from a new head to other weights, exit 0."""
    from training.loss import CELL_TYPE_HEAD_FILE

    lm_dir, corpus_dir = parts_and_corpus
    from training.collator import Cell2TextDataCollator

    model, processor, corpus, common = peft_model_and_trainer_settings(parts_and_corpus, tmp_path)
    trainer = Cell2TextSFTTrainer(**{**common, "data_collator": Cell2TextDataCollator(processor, cell_type_index=True),
                                     "args": dataclasses.replace(common["args"], max_steps=2, save_strategy="no",
                                                                 per_device_train_batch_size=4)},
                                  cell_type_head_loss_weight=0.5)
    trainer.train()
    assert trainer.state.global_step >= 2 and all(p.grad is None for p in trainer.cell_type_head.parameters())

    head = dict(cell_type_head_loss_weight=0.5, max_steps=4, save_strategy="steps", save_steps=2,
                temperature_fit_cells=0)
    full = tiny_recipe(lm_dir, corpus_dir, tmp_path / "full", tmp_path / "full-final", **head)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir, ignore=shutil.ignore_patterns("checkpoint-4", "final*"))
    assert (resumed_dir / "checkpoint-2" / CELL_TYPE_HEAD_FILE).is_file()
    resumed = tiny_recipe(lm_dir, corpus_dir, resumed_dir, tmp_path / "resumed-final",
                          resume_from_checkpoint=str(resumed_dir / "checkpoint-2"), **head)
    full_weights, resumed_weights = (load_file(folder / "model.safetensors") for folder in (full, resumed))
    for name, tensor in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    (resumed_dir / "checkpoint-2" / CELL_TYPE_HEAD_FILE).unlink()  # a checkpoint saved before it was kept
    with pytest.raises(ValueError, match=r"holds no auxiliary cell-type head .* train anew in a new --output_dir"):
        tiny_recipe(lm_dir, corpus_dir, resumed_dir, tmp_path / "again",
                    resume_from_checkpoint=str(resumed_dir / "checkpoint-2"), **head)


def test_the_auxiliary_heads_gradients_are_zeroed_after_a_skipped_optimizer_step(parts_and_corpus, tmp_path):
    """fp16's gradient scaler skips the optimizer's step on an overflow (often the first steps): the head's gradients
    were zeroed only by the optimizer's step, so its inf gradients stayed, every later step overflowed and was
    skipped too, and the run ended untrained, exit 0. Here the overflow is made by hand, on the CPU."""
    from transformers import TrainerCallback

    from training.collator import Cell2TextDataCollator

    model, processor, corpus, common = peft_model_and_trainer_settings(parts_and_corpus, tmp_path)
    finite = []

    class OverflowOnTheFirstStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            head = list(trainer.cell_type_head.parameters())
            if state.global_step == 0:  # inf gradients, and no step (nor its hooks), as the scaler does
                for parameter in [*model.parameters(), *head]:
                    if parameter.grad is not None:
                        parameter.grad.fill_(float("inf"))
                trainer.optimizer.optimizer.step = lambda *args, **kwargs: None
            else:
                finite.append(all(bool(torch.isfinite(p.grad).all()) for p in head if p.grad is not None))

        def on_optimizer_step(self, args, state, control, **kwargs):
            vars(trainer.optimizer.optimizer).pop("step", None)  # the optimizer's own step again

    trainer = Cell2TextSFTTrainer(**{**common, "data_collator": Cell2TextDataCollator(processor, cell_type_index=True),
                                     "args": dataclasses.replace(common["args"], max_steps=2, save_strategy="no",
                                                                 per_device_train_batch_size=4)},
                                  cell_type_head_loss_weight=0.5, callbacks=[OverflowOnTheFirstStep()])
    trainer.train()
    assert finite == [True]
    assert all(bool(torch.isfinite(p).all()) for p in trainer.cell_type_head.parameters())


def test_the_auxiliary_heads_gradients_are_clipped_with_the_models_as_one_norm(parts_and_corpus, tmp_path):
    """max_grad_norm clips every trained parameter as one vector, the head's too (no part of the model): the Trainer
    clipped the model's alone, so the head's gradients stayed 16x the limit while the model's were cut to it."""
    from transformers import TrainerCallback

    from training.collator import Cell2TextDataCollator

    model, processor, corpus, common = peft_model_and_trainer_settings(parts_and_corpus, tmp_path)
    norms = []

    def norm(parameters) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])))

    class ClippedNorms(TrainerCallback):  # after clipping, before the optimizer's step
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            norms.append((norm(model.parameters()), norm(trainer.cell_type_head.parameters()),
                          norm([*model.parameters(), *trainer.cell_type_head.parameters()])))

    trainer = Cell2TextSFTTrainer(**{**common, "data_collator": Cell2TextDataCollator(processor, cell_type_index=True),
                                     "args": dataclasses.replace(common["args"], max_steps=2, save_strategy="no",
                                                                 per_device_train_batch_size=4, max_grad_norm=0.01)},
                                  cell_type_head_loss_weight=0.5, callbacks=[ClippedNorms()])
    trainer.train()
    assert len(norms) == 2
    for model_norm, head_norm, total in norms:
        assert model_norm > 0 and head_norm > 0
        assert total == pytest.approx(0.01, rel=1e-3)  # the head's share counted in the one norm, and clipped
    # the logged norm (also without clipping) is of both
    trainer.model.train()
    batch = Cell2TextDataCollator(processor, cell_type_index=True)([corpus["train"][i] for i in range(4)])
    trainer.compute_loss(model, dict(batch)).backward()
    expected = norm([*model.parameters(), *trainer.cell_type_head.parameters()])
    assert float(trainer._get_grad_norm(model)) == pytest.approx(expected, rel=1e-5)
    assert expected > norm(model.parameters())


def test_the_choice_loss_scores_every_known_label_as_the_decoder_does(parts_and_corpus, tmp_path):
    """cell_type_choice_loss_weight: the loss adds the cross-entropy of the softmax over the known labels' sentence
    log-likelihoods, which equal `score_cell_types`' (the decoder's exhaustive reference) on the same cells, rows of
    different prompt lengths and labels sharing a prefix included, and its gradient reaches the projector through
    the labels' later tokens too."""
    from modeling_cell2text.label_scoring import candidate_sentence_tokens, score_cell_types
    from training.collator import Cell2TextDataCollator

    model, processor, corpus, common = peft_model_and_trainer_settings(parts_and_corpus, tmp_path)
    settings = common["args"]
    # two more labels, sharing their first tokens: the labels' prefix tree branches below its root
    processor.ontology_term_ids = {**processor.ontology_term_ids, "cell_type": {
        **processor.ontology_term_ids["cell_type"], "T cell, alpha-beta": "CL:0000789",
        "T cell, gamma-delta": "CL:0000798"}}
    trainer = Cell2TextSFTTrainer(**common, cell_type_choice_loss_weight=0.5)
    plain = Cell2TextSFTTrainer(**common)
    labels = sorted(processor.ontology_term_ids["cell_type"])
    assert any(len(children) > 1 for children in trainer._choice_tree["tree"].children[1:])

    rows = [corpus["train"][i] for i in (15, 4, 16, 0)]
    batch = Cell2TextDataCollator(processor, cell_type_index=True)(rows)
    starts = (batch["labels"] != -100).int().argmax(dim=1)
    assert len(set(starts.tolist())) > 1  # prompts of different lengths: each row's cache is cut at its own label
    model.eval()  # no dropout: the two paths must give the same numbers
    columns = (batch["labels"][:, 1:] != -100).any(dim=0).nonzero().squeeze(-1)
    model_inputs = {k: v for k, v in batch.items() if k not in ("labels", "cell_type_index")}
    outputs = model(**model_inputs, use_cache=True, logits_to_keep=columns)
    log_likelihoods = trainer.cell_type_choice_log_likelihoods(model, outputs, dict(batch), columns)
    prompts = processor(gene_input_ids=[row["gene_input_ids"] for row in rows], return_tensors="pt")
    expected = score_cell_types(model, processor, prompts, labels).log_likelihoods
    torch.testing.assert_close(log_likelihoods.detach(), expected, atol=1e-5, rtol=0)  # a position off: >= 5e-5
    choice = trainer.cell_type_choice_loss(log_likelihoods, batch["cell_type_index"])
    torch.testing.assert_close(choice, torch.nn.functional.cross_entropy(expected, batch["cell_type_index"]),
                               atol=1e-4, rtol=1e-4)
    # the gradient of the labels' tokens after their first (run on the cache as the tree) reaches the projector
    shared, own = candidate_sentence_tokens(processor.tokenizer, labels)
    at = torch.searchsorted(columns, starts + len(shared) - 1)
    first = outputs.logits[torch.arange(4), at].float().log_softmax(dim=-1)[:, [tokens[0] for tokens in own]]
    later = (log_likelihoods - first)[:, [j for j, tokens in enumerate(own) if len(tokens) > 1]]
    projector = [p for name, p in model.named_parameters() if "multi_modal_projector" in name and p.requires_grad]
    def gradient_size(value):
        gradients = torch.autograd.grad(value.sum(), projector, allow_unused=True, retain_graph=True)
        return sum(float(g.abs().sum()) for g in gradients if g is not None)

    assert gradient_size(later) > 0.1 * gradient_size(first)  # detached tree tokens: 1e-6 (rounding) against 130

    model.train()
    torch.manual_seed(0)
    total = trainer.compute_loss(model, dict(batch))
    torch.manual_seed(0)
    text_only = plain.compute_loss(model, {k: v for k, v in batch.items() if k != "cell_type_index"})
    torch.manual_seed(0)  # the same dropout as in compute_loss: its forward, then the tree's
    outputs = model(**model_inputs, use_cache=True, logits_to_keep=columns)
    choice = trainer.cell_type_choice_loss(trainer.cell_type_choice_log_likelihoods(model, outputs, dict(batch),
                                                                                    columns), batch["cell_type_index"])
    torch.testing.assert_close(total, text_only + 0.5 * choice)
    # under gradient accumulation (the text loss divided by the accumulated tokens) it is divided by the steps
    trainer.current_gradient_accumulation_steps = 4
    torch.manual_seed(0)
    accumulated = trainer.compute_loss(model, dict(batch), num_items_in_batch=int((batch["labels"] != -100).sum()))
    torch.testing.assert_close(accumulated, text_only + 0.5 * choice / 4)
    # the choice loss needs each cell's label, and the cell-type sentence in the targets
    with pytest.raises(ValueError, match="cell_type_index=True"):
        trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "cell_type_index"})
    labels_only = Cell2TextDataCollator(processor, cell_type_index=True, labels_only=True)(rows)
    with pytest.raises(ValueError, match="loss_on_labels_only"):
        trainer.compute_loss(model, dict(labels_only))
    no_target = {**batch, "labels": batch["labels"].clone()}
    no_target["labels"][1] = -100
    with pytest.raises(ValueError, match="a row has none"):
        trainer.compute_loss(model, no_target)
    assert float(trainer.cell_type_choice_loss(expected, torch.full((4,), -100))) == 0.0
    with pytest.raises(ValueError, match="activation checkpointing"):  # it would turn the cache off
        Cell2TextSFTTrainer(**{**common, "args": dataclasses.replace(settings, activation_checkpointing=True)},
                            cell_type_choice_loss_weight=0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default applies where torch sees no accelerator")
def test_recipe_command_line_runs_on_the_cpu_without_use_cpu(tmp_path):
    # README's `python -m training.sft --config training/configs/demo.yaml ...` stopped at transformers' check:
    # "Your setup doesn't support bf16/gpu. You need to assign use_cpu"
    from training.adapters import parse_training_arguments
    from training.baselines.cell2sentence import make_parser as cell2sentence_parser
    from training.sft import make_parser

    config = str(Path(__file__).resolve().parents[1] / "training" / "configs" / "demo.yaml")
    required = ["--output_dir", str(tmp_path), "--corpus_dir", "corpus", "--text_model_name_or_path", "llm"]
    args, training_args = parse_training_arguments(make_parser(), ["--config", config, *required])
    assert training_args.use_cpu and args.num_cell_tokens == 16
    _, c2s_args = parse_training_arguments(cell2sentence_parser(), required)
    assert c2s_args.use_cpu


def test_both_names_of_checkpointing_on_the_command_line_override_the_config(tmp_path):
    """transformers 5 reads `gradient_checkpointing` (its deprecated name) only where `activation_checkpointing` is
    unset: the configs set the old name, so that either name on the command line overrides them (a config setting the
    new name ignored `--gradient_checkpointing true` and TRL's `--no_gradient_checkpointing` without a word)."""
    from training.adapters import parse_training_arguments
    from training.sft import make_parser

    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    required = ["--output_dir", str(tmp_path), "--corpus_dir", "corpus", "--text_model_name_or_path", "llm"]
    for config, given, checkpointing in [
        ("demo.yaml", [], False), ("demo.yaml", ["--gradient_checkpointing", "true"], True),
        ("demo.yaml", ["--gradient_checkpointing=true"], True), ("demo.yaml", ["--activation_checkpointing"], True),
        ("paper.yaml", [], True), ("paper.yaml", ["--no_gradient_checkpointing"], False),
        ("paper.yaml", ["--activation_checkpointing", "false"], False),
    ]:
        _, training_args = parse_training_arguments(make_parser(), ["--config", str(configs / config), *required,
                                                                    *given])
        assert training_args.activation_checkpointing == training_args.gradient_checkpointing == checkpointing, given
    _, training_args = parse_training_arguments(make_parser(), ["--config", str(configs / "demo.yaml"), *required,
                                                                "--gradient_checkpointing_kwargs", '{"a": 1}'])
    assert training_args.activation_checkpointing_kwargs == {"a": 1}
    # a config of transformers 5's new name: the old name on the command line (or beside it) was ignored, exit 0
    for name, value, given in [("activation_checkpointing", "true", ["--no_gradient_checkpointing"]),
                               ("activation_checkpointing", "false", ["--gradient_checkpointing", "true"]),
                               ("activation_checkpointing_kwargs", "{use_reentrant: true}",
                                ["--gradient_checkpointing_kwargs", '{"a": 1}'])]:
        config = tmp_path / f"{name}.yaml"
        config.write_text((configs / "paper.yaml").read_text().replace("gradient_checkpointing: true",
                                                                       f"{name}: {value}"))
        with pytest.raises(ValueError, match=rf"The --config YAML sets {name}: transformers then ignores "
                                             rf"--{name.replace('activation', 'gradient')}.*Write it as "):
            parse_training_arguments(make_parser(), ["--config", str(config), *required, *given])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default applies where torch sees no accelerator")
def test_recipe_trains_in_float32_on_a_cpu_without_native_bf16(tmp_path, monkeypatch, caplog):
    """demo.yaml's bf16 autocast on an AVX2-only CPU made every training step about 20x slower (148 s instead of 7 on
    one thread: the main job would take hours): there the config's bf16 is turned off, with a warning, unless the
    command line asks for it."""
    import logging

    from training import adapters
    from training.adapters import parse_training_arguments
    from training.sft import make_parser

    config = str(Path(__file__).resolve().parents[1] / "training" / "configs" / "demo.yaml")
    argv = ["--config", config, "--output_dir", str(tmp_path), "--corpus_dir", "corpus", "--text_model_name_or_path",
            "llm"]
    monkeypatch.setattr(adapters, "cpu_bf16_is_fast", lambda: False)
    with caplog.at_level(logging.WARNING, logger="training.adapters"):
        _, training_args = parse_training_arguments(make_parser(), argv)
    assert training_args.use_cpu and not training_args.bf16
    assert "trains in float32" in caplog.text
    for keep in (["--bf16", "true"], ["--bf16=true"]):  # either form of the option is the command line's
        _, training_args = parse_training_arguments(make_parser(), [*argv, *keep])
        assert training_args.bf16, keep
    monkeypatch.setattr(adapters, "cpu_bf16_is_fast", lambda: True)
    _, training_args = parse_training_arguments(make_parser(), argv)
    assert training_args.bf16


def test_cells_repeated_to_fill_the_last_batch_of_several_processes_are_counted():
    """accelerate fills the last batch of every process with cells from the start (checked under DDP: 30 cells at
    2 x 4 train 2 cells twice an epoch); the recipe warns with this count."""
    from training.adapters import repeated_training_cells

    assert repeated_training_cells(30, 4, 2) == 2 and repeated_training_cells(3, 4, 2) == 5
    assert repeated_training_cells(32, 4, 2) == 0 and repeated_training_cells(30, 4, 1) == 0


def test_the_recipes_trainers_warn_where_several_processes_repeat_training_cells(caplog):
    """Both recipes' trainers (the mixin): 30 cells on 2 processes x 4 repeat 2 cells each epoch."""
    import logging
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from training.adapters import MultiProcessTrainingMixin

    class Base:  # what the mixin reads of a transformers Trainer
        def __init__(self, cells: int, processes: int):
            self.accelerator = SimpleNamespace(num_processes=processes, distributed_type=DistributedType.MULTI_GPU)
            self.args = SimpleNamespace(per_device_train_batch_size=4, gradient_checkpointing_kwargs=None,
                                        activation_checkpointing_kwargs=None)
            self.train_dataset, self.model = list(range(cells)), torch.nn.Linear(2, 2)

    class Trainer(MultiProcessTrainingMixin, Base):
        pass

    with caplog.at_level(logging.WARNING, logger="training.adapters"):
        Trainer(32, 2)
        Trainer(30, 1)
        assert not caplog.records
        Trainer(30, 2)
    assert "accelerate repeats 2 cells" in caplog.text


def test_init_from_refuses_a_corpus_ranked_with_other_medians(parts_and_corpus, tmp_path):
    """The reviewer's finding: fine-tuning a trained model on a corpus ranked with other gene medians (the same
    genes; the example corpus builder makes one) trained, exit 0, on gene orders the model never sees when
    describing (evaluating on that corpus was refused)."""
    import training.sft as sft_module
    from modeling_cell2text import Cell2TextFeatureExtractor, Cell2TextProcessor
    from transformers import AutoTokenizer

    lm_dir, corpus_dir = parts_and_corpus
    extractor = Cell2TextFeatureExtractor.from_pretrained(corpus_dir / "feature_extractor")
    extractor.gene_medians = {gene: median * 2.0 if i % 2 else median
                              for i, (gene, median) in enumerate(extractor.gene_medians.items())}
    Cell2TextProcessor(extractor, AutoTokenizer.from_pretrained(lm_dir), num_cell_tokens=8).save_pretrained(
        tmp_path / "trained")
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), init_from=str(tmp_path / "trained"))
    with pytest.raises(ValueError, match="not tokenized as the model .* reads cells: other gene medians or special "
                                         "tokens .*--feature-extractor"):
        sft_module.build_processor(args, Path(corpus_dir), {})


def test_init_from_refuses_composition_settings_it_would_ignore():
    """freeze_gene_encoder=False, num_cell_tokens=4 or projector_dropout=0.5 with init_from trained the model as it was
    composed (encoder frozen, 8 tokens, dropout 0.1), exit 0."""
    from types import SimpleNamespace

    from training.sft import check_init_from_settings

    config = SimpleNamespace(num_cell_tokens=8, gene_encoder_layer=-1, projector_hidden_size=16, projector_dropout=0.1,
                             freeze_gene_encoder=True)
    check_init_from_settings(Cell2TextArguments(corpus_dir="c", init_from="m"), config)  # defaults: fine
    check_init_from_settings(Cell2TextArguments(corpus_dir="c", init_from="m", num_cell_tokens=8), config)  # the same
    for given, named in (({"freeze_gene_encoder": False}, "freeze_gene_encoder=False (the model's: True)"),
                         ({"num_cell_tokens": 4}, "num_cell_tokens=4 (the model's: 8)"),
                         ({"projector_dropout": 0.5}, "projector_dropout=0.5"),
                         ({"text_model_name_or_path": "other-llm"}, "text_model_name_or_path='other-llm'"),
                         ({"encoder_epochs": 3}, "encoder_epochs=3")):
        with pytest.raises(ValueError, match=re.escape(named) + ".*would be ignored: leave them unset"):
            check_init_from_settings(Cell2TextArguments(corpus_dir="c", init_from="m", **given), config)


@pytest.mark.parametrize("given, named", [
    (["--packing", "true"], r"packing=True does not apply to this recipe: .*cannot pack"),
    (["--max_length", "256"], r"max_length=256 does not apply .*nothing is truncated"),
    (["--completion_only_loss", "false"], r"completion_only_loss=False does not apply .*the description"),
    (["--dataset_text_field", "sentence"], r"dataset_text_field='sentence' does not apply .*description columns"),
    (["--push_to_hub", "true"], r"push_to_hub=True does not apply .*LoRA adapters, not the model.*hub_cards.publish"),
    (["--config", "settings.yaml"], r"padding_free=True does not apply .*; leave it unset"),
])
def test_sft_settings_the_recipe_does_not_use_are_refused(tmp_path, monkeypatch, given, named):
    """TRL's data-path settings (the recipe pads and masks with its own collator and prepares no dataset) were
    accepted from the command line or YAML and silently ignored."""
    from training.adapters import parse_training_arguments
    from training.sft import make_parser

    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.yaml").write_text("padding_free: true\n")
    args, config = parse_training_arguments(make_parser(), ["--corpus_dir", "corpus", "--output_dir", "out", *given])
    with pytest.raises(ValueError, match=named):
        main(args, config)
    assert not (tmp_path / "out").exists()  # refused before anything was prepared


def test_help_says_which_sft_settings_the_recipe_refuses():
    """--help showed TRL's description of the settings the recipe refuses, as if they applied."""
    from training.sft import UNUSED_SFT_SETTINGS, make_parser

    text = " ".join(make_parser().format_help().split())
    assert "--max_length MAX_LENGTH, --max-length MAX_LENGTH Refused by this recipe: nothing is truncated" in text
    assert "--packing [PACKING] Refused by this recipe: the recipe pads soft-token prompts itself" in text
    assert text.count("Refused by this recipe: ") == len(UNUSED_SFT_SETTINGS)
    assert re.search(r"--learning_rate LEARNING_RATE, --learning-rate LEARNING_RATE (?!Refused)", text)


@pytest.mark.parametrize("config_file", sorted((REPO / "training" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_configs_and_what_the_recipe_does_anyway_pass_the_sft_settings_check(config_file):
    from training.adapters import parse_training_arguments
    from training.sft import check_sft_settings, make_parser

    _, config = parse_training_arguments(make_parser(), ["--config", str(config_file), "--corpus_dir", "corpus"])
    check_sft_settings(config)
    check_sft_settings(dataclasses.replace(config, max_length=None, completion_only_loss=True,
                                           dataset_kwargs={"skip_prepare_dataset": True}))


@pytest.mark.parametrize("setting, message", [
    ({"temperature_fit_cells": -5}, r"temperature_fit_cells must be >= 0 \(0: off\), got -5"),
    ({"cell_type_stage_steps": -1}, r"cell_type_stage_steps must be >= 0 \(0: off\), got -1"),
    ({"encoder_epochs": 0}, r"encoder_epochs must be >= 1, got 0"),
    ({"num_cell_tokens": 0}, r"num_cell_tokens must be >= 1, got 0"),
    ({"projector_dropout": 1.0}, r"projector_dropout must be in \[0, 1\), got 1\.0"),
    ({"lora_r": 0}, r"LoRA settings out of range: lora_r 0 \(>= 1\)"),
    ({"lora_dropout": -0.1}, r"LoRA settings out of range: .*lora_dropout -0\.1 \(in \[0, 1\)\)"),
])
def test_settings_out_of_range_are_refused_when_the_arguments_are_made(setting, message):
    """A negative temperature_fit_cells or cell_type_stage_steps meant "off" without a word; lora_r 0 and the sizes
    failed after the encoder was prepared, inside PEFT or torch."""
    from training.baselines.cell2sentence import Cell2SentenceArguments

    with pytest.raises(ValueError, match=message):
        Cell2TextArguments(corpus_dir="corpus", **setting)
    if set(setting) <= {"lora_r", "lora_dropout"}:  # the baseline trains the same adapters
        with pytest.raises(ValueError, match=message):
            Cell2SentenceArguments(corpus_dir="corpus", text_model_name_or_path="lm", **setting)
    Cell2TextArguments(corpus_dir="corpus", temperature_fit_cells=0, cell_type_stage_steps=0, projector_dropout=0.0)


@pytest.mark.parametrize("yaml_text, message", [
    ("num_cell_tokens: 8.5\n", r"num_cell_tokens must be an integer, got 8\.5 \(float\)"),
    ("per_device_train_batch_size: 2.5\n", r"per_device_train_batch_size must be an integer, got 2\.5"),
    ("max_train_samples: 1500.0\n", r"max_train_samples must be an integer \(or null\), got 1500\.0"),
    ("encoder_candidate_layers: [1, 2.0]\n", r"encoder_candidate_layers must be a list of integers, got 2\.0 "
                                               r"\(float in the list\)"),
    ("learning_rate: 3e-4\n", None),  # PyYAML reads it as a string, which argparse converts: accepted
    ("learning_rate: 0.0003\nnum_cell_tokens: 8\ninit_from: null\n", None),
])
def test_a_config_value_of_another_type_is_refused_when_parsed(tmp_path, yaml_text, message):
    """A --config YAML's values are argparse defaults, taken as they are: `num_cell_tokens: 8.5` ran until the model's
    config refused it ("fix config.json"), `per_device_train_batch_size: 2.5` until the data loader did."""
    from training.adapters import parse_training_arguments
    from training.sft import make_parser

    (tmp_path / "settings.yaml").write_text(yaml_text)
    argv = ["--config", str(tmp_path / "settings.yaml"), "--corpus_dir", "corpus", "--output_dir", str(tmp_path)]
    if message is None:
        args, config = parse_training_arguments(make_parser(), argv)
        assert isinstance(args.num_cell_tokens, int) and isinstance(config.learning_rate, float)
    else:
        with pytest.raises(ValueError, match=message + ".*fix it in the --config YAML"):
            parse_training_arguments(make_parser(), argv)


def test_init_from_a_trainer_checkpoint_or_a_missing_folder_names_the_fix(parts_and_corpus, tmp_path, monkeypatch):
    """A checkpoint-N folder (adapters and optimizer state, no model) or a mistyped local path gave a 30-55 line
    Hub lookup traceback."""
    lm_dir, corpus_dir = parts_and_corpus
    out = tmp_path / "out"
    tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final", max_steps=1, save_strategy="steps", save_steps=1,
                temperature_fit_cells=0)
    checkpoint = str(out / "checkpoint-1")
    args = Cell2TextArguments(corpus_dir=str(corpus_dir), init_from=checkpoint)
    config = SFTConfig(output_dir=str(tmp_path / "again"), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=re.escape(checkpoint) + r" is a Trainer checkpoint .*continue its run with "
                       r"--resume_from_checkpoint .*or set init_from to a saved model folder \(<output_dir>/final\)"):
        main(args, config)
    monkeypatch.chdir(tmp_path)
    for missing in (str(tmp_path / "no" / "model"), "out/final-typo", "model"):  # "out" exists: not an org/name
        args.init_from = missing
        with pytest.raises(FileNotFoundError, match=f"init_from {re.escape(missing)} does not exist"):
            main(args, config)
    args.init_from = "out"  # the run's folder, not its model
    with pytest.raises(FileNotFoundError, match=r"init_from out holds no saved model \(no config.json\)"):
        main(args, config)
    assert not (tmp_path / "again").exists()


def test_a_corpus_without_validation_cells_is_refused_where_the_run_needs_them(parts_and_corpus, tmp_path):
    """Evaluation on a corpus without a validation split was a bare KeyError, after the cell-type stage trained."""
    import shutil

    from datasets import DatasetDict

    from processing.corpus import corpus_feature_extractor

    lm_dir, corpus_dir = parts_and_corpus
    splits = load_from_disk(str(corpus_dir))
    no_validation = tmp_path / "corpus"
    DatasetDict(train=splits["train"], test=splits["test"]).save_to_disk(no_validation)
    shutil.copytree(corpus_dir / "feature_extractor", no_validation / "feature_extractor")
    shutil.copy(corpus_dir / "summary.json", no_validation)
    geneformer = str(encoder_for_vocabulary(Path(lm_dir).parent / "encoder", corpus_feature_extractor(corpus_dir),
                                            tmp_path / "encoder"))
    evaluation = r"evaluation \(eval_strategy steps\)"
    evaluation_fix = "pass --eval_strategy no --load_best_model_at_end false"
    encoder, encoder_fix = "choosing the gene encoder prepared on the corpus", "pass --gene_encoder_name_or_path"
    for corpus, settings, named in (
        (no_validation, {"gene_encoder_name_or_path": geneformer}, f"{evaluation}: {evaluation_fix}"),
        (no_validation, {}, f"{evaluation} and for {encoder}: {evaluation_fix}; {encoder_fix}"),
        (no_validation, {"eval_strategy": "no"}, f"{encoder}: {encoder_fix}"),
    ):  # (max_eval_samples 0 is refused as a cap below 1: test_a_cap_below_one_cell_is_refused_naming_it)
        with pytest.raises(ValueError, match=rf"The corpus {re.escape(str(corpus))} has no validation cells, needed "
                                             rf"for {named}.*build the corpus with a validation split"):
            tiny_recipe(lm_dir, corpus, tmp_path / "out", tmp_path / "final", cell_type_stage_steps=1,
                        **{"eval_strategy": "steps", "eval_steps": 1, **settings})
    assert not (tmp_path / "out").exists()  # refused before the stage or the encoder preparation


def test_a_resumed_two_stage_run_records_the_cell_type_stage_before_its_checkpoint(parts_and_corpus, tmp_path):
    """A resumed run skips the cell-type stage (its checkpoint was trained after it) and recorded 0 stage steps."""
    lm_dir, corpus_dir = parts_and_corpus
    out = tmp_path / "out"
    settings = {"max_steps": 2, "cell_type_stage_steps": 2, "save_strategy": "steps", "save_steps": 1,
                "temperature_fit_cells": 0}
    first = json.loads((tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final", **settings)
                        / "training_state.json").read_text())
    assert first["cell_type_stage_steps"] == 2 and first["cell_type_stage_runtime"] > 0
    # from checkpoint-1; then True, with one more step: the last checkpoint, checkpoint-2, the resumed run's
    for checkpoint, steps, final in ((str(out / "checkpoint-1"), 2, "resumed"), (True, 3, "resumed-again")):
        state = json.loads((tiny_recipe(lm_dir, corpus_dir, out, tmp_path / final, resume_from_checkpoint=checkpoint,
                                        **{**settings, "max_steps": steps}) / "training_state.json").read_text())
        assert state["global_step"] == steps
        assert (state["cell_type_stage_steps"], state["cell_type_stage_runtime"]) == (
            2, first["cell_type_stage_runtime"])


def test_a_new_run_in_an_output_dir_with_an_earlier_runs_checkpoints_is_refused_unless_overwritten(parts_and_corpus,
                                                                                                   tmp_path):
    """A second run in the same output_dir overwrote the first run's checkpoints and its save_total_limit deleted the
    rest, exit 0."""
    from modeling_cell2text.output_files import OutputExistsError

    lm_dir, corpus_dir = parts_and_corpus
    out = tmp_path / "out"
    tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "first", max_steps=2, save_strategy="steps", save_steps=1,
                temperature_fit_cells=0)
    saved = {path: path.read_bytes() for path in out.glob("checkpoint-*/*") if path.is_file()}
    again = {"max_steps": 1, "save_strategy": "steps", "save_steps": 1, "save_total_limit": 1,
             "temperature_fit_cells": 0}
    with pytest.raises(OutputExistsError, match=rf"holds checkpoints of an earlier run \(checkpoint-1, checkpoint-2\)"
                                                rf".*--resume_from_checkpoint {re.escape(str(out / 'checkpoint-2'))},"
                                                r".*--overwrite_output_dir true .*another --output_dir"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "second", **again)
    assert {path: path.read_bytes() for path in out.glob("checkpoint-*/*") if path.is_file()} == saved
    assert not (tmp_path / "second").exists()

    tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "second", overwrite_output_dir=True, **again)
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1"]  # the new run's only
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["max_steps"] == 1


def test_the_cell2sentence_baseline_refuses_an_output_dir_with_an_earlier_runs_checkpoints(tmp_path):
    """The baseline shares the recipe's output_dir rule (`adapters.check_output_dir`): a second run deleted the first
    run's checkpoints by save_total_limit, exit 0."""
    from modeling_cell2text.output_files import OutputExistsError
    from training.baselines.cell2sentence import make_parser, main as train_cell2sentence

    (tmp_path / "out" / "checkpoint-4").mkdir(parents=True)
    args, training_args = make_parser().parse_args_and_config([
        "--corpus_dir", str(tmp_path / "no-corpus"), "--text_model_name_or_path", str(tmp_path / "no-llm"),
        "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
    with pytest.raises(OutputExistsError, match=r"earlier run \(checkpoint-4\).*--overwrite_output_dir true"):
        train_cell2sentence(args, training_args)
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    with pytest.raises(FileNotFoundError):  # a run that saves no checkpoint overwrites none: past the check
        train_cell2sentence(args, dataclasses.replace(training_args, save_strategy="no"))
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    args.overwrite_output_dir = True
    with pytest.raises(FileNotFoundError):  # past the check: the corpus is read next, and there is none
        train_cell2sentence(args, training_args)
    assert not (tmp_path / "out" / "checkpoint-4").exists()


def test_an_output_dir_holding_a_readme_no_trainer_wrote_is_refused(tmp_path):
    """TRL writes its draft model card to <output_dir>/README.md at every checkpoint: a corpus's dataset card (or a
    project's README) in the folder given as --output_dir was replaced, exit 0."""
    from modeling_cell2text.output_files import OutputExistsError
    from training.sft import make_parser

    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# My corpus\n")
    args, training_args = make_parser().parse_args_and_config([
        "--corpus_dir", str(tmp_path / "no-corpus"), "--text_model_name_or_path", str(tmp_path / "no-llm"),
        "--output_dir", str(out), "--use_cpu", "true"])
    with pytest.raises(OutputExistsError, match=r"holds a README.md that no trainer wrote.*another --output_dir"):
        main(args, training_args)
    assert (out / "README.md").read_text().endswith("# My corpus\n")
    with pytest.raises(FileNotFoundError):  # past the check: the corpus is read next, and there is none
        main(args, dataclasses.replace(training_args, save_strategy="no"))  # no checkpoint, no card
    (out / "README.md").write_text("---\ntags:\n- generated_from_trainer\n- trl\n---\n")  # an earlier run's card
    with pytest.raises(FileNotFoundError):
        main(args, training_args)


def test_a_run_resumed_from_its_checkpoint_at_max_steps_trains_no_further_step(parts_and_corpus, tmp_path):
    """A run stopped after its last checkpoint (at max_steps) but before its final model was saved, resumed from that
    checkpoint, ends with the uninterrupted run's weights: transformers trained one step past max_steps."""
    lm_dir, corpus_dir = parts_and_corpus
    out = tmp_path / "out"
    settings = {"max_steps": 2, "save_strategy": "steps", "save_steps": 1, "temperature_fit_cells": 0}
    first = tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "first", **settings)
    resumed = tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "resumed",
                          resume_from_checkpoint=str(out / "checkpoint-2"), **settings)
    assert json.loads((resumed / "training_state.json").read_text())["global_step"] == 2
    assert not (out / "checkpoint-3").exists()
    first_weights, resumed_weights = load_file(first / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert first_weights.keys() == resumed_weights.keys()
    for name, tensor in first_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    # a checkpoint past max_steps: its run trained longer than this one asks
    with pytest.raises(ValueError, match=r"trained for 2 steps, more than this run's 1 \(--max_steps.*resume with "
                                         r"--max_steps 2"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "shorter", resume_from_checkpoint=str(out / "checkpoint-2"),
                    **{**settings, "max_steps": 1})
    assert not (tmp_path / "shorter").exists()


def test_a_chat_template_given_to_trl_is_the_saved_models_and_the_resumes(parts_and_corpus, tmp_path):
    """The second reader's finding: TRL's --chat_template_path sets the processor's template inside SFTTrainer, after
    the processor's checksum was taken, so the final save refused the processor the model had trained with. A resume
    must train on with the same template."""
    from tiny_parts import CHATML_TEMPLATE

    lm_dir, corpus_dir = parts_and_corpus
    template = tmp_path / "template.jinja"
    template.write_text(CHATML_TEMPLATE.replace("message['content']", "(message['content'] | trim)"))
    out, settings = tmp_path / "out", {"max_steps": 2, "save_strategy": "steps", "save_steps": 1,
                                       "temperature_fit_cells": 0}
    final = tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final", chat_template_path=str(template), **settings)
    assert AutoProcessor.from_pretrained(final).chat_template == template.read_text()
    # TRL set it inside the trainer, after the run's record was taken: a resume with the tokenizer's own template
    # trained its steps left on other texts, exit 0
    with pytest.raises(ValueError, match=r"checkpoint-1 was trained with another processor_prompt than this run's.*"
                                         r"resume with .*processor \(tokenizer, --chat_template_path, prompts\)"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "other", resume_from_checkpoint=str(out / "checkpoint-1"),
                    **settings)
    assert not (tmp_path / "other").exists()
    resumed = tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "resumed", chat_template_path=str(template),
                          resume_from_checkpoint=str(out / "checkpoint-1"), **settings)
    assert AutoProcessor.from_pretrained(resumed).chat_template == template.read_text()
    # TRL's other form clones a tokenizer's template and resizes the LLM: it failed inside the trainer, after the
    # encoder's preparation
    with pytest.raises(ValueError, match=r"chat_template_path .* is not a .jinja or .j2 file.*pass that file"):
        tiny_recipe(lm_dir, corpus_dir, tmp_path / "clone", tmp_path / "cloned", chat_template_path=str(lm_dir))
    assert not (tmp_path / "clone").exists()
    # a template writing today's date itself is refused before the encoder's preparation, not at the first batch
    dated = tmp_path / "dated.jinja"
    dated.write_text("{{ 'Today Date: ' + strftime_now('%d %b %Y') + '\\n' }}" + CHATML_TEMPLATE)
    with pytest.raises(ValueError, match=r"The chat template writes today's date itself"):
        tiny_recipe(lm_dir, corpus_dir, tmp_path / "dated", tmp_path / "dated_final", chat_template_path=str(dated))
    assert not (tmp_path / "dated").exists()


def test_a_resume_from_before_the_fixed_prompt_date_is_refused_where_the_template_states_a_date(parts_and_corpus,
                                                                                                 tmp_path):
    """Llama 3's chat templates write "Today Date:" from `date_string`, else today's. A run started before prompts
    stated the fixed `PROMPT_DATE` trained on the day of its run; its record held the template and the tokenizer,
    not the date, so a resume after the change was accepted and trained its steps left on other prompts, exit 0."""
    from tiny_parts import CHATML_TEMPLATE
    from training.adapters import TRAINED_WITH_FILE

    from modeling_cell2text.processing_cell2text import PROMPT_DATE

    lm_dir, corpus_dir = parts_and_corpus
    template = tmp_path / "dated.jinja"
    template.write_text("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
                        "{%- endif %}{{ 'Today Date: ' + date_string + '\\n' }}" + CHATML_TEMPLATE)
    out, settings = tmp_path / "out", {"max_steps": 2, "save_strategy": "steps", "save_steps": 1,
                                       "temperature_fit_cells": 0, "chat_template_path": str(template)}
    tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "final", **settings)
    record_file = out / "checkpoint-1" / TRAINED_WITH_FILE
    assert json.loads(record_file.read_text())["prompt_date"] == PROMPT_DATE
    edit_json(record_file, lambda record: record.pop("prompt_date"))  # as recorded before the fixed date
    with pytest.raises(ValueError, match=r"checkpoint-1 was saved before checkpoints recorded the date their prompts state.*Train anew"):
        tiny_recipe(lm_dir, corpus_dir, out, tmp_path / "resumed", resume_from_checkpoint=str(out / "checkpoint-1"),
                    **settings)
    assert not (tmp_path / "resumed").exists()


def test_earlier_checkpoints_deleted_by_two_nodes_at_once(tmp_path, monkeypatch):
    """With save_on_each_node on a shared file system, every node's saving process deletes the earlier run's
    checkpoints (--overwrite_output_dir); the one that came second stopped with a FileNotFoundError."""
    from training import adapters

    def earlier_checkpoint(step: int) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        (folder / "nested").mkdir(parents=True)
        for name in ("a.bin", "b.bin", "nested/c.bin"):
            (folder / name).write_bytes(b"x")
        return folder

    unlink = os.unlink

    def other_node_first(path, *args, **kwargs):  # the other node removes every file of the folder just before
        for file in sorted(first.rglob("*.bin")):
            unlink(file)
        return unlink(path, *args, **kwargs)

    first = earlier_checkpoint(1)
    monkeypatch.setattr(os, "unlink", other_node_first)
    adapters.remove_folder(first)
    assert not first.exists()

    second = earlier_checkpoint(2)
    monkeypatch.setattr(os, "unlink", unlink)
    shutil.rmtree(second)  # the other node got there first
    adapters.remove_folder(second)

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    third = earlier_checkpoint(3)
    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(PermissionError):  # any other error is raised
        adapters.remove_folder(third)


@pytest.mark.parametrize("loss", ["cell_type_head_loss_weight", "cell_type_choice_loss_weight"])
def test_a_one_process_loss_under_several_processes_is_refused_before_any_work(parts_and_corpus, tmp_path,
                                                                               monkeypatch, loss):
    """The reviewer's finding: refused only when the trainer was built, after the encoder had been prepared."""
    lm_dir, corpus_dir = parts_and_corpus
    monkeypatch.setattr(SFTConfig, "world_size", property(lambda self: 2))
    monkeypatch.setattr("training.sft.load_corpus", lambda *args: pytest.fail("read the corpus first"))
    with pytest.raises(ValueError, match=rf"{loss} > 0 is implemented for one process only"):
        tiny_recipe(lm_dir, corpus_dir, tmp_path / "out", tmp_path / "final", **{loss: 1.0})


def test_an_unfrozen_gene_encoder_is_trained_and_saved_with_the_adapters(tmp_path, monkeypatch):
    """The LoRA config's modules_to_save hold the gene encoder unless it is frozen: without it PEFT freezes the
    encoder, so freeze_gene_encoder=False trained and saved the encoder as given, without a word (the suite's
    optimizer test builds its own LoRA config). The recipe is stopped at the LoRA config it builds."""
    from processing.corpus import corpus_feature_extractor

    encoder_dir, lm_dir = save_tiny_parts(tmp_path / "parts")
    corpus_dir = save_tiny_corpus(tmp_path / "corpus")
    encoder = encoder_for_vocabulary(encoder_dir, corpus_feature_extractor(corpus_dir), tmp_path / "enc")
    seen = {}

    class Stop(Exception):
        pass

    def lora_config(self, target_modules, modules_to_save=None):
        seen["modules_to_save"] = modules_to_save
        raise Stop

    monkeypatch.setattr(Cell2TextArguments, "lora_config", lora_config)
    config = SFTConfig(output_dir=str(tmp_path / "out"), bf16=False, use_cpu=True, report_to="none",
                       activation_checkpointing=False)
    for frozen, expected in ((False, ["multi_modal_projector", "gene_encoder"]), (True, ["multi_modal_projector"])):
        args = Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir),
                                      gene_encoder_name_or_path=str(encoder), num_cell_tokens=8,
                                      projector_hidden_size=16, freeze_gene_encoder=frozen)
        with pytest.raises(Stop):
            main(args, config)
        assert sorted(seen["modules_to_save"]) == sorted(expected)


def test_the_streaming_benchmark_refuses_cells_without_genes_in_one_line(tmp_path, monkeypatch, capsys):
    """benchmarks/corpus_streaming.py --genes-per-cell 2 (a cell of <cls> and <eos> only) or --batches 0 started
    writing the corpus and ended in a traceback."""
    for option in (["--genes-per-cell", "2"], ["--batches", "0"]):
        result = run_as_command([str(REPO / "benchmarks" / "corpus_streaming.py"), "--cells", "4", *option], tmp_path,
                                monkeypatch, capsys)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and option[0] in lines[-1] and "Traceback" not in result.stderr, result.stderr


def test_the_training_corpus_suspension_types_are_recorded_in_the_config_and_added_to_a_parents(tmp_path):
    """What `tl.describe` compares obs suspension_type with: the corpus summary's counts, saved in config.json; a
    model fine-tuned on another corpus (init_from) saw its parent's too, and a parent without a record may have seen
    nuclei, so the record is then unknown."""
    from modeling_cell2text import Cell2TextConfig
    from training.sft import record_training_corpus

    config = Cell2TextConfig(gene_encoder_config={"model_type": "bert"}, text_config={"model_type": "llama"})
    record_training_corpus(config, {"train": "a"}, {"cell": 5})
    config.save_pretrained(tmp_path)
    assert Cell2TextConfig.from_pretrained(tmp_path).training_suspension_types == {"cell": 5}
    record_training_corpus(config, {"train": "a"}, {"cell": 5})  # trained again on the same corpus
    assert config.training_suspension_types == {"cell": 5}
    record_training_corpus(config, {"train": "b"}, {"cell": 1, "nucleus": 2})
    assert config.training_suspension_types == {"cell": 6, "nucleus": 2}
    record_training_corpus(config, {"train": "c"}, {})  # a corpus whose obs gave no suspension_type
    assert config.training_suspension_types is None
    record_training_corpus(config, {"train": "d"}, {"cell": 3})  # its parent's record is unknown
    assert config.training_suspension_types is None
