"""Cell-type quality by k-fold cross-validation: every labelled cell of pbmc68k_reduced tested once.

```bash
python benchmarks/quality.py                          # 5 folds, seed 0, out outputs/quality
python benchmarks/quality.py --with-cell2sentence     # also the Cell2Sentence-style baseline (twice the time)
python benchmarks/quality.py --with-cell2sentence --one-training-at-a-time  # ... with Cell2Text on every thread
python benchmarks/quality.py --resume                 # after an interruption: keeps the folds already measured
python benchmarks/quality.py --rescore                # pooled figures again from the fold folders (no training)
cp outputs/quality/quality_benchmark.json docs/       # the main job's report then shows it beside its split
```

The cells are dealt into `--folds` folds, stratified by cell type (`processing.splits.assign_fold_splits`, seeded by
`--seed`). For each fold, `training.demo.run` builds the pbmc68k_reduced corpus with that fold as the test split
and validation drawn from the other folds (never the test fold: it picks the gene encoder, the best checkpoint and
the temperatures), trains Cell2Text with `training/configs/demo.yaml` (same budget as the main job) and scores on
the test fold: Cell2Text (schema-constrained), the discrete heads on its own encoder (the prepared encoder's probe
head, and logistic regression on the soft tokens the LLM reads), majority, logistic regression and kNN on the
expression, and with `--with-cell2sentence` the Cell2Sentence-style baseline.

Printed per fold and pooled over all test cells: accuracy with its 95% Wilson interval, weighted F1, Cell Ontology
similarity (every method's), Cell2Text's parse rate (the cell-weighted mean of the folds) and the expected
calibration error of its `cell_type_score` (of the pooled cells), and, pooled, Cell2Text against
every baseline on the same cells: the accuracy difference, the cells only one of them gets right and the exact
McNemar p-value. Written: `<out>/quality_benchmark.json` (per-fold figures and predictions per cell, pooled
figures, date, commit, device), rewritten after every fold with `"complete": false` until the last, so an
interrupted run keeps what it measured; `--resume` reuses the folds measured at the same commit with the same
settings in the same environment (each fold records its CPU, bf16 kernels, thread count on a CPU, GPU and package
versions). Uses the GPU when there is one. About 10 minutes per fold on 2 CPU cores (50 min for the 5 folds, measured
2026-12-05); not part of CI. It imports the project's modules as it goes, so run it from a checkout nobody edits
meanwhile (`git worktree add ../quality-run HEAD`; `--out` may point anywhere).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hub_cards.names import METHOD_NAMES  # noqa: E402
from cell2text_cli import positive_int  # noqa: E402
from training.evaluation.report import BENCHMARK_METRICS, method_figures, paired_lines  # noqa: E402

EXTRA_METRICS = ("free_accuracy", "ece", "num_invented")
# Figures that count cells: pooled as their total over the folds (the others, where the folds kept no figure per
# cell, as the folds' mean weighted by cells).
COUNT_METRICS = ("num_invented",)


def summarise(folds: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """Per method and metric: mean, sample sd (0 for one fold) and the number of folds it was measured on."""
    summary: dict[str, dict[str, dict]] = {}
    for fold in folds:
        for method, figures in fold["methods"].items():
            for metric, value in figures.items():
                summary.setdefault(method, {}).setdefault(metric, {"values": []})["values"].append(float(value))
    for metrics in summary.values():
        for stats in metrics.values():
            values = stats.pop("values")
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            stats.update(mean=mean, sd=sd, n=len(values))
    return summary


def wilson_interval(correct: int, total: int) -> list[float]:
    """The 95% Wilson score interval of an accuracy of `correct` out of `total` cells."""
    from scipy.stats import binomtest

    interval = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(interval.low), float(interval.high)]


def fold_record(fold: dict, key: str, method: str) -> list | None:
    """A fold's per-cell `key` record of `method` (None where it kept none); refuses one not of one entry per test
    cell (concatenated over the folds, it would pair the next folds' cells with other cells' truth)."""
    values = fold["cells"].get(key, {}).get(method)
    if values is not None and len(values) != len(fold["cells"]["cell_id"]):
        raise ValueError(f"fold {fold['fold']}: {len(values)} {key} of {method} for its "
                         f"{len(fold['cells']['cell_id'])} test cells; run the fold again (or --rescore from its "
                         "folder).")
    return values


def pooled_figures(folds: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per method, over the test cells of all folds, from the figures per cell where the folds kept them (every method's
    since 2026-12-06; folds measured before kept none for the Cell2Sentence-style baseline): accuracy with its 95%
    interval, weighted F1, ontology similarity, and for Cell2Text the expected calibration error of its
    `cell_type_score`s (the ECE of the pooled cells: a mean of the folds' ECEs is not one, as few cells per bin bias
    each upward); counts (`COUNT_METRICS`) as their total; the other metrics as the mean of the folds weighted by
    their cells."""
    from training.evaluation.metrics import calibration_report, classification_report

    truth = [label for fold in folds for label in fold["cells"]["cell_type_true"]]

    def pooled(key: str, method: str) -> list | None:  # a per-cell record of every fold, concatenated
        kept = [fold_record(fold, key, method) for fold in folds]
        return None if any(values is None for values in kept) else [v for values in kept for v in values]

    pooled_methods: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(m for fold in folds for m in fold["methods"]):
        figures = {}
        predicted = pooled("predictions", method)
        if predicted is not None:
            correct = [p == t for p, t in zip(predicted, truth)]
            figures = {"accuracy": sum(correct) / len(truth), "accuracy_ci95": wilson_interval(sum(correct), len(truth)),
                       "weighted_f1": classification_report(truth, predicted)["weighted_f1"], "num_cells": len(truth)}
            similarity = pooled("ontology_similarity", method)
            if similarity is not None:
                figures["ontology_similarity"] = sum(similarity) / len(similarity)
            scores = pooled("cell_type_score", method)
            if scores is not None:
                figures["ece"] = calibration_report(scores, correct)["ece"]
        for metric in {m for fold in folds for m in fold["methods"].get(method, {})} - set(figures):
            measured = [(fold["methods"][method][metric], len(fold["cells"]["cell_id"])) for fold in folds
                        if metric in fold["methods"].get(method, {})]
            if metric in COUNT_METRICS:  # cells counted per fold: their total
                figures[metric] = sum(v for v, _ in measured)
            else:
                figures[metric] = sum(v * n for v, n in measured) / sum(n for _, n in measured)
        pooled_methods[method] = figures
    return pooled_methods


def format_table(folds: Sequence[dict], pooled: dict) -> str:
    """A Markdown table: one row per method and metric, one column per fold, then pooled over all test cells."""
    header = ["Method", "Metric", *[f"fold {f['fold']}" for f in folds], "Pooled"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    metrics = {**BENCHMARK_METRICS, **{m: m for m in EXTRA_METRICS}}
    for method, title in METHOD_NAMES.items():
        for metric, metric_title in metrics.items():
            value = pooled.get(method, {}).get(metric)
            if value is None:
                continue
            cells = [f"{f['methods'].get(method, {}).get(metric, float('nan')):.3f}" for f in folds]
            interval = pooled[method].get(f"{metric}_ci95")
            shown = f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
            lines.append(f"| {title} | {metric_title} | " + " | ".join(cells) + f" | {shown} |")
    return "\n".join(lines)


def git_commit() -> str:
    """The checkout's commit (with "+dirty" when tracked files differ from it)."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    return f"CPU only ({torch.get_num_threads()} threads)"


def environment() -> dict:
    """The CPU (on a CPU, torch's thread count), the GPU and the package versions the figures came from. The same
    seed trains other weights on a CPU with other bf16 kernels (or none: then in float32) or another thread count,
    or with another release of the libraries, and at 490 training cells that moves a fold's accuracy by several cells
    (docs/results.md), so a figure is its machine's."""
    from importlib.metadata import PackageNotFoundError, version

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    packages = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "numpy", "scikit-learn"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    from training.adapters import cpu_bf16_is_fast

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "cpu_bf16": sorted(set(flags) & {"avx512_bf16", "amx_bf16"}),
            "cpu_bf16_kernels": cpu_bf16_is_fast(),  # False: the recipe trained in float32 on the CPU
            # the threads a CPU training's float sums are split over (`training.demo` trains on them or half of them)
            "cpu_threads": None if gpu else torch.get_num_threads(),
            "gpu": gpu, "python": platform.python_version(), "packages": packages}


def environment_differences(measured: dict, here: dict) -> list[str]:
    """The keys of two `environment` records whose values differ (a key one of them lacks, recorded since: None)."""
    return sorted(key for key in {*here, *measured} if measured.get(key) != here.get(key))


def fold_cells(fold_dir: Path) -> dict:
    """The test cells of one fold's main-job folder and every method's prediction for each, in the corpus's order;
    refuses a fold whose test cells also train or validate, or whose report is not on those cells."""
    from datasets import load_from_disk

    from processing.corpus import corpus_summary
    from training.demo import BASELINE_PREDICTIONS
    from training.evaluation.evaluate import cell_type_similarity_scores

    corpus = load_from_disk(str(fold_dir / "corpus"))
    test_ids = list(corpus["test"]["cell_id"])
    seen = set(corpus["train"]["cell_id"]) | set(corpus["validation"]["cell_id"])
    if seen & set(test_ids):
        raise ValueError(f"{fold_dir}: {len(seen & set(test_ids))} test cells also train or validate.")
    truth = list(corpus["test"]["cell_type"])
    per_cell = json.loads((fold_dir / "report" / "per_cell.json").read_text())
    baselines = json.loads((fold_dir / BASELINE_PREDICTIONS).read_text())
    for name, record in (("report", per_cell), ("baseline predictions", baselines)):
        if record["cell_type_true"] != truth or record["cell_id"] != test_ids:
            raise ValueError(f"{fold_dir}: the {name}' cells are not the corpus's test cells in order; run the fold "
                             "again.")
    predictions = {"cell2text": per_cell["cell_type_pred"], **baselines["predictions"]}
    # the corpus's label -> term table (the model's is its training labels' part of it)
    table = corpus_summary(fold_dir / "corpus").get("ontology_term_ids", {}).get("cell_type", {})
    return {"cell_id": test_ids, "cell_type_true": truth, "predictions": predictions,
            "ontology_similarity": cell_type_similarity_scores(corpus["test"], predictions, table),
            "cell_type_score": {"cell2text": per_cell["cell_type_score"]}}


def run_fold(out_dir: Path, fold: int, num_folds: int, seed: int, with_cell2sentence: bool,
             max_steps: int | None, one_training_at_a_time: bool = False) -> dict:
    """The main job's recipe with fold `fold` as its test split; per-method figures and predictions per cell."""
    from training.demo import run

    report = run(out_dir, seed, max_steps, 160, not with_cell2sentence, fold=(fold, num_folds),
                 one_training_at_a_time=one_training_at_a_time)
    results = json.loads((report.parent / "results.json").read_text())
    return {"fold": fold, "methods": method_figures(results), "cells": fold_cells(out_dir),
            "timings_s": results.get("timings_s"), "training_threads": results.get("training_threads"),
            "environment": environment()}


def check_partition(folds: Sequence[dict]) -> None:
    """No cell is tested in two folds."""
    ids = [c for fold in folds for c in fold["cells"]["cell_id"]]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{len(ids) - len(set(ids))} cells are tested in more than one fold; the folds were built "
                         "with different seeds or settings. Start over in another --out.")


def paired_summary(folds: Sequence[dict]) -> dict[str, dict]:
    """Pooled over the folds, per baseline: Cell2Text's accuracy minus the baseline's on the same cells, the
    discordant cells, and the exact McNemar p-value (two-sided binomial test on the discordant cells)."""
    from scipy.stats import binomtest

    truth = [t for fold in folds for t in fold["cells"]["cell_type_true"]]

    def correct(method: str) -> list[bool]:
        return [p == t for p, t in zip((p for f in folds for p in fold_record(f, "predictions", method)), truth)]

    cell2text = correct("cell2text")
    summary = {}
    for name in folds[0]["cells"]["predictions"]:
        if name == "cell2text" or any(fold_record(fold, "predictions", name) is None for fold in folds):
            continue  # a method some folds kept no predictions of is not compared cell by cell
        pairs = list(zip(cell2text, correct(name)))
        counts = {"both": pairs.count((True, True)), "cell2text_only": pairs.count((True, False)),
                  "baseline_only": pairs.count((False, True)), "neither": pairs.count((False, False))}
        discordant = counts["cell2text_only"] + counts["baseline_only"]
        summary[name] = {
            **counts,
            "num_cells": len(pairs),
            "accuracy_difference": (counts["cell2text_only"] - counts["baseline_only"]) / len(pairs),
            "mcnemar_p": binomtest(counts["cell2text_only"], discordant, 0.5).pvalue if discordant else 1.0,
        }
    return summary


def write_benchmark(path: Path, benchmark: dict) -> None:
    """Write the JSON whole or not at all (a new file renamed over the old): it is rewritten after every fold of a
    run of hours, and one cut off mid-write lost every fold measured before."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(benchmark, indent=2))
    os.replace(partial, path)


def read_benchmark(path: Path) -> dict:
    """The benchmark JSON at `path`; one that does not read is refused naming it (a traceback before)."""
    try:
        benchmark = json.loads(path.read_text())
    except OSError as error:  # --rescore of an --out without a benchmark: a traceback before
        raise SystemExit(f"{path} does not read ({error.strerror}); pass the --out of a benchmarks/quality.py "
                         "run.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"{path} is not a benchmark this script wrote ({error}); pass another --out, or remove it "
                         "to start over.") from None
    if not isinstance(benchmark, dict) or not isinstance(benchmark.get("folds"), list):
        raise SystemExit(f"{path} is not a benchmark this script wrote (no list of folds); pass another --out, or "
                         "remove it to start over.")
    return benchmark


#: Settings a benchmark records that earlier versions did not, with the value those versions ran with.
SETTINGS_ADDED_LATER = {"one_training_at_a_time": False}


def reusable_folds(path: Path, settings: dict) -> dict[int, dict]:
    """The folds of an earlier (possibly interrupted) run at `path`, by index, if it ran with the same settings."""
    if not path.exists():
        return {}
    if settings["commit"].endswith("+dirty"):
        raise SystemExit("The checkout has uncommitted changes, so folds measured before cannot be shown to come from "
                         "the same code; commit them (or pass another --out) before --resume.")
    earlier = {**SETTINGS_ADDED_LATER, **read_benchmark(path)}
    mismatched = {k: (earlier.get(k), v) for k, v in settings.items() if earlier.get(k) != v}
    if mismatched:
        raise SystemExit(f"{path} was measured with other settings ({mismatched}: earlier, now); it cannot be "
                         "resumed. Pass another --out, or remove it to start over.")
    here = environment()
    for fold in earlier["folds"]:  # a fold measured before folds were recorded each: the run's machine
        differ = environment_differences(fold.get("environment", earlier.get("environment")) or {}, here)
        if differ:
            raise SystemExit(f"Fold {fold['fold']} of {path} was measured on another machine or with other packages "
                             f"({', '.join(differ)} differ): its figures are that environment's (another precision, "
                             "other kernels or library releases train other weights), so it cannot be pooled with "
                             "folds measured here. Resume on that machine, or pass another --out.")
    return {fold["fold"]: fold for fold in earlier["folds"]}


def rescore(path: Path) -> dict:
    """The benchmark at `path` with its pooled figures and paired tests computed again from its fold folders beside
    it (`fold_cells`), e.g. after the pooling changed: nothing is trained or generated again. Refuses a fold folder
    whose cells, predictions or (where recorded) Cell2Text's cell-type probabilities are not those the benchmark
    recorded."""
    benchmark = read_benchmark(path)
    for fold in benchmark["folds"]:
        fold_dir = path.parent / f"fold-{fold['fold']}"
        cells = fold_cells(fold_dir)
        # the scores too where recorded: a fold folder evaluated again (its predictions unchanged) gave the ECE of
        # another evaluation's probabilities
        for key in ("cell_id", "cell_type_true", "predictions", "cell_type_score"):
            if (key in fold["cells"] or key != "cell_type_score") and cells[key] != fold["cells"][key]:
                raise SystemExit(f"{fold_dir}: its {key} are not those {path} recorded; it cannot be rescored.")
        fold["cells"] = cells
        for method, scores in cells["ontology_similarity"].items():  # a fold's figure where its run kept none
            fold["methods"].setdefault(method, {}).setdefault("ontology_similarity", sum(scores) / len(scores))
    benchmark.update(pooled=pooled_figures(benchmark["folds"]), paired=paired_summary(benchmark["folds"]),
                     summary=summarise(benchmark["folds"]),
                     rescored={"commit": git_commit(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")})
    write_benchmark(path, benchmark)
    return benchmark


def main(argv: Sequence[str] | None = None) -> dict:
    import logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5, help="Number of folds (each cell is tested in one).")
    parser.add_argument("--only-folds", type=int, nargs="+", default=None,
                        help="Run these folds only (a partial benchmark, marked incomplete).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the folds and the training.")
    parser.add_argument("--out", default=str(REPO / "outputs" / "quality"), help="One folder per fold, and the JSON.")
    parser.add_argument("--with-cell2sentence", action="store_true",
                        help="Also train and score the Cell2Sentence-style baseline (beside Cell2Text, half the "
                        "threads each, where 2 or more cores are usable: Cell2Text's figures then come from another "
                        "thread count than without it; --one-training-at-a-time keeps it).")
    parser.add_argument("--one-training-at-a-time", action="store_true",
                        help="With --with-cell2sentence: train the baseline after Cell2Text, each on every thread, "
                             "so that Cell2Text's figures are those of a run without the baseline (as the main "
                             "job's option of that name; the main job took twice as long that way on 2 AVX2-only cores).")
    # positive: the main job reads 0 as no cap and the trainer -1, so either trained the whole recipe for hours while
    # the JSON recorded a smoke run
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="Cap training steps (a smoke run, not the recipe).")
    parser.add_argument("--resume", action="store_true",
                        help="Reuse the folds of <out>/quality_benchmark.json measured at this commit and settings, "
                             "on a machine like this one (CPU, bf16 kernels, CPU threads, GPU, package versions).")
    parser.add_argument("--rescore", action="store_true",
                        help="Compute the pooled figures and paired tests of <out>/quality_benchmark.json again from "
                             "its fold folders (nothing is trained), e.g. after the pooling changed.")
    args = parser.parse_args(argv)
    if args.rescore:
        return rescore(Path(args.out) / "quality_benchmark.json")
    if args.folds < 2:
        parser.error("--folds must be at least 2.")
    if args.one_training_at_a_time and not args.with_cell2sentence:  # recorded as a setting it did not change
        parser.error("--one-training-at-a-time orders the two trainings of --with-cell2sentence; pass both, or "
                     "neither.")
    wanted = args.only_folds if args.only_folds is not None else list(range(args.folds))
    if len(set(wanted)) != len(wanted) or not all(0 <= f < args.folds for f in wanted):
        parser.error(f"--only-folds must name distinct folds in 0 .. {args.folds - 1}.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    path = out / "quality_benchmark.json"
    started = datetime.now(timezone.utc)
    settings = {"commit": git_commit(), "num_folds": args.folds, "seed": args.seed, "max_steps": args.max_steps,
                "with_cell2sentence": args.with_cell2sentence, "one_training_at_a_time": args.one_training_at_a_time}
    done = reusable_folds(path, settings) if args.resume else {}
    if path.exists() and not args.resume:
        raise SystemExit(f"{path} exists; pass --resume to reuse its folds, or another --out.")
    folds = [done[f] for f in sorted(done) if f not in wanted]  # measured earlier, not asked for now: kept
    for index in wanted:
        if index in done:
            folds.append(done[index])
            print(f"\nFold {index}: reused from {path}", flush=True)
        else:
            folds.append(run_fold(out / f"fold-{index}", index, args.folds, args.seed, args.with_cell2sentence,
                                  args.max_steps, args.one_training_at_a_time))
            print(f"\nFold {index}:\n{format_table(folds[-1:], pooled_figures(folds[-1:]))}", flush=True)
        folds.sort(key=lambda f: f["fold"])
        check_partition(folds)
        benchmark = {
            "benchmark": "benchmarks/quality.py",
            "date": started.strftime("%Y-%m-%d"),
            **settings,
            "device": device_name(),
            "environment": environment(),
            "config": "training/configs/demo.yaml",
            "complete": [f["fold"] for f in folds] == list(range(args.folds)),
            "pooled": pooled_figures(folds),
            "summary": summarise(folds),
            "paired": paired_summary(folds),
            "folds": folds,
        }
        out.mkdir(parents=True, exist_ok=True)
        write_benchmark(path, benchmark)
    paired = "\n".join(paired_lines(benchmark["paired"]))
    print(f"\nAll folds ({len(folds)} of {args.folds}; pooled over "
          f"{benchmark['paired']['majority']['num_cells']} test cells):\n"
          f"{format_table(folds, benchmark['pooled'])}\n\nPaired on the same test cells, pooled over the folds:\n"
          f"{paired}\n\nWritten: {path}")
    return benchmark


if __name__ == "__main__":
    main()
