"""A change to the training recipe, measured on the validation cells of the cross-validation folds (issue 19).

    python benchmarks/recipe_variant.py --set cell_type_head_loss_weight=1.0 --out outputs/variant-head
    python benchmarks/recipe_variant.py --set cell_type_head_loss_weight=1.0 --out outputs/variant-head --resume

Needs the folds of `benchmarks/quality.py` (`--folds-dir`, default outputs/quality: one main-job folder per fold with
its corpus, its prepared gene encoder and its model, and its quality_benchmark.json). For each fold the recipe is trained again on the fold's
training split with the `--set` overrides (TRL / Cell2Text argument names), from the same seed and the same prepared
encoder (copied, so nothing is re-selected: a change of what the encoder is prepared for, such as num_cell_tokens,
is refused before training), on the thread count the fold's model trained on (where quality.py recorded it) and in
its precision (a GPU where the folds trained on a CPU or another GPU, or the reverse, is refused, and a CPU without
the folds' CPU's native bf16 kernels, or with them where the folds' had none, unless --set names bf16; with --resume
and every fold's variant already trained, only scoring is left, and any machine scores both models), without the
temperature fit; then the fold's model (the reference) and the variant each choose every validation cell's cell type
among the known labels (exhaustive scoring, what the schema-constrained decoder chooses). The test folds are never read: an idea is
kept or dropped on validation only.
Each model must have been trained on its fold's corpus (a variant of `--variant-folds-dir` on its own fold's, and
read the reference's cells as its own), else it is refused: a model of folds built since is not scored.

With `--variant-folds-dir` instead of `--set`, nothing is trained: the variant is the fold models of a second
`benchmarks/quality.py` run, e.g. at a commit that changes the recipe's default (its folds must have the same
validation cells and the same prepared encoder as the reference's, and have been measured in the same environment,
else it is refused):

    python benchmarks/recipe_variant.py --variant-folds-dir outputs/quality-new --out outputs/variant-new

Printed per fold and pooled over the folds' validation cells: both accuracies, the paired difference and the exact
McNemar p-value. Written: `<out>/recipe_variant.json` (settings, commit, per-cell predictions, and each fold's
scoring environment, `quality.environment`: the machine that scored, which --resume lets differ), after every fold;
`--resume` keeps the variant models already trained in `<out>`. About 6 minutes per fold on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    from cell2text_cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds-dir", type=Path, default=REPO / "outputs" / "quality",
                        help="the --out folder of benchmarks/quality.py (its fold-* folders)")
    variant = parser.add_mutually_exclusive_group(required=True)
    variant.add_argument("--set", dest="overrides", nargs="+", metavar="NAME=VALUE",
                         help="recipe arguments that make the variant, e.g. cell_type_head_loss_weight=1.0")
    variant.add_argument("--variant-folds-dir", type=Path, default=None,
                         help="the --out folder of a second benchmarks/quality.py run whose fold models are the "
                         "variant (nothing is trained)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="keep the variant models already trained in --out")
    # used first after a fold's variant has trained (minutes): refused before anything runs
    parser.add_argument("--batch-size", type=positive_int, default=16)
    return parser.parse_args()


def recipe_overrides(pairs: list[str]) -> list[str]:
    """NAME=VALUE pairs as command-line arguments of the recipe."""
    arguments = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--set takes NAME=VALUE pairs, got {pair!r}")
        arguments += [f"--{name}", value]
    return arguments


def check_resumable(result_path: Path, args: argparse.Namespace) -> None:
    """Refuse an --out that holds a run, unless --resume is asked and that run had the same changes and folds (its
    trained models are reused: models of another change would be compared silently)."""
    if not result_path.exists():
        return
    if not args.resume:
        raise SystemExit(f"{result_path} exists: pass --resume to keep its trained folds, or another --out.")
    earlier = json.loads(result_path.read_text())
    if earlier.get("overrides") != args.overrides or Path(earlier.get("folds_dir", "")) != args.folds_dir or \
            earlier.get("variant_folds_dir") != (str(args.variant_folds_dir) if args.variant_folds_dir else None):
        raise SystemExit(f"{result_path} was run with --set {' '.join(earlier.get('overrides') or [])} on "
                         f"{earlier.get('folds_dir')}; --resume reuses its models only for the same --set and "
                         "--folds-dir: pass another --out.")


def check_encoder_reused(fold_dir: Path, cell2text_args, sft_config, pairs: list[str]) -> None:
    """Refuse a change that would make the recipe prepare and select its own gene encoder instead of reusing the
    fold's (one that changes what the encoder is prepared for, e.g. num_cell_tokens): the variant would then differ
    from the reference by its encoder too, silently."""
    from training.gene_encoder import PREPARED_ENCODER_DIR, EncoderSelection
    from training.sft import encoder_preparation, load_corpus

    if cell2text_args.gene_encoder_name_or_path is not None:
        return
    corpus, summary = load_corpus(cell2text_args.corpus_dir, cell2text_args)
    wanted = encoder_preparation(cell2text_args, sft_config, corpus, summary)
    selection = EncoderSelection.load(fold_dir / "sft" / PREPARED_ENCODER_DIR)
    prepared_for = selection.prepared_for if selection is not None else None
    if prepared_for != wanted:
        changed = sorted(k for k in wanted if (prepared_for or {}).get(k) != wanted[k])
        raise SystemExit(
            f"--set {' '.join(pairs)} changes what the gene encoder is prepared for ({', '.join(changed)}), so the "
            f"variant would prepare and select an encoder of its own instead of reusing {fold_dir.name}'s, and differ "
            "from the reference by its encoder too. Compare such a change with benchmarks/quality.py (a full run "
            "per fold), or leave these settings as the folds had them."
        )


def check_same_folds(reference: Path, variant: Path) -> None:
    """Refuse a variant fold (of another quality run) that differs from its reference by more than the recipe: other
    validation cells, or another prepared gene encoder (its weights)."""
    import hashlib

    from datasets import load_from_disk

    from training.gene_encoder import PREPARED_ENCODER_DIR

    def cells(fold: Path) -> list[str]:
        return list(load_from_disk(str(fold / "corpus"))["validation"]["cell_id"])

    def encoder(fold: Path) -> str:
        return hashlib.sha256((fold / "sft" / PREPARED_ENCODER_DIR / "model.safetensors").read_bytes()).hexdigest()

    for what, read in (("validation cells", cells), ("prepared gene encoder", encoder)):
        if read(reference) != read(variant):
            raise SystemExit(f"{variant} differs from {reference} in its {what}: the two quality runs differ by more "
                             "than the recipe (another seed, fold count or encoder), so their models cannot be paired.")


def kept_variant_model(model_dir: Path, resume: bool) -> bool:
    """Whether `--resume` keeps the variant model already trained in `model_dir`, so that its fold is only scored."""
    return resume and (model_dir / "model.safetensors").exists()


def check_same_machine_precision(benchmark: dict, pairs: list[str]) -> None:
    """Refuse to train a variant where the recipe trains otherwise than on the folds' machine: on a GPU where the
    folds trained on a CPU or on another GPU (`quality.device_name`) or the reverse, or on a CPU whose native bf16
    kernels differ from the folds' CPU's (without them the recipe turns demo.yaml's bf16 autocast off,
    `parse_training_arguments`): float32 against bf16, or another device's kernels, would be reported as the --set
    change. On CPUs, a --set naming bf16 or fp16 chooses the precision; a benchmark that did not record its CPU's
    kernels is not checked there."""
    import torch

    from benchmarks.quality import device_name
    from training.adapters import cpu_bf16_is_fast

    folds_on_gpu, here_on_gpu = str(benchmark.get("device", "")).startswith("GPU"), torch.cuda.is_available()
    if (folds_on_gpu or here_on_gpu) and benchmark.get("device") != device_name():
        raise SystemExit(f"The folds were trained on {benchmark.get('device')}, this machine has "
                         f"{device_name() if here_on_gpu else 'none'}: the variant would differ from the reference by "
                         "its device's kernels and precision too. Run where the folds were trained.")
    if here_on_gpu or any(pair.partition("=")[0] in ("bf16", "fp16") for pair in pairs):
        return
    recorded = (benchmark.get("environment") or {}).get("cpu_bf16_kernels")
    here = cpu_bf16_is_fast()
    if recorded is not None and recorded != here:
        def precision(fast: bool) -> str:
            return "bf16 autocast" if fast else "float32"

        raise SystemExit(
            f"The folds were trained on a CPU {'with' if recorded else 'without'} native bf16 kernels "
            f"({precision(recorded)}), this one has {'them' if here else 'none'} ({precision(here)}): the variant "
            "would differ from the reference by its precision too. Run on a machine like the folds', or name the "
            f"precision in --set (bf16={str(recorded).lower()} trains as the folds did).")


def check_same_environment(reference: Path, variant: Path) -> None:
    """Refuse the folds of a second quality run (`--variant-folds-dir`) measured in another environment than the
    reference's (`quality.environment`: CPU, bf16 kernels, CPU threads, GPU, package versions): their models would
    differ by their machine's precision, kernels or thread count too, reported as the recipe's change. Runs that do
    not both record one (an earlier version's) are not checked."""
    from benchmarks.quality import environment_differences, read_benchmark

    measured = [read_benchmark(folds / "quality_benchmark.json").get("environment") for folds in (reference, variant)]
    differ = environment_differences(*measured) if None not in measured else []
    if differ:
        raise SystemExit(f"The folds of {variant} were measured in another environment than those of {reference} "
                         f"({', '.join(differ)} differ): their models would differ by more than the recipe. Run the "
                         f"second benchmarks/quality.py where the first ran.")


def reference_training_threads(benchmark: dict, fold_name: str) -> int | None:
    """The thread count the fold's model trained on (quality.py records it per fold; None where it does not): a
    training's float sums, and so its weights, depend on it, so the variant trains on as many."""
    for fold in benchmark.get("folds") or []:
        if f"fold-{fold.get('fold')}" == fold_name:
            return (fold.get("training_threads") or {}).get("cell2text")
    return None


def validation_cell_types(model_dir: Path, corpus_dir: Path, batch_size: int, fix: str,
                          trained_on: Path | None = None) -> list[str]:
    """The cell type each validation cell of the corpus at `corpus_dir` gets by exhaustive scoring of the model's
    known labels. The model must have been trained on that corpus (`evaluate.check_corpus_fits_model`), or, with
    `trained_on` (a variant of another quality run), on the corpus there, and read this one's cells as its own: a
    model left by a run on folds built since (another seed or commit; `--resume`) was scored on cells it may have
    trained on, or on tokens of another gene vocabulary, exit 0."""
    import torch

    from datasets import load_from_disk

    from modeling_cell2text.label_scoring import score_cell_types
    from processing.corpus import split_value_lists
    from training.evaluation.evaluate import batched_inputs, check_corpus_fits_model, load_model

    model, processor = load_model(model_dir, device="cpu")
    try:
        if trained_on is not None:
            check_corpus_fits_model(trained_on, model.config, processor)
        check_corpus_fits_model(corpus_dir, model.config, processor, other_corpus=trained_on is not None)
    except ValueError as error:
        raise SystemExit(f"{model_dir} cannot be scored on the validation cells of {corpus_dir}: {error}\n"
                         f"{fix}") from None
    cells = load_from_disk(str(corpus_dir))["validation"]
    with torch.no_grad():
        return [label for inputs in batched_inputs(model, processor, cells["gene_input_ids"],
                                                   split_value_lists(cells, processor.feature_extractor), batch_size,
                                                   f"scoring {model_dir.name}")
                for label in score_cell_types(model, processor, inputs).labels]


def paired(reference: list[bool], variant: list[bool]) -> dict:
    from scipy.stats import binomtest

    variant_only = sum(v and not r for r, v in zip(reference, variant))
    reference_only = sum(r and not v for r, v in zip(reference, variant))
    discordant = variant_only + reference_only
    return {"num_cells": len(reference), "reference_accuracy": sum(reference) / len(reference),
            "variant_accuracy": sum(variant) / len(variant), "variant_only": variant_only,
            "reference_only": reference_only, "difference": (variant_only - reference_only) / len(reference),
            "mcnemar_p": binomtest(variant_only, discordant, 0.5).pvalue if discordant else 1.0}


def main() -> None:
    args = parse_args()
    from datasets import load_from_disk

    from benchmarks.quality import environment
    from training.demo import sft_arguments, torch_threads
    from training.gene_encoder import PREPARED_ENCODER_DIR
    from training.prepare_demo_llm import prepare_demo_llm
    from training.sft import main as train_cell2text

    fold_dirs = sorted(p for p in args.folds_dir.glob("fold-*") if (p / "cell2text-demo" / "config.json").exists())
    if not fold_dirs:
        raise SystemExit(f"No trained folds in {args.folds_dir}: run `python benchmarks/quality.py --out "
                         f"{args.folds_dir}` first.")
    result_path = args.out / "recipe_variant.json"
    check_resumable(result_path, args)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    overrides = recipe_overrides(args.overrides or [])
    benchmark = json.loads((args.folds_dir / "quality_benchmark.json").read_text())
    seed = str(benchmark["seed"])  # the folds' recipe seed, so the variant differs from the reference only by --set
    if benchmark.get("max_steps"):
        overrides = ["--max_steps", str(benchmark["max_steps"]), *overrides]
    if args.variant_folds_dir is None:
        if not all(kept_variant_model(args.out / fold_dir.name / "model", args.resume) for fold_dir in fold_dirs):
            check_same_machine_precision(benchmark, args.overrides)  # only where a variant would be trained here
    else:
        check_same_environment(args.folds_dir, args.variant_folds_dir)
    llm_dir = prepare_demo_llm()
    folds = []
    for fold_dir in fold_dirs:
        out = args.out / fold_dir.name
        corpus_dir = fold_dir / "corpus"
        model_dir = out / "model"
        started = time.perf_counter()
        if args.variant_folds_dir is not None:
            model_dir = args.variant_folds_dir / fold_dir.name / "cell2text-demo"
            if not (model_dir / "config.json").exists():
                raise SystemExit(f"{model_dir} holds no model: run benchmarks/quality.py --out {args.variant_folds_dir}"
                                 " to the end first.")
            check_same_folds(fold_dir, args.variant_folds_dir / fold_dir.name)
        elif not kept_variant_model(model_dir, args.resume):
            shutil.copytree(fold_dir / "sft" / PREPARED_ENCODER_DIR, out / "sft" / PREPARED_ENCODER_DIR,
                            dirs_exist_ok=True)
            cell2text_args, sft_config = sft_arguments([
                "--corpus_dir", str(corpus_dir), "--text_model_name_or_path", str(llm_dir),
                "--output_dir", str(out / "sft"), "--final_model_dir", str(model_dir),
                "--overwrite_final_model_dir", "true", "--overwrite_output_dir", "true", "--temperature_fit_cells", "0",
                "--seed", seed, *overrides])
            check_encoder_reused(fold_dir, cell2text_args, sft_config, args.overrides)
            with torch_threads(reference_training_threads(benchmark, fold_dir.name)):
                train_cell2text(cell2text_args, sft_config)
        corpus = load_from_disk(str(corpus_dir))
        truth = list(corpus["validation"]["cell_type"])
        variant_corpus = args.variant_folds_dir / fold_dir.name / "corpus" if args.variant_folds_dir else None
        variant_fix = ("Pair two quality runs of the same folds: run benchmarks/quality.py for this fold again in "
                       "--variant-folds-dir." if variant_corpus else "A variant trained on folds built since: run "
                       "without --resume (or in another --out).")
        predictions = {"reference": validation_cell_types(fold_dir / "cell2text-demo", corpus_dir, args.batch_size,
                                                          "Run benchmarks/quality.py for this fold again."),
                       "variant": validation_cell_types(model_dir, corpus_dir, args.batch_size, variant_fix,
                                                        variant_corpus)}
        correct = {name: [p == t for p, t in zip(labels, truth)] for name, labels in predictions.items()}
        figures = paired(correct["reference"], correct["variant"])
        folds.append({"fold": fold_dir.name, "cell_id": list(corpus["validation"]["cell_id"]),
                      "cell_type_true": truth, "predictions": predictions, **figures,
                      "seconds": round(time.perf_counter() - started), "scoring_environment": environment()})
        print(f"{fold_dir.name}: validation accuracy reference {figures['reference_accuracy']:.3f}, variant "
              f"{figures['variant_accuracy']:.3f} ({figures['num_cells']} cells, {figures['variant_only']} right "
              f"only with the variant, {figures['reference_only']} only with the reference)", flush=True)
        pooled = paired([c for f in folds for c in (p == t for p, t in zip(f["predictions"]["reference"],
                                                                                  f["cell_type_true"]))],
                        [c for f in folds for c in (p == t for p, t in zip(f["predictions"]["variant"],
                                                                                  f["cell_type_true"]))])
        args.out.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps({"overrides": args.overrides, "commit": commit,
                                           "variant_folds_dir": str(args.variant_folds_dir) if args.variant_folds_dir
                                           else None,
                                           "folds_dir": str(args.folds_dir), "complete": len(folds) == len(fold_dirs),
                                           "pooled": pooled, "folds": folds}, indent=1))
    print(f"pooled over {pooled['num_cells']} validation cells: reference {pooled['reference_accuracy']:.3f}, variant "
          f"{pooled['variant_accuracy']:.3f}, difference {pooled['difference']:+.3f} (McNemar p "
          f"{pooled['mcnemar_p']:.3g})")


if __name__ == "__main__":
    main()
