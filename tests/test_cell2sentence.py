"""The Cell2Sentence-style baseline with the tiny parts: cell sentences, the completion-only loss mask, train + generate."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import load_from_disk
from tiny_parts import save_tiny_corpus, save_tiny_parts
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from trl import SFTConfig

from modeling_cell2text import Cell2TextFeatureExtractor
from training.adapters import LoraArguments, RecordTrainedWith
from training.baselines.cell2sentence import (
    SYSTEM_PROMPT,
    USER_PREFIX,
    build_trainer,
    cell_sentence,
    generate_cell2sentence,
    load_corpus,
    make_parser,
    train_cell2sentence,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def parts_and_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("c2s")
    _, lm_dir = save_tiny_parts(root / "parts")
    return lm_dir, save_tiny_corpus(root / "corpus")


def tiny_config(out_dir, **overrides) -> SFTConfig:
    settings = dict(
        output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=1e-3, bf16=False, activation_checkpointing=False, report_to="none", use_cpu=True,
        logging_steps=1, seed=0,
    )
    return SFTConfig(**{**settings, **overrides})


def test_cell_sentence_lists_symbols_in_rank_order_and_skips_specials():
    genes = ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"]
    feature_extractor = Cell2TextFeatureExtractor.from_gene_medians(
        {g: 1.0 for g in genes}, gene_symbols={genes[0]: "CD14", genes[2]: "LYZ"}
    )
    ids = {g: feature_extractor.gene_token_ids[g] for g in genes}
    cls, eos, pad = feature_extractor.cls_token_id, feature_extractor.eos_token_id, feature_extractor.pad_token_id
    tokens = [cls, ids[genes[2]], ids[genes[1]], ids[genes[0]], eos, pad]

    assert cell_sentence(tokens, feature_extractor, num_genes=10) == "LYZ ENSG00000000002 CD14"
    assert cell_sentence(tokens, feature_extractor, num_genes=2) == "LYZ ENSG00000000002"
    with pytest.raises(ValueError, match="not in the feature extractor's vocabulary"):
        cell_sentence([cls, 999], feature_extractor, num_genes=2)


def test_loss_mask_covers_only_the_completion(parts_and_corpus, tmp_path):
    lm_dir, corpus_dir = parts_and_corpus
    trainer = build_trainer(corpus_dir, lm_dir, tmp_path / "out", num_genes=8, training_args=tiny_config(tmp_path))
    tokenizer = trainer.processing_class
    corpus = load_from_disk(str(corpus_dir))
    example = trainer.train_dataset[0]
    ids, labels = torch.tensor(example["input_ids"]), torch.tensor(example["labels"])
    in_loss = labels != -100  # TRL folds the completion mask into the labels
    prompt_end = int((~in_loss).sum())
    assert prompt_end > 0 and not in_loss[:prompt_end].any() and in_loss[prompt_end:].all()
    assert labels[prompt_end:].equal(ids[prompt_end:])

    prompt_text = tokenizer.decode(ids[:prompt_end])
    assert SYSTEM_PROMPT in prompt_text and USER_PREFIX in prompt_text and prompt_text.endswith("<|im_start|>assistant\n")
    assert corpus["train"][0]["description"] not in prompt_text
    assert tokenizer.decode(ids[prompt_end:]) == corpus["train"][0]["description"] + "<|im_end|>\n"

    rows = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(rows)
    for i, row in enumerate(rows):
        kept = batch["attention_mask"][i].bool()
        assert batch["labels"][i][kept].equal(torch.tensor(row["labels"]))
        assert batch["labels"][i][~kept].eq(-100).all()

def test_a_max_length_that_cuts_examples_is_refused_before_training(parts_and_corpus, tmp_path):
    """TRL cut each example at max_length and dropped those whose prompt alone filled it: at 200 the baseline trained
    on 9 of the 32 training cells, each description cut, exit 0."""
    lm_dir, corpus_dir = parts_and_corpus
    with pytest.raises(ValueError, match=r"--max_length 200 cuts the cell sentence and description of 32 of the 32 "
                                         r"train cells \(23 left out.*larger --max_length"):
        build_trainer(corpus_dir, lm_dir, tmp_path / "out", num_genes=8,
                      training_args=tiny_config(tmp_path, max_length=200))
    # packing chunks the examples at max_length by design (every packed row is max_length long): not a cut
    build_trainer(corpus_dir, lm_dir, tmp_path / "out", num_genes=8,
                  training_args=tiny_config(tmp_path, max_length=200, packing=True))
    trainer = build_trainer(corpus_dir, lm_dir, tmp_path / "out", num_genes=8,
                            training_args=tiny_config(tmp_path, max_length=None))
    assert len(trainer.train_dataset) == len(load_from_disk(str(corpus_dir))["train"])


def test_validation_examples_cut_at_max_length_are_refused_as_training_ones_are():
    """A max_length that every training example fits but a validation example fills would have the eval loss (and
    the best checkpoint chosen by it) measured on cut descriptions; a validation cell dropped counts too."""
    from types import SimpleNamespace

    from datasets import Dataset

    from training.baselines.cell2sentence import check_whole_examples

    def trainer(validation_lengths):
        rows = lambda lengths: Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})  # noqa: E731
        return SimpleNamespace(args=SimpleNamespace(max_length=6, packing=False), train_dataset=rows([3, 5]),
                               eval_dataset=rows(validation_lengths))

    check_whole_examples(trainer([4]), {"train": 2, "validation": 1})
    for lengths, cut, left_out in (([6, 4], 1, 0), ([6], 2, 1)):
        with pytest.raises(ValueError, match=rf"--max_length 6 cuts the cell sentence and description of {cut} of "
                                             rf"the 2 validation cells \({left_out} left out"):
            check_whole_examples(trainer(lengths), {"train": 2, "validation": 2})


def test_a_resume_with_other_settings_is_refused(parts_and_corpus, tmp_path):
    # a checkpoint of 8-gene sentences resumed with 16 trained on, and the final folder recorded num_genes 16
    lm_dir, corpus_dir = parts_and_corpus
    out = tmp_path / "c2s"
    train_cell2sentence(corpus_dir, lm_dir, out, num_genes=8, training_args=tiny_config(out, save_steps=2))
    checkpoint = str(out / "checkpoint-2")
    for other, setting in ((dict(num_genes=16), "num_genes"), (dict(lora=LoraArguments(lora_r=4)), "lora_r"),
                           (dict(lora=LoraArguments(lora_dropout=0.2)), "lora_dropout"),
                           (dict(cell_type_loss_weight=4.0), "cell_type_loss_weight")):
        with pytest.raises(ValueError, match=rf"checkpoint-2 was trained with another {setting} than this run's"):
            train_cell2sentence(corpus_dir, lm_dir, out, **{"num_genes": 8, **other}, overwrite=True,
                                training_args=tiny_config(out, save_steps=2, resume_from_checkpoint=checkpoint))
    template = tmp_path / "template.jinja"  # TRL sets it inside the trainer: the steps left trained on other texts
    template.write_text(AutoTokenizer.from_pretrained(lm_dir).chat_template.replace("message['content']",
                                                                                   "(message['content'] | trim)"))
    with pytest.raises(ValueError, match=r"another tokenizer_sha256 than this run's"):
        train_cell2sentence(corpus_dir, lm_dir, out, num_genes=8, overwrite=True, training_args=tiny_config(
            out, save_steps=2, resume_from_checkpoint=checkpoint, chat_template_path=str(template)))
    with pytest.raises(ValueError, match=r"another global_batch_size than this run's"):
        train_cell2sentence(corpus_dir, lm_dir, out, num_genes=8, overwrite=True, training_args=tiny_config(
            out, save_steps=2, resume_from_checkpoint=checkpoint, gradient_accumulation_steps=2))
    _, other_lm = save_tiny_parts(tmp_path / "other-parts", seed=1)  # the adapters trained on another LLM, exit 0
    with pytest.raises(ValueError, match=r"another language_model_sha256 than this run's"):
        train_cell2sentence(corpus_dir, other_lm, out, num_genes=8, overwrite=True,
                            training_args=tiny_config(out, save_steps=2, resume_from_checkpoint=checkpoint))
    with pytest.raises(ValueError, match=r"another learning_rate than this run's"):  # the checkpoint's was kept, exit 0
        train_cell2sentence(corpus_dir, lm_dir, out, num_genes=8, overwrite=True, training_args=tiny_config(
            out, save_steps=2, resume_from_checkpoint=checkpoint, learning_rate=1.0))
    final = train_cell2sentence(corpus_dir, lm_dir, out, num_genes=8, overwrite=True,
                                training_args=tiny_config(out, save_steps=2, resume_from_checkpoint=checkpoint))
    assert json.loads((final / "training_state.json").read_text())["global_step"] == 4


def test_the_record_of_a_template_cloned_from_a_tokenizer_follows_that_tokenizer(parts_and_corpus, tmp_path):
    """TRL's other --chat_template_path form clones the template (and special tokens) of a tokenizer: recorded by its
    name alone, a resume after that tokenizer's template changed trained on other texts, exit 0."""
    from training.adapters import tokenizer_sha256

    lm_dir, _ = parts_and_corpus
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    source = tmp_path / "template-source"
    tokenizer.save_pretrained(source)
    before = tokenizer_sha256(tokenizer, str(source))
    assert tokenizer_sha256(tokenizer, str(source)) == before
    changed = AutoTokenizer.from_pretrained(source)
    changed.chat_template = tokenizer.chat_template.replace("message['content']", "(message['content'] | trim)")
    changed.save_pretrained(source)
    assert tokenizer_sha256(tokenizer, str(source)) != before


def test_a_template_stating_the_date_trains_and_generates_on_the_fixed_date(parts_and_corpus, tmp_path, monkeypatch):
    """Llama 3's chat templates write "Today Date:" from `date_string`, else today's: the baseline trained on the day
    of its run and described cells on the day of its evaluation, other prompts than it learnt (and than the day
    before), exit 0. Both state Cell2Text's fixed date (`PROMPT_DATE`)."""
    import transformers.tokenization_utils_base as tokenization

    from modeling_cell2text.processing_cell2text import PROMPT_DATE
    from tiny_parts import CHATML_TEMPLATE

    lm_dir, corpus_dir = parts_and_corpus
    dated = tmp_path / "dated"
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.chat_template = ("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
                               "{%- endif %}{{ 'Today Date: ' + date_string + '\\n' }}" + CHATML_TEMPLATE)
    tokenizer.save_pretrained(dated)
    AutoModelForCausalLM.from_pretrained(lm_dir).save_pretrained(dated)
    trainer = build_trainer(corpus_dir, dated, tmp_path / "out", num_genes=8, training_args=tiny_config(tmp_path))
    trained = trainer.processing_class.decode(trainer.train_dataset[0]["input_ids"])
    assert trained.startswith(f"Today Date: {PROMPT_DATE}")
    rendered = []
    render = tokenization.render_jinja_template
    monkeypatch.setattr(tokenization, "render_jinja_template",
                        lambda *args, **kwargs: rendered.append(render(*args, **kwargs)) or rendered[-1])
    corpus, feature_extractor = load_corpus(corpus_dir)
    generate_cell2sentence(dated, corpus["test"].select(range(2)), feature_extractor, num_genes=8, max_new_tokens=1)
    chats = [chat for texts, _ in rendered for chat in texts]
    assert chats and all(chat.startswith(f"Today Date: {PROMPT_DATE}") for chat in chats)
    # the resume record holds the date, so that a checkpoint trained before the fixed date is refused
    assert next(callback.record for callback in trainer.callback_handler.callbacks
                if isinstance(callback, RecordTrainedWith))["prompt_date"] == PROMPT_DATE


def test_a_tokenizer_of_named_chat_templates_trains(parts_and_corpus, tmp_path):
    """A tokenizer of several named templates (a "default" and a "tool_use", as tool-calling models ship) holds them
    as a dict, which TRL renders by its "default": the check of the date its prompts state passed the dict itself as
    the template, and the baseline stopped with a TypeError (unhashable type: 'dict') before training."""
    from tiny_parts import CHATML_TEMPLATE

    lm_dir, corpus_dir = parts_and_corpus
    named = tmp_path / "named"
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.chat_template = {"default": CHATML_TEMPLATE, "tool_use": CHATML_TEMPLATE}
    tokenizer.save_pretrained(named)
    AutoModelForCausalLM.from_pretrained(lm_dir).save_pretrained(named)
    assert isinstance(AutoTokenizer.from_pretrained(named).chat_template, dict)
    trainer = build_trainer(corpus_dir, named, tmp_path / "out", num_genes=8, training_args=tiny_config(tmp_path))
    assert next(callback.record for callback in trainer.callback_handler.callbacks
                if isinstance(callback, RecordTrainedWith))["prompt_date"] is None


def test_a_template_writing_todays_date_itself_is_refused(parts_and_corpus, tmp_path):
    """A template calling `strftime_now` itself (not as Llama 3's fallback for `date_string`) is refused by the
    recipe and the processor; the baseline trained on the day of its run and described cells on the day of its
    evaluation, exit 0. The same check (`render_chat`) refuses it in training and in generation."""
    from tiny_parts import CHATML_TEMPLATE

    lm_dir, corpus_dir = parts_and_corpus
    today = "{{ 'Today Date: ' + strftime_now('%d %b %Y') + '\\n' }}" + CHATML_TEMPLATE
    template = tmp_path / "today.jinja"
    template.write_text(today)
    with pytest.raises(ValueError, match=r"The chat template writes today's date itself \(strftime_now.*Write a "
                                         r"fixed date"):
        build_trainer(corpus_dir, lm_dir, tmp_path / "out", num_genes=8,
                      training_args=tiny_config(tmp_path, chat_template_path=str(template)))
    dated = tmp_path / "dated"  # a model folder of its own template
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.chat_template = today
    tokenizer.save_pretrained(dated)
    AutoModelForCausalLM.from_pretrained(lm_dir).save_pretrained(dated)
    with pytest.raises(ValueError, match=r"The chat template writes today's date itself"):
        build_trainer(corpus_dir, dated, tmp_path / "out", num_genes=8, training_args=tiny_config(tmp_path))
    corpus, feature_extractor = load_corpus(corpus_dir)
    with pytest.raises(ValueError, match=r"The chat template writes today's date itself"):
        generate_cell2sentence(dated, corpus["test"].select(range(1)), feature_extractor, num_genes=8,
                               max_new_tokens=1)


def test_train_merge_and_generate_one_text_per_cell(parts_and_corpus, tmp_path):
    lm_dir, corpus_dir = parts_and_corpus
    config = tiny_config(
        tmp_path / "ignored", eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    final_dir = train_cell2sentence(corpus_dir, lm_dir, tmp_path / "c2s", num_genes=8, training_args=config)

    assert final_dir == tmp_path / "c2s" / "final"
    record = json.loads((final_dir / "cell2sentence.json").read_text())
    assert record["num_genes"] == 8  # and the cells it trained on, which the main job's --reuse-models checks
    corpus = load_from_disk(str(corpus_dir))  # no summary.json: datasets' fingerprints of its splits
    assert record["training_corpus_fingerprints"] == {split: corpus[split]._fingerprint for split in corpus}
    state = json.loads((final_dir / "training_state.json").read_text())
    assert state["global_step"] == 4 and state["best_model_checkpoint"] is not None
    assert state["max_steps"] == 4  # the step cap, which the main job's --reuse-models checks
    model = AutoModelForCausalLM.from_pretrained(final_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())

    test = load_from_disk(str(corpus_dir))["test"]
    feature_extractor = Cell2TextFeatureExtractor.from_pretrained(corpus_dir / "feature_extractor")
    # The tiny random model writes EOS or blank tokens first, whatever the cell: keep it to visible text, and make
    # its output depend on the prompt (larger weights), so that the texts compared below are each cell's own
    # (all '' would compare equal whatever cell they came from).
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.ndim == 2 and "embed" not in name:
                weight.mul_(20.0)
    model.save_pretrained(final_dir)
    generation_config = GenerationConfig.from_pretrained(final_dir)
    generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()]
    generation_config.save_pretrained(final_dir)
    texts, whole = generate_cell2sentence(final_dir, test, feature_extractor, 8, batch_size=3, max_new_tokens=4)
    assert len(texts) == len(test) == 8
    assert all(texts) and len(set(texts)) > 1
    assert whole == [False] * 8  # cut at 4 tokens (the scaled model writes no end of text): counted as unparsed
    # each text is its own cell's: batches of 3 (left-padded) give what one cell at a time gives
    assert (texts, whole) == generate_cell2sentence(final_dir, test, feature_extractor, 8, batch_size=1,
                                                    max_new_tokens=4)
    generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id]
    generation_config.save_pretrained(final_dir)  # now each writes the end of text first: ended, not cut
    assert generate_cell2sentence(final_dir, test, feature_extractor, 8, max_new_tokens=4) == ([""] * 8, [True] * 8)
    # a tokenizer whose eos_token is not its chat template's turn end (Gemma's <eos> and <end_of_turn>): the turn
    # end the baseline is trained to write still ends a description (every one read as cut before)
    AutoTokenizer.from_pretrained(final_dir, eos_token="<|endoftext|>").save_pretrained(final_dir)
    generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    generation_config.save_pretrained(final_dir)
    assert generate_cell2sentence(final_dir, test, feature_extractor, 8, max_new_tokens=4) == ([""] * 8, [True] * 8)
    with pytest.raises(ValueError, match="num_genes=8"):
        generate_cell2sentence(final_dir, test, feature_extractor, 16)


def test_cli_parser_reads_sft_config_fields():
    args, config = make_parser().parse_args_and_config(
        ["--corpus_dir", "c", "--text_model_name_or_path", "m", "--output_dir", "o", "--num_genes", "12",
         "--per_device_train_batch_size", "8", "--max_steps", "3", "--bf16", "false"]
    )
    assert (args.num_genes, config.per_device_train_batch_size, config.max_steps, config.output_dir) == (12, 8, 3, "o")


def test_same_seed_gives_the_same_weights(parts_and_corpus, tmp_path):
    """A guard: TRL seeds before drawing the LoRA adapters and the Trainer before training."""
    lm_dir, corpus_dir = parts_and_corpus
    weights = []
    for run in (1, 2):
        torch.manual_seed(run)  # whatever ran before (other code, another process) must not matter
        final_dir = train_cell2sentence(corpus_dir, lm_dir, tmp_path / f"run-{run}", num_genes=8,
                                        training_args=tiny_config(tmp_path / f"run-{run}", max_steps=1))
        weights.append(AutoModelForCausalLM.from_pretrained(final_dir).state_dict())
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0]), "weights differ between runs"
