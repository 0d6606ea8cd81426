"""LoRA settings and the merged, Hub-ready save: shared by the Cell2Text recipe and the Cell2Sentence baseline, so
both train the same adapters on the same language model and save the same way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import LoraConfig

from modeling_cell2text.output_files import Terminated, publish_folder, sigterm_as_exception

# The merged model's folder under a run's output_dir, and the run's steps and best checkpoint saved beside it.
FINAL_DIR = "final"
TRAINING_STATE_FILE = "training_state.json"
OVERWRITE_FINAL_FIX = "pass --overwrite_final_model_dir to replace it"


@dataclass
class LoraArguments:
    """LoRA adapters on the language model's linear layers."""

    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1

    def lora_config(self, target_modules: str, modules_to_save: list[str] | None = None) -> LoraConfig:
        """PEFT's config for these settings on `target_modules`, training `modules_to_save` fully."""
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=target_modules, modules_to_save=modules_to_save, task_type="CAUSAL_LM")


def save_merged(
    trainer: Any,
    final_dir: str | Path,
    processing_class: Any,
    state: dict[str, Any],
    *,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    save_folder: Callable[[Any, Any, Path], None] | None = None,
) -> Path:
    """Merge the trainer's LoRA adapters into the language model and save it with its processor (or tokenizer;
    `save_folder(model, processor, folder)` where a model saves more, as Cell2Text's `save_model_folder`),
    plus `state` and the trainer's best checkpoint as training_state.json and `extra_files` (name -> text); the
    main process writes, all wait.

    Everything is written into a temporary folder beside `final_dir` and published at the end
    (`output_files.publish_folder`): an interrupted save leaves no half-written model, and a non-empty `final_dir`
    (also one another run published meanwhile) is replaced only with `overwrite`."""
    final_dir = Path(final_dir).absolute()
    if trainer.accelerator.is_main_process:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.partial-"))
        try:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            if save_folder is None:
                merged.save_pretrained(staging)
                processing_class.save_pretrained(staging)
            else:
                save_folder(merged, processing_class, staging)
            state = {"global_step": trainer.state.global_step,
                     "best_model_checkpoint": trainer.state.best_model_checkpoint,
                     "best_metric": trainer.state.best_metric, **state}
            (staging / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2))
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text)
            staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the model is a plain folder
            publish_folder(staging, final_dir, overwrite, fix=OVERWRITE_FINAL_FIX, holds="config.json")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def parse_training_arguments(parser: Any, argv: Sequence[str] | None = None) -> tuple:
    """A TRL parser's dataclasses from `argv` (default: the command line) and its `--config`. Where torch sees no
    GPU or other accelerator and `--use_cpu` is not given, `--use_cpu true` is added, so a recipe runs where it is
    (bf16 autocast on the CPU) instead of stopping at transformers' bf16 check (TRL's SFTConfig sets bf16)."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    argv = list(sys.argv[1:] if argv is None else argv)
    accelerator = (torch.cuda.is_available() or is_torch_bf16_gpu_available() or is_torch_xla_available()
                   or torch.backends.mps.is_available())
    if not accelerator and not any(a == "--use_cpu" or a.startswith("--use_cpu=") for a in argv):
        argv += ["--use_cpu", "true"]
    return parser.parse_args_and_config(argv)


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
