"""The main job in a CI-sized form: build the real pbmc68k corpus, train tiny parts, save, reload, evaluate."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
from datasets import load_from_disk
from tiny_parts import save_tiny_parts
from trl import SFTConfig

from modeling_cell2text import Cell2TextForConditionalGeneration, Cell2TextProcessor
from modeling_cell2text.description_schema import DescriptionParseError, parse_description
from processing.build_corpus import BuildOptions, build_corpus
from processing.presets import pbmc68k_reduced
from training.evaluation.evaluate import evaluate_model
from training.evaluation.report import write_report
from training.sft import Cell2TextArguments, main


def test_build_train_reload_evaluate(tmp_path):
    summary = build_corpus(pbmc68k_reduced(), tmp_path / "corpus", BuildOptions(seed=0, model_input_size=34,
                                                                                 progress=False))
    assert summary["splits"] == {"train": 560, "validation": 70, "test": 70}
    _, lm_dir = save_tiny_parts(tmp_path / "parts")
    # The corpus's vocabulary comes from its own genes: no pretrained Geneformer reads it, so the recipe prepares an
    # encoder on the corpus.
    args = Cell2TextArguments(corpus_dir=str(tmp_path / "corpus"), text_model_name_or_path=str(lm_dir),
                              num_cell_tokens=8, projector_hidden_size=16, encoder_hidden_size=16, encoder_epochs=1,
                              encoder_candidate_layers=[1], max_train_samples=64, max_eval_samples=16,
                              definitions_in_model_text=False)  # the option's path, end to end
    config = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=8,
                       eval_strategy="steps", eval_steps=3, save_steps=3, load_best_model_at_end=True,
                       metric_for_best_model="eval_loss", bf16=False, activation_checkpointing=False,
                       report_to="none", use_cpu=True)
    model_dir = main(args, config)
    saved_config = json.loads((model_dir / "config.json").read_text())
    assert saved_config["training_corpus_fingerprints"] == summary["fingerprints"]  # evaluation checks against it

    results, per_cell, texts = evaluate_model(model_dir, tmp_path / "corpus", "test", batch_size=16,
                                              max_new_tokens=6, max_cells=20)
    assert results["num_cells"] == 20 and len(texts) == 20
    parsed = sum(1 for text in texts if _parses(text))
    assert results["parse_rate"] == parsed / 20 and results["num_unparsed"] == 20 - parsed
    # The cell type is constrained to the training labels by default: every prediction is one, with a probability.
    labels = set(load_from_disk(str(tmp_path / "corpus"))["train"]["cell_type"])
    assert len(per_cell["cell_type_pred"]) == 20 and set(per_cell["cell_type_pred"]) <= labels
    assert all(0.0 < score <= 1.0 for score in per_cell["cell_type_score"])
    assert all(text.startswith("This sample consists of ") for text in texts)
    # the model was trained without the definitions; every description states its cell type's, written in by the code
    definitions = Cell2TextProcessor.from_pretrained(model_dir).cell_type_definitions
    assert not Cell2TextProcessor.from_pretrained(model_dir).definitions_in_model_text
    assert all(parse_description(text).cell_type_definition == definitions[cell_type].rstrip(".")
               for text, cell_type in zip(texts, per_cell["cell_type_pred"]))
    assert set(results["fields"]) >= {"cell_type", "tissue", "disease"}
    assert "ontology_similarity" in results["fields"]["cell_type"]
    report = write_report(results, per_cell, tmp_path / "report")
    assert report.exists() and "cell_type" in report.read_text()
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["num_cells"] == 20


def _parses(text: str) -> bool:
    try:
        parse_description(text)
    except DescriptionParseError:
        return False
    return True


def test_the_demo_reuses_only_a_model_trained_on_the_corpus_it_built(tmp_path):
    """`python -m training.demo --reuse-models` after the corpus changed (another --seed, or a build by another
    version): evaluation's refusal told the user to pass --other-corpus, which the demo has not; the demo says the fix."""
    from training.demo import check_trained_on

    (tmp_path / "config.json").write_text(json.dumps({"training_corpus_fingerprints": {"train": "a", "test": "b"}}))
    check_trained_on(tmp_path, {"train": "a", "test": "b"})
    with pytest.raises(ValueError, match="trained on another build of the corpus.*run without --reuse-models"):
        check_trained_on(tmp_path, {"train": "a", "test": "c"})


def test_the_main_job_runs_every_stage_on_tiny_parts(tmp_path, monkeypatch):
    """`python -m training.demo`'s own code (`training.demo.run`: the corpus, Cell2Text, the heads and expression
    baselines, Cell2Sentence, the report and the model card) on the real pbmc68k corpus, with a tiny LLM in place of
    SmolLM2 and one training step each: every other test calls its parts, not the job that wires them."""
    import training.demo as demo
    import training.prepare_demo_llm as prepare_demo_llm

    _, lm_dir = save_tiny_parts(tmp_path / "parts")
    monkeypatch.setattr(prepare_demo_llm, "prepare_demo_llm", lambda: lm_dir)
    tiny = ["--encoder_hidden_size", "16", "--encoder_epochs", "1", "--encoder_candidate_layers", "1",
            "--encoder_candidate_inputs", "rank", "--num_cell_tokens", "8", "--projector_hidden_size", "16",
            "--per_device_train_batch_size", "8", "--eval_steps", "1", "--save_steps", "1", "--bf16", "false"]
    demo_arguments = demo.sft_arguments
    monkeypatch.setattr(demo, "sft_arguments", lambda overrides: demo_arguments([*overrides, *tiny]))
    out = tmp_path / "out"
    report = demo.run(out, seed=0, max_steps=1, max_new_tokens=8, skip_cell2sentence=False)

    results = json.loads((report.parent / "results.json").read_text())
    assert results["max_steps"] == 1 and results["split_seed"] == 0
    if demo.training_threads_each() is not None:  # 2 or more cores (CI's): the baseline trained in a second process
        assert "train_cell2sentence_beyond_cell2text" in results["timings_s"]
        assert "train_cell2sentence" not in results["timings_s"]
        each = demo.training_threads_each()
        assert results["training_threads"] == {"cell2text": each, "cell2sentence": each}  # their figures depend on it
        log = (out / demo.CELL2SENTENCE_LOG).read_text()  # its output went there, not to the main job's terminal
        assert "'train_runtime'" in log and "Writing model shards" in log
    methods = {"majority", "logistic_regression", "knn", "encoder_head", "projector_head", "cell2sentence"}
    assert methods <= set(results["baselines"])
    test = load_from_disk(str(out / "corpus"))["test"]
    test_cells, truth = list(test["cell_id"]), list(test["cell_type"])
    predictions = json.loads((out / "baseline_predictions.json").read_text())
    assert predictions["cell_id"] == test_cells and predictions["cell_type_true"] == truth and len(test_cells) == 70
    assert set(predictions["predictions"]) == methods
    for name, predicted in predictions["predictions"].items():  # the report's figures are of these cells' labels
        assert len(predicted) == 70
        right = sum(label == true for label, true in zip(predicted, truth)) / 70
        assert results["baselines"][name]["cell_type"]["accuracy"] == pytest.approx(right), name
    majority = results["baselines"]["majority"]["cell_type"]  # graded: a wrong blood cell is near the right one
    assert majority["accuracy"] < majority["ontology_similarity"] < 1
    per_cell = json.loads((report.parent / "per_cell.json").read_text())
    assert per_cell["cell_id"] == test_cells and results["fields"]["cell_type"]["num_cells"] == 70  # Cell2Text's own
    accuracy = results["fields"]["cell_type"]["accuracy"]
    assert accuracy == pytest.approx(sum(p == t for p, t in zip(per_cell["cell_type_pred"], truth)) / 70)
    assert "ontology_similarity" in results["fields"]["cell_type"]
    card = (out / "cell2text-demo" / "README.md").read_text()  # Hub-ready: the card states this run's figure, and
    assert "cell2text-demo-pbmc68k" in card and f"| Cell type | {accuracy:.3f} |" in card  # the folder loads
    assert Cell2TextForConditionalGeneration.from_pretrained(out / "cell2text-demo").config.num_cell_tokens == 8
    # --reuse-models by a run of other settings: the card stated this run's (demo.yaml and its arguments), and no
    # precision or thread count, and results.json no thread count; now the model's own record
    settings = json.loads((out / "cell2text-demo" / "training_state.json").read_text())["training_settings"]
    threads = results["training_threads"]["cell2text"]
    assert (settings["lora_r"], settings["precision"], settings["torch_threads"]) == (16, "float32", threads)
    monkeypatch.setattr(demo, "sft_arguments", lambda overrides: demo_arguments([*overrides, *tiny, "--lora_r", "4"]))
    # its figures are the first run's, not what this checks: evaluating again took nearly all of the run's time
    import training.evaluation.evaluate as evaluation

    evaluated = (results, per_cell, [])
    monkeypatch.setattr(evaluation, "evaluate_model", lambda *args, **kwargs: evaluated)
    monkeypatch.setattr(demo, "expression_predictions", lambda corpus: {})
    monkeypatch.setattr(demo, "head_predictions", lambda *args: {})
    with demo.torch_threads(threads + 1):
        report = demo.run(out, seed=0, max_steps=1, max_new_tokens=8, skip_cell2sentence=True, reuse_models=True)
    card = (out / "cell2text-demo" / "README.md").read_text()
    for setting, value in (("lora_r", 16), ("precision", "float32"), ("torch_threads", threads)):
        assert f"| `{setting}` | `{value}` |" in card, setting
    assert json.loads((report.parent / "results.json").read_text())["training_threads"]["cell2text"] == threads


def test_a_failed_baseline_training_in_the_second_process_names_its_log_and_the_ways_round(tmp_path):
    """The Cell2Sentence baseline trains beside Cell2Text in a spawned process: its failure comes back as an error
    naming the log its output went to, with the second process's traceback chained."""
    from types import SimpleNamespace

    import training.demo as demo

    log = tmp_path / demo.CELL2SENTENCE_LOG
    args = SimpleNamespace(num_cell_tokens=8, cell_type_loss_weight=1.0)
    config = SFTConfig(output_dir=str(tmp_path / "c2s"), report_to="none", bf16=False)
    with demo.second_process() as pool:
        job = pool.submit(demo.train_cell2sentence_baseline, tmp_path / "no corpus", tmp_path, tmp_path / "c2s",
                          args, config, 1, log)
        with pytest.raises(RuntimeError, match=r"baseline's training failed \(.*no corpus.*its log: "
                           f".*{demo.CELL2SENTENCE_LOG}. --skip-cell2sentence .*--one-training-at-a-time.*"
                           "--reuse-models to keep the Cell2Text model") as error:  # not train it again for 20 min
            demo.cell2sentence_result(job, log)
    assert "Traceback" in str(error.value.__cause__.__cause__)  # the second process's, as concurrent.futures chains it
    assert log.exists()


def test_a_failed_baseline_training_is_logged_when_it_ends_not_only_after_cell2texts(tmp_path, caplog):
    """The failure is raised once Cell2Text's training is done, up to half an hour on; the log says so at once."""
    from concurrent.futures import Future

    import training.demo as demo

    failed, done = Future(), Future()
    failed.set_exception(FileNotFoundError("no corpus at x"))
    done.set_result(tmp_path)
    cancelled = Future()  # stopped before it started (Cell2Text's training failed at once): no error of its own
    cancelled.cancel()
    with caplog.at_level("ERROR", logger="training.demo"):
        demo.report_failure_now(done, log=tmp_path / "c2s.log")
        demo.report_failure_now(cancelled, log=tmp_path / "c2s.log")
        assert caplog.records == []
        demo.report_failure_now(failed, log=tmp_path / "c2s.log")
    assert "baseline's training failed (FileNotFoundError: no corpus at x; its log: " in caplog.text


def test_the_second_process_stops_when_the_main_jobs_work_fails():
    """Where Cell2Text's training fails or is interrupted, the baseline's training beside it is stopped, not left
    running for half an hour."""
    import time

    import training.demo as demo

    with pytest.raises(KeyboardInterrupt):
        with demo.second_process() as pool:
            pid = pool.submit(os.getpid).result()
            pool.submit(time.sleep, 300)
            raise KeyboardInterrupt
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_demo_reuses_no_cell2sentence_baseline_trained_on_another_build(tmp_path, monkeypatch):
    """`--reuse-models` reused a Cell2Sentence model left by a run on another build (another --seed; beside Cell2Text
    it may finish where Cell2Text's training then fails) and scored it on test cells it may have trained on, exit 0:
    it is refused before any training, as Cell2Text's model is."""
    import training.demo as demo
    import training.prepare_demo_llm as prepare_demo_llm
    import training.sft as sft

    _, lm_dir = save_tiny_parts(tmp_path / "parts")
    monkeypatch.setattr(prepare_demo_llm, "prepare_demo_llm", lambda: lm_dir)

    def trained(*args, **kwargs):
        raise AssertionError("trained before the reused baseline was checked")

    monkeypatch.setattr(sft, "main", trained)
    c2s = tmp_path / "out" / "c2s" / "final"
    c2s.mkdir(parents=True)
    (c2s / "model.safetensors").write_bytes(b"")
    (c2s / "cell2sentence.json").write_text(json.dumps({"num_genes": 8, "training_corpus_fingerprints": {"a": "b"}}))
    with pytest.raises(ValueError, match=r"--reuse-models: the model in .*c2s.final was trained on another build"):
        demo.run(tmp_path / "out", seed=0, max_steps=1, max_new_tokens=8, skip_cell2sentence=False,
                 reuse_models=True)


def test_a_baseline_training_process_that_dies_ends_in_an_error_not_a_wait_forever(tmp_path):
    """Two trainings side by side need about twice one's memory: where the second process was killed (for memory),
    multiprocessing's Pool started another and the result never came, so the main job waited forever after
    Cell2Text's training. Its death is an error naming the log and the ways round (one training at a time)."""
    import threading

    import training.demo as demo

    log = tmp_path / demo.CELL2SENTENCE_LOG
    errors = []

    def wait_for_the_result(job):
        try:
            demo.cell2sentence_result(job, log)
        except RuntimeError as error:
            errors.append(error)

    with demo.second_process() as pool:
        job = pool.submit(os.abort)  # the process dies at once, as one the kernel killed for memory
        waiting = threading.Thread(target=wait_for_the_result, args=(job,), daemon=True)
        waiting.start()
        waiting.join(timeout=60)
    assert not waiting.is_alive(), "still waiting for the result of a process that died"
    assert len(errors) == 1 and "--one-training-at-a-time" in str(errors[0]) and str(log) in str(errors[0])


class Evaluated(Exception):
    """Raised where the demo would evaluate its models (`stop_at_evaluation`): every check before it passed."""


def stop_at_evaluation(monkeypatch) -> None:
    import training.evaluation.evaluate as evaluate

    def evaluated(*args, **kwargs):
        raise Evaluated

    monkeypatch.setattr(evaluate, "evaluate_model", evaluated)


def fake_trained_model(folder, record: str, fingerprints: dict, max_steps: int | None):
    """A model folder as `--reuse-models` finds it: trained on `fingerprints` with `max_steps` (weights empty)."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / record).write_text(json.dumps({"training_corpus_fingerprints": fingerprints}))
    (folder / "training_state.json").write_text(json.dumps({"max_steps": max_steps,
                                                            "training_settings": {"max_steps": max_steps, "torch_threads": 1}}))
    return folder


def test_beside_a_reused_cell2text_the_baseline_trains_with_every_thread(tmp_path, monkeypatch):
    """`--reuse-models` where only the baseline is missing (its training failed): it trained in a second process on
    half the threads while this one waited, about 1.7x its time; now it trains in this process after the evaluation
    of Cell2Text, as with --one-training-at-a-time, on all of them; the log of a baseline trained beside is removed."""
    import training.demo as demo
    import training.prepare_demo_llm as prepare_demo_llm

    _, lm_dir = save_tiny_parts(tmp_path / "parts")
    monkeypatch.setattr(prepare_demo_llm, "prepare_demo_llm", lambda: lm_dir)
    build = demo.build_demo_corpus

    def build_beside_a_trained_model(corpus_dir, seed, fold=None):
        summary = build(corpus_dir, seed, fold=fold)
        fake_trained_model(corpus_dir.parent / "cell2text-demo", "config.json", summary["fingerprints"], 1)
        return summary

    def beside():
        raise AssertionError("the baseline trains beside a reused model, on half the threads")

    monkeypatch.setattr(demo, "build_demo_corpus", build_beside_a_trained_model)
    monkeypatch.setattr(demo, "training_threads_each", lambda: 1)  # as on 2 or more cores
    monkeypatch.setattr(demo, "second_process", beside)
    stop_at_evaluation(monkeypatch)
    stale = tmp_path / "out" / demo.CELL2SENTENCE_LOG  # left by a run that trained the baseline beside Cell2Text
    stale.parent.mkdir()
    stale.write_text("the log of a baseline this run replaces")
    with pytest.raises(Evaluated):
        demo.run(tmp_path / "out", seed=0, max_steps=1, max_new_tokens=8, skip_cell2sentence=False,
                 reuse_models=True)
    assert not stale.exists()  # its output goes to the terminal: the old log told of another model


@pytest.mark.parametrize("trained_with, this_run", [(1, None), (None, 1)])
def test_the_demo_reuses_only_a_model_trained_with_this_runs_step_cap(tmp_path, monkeypatch, trained_with, this_run):
    """`--reuse-models` evaluated a model of one --max-steps and the report and card stated this run's: a 1-step
    smoke model, reused by a run without --max-steps, was reported as the recipe's ("the same recipe" as the
    benchmark; no step cap in results.json), exit 0. The cap its training_state.json records must be this run's;
    a folder that records none (an earlier version's) is refused too. Checked for the baseline's model alike."""
    import training.demo as demo
    import training.prepare_demo_llm as prepare_demo_llm

    _, lm_dir = save_tiny_parts(tmp_path / "parts")
    monkeypatch.setattr(prepare_demo_llm, "prepare_demo_llm", lambda: lm_dir)
    build = demo.build_demo_corpus
    folders, built = {}, []

    def build_beside_trained_models(corpus_dir, seed, fold=None):  # built once: every run here builds the same
        if not built:
            built.append(build(corpus_dir, seed, fold=fold))
            for name, folder, record in (("cell2text", corpus_dir.parent / "cell2text-demo", "config.json"),
                                         ("cell2sentence", corpus_dir.parent / "c2s" / "final", "cell2sentence.json")):
                folders[name] = fake_trained_model(folder, record, built[0]["fingerprints"], this_run)
        return built[0]

    monkeypatch.setattr(demo, "build_demo_corpus", build_beside_trained_models)
    stop_at_evaluation(monkeypatch)
    with pytest.raises(Evaluated):  # both trained with this run's cap: evaluated
        demo.run(tmp_path / "same", seed=0, max_steps=this_run, max_new_tokens=8, skip_cell2sentence=False,
                 reuse_models=True)
    for name in ("cell2text", "cell2sentence"):
        state = folders[name] / "training_state.json"
        state.write_text(json.dumps({"max_steps": trained_with}))
        expected = "--max-steps 1" if trained_with else "no --max-steps"
        with pytest.raises(ValueError, match=rf"--reuse-models: the model in .*{folders[name].name} was trained with "
                           rf"{expected}, this run has .*pass {expected} to evaluate it"):
            demo.run(tmp_path / "same", seed=0, max_steps=this_run, max_new_tokens=8, skip_cell2sentence=False,
                     reuse_models=True)
        state.write_text(json.dumps({"global_step": 1}))  # an earlier version's record: no cap recorded
        with pytest.raises(ValueError, match="does not record the step cap"):
            demo.run(tmp_path / "same", seed=0, max_steps=this_run, max_new_tokens=8, skip_cell2sentence=False,
                     reuse_models=True)
        state.write_text(json.dumps({"max_steps": this_run, "training_settings": {"max_steps": this_run, "torch_threads": 1}}))
    # a Cell2Text model that does not record what it trained with: its card would state this run's settings
    (folders["cell2text"] / "training_state.json").write_text(json.dumps({"max_steps": this_run}))
    with pytest.raises(ValueError, match="does not record the settings the model in .*cell2text-demo was trained with"):
        demo.run(tmp_path / "same", seed=0, max_steps=this_run, max_new_tokens=8, skip_cell2sentence=False,
                 reuse_models=True)


def test_the_demo_reuses_no_gene_encoder_prepared_on_another_build(tmp_path, monkeypatch):
    """`--reuse-models` scored the probe head of the encoder in --out and showed its selection, whichever corpus it
    was prepared on: a run of another --seed that stopped after preparing its encoder (before its model was saved)
    left one whose probe head had trained on this split's test cells beside the reused model, exit 0."""
    import training.demo as demo
    import training.prepare_demo_llm as prepare_demo_llm
    from training.gene_encoder import PREPARED_ENCODER_DIR, SELECTION_FILE

    _, lm_dir = save_tiny_parts(tmp_path / "parts")
    monkeypatch.setattr(prepare_demo_llm, "prepare_demo_llm", lambda: lm_dir)
    build, built = demo.build_demo_corpus, []
    selection = tmp_path / "out" / "sft" / PREPARED_ENCODER_DIR / SELECTION_FILE

    def build_beside_a_trained_model(corpus_dir, seed, fold=None):  # built once: both runs here build the same
        if not built:
            built.append(build(corpus_dir, seed, fold=fold))
            fake_trained_model(corpus_dir.parent / "cell2text-demo", "config.json", built[0]["fingerprints"], 1)
        return built[0]

    monkeypatch.setattr(demo, "build_demo_corpus", build_beside_a_trained_model)
    stop_at_evaluation(monkeypatch)
    selection.parent.mkdir(parents=True)
    other_build = {"train": "x", "validation": "y", "test": "z"}
    selection.write_text(json.dumps({"candidates": [], "validation_accuracy": [], "best": 0, "path": "p",
                                     "prepared_for": {"corpus_fingerprints": other_build}}))
    with pytest.raises(ValueError, match=r"--reuse-models: the gene encoder in .*gene_encoder was prepared on "
                       "another build of the corpus.*run without --reuse-models"):
        demo.run(tmp_path / "out", seed=0, max_steps=1, max_new_tokens=8, skip_cell2sentence=True, reuse_models=True)
    record = json.loads(selection.read_text())
    record["prepared_for"]["corpus_fingerprints"] = built[0]["fingerprints"]  # the reused model's own encoder
    selection.write_text(json.dumps(record))
    with pytest.raises(Evaluated):
        demo.run(tmp_path / "out", seed=0, max_steps=1, max_new_tokens=8, skip_cell2sentence=True, reuse_models=True)


@pytest.mark.parametrize("one_training_at_a_time, skip_cell2sentence, threads",
                         [(True, False, 2), (False, True, 2), (False, False, 1)])
def test_cell2text_trains_on_every_thread_unless_the_baseline_trains_beside_it(tmp_path, monkeypatch, caplog,
                                                                               one_training_at_a_time,
                                                                               skip_cell2sentence, threads):
    """`--one-training-at-a-time` (half the peak memory), or no baseline (`--skip-cell2sentence`, the quality
    benchmark's default): Cell2Text trains on all of torch's threads and no second process starts, on 2 or more cores
    too. Else the baseline goes to the second process and both train on half the threads, as results.json records.
    The baseline's failure there is logged when it ends. The command line's flags reach `run`."""
    from concurrent.futures import Future

    import torch

    import training.demo as demo
    import training.prepare_demo_llm as prepare_demo_llm
    import training.sft as sft

    _, lm_dir = save_tiny_parts(tmp_path / "parts")
    monkeypatch.setattr(prepare_demo_llm, "prepare_demo_llm", lambda: lm_dir)
    submitted, jobs = [], []

    class Trained(Exception):
        pass

    class Pool:
        def submit(self, function, *args):
            submitted.append((function, args))
            jobs.append(Future())
            return jobs[-1]

    @contextlib.contextmanager
    def beside():
        yield Pool()

    def trained(*args, **kwargs):
        raise Trained(torch.get_num_threads())

    monkeypatch.setattr(demo, "training_threads_each", lambda: 1)  # as on 2 or more cores
    monkeypatch.setattr(demo, "second_process", beside)
    monkeypatch.setattr(sft, "main", trained)
    with demo.torch_threads(2), pytest.raises(Trained) as error:
        demo.run(tmp_path / "out", seed=0, max_steps=1, max_new_tokens=8, skip_cell2sentence=skip_cell2sentence,
                 one_training_at_a_time=one_training_at_a_time)
    assert error.value.args == (threads,)
    assert [(function, args[-2]) for function, args in submitted] == (
        [(demo.train_cell2sentence_baseline, 1)] if threads == 1 else [])
    with caplog.at_level("ERROR", logger="training.demo"):
        for job in jobs:
            job.set_exception(MemoryError("killed"))
    assert ("baseline's training failed (MemoryError: killed" in caplog.text) == (threads == 1)
    given = []
    monkeypatch.setattr(demo, "run", lambda *args, **kwargs: given.append((args, kwargs)) or tmp_path / "report.md")
    demo.main(["--out", str(tmp_path / "out"), *(["--one-training-at-a-time"] if one_training_at_a_time else []),
               *(["--skip-cell2sentence"] if skip_cell2sentence else [])])
    (args, kwargs), = given
    assert (kwargs["one_training_at_a_time"], args[4]) == (one_training_at_a_time, skip_cell2sentence)


def test_one_training_at_a_time_without_the_baseline_is_refused(tmp_path, monkeypatch, capsys):
    """Nothing to order with --skip-cell2sentence: the flag was accepted without a word."""
    import training.demo as demo

    monkeypatch.setattr(demo, "run", lambda *args, **kwargs: pytest.fail("ran with a flag that changes nothing"))
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "out"), "--one-training-at-a-time", "--skip-cell2sentence"])
    assert "--skip-cell2sentence leaves out; pass one of them" in capsys.readouterr().err


def test_two_trainings_side_by_side_take_half_the_threads_each_and_none_on_one_core(monkeypatch):
    """Side by side only where this process may use 2 or more cores (on one, the two would share it, with twice the
    memory, for no time saved); the second process trains on the threads it is given."""
    from types import SimpleNamespace

    import torch

    import training.baselines.cell2sentence as cell2sentence
    import training.demo as demo

    for cores, threads, each in [({0}, 4, None), ({0, 1}, 4, 2), ({0, 1}, 1, 1)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: cores, raising=False)
        with demo.torch_threads(threads):
            assert demo.training_threads_each() == each, (cores, threads)
    monkeypatch.setattr(cell2sentence, "train_cell2sentence", lambda *args, **kwargs: torch.get_num_threads())
    args = SimpleNamespace(num_cell_tokens=8, cell_type_loss_weight=1.0)
    with demo.torch_threads(2):
        assert demo.train_cell2sentence_baseline("corpus", "llm", "out", args, None, threads=1) == 1
    before = torch.get_num_threads()
    try:  # Cell2Text's training beside it on half the threads: the evaluation after it gets all of them back
        torch.set_num_threads(2)
        with demo.torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
