"""Fine-tune Cell2Text with TRL's SFTTrainer: LoRA on the language model, the projector trained fully.

Run from a checkout (one process, or several with accelerate):

```bash
python -m training.sft --config training/configs/demo.yaml
accelerate launch --config_file training/configs/accelerate/ddp.yaml -m training.sft --config training/configs/paper.yaml
```

Every field of `Cell2TextArguments` and of TRL's `SFTConfig` can be set in the YAML file or on the command line,
except the settings of TRL's data path that the recipe's own collator replaces (`packing`, `max_length`,
`completion_only_loss`, `dataset_text_field`...: `UNUSED_SFT_SETTINGS`), which are refused.
The recipe, top to bottom:

1. Load the corpus (`python -m processing.build_corpus`) and the feature extractor it was built with.
2. Build the processor from the language model's tokenizer (adds `<cell>`).
3. Get a gene encoder: a pretrained Geneformer folder or Hub id (`gene_encoder_name_or_path`, the paper's
   choice), or, where none exists, one prepared on the corpus (`training/gene_encoder.py`: SVD-initialised gene
   embeddings; depth and input, rank-value or value-aware tokens, picked on the validation split).
4. Compose the model from the pretrained parts (or start from a trained Cell2Text with `init_from`).
5. Train with `SFTTrainer`: LoRA on the language model's linear layers, the projector (and an unfrozen encoder)
   trained fully through `modules_to_save` (in float32, also with a bf16 LLM), separate learning rates; the best
   checkpoint by validation loss.
   Optionally first a LLaVA-style stage on the cell-type sentence alone (`cell_type_stage_steps`).
6. Merge LoRA into the language model (weights sharded by FSDP or ZeRO-3 gathered onto the main process first),
   fit the fields' temperatures on validation cells and save a Hub-ready folder (weights, processor, remote code).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, enable_full_determinism
from trl import SFTConfig, SFTTrainer, TrlParser

from modeling_cell2text import Cell2TextForConditionalGeneration, Cell2TextProcessor, save_model_folder
from processing.corpus import (check_corpus_tokenized_as, corpus_feature_extractor, corpus_summary,
                               description_vocabulary, open_corpus)
from modeling_cell2text.argument_types import is_integer_at_least, refused_input_as_one_line
from modeling_cell2text.output_files import check_new_output
from training.adapters import (
    FINAL_DIR,
    OVERWRITE_FINAL_FIX,
    OVERWRITE_OUTPUT_DIR_HELP,
    LoraArguments,
    MultiProcessTrainingMixin,
    NoStepPastMaxStepsMixin,
    RecordTrainedWith,
    best_checkpoint_choice,
    check_output_dir,
    check_resume,
    corpus_fingerprints,
    data_order,
    leave_process_group,
    lora_record,
    loss_settings,
    merge_adapters,
    optimizer_settings,
    parse_training_arguments,
    resumed_checkpoint,
    save_merged,
    state_dict_sha256,
    stopped_cleanly,
    without_zero3_init,
)
from training.collator import Cell2TextDataCollator
from training.evaluation.evaluate import fit_cell_type_temperature, fit_field_temperatures
from modeling_cell2text.description_schema import AGE_GROUPS
from modeling_cell2text.compatibility import fit_tokens_to_encoder, processor_sha256
from modeling_cell2text.modeling_cell2text import PREPARED_ENCODER_KEY, stop_at_end_of_text
from modeling_cell2text.processing_cell2text import check_label_tables, prompt_date
from training.gene_encoder import (
    FEATURE_LAYER,
    PREPARED_ENCODER_DIR,
    EncoderCandidate,
    SELECTION_RULE,
    EncoderSelection,
    prepare_gene_encoder,
)
from training.loss import LabelledPositionsLossMixin, check_one_process_losses

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Cell2TextArguments(LoraArguments):
    """What to train: corpus, parts, model shape, LoRA and the Cell2Text-specific optimisation settings."""

    corpus_dir: str = field(metadata={"help": "Corpus folder written by `python -m processing.build_corpus`, or the "
                                      "Hub dataset id it was published to (python -m hub_cards.publish)."})
    text_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Instruction-tuned causal LM (folder or Hub id). Not needed with init_from."}
    )
    gene_encoder_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained Geneformer (folder or Hub id). Unset: prepare an encoder on the corpus."},
    )
    init_from: str | None = field(
        default=None, metadata={"help": "A trained Cell2Text (a saved model folder such as <output_dir>/final, or a "
                                 "Hub id) to fine-tune further instead of composing parts. A checkpoint-N folder is "
                                 "no model: resume its run with resume_from_checkpoint."}
    )
    encoder_candidate_layers: list[int] = field(
        default_factory=lambda: [1, 2], metadata={"help": "Layer counts of the corpus-prepared encoders to try."}
    )
    encoder_candidate_inputs: list[str] = field(
        default_factory=lambda: ["rank"],
        metadata={"help": "Inputs of the corpus-prepared encoders to try: 'rank' (Geneformer's rank-value tokens) "
                  "and/or 'value_aware' (plus each gene's expression bin; needs a corpus built with --expression-bins)."},
    )
    encoder_hidden_size: int = 128
    encoder_epochs: int = 30
    num_cell_tokens: int = 256
    gene_encoder_layer: int | None = field(
        default=None,
        metadata={"help": "Encoder hidden state that feeds the projector. Unset: the layer a corpus-prepared encoder "
                  "was trained at (its last), or -2 (second-to-last) for a pretrained Geneformer."},
    )
    projector_hidden_size: int = 2048
    projector_dropout: float = 0.1
    freeze_gene_encoder: bool = True
    projector_learning_rate: float = 1e-3
    gene_encoder_learning_rate: float = 1e-5
    cell_type_stage_steps: int = field(
        default=0,
        metadata={"help": "LLaVA-style first stage: this many optimizer steps on the cell-type sentence alone (the "
                  "description's first sentence), training the projector and LoRA, before the full descriptions. "
                  "Its targets are a few tokens, so many more steps fit in the same minutes. 0: off."},
    )
    cell_type_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Loss weight of the description's first sentence, which names the cell type (1: TRL's "
                  "loss). See training/loss.py."},
    )
    cell_type_balance: float = field(
        default=0.0,
        metadata={"help": "Draw training cells with probability proportional to their cell type's count to the power "
                  "-cell_type_balance (with replacement, as many draws as cells): 0 draws every cell once (TRL's "
                  "sampler), 0.5 gives a type 4x rarer twice the draws per cell, 1 draws every type equally often; "
                  "the draws follow --data_seed, else --seed."},
    )
    cell_type_head_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of an auxiliary loss on the projector: a linear cell-type classifier on the mean "
                  "projected cell token, trained with it and not saved (training/loss.py). 0: off."},
    )
    cell_type_head: str = field(
        default="linear",
        metadata={"help": "The auxiliary head: 'linear' (learnt) or 'label_embeddings' (cosine similarity with each "
                  "label name's embedding in the LLM: training/loss.py)."},
    )
    cell_type_choice_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the loss of the decoder's choice: cross-entropy of the softmax over the known "
                  "labels' cell-type sentences scored by the model (training/loss.py). 0: off."},
    )
    loss_on_labels_only: bool = field(
        default=False,
        metadata={"help": "Put the loss on the tokens of the labels a description states only (what the "
                  "schema-constrained decoder chooses), not on the template words and definition it writes itself."},
    )
    definitions_in_model_text: bool | None = field(
        default=None,
        metadata={"help": "Train the LLM on the descriptions with the cell type's Cell Ontology definition (True), or "
                  "without it (False: the processor writes the definition into every description, and the decoder "
                  "does not feed it to the model: fewer tokens to train on and to read). Unset: True, or "
                  "init_from's setting."},
    )
    temperature_fit_cells: int = field(
        default=1000,
        metadata={"help": "Fit the model's cell_type_temperature (the calibration of cell_type_score) on up to this "
                  "many validation cells after training (a seeded sample), and the fields' temperatures; 0: 1.0 and "
                  "none per field (also with init_from, whose temperatures fit its model before this training)."},
    )
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    final_model_dir: str | None = field(
        default=None, metadata={"help": "Where to save the merged, Hub-ready model. Default: <output_dir>/final."}
    )
    overwrite_final_model_dir: bool = field(
        default=False, metadata={"help": "Replace a model already in final_model_dir (else the run stops before "
                                 "training)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": OVERWRITE_OUTPUT_DIR_HELP}
    )

    def __post_init__(self) -> None:
        """Refuse counts out of range when the arguments are made: a negative cell_type_stage_steps or
        temperature_fit_cells meant "off" without a word, and the sizes failed minutes later, inside torch."""
        super().__post_init__()
        for name, minimum in (("encoder_hidden_size", 1), ("encoder_epochs", 1), ("num_cell_tokens", 1),
                              ("projector_hidden_size", 1), ("cell_type_stage_steps", 0), ("temperature_fit_cells", 0)):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be >= {minimum}{' (0: off)' if minimum == 0 else ''}, got "
                                 f"{getattr(self, name)!r}")
        if not 0 <= self.projector_dropout < 1:
            raise ValueError(f"projector_dropout must be in [0, 1), got {self.projector_dropout!r}")


class CellTypeBalancedSampler(torch.utils.data.Sampler):
    """Draws as many cells as there are, with replacement, each with probability proportional to its cell type's
    count to the power -`balance`. Epoch e draws with seed + e (the Trainer calls `set_epoch`), so every process,
    and a run resumed in any epoch, draws the uninterrupted run's cells."""

    def __init__(self, cell_types: Sequence[str], balance: float, seed: int) -> None:
        counts = Counter(cell_types)
        self.weights = torch.tensor([counts[cell_type] ** -balance for cell_type in cell_types], dtype=torch.float64)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()


class Cell2TextSFTTrainer(NoStepPastMaxStepsMixin, MultiProcessTrainingMixin, LabelledPositionsLossMixin,
                          SFTTrainer):
    """`SFTTrainer` with one learning rate per part (projector, gene encoder, LoRA adapters) and the LM head run
    at labelled positions only (`training/loss.py`)."""

    def __init__(self, *args, projector_learning_rate: float, gene_encoder_learning_rate: float,
                 cell_type_balance: float = 0.0, **kwargs):
        self.part_learning_rates = {"projector": projector_learning_rate, "gene_encoder": gene_encoder_learning_rate}
        if cell_type_balance < 0:
            raise ValueError(f"cell_type_balance must be >= 0 (0: every cell once), got {cell_type_balance}")
        self.cell_type_balance = cell_type_balance
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler | None:
        if not self.cell_type_balance:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed  # as TRL's sampler takes it
        return CellTypeBalancedSampler(dataset["cell_type"], self.cell_type_balance, seed)

    @staticmethod
    def part_of(parameter_name: str) -> str:
        if "multi_modal_projector" in parameter_name:
            return "projector"
        if "gene_encoder" in parameter_name:
            return "gene_encoder"
        return "language_model"

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[str, bool], list] = {}
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault((self.part_of(name), name in decay), []).append(parameter)
        if self.cell_type_head is not None:  # the auxiliary head trains with the projector (training/loss.py)
            groups.setdefault(("projector", False), []).extend(self.cell_type_head.parameters())
        param_groups = [
            {
                "params": params,
                "lr": self.part_learning_rates.get(part, self.args.learning_rate),
                "weight_decay": self.args.weight_decay if decays else 0.0,
            }
            for (part, decays), params in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)  # the head's gradients: HeadGradientsZeroed
        return self.optimizer


# SFTConfig's settings of TRL's own data path, which the recipe replaces: its collator builds, pads and masks the
# soft-token prompts of the corpus's tokenized cells (the processor), and TRL prepares no dataset. A value other than
# TRL's default or one that says what the recipe does anyway was silently ignored. Also the Trainer's push_to_hub,
# which pushed each checkpoint's LoRA adapters (not the merged, Hub-ready folder) as if they were the model.
# Name -> (those values, why).
_PACKING = ("the recipe pads soft-token prompts itself, in Cell2TextDataCollator, and cannot pack or train "
            "padding-free")
_TRUNCATION = ("nothing is truncated: the prompt is num_cell_tokens soft tokens and each description is trained "
               "whole; a cell's genes are capped when the corpus is built, by --model-input-size")
_LOSS_MASK = "the loss is on the description, the completion, only; --loss_on_labels_only narrows it to the labels"
UNUSED_SFT_SETTINGS: dict[str, tuple[tuple, str]] = {
    "dataset_text_field": ((), "the collator reads the corpus's gene_input_ids and description columns"),
    "dataset_num_proc": ((), "the corpus is tokenized when it is built, by python -m processing.build_corpus"),
    "dataset_kwargs": (({}, {"skip_prepare_dataset": True}),
                       "the recipe skips TRL's dataset preparation, skip_prepare_dataset, and reads no other key"),
    "max_length": ((None,), _TRUNCATION),
    "truncation_mode": ((), _TRUNCATION),
    "shuffle_dataset": ((), "the trainer's sampler shuffles the training cells every epoch; --cell_type_balance "
                            "reweights them"),
    "packing": ((), _PACKING),
    "packing_strategy": ((), _PACKING),
    "eval_packing": ((False,), _PACKING),
    "padding_free": ((), _PACKING),
    "pad_to_multiple_of": ((None,), "the collator pads each batch to its longest sequence"),  # "auto": None
    "pad_token": ((), "the processor pads with the pad token of its tokenizer, text_model_name_or_path's or "
                      "init_from's"),
    "completion_only_loss": ((True,), _LOSS_MASK),
    "assistant_only_loss": ((), _LOSS_MASK),
    "model_init_kwargs": ((), "the recipe loads the model itself, from its parts or from init_from"),
    "push_to_hub": ((), "the Trainer would push each checkpoint's LoRA adapters, not the model; publish the merged "
                        "model folder the run saves (--final_model_dir, default <output_dir>/final) with "
                        "python -m hub_cards.publish --model FOLDER --repo ID"),
}


def check_sft_settings(training_args: SFTConfig) -> None:
    """Refuse SFTConfig settings of TRL's data path that the recipe does not use (`UNUSED_SFT_SETTINGS`): given on
    the command line or in YAML, they were accepted and silently ignored."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(SFTConfig) if f.name in UNUSED_SFT_SETTINGS}
    unused = [f"{name}={getattr(training_args, name)!r} does not apply to this recipe: {why}; leave it unset."
              for name, (also_fine, why) in UNUSED_SFT_SETTINGS.items()
              if name in defaults and getattr(training_args, name) not in (defaults[name], *also_fine)]
    if unused:
        raise ValueError(" ".join(unused))


def set_training_seed(training_args: SFTConfig) -> None:
    """Seed Python, NumPy and torch; with `full_determinism`, also make torch use deterministic algorithms only.

    Called before the recipe draws new weights (the projector, composed before the trainer exists; TRL seeds again
    before it draws the LoRA adapters).
    """
    if training_args.full_determinism:
        enable_full_determinism(training_args.seed)
    else:
        set_seed(training_args.seed)


def language_model_lora_targets(model: Cell2TextForConditionalGeneration) -> str:
    """A PEFT regex matching every linear layer of the language model, and nothing in the encoder or projector."""
    leaf_names = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.model.language_model.named_modules()
         if isinstance(module, torch.nn.Linear)}
    )
    if not leaf_names:
        raise ValueError("The language model has no nn.Linear layers for LoRA.")
    return r"model\.language_model\..*\.(" + "|".join(map(re.escape, leaf_names)) + r")"


def load_corpus(corpus_dir: str | Path, args: Cell2TextArguments) -> tuple[DatasetDict, dict]:
    """The corpus splits (capped by max_train_samples / max_eval_samples) and the build's summary.

    A cap below 1 is refused (0 failed inside scipy, or as a corpus without validation cells), as is a corpus
    whose summary gives no label tables (none, or joined shards without one): the model learnt no labels to choose
    among and was saved unable to describe constrained, without a word."""
    for name, limit in (("max_train_samples", args.max_train_samples), ("max_eval_samples", args.max_eval_samples)):
        if limit is not None and limit < 1:
            raise ValueError(f"--{name} {limit}: a split capped below 1 cell is empty; leave --{name} out to use "
                             "every cell, or give a positive number")
    corpus = open_corpus(corpus_dir)
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None and split in corpus and len(corpus[split]) > limit:
            corpus[split] = corpus[split].select(range(limit))
    summary = corpus_summary(corpus_dir)
    if not (summary.get("ontology_term_ids") or {}).get("cell_type"):
        raise ValueError(
            f"The corpus {corpus_dir} has no summary.json with label tables (its ontology_term_ids), so the model "
            "would learn no labels to choose among (tl.describe's constrained decoding needs them). Build the corpus "
            "with python -m processing.build_corpus, and join shards with python -m processing.join_corpus.")
    return corpus, summary


def check_validation_split(corpus: DatasetDict, args: Cell2TextArguments, training_args: SFTConfig) -> None:
    """Refuse a corpus without validation cells where the run needs them, before anything trains: evaluation was a
    bare KeyError after the cell-type stage, and preparing an encoder on the corpus chooses it on them."""
    if len(corpus.get("validation") or []):
        return
    needs, fixes = [], []
    if training_args.eval_strategy != "no":
        needs.append(f"evaluation (eval_strategy {IntervalStrategy(training_args.eval_strategy).value})")
        fixes.append("pass --eval_strategy no --load_best_model_at_end false")
    if args.init_from is None and args.gene_encoder_name_or_path is None:
        needs.append("choosing the gene encoder prepared on the corpus")
        fixes.append("pass --gene_encoder_name_or_path (a pretrained Geneformer)")
    if needs:
        raise ValueError(
            f"The corpus {args.corpus_dir} has no validation cells, needed for {' and for '.join(needs)}: "
            f"{'; '.join(fixes)}; or build the corpus with a validation split (python -m processing.build_corpus "
            "leaves it empty where too few donors fill three donor-disjoint splits: --fold I/K).")


ENCODER_INPUTS = ("rank", "value_aware")


def build_processor(
    args: Cell2TextArguments, corpus_dir: str | Path, summary: dict, trust_remote_code: bool = False,
    train_split=None,
) -> Cell2TextProcessor:
    """The processor of `init_from`, or one built from the corpus's feature extractor and the LLM's tokenizer.

    With `train_split`, a new processor learns the labels the schema-constrained decoder chooses among from it (the
    training cells' labels, definitions, pathway names and age groups: `processing.corpus.description_vocabulary`),
    and `init_from`'s processor adds the ones new to it (`learn_new_labels`). Loads with this package's
    classes; `trust_remote_code` (SFTConfig's `--trust_remote_code`) lets the Auto classes run code shipped in the
    folders instead.
    """
    if args.init_from is not None:
        if trust_remote_code:
            processor = AutoProcessor.from_pretrained(args.init_from, trust_remote_code=True)
        else:
            processor = Cell2TextProcessor.from_pretrained(args.init_from)
        check_corpus_tokenized_as(corpus_dir, processor.feature_extractor, args.init_from)
        if args.definitions_in_model_text not in (None, processor.definitions_in_model_text):
            raise ValueError(
                f"definitions_in_model_text={args.definitions_in_model_text}, but the model {args.init_from} was "
                f"trained with definitions_in_model_text={processor.definitions_in_model_text}: leave it unset to "
                "fine-tune it as it was trained, or start from the parts (text_model_name_or_path) to change it."
            )
        if train_split is not None:
            learn_new_labels(processor, description_vocabulary(train_split, summary.get("ontology_term_ids", {})))
        return processor
    if args.text_model_name_or_path is None:
        raise ValueError("Set text_model_name_or_path (an instruct LLM), or init_from (a trained Cell2Text).")
    feature_extractor = corpus_feature_extractor(corpus_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.text_model_name_or_path, trust_remote_code=trust_remote_code)
    return Cell2TextProcessor(
        feature_extractor,
        tokenizer,
        num_cell_tokens=args.num_cell_tokens,
        definitions_in_model_text=args.definitions_in_model_text is not False,
        **(description_vocabulary(train_split, summary.get("ontology_term_ids", {})) if train_split is not None
           else {"ontology_term_ids": summary.get("ontology_term_ids", {})}),
    )


def record_training_corpus(config, fingerprints: dict | None, suspension_types: dict | None = None) -> None:
    """Record the corpus the model trains on; a model fine-tuned from another (`init_from`) keeps the corpora it was
    trained on before in `earlier_training_corpus_fingerprints` (they were overwritten, so the record named only the
    last corpus, and evaluation's leak check passed on a rebuild of the first one's cells). `suspension_types` (the
    corpus summary's kept cells per obs suspension_type) go to `training_suspension_types`, added to a parent's
    trained on another corpus; unknown (None) where either is (a parent recorded none: it may have seen nuclei)."""
    earlier = list(getattr(config, "earlier_training_corpus_fingerprints", None) or [])
    parent = getattr(config, "training_corpus_fingerprints", None)
    seen = dict(suspension_types or {}) or None
    if parent and parent != fingerprints:
        parents = getattr(config, "training_suspension_types", None)
        seen = dict(Counter(parents) + Counter(seen)) if parents and seen else None
    config.training_suspension_types = seen
    if parent and parent != fingerprints and parent not in earlier:
        earlier.append(parent)
    config.earlier_training_corpus_fingerprints = [f for f in earlier if f != fingerprints] or None
    config.training_corpus_fingerprints = fingerprints


def learn_new_labels(processor: Cell2TextProcessor, vocabulary: dict) -> None:
    """Add to a trained model's processor the labels of the corpus it is fine-tuned on (`init_from`): it kept only
    its first corpus's, so a new cell type was never a candidate (every cell described as an old type, accuracy
    0, without a word). A label the two corpora give different ids is refused; a label one of them states without
    an id (None) takes the other's."""
    tables = {name: dict(table) for name, table in processor.ontology_term_ids.items()}
    for name, table in vocabulary["ontology_term_ids"].items():
        known = tables.setdefault(name, {})
        label_of = {term: label for label, term in known.items() if term is not None}
        clashes = {label: (known[label], term) for label, term in table.items()
                   if None not in (known.get(label), term) and known.get(label, term) != term}
        clashes.update({label: (label_of[term], term) for label, term in table.items()
                        if term is not None and label_of.get(term, label) != label})  # one id under another label
        if clashes:
            raise ValueError(f"the {name} labels {clashes} have other ids or labels in the model's processor than "
                             "in the corpus (model's, corpus's id): build the corpus with the ontology versions the "
                             "model's corpus was built with")
        added = sorted(set(table) - set(known))
        if added:
            logger.info("%d %s label(s) new to the model, now candidates: %s", len(added), name, added[:10])
        known.update({label: term if term is not None else known.get(label) for label, term in table.items()})
    pathways = processor.pathway_names + [p for p in vocabulary["pathway_names"] if p not in processor.pathway_names]
    ages = [group for group in AGE_GROUPS if group in {*processor.age_groups, *vocabulary["age_groups"]}]
    definitions = {**processor.cell_type_definitions, **vocabulary["cell_type_definitions"]}
    check_label_tables(tables, definitions, pathways, ages)
    processor.ontology_term_ids, processor.cell_type_definitions = tables, definitions
    processor.pathway_names, processor.age_groups = pathways, ages


def encoder_candidates(args: Cell2TextArguments) -> list[EncoderCandidate]:
    """The encoders validation chooses among: each input kind x each depth of the arguments."""
    layers = args.encoder_candidate_layers
    if not isinstance(layers, (list, tuple)) or not layers or not all(is_integer_at_least(n, 1) for n in layers):
        raise ValueError(f"encoder_candidate_layers must be a non-empty list of layer counts >= 1 (YAML: [1, 2]), got "
                         f"{layers!r}.")
    if isinstance(args.encoder_candidate_inputs, str):
        raise ValueError(f"encoder_candidate_inputs must be a list (YAML: [{args.encoder_candidate_inputs}]), got "
                         f"{args.encoder_candidate_inputs!r}.")
    unknown = set(args.encoder_candidate_inputs) - set(ENCODER_INPUTS)
    if unknown or not args.encoder_candidate_inputs:
        raise ValueError(f"encoder_candidate_inputs must be a non-empty list of {ENCODER_INPUTS}, got "
                         f"{args.encoder_candidate_inputs}.")
    return [
        EncoderCandidate(num_hidden_layers=n, hidden_size=args.encoder_hidden_size, value_aware=kind != "rank")
        for kind in args.encoder_candidate_inputs
        for n in args.encoder_candidate_layers
    ]


def check_value_aware_corpus(args: Cell2TextArguments, feature_extractor) -> None:
    """Refuse value-aware encoder candidates on a corpus without expression bins before any candidate trains (the
    rank-value candidates trained for minutes first)."""
    if "value_aware" in args.encoder_candidate_inputs and not feature_extractor.num_expression_bins:
        raise ValueError(
            f"encoder_candidate_inputs {list(args.encoder_candidate_inputs)} include value_aware, but the corpus "
            f"{args.corpus_dir} has no expression bins: build it with --expression-bins B (python -m "
            "processing.build_corpus), or pass --encoder_candidate_inputs rank.")


def encoder_preparation(args: Cell2TextArguments, training_args: SFTConfig, corpus: DatasetDict,
                        summary: dict) -> dict:
    """What an encoder prepared on the corpus is prepared for (`EncoderSelection.prepared_for`): the corpus content
    (the build's fingerprints, else datasets' fingerprints of the splits), the caps on its splits and the settings;
    an encoder prepared for anything else is prepared again, not reused."""
    caps = {name: value for name, value in (("max_train_samples", args.max_train_samples),
                                             ("max_eval_samples", args.max_eval_samples)) if value is not None}
    return {
        "corpus_fingerprints": corpus_fingerprints(corpus, summary),
        **caps,  # only where set: an encoder prepared without caps before they were recorded is still reused
        "candidates": [asdict(c) for c in encoder_candidates(args)],
        "epochs": args.encoder_epochs, "num_cell_tokens": args.num_cell_tokens, "seed": training_args.seed,
        "feature_layer": FEATURE_LAYER,  # an encoder prepared before its config recorded this is prepared again
        "selection_rule": SELECTION_RULE,  # as is one chosen by another rule
    }


def gene_encoder_path(args: Cell2TextArguments, training_args: SFTConfig, corpus, processor, summary: dict) -> str:
    """The pretrained encoder, or one prepared on the corpus.

    A prepared encoder is reused (e.g. when resuming) only if it was prepared for the same corpus content, caps and
    settings (`encoder_preparation`); otherwise it is prepared again.
    """
    if args.gene_encoder_name_or_path is not None:
        return args.gene_encoder_name_or_path
    out_dir = Path(training_args.output_dir) / PREPARED_ENCODER_DIR
    candidates = encoder_candidates(args)
    check_value_aware_corpus(args, processor.feature_extractor)
    prepared_for = encoder_preparation(args, training_args, corpus, summary)
    with training_args.main_process_first(desc="preparing the gene encoder on the corpus"):
        previous = EncoderSelection.load(out_dir)
        if previous is not None and previous.prepared_for == prepared_for:
            logger.info("reusing the gene encoder prepared in %s", out_dir)
        else:
            if previous is not None and any(Path(training_args.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
                changed = sorted(k for k in {*prepared_for, *(previous.prepared_for or {})}
                                 if (previous.prepared_for or {}).get(k) != prepared_for.get(k))
                raise ValueError(
                    f"The checkpoints in {training_args.output_dir} were trained on the gene encoder prepared in "
                    f"{out_dir} for another {', '.join(changed)}; preparing one for this run would overwrite it: use "
                    "the corpus and settings it was prepared for, or a new --output_dir.")
            selection = prepare_gene_encoder(
                corpus, processor.feature_extractor, out_dir, candidates, num_cell_tokens=args.num_cell_tokens,
                epochs=args.encoder_epochs, seed=training_args.seed, prepared_for=prepared_for,
            )
            logger.info("gene encoder chosen on validation: %s", selection)
    return str(out_dir)


def fit_processor_to_encoder(processor, encoder_path: str, trust_remote_code: bool = False) -> None:
    """The processor gives the model what its encoder reads: expression bins only for a value-aware encoder (0 for
    rank-value tokens, a pretrained Geneformer), and no more tokens per cell than the encoder has positions (an
    encoder prepared on the corpus is sized to its longest cell; a longer cell keeps its top-ranked genes, as
    Geneformer truncates)."""
    config = AutoConfig.from_pretrained(encoder_path, trust_remote_code=trust_remote_code)
    extractor = processor.feature_extractor
    extractor.num_expression_bins = (getattr(config, PREPARED_ENCODER_KEY, None) or {}).get("num_expression_bins", 0)
    fit_tokens_to_encoder(config, extractor)


# How a model is composed from parts: with init_from the model keeps its own, so a value given for them is not used.
COMPOSITION_SETTINGS = ("num_cell_tokens", "gene_encoder_layer", "projector_hidden_size", "projector_dropout",
                        "freeze_gene_encoder")  # the model's config holds each under the same name
PARTS_SETTINGS = ("text_model_name_or_path", "gene_encoder_name_or_path", "encoder_candidate_layers",
                  "encoder_candidate_inputs", "encoder_hidden_size", "encoder_epochs")


def check_init_from(init_from: str) -> None:
    """Refuse an `init_from` that is no saved model, before anything loads: a Trainer checkpoint (LoRA adapters and
    optimizer state, not the model they adapt) or a local folder that does not exist gave a Hub lookup's traceback."""
    from hub_cards.render import names_hub_repo

    path = Path(init_from).expanduser()
    if (path / "config.json").is_file():
        return
    if (path / "trainer_state.json").is_file():
        raise ValueError(f"init_from {init_from} is a Trainer checkpoint (LoRA adapters and optimizer state, not a "
                         f"model): continue its run with --resume_from_checkpoint {init_from} (and its --output_dir "
                         f"and settings), or set init_from to a saved model folder (<output_dir>/{FINAL_DIR}).")
    if path.exists():
        raise FileNotFoundError(f"init_from {init_from} holds no saved model (no config.json): set it to a saved "
                                f"Cell2Text folder (<output_dir>/{FINAL_DIR}) or a Hub id (org/name).")
    if not names_hub_repo(init_from):
        raise FileNotFoundError(f"init_from {init_from} does not exist (nor is it a Hub id, org/name): set it to a "
                                f"saved Cell2Text folder (<output_dir>/{FINAL_DIR}).")


def check_init_from_settings(args: Cell2TextArguments, config: Any) -> None:
    """Refuse composition settings given with `init_from` (other than their defaults and than the model's own): the
    recipe fine-tunes the model as it was composed, and they were silently ignored (freeze_gene_encoder=False left
    the encoder frozen, exit 0). A value equal to its default cannot be told from an unset one and passes."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(Cell2TextArguments) if f.name in COMPOSITION_SETTINGS + PARTS_SETTINGS}
    ignored = [f"{name}={getattr(args, name)!r} (the model's: {getattr(config, name)!r})"
               for name in COMPOSITION_SETTINGS
               if getattr(args, name) != defaults[name] and getattr(args, name) != getattr(config, name)]
    ignored += [f"{name}={getattr(args, name)!r}" for name in PARTS_SETTINGS if getattr(args, name) != defaults[name]]
    if ignored:
        raise ValueError(f"init_from {args.init_from} is fine-tuned as it was composed, so {', '.join(ignored)} would "
                         "be ignored: leave them unset, or compose a new model from parts (text_model_name_or_path) "
                         "to change them.")


def read_chat_template(path: str | None) -> str | None:
    """The chat template of TRL's `--chat_template_path` (None: the processor's own), which the recipe sets on the
    processor itself, before the run's record is taken (`check_resume`): set by TRL inside the trainer, a resume
    with another template trained the steps left on other texts, exit 0. TRL's other form, a tokenizer to clone the
    template from, is refused: it adds that tokenizer's special tokens and resizes the language model's embeddings,
    which the processor is not (it failed inside the trainer, after the encoder's preparation)."""
    if path is None:
        return None
    if not (Path(path).is_file() and path.endswith((".jinja", ".j2"))):
        raise ValueError(f"--chat_template_path {path} is not a .jinja or .j2 file: the recipe reads a Jinja chat "
                         "template from a file, and does not clone one from another tokenizer (that adds its special "
                         "tokens to the language model). Save the template to a file, e.g. "
                         "Path('template.jinja').write_text(tokenizer.chat_template), and pass that file.")
    return Path(path).read_text(encoding="utf-8")


def build_model(
    args: Cell2TextArguments, encoder_path: str | None, processor, trust_remote_code: bool = False
) -> Cell2TextForConditionalGeneration:
    """The model of `init_from` (this package's class; with `trust_remote_code` transformers' Auto class decides,
    and it prefers this package's registered class to a Cell2Text folder's code), or one composed from parts."""
    if args.init_from is not None:
        if trust_remote_code:
            return AutoModelForCausalLM.from_pretrained(args.init_from, trust_remote_code=True)
        return Cell2TextForConditionalGeneration.from_pretrained(args.init_from)
    # The vocabulary is checked against the encoder; a corpus-prepared encoder is read at the layer it was trained at.
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        encoder_path,
        args.text_model_name_or_path,
        cell_token_id=processor.cell_token_id,
        feature_extractor=processor.feature_extractor,
        trust_remote_code=trust_remote_code,
        num_cell_tokens=args.num_cell_tokens,
        gene_encoder_layer=args.gene_encoder_layer,
        projector_hidden_size=args.projector_hidden_size,
        projector_dropout=args.projector_dropout,
        freeze_gene_encoder=args.freeze_gene_encoder,
        num_expression_bins=processor.feature_extractor.num_expression_bins,
    )
    stop_at_end_of_text(model, processor.tokenizer.eos_token_id)  # the LLM's config may stop at another token
    return model


CELL_TYPE_STAGE_FILE = "cell2text_cell_type_stage.json"  # the stage before a checkpoint's training, for a resume


def trained_with(model: Cell2TextForConditionalGeneration, lora_config, cell_type_head: str | None) -> dict:
    """What a checkpoint's weights fit, written into each checkpoint (`RecordTrainedWith`) and checked on resuming
    (`check_resume`): the gene encoder and the language model they were trained on (their weights' checksums, before
    training: a checkpoint resumed on another LLM of the same shape loaded its adapters into it and trained on, exit
    0), the LoRA adapters' settings, the projector's composition (and dropout) and the auxiliary head trained with it
    (None: off);
    another projector_hidden_size or head failed on resuming in torch's state-dict or optimizer loading, naming no
    fix."""
    composition = {name: getattr(model.config, name) for name in ("num_cell_tokens", "gene_encoder_layer",
                                                                   "projector_hidden_size", "projector_dropout")}
    return {"gene_encoder_sha256": state_dict_sha256(model.model.gene_encoder.state_dict()),
            "language_model_sha256": language_model_sha256(model),
            **lora_record(lora_config), **composition, "cell_type_head": cell_type_head}


def language_model_sha256(model: Cell2TextForConditionalGeneration) -> str:
    """The checksum of the language model's weights and LM head, but for the cell placeholder's rows of the
    embeddings: composing a model draws that new token's row at random after the projector (another
    projector_hidden_size changed the draw), so it follows from the seed and the composition, which the record checks
    besides."""
    cell = model.config.cell_token_id
    embeddings = {model.get_input_embeddings().weight.data_ptr(), model.lm_head.weight.data_ptr()}
    state = {}
    for prefix, module in (("model.language_model.", model.model.language_model), ("lm_head.", model.lm_head)):
        for name, tensor in module.state_dict().items():
            if tensor.data_ptr() in embeddings and tensor.dim() == 2 and tensor.shape[0] > cell:
                tensor = torch.cat([tensor[:cell], tensor[cell + 1:]])
            state[prefix + name] = tensor
    return state_dict_sha256(state)


@dataclass
class CellTypeStage:
    """What the LLaVA-style first stage leaves: the model with its trained adapters, and its steps and runtime."""

    model: Any
    steps: int = 0
    runtime: float | None = None


def cell_type_stage_record(stage: CellTypeStage | None, checkpoint: Path | None) -> dict:
    """What training_state.json (and each checkpoint) records of the cell-type stage: this run's, or, resuming from
    `checkpoint`, what the checkpoint records (a resumed run skips the stage; it recorded 0 steps). None where a
    checkpoint records nothing (saved before this record was kept)."""
    if checkpoint is None:
        return {"cell_type_stage_steps": stage.steps if stage else 0,
                "cell_type_stage_runtime": stage.runtime if stage else None}
    path = checkpoint / CELL_TYPE_STAGE_FILE
    if not path.is_file():
        logger.warning("%s records no cell-type stage (%s): its steps are recorded as unknown.", checkpoint,
                       CELL_TYPE_STAGE_FILE)
        return {"cell_type_stage_steps": None, "cell_type_stage_runtime": None}
    return json.loads(path.read_text())


def needs_cell_type_index(part_settings: dict) -> bool:
    """Whether the trainer's losses read each cell's `cell_type_index` (the auxiliary head's, the choice's)."""
    return part_settings.get("cell_type_head_loss_weight", 0) > 0 or part_settings.get("cell_type_choice_loss_weight",
                                                                                          0) > 0


def train_cell_type_stage(args: Cell2TextArguments, training_args: SFTConfig, model, processor, train_dataset,
                          peft_config, part_settings: dict) -> CellTypeStage | None:
    """Stage 1 (LLaVA-style): the projector and LoRA learn to name the cell type from the cell tokens, on the
    description's first sentence alone (its cell-type label alone with `loss_on_labels_only`). Stage 2 goes on with
    the same adapters; checkpoints are of stage 2, so a resumed run skips stage 1 (None: no stage)."""
    if args.cell_type_stage_steps <= 0 or training_args.resume_from_checkpoint:
        return None
    stage_args = dataclasses.replace(
        training_args, output_dir=str(Path(training_args.output_dir) / "cell_type_stage"),
        max_steps=args.cell_type_stage_steps, eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, resume_from_checkpoint=None,
    )
    stage = Cell2TextSFTTrainer(
        model=model, args=stage_args,
        data_collator=Cell2TextDataCollator(processor, cell_type_only=True, labels_only=args.loss_on_labels_only,
                                            cell_type_index=needs_cell_type_index(part_settings)),
        train_dataset=train_dataset, processing_class=processor, peft_config=peft_config, **part_settings,
    )
    runtime = stage.train().metrics.get("train_runtime")
    return CellTypeStage(stage.model, stage.state.global_step, runtime)


#: TRL's and transformers' settings `training_settings` records besides the recipe's own arguments.
RECORDED_SFT_SETTINGS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                         "num_train_epochs", "max_steps", "seed")


def training_settings(args: Cell2TextArguments, training_args: SFTConfig) -> dict:
    """What the model was trained with, as training_state.json records it for its model card (`training.demo`): the
    recipe's arguments that are set, the main optimisation settings, the number of processes, the precision
    (`--bf16`, which the recipe turns off on a CPU without native bf16 kernels) and torch's thread count (a CPU
    training's float sums, and so its weights, depend on it). Taken from the run, not its config: a model reused
    from an earlier run (`--reuse-models`) was carded with the settings of the run reusing it."""
    import torch

    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "float32"
    return {**{name: value for name, value in vars(args).items() if value is not None},
            **{name: getattr(training_args, name) for name in RECORDED_SFT_SETTINGS},
            "processes": training_args.world_size, "precision": precision, "torch_threads": torch.get_num_threads()}


def calibrate(model, processor, args: Cell2TextArguments, training_args: SFTConfig, validation) -> dict:
    """Fit the temperatures of the fields' probabilities of the merged model (`merge_adapters`; None on processes
    other than the main one) on held-out cells (the choices do not change) and write them into its config; what
    was fitted, for training_state.json. Temperatures not fitted are 1.0 (none per field): init_from's fit its
    model before this training, not after."""
    fitted = {"cell_type_calibration": None, "field_calibration": None}
    if model is not None:
        model.config.cell_type_temperature, model.config.field_temperatures = 1.0, None
    if args.temperature_fit_cells <= 0 or validation is None or model is None:
        return fitted
    cells = validation.shuffle(seed=training_args.seed)
    cells = cells.select(range(min(len(cells), args.temperature_fit_cells)))
    batch_size = training_args.per_device_eval_batch_size
    fitted["cell_type_calibration"] = fit_cell_type_temperature(model, processor, cells, batch_size)
    if fitted["cell_type_calibration"] is not None:
        model.config.cell_type_temperature = fitted["cell_type_calibration"]["cell_type_temperature"]
    fitted["field_calibration"] = fit_field_temperatures(model, processor, cells, batch_size)
    if fitted["field_calibration"] is not None:
        model.config.field_temperatures = {
            choice: fit["temperature"] for choice, fit in fitted["field_calibration"].items()}
    return fitted


def main(args: Cell2TextArguments, training_args: SFTConfig) -> Path:
    """Train and save; returns the folder of the merged, Hub-ready model."""
    check_sft_settings(training_args)  # as given: dataset_kwargs gets skip_prepare_dataset below
    chat_template = read_chat_template(training_args.chat_template_path)  # set here, not by TRL (see its docstring)
    check_one_process_losses(training_args.world_size, cell_type_head_loss_weight=args.cell_type_head_loss_weight,
                             cell_type_choice_loss_weight=args.cell_type_choice_loss_weight)
    # The collator reads the corpus columns itself: keep them, and skip TRL's text preparation.
    training_args = dataclasses.replace(
        training_args, remove_unused_columns=False, chat_template_path=None,
        dataset_kwargs={**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True},
    )
    final_dir = Path(args.final_model_dir or Path(training_args.output_dir) / FINAL_DIR)
    output_dir = Path(training_args.output_dir).resolve()
    if final_dir.resolve() in (output_dir, *output_dir.parents):  # publishing replaces the folder, checkpoints and all
        raise ValueError(f"--final_model_dir {final_dir} is --output_dir {training_args.output_dir} or holds it, so "
                         "the merged model could not be saved there after training: pass another --final_model_dir "
                         f"(default: <output_dir>/{FINAL_DIR}).")
    check_new_output(final_dir, args.overwrite_final_model_dir, OVERWRITE_FINAL_FIX, holds="config.json")  # before training, not after
    if args.init_from is not None:
        check_init_from(args.init_from)
    check_output_dir(training_args, args.overwrite_output_dir)
    set_training_seed(training_args)  # same seed, same machine: same model

    # 1. The corpus, the processor it implies, and the gene encoder (given, or prepared on the corpus).
    corpus, summary = load_corpus(args.corpus_dir, args)
    check_validation_split(corpus, args, training_args)
    trust_remote_code = training_args.trust_remote_code  # off: no code shipped in a model folder runs
    processor = build_processor(args, args.corpus_dir, summary, trust_remote_code, corpus["train"])
    if chat_template is not None:
        processor.chat_template = chat_template
    processor._prompt_ids(processor.num_cell_tokens)  # a prompt it refuses (a dated template), before the encoder
    with without_zero3_init():  # built whole on every process, also under ZeRO-3 (`without_zero3_init`)
        encoder_path = None if args.init_from else gene_encoder_path(args, training_args, corpus, processor, summary)
    if encoder_path is not None:
        fit_processor_to_encoder(processor, encoder_path, trust_remote_code)

    # 2. The model; the new weights (projector, then LoRA in the trainer) start from the seed whether the encoder
    # was prepared now or reused.
    set_training_seed(training_args)
    with without_zero3_init():
        model = build_model(args, encoder_path, processor, trust_remote_code)
    if args.init_from is not None:
        check_init_from_settings(args, model.config)
    # evaluation refuses another build; describing warns of nuclei where the corpus held none
    record_training_corpus(model.config, summary.get("fingerprints"), summary.get("suspension_types"))
    if model.config.num_cell_tokens != processor.num_cell_tokens:
        raise ValueError(
            f"The model takes {model.config.num_cell_tokens} cell tokens but the processor expands "
            f"{processor.num_cell_tokens}; they must agree."
        )
    modules_to_save = ["multi_modal_projector"] + ([] if model.config.freeze_gene_encoder else ["gene_encoder"])
    peft_config = args.lora_config(language_model_lora_targets(model), modules_to_save)
    head = args.cell_type_head if args.cell_type_head_loss_weight > 0 else None
    record = {**trained_with(model, peft_config, head), "max_train_samples": args.max_train_samples,  # None too
              "max_eval_samples": args.max_eval_samples,  # the best checkpoint's validation cells
              "corpus_fingerprints": corpus_fingerprints(corpus, summary),
              **data_order(training_args, args.cell_type_balance),
              **optimizer_settings(training_args, projector_learning_rate=args.projector_learning_rate,
                                   gene_encoder_learning_rate=args.gene_encoder_learning_rate),
              "definitions_in_model_text": processor.definitions_in_model_text,
              "loss_on_labels_only": args.loss_on_labels_only,
              **loss_settings(training_args, cell_type_loss_weight=args.cell_type_loss_weight,
                              cell_type_head_loss_weight=args.cell_type_head_loss_weight,
                              cell_type_choice_loss_weight=args.cell_type_choice_loss_weight),
              "cell_type_stage_steps": args.cell_type_stage_steps,  # a resume skips it: another was ignored
              **{f"processor_{part}": checksum for part, checksum in processor_sha256(processor).items()},
              "prompt_date": prompt_date(processor.tokenizer, processor.chat_template),
              **best_checkpoint_choice(training_args)}
    check_resume(training_args.resume_from_checkpoint, record, training_args.output_dir)
    part_settings = {
        "projector_learning_rate": args.projector_learning_rate,
        "gene_encoder_learning_rate": args.gene_encoder_learning_rate,
        "cell_type_loss_weight": args.cell_type_loss_weight,
        "cell_type_balance": args.cell_type_balance,
        "cell_type_head_loss_weight": args.cell_type_head_loss_weight,
        "cell_type_head": args.cell_type_head,
        "cell_type_choice_loss_weight": args.cell_type_choice_loss_weight,
    }

    # 3. Training: the optional cell-type stage, then whole descriptions.
    stage = train_cell_type_stage(args, training_args, model, processor, corpus["train"], peft_config, part_settings)
    if stage is not None:
        model, peft_config = stage.model, None  # the stage's adapters go on training
    stage_record = cell_type_stage_record(
        stage, resumed_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir))
    trainer = Cell2TextSFTTrainer(
        model=model,
        args=training_args,
        data_collator=Cell2TextDataCollator(processor, labels_only=args.loss_on_labels_only,
                                            cell_type_index=needs_cell_type_index(part_settings)),
        train_dataset=corpus["train"],
        eval_dataset=corpus["validation"] if training_args.eval_strategy != "no" else None,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[RecordTrainedWith(record, {CELL_TYPE_STAGE_FILE: stage_record} if stage_record else None)],
        **part_settings,
    )
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # 4. LoRA merged into the language model (weights sharded by FSDP or ZeRO-3 gathered first), its calibration on
    # validation cells, then the Hub-ready folder with the processor and pipeline.
    merged = merge_adapters(trainer)
    if merged is not None:  # the processor it was trained with (--chat_template_path's template, set by the recipe), not
        fit_tokens_to_encoder(merged.config.gene_encoder_config, processor.feature_extractor)
        merged.config.processor_sha256 = processor_sha256(processor)  # init_from's
    fitted = calibrate(merged, processor, args, training_args, corpus.get("validation"))
    return save_merged(trainer, merged, final_dir, processor, {
        **stage_record, "train_runtime": train_output.metrics.get("train_runtime"), **fitted,
        "training_settings": training_settings(args, training_args),
    }, overwrite=args.overwrite_final_model_dir, save_folder=save_model_folder)


def make_parser() -> TrlParser:
    """The recipe's command line: `Cell2TextArguments` and TRL's `SFTConfig`, whose settings the recipe refuses
    (`UNUSED_SFT_SETTINGS`) say so in --help instead of TRL's description."""
    parser = TrlParser((Cell2TextArguments, SFTConfig))
    for action in parser._actions:
        if action.dest in UNUSED_SFT_SETTINGS:
            action.help = f"Refused by this recipe: {UNUSED_SFT_SETTINGS[action.dest][1]}."
    return parser


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with refused_input_as_one_line("sft"):  # a bad setting or a missing corpus: one line, no traceback
        cell2text_args, sft_config = parse_training_arguments(make_parser())
        with stopped_cleanly():
            main(cell2text_args, sft_config)
    leave_process_group()
