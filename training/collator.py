"""Batches corpus rows (rank-value gene tokens + description) into Cell2Text training inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature

from modeling_cell2text import parse_description
from modeling_cell2text.description_schema import label_spans
from modeling_cell2text.label_scoring import cell_type_sentence


def cell_type_label_order(processor) -> list[str]:
    """The processor's cell-type labels in the order the auxiliary head's classes follow (`cell_type_index`)."""
    return sorted(processor.ontology_term_ids.get("cell_type") or {})


def first_sentence(description: str) -> str:
    """A description's first sentence, the one naming the cell type ("This sample consists of a B cell."): its
    label, parsed, in the template's sentence (`label_scoring.cell_type_sentence`)."""
    cell_type = parse_description(description).cell_type
    if cell_type is None:
        raise ValueError(f"The description names no cell type, so it has no cell-type sentence: {description[:200]!r}")
    return cell_type_sentence(cell_type)


class Cell2TextDataCollator:
    """Collates corpus examples with the processor: the loss covers the description and EOS only.

    Prompt, cell placeholders and padding get label -100 (the processor builds the labels, so the prompt format
    has one owner). Examples need `gene_input_ids` and `description` (and `gene_value_ids` when the processor's
    feature extractor is value-aware); other columns are ignored. With `cell_type_only`, the target is the
    description's first sentence alone (`first_sentence`): the recipe's LLaVA-style first stage. With
    `labels_only`, the loss covers only the tokens of the labels the description states (`label_spans`: what the
    schema-constrained decoder chooses), not the template words, the definition or EOS, which it writes itself.
    With `cell_type_index`, the batch also holds each cell's index among the processor's cell-type labels in
    sorted order (-100 for a label it does not know), the targets of the trainer's auxiliary head
    (`training/loss.py`).
    """

    def __init__(
        self,
        processor,
        gene_column: str = "gene_input_ids",
        text_column: str = "description",
        value_column: str = "gene_value_ids",
        cell_type_only: bool = False,
        labels_only: bool = False,
        cell_type_index: bool = False,
    ):
        self.processor = processor
        self.cell_type_only = cell_type_only
        self.labels_only = labels_only
        self.cell_type_labels = (
            {label: i for i, label in enumerate(cell_type_label_order(processor))}
            if cell_type_index else None
        )
        self.gene_column = gene_column
        self.text_column = text_column
        self.value_column = value_column if processor.feature_extractor.num_expression_bins else None

    def __call__(self, examples: Sequence[dict[str, Any]]) -> BatchFeature:
        missing = {self.gene_column, self.text_column, self.value_column} - set(examples[0]) - {None}
        if missing:
            raise KeyError(
                f"Corpus examples lack the columns {sorted(missing)} (have {sorted(examples[0])}); build the corpus "
                "with `python -m processing.build_corpus` (with --expression-bins for a value-aware feature "
                "extractor) and pass remove_unused_columns=False to the trainer."
            )
        descriptions = [
            first_sentence(example[self.text_column]) if self.cell_type_only else example[self.text_column]
            for example in examples
        ]
        batch = self.processor(
            gene_input_ids=[example[self.gene_column] for example in examples],
            gene_value_ids=[example[self.value_column] for example in examples] if self.value_column else None,
            descriptions=descriptions,
            return_tensors="pt",
        )
        if self.labels_only:  # the label spans of the text the model is trained on (without a definition, maybe)
            self._keep_label_tokens(batch["labels"], [self.processor.model_text(d) for d in descriptions])
        if self.cell_type_labels is not None:
            batch["cell_type_index"] = torch.tensor(
                [self.cell_type_labels.get(example.get("cell_type"), -100) for example in examples])
        return batch

    def _keep_label_tokens(self, labels, descriptions: Sequence[str]) -> None:
        """Set to -100, in place, every target token that does not overlap a label's characters (and EOS)."""
        tokenizer = self.processor.tokenizer
        for row, description in enumerate(descriptions):
            spans = label_spans(description)
            offsets = tokenizer(description, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            targets = (labels[row] != -100).nonzero().flatten().tolist()  # the description's tokens, then EOS
            if len(targets) != len(offsets) + 1:
                raise RuntimeError(f"{len(targets)} labelled tokens for a description of {len(offsets)} tokens + EOS")
            for position, (start, end) in zip(targets, [*offsets, (0, 0)]):
                if not any(start < span_end and span_start < end for span_start, span_end in spans):
                    labels[row, position] = -100
