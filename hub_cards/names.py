"""What the evaluation's results are called: one owner for the report (report.md) and the model card.

`results.json` keys stay as the metric functions return them; this module gives each its title in tables, its
metric type in the Hub's model-index, and formats a value for a table cell.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MetricName:
    """A results key, its title in tables, and its metric type (and args) in the Hub's model-index."""

    key: str
    title: str
    hub_type: str | None = None  # None: shown in tables, not sent to the Hub
    hub_args: dict | None = None


# Per labelled field (modeling_cell2text.description_schema.LABEL_FIELDS), by training.evaluation.metrics.
FIELD_METRICS: tuple[MetricName, ...] = (
    MetricName("accuracy", "Accuracy", "accuracy"),
    MetricName("weighted_f1", "Weighted F1", "f1", {"average": "weighted"}),
    MetricName("macro_precision", "Macro precision", "precision", {"average": "macro"}),
    MetricName("macro_recall", "Macro recall", "recall", {"average": "macro"}),
    MetricName("ontology_similarity", "Ontology similarity", "ontology_similarity"),
    MetricName("num_missing", "Missing"),
    # cells whose true label is none of the model's (another corpus's, or a type only the test donors have): no
    # choice of the model's can be right there
    MetricName("num_labels_unknown_to_model", "Cells of labels the model lacks"),
)
PATHWAY_METRICS: tuple[MetricName, ...] = (
    MetricName("subset_accuracy", "Subset accuracy", "accuracy"),
    MetricName("jaccard", "Jaccard", "jaccard"),
    MetricName("f1", "F1 (micro)", "f1", {"average": "micro"}),
    MetricName("num_distinct_predicted", "Distinct sets predicted"),
)
# The pathway baseline (results["pathway_baseline"]): the training split's most frequent pathways for every cell.
PATHWAY_BASELINE_NAME = "Most frequent in training, every cell"
# METEOR as training.evaluation.text_metrics computes it: exact and stem matching; WordNet synonyms cannot be had
# offline.
TEXT_METRICS: tuple[MetricName, ...] = (
    MetricName("bleu1", "BLEU-1", "bleu", {"max_order": 1}),
    MetricName("bleu2", "BLEU-2", "bleu", {"max_order": 2}),
    MetricName("bleu3", "BLEU-3", "bleu", {"max_order": 3}),
    MetricName("bleu4", "BLEU-4", "bleu", {"max_order": 4}),
    MetricName("rouge1", "ROUGE-1", "rouge"),
    MetricName("rouge2", "ROUGE-2", "rouge"),
    MetricName("rougeL", "ROUGE-L", "rouge"),
    MetricName("meteor", "METEOR (exact + stem, no synonyms)", "meteor"),
    MetricName("embedding_similarity", "Embedding similarity", "embedding_similarity"),
)
# Results keys of the methods compared on the same cells, and their names in tables.
METHOD_NAMES: dict[str, str] = {
    "cell2text": "Cell2Text",
    "cell2sentence": "Cell2Sentence-style",
    "encoder_head": "Head on the same encoder (probe)",
    "projector_head": "Head on the soft tokens",
    "logistic_regression": "Logistic regression",
    "knn": "kNN",
    "majority": "Majority class",
}
NO_VALUE = "–"


def field_title(field: str) -> str:
    """A labelled field's name in tables ("cell_type" -> "Cell type")."""
    return field.replace("_", " ").capitalize()


def finite_number(value: Any) -> float | None:
    """A finite float, or None for absent, non-numeric (bools included) or NaN/inf values."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def format_value(value: Any, digits: int = 3) -> str:
    """A table cell: integers as integers, other numbers to `digits` decimals, NO_VALUE where there is none."""
    number = finite_number(value)
    if number is None:
        return NO_VALUE
    if isinstance(value, numbers.Integral):
        return str(int(number))
    return f"{number:.{digits}f}"


CALIBRATION_HEADER = ["Field", "Known labels", "Expected calibration error", "Mean confidence", "Accuracy"]


def calibration_rows(per_field: dict) -> list[list[str]]:
    """Rows of the per-field calibration table (the evaluation's `field_calibration`; report and model card)."""
    return [[field_title(name), str(entry["num_labels"]), format_value(entry["ece"]),
             format_value(entry["mean_confidence"]), format_value(entry["accuracy"])]
            for name, entry in per_field.items()]
