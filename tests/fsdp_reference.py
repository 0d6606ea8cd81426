"""What `fsdp_step.py` (2 processes) and `test_fsdp.py` (1 process, the reference) share: the model, its LoRA and
the batch."""

from __future__ import annotations

from pathlib import Path

import scipy.sparse as sp
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "training" / "configs" / "accelerate" / "fsdp.yaml"
BATCH_CELLS = 8


def wrapped_layer_classes(config_file: Path) -> set[str]:
    """The layer classes an accelerate FSDP config wraps."""
    config = yaml.safe_load(Path(config_file).read_text())
    return {name.strip() for name in config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")}


def lora_model(model_dir: str):
    """The saved tiny model with the recipe's LoRA on every linear layer of the LM and the projector trained fully."""
    from peft import LoraConfig, get_peft_model

    from modeling_cell2text import Cell2TextForConditionalGeneration, Cell2TextProcessor
    from training.sft import language_model_lora_targets

    torch.manual_seed(0)
    model = Cell2TextForConditionalGeneration.from_pretrained(model_dir)
    model.config.projector_dropout = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the same arithmetic in every process
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=language_model_lora_targets(model),
                        modules_to_save=["multi_modal_projector"], init_lora_weights="gaussian")
    return get_peft_model(model, config), Cell2TextProcessor.from_pretrained(model_dir)


def step_batch(processor, part: int = 0, parts: int = 1):
    """Part `part` of `parts` of a fixed batch of 8 cells, all with the same description (so every part has as many
    labelled tokens and the mean of the parts' losses is the whole batch's)."""
    from test_pipeline import DESCRIPTION, GENES, random_counts

    counts = random_counts(BATCH_CELLS, seed=11)
    size = BATCH_CELLS // parts
    rows = counts[part * size : (part + 1) * size]
    return processor(sp.csr_matrix(rows), GENES, descriptions=[DESCRIPTION] * len(rows))
