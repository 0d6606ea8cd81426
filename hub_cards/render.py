"""Render Cell2Text's model card and dataset card from evaluation results and corpus summaries.

The templates beside this file are Jinja2, as ``huggingface_hub``'s ``ModelCard.from_template``
and ``DatasetCard.from_template`` use them. Numbers arrive as dicts written by the evaluation
and corpus-building code; a value that is absent or not finite is left out of the card
(never written as "nan").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from modeling_cell2text.description_schema import LABEL_FIELD_NAMES
from .names import (
    CALIBRATION_HEADER,
    FIELD_METRICS,
    METHOD_NAMES,
    NO_VALUE,
    PATHWAY_BASELINE_NAME,
    PATHWAY_METRICS,
    TEXT_METRICS,
    MetricName,
    calibration_rows,
    field_title,
    finite_number,
    format_value,
)

TEMPLATE_DIR = Path(__file__).parent
MODEL_CARD_TEMPLATE = TEMPLATE_DIR / "model_card_template.md"
DATASET_CARD_TEMPLATE = TEMPLATE_DIR / "dataset_card_template.md"

# The Hub has no "cell-to-text" task type; model-index entries name text generation, the closest valid one. The
# card sets no pipeline_tag and `inference: false`: a text-prompt widget cannot feed a cell to the model.
TASK_TYPE = "text-generation"
TASK_NAME = "Cell to text"
# Metric ids the Hub knows; the project's own (parse_rate, ontology_similarity...) stay in model-index.
STANDARD_METRICS = {"accuracy", "f1", "precision", "recall", "bleu", "rouge", "meteor"}
DEFAULT_TAGS = (
    "cell2text", "cell-to-text", "single-cell", "scRNA-seq", "biology", "geneformer", "trl", "sft", "custom_code",
)
MAX_LABEL_ROWS = 40
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def dataset_url(repo_id: str) -> str:
    """A Hub dataset repo's page."""
    return f"https://huggingface.co/datasets/{repo_id}"


def is_repo_id(name: str | None) -> bool:
    """True for strings shaped like a Hub repository id ("org/name"), not local paths."""
    return bool(name) and bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def names_hub_repo(name: str | Path) -> bool:
    """Whether a path-or-id argument names a Hub repository ("org/name") rather than a local folder: shaped like a
    repo id, and neither it nor its first component is a local path (so a mistyped "outputs/corpus" gets the local
    error, not a Hub lookup)."""
    return is_repo_id(str(name)) and not Path(str(name).split("/", 1)[0]).exists()


def is_local_path(name: str) -> bool:
    """True for strings that name a file or folder on some machine rather than a Hub id or a plain name."""
    text = str(name)
    if is_repo_id(text):
        return False
    if text.startswith(("/", "~", "./", "../", "\\")) or re.match(r"^[A-Za-z]:[\\/]", text):
        return True
    has_separator = "/" in text or "\\" in text
    return (has_separator and not any(c.isspace() for c in text)) or (has_separator and Path(text).exists())


def public_name(name: Any) -> Any:
    """``name`` as it may appear on a card: a local path becomes its last component (never the path)."""
    if isinstance(name, (str, Path)) and is_local_path(str(name)):
        return Path(str(name).rstrip("/\\")).name.rsplit("\\", 1)[-1] or "local"
    return name


def _slug(name: str) -> str:
    """A dataset type for model-index entries where the data has no Hub id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "local-corpus"


def _table(header: list[str], rows: list[list[str]]) -> dict | None:
    """A table for the templates' ``table`` macro, or None when it has no rows."""
    return {"header": header, "rows": rows} if rows else None


# ---------------------------------------------------------------- model card


def _eval_results(results: Mapping[str, Any], dataset_id: str) -> list[EvalResult]:
    """Flatten the results dict into the Hub's model-index entries (finite values only).

    The dataset is named by its Hub id, else by the public name of what was evaluated (never a local path).
    """
    split = results.get("split")
    dataset_name = str(public_name(results.get("dataset") or dataset_id))
    dataset_type = dataset_id if is_repo_id(dataset_id) else _slug(dataset_name)
    entries: list[EvalResult] = []

    def add(metric_type: str, value: Any, name: str, config: str | None = None, args: dict | None = None) -> None:
        number = finite_number(value)
        if number is not None:
            entries.append(
                EvalResult(
                    task_type=TASK_TYPE,
                    task_name=TASK_NAME,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_value=round(number, 4),
                    metric_name=name,
                    metric_config=config,
                    metric_args=args,
                )
            )

    add("parse_rate", results.get("parse_rate"), "Parse rate")
    for field in LABEL_FIELD_NAMES:
        scores = results.get("fields", {}).get(field, {})
        for metric in FIELD_METRICS:
            if metric.hub_type:
                add(metric.hub_type, scores.get(metric.key), f"{field_title(field)}: {metric.title}", field,
                    metric.hub_args)
    pathways = results.get("pathways", {})
    for metric in PATHWAY_METRICS:
        if metric.hub_type:
            add(metric.hub_type, pathways.get(metric.key), f"Pathways: {metric.title}", "pathways", metric.hub_args)
    text = results.get("text", {})
    for metric in TEXT_METRICS:
        if metric.hub_type:
            add(metric.hub_type, text.get(metric.key), metric.title, metric.key, metric.hub_args)
    return entries


def _field_table(fields: Mapping[str, Mapping[str, Any]]) -> dict | None:
    rows = []
    for field in LABEL_FIELD_NAMES:
        scores = fields.get(field) or {}
        if all(finite_number(scores.get(m.key)) is None for m in FIELD_METRICS if m.hub_type):
            continue
        rows.append([field_title(field)] + [format_value(scores.get(m.key)) for m in FIELD_METRICS])
    return _table(["Field"] + [m.title for m in FIELD_METRICS], rows)


def _baseline_table(results: Mapping[str, Any], model_title: str) -> dict | None:
    """Compare the model with each baseline, field by field, on accuracy and weighted F1."""
    baselines = results.get("baselines") or {}
    if not baselines:
        return None
    methods = [(model_title, results.get("fields", {}))]
    methods += [(METHOD_NAMES.get(key, key), scores) for key, scores in baselines.items()]
    rows = []
    for field in LABEL_FIELD_NAMES:
        for method, per_field in methods:
            scores = per_field.get(field) or {}
            if any(finite_number(scores.get(key)) is not None for key in ("accuracy", "weighted_f1")):
                rows.append([field_title(field), method, format_value(scores.get("accuracy")),
                             format_value(scores.get("weighted_f1"))])
    return _table(["Field", "Method", "Accuracy", "Weighted F1"], rows)


def _metric_table(scores: Mapping[str, Any], metrics: tuple[MetricName, ...]) -> dict | None:
    rows = [[m.title, format_value(scores.get(m.key))] for m in metrics if finite_number(scores.get(m.key)) is not None]
    return _table(["Metric", "Value"], rows)


def _pathway_table(results: Mapping[str, Any]) -> dict | None:
    """The pathway metrics, beside the baseline's where the evaluation measured it."""
    pathways, baseline = results.get("pathways") or {}, results.get("pathway_baseline")
    if not baseline:
        return _metric_table(pathways, PATHWAY_METRICS)
    rows = [[m.title, format_value(pathways.get(m.key)), format_value(baseline.get(m.key))] for m in PATHWAY_METRICS
            if finite_number(pathways.get(m.key)) is not None]
    return _table(["Metric", "Cell2Text", PATHWAY_BASELINE_NAME], rows)


def _training_table(training_config: Mapping[str, Any]) -> dict | None:
    """Settings as a table; local paths among the values are shown by their last component only."""
    rows = [[f"`{key}`", f"`{public_name(value)}`"] for key, value in training_config.items() if value is not None]
    return _table(["Setting", "Value"], rows)


def _ontology_table(versions: Mapping[str, str]) -> dict | None:
    """Ontology releases the labels and definitions come from (``processing.ontology_versions``)."""
    rows = [["CELLxGENE schema" if name == "cellxgene_schema" else name, f"`{version}`"]
            for name, version in versions.items()]
    return _table(["Ontology", "Version"], rows)


def _suspension_table(counts: Mapping[str, int] | None) -> dict | None:
    """The training corpus's kept cells per CELLxGENE obs `suspension_type` (its summary.json `suspension_types`)."""
    return _table(["Suspension type", "Cells"], [[str(kind), str(n)] for kind, n in (counts or {}).items()])


def _limitations(results: Mapping[str, Any], encoder: str, extra: list[str]) -> list[str]:
    """Limits stated from the facts in the arguments, then any the caller adds."""
    items = []
    steps = results.get("max_steps")  # the main job's --max-steps: a smoke run of every stage
    if isinstance(steps, int) and steps > 0:
        items.append(f"A smoke run: trained {steps} step{'s' if steps > 1 else ''} only (--max-steps), not the "
                     "recipe's training; the figures below are not the recipe's.")
    num_cells = results.get("num_cells")
    if isinstance(num_cells, int) and num_cells < 1000:
        items.append(f"Demo scale: evaluated on {num_cells} cells only, so the numbers below are noisy.")
    prepared = results.get("gene_encoder_prepared_on_corpus")  # the evaluated model's record; else from the name
    if prepared or (prepared is None and not is_repo_id(encoder)):
        items.append(
            f"The gene encoder ({public_name(encoder)}) was not initialised from pretrained Geneformer weights; "
            "it learned from the fine-tuning corpus alone."
        )
    items += [
        "Trained on the cell types, tissues and diseases of its corpus: cells from other tissues, "
        "species, assays or unseen cell types get the closest known description, stated with confidence.",
        "Inputs must be raw counts; normalised or log-transformed matrices are refused unless declared.",
        "A language model can produce fluent but wrong descriptions; check them against marker genes.",
    ]
    return items + list(extra)


# How the card's introduction names each labelled field (`description_schema.LABEL_FIELDS`).
FIELD_WORDS = {"cell_type": "cell type", "tissue": "tissue", "disease": "disease state", "sex": "sex",
               "age_group": "developmental stage"}


def _described_fields(results: Mapping[str, Any]) -> str:
    """What the model writes, for the introduction: the fields it was evaluated on (a model whose corpus had no sex
    or age group labels writes neither), else every field; and the pathways."""
    evaluated = [FIELD_WORDS[name] for name in FIELD_WORDS if name in results.get("fields", {})]
    words = (evaluated or list(FIELD_WORDS.values())) + ["active pathways"]
    return ", ".join(words[:-1]) + " and " + words[-1]


def render_model_card(
    results: dict,
    *,
    repo_id: str,
    base_model: str,
    encoder: str,
    dataset_id: str,
    training_config: dict,
    license: str = "apache-2.0",
    limitations: list[str] | None = None,
    tags: list[str] | None = None,
    ontology_versions: Mapping[str, str] | None = None,
    code_url: str | None = None,
    suspension_types: Mapping[str, int] | None = None,
) -> ModelCard:
    """Fill the model card from an evaluation results dict (see ``training`` evaluation output).

    ``base_model``, ``encoder`` and ``dataset_id`` go into the metadata only when they are Hub repository ids;
    local paths are named in the text by their last component only, so no path of the training machine reaches
    the card. ``limitations`` adds lines to the card's limits section. ``ontology_versions`` (the corpus summary's,
    see ``processing.ontology_versions``; else ``results["ontology_versions"]``) lists the ontology releases the
    labels come from. ``code_url`` is the project's repository, for the install line. ``suspension_types`` (the
    corpus summary's: kept cells per obs `suspension_type`, "cell" or "nucleus") says what the model was trained on
    ({}: a corpus whose obs did not say; None: nothing is said).
    """
    if not is_repo_id(repo_id):
        raise ValueError(f"repo_id must be a Hub repository id of the form 'org/name', got {repo_id!r}.")
    model_name = repo_id.split("/")[-1]
    eval_results = _eval_results(results, dataset_id)
    ontology_versions = ontology_versions or results.get("ontology_versions") or {}
    text_scores = results.get("text", {})
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        inference=False,
        tags=list(DEFAULT_TAGS) + list(tags or []),
        base_model=base_model if is_repo_id(base_model) else None,
        datasets=[dataset_id] if is_repo_id(dataset_id) else None,
        language=["en"],
        metrics=sorted({r.metric_type for r in eval_results} & STANDARD_METRICS) or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    parse_rate = finite_number(results.get("parse_rate"))
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_title=model_name,
        described_fields=_described_fields(results),
        repo_id=repo_id,
        code_url=code_url,
        base_model=f"`{public_name(base_model)}`",
        encoder=f"`{public_name(encoder)}`",
        dataset_id=public_name(dataset_id),
        dataset_url=dataset_url(dataset_id) if is_repo_id(dataset_id) else None,
        license=license,
        limitations=_limitations(results, encoder, limitations or []),
        split=results.get("split", "test"),
        eval_dataset=public_name(results.get("dataset") or dataset_id),
        num_cells=results.get("num_cells", NO_VALUE),
        parse_rate=NO_VALUE if parse_rate is None else f"{parse_rate:.1%}",
        num_unparsed=results.get("num_unparsed", NO_VALUE),
        field_table=_field_table(results.get("fields", {})),
        baseline_table=_baseline_table(results, model_name),
        pathway_table=_pathway_table(results),
        calibration_table=_table(CALIBRATION_HEADER, calibration_rows(results.get("field_calibration") or {})),
        text_table=_metric_table(text_scores, TEXT_METRICS),
        bleu_signature=text_scores.get("bleu_signature"),
        training_table=_training_table(training_config),
        ontology_table=_ontology_table(ontology_versions),
        suspension_types_known=suspension_types is not None,
        suspension_table=_suspension_table(suspension_types),
    )


#: The arguments of `render_model_card` other than the results and the repo id, saved beside the card so that
#: `hub_cards.publish` can re-render it for the repo it publishes to.
MODEL_CARD_INPUTS = "model_card_inputs.json"
#: The evaluation results a saved card was rendered from.
EVALUATION_RESULTS = "evaluation_results.json"


def save_model_card(model_dir: str | Path, results: dict, *, repo_id: str, **inputs: Any) -> ModelCard:
    """Render the model card into ``model_dir/README.md`` and keep what it was rendered from.

    Writes ``evaluation_results.json`` (``results``, absolute paths reduced to their last component) and
    ``model_card_inputs.json`` (``inputs``, the other arguments of :func:`render_model_card`, with local paths
    reduced to their last component) beside it.
    """
    model_dir = Path(model_dir)
    public = {key: value if key == "limitations" else _public_value(value) for key, value in inputs.items()}
    card = render_model_card(results, repo_id=repo_id, **public)
    card.save(model_dir / "README.md")
    (model_dir / EVALUATION_RESULTS).write_text(
        json.dumps(without_machine_paths(results), indent=2, default=str) + "\n")
    (model_dir / MODEL_CARD_INPUTS).write_text(json.dumps(public, indent=2, default=str) + "\n")
    return card


def read_folder_json(path: str | Path) -> dict:
    """A JSON object file of a model folder (config.json, the saved evaluation, ...); one that does not parse or
    holds another JSON value is refused naming it (publishing ended in a JSONDecodeError or AttributeError)."""
    try:
        content = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = f"does not parse ({error})"
    else:
        problem = None if isinstance(content, dict) else f"holds a JSON {type(content).__name__}, not an object"
    if problem:
        raise ValueError(f"{path} {problem}: restore the file, or save the model folder again "
                         "(modeling_cell2text.save_model_folder; training.sft and the evaluation write it).")
    return content


def rerender_model_card(model_dir: str | Path, repo_id: str, dataset_id: str | None = None,
                        save: bool = True) -> ModelCard | None:
    """Re-render ``model_dir/README.md`` for ``repo_id`` from the files :func:`save_model_card` wrote, naming
    ``dataset_id`` (the corpus's Hub repo, published with it) where given; written there unless ``save=False``.

    Returns the card, or None (card left as it is) where the folder lacks either file.
    """
    model_dir = Path(model_dir)
    results_file, inputs_file = model_dir / EVALUATION_RESULTS, model_dir / MODEL_CARD_INPUTS
    if not (results_file.is_file() and inputs_file.is_file()):
        return None
    inputs = read_folder_json(inputs_file)
    if dataset_id is not None:
        inputs["dataset_id"] = dataset_id
    card = render_model_card(read_folder_json(results_file), repo_id=repo_id, **inputs)
    if save:
        card.save(model_dir / "README.md")
    return card


def _is_machine_path(value: Any) -> bool:
    """An absolute path (POSIX, or a Windows drive) or one in the home folder ("~/..."): a path of the machine that
    wrote it, which `public_name` reduces to its last component. Labels such as "T/NK cell" are not."""
    text = str(value) if isinstance(value, (str, Path)) else ""
    return len(text) > 1 and (text.startswith(("/", "~/")) or re.match(r"^[A-Za-z]:[\\/]", text) is not None)


def without_machine_paths(value: Any) -> Any:
    """``value`` with every absolute path in it (also inside dicts and lists) reduced to its last component: the
    saved evaluation is uploaded beside the card. Other strings stay as they are."""
    if isinstance(value, Mapping):
        return {key: without_machine_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_machine_paths(item) for item in value]
    return public_name(str(value)) if _is_machine_path(value) else value


def machine_paths(value: Any) -> list[str]:
    """The absolute paths in ``value`` (also inside dicts and lists): what ``without_machine_paths`` reduces."""
    if isinstance(value, Mapping):
        return [path for item in value.values() for path in machine_paths(item)]
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in machine_paths(item)]
    return [str(value)] if _is_machine_path(value) else []


def _public_value(value: Any) -> Any:
    """``value`` with every local path in it (also inside dicts and lists) reduced by :func:`public_name`."""
    if isinstance(value, Mapping):
        return {key: _public_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public_value(item) for item in value]
    return public_name(value)


# -------------------------------------------------------------- dataset card


def size_category(num_examples: int) -> str:
    """The Hub's ``size_categories`` bucket for a number of examples."""
    buckets = (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
    )
    for limit, label in buckets:
        if num_examples < limit:
            return label
    return "n>100M"


def _split_table(splits: Mapping[str, int]) -> dict | None:
    total = sum(splits.values())
    rows = [[name, str(n), f"{n / total:.1%}" if total else NO_VALUE] for name, n in splits.items()]
    if rows:
        rows.append(["**total**", str(total), "100.0%" if total else NO_VALUE])
    return _table(["Split", "Cells", "Share"], rows)


def _label_table(per_split: Mapping[str, Mapping[str, int]], split_order: list[str]) -> dict | None:
    """Labels by split, most frequent first; the tail beyond MAX_LABEL_ROWS is summed in one row."""
    splits = [s for s in split_order if s in per_split] + [s for s in per_split if s not in split_order]
    totals: dict[str, int] = {}
    for counts in per_split.values():
        for label, n in counts.items():
            totals[label] = totals.get(label, 0) + int(n)
    ordered = sorted(totals, key=lambda label: (-totals[label], label))
    rows = [
        [str(label)] + [str(per_split[s].get(label, 0)) for s in splits] + [str(totals[label])]
        for label in ordered[:MAX_LABEL_ROWS]
    ]
    rest = ordered[MAX_LABEL_ROWS:]
    if rest:
        rows.append(
            [f"*{len(rest)} more labels*"]
            + [str(sum(per_split[s].get(label, 0) for label in rest)) for s in splits]
            + [str(sum(totals[label] for label in rest))]
        )
    return _table(["Label"] + splits + ["Total"], rows)


def render_dataset_card(summary: dict, *, repo_id: str | None = None, license: str | None = None,
                        folder: str | None = None) -> DatasetCard:
    """Fill the dataset card from a corpus summary dict (see ``processing``'s corpus builder).

    Its usage loads the corpus from ``repo_id``, the Hub dataset it is published to; without one (not published),
    from its ``folder`` on disk (the name only: no path of the building machine reaches the card).
    The license comes from ``license``, else ``summary["license"]``, else "unknown": the
    source data's terms decide it, and the card must not guess.
    """
    folder = public_name(folder or "corpus")
    splits = {name: int(n) for name, n in (summary.get("splits") or {}).items()}
    num_kept = sum(splits.values())
    license = license or summary.get("license") or "unknown"
    source = public_name(summary.get("source"))
    card_data = DatasetCardData(
        license=license,
        language=["en"],
        pretty_name=public_name(summary.get("name")) or (repo_id or folder).split("/")[-1],
        task_categories=["text-generation", "tabular-to-text"],
        tags=["biology", "single-cell", "scRNA-seq", "cellxgene", "cell2text"],
        size_categories=[size_category(num_kept)],
        source_datasets=[f"extended|{source}"] if is_repo_id(source) else None,
    )
    rejected = summary.get("rejected") or {}
    label_counts = summary.get("label_counts") or {}
    return DatasetCard.from_template(
        card_data,
        template_path=str(DATASET_CARD_TEMPLATE),
        repo_id=repo_id,
        folder=folder,
        source=source or NO_VALUE,
        license=license,
        num_cells_in=summary.get("num_cells_in", NO_VALUE),
        num_cells_kept=num_kept,
        demo_scale=num_kept < 10_000,
        gene_vocabulary_size=summary.get("gene_vocabulary_size", NO_VALUE),
        pathway_library=summary.get("pathway_library") or NO_VALUE,
        seed=summary.get("seed", NO_VALUE),
        ontology_table=_ontology_table(summary.get("ontology_versions") or {}),
        split_table=_split_table(splits) or _table(["Split", "Cells", "Share"], [[NO_VALUE, "0", NO_VALUE]]),
        rejected_table=_table(["Reason", "Cells"], [[reason, str(n)] for reason, n in rejected.items() if n]),
        summary=summary,  # the corpus builder's summary, for fields the template shows when present
        label_tables=[
            (field_title(field), table)
            for field, per_split in label_counts.items()
            if (table := _label_table(per_split, list(splits)))
        ],
    )


#: Metadata keys that ``datasets``' ``push_to_hub`` writes into the dataset card (features, splits, data files).
DATASETS_METADATA_KEYS = ("dataset_info", "configs")


def write_dataset_card(corpus_dir: str | Path, repo_id: str | None = None, folder: str | None = None) -> DatasetCard:
    """Render the card of a built corpus (from its summary.json) and save it as its README.md: for `repo_id`, the
    Hub dataset it is published to, or (None) for loading it from its `folder` (default: `corpus_dir`'s name)."""
    from processing.corpus import read_summary

    corpus_dir = Path(corpus_dir)
    card = render_dataset_card(read_summary(corpus_dir / "summary.json"), repo_id=repo_id,
                               folder=folder or corpus_dir.resolve().name)
    card.save(str(corpus_dir / "README.md"))
    return card


def merge_dataset_card(card: DatasetCard, pushed: DatasetCard | None) -> DatasetCard:
    """``card`` (text and metadata) plus the metadata ``datasets`` wrote when it pushed the data (``pushed``).

    ``datasets.DatasetDict.push_to_hub`` writes a card whose metadata describes the uploaded files
    (``dataset_info``, ``configs``); pushing a rendered card over it would drop them. The merged card keeps those
    keys from ``pushed`` and everything else from ``card``.
    """
    if pushed is None:
        return card
    data = card.data.to_dict()
    theirs = pushed.data.to_dict()
    data.update({key: theirs[key] for key in DATASETS_METADATA_KEYS if key in theirs})
    return DatasetCard(f"---\n{DatasetCardData(**data).to_yaml()}\n---\n{card.text}")


def push_dataset_card(card: DatasetCard, repo_id: str, token: str | None = None) -> DatasetCard:
    """Push ``card`` to the dataset repo after the data, keeping the metadata ``datasets`` wrote; returns it.

    Call it after ``DatasetDict.push_to_hub(repo_id)``.
    """
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        pushed = DatasetCard.load(repo_id, repo_type="dataset", token=token)
    except (EntryNotFoundError, RepositoryNotFoundError):
        pushed = None
    merged = merge_dataset_card(card, pushed)
    merged.push_to_hub(repo_id, repo_type="dataset", token=token)
    return merged
