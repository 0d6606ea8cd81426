"""Evaluate generated descriptions on a corpus split: parse, score per field, ontology similarity, pathways, text.

```bash
python -m training.evaluation.evaluate --model outputs/demo/sft/final --corpus outputs/demo/corpus --split test \
    --out outputs/demo/report
```

Every generated description is parsed with the schema that wrote the training targets; text that does not
parse counts as wrong for every field (never dropped). Ontology similarity (personalized PageRank, see
`training/evaluation/ontology_similarity.py`) scores cell types on the Cell Ontology, tissues on UBERON and diseases on
MONDO. A predicted label is mapped to its ontology term through the label -> term table the model's processor
carries from its training corpus, else to the ontology term of exactly that label; any other label scores 0
(documented, never a crash). The healthy state ("normal", PATO:0000461) is not a MONDO term: for it, similarity
is 1 on an exact match and 0 otherwise.

By default every field is chosen among the labels of the training corpus (`modeling_cell2text.schema_decoding`,
the pipeline's default): the chosen cell type's probability is the cell's confidence (reliability diagram and
expected calibration error in the report). The
labels free generation would have invented are counted from the same model's free greedy first sentence (decoded
alone: greedy decoding writes the first sentence before anything else, so it is exactly free generation's, at a
tenth of the tokens). `--free` evaluates free generation as it is.

The model folder is loaded with this project's classes; `--trust-remote-code` runs the folder's own code instead.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_cell2text import tl
from modeling_cell2text.argument_types import is_integer_at_least
from modeling_cell2text.compatibility import PREPARED_ENCODER_KEY, saved_file
from modeling_cell2text.description_schema import (LABEL_FIELD_NAMES, LABEL_FIELDS, DescriptionParseError,
                                                    first_sentence, parse_description, parse_or_none)
from modeling_cell2text.schema_decoding import SCORED_FIELDS, SchemaDecoder
from modeling_cell2text.text_padding import text_pad_token_id
from modeling_cell2text.label_scoring import (
    cell_type_candidates,
    constrains_by_default,
    fit_temperature,
    score_cell_types,
    cell_type_sentence,
)
from hub_cards.publish import code_sha256
from processing.corpus import split_value_lists
from training.evaluation.metrics import (
    calibration_report,
    classification_report,
    most_frequent_pathways,
    ontology_similarity_scores,
    pathway_report,
)
from training.evaluation.text_metrics import text_report

logger = logging.getLogger(__name__)



def batched_inputs(model, processor, token_lists, value_lists, batch_size: int, desc: str) -> Iterator:
    """Model inputs for consecutive batches of tokenized cells (and their expression bins), on the model's device."""
    for start in tqdm(range(0, len(token_lists), batch_size), desc=desc):
        batch = slice(start, start + batch_size)
        values = None if value_lists is None else value_lists[batch]
        yield processor(gene_input_ids=token_lists[batch], gene_value_ids=values).to(model.device)


@torch.no_grad()
def generate_descriptions(
    model,
    processor,
    token_lists: Sequence[Sequence[int]],
    batch_size: int = 16,
    max_new_tokens: int = 160,
    value_lists: Sequence[Sequence[int]] | None = None,
) -> tuple[list[str], list[bool]]:
    """Greedy descriptions for tokenized cells (and their expression bins for a value-aware model), in batches
    (left padded; the encoder runs once per batch), and whether the model ended each (False: cut at
    `max_new_tokens`, which `score_descriptions` counts as unparsed, as the pipeline does)."""
    model.eval()
    texts: list[str] = []
    whole: list[bool] = []
    for inputs in batched_inputs(model, processor, token_lists, value_lists, batch_size, "generating descriptions"):
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        prompt_length = inputs["input_ids"].shape[1]
        texts.extend(processor.post_process_generation(generated, prompt_length))
        whole.extend(processor.descriptions_ended(generated, prompt_length, model.generation_config.eos_token_id))
    return texts, whole


def free_cell_type(text: str) -> str | None:
    """The cell type a description's first sentence names, or None where that sentence does not parse or has no
    period (cut by the token limit: its label may be cut too, and would count as invented)."""
    sentence = first_sentence(text)
    if not text.strip().startswith(sentence):
        return None
    try:
        return parse_description(sentence).cell_type
    except DescriptionParseError:
        return None


@torch.no_grad()
def describe_constrained(
    model,
    processor,
    token_lists: Sequence[Sequence[int]],
    batch_size: int = 16,
    value_lists: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Constrained descriptions of tokenized cells, with each cell's chosen label, its probability among the known
    labels, and the label free greedy decoding writes in the first sentence (None where that does not parse)."""
    model.eval()
    candidates = cell_type_candidates(processor)
    first_sentence_tokens = max(
        len(processor.tokenizer(cell_type_sentence(c), add_special_tokens=False)["input_ids"]) for c in candidates
    ) + 8  # room for a longer invented label
    pad_id = text_pad_token_id(processor.tokenizer)
    out: dict = {"texts": [], "labels": [], "scores": [], "free_labels": [], "candidates": candidates,
                 "field_labels": {name: [] for name in CALIBRATED_FIELDS},
                 "field_scores": {name: [] for name in CALIBRATED_FIELDS}}
    decoder = SchemaDecoder(processor)
    for inputs in batched_inputs(model, processor, token_lists, value_lists, batch_size,
                                 "generating constrained descriptions"):
        described = decoder.describe(model, inputs)
        out["texts"] += described.texts
        out["labels"] += [labels["cell_type"] for labels in described.labels]
        out["scores"] += [scores["cell_type"] for scores in described.scores]
        for name in CALIBRATED_FIELDS:
            out["field_labels"][name] += [labels.get(name) for labels in described.labels]
            out["field_scores"][name] += [scores.get(name) for scores in described.scores]
        free = model.generate(**inputs, max_new_tokens=first_sentence_tokens, do_sample=False, pad_token_id=pad_id)
        out["free_labels"] += [free_cell_type(t) for t in
                               processor.post_process_generation(free, inputs["input_ids"].shape[1])]
    return out


@torch.no_grad()
def fit_cell_type_temperature(model, processor, split, batch_size: int = 16) -> dict | None:
    """Fit the model's `cell_type_temperature` on a held-out split (the recipe uses validation): the temperature
    that makes the candidate labels' probabilities best predict the true labels (`label_scoring.fit_temperature`).

    Returns the temperature, the number of cells it was fitted on and their negative log-likelihood before and
    after; None where the processor knows no labels or no cell's label is one of them.
    """
    if not constrains_by_default(processor) or not len(split):
        return None
    candidates = cell_type_candidates(processor)
    index = {label: j for j, label in enumerate(candidates)}
    known = [i for i, label in enumerate(split["cell_type"]) if label in index]
    if not known:
        return None
    cells = split.select(known)
    model.eval()
    scores = [score_cell_types(model, processor, inputs, candidates).log_likelihoods for inputs in batched_inputs(
        model, processor, cells["gene_input_ids"], split_value_lists(cells, processor.feature_extractor),
        batch_size, "fitting the cell-type temperature")]
    log_likelihoods = torch.cat(scores)
    targets = torch.tensor([index[label] for label in cells["cell_type"]])
    temperature = fit_temperature(log_likelihoods, targets)

    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(log_likelihoods.double() / t, targets))

    return {"cell_type_temperature": temperature, "num_cells": len(known), "nll_before": nll(1.0),
            "nll_after": nll(temperature)}


# The labelled fields whose chosen label comes with a probability (`<field>_score`), calibrated and reported: the
# decoder's scored fields that are labelled fields (not the pathways), in the schema's field order.
CALIBRATED_FIELDS = tuple(name for name in LABEL_FIELD_NAMES if name in SCORED_FIELDS)


def field_calibration(cells, described: dict, processor) -> dict:
    """Per field the decoder chose: how many labels it chose among, and the calibration of its probabilities
    against the corpus's true labels (cells without a true label or without a chosen one left out)."""
    from modeling_cell2text.schema_decoding import known_labels

    known = known_labels(processor)
    report = {}
    for name in CALIBRATED_FIELDS:
        if name not in cells.column_names or not known.get(name):
            continue
        pairs = [(score, label == true) for true, label, score in zip(
            cells[name], described["field_labels"][name], described["field_scores"][name])
            if true is not None and score is not None]
        if pairs:
            report[name] = {"num_labels": len(known[name]),
                            **calibration_report([s for s, _ in pairs], [c for _, c in pairs])}
    return report


def true_option(choice: str, options: Sequence, row: dict) -> int | None:
    """The index of the option of `choice` a corpus row states (None where it states none of them)."""
    pathways = list(row.get("pathways") or [])
    for index, option in enumerate(options):
        wanted = dict(option.labels)
        if choice in ("pathway_1", "pathway_2"):
            position = 0 if choice == "pathway_1" else 1
            if len(pathways) > position and pathways[position] == wanted[choice]:
                return index
        elif all(value is None or row.get(name) == value for name, value in wanted.items()):
            return index
    return None


@torch.no_grad()
def fit_field_temperatures(model, processor, split, batch_size: int = 16) -> dict | None:
    """Fit the temperature of each schema-constrained choice other than the cell type (`config.field_temperatures`)
    on a held-out split: the temperature that makes the options' probabilities best predict the options the cells'
    true labels state (`label_scoring.fit_temperature`), over the decoder's distribution (the options it completed
    and the partial options it left unexplored, the truth being the one it lies under). Cells whose true option is
    in neither (pathway_2's true option taken by pathway_1) are left out; a choice with one option or no such cell
    gets none. Returns {choice: {temperature, num_cells, nll_before,
    nll_after}} or None when no choice could be fitted."""
    from modeling_cell2text.configuration_cell2text import FIELD_TEMPERATURE_CHOICES

    if not constrains_by_default(processor) or not len(split):
        return None
    decoder = SchemaDecoder(processor)
    choices = [c for c in FIELD_TEMPERATURE_CHOICES if len(decoder.options.get(c, [])) > 1]
    if not choices:
        return None
    rows = split.to_list()
    pools: dict[str, list[tuple[list[float], int]]] = {c: [] for c in choices}
    model.eval()
    described_rows = 0
    for inputs in batched_inputs(model, processor, split["gene_input_ids"],
                                 split_value_lists(split, processor.feature_extractor), batch_size,
                                 "fitting the field temperatures"):
        described = decoder.describe(model, inputs)
        for likelihoods, unexplored in zip(described.log_likelihoods, described.unexplored):
            row = rows[described_rows]
            described_rows += 1
            for choice in choices:
                truth = true_option(choice, decoder.options[choice], row)
                if truth is None:
                    continue
                # the decoder's distribution: completed options and the unexplored partial ones (`_scores`); the
                # truth is its completed option, or the unexplored partial option it lies under (so that cells the
                # search got wrong count too)
                completed = likelihoods.get(choice) or {}
                texts = list(completed)
                partial = unexplored.get(choice, [])
                values = [completed[t] for t in texts] + [ll for _, ll in partial]
                if decoder.options[choice][truth].text in completed:
                    pools[choice].append((values, texts.index(decoder.options[choice][truth].text)))
                else:
                    path = decoder.trees[choice].option_nodes[truth]
                    under = [j for j, (node, _) in enumerate(partial) if node in path]
                    if under:
                        pools[choice].append((values, len(texts) + under[0]))
    fitted = {}
    for choice, entries in pools.items():
        if not entries:
            continue
        width = max(len(values) for values, _ in entries)
        scores = torch.full((len(entries), width), -float("inf"), dtype=torch.float64)
        for i, (values, _) in enumerate(entries):
            scores[i, : len(values)] = torch.tensor(values, dtype=torch.float64)
        targets = torch.tensor([target for _, target in entries])
        temperature = fit_temperature(scores, targets)

        def nll(t: float) -> float:
            return float(torch.nn.functional.cross_entropy(scores / t, targets))

        fitted[choice] = {"temperature": temperature, "num_cells": len(entries), "nll_before": nll(1.0),
                          "nll_after": nll(temperature)}
    return fitted or None


def constraint_report(true: Sequence[str], described: dict) -> dict:
    """What the constraint changed: labels free generation would have invented, free vs constrained cell-type
    accuracy, and the calibration of the chosen labels' probabilities."""
    from collections import Counter

    known = set(described["candidates"])
    free = described["free_labels"]
    invented = Counter(label for label in free if label is not None and label not in known)
    return {
        "num_candidates": len(known),
        "num_invented": sum(invented.values()),
        "invented_labels": dict(invented.most_common()),
        "num_free_unparsed": sum(label is None for label in free),
        "free_accuracy": sum(t == p for t, p in zip(true, free)) / max(len(true), 1),
        "constrained_accuracy": sum(t == p for t, p in zip(true, described["labels"])) / max(len(true), 1),
        "calibration": calibration_report(described["scores"], [t == p for t, p in zip(true, described["labels"])]),
    }


class _ExactOrOntology:
    """Ontology similarity, with exact match for true terms outside the ontology (e.g. PATO 'normal') or unknown to
    its graph (an id the corpus builder kept as unknown: it stopped the evaluation after every cell was generated)."""

    def __init__(self, ontology: str):
        from training.evaluation.ontology_similarity import OntologySimilarity

        self.similarity = OntologySimilarity(ontology)
        self.prefix = ontology + ":"

    def graded(self, true_id: str | None) -> bool:
        """Whether a true term is in the ontology's graph (graded similarity), rather than scored by exact match."""
        return true_id is not None and true_id.startswith(self.prefix) and self.similarity.contains(true_id)

    def score(self, true_id: str | None, predicted_id: str) -> float:
        if not self.graded(true_id):
            return float(true_id == predicted_id)
        return self.similarity.score(true_id, predicted_id)


def predicted_term_id(label: str | None, training_ids: dict[str, str], ontology: str) -> str | None:
    """The term a predicted label names: from the training corpus's label -> id table, else the ontology term
    with exactly that label (a real term the model was not trained on, e.g. a parent), else None (scores 0)."""
    from processing.ontologies import term_id_of_label

    if label is None:
        return None
    return training_ids.get(label) or term_id_of_label(ontology, label)


def label_similarity_scores(
    true_ids: Sequence[str | None], labels: Sequence[str | None], training_ids: dict[str, str | None],
    ontology: str = "CL", true_labels: Sequence[str] | None = None,
) -> list[float]:
    """Per cell, the ontology similarity of the predicted `labels` to the true terms (`predicted_term_id`; 0 for a
    label without a term or no prediction): the one scoring of Cell2Text's and every baseline's labels.

    A true term outside the ontology's graph (no id: a label the corpus states as given; or an id unknown to the
    graph) is scored by exact match: of the labels, given `true_labels` (the right label scored 0 against its
    unknown id, and a true id None stopped the evaluation after every cell was generated), else of the ids."""
    scorer = _ExactOrOntology(ontology)
    pred_ids = [predicted_term_id(label, training_ids, ontology) for label in labels]
    scores = ontology_similarity_scores(list(true_ids), pred_ids, scorer)
    if true_labels is None:
        return scores
    if len(true_labels) != len(labels):
        raise ValueError(f"{len(true_labels)} true labels for {len(labels)} predicted labels: pass one per cell")
    return [score if scorer.graded(true_id) else float(label is not None and label == truth)
            for score, true_id, label, truth in zip(scores, true_ids, labels, true_labels)]


def cell_type_similarity_scores(cells, predictions: dict[str, Sequence[str | None]],
                                training_ids: dict[str, str | None]) -> dict[str, list[float]]:
    """Per method, each of `cells`' (a corpus split's) Cell Ontology similarity of its predicted cell type, scored
    as Cell2Text's is in `score_descriptions`: with the true labels, so a true type without a graded id is scored by
    its label (given only the ids, a right label scored 0 there)."""
    true_ids, truth = list(cells["cell_type_ontology_term_id"]), list(cells["cell_type"])
    return {name: label_similarity_scores(true_ids, predicted, training_ids, "CL", truth)
            for name, predicted in predictions.items()}


def score_descriptions(
    split,
    texts: Sequence[str],
    ontology_term_ids: dict[str, dict[str, str]],
    cell_types: Sequence[str | None] | None = None,
    whole: Sequence[bool] | None = None,
) -> tuple[dict, dict]:
    """Metrics of generated `texts` against a corpus split; returns the results dict and per-cell arrays.

    `cell_types` (constrained decoding) are the predicted cell types, used instead of the parsed ones (they are
    the texts' first sentences, and stay the prediction where the rest of a text does not parse). `whole` (per text,
    `generate_descriptions`'): False where generation cut the text before the model ended it; such a text counts as
    unparsed (a cut at a sentence's end parsed, its later fields missing, and raised the parse rate)."""

    if len(texts) != len(split) or (cell_types is not None and len(cell_types) != len(split)) or (
            whole is not None and len(whole) != len(split)):
        raise ValueError(f"{len(texts)} descriptions (and cell types) for {len(split)} cells: pass one per cell.")
    parsed = [parse_or_none(text) if whole is None or whole[i] else None for i, text in enumerate(texts)]
    num_unparsed = sum(p is None for p in parsed)
    results: dict = {"num_cells": len(texts), "parse_rate": 1 - num_unparsed / max(len(texts), 1),
                     "num_unparsed": num_unparsed, "fields": {}}
    per_cell: dict = {}
    for label_field in LABEL_FIELDS:
        field, ontology, id_column = label_field.name, label_field.similarity_ontology, label_field.term_id_column
        if field not in split.column_names:
            continue
        true = list(split[field])
        known = [i for i, label in enumerate(true) if label is not None]
        if not known:
            continue
        true = [true[i] for i in known]
        pred = [getattr(parsed[i], field) if parsed[i] is not None else None for i in known]
        if field == "cell_type" and cell_types is not None:
            pred = [cell_types[i] for i in known]
        report = classification_report(true, pred)
        if ontology_term_ids.get(field):  # the model's labels of this field: a true label among none of them
            report["num_labels_unknown_to_model"] = sum(label not in ontology_term_ids[field] for label in true)
        if ontology is not None and id_column in split.column_names:
            true_ids = [split[id_column][i] for i in known]
            scores = label_similarity_scores(true_ids, pred, ontology_term_ids.get(field, {}), ontology, true)
            report["ontology_similarity"] = sum(scores) / len(scores)
            if field == "cell_type":
                per_cell["ontology_similarity"] = scores
        if field == "cell_type":
            per_cell["cell_type_true"], per_cell["cell_type_pred"] = true, pred
            per_cell["cell_type_row"] = known  # the split's rows these entries are (cells with a known type)
            if "cell_id" in split.column_names:  # which cell each entry is, for comparisons with other methods
                per_cell["cell_id"] = [split["cell_id"][i] for i in known]
        results["fields"][field] = report
    if "pathways" in split.column_names and any(split["pathways"]):
        results["pathways"] = pathway_report(
            [list(p) for p in split["pathways"]], [list(p.pathways) if p is not None else None for p in parsed]
        )
    results["text"] = text_report(list(split["description"]), list(texts))
    return results, per_cell


def check_corpus_fits_model(corpus_dir: str | Path, model_config, processor, other_corpus: bool = False) -> str:
    """Refuse a corpus whose cells the model would not see as its processor gives them, or whose test cells may be
    training cells; returns the shared gene vocabulary checksum.

    Checked: that its cells were tokenized as the model's processor tokenizes them (`check_corpus_tokenized_as`:
    vocabulary, gene medians, expression bins, tokens a cell) and, unless `other_corpus`, that the corpus is
    the build the model was trained on (its recorded split fingerprints): the same cells rebuilt with another seed
    or fold put most of the model's training cells in the test split (52 of 70 for seed 1 against seed 0)."""
    from processing.corpus import check_corpus_tokenized_as, corpus_summary

    vocabulary_sha256 = check_corpus_tokenized_as(corpus_dir, processor.feature_extractor,
                                                  getattr(model_config, "_name_or_path", None) or "<model folder>")
    trained_on, source = getattr(model_config, "training_corpus_fingerprints", None), "the model records"
    if not trained_on:  # a model saved before the record: its encoder's, prepared on the corpus it was trained on
        trained_on = (getattr(model_config.gene_encoder_config, PREPARED_ENCODER_KEY, None) or {}).get(
            "corpus_fingerprints")
        source = "its gene encoder was prepared on (for a model fine-tuned since with init_from, the first corpus)"
    fingerprints = corpus_summary(corpus_dir).get("fingerprints")
    earlier = getattr(model_config, "earlier_training_corpus_fingerprints", None) or []
    if trained_on and fingerprints != trained_on and not other_corpus:
        raise ValueError(
            f"The corpus {corpus_dir} (split fingerprints {fingerprints}) is not the build the model was trained on "
            f"last ({trained_on}, the corpus {source}): "
            + ("the model was trained on it before being fine-tuned on that one (init_from), whose training cells "
               "may be its test cells. " if fingerprints in earlier else
               "rebuilt with another seed or fold, its test cells may be the model's training cells. ")
            + "Evaluate on the corpus the model was trained on last; if this corpus's cells are known to be new to "
            "the model (another dataset), pass --other-corpus (other_corpus=True)."
        )
    if other_corpus and fingerprints is not None and fingerprints != trained_on and fingerprints in earlier:
        logger.warning("other_corpus (--other-corpus) was given, but the model was trained on the corpus %s before "
                       "being fine-tuned on another (init_from): its test cells are new to the model only if that "
                       "later corpus does not hold them.", corpus_dir)
    elif earlier and not other_corpus:
        logger.warning("The model was trained on %d other corpora before this one (init_from: %s); where they share "
                       "cells with it, its test cells may be training cells.", len(earlier), earlier[:3])
    return vocabulary_sha256


def load_model(model_dir: str | Path, trust_remote_code: bool = False, device: str = "auto"):
    """The model (in the dtype it was saved in, as transformers loads it; eval mode, on `device`: "auto" is the GPU
    when there is one) and its processor, checked against each other (`tl.load`).

    With `trust_remote_code=False` (default) the folder is loaded with this project's classes and none of its
    own code runs; `True` runs the model and processor code saved in the folder (a model trained with another
    version of this code; transformers' Auto classes would pick this package's registered classes even then). The
    decoding and the metrics are this project's either way."""
    return tl.load(model_dir, device=device, dtype=saved_dtype(model_dir), trust_remote_code=trust_remote_code)


def saved_dtype(model_dir: str | Path) -> str:
    """The dtype a model folder's or repo's config.json records (float32 where it records none or another)."""
    config_file = saved_file(model_dir, "config.json", {})
    saved = json.loads(Path(config_file).read_text()).get("dtype") if config_file is not None else None
    return saved if saved in tl.DTYPES else "float32"


def evaluate_model(
    model_dir: str | Path,
    corpus_dir: str | Path,
    split: str = "test",
    batch_size: int = 16,
    max_new_tokens: int = 160,
    max_cells: int | None = None,
    constrained: bool = True,
    trust_remote_code: bool = False,
    device: str = "auto",
    other_corpus: bool = False,
) -> tuple[dict, dict, list[str]]:
    """Generate for every cell of a split and score; returns (results, per_cell, generated texts).

    The corpus must be the one the model was trained on, unless `other_corpus` (`check_corpus_fits_model`).

    With `constrained` the cell type is one of the processor's known labels, with its probability
    (`per_cell["cell_type_score"]`) and `results["cell_type_constraint"]` (invented labels, calibration); each
    description is written whole, so `max_new_tokens` bounds free descriptions only."""
    from processing.corpus import open_corpus

    corpus = open_corpus(corpus_dir)  # the split checked before the model loads and generates
    if split not in corpus:
        raise ValueError(f"the corpus {corpus_dir} has no split {split!r}; its splits: {sorted(corpus)}")
    if max_cells is not None and not is_integer_at_least(max_cells, 1):
        raise ValueError(f"max_cells must be an integer >= 1 (or None for every cell), got {max_cells!r}")
    cells = corpus[split]
    if max_cells is not None:
        cells = cells.select(range(min(max_cells, len(cells))))
    if not len(cells):
        raise ValueError(f"the {split!r} split of {corpus_dir} has no cells, nothing to evaluate (the corpus build "
                         "warned about it: too few donors or cells for three splits; evaluate another split or fold)")
    model, processor = load_model(model_dir, trust_remote_code, device)
    vocabulary_sha256 = check_corpus_fits_model(corpus_dir, model.config, processor, other_corpus)
    values = split_value_lists(cells, processor.feature_extractor)
    if not constrained:
        texts, whole = generate_descriptions(model, processor, cells["gene_input_ids"], batch_size, max_new_tokens,
                                             values)
        results, per_cell = score_descriptions(cells, texts, processor.ontology_term_ids, whole=whole)
    else:
        described = describe_constrained(model, processor, cells["gene_input_ids"], batch_size, values)
        texts = described["texts"]
        results, per_cell = score_descriptions(cells, texts, processor.ontology_term_ids, described["labels"])
        known = per_cell["cell_type_row"]
        described_known = {**described, **{k: [described[k][i] for i in known]
                                            for k in ("labels", "scores", "free_labels")}}
        results["cell_type_constraint"] = constraint_report(per_cell["cell_type_true"], described_known)
        results["field_calibration"] = field_calibration(cells, described, processor)
        per_cell["cell_type_score"] = described_known["scores"]
        per_cell["cell_type_free"] = described_known["free_labels"]
    if "pathways" in results and "train" in corpus and split != "train" and any(corpus["train"]["pathways"]):
        results["pathway_baseline"] = pathway_baseline(corpus["train"], cells)
    results.update(model=str(model_dir), dataset=str(corpus_dir), split=split,
                   constrained=constrained, trust_remote_code=trust_remote_code, dtype=str(model.dtype),
                   gene_encoder_prepared_on_corpus=bool(
                       getattr(model.config.gene_encoder_config, PREPARED_ENCODER_KEY, None)),
                   gene_vocabulary_sha256=vocabulary_sha256,
                   weights_sha256=tl.weights_sha256(model_dir), code_sha256=evaluated_code_sha256(model_dir,
                                                                                            trust_remote_code))
    per_cell["generated"] = texts
    return results, per_cell, texts


def evaluated_code_sha256(model_dir: str | Path, trust_remote_code: bool) -> str | None:
    """`code_sha256` of the code that ran: with `trust_remote_code` the folder's model and processor modules (and
    what they import) and the installed decoder, else the installed package's copies of every file the folder
    names. None for a Hub id or a folder naming no code."""
    if not (Path(model_dir) / "config.json").is_file():
        return None
    return code_sha256(model_dir, "model" if trust_remote_code else "none")


def pathway_baseline(train, cells) -> dict:
    """The pathway metrics of naming the training split's most frequent pathways for every cell
    (`most_frequent_pathways`), on the same cells: what a model that reads nothing of the cell's pathways scores
    (the demo model named that pair for every cell)."""
    names = most_frequent_pathways(train["pathways"])
    return {"pathways": names, **pathway_report([list(p) for p in cells["pathways"]], [names] * len(cells))}


def main(argv: Sequence[str] | None = None) -> Path:
    from cell2text_cli import positive_int
    from modeling_cell2text.argument_types import refused_input_as_one_line
    from modeling_cell2text.output_files import check_new_output
    from training.evaluation.report import RESULTS_FILE, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A trained Cell2Text folder.")
    parser.add_argument("--corpus", required=True, help="The corpus folder (python -m processing.build_corpus).")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="Report folder.")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--max-new-tokens", type=positive_int, default=160,
                        help="Longest description with --free (the default, constrained, writes each one whole).")
    parser.add_argument("--max-cells", type=positive_int, default=None)
    parser.add_argument("--free", action="store_true",
                        help="Free generation: the cell type as the model writes it (default: a known label).")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Run the code saved in the model folder (default: this project's classes).")
    parser.add_argument("--device", default="auto", help='"auto" (the GPU when there is one), "cpu", "cuda", ...')
    parser.add_argument("--overwrite", action="store_true", help="Replace the report folder --out if it holds one.")
    parser.add_argument("--other-corpus", action="store_true",
                        help="Evaluate on a corpus other than the one the model was trained on (its cells must be new "
                             "to the model; another build of the same data would put training cells in the test split).")
    args = parser.parse_args(argv)
    with refused_input_as_one_line("evaluate"):
        check_new_output(Path(args.out), args.overwrite, holds=RESULTS_FILE)  # before the generation (minutes)
        results, per_cell, _ = evaluate_model(
            args.model, args.corpus, args.split, args.batch_size, args.max_new_tokens, args.max_cells,
            constrained=not args.free, trust_remote_code=args.trust_remote_code, device=args.device,
            other_corpus=args.other_corpus,
        )
        report = write_report(results, per_cell, args.out, overwrite=args.overwrite)
    print(f"Report: {report}")
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
