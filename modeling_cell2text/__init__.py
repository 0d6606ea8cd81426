"""Cell2Text: describe single cells in natural language from their RNA-seq expression profile.

Importing this package registers the Cell2Text classes with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_cell2text import Cell2TextConfig
from .description_schema import CellDescription, DescriptionParseError, parse_description, render_description
from .modeling_cell2text import Cell2TextForConditionalGeneration, Cell2TextModel, Cell2TextPreTrainedModel

AutoConfig.register(Cell2TextConfig.model_type, Cell2TextConfig, exist_ok=True)
AutoModel.register(Cell2TextConfig, Cell2TextModel, exist_ok=True)
AutoModelForCausalLM.register(Cell2TextConfig, Cell2TextForConditionalGeneration, exist_ok=True)

# `save_pretrained` writes `auto_map` and copies the code files, so the model loads with trust_remote_code=True
# where this package is not installed.
Cell2TextConfig.register_for_auto_class()
Cell2TextModel.register_for_auto_class("AutoModel")
Cell2TextForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "Cell2TextConfig",
    "Cell2TextModel",
    "Cell2TextForConditionalGeneration",
    "Cell2TextPreTrainedModel",
    "CellDescription",
    "DescriptionParseError",
    "parse_description",
    "render_description",
]
