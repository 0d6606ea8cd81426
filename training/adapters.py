"""LoRA settings and the merged, Hub-ready save: shared by the Cell2Text recipe and the Cell2Sentence baseline, so
both train the same adapters on the same language model and save the same way."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import LoraConfig

# The merged model's folder under a run's output_dir, and the run's steps and best checkpoint saved beside it.
FINAL_DIR = "final"
TRAINING_STATE_FILE = "training_state.json"


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


def save_merged(trainer: Any, final_dir: str | Path, processing_class: Any, state: dict[str, Any]) -> Path:
    """Merge the trainer's LoRA adapters into the language model and save it with its processor (or tokenizer),
    plus `state` and the trainer's best checkpoint as training_state.json; the main process writes, all wait."""
    final_dir = Path(final_dir)
    if trainer.accelerator.is_main_process:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(final_dir)
        processing_class.save_pretrained(final_dir)
        state = {"global_step": trainer.state.global_step, "best_model_checkpoint": trainer.state.best_model_checkpoint,
                 "best_metric": trainer.state.best_metric, **state}
        (final_dir / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2))
    trainer.accelerator.wait_for_everyone()
    return final_dir

