"""Cell-type quality over several corpus splits: the main job's recipe per split seed, then mean +- sd.

```bash
python benchmarks/quality.py                          # seeds 0 1 2, out outputs/quality
python benchmarks/quality.py --seeds 0 1 2 3 4 --out outputs/quality --skip-cell2sentence
python benchmarks/quality.py --resume                 # after an interruption: keeps the splits already measured
cp outputs/quality/quality_benchmark.json docs/       # the main job's report then shows it beside its split
```

For each seed, `training.demo.run` builds the pbmc68k_reduced corpus with that seed (the seed picks the
train/validation/test split, `processing/splits.py`, and seeds training), trains Cell2Text with
`training/configs/demo.yaml` (same budget), trains the Cell2Sentence-style baseline on the same budget and
evaluates both beside majority, logistic regression and kNN on the same test cells. Printed per split and as
mean +- sd (sample standard deviation): cell-type accuracy, weighted F1, Cell Ontology similarity and parse rate.
Cell2Text and each expression baseline are also compared cell by cell on the same test cells, pooled over the
splits: the accuracy difference, the cells only one of them gets right and the exact McNemar p-value (a paired
test: 70 cells a split move a mean by 1.4 points a cell, and the splits share their difficulty across methods).
Written: `<out>/quality_benchmark.json` (per-split figures, summary, date, commit, device), rewritten after every
split with `"complete": false` until the last, so an interrupted run keeps what it measured; `--resume` reuses the
splits of that file that were measured at the same commit with the same settings. It uses the GPU when there is
one. About 25 minutes per split on 2 idle CPU cores; not part of CI.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hub_cards.names import METHOD_NAMES  # noqa: E402
from training.evaluation.report import BENCHMARK_METRICS, method_figures, paired_lines  # noqa: E402

EXTRA_METRICS = ("free_accuracy", "ece", "num_invented")


def summarise(splits: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """Per method and metric: mean, sample sd (0 for one split) and the number of splits it was measured on."""
    summary: dict[str, dict[str, dict]] = {}
    for split in splits:
        for method, figures in split["methods"].items():
            for metric, value in figures.items():
                summary.setdefault(method, {}).setdefault(metric, {"values": []})["values"].append(float(value))
    for metrics in summary.values():
        for stats in metrics.values():
            values = stats.pop("values")
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            stats.update(mean=mean, sd=sd, n=len(values))
    return summary


def format_table(splits: Sequence[dict], summary: dict) -> str:
    """A Markdown table: one row per method and metric, one column per split seed, then mean +- sd."""
    seeds = [s["seed"] for s in splits]
    header = ["Method", "Metric", *[f"seed {s}" for s in seeds], "Mean +- sd"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    metrics = {**BENCHMARK_METRICS, **{m: m for m in EXTRA_METRICS}}
    for method, title in METHOD_NAMES.items():
        for metric, metric_title in metrics.items():
            stats = summary.get(method, {}).get(metric)
            if stats is None:
                continue
            cells = [f"{s['methods'].get(method, {}).get(metric, float('nan')):.3f}" for s in splits]
            lines.append(f"| {title} | {metric_title} | " + " | ".join(cells) + f" | {stats['mean']:.3f} +- "
                         f"{stats['sd']:.3f} |")
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


def run_split(out_dir: Path, seed: int, skip_cell2sentence: bool, max_steps: int | None) -> dict:
    """The main job's recipe on the split of `seed`; its per-method figures and paired counts."""
    from training.demo import run

    report = run(out_dir, seed, max_steps, 160, skip_cell2sentence)
    results = json.loads((report.parent / "results.json").read_text())
    return {"seed": seed, "methods": method_figures(results), "paired": paired_counts(out_dir),
            "timings_s": results.get("timings_s")}


def paired_counts(split_dir: Path) -> dict[str, dict[str, int]]:
    """Cell2Text against each expression baseline on the same test cells of one split (the main job's folder):
    how many cells both get right, Cell2Text alone, the baseline alone, neither."""
    from datasets import load_from_disk

    from training.demo import expression_predictions

    corpus = load_from_disk(str(split_dir / "corpus"))
    truth = list(corpus["test"]["cell_type"])
    per_cell = json.loads((split_dir / "report" / "per_cell.json").read_text())
    cell_ids = list(corpus["test"]["cell_id"])
    # Reports written before per_cell.json carried cell ids are matched by their label sequence alone.
    if per_cell["cell_type_true"] != truth or per_cell.get("cell_id", cell_ids) != cell_ids:
        raise ValueError(f"{split_dir}: the report's cells are not the corpus's test cells in order; run the split "
                         "again.")
    cell2text = [p == t for p, t in zip(per_cell["cell_type_pred"], truth)]
    counts = {}
    for name, predicted in expression_predictions(corpus, "test").items():
        baseline = [p == t for p, t in zip(predicted, truth)]
        pairs = list(zip(cell2text, baseline))
        counts[name] = {"both": pairs.count((True, True)), "cell2text_only": pairs.count((True, False)),
                        "baseline_only": pairs.count((False, True)), "neither": pairs.count((False, False))}
    return counts


def paired_summary(splits: Sequence[dict]) -> dict[str, dict]:
    """Pooled over the splits, per baseline: Cell2Text's accuracy minus the baseline's on the same cells, the
    discordant cells, and the exact McNemar p-value (two-sided binomial test on the discordant cells)."""
    from scipy.stats import binomtest

    summary = {}
    for name in splits[0].get("paired", {}):
        pooled = {key: sum(s["paired"][name][key] for s in splits) for key in splits[0]["paired"][name]}
        discordant = pooled["cell2text_only"] + pooled["baseline_only"]
        summary[name] = {
            **pooled,
            "num_cells": sum(pooled.values()),
            "accuracy_difference": (pooled["cell2text_only"] - pooled["baseline_only"]) / sum(pooled.values()),
            "mcnemar_p": binomtest(pooled["cell2text_only"], discordant, 0.5).pvalue if discordant else 1.0,
        }
    return summary


def reusable_splits(path: Path, settings: dict) -> dict[int, dict]:
    """The splits of an earlier (possibly interrupted) run at `path`, by seed, if it ran with the same settings."""
    if not path.exists():
        return {}
    if settings["commit"].endswith("+dirty"):
        raise SystemExit("The checkout has uncommitted changes, so splits measured before cannot be shown to come from "
                         "the same code; commit them (or pass another --out) before --resume.")
    earlier = json.loads(path.read_text())
    mismatched = {k: (earlier.get(k), v) for k, v in settings.items() if earlier.get(k) != v}
    if mismatched:
        raise SystemExit(f"{path} was measured with other settings ({mismatched}: earlier, now); it cannot be "
                         "resumed. Pass another --out, or remove it to start over.")
    return {split["seed"]: split for split in earlier["splits"]}


def main(argv: Sequence[str] | None = None) -> dict:
    import logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Corpus split (and training) seeds.")
    parser.add_argument("--out", default=str(REPO / "outputs" / "quality"), help="One folder per seed, and the JSON.")
    parser.add_argument("--skip-cell2sentence", action="store_true", help="Leave the Cell2Sentence baseline out.")
    parser.add_argument("--max-steps", type=int, default=None, help="Cap training steps (a smoke run, not the recipe).")
    parser.add_argument("--resume", action="store_true",
                        help="Reuse the splits of <out>/quality_benchmark.json measured at this commit and settings.")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds repeat; pass each seed once.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    path = out / "quality_benchmark.json"
    started = datetime.now(timezone.utc)
    settings = {"commit": git_commit(), "max_steps": args.max_steps, "skip_cell2sentence": args.skip_cell2sentence}
    done = reusable_splits(path, settings) if args.resume else {}
    if path.exists() and not args.resume:
        raise SystemExit(f"{path} exists; pass --resume to reuse its splits, or another --out.")
    splits = []
    for seed in args.seeds:
        if seed in done:
            splits.append(done[seed])
            print(f"\nSplit seed {seed}: reused from {path}", flush=True)
        else:
            splits.append(run_split(out / f"seed-{seed}", seed, args.skip_cell2sentence, args.max_steps))
            print(f"\nSplit seed {seed}:\n{format_table(splits[-1:], summarise(splits[-1:]))}", flush=True)
        benchmark = {
            "benchmark": "benchmarks/quality.py",
            "date": started.strftime("%Y-%m-%d"),
            **settings,
            "device": device_name(),
            "config": "training/configs/demo.yaml",
            "seeds": list(args.seeds),
            "complete": len(splits) == len(args.seeds),
            "splits": splits,
            "summary": summarise(splits),
            "paired": paired_summary(splits),
        }
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(benchmark, indent=2))
    paired = "\n".join(paired_lines(benchmark["paired"]))
    print(f"\nAll splits (mean +- sd over {len(splits)}):\n{format_table(splits, benchmark['summary'])}\n\n"
          f"Paired on the same test cells, pooled over the splits:\n{paired}\n\nWritten: {path}")
    return benchmark


if __name__ == "__main__":
    main()
