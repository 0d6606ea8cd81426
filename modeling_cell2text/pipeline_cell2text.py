"""The `cell-to-text` pipeline: describe single cells (AnnData or expression rows) in natural language.

    from transformers import pipeline
    describe = pipeline("cell-to-text", model="path/or/repo", trust_remote_code=True)
    results = describe(adata, batch_size=16)  # one dict per cell: description, parsed fields, ontology IDs

This file travels as remote code with a saved model (its `config.json` names it in `custom_pipelines`), so it
imports only numpy, scipy, transformers (tqdm comes with transformers) and its sibling modules.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, GenerationConfig, GenerationMixin, LogitsProcessor,
                          LogitsProcessorList, Pipeline, StopStringCriteria)

from .argument_types import is_integer_at_least
from .cell_inputs import anndata_matrix, check_gene_ids_in_var_order, empty_cells_error, format_cells
from .compatibility import (KEPT_SUBSET_FIX, ModelProcessorMismatchError, check_labels, check_model_and_processor,
                            gene_ranking_sha256, gene_vocabulary_sha256, holds_kept_subset,
                            kept_subset, processor_sha256, recorded_gene_vocabulary_sha256, saved_file)
from .label_scoring import constrains, constrains_by_default
from .modeling_cell2text import (DESCRIPTION_MAX_NEW_TOKENS, check_generation_settings, foreign_weight_files,
                                 generation_setting_names, stop_at_end_of_text)
from .rank_value import as_csr
from .schema_decoding import DEFAULT_NUM_BEAMS, SchemaDecoder, known_labels, nan_logits_error, schema_results
from .text_padding import (before_end_of_text, check_outputs_line_up, ended_at_end_of_text, text_pad_token_id,
                           token_ids)

logger = logging.getLogger(__name__)

TASK = "cell-to-text"
# What loading a processor again from this module needs: its own copy runs as a folder's remote code only where the
# user trusted that code.
TRUSTED = {"trust_remote_code": True} if __name__.startswith("transformers_modules.") else {}
# Tokenizer and processor files of earlier transformers versions, which a save now writes none of but loading reads.
EARLIER_SAVE_FILES = ("special_tokens_map.json", "added_tokens.json", "chat_template.json")
# Cells ranked together: gene matching runs once per block, and a block of tokens stays small in memory.
MIN_BLOCK_CELLS = 512
MISSING_PROCESSOR = (
    "The cell-to-text pipeline needs the Cell2Text processor (gene vocabulary, tokenizer and prompt), but none was "
    "found with the model. Save it with the model: save_model_folder(model, processor, model_dir) (or "
    "processor.save_pretrained(model_dir) next to the model), or pass processor= to pipeline()."
)


def _raise_why_no_processor(model: Any) -> None:
    """transformers' `pipeline()` loads the processor and, where that fails, passes none: a processor saved with the
    model that does not fit it (`check_model_and_processor`) read as "none was found". Its own error is raised."""
    source = getattr(model, "name_or_path", None)
    # a repo loaded at another revision: its commit, which transformers records on the config (None for a folder)
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    subfolder = getattr(model, "loaded_subfolder", None)  # of a Hub repo (`modeling_cell2text._name_subfolder`)
    hub = {**({"revision": commit} if commit else {}), **({"subfolder": subfolder} if subfolder else {})}
    if source and saved_file(source, "processor_config.json", hub) is not None:
        from .processing_cell2text import Cell2TextProcessor

        Cell2TextProcessor.from_pretrained(source, **hub, **TRUSTED)  # raises what transformers' loader swallowed
    raise ValueError(MISSING_PROCESSOR)


def check_switches(**switches: Any) -> None:
    """Refuse an on/off option that is not True or False: a string such as "false" is true, so use_raw="false" read
    adata.raw instead of X, without a word."""
    for name, value in switches.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class DescribeOptions:
    """How `tl.describe`, `tl.describe_cells`, several-process describing and `cell2text describe` describe cells:
    the one list of their options (a new option is added here).

    `layer` / `use_raw`: where the counts are (a layer, `adata.raw`; default X); `input_values`: what they are
    (counts, normalized, log1p); `batch_size`: cells generated together; `constrained`: every field chosen among the
    corpus's labels (default: wherever the processor knows cell-type labels) or, False, the description written
    freely (greedy, `generate_kwargs`; `max_new_tokens`, default the model folder's generation config's, else 160: a
    description cut there gets parsed=False and no fields; constrained describing writes each description whole and
    takes no generation setting but `num_beams`);
    `skip_empty_cells`: leave cells without vocabulary genes out instead of stopping; `sort_by_length`: batch cells
    of similar length (less padding; float32 scores move in their last digits); `compile`: static KV cache and
    torch.compile for free decoding on a CUDA GPU (no effect elsewhere); `progress`: a tqdm bar; `cell_types`: choose
    the cell type among these of the model's labels (or their Cell Ontology ids) only (cells known to be of a few
    types; `keep_labels`), so `cell_type_score` is a probability among them (1.0 for one).
    """

    layer: str | None = None
    use_raw: bool = False
    input_values: str = "counts"
    batch_size: int = 16
    max_new_tokens: int | None = None
    constrained: bool | None = None
    skip_empty_cells: bool = False
    sort_by_length: bool = False
    compile: bool = False
    generate_kwargs: dict | None = None
    progress: bool = True
    cell_types: Sequence[str] | None = None

    def __post_init__(self) -> None:
        """`constrained` checked (0 ran free while the cell_types check saw no False, "false" ran constrained), as
        are the other switches ("false" read adata.raw, skipped empty cells) and `max_new_tokens` (2.5 ran), and
        `cell_types` kept as a tuple of distinct strings (what ran is what is recorded)."""
        if self.constrained is not None and not isinstance(self.constrained, (bool, np.bool_)):
            raise ValueError(f"constrained must be True, False or None (the default: wherever the processor knows "
                             f"cell-type labels), got {self.constrained!r}")
        check_switches(use_raw=self.use_raw, skip_empty_cells=self.skip_empty_cells,
                       sort_by_length=self.sort_by_length, compile=self.compile, progress=self.progress)
        tokens = self.max_new_tokens
        if tokens is not None and not is_integer_at_least(tokens, 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1 (or None: 160), got {tokens!r}")
        if self.generate_kwargs is not None and not isinstance(self.generate_kwargs, dict):
            raise ValueError(f"generate_kwargs takes a dict of generation settings, got {self.generate_kwargs!r}")
        config = (self.generate_kwargs or {}).get("generation_config")
        if config is not None and not isinstance(config, GenerationConfig):  # a dict ended in an AttributeError
            raise ValueError(f"generate_kwargs' generation_config must be a transformers GenerationConfig, got "
                             f"{type(config).__name__}: pass GenerationConfig(**settings), or the settings loose.")
        if tokens is not None and self.generate_kwargs:  # the generate_kwargs' one ran, the other was dropped unsaid
            given = {**(config.to_diff_dict() if config is not None else {}), **self.generate_kwargs}
            if "max_new_tokens" in given:
                raise ValueError(f"max_new_tokens is given twice, as max_new_tokens={tokens!r} and in generate_kwargs "
                                 f"({given['max_new_tokens']!r}): give it once.")
        if self.constrained is not None:
            object.__setattr__(self, "constrained", bool(self.constrained))
        if self.cell_types is None:
            return
        if isinstance(self.cell_types, (str, bytes)):
            raise ValueError(f"cell_types takes a list of cell-type labels, got the string {self.cell_types!r}: wrap "
                             "it, [label].")
        kept = tuple(dict.fromkeys(str(label) if isinstance(label, np.str_) else label for label in self.cell_types))
        if not kept:
            raise ValueError("cell_types is empty: name at least one of the model's cell-type labels, or leave it out.")
        if self.constrained is False:
            raise ValueError("cell_types chooses the cell type among labels, which free describing does not: leave "
                             "constrained=False out, or cell_types.")
        object.__setattr__(self, "cell_types", kept)

    @classmethod
    def from_keywords(cls, **keywords: Any) -> "DescribeOptions":
        """The options named by `keywords`; an unknown name is a ValueError listing the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise ValueError(f"Unknown describe option(s) {unknown}; the options are {sorted(known)}.")
        return cls(**keywords)

    def pipeline_generate_kwargs(
        self, constrained: bool, compiled: dict[str, Any], model_config: GenerationConfig | None = None
    ) -> dict[str, Any]:
        """The `generate_kwargs` a describe passes to the pipeline. Constrained: the caller's and `max_new_tokens`
        (the pipeline refuses the settings its decoder does not use, and says a length bound has no effect). Free:
        greedy (whatever the folder's generation_config.json says), `max_new_tokens` (160 unless a length is set, by the
        caller or by `model_config`, the model folder's generation config, as the pipeline reads it) and
        `compiled`'s static cache, each where the caller's settings, loose or in a `generation_config` (a copy of it
        then takes them), leave it unset: loose ones overrode a given config (160 tokens ran where it said 3, greedy
        where it sampled), and 160 overrode a folder's 400."""
        given = dict(self.generate_kwargs or {})
        if constrained:  # max_new_tokens passed on where set, for the pipeline to say it has no effect
            return given if self.max_new_tokens is None else {"max_new_tokens": self.max_new_tokens, **given}
        config = given.get("generation_config")
        set_by_caller = set(given) | (set(config.to_diff_dict()) if config is not None else set())
        lengths = {"max_new_tokens", "max_length"}
        set_by_folder = lengths & set(model_config.to_diff_dict()) if model_config is not None else set()
        defaults = {"do_sample": False, **compiled}
        if self.max_new_tokens is not None:
            defaults["max_new_tokens"] = self.max_new_tokens
        elif not lengths & (set_by_caller | set_by_folder):
            defaults["max_new_tokens"] = DESCRIPTION_MAX_NEW_TOKENS
        defaults = {name: value for name, value in defaults.items() if name not in set_by_caller}
        if config is None:
            return {**given, **defaults}
        config = copy.deepcopy(config)
        config.update(**defaults)
        return {**given, "generation_config": config}

    def record(self, model: Any, constrained: bool, compiled: bool, generate_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The parameters recorded in `uns` with the results (what was used, defaults resolved): `generate_kwargs`
        are those that ran (`pipeline_generate_kwargs`)."""
        config = generate_kwargs.get("generation_config")
        ran = {**model.generation_config.to_diff_dict(), **(config.to_diff_dict() if config is not None else {}),
               **generate_kwargs}
        return {
            "cell_types": None if self.cell_types is None else sorted(self.cell_types, key=str),
            "layer": self.layer, "use_raw": self.use_raw, "input_values": self.input_values,
            "batch_size": self.batch_size, "constrained": constrained,
            "max_new_tokens": None if constrained else ran.get("max_new_tokens"),  # as it ran (None: max_length's)
            "skip_empty_cells": self.skip_empty_cells, "sort_by_length": self.sort_by_length, "compile": compiled,
            "dtype": str(model.dtype), "generate_kwargs": json.dumps(self.generate_kwargs or {}, default=str),
        }


# The generation settings schema-constrained describing takes: what its decoder reads, what does not bear on it, the
# length bounds of free descriptions (a constrained one is written whole), and settings at the values it runs with.
CONSTRAINED_SETTINGS = {"num_beams", "pad_token_id", "transformers_version", "max_new_tokens", "max_length"}
CONSTRAINED_VALUES = {"do_sample": False, "num_return_sequences": 1}
# Generation settings that forbid or favour the end of text by length: refused in free describing
# (`_check_free_ending`), but a minimum at the length bound.
END_OF_TEXT_SETTINGS = ("min_new_tokens", "min_length", "exponential_decay_length_penalty")
# The pipeline's options of a call (`Cell2TextPipeline.__call__`'s own), which building the pipeline does not take.
CALL_OPTIONS = {"gene_ids", "sort_by_length", "progress", "rows"}


class Cell2TextPipeline(Pipeline):
    """Generate a description per cell and parse it into fields with ontology term IDs.

    Call with an AnnData (all cells or a slice; in memory or backed; `X`, a `layer=` or `use_raw=True` for
    `adata.raw`), a pandas DataFrame of cells x genes (genes from its columns, as `adata.to_df()` gives) or a
    cells x genes matrix (scipy sparse in any format, or numpy) with `gene_ids`. Returns one dict
    per input cell, in order: `description`, `parsed` (whether the text
    follows the description template), `cell_type`, `cell_type_definition`, `tissue`, `sex`, `disease`,
    `age_group`, `pathways` and `<field>_ontology_term_id` for cell_type, tissue, disease and sex. With
    `skip_empty_cells=True` cells that express no vocabulary gene give `None` instead of raising.

    Wherever the processor knows the training corpus's cell-type labels (`constrained=True`, the default then;
    `schema_decoding.py`), every field is chosen among the labels the processor learnt (each with its ontology id),
    the template words and the cell type's definition are written by the code, and every description parses;
    `<field>_score` is each chosen label's probability and `exact_choice` whether every label is proven the most
    likely of its options (False only where a search over a large label set was cut to a beam).
    `constrained=False` lets the model write the whole description freely (`cell_type_score` None); `num_beams`
    (default 2) sets the constrained search's width (partial options extended per cell and model call), the one generation
    setting constrained describing reads (others are refused, naming `constrained=False`, but the length bounds of
    free text, `max_new_tokens` and `max_length`: a constrained description is written whole). A free description
    that stops before the model ends it (cut at `max_new_tokens` or `max_time`, or at an `eos_token_id` or
    `stop_strings` other than the tokenizer's end of text) gets `parsed=False` and no fields (its text is kept), with
    one logged warning per call; NaN logits (an overflowing float16 model, NaN weights) raise FloatingPointError, as
    constrained.

    Cells are rank-value encoded a block at a time (vectorised) and generated `batch_size` cells at a time. Free
    generation is greedy with `max_new_tokens=160` unless the model's generation config, the pipeline's or the
    call's keyword arguments (or `generate_kwargs={...}`) say otherwise. One description per cell: a
    `num_return_sequences` other than 1 (from any of those) is refused, and every generated batch is checked to
    hold one sequence per cell, each starting with its own cell's prompt, before any text is returned.
    """

    _load_processor = None  # optional for transformers, so that a missing processor gets the error above
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _load_video_processor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=DESCRIPTION_MAX_NEW_TOKENS, do_sample=False)

    def __init__(self, *args: Any, **kwargs: Any):
        if kwargs.get("processor") is None:
            _raise_why_no_processor(kwargs.get("model"))
        super().__init__(*args, **kwargs)
        if self._num_workers is not None:  # Pipeline keeps it for a DataLoader this pipeline never builds: unused
            _refuse_unknown_generation_options({"num_workers": self._num_workers}, self.model)
        loaded_from = getattr(self.model, "name_or_path", "")
        self._model_name = loaded_from or "the model"
        check_model_and_processor(self.model.config, self.processor, self._model_name, saved=bool(loaded_from))
        self._generation_defaults.setdefault("pad_token_id", text_pad_token_id(self.processor.tokenizer))

    def _sanitize_parameters(
        self,
        layer: str | None = None,
        use_raw: bool | None = None,
        input_values: str | None = None,
        skip_empty_cells: bool | None = None,
        constrained: bool | None = None,
        constrain_cell_type: bool | None = None,
        generate_kwargs: dict | None = None,
        **generation_params: Any,
    ) -> tuple[dict, dict, dict]:
        preprocess_params = {}
        if layer is not None:
            preprocess_params["layer"] = layer
        if use_raw is not None:
            preprocess_params["use_raw"] = use_raw
        if input_values is not None:
            preprocess_params["input_values"] = input_values
        if skip_empty_cells is not None:
            preprocess_params["skip_empty_cells"] = skip_empty_cells
        if constrained is not None and constrain_cell_type is not None and constrained != constrain_cell_type:
            raise ValueError("constrain_cell_type is the former name of constrained: pass one of them.")
        constrained = constrained if constrained is not None else constrain_cell_type
        forward_params = {} if constrained is None else {"constrained": constrained}
        if generate_kwargs or generation_params:
            forward_params["generate_kwargs"] = {**(generate_kwargs or {}), **generation_params}
            _refuse_unknown_generation_options(forward_params["generate_kwargs"], self.model)
        return preprocess_params, forward_params, {}

    def __call__(
        self,
        cells: Any,
        gene_ids: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        sort_by_length: bool = False,
        progress: bool = False,
        rows: range | None = None,
        **kwargs: Any,
    ) -> list[dict | None]:
        """Describe every cell of `cells`; see the class docstring. `progress=True` shows a tqdm bar. `rows` (a
        range of rows, step 1) describes those cells only, one result each, reading no other rows (a process's share
        of a backed file stays streamed; a view of it was read into memory) and naming the input's rows in errors.

        This replaces `Pipeline.__call__`, which takes a list of items and batches them itself: here the input is
        one cells x genes matrix (or AnnData) whose rows are rank-value encoded a block at a time (`cell_batches`);
        `preprocess`, `forward` (with the base class's device handling) and `postprocess` run per batch as usual.

        `sort_by_length=True` generates the cells of each block longest first (by gene tokens, which set the prompt
        length), so a batch holds cells of similar length and pads little; results come back in the input order.
        Off by default: other batch neighbours change the padding, which in float32 can change the last digits of
        `cell_type_score` (and, in principle, a greedy choice between two tokens of equal likelihood).
        """
        if batch_size is None:
            batch_size = 8 if self._batch_size is None else self._batch_size
        if not is_integer_at_least(batch_size, 1):
            raise ValueError(f"batch_size must be an integer >= 1 (cells generated together), got {batch_size!r}")
        preprocess_params, forward_params, _ = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        forward_params = {**self._forward_params, **forward_params}
        self._check_one_sequence_per_cell(forward_params.get("generate_kwargs"))
        self._check_positions(forward_params.get("generate_kwargs"), forward_params.get("constrained"))
        self._check_free_ending(forward_params.get("generate_kwargs"), forward_params.get("constrained"))
        self._warn_unused_length(forward_params.get("generate_kwargs"), forward_params.get("constrained"))
        check_labels(self.model.config, self.processor, self._model_name)  # its tables may have changed since
        layer = preprocess_params.pop("layer", None)
        use_raw = preprocess_params.pop("use_raw", False)
        skip_empty = preprocess_params.pop("skip_empty_cells", False)
        check_switches(use_raw=use_raw, skip_empty_cells=skip_empty, sort_by_length=sort_by_length, progress=progress)
        matrix, gene_ids, obs_names = resolve_cells(self.processor.feature_extractor, cells, gene_ids, layer, use_raw)
        rows = checked_rows(rows, matrix.shape[0])
        results: list[dict | None] = [None] * len(rows)
        cut, max_new_tokens, max_time = 0, None, None
        # a share of the input (a process's, of several) says so: its bar ending at 512 read as 512 cells in all
        share = f" {rows.start + 1}-{rows.stop} of {matrix.shape[0]}" if 0 < len(rows) < matrix.shape[0] else ""
        with tqdm(total=len(rows), unit="cell", disable=not progress, desc=f"Describing cells{share}") as bar:
            for batch in cell_batches(self.processor.feature_extractor, matrix, gene_ids, obs_names, batch_size,
                                      skip_empty, preprocess_params, sort_by_length, bar, rows):
                model_outputs = self.forward(self.preprocess(batch.tokens, batch.bins), **forward_params)
                if "ended" in model_outputs:
                    cut += int((~model_outputs["ended"]).sum())
                    max_new_tokens, max_time = model_outputs["max_new_tokens"], model_outputs["max_time"]
                for row, output in zip(batch.rows, self.postprocess(model_outputs), strict=True):
                    results[row] = output
                bar.update(len(batch.rows))
        if cut:
            limit = "max_length" if max_new_tokens is None else f"max_new_tokens={max_new_tokens}"
            # max_time stops every row of a batch still writing, which reads as a cut at the length limit otherwise
            timed = ("", "") if max_time is None else (f" or max_time={max_time}s (a batch's)", " (or max_time)")
            logger.warning(
                "%d of %d free descriptions were cut before the model ended them (at %s%s, or at an eos_token_id or "
                "stop_strings set for generation): they are returned with parsed=False and no fields. To get them "
                "whole, pass a larger max_new_tokens%s.", cut, sum(r is not None for r in results), limit, *timed,
            )
        return results

    def _free_settings(self, generate_kwargs: dict | None) -> dict:
        """The generation settings free describing runs with (the call's, the pipeline's, the model's
        generation_config.json's and the pipeline's defaults, as `generate` will merge them)."""
        return self._get_set_generation_params(self._prepare_generate_kwargs(dict(generate_kwargs or {})))

    def _check_free_ending(self, generate_kwargs: dict | None, constrained: bool | None) -> None:
        """Refuse free-describing settings that move the end of text (`END_OF_TEXT_SETTINGS`; a `sequence_bias` or
        `bad_words_ids` sequence ending in, or `suppress_tokens` / `begin_suppress_tokens` holding, the tokenizer's
        end of text, which a description is trained to end with; another stop id moved is no harm, as a description
        stopped there is returned unparsed), from the call, the pipeline or the model's
        generation_config.json: a description ran on past its end and parsed with what followed in its last field
        (min_new_tokens=60: the tissue "blood of a healthy donor. It or.......... It or.. consists from the blood",
        exit 0), or never ended and was reported as cut, asking for a larger max_new_tokens (suppress_tokens), or ended
        before its later fields. Constrained describing refuses them as settings it does not use."""
        if self._constrains(constrained):
            return
        settings = self._free_settings(generate_kwargs)
        bounds = {"min_new_tokens": settings.get("max_new_tokens"), "min_length": settings.get("max_length")}
        # a minimum at the length bound is taken: no description ends at the end of text then, each is cut (unparsed)
        moved = [name for name in END_OF_TEXT_SETTINGS if settings.get(name)
                 and not (bounds.get(name) is not None and settings[name] >= bounds[name])]
        ends = {self.processor.tokenizer.eos_token_id}
        bias = settings.get("sequence_bias") or {}
        if any(value and ends & last_token_id(sequence)
               for sequence, value in (bias.items() if isinstance(bias, dict) else bias)):
            moved.append("sequence_bias (on the end of text)")
        bad_words = settings.get("bad_words_ids")
        if any(ends & last_token_id(sequence) for sequence in ([] if bad_words is None else bad_words)):
            moved.append("bad_words_ids (ending in the end of text)")
        moved += [f"{name} (the end of text)" for name in ("suppress_tokens", "begin_suppress_tokens")
                  if ends & token_ids(settings.get(name))]
        if moved:
            raise ValueError(
                f"{moved}: generation settings that move where a free description ends, so it could run on past its "
                "end or stop before its later fields and parse with fields the model did not write so. Leave them out "
                "(one the model's generation_config.json sets: remove it there, or pass it as None); max_new_tokens "
                "bounds the length, and a description cut there is returned unparsed (as every one is with "
                "min_new_tokens equal to max_new_tokens, which is taken, for timing).")

    def _warn_unused_length(self, generate_kwargs: dict | None, constrained: bool | None) -> None:
        """Say, once per call, that a length bound the caller set (`max_new_tokens`, `max_length`: the pipeline's, the
        call's or its `generation_config`'s) has no effect on schema-constrained describing, which writes each
        description whole: `max_new_tokens=3` gave the same whole descriptions without a word. The one owner of this
        warning, which `tl` and the CLI reach through `DescribeOptions.pipeline_generate_kwargs`."""
        if not self._constrains(constrained):
            return
        settings = self._constrained_settings(generate_kwargs)
        bounds = [f"{name}={settings[name]}" for name in ("max_new_tokens", "max_length") if name in settings]
        if bounds:
            logger.warning("%s bounds free descriptions (constrained=False) only: the schema-constrained decoder "
                           "writes each description whole, so it has no effect here.", " and ".join(bounds))

    def _check_one_sequence_per_cell(self, generate_kwargs: dict | None) -> None:
        """Refuse generation settings that return several sequences per cell (they would be zipped onto other
        cells), whether they come from the call, the pipeline or the model's generation_config.json, and a
        `num_beams` that is no integer >= 1 (free describing failed on it deep in generate: 0 a ZeroDivisionError)."""
        settings = self._free_settings(generate_kwargs)
        beams = settings.get("num_beams")
        if beams is not None and not is_integer_at_least(beams, 1):
            raise ValueError(f"num_beams must be an integer >= 1, got {beams!r}")
        sequences = settings.get("num_return_sequences")
        if sequences not in (None, 1):
            raise ValueError(
                f"num_return_sequences={sequences} (from the call or the model's generation_config.json): the "
                "cell-to-text pipeline returns one description per cell. Pass num_return_sequences=1; for several "
                "descriptions of the same cells, call the pipeline several times with do_sample=True."
            )

    def _check_positions(self, generate_kwargs: dict | None, constrained: bool | None) -> None:
        """Refuse a call whose longest prompt (the chat template with `num_cell_tokens` placeholders) and description
        (`max_new_tokens`, `max_length`; constrained: its longest, `SchemaDecoder.longest_description_tokens`) need
        more positions than the language model has (`text_config.max_position_embeddings`): past them a model with
        rotary positions wrote on at positions it was never trained at, exit 0 (learned positions have no embedding
        there). Once per call."""
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if not isinstance(limit, int):
            return
        cells = self.processor.num_cell_tokens
        prompt = len(self.processor._prompt_ids(cells))
        if self._constrains(constrained):
            settings = self._constrained_settings(generate_kwargs)
            beams = settings.get("num_beams")
            written = self.schema_decoder(DEFAULT_NUM_BEAMS if beams is None else int(beams)).longest_description_tokens
            need, description = prompt + written, f"the longest schema-constrained description (about {written} tokens)"
            fix = "use a model with fewer cell tokens (num_cell_tokens) or an LLM with more positions"
        else:
            settings = self._free_settings(generate_kwargs)
            if settings.get("max_new_tokens") is not None:
                need, description = prompt + settings["max_new_tokens"], f"max_new_tokens={settings['max_new_tokens']}"
            elif settings.get("max_length") is not None:  # prompt included
                need, description = settings["max_length"], f"the description up to max_length={settings['max_length']}"
            else:
                return
            fix = ("pass a smaller max_new_tokens, or use a model with fewer cell tokens (num_cell_tokens) or an LLM "
                   "with more positions")
        if need > limit:
            raise ValueError(
                f"The prompt ({prompt} tokens: the chat template and {cells} cell tokens) and {description} need "
                f"{need} positions, but the language model has {limit} (text_config.max_position_embeddings), and "
                f"past them it writes at positions it was not trained at: {fix}.")

    def preprocess(
        self, cell_tokens: Sequence[np.ndarray], cell_bins: Sequence[np.ndarray] | None = None, **kwargs: Any
    ) -> dict:
        """Model inputs (left-padded prompts and gene tokens) for a batch of rank-value encoded cells
        (with their expression bins for a value-aware model)."""
        return dict(self.processor(
            gene_input_ids=[np.asarray(t) for t in cell_tokens],
            gene_value_ids=None if cell_bins is None else [np.asarray(b) for b in cell_bins],
            return_tensors="pt",
        ))

    def _forward(self, model_inputs: dict, generate_kwargs: dict | None = None,
                 constrained: bool | None = None) -> dict:
        prompt_length = model_inputs["input_ids"].shape[1]
        if self._constrains(constrained):
            settings = self._constrained_settings(generate_kwargs)
            if settings.get("do_sample"):
                raise ValueError("Schema-constrained describing chooses each label by its likelihood and does not "
                                 "sample: pass do_sample=False, or constrained=False to sample free text.")
            model_settings = self.model.generation_config.to_dict()  # a copy of it, edited, is the usual way
            unused = sorted(name for name, value in settings.items() if name not in CONSTRAINED_SETTINGS
                            and not name.startswith("_")
                            and not (name in CONSTRAINED_VALUES and value == CONSTRAINED_VALUES[name])
                            and not (name in model_settings and value == model_settings[name]))
            if unused:  # they were accepted and did nothing (max_new_tokens=3 gave the same whole descriptions)
                raise ValueError(
                    f"{unused}: generation settings that schema-constrained describing does not use (it writes each "
                    "description whole, choosing every label by its likelihood; num_beams sets the search width). "
                    "Leave them out, or pass constrained=False to generate freely with them.")
            beams = settings.get("num_beams")  # an integer >= 1: checked in __call__ (`_check_one_sequence_per_cell`)
            decoder = self.schema_decoder(DEFAULT_NUM_BEAMS if beams is None else int(beams))
            return {"schema": decoder.describe(self.model, model_inputs)}
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}))
        generate_kwargs.setdefault("tokenizer", self.processor.tokenizer)  # for stop_strings, as text generation
        nan_check = NaNLogitsFlag()
        generate_kwargs["logits_processor"] = LogitsProcessorList([*(generate_kwargs.get("logits_processor") or []),
                                                                   nan_check])
        try:
            generated = self.model.generate(**model_inputs, **generate_kwargs)
        except RuntimeError as error:  # sampling from NaN probabilities fails inside generate (torch.multinomial)
            if nan_check.seen():
                raise nan_logits_error("the free description (constrained=False) cannot be written") from error
            raise
        if nan_check.seen():
            raise nan_logits_error("the free description (constrained=False) cannot be written")
        if not torch.is_tensor(generated):  # return_dict_in_generate: the sequences are the descriptions
            generated = generated.sequences
        check_outputs_line_up(model_inputs["input_ids"], generated)
        settings = self._get_set_generation_params(generate_kwargs)
        tokenizer = self.processor.tokenizer
        ended = ended_at_end_of_text(generated[:, prompt_length:], tokenizer.eos_token_id, settings.get("eos_token_id"))
        ended &= ~ends_at_a_stop_string(generated[:, prompt_length:], tokenizer, settings.get("stop_strings"))
        ended &= ~ended_by_forced_eos(generated[:, prompt_length:], tokenizer.eos_token_id, settings, prompt_length)
        return {"generated_ids": generated, "prompt_length": prompt_length, "ended": ended,
                "max_new_tokens": settings.get("max_new_tokens"), "max_time": settings.get("max_time")}

    def _constrained_settings(self, generate_kwargs: dict | None) -> dict:
        """The generation settings the caller asked for (the pipeline's and the call's; the model's generation config
        is written for free generation), those of a `generation_config` among them as if passed one by one."""
        settings = {**(getattr(self, "_generate_kwargs", None) or {}), **(generate_kwargs or {})}
        given = settings.pop("generation_config", None)
        return settings if given is None else {**given.to_diff_dict(), **settings}

    def _constrains(self, constrained: bool | None) -> bool:
        """Whether to describe with the schema decoder: by default where the processor knows cell-type labels; asked
        for where it knows none, free generation with a warning (there is nothing to choose among)."""
        knows_labels = constrains_by_default(self.processor)
        if constrained and not knows_labels and not getattr(self, "_warned_no_labels", False):
            logger.warning("constrained=True, but the processor knows no cell-type labels to choose among "
                           "(processor.ontology_term_ids['cell_type'] is empty): the descriptions are written freely.")
            self._warned_no_labels = True
        return constrains(self.processor, constrained)

    def schema_decoder(self, num_beams: int = DEFAULT_NUM_BEAMS) -> SchemaDecoder:
        """The processor's schema decoder, its options tokenized once per search width and set of labels (so a
        processor whose labels were changed gets a new one)."""
        key = (num_beams, repr(known_labels(self.processor)), repr(getattr(self.processor, "cell_type_definitions", {})))
        cached = self.__dict__.get("_schema_decoder")
        if cached is None or cached[0] != key:
            self._schema_decoder = (key, SchemaDecoder(self.processor, num_beams))
        return self._schema_decoder[1]

    def postprocess(self, model_outputs: dict, **kwargs: Any) -> list[dict]:
        if "schema" in model_outputs:
            return schema_results(self.processor, model_outputs["schema"])
        texts = self.processor.post_process_generation(model_outputs["generated_ids"], model_outputs["prompt_length"])
        ended = model_outputs.get("ended")
        results = self.processor.parse_descriptions(texts, None if ended is None else ended.tolist())
        return [{**result, "cell_type_score": None} for result in results]

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the model (with its code), its processor and this pipeline's code with its `custom_pipelines` entry:
        a complete Cell2Text folder, which `pipeline("cell-to-text", model=folder, trust_remote_code=True)` loads
        where this package is not installed, also when this pipeline itself was loaded as remote code. A model that
        records no gene vocabulary or gene ranking checksum gets its processor's; the processor checksums
        (`processor_sha256`) are taken anew from the processor saved, after checking those the model records, so a
        folder saved before a part was recorded gains it. The folder then refuses a processor that ranks genes,
        writes text or offers labels otherwise later (a subset of the labels chosen with
        `Cell2TextProcessor.keep_labels` fits; saving one is refused, as every user of the folder would describe
        cells among it). The labels are recorded only for a model composed in memory or whose folder recorded them:
        a model loaded from a folder saved before they were checked is left without (the processor given may not be
        the one it was trained with). Its generation config stops at the processor's end of text (`stop_at_end_of_text`)."""
        from transformers.dynamic_module_utils import custom_object_save

        if kwargs.get("push_to_hub"):
            raise ValueError("save the folder locally, then upload it whole (python -m hub_cards.publish --model "
                             "FOLDER --repo ID, or huggingface_hub's upload_folder): push_to_hub here would push the "
                             "model before its processor and pipeline code are written.")
        if getattr(self.model, "peft_config", None) or getattr(self.model, "_hf_peft_config_loaded", False):
            # checked before anything is written: the adapter files and code were written, then config.json failed
            raise ValueError("the model carries PEFT adapters, which a Cell2Text folder does not hold beside its "
                             "weights: merge them first (a PeftModel: model = model.merge_and_unload()), or save "
                             "the adapter alone with model.save_pretrained(...) and load it on this model's folder.")
        if holds_kept_subset(self.processor):  # every user of the folder would describe cells among the subset
            raise ValueError(f"the processor holds {kept_subset(self.processor)}, kept with keep_labels: every user "
                             f"of the folder would describe cells among those only. "
                             f"{KEPT_SUBSET_FIX[0].upper()}{KEPT_SUBSET_FIX[1:]}.")
        leftovers = foreign_weight_files(save_directory)
        if leftovers:
            raise FileExistsError(
                f"{save_directory!s} holds {leftovers}, which saving a Cell2Text folder would leave beside the new "
                "weights (an adapter would be applied on top of them when loaded, a pickle uploaded with them): "
                "remove those files or save to a new folder."
            )
        # the saver vouches for the pair it holds: the parts recorded are checked (a processor changed since the
        # pipeline was built), then the record is taken anew, with the parts a folder saved before them lacked
        check_model_and_processor(self.model.config, self.processor, self._model_name, saved=False)
        if recorded_gene_vocabulary_sha256(self.model.config) is None:  # composed without its processor: record it
            self.model.config.gene_vocabulary_sha256 = gene_vocabulary_sha256(
                self.processor.feature_extractor.gene_token_ids)
        if getattr(self.model.config, "gene_ranking_sha256", None) is None:
            self.model.config.gene_ranking_sha256 = gene_ranking_sha256(self.processor.feature_extractor)
        recorded = getattr(self.model.config, "processor_sha256", None) or {}
        checksums = processor_sha256(self.processor)
        if "labels" not in recorded and getattr(self.model, "name_or_path", ""):  # loaded, from a folder without them
            checksums.pop("labels")
        self.model.config.processor_sha256 = checksums
        stop_at_end_of_text(self.model, self.processor.tokenizer.eos_token_id)
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)  # leaves no earlier layout of the weights beside
        if kwargs.get("is_main_process", True):
            custom_object_save(self, save_directory)
            config_file = Path(save_directory) / "config.json"
            config = json.loads(config_file.read_text())
            config_file.write_text(json.dumps({**config, "custom_pipelines": custom_pipelines_entry()}, indent=2,
                                              sort_keys=True) + "\n")
            self.processor.save_pretrained(save_directory)
            self._check_processor_reads_back(save_directory)

    def _check_processor_reads_back(self, save_directory: str | os.PathLike) -> None:
        """Load the processor just saved, as a user will, and raise `OSError` where it does not fit the model: a
        folder saved over keeps files of the earlier save that transformers still reads beside the new ones (an
        eos token in special_tokens_map.json, tokens in added_tokens.json, a template in chat_template.json), so
        the save ended with exit 0 and every later load was refused as "another processor"."""
        try:
            type(self.processor).from_pretrained(save_directory, **TRUSTED)
        except ModelProcessorMismatchError as error:
            present = [name for name in EARLIER_SAVE_FILES if (Path(save_directory) / name).is_file()]
            leftovers = f"{present}, which an earlier save left" if present else "a file an earlier save left"
            raise OSError(
                f"The processor saved in {save_directory!s} does not read back as the one saved: the folder holds "
                f"{leftovers}, and transformers reads it beside the new files. Remove it and save again, or save to "
                f"a new folder. ({error})") from error


class NaNLogitsFlag(LogitsProcessor):
    """Records whether any generation step's scores held NaN (or +inf, which makes NaN probabilities): greedy
    decoding takes a NaN row's argmax as a token, so an overflowing model wrote an empty or garbage description for
    every cell. The flag stays on the scores' device (no host sync per step); `seen()` reads it once at the end."""

    def __init__(self) -> None:
        self.flag: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = (scores.isnan() | scores.isposinf()).any()
        self.flag = bad if self.flag is None else self.flag | bad
        return scores

    def seen(self) -> bool:
        return self.flag is not None and bool(self.flag)


def last_token_id(sequence: Any) -> set[int]:
    """The last token id of a token sequence (a bad word, a biased sequence) as a set (`token_ids`); none for a value
    that is no sequence (`bad_words_ids=[eos]`, a list of ids), which generate then refuses naming the form it takes
    (this check failed first, on "'int' object is not iterable")."""
    sequence = sequence.tolist() if hasattr(sequence, "tolist") else sequence
    return token_ids(sequence[-1:]) if isinstance(sequence, (list, tuple)) else set()


def ended_by_forced_eos(new_tokens: torch.Tensor, eos_token_id: int | None, settings: dict, prompt_length: int
                        ) -> torch.Tensor:
    """Per row of generated tokens (prompt removed), whether its end of text is the one `forced_eos_token_id` (a
    generation setting, from the call or a generation_config.json) writes on the last token the length limit allows:
    the description was cut there, not ended by the model (read as ended, one cut at a sentence's end parsed with its
    later fields missing). On the CPU."""
    rows, width = new_tokens.shape
    limit = settings.get("max_new_tokens")
    if limit is None and settings.get("max_length") is not None:
        limit = settings["max_length"] - prompt_length
    if settings.get("forced_eos_token_id") is None or eos_token_id is None or width == 0 or width != limit:
        return torch.zeros(rows, dtype=torch.bool)
    is_eos = new_tokens == eos_token_id
    return (is_eos[:, -1] & (is_eos.int().argmax(dim=1) == width - 1)).cpu()


def ends_at_a_stop_string(new_tokens: torch.Tensor, tokenizer: Any, stop_strings: str | Sequence[str] | None
                          ) -> torch.Tensor:
    """Per row of generated tokens (prompt removed), whether generation's `StopStringCriteria` stops it at its last
    token before its first end-of-text (a row stops at the step that completes a stop string, also where that
    token runs past it, so no model-ended text meets one). Rows that stopped are padded, with the end-of-text id
    where the tokenizer has no pad token, so `ended_at_end_of_text` alone reads such a row as ended. On the CPU."""
    rows = new_tokens.shape[0]
    if not stop_strings:
        return torch.zeros(rows, dtype=torch.bool)
    criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
    eos = tokenizer.eos_token_id
    stopped = []
    for row in new_tokens.cpu().tolist():
        text = before_end_of_text(row, eos)
        stopped.append(bool(text) and bool(criteria(torch.tensor([text]), None)[0]))
    return torch.tensor(stopped, dtype=torch.bool)


def resolve_cells(
    feature_extractor: Any, cells: Any, gene_ids: Sequence[str] | None, layer: str | None, use_raw: bool = False
) -> tuple[Any, Sequence[str], Sequence[str] | None]:
    """(row-sliceable matrix, gene IDs, obs names or None): the feature extractor's `resolve_input`, plus
    `adata.raw` (use_raw=True, genes from `adata.raw.var`) and sparse formats without row slicing (COO, DIA, ...)
    converted to CSR."""
    if use_raw:
        if layer is not None:
            raise ValueError(f"use_raw=True reads adata.raw.X; it cannot be combined with layer={layer!r}")
        if not hasattr(cells, "raw") or not hasattr(cells, "obs_names"):
            raise ValueError("use_raw=True applies to AnnData input only (it reads adata.raw.X)")
        if cells.raw is None:
            raise ValueError("use_raw=True but adata.raw is None; read X (leave use_raw out) or pass layer=...")
        if gene_ids is None:
            gene_ids = feature_extractor.var_gene_ids(cells.raw.var)
        else:
            check_gene_ids_in_var_order(gene_ids, cells.raw.var, "adata.raw.var", feature_extractor.symbol_to_gene)
        matrix, gene_ids, _ = feature_extractor.resolve_input(anndata_matrix(cells, raw=True), gene_ids, None)
        obs_names = cells.obs_names
    else:
        matrix, gene_ids, obs_names = feature_extractor.resolve_input(cells, gene_ids, layer)
    if sp.issparse(matrix) and matrix.format != "csr":
        matrix = matrix.tocsr()
    return matrix, gene_ids, obs_names


def rank_block(
    feature_extractor: Any,
    matrix: Any,
    gene_ids: Sequence[str],
    start: int,
    stop: int,
    obs_names: Sequence[str] | None,
    skip_empty: bool,
    params: dict,
) -> Any:
    """Rank-value encode rows [start, stop); cells without vocabulary genes raise unless skip_empty."""
    ranked = feature_extractor.tokenize(matrix[start:stop], gene_ids, skip_empty_cells=True, report_skipped=False,
                                        first_row=start, **params)
    if len(ranked.skipped_cells) and not skip_empty:
        raise empty_cells_error(ranked.skipped_cells, obs_names=obs_names, first_row=start)
    return ranked


@dataclass
class CellBatch:
    """One batch of rank-value encoded cells: their rows in the input, gene tokens and expression bins (None for a
    rank-only feature extractor)."""

    rows: list[int]
    tokens: list[np.ndarray]
    bins: list[np.ndarray] | None


def cell_batches(
    feature_extractor: Any,
    matrix: Any,
    gene_ids: Sequence[str],
    obs_names: Sequence[str] | None,
    batch_size: int,
    skip_empty: bool = False,
    rank_params: dict | None = None,
    sort_by_length: bool = False,
    bar: Any = None,
    rows: range | None = None,
) -> Iterator[CellBatch]:
    """The one loop over an input's cells in batches, for describing (the pipeline, tl, the CLI, the distributed
    describe) and embedding: rows are rank-value encoded a block at a time (`cells_per_block`), so memory stays
    bounded at any number of cells; cells without vocabulary genes raise unless `skip_empty` (they are then left out
    and counted on `bar`). `sort_by_length` takes each block's cells longest first. `rows` (default: all) are the
    rows read; batches' rows count from its first, errors name the input's."""
    rows = checked_rows(rows, matrix.shape[0])
    first_row, n_cells = rows.start, len(rows)
    block_cells = cells_per_block(batch_size)
    empty = cells_without_vocabulary_genes(feature_extractor, matrix, gene_ids, block_cells, rows)
    whole = n_cells if n_cells == matrix.shape[0] else None  # "(of N)" where N is every cell of the input
    if len(empty) and not skip_empty:
        raise empty_cells_error(empty, whole, obs_names, first_row)
    if len(empty):
        logger.warning("Skipping %d of %d cells that express no vocabulary gene: %s", len(empty), n_cells,
                       format_cells(empty, obs_names, first_row))
    for start in range(0, n_cells, block_cells):
        ranked = rank_block(feature_extractor, matrix, gene_ids, first_row + start,
                            first_row + min(start + block_cells, n_cells), obs_names, skip_empty, rank_params or {})
        if bar is not None:
            bar.update(len(ranked.skipped_cells))
        order = length_order(ranked.lengths) if sort_by_length else np.arange(len(ranked))
        for first in range(0, len(ranked), batch_size):
            positions = [int(p) for p in order[first : first + batch_size]]
            yield CellBatch(
                rows=[start + int(ranked.cell_indices[p]) for p in positions],
                tokens=[ranked[p] for p in positions],
                bins=None if ranked.value_bins is None else [ranked.bins_of(p) for p in positions],
            )


def cells_without_vocabulary_genes(feature_extractor: Any, matrix: Any, gene_ids: Sequence[str],
                                   block_cells: int, rows: range | None = None) -> np.ndarray:
    """Rows (of `rows`, counted from its first; default all) with no non-zero value in a gene of the vocabulary, in
    one cheap pass over the input before any cell is described: the ranking finds them a block at a time, after the
    blocks before had been generated (hours on an atlas) and, in an error, naming only that block's."""
    rows = checked_rows(rows, matrix.shape[0])
    columns = np.flatnonzero(feature_extractor.match_genes(gene_ids).column_tokens >= 0)
    empty = []
    for start in range(rows.start, rows.stop, block_cells):
        block = as_csr(matrix[start:min(start + block_cells, rows.stop)])[:, columns]  # a copy: zeros may be dropped
        block.eliminate_zeros()  # any other value (NaN, negative) is left for the value checks to name
        empty.append(start - rows.start + np.flatnonzero(block.getnnz(axis=1) == 0))
    return np.concatenate(empty) if empty else np.zeros(0, dtype=np.int64)


def checked_rows(rows: range | None, n_cells: int) -> range:
    """`rows` (None: every row of an input of `n_cells`), refused unless a range of step 1 within the input."""
    if rows is None:
        return range(n_cells)
    if not isinstance(rows, range) or rows.step != 1 or not 0 <= rows.start <= rows.stop <= n_cells:
        raise ValueError(f"rows must be a range(start, stop) of step 1 within the input's {n_cells} cells, got "
                         f"{rows!r}")
    return rows


def cells_per_block(batch_size: int) -> int:
    """Cells ranked (and, with sort_by_length, ordered) together; batches start at a block's first cell."""
    return max(MIN_BLOCK_CELLS, batch_size)


def length_order(lengths: np.ndarray) -> np.ndarray:
    """Positions longest first (ties in input order): batches taken in this order pad little, and the first batch
    is the largest, so running out of memory shows at once."""
    return np.argsort(-np.asarray(lengths), kind="stable")


def _refuse_unknown_generation_options(options: dict, model: Any) -> None:
    """Refuse keywords that are neither a pipeline option nor something `generate` takes (a generation setting, one
    of its arguments, the tokenizer `stop_strings` needs, a model input): the constrained decoder reads only the
    settings it uses, so a misspelt option (`layers=`, `raw=`, `constrain=`) was ignored, and the cells described
    from X, exit 0. Settings of the wrong type are refused too (`check_generation_settings`: do_sample="false"
    sampled)."""
    known = (generation_setting_names() | set(inspect.signature(GenerationMixin.generate).parameters)
             | {"tokenizer", "assistant_tokenizer"} | set(inspect.signature(model.forward).parameters))
    unknown = sorted(set(options) - known)
    given_too_early = sorted(set(unknown) & CALL_OPTIONS)
    if given_too_early:
        raise TypeError(f"{given_too_early}: options of a call, not of the pipeline: pass them when calling it "
                        "(describe(cells, sort_by_length=True)).")
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown}: the cell-to-text pipeline takes gene_ids, layer, use_raw, input_values, "
            "skip_empty_cells, constrained, batch_size, sort_by_length, progress, rows, generate_kwargs and generation "
            "settings (GenerationConfig's, e.g. max_new_tokens, num_beams, do_sample)"
        )
    check_generation_settings(options, "in the call")
    if isinstance(options.get("generation_config"), GenerationConfig):
        check_generation_settings(options["generation_config"].to_diff_dict(), "in the generation_config passed")


def save_model_folder(model: Any, processor: Any, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Save a complete Cell2Text folder (`Cell2TextPipeline.save_pretrained`): model, processor and pipeline.

    `model.save_pretrained` alone saves the model and its code, as for any transformers model."""
    device = None if getattr(model, "hf_device_map", None) else model.device  # a device-mapped model stays put
    Cell2TextPipeline(model=model, processor=processor, device=device).save_pretrained(save_directory, **kwargs)


def custom_pipelines_entry() -> dict:
    """What `config.json` needs under `custom_pipelines` for transformers to find this pipeline as remote code."""
    return {TASK: {"impl": f"{__name__.split('.')[-1]}.{Cell2TextPipeline.__name__}", "pt": ["AutoModelForCausalLM"]}}


def register_cell2text_pipeline() -> None:
    """Register the `cell-to-text` task with transformers' pipeline registry (done on importing the package).

    `Cell2TextPipeline.save_pretrained` (and `save_model_folder`) save this pipeline with the model (code and
    `custom_pipelines`), so a saved model finds it as remote code where this package is not installed.
    """
    from transformers.pipelines import PIPELINE_REGISTRY

    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=Cell2TextPipeline, pt_model=AutoModelForCausalLM, type="multimodal"
        )


__all__ = [
    "Cell2TextPipeline", "CellBatch", "DescribeOptions", "NaNLogitsFlag", "cell_batches", "cells_per_block",
    "check_outputs_line_up", "ended_at_end_of_text", "ended_by_forced_eos", "ends_at_a_stop_string", "last_token_id",
    "length_order", "rank_block",
    "resolve_cells", "register_cell2text_pipeline", "custom_pipelines_entry", "save_model_folder",
]
