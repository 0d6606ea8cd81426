"""What bounds Cell2Text's cell-type accuracy: the prepared gene encoder's probe against the expression baselines.

```bash
python benchmarks/encoder_probe.py                                # split seeds 0 1 2, the demo's input (130)
python benchmarks/encoder_probe.py --seeds 0 1 --input-sizes 130 512 --out outputs/encoder_probe
```

The text can only be as right as what the projector hands the LLM. For each split seed (and corpus input size:
130 = each cell's top 128 genes, the demo's; 512 = every gene a pbmc68k cell expresses), this builds the demo
corpus, prepares the encoder candidates of `training/configs/demo.yaml` exactly as the recipe does (the probe is a
linear head on the mean of the gene states the projector reads; best epoch on validation), and fits logistic
regression, kNN and the majority class on the same training cells. Everything is scored on the **validation**
split: this is for choosing the recipe, never for reporting it. Prints one row per split and input size and the
means; writes `<out>/encoder_probe.json` (a non-empty `--out` is refused without `--overwrite`). About 1 minute
per split at input 130 on 2 idle CPU cores (3 min 44 s for seeds 0-2; 2.7x the encoder time at 512); not part of
CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hub_cards.names import METHOD_NAMES  # noqa: E402
from training.demo import DEMO_MODEL_INPUT_SIZE  # noqa: E402

BASELINES = ("logistic_regression", "knn", "majority")


def candidate_name(candidate: dict) -> str:
    kind = "value-aware" if candidate["value_aware"] else "rank-value"
    return f"{kind}, {candidate['num_hidden_layers']} layer(s)"


def probe_split(out_dir: Path, seed: int, model_input_size: int) -> dict:
    """Probe accuracy of every encoder candidate and the baselines' accuracy, on one split's validation cells."""
    from datasets import load_from_disk

    from processing.corpus import corpus_feature_extractor
    from training.demo import build_demo_corpus, expression_baselines, sft_arguments
    from training.gene_encoder import prepare_gene_encoder
    from training.sft import encoder_candidates

    corpus_dir = out_dir / "corpus"
    build_demo_corpus(corpus_dir, seed, model_input_size=model_input_size)
    corpus = load_from_disk(str(corpus_dir))
    args, _ = sft_arguments(["--corpus_dir", str(corpus_dir), "--text_model_name_or_path", "unused"])
    candidates = encoder_candidates(args)
    started = time.perf_counter()
    selection = prepare_gene_encoder(
        corpus, corpus_feature_extractor(corpus_dir), out_dir / "gene_encoder", candidates,
        num_cell_tokens=args.num_cell_tokens, epochs=args.encoder_epochs, seed=seed,
    )
    seconds = (time.perf_counter() - started) / len(candidates)
    baselines = expression_baselines(corpus, split="validation")
    return {
        "seed": seed,
        "model_input_size": model_input_size,
        "probes": {candidate_name(asdict(c)): a for c, a in zip(candidates, selection.validation_accuracy)},
        "baselines": {name: baselines[name]["cell_type"]["accuracy"] for name in BASELINES},
        "seconds_per_candidate": round(seconds, 1),
    }


def format_table(rows: list[dict]) -> str:
    """One Markdown row per split and input size, then the mean per input size."""
    probes = list(rows[0]["probes"])
    header = ["Split seed", "Input", *(METHOD_NAMES[b] for b in BASELINES), *(f"Probe: {p}" for p in probes),
              "s / candidate"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["baselines"][b] for b in BASELINES] + [row["probes"][p] for p in probes]
        lines.append(f"| {row['seed']} | {row['model_input_size']} | " + " | ".join(f"{v:.3f}" for v in cells)
                     + f" | {row['seconds_per_candidate']} |")
    for size in sorted({row["model_input_size"] for row in rows}):
        same = [row for row in rows if row["model_input_size"] == size]
        means = [statistics.mean(r["baselines"][b] for r in same) for b in BASELINES]
        means += [statistics.mean(r["probes"][p] for r in same) for p in probes]
        lines.append(f"| mean of {len(same)} | {size} | " + " | ".join(f"**{v:.3f}**" for v in means) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Corpus split seeds.")
    parser.add_argument("--input-sizes", type=int, nargs="+", default=[DEMO_MODEL_INPUT_SIZE],
                        help="Corpus model_input_size values (genes + <cls> + <eos>).")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "encoder_probe")
    parser.add_argument("--overwrite", action="store_true", help="Replace what an earlier run left in --out.")
    args = parser.parse_args(argv)
    for option, values in (("--seeds", args.seeds), ("--input-sizes", args.input_sizes)):
        if len(set(values)) != len(values):  # one split twice made a "mean of 2" of one split
            parser.error(f"{option} names a value twice: {' '.join(map(str, values))}")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{args.out} is not empty (an earlier run's corpora, encoders and figures); pass "
                         "--overwrite to replace them, or another --out.")
    rows = []
    for seed in args.seeds:
        for size in args.input_sizes:
            rows.append(probe_split(args.out / f"seed-{seed}-input-{size}", seed, size))
            print(format_table(rows[-1:]), flush=True)
    print(f"\nValidation cell-type accuracy:\n{format_table(rows)}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoder_probe.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
