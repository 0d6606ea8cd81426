"""Paper-scale training steps and generation throughput on one GPU, with random-weight parts (issue 12).

    python benchmarks/gpu.py [--size paper|smoke] [--tokenizer DIR]   # on a CUDA GPU (skips elsewhere)
    python benchmarks/gpu.py --dry-run                                 # same code path, tiny shapes, CPU, seconds

Parts shaped as Geneformer V2-316M (BERT: hidden 1152, 18 layers, 18 heads, intermediate 4608, 4096 positions) and
Llama-3.2-3B (hidden 3072, 28 layers, 24 heads, 8 KV heads, intermediate 8192; the tokenizer's vocabulary unless
--lm-vocab-size), random weights in bf16, saved and composed like real checkpoints (`from_pretrained_parts`). The
corpus is synthetic and census-like: raw counts of ~2,000 expressed genes a cell out of 20,000, per-cell-type
signatures, ranked by the project's feature extractor (Geneformer-style dictionaries) into 4,096-token inputs,
descriptions rendered by the project's schema, written in the corpus builder's layout.

Training (the recipe's own trainer, LoRA, collator and `training/configs/*.yaml`), the same 32 cells a step:
`paper.yaml` (4 x 8, activation checkpointing), `paper_large_gpu.yaml` (16 x 2, checkpointing) and 32 x 1 without
checkpointing. Printed per setting: s/step (median of the timed steps, the first step not timed), cells/s,
tokens/s, peak GPU memory, the collator's share of a step (timed in the main process; in training it runs in the
dataloader's workers) and the loss.
Generation (`pipeline("cell-to-text")` with the installed package's classes, bf16, 100 new tokens a cell): batch
256 with the dynamic cache, the static cache, and the static cache compiled (transformers compiles the decoding
step of a static-cache `generate` on a GPU by itself: its `CompileConfig`, `disable_compile=False`), all three
writing freely, then the schema-constrained decoder (the pipeline's default: every field chosen among the corpus's
labels; its "new tokens/s" counts the same 100 tokens a cell for comparison; the describe path it replaced before
it: every cell-type label scored, the best written, 100 tokens generated after it), and the decoder again on padded
rows (`schema_decoding.PACK_TOKENS` False: every step as wide as its widest cell, long writes split at a pass cost
measured on a CPU; the default packs each step's real tokens into one row: this says what packing gains on the
GPU). Printed per mode: cells/s, new tokens/s, peak memory and the warm-up (compile) time; for the schema decoder its
model calls for the batch. The parts' weights are random, so the decoder's search runs to its bound (twice the
trees' depths in calls; 25 a batch in the dry run): a trained model needs fewer (15 at batch 256 on the main job's
model, docs/results.md), so its figure is a worst case. The JSON gives each mode's start time, to read its GPU busy share from gpu_run.sh's
smi.csv.

`--size smoke` keeps the paper shapes with fewer steps and a smaller generation batch (a quick check of a GPU
set-up); `--time-budget` skips the stages that would start after it (the generation modes come last, in order;
the compiled one last of them). A setting or mode that runs out of GPU memory is recorded as such and the rest run;
32 x 1 without checkpointing is skipped on a GPU under 120 GiB (run on an H200: `run` with kind nvidia-h200).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = REPO / "training" / "configs"

# Real Cell Ontology terms (labels and shortened definitions), tissues, diseases and life stages, as in Census.
CELL_TYPES = (
    ("CL:0000236", "B cell", "A lymphocyte of B lineage that is capable of B cell mediated immunity"),
    ("CL:0000624", "CD4-positive, alpha-beta T cell", "A mature alpha-beta T cell that expresses CD4"),
    ("CL:0000625", "CD8-positive, alpha-beta T cell", "A T cell expressing an alpha-beta T cell receptor and CD8"),
    ("CL:0000623", "natural killer cell", "A lymphocyte that can spontaneously kill a variety of target cells"),
    ("CL:0001054", "CD14-positive monocyte", "A monocyte that expresses CD14"),
    ("CL:0000451", "dendritic cell", "A cell of hematopoietic origin that processes and presents antigens"),
    ("CL:0000235", "macrophage", "A mononuclear phagocyte present in variety of tissues"),
    ("CL:0000066", "epithelial cell", "A cell that is usually found in a two-dimensional sheet with a free surface"),
    ("CL:0000057", "fibroblast", "A connective tissue cell which secretes an extracellular matrix"),
    ("CL:0000115", "endothelial cell", "An endothelial cell comprises the outermost layer or lining of vessels"),
    ("CL:0000786", "plasma cell", "A terminally differentiated, post-mitotic, antibody secreting cell"),
    ("CL:0000097", "mast cell", "A cell that is found in almost all tissues containing numerous basophilic granules"),
)
TISSUES = (("UBERON:0000178", "blood"), ("UBERON:0002048", "lung"), ("UBERON:0002107", "liver"))
DISEASES = (("PATO:0000461", "normal"), ("MONDO:0100096", "COVID-19"), ("MONDO:0005061", "lung adenocarcinoma"))
AGE_GROUPS = ("young adulthood", "adulthood", "middle age", "elderly")
PATHWAYS = (
    "Cytoplasmic Translation (GO:0002181)", "Antigen Processing And Presentation (GO:0019882)",
    "T Cell Receptor Signaling Pathway (GO:0050852)", "B Cell Receptor Signaling Pathway (GO:0050853)",
    "Inflammatory Response (GO:0006954)", "Extracellular Matrix Organization (GO:0030198)",
    "Angiogenesis (GO:0001525)", "Epithelial Cell Differentiation (GO:0030855)",
)


@dataclass(frozen=True)
class Size:
    """Model shapes, corpus shape and how much to run."""

    encoder: dict
    lm: dict
    n_genes: int
    genes_per_cell: int
    model_input_size: int
    num_cell_tokens: int
    projector_hidden_size: int
    timed_steps: int
    # (name, config file, overrides): the same cells a step in each
    settings: tuple = ()
    generation_batch: int = 256
    new_tokens: int = 100
    # the decoder's modes before the compiled one (its compile alone took 35 s), so a budget cut loses that last
    generation_modes: tuple = ("dynamic", "static", "former constrained describe", "schema-constrained",
                               "schema-constrained, padded rows", "static, compiled")


PAPER_ENCODER = dict(hidden_size=1152, num_hidden_layers=18, num_attention_heads=18, intermediate_size=4608,
                     max_position_embeddings=4096)
LLAMA_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500000.0)
PAPER_SETTINGS = (
    ("paper.yaml: 4 x 8, checkpointing on", "paper.yaml", []),
    ("paper_large_gpu.yaml: 16 x 2, checkpointing on", "paper_large_gpu.yaml", []),
    ("32 x 1, checkpointing off", "paper.yaml",
     ["--per_device_train_batch_size", "32", "--gradient_accumulation_steps", "1",
      "--activation_checkpointing", "false"]),
)
# GPU memory a setting needs (GiB): 32 x 1 without checkpointing took 112 GB on an H200; skipped on a smaller GPU
SETTING_MIN_GIB = {"32 x 1, checkpointing off": 120}
SIZES = {
    "paper": Size(PAPER_ENCODER, LLAMA_3B, 20_000, 2_000, 4096, 256, 2048, timed_steps=5, settings=PAPER_SETTINGS),
    "smoke": Size(PAPER_ENCODER, LLAMA_3B, 20_000, 2_000, 4096, 256, 2048, timed_steps=1, settings=PAPER_SETTINGS[:2],
                  generation_batch=32, new_tokens=20,
                  generation_modes=("dynamic", "static", "former constrained describe", "schema-constrained",
                                    "schema-constrained, padded rows")),
    "tiny": Size(
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=256),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048),
        300, 60, 128, 16, 32, timed_steps=2,
        settings=(
            ("4 x 2, checkpointing on", "paper.yaml",
             ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]),
            ("8 x 1, checkpointing off", "paper.yaml",
             ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
              "--activation_checkpointing", "false"]),
        ),
        generation_batch=8, new_tokens=8,
        generation_modes=("dynamic", "static", "former constrained describe", "schema-constrained",
                          "schema-constrained, padded rows"),
    ),
}


def log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------------ corpus


def synthetic_counts(size: Size, n_cells: int, seed: int = 0) -> tuple[sp.csr_matrix, list[str], np.ndarray]:
    """Raw counts (cells x genes, CSR), gene ids and each cell's type index: census-like, per-type signatures."""
    rng = np.random.default_rng(seed)
    genes = [f"ENSG{i:011d}" for i in range(1, size.n_genes + 1)]
    base = rng.lognormal(0.0, 2.0, size.n_genes)
    signatures = [np.where(rng.random(size.n_genes) < 0.02, rng.lognormal(2.0, 1.0, size.n_genes), 1.0)
                  for _ in CELL_TYPES]
    cell_types = rng.integers(0, len(CELL_TYPES), n_cells)
    rows, cols, vals = [], [], []
    for i, t in enumerate(cell_types):
        p = base * signatures[t]
        k = int(np.clip(rng.normal(size.genes_per_cell, size.genes_per_cell / 5), 10, size.n_genes - 1))
        chosen = rng.choice(size.n_genes, k, replace=False, p=p / p.sum())
        rows.append(np.full(k, i))
        cols.append(chosen)
        vals.append(rng.negative_binomial(2, 0.3, k).astype(np.float32) + 1)
    counts = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(n_cells, size.n_genes))
    return counts, genes, cell_types


def write_corpus(out: Path, size: Size, counts: sp.csr_matrix, genes: list[str], cell_types: np.ndarray) -> int:
    """A corpus folder in the layout `processing.build_corpus` writes (train/validation, feature extractor, summary),
    tokenized with Geneformer-style dictionaries (pickled, as Geneformer ships them) so that the random encoder
    stands for a pretrained Geneformer, as in paper.yaml. Returns the gene vocabulary size."""
    import pickle

    from datasets import Dataset, DatasetDict

    from modeling_cell2text import Cell2TextFeatureExtractor, CellDescription, render_description
    from modeling_cell2text.feature_extraction_cell2text import SPECIAL_TOKENS

    csc = counts.tocsc()
    medians = {g: float(np.median(csc.data[csc.indptr[j]:csc.indptr[j + 1]])) if csc.indptr[j + 1] > csc.indptr[j]
               else 1.0 for j, g in enumerate(genes)}
    token_ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)} | {
        g: i + len(SPECIAL_TOKENS) for i, g in enumerate(genes)}
    dictionaries = out.parent / "geneformer_dictionaries"
    dictionaries.mkdir(parents=True, exist_ok=True)
    for name, value in (("token_dictionary.pkl", token_ids), ("gene_median_dictionary.pkl", medians)):
        (dictionaries / name).write_bytes(pickle.dumps(value))
    extractor = Cell2TextFeatureExtractor.from_geneformer_dictionaries(
        str(dictionaries / "token_dictionary.pkl"), str(dictionaries / "gene_median_dictionary.pkl"),
        model_input_size=size.model_input_size, gene_symbols={}, symbol_to_gene={})
    tokens = extractor.tokenize(counts, genes).to_list()
    rng = np.random.default_rng(1)
    rows = []
    for i, (t, cell_tokens) in enumerate(zip(cell_types, tokens)):
        term, label, definition = CELL_TYPES[t]
        tissue, disease = TISSUES[i % len(TISSUES)], DISEASES[(i // 3) % len(DISEASES)]
        pathways = tuple(rng.choice(PATHWAYS, 2, replace=False))
        description = render_description(CellDescription(
            cell_type=label, cell_type_definition=definition, tissue=tissue[1], disease=disease[1],
            sex=("female", "male")[i % 2], age_group=AGE_GROUPS[i % len(AGE_GROUPS)], pathways=pathways))
        rows.append({"cell_id": f"cell_{i}", "gene_input_ids": [int(x) for x in cell_tokens],
                     "description": description, "cell_type": label, "cell_type_ontology_term_id": term,
                     "pathways": list(pathways), "age_group": AGE_GROUPS[i % len(AGE_GROUPS)]})
    n_validation = max(8, len(rows) // 8)
    DatasetDict(train=Dataset.from_list(rows[n_validation:]),
                validation=Dataset.from_list(rows[:n_validation])).save_to_disk(str(out))
    extractor.save_pretrained(str(out / "feature_extractor"))
    ontology_ids = {"cell_type": {label: term for term, label, _ in CELL_TYPES},
                    "tissue": {label: term for term, label in TISSUES},
                    "disease": {label: term for term, label in DISEASES}}
    (out / "summary.json").write_text(json.dumps({"name": "synthetic census-like", "ontology_term_ids": ontology_ids}))
    return extractor.vocab_size


def load_tokenizer(path: Path | None, corpus: Path):
    """The given tokenizer (e.g. SmolLM2's: a real vocabulary and chat template), else a small BPE trained here."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path is not None:
        return AutoTokenizer.from_pretrained(str(path))
    from datasets import load_from_disk
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(load_from_disk(str(corpus))["train"]["description"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return tokenizer


def make_parts(out: Path, size: Size, gene_vocab_size: int, tokenizer, device: str, dtype: torch.dtype,
               lm_vocab_size: int | None = None) -> tuple:
    """Random-weight encoder and LM saved like real checkpoints; returns (encoder_dir, lm_dir).

    The LM's vocabulary is the tokenizer's unless ``lm_vocab_size`` (at least as large) is given."""
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    encoder_dir, lm_dir = out / "encoder", out / "lm"
    encoder_config = BertConfig(vocab_size=gene_vocab_size, hidden_act="relu", pad_token_id=0, **size.encoder)
    with torch.device(device):
        encoder = BertForMaskedLM(encoder_config).to(dtype)
    encoder.save_pretrained(encoder_dir)
    del encoder
    if lm_vocab_size is not None and lm_vocab_size < len(tokenizer):
        raise ValueError(f"--lm-vocab-size {lm_vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens.")
    lm_config = LlamaConfig(vocab_size=lm_vocab_size or len(tokenizer), tie_word_embeddings=True,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **size.lm)
    with torch.device(device):
        lm = LlamaForCausalLM(lm_config).to(dtype)
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    del lm
    return encoder_dir, lm_dir


# ---------------------------------------------------------------------------------------------- training


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def gpu_gib() -> float:
    """The GPU's memory (GiB)."""
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def reset_memory(device: str) -> None:
    if device == "cuda":  # frees the GPU memory of the models just deleted (reference cycles included)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_setting(name: str, config: str, overrides: list[str], size: Size, corpus: Path, encoder_dir: Path,
                  lm_dir: Path, work: Path, device: str) -> dict:
    """Train `timed_steps + 1` optimizer steps with the recipe's trainer; the first step is not timed."""
    from peft import LoraConfig
    from transformers import TrainerCallback

    from training import sft
    from training.collator import Cell2TextDataCollator

    class CountingTrainer(sft.Cell2TextSFTTrainer):
        """The recipe's trainer, counting the tokens (prompt, cell tokens, description) it trains on."""

        tokens = 0

        def training_step(self, model, inputs, *args, **kwargs):
            # summed on the batch's device (accelerate has put it on the GPU): read at a step's end, after its sync
            CountingTrainer.tokens = CountingTrainer.tokens + inputs["attention_mask"].sum()
            return super().training_step(model, inputs, *args, **kwargs)

    class StepTimer(TrainerCallback):
        """Wall time between the ends of consecutive optimizer steps (data loading and collation included)."""

        def __init__(self):
            self.ends: list[float] = []
            self.tokens: list[int] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.ends.append(time.perf_counter())
            self.tokens.append(int(CountingTrainer.tokens))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    device_args = [] if device == "cuda" else ["--use_cpu", "true", "--bf16", "false", "--dataloader_num_workers", "0"]
    cell2text_args, training_args = sft.make_parser().parse_args_and_config([
        "--config", str(CONFIGS / config), "--corpus_dir", str(corpus), "--text_model_name_or_path", str(lm_dir),
        "--gene_encoder_name_or_path", str(encoder_dir), "--output_dir", str(work / "sft"),
        "--num_cell_tokens", str(size.num_cell_tokens), "--projector_hidden_size", str(size.projector_hidden_size),
        "--max_steps", str(size.timed_steps + 1), "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--logging_steps", "1", "--report_to", "none",
        "--disable_tqdm", "true", *overrides, *device_args,
    ])
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {"skip_prepare_dataset": True}
    reset_memory(device)
    corpus_splits, summary = sft.load_corpus(corpus, cell2text_args)
    processor = sft.build_processor(cell2text_args, corpus, summary)
    model = sft.build_model(cell2text_args, str(encoder_dir), processor)
    lora = LoraConfig(r=cell2text_args.lora_r, lora_alpha=cell2text_args.lora_alpha,
                      lora_dropout=cell2text_args.lora_dropout, target_modules=sft.language_model_lora_targets(model),
                      modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    CountingTrainer.tokens = 0
    timer = StepTimer()
    collator = Cell2TextDataCollator(processor)
    trainer = CountingTrainer(
        model=model, args=training_args, data_collator=collator, train_dataset=corpus_splits["train"],
        processing_class=processor, peft_config=lora, callbacks=[timer],
        projector_learning_rate=cell2text_args.projector_learning_rate,
        gene_encoder_learning_rate=cell2text_args.gene_encoder_learning_rate,
    )
    trainer.train()
    peak = peak_gib(device)
    cells_per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    steps = np.diff(timer.ends)
    tokens = np.diff(timer.tokens)
    # The collator runs in the dataloader's workers where there are any (paper.yaml: 4), off the critical path; its
    # share is timed here in this process, for one step's micro-batches, as if it ran on the critical path.
    micro = training_args.per_device_train_batch_size
    start = time.perf_counter()
    for first in range(0, cells_per_step, micro):
        collator([corpus_splits["train"][i] for i in range(first, first + micro)])
    collate_seconds = time.perf_counter() - start
    s_per_step = statistics.median(steps)
    result = {
        "setting": name, "micro_batch": training_args.per_device_train_batch_size,
        "accumulation": training_args.gradient_accumulation_steps,
        "checkpointing": bool(training_args.activation_checkpointing), "cells_per_step": cells_per_step,
        "s_per_step": s_per_step, "cells_per_s": cells_per_step / s_per_step,
        "tokens_per_s": float(tokens.sum() / steps.sum()), "peak_gib": peak,
        "collator_share": collate_seconds / s_per_step, "dataloader_workers": training_args.dataloader_num_workers,
        "losses": timer.losses,
    }
    trainer.accelerator.free_memory()
    del trainer, model
    reset_memory(device)
    return result


# -------------------------------------------------------------------------------------------- generation


def generation_modes(size: Size, device: str) -> list[tuple[str, dict]]:
    """(name, pipeline keywords) of the describe modes timed: free generation with each cache, and the
    schema-constrained decoder (the pipeline's default wherever the processor knows labels)."""
    modes = {"dynamic": {"constrained": False},
             "static": {"constrained": False, "cache_implementation": "static", "disable_compile": True},
             "static, compiled": {"constrained": False, "cache_implementation": "static", "disable_compile": False},
             "former constrained describe": {"constrained": False},
             "schema-constrained": {"constrained": True},
             "schema-constrained, padded rows": {"constrained": True}}
    chosen = [(name, modes[name]) for name in size.generation_modes]
    if device != "cuda":  # transformers compiles static-cache decoding on GPUs only
        chosen = [(name, kwargs) for name, kwargs in chosen if name != "static, compiled"]
    return chosen


FORMER = "former constrained describe"


def former_describe(describe, cells: sp.csr_matrix, genes: list[str], new_tokens: int) -> list[str]:
    """The describe path the schema decoder replaced (issue 18's baseline): every known cell-type label scored
    (`former_describe.py`), the best one's sentence written, the rest generated freely (`new_tokens`)."""
    from benchmarks.former_describe import generate_with_cell_type

    tokenized = describe.processor.feature_extractor.tokenize(cells, genes)
    inputs = {name: value.to(describe.model.device) for name, value in describe.preprocess(tokenized).items()}
    return generate_with_cell_type(describe.model, describe.processor, inputs, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False)


@contextmanager
def padded_rows(padded: bool):
    """The schema decoder runs its steps on padded rows (and splits long writes at this CPU's pass cost) instead of
    packing each step's real tokens into one row: what packing gains on a GPU is what the two modes measure."""
    from modeling_cell2text import schema_decoding

    saved = schema_decoding.PACK_TOKENS
    schema_decoding.PACK_TOKENS = saved and not padded
    try:
        yield
    finally:
        schema_decoding.PACK_TOKENS = saved


def measure_generation(size: Size, corpus: Path, encoder_dir: Path, lm_dir: Path, counts: sp.csr_matrix,
                       genes: list[str], device: str, dtype: torch.dtype, deadline: float,
                       on_result: Callable[[dict], None]) -> None:
    """cells/s of `pipeline("cell-to-text")` at one batch of `generation_batch` cells, per cache mode; each mode's
    figures go to `on_result` as soon as they are measured."""
    from transformers import AutoTokenizer, pipeline

    from modeling_cell2text import Cell2TextFeatureExtractor, Cell2TextForConditionalGeneration, Cell2TextPipeline
    from modeling_cell2text import Cell2TextProcessor

    reset_memory(device)
    extractor = Cell2TextFeatureExtractor.from_pretrained(str(corpus / "feature_extractor"))
    from datasets import load_from_disk

    from processing.corpus import description_vocabulary

    summary = json.loads((corpus / "summary.json").read_text())
    processor = Cell2TextProcessor(extractor, AutoTokenizer.from_pretrained(str(lm_dir)),
                                   num_cell_tokens=size.num_cell_tokens,
                                   ontology_term_ids=summary["ontology_term_ids"],
                                   **description_vocabulary(load_from_disk(str(corpus))["train"]))
    model = Cell2TextForConditionalGeneration.from_pretrained_parts(
        str(encoder_dir), str(lm_dir), cell_token_id=processor.cell_token_id, feature_extractor=extractor,
        num_cell_tokens=size.num_cell_tokens, projector_hidden_size=size.projector_hidden_size,
    ).to(device=device, dtype=dtype).eval()
    describe = pipeline("cell-to-text", model=model, processor=processor, pipeline_class=Cell2TextPipeline,
                        device=device)
    n = size.generation_batch
    cells = counts[:n]
    for name, kwargs in generation_modes(size, device):
        if time.perf_counter() > deadline:
            log(f"generation {name}: skipped (past --time-budget)")
            continue
        call = dict(batch_size=n, **kwargs)
        if not kwargs.get("constrained"):  # free text: a fixed number of new tokens a cell
            call.update(max_new_tokens=size.new_tokens, min_new_tokens=size.new_tokens)
        reset_memory(device)
        run = (lambda: former_describe(describe, cells, genes, size.new_tokens)) if name == FORMER else \
            (lambda: describe(cells, genes, **call))
        try:
            with padded_rows(name.endswith("padded rows")):
                start = time.perf_counter()
                run()  # warm-up: the same shapes as the timed call (compiles where it applies)
                sync(device)
                warm = time.perf_counter() - start
                start = time.perf_counter()
                out = run()
                sync(device)
                seconds = time.perf_counter() - start
        except torch.cuda.OutOfMemoryError:  # the next modes still run
            log(f"generation {name}: out of GPU memory at batch {n}")
            on_result({"mode": name, "batch": n, "error": "out of GPU memory"})
            reset_memory(device)
            continue
        # the schema decoder's model calls for the (one) batch: what bounds it on a GPU, where a call's cost is flat
        calls = describe.schema_decoder().calls if kwargs.get("constrained") else None
        on_result({"mode": name, "batch": n, "cells_per_s": n / seconds,
                   "new_tokens_per_s": n * size.new_tokens / seconds, "peak_gib": peak_gib(device),
                   "warmup_s": warm, "described": sum(r is not None for r in out), "model_calls": calls,
                   "started_at": time.strftime("%H:%M:%S", time.localtime(time.time() - seconds))})
        log(f"generation {name:>16}, batch {n}: {n / seconds:7.1f} cells/s, "
            f"{n * size.new_tokens / seconds:8.0f} new tokens/s, peak {peak_gib(device):5.1f} GiB, "
            f"warm-up {warm:5.1f} s" + (f", {calls} model calls" if calls is not None else ""))
    del describe, model
    reset_memory(device)


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("paper", "smoke"), default="paper")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU: the same code path in seconds, to prove the script")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder with a chat template (e.g. SmolLM2's); default: a small BPE trained "
                             "on the corpus descriptions (its token counts are not a real LLM's)")
    parser.add_argument("--lm-vocab-size", type=int, default=None,
                        help="the LM's vocabulary (default: the tokenizer's, 49,152 for SmolLM2's, as in the "
                             "2026-11-29 measurements; Llama-3.2 has 128,256)")
    parser.add_argument("--cells", type=int, default=None,
                        help="synthetic cells, train + validation (default 320; 48 in a dry run)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds from the start; stages that would start later are skipped (default 420: "
                             "the paper size's training took about 200 s on an H200, its generation modes about "
                             "100 s and the compiled one its 35 s compile more)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--work-dir", type=Path, default=None, help="where parts and corpus go (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the measurements; returns the figures (also written to --json)."""
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        log("benchmarks/gpu.py: skipped, no CUDA GPU here (python benchmarks/gpu.py --dry-run runs the same code "
            "path with tiny shapes on the CPU).")
        return {"skipped": "no CUDA GPU"}
    threads = torch.get_num_threads()
    if args.dry_run:  # tiny tensors: one thread is fastest, and spares a busy CPU
        torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    deadline = started + args.time_budget
    size = SIZES["tiny" if args.dry_run else args.size]
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    n_cells = max(args.cells or (48 if args.dry_run else 320), size.generation_batch)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        log(f"{props.name}, {gpu_gib():.0f} GiB; torch {torch.__version__}")
    figures: dict = {"size": "tiny (dry run)" if args.dry_run else args.size, "training": [], "generation": []}

    def save() -> None:  # after every measurement, so a later failure loses nothing measured
        figures["seconds"] = time.perf_counter() - started
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        counts, genes, cell_types = synthetic_counts(size, n_cells)
        gene_vocab = write_corpus(work / "corpus", size, counts, genes, cell_types)
        tokenizer = load_tokenizer(args.tokenizer, work / "corpus")
        encoder_dir, lm_dir = make_parts(work / "parts", size, gene_vocab, tokenizer, device, dtype,
                                         args.lm_vocab_size)
        log(f"corpus ({n_cells} cells, {counts.nnz / n_cells:.0f} genes a cell) and parts ready in "
            f"{time.perf_counter() - started:.0f} s")
        if not args.skip_training:
            for name, config, overrides in size.settings:
                if time.perf_counter() > deadline:
                    log(f"train {name}: skipped (past --time-budget)")
                    continue
                if device == "cuda" and gpu_gib() < SETTING_MIN_GIB.get(name, 0):
                    log(f"train {name}: skipped (needs {SETTING_MIN_GIB[name]} GiB of GPU memory; "
                        f"this GPU has {gpu_gib():.0f})")
                    continue
                try:
                    r = train_setting(name, config, overrides, size, work / "corpus", encoder_dir, lm_dir, work,
                                      device)
                except torch.cuda.OutOfMemoryError:  # the other settings and the generation modes still run
                    log(f"train {name}: out of GPU memory")
                    figures["training"].append({"setting": name, "error": "out of GPU memory"})
                    reset_memory(device)
                    continue
                figures["training"].append(r)
                save()
                base = next(t["cells_per_s"] for t in figures["training"] if "cells_per_s" in t)
                log(f"train {name:>46}: {r['s_per_step']:6.2f} s/step, {r['cells_per_s']:6.1f} cells/s "
                    f"({r['cells_per_s'] / base:.2f}x), {r['tokens_per_s']:7.0f} tokens/s, peak {r['peak_gib']:5.1f}"
                    f" GiB, collator {r['collator_share']:.1%} of a step ({r['dataloader_workers']} workers), loss "
                    f"{r['losses'][0] if r['losses'] else float('nan'):.3f} -> "
                    f"{r['losses'][-1] if r['losses'] else float('nan'):.3f}")
        if not args.skip_generation:
            def add_generation(result: dict) -> None:
                figures["generation"].append(result)
                save()

            measure_generation(size, work / "corpus", encoder_dir, lm_dir, counts, genes, device, dtype, deadline,
                               add_generation)
    save()
    log(f"done in {figures['seconds']:.0f} s")
    return figures


if __name__ == "__main__":
    main()
