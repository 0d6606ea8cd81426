"""The labelled-positions loss equals TRL's fused-head loss, in value and in gradients, at a fraction of the head's work."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from tiny_parts import save_tiny_corpus, save_tiny_parts
from transformers import AutoConfig
from trl import SFTConfig, SFTTrainer

from modeling_cell2text.description_schema import set_definition
from training import sft
from training.collator import Cell2TextDataCollator
from training.gene_encoder import record_preparation
from training.loss import LabelledPositionsLossMixin


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss")
    encoder_dir, lm_dir = save_tiny_parts(root / "parts")
    corpus_dir = save_tiny_corpus(root / "corpus")
    args = sft.Cell2TextArguments(corpus_dir=str(corpus_dir), text_model_name_or_path=str(lm_dir),
                                  gene_encoder_name_or_path=str(encoder_dir), num_cell_tokens=8,
                                  projector_hidden_size=16, lora_dropout=0.0, projector_dropout=0.0)
    corpus, summary = sft.load_corpus(corpus_dir, args)
    processor = sft.build_processor(args, corpus_dir, summary)
    # the tiny random encoder, recorded as built for the corpus's gene vocabulary (as a corpus-prepared one is)
    record_preparation(encoder_config := AutoConfig.from_pretrained(encoder_dir), processor.feature_extractor,
                       feature_layer=None)
    encoder_config.save_pretrained(encoder_dir)
    model = sft.build_model(args, str(encoder_dir), processor)
    config = SFTConfig(output_dir=str(root / "out"), report_to="none", use_cpu=True, bf16=False,
                       remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=sft.language_model_lora_targets(model),
                      modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    trainer = sft.Cell2TextSFTTrainer(
        model=model, args=config, data_collator=Cell2TextDataCollator(processor), train_dataset=corpus["train"],
        processing_class=processor, peft_config=lora, projector_learning_rate=1e-3, gene_encoder_learning_rate=1e-5,
    )
    return trainer, Cell2TextDataCollator(processor)([corpus["train"][i] for i in range(5)])


def loss_and_grads(loss_fn, model, batch):
    model.zero_grad()
    loss = loss_fn(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("num_items_in_batch", [None, 150])
def test_labelled_positions_loss_equals_trl_loss_and_gradients(trainer, num_items_in_batch):
    trainer, batch = trainer
    model = trainer.model.train()
    assert (batch["labels"] == -100).float().mean() > 0.3  # prompts and padding: positions the head may skip

    def ours(m, b):
        return trainer.compute_loss(m, b, num_items_in_batch=num_items_in_batch)

    def trls(m, b):
        return SFTTrainer.compute_loss(trainer, m, b, num_items_in_batch=num_items_in_batch)

    loss, grads = loss_and_grads(ours, model, batch)
    reference, reference_grads = loss_and_grads(trls, model, batch)
    assert torch.allclose(loss, reference, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(grad, reference_grads[name], rtol=1e-4, atol=1e-7), name


def test_logged_token_accuracy_is_trls(trainer):
    trainer, batch = trainer
    model = trainer.model.eval()
    batch = dict(batch)
    with torch.no_grad():  # make every other labelled target the model's own prediction: accuracy near 1/2
        predicted = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)[:, :-1]
    labels = batch["labels"].clone()
    labelled = (labels[:, 1:] != -100).nonzero()
    for row, column in labelled[::2].tolist():
        labels[row, column + 1] = predicted[row, column]
    batch["labels"] = labels
    model.train()
    trainer._token_accuracy["train"].clear()  # the mean since the last log is logged: start from none
    with torch.no_grad():
        trainer.compute_loss(model, dict(batch))
        SFTTrainer.compute_loss(trainer, model, dict(batch))
    ours, trls = trainer._token_accuracy["train"][-1], trainer._metrics["train"]["mean_token_accuracy"][-1]
    assert 0.4 < trls < 0.9 and ours == pytest.approx(trls, abs=1e-6)
    trainer._metrics["train"].clear()
    trainer.log({"loss": 0.0})
    assert trainer.state.log_history[-1]["mean_token_accuracy"] == pytest.approx(ours)
    assert trainer._token_accuracy["train"] == []


def test_the_last_partial_batch_of_an_epoch_is_trained_on(trainer):
    # The dataloader's state on the last batch of an epoch whose cells do not fill it (490 cells at 4 a batch: 2
    # left over): the token-accuracy counts were cut to the leftover size and the step crashed.
    trainer, batch = trainer
    class LastBatchOfEpoch:  # what accelerate's dataloader reports there
        end_of_dataloader = True
        remainder = 1

    state, dataloader = trainer.accelerator.gradient_state, LastBatchOfEpoch()
    state._add_dataloader(dataloader)
    try:
        loss = trainer.compute_loss(trainer.model.train(), dict(batch))
    finally:
        state._remove_dataloader(dataloader)
    assert torch.isfinite(loss)
    assert 0.0 <= trainer._token_accuracy["train"][-1] <= 1.0


def test_mixin_keeps_trl_path_when_outputs_are_asked_for(trainer):
    trainer, batch = trainer
    loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    assert outputs is not None and torch.isfinite(loss)
    assert issubclass(sft.Cell2TextSFTTrainer, LabelledPositionsLossMixin)


def test_first_sentence_weights_cover_the_cell_type_sentence(trainer):
    trainer, batch = trainer
    tokenizer = trainer.processing_class.tokenizer
    targets = batch["labels"][:, 1:]
    trainer.cell_type_loss_weight = 4.0
    try:
        weights = trainer.target_weights(targets)
    finally:
        trainer.cell_type_loss_weight = 1.0
    for row, row_weights in zip(targets, weights):
        labelled = row != -100
        heavy = tokenizer.decode(row[row_weights == 4.0])
        assert heavy.startswith("This sample consists of a ") and heavy.endswith(".") and heavy.count(".") == 1
        assert set(row_weights[labelled].tolist()) == {1.0, 4.0} and (row_weights[~labelled] == 0).all()
        assert tokenizer.decode(row[labelled]).startswith(heavy)  # the heavy tokens lead the target


def test_a_one_sentence_description_weighs_its_end_of_turn_one(trainer):
    """The reviewer's finding: where the first sentence is the whole description (a description naming only the
    cell type, or the first training stage's), its end-of-turn token took the cell type's weight too."""
    trainer, _ = trainer
    tokenizer = trainer.processing_class.tokenizer
    sentence = tokenizer("This sample consists of a B cell.", add_special_tokens=False)["input_ids"]
    longer = tokenizer("This sample consists of a B cell. It originates from the blood of a healthy donor.",
                       add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    targets = torch.full((2, len(longer) + 2), -100)
    targets[0, 1:len(sentence) + 2] = torch.tensor(sentence + [eos])
    targets[1, 1:len(longer) + 2] = torch.tensor(longer + [eos])
    trainer.cell_type_loss_weight = 4.0
    try:
        weights = trainer.target_weights(targets)
    finally:
        trainer.cell_type_loss_weight = 1.0
    assert weights[0, 1:len(sentence) + 1].tolist() == [4.0] * len(sentence)
    assert weights[0, len(sentence) + 1] == 1.0  # the end of turn
    assert weights[1, 1:len(sentence) + 1].tolist() == [4.0] * len(sentence)
    assert weights[1, len(sentence) + 1:len(longer) + 2].tolist() == [1.0] * (len(longer) + 1 - len(sentence))
    assert weights[0, 0] == 0 and weights[0, len(sentence) + 2:].eq(0).all()


def test_weighted_loss_is_the_weighted_token_mean(trainer):
    trainer, batch = trainer
    model = trainer.model.eval()  # no dropout: the two passes see the same model
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                reduction="none").view_as(targets)
        trainer.cell_type_loss_weight = 3.0
        try:
            loss = trainer.compute_loss(model, dict(batch))
            weights = trainer.target_weights(targets)
        finally:
            trainer.cell_type_loss_weight = 1.0
    assert torch.allclose(loss, (nll * weights).sum() / (targets != -100).sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="cell_type_loss_weight must be > 0"):
        sft.Cell2TextSFTTrainer(model=None, cell_type_loss_weight=0, projector_learning_rate=1e-3,
                                gene_encoder_learning_rate=1e-5)



@pytest.mark.parametrize("setting", ["label_smoothing", "dft"])
def test_a_cell_type_loss_weight_with_a_loss_only_trl_computes_is_refused_not_ignored(trainer, setting):
    """TRL's loss path (label smoothing, loss_type dft) knows no cell_type_loss_weight: 4 trained with the unweighted
    loss, exit 0."""
    from transformers.trainer_pt_utils import LabelSmoother

    trainer, batch = trainer
    model = trainer.model.train()
    trainer.cell_type_loss_weight = 4.0
    if setting == "dft":
        trainer.args.loss_type = "dft"
    else:
        trainer.label_smoother = LabelSmoother(epsilon=0.1)
    try:
        with pytest.raises(ValueError, match="cell_type_loss_weight other than 1.*needs this loss"):
            trainer.compute_loss(model, dict(batch))
        trainer.cell_type_loss_weight = 1.0
        assert torch.isfinite(trainer.compute_loss(model, dict(batch)))  # TRL's loss, which the weight 1 is
    finally:
        trainer.cell_type_loss_weight, trainer.args.loss_type, trainer.label_smoother = 1.0, "nll", None

def test_labels_only_weighs_the_cell_type_label_alone(trainer):
    """With loss_on_labels_only the first sentence's period carries no loss: cell_type_loss_weight weighs the cell
    type's tokens, not every label's (it weighed them all), also in a one-row batch whose logits skip the gaps."""
    trainer_, _ = trainer
    processor = trainer_.processing_class
    examples = [trainer_.train_dataset[i] for i in range(3)]
    batch = Cell2TextDataCollator(processor, labels_only=True)(examples)
    targets = batch["labels"][:, 1:]
    model = trainer_.model.eval()
    trainer_.cell_type_loss_weight = 5.0
    try:
        weights = trainer_.target_weights(targets)
        one_row = {key: value[:1] for key, value in batch.items()}
        with torch.no_grad():
            loss = trainer_.compute_loss(model, dict(one_row))
            logits = model(**{k: v for k, v in one_row.items() if k != "labels"}).logits[:, :-1].float()
    finally:
        trainer_.cell_type_loss_weight = 1.0
    for row, example in enumerate(examples):
        heavy = processor.tokenizer.decode(targets[row][weights[row] == 5.0])
        assert heavy.strip() == example["cell_type"]
        assert (weights[row][targets[row] != -100] == 1.0).any()  # the other labels weigh 1
    nll = torch.nn.functional.cross_entropy(logits[0], targets[0], ignore_index=-100, reduction="none")
    assert torch.allclose(loss, (nll * weights[0]).sum() / (targets[0] != -100).sum(), rtol=1e-5)


def test_labels_only_keeps_the_loss_on_the_label_tokens(trainer):
    trainer_, full = trainer
    processor = trainer_.processing_class
    examples = [trainer_.train_dataset[i] for i in range(3)]
    masked = Cell2TextDataCollator(processor, labels_only=True)(examples)
    assert torch.equal(masked["input_ids"], full["input_ids"][:3])  # the inputs are the same
    for row, example in enumerate(examples):
        kept = masked["labels"][row][masked["labels"][row] != -100]
        every = full["labels"][row][full["labels"][row] != -100]
        assert 0 < len(kept) < len(every)
        text = processor.tokenizer.decode(kept)
        for label in (example["cell_type"], example["tissue"]):  # "normal" is written "healthy"
            assert label.replace(" ", "") in text.replace(" ", "")
        assert "sample" not in text and "originates" not in text  # template words carry no loss


def test_labels_only_keeps_the_same_label_tokens_when_the_model_text_has_no_definitions(trainer):
    """Without definitions in the model's text the targets are shorter, and labels_only finds the same labels in
    them (its spans are the model text's, not the corpus description's)."""
    trainer_, _ = trainer
    processor = trainer_.processing_class
    examples = [{**example, "description": set_definition(example["description"], "A lymphocyte of some lineage")}
                for example in (trainer_.train_dataset[i] for i in range(3))]
    with_definitions = Cell2TextDataCollator(processor, labels_only=True)(examples)
    processor.definitions_in_model_text = False
    try:
        without = Cell2TextDataCollator(processor, labels_only=True)(examples)
        full = Cell2TextDataCollator(processor)(examples)
    finally:
        processor.definitions_in_model_text = True
    for row, example in enumerate(examples):
        assert "definition" not in processor.tokenizer.decode(full["labels"][row][full["labels"][row] != -100])
        kept = [batch["labels"][row][batch["labels"][row] != -100] for batch in (with_definitions, without)]
        assert processor.tokenizer.decode(kept[0]) == processor.tokenizer.decode(kept[1])


def test_cell_type_balance_draws_rare_cell_types_more_often(trainer):
    """`cell_type_balance` swaps TRL's sampler (every cell once) for draws weighted by count ** -balance: at 1 every
    cell type is drawn about equally often; the draws are the seed's and the epoch's."""
    trainer_, _ = trainer
    assert not isinstance(trainer_._get_train_sampler(), sft.CellTypeBalancedSampler)  # 0 (the default): TRL's
    types = ["common"] * 90 + ["rare"] * 10
    draws = list(sft.CellTypeBalancedSampler(types, 1.0, seed=0))
    assert len(draws) == 100 and draws == list(sft.CellTypeBalancedSampler(types, 1.0, seed=0))
    assert 35 <= sum(types[i] == "rare" for i in draws) <= 65  # a 10% type drawn about half of the time
    assert sum(types[i] == "rare" for i in sft.CellTypeBalancedSampler(types, 0.0, seed=0)) <= 20
    trainer_.cell_type_balance = 1.0
    try:
        sampler = trainer_._get_train_sampler()
    finally:
        trainer_.cell_type_balance = 0.0
    assert isinstance(sampler, sft.CellTypeBalancedSampler) and len(list(sampler)) == len(trainer_.train_dataset)
    assert sampler.seed == trainer_.args.seed


def test_cell_type_balance_draws_with_the_data_seed(trainer):
    """--data_seed orders TRL's sampler; the balanced one drew with --seed whatever data_seed said, exit 0."""
    trainer_, _ = trainer
    saved = trainer_.cell_type_balance, trainer_.args.data_seed
    trainer_.cell_type_balance, trainer_.args.data_seed = 1.0, trainer_.args.seed + 5
    try:
        assert trainer_._get_train_sampler().seed == trainer_.args.seed + 5
    finally:
        trainer_.cell_type_balance, trainer_.args.data_seed = saved


def test_cell_type_balance_draws_each_epoch_anew_and_a_fresh_sampler_the_same():
    """A run resumed in epoch 1 builds a new sampler: it must draw epoch 1's cells, not replay epoch 0's (the
    sampler used to draw each epoch on from one generator seeded once)."""
    types = ["common"] * 90 + ["rare"] * 10
    running = sft.CellTypeBalancedSampler(types, 0.5, seed=0)
    epoch_0 = list(running)
    running.set_epoch(1)
    epoch_1 = list(running)
    resumed = sft.CellTypeBalancedSampler(types, 0.5, seed=0)
    resumed.set_epoch(1)
    assert epoch_1 != epoch_0 and list(resumed) == epoch_1


    with pytest.raises(ValueError, match="cell_type_balance must be >= 0"):
        sft.Cell2TextSFTTrainer(model=None, cell_type_balance=-1, projector_learning_rate=1e-3,
                                gene_encoder_learning_rate=1e-5)


def test_a_period_inside_the_cell_type_label_does_not_end_the_first_sentence(trainer):
    """18 CL labels hold a period ("NK1.1-positive ..."): the weight stopped at it, leaving the rest of the label at 1."""
    trainer_, _ = trainer
    tokenizer = trainer_.processing_class.tokenizer
    text = "This sample consists of a NK1.1-positive natural killer cell. Cell Ontology definition: A cell."
    targets = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    trainer_.cell_type_loss_weight = 5.0
    try:
        weights = trainer_.target_weights(targets)
    finally:
        trainer_.cell_type_loss_weight = 1.0
    heavy = tokenizer.decode(targets[0][weights[0] == 5.0])
    assert heavy == "This sample consists of a NK1.1-positive natural killer cell."


def test_the_cell_type_head_reads_the_mean_of_each_cells_own_projected_tokens():
    """The auxiliary head reads the mean of each cell's projected tokens (2 and 4 here), not their sum (the suite
    compared the head's loss only with itself)."""
    from types import SimpleNamespace

    from torch.nn import functional as F

    cell = 7
    input_ids = torch.tensor([[1, cell, cell, 2, 0], [cell, cell, cell, cell, 3]])  # 2 and 4 cell tokens
    features = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # rows 0-1: cell 0; rows 2-5: cell 1
    head = torch.nn.Linear(2, 3)
    model = SimpleNamespace(config=SimpleNamespace(cell_token_id=cell))
    trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: model), model=model,
                              cell_type_head=head)
    targets = torch.tensor([2, 0])
    loss = LabelledPositionsLossMixin.cell_type_head_loss(trainer, SimpleNamespace(cell_features=features),
                                                          input_ids, targets)
    means = torch.stack([features[:2].mean(0), features[2:].mean(0)])
    torch.testing.assert_close(loss, F.cross_entropy(head(means), targets))


def test_the_training_step_benchmark_refuses_zero_batches_before_building_the_model(tmp_path, monkeypatch, capsys):
    """benchmarks/training_step.py --batches 0 (or --rounds 0) built the demo model, then ended in a traceback
    (the median of no steps)."""
    import sys
    from tiny_parts import load_benchmark

    benchmark = load_benchmark("training_step")
    for option in ("--batches", "--rounds"):
        monkeypatch.setattr(sys, "argv", ["training_step.py", "--corpus", str(tmp_path), "--llm", str(tmp_path),
                                          option, "0"])
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main()
        assert exit_info.value.code == 2 and option in capsys.readouterr().err
