"""Cell2Text: a gene encoder whose gene-level embeddings are projected into a causal LM as soft tokens.

Follows transformers' LLaVA layout (v5): `Cell2TextModel` holds `gene_encoder`, `multi_modal_projector` and
`language_model`; `Cell2TextForConditionalGeneration` adds `lm_head`. The cell placeholder tokens in
`input_ids` are replaced (masked_scatter) by the projected embeddings of each cell's top-ranked genes.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig, GenerationMixin,
                          PreTrainedModel)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import (CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME,
                                can_return_tuple, find_adapter_config_file, logging)

from .argument_types import is_integer_at_least, with_close_match
from .cell_inputs import CELL_INPUT_NAMES, CELL_ROW_KEYS
from .compatibility import (PREPARED_ENCODER_KEY, check_gene_vocabulary, gene_vocabulary_sha256, hub_kwargs,
                            saved_file)
from .configuration_cell2text import (Cell2TextConfig, check_dtype_name, check_prepared_encoder_layer,
                                     hidden_state_index)
from .text_padding import token_ids

logger = logging.get_logger(__name__)

# Weight files a model folder may hold that only pickle can read.
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def pickled_weights_message(source: Any, pickled_file: str) -> str:
    """Why a folder with pickled weights only is refused, and the one-off conversion."""
    return (
        f"{source!s} holds pickled weights ({pickled_file}) and no .safetensors file: Cell2Text loads safetensors "
        "only, since unpickling can run code. If you trust the file, convert it once: "
        "save_model_folder(Cell2TextForConditionalGeneration.from_pretrained(folder, use_safetensors=False), "
        "Cell2TextProcessor.from_pretrained(folder), new_folder) (from modeling_cell2text)."
    )
# Files (glob patterns) that do not belong in a Cell2Text folder of merged safetensors weights.
FOREIGN_WEIGHTS = ("adapter_config.json", "adapter_model.*", *PICKLED_WEIGHTS)


def foreign_weight_files(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` that do not belong beside merged safetensors weights (`FOREIGN_WEIGHTS`): an adapter
    would be applied on top of the weights when loaded, a pickle uploaded with them."""
    return sorted(path.name for name in FOREIGN_WEIGHTS for path in Path(folder).glob(name))


# New tokens a description may take (the demo's run to about 150): `generate`'s and the pipeline's default where
# nothing sets a length (transformers' default of 20 cut descriptions short).
DESCRIPTION_MAX_NEW_TOKENS = 160


def _encoder_states(encoder: nn.Module, read: int, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
    """The encoder's hidden state number `read` (0: the embeddings), running only the layers up to it for a plain
    BERT (Geneformer's architecture has nothing after its layers, so the layers above would be computed for nothing:
    one layer of 18 when the second-to-last is read); other encoders, and a BERT whose forward is replaced (by
    accelerate's hooks of a device map or offloading, or a wrapper), run whole and are indexed."""
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
    body = encoder._modules.get("encoder") if encoder.config.model_type == "bert" else None
    stack = body._modules.get("layer") if body is not None else None
    if not isinstance(stack, nn.ModuleList) or "forward" in vars(encoder) or "forward" in vars(body):
        return encoder(**inputs, output_hidden_states=True).hidden_states[read]
    return _first_layers_of(encoder, read)(**inputs, output_hidden_states=False).last_hidden_state


def _first_layers_of(bert: nn.Module, count: int) -> nn.Module:
    """A BERT that runs the first `count` layers of `bert`: new containers holding the same modules and parameters,
    nothing of `bert` changed (cutting its own layer list for the call gave a call from another thread the wrong
    layers, and a `save_pretrained` meanwhile a model without them)."""
    body = copy.copy(bert.encoder)
    body._modules = {**body._modules, "layer": body.layer[:count]}
    view = copy.copy(bert)
    view._modules = {**view._modules, "encoder": body}
    return view


def _refuse_adapter_files(pretrained_model_name_or_path: Any, kwargs: dict) -> None:
    """Refuse a model folder or repo that holds a model (config.json) and a PEFT adapter: transformers would apply
    the adapter on top of the merged weights without a word (a stale LoRA left by an earlier save moved every
    score), or, through the Auto classes given a repo id, load the base model the adapter names instead of the
    repo's own weights (another model, exit 0). An adapter alone loads as transformers loads it: its base model with
    the adapter on top."""
    # the Auto classes pass the base model the adapter names, and the adapter's repo in adapter_kwargs
    adapter_kwargs = kwargs.get("adapter_kwargs") or {}
    adapter_repo = adapter_kwargs.get("_adapter_model_path")
    if adapter_repo is not None and str(adapter_repo) != str(pretrained_model_name_or_path) and saved_file(
            adapter_repo, CONFIG_NAME, hub_kwargs(adapter_kwargs)) is not None:
        raise OSError(
            f"{adapter_repo!s} holds a model and a PEFT adapter (adapter_config.json) for the base model "
            f"{pretrained_model_name_or_path!s}: transformers would load that base model with the adapter on top, "
            f"not the weights of {adapter_repo!s}. A Cell2Text repo holds merged weights only (training.sft saves "
            "them merged): remove adapter_config.json and adapter_model.* from it, or, to apply an adapter on "
            "purpose, load its base model and call model.load_adapter(...)."
        )
    if pretrained_model_name_or_path is None:
        return
    hub = hub_kwargs(kwargs)
    folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
    if folder.is_dir():
        adapter_config = folder / "adapter_config.json" if (folder / "adapter_config.json").is_file() else None
    else:  # a Hub repo id (or a path that does not exist, which transformers reports as it does)
        adapter_config = find_adapter_config_file(str(pretrained_model_name_or_path), **hub)
    if adapter_config is not None and saved_file(pretrained_model_name_or_path, CONFIG_NAME, hub) is not None:
        raise OSError(
            f"{pretrained_model_name_or_path!s} holds a PEFT adapter ({Path(adapter_config).name}) beside the model "
            "weights, which transformers would apply on top of them silently. A Cell2Text folder holds merged "
            "weights only (training.sft saves them merged): remove adapter_config.json and adapter_model.* from "
            "it, or, to apply an adapter on purpose, load a folder without them and call model.load_adapter(...)."
        )


def weights_file_names(variant: str | None = None) -> tuple[str, str]:
    """(the whole weights file, the sharded weights' index) of a safetensors save, as transformers names them for
    `variant` (model.safetensors and model.safetensors.index.json without one)."""
    def with_variant(name: str) -> str:
        stem, extension = name.rsplit(".", 1)
        return f"{stem}.{variant}.{extension}" if variant else name

    return with_variant(SAFE_WEIGHTS_NAME), with_variant(SAFE_WEIGHTS_INDEX_NAME)


def _weights_layout(folder: str | os.PathLike, names: tuple[str, str]) -> str | None:
    """How a folder holds its safetensors weights (`names`: `weights_file_names`' of the save's variant): "whole",
    "sharded" (an index and its shards), "none", or None where it holds both (one left by an earlier save)."""
    whole, sharded = ((Path(folder) / name).is_file() for name in names)
    return None if whole and sharded else "whole" if whole else "sharded" if sharded else "none"


def _remove_weights(folder: str | os.PathLike, layout: str, names: tuple[str, str]) -> None:
    """Remove a folder's weights of `layout`: the whole file, or the index and the shards it names in the folder (a
    name holding a path, "../notes" or "/home/...", was another file, removed)."""
    folder = Path(folder)
    if layout == "whole":
        (folder / names[0]).unlink(missing_ok=True)
    elif layout == "sharded":
        index = folder / names[1]
        for shard in set(json.loads(index.read_text()).get("weight_map", {}).values()):
            if Path(shard).name == shard:
                (folder / shard).unlink(missing_ok=True)
        index.unlink(missing_ok=True)


def _refuse_two_weight_layouts(pretrained_model_name_or_path: Any, kwargs: dict) -> None:
    """Refuse a folder or repo holding its weights both whole (model.safetensors) and sharded (an index): saved
    twice in two layouts, transformers loads the whole file, which may be the earlier save (exit 0)."""
    if pretrained_model_name_or_path is None:
        return
    hub = hub_kwargs(kwargs)
    whole, index = weights_file_names(kwargs.get("variant"))
    if all(saved_file(pretrained_model_name_or_path, name, hub) is not None for name in (whole, index)):
        raise OSError(
            f"{pretrained_model_name_or_path!s} holds its weights twice, whole ({whole}) and sharded ({index} and "
            f"its shards): one is left from an earlier save, and transformers would load {whole} whichever it is. "
            "Remove the stale ones (from a Hub repo too), or save the model again to a new folder.")


# Generation settings by the type they take (None: unset; integers with their least value), checked by name where a
# wrong type ran silently (do_sample "false" sampled: a non-empty string is true; max_new_tokens true wrote one token)
# or failed late and unclearly.
INTEGER_SETTINGS = {"num_beams": 1, "num_return_sequences": 1, **dict.fromkeys((
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "top_k", "no_repeat_ngram_size"), 0)}
SWITCH_SETTINGS = ("do_sample", "use_cache", "renormalize_logits", "remove_invalid_values", "output_scores",
                   "output_logits", "output_attentions", "output_hidden_states", "return_dict_in_generate")
NUMBER_SETTINGS = ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "length_penalty", "max_time")


def generation_setting_names() -> set[str]:
    """The settings a generation config holds (`GenerationConfig`'s attributes, the bookkeeping keys a saved
    generation_config.json holds among them): the one list that the model folder's and the pipeline's checks of
    setting names read."""
    return set(GenerationConfig().to_dict())


def check_generation_settings(settings: dict, where: str) -> None:
    """Refuse a setting of `settings` (a generation_config.json's, a call's) whose value has the wrong type
    (`INTEGER_SETTINGS`, `SWITCH_SETTINGS`, `NUMBER_SETTINGS`), naming it and `where` it was set."""
    for name, value in settings.items():
        if value is None:
            continue
        if name in INTEGER_SETTINGS and not is_integer_at_least(value, INTEGER_SETTINGS[name]):
            expected = f"an integer >= {INTEGER_SETTINGS[name]}"
        elif name in SWITCH_SETTINGS and not isinstance(value, bool):
            expected = "true or false"
        elif name in NUMBER_SETTINGS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            expected = "a number"
        else:
            continue
        raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}) {where}: fix it there.")


def stop_at_end_of_text(model: PreTrainedModel, end_of_text_id: int | None) -> None:
    """Add the tokenizer's end of text (`end_of_text_id`, the token `Cell2TextProcessor._target_ids` ends every
    description with) to the ids `model` stops generating at (`generation_config.eos_token_id`). A composed model
    takes them from the LLM's config, which may name another token: free descriptions then ran past their end to the
    length limit. Composing for training (`training.sft.build_model`) and saving a model folder call it."""
    if end_of_text_id is None or int(end_of_text_id) in token_ids(model.generation_config.eos_token_id):
        return
    stops = model.generation_config.eos_token_id
    listed = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    model.generation_config.eos_token_id = [*listed, int(end_of_text_id)] if listed else int(end_of_text_id)


def _refuse_unreadable_generation_config(pretrained_model_name_or_path: Any, kwargs: dict) -> None:
    """Refuse a model folder's or repo's generation_config.json that does not read (transformers' own error:
    transformers falls back to a default generation config with only a log line, the folder's settings, e.g. its eos
    token and max_new_tokens, silently dropped), that names a key no generation setting is (transformers keeps it, or
    with `_from_model_config` drops it, and generation runs without it: `max_new_token` left the default length), or
    that gives a setting a value of the wrong type (`check_generation_settings`)."""
    if pretrained_model_name_or_path is None:
        return
    hub = hub_kwargs(kwargs)
    path = saved_file(pretrained_model_name_or_path, GENERATION_CONFIG_NAME, hub)
    if path is None:
        return
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        settings = {}  # transformers' own error names it below
    if isinstance(settings, dict):
        where = f"in the {GENERATION_CONFIG_NAME} of {pretrained_model_name_or_path!s}"
        known = generation_setting_names() | {"_commit_hash"}  # a key earlier transformers versions saved
        unknown = [with_close_match(key, known) for key in settings if key not in known]
        if unknown:
            raise ValueError(f"{', '.join(unknown)} {where}: no generation setting, so generation would run without "
                             "it. Fix the name there (the settings are GenerationConfig's), or remove it.")
        check_generation_settings(settings, where)
    else:  # a JSON list or null: transformers' "'list' object is not a mapping" traceback
        kind = "null" if settings is None else type(settings).__name__
        raise ValueError(f"the {GENERATION_CONFIG_NAME} of {pretrained_model_name_or_path!s} holds a JSON {kind}, "
                         "not an object: restore the file from the model's source or save the model again.")
    GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub)


# The safetensors dtypes of floating-point numbers: a Cell2Text checkpoint holds no other tensor.
FLOAT_WEIGHT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def saved_weight_files(pretrained_model_name_or_path: Any, kwargs: dict) -> list[str]:
    """The safetensors weight files of a folder or repo (whole, or the shards its index names), as local paths (a
    repo's in the Hub cache: run after the load, which downloaded them)."""
    hub = hub_kwargs(kwargs)
    whole, index = weights_file_names(kwargs.get("variant"))
    files = [saved_file(pretrained_model_name_or_path, whole, hub)]
    if files[0] is None:
        index_file = saved_file(pretrained_model_name_or_path, index, hub)
        shards = json.loads(Path(index_file).read_text()).get("weight_map", {}).values() if index_file else ()
        files = [saved_file(pretrained_model_name_or_path, shard, hub) for shard in sorted(set(shards))]
    return [str(file) for file in files if file is not None]


# The safetensors header metadata key holding the `weights_id` of the save that wrote the file (config.json holds it
# too): transformers writes {"format": "pt"} and reads nothing else there.
WEIGHTS_ID_KEY = "cell2text_weights_id"


def write_weights_id(path: str | os.PathLike, weights_id: str) -> None:
    """Write `weights_id` into the header metadata of the safetensors file `path` (`WEIGHTS_ID_KEY`): the header is
    written anew and the tensors' bytes copied after it unchanged (their offsets count from the header's end), into
    a file beside it that then replaces it (removed where writing fails: a full disk left a hidden copy of the
    weights behind)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.writing")
    try:
        with open(path, "rb") as source:
            length = int.from_bytes(source.read(8), "little")
            header = json.loads(source.read(length))
            header["__metadata__"] = {**(header.get("__metadata__") or {}), WEIGHTS_ID_KEY: weights_id}
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # the tensors stay 8-byte aligned, as safetensors writes them
            with open(temporary, "wb") as target:
                target.write(len(encoded).to_bytes(8, "little") + encoded)
                shutil.copyfileobj(source, target, 64 << 20)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _refuse_weights_of_another_save(pretrained_model_name_or_path: Any, files: list[str], config: Any) -> None:
    """Refuse weight files written by another save than config.json (`weights_id` there and in each file's header):
    another run's weights of the same shapes, dropped beside this run's config.json and processor, loaded and
    described every cell as that run's model, exit 0. A folder saved before ids were written (none in config.json,
    none in its files) loads; a file holding an id beside a config.json without one is refused (another run's
    weights dropped into a folder saved before ids loaded unchecked)."""
    expected = getattr(config, "weights_id", None)
    for file in files:
        with safe_open(file, framework="pt") as weights:
            found = (weights.metadata() or {}).get(WEIGHTS_ID_KEY)
        if found != expected:
            written_otherwise = (
                " If they are this model's weights, written by a tool that drops the id (safetensors' save_file, "
                "DeepSpeed's zero_to_fp32.py), load them with from_pretrained(..., weights_id=None) and save them "
                "with save_model_folder (or model.save_pretrained)." if found is None else "")
            raise OSError(
                f"The weights of {pretrained_model_name_or_path!s} ({Path(file).name}) were not written by the save "
                f"that wrote its config.json: weights id {found or 'none'} in the file, {expected or 'none'} in "
                "config.json. Weights of another save (another run's, or an earlier save's) were put beside this "
                "config.json and processor, and would describe cells as that model does. Copy a saved model folder "
                "whole (its config.json, weights and processor files together) or download the model again."
                + written_otherwise)


def _refuse_non_float_weights(pretrained_model_name_or_path: Any, files: list[str]) -> None:
    """Refuse a safetensors weights file (whole, or the shards its index names) holding a tensor that is no
    floating-point number (an integer or bool tensor: a corrupt conversion, or quantized weights without their
    quantization_config): transformers cast it into the model's floating-point parameter without a word, and every
    score moved, exit 0. Another floating-point dtype (float16 weights of a float32 model) holds the same numbers
    and loads. Run after the load, which resolved (and downloaded) the files."""
    found = {}
    for file in files:
        with safe_open(file, framework="pt") as weights:
            found.update({name: dtype for name in weights.keys()
                          if (dtype := weights.get_slice(name).get_dtype()) not in FLOAT_WEIGHT_DTYPES})
    if found:
        examples = ", ".join(f"{name} ({dtype})" for name, dtype in sorted(found.items())[:3])
        raise OSError(
            f"The weights of {pretrained_model_name_or_path!s} hold {len(found)} tensors that are no floating-point "
            f"numbers, e.g. {examples}: they would be cast into the model's weights as if they were. Download or "
            "save the model again (save_model_folder); quantized weights need the quantization_config they were "
            "saved with in config.json.")


def _refuse_unloaded_weights(pretrained_model_name_or_path: Any, loading_info: dict) -> None:
    """Refuse weights the checkpoint lacks (they would be random) or holds but the config has no place for (they
    would be dropped): a renamed tensor, a wrong `num_hidden_layers` or `tie_word_embeddings` in config.json."""
    problems = {
        "missing from the weights file (they would be randomly initialised)": loading_info["missing_keys"],
        "in the weights file but not in the model config.json describes (they would be ignored)":
            loading_info["unexpected_keys"],
    }
    found = [f"{len(keys)} {what}, e.g. {sorted(keys)[:3]}" for what, keys in problems.items() if keys]
    if found:
        raise OSError(
            f"The weights of {pretrained_model_name_or_path!s} do not match its config.json: " + "; ".join(found)
            + ". Download or save the model again (save_model_folder), or restore the config.json saved with these "
            "weights. To load it anyway and inspect the keys, pass output_loading_info=True."
        )


@dataclass
class Cell2TextModelOutputWithPast(BaseModelOutputWithPast):
    """Language-model outputs plus the projected cell features that were scattered into the prompt."""

    cell_features: torch.FloatTensor | None = None


@dataclass
class Cell2TextCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Causal-LM outputs plus the projected cell features."""

    cell_features: torch.FloatTensor | None = None


class Cell2TextMultiModalProjector(nn.Module):
    """Per-gene projector (arXiv 2509.24840): Linear -> LayerNorm -> GELU -> Dropout -> Linear -> LayerNorm."""

    def __init__(self, config: Cell2TextConfig):
        super().__init__()
        encoder_width = config.gene_encoder_config.hidden_size
        text_width = config.text_config.hidden_size
        self.linear_1 = nn.Linear(encoder_width, config.projector_hidden_size)
        self.norm_1 = nn.LayerNorm(config.projector_hidden_size)
        self.act = ACT2FN["gelu"]
        self.dropout = nn.Dropout(config.projector_dropout)
        self.linear_2 = nn.Linear(config.projector_hidden_size, text_width)
        self.norm_2 = nn.LayerNorm(text_width)

    def forward(self, gene_features: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.act(self.norm_1(self.linear_1(gene_features))))
        return self.norm_2(self.linear_2(hidden))


class Cell2TextPreTrainedModel(PreTrainedModel):
    config_class = Cell2TextConfig
    config: Cell2TextConfig
    base_model_prefix = "model"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["Cell2TextMultiModalProjector"]

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, Cell2TextMultiModalProjector):
            for linear in (module.linear_1, module.linear_2):
                nn.init.normal_(linear.weight, mean=0.0, std=std)
                nn.init.zeros_(linear.bias)
            for norm in (module.norm_1, module.norm_2):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, reading safetensors weights only unless `use_safetensors=False` is
        passed (a pickle can run code; the user opts in; None reads safetensors only too), with one-line errors for a folder holding only pickled
        weights and for a truncated or corrupt weights file (`SafetensorError`: a bad header, a short file).

        Stricter than transformers where it would give a silently different model: weights missing from the file
        or left over by the config (transformers initialises or drops them with a log line), weights that are no
        floating-point numbers (transformers casts them into the parameters), a PEFT adapter
        beside the weights (transformers applies it), weights written by another save than config.json (`weights_id`,
        `save_pretrained`) and a generation_config.json naming an unknown setting or giving
        one a value of the wrong type (generation ran without it, or with "false" read as true) are refused.
        `output_loading_info=True` returns the loading info instead of refusing the weights, for whoever wants to
        inspect a mismatched checkpoint."""
        if kwargs.get("use_safetensors") is None:  # None (transformers' default) unpickled a lone pytorch_model.bin
            kwargs["use_safetensors"] = True  # and skipped the weights checks below
        for key in ("dtype", "torch_dtype"):
            check_dtype_name(kwargs.get(key), f"{key} passed to from_pretrained", auto=True)
        _refuse_adapter_files(pretrained_model_name_or_path, kwargs)
        _refuse_two_weight_layouts(pretrained_model_name_or_path, kwargs)
        # before transformers' load, which fails on some settings unclearly (max_new_tokens "abc": a TypeError)
        _refuse_unreadable_generation_config(pretrained_model_name_or_path, kwargs)
        wants_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except SafetensorError as err:
            raise OSError(
                f"The weights of {pretrained_model_name_or_path!s} could not be read: the safetensors file is "
                f"truncated or corrupt ({err}). Download or save the model again."
            ) from err
        except RuntimeError as err:  # a size in config.json (vocab_size, hidden_size) that the weights do not have
            if "mismatched_sizes" not in str(err):
                raise
            _, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **{**kwargs, "ignore_mismatched_sizes": True})  # to name them
            mismatched = [f"{key} {tuple(saved)} in the weights, {tuple(expected)} by config.json"
                          for key, saved, expected in info.get("mismatched_keys", [])]
            raise OSError(
                f"The weights of {pretrained_model_name_or_path!s} do not match the sizes its config.json gives "
                f"({len(mismatched)} tensors, e.g. {'; '.join(mismatched[:2])}). Restore the config.json saved with "
                "these weights, or download or save the model again."
            ) from err
        except OSError as err:
            pickled = [name for name in PICKLED_WEIGHTS if (Path(pretrained_model_name_or_path) / name).is_file()]
            if not (kwargs["use_safetensors"] and pickled):
                raise
            raise OSError(pickled_weights_message(pretrained_model_name_or_path, pickled[0])) from err
        if pretrained_model_name_or_path is not None and kwargs["use_safetensors"]:
            files = saved_weight_files(pretrained_model_name_or_path, kwargs)
            _refuse_weights_of_another_save(pretrained_model_name_or_path, files, model.config)
            if getattr(model.config, "quantization_config", None) is None:
                _refuse_non_float_weights(pretrained_model_name_or_path, files)
        model.config._commit_hash = _loaded_commit(pretrained_model_name_or_path, kwargs)
        _name_subfolder(model, pretrained_model_name_or_path, kwargs.get("subfolder"))
        if wants_loading_info:
            return model, loading_info
        _refuse_unloaded_weights(pretrained_model_name_or_path, loading_info)
        return model


    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, binding the weights to config.json: a new `weights_id` goes into
        config.json and into the header metadata of each safetensors file written (`write_weights_id`), and
        `from_pretrained` refuses weight files of another save; weights saved earlier in the other layout (whole or
        sharded), which transformers leaves beside, are removed. Only the rank that writes (`should_save_on_this_rank`)
        writes ids; with `distributed_checkpoint=True`, which writes no safetensors file here, none gets the id (an
        earlier save's file is refused beside the new config.json); an adapter (`add_adapter`) is saved alone, without
        an id. `push_to_hub=True` is refused (the weights would be uploaded before their id is written): save, then
        upload the folder (or call `model.push_to_hub(repo_id)`)."""
        if kwargs.get("push_to_hub"):
            raise ValueError("save the model locally, then upload the folder (huggingface_hub's upload_folder, or "
                             "python -m hub_cards.publish for a whole Cell2Text folder), or call "
                             "model.push_to_hub(repo_id): push_to_hub=True here would upload the weights before "
                             "their weights_id is written.")
        if getattr(self, "_hf_peft_config_loaded", False):  # transformers writes the adapter alone, no config.json:
            return super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)  # no id
        self.config.weights_id = uuid.uuid4().hex
        names = weights_file_names(kwargs.get("variant"))
        earlier = _weights_layout(save_directory, names)
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        # the process that wrote config.json and the weights: transformers writes on rank 0 alone where
        # torch.distributed runs (each rank calling with is_main_process=True wrote its own id into the files);
        # a transformers without should_save_on_this_rank wrote wherever is_main_process
        if getattr(self, "should_save_on_this_rank", lambda main: main)(is_main_process):
            if kwargs.get("distributed_checkpoint"):  # its weights are DCP files: those here are an earlier save's
                return
            if earlier is not None and _weights_layout(save_directory, names) is None:
                # saved whole over sharded weights, or the reverse: the earlier layout was left beside, and loaded
                _remove_weights(save_directory, earlier, names)
            for file in saved_weight_files(save_directory, {"variant": kwargs.get("variant")}):
                write_weights_id(file, self.config.weights_id)


def _loaded_commit(source: Any, kwargs: dict) -> str | None:
    """The Hub commit a model was loaded from (None for a local folder): transformers 5 resolves the revision but no
    longer records it, and the processor check and `tl`'s provenance record read it (`config._commit_hash`, which is
    not saved)."""
    from transformers.utils.hub import extract_commit_hash

    return extract_commit_hash(saved_file(source, CONFIG_NAME, hub_kwargs(kwargs)), None)


def _name_subfolder(model: PreTrainedModel, source: Any, subfolder: str | None) -> None:
    """Make a model loaded with `subfolder=` name where it came from: transformers names the folder or repo above
    it, so its processor was loaded from there and `tl`'s record named that folder and the checksum of its weights,
    not of those that ran. A local folder's `name_or_path` becomes the subfolder's path; a Hub repo keeps its id
    and `loaded_subfolder` names the subfolder (for the processor and the record)."""
    model.loaded_subfolder = subfolder or None
    if subfolder and Path(source, subfolder).is_dir():
        model.name_or_path = model.config.name_or_path = str(Path(source, subfolder))
        model.loaded_subfolder = None


class Cell2TextModel(Cell2TextPreTrainedModel):
    """Gene encoder + projector + language model (no LM head)."""

    def __init__(self, config: Cell2TextConfig):
        super().__init__(config)
        self.gene_encoder = AutoModel.from_config(config.gene_encoder_config, add_pooling_layer=False)
        self.multi_modal_projector = Cell2TextMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        if config.freeze_gene_encoder:
            self.gene_encoder.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def train(self, mode: bool = True) -> "Cell2TextModel":
        """Like `nn.Module.train`, but a frozen gene encoder stays in eval mode (no dropout on fixed features)."""
        super().train(mode)
        if self.config.freeze_gene_encoder:
            self.gene_encoder.eval()
        return self

    def get_gene_states(
        self,
        gene_input_ids: torch.LongTensor,
        gene_attention_mask: torch.Tensor | None = None,
        gene_token_mask: torch.Tensor | None = None,
        gene_value_ids: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's states at `config.gene_encoder_layer` (the ones the projector reads), shape (batch, genes,
        encoder width), and the mask of gene positions (bool, shape (batch, genes)).

        `gene_token_mask` marks gene positions (1) as opposed to special tokens and padding (0); when omitted,
        every attended position counts as a gene. `gene_value_ids` (value-aware models only) are the genes'
        expression bins, given to the encoder as token types. A cell without a gene position is refused.
        """
        bins = self.config.num_expression_bins
        if bins and gene_value_ids is None:
            raise ValueError(
                f"This model reads value-aware gene tokens (num_expression_bins={bins}): pass gene_value_ids, as its "
                "processor's feature extractor (num_expression_bins > 0) returns them."
            )
        if not bins and gene_value_ids is not None:
            raise ValueError(
                "gene_value_ids were given but this model reads rank-value tokens only (num_expression_bins=0): use "
                "a feature extractor with num_expression_bins=0, e.g. the model's own processor."
            )
        if gene_attention_mask is None:
            gene_attention_mask = torch.ones_like(gene_input_ids)
        if gene_token_mask is None:
            gene_token_mask = gene_attention_mask
        shapes = [t.shape for t in (gene_attention_mask, gene_token_mask, gene_value_ids) if t is not None]
        if any(shape != gene_input_ids.shape for shape in shapes):
            raise ValueError(
                f"gene_input_ids {tuple(gene_input_ids.shape)}, gene_attention_mask {tuple(gene_attention_mask.shape)}, "
                f"gene_token_mask {tuple(gene_token_mask.shape)} (and gene_value_ids) must have the same shape."
            )
        is_gene = gene_token_mask.bool()
        genes_per_cell = is_gene.sum(dim=1)
        if bool((genes_per_cell == 0).any()):
            empty = (genes_per_cell == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"Cells {empty[:10]} of the batch hold no gene token (only special tokens or padding): such a cell "
                "has nothing to describe. Leave cells without vocabulary genes out (the pipeline's "
                "skip_empty_cells=True does)."
            )
        frozen = self.config.freeze_gene_encoder
        read = hidden_state_index(self.config.gene_encoder_layer, self.config.gene_encoder_config.num_hidden_layers)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            gene_states = _encoder_states(self.gene_encoder, read, gene_input_ids, gene_attention_mask, gene_value_ids)
        return gene_states, is_gene

    def get_cell_features(
        self,
        gene_input_ids: torch.LongTensor,
        gene_attention_mask: torch.Tensor | None = None,
        gene_token_mask: torch.Tensor | None = None,
        gene_value_ids: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode cells and project their first `num_cell_tokens` gene embeddings (`get_gene_states`' arguments).

        Returns the projected features of all cells concatenated in order, shape (total_cell_tokens, text_width),
        and the number of cell tokens of each cell, shape (batch,).
        """
        gene_states, is_gene = self.get_gene_states(gene_input_ids, gene_attention_mask, gene_token_mask, gene_value_ids)
        selected = is_gene & (torch.cumsum(is_gene.long(), dim=1) <= self.config.num_cell_tokens)
        projector_dtype = self.multi_modal_projector.linear_1.weight.dtype
        cell_features = self.multi_modal_projector(gene_states[selected].to(projector_dtype))
        return cell_features, selected.sum(dim=1)

    def get_cell_embeddings(
        self,
        gene_input_ids: torch.LongTensor,
        gene_attention_mask: torch.Tensor | None = None,
        gene_token_mask: torch.Tensor | None = None,
        gene_value_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """One embedding per cell, shape (batch, encoder width): the mean over its gene positions of the encoder
        states the projector reads (`tl.embed` writes them to obsm)."""
        gene_states, is_gene = self.get_gene_states(gene_input_ids, gene_attention_mask, gene_token_mask, gene_value_ids)
        genes = is_gene.unsqueeze(-1).to(gene_states.dtype)
        return (gene_states * genes).sum(dim=1) / genes.sum(dim=1)

    def placeholder_positions(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Where the cell placeholders are: in `input_ids`, or, without them, as the placeholder's embedding in
        `inputs_embeds`."""
        if input_ids is not None:
            return input_ids == self.config.cell_token_id
        placeholder = self.get_input_embeddings()(
            torch.tensor(self.config.cell_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == placeholder).all(dim=-1)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, cell_token_counts: torch.Tensor
    ) -> torch.Tensor:
        """Mask of the cell placeholder positions (`placeholder_positions`); checks that every prompt has as many as
        its cell has features."""
        placeholder_mask = self.placeholder_positions(input_ids, inputs_embeds)
        placeholders_per_row = placeholder_mask.sum(dim=1)
        # One host sync per prefill (never in decoding steps, which carry no cells). Not `torch_compilable_check`:
        # TRANSFORMERS_DISABLE_TORCH_CHECK=1 turns that off, and this check keeps descriptions off the wrong cells.
        if placeholders_per_row.shape != cell_token_counts.shape or not torch.equal(
            placeholders_per_row, cell_token_counts.to(placeholders_per_row.device)
        ):
            raise ValueError(
                "Cell placeholder tokens and cell features do not match: placeholders per prompt "
                f"{placeholders_per_row.tolist()} (token id {self.config.cell_token_id}), cell tokens per cell "
                f"{cell_token_counts.tolist()} (config.num_cell_tokens={self.config.num_cell_tokens}). The processor "
                "must expand each cell to min(num_cell_tokens, genes in the cell) placeholders: build it with "
                "num_cell_tokens equal to the model's config.num_cell_tokens and the same cell token id."
            )
        return placeholder_mask

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        gene_input_ids: torch.LongTensor | None = None,
        gene_attention_mask: torch.Tensor | None = None,
        gene_token_mask: torch.Tensor | None = None,
        gene_value_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> Cell2TextModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        cell_features = None
        if gene_input_ids is not None:
            cell_features, counts = self.get_cell_features(
                gene_input_ids, gene_attention_mask, gene_token_mask, gene_value_ids
            )
            placeholder_mask = self.get_placeholder_mask(input_ids, inputs_embeds, counts)
            cell_features = cell_features.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(placeholder_mask.unsqueeze(-1), cell_features)
        elif self.placeholder_positions(input_ids, inputs_embeds).any():  # the bare placeholder would be read as a cell
            given = "input_ids hold cell placeholder tokens" if input_ids is not None else \
                "inputs_embeds hold the cell placeholder's embedding"
            raise ValueError(
                f"{given} (id {self.config.cell_token_id}) but no gene_input_ids were given: pass the processor's "
                "gene_input_ids, gene_attention_mask and gene_token_mask."
            )

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return Cell2TextModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cell_features=cell_features,
        )


class Cell2TextForConditionalGeneration(Cell2TextPreTrainedModel, GenerationMixin):
    """Cell2Text with a language-modelling head: writes a description of each cell."""

    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: Cell2TextConfig):
        super().__init__(config)
        self.model = Cell2TextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._tie_lm_head_to_input_embeddings()
        self.post_init()

    def _tie_lm_head_to_input_embeddings(self) -> None:
        """Declare `lm_head.weight` tied to the language model's input embeddings (whatever its module path), so
        `tie_word_embeddings` ties them and saving writes the shared tensor once. Called again whenever the
        language model is replaced."""
        self._tied_weights_keys = {"lm_head.weight": self._input_embedding_weight_name()}

    def _input_embedding_weight_name(self) -> str:
        embeddings = self.model.language_model.get_input_embeddings()
        for name, module in self.model.language_model.named_modules():
            if module is embeddings:
                return f"model.language_model.{name}.weight"
        raise ValueError("The language model's input embeddings are not one of its submodules.")

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs) -> nn.Embedding:
        """`PreTrainedModel.resize_token_embeddings`, refusing a size that would drop the cell placeholder's row."""
        if new_num_tokens is not None and new_num_tokens <= self.config.cell_token_id:
            raise ValueError(
                f"new_num_tokens={new_num_tokens} would drop the cell placeholder (token id "
                f"{self.config.cell_token_id}): keep at least {self.config.cell_token_id + 1} token embeddings."
            )
        return super().resize_token_embeddings(new_num_tokens, *args, **kwargs)

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        gene_input_ids: torch.LongTensor | None = None,
        gene_attention_mask: torch.Tensor | None = None,
        gene_token_mask: torch.Tensor | None = None,
        gene_value_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> Cell2TextCausalLMOutputWithPast:
        """Causal-LM forward. `labels` use -100 for positions without loss (prompt, placeholders, padding)."""
        outputs = self.model(
            input_ids=input_ids,
            gene_input_ids=gene_input_ids,
            gene_attention_mask=gene_attention_mask,
            gene_token_mask=gene_token_mask,
            gene_value_ids=gene_value_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return Cell2TextCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cell_features=outputs.cell_features,
        )

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, never emitting the cell placeholder: it only has meaning in the prompt. The
        placeholder is added to the suppressed tokens in effect (the call's, else its `generation_config`'s, else
        the model's). Where none of them sets a length (`max_new_tokens`, `max_length`), a description may take
        `DESCRIPTION_MAX_NEW_TOKENS`. Both go into a copy of a caller's `generation_config` where one is given
        (transformers deprecates a config passed with loose settings). The processor's row bookkeeping
        (`skip_empty_cells=True`: `cell_indices`, `skipped_cell_indices`) is not a model input and is left out, so
        `generate(**processor(...))` works with it."""
        for key in CELL_ROW_KEYS:
            kwargs.pop(key, None)
        check_generation_settings(kwargs, "in the call to generate")
        if len(args) > 1:  # generate(inputs, generation_config, ...) as transformers orders them: read them by name
            names = [name for name in inspect.signature(GenerationMixin.generate).parameters if name != "self"]
            for name, value in zip(names[1:], args[1:]):
                if name in kwargs:
                    raise TypeError(f"generate() got multiple values for argument {name!r}")
                kwargs[name] = value
            args = args[:1]
        given = kwargs.get("generation_config")

        def in_effect(name: str) -> Any:  # as transformers merges them: the call, its config, the model's config
            for source in (kwargs, vars(given) if given is not None else {}, vars(self.generation_config)):
                if source.get(name) is not None:
                    return source[name]
            return None

        if in_effect("prefill_chunk_size") and any(kwargs.get(name) is not None for name in CELL_INPUT_NAMES):
            raise ValueError("prefill_chunk_size splits the prompt, and the cells' features are read into their "
                             "placeholders in one prefill: leave prefill_chunk_size out when generating with cells.")
        settings = {"suppress_tokens": list(in_effect("suppress_tokens") or [])}
        if self.config.cell_token_id not in settings["suppress_tokens"]:
            settings["suppress_tokens"].append(self.config.cell_token_id)
        if in_effect("max_new_tokens") is None and in_effect("max_length") is None:
            settings["max_new_tokens"] = DESCRIPTION_MAX_NEW_TOKENS  # a whole description, not transformers' 20
        if given is None:
            kwargs.update(settings)
        else:
            kwargs.pop("suppress_tokens", None)
            kwargs["generation_config"] = copy.deepcopy(given)
            kwargs["generation_config"].update(**settings)
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """Pass the cell inputs while the KV cache holds nothing yet (the prefill, also an assistant model's);
        later steps read the cells from the cache. Without a cache (`use_cache=False`) every step re-reads the
        whole prompt, so the cells go with it."""
        cell_inputs = {name: kwargs.pop(name, None) for name in CELL_INPUT_NAMES}
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        cache_is_empty = cache is None or cache.get_seq_length() == 0
        if cache_is_empty or not kwargs.get("use_cache", True):
            model_inputs.update({k: v for k, v in cell_inputs.items() if v is not None})
        return model_inputs

    @classmethod
    def from_pretrained_parts(
        cls,
        gene_encoder_path: str | os.PathLike,
        text_model_path: str | os.PathLike,
        *,
        cell_token_id: int,
        feature_extractor: Any | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        **config_kwargs,
    ) -> "Cell2TextForConditionalGeneration":
        """Compose a model from a pretrained encoder folder and a pretrained causal LM folder (or Hub ids).

        `gene_encoder_path` is a Geneformer checkpoint (`config.json` + weights of a `BertForMaskedLM` or
        `BertModel`), or an encoder prepared on a corpus by `training/gene_encoder.py`; `text_model_path` any causal
        LM. The projector is newly initialised, its output scaled to the RMS of the LM's token embeddings. If
        `cell_token_id` is past the LM's vocabulary (a `<cell>` token the processor added), the embeddings are resized.

        `feature_extractor` (the processor's): its gene vocabulary is checked against the encoder's (size, and where
        it came from); a mismatch that would index the wrong gene embeddings raises `ValueError` naming the fix.
        An encoder prepared on a corpus is read at the hidden state it was trained at (`gene_encoder_layer` left
        unset); another layer raises `ValueError`. `trust_remote_code` is passed to the parts' Auto classes (off:
        no code from the folders runs). `config_kwargs` set the other `Cell2TextConfig` fields (num_cell_tokens,
        projector_hidden_size, ...).
        """
        encoder_config = AutoConfig.from_pretrained(gene_encoder_path, trust_remote_code=trust_remote_code)
        if feature_extractor is not None:
            check_gene_vocabulary(feature_extractor, encoder_config, str(gene_encoder_path))
            config_kwargs.setdefault("gene_vocabulary_sha256", gene_vocabulary_sha256(feature_extractor.gene_token_ids))
        else:
            logger.warning(
                "from_pretrained_parts without feature_extractor: the gene vocabulary is not checked against the gene "
                "encoder %s; pass the processor's feature extractor.", gene_encoder_path
            )
        config_kwargs = cls._layer_of_prepared_encoder(encoder_config, config_kwargs)
        gene_encoder = AutoModel.from_pretrained(
            gene_encoder_path, add_pooling_layer=False, dtype=dtype, trust_remote_code=trust_remote_code
        )
        causal_lm = AutoModelForCausalLM.from_pretrained(text_model_path, dtype=dtype,
                                                         trust_remote_code=trust_remote_code)
        if causal_lm.get_output_embeddings() is None:
            raise ValueError(f"{text_model_path} has no output embeddings (lm_head); pass a causal language model.")
        config = Cell2TextConfig(
            gene_encoder_config=encoder_config,
            text_config=causal_lm.config,
            cell_token_id=cell_token_id,
            **config_kwargs,
        )
        with torch.device("meta"):
            model = cls(config)
        model.model.gene_encoder = gene_encoder
        model.model.language_model = causal_lm.base_model
        model.lm_head = causal_lm.get_output_embeddings()
        projector = Cell2TextMultiModalProjector(config)
        model._init_weights(projector)
        model.model.multi_modal_projector = projector.to(dtype=causal_lm.dtype)
        if config.freeze_gene_encoder:
            model.model.gene_encoder.requires_grad_(False)
        model._tie_lm_head_to_input_embeddings()
        if config.tie_word_embeddings:
            model.lm_head.weight = model.get_input_embeddings().weight
        # The projector ends in a LayerNorm (unit RMS per soft token). Its gain starts at the RMS of the LM's token
        # embeddings, so soft tokens enter the LM at the scale of text tokens (SmolLM2: 0.13; Llama-3.2: 0.02).
        with torch.no_grad():
            text_embedding_rms = model.get_input_embeddings().weight.float().pow(2).mean().sqrt()
            model.model.multi_modal_projector.norm_2.weight.fill_(text_embedding_rms.item())
        vocab_size = model.get_input_embeddings().num_embeddings
        if cell_token_id >= vocab_size:
            model.resize_token_embeddings(cell_token_id + 1, mean_resizing=False)
        return model

    @staticmethod
    def _layer_of_prepared_encoder(encoder_config: Any, config_kwargs: dict) -> dict:
        """`config_kwargs` with `gene_encoder_layer` set to the layer a corpus-prepared encoder was trained at, where
        it is not given.

        `gene_encoder_layer=None` means unset (the config's default for a pretrained encoder).
        """
        config_kwargs = dict(config_kwargs)
        requested = config_kwargs.pop("gene_encoder_layer", None)
        prepared = getattr(encoder_config, PREPARED_ENCODER_KEY, None)
        if prepared is None or prepared.get("feature_layer") is None:
            if requested is not None:
                config_kwargs["gene_encoder_layer"] = requested
            return config_kwargs
        if requested is not None:  # refused here, before the parts' weights load, as the config would
            check_prepared_encoder_layer(requested, encoder_config)
        num_layers = encoder_config.num_hidden_layers
        in_range = requested is None or -(num_layers + 1) <= requested <= num_layers  # else the config refuses it
        config_kwargs["gene_encoder_layer"] = prepared["feature_layer"] if in_range else requested
        return config_kwargs


__all__ = [
    "PREPARED_ENCODER_KEY",
    "Cell2TextModel",
    "Cell2TextForConditionalGeneration",
    "Cell2TextPreTrainedModel",
    "check_gene_vocabulary",
    "gene_vocabulary_sha256",
]
