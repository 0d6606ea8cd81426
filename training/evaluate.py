"""Evaluate generated descriptions on a corpus split: parse, score per field, ontology similarity, pathways, text.

```bash
python -m training.evaluate --model outputs/demo/sft/final --corpus outputs/demo/corpus --split test \
    --out outputs/demo/report
```

Every generated description is parsed with the schema that wrote the training targets; text that does not
parse counts as wrong for every field (never dropped). Ontology similarity (personalized PageRank, see
`training/ontology_similarity.py`) scores cell types on the Cell Ontology, tissues on UBERON and diseases on
MONDO. A predicted label is mapped to its ontology term through the label -> term table the model's processor
carries from its training corpus; a label outside that table scores 0 (documented, never a crash). The healthy
state ("normal", PATO:0000461) is not a MONDO term: for it, similarity is 1 on an exact match and 0 otherwise.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.collator import split_value_lists
from training.metrics import classification_report, ontology_similarity_scores, pathway_report
from training.text_metrics import text_report

logger = logging.getLogger(__name__)

# corpus label column -> (field of the parsed description, ontology scored on, corpus term-id column)
FIELDS = {
    "cell_type": ("cell_type", "CL", "cell_type_ontology_term_id"),
    "tissue": ("tissue", "UBERON", "tissue_ontology_term_id"),
    "disease": ("disease", "MONDO", "disease_ontology_term_id"),
    "sex": ("sex", None, None),
    "development_stage": ("age_group", None, None),
}
# The report calls the age bucket "development_stage"; the corpus column holding the bucket is `age_group`.
CORPUS_COLUMN = {"development_stage": "age_group"}


@torch.no_grad()
def generate_descriptions(
    model,
    processor,
    token_lists: Sequence[Sequence[int]],
    batch_size: int = 16,
    max_new_tokens: int = 160,
    value_lists: Sequence[Sequence[int]] | None = None,
) -> list[str]:
    """Greedy descriptions for tokenized cells (and their expression bins for a value-aware model), in batches
    (left padded; the encoder runs once per batch)."""
    model.eval()
    texts: list[str] = []
    for start in tqdm(range(0, len(token_lists), batch_size), desc="generating descriptions"):
        batch = slice(start, start + batch_size)
        values = None if value_lists is None else value_lists[batch]
        inputs = processor(gene_input_ids=token_lists[batch], gene_value_ids=values).to(model.device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts.extend(processor.post_process_generation(generated, inputs["input_ids"].shape[1]))
    return texts


class _ExactOrOntology:
    """Ontology similarity, with exact match for true terms outside the ontology (e.g. PATO 'normal')."""

    def __init__(self, ontology: str):
        from training.ontology_similarity import OntologySimilarity

        self.similarity = OntologySimilarity(ontology)
        self.prefix = ontology + ":"

    def score(self, true_id: str, predicted_id: str) -> float:
        if not true_id.startswith(self.prefix):
            return float(true_id == predicted_id)
        return self.similarity.score(true_id, predicted_id)


def predicted_term_id(label: str | None, training_ids: dict[str, str], ontology: str) -> str | None:
    """The term a predicted label names: from the training corpus's label -> id table, else the ontology term
    with exactly that label (a real term the model was not trained on, e.g. a parent), else None (scores 0)."""
    from processing.ontologies import term_id_of_label

    if label is None:
        return None
    return training_ids.get(label) or term_id_of_label(ontology, label)


def score_descriptions(split, texts: Sequence[str], ontology_term_ids: dict[str, dict[str, str]]) -> tuple[dict, dict]:
    """Metrics of generated `texts` against a corpus split; returns the results dict and per-cell arrays."""
    from modeling_cell2text.description_schema import DescriptionParseError, parse_description

    if len(texts) != len(split):
        raise ValueError(f"{len(texts)} descriptions for {len(split)} cells.")
    parsed = []
    for text in texts:
        try:
            parsed.append(parse_description(text))
        except DescriptionParseError:
            parsed.append(None)
    num_unparsed = sum(p is None for p in parsed)
    results: dict = {"num_cells": len(texts), "parse_rate": 1 - num_unparsed / max(len(texts), 1),
                     "num_unparsed": num_unparsed, "fields": {}}
    per_cell: dict = {}
    for field, (attribute, ontology, id_column) in FIELDS.items():
        column = CORPUS_COLUMN.get(field, field)
        if column not in split.column_names:
            continue
        true = list(split[column])
        known = [i for i, label in enumerate(true) if label is not None]
        if not known:
            continue
        true = [true[i] for i in known]
        pred = [getattr(parsed[i], attribute) if parsed[i] is not None else None for i in known]
        report = classification_report(true, pred)
        if ontology is not None and id_column in split.column_names:
            true_ids = [split[id_column][i] for i in known]
            table = ontology_term_ids.get(field, {})
            pred_ids = [predicted_term_id(label, table, ontology) for label in pred]
            scores = ontology_similarity_scores(true_ids, pred_ids, _ExactOrOntology(ontology))
            report["ontology_similarity"] = sum(scores) / len(scores)
            if field == "cell_type":
                per_cell["ontology_similarity"] = scores
        if field == "cell_type":
            per_cell["cell_type_true"], per_cell["cell_type_pred"] = true, pred
        results["fields"][field] = report
    if "pathways" in split.column_names and any(split["pathways"]):
        results["pathways"] = pathway_report(
            [list(p) for p in split["pathways"]], [list(p.pathways) if p is not None else None for p in parsed]
        )
    results["text"] = text_report(list(split["description"]), list(texts))
    return results, per_cell


def evaluate_model(
    model_dir: str | Path,
    corpus_dir: str | Path,
    split: str = "test",
    batch_size: int = 16,
    max_new_tokens: int = 160,
    max_cells: int | None = None,
) -> tuple[dict, dict, list[str]]:
    """Generate for every cell of a split and score; returns (results, per_cell, generated texts)."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    cells = load_from_disk(str(corpus_dir))[split]
    if max_cells is not None:
        cells = cells.select(range(min(max_cells, len(cells))))
    values = split_value_lists(cells, processor.feature_extractor)
    texts = generate_descriptions(model, processor, cells["gene_input_ids"], batch_size, max_new_tokens, values)
    results, per_cell = score_descriptions(cells, texts, processor.ontology_term_ids)
    results.update(model=str(model_dir), dataset=str(corpus_dir), split=split)
    per_cell["generated"] = texts
    return results, per_cell, texts


def main(argv: Sequence[str] | None = None) -> Path:
    from training.report import write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A trained Cell2Text folder.")
    parser.add_argument("--corpus", required=True, help="The corpus folder (python -m processing.build_corpus).")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="Report folder.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--max-cells", type=int, default=None)
    args = parser.parse_args(argv)
    results, per_cell, _ = evaluate_model(
        args.model, args.corpus, args.split, args.batch_size, args.max_new_tokens, args.max_cells
    )
    report = write_report(results, per_cell, args.out)
    print(f"Report: {report}")
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
