"""Cell2Text configuration: a Geneformer-style gene encoder, a projector and a causal language model."""

from __future__ import annotations

import dataclasses
import difflib
import math

import torch
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .compatibility import PREPARED_ENCODER_KEY

# Geneformer V2-316M (arXiv 2509.24840): the architecture of the encoder used by the paper.
GENEFORMER_V2_316M = {
    "hidden_size": 1152,
    "num_hidden_layers": 18,
    "num_attention_heads": 18,
    "intermediate_size": 4608,
    "max_position_embeddings": 4096,
    "vocab_size": 20275,
    "hidden_act": "relu",
    "pad_token_id": 0,
}


# The schema-constrained choices with a temperature of their own in `field_temperatures` (the cell type has
# `cell_type_temperature`).
FIELD_TEMPERATURE_CHOICES = ("tissue", "donor", "pathway_1", "pathway_2")


def hidden_state_index(layer: int, num_layers: int) -> int:
    """A `gene_encoder_layer` as a non-negative index into hidden_states (embeddings + one entry per layer)."""
    return layer % (num_layers + 1)


def check_prepared_encoder_layer(gene_encoder_layer: int, gene_encoder_config) -> None:
    """Refuse reading an encoder prepared on a corpus (`PREPARED_ENCODER_KEY`) at another hidden state than the one
    it was trained to be read at: the projector would read states it was not trained on. Checked where a model is
    composed (before its parts load) and wherever a config is built, so an edited config.json is refused too."""
    prepared = getattr(gene_encoder_config, PREPARED_ENCODER_KEY, None) or {}
    trained, num_layers = prepared.get("feature_layer"), gene_encoder_config.num_hidden_layers
    if trained is not None and hidden_state_index(gene_encoder_layer, num_layers) != hidden_state_index(
            trained, num_layers):
        raise ValueError(
            f"gene_encoder_layer={gene_encoder_layer}, but the gene encoder was prepared on a corpus and trained to be "
            f"read at hidden state {trained} of its {num_layers} layer(s) (gene_encoder_config.{PREPARED_ENCODER_KEY}"
            ".feature_layer): the projector would read states it was not trained on. Leave gene_encoder_layer (the "
            f"recipe's --gene_encoder_layer) unset when composing the model, or set it to {trained} in config.json.")


def check_dtype_name(value, where: str, auto: bool = False) -> None:
    """Refuse a dtype given by a name that is no torch dtype (nor "auto", where `auto`); `where`: the setting and
    where it was set. transformers failed on it with an AttributeError ("module 'torch' has no attribute 'bfloat'")
    or a message naming no valid name."""
    if isinstance(value, str) and not (auto and value == "auto") and not isinstance(getattr(torch, value, None),
                                                                                     torch.dtype):
        raise ValueError(f"{where} is {value!r}, which names no torch dtype: use float32, bfloat16 or float16"
                         + (" (or 'auto': the dtype saved with the weights)." if auto else "."))


class Cell2TextConfig(PreTrainedConfig):
    r"""
    Configuration of a [`Cell2TextForConditionalGeneration`].

    Args:
        gene_encoder_config (`BertConfig` or `dict`, *optional*):
            The gene encoder (Geneformer's architecture, a BERT). Defaults to Geneformer V2-316M's shape.
        text_config (`PreTrainedConfig` or `dict`, *optional*):
            Any causal language model's config (Llama, Qwen2, Gemma, GPT-2, ...). Defaults to `LlamaConfig()`.
        cell_token_id (`int`, *optional*):
            Token id of the cell placeholder that is overwritten by projected gene embeddings. Defaults to
            the last id of the text vocabulary (`text_config.vocab_size - 1`), which is where
            [`Cell2TextProcessor`] adds `<cell>` to a tokenizer whose vocabulary fills the embedding matrix.
        num_cell_tokens (`int`, defaults to 256):
            `top_k`: how many genes (in rank order) become soft tokens of the language model. Cells with fewer
            expressed genes give fewer tokens.
        gene_encoder_layer (`int`, defaults to -2):
            Index into the encoder's hidden states whose output feeds the projector (-2: second-to-last layer, for a
            pretrained Geneformer). `Cell2TextForConditionalGeneration.from_pretrained_parts` sets it to the layer an
            encoder prepared on a corpus was trained at.
        projector_hidden_size (`int`, defaults to 2048):
            Width of the projector's hidden layer.
        projector_dropout (`float`, defaults to 0.1):
            Dropout in the projector.
        freeze_gene_encoder (`bool`, defaults to `True`):
            Whether the gene encoder's weights are frozen (no gradients, run under `torch.no_grad`).
        num_expression_bins (`int`, defaults to 0):
            The encoder's input: 0 for Geneformer's rank-value tokens (the paper's); B > 0 for value-aware tokens,
            each gene's per-cell expression bin (`gene_value_ids`, 1..B) entering the encoder as its BERT token
            type. Needs an encoder trained that way (`type_vocab_size` >= B + 1) and a feature extractor with the
            same `num_expression_bins`.
        cell_type_temperature (`float`, defaults to 1.0):
            Divides the candidate labels' log-likelihoods before the softmax that gives each cell's
            `cell_type_score` (temperature scaling; the chosen label does not change). The recipe fits it on the
            validation split; 1.0 is the model's own probability.
        field_temperatures (`dict`, *optional*):
            The temperature of each schema-constrained choice other than the cell type (`tissue`, `donor`,
            `pathway_1`, `pathway_2`): divides the options' log-likelihoods before the softmax that gives
            `<field>_score`. The recipe fits them on the validation split; a missing choice uses 1.0.
        gene_vocabulary_sha256 (`str`, *optional*):
            Checksum of the gene vocabulary (gene -> token id) of the processor the model was composed with
            (`from_pretrained_parts` records it, and `save_model_folder` where it is unset). A processor with another
            vocabulary is refused wherever the two meet (`compatibility.check_model_and_processor`).
        gene_ranking_sha256 (`str`, *optional*):
            Checksum of how the processor the model was saved with ranks genes (`compatibility.gene_ranking_sha256`:
            gene medians, special tokens; `save_model_folder` records it): a processor ranking otherwise is refused.
        processor_sha256 (`dict`, *optional*):
            Checksums of the processor the model was saved with besides its genes (`compatibility.processor_sha256`:
            its tokenizer's vocabulary, splitting and decoding, its prompt, its gene symbol table, its labels;
            `save_model_folder` records them): a processor differing in any is refused (a subset of the labels chosen with
            `Cell2TextProcessor.keep_labels` is not).
        weights_id (`str`, *optional*):
            The id of the save that wrote config.json, which `save_pretrained` writes into each safetensors weight
            file's header metadata too: `from_pretrained` refuses weight files of another save (another run's
            weights of the same shapes beside this config and processor). None for a model saved before, whose
            weight files hold none either (a file holding one is refused).
        training_corpus_fingerprints (`dict`, *optional*):
            The fingerprints of the corpus splits the model was trained on (`training.sft` records them): evaluating
            on another build of a corpus (another seed or fold: its test cells may be training cells) is refused
            unless asked for (`training.evaluation.evaluate --other-corpus`).
        earlier_training_corpus_fingerprints (`list`, *optional*):
            Those of the corpora a model fine-tuned with `init_from` was trained on before (its parents'), so that the
            record says every corpus it learnt from; evaluation warns that their cells may be in the test split.
        training_suspension_types (`dict`, *optional*):
            The training corpus's kept cells per CELLxGENE obs `suspension_type` ("cell", "nucleus"; its summary.json
            `suspension_types`, which `training.sft` records, adding a parent's where fine-tuned with `init_from`):
            `tl.describe` and the CLI warn where obs holds nuclei and the model saw none, or cells and it saw none.
            None (or empty) where unknown: a model trained before it was recorded, or on a corpus without the column.
    """

    model_type = "cell2text"
    sub_configs_defaults = {
        "gene_encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", init_kwargs=GENEFORMER_V2_316M),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    gene_encoder_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    cell_token_id: int | None = None
    num_cell_tokens: int = 256
    gene_encoder_layer: int = -2
    projector_hidden_size: int = 2048
    projector_dropout: float = 0.1
    freeze_gene_encoder: bool = True
    num_expression_bins: int = 0
    cell_type_temperature: float = 1.0
    field_temperatures: dict | None = None
    gene_vocabulary_sha256: str | None = None
    gene_ranking_sha256: str | None = None
    processor_sha256: dict | None = None
    weights_id: str | None = None
    training_corpus_fingerprints: dict | None = None
    earlier_training_corpus_fingerprints: list | None = None
    training_suspension_types: dict | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "Cell2TextConfig":
        """`PreTrainedConfig.from_dict`, refusing a saved config of another model_type (or none), and one without
        its parts' configs: the defaults would build full-size parts (a 7B Llama, Geneformer V2-316M) with random
        weights instead of the saved model; one that holds no JSON object (a list ended in an AttributeError)."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"This config.json holds a JSON {type(config_dict).__name__}, not an object: restore it "
                             "from the model's source, or save the model again with save_pretrained.")
        if config_dict.get("model_type") != cls.model_type:  # transformers only warns, and loads it as Cell2Text's
            raise ValueError(
                f"This config.json says model_type {config_dict.get('model_type')!r}, not {cls.model_type!r}: it is "
                "not a Cell2Text config, or its model_type was edited (transformers' Auto classes and pipeline() "
                "would read it as that model's). Restore \"model_type\": \"cell2text\" in config.json, or load the "
                "folder with that model's classes.")
        missing = [name for name in cls.sub_configs_defaults if not config_dict.get(name)]
        if missing:
            raise ValueError(
                f"This Cell2Text config.json has no {' or '.join(missing)}: loading it would build default full-size "
                "parts with random weights instead of the saved model. Restore the field from the model's original "
                "config.json, or save the model again with save_pretrained."
            )
        settings = [field.name for field in dataclasses.fields(cls)]
        misspelt = {key: close[0] for key in config_dict if key not in settings
                    and (close := difflib.get_close_matches(key, settings, n=1, cutoff=0.85))
                    and close[0] not in config_dict}
        if misspelt:  # the setting meant is absent, so its default would be in force
            raise ValueError(
                "This config.json names " + ", ".join(f"{key!r} (did you mean {meant!r}?)" for key, meant in
                                                      misspelt.items()) + ", which no Cell2Text setting is, and "
                "lacks the setting it resembles: its default would be in force. Fix the name in config.json.")
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict:
        """`PreTrainedConfig.to_dict` without `custom_pipelines`: only `Cell2TextPipeline.save_pretrained`, which saves
        the pipeline's code beside it, writes that entry, so a folder never names code it does not hold (a model
        loaded from a complete folder and saved alone is a plain model folder). Nor the folders the parts were
        loaded from (the sub-configs' `_name_or_path`): a saved model carries no path of the machine it was built on
        to the Hub. Where `auto_map` names the causal LM class, it names the base model for `AutoModel` too (as this
        package registers both), so `AutoModel.from_pretrained(folder, trust_remote_code=True)` works without it."""
        output = super().to_dict()
        output.pop("custom_pipelines", None)
        auto_map = output.get("auto_map") or {}
        if "AutoModelForCausalLM" in auto_map and "AutoModel" not in auto_map:  # the base model too, as registered
            module = auto_map["AutoModelForCausalLM"].rsplit(".", 1)[0]
            output["auto_map"] = {**auto_map, "AutoModel": f"{module}.Cell2TextModel"}
        for name in self.sub_configs_defaults:
            if isinstance(output.get(name), dict):
                output[name].pop("_name_or_path", None)
        return output

    def __post_init__(self, **kwargs):
        check_dtype_name(self.dtype, "dtype in config.json")
        for name in self.sub_configs_defaults:  # a part's dtype, read as its config is built
            part = getattr(self, name)
            for key in ("dtype", "torch_dtype"):
                check_dtype_name(part.get(key) if isinstance(part, dict) else None, f"{name}.{key} in config.json")
        super().__post_init__(**kwargs)
        if self.cell_token_id is None:
            self.cell_token_id = self.text_config.vocab_size - 1
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self.validate_cell2text()

    def validate_cell2text(self) -> None:
        """Check the Cell2Text-specific fields; raises `ValueError` naming the field to fix."""
        for name in ("num_cell_tokens", "gene_encoder_layer", "projector_hidden_size", "num_expression_bins",
                     "cell_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}); fix config.json.")
        for name in ("projector_dropout", "cell_type_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}); fix config.json.")
        if not isinstance(self.freeze_gene_encoder, bool):  # "false" froze the encoder: a non-empty string is true
            raise ValueError(f"freeze_gene_encoder must be true or false, got {self.freeze_gene_encoder!r} "
                             f"({type(self.freeze_gene_encoder).__name__}); fix config.json.")
        self._validate_records()
        if self.projector_hidden_size < 1:
            raise ValueError(f"projector_hidden_size must be >= 1, got {self.projector_hidden_size}.")
        if self.num_cell_tokens < 1:
            raise ValueError(f"num_cell_tokens must be >= 1, got {self.num_cell_tokens}.")
        num_layers = self.gene_encoder_config.num_hidden_layers
        # hidden_states holds the embeddings plus one entry per layer.
        if not -(num_layers + 1) <= self.gene_encoder_layer <= num_layers:
            raise ValueError(
                f"gene_encoder_layer={self.gene_encoder_layer} is outside the encoder's hidden states "
                f"(valid: {-(num_layers + 1)}..{num_layers} for {num_layers} layers)."
            )
        check_prepared_encoder_layer(self.gene_encoder_layer, self.gene_encoder_config)
        if not 0 <= self.cell_token_id:
            raise ValueError(f"cell_token_id must be a non-negative token id, got {self.cell_token_id}.")
        if not 0 < self.cell_type_temperature < math.inf:  # infinity made every score 1 / (number of labels)
            raise ValueError(f"cell_type_temperature must be a finite number > 0, got {self.cell_type_temperature}.")
        if not isinstance(self.field_temperatures or {}, dict):
            raise ValueError(f"field_temperatures must be a mapping choice -> temperature, got "
                             f"{self.field_temperatures!r}; fix config.json.")
        for choice, temperature in (self.field_temperatures or {}).items():
            if choice not in FIELD_TEMPERATURE_CHOICES or isinstance(temperature, bool) or not isinstance(
                    temperature, (int, float)) or not 0 < temperature < math.inf:
                raise ValueError(f"field_temperatures[{choice!r}]={temperature!r}: expected a finite number > 0 for "
                                 f"one of {FIELD_TEMPERATURE_CHOICES}.")
        if not 0.0 <= self.projector_dropout < 1.0:
            raise ValueError(f"projector_dropout must be in [0, 1), got {self.projector_dropout}.")
        type_vocab_size = getattr(self.gene_encoder_config, "type_vocab_size", 0)
        if self.num_expression_bins < 0 or (self.num_expression_bins and type_vocab_size < self.num_expression_bins + 1):
            raise ValueError(
                f"num_expression_bins={self.num_expression_bins} needs a gene encoder with type_vocab_size >= "
                f"{self.num_expression_bins + 1} (bins enter as token types); this encoder has {type_vocab_size}. "
                "Use num_expression_bins=0 (rank-value tokens) with a pretrained Geneformer."
            )

    def _validate_records(self) -> None:
        """Refuse checksums of the processor the model was saved with that are not checksums (strings): a
        `processor_sha256` edited into a string was read as no parts at all (the processor went unchecked) and
        failed later with an AttributeError."""
        for name in ("gene_vocabulary_sha256", "gene_ranking_sha256", "weights_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a checksum string or null, got {value!r}; restore config.json "
                                 "saved with the model (save_model_folder records it).")
        parts = self.processor_sha256
        if parts is not None and (not isinstance(parts, dict) or not all(
                isinstance(key, str) and isinstance(value, str) for key, value in parts.items())):
            raise ValueError(f"processor_sha256 must be a mapping of each processor part to its checksum string, got "
                             f"{parts!r}; "
                             "restore config.json saved with the model (save_model_folder records it).")


__all__ = ["Cell2TextConfig"]
