"""Tiny random parts for tests: a BERT gene encoder, a Llama-architecture LM and a byte-level BPE tokenizer.

Everything is built offline in seconds; the saved folders have the same layout as real checkpoints (a Geneformer
`BertForMaskedLM` folder and a causal-LM folder with its tokenizer and chat template).
"""

from __future__ import annotations

import importlib.util
import logging
import runpy
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
REPO = Path(__file__).resolve().parents[1]
_TRAINING_TEXT = [
    "This sample consists of a B cell. Cell Ontology definition: A lymphocyte of B lineage.",
    "It originates from the blood of a healthy female donor during adulthood.",
    'This cell is associated with the pathway "Cytoplasmic Ribosomal Proteins WP477".',
    'Additionally, it involves the pathway "Glycolysis and Gluconeogenesis WP534".',
    "You are an expert in single-cell biology. Gene expression embeddings: system user assistant",
    "monocyte dendritic natural killer T cell regulatory progenitor hematopoietic CD14-positive",
]


def rewrite_weights(path: str | Path, tensors: dict) -> None:
    """Write `tensors` over the safetensors file `path`, keeping its header metadata (the `weights_id` of the save
    that wrote it): the weights of that save, edited (without it, loading refuses them as another save's)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as weights:
        metadata = weights.metadata()
    save_file(tensors, path, metadata=metadata)


def make_tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML specials and a chat template, trained on a few sentences."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_bert_config(vocab_size: int = 64) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        hidden_act="relu",
        pad_token_id=0,
    )


def tiny_llama_config(vocab_size: int, initializer_range: float = 0.02) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )


def save_tiny_parts(root: Path, gene_vocab_size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Save a tiny Geneformer-layout encoder and a tiny causal LM with tokenizer; returns (encoder_dir, lm_dir)."""
    torch.manual_seed(seed)
    encoder_dir, lm_dir = Path(root) / "encoder", Path(root) / "lm"
    BertForMaskedLM(tiny_bert_config(gene_vocab_size)).save_pretrained(encoder_dir)
    tokenizer = make_tiny_tokenizer()
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    return encoder_dir, lm_dir


def save_tiny_corpus(root: Path, n_train: int = 32, seed: int = 0, expression_bins: int = 0) -> Path:
    """A small corpus folder in the layout `processing.build_corpus` writes: two separable cell types.

    With `expression_bins` > 0 it is value-aware: a gene_value_ids column and a feature extractor with those bins.

    Used where a test needs a corpus but is not about building one (training, evaluation); the corpus builder has
    its own tests on real data.
    """
    import json

    import numpy as np
    from datasets import Dataset, DatasetDict

    from modeling_cell2text import Cell2TextFeatureExtractor, CellDescription, render_description

    rng = np.random.default_rng(seed)
    genes = [f"ENSG{i:011d}" for i in range(1, 61)]
    feature_extractor = Cell2TextFeatureExtractor.from_gene_medians(
        {g: 1.0 for g in genes}, num_expression_bins=expression_bins
    )
    types = {"B cell": ("CL:0000236", 4), "T cell": ("CL:0000084", 34)}

    def split(n: int, name: str) -> Dataset:
        rows = []
        for i in range(n):
            cell_type = list(types)[i % 2]
            first = types[cell_type][1]
            genes_expressed = rng.permutation(np.arange(first, first + 26))[: rng.integers(6, 20)]
            description = render_description(CellDescription(cell_type=cell_type, tissue="blood", disease="normal"))
            extra = {}
            if expression_bins:
                bins = rng.integers(1, expression_bins + 1, size=len(genes_expressed))
                extra["gene_value_ids"] = [0, *map(int, bins), 0]
            rows.append({
                **extra,
                "cell_id": f"{name}-{i}", "gene_input_ids": [2, *map(int, genes_expressed), 3],
                "description": description, "cell_type": cell_type,
                "cell_type_ontology_term_id": types[cell_type][0], "tissue": "blood",
                "tissue_ontology_term_id": "UBERON:0000178", "disease": "normal",
                "disease_ontology_term_id": "PATO:0000461", "pathways": [],
            })
        return Dataset.from_list(rows)

    out = Path(root)
    corpus = DatasetDict(train=split(n_train, "train"), validation=split(8, "validation"), test=split(8, "test"))
    corpus.save_to_disk(out)
    feature_extractor.save_pretrained(out / "feature_extractor")
    ontology_ids = {
        "cell_type": {label: term for label, (term, _) in types.items()},
        "tissue": {"blood": "UBERON:0000178"},
        "disease": {"normal": "PATO:0000461"},
    }
    (out / "summary.json").write_text(json.dumps({"name": "tiny", "ontology_term_ids": ontology_ids}))
    return out


def save_tiny_model(model_dir: Path, corpus_dir: Path, **config) -> Path:
    """A tiny random Cell2Text model folder (8 cell tokens) with a processor for the corpus at `corpus_dir` (its
    feature extractor and label -> term table); `config`: further Cell2TextConfig attributes, e.g. the
    training_corpus_fingerprints training.sft records."""
    import json

    from modeling_cell2text import (Cell2TextConfig, Cell2TextFeatureExtractor, Cell2TextForConditionalGeneration,
                                    Cell2TextProcessor)

    ontology_ids = json.loads((Path(corpus_dir) / "summary.json").read_text())["ontology_term_ids"]
    feature_extractor = Cell2TextFeatureExtractor.from_pretrained(Path(corpus_dir) / "feature_extractor")
    processor = Cell2TextProcessor(feature_extractor, make_tiny_tokenizer(), num_cell_tokens=8,
                                   system_prompt="Describe the cell.", user_prompt="Cell: ",
                                   ontology_term_ids=ontology_ids)
    torch.manual_seed(0)
    model_config = Cell2TextConfig(
        gene_encoder_config=tiny_bert_config(feature_extractor.vocab_size),
        text_config=tiny_llama_config(len(processor.tokenizer), initializer_range=0.5),
        cell_token_id=processor.cell_token_id, num_cell_tokens=8, projector_hidden_size=16, **config,
    )
    Cell2TextForConditionalGeneration(model_config).eval().save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return Path(model_dir)


def encoder_for_vocabulary(encoder_dir: Path, feature_extractor, out_dir: Path) -> Path:
    """A copy of the tiny random encoder recorded as built for this gene vocabulary (as a corpus-prepared one is)."""
    from transformers import AutoModel

    from training.gene_encoder import record_preparation

    encoder = AutoModel.from_pretrained(encoder_dir, add_pooling_layer=False)
    record_preparation(encoder.config, feature_extractor, feature_layer=None)
    encoder.save_pretrained(out_dir)
    return out_dir


def edit_json(path: Path, edit) -> None:
    """Rewrite the JSON file `path` with `edit` (a function changing the loaded object in place): a saved config made
    malformed, for the tests of its refusal."""
    import json

    loaded = json.loads(Path(path).read_text())
    edit(loaded)
    Path(path).write_text(json.dumps(loaded))


def load_benchmark(name: str, monkeypatch=None) -> ModuleType:
    """`benchmarks/<name>.py` as a module (benchmarks/ is no package), registered in sys.modules for the test where
    `monkeypatch` is given (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def run_as_command(argv: list[str], cwd: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """`python *argv` (a script's path or `-m module`, then its arguments) in this process, for the tests of a
    command's refusals and options: a process would add ~6 s of imports and check nothing more. It runs as the
    interpreter runs it (as `__main__`, with its sys.argv, in `cwd`) and ends as it ends (SystemExit's code as the
    status, its message or an uncaught exception's traceback on stderr, status 1). Its root logger starts without
    handlers, as in a process (pytest's made the commands' `logging.basicConfig` a no-op: their logs, tracebacks
    included, were not on stderr); the root's handlers and the levels the loggers had are restored after it
    (processing.build_corpus set modeling_cell2text's for the session).
    Keep a process where the test is about one (a fresh import, several processes, remote code)."""
    module = argv[1] if argv[0] == "-m" else None
    capsys.readouterr()  # this run's output only
    root_level, root_handlers = logging.root.level, list(logging.root.handlers)
    # a placeholder (a package's logger no module asked for by name, as modeling_cell2text's) counts as NOTSET
    levels = {name: getattr(logger, "level", logging.NOTSET)
              for name, logger in logging.root.manager.loggerDict.items()}
    logging.root.handlers[:] = []
    with monkeypatch.context() as patch, warnings.catch_warnings():
        # runpy's note that the module was imported before (by another test): it runs afresh as __main__ all the same
        warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
        patch.chdir(cwd)
        patch.setattr(sys, "argv", [module or argv[0], *argv[2 if module else 1:]])
        patch.setattr(sys, "path", list(sys.path))  # the examples put the checkout first
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv[0], run_name="__main__")
            status = 0
        except SystemExit as exit_:
            status = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
            if not isinstance(exit_.code, (int, type(None))):
                print(exit_.code, file=sys.stderr)
        except Exception:  # noqa: BLE001 - what the interpreter prints for an uncaught exception
            traceback.print_exc(file=sys.stderr)
            status = 1
        finally:
            logging.root.handlers[:] = root_handlers
            logging.root.setLevel(root_level)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([sys.executable, *argv], status, out, err)
