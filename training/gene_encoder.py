"""A gene encoder prepared on the corpus, for when no pretrained Geneformer is at hand.

Cell2Text reads gene-level hidden states of a pretrained Geneformer. Where none can be had (offline machines,
new vocabularies), this module gives the encoder a real starting point from the corpus itself:

1. Gene embeddings initialised from the training cells: a truncated SVD of the cells x genes matrix of rank
   weights (1 / log2(rank + 2), Geneformer's rank order) places genes that rank high in the same cells close
   together.
2. Each candidate encoder (a number of BERT layers, and its input: Geneformer's rank-value tokens, or value-aware
   tokens that add each gene's per-cell expression bin as the BERT token type) is trained on the training split to
   predict the cell type from the mean of the gene states that will feed the projector (the first
   `num_cell_tokens` genes at the last layer), and the validation split (never the test split) picks one by the
   one-standard-error rule (`select_candidate`): the first candidate (in the configured order, simplest first)
   whose validation accuracy is within one binomial standard error of the best. Differences smaller than what
   the validation cells can resolve (floating-point noise between machines moves a 70-cell accuracy by a cell or
   two) do not change the choice.

The result is saved in Geneformer's layout (`config.json` + safetensors of a `BertModel`), so
`Cell2TextForConditionalGeneration.from_pretrained_parts` loads it like a real Geneformer checkpoint. Its config
records what it was prepared with (`PREPARED_ENCODER_KEY`): the gene vocabulary's checksum and source, the corpus
fingerprints, its input, and the hidden state the probe read (the last layer, `FEATURE_LAYER`), which is the one a
composed model feeds its projector.

Preparation is seeded: the same seed and corpus on the same machine give the same encoder.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file
from scipy.sparse.linalg import svds
from torch import nn
from tqdm.auto import tqdm
from transformers import BertConfig, BertModel

from modeling_cell2text.modeling_cell2text import PREPARED_ENCODER_KEY, gene_vocabulary_sha256
from processing.corpus import split_value_lists

logger = logging.getLogger(__name__)

# The hidden state the probe reads and the projector must read: the encoder's last layer.
FEATURE_LAYER = -1
# The prepared encoder's folder under the recipe's output_dir, the record of its selection inside it, and the
# chosen probe's linear head (a cell-type classifier on the same encoder: the head baseline of the evaluation).
PREPARED_ENCODER_DIR = "gene_encoder"
SELECTION_FILE = "encoder_selection.json"
SELECTION_RULE = "one standard error: the first candidate within one binomial standard error of the best"
PROBE_HEAD_FILE = "cell_type_head.safetensors"


def select_candidate(accuracies: Sequence[float], num_cells: int) -> int:
    """The one-standard-error rule: the first candidate whose accuracy is at least the best's minus one binomial
    standard error of the best on `num_cells` validation cells (at least one cell's worth).

    Candidates come simplest (or preferred) first, so a later one replaces an earlier only when validation can tell
    them apart. 70 cells at 0.87 give a standard error of 0.040, about 3 cells."""
    if not accuracies or num_cells < 1:
        raise ValueError("select_candidate needs at least one accuracy and one validation cell.")
    best = max(accuracies)
    margin = max(math.sqrt(best * (1.0 - best) / num_cells), 1.0 / num_cells)
    # A small tolerance, so an accuracy exactly one margin below the best (k cells of n) is not lost to rounding.
    return next(i for i, a in enumerate(accuracies) if a >= best - margin - 1e-12)


@dataclass
class EncoderCandidate:
    """One encoder to try; the validation split picks among them.

    `value_aware`: read each gene's expression bin too (the corpus's gene_value_ids, as token types).
    """

    num_hidden_layers: int
    hidden_size: int = 128
    num_attention_heads: int = 4
    intermediate_size: int = 256
    value_aware: bool = False


@dataclass
class EncoderSelection:
    """What was tried and what validation chose; `num_expression_bins` is the chosen encoder's input (0: rank)."""

    candidates: list[dict]
    validation_accuracy: list[float]
    best: int
    path: str
    num_expression_bins: int = 0
    prepared_for: dict | None = None  # corpus fingerprints and settings, so a stale encoder is never reused
    feature_layer: int = FEATURE_LAYER  # the hidden state the probe read
    labels: list[str] | None = None  # the probe head's classes, in its output order
    num_cell_tokens: int | None = None  # the gene states the probe pooled
    selection_rule: str | None = None

    @classmethod
    def load(cls, encoder_dir: str | Path) -> "EncoderSelection | None":
        """The selection saved in `encoder_dir`, or None where no encoder was prepared there."""
        path = Path(encoder_dir) / SELECTION_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None


def record_preparation(
    encoder_config: BertConfig,
    feature_extractor,
    *,
    num_expression_bins: int = 0,
    corpus_fingerprints: dict | None = None,
    feature_layer: int | None = FEATURE_LAYER,
) -> None:
    """Record in an encoder's config the gene vocabulary it was built for, its input and the layer to read.

    `Cell2TextForConditionalGeneration.from_pretrained_parts` checks a feature extractor against this record and
    reads the encoder at `feature_layer` (None: no layer was trained for; the model's `gene_encoder_layer` applies).
    """
    setattr(encoder_config, PREPARED_ENCODER_KEY, {
        "gene_vocabulary_sha256": gene_vocabulary_sha256(feature_extractor.gene_token_ids),
        "vocabulary_source": getattr(feature_extractor, "vocabulary_source", None) or {"kind": "unknown"},
        "corpus_fingerprints": corpus_fingerprints,
        "feature_layer": feature_layer,
        "num_expression_bins": num_expression_bins,
    })


def rank_weight_matrix(token_lists: Sequence[Sequence[int]], vocab_size: int, special_ids: Sequence[int]) -> sp.csr_matrix:
    """Cells x vocabulary matrix with weight 1 / log2(rank + 2) for each expressed gene (rank 0 = top)."""
    special = set(int(t) for t in special_ids)
    rows, cols, vals = [], [], []
    for row, tokens in enumerate(token_lists):
        genes = [int(t) for t in tokens if int(t) not in special]
        rows.extend([row] * len(genes))
        cols.extend(genes)
        vals.extend(1.0 / np.log2(np.arange(len(genes)) + 2.0))
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(token_lists), vocab_size), dtype=np.float32)


def svd_gene_embeddings(matrix: sp.csr_matrix, dim: int, seed: int = 0) -> np.ndarray:
    """Gene embeddings (vocab x dim) from a truncated SVD of the cells x genes matrix, scaled to unit std.

    Genes never seen in the matrix get small random vectors; dimensions beyond the matrix rank are random too.
    """
    rng = np.random.default_rng(seed)
    k = min(dim, min(matrix.shape) - 1)
    # Uncentred, so the matrix stays sparse at any corpus size; the first component carries the mean profile.
    _, singular_values, vt = svds(matrix.astype(np.float64), k=k, random_state=seed)
    embeddings = rng.normal(0.0, 0.02, size=(matrix.shape[1], dim)).astype(np.float32)
    loadings = (vt.T * np.sqrt(singular_values)).astype(np.float32)
    seen = np.asarray(matrix.getnnz(axis=0) > 0)
    loadings /= loadings[seen].std(axis=0, keepdims=True) + 1e-8
    embeddings[seen, :k] = loadings[seen]
    return embeddings


class _CellTypeProbe(nn.Module):
    """BERT encoder + linear head on the mean of the first `num_cell_tokens` gene states (what the projector sees)."""

    def __init__(self, config: BertConfig, num_labels: int, num_cell_tokens: int):
        super().__init__()
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(config.hidden_size, num_labels)
        self.num_cell_tokens = num_cell_tokens

    def forward(self, input_ids, attention_mask, gene_token_mask, token_type_ids=None):
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            output_hidden_states=True,
        ).hidden_states[FEATURE_LAYER]
        is_gene = gene_token_mask.bool()
        selected = (is_gene & (torch.cumsum(is_gene.long(), dim=1) <= self.num_cell_tokens)).unsqueeze(-1)
        pooled = (hidden * selected).sum(1) / selected.sum(1).clamp(min=1)
        return self.head(pooled)


@dataclass
class _Cells:
    """Tokenized cells of one split (with their expression bins for value-aware candidates) and labels."""

    tokens: list
    bins: list | None
    labels: np.ndarray


def _batches(feature_extractor, cells: _Cells, batch_size, shuffle, rng, value_aware: bool):
    """Padded inputs + labels; bins become token types for value-aware candidates (all 0 otherwise)."""
    order = rng.permutation(len(cells.tokens)) if shuffle else np.arange(len(cells.tokens))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        bins = [cells.bins[i] for i in idx] if feature_extractor.num_expression_bins else None
        inputs = feature_extractor.pad([cells.tokens[i] for i in idx], bins, return_tensors="pt")
        value_ids = inputs.pop("gene_value_ids", None)
        inputs["token_type_ids"] = value_ids if value_aware else None
        yield inputs, torch.as_tensor(cells.labels[idx])


def _logits(probe, inputs):
    return probe(inputs["gene_input_ids"], inputs["gene_attention_mask"], inputs["gene_token_mask"],
                 inputs["token_type_ids"])


def train_candidate(
    candidate: EncoderCandidate,
    feature_extractor,
    gene_embeddings: np.ndarray,
    train: _Cells,
    validation: _Cells,
    num_labels: int,
    num_cell_tokens: int,
    epochs: int = 30,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[_CellTypeProbe, float]:
    """Train one candidate on the training cells; returns its probe (encoder + head) at the best validation epoch and
    that accuracy."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    max_len = max(len(t) for t in train.tokens + validation.tokens)
    bins = feature_extractor.num_expression_bins
    if candidate.value_aware and not bins:
        raise ValueError(
            "A value-aware encoder candidate needs a value-aware corpus: build it with --expression-bins B."
        )
    config = BertConfig(
        vocab_size=gene_embeddings.shape[0],
        hidden_size=candidate.hidden_size,
        num_hidden_layers=candidate.num_hidden_layers,
        num_attention_heads=candidate.num_attention_heads,
        intermediate_size=candidate.intermediate_size,
        max_position_embeddings=max(512, 2 ** math.ceil(math.log2(max_len))),
        hidden_act="relu",
        pad_token_id=feature_extractor.pad_token_id,
        type_vocab_size=bins + 1 if candidate.value_aware else 1,
        # No attention dropout: it forces PyTorch's slow "math" attention on CPU (measured 2x per step).
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.1,
    )
    probe = _CellTypeProbe(config, num_labels, num_cell_tokens)
    with torch.no_grad():
        probe.encoder.embeddings.word_embeddings.weight.copy_(torch.from_numpy(gene_embeddings))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=learning_rate, weight_decay=0.01)
    best_accuracy, best_state = -1.0, None
    for _ in tqdm(range(epochs), desc=f"encoder with {candidate.num_hidden_layers} layer(s)", leave=False):
        probe.train()
        for inputs, y in _batches(feature_extractor, train, batch_size, True, rng, candidate.value_aware):
            loss = nn.functional.cross_entropy(_logits(probe, inputs), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        accuracy = _accuracy(probe, feature_extractor, validation, batch_size, candidate.value_aware)
        if accuracy > best_accuracy:
            best_accuracy = accuracy
            best_state = {k: v.detach().clone() for k, v in probe.state_dict().items()}
    probe.load_state_dict(best_state)
    return probe, best_accuracy


@torch.no_grad()
def _accuracy(probe, feature_extractor, cells: _Cells, batch_size, value_aware: bool) -> float:
    probe.eval()
    correct = 0
    rng = np.random.default_rng(0)
    for inputs, y in _batches(feature_extractor, cells, batch_size, False, rng, value_aware):
        correct += int((_logits(probe, inputs).argmax(-1) == y).sum())
    return correct / max(len(cells.labels), 1)


def prepare_gene_encoder(
    corpus,
    feature_extractor,
    out_dir: str | Path,
    candidates: Sequence[EncoderCandidate],
    num_cell_tokens: int,
    label_column: str = "cell_type",
    epochs: int = 30,
    seed: int = 0,
    prepared_for: dict | None = None,
) -> EncoderSelection:
    """Initialise, train and select a gene encoder on the corpus (train picks weights, validation picks the shape)."""
    if "validation" not in corpus or len(corpus["validation"]) == 0:
        raise ValueError("Selecting a gene encoder needs a non-empty validation split in the corpus.")
    labels = sorted(set(corpus["train"][label_column]))
    index = {label: i for i, label in enumerate(labels)}

    def cells_of(split: str) -> _Cells:
        bins = split_value_lists(corpus[split], feature_extractor)
        return _Cells(
            tokens=[list(t) for t in corpus[split]["gene_input_ids"]],
            bins=None if bins is None else [list(b) for b in bins],
            # A validation label never seen in training cannot be predicted; it counts as wrong (-1 never matches).
            labels=np.array([index.get(x, -1) for x in corpus[split][label_column]]),
        )

    train, validation = cells_of("train"), cells_of("validation")
    special_ids, vocab_size = feature_extractor.special_token_ids, feature_extractor.vocab_size

    weights = rank_weight_matrix(train.tokens, vocab_size, special_ids)
    embeddings = {}  # hidden size -> the SVD's embeddings: one decomposition per size (minutes at Census scale)
    accuracies, probes = [], []
    for candidate in candidates:
        if candidate.hidden_size not in embeddings:
            embeddings[candidate.hidden_size] = svd_gene_embeddings(weights, candidate.hidden_size, seed=seed)
        probe, accuracy = train_candidate(
            candidate, feature_extractor, embeddings[candidate.hidden_size], train, validation,
            num_labels=len(labels), num_cell_tokens=num_cell_tokens, epochs=epochs, seed=seed,
        )
        logger.info("gene encoder %s: validation accuracy %.3f", asdict(candidate), accuracy)
        accuracies.append(accuracy)
        probes.append(probe)
    best = select_candidate(accuracies, len(validation.labels))
    out_dir = Path(out_dir)
    num_expression_bins = feature_extractor.num_expression_bins if candidates[best].value_aware else 0
    encoder = probes[best].encoder
    record_preparation(encoder.config, feature_extractor, num_expression_bins=num_expression_bins,
                       corpus_fingerprints=(prepared_for or {}).get("corpus_fingerprints"))
    encoder.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in probes[best].head.state_dict().items()}, out_dir / PROBE_HEAD_FILE)
    selection = EncoderSelection(
        candidates=[asdict(c) for c in candidates], validation_accuracy=accuracies, best=best, path=str(out_dir),
        num_expression_bins=num_expression_bins, prepared_for=prepared_for, labels=labels,
        num_cell_tokens=num_cell_tokens, selection_rule=SELECTION_RULE,
    )
    (out_dir / SELECTION_FILE).write_text(json.dumps(asdict(selection), indent=2))
    return selection


@torch.no_grad()
def probe_predictions(encoder_dir: str | Path, cells, feature_extractor, batch_size: int = 64) -> list[str]:
    """The cell type the prepared encoder's own probe (encoder + linear head, as chosen on validation) predicts for
    each of `cells` (a corpus split), in order: a discrete head on the same encoder Cell2Text reads."""
    encoder_dir = Path(encoder_dir)
    selection = EncoderSelection.load(encoder_dir)
    if selection is None or selection.labels is None or not (encoder_dir / PROBE_HEAD_FILE).exists():
        raise FileNotFoundError(f"{encoder_dir} holds no prepared encoder with its probe head; prepare it with this "
                                "version of training.gene_encoder (the recipe does so when no encoder is given).")
    encoder = BertModel.from_pretrained(encoder_dir, add_pooling_layer=False)
    probe = _CellTypeProbe(encoder.config, len(selection.labels), selection.num_cell_tokens)
    probe.encoder = encoder
    probe.head.load_state_dict(load_file(encoder_dir / PROBE_HEAD_FILE))
    probe.eval()
    bins = split_value_lists(cells, feature_extractor)
    tokens = [list(t) for t in cells["gene_input_ids"]]
    value_aware = selection.num_expression_bins > 0
    # Labels are not needed to predict; the batches carry placeholders.
    split = _Cells(tokens=tokens, bins=None if bins is None else [list(b) for b in bins],
                   labels=np.zeros(len(tokens), dtype=np.int64))
    predicted: list[str] = []
    for inputs, _ in _batches(feature_extractor, split, batch_size, False, np.random.default_rng(0), value_aware):
        predicted += [selection.labels[i] for i in _logits(probe, inputs).argmax(-1).tolist()]
    return predicted
