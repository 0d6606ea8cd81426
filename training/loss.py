"""The SFT loss with the LM head run only where a labelled token is predicted.

TRL's `SFTTrainer` computes the loss with a fused, chunked LM head. On devices without Triton (the CPU) that head
scores every position of the batch, recomputes the logits in the backward pass and also computes the entropy over
the whole vocabulary. For small LMs with large vocabularies the head is a large share of a step (SmolLM2-135M:
49,152 x 576, about a quarter of the multiply-adds), and most positions (system prompt, cell placeholders,
padding) carry no label. `LabelledPositionsLossMixin` asks the model for logits only at the columns where some
sequence of the batch predicts a labelled token (transformers' `logits_to_keep`, which goes through the model's
forward, so DDP/FSDP wrappers see a normal call) and computes the same token-mean cross-entropy as TRL.

`cell_type_loss_weight` (default 1: TRL's loss) weighs the tokens of each target's first sentence, up to its first
period followed by a space: "This sample consists of a {cell type}." in the description schema (a period inside a
cell-type label, as in the 18 CL labels like "NK1.1-positive ...", is followed by a character, as the schema's
parser reads it too); with `loss_on_labels_only` that sentence's only labelled tokens are the cell-type
label's, the first run of labelled tokens. Under teacher forcing almost every later token is predictable from the text
before it (the definition follows from the name, tissue and disease are nearly constant), so the few tokens that
must be read from the cell are a small share of the loss; weighting them puts the gradient where the cell matters.

`cell_type_head_loss_weight` (default 0: off) adds an auxiliary loss on the projector: a linear classifier of the
cell type on the mean of each cell's projected tokens (the soft tokens the LLM reads), cross-entropy over the
processor's known cell-type labels, weighted and added to the text loss. The head is the trainer's, trained with
the projector's learning rate, its gradients clipped with the model's as one norm (`max_grad_norm`), and not saved
with the model: it only shapes what the projector gives the LLM (each checkpoint keeps it, `CELL_TYPE_HEAD_FILE`,
so a resumed run goes on with the trained head). With `cell_type_head="label_embeddings"` the head is not learnt:
its logits are the cosine similarities (times a learnt scale) between the mean projected token and each label name's
mean input embedding in the LLM, so the projector is pushed to hand the LLM a cell that looks like its label's
words, which the LLM then only has to copy.

`cell_type_choice_loss_weight` (default 0: off) adds the loss of the choice the decoder makes: the cross-entropy of
the softmax over the known labels' cell-type sentences, each scored by its total log-likelihood after the cell's
prompt (`label_scoring.score_cell_types`, the exhaustive reference of the schema decoder). The text loss raises the
true label's likelihood; this one also lowers the other labels' for the same cell (discriminative training of the
generative choice, as a head's cross-entropy does for a head). The labels' tokens run on the training forward's own
KV cache of each prompt, as one prefix tree per cell (tree attention), so a step costs one row per cell of the
tree's tokens more (88 tokens for the demo's 10 labels).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from modeling_cell2text.label_scoring import candidate_sentence_tokens
from modeling_cell2text.schema_decoding import OptionTree
from training.collator import cell_type_label_order


def tokenizer_text(processor, token_ids: torch.Tensor) -> str:
    """The text of `token_ids` with the processor's tokenizer (for error messages)."""
    return getattr(processor, "tokenizer", processor).decode(token_ids.tolist())


class LabelEmbeddingHead(torch.nn.Module):
    """Cell-type logits: a learnt scale times the cosine similarity of a feature with each label's fixed embedding."""

    def __init__(self, label_embeddings: torch.Tensor):
        super().__init__()
        self.register_buffer("labels", F.normalize(label_embeddings.detach().float(), dim=-1))
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    @property
    def weight(self) -> torch.Tensor:  # the dtype the features are cast to
        return self.labels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features.float(), dim=-1) @ self.labels.T


# The losses implemented for one process only, and why.
ONE_PROCESS_LOSSES = {
    "cell_type_head_loss_weight": "the head is not part of the model, so DDP would not average its gradients",
    "cell_type_choice_loss_weight": "it runs the model twice a step, which DDP does not allow",
}


def check_one_process_losses(world_size: int, **weights: float) -> None:
    """Refuse a one-process loss (`ONE_PROCESS_LOSSES`) with a weight > 0 under several processes; the recipe checks
    before it prepares the encoder and loads the model, the trainer again when it builds the loss."""
    for option, weight in weights.items():
        if option in ONE_PROCESS_LOSSES and weight > 0 and world_size > 1:
            raise ValueError(f"{option} > 0 is implemented for one process only ({ONE_PROCESS_LOSSES[option]}); set "
                             "it to 0.")


# The auxiliary head's weights in a checkpoint: no part of the model, so the Trainer's checkpoint would not hold them.
CELL_TYPE_HEAD_FILE = "cell2text_cell_type_head.safetensors"


class HeadGradientsZeroed(TrainerCallback):
    """Zeroes the auxiliary head's gradients after each optimizer step, skipped or not, as the Trainer zeroes the
    model's (`model.zero_grad()`; the head is no part of the model): unzeroed they summed every step's, and where fp16's
    gradient scaler skipped a step on an overflow, the head's inf gradients stayed and every later step was skipped."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.head = head

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.head.zero_grad(set_to_none=True)


class LabelledPositionsLossMixin:
    """For `SFTTrainer` subclasses: the training loss from logits at labelled positions only.

    The loss equals TRL's (negative log-likelihood summed over labelled tokens, divided by `num_items_in_batch`
    or by the batch's labelled tokens), with each target token weighted (`target_weights`). Evaluation asks for the
    loss alone, so `eval_loss` (by which the best checkpoint is chosen) is this weighted loss too: it compares runs
    of one `cell_type_loss_weight` only. TRL's own path is kept where outputs are asked for
    (`return_outputs=True`) and for the settings this mixin does not cover (label smoothing, custom loss functions,
    DFT, MoE auxiliary losses), which training refuses beside a `cell_type_loss_weight` other than 1 or an auxiliary
    loss (TRL's loss would ignore them).
    """

    def __init__(self, *args, cell_type_loss_weight: float = 1.0, cell_type_head_loss_weight: float = 0.0,
                 cell_type_head: str = "linear", cell_type_choice_loss_weight: float = 0.0, **kwargs):
        if cell_type_head not in ("linear", "label_embeddings"):
            raise ValueError(f"cell_type_head must be 'linear' or 'label_embeddings', got {cell_type_head!r}.")
        self.cell_type_head_kind = cell_type_head
        if cell_type_loss_weight <= 0:
            raise ValueError(f"cell_type_loss_weight must be > 0, got {cell_type_loss_weight}.")
        if cell_type_head_loss_weight < 0:
            raise ValueError(f"cell_type_head_loss_weight must be >= 0, got {cell_type_head_loss_weight}.")
        if cell_type_choice_loss_weight < 0:
            raise ValueError(f"cell_type_choice_loss_weight must be >= 0, got {cell_type_choice_loss_weight}.")
        self.cell_type_loss_weight = float(cell_type_loss_weight)
        self.cell_type_head_loss_weight = float(cell_type_head_loss_weight)
        self.cell_type_choice_loss_weight = float(cell_type_choice_loss_weight)
        self.cell_type_head = None
        self._choice_tree = None
        super().__init__(*args, **kwargs)
        if self.cell_type_head_loss_weight > 0:
            self.cell_type_head = self._new_cell_type_head()
            self.add_callback(HeadGradientsZeroed(self.cell_type_head))
        if self.cell_type_choice_loss_weight > 0:
            self._choice_tree = self._cell_type_choice_tree()
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        # decoded, so that byte-level ("Ġ") and SentencePiece ("▁") spaces read alike
        texts = dict(zip(range(len(tokenizer)), tokenizer.batch_decode([[i] for i in range(len(tokenizer))])))
        self._period_token_ids = torch.tensor(sorted(i for i, text in texts.items() if "." in text))
        # a period ends the sentence where a space follows it (in the token or the next one): "NK1.1-positive ..."
        # holds one that does not
        self._ending_period_ids = torch.tensor(sorted(i for i, text in texts.items()
                                                      if re.search(r"\.\s", text)) or [-1])
        raw = tokenizer.convert_ids_to_tokens(list(texts))  # SentencePiece decodes a lone "▁Cell" without its space
        # special tokens count as space-led: the end of turn after a description's last period ends its sentence
        special = set(tokenizer.all_special_ids) | {i for i, added in tokenizer.added_tokens_decoder.items()
                                                    if added.special}
        space_led = ("Ġ", "▁", "Ċ", "ĉ")
        self._space_led_ids = torch.tensor(sorted(i for (i, text), token in zip(texts.items(), raw)
                                                  if text[:1].isspace() or (token or "")[:1] in space_led
                                                  or i in special)
                                           or [-1])
        self._token_accuracy: dict[str, list[float]] = {"train": [], "eval": []}

    def target_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """Per-target-token loss weights: `cell_type_loss_weight` on each row's first sentence, then 1.

        `targets` are the labels of consecutive positions. The first sentence ends at the row's first labelled period
        followed by a space (in its token or the next, or by a special token such as the end of turn, the row's end
        or an unlabelled position) or at its first unlabelled position after a labelled one, whichever comes first
        (a description of one sentence weighs its end of turn 1): with `loss_on_labels_only`
        the period is unlabelled, and the first run of labelled tokens is the cell-type label."""
        labelled = targets != -100
        if self.cell_type_loss_weight == 1.0:
            return labelled.float()
        ending = torch.isin(targets, self._ending_period_ids.to(targets.device))
        space_next = torch.zeros_like(labelled)
        space_next[:, :-1] = torch.isin(targets[:, 1:], self._space_led_ids.to(targets.device)) | ~labelled[:, 1:]
        space_next[:, -1] = True
        is_period = torch.isin(targets, self._period_token_ids.to(targets.device)) & labelled & (ending | space_next)
        after_period = is_period.cumsum(dim=1) - is_period.long() > 0
        after_gap = ((labelled.cumsum(dim=1) > 0) & ~labelled).cumsum(dim=1) > 0
        in_first_sentence = labelled & ~after_period & ~after_gap
        return labelled.float() + in_first_sentence.float() * (self.cell_type_loss_weight - 1.0)

    def _single_process_cell_type_labels(self, option: str) -> list[str]:
        """The processor's cell-type labels in `cell_type_index` order, for a loss `option` that needs at least two of
        them and one process."""
        check_one_process_losses(self.args.world_size, **{option: 1.0})
        labels = cell_type_label_order(self.processing_class) if hasattr(self.processing_class,
                                                                          "ontology_term_ids") else []
        if len(labels) < 2:
            raise ValueError(f"{option} > 0 needs a processor that knows at least two cell-type labels "
                             "(processor.ontology_term_ids['cell_type']); set it to 0.")
        return labels

    def _new_cell_type_head(self) -> torch.nn.Module:
        """The auxiliary head: text width -> the processor's cell-type labels (the collator's `cell_type_index`)."""
        labels = self._single_process_cell_type_labels("cell_type_head_loss_weight")
        model = self.accelerator.unwrap_model(self.model)
        device = next(model.parameters()).device
        if self.cell_type_head_kind == "linear":
            return torch.nn.Linear(model.config.text_config.hidden_size, len(labels)).to(device)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        embeddings = model.get_input_embeddings()
        with torch.no_grad():  # each label as it is written in its sentence: " B cell"
            rows = [embeddings(torch.tensor(tokenizer(" " + label, add_special_tokens=False)["input_ids"],
                                            device=device)).mean(dim=0) for label in labels]
        return LabelEmbeddingHead(torch.stack(rows)).to(device)

    def _cell_type_choice_tree(self) -> dict:
        """The known labels' sentences (in `cell_type_label_order`, the classes of `cell_type_index`): the tokens they
        share, a prefix tree over each label's own tokens, and the tree node where each label ends."""
        if self.args.activation_checkpointing:
            raise ValueError("cell_type_choice_loss_weight > 0 reads the training forward's KV cache, which activation "
                             "checkpointing turns off; set activation_checkpointing=False or the weight to 0.")
        labels = self._single_process_cell_type_labels("cell_type_choice_loss_weight")
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        shared, own = candidate_sentence_tokens(tokenizer, labels)
        tree = OptionTree(own)
        ends = [0] * len(own)
        for node, options in enumerate(tree.ends):
            for option in options:
                ends[option] = node
        return {"shared": torch.tensor(shared, dtype=torch.long), "tree": tree, "ends": torch.tensor(ends)}

    def cell_type_choice_log_likelihoods(self, model, outputs, inputs: dict, columns: torch.Tensor) -> torch.Tensor:
        """(rows, known labels): each label's cell-type sentence log-likelihood after each row's prompt, as
        `score_cell_types` scores it, with gradients. Each label's first own token is scored by the training forward's
        logits (`outputs`, kept at `columns`); the labels' other tokens run once per row on that forward's KV cache,
        cut just before the row's label (rows are right-padded), as a prefix tree in which each token sees its
        ancestors (tree attention, as the schema decoder scores a small choice), so labels sharing a prefix share
        its tokens. The cache is cut in place."""
        device = inputs["input_ids"].device
        shared = self._choice_tree["shared"].to(device)
        tree: OptionTree = self._choice_tree["tree"]
        labels = inputs["labels"]
        n_rows = labels.shape[0]
        if not (labels != -100).any(dim=1).all():
            raise ValueError("cell_type_choice_loss_weight > 0 needs a target description in every row of the batch; "
                             "a row has none.")
        starts = (labels != -100).int().argmax(dim=1)  # each row's first target token: the description's first
        spans = starts[:, None] + torch.arange(len(shared), device=device)
        if len(shared) and (spans.max() >= labels.shape[1]
                            or not (labels.gather(1, spans.clamp(max=labels.shape[1] - 1)) == shared).all()):
            raise ValueError("cell_type_choice_loss_weight > 0 needs targets that open with the cell-type sentence's "
                             f"shared tokens {tokenizer_text(self.processing_class, shared)!r} as the tokenizer writes "
                             "the sentence alone; these targets do not (loss_on_labels_only drops them; a tokenizer "
                             "may also merge them with the text around): set one of them off.")
        label_starts = starts + len(shared)  # the position of each row's first label token
        at = torch.searchsorted(columns, label_starts - 1)  # the forward's logits column that predicts it
        if not (at < len(columns)).all() or not (columns[at.clamp(max=len(columns) - 1)] == label_starts - 1).all():
            raise ValueError("cell_type_choice_loss_weight > 0 needs the logits that predict each row's label, which "
                             "this batch's targets do not ask for; set it to 0.")
        logits = outputs.logits[torch.arange(n_rows, device=device), at][:, None]  # (rows, 1, vocabulary)
        tokens, depths, _, parent_row, node_token, _ = tree.whole_tree_layout(device)
        count = len(tree.internal)
        if count:
            cache = outputs.cache
            if cache is None:
                raise ValueError("cell_type_choice_loss_weight > 0 needs the model's KV cache from the training "
                                 "forward (use_cache); this model returned none.")
            kept = int(label_starts.max())
            if cache.get_seq_length() > kept:
                cache.crop(kept - cache.get_seq_length())  # negative: the tokens to remove
            visible = (torch.arange(kept, device=device)[None, :] < label_starts[:, None]) & \
                inputs["attention_mask"][:, :kept].bool()
            allowed = tree.tree_attention(visible)
            mask = torch.zeros(allowed.shape, dtype=model.dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(model.dtype).min)
            tree_logits = model(input_ids=tokens[None].expand(n_rows, -1), attention_mask=mask[:, None],
                                position_ids=label_starts[:, None] + depths[None] - 1, cache=cache,
                                use_cache=True).logits
            logits = torch.cat([logits, tree_logits.to(logits.dtype)], dim=1)
        # each node's token log-probability after its parent (only those tokens: no log-softmax over the vocabulary
        # is kept), summed along each label's path
        logits = logits.float()
        steps = logits[:, parent_row, node_token] - logits.logsumexp(dim=-1)[:, parent_row]
        return tree.path_log_likelihoods(steps).float()[:, self._choice_tree["ends"].to(device)]

    def cell_type_choice_loss(self, log_likelihoods: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the softmax over the known labels' sentence log-likelihoods (`targets`: each row's
        `cell_type_index`, -100 for a label the processor does not know)."""
        targets = targets.to(log_likelihoods.device)
        if not (targets != -100).any():  # no cell of the batch has a known label: no loss (not NaN)
            return log_likelihoods.sum() * 0.0
        return F.cross_entropy(log_likelihoods, targets, ignore_index=-100)

    def cell_type_head_loss(self, outputs, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the head on each cell's mean projected token (cells are in the batch's row order)."""
        model = self.accelerator.unwrap_model(self.model)
        counts = (input_ids == model.config.cell_token_id).sum(dim=1)
        features = outputs.cell_features.float()
        owner = torch.repeat_interleave(torch.arange(len(counts), device=features.device), counts.to(features.device))
        sums = torch.zeros((len(counts), features.shape[-1]), device=features.device).index_add_(0, owner, features)
        means = sums / counts.clamp(min=1).to(features.device, features.dtype)[:, None]
        logits = self.cell_type_head(means.to(self.cell_type_head.weight.dtype)).float()
        targets = targets.to(logits.device)
        if not (targets != -100).any():  # no cell of the batch has a known label: no loss (not NaN)
            return logits.sum() * 0.0
        return F.cross_entropy(logits, targets, ignore_index=-100)

    def per_micro_batch(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """An auxiliary loss (a mean over one micro-batch) scaled as the trainer scales the text loss: where the text
        loss is divided by `num_items_in_batch` (the accumulated tokens), the trainer does not divide the sum over the
        accumulated micro-batches by their number, so the auxiliary loss is divided here (else a weight would act
        as weight x gradient_accumulation_steps)."""
        scaled_for_accumulation = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_accumulation is None:
            scaled_for_accumulation = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        return loss / getattr(self, "current_gradient_accumulation_steps", 1) if scaled_for_accumulation else loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cell_type_index = inputs.pop("cell_type_index", None)  # the collator's, for the auxiliary head only
        if (
            return_outputs
            or "labels" not in inputs
            or self.compute_loss_func is not None
            or self.label_smoother is not None
            or self.args.loss_type != "nll"
            or getattr(self, "aux_loss_enabled", False)
        ):
            # TRL's loss knows none of these settings: they were silently ignored (cell_type_loss_weight 4 with
            # label smoothing or loss_type dft gave the unweighted loss)
            if (self.cell_type_head is not None or self._choice_tree is not None or self.cell_type_loss_weight != 1.0) \
                    and model.training and not return_outputs:
                raise ValueError("cell_type_loss_weight other than 1, cell_type_head_loss_weight or "
                                 "cell_type_choice_loss_weight > 0 needs this loss (no label smoothing, custom loss "
                                 "function or other loss_type); set it to 1 (0 for the other two) or drop those "
                                 "settings.")
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        next_labels = inputs["labels"][:, 1:]
        labelled = next_labels != -100
        columns = labelled.any(dim=0).nonzero().squeeze(-1)  # positions whose next token is scored in some row
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        choice_loss = self._choice_tree is not None and model.training
        outputs = model(**model_inputs, use_cache=choice_loss, logits_to_keep=columns)
        targets = next_labels[:, columns]
        logits = outputs.logits.float()
        token_losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        weights = self.target_weights(next_labels)[:, columns]  # of all positions: `columns` may skip a gap
        loss_sum = (token_losses * weights.flatten()).sum()
        num_tokens = labelled.sum() if num_items_in_batch is None else num_items_in_batch
        loss = loss_sum / torch.as_tensor(num_tokens, device=loss_sum.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks; the count spans them
        if (self.cell_type_head is not None or choice_loss) and model.training and cell_type_index is None:
            raise ValueError("cell_type_head_loss_weight or cell_type_choice_loss_weight > 0 but the batch has no "
                             "cell_type_index: build the collator with Cell2TextDataCollator(processor, "
                             "cell_type_index=True).")
        if choice_loss:
            log_likelihoods = self.cell_type_choice_log_likelihoods(model, outputs, inputs, columns)
            loss = loss + self.per_micro_batch(self.cell_type_choice_loss_weight * self.cell_type_choice_loss(
                log_likelihoods, cell_type_index), num_items_in_batch)
        if self.cell_type_head is not None and cell_type_index is not None and model.training:
            loss = loss + self.per_micro_batch(self.cell_type_head_loss_weight * self.cell_type_head_loss(
                outputs, model_inputs["input_ids"], cell_type_index), num_items_in_batch)

        with torch.no_grad():  # the token accuracy TRL logs (its entropy metric is left out: it costs a vocab pass)
            mask = targets != -100
            correct = ((logits.argmax(dim=-1) == targets) & mask).sum()
            # `gather`, not `gather_for_metrics`: these are counts, not one row per cell, and the latter cuts the
            # last batch of an epoch to the cells left over (a 2-vector cut to 1: a crash when 4 did not divide 490).
            counts = self.accelerator.gather(torch.stack([correct, mask.sum()])).view(-1, 2).sum(0)
        self._token_accuracy["train" if model.training else "eval"].append((counts[0] / counts[1].clamp(min=1)).item())
        return loss

    def _trained_parameters(self, model) -> list:
        """The parameters the optimizer trains: the model's and the auxiliary head's (no part of the model)."""
        return [*model.parameters(), *(self.cell_type_head.parameters() if self.cell_type_head is not None else ())]

    def _clip_grad_norm(self, model):
        """Clip the gradients of the model and the auxiliary head as one vector to `max_grad_norm`, as if the head
        were part of the model (the Trainer clipped the model's alone: the head's gradients went unclipped, larger
        than the limit); the norm before clipping, of both."""
        if self.cell_type_head is None:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self._trained_parameters(model), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        """The logged gradient norm, the head's gradients included (see `_clip_grad_norm`)."""
        if grad_norm is None and self.cell_type_head is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self._trained_parameters(model), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, and the auxiliary head's weights beside it (a resume went on from a new head, so
        the projector ended other than the uninterrupted run's, exit 0)."""
        super()._save_checkpoint(model, trial)
        if self.cell_type_head is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_file({name: tensor.detach().contiguous() for name, tensor in self.cell_type_head.state_dict().items()},
                      folder / CELL_TYPE_HEAD_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The checkpoint's model weights, and its auxiliary head's (see `_save_checkpoint`)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.cell_type_head is None:
            return
        path = Path(resume_from_checkpoint) / CELL_TYPE_HEAD_FILE
        if not path.is_file():
            raise ValueError(f"{resume_from_checkpoint} holds no auxiliary cell-type head ({CELL_TYPE_HEAD_FILE}: "
                             "saved before checkpoints kept it, or trained without it), so the resumed run would go "
                             "on from a new head, not the one trained: train anew in a new --output_dir.")
        self.cell_type_head.load_state_dict(load_file(path, device=str(self.cell_type_head.weight.device)))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean token accuracy since the last log (as TRL names it) to the logged values."""
        mode = "train" if self.model.training else "eval"
        values = self._token_accuracy[mode]
        if values:
            logs[("eval_" if mode == "eval" else "") + "mean_token_accuracy"] = sum(values) / len(values)
            values.clear()
        super().log(logs, start_time)
