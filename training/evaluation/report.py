"""Evaluation report writer: Markdown tables, results.json and PNG plots.

Results contract (written by the evaluation code, read here and by the model-card filler).
Every key other than ``model`` may be absent; absent entries are left out of the tables,
never printed as nan::

    {"model": str, "dataset": str, "split": str, "num_cells": int,
     "parse_rate": float,            # fraction of generated descriptions that parsed
     "num_unparsed": int,
     "fields": {                     # one entry per parsed field
         "cell_type": {"accuracy", "weighted_f1", "macro_precision", "macro_recall",
                       "num_missing", "ontology_similarity" (optional)},
         "tissue": {...}, "disease": {...}, "sex": {...}, "age_group": {...}},  # in LABEL_FIELDS order
     "pathways": {"subset_accuracy", "jaccard", "f1", "num_distinct_predicted"},
     "pathway_baseline": {"pathways", ...},  # the training split's most frequent pathways for every cell, scored alike
     "text": {"bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "meteor",
              "embedding_similarity"},
     "baselines": {                  # any subset, evaluated on the same cells
         "majority": {"cell_type": {"accuracy", "weighted_f1", ...}},
         "logistic_regression": {...}, "knn": {...}, "cell2sentence": {...}},
     "cell_type_constraint": {       # constrained decoding (training.evaluation.evaluate.constraint_report)
         "num_candidates", "num_invented", "invented_labels": {label: cells}, "num_free_unparsed",
         "free_accuracy", "constrained_accuracy",
         "calibration": {"ece", "mean_confidence", "accuracy", "bins": [{"lower", "upper", "count",
                                                                          "mean_confidence", "accuracy"}]}},
     "field_calibration": {field: {...}},  # per scored field (evaluate.field_calibration)
     "cell2sentence_parse_rate": float, "gene_encoder_selection": {...}, "gene_vocabulary_sha256": str,
     "split_seed": int, "fold": {...}, "max_steps": int,  # the corpus split or fold this run evaluated, its step cap
     "quality_benchmark": {...}}     # benchmarks/quality.py's JSON (docs/quality_benchmark.json), shown beside

``training.evaluation.metrics.classification_report``, ``pathway_report``,
``training.evaluation.text_metrics.text_report`` and ``training.baselines.expression.baseline_reports`` return
these inner dicts.

Per-cell arrays (all optional; one entry per evaluated cell of a known type, except ``generated``, one per cell),
the plots' inputs::

    {"cell_type_true": list[str], "cell_type_pred": list[str | None], "cell_type_row": list[int],
     "cell_id": list[str], "ontology_similarity": list[float], "cell_type_score": list[float],
     "cell_type_free": list[str | None], "generated": list[str]}

``write_report`` writes ``report.md``, ``results.json`` (the results dict as given),
``per_cell.json`` and, when their per-cell arrays are present, ``confusion_matrix.png``,
``per_class_accuracy.png`` and ``ontology_similarity.png``; ``reliability_diagram.png`` when the
results hold a calibration.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from modeling_cell2text.description_schema import LABEL_FIELD_NAMES
from modeling_cell2text.output_files import check_new_output, publish_folder
from training.evaluation.metrics import per_class_accuracy
from hub_cards.names import (
    CALIBRATION_HEADER,
    FIELD_METRICS,
    METHOD_NAMES,
    PATHWAY_BASELINE_NAME,
    PATHWAY_METRICS,
    TEXT_METRICS,
    MetricName,
    calibration_rows,
    finite_number,
    format_value,
)

MAX_CONFUSION_CLASSES = 30
UNPARSED = "(unparsed)"
OTHER = "(other)"
OTHER_WRONG = "(other, not the true type)"
RESULTS_FILE = "results.json"  # marks a report folder (which --overwrite may replace)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _ordered_fields(names) -> list[str]:
    names = list(names)
    return [f for f in LABEL_FIELD_NAMES if f in names] + sorted(f for f in names if f not in LABEL_FIELD_NAMES)


def _present(value) -> bool:
    return finite_number(value) is not None


def _metric_columns(entries: Sequence[dict], metrics: Sequence[MetricName]) -> list[MetricName]:
    """Metrics present (finite) in at least one entry, in the canonical order."""
    return [m for m in metrics if any(_present(e.get(m.key)) for e in entries)]


def _fields_section(fields: dict) -> list[str]:
    names = [f for f in _ordered_fields(fields) if fields[f]]
    columns = _metric_columns([fields[f] for f in names], FIELD_METRICS)
    if not names or not columns:
        return []
    rows = [[f] + [format_value(fields[f].get(m.key)) for m in columns] for f in names]
    return ["## Per-field metrics", ""] + _table(["Field"] + [m.title for m in columns], rows)


def _baselines_section(results: dict) -> list[str]:
    baselines = results.get("baselines") or {}
    if not baselines:
        return []
    methods = {"Cell2Text": results.get("fields") or {}, **baselines}
    lines = ["## Cell2Text vs baselines (same cells)", ""]
    for field in _ordered_fields({f for b in baselines.values() for f in b}):
        entries = {name: m[field] for name, m in methods.items() if m.get(field)}
        columns = _metric_columns(list(entries.values()), FIELD_METRICS)
        if not columns:
            continue
        rows = [[name] + [format_value(e.get(m.key)) for m in columns] for name, e in entries.items()]
        lines += [f"### {field}", ""]
        lines += _table(["Method"] + [m.title for m in columns], rows)
    return lines


def _flat_section(title: str, values: dict | None, metrics: Sequence[MetricName]) -> list[str]:
    columns = _metric_columns([values or {}], metrics)
    if not columns:
        return []
    return [f"## {title}", ""] + _table([m.title for m in columns], [[format_value(values[m.key]) for m in columns]])


def _pathway_section(results: dict) -> list[str]:
    """The model's pathway metrics beside the baseline's (the training split's most frequent pathways, every cell)."""
    rows = [("Cell2Text", results.get("pathways"))]
    if results.get("pathway_baseline"):
        rows.append((PATHWAY_BASELINE_NAME, results["pathway_baseline"]))
    rows = [(name, values) for name, values in rows if values]
    columns = _metric_columns([values for _, values in rows], PATHWAY_METRICS)
    if not columns:
        return []
    lines = ["## Pathways", ""] + _table(["Method"] + [m.title for m in columns],
                                          [[name] + [format_value(values.get(m.key)) for m in columns]
                                           for name, values in rows])
    if results.get("pathway_baseline"):
        lines += [f"The baseline names {', '.join(results['pathway_baseline']['pathways'])} for every cell.", ""]
    return lines


def _encoder_section(results: dict) -> list[str]:
    """The corpus-prepared encoder candidates and their validation accuracy (the chosen one marked)."""
    selection = results.get("gene_encoder_selection")
    if not selection:
        return []
    rows = []
    for i, (candidate, accuracy) in enumerate(zip(selection["candidates"], selection["validation_accuracy"])):
        inputs = "value-aware (rank + expression bin)" if candidate.get("value_aware") else "rank-value"
        rows.append([str(candidate["num_hidden_layers"]), str(candidate["hidden_size"]), inputs, format_value(accuracy),
                     "chosen" if i == selection["best"] else ""])
    rule = selection.get("selection_rule")
    lines = ["## Gene encoder chosen on the validation split", ""]
    if rule:
        lines += [f"Chosen by the {rule} (the candidates in the order below; differences validation cannot resolve "
                  "do not change the choice).", ""]
    return lines + _table(["Layers", "Width", "Input", "Validation cell-type accuracy (probe)", ""], rows)


def _constraint_section(results: dict) -> list[str]:
    """Constrained cell types: what free generation would have invented, and the calibration of the confidences."""
    c = results.get("cell_type_constraint")
    if not c:
        return []
    lines = [
        "## Cell type constrained to the known labels", "",
        f"Each cell's type is the most likely of the {c['num_candidates']} cell-type labels of the training corpus "
        "(each a Cell Ontology term), scored by the log-likelihood of its sentence; its probability among them is "
        "the cell's confidence (`cell_type_score`).", "",
    ]
    lines += _table(["", "Cell-type accuracy"],
                    [["Constrained (reported above)", format_value(c["constrained_accuracy"])],
                     ["Free generation (same model, greedy)", format_value(c["free_accuracy"])]])
    invented = c.get("invented_labels") or {}
    lines.append(f"Labels free generation would have invented (not among the known labels): {c['num_invented']} "
                 f"cells; first sentence unparsed: {c['num_free_unparsed']} cells.")
    if invented:
        lines += [""] + [f"- \"{label}\": {n}" for label, n in invented.items()]
    lines.append("")
    calibration = c.get("calibration")
    if calibration:
        lines += [f"Calibration: expected calibration error {format_value(calibration['ece'])} (10 equal-width "
                  f"bins); mean confidence {format_value(calibration['mean_confidence'])}, accuracy "
                  f"{format_value(calibration['accuracy'])}.", ""]
    per_field = results.get("field_calibration") or {}
    if per_field:
        lines += ["Every field is chosen among its known labels; the calibration of each field's probability "
                  "(`<field>_score`):", ""]
        lines += _table(CALIBRATION_HEADER, calibration_rows(per_field))
    return lines



BENCHMARK_METRICS = {
    "accuracy": "Cell-type accuracy",
    "weighted_f1": "Weighted F1",
    "ontology_similarity": "Ontology similarity (CL)",
    "parse_rate": "Parse rate",
}


def method_figures(results: dict) -> dict[str, dict[str, float]]:
    """Per method, the cell-type figures of one evaluated split (a results dict of the main job)."""
    figures: dict[str, dict[str, float]] = {}
    cell_type = (results.get("fields") or {}).get("cell_type") or {}
    if cell_type:
        figures["cell2text"] = {**{m: cell_type[m] for m in ("accuracy", "weighted_f1", "ontology_similarity")
                                   if _present(cell_type.get(m))}, "parse_rate": results.get("parse_rate")}
        constraint = results.get("cell_type_constraint") or {}
        if constraint:
            figures["cell2text"].update(free_accuracy=constraint["free_accuracy"],
                                        ece=constraint["calibration"]["ece"], num_invented=constraint["num_invented"])
    for name, fields in (results.get("baselines") or {}).items():
        baseline = (fields or {}).get("cell_type") or {}
        if baseline:
            figures[name] = {m: baseline[m] for m in ("accuracy", "weighted_f1", "ontology_similarity")
                             if _present(baseline.get(m))}
    if "cell2sentence" in figures and _present(results.get("cell2sentence_parse_rate")):
        figures["cell2sentence"]["parse_rate"] = results["cell2sentence_parse_rate"]
    return {name: {m: v for m, v in f.items() if _present(v)} for name, f in figures.items()}


def _benchmark_section(results: dict) -> list[str]:
    """This run's split beside benchmarks/quality.py's cross-validation (checked into docs/): pooled over every
    test cell of its folds, accuracy with its 95% interval."""
    benchmark = results.get("quality_benchmark")
    if not benchmark:
        return []
    this_run = method_figures(results)
    pooled = benchmark["pooled"]
    folds = [fold["fold"] for fold in benchmark["folds"]]
    interrupted = (f" (incomplete: folds {', '.join(map(str, folds))} of {benchmark['num_folds']})"
                   if not benchmark.get("complete") else "")
    num_cells = max(figures.get("num_cells", 0) for figures in pooled.values())
    capped = benchmark.get("max_steps")  # a smoke run of the benchmark (--max-steps): not the recipe's figures
    caps = ["this run capped its training steps" if results.get("max_steps") else None,
            f"the benchmark's folds capped at {capped} training steps" if capped else None]
    recipe = f"the recipe ({'; '.join(c for c in caps if c)})" if any(caps) else "the same recipe"
    lines = [
        "## This split beside the cross-validated benchmark", "",
        f"`benchmarks/quality.py`: {recipe} in {benchmark['num_folds']}-fold cross-validation{interrupted}, "
        f"every one of its {num_cells} test cells tested once, measured {benchmark['date']} at commit "
        f"{benchmark['commit'][:10]} ({benchmark.get('device', 'device not recorded')}). Pooled over the folds' "
        "test cells; accuracy with its 95% interval. This run is one split.",
        "",
    ]
    seed, fold = results.get("split_seed"), results.get("fold")
    if fold:  # one of the benchmark's own folds: its split is no seed's
        run_label = f"This run (fold {fold['fold']} of {fold['num_folds']})"
    else:
        run_label = "This run" + (f" (one split, seed {seed})" if seed is not None else " (one split)")
    if results.get("max_steps"):
        run_label += f", {results['max_steps']} training steps only"
    rows = []
    for name, title in METHOD_NAMES.items():
        for metric, metric_title in BENCHMARK_METRICS.items():
            value = pooled.get(name, {}).get(metric)
            if value is None:
                continue
            interval = pooled[name].get(f"{metric}_ci95")
            shown = f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
            rows.append([title, metric_title, format_value(this_run.get(name, {}).get(metric)), shown])
    pooled_label = "Cross-validated (pooled)" + (f", {capped} training steps only" if capped else "")
    lines += _table(["Method", "Metric", run_label, pooled_label], rows)
    paired = benchmark.get("paired") or {}
    if paired:
        lines += ["Paired on the same test cells, pooled over the folds:", "", *paired_lines(paired), ""]
    return lines


def paired_lines(paired: dict[str, dict]) -> list[str]:
    """One Markdown bullet per baseline of benchmarks/quality.py's paired comparison with Cell2Text."""
    return [
        f"- Cell2Text - {METHOD_NAMES[name]}: {s['accuracy_difference']:+.3f} accuracy on {s['num_cells']} cells "
        f"(Cell2Text alone right on {s['cell2text_only']}, {METHOD_NAMES[name]} alone on {s['baseline_only']}; "
        f"exact McNemar p = {s['mcnemar_p']:.3g})"
        for name, s in paired.items()
    ]


def plot_reliability_diagram(calibration: dict, path: Path) -> Path:
    """Accuracy against mean confidence per confidence bin (bar width = bin), the diagonal, and cell counts."""
    bins = [b for b in calibration["bins"] if b["count"]]
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    width = calibration["bins"][0]["upper"] - calibration["bins"][0]["lower"]
    ax.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
           color="tab:blue", edgecolor="white", label="accuracy")
    ax.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black",
            label="mean confidence")
    for b in bins:
        ax.annotate(str(b["count"]), (b["lower"] + width / 2, b["accuracy"]), xytext=(0, 6), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("Confidence (probability of the chosen cell type)")
    ax.set_ylabel("Accuracy")
    ax.set_title(f"Reliability diagram (ECE {calibration['ece']:.3f}; numbers: cells)")
    ax.legend(loc="upper left", fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _header(results: dict) -> list[str]:
    lines = [f"# Evaluation report: {results.get('model', 'model')}", ""]
    facts = [
        ("Dataset", results.get("dataset")),
        ("Split", results.get("split")),
        ("Gene vocabulary sha256", results.get("gene_vocabulary_sha256")),
        ("Cells", results.get("num_cells")),
        ("Parse rate", results.get("parse_rate")),
        ("Unparsed descriptions", results.get("num_unparsed")),
        ("Training steps (a smoke run's --max-steps, not the recipe's)", results.get("max_steps")),
    ]
    for name, value in facts:
        if isinstance(value, str) and value:
            lines.append(f"- {name}: {value}")
        elif _present(value):
            lines.append(f"- {name}: {format_value(value)}")
    return lines + [""]


def _collapse_labels(
    true: Sequence[str], pred: Sequence[str | None], max_classes: int
) -> tuple[list[str], list[str], list[str]]:
    """Keep the ``max_classes`` most frequent true classes; others become OTHER, None UNPARSED. A prediction of a
    class folded into OTHER counts as OTHER only where it is the cell's true class, else as OTHER_WRONG: two rare
    types always swapped for each other showed as (other) -> (other), all correct."""
    keep = [label for label, _ in Counter(true).most_common(max_classes)]
    kept = set(keep)
    t = [x if x in kept else OTHER for x in true]
    p = [UNPARSED if x is None else x if x in kept else OTHER if x == truth else OTHER_WRONG
         for x, truth in zip(pred, true)]
    rows = keep + ([OTHER] if OTHER in t else [])
    return t, p, rows


def plot_confusion_matrix(
    true: Sequence[str], pred: Sequence[str | None], path: Path, max_classes: int = MAX_CONFUSION_CLASSES
) -> Path:
    """Row-normalised confusion matrix of the most frequent classes (+ other / unparsed)."""
    t, p, rows = _collapse_labels(true, pred, max_classes)
    cols = rows + [c for c in (OTHER, OTHER_WRONG, UNPARSED) if c in p and c not in rows]
    index = {label: i for i, label in enumerate(cols)}
    counts = np.zeros((len(rows), len(cols)))
    for a, b in zip(t, p):
        counts[index[a], index[b]] += 1
    frac = counts / counts.sum(axis=1, keepdims=True)
    size = 2 + 0.35 * len(cols)
    fig = Figure(figsize=(size + 2, size))
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title("Cell type confusion matrix (row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_per_class_accuracy(true: Sequence[str], pred: Sequence[str | None], path: Path) -> Path:
    """Horizontal bars of each true class's accuracy (recall), most frequent class on top."""
    stats = list(per_class_accuracy(true, pred).items())[:MAX_CONFUSION_CLASSES]
    fig = Figure(figsize=(7, 1 + 0.3 * len(stats)))
    ax = fig.add_subplot()
    ax.barh(range(len(stats)), [s["accuracy"] for _, s in stats], color="tab:blue")
    ax.set_yticks(range(len(stats)), [f"{label} (n={s['support']})" for label, s in stats], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("Accuracy")
    ax.set_title("Per-class accuracy (cell type)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_similarity_histogram(scores: Sequence[float], path: Path) -> Path:
    """Histogram of per-cell ontology similarity in [0, 1]."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(np.asarray(scores, dtype=float), bins=20, range=(0, 1), color="tab:green")
    ax.axvline(float(np.mean(scores)), color="black", linestyle="--", label="mean")
    ax.set_xlabel("Ontology similarity (1 = exact match)")
    ax.set_ylabel("Cells")
    ax.set_title("Cell type ontology similarity")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _plots(per_cell: dict, out_dir: Path, results: dict | None = None) -> list[tuple[str, Path]]:
    plots = []
    calibration = ((results or {}).get("cell_type_constraint") or {}).get("calibration")
    if calibration and calibration.get("num_cells"):
        path = plot_reliability_diagram(calibration, out_dir / "reliability_diagram.png")
        plots.append(("Reliability diagram", path))
    true, pred = per_cell.get("cell_type_true"), per_cell.get("cell_type_pred")
    if true and pred is not None:
        if len(true) != len(pred):
            raise ValueError(
                f"per_cell cell_type_true has {len(true)} entries but cell_type_pred has "
                f"{len(pred)}: pass one prediction (or None) per cell."
            )
        plots.append(("Confusion matrix", plot_confusion_matrix(true, pred, out_dir / "confusion_matrix.png")))
        plots.append(("Per-class accuracy", plot_per_class_accuracy(true, pred, out_dir / "per_class_accuracy.png")))
    scores = per_cell.get("ontology_similarity")
    if scores is not None and len(scores) > 0:
        plots.append(("Ontology similarity", plot_similarity_histogram(scores, out_dir / "ontology_similarity.png")))
    return plots


def _json_safe(value):
    """NaN/inf become null and numpy scalars plain numbers, so the JSON is strict."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(results: dict, per_cell: dict, out_dir, overwrite: bool = False) -> Path:
    """Write report.md, results.json, per_cell.json and the plots into ``out_dir``; return report.md.

    The files are written into a temporary folder beside ``out_dir`` and published together at the end
    (`output_files.publish_folder`): a failure leaves nothing, and a non-empty ``out_dir`` (also one another run
    published meanwhile) is replaced only with ``overwrite``."""
    out_dir = Path(out_dir).absolute()
    check_new_output(out_dir, overwrite, holds=RESULTS_FILE)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        _write_report_files(results, per_cell or {}, staging)
        publish_folder(staging, out_dir, overwrite, holds=RESULTS_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / "report.md"


def _write_report_files(results: dict, per_cell: dict, out_dir: Path) -> None:
    lines = _header(results)
    lines += _fields_section(results.get("fields") or {})
    lines += _baselines_section(results)
    lines += _constraint_section(results)
    lines += _benchmark_section(results)
    lines += _encoder_section(results)
    lines += _pathway_section(results)
    lines += _flat_section("Text metrics", results.get("text"), TEXT_METRICS)
    if (results.get("text") or {}).get("bleu_signature"):
        lines += [f"BLEU by sacrebleu: `{results['text']['bleu_signature']}`.", ""]
    plots = _plots(per_cell, out_dir, results)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{title}]({path.name})\n" for title, path in plots]
    (out_dir / RESULTS_FILE).write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False))
    (out_dir / "per_cell.json").write_text(json.dumps(_json_safe(per_cell), allow_nan=False))
    (out_dir / "report.md").write_text("\n".join(lines))

