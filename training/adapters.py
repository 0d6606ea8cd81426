"""LoRA settings, the record a resume is checked against, and the merged, Hub-ready save: shared by the Cell2Text
recipe and the Cell2Sentence baseline, so both train the same adapters on the same language model, resume under the
same checks and save the same way."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import LoraConfig
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from modeling_cell2text.output_files import OutputExistsError, Terminated, publish_folder, sigterm_as_exception

logger = logging.getLogger(__name__)

# The merged model's folder under a run's output_dir, and the run's steps and best checkpoint saved beside it.
FINAL_DIR = "final"
TRAINING_STATE_FILE = "training_state.json"
OVERWRITE_FINAL_FIX = "pass --overwrite_final_model_dir to replace it"
OVERWRITE_OUTPUT_DIR_HELP = ("Start a new run in an output_dir that holds checkpoints of an earlier run, deleting them "
                             "first (else the run stops before training: resume that run with resume_from_checkpoint, "
                             "or choose another output_dir).")


@dataclass
class LoraArguments:
    """LoRA adapters on the language model's linear layers."""

    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1

    def __post_init__(self) -> None:
        """Refuse LoRA settings PEFT would refuse or misread, when the arguments are made (not after the encoder is
        prepared)."""
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoRA settings out of range: lora_r {self.lora_r!r} (>= 1), lora_alpha {self.lora_alpha!r} "
                             f"(> 0), lora_dropout {self.lora_dropout!r} (in [0, 1))")

    def lora_config(self, target_modules: str, modules_to_save: list[str] | None = None) -> LoraConfig:
        """PEFT's config for these settings on `target_modules`, training `modules_to_save` fully."""
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=target_modules, modules_to_save=modules_to_save, task_type="CAUSAL_LM")


class MultiProcessTrainingMixin:
    """For a transformers `Trainer` of the recipes, what several processes need, sharding the weights (FSDP,
    DeepSpeed ZeRO-3) or not.

    - A warning where the training cells do not fill the last batch of every process (`repeated_training_cells`).
    - A ZeRO-3 config that does not let DeepSpeed gather the weights on saving is refused before training (the
      merged model is built from them at the end).
    - The best checkpoint is found under FSDP with sharded state dicts. transformers (5.x) records a checkpoint as
      the best (`best_model_checkpoint`, which `load_best_model_at_end` loads) only if its folder exists right after
      `save_model`, but with sharded state dicts `save_model` writes nothing (the shards are written later, with the
      optimizer). So the best model was silently not loaded, or, where the processes saw the folder at different
      times, some loaded it and the others waited forever. Every process now creates the folder first.
    - The dtype of every tensor is recorded before accelerate prepares the model (FSDP's mixed precision keeps
      trainable tensors in float32), so the merged model is saved in the dtypes a 1-process run saves.
    - Trainable half-precision tensors (the fully trained modules, PEFT's `modules_to_save`, of a bf16 LLM) train
      in float32 (`train_in_float32`), as PEFT keeps LoRA's: in bf16, updates below its rounding were lost. The merged
      model gets the recorded dtypes back (`merge_adapters`).
    - TRL's checkpointing settings reach transformers' Trainer: TRL writes them under the deprecated name
      `gradient_checkpointing_kwargs` (reentrant checkpointing for PEFT under ZeRO-3, in a new dict where none was
      given), which the Trainer (5.x) no longer reads, so it checkpointed non-reentrantly there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.gradient_checkpointing_kwargs != self.args.activation_checkpointing_kwargs:
            self.args.activation_checkpointing_kwargs = self.args.gradient_checkpointing_kwargs
        check_weights_can_be_gathered(self.accelerator)
        record_dtypes(self.model)
        train_in_float32(self.model)
        processes, batch = self.accelerator.num_processes, self.args.per_device_train_batch_size
        cells = len(self.train_dataset) if self.train_dataset is not None else 0
        repeated = repeated_training_cells(cells, batch, processes)
        if repeated:
            logger.warning(
                "%d training cells do not fill the last batch of %d processes x %d: accelerate repeats %d cells from "
                "the start of the split every epoch, so this run differs from one process's (a per-device batch "
                "that divides the cells per process, or --dataloader_drop_last true, avoids it).",
                cells, processes, batch, repeated)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if output_dir is not None and self.is_fsdp_enabled:
            os.makedirs(output_dir, exist_ok=True)
        super().save_model(output_dir, _internal_call)


class NoStepPastMaxStepsMixin:
    """Resumed from a checkpoint already at `max_steps` (a run stopped after its last checkpoint, before its final
    model was saved), train no further step: transformers' loop trained one, so the final model was not the
    uninterrupted run's. A checkpoint past `max_steps` is refused: its run trained longer than this one asks."""

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        done, wanted = self.state.global_step, self.state.max_steps
        if done > wanted:
            raise ValueError(f"the resumed checkpoint was trained for {done} steps, more than this run's {wanted} "
                             f"(--max_steps, or --num_train_epochs times the steps per epoch): resume with --max_steps "
                             f"{done} or more, or start a new run in another --output_dir.")
        if done == wanted:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)


# The attribute of a model that holds the dtypes of its state dict before training (`record_dtypes`): the dtypes the
# merged model is saved in.
DTYPES_BEFORE_SHARDING = "_cell2text_dtypes_before_sharding"


TRAINED_WITH_FILE = "cell2text_trained_with.json"


def lora_record(lora_config: LoraConfig) -> dict:
    """The LoRA adapters' settings, as a checkpoint records them (`check_resume`): its adapters fit those."""
    targets = lora_config.target_modules
    return {"lora_r": lora_config.r, "lora_alpha": lora_config.lora_alpha, "lora_dropout": lora_config.lora_dropout,
            "lora_target_modules": targets if isinstance(targets, str) else sorted(targets),
            "modules_to_save": sorted(lora_config.modules_to_save or [])}


def state_dict_sha256(state_dict: dict) -> str:
    """A checksum of `state_dict`'s names and tensors' bytes, as a checkpoint records the pretrained weights its
    trained ones fit (`check_resume`): the gene encoder's, the language model's."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any, chat_template_path: str | None) -> str:
    """A checksum of the texts' tokens a TRL trainer trains on: the tokenizer's vocabulary and the chat template it
    applies, TRL's `chat_template_path` (a Jinja file's text, or the template, vocabulary and end-of-text token of
    the tokenizer TRL clones them from: by its name alone, that tokenizer changed went unseen) or the tokenizer's own
    (a resume with another template trained the steps left on other texts, exit 0)."""
    import hashlib

    template, source = trl_chat_template(tokenizer, chat_template_path)
    if source is not None:
        template = [template, sorted(source.get_vocab().items()), source.eos_token]
    content = json.dumps([sorted(tokenizer.get_vocab().items()), template])
    return hashlib.sha256(content.encode()).hexdigest()


def trl_chat_template(tokenizer: Any, chat_template_path: str | None) -> tuple[str | None, Any]:
    """The chat template a TRL trainer applies, and the tokenizer it clones it from (None where it clones none):
    TRL's `chat_template_path` (a Jinja file's text, or another tokenizer's template) or the tokenizer's own."""
    if chat_template_path is None:
        return tokenizer.chat_template, None
    if Path(chat_template_path).is_file():
        return Path(chat_template_path).read_text(encoding="utf-8"), None
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(chat_template_path)
    return source.get_chat_template(), source


def corpus_fingerprints(corpus: Any, summary: dict) -> dict:
    """Which cells a run trains on: the build's fingerprints, else datasets' fingerprints of the splits."""
    return summary.get("fingerprints") or {split: corpus[split]._fingerprint for split in corpus}


def data_order(training_args: Any, cell_type_balance: float) -> dict:
    """What decides which cells each step trains on: the batch over all processes and accumulation steps (a resume
    skips the steps' cells by it: a checkpoint of 2 processes resumed on 1 skipped half the cells it had trained
    on), the sampler's seeds and cell-type balance, and whether the last short batch is dropped."""
    return {"global_batch_size": training_args.per_device_train_batch_size * training_args.world_size
            * training_args.gradient_accumulation_steps,
            "seed": training_args.seed, "data_seed": training_args.data_seed,
            "cell_type_balance": cell_type_balance, "dataloader_drop_last": training_args.dataloader_drop_last}


def optimizer_settings(training_args: Any, **part_learning_rates: float | None) -> dict:
    """The optimizer's settings (with the recipe's per-part learning rates), its schedule and gradient clipping: a
    resume loads the checkpoint's optimizer and scheduler state, whose learning rates, weight decay and betas then
    replace the ones given, exit 0 (a resume at 10x the learning rate trained at the checkpoint's); the scheduler's
    state holds its step only, so another `lr_scheduler_type`, `lr_scheduler_kwargs` (cosine_with_min_lr's min_lr)
    or `warmup_steps` changed the learning rates of the steps left, and another `max_grad_norm` or `optim_args` the
    updates, exit 0, unlike the uninterrupted run's."""
    optim = getattr(training_args.optim, "value", training_args.optim)  # OptimizerNames, a str enum
    scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)  # SchedulerType
    return {"optim": optim, "optim_args": training_args.optim_args or None,
            "learning_rate": training_args.learning_rate, **part_learning_rates,
            "weight_decay": training_args.weight_decay, "adam_beta1": training_args.adam_beta1,
            "adam_beta2": training_args.adam_beta2, "adam_epsilon": training_args.adam_epsilon,
            "lr_scheduler_type": scheduler, "lr_scheduler_kwargs": training_args.lr_scheduler_kwargs or {},
            "warmup_steps": training_args.warmup_steps, "max_grad_norm": training_args.max_grad_norm}


def best_checkpoint_choice(training_args: Any) -> dict:
    """How the best checkpoint is chosen: a checkpoint's trainer state holds its run's best value so far, which a
    resume with another `metric_for_best_model` or `greater_is_better` compared with the new metric's values (an
    eval_loss of 5.97 kept as the best against token accuracies of 0 to 1: the checkpoint best by loss loaded at the
    end as the best by accuracy), exit 0. The metric as the Trainer reads it ("loss" is "eval_loss")."""
    metric = training_args.metric_for_best_model
    if metric is not None and not metric.startswith("eval_"):
        metric = f"eval_{metric}"
    return {"metric_for_best_model": metric, "greater_is_better": training_args.greater_is_better}


def loss_settings(training_args: Any, **recipe_losses: float) -> dict:
    """What the loss is (with the recipe's own weights, `recipe_losses`): the checkpoint does not hold it, so a resume
    with another loss (a cell_type_loss_weight of 4 instead of 1, label smoothing, NEFTune's noise) trained the steps
    left on it, exit 0, unlike the uninterrupted run."""
    return {"loss_type": training_args.loss_type, "label_smoothing_factor": training_args.label_smoothing_factor,
            "neftune_noise_alpha": training_args.neftune_noise_alpha, **recipe_losses}


class RecordTrainedWith(TrainerCallback):
    """Writes the run's record (what `check_resume` compares) into each checkpoint, and `extra` (file name -> JSON
    content: the recipe's cell-type stage) beside it (main process)."""

    def __init__(self, record: dict, extra: dict[str, dict] | None = None) -> None:
        self.record, self.extra = record, extra or {}

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            for name, content in {TRAINED_WITH_FILE: self.record, **self.extra}.items():
                # whole or not at all: a run stopped while writing left an empty record, which no resume could read
                handle, partial = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
                try:
                    with os.fdopen(handle, "w") as file:
                        json.dump(content, file, indent=2)
                    os.replace(partial, folder / name)
                finally:
                    Path(partial).unlink(missing_ok=True)


def resumed_checkpoint(checkpoint: str | bool | None, output_dir: str) -> Path | None:
    """The checkpoint a run resumes from (None: none): `checkpoint` True is the Trainer's, the last one in
    `output_dir`."""
    if checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    return Path(checkpoint) if isinstance(checkpoint, (str, Path)) else None


def check_resume(checkpoint: str | bool | None, record: dict, output_dir: str) -> None:
    """Refuse to resume from a checkpoint trained with another gene encoder, language model (its weights'
    checksum: `text_model_name_or_path` or `init_from`), projector or LoRA settings (`trained_with`): its
    projector and adapters fit those, and would silently train on, or fail to load into, others; or on another
    corpus or max_train_samples (`corpus_fingerprints`): the final model would record only the second corpus, so
    evaluation's check that the test cells are not its training cells passed on a corpus it had partly trained
    on; or with another max_eval_samples: the best checkpoint would be chosen among validation losses on other
    cells; or with another batch or data order (`data_order`) or training texts (definitions, loss on labels
    only): the resumed run skips other cells than it trained on, exit 0 with the step count of a whole run; or
    with other optimizer, schedule or clipping settings (`optimizer_settings`), which the checkpoint's optimizer
    state silently replaces, or which silently change the steps left; or with another loss (`loss_settings`),
    dropout (LoRA's, the projector's) or choice of the best checkpoint (`best_checkpoint_choice`); or with another
    processor (its checksums, `processor_sha256`: tokenizer, chat template, prompts, labels), whose texts the steps
    left would train on; or, where the chat template states a date (Llama 3's "Today Date:"), a checkpoint that does
    not record `prompt_date`: it was trained on the day of its run, not on `PROMPT_DATE`. Also refused:
    a checkpoint of the weights alone (`save_only_model`), which the Trainer resumed from with a new optimizer
    and schedule. A setting the checkpoint does not record (saved before it was recorded) is not checked.
    `checkpoint` True is the Trainer's: the last checkpoint in `output_dir`."""
    checkpoint = resumed_checkpoint(checkpoint, output_dir)
    if checkpoint is None:
        return
    if (checkpoint / "trainer_state.json").is_file() and not any(checkpoint.glob("rng_state*.pth")):
        # the Trainer saves the optimizer's, scheduler's and random states, then its own state (all but the last not
        # with save_only_model), and resumes without the first three, logging at info level only
        raise ValueError(f"{checkpoint} holds the weights only, no optimizer, scheduler or random state (saved with "
                         "--save_only_model true), so a resumed run would restart Adam's moments and the learning-rate "
                         "schedule and end other than the uninterrupted run: train anew in a new --output_dir, with "
                         "--save_only_model false to be able to resume.")
    # A run stopped between a checkpoint's weights and its record leaves it without one: its run's other
    # checkpoints (one run per output_dir, `check_output_dir`) record the same settings.
    records = [checkpoint / TRAINED_WITH_FILE,
               *sorted(checkpoint.parent.glob(f"{PREFIX_CHECKPOINT_DIR}-*/{TRAINED_WITH_FILE}"), reverse=True)]
    path = next((record_file for record_file in records if record_file.is_file()), None)
    if path is None:
        logger.warning("%s records no gene encoder or LoRA settings (%s): the resume is not checked.", checkpoint,
                       TRAINED_WITH_FILE)
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} does not read ({error}): a run stopped while writing it; resume from an earlier "
                         "checkpoint, or delete the file to resume without the check.") from error
    if "prompt_date" not in saved and record.get("prompt_date") is not None:
        # recorded since prompts state a fixed date: before, a template stating one wrote the day of the run
        raise ValueError(f"{checkpoint} was saved before checkpoints recorded the date their prompts state, and the "
                         f"chat template states one (now {record['prompt_date']}): if it trained before prompts stated "
                         "a fixed date, its steps trained on prompts stating the day they ran and the steps left "
                         "would train on others, which its record cannot tell. Train anew in a new --output_dir.")
    changed = sorted(k for k in {*saved, *record} if saved.get(k, record.get(k)) != record.get(k))
    if changed:
        differences = "; ".join(f"{k}: {_shown(saved.get(k))} there, {_shown(record.get(k))} now" for k in changed)
        raise ValueError(f"{checkpoint} was trained with another {', '.join(changed)} than this run's ({differences}); "
                         "resume with the corpus, encoder, language model (text_model_name_or_path or init_from), "
                         "projector, LoRA, processor (tokenizer, --chat_template_path, prompts), batch (per-device "
                         "size x processes x accumulation steps), data, loss, "
                         "optimizer, schedule, clipping and best-checkpoint settings it was trained with, or train "
                         "anew in a new --output_dir.")


def _shown(value: Any) -> str:
    """A recorded setting in an error message: checksums cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def record_dtypes(model: Any) -> None:
    """Record the dtype of each tensor of `model`'s state dict on the model, once (a second trainer of the same
    model, as after the cell-type stage, finds it already prepared)."""
    if not hasattr(model, DTYPES_BEFORE_SHARDING):
        setattr(model, DTYPES_BEFORE_SHARDING, {name: tensor.dtype for name, tensor in model.state_dict().items()})


def train_in_float32(model: Any) -> None:
    """Cast `model`'s trainable bf16/fp16 parameters to float32, in place: an optimizer step on a half-precision
    weight rounds away updates smaller than its precision (a LayerNorm's gain stayed unchanged)."""
    import torch

    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()


def restore_dtypes(model: Any) -> None:
    """Cast `model`'s tensors back, in place, to the dtypes `record_dtypes` recorded (see `train_in_float32`)."""
    dtypes = getattr(model, DTYPES_BEFORE_SHARDING, {})
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in dtypes and tensor.dtype != dtypes[name]:
            tensor.data = tensor.data.to(dtypes[name])


def check_weights_can_be_gathered(accelerator: Any) -> None:
    """Refuse a DeepSpeed ZeRO-3 run whose config keeps DeepSpeed from gathering the weights on saving: the merged
    model is built from them (`merge_adapters`), after training."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED or not weights_sharded(accelerator):
        return
    if not accelerator.deepspeed_config.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save"):
        raise ValueError(
            "DeepSpeed ZeRO-3 shards the weights and this config does not gather them on saving, so no merged model "
            "could be saved after training. Set `zero3_save_16bit_model: true` under `deepspeed_config` in the "
            "accelerate config (or `stage3_gather_16bit_weights_on_model_save: true` under `zero_optimization` in "
            "the DeepSpeed JSON), as training/configs/accelerate/deepspeed_zero3.yaml does."
        )


def merge_adapters(trainer: Any) -> Any | None:
    """The trained model with its LoRA adapters merged in, on the main process (None on the others); every process
    must call it. Where training sharded the weights (FSDP, DeepSpeed ZeRO-3) no process holds them whole: they
    are gathered onto the main process's CPU, loaded into an unsharded copy of the model, merged there and moved
    to the training device. Otherwise the adapters are merged into the trainer's model in place. Either way the
    merged model has the dtypes recorded before training (`record_dtypes`)."""
    accelerator = trainer.accelerator
    if not weights_sharded(accelerator):
        if not accelerator.is_main_process:
            return None
        model = accelerator.unwrap_model(trainer.model)
        restore_dtypes(model)
        return model.merge_and_unload()
    # Collective: every process takes part. Under DeepSpeed the engine (`model_wrapped`) gathers; under FSDP it is
    # the model itself.
    full_state = accelerator.get_state_dict(trainer.model_wrapped)
    if not accelerator.is_main_process:
        return None
    return _merged_unsharded_copy(accelerator.unwrap_model(trainer.model), full_state).to(accelerator.device)


def weights_sharded(accelerator: Any) -> bool:
    """Whether no process holds the whole model: FSDP, or DeepSpeed ZeRO stage 3."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    return plugin is not None and plugin.zero_stage == 3


def _merged_unsharded_copy(peft_model: Any, full_state: dict) -> Any:
    """A CPU copy of a sharded PEFT model with the same adapters and generation settings, holding `full_state` (its
    whole state dict) in the dtypes recorded before training sharded it (`record_dtypes`), merged."""
    import torch
    from peft import get_peft_model
    from torch.distributed.fsdp import FSDPModule
    from transformers.initialization import no_init_weights

    if len(peft_model.peft_config) != 1:
        raise ValueError(f"Merging needs one LoRA adapter; the model holds {sorted(peft_model.peft_config)}.")
    dtypes = getattr(peft_model, DTYPES_BEFORE_SHARDING, {})
    if dtypes and full_state.keys() - dtypes.keys():
        raise ValueError(f"The gathered weights hold tensors the model did not have before training: "
                         f"{sorted(full_state.keys() - dtypes.keys())[:5]}.")
    base = peft_model.get_base_model()
    base_class = type(base).__bases__[1] if isinstance(base, FSDPModule) else type(base)  # FSDP2 subclasses it
    with without_zero3_init():
        with torch.device("cpu"), no_init_weights():
            base_copy = base_class(base.config)
        base_copy.tie_weights()  # no_init_weights skips the tying too
        base_copy.generation_config = deepcopy(base.generation_config)  # a new model derives its own from the config
        copy = get_peft_model(base_copy, next(iter(peft_model.peft_config.values())))
        for name, tensor in copy.state_dict(keep_vars=True).items():
            if name in full_state:
                tensor.data = tensor.data.to(dtypes.get(name, full_state[name].dtype))
        copy.load_state_dict(full_state, strict=True)
        return copy.merge_and_unload()


@contextmanager
def without_zero3_init() -> Iterator[None]:
    """Build a model whole while a DeepSpeed ZeRO-3 config is live: transformers otherwise partitions every model it
    loads (`deepspeed.zero.Init`, which needs every process; PEFT gathers), whatever accelerate's `zero3_init_flag`.
    The recipe builds its model whole on every process, as the Cell2Sentence baseline its language model (DeepSpeed
    partitions it when training starts: the weights' checksums of the resume record hashed empty partitions), and
    merges it whole on one."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    live_config = hf_deepspeed._hf_deepspeed_config_weak_ref()  # transformers keeps the live config only here
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(live_config)


def save_merged(
    trainer: Any,
    merged: Any | None,
    final_dir: str | Path,
    processing_class: Any,
    state: dict[str, Any],
    *,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    save_folder: Callable[[Any, Any, Path], None] | None = None,
) -> Path:
    """Save the merged model (`merge_adapters`) with its processor (or tokenizer; `save_folder(model, processor,
    folder)` where a model saves more, as Cell2Text's `save_model_folder`), plus `state`, the trainer's steps, its
    step cap (--max_steps; None: none) and best checkpoint as training_state.json and `extra_files` (name -> text);
    the main process writes, all wait.

    Everything is written into a temporary folder beside `final_dir` and published at the end
    (`output_files.publish_folder`): an interrupted save leaves no half-written model, and a non-empty `final_dir`
    (also one another run published meanwhile) is replaced only with `overwrite`."""
    final_dir = Path(final_dir).absolute()
    if trainer.accelerator.is_main_process:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.partial-"))
        try:
            if save_folder is None:
                merged.save_pretrained(staging)
                processing_class.save_pretrained(staging)
            else:
                save_folder(merged, processing_class, staging)
            state = {"global_step": trainer.state.global_step,
                     "max_steps": trainer.args.max_steps if trainer.args.max_steps > 0 else None,  # None: no cap
                     "best_model_checkpoint": trainer.state.best_model_checkpoint,
                     "best_metric": trainer.state.best_metric, **state}
            (staging / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2))
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text)
            publish_folder(staging, final_dir, overwrite, fix=OVERWRITE_FINAL_FIX, holds="config.json")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return final_dir


#: The tag of the draft model card transformers' and TRL's trainers write into output_dir (README.md).
TRAINER_CARD_TAG = "generated_from_trainer"


def check_output_dir(training_args: Any, overwrite: bool) -> None:
    """Refuse a new run (no resume_from_checkpoint) that saves checkpoints into an output_dir holding checkpoints of
    an earlier one: the new run overwrote them step by step and its save_total_limit deleted the rest, and
    resume_from_checkpoint=True took the latest of either run. With `overwrite` (--overwrite_output_dir) the saving
    process deletes them first. Also refused, with or without it: an output_dir holding a README.md no trainer wrote
    (a corpus's card, a project's notes), which the trainer's draft model card would replace."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    card = Path(training_args.output_dir) / "README.md"
    if training_args.save_strategy != "no" and card.is_file() and TRAINER_CARD_TAG not in card.read_text(
            errors="replace"):  # TRL writes its draft model card there at every checkpoint: a corpus's card was lost
        raise OutputExistsError(
            f"--output_dir {training_args.output_dir} holds a README.md that no trainer wrote, which the trainer would "
            "replace with its draft model card at the first checkpoint: choose another --output_dir (a folder for "
            "this run's checkpoints), or move the README.md.")
    if training_args.resume_from_checkpoint or training_args.save_strategy == "no":  # nothing to overwrite or delete
        return
    earlier = sorted((folder for folder in Path(training_args.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                      if folder.is_dir() and re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", folder.name)),
                     key=lambda folder: int(folder.name.rsplit("-", 1)[1]))
    if not earlier:
        return
    names = ", ".join(folder.name for folder in earlier)
    if not overwrite:
        raise OutputExistsError(
            f"--output_dir {training_args.output_dir} holds checkpoints of an earlier run ({names}), which a new run "
            f"would overwrite or delete: continue that run with --resume_from_checkpoint {earlier[-1]}, pass "
            "--overwrite_output_dir true to delete them and start anew there, or choose another --output_dir.")
    if training_args.should_save:  # by the process that saves the checkpoints (each node's, with save_on_each_node)
        logger.warning("--overwrite_output_dir: deleting the earlier run's %s in %s", names, training_args.output_dir)
        for folder in earlier:
            remove_folder(folder)


def remove_folder(folder: Path) -> None:
    """`shutil.rmtree`, where files another process removes meanwhile are not an error: with save_on_each_node on a
    shared file system, every node's saving process deletes the same earlier checkpoints, and the one that came
    second stopped with a FileNotFoundError. Any other error is raised."""
    def already_gone(function, path, error) -> None:
        if not isinstance(error, FileNotFoundError):
            raise error

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=already_gone)
    else:
        shutil.rmtree(folder, onerror=lambda function, path, info: already_gone(function, path, info[1]))


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices with native kernels (oneDNN's, on AVX-512 or AMX). Without them
    torch falls back to a reference kernel: on an AVX2-only AMD EPYC a bf16 product of the demo's shapes took 46x a
    float32 one, and a demo training step under bf16 autocast 148 s instead of 7 (one thread)."""
    import torch

    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def parse_training_arguments(parser: Any, argv: Sequence[str] | None = None) -> tuple:
    """A TRL parser's dataclasses from `argv` (default: the command line) and its `--config`. Where torch sees no
    GPU or other accelerator and `--use_cpu` is not given, `--use_cpu true` is added, so a recipe runs where it is
    (bf16 autocast on the CPU) instead of stopping at transformers' bf16 check (TRL's SFTConfig sets bf16). Training
    on a CPU without native bf16 kernels (`cpu_bf16_is_fast`), bf16 from a config or a default is turned off, with a
    warning (`--bf16 true` on the command line keeps it): the main job took hours there instead of minutes."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    argv = list(sys.argv[1:] if argv is None else argv)
    accelerator = (torch.cuda.is_available() or is_torch_bf16_gpu_available() or is_torch_xla_available()
                   or torch.backends.mps.is_available())
    if not accelerator and not _given(argv, "--use_cpu"):
        argv += ["--use_cpu", "true"]
    parsed = _parsed(parser, argv)
    training_args = next((arguments for arguments in parsed if hasattr(arguments, "use_cpu")), None)
    on_cpu = training_args is not None and (training_args.use_cpu or not accelerator)
    if on_cpu and training_args.bf16 and not _given(argv, "--bf16") and not cpu_bf16_is_fast():
        logger.warning("This CPU has no native bf16 kernels (AVX-512 or AMX): bf16 autocast would make every "
                       "training step tens of times slower, so this run trains in float32. Pass --bf16 true to "
                       "keep bf16.")
        parsed = _parsed(parser, [*argv, "--bf16", "false"])
    check_argument_types(parsed)
    check_checkpointing_names(parser)
    return parsed


def check_checkpointing_names(parser: Any) -> None:
    """Refuse a `--config` YAML that sets transformers 5's `activation_checkpointing(_kwargs)` (TRL's parser makes a
    config's values the parser's defaults): transformers reads the deprecated `gradient_checkpointing(_kwargs)` only
    where the new name is unset, so `--gradient_checkpointing`, TRL's `--no_gradient_checkpointing` and a config's
    old name were ignored without a word. The project's configs set the old name, which either name on the command
    line overrides."""
    for name in ("activation_checkpointing", "activation_checkpointing_kwargs"):
        if parser.get_default(name) is not None:
            old = name.replace("activation", "gradient")
            given = f"--{old}" + (" and --no_gradient_checkpointing" if old == "gradient_checkpointing" else "")
            raise ValueError(f"The --config YAML sets {name}: transformers then ignores {given} on the command line "
                             f"(and {old} in the config) without a word. Write it as {old} in the config, as "
                             "training/configs/*.yaml do: either name on the command line then overrides it.")


def _parsed(parser: Any, argv: Sequence[str]) -> tuple:
    """`parser.parse_args_and_config(argv)`, with the `ValueError`s by which TRL and transformers refuse a command
    line or config (an unknown option or YAML key, `--load_best_model_at_end` with another save than eval strategy)
    raised again as this project's: a command ends them in one line (`refused_input_as_one_line`), as it did before
    it kept other libraries' tracebacks."""
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:
        raise ValueError(str(error)) from error


def _given(argv: Sequence[str], option: str) -> bool:
    """Whether the command line `argv` sets `option` (`--name value` or `--name=value`)."""
    return any(a == option or a.startswith(f"{option}=") for a in argv)


_TYPE_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"),  # (one, a list's)
               bool: ("true or false", "true or false values")}


def check_argument_types(parsed: Sequence[Any]) -> None:
    """Refuse a setting of a plain int, float or bool field (or a list of them, or one of them or None) whose value
    has another type. argparse converts what the command line gives, but a `--config` YAML's values are defaults,
    which it takes as they are: `num_cell_tokens: 8.5` ran until the model's config refused it ("fix config.json"),
    `per_device_train_batch_size: 2.5` until the data loader did, after the models had loaded."""
    import dataclasses
    import types
    import typing

    for arguments in parsed:
        if not dataclasses.is_dataclass(arguments):
            continue
        hints = typing.get_type_hints(type(arguments))
        for field in dataclasses.fields(arguments):
            hint, value = hints.get(field.name), getattr(arguments, field.name)
            args = typing.get_args(hint)
            optional = isinstance(hint, types.UnionType) and len(args) == 2 and type(None) in args
            kind = next(a for a in args if a is not type(None)) if optional else hint
            if (optional and value is None) or not isinstance(kind, type | types.GenericAlias):
                continue
            listed = typing.get_origin(kind) is list and len(typing.get_args(kind)) == 1 and isinstance(value, list)
            kind, values = (typing.get_args(kind)[0], value) if listed else (kind, [value])
            if kind not in _TYPE_WORDS:
                continue
            for item in values:
                fits = (isinstance(item, bool) if kind is bool else
                        not isinstance(item, bool) and isinstance(item, int if kind is int else (int, float)))
                if not fits:
                    raise ValueError(f"{field.name} must be {'a list of ' if listed else ''}{_TYPE_WORDS[kind][listed]}"
                                     f"{' (or null)' if optional else ''}, got {item!r} ({type(item).__name__}"
                                     f"{' in the list' if listed else ''}): fix it in the --config YAML")


def repeated_training_cells(num_cells: int, per_device_batch: int, num_processes: int) -> int:
    """How many cells each epoch trains on twice under several processes: where the training cells do not fill the
    last batch of every process, accelerate fills it with cells from the start of the split (`even_batches`), so the
    run is not one process's."""
    if num_processes <= 1:
        return 0
    return -num_cells % (per_device_batch * num_processes)


def leave_process_group() -> None:
    """End a multi-process run's process group once the model is saved: left to the interpreter's exit, a worker
    could abort (seen about 1 launch in 10 under DDP: the model saved, yet exit status 1). The barrier first lets
    every process's queued collectives finish, so that none is destroyed with gloo work in flight (a worker of the
    2-process FSDP test still aborted at exit once in 7 CI runs without it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def stopped_cleanly() -> Iterator[None]:
    """Run a recipe so that SIGTERM (a scheduler's stop) and SIGINT end it like an error: `finally` blocks remove
    the half-saved model, the checkpoints already written stay, and the exit status says which signal stopped it."""
    try:
        with sigterm_as_exception():
            yield
    except (Terminated, KeyboardInterrupt) as stop:
        number = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
        print(f"stopped by {signal.Signals(number).name}; no final model was written. Resume with "
              "--resume_from_checkpoint <output_dir>/checkpoint-<last step>.", file=sys.stderr)
        raise SystemExit(128 + number) from None

