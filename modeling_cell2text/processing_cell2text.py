"""Cell2Text processor: expression profiles -> gene tokens, plus a chat prompt with one placeholder per cell token."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from transformers import BatchFeature, ProcessorMixin

from .argument_types import is_integer_at_least, with_close_match
from .compatibility import (KEPT_SUBSET_FIX, check_model_and_processor, holds_kept_subset, hub_kwargs, kept_subset,
                            saved_file)
from .feature_extraction_cell2text import unknown_settings_error
from .text_padding import before_end_of_text, ended_at_end_of_text, pad_token_rows, text_pad_token_id
from .description_schema import (JOINED_TERM_FIELDS, ONTOLOGY_FIELDS, TERM_ID_PREFIXES, CellDescription,
                                 DescriptionParseError, is_term_id_of, parse_description, parse_or_none,
                                 set_definition, with_term_ids)

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a single-cell biologist. Describe the cell concisely and professionally."
DEFAULT_USER_PROMPT = "Gene expression embeddings: "
CELL_TOKEN = "<cell>"
#: The date a chat template that states one writes into every prompt (Llama 3's "Today Date:", from `date_string`,
#: else today's): today's made a model's prompts, and so its descriptions, change from one day to the next. Llama 3.1's
#: own default. A template that writes today's date itself (`strftime_now`) is refused (`render_chat`).
PROMPT_DATE = "26 Jul 2024"
# The processor's own settings (saved in processor_config.json beside its feature extractor and tokenizer).
SETTINGS = ("chat_template", "num_cell_tokens", "system_prompt", "user_prompt", "ontology_term_ids",
            "cell_type_definitions", "pathway_names", "age_groups", "definitions_in_model_text", "kept_labels")
# `keep_labels`' fields: the ontology fields' tables, and these.
LIST_LABEL_FIELDS = {"pathways": "pathway_names", "age_group": "age_groups"}


def render_chat(tokenizer, messages: list, chat_template: str | None = None, **kwargs) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)` with the fixed date `PROMPT_DATE` as
    `date_string`: the one rendering of a chat for Cell2Text's prompts and the Cell2Sentence baseline's. Raise a
    ValueError naming the fix where the template writes today's date itself (`strftime_now`): every prompt, and so
    every description and score, would change from one day to the next."""
    render = dict(chat_template=chat_template, tokenize=False, date_string=PROMPT_DATE, **kwargs)
    try:  # strftime_now=None hides transformers' today from the template, so that a call of it fails
        return tokenizer.apply_chat_template(messages, strftime_now=None, **render)
    except TypeError:
        tokenizer.apply_chat_template(messages, **render)  # a template failing otherwise fails alike
        raise ValueError(
            "The chat template writes today's date itself (strftime_now(...), not date_string, which Cell2Text "
            f"sets to {PROMPT_DATE!r}): every prompt, and so every description and score, would change from one "
            "day to the next. Write a fixed date in the template (--chat_template_path for training), or take it "
            "from date_string as Llama 3's templates do."
        ) from None


def prompt_date(tokenizer, chat_template: str | None = None) -> str | None:
    """The date the template's prompts state: `PROMPT_DATE` where it writes `date_string` (Llama 3's "Today
    Date:"), None where it states none. Prompts rendered before `PROMPT_DATE` stated the day of their run."""
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    dated = render_chat(tokenizer, chat, chat_template, add_generation_prompt=True)
    other = tokenizer.apply_chat_template(chat, chat_template=chat_template, tokenize=False,
                                          add_generation_prompt=True, date_string=PROMPT_DATE + " (another)")
    return PROMPT_DATE if dated != other else None


def _is_kept_labels_record(record: object) -> bool:
    """Whether `record` is what `Cell2TextProcessor.keep_labels` writes as `kept_labels` (or wrote before it recorded
    the fields it narrowed)."""
    if not isinstance(record, Mapping) or set(record) not in ({"from", "kept"}, {"from", "kept", "fields"}):
        return False
    fields = record.get("fields", {})
    return all(isinstance(record[key], str) for key in ("from", "kept")) and isinstance(fields, Mapping) and all(
        isinstance(field, str) and isinstance(count, int) and not isinstance(count, bool)
        for field, count in fields.items())


def check_label_tables(
    ontology_term_ids: Mapping, cell_type_definitions: Mapping, pathway_names: Sequence, age_groups: Sequence
) -> None:
    """Refuse label tables the description schema cannot write, as the processor is built or loaded: a label the
    schema refuses stopped a run only when the decoder first chose it (after hours, naming no file), a pathway list
    given as one string was split into characters, and a name listed twice was chosen twice for one cell."""
    if not isinstance(ontology_term_ids, Mapping) or not isinstance(cell_type_definitions, Mapping):
        raise TypeError(f"ontology_term_ids and cell_type_definitions must be mappings (label -> id / definition); "
                        f"{_LABEL_FIX}")
    for field, table in ontology_term_ids.items():
        if field not in ONTOLOGY_FIELDS or not isinstance(table, Mapping):
            raise ValueError(f"ontology_term_ids[{field!r}] must be a mapping label -> term id for one of "
                             f"{ONTOLOGY_FIELDS}; {_LABEL_FIX}")
        for label, term_id in table.items():
            _check_label(f"ontology_term_ids[{field!r}]", field, label)
            if term_id is None and field != "cell_type":
                continue  # a label the training corpus stated without a known id (a cell type always has one)
            if not is_term_id_of(term_id, TERM_ID_PREFIXES[field], joined=field in JOINED_TERM_FIELDS):
                raise ValueError(f"ontology_term_ids[{field!r}][{label!r}] = {term_id!r} is not a {field} term id "
                                 f"({' / '.join(TERM_ID_PREFIXES[field])}... and the ontology's digits); {_LABEL_FIX}")
        shared = sorted(term for term, count in Counter(table.values()).items() if count > 1 and term is not None)
        if shared:
            raise ValueError(f"ontology_term_ids[{field!r}] gives the ids {shared} to several labels; {_LABEL_FIX}")
    for name, values, field in (("pathway_names", pathway_names, "pathways"), ("age_groups", age_groups, "age_group")):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a list of names, got {values!r}; {_LABEL_FIX}")
        for value in values:
            _check_label(name, field, value)
        twice = sorted(value for value, count in Counter(values).items() if count > 1)
        if twice:
            raise ValueError(f"{name} lists {twice} more than once; {_LABEL_FIX}")


_LABEL_FIX = "fix processor_config.json, or build the processor from the training corpus again"
_SETTING_FIX = "fix processor_config.json (or the call)"


def _check_label(where: str, field: str, label) -> None:
    """Refuse a label the description schema (`CellDescription`, the one owner of what a field may hold) refuses."""
    if not isinstance(label, str):
        raise ValueError(f"{where} label {label!r} is not a string; {_LABEL_FIX}")
    try:
        CellDescription(**{field: (label,) if field == "pathways" else label})
    except ValueError as error:
        raise ValueError(f"{where} label {label!r}: {error} ({_LABEL_FIX})") from error


class Cell2TextProcessor(ProcessorMixin):
    r"""
    Turns cells into model inputs: gene tokens (by the feature extractor) and a chat prompt (by the tokenizer's
    chat template) in which one `<cell>` placeholder per cell token is replaced by the model with the projected
    gene embeddings.

    Args:
        feature_extractor ([`Cell2TextFeatureExtractor`]): rank-value encoding of expression profiles.
        tokenizer: the language model's tokenizer. `<cell>` is added to it as a special token if missing.
        chat_template (`str`, *optional*): defaults to the tokenizer's chat template.
        num_cell_tokens (`int`, defaults to 256): must equal the model's `config.num_cell_tokens`.
        system_prompt, user_prompt (`str`): the instruction; the placeholders follow `user_prompt`.
        ontology_term_ids (`dict`, *optional*): field -> {label: ontology term id}, learnt from the training
            corpus, so parsed descriptions can be given ontology IDs without the ontologies at hand.
        cell_type_definitions (`dict`, *optional*): cell-type label -> its Cell Ontology definition, as the training
            corpus's descriptions state it; the schema-constrained decoder writes it after the chosen cell type.
        pathway_names (`list`, *optional*): the pathway names of the training corpus, among which the decoder
            chooses a cell's pathways.
        age_groups (`list`, *optional*): the age groups of the training corpus.
        definitions_in_model_text (`bool`, defaults to True): whether the model reads and writes the cell type's
            definition sentence. False: the model's text leaves it out (training targets, what the decoder feeds the
            model, what free generation writes) and the processor writes it into each description from
            `cell_type_definitions`, so the model reads fewer tokens (43 a cell on pbmc68k); the descriptions read the
            same.
        kept_labels (`dict`, *optional*): set by `keep_labels` (not by hand): the checksums of the label tables this
            processor's were chosen from (`"from"`, what a model checks them against) and of the subset kept
            (`"kept"`: tables changed since are checked as they are), and the fields it narrowed with the number of
            labels each keeps (`"fields"`, which the warning and refusals about a kept subset name; absent in a
            record saved before).
    """

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_cell_tokens: int = 256,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        user_prompt: str = DEFAULT_USER_PROMPT,
        ontology_term_ids: dict[str, dict[str, str]] | None = None,
        cell_type_definitions: dict[str, str] | None = None,
        pathway_names: Sequence[str] | None = None,
        age_groups: Sequence[str] | None = None,
        definitions_in_model_text: bool = True,
        kept_labels: dict[str, str] | None = None,
        **kwargs,
    ):
        if kwargs:
            raise unknown_settings_error("Cell2TextProcessor", set(kwargs), SETTINGS)
        if tokenizer is None or feature_extractor is None:
            raise ValueError("Cell2TextProcessor needs both a feature_extractor and a tokenizer.")
        if CELL_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [CELL_TOKEN]})
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        if chat_template is None:
            raise ValueError(
                "The tokenizer has no chat template: pass chat_template= (a Jinja template, e.g. the instruct "
                "model's) to Cell2TextProcessor."
            )
        if not is_integer_at_least(num_cell_tokens, 1):  # "8" failed on a comparison, 8.0 when the prompt was built
            raise ValueError(f"num_cell_tokens must be an integer >= 1, got {num_cell_tokens!r}; {_SETTING_FIX}")
        for name, prompt in (("system_prompt", system_prompt), ("user_prompt", user_prompt)):
            if not isinstance(prompt, str):  # the tokenizer failed on it with a message about batches of text
                raise TypeError(f"{name} must be a string, got {prompt!r}; {_SETTING_FIX}")
        self.num_cell_tokens = num_cell_tokens
        self.system_prompt = system_prompt
        self.user_prompt = user_prompt
        check_label_tables(ontology_term_ids or {}, cell_type_definitions or {}, pathway_names or [], age_groups or [])
        self.ontology_term_ids = ontology_term_ids or {}
        self.cell_type_definitions = dict(cell_type_definitions or {})
        self.pathway_names = list(pathway_names or [])
        self.age_groups = list(age_groups or [])
        if not isinstance(definitions_in_model_text, bool):
            raise TypeError(f"definitions_in_model_text must be True or False, got {definitions_in_model_text!r}.")
        self.definitions_in_model_text = definitions_in_model_text
        if kept_labels is not None and not _is_kept_labels_record(kept_labels):
            raise TypeError(f"kept_labels must be keep_labels' checksums {{'from': ..., 'kept': ...}} (and the "
                            f"fields it narrowed, {{'fields': {{field: labels kept}}}}), got {kept_labels!r}; "
                            f"{_LABEL_FIX}")
        self.kept_labels = dict(kept_labels) if kept_labels is not None else None
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "Cell2TextProcessor":
        """`ProcessorMixin.from_pretrained`; where the folder or repo also holds a Cell2Text model's config.json,
        the processor is checked against that model (`check_model_and_processor`) before it is returned, with a
        warning where it holds a subset of the model's labels (kept with `keep_labels` and saved so).

        The model's loading settings that `pipeline(..., dtype=...)` passes on to the processor too (`dtype`,
        `torch_dtype`, `device_map`) are left out: the tokenizer kept them as settings, and saving it failed on a
        torch dtype (after the model's weights were written) or wrote `"dtype": "auto"` into tokenizer_config.json."""
        for name in ("dtype", "torch_dtype", "device_map"):
            kwargs.pop(name, None)
        # read first: transformers' tokenizer loader reads config.json too, and fails on some fields unclearly (a dtype
        # that names no torch dtype: an AttributeError), where Cell2TextConfig names them
        model_config = _cell2text_config_beside(pretrained_model_name_or_path, kwargs)
        try:
            processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except json.JSONDecodeError as error:  # a tokenizer file: transformers names the file of a config only
            unparsable = _unparsable_json_files(pretrained_model_name_or_path)
            raise ValueError(f"{pretrained_model_name_or_path}: {unparsable} does not parse as JSON ({error}); restore "
                             "the file from the model's source or save the model again") from error
        except (AttributeError, TypeError) as error:  # a JSON list: "'list' object has no attribute 'get'"
            not_objects = _unparsable_json_files(pretrained_model_name_or_path, objects=True)
            if not not_objects:
                raise
            raise ValueError(f"{pretrained_model_name_or_path}: {not_objects} holds no JSON object ({error}); restore "
                             "the file from the model's source or save the model again") from error
        if model_config is not None:
            check_model_and_processor(model_config, processor, f"the model in {pretrained_model_name_or_path}")
            if holds_kept_subset(processor):
                logger.warning("The processor of the model in %s holds %s, kept with keep_labels: cells are described "
                               "among those only. Where that is not meant, %s.", pretrained_model_name_or_path,
                               kept_subset(processor), KEPT_SUBSET_FIX)
        return processor

    @classmethod
    def from_dict(cls, processor_dict: dict, **kwargs) -> "Cell2TextProcessor":
        """`ProcessorMixin.from_dict`, refusing keys of processor_config.json that are no setting of the processor
        (transformers drops them, so a misspelt setting left its default in force)."""
        unknown = set(processor_dict) - set(SETTINGS) - set(cls.get_attributes()) - {"auto_map", "processor_class"}
        if unknown:
            raise unknown_settings_error("Cell2TextProcessor", unknown, SETTINGS)
        return super().from_dict(processor_dict, **kwargs)

    def keep_labels(self, **labels: Iterable[str]) -> None:
        """Choose among a subset of the labels, in place: `keep_labels(cell_type=["B cell", "T cell"])` (fields:
        the ontology fields, "pathways", "age_group"; a field not named keeps all its labels). A model checks a
        processor's label tables against those it was saved with (`compatibility.processor_sha256`), so that a
        processor of another model (other labels than the model learnt to write) is refused; a subset chosen here
        records the checksum of the tables it came from and the fields it narrows (`kept_labels`) and is accepted,
        as long as its tables are not changed otherwise. Labels the processor does not hold, labels that are not
        strings, and an empty cell-type subset (describing would write free text) are refused; another field kept
        empty is left out of the descriptions. In an ontology field an ontology id stands for the labels that carry
        it (`CL:0000236` for "B cell"); a value that is neither is refused, naming a close label or id where there is
        one."""
        from .compatibility import label_tables_sha256, processor_labels_sha256

        tables = {**{field: self.ontology_term_ids.get(field, {}) for field in ONTOLOGY_FIELDS},
                  **{field: getattr(self, name) for field, name in LIST_LABEL_FIELDS.items()}}
        narrowed: dict[str, set[str]] = {}
        for field, kept in labels.items():
            if field not in tables:
                raise ValueError(f"keep_labels: unknown field {field!r}; the fields are {sorted(tables)}.")
            if isinstance(kept, (str, bytes)) or not isinstance(kept, Iterable):
                raise TypeError(f"keep_labels({field}=...) takes a list of labels, got {kept!r}.")
            kept = list(kept)
            other = [label for label in kept if not isinstance(label, str)]
            if other:
                raise TypeError(f"keep_labels({field}=...) takes label strings, got {len(other)} others, e.g. "
                                f"{other[:3]!r}.")
            if field == "cell_type" and not kept:
                raise ValueError("keep_labels(cell_type=[]) leaves no cell type to choose among, and describing would "
                                 "write free text naming any cell type: keep at least one, or describe with "
                                 "constrained=False for free text.")
            labels_of: dict[str, list[str]] = {}  # an ontology id -> the labels carrying it
            for label, term in (tables[field].items() if field in ONTOLOGY_FIELDS else ()):
                if term is not None:  # a label the corpus stated without a known id
                    labels_of.setdefault(term, []).append(label)
            named = [[value] if value in tables[field] else labels_of.get(value, [value]) for value in kept]
            narrowed[field] = {label for labels in named for label in labels}
            unknown = sorted(narrowed[field] - set(tables[field]))
            if unknown:
                ids = " or their ontology ids" if labels_of else ""
                # near only: short labels differ by a letter ("T cell" is no misspelt "B cell")
                hints = ", ".join(with_close_match(value, [*tables[field], *labels_of], 0.85) for value in unknown)
                verb = "is" if len(unknown) == 1 else "are"
                raise ValueError(f"keep_labels: {hints} {verb} not among this processor's {len(tables[field])} "
                                 f"{field} labels{ids} (not the model's, or left out by an earlier keep_labels), e.g. "
                                 f"{sorted(tables[field])[:5]}.")
        origin = processor_labels_sha256(self)  # the model's tables, or those an earlier subset came from
        earlier = self.kept_labels or {}  # the fields an earlier subset narrowed, while it is held unchanged
        fields = dict(earlier.get("fields") or {}) if earlier.get("kept") == label_tables_sha256(self) else {}
        fields.update({field: len(kept) for field, kept in narrowed.items()
                       if len(kept) < len(set(tables[field]))})  # a field named with all its labels is not narrowed
        for field, kept in narrowed.items():
            if field in LIST_LABEL_FIELDS:
                setattr(self, LIST_LABEL_FIELDS[field], [label for label in tables[field] if label in kept])
            else:
                self.ontology_term_ids = {**self.ontology_term_ids, field: {
                    label: term for label, term in tables[field].items() if label in kept}}
        self.cell_type_definitions = {label: definition for label, definition in self.cell_type_definitions.items()
                                      if label in self.ontology_term_ids.get("cell_type", {})}
        self.kept_labels = {"from": origin, "kept": label_tables_sha256(self), "fields": fields}

    @property
    def cell_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(CELL_TOKEN)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *self.feature_extractor.model_input_names]

    def __call__(
        self,
        cells=None,
        gene_ids: Sequence[str] | None = None,
        *,
        gene_input_ids: Sequence[Sequence[int]] | None = None,
        gene_value_ids: Sequence[Sequence[int]] | None = None,
        descriptions: Sequence[str] | None = None,
        layer: str | None = None,
        input_values: str = "counts",
        skip_empty_cells: bool = False,
        return_tensors: str | None = "pt",
        text: str | Sequence[str] | None = None,
        images=None,
        videos=None,
        audio=None,
        **text_kwargs,
    ) -> BatchFeature:
        """Build model inputs for a batch of cells.

        Pass either expression (`cells`: AnnData, sparse or dense cells x genes, with `gene_ids` for matrices) or
        already tokenized cells (`gene_input_ids`: rank-value token lists, e.g. a corpus column, with their
        expression bins `gene_value_ids` for a value-aware feature extractor). With
        `descriptions` (training) each prompt is followed by its description (`model_text`) and EOS, `labels` hold the
        description tokens only (prompt, placeholders and padding are -100) and padding is on the right; without
        (generation) the prompt ends with the assistant turn's opening and padding is on the left. `descriptions` are
        one per input cell (`skip_empty_cells=True` leaves out those of the cells it skips; one per cell kept is taken
        too).

        `text` (what `apply_chat_template(..., tokenize=True)` passes) tokenizes text-only prompts with the tokenizer
        (`text_kwargs` go to it); text that holds the cell placeholder needs cells, which this processor places
        itself: build such inputs with `processor(cells, gene_ids)`.
        """
        if text is not None:
            return self._text_only(text, cells, gene_input_ids, images, videos, audio, return_tensors, text_kwargs)
        if images is not None or videos is not None or audio is not None or text_kwargs:
            raise ValueError(f"Cell2TextProcessor takes cells, not images, videos, audio or {sorted(text_kwargs)}.")
        if (cells is None) == (gene_input_ids is None):
            raise ValueError("Pass exactly one of cells (expression) or gene_input_ids (tokenized cells).")
        if gene_value_ids is not None and gene_input_ids is None:
            raise ValueError("gene_value_ids go with gene_input_ids (tokenized cells); expression gives its own.")
        if cells is not None:
            cell_inputs = self.feature_extractor(
                cells,
                gene_ids,
                layer=layer,
                input_values=input_values,
                skip_empty_cells=skip_empty_cells,
                return_tensors="pt",
            )
        else:
            cell_inputs = self.feature_extractor.pad(gene_input_ids, gene_value_ids, return_tensors="pt")
        num_genes = cell_inputs["gene_token_mask"].sum(dim=1).tolist()
        if not num_genes:
            skipped = len(cell_inputs.get("skipped_cell_indices", []))
            raise ValueError(
                f"All {skipped} cells were skipped: none expresses a gene of the model's vocabulary; pass cells "
                "with counts in the vocabulary's genes." if skipped else
                "Got 0 cells: pass at least one cell (an AnnData or cells x genes matrix with one row or more, "
                "or one tokenized cell in gene_input_ids)."
            )
        skipped = len(cell_inputs.get("skipped_cell_indices", []))
        if descriptions is not None and skipped and len(descriptions) == len(num_genes) + skipped:
            descriptions = [descriptions[int(row)] for row in cell_inputs["cell_indices"]]  # one per input cell
        if descriptions is not None and len(descriptions) != len(num_genes):
            kept = f" ({skipped} of the input cells skipped as empty)" if skipped else ""
            raise ValueError(f"Got {len(descriptions)} descriptions for {len(num_genes)} cells{kept}: pass one "
                             "description per input cell (or per cell kept).")

        rows, labels = [], []
        for i, n_genes in enumerate(num_genes):
            prompt_ids = self._prompt_ids(min(int(n_genes), self.num_cell_tokens))
            if descriptions is None:
                rows.append(prompt_ids)
                continue
            target_ids = self._target_ids(descriptions[i])
            rows.append(prompt_ids + target_ids)
            labels.append([-100] * len(prompt_ids) + target_ids)

        padding_side = "left" if descriptions is None else "right"
        text_inputs = pad_token_rows(rows, text_pad_token_id(self.tokenizer), padding_side, labels or None)
        data = {**text_inputs, **{k: v for k, v in cell_inputs.items()}}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _text_only(self, text, cells, gene_input_ids, images, videos, audio, return_tensors, text_kwargs
                   ) -> BatchFeature:
        if cells is not None or gene_input_ids is not None:
            raise ValueError("Pass either cells (the processor writes their prompt) or text, not both.")
        if images is not None or videos is not None or audio is not None:
            raise ValueError("Cell2TextProcessor takes cells and text, not images, videos or audio.")
        texts = [text] if isinstance(text, str) else list(text)
        if any(CELL_TOKEN in t for t in texts):
            raise ValueError(
                f"The text holds the cell placeholder {CELL_TOKEN!r}, which stands for a cell's genes: build the "
                "inputs with processor(cells, gene_ids) (AnnData or a cells x genes matrix), which writes the prompt "
                "with one placeholder per cell token and the cell's gene tokens."
            )
        text_kwargs.setdefault("add_special_tokens", False)  # a chat template writes its own special tokens
        return BatchFeature(data=dict(self.tokenizer(texts, **text_kwargs)), tensor_type=return_tensors)

    def _prompt_ids(self, num_placeholders: int) -> list[int]:
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.user_prompt + CELL_TOKEN * num_placeholders},
        ]
        prompt = render_chat(self.tokenizer, messages, self.chat_template, add_generation_prompt=True)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        found = sum(1 for t in ids if t == self.cell_token_id)
        if found != num_placeholders:
            raise ValueError(
                f"The prompt holds {found} cell tokens instead of {num_placeholders}: the system or user prompt, or "
                f"the chat template, must not contain {CELL_TOKEN!r} or split it."
            )
        return ids

    def _target_ids(self, description: str) -> list[int]:
        if CELL_TOKEN in description:
            raise ValueError(f"A description contains the cell placeholder {CELL_TOKEN!r}: {description[:100]!r}")
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("The tokenizer has no eos_token; set tokenizer.eos_token so descriptions can end.")
        return self.tokenizer(self.model_text(description), add_special_tokens=False)["input_ids"] + [eos]

    def model_text(self, description: str) -> str:
        """The text the model is trained on for `description`: the description itself, or without its definition
        sentence where `definitions_in_model_text` is False."""
        if self.definitions_in_model_text:
            return description
        try:
            return set_definition(description, None)
        except DescriptionParseError as err:
            raise ValueError(
                "definitions_in_model_text=False needs descriptions that follow the Cell2Text template (its definition "
                f"sentence is found by parsing): {err}. Build the corpus with `python -m processing.build_corpus`, or "
                "keep definitions_in_model_text=True."
            ) from err

    def reader_text(self, text: str) -> str:
        """A description the model wrote, as the reader gets it: with its cell type's definition written in from
        `cell_type_definitions` where the model was trained without definitions (text that does not follow the
        template, or a cell type without a known definition, stays as written)."""
        if self.definitions_in_model_text:
            return text
        parsed = parse_or_none(text)
        known = parsed is not None and parsed.cell_type
        definition = self.cell_type_definitions.get(parsed.cell_type) if known else None
        return set_definition(text, definition) if definition else text

    def batch_decode(self, *args, **kwargs) -> list[str]:
        """Forwarded to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        """Forwarded to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_generation(self, generated_ids, prompt_length: int) -> list[str]:
        """The generated descriptions: the tokens after the (left-padded) prompt up to the first end of text (the
        tokenizer's `eos_token`, which a description is trained to end with), decoded without special tokens
        (`reader_text`: with the definition written in where the model does not write it). Generation that went on
        past it (`eos_token_id=None`, or another stop id) wrote on after the description's end, and the run-on text
        parsed into its last field (tissue "blood of a healthy donor. It or. It or. consists from the blood")."""
        eos = self.tokenizer.eos_token_id
        rows = [before_end_of_text(row, eos) for row in generated_ids[:, prompt_length:].tolist()]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [self.reader_text(t.strip()) for t in texts]

    def descriptions_ended(self, generated_ids, prompt_length: int, eos_token_id: int | Sequence[int] | None = None
                           ) -> list[bool]:
        """Per generated row, whether the model ended its description with the tokenizer's end of text, the token
        it was trained to end with, rather than being cut at `max_new_tokens` or stopped at another of the
        generation config's `eos_token_id` (pass `model.generation_config.eos_token_id`): `parse_descriptions`'
        `whole`, so that a description cut at a sentence's end is not parsed with its later fields missing. Takes what
        `post_process_generation` takes: a tensor or a numpy array (which failed on tensor methods)."""
        return ended_at_end_of_text(torch.as_tensor(generated_ids)[:, prompt_length:], self.tokenizer.eos_token_id,
                                    eos_token_id).tolist()

    def parse_descriptions(self, texts: Sequence[str], whole: Sequence[bool] | None = None) -> list[dict]:
        """Parse generated descriptions into fields plus their ontology term IDs (None where unknown).

        Each result has `parsed` (False where the text does not follow the template, all fields None then).
        `whole` (per text): False where generation stopped before the model ended the text (cut at max_new_tokens;
        `descriptions_ended` tells): such a text is not parsed either, since a cut at a sentence's end would parse
        with its later fields missing. Left out, every text is taken as whole.
        """
        results = []
        for text, complete in zip(texts, [True] * len(texts) if whole is None else whole, strict=True):
            try:
                if not complete:
                    raise DescriptionParseError("cut before its end")
                fields = parse_description(text).to_dict()
                parsed = True
            except DescriptionParseError:
                fields = CellDescription().to_dict()
                parsed = False
            results.append({"description": text, "parsed": parsed, **with_term_ids(fields, self.ontology_term_ids)})
        return results


def _unparsable_json_files(source, objects: bool = False) -> str:
    """The JSON files of the folder `source` that do not parse (with `objects`: that hold no JSON object), as a
    message names them (a Hub repo's are in the cache: "a JSON file"; none found with `objects`: "")."""
    names = []
    for path in sorted(Path(source).glob("*.json")) if Path(source).is_dir() else []:
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            names.append(path.name)
        else:
            if objects and not isinstance(content, dict):
                names.append(path.name)
    return " and ".join(names) or ("" if objects else "a JSON file")


def _cell2text_config_beside(source, kwargs: dict):
    """The Cell2Text model config saved in the same folder or repo as a processor, or None where there is none."""
    from .configuration_cell2text import Cell2TextConfig

    config_file = saved_file(source, "config.json", hub_kwargs(kwargs))
    if config_file is None:
        return None
    config_dict, _ = Cell2TextConfig.get_config_dict(config_file)
    if config_dict.get("model_type") != Cell2TextConfig.model_type:
        return None
    return Cell2TextConfig.from_pretrained(config_file)


__all__ = ["Cell2TextProcessor"]
