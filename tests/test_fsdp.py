"""The SFT recipe under accelerate's FSDP (`training/configs/accelerate/fsdp.yaml`) on 2 CPU processes: it trains
(the cell-type stage, then whole descriptions), saves sharded checkpoints, loads the best at the end, resumes from
one, and saves the merged model a 1-process run of the same steps saves.

accelerate (1.x) runs FSDP only on accelerator devices (on CPUs its FSDP config becomes DDP); `fsdp_recipe.py` lifts
that one rule, so the recipe, accelerate's FSDP2 wrapping, its sharded checkpoints and the final gathering run as
on GPUs, over gloo.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_parts import save_tiny_corpus, save_tiny_parts

from modeling_cell2text.modeling_cell2text import WEIGHTS_ID_KEY
from training.adapters import FINAL_DIR, TRAINING_STATE_FILE

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "training" / "configs" / "accelerate" / "fsdp.yaml"
# Dropout off, so that 2 processes of 4 cells do the arithmetic of 1 process of 8. The paper configs' choice of the
# best checkpoint by validation loss, with the higher loss taken as the better: the loss falls, so the best is step 2,
# not the last, and the final weights show whether it was loaded.
RECIPE_ARGS = [
    "--num_cell_tokens", "8", "--projector_hidden_size", "16", "--encoder_hidden_size", "16", "--encoder_epochs", "2",
    "--encoder_candidate_layers", "1", "--bf16", "false", "--activation_checkpointing", "false",
    "--report_to", "none", "--logging_steps", "1", "--use_cpu", "true", "--seed", "0", "--max_steps", "4",
    "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2", "--load_best_model_at_end", "true",
    "--metric_for_best_model", "eval_loss", "--greater_is_better", "true", "--lora_dropout", "0",
    "--projector_dropout", "0", "--learning_rate", "1e-3", "--cell_type_stage_steps", "2",
]


@pytest.fixture(scope="module")
def parts_and_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    _, lm_dir = save_tiny_parts(root / "parts")
    return lm_dir, save_tiny_corpus(root / "corpus")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The shipped FSDP config on 2 CPU processes, in full precision."""
    config = yaml.safe_load(FSDP_CONFIG.read_text())
    config.update(num_processes=2, mixed_precision="no", main_process_port=29563)
    path = tmp_path_factory.mktemp("accelerate") / "fsdp_2proc.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_recipe(lm_dir: Path, corpus_dir: Path, out_dir: Path, *extra: str, fsdp_config: Path | None = None,
               module: str = "training.sft", recipe_args: list[str] = RECIPE_ARGS) -> str:
    """The recipe's log; under `fsdp_config` (2 processes), else in one process."""
    recipe = ["--corpus_dir", str(corpus_dir), "--text_model_name_or_path", str(lm_dir), "--output_dir", str(out_dir),
              *recipe_args, *extra]
    if fsdp_config is None:
        command = [sys.executable, "-m", module, *recipe]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(fsdp_config),
                   str(REPO / "tests" / "fsdp_recipe.py"), module, *recipe]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr + result.stdout


def logged_losses(log: str, key: str = "loss") -> list[float]:
    return [float(x) for x in re.findall(rf"\{{'{key}': '([0-9.]+)'", log)]


def test_the_fsdp_config_wraps_the_layers_each_model_names(tmp_path):
    """accelerate wraps the classes a model names in `_no_split_modules` where the config names none: the LLM's
    decoder layers and the encoder's layers for Cell2Text, whatever the LLM; the decoder layers for the baseline."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from modeling_cell2text import Cell2TextForConditionalGeneration
    from test_pipeline import save_tiny_model_folder

    config = yaml.safe_load(FSDP_CONFIG.read_text())
    assert config["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in config["fsdp_config"]
    model = Cell2TextForConditionalGeneration.from_pretrained(save_tiny_model_folder(tmp_path, trained=False))
    assert {"LlamaDecoderLayer", "BertLayer"} <= set(model._no_split_modules)
    assert set(model._no_split_modules) <= {type(module).__name__ for module in model.modules()}
    qwen = AutoModelForCausalLM.from_config(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    assert set(qwen._no_split_modules) == {"Qwen2DecoderLayer"}


def same_saved_model(final_dir: Path, reference_dir: Path, cell2text: bool = True) -> None:
    """The same files, tensors (names, dtypes, values within 1e-5) and settings as the reference folder; a Cell2Text
    model's weights carry its config's weights_id (`cell2text=False`: the baseline's plain language model)."""
    assert sorted(p.name for p in final_dir.iterdir()) == sorted(p.name for p in reference_dir.iterdir())
    weights, reference = load_file(final_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert weights.keys() == reference.keys()  # one merged model: no LoRA tensors, the tied head not saved twice
    for name, tensor in reference.items():
        assert weights[name].dtype == tensor.dtype
        torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    assert json.loads((final_dir / "generation_config.json").read_text()) == json.loads(
        (reference_dir / "generation_config.json").read_text())  # use_cache among them
    config, reference_config = (json.loads((d / "config.json").read_text()) for d in (final_dir, reference_dir))
    differing = {key for key in config.keys() | reference_config.keys() if config.get(key) != reference_config.get(key)}
    # the prepared encoder's folder (in each run's output_dir) and the fitted temperature, compared in the caller;
    # the id each save writes (weights_id), checked against the weights' own below
    assert differing <= {"gene_encoder_config", "cell_type_temperature", "weights_id"}, differing
    if cell2text:
        with safe_open(final_dir / "model.safetensors", framework="pt") as saved:
            assert saved.metadata()[WEIGHTS_ID_KEY] == config["weights_id"]
    if "gene_encoder_config" in differing:
        assert ({**config["gene_encoder_config"], "_name_or_path": None}
                == {**reference_config["gene_encoder_config"], "_name_or_path": None})


def test_fsdp_recipe_trains_resumes_and_saves_the_one_process_model(parts_and_corpus, two_processes, tmp_path):
    lm_dir, corpus_dir = parts_and_corpus

    sharded_log = run_recipe(lm_dir, corpus_dir, tmp_path / "fsdp", "--per_device_train_batch_size", "4",
                             fsdp_config=two_processes)
    # FSDP's checkpoint: one shard of the weights from each process
    shards = tmp_path / "fsdp" / "checkpoint-2" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resumed_log = run_recipe(lm_dir, corpus_dir, tmp_path / "resumed", "--per_device_train_batch_size", "4",
                             "--resume_from_checkpoint", str(tmp_path / "fsdp" / "checkpoint-2"),
                             fsdp_config=two_processes)
    one_process_log = run_recipe(lm_dir, corpus_dir, tmp_path / "one", "--per_device_train_batch_size", "8")

    one_losses, one_eval_losses = logged_losses(one_process_log), logged_losses(one_process_log, "eval_loss")
    assert len(one_losses) == 2 + 4 and one_eval_losses[0] > one_eval_losses[1]  # the best is step 2, not the last
    assert logged_losses(sharded_log) == pytest.approx(one_losses, abs=2e-3)
    assert logged_losses(sharded_log, "eval_loss") == pytest.approx(one_eval_losses, abs=2e-3)
    # the cell-type stage's 2 steps, then 4 steps; the resumed run goes on from step 2 (no stage)
    assert logged_losses(resumed_log) == pytest.approx(one_losses[4:], abs=2e-3)

    reference_dir = tmp_path / "one" / FINAL_DIR
    reference_config = json.loads((reference_dir / "config.json").read_text())
    for run in ("fsdp", "resumed"):
        final_dir = tmp_path / run / FINAL_DIR
        same_saved_model(final_dir, reference_dir)
        config = json.loads((final_dir / "config.json").read_text())
        # the calibration ran on the gathered model (a forward on one process of a sharded model waits forever)
        assert config["cell_type_temperature"] == pytest.approx(reference_config["cell_type_temperature"], rel=1e-3)
        state = json.loads((final_dir / TRAINING_STATE_FILE).read_text())
        # the best checkpoint was found and loaded (the weights above are step 2's, as the 1-process run's)
        assert state["global_step"] == 4 and Path(state["best_model_checkpoint"]).name == "checkpoint-2"
        assert state["cell_type_stage_steps"] == 2  # the resumed run's too: its checkpoint records the stage


def zero_accelerator(stage: int, gathers: bool | None):
    """What `check_weights_can_be_gathered` reads of a DeepSpeed accelerator (DeepSpeed does not run here)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    optimization = {"stage": stage} if gathers is None else {
        "stage": stage, "stage3_gather_16bit_weights_on_model_save": gathers}
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)),
                           deepspeed_config={"zero_optimization": optimization})


def test_a_zero3_config_that_cannot_gather_the_weights_is_refused_before_training():
    from training.adapters import check_weights_can_be_gathered

    for gathers in (False, None):
        with pytest.raises(ValueError, match="zero3_save_16bit_model: true"):
            check_weights_can_be_gathered(zero_accelerator(3, gathers))
    check_weights_can_be_gathered(zero_accelerator(3, True))
    check_weights_can_be_gathered(zero_accelerator(2, None))  # ZeRO-2: every process holds the weights
    config = yaml.safe_load((FSDP_CONFIG.parent / "deepspeed_zero3.yaml").read_text())
    assert config["deepspeed_config"]["zero3_save_16bit_model"] is True  # the shipped config gathers them


class ZeroEngine:
    """What accelerate's `get_state_dict` reads of a DeepSpeed ZeRO-3 engine (DeepSpeed does not run here): the
    engine, not the model, gathers the 16-bit weights, here in float32 as FSDP's mixed precision leaves them."""

    def __init__(self, module):
        self.module = module

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        return True

    def _zero3_consolidated_16bit_state_dict(self) -> dict:
        return {name: tensor.detach().float().clone() for name, tensor in self.module.state_dict().items()}


def zero3_trainer(peft_model):
    """A trainer as `merge_adapters` sees it under ZeRO-3, with accelerate's own `get_state_dict`."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    accelerator = zero_accelerator(3, True)
    accelerator.is_main_process, accelerator.device = True, torch.device("cpu")
    accelerator.get_state_dict = lambda model: Accelerator.get_state_dict(accelerator, model)
    accelerator.unwrap_model = lambda model: model.module if isinstance(model, ZeroEngine) else model
    return SimpleNamespace(accelerator=accelerator, model=peft_model, model_wrapped=ZeroEngine(peft_model))


def test_zero3_merge_gathers_through_the_engine_and_builds_the_model_whole(tmp_path):
    """The merged model equals the in-place merge: gathered by the engine, built without `deepspeed.zero.Init`
    while the ZeRO-3 config is live (DeepSpeed is not installed: building under it would fail to import it), in the
    dtypes recorded before training (bfloat16, gathered as float32), with the model's generation settings."""
    from copy import deepcopy

    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from peft import LoraConfig, get_peft_model
    from transformers.integrations import is_deepspeed_zero3_enabled, set_hf_deepspeed_config

    from modeling_cell2text import Cell2TextForConditionalGeneration
    from test_pipeline import save_tiny_model_folder
    from training.adapters import merge_adapters, record_dtypes
    from training.sft import language_model_lora_targets

    torch.manual_seed(0)
    model = Cell2TextForConditionalGeneration.from_pretrained(save_tiny_model_folder(tmp_path, trained=False))
    model.generation_config.max_new_tokens = 77  # a setting of the model's own, not derived from its config
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=language_model_lora_targets(model),
                                                  modules_to_save=["multi_modal_projector"]))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)  # B starts at zero: a merge would change nothing
    peft_model.to(torch.bfloat16)
    record_dtypes(peft_model)
    expected = deepcopy(peft_model).merge_and_unload()

    live_config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    set_hf_deepspeed_config(live_config)
    try:
        merged = merge_adapters(zero3_trainer(peft_model))
        assert is_deepspeed_zero3_enabled()  # the live config is back
    finally:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    assert merged.generation_config.to_dict() == expected.generation_config.to_dict()
    assert merged.generation_config.use_cache and merged.generation_config.max_new_tokens == 77
    merged_state, expected_state = merged.state_dict(), expected.state_dict()
    assert merged_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert merged_state[name].dtype == tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(merged_state[name], tensor, atol=0, rtol=0, msg=name)


def records_built_plainly_and_under_zero3(monkeypatch, module, trainer_name: str, run) -> list[dict]:
    """The resume records a run (`run(name)`, stopped where it makes `module.<trainer_name>`) takes without and with
    a live ZeRO-3 config, each of a model built whole (no partitioned parameter)."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers.integrations import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, \
        unset_hf_deepspeed_config

    records = []

    class TrainerReached(Exception):
        pass

    def stop_at_the_trainer(*args, model, callbacks, **kwargs):
        assert all(parameter.numel() > 0 for parameter in model.parameters())
        records.append(callbacks[0].record)
        raise TrainerReached

    monkeypatch.setattr(module, trainer_name, stop_at_the_trainer)
    with pytest.raises(TrainerReached):
        run("plain")
    live_config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    set_hf_deepspeed_config(live_config)  # transformers keeps a weak reference to it
    try:
        with pytest.raises(TrainerReached):
            run("zero3")
        assert is_deepspeed_zero3_enabled()  # the live config is back for the trainer
    finally:
        unset_hf_deepspeed_config()
    return records


def test_the_recipe_builds_its_model_whole_under_a_live_zero3_config(parts_and_corpus, tmp_path, monkeypatch):
    """Under accelerate's DeepSpeed ZeRO-3, transformers loads every model partitioned (`deepspeed.zero.Init`, here
    whatever `zero3_init_flag`), so the resume record's checksums of the gene encoder's and the language model's
    weights hashed empty partitions: any same-named LLM passed. The recipe builds the encoder and the model whole
    (DeepSpeed partitions them when training starts). DeepSpeed is not installed here: loading under zero.Init
    would fail to import it."""
    from test_training import tiny_recipe
    from training import sft

    lm_dir, corpus_dir = parts_and_corpus
    plain, zero3 = records_built_plainly_and_under_zero3(
        monkeypatch, sft, "Cell2TextSFTTrainer",
        lambda name: tiny_recipe(lm_dir, corpus_dir, tmp_path / name, tmp_path / f"{name}_final"))
    assert zero3 == plain  # the weights' checksums of the same parts


def test_the_baseline_loads_its_language_model_whole_under_a_live_zero3_config(parts_and_corpus, tmp_path,
                                                                               monkeypatch):
    """The Cell2Sentence baseline's resume record holds a checksum of its language model's weights: loaded under a
    live ZeRO-3 config (`deepspeed.zero.Init`), it hashed empty partitions, so a resume on another LLM of the same
    architecture passed. Loaded whole, as the recipe's model is (DeepSpeed is not installed here: loading under
    zero.Init would fail to import it)."""
    from test_cell2sentence import tiny_config

    from training.baselines import cell2sentence

    lm_dir, corpus_dir = parts_and_corpus
    plain, zero3 = records_built_plainly_and_under_zero3(
        monkeypatch, cell2sentence, "Cell2SentenceSFTTrainer",
        lambda name: cell2sentence.build_trainer(corpus_dir, lm_dir, tmp_path / name, num_genes=8,
                                                 training_args=tiny_config(tmp_path / name)))
    assert zero3 == plain  # the weights' checksum of the same LLM


def test_the_cell2sentence_baseline_under_fsdp_saves_the_one_process_model(parts_and_corpus, two_processes, tmp_path):
    lm_dir, corpus_dir = parts_and_corpus
    baseline_args = ["--num_genes", "8", "--lora_dropout", "0", "--bf16", "false", "--report_to", "none",
                     "--use_cpu", "true", "--seed", "0", "--max_steps", "2", "--save_strategy", "no",
                     "--logging_steps", "1", "--learning_rate", "1e-3"]
    module = "training.baselines.cell2sentence"
    sharded_log = run_recipe(lm_dir, corpus_dir, tmp_path / "fsdp", "--per_device_train_batch_size", "4",
                             fsdp_config=two_processes, module=module, recipe_args=baseline_args)
    one_log = run_recipe(lm_dir, corpus_dir, tmp_path / "one", "--per_device_train_batch_size", "8", module=module,
                         recipe_args=baseline_args)
    assert logged_losses(sharded_log) == pytest.approx(logged_losses(one_log), abs=2e-3)
    assert len(logged_losses(one_log)) == 2
    same_saved_model(tmp_path / "fsdp" / FINAL_DIR, tmp_path / "one" / FINAL_DIR, cell2text=False)


def test_fsdp_mixed_precision_saves_the_dtypes_of_a_one_process_run(parts_and_corpus, tmp_path):
    """The shipped config's bf16 mixed precision keeps trainable tensors in float32 while training; the merged model
    is saved in the dtypes a 1-process run saves (a bf16 LLM and projector, the encoder in float32), also after the
    cell-type stage (a second trainer of the same model) and with the encoder trained."""
    import shutil

    from transformers import AutoModelForCausalLM

    lm_dir, corpus_dir = parts_and_corpus
    bf16_lm = tmp_path / "lm_bf16"
    shutil.copytree(lm_dir, bf16_lm)
    AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.bfloat16).save_pretrained(bf16_lm)
    config = yaml.safe_load(FSDP_CONFIG.read_text())
    assert config["mixed_precision"] == "bf16"
    config.update(num_processes=2, main_process_port=29565)
    mixed = tmp_path / "fsdp_2proc_bf16.yaml"
    mixed.write_text(yaml.safe_dump(config))
    extra = ["--bf16", "true", "--freeze_gene_encoder", "false"]
    run_recipe(bf16_lm, corpus_dir, tmp_path / "fsdp", "--per_device_train_batch_size", "4", *extra,
               fsdp_config=mixed)
    run_recipe(bf16_lm, corpus_dir, tmp_path / "one", "--per_device_train_batch_size", "8", *extra)

    weights = load_file(tmp_path / "fsdp" / FINAL_DIR / "model.safetensors")
    reference = load_file(tmp_path / "one" / FINAL_DIR / "model.safetensors")
    assert weights.keys() == reference.keys()
    dtypes = {name: tensor.dtype for name, tensor in weights.items()}
    assert dtypes == {name: tensor.dtype for name, tensor in reference.items()}
    assert {dtypes[name] for name in dtypes if "projector" in name} == {torch.bfloat16}
    assert {dtypes[name] for name in dtypes if "gene_encoder" in name} == {torch.float32}
    for name, tensor in reference.items():  # bf16 rounding apart (FSDP trains float32 copies)
        torch.testing.assert_close(weights[name].float(), tensor.float(), atol=2e-2, rtol=0, msg=name)
