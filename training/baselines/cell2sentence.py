"""The Cell2Sentence-style baseline: the same LLM fine-tuned on a cell's top genes written as text.

Cell2Sentence (Levine et al., 2024) writes a cell as a "cell sentence", its most expressed genes in rank order as
gene symbols, and fine-tunes a causal LM on it. Here the genes are the cell's first ``num_genes`` rank-value tokens
from the corpus (the same ranking Cell2Text's encoder reads), the target is the same description, and the
optimisation budget is the same ``SFTConfig`` as the Cell2Text run; only the way the cell reaches the LLM differs.

```bash
python -m training.baselines.cell2sentence --corpus_dir outputs/demo/corpus \
    --text_model_name_or_path ~/.cache/cell2text/SmolLM2-135M-Instruct --output_dir outputs/demo/c2s \
    --num_genes 32 --per_device_train_batch_size 8 --num_train_epochs 1
```

Each cell becomes a conversational prompt-completion example (system prompt, user message with the cell sentence;
assistant message with the description), so TRL computes the loss on the completion only. LoRA adapts every
linear layer of the LM, is merged at the end, and the plain causal LM is saved with its tokenizer.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer, TrlParser

from modeling_cell2text import Cell2TextFeatureExtractor
from modeling_cell2text.feature_extraction_cell2text import SPECIAL_TOKENS
from modeling_cell2text.processing_cell2text import DEFAULT_SYSTEM_PROMPT, PROMPT_DATE, prompt_date, render_chat
from modeling_cell2text.text_padding import ended_at_end_of_text
from processing.corpus import corpus_feature_extractor, corpus_summary, open_corpus
from modeling_cell2text.argument_types import refused_input_as_one_line
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
    save_merged,
    state_dict_sha256,
    stopped_cleanly,
    tokenizer_sha256,
    trl_chat_template,
    without_zero3_init,
)
from training.loss import LabelledPositionsLossMixin

logger = logging.getLogger(__name__)

# Cell2Text's system prompt; the user turn says the cell comes as ranked gene symbols.
SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT
USER_PREFIX = "Genes ranked by expression: "
CONFIG_FILENAME = "cell2sentence.json"

_WORDS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_words(feature_extractor: Cell2TextFeatureExtractor) -> dict[int, str | None]:
    """Token id -> gene symbol (Ensembl ID where no symbol); None for special tokens. Cached per extractor."""
    words = _WORDS_CACHE.get(feature_extractor)
    if words is None:
        words = {
            token: None if gene in SPECIAL_TOKENS else feature_extractor.gene_symbols.get(gene) or gene
            for gene, token in feature_extractor.gene_token_ids.items()
        }
        _WORDS_CACHE[feature_extractor] = words
    return words


def cell_sentence(token_ids: Sequence[int], feature_extractor: Cell2TextFeatureExtractor, num_genes: int) -> str:
    """The cell's top ``num_genes`` genes in rank order as space-separated symbols; special tokens skipped."""
    if num_genes < 1:
        raise ValueError(f"num_genes={num_genes}; a cell sentence needs at least one gene.")
    words = _token_words(feature_extractor)
    genes: list[str] = []
    for token in token_ids:
        token = int(token)
        if token not in words:
            raise ValueError(
                f"Token id {token} is not in the feature extractor's vocabulary; use the feature extractor the "
                "corpus was built with (<corpus_dir>/feature_extractor)."
            )
        if words[token] is not None:
            genes.append(words[token])
            if len(genes) == num_genes:
                break
    return " ".join(genes)


# What the chat template reads besides the messages, in training (TRL's `chat_template_kwargs` column) and generation
# alike: the fixed date Cell2Text's prompts state (`PROMPT_DATE`), for a template that states one (Llama 3's "Today
# Date:"), which otherwise wrote the day of each run: the baseline described cells on another prompt than it learnt.
CHAT_TEMPLATE_KWARGS = {"date_string": PROMPT_DATE}


def cell_prompt(token_ids: Sequence[int], feature_extractor: Cell2TextFeatureExtractor, num_genes: int) -> list[dict]:
    """The chat messages that ask the LLM to describe one cell from its cell sentence."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_PREFIX + cell_sentence(token_ids, feature_extractor, num_genes)},
    ]


def prompt_completion_dataset(
    corpus_split: Dataset, feature_extractor: Cell2TextFeatureExtractor, num_genes: int
) -> Dataset:
    """A conversational prompt-completion dataset for TRL: prompt = system + cell sentence, completion = description
    (and the chat template's `CHAT_TEMPLATE_KWARGS`, the fixed date)."""
    missing = {"gene_input_ids", "description"} - set(corpus_split.column_names)
    if missing:
        raise ValueError(f"The corpus split lacks the columns {sorted(missing)}; build it with processing.build_corpus.")
    return Dataset.from_dict({
        "prompt": [cell_prompt(ids, feature_extractor, num_genes) for ids in corpus_split["gene_input_ids"]],
        "completion": [[{"role": "assistant", "content": text}] for text in corpus_split["description"]],
        "chat_template_kwargs": [CHAT_TEMPLATE_KWARGS] * len(corpus_split),
    })


def load_corpus(corpus_dir: str | Path) -> tuple[DatasetDict, Cell2TextFeatureExtractor]:
    """The corpus and the feature extractor it was built with."""
    return open_corpus(corpus_dir), corpus_feature_extractor(corpus_dir)


class Cell2SentenceSFTTrainer(NoStepPastMaxStepsMixin, MultiProcessTrainingMixin, LabelledPositionsLossMixin,
                              SFTTrainer):
    """`SFTTrainer` with the same loss computation as Cell2Text's (`training/loss.py`), so budgets compare."""


def build_trainer(
    corpus_dir: str | Path,
    text_model_name_or_path: str | Path,
    output_dir: str | Path,
    *,
    num_genes: int,
    training_args: SFTConfig,
    lora: LoraArguments | None = None,
    cell_type_loss_weight: float = 1.0,
) -> SFTTrainer:
    """The `SFTTrainer` for the baseline: LoRA on every linear layer of the LM, prompt-completion data. A resume
    is checked against what its checkpoint was trained with (`adapters.check_resume`), as the recipe's is."""
    corpus, feature_extractor = load_corpus(corpus_dir)
    training_args.output_dir = str(output_dir)
    peft_config = (lora or LoraArguments()).lora_config("all-linear")
    # A config shared with the Cell2Text run may skip TRL's dataset preparation; here TRL must tokenize the chats.
    training_args.dataset_kwargs = {
        k: v for k, v in (training_args.dataset_kwargs or {}).items() if k != "skip_prepare_dataset"
    } or None
    tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path)
    if tokenizer.chat_template is None:
        raise ValueError(f"{text_model_name_or_path} has no chat template; use an instruction-tuned LLM.")
    # None: the tokenizer's own, as it renders it (of several named templates, a dict, its "default")
    template = trl_chat_template(tokenizer, training_args.chat_template_path)[0] if training_args.chat_template_path \
        else None
    date = prompt_date(tokenizer, template)  # refuses a template writing today's date (strftime_now), before training
    with without_zero3_init():  # whole, as the recipe's: partitioned, its checksum below hashed empty partitions
        model = AutoModelForCausalLM.from_pretrained(text_model_name_or_path, dtype=torch.float32)
    record = {**lora_record(peft_config), "language_model_sha256": state_dict_sha256(model.state_dict()),
              "tokenizer_sha256": tokenizer_sha256(tokenizer, training_args.chat_template_path),
              "prompt_date": date,
              "num_genes": num_genes,
              "corpus_fingerprints": corpus_fingerprints(corpus, corpus_summary(corpus_dir)),
              **data_order(training_args, cell_type_balance=0.0), **optimizer_settings(training_args),
              **loss_settings(training_args, cell_type_loss_weight=cell_type_loss_weight),
              **best_checkpoint_choice(training_args)}
    check_resume(training_args.resume_from_checkpoint, record, str(output_dir))
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = prompt_completion_dataset(corpus["validation"], feature_extractor, num_genes)
    trainer = Cell2SentenceSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=prompt_completion_dataset(corpus["train"], feature_extractor, num_genes),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        cell_type_loss_weight=cell_type_loss_weight,
        callbacks=[RecordTrainedWith(record)],
    )
    check_whole_examples(trainer, {"train": len(corpus["train"]), "validation": len(corpus.get("validation") or [])})
    return trainer


def check_whole_examples(trainer: SFTTrainer, cells: dict[str, int]) -> None:
    """Refuse a `max_length` at which TRL's dataset preparation cut examples: it truncates each cell sentence and
    description to it and drops the examples whose prompt alone fills it, so the baseline trained on fewer cells and
    on cut descriptions (max_length 200 on the tests' corpus: 9 of 32 cells, each cut), exit 0, where Cell2Text trains
    every description whole. `cells`: the corpus's cells per split. An example of exactly `max_length` tokens reads
    as cut."""
    max_length = trainer.args.max_length
    if max_length is None or trainer.args.packing:  # packing chunks the examples at max_length by design
        return
    for split, dataset in (("train", trainer.train_dataset), ("validation", trainer.eval_dataset)):
        if not isinstance(dataset, Dataset):
            continue
        dropped = cells[split] - len(dataset)
        lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"])  # not read into Python lists
        cut = dropped + (pc.sum(pc.greater_equal(lengths, max_length)).as_py() or 0)
        if cut:
            raise ValueError(
                f"--max_length {max_length} cuts the cell sentence and description of {cut} of the {cells[split]} "
                f"{split} cells ({dropped} left out, their prompt alone filling it), so the baseline would train on "
                "fewer cells and cut descriptions: pass a larger --max_length (max_length: null in a --config takes "
                "every example whole) or a smaller --num_genes.")


def train_cell2sentence(
    corpus_dir: str | Path,
    text_model_name_or_path: str | Path,
    output_dir: str | Path,
    *,
    num_genes: int,
    training_args: SFTConfig,
    lora: LoraArguments | None = None,
    cell_type_loss_weight: float = 1.0,
    overwrite: bool = False,
    overwrite_output_dir: bool = False,
) -> Path:
    """Fine-tune the LLM on cell sentences, merge LoRA, save model + tokenizer to ``output_dir/final``; return it.
    An existing ``output_dir/final`` is refused before training unless ``overwrite``, and checkpoints of an earlier
    run in ``output_dir`` unless the run resumes or ``overwrite_output_dir`` (`adapters.check_output_dir`)."""
    training_args.output_dir = str(output_dir)
    check_output_dir(training_args, overwrite_output_dir)
    trainer = build_trainer(
        corpus_dir, text_model_name_or_path, output_dir, num_genes=num_genes, training_args=training_args,
        lora=lora, cell_type_loss_weight=cell_type_loss_weight,
    )
    final_dir = Path(output_dir) / FINAL_DIR
    check_new_output(final_dir, overwrite, OVERWRITE_FINAL_FIX, holds="config.json")  # before training, not after
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # the cells it trained on, as Cell2Text's config records them: a reuse is checked against the corpus evaluated
    generation_config = {"num_genes": num_genes, "system_prompt": SYSTEM_PROMPT, "user_prefix": USER_PREFIX,
                         "training_corpus_fingerprints": corpus_fingerprints(open_corpus(corpus_dir),
                                                                             corpus_summary(corpus_dir))}
    return save_merged(trainer, merge_adapters(trainer), final_dir, trainer.processing_class, {}, overwrite=overwrite,
                       extra_files={CONFIG_FILENAME: json.dumps(generation_config, indent=2)})


def _check_num_genes(model_dir: Path, num_genes: int) -> None:
    config_file = model_dir / CONFIG_FILENAME
    if config_file.exists():
        trained = json.loads(config_file.read_text())["num_genes"]
        if trained != num_genes:
            raise ValueError(f"{model_dir} was trained on {trained} genes per cell; pass num_genes={trained}.")


@torch.no_grad()
def generate_cell2sentence(
    model_dir: str | Path,
    corpus_split: Dataset,
    feature_extractor: Cell2TextFeatureExtractor,
    num_genes: int,
    batch_size: int = 16,
    max_new_tokens: int = 160,
) -> tuple[list[str], list[bool]]:
    """Greedy descriptions, one per cell of ``corpus_split``, from a model saved by `train_cell2sentence`, and
    whether the model ended each (False: cut at `max_new_tokens` or stopped at a stop id other than its chat
    template's turn end, `turn_end_id`), which `score_descriptions` counts as unparsed, as it does Cell2Text's: a
    text cut at a sentence's end parsed with its later fields missing, and raised the baseline's parse rate."""
    model_dir = Path(model_dir)
    _check_num_genes(model_dir, num_genes)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    eos_ids = model.generation_config.eos_token_id
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    eos_ids = sorted({*eos_ids, tokenizer.eos_token_id})
    turn_end = turn_end_id(tokenizer, eos_ids)
    token_lists = corpus_split["gene_input_ids"]
    texts: list[str] = []
    whole: list[bool] = []
    for start in tqdm(range(0, len(token_lists), batch_size), desc="generating cell2sentence descriptions"):
        chats = [cell_prompt(ids, feature_extractor, num_genes) for ids in token_lists[start : start + batch_size]]
        inputs = tokenizer.apply_chat_template(
            chats, add_generation_prompt=True, tokenize=True, padding=True, return_dict=True, return_tensors="pt",
            **CHAT_TEMPLATE_KWARGS,
        ).to(model.device)
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        texts.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        whole.extend(ended_at_end_of_text(new_tokens, turn_end, eos_ids).tolist())
    return texts, whole


def turn_end_id(tokenizer: PreTrainedTokenizerBase, stop_ids: Sequence[int]) -> int | None:
    """The stop id the chat template ends an assistant's message with, which the baseline is trained to write: not
    always the tokenizer's eos_token (Gemma's turn ends at <end_of_turn>, its eos_token is <eos>; counted as the end
    of text, every description read as cut). The tokenizer's eos_token where the template's end is no stop id."""
    chat = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": USER_PREFIX}]
    prompt = render_chat(tokenizer, chat, add_generation_prompt=True)  # refuses a template writing today's date
    whole = render_chat(tokenizer, [*chat, {"role": "assistant", "content": "A cell."}])
    if not whole.startswith(prompt):
        return tokenizer.eos_token_id
    completion = tokenizer(whole[len(prompt):], add_special_tokens=False)["input_ids"]
    return next((token for token in completion if token in stop_ids), tokenizer.eos_token_id)


@dataclass(kw_only=True)
class Cell2SentenceArguments(LoraArguments):
    """What to train: the corpus, the LLM, the cell-sentence length and LoRA's shape."""

    corpus_dir: str = field(metadata={"help": "Corpus folder written by `python -m processing.build_corpus`."})
    text_model_name_or_path: str = field(metadata={"help": "Instruction-tuned causal LM (folder or Hub id)."})
    num_genes: int = field(default=32, metadata={"help": "Top genes per cell sentence (match num_cell_tokens)."})
    cell_type_loss_weight: float = field(
        default=1.0, metadata={"help": "Loss weight of the description's first sentence (the cell type); see training/loss.py."}
    )
    overwrite_final_model_dir: bool = field(
        default=False, metadata={"help": "Replace a model already in <output_dir>/final (else the run stops before "
                                 "training)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": OVERWRITE_OUTPUT_DIR_HELP}
    )


def make_parser() -> TrlParser:
    return TrlParser((Cell2SentenceArguments, SFTConfig))


def main(args: Cell2SentenceArguments, training_args: SFTConfig) -> Path:
    """Train the baseline from parsed arguments; returns the merged model's folder."""
    return train_cell2sentence(
        args.corpus_dir, args.text_model_name_or_path, training_args.output_dir, num_genes=args.num_genes,
        training_args=training_args, lora=args, cell_type_loss_weight=args.cell_type_loss_weight,
        overwrite=args.overwrite_final_model_dir, overwrite_output_dir=args.overwrite_output_dir,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with refused_input_as_one_line("cell2sentence"):
        with stopped_cleanly():
            main(*parse_training_arguments(make_parser()))
    leave_process_group()
