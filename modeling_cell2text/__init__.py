"""Cell2Text: describe single cells in natural language from their RNA-seq expression profile.

Importing this package registers the Cell2Text classes with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration_cell2text import Cell2TextConfig
from .description_schema import CellDescription, DescriptionParseError, parse_description, render_description
from .feature_extraction_cell2text import Cell2TextFeatureExtractor
from .modeling_cell2text import Cell2TextForConditionalGeneration, Cell2TextModel, Cell2TextPreTrainedModel
from .pipeline_cell2text import Cell2TextPipeline, register_cell2text_pipeline, save_model_folder
from .processing_cell2text import Cell2TextProcessor

AutoConfig.register(Cell2TextConfig.model_type, Cell2TextConfig, exist_ok=True)
AutoModel.register(Cell2TextConfig, Cell2TextModel, exist_ok=True)
AutoModelForCausalLM.register(Cell2TextConfig, Cell2TextForConditionalGeneration, exist_ok=True)
AutoFeatureExtractor.register(Cell2TextConfig, Cell2TextFeatureExtractor, exist_ok=True)
AutoProcessor.register(Cell2TextConfig, Cell2TextProcessor, exist_ok=True)

# `save_pretrained` writes `auto_map` and copies the code files, so the model loads with trust_remote_code=True
# where this package is not installed.
Cell2TextConfig.register_for_auto_class()
Cell2TextModel.register_for_auto_class("AutoModel")
Cell2TextForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
Cell2TextFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
Cell2TextProcessor.register_for_auto_class("AutoProcessor")
# `pipeline("cell-to-text", ...)`; `save_model_folder` / the pipeline's `save_pretrained` save it with the model
# (code + custom_pipelines).
register_cell2text_pipeline()

__all__ = [
    "save_model_folder",
    "Cell2TextConfig",
    "Cell2TextModel",
    "Cell2TextForConditionalGeneration",
    "Cell2TextFeatureExtractor",
    "Cell2TextProcessor",
    "Cell2TextPipeline",
    "Cell2TextPreTrainedModel",
    "CellDescription",
    "DescriptionParseError",
    "parse_description",
    "render_description",
]
