"""Cell2Text feature extractor: Geneformer's rank-value encoding of single-cell expression.

Per cell, every expressed gene of the vocabulary gets Geneformer's value
``count / n_counts * 10_000 / median``, with Geneformer's arithmetic: ``n_counts`` is the cell's total over all
input genes; ``count / n_counts`` and ``* 10_000`` are computed in the input's float precision (float32 for
float32 or float16 data, AnnData's usual; float64 for integer or float64 data, as numpy promotes them), and the
division by the float64 median (the gene's non-zero median of normalised counts in the pretraining corpus) and
the comparison are in float64. Genes are sorted by value, descending, mapped to token ids and truncated to the
model input size; Geneformer V2 adds ``<cls>`` first and ``<eos>`` last. Normalised input skips the first step;
log1p input is undone with float64 ``expm1``.

Documented choices (where Geneformer's own tokenizer is platform-dependent or silent):

* Exact ties (equal float64 values, common in count data) are broken by ascending token id, so the output is the
  same on every machine (Geneformer's unstable ``argsort`` orders ties differently across CPUs/builds). Outside
  exact ties the order is Geneformer's.
* Geneformer divides with numpy's true division (dense input; SciPy before its sparse/dense broadcasting rewrite).
  Recent SciPy computes ``sparse / dense`` as a multiplication by the reciprocal, which rounds differently in the
  last bit: on sparse input Geneformer's own output then depends on the SciPy version. We follow the divisions.
* Explicitly stored zeros are not expressed genes. Genes outside the vocabulary are dropped,
  but counted and reported; a cell without any expressed vocabulary gene is an error unless
  ``skip_empty_cells=True``.
* Values are checked before and after every conversion (see ``_check_values``): non-numeric, NaN, infinite or
  negative values, non-integer "counts", counts of 2**31 or more, "log1p" values above 20 or all integer (raw
  counts), "normalized" values that are raw counts or log1p-scaled, and any value that over- or underflows on the
  way are refused with the fix.

The ranking is vectorised over row chunks of a CSR matrix: each entry's value becomes a uint64 key (the float64
bits inverted, so ascending key = descending value, with the lowest bits replaced by the entry's index in its
row), keys are scattered into a padded 2-D array and sorted along rows (one C loop over rows); the low bits then
find each rank's token. Runs of keys equal above the low bits (exact ties, and values differing only in their last
bits) are put in exact-value, then ascending-token order with one 1-D sort over their entries.

Value-aware tokens (optional, ``num_expression_bins > 0``): beside its token, each gene gets an expression bin,
scGPT's per-cell value binning: with B bins and n expressed vocabulary genes in the cell, a gene whose expression
exceeds that of k of them gets bin ``1 + floor(B * k / n)`` (equal values share a bin; 0 marks special tokens and
padding). Quantiles within the cell make bins independent of sequencing depth and normalisation, and they carry
what rank order alone hides: a gene can rank high against its corpus median while being weakly expressed.

This file travels as remote code: it imports only numpy, scipy, torch (via transformers) and
transformers; anndata objects are recognised without importing anndata.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from transformers import BatchFeature, FeatureExtractionMixin

from .gene_ids import ensembl_gene_id, looks_ensembl, resolve_symbols

logger = logging.getLogger(__name__)

PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"
SPECIAL_TOKENS = (PAD, MASK, CLS, EOS)
INPUT_VALUES = ("counts", "normalized", "log1p")
ENSEMBL_VAR_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "ensembl_gene_id", "feature_id")
SYMBOL_VAR_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "symbol", "gene_name")
_PAD_BASE = np.uint64(0xFFF0 << 48)  # padding keys start here: above the key of any normal positive float64
_TINY = np.finfo(np.float64).tiny
_LOW_BITS = np.uint64(0xFFFFFFFF)
_EXAMPLES = 5
#: Token ids must lie in [0, MAX_VOCAB_SIZE): lookup arrays are sized by the largest id (Geneformer: ~20,000-25,000).
MAX_VOCAB_SIZE = 2**22
#: Geneformer's per-cell normalisation target (``count / n_counts * TARGET_SUM``).
TARGET_SUM = 10_000
#: The largest plausible log1p value: log1p of 10,000 (CP10k) is 9.2, of 10**6 (CPM) 13.8; expm1(20) is 4.9e8.
MAX_LOG1P = 20.0
#: Counts of one gene in one cell at or above this are not counts.
MAX_COUNT = 2**31


@dataclass
class RankedCells:
    """Ragged per-cell token ids: cell ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.

    ``cell_indices`` are the input rows these cells come from; ``skipped_cells`` the input rows
    dropped because no vocabulary gene is expressed (only with ``skip_empty_cells=True``).
    ``value_bins`` (value-aware extractors only) holds each token's expression bin, aligned with ``tokens``.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    cell_indices: np.ndarray
    skipped_cells: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    value_bins: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def bins_of(self, i: int) -> np.ndarray:
        """Expression bins of cell ``i`` (value-aware extractors only)."""
        if self.value_bins is None:
            raise ValueError("These cells have no expression bins: the feature extractor has num_expression_bins=0.")
        return self.value_bins[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """Number of tokens of each cell (special tokens included)."""
        return np.diff(self.offsets)

    def to_list(self) -> list[np.ndarray]:
        """Per-cell token arrays (views into ``tokens``)."""
        return list(self)


@dataclass
class _GeneMatch:
    """How the input genes map to the vocabulary: token id per input column (-1: unused)."""

    column_tokens: np.ndarray
    column_medians: np.ndarray
    n_input: int
    n_matched: int
    unmatched_examples: list[str]


# ----------------------------------------------------------------------------- restricted pickle


class _NumericDictUnpickler(pickle.Unpickler):
    """Unpickler for Geneformer's dictionaries: plain dicts of str -> int/float only.

    No class or function can be loaded, except numpy's numeric scalar reconstruction (a median
    dictionary written with numpy float values pickles them that way); those are restricted to
    numeric dtypes and checked again after loading.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _numeric_scalar
        if module == "numpy" and name == "dtype":
            return _numeric_dtype
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a Geneformer dictionary must hold only a plain dict of "
            "str -> int/float (no classes or functions)"
        )


def _numeric_dtype(spec: Any, *args: Any) -> np.dtype:
    """np.dtype restricted to integer/float dtypes (no object dtype, which could read pointers)."""
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"refusing numpy dtype spec {spec!r}")
    dtype = np.dtype(spec)
    if dtype.kind not in "iuf":
        raise pickle.UnpicklingError(f"refusing non-numeric numpy dtype {dtype}")
    return dtype


def _numeric_scalar(dtype: Any, data: Any) -> float | int:
    """Rebuild a numpy numeric scalar from its bytes, as a plain Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "iuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("refusing a numpy scalar that is not a plain number")
    if len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("malformed numpy scalar in pickle")
    return np.frombuffer(data, dtype=dtype)[0].item()


def load_numeric_dict(path: str, value_type: type) -> dict[str, Any]:
    """Load a pickled dict of str -> int (``value_type=int``) or str -> float safely."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        obj = _NumericDictUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: {error}") from error
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict of str -> {value_type.__name__}, got {type(obj).__name__}")
    allowed = (int,) if value_type is int else (int, float)
    for key, value in obj.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, allowed):
            raise ValueError(
                f"{path}: expected a dict of str -> {value_type.__name__}, found entry {key!r}: {value!r} "
                f"({type(key).__name__} -> {type(value).__name__})"
            )
    return {key: value_type(value) for key, value in obj.items()}


# ----------------------------------------------------------------------------- input handling


def _is_anndata(obj: Any) -> bool:
    anndata = sys.modules.get("anndata")
    return anndata is not None and isinstance(obj, anndata.AnnData)


def _string_columns(var: Any) -> list[str]:
    return [c for c in var.columns if var[c].dtype == object or str(var[c].dtype) in ("category", "string", "str")]


def _format_cells(indices: np.ndarray, obs_names: Sequence[str] | None, first_row: int = 0) -> str:
    rows = [first_row + i for i in np.asarray(indices)[:10].tolist()]
    shown = [f"{r} ({str(obs_names[r])!r})" if obs_names is not None else str(r) for r in rows]
    more = f" and {len(indices) - 10} more" if len(indices) > 10 else ""
    return ", ".join(shown) + more


def empty_cells_error(
    empty: np.ndarray, n_cells: int | None = None, obs_names: Sequence[str] | None = None, first_row: int = 0
) -> ValueError:
    """The one error for cells that express no vocabulary gene (``empty``: their rows, relative to ``first_row``;
    ``obs_names`` indexed by absolute row; ``n_cells``: how many were ranked, when that is all the input)."""
    of = f" (of {n_cells})" if n_cells is not None else ""
    return ValueError(
        f"{len(empty)} cells express no gene of the model's vocabulary{of}: cells "
        f"{_format_cells(empty, obs_names, first_row)}. Filter them out (e.g. sc.pp.filter_cells(adata, "
        "min_genes=...)) or pass skip_empty_cells=True."
    )


def _csr_parts(matrix: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, data) of a canonical CSR version of a scipy sparse matrix or array."""
    if matrix.format != "csr":
        matrix = matrix.tocsr()
    if not matrix.has_canonical_format:
        matrix = matrix.copy()
        matrix.sum_duplicates()
    return matrix.indptr, matrix.indices, matrix.data


def _iter_csr_chunks(matrix: Any, chunk_size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(first_row, indptr, indices, data)`` row chunks; indptr starts at 0."""
    n_rows = matrix.shape[0]
    if sp.issparse(matrix):
        indptr, indices, data = _csr_parts(matrix)
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            lo, hi = indptr[start], indptr[stop]
            yield start, indptr[start : stop + 1] - lo, indices[lo:hi], data[lo:hi]
        return
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        block = matrix[start:stop]  # numpy array, h5py dataset or anndata backed sparse dataset
        block = block if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
        yield (start, *_csr_parts(block))


# ----------------------------------------------------------------------------- the extractor


class Cell2TextFeatureExtractor(FeatureExtractionMixin):
    """Turns expression matrices into Geneformer gene-token inputs (rank-value encoding).

    Args:
        gene_token_ids: Ensembl ID (unversioned) -> token id, plus the special tokens
            ``<pad>``, ``<mask>``, ``<cls>``, ``<eos>`` (Geneformer V2 uses 0, 1, 2, 3).
        gene_medians: Ensembl ID -> non-zero median of normalised counts in the pretraining
            corpus. Only genes with both a token id and a median are ranked.
        gene_symbols: Ensembl ID -> symbol for vocabulary genes (display; and symbol input when
            ``symbol_to_gene`` is not given).
        model_input_size: maximum number of tokens per cell, special tokens included.
        special_tokens: True for Geneformer V2 (``<cls>`` first, ``<eos>`` last), False for V1.
        min_gene_match_rate: below this fraction of input genes found in the vocabulary a
            warning is logged.
        num_expression_bins: 0 (default) for Geneformer's rank-value tokens only; B > 0 adds
            value-aware inputs, ``gene_value_ids``: each gene's per-cell expression bin in 1..B.
        symbol_to_gene: symbol -> Ensembl ID used to map symbol input, resolved by ``gene_ids.resolve_symbols``
            over the whole packaged gene table (as the corpus builder does); by default derived from
            ``gene_symbols`` with the same rule (a symbol several vocabulary genes carry maps to none).
        vocabulary_source: where the vocabulary came from (JSON-serialisable dict with a ``"kind"``):
            ``{"kind": "geneformer", "token_dictionary_sha256": ..., "gene_median_sha256": ...}``,
            ``{"kind": "corpus", ...}`` or ``{"kind": "unknown"}`` (the default, e.g. older configs).
    """

    def __init__(
        self,
        gene_token_ids: dict[str, int] | None = None,
        gene_medians: dict[str, float] | None = None,
        gene_symbols: dict[str, str] | None = None,
        model_input_size: int = 4096,
        special_tokens: bool = True,
        min_gene_match_rate: float = 0.5,
        num_expression_bins: int = 0,
        symbol_to_gene: dict[str, str] | None = None,
        vocabulary_source: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("feature_extractor_type", None)
        super().__init__(**kwargs)
        if gene_token_ids is None:
            gene_token_ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        self.gene_token_ids = {str(k): int(v) for k, v in gene_token_ids.items()}
        self.gene_medians = {str(k): float(v) for k, v in (gene_medians or {}).items()}
        self.gene_symbols = {str(k): str(v) for k, v in (gene_symbols or {}).items()}
        self.model_input_size = int(model_input_size)
        self.special_tokens = bool(special_tokens)
        self.min_gene_match_rate = float(min_gene_match_rate)
        self.num_expression_bins = int(num_expression_bins)
        self.vocabulary_source = _checked_source(vocabulary_source)
        if symbol_to_gene is None:
            symbol_to_gene = resolve_symbols((gene, symbol, False) for gene, symbol in self.gene_symbols.items())
        self.symbol_to_gene = {str(k): str(v) for k, v in symbol_to_gene.items()}
        self._validate_config()
        self._build_lookups()

    # -- construction -------------------------------------------------------------------------

    def _validate_config(self) -> None:
        required = (PAD, CLS, EOS) if self.special_tokens else (PAD,)
        missing = [t for t in required if t not in self.gene_token_ids]
        if missing:
            raise ValueError(
                f"gene_token_ids lacks the special tokens {missing}; add them (Geneformer V2: <pad>=0, <mask>=1, "
                "<cls>=2, <eos>=3) or pass special_tokens=False for a V1 vocabulary"
            )
        ids = list(self.gene_token_ids.values())
        if min(ids) < 0 or max(ids) >= MAX_VOCAB_SIZE:
            worst = next((t, i) for t, i in self.gene_token_ids.items() if not 0 <= i < MAX_VOCAB_SIZE)
            raise ValueError(
                f"token ids must lie in [0, {MAX_VOCAB_SIZE}) (MAX_VOCAB_SIZE; Geneformer's are 0..~25,000), found "
                f"{worst[0]!r}: {worst[1]}; fix the token dictionary or the gene_token_ids of the preprocessor config"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("gene_token_ids must map each token to a distinct id; fix the token dictionary")
        bad = [(g, m) for g, m in self.gene_medians.items() if not (math.isfinite(m) and m > 0)]
        if bad:
            raise ValueError(f"gene medians must be finite and > 0; {len(bad)} are not, e.g. {bad[:_EXAMPLES]}")
        minimum = 3 if self.special_tokens else 1
        if self.model_input_size < minimum:
            raise ValueError(f"model_input_size must be >= {minimum}, got {self.model_input_size}")
        if not 0 <= self.num_expression_bins <= 255:
            raise ValueError(
                f"num_expression_bins must be in 0..255 (0: rank-value tokens only), got {self.num_expression_bins}"
            )

    def _build_lookups(self) -> None:
        """Private lookup tables (not saved): gene -> token, token -> median, symbol -> gene."""
        self._gene_to_token = {
            gene: token
            for gene, token in self.gene_token_ids.items()
            if gene not in SPECIAL_TOKENS and gene in self.gene_medians
        }
        size = self.vocab_size
        self._token_medians = np.ones(size, dtype=np.float64)  # float64, as Geneformer's norm_factor_vector
        for gene, token in self._gene_to_token.items():
            self._token_medians[token] = self.gene_medians[gene]
        self._symbol_to_gene = {s: g for s, g in self.symbol_to_gene.items() if g in self._gene_to_token}
        vocabulary_symbols = {self.gene_symbols[g] for g in self._gene_to_token if g in self.gene_symbols}
        self._unresolved_symbols = vocabulary_symbols - self._symbol_to_gene.keys()
        self._is_special = np.zeros(size, dtype=bool)
        special_ids = [self.gene_token_ids[t] for t in SPECIAL_TOKENS if t in self.gene_token_ids]
        self._is_special[special_ids] = True
        self._max_special_id = max(special_ids)
        unranked = sum(1 for g in self.gene_token_ids if g not in SPECIAL_TOKENS and g not in self.gene_medians)
        if unranked:
            logger.info("%d vocabulary genes have no median and are never ranked", unranked)

    @classmethod
    def from_gene_medians(
        cls, gene_medians: dict[str, float], *, source_details: dict[str, Any] | None = None, **kwargs: Any
    ) -> Cell2TextFeatureExtractor:
        """Build a vocabulary from corpus medians: special tokens 0..3, then the genes in sorted order.

        Symbols come from the packaged gene table unless ``gene_symbols`` is given. ``vocabulary_source`` records
        ``{"kind": "corpus", "n_genes": ..., "gene_medians_sha256": ...}`` plus ``source_details`` (e.g. the
        corpus builder's dataset names).
        """
        genes = sorted({ensembl_gene_id(g) or g for g in gene_medians})
        if len(genes) != len(gene_medians):
            raise ValueError("gene_medians holds the same Ensembl ID twice (after stripping version suffixes)")
        medians = {(ensembl_gene_id(g) or g): float(m) for g, m in gene_medians.items()}
        token_ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        token_ids.update({gene: i + len(SPECIAL_TOKENS) for i, gene in enumerate(genes)})
        if "gene_symbols" not in kwargs:
            kwargs["gene_symbols"], kwargs["symbol_to_gene"] = _packaged_symbols(genes)
        canonical = json.dumps(sorted(medians.items()), separators=(",", ":")).encode()
        source = {**(source_details or {}), "kind": "corpus", "n_genes": len(genes),
                  "gene_medians_sha256": hashlib.sha256(canonical).hexdigest()}
        return cls(gene_token_ids=token_ids, gene_medians=medians, vocabulary_source=source, **kwargs)

    @classmethod
    def from_geneformer_dictionaries(
        cls, token_dictionary_file: str, gene_median_file: str, **kwargs: Any
    ) -> Cell2TextFeatureExtractor:
        """Build from Geneformer's pickled token and gene-median dictionaries (restricted unpickler).

        V1 dictionaries have no ``<cls>``/``<eos>``: pass ``special_tokens=False`` and
        ``model_input_size=2048`` for them.
        """
        token_ids = load_numeric_dict(str(token_dictionary_file), int)
        medians = load_numeric_dict(str(gene_median_file), float)
        genes = [g for g in token_ids if g not in SPECIAL_TOKENS]
        if "gene_symbols" not in kwargs:
            kwargs["gene_symbols"], kwargs["symbol_to_gene"] = _packaged_symbols(genes)
        source = {
            "kind": "geneformer",
            "token_dictionary_sha256": _sha256_of(token_dictionary_file),
            "gene_median_sha256": _sha256_of(gene_median_file),
            "token_dictionary_file": os.path.basename(str(token_dictionary_file)),
            "gene_median_file": os.path.basename(str(gene_median_file)),
        }
        return cls(gene_token_ids=token_ids, gene_medians=medians, vocabulary_source=source, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Saved configuration: vocabulary, medians, symbols and options (no lookup caches)."""
        output = {k: v for k, v in super().to_dict().items() if not k.startswith("_")}
        return output

    @staticmethod
    def empty_cells_error(
        empty: np.ndarray, n_cells: int | None = None, obs_names: Sequence[str] | None = None, first_row: int = 0
    ) -> ValueError:
        """The one error for cells without an expressed vocabulary gene, for callers that rank in blocks (the
        pipeline): see the module function ``empty_cells_error``."""
        return empty_cells_error(empty, n_cells, obs_names, first_row)

    def __deepcopy__(self, memo: dict) -> Cell2TextFeatureExtractor:
        return type(self).from_dict(self.to_dict())

    # -- properties ---------------------------------------------------------------------------

    @property
    def model_input_names(self) -> list[str]:
        names = ["gene_input_ids", "gene_attention_mask", "gene_token_mask"]
        return names + (["gene_value_ids"] if self.num_expression_bins else [])

    @property
    def pad_token_id(self) -> int:
        return self.gene_token_ids[PAD]

    @property
    def cls_token_id(self) -> int | None:
        return self.gene_token_ids.get(CLS)

    @property
    def eos_token_id(self) -> int | None:
        return self.gene_token_ids.get(EOS)

    @property
    def mask_token_id(self) -> int | None:
        return self.gene_token_ids.get(MASK)

    @property
    def vocab_size(self) -> int:
        """Size of the token embedding the vocabulary needs (max token id + 1, special tokens included;
        at most MAX_VOCAB_SIZE)."""
        return max(self.gene_token_ids.values()) + 1

    @property
    def max_genes(self) -> int:
        """Gene tokens kept per cell: the input size minus the two special tokens in V2."""
        return self.model_input_size - (2 if self.special_tokens else 0)

    # -- gene matching ------------------------------------------------------------------------

    def match_genes(self, gene_ids: Sequence[Any]) -> _GeneMatch:
        """Map input genes (Ensembl IDs, versioned or not, or symbols) to token ids.

        Raises ValueError when no gene matches or when two input genes map to the same gene;
        logs a warning when fewer than ``min_gene_match_rate`` of them match.
        """
        if not self._gene_to_token:
            raise ValueError(
                "the vocabulary holds no gene with a median; build the extractor with from_gene_medians(...) or "
                "from_geneformer_dictionaries(...)"
            )
        tokens = np.full(len(gene_ids), -1, dtype=np.int32)
        first_seen: dict[str, int] = {}
        duplicates: list[str] = []
        unmatched: list[str] = []
        n_ambiguous = 0
        for column, raw in enumerate(gene_ids):
            name = str(raw).strip()
            token = self._gene_to_token.get(name)  # fast path: an unversioned vocabulary ID
            if token is not None:
                gene = name
            else:
                gene = ensembl_gene_id(name)
                if gene is None:
                    gene = self._symbol_to_gene.get(name)
                    n_ambiguous += gene is None and name in self._unresolved_symbols
                token = self._gene_to_token.get(gene) if gene is not None else None
            if token is None:
                unmatched.append(name)
                continue
            if gene in first_seen:
                duplicates.append(f"{name!r} (column {column}) = {gene} (column {first_seen[gene]})")
                continue
            first_seen[gene] = column
            tokens[column] = token
        if duplicates:
            raise ValueError(
                f"{len(duplicates)} input genes duplicate another input gene after ID mapping: "
                f"{'; '.join(duplicates[:_EXAMPLES])}. Remove or sum the duplicated columns first."
            )
        n_input, n_matched = len(gene_ids), len(first_seen)
        summary = (
            f"{n_matched} of {n_input} input genes are in the vocabulary of {len(self._gene_to_token)} genes "
            f"({n_ambiguous} ambiguous symbols, see gene_ids.resolve_symbols); unmatched examples: {unmatched[:_EXAMPLES]}"
        )
        if n_matched == 0:
            raise ValueError(
                f"None of the input genes is in the vocabulary: {summary}. Pass Ensembl gene IDs (e.g. "
                "ENSG00000141510) or gene symbols of the vocabulary's species as gene_ids / var."
            )
        if n_matched < self.min_gene_match_rate * n_input:
            logger.warning("Low gene match rate: %s", summary)
        else:
            logger.info(summary)
        medians = np.ones(len(gene_ids), dtype=np.float64)
        medians[tokens >= 0] = self._token_medians[tokens[tokens >= 0]]
        return _GeneMatch(tokens, medians, n_input, n_matched, unmatched[:_EXAMPLES])

    def var_gene_ids(self, var: Any) -> list[str]:
        """Pick the var index or column to read gene IDs from (Ensembl preferred, then symbols)."""
        if looks_ensembl([str(v) for v in var.index[:2000]]):
            return [str(v) for v in var.index]
        columns = _string_columns(var)
        ordered = [c for c in ENSEMBL_VAR_COLUMNS if c in columns] + [c for c in columns if c not in ENSEMBL_VAR_COLUMNS]
        for column in ordered:
            if looks_ensembl(var[column].astype(str).values[:2000]):
                logger.info("Reading Ensembl gene IDs from var[%r]", column)
                return [str(v) for v in var[column].values]
        candidates = {"index": [str(v) for v in var.index]}
        for column in [c for c in SYMBOL_VAR_COLUMNS if c in columns]:
            candidates[column] = [str(v) for v in var[column].values]
        hits = {name: sum(v in self._symbol_to_gene for v in values) for name, values in candidates.items()}
        best = max(hits, key=lambda name: hits[name])  # first best wins: the index on ties
        logger.info("Reading gene symbols from var %s (%d map to the vocabulary)", best, hits[best])
        return candidates[best]

    # -- ranking ------------------------------------------------------------------------------

    def tokenize(
        self,
        cells: Any,
        gene_ids: Sequence[str] | None = None,
        *,
        layer: str | None = None,
        input_values: str = "counts",
        skip_empty_cells: bool = False,
        chunk_size: int = 128,
        num_threads: int | None = None,
    ) -> RankedCells:
        """Rank-value encode each cell; returns ragged token ids (special tokens included).

        ``cells``: AnnData (``.X`` or ``layer``; in memory or backed, read in row chunks),
        a scipy sparse matrix/array or a 2-D numpy array (then ``gene_ids`` is required).
        ``input_values``: "counts" (raw integer counts: Geneformer's ``count / n_counts * 10,000``),
        "normalized" (non-negative, e.g. CP10k, taken as the normalised value) or "log1p" (log1p of normalised
        values; float64 expm1 is applied). Values are checked against what is declared (see ``_check_values``).
        Chunks of ``chunk_size`` rows are ranked in ``num_threads`` threads (numpy releases the
        GIL in its sorts; default: the available cores, at most 4).
        """
        if input_values not in INPUT_VALUES:
            raise ValueError(f"input_values must be one of {INPUT_VALUES}, got {input_values!r}")
        matrix, gene_ids, obs_names = self.resolve_input(cells, gene_ids, layer)
        match = self.match_genes(gene_ids)

        def rank(chunk: tuple[int, np.ndarray, np.ndarray, np.ndarray]) -> tuple:
            start, indptr, indices, data = chunk
            _check_values(data, indptr, input_values, start)
            values = _rank_values(data, indptr, match.column_medians[indices], input_values, start)
            return self._rank_chunk(
                indptr, match.column_tokens[indices], values, data if self.num_expression_bins else None
            )

        chunks = _iter_csr_chunks(matrix, chunk_size)
        results = list(_ordered_map(rank, chunks, num_threads or _default_threads()))
        return self._collect(results, matrix.shape[0], obs_names, skip_empty_cells)

    def _rank_chunk(
        self, indptr: np.ndarray, tokens: np.ndarray, values: np.ndarray, expression: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Rank one CSR chunk. Returns flat token ids (specials added), genes kept per cell, and the flat
        expression bins aligned with the tokens when ``expression`` is given (value-aware extractors)."""
        n_cells = len(indptr) - 1
        keep = tokens >= 0
        keep &= values > 0  # explicit zeros are not expressed genes
        if keep.all():
            counts = np.diff(indptr)
        else:
            kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
            np.cumsum(keep, out=kept_before[1:])
            counts = np.diff(kept_before[indptr])
            tokens, values = tokens[keep], values[keep]
            expression = None if expression is None else expression[keep]
        width = int(counts.max()) if n_cells else 0
        # key: the float64 bits inverted (ascending key = descending value; positive float bits order like the
        # values), the low `low_bits` of them replaced by the entry's index in its row (to find it after the sort)
        low_bits = max(width - 1, 1).bit_length()
        low_mask = np.uint64((1 << low_bits) - 1)
        starts = np.cumsum(counts) - counts
        positions = np.arange(len(values), dtype=np.int64) + np.repeat(np.arange(n_cells) * width - starts, counts)
        # padding: above every real key (normal positive values: top 12 key bits <= 0xFFE), distinct high parts
        padded = np.empty((n_cells, width), dtype=np.uint64)
        padded[:] = _PAD_BASE + (np.arange(width, dtype=np.uint64) << np.uint64(low_bits))
        padded.reshape(-1)[positions] = np.invert(values.view(np.uint64))
        padded &= ~low_mask
        padded |= np.arange(width, dtype=np.uint64)
        padded.sort(axis=1)
        # index in values/tokens of the entry at each rank (out of range on padding: clipped, never read)
        source = np.add(np.bitwise_and(_low_words(padded), np.uint32(low_mask)), starts[:, None], dtype=np.int64)
        sorted_tokens = tokens.take(source, mode="clip")
        bins = None
        if expression is not None:  # the same rank order, carrying each gene's expression bin along
            padded_bins = self._expression_bins(expression, positions, counts, width).reshape(-1)
            bins = padded_bins.take(positions.take(source, mode="clip"))
        np.right_shift(padded, np.uint64(low_bits), out=padded)  # the value bits above the low bits
        _order_near_ties(padded, source, values, tokens, low_bits, sorted_tokens, bins)
        n_genes = np.minimum(counts, self.max_genes)
        width = min(width, self.max_genes)
        extra = 2 if self.special_tokens else 0
        ranked = np.empty((n_cells, width + extra), dtype=np.int32)
        if self.special_tokens:
            ranked[:, 0] = self.cls_token_id
            ranked[:, 1 : width + 1] = sorted_tokens[:, :width]
            ranked[:, width + 1] = 0
            ranked[np.arange(n_cells), n_genes + 1] = self.eos_token_id
        else:
            ranked[:] = sorted_tokens[:, :width]
        lengths = np.where(n_genes > 0, n_genes + extra, 0)
        real = np.arange(width + extra) < lengths[:, None]
        flat = ranked[real]
        if bins is None:
            return flat, n_genes, None
        ranked_bins = np.zeros((n_cells, width + extra), dtype=np.uint8)
        offset = 1 if self.special_tokens else 0
        ranked_bins[:, offset : width + offset] = bins[:, :width]
        if self.special_tokens:
            ranked_bins[np.arange(n_cells), n_genes + 1] = 0  # <eos> where a cell has fewer genes than width
        return flat, n_genes, ranked_bins[real]

    def _expression_bins(
        self, expression: np.ndarray, positions: np.ndarray, counts: np.ndarray, width: int
    ) -> np.ndarray:
        """Per-cell quantile bins (1..B) of the expressed genes, laid out like the padded key array (0: padding).

        A gene's bin is 1 + floor(B * k / n), k = genes of the cell with lower expression, n = expressed genes.
        """
        n_cells = len(counts)
        padded = np.full((n_cells, width), np.inf, dtype=np.float64)
        padded.reshape(-1)[positions] = expression
        order = np.argsort(padded, axis=1, kind="stable")
        ascending = np.take_along_axis(padded, order, axis=1)
        column = np.broadcast_to(np.arange(width), ascending.shape)
        starts_run = np.ones(ascending.shape, dtype=bool)
        starts_run[:, 1:] = ascending[:, 1:] != ascending[:, :-1]
        lower = np.maximum.accumulate(np.where(starts_run, column, 0), axis=1)  # genes with lower expression
        sorted_bins = 1 + (lower * self.num_expression_bins) // np.maximum(counts, 1)[:, None]
        sorted_bins[column >= counts[:, None]] = 0
        bins = np.empty((n_cells, width), dtype=np.uint8)
        np.put_along_axis(bins, order, sorted_bins.astype(np.uint8), axis=1)
        return bins

    def _collect(
        self,
        chunk_results: list[tuple],
        n_cells: int,
        obs_names: Sequence[str] | None,
        skip_empty_cells: bool,
    ) -> RankedCells:
        """Join chunk results; raise on (or skip and report) cells without vocabulary genes."""
        n_genes = np.concatenate([r[1] for r in chunk_results]) if chunk_results else np.zeros(0, dtype=np.int64)
        empty = np.flatnonzero(n_genes == 0)
        if len(empty) and not skip_empty_cells:
            raise empty_cells_error(empty, n_cells, obs_names)
        if len(empty):
            logger.warning(
                "Skipped %d of %d cells that express no vocabulary gene: %s",
                len(empty),
                n_cells,
                _format_cells(empty, obs_names),
            )
        kept = np.flatnonzero(n_genes > 0)
        lengths = n_genes[kept] + (2 if self.special_tokens else 0)
        offsets = np.zeros(len(kept) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate([r[0] for r in chunk_results]) if chunk_results else np.zeros(0, dtype=np.int32)
        value_bins = None
        if self.num_expression_bins:
            value_bins = np.concatenate([r[2] for r in chunk_results]) if chunk_results else np.zeros(0, np.uint8)
        return RankedCells(
            tokens=tokens, offsets=offsets, cell_indices=kept, skipped_cells=empty, value_bins=value_bins
        )

    def resolve_input(
        self, cells: Any, gene_ids: Sequence[str] | None, layer: str | None
    ) -> tuple[Any, Sequence[Any], Sequence[str] | None]:
        """Return (row-chunkable matrix, gene IDs, obs names or None) for any accepted input.

        Public so that callers reading cells in blocks (the pipeline, the CLI) resolve inputs like `tokenize`.
        """
        obs_names = None
        if _is_anndata(cells):
            if layer is not None:
                if layer not in cells.layers:
                    raise KeyError(f"layer {layer!r} not in adata.layers (available: {list(cells.layers.keys())})")
                matrix = cells.layers[layer]
            else:
                matrix = cells.X
            if matrix is None:
                raise ValueError("adata.X is None; pass layer=... naming the layer that holds the counts")
            if gene_ids is None:
                gene_ids = self.var_gene_ids(cells.var)
            obs_names = cells.obs_names  # indexed only to name cells in messages
        elif layer is not None:
            raise ValueError("layer= applies to AnnData input only")
        else:
            matrix = cells
            if gene_ids is None:
                raise ValueError("gene_ids is required for matrix input (one Ensembl ID or symbol per column)")
        if isinstance(matrix, (np.ndarray, np.matrix)) or (not sp.issparse(matrix) and not hasattr(matrix, "shape")):
            matrix = np.asarray(matrix)
            if matrix.ndim != 2:
                raise ValueError(f"expected a 2-D cells x genes matrix, got shape {matrix.shape}")
        elif sp.issparse(matrix) and matrix.format == "csc":
            matrix = matrix.tocsr()  # one conversion instead of slow CSC row slicing per chunk
        if len(gene_ids) != matrix.shape[1]:
            raise ValueError(f"got {len(gene_ids)} gene IDs for a matrix with {matrix.shape[1]} columns (genes)")
        return matrix, gene_ids, obs_names

    # -- model inputs -------------------------------------------------------------------------

    def __call__(
        self,
        cells: Any,
        gene_ids: Sequence[str] | None = None,
        *,
        layer: str | None = None,
        input_values: str = "counts",
        skip_empty_cells: bool = False,
        return_tensors: str | None = None,
    ) -> BatchFeature:
        """Rank-value encode cells into padded model inputs.

        Returns ``gene_input_ids`` (padded with the pad id to the longest cell),
        ``gene_attention_mask`` (1 on real tokens, special tokens included),
        ``gene_token_mask`` (1 on gene tokens only) and, for value-aware extractors,
        ``gene_value_ids`` (expression bins, 0 on special tokens and padding). With ``skip_empty_cells=True`` also
        ``cell_indices`` (input rows kept) and ``skipped_cell_indices`` (input rows dropped).
        """
        ranked = self.tokenize(
            cells, gene_ids, layer=layer, input_values=input_values, skip_empty_cells=skip_empty_cells
        )
        batch = self.pad(ranked)
        if skip_empty_cells:
            batch["cell_indices"] = ranked.cell_indices
            batch["skipped_cell_indices"] = ranked.skipped_cells
        return BatchFeature(dict(batch), tensor_type=return_tensors)

    def pad(
        self,
        token_lists: Sequence[Sequence[int]] | RankedCells,
        value_lists: Sequence[Sequence[int]] | None = None,
        return_tensors: str | None = None,
    ) -> BatchFeature:
        """Pad per-cell token lists (e.g. stored in a corpus) into the model inputs.

        Value-aware extractors also need each cell's expression bins: in ``token_lists`` (cells from
        ``tokenize``) or as ``value_lists`` (e.g. the corpus column ``gene_value_ids``).
        """
        flat_bins = None
        if isinstance(token_lists, RankedCells):  # made by tokenize: ids already valid
            lengths, flat = token_lists.lengths, token_lists.tokens
            flat_bins = token_lists.value_bins if value_lists is None else None
        else:
            arrays = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_lists]
            lengths = np.array([len(a) for a in arrays], dtype=np.int64)
            flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
            if len(flat) and (flat.min() < 0 or flat.max() >= self.vocab_size):
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}) (this extractor's vocabulary)")
        if value_lists is not None:
            flat_bins = self._check_value_lists(value_lists, lengths)
        if self.num_expression_bins and flat_bins is None:
            raise ValueError(
                f"This feature extractor is value-aware (num_expression_bins={self.num_expression_bins}): pass each "
                "cell's expression bins (value_lists=, e.g. the corpus column gene_value_ids), or expression values."
            )
        width = int(lengths.max()) if len(lengths) else 0
        if width > self.model_input_size:
            raise ValueError(f"a cell has {width} tokens, more than model_input_size={self.model_input_size}")
        real = np.arange(width) < lengths[:, None]
        if self.pad_token_id == 0:  # np.zeros is lazily zeroed by the OS: cheaper than np.full
            input_ids = np.zeros((len(lengths), width), dtype=np.int64)
        else:
            input_ids = np.full((len(lengths), width), self.pad_token_id, dtype=np.int64)
        input_ids[real] = flat
        attention = real.astype(np.int64)
        gene_mask = attention.copy()
        # special tokens are few (2 per cell): find them in the flat list, clear them in the mask
        special = np.flatnonzero(flat <= self._max_special_id)  # specials usually have the lowest ids
        special = special[self._is_special[flat[special]]]
        ends = np.cumsum(lengths)
        rows = np.searchsorted(ends, special, side="right")
        gene_mask[rows, special - (ends - lengths)[rows]] = 0
        data = {"gene_input_ids": input_ids, "gene_attention_mask": attention, "gene_token_mask": gene_mask}
        if self.num_expression_bins:
            value_ids = np.zeros((len(lengths), width), dtype=np.int64)
            value_ids[real] = flat_bins
            data["gene_value_ids"] = value_ids
        return BatchFeature(data, tensor_type=return_tensors)

    def _check_value_lists(self, value_lists: Sequence[Sequence[int]], lengths: np.ndarray) -> np.ndarray:
        """Flat expression bins, checked against this extractor and the cells' token counts."""
        if not self.num_expression_bins:
            raise ValueError(
                "Expression bins were given but this feature extractor uses rank-value tokens only "
                "(num_expression_bins=0); leave value_lists out or use the value-aware extractor they were made with."
            )
        arrays = [np.asarray(v, dtype=np.int64).reshape(-1) for v in value_lists]
        value_lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        if len(arrays) != len(lengths) or not np.array_equal(value_lengths, lengths):
            raise ValueError(
                f"Expression bins and tokens differ in length (bins per cell {value_lengths.tolist()[:_EXAMPLES]}, "
                f"tokens per cell {lengths.tolist()[:_EXAMPLES]}): pass one bin per token, cell by cell."
            )
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() > self.num_expression_bins):
            raise ValueError(f"expression bins must lie in [0, {self.num_expression_bins}] (num_expression_bins)")
        return flat


# ----------------------------------------------------------------------------- value checks


def _row_sums(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per-cell totals of a CSR chunk, in float64 (exact for integer counts)."""
    if not len(data):
        return np.zeros(len(indptr) - 1, dtype=np.float64)
    sums = np.add.reduceat(data, np.minimum(indptr[:-1], len(data) - 1), dtype=np.float64)
    sums[indptr[1:] == indptr[:-1]] = 0.0  # reduceat gives an empty row the next entry
    return sums


def _spread(totals: np.ndarray) -> float:
    """Relative spread (max - min) / max of positive totals."""
    return float((totals.max() - totals.min()) / totals.max())


def _check_values(data: np.ndarray, indptr: np.ndarray, input_values: str, first_row: int) -> None:
    """Refuse values that cannot be expression of the declared kind (on stored entries, per chunk of cells).

    Always: numeric, finite, non-negative. "counts": integers below 2**31. "normalized": below 2**31, not raw
    counts (all values integers while the cells' totals differ), not log1p-scaled (all values <= 20 and the cells'
    totals of expm1(values) agree within 0.1% while their totals of the values differ by more than 1%: log1p of
    normalised data). "log1p": at most 20 (log1p of CP10k is at most 9.2), not all integers (raw counts).
    The totals rules need two cells with values in the chunk.
    """
    where = f"chunk starting at cell {first_row}"
    if data.dtype.kind not in "biuf":
        raise TypeError(f"expression values must be numeric, got dtype {data.dtype}")
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            raise ValueError(
                f"input holds {n_nan} NaN and {int((~finite).sum()) - n_nan} infinite values ({where}); rank-value "
                "encoding needs finite, non-negative expression values"
            )
    if data.dtype.kind in "if" and len(data) and data.min() < 0:
        raise ValueError(
            f"input holds negative values (minimum {data.min()}, {where}); pass raw "
            "counts or non-negative normalised values, not scaled/centred data (e.g. adata.raw or a counts layer)"
        )
    if not len(data) or data.dtype.kind == "b":
        return
    largest = data.max()
    integral = data.dtype.kind in "iu" or bool((np.rint(data) == data).all())
    if input_values == "counts":
        if not integral:
            example = data[np.flatnonzero(np.rint(data) != data)[0]]
            raise ValueError(
                f"input_values='counts' but the values are not integer counts (e.g. {example}, {where}); pass "
                "input_values='normalized' for normalised data or 'log1p' for log1p of normalised data (e.g. "
                "scanpy's normalize_total + log1p), or round counts with float noise"
            )
        if largest >= MAX_COUNT:
            raise ValueError(
                f"input_values='counts' but a value is {float(largest):.6g} ({where}): no gene has 2**31 or more counts "
                "in one cell; pass the raw count matrix (e.g. adata.raw or a counts layer)"
            )
        return
    if input_values == "log1p":
        if largest > MAX_LOG1P:
            raise ValueError(
                f"input_values='log1p' but values reach {float(largest):.6g} ({where}), above {MAX_LOG1P:g} (log1p "
                "of CP10k data is at most 9.2): these are not log1p of normalised values; pass "
                "input_values='counts' for raw counts or 'normalized' for normalised values"
            )
        if integral and largest > 0:
            raise ValueError(
                f"input_values='log1p' but every value is an integer ({where}): these look like raw counts; pass "
                "input_values='counts'"
            )
        return
    if largest >= MAX_COUNT:
        raise ValueError(
            f"input_values='normalized' but a value is {float(largest):.6g} ({where}): normalised expression is far "
            "below 2**31 (CPM is at most 10**6); pass the normalised matrix, or input_values='counts' for raw counts"
        )
    totals = _row_sums(data, indptr)
    totals = totals[totals > 0]
    if len(totals) < 2:
        return
    if integral and _spread(totals) > 0:
        raise ValueError(
            f"input_values='normalized' but every value is an integer and the cells' totals differ ({where}): "
            "these look like raw counts; pass input_values='counts'"
        )
    if largest <= MAX_LOG1P and not integral and _spread(totals) > 0.01:
        unlogged = _row_sums(np.expm1(data, dtype=np.float64), indptr)
        if _spread(unlogged[unlogged > 0]) < 0.001:
            raise ValueError(
                f"input_values='normalized' but the values look log1p-scaled ({where}): the cells' totals of "
                f"expm1(values) agree ({float(unlogged.max()):.6g}) while their totals differ; pass "
                "input_values='log1p'"
            )


def _rank_values(
    data: np.ndarray, indptr: np.ndarray, medians: np.ndarray, input_values: str, first_row: int
) -> np.ndarray:
    """Geneformer's float64 ranking values of a CSR chunk's entries (see the module docstring), checked.
    ``medians`` (each entry's gene median, float64) is overwritten with the values.

    "counts": ``count / n_counts * 10_000`` in float32 for float32/float16 data (float64 for integer or float64
    data), then ``/ median`` in float64. "normalized": ``value / median``. "log1p": ``expm1(value) / median``.
    """
    if input_values == "counts":
        dtype = np.float32 if data.dtype in (np.float16, np.float32) else np.float64
        normalised = np.repeat(_row_sums(data, indptr).astype(dtype), np.diff(indptr))  # n_counts per entry
        with np.errstate(divide="ignore", invalid="ignore"):  # cells with only stored zeros: never ranked
            np.divide(data, normalised, out=normalised, dtype=dtype)
        normalised *= dtype(TARGET_SUM)
    elif input_values == "log1p":
        normalised = np.expm1(data, dtype=np.float64)
    else:
        normalised = data
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        values = np.divide(normalised, medians, dtype=np.float64, out=medians if medians.dtype == np.float64 else None)
    if len(values) == 0 or (values.min() >= _TINY and values.max() < np.inf):  # no stored zero, no over/underflow
        return values
    bad = (data != 0) & ~((values >= _TINY) & (values < np.inf))
    if bad.any():
        example = np.flatnonzero(bad)[0]
        raise ValueError(
            f"{int(bad.sum())} values over- or underflow when normalised (e.g. {data[example]!r} gives "
            f"{values[example]!r}, chunk starting at cell {first_row}); check that input_values={input_values!r} "
            "is what the matrix holds"
        )
    return values


def _order_near_ties(
    high: np.ndarray,
    source: np.ndarray,
    values: np.ndarray,
    tokens: np.ndarray,
    low_bits: int,
    sorted_tokens: np.ndarray,
    bins: np.ndarray | None,
) -> None:
    """In place: order each run of entries whose keys agree above the low bits by exact value (descending), then
    token id (ascending).

    ``high``: the sorted keys shifted right by ``low_bits`` (padding: all distinct); ``source``: each rank's entry
    in ``values``/``tokens``.
    Runs hold exact ties (common in count data) and values that differ only in their last ``low_bits`` bits.
    One 1-D sort of ``run << (low_bits + T) | low bits of the inverted value << T | token`` (T: token id bits).
    """
    if high.shape[1] < 2:
        return
    same = high[:, 1:] == high[:, :-1]
    if not same.any():
        return
    tied = np.zeros(high.shape, dtype=bool)
    tied[:, 1:] = same
    tied[:, :-1] |= same
    starts_run = np.ones(high.shape, dtype=bool)
    starts_run[:, 1:] = ~same
    where = np.flatnonzero(tied)
    entries = source.reshape(-1)[where]
    run = np.cumsum(starts_run.reshape(-1)[where], dtype=np.uint64)  # runs are contiguous in `where`
    low = np.invert(values[entries].view(np.uint64)) & np.uint64((1 << low_bits) - 1)
    run_tokens = tokens[entries].astype(np.uint64)
    token_bits = max(int(run_tokens.max()).bit_length(), 1)
    if int(run[-1]).bit_length() + low_bits + token_bits <= 64:
        keys = (run << np.uint64(low_bits + token_bits)) | (low << np.uint64(token_bits)) | run_tokens
        order = np.argsort(keys)
    else:  # too many runs for one 64-bit key
        order = np.lexsort((run_tokens, low, run))
    sorted_tokens.reshape(-1)[where] = run_tokens[order]
    if bins is not None:
        flat_bins = bins.reshape(-1)
        flat_bins[where] = flat_bins[where][order]


def _low_words(keys: np.ndarray) -> np.ndarray:
    """Low 32 bits of a C-contiguous 2-D uint64 key array (a strided view where possible)."""
    if sys.byteorder == "little" and keys.strides[1] == 8:
        return keys.view(np.uint32)[:, 0::2]
    return (keys & _LOW_BITS).astype(np.uint32)


def _default_threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def _ordered_map(function: Any, items: Iterator[Any], workers: int) -> Iterator[Any]:
    """``map`` in a thread pool, in order, holding at most ``2 * workers`` items in flight
    (so a backed file is never read into memory at once)."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _packaged_symbols(genes: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(gene -> symbol, symbol -> gene) for the vocabulary ``genes`` from the packaged gene table.

    Symbols resolve over the whole table (``gene_ids.resolve_symbols``), as the corpus builder resolves them, then
    are kept where they name a vocabulary gene. ({}, {}) when the table is not available.
    """
    try:
        from .gene_table import ensembl_to_symbol, symbol_to_ensembl
    except ImportError:
        logger.warning("gene_table module not available: symbol input will not be mapped")
        return {}, {}
    try:
        symbols = ensembl_to_symbol(genes)
        vocabulary = set(genes)
        resolved = symbol_to_ensembl(set(symbols.values()))
    except FileNotFoundError as error:
        logger.warning("%s Symbol input will not be mapped.", error)
        return {}, {}
    return symbols, {symbol: gene for symbol, gene in resolved.items() if gene in vocabulary}


def _sha256_of(path: Any) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _checked_source(source: dict[str, Any] | None) -> dict[str, Any]:
    """``vocabulary_source`` as a JSON-serialisable dict with a string ``kind`` ({"kind": "unknown"} for None)."""
    if source is None:
        return {"kind": "unknown"}
    if not isinstance(source, dict) or not isinstance(source.get("kind"), str):
        raise ValueError(
            f"vocabulary_source must be a dict with a string 'kind' (geneformer, corpus or unknown), got {source!r}"
        )
    try:
        return json.loads(json.dumps(source))
    except (TypeError, ValueError) as error:
        raise ValueError(f"vocabulary_source must be JSON-serialisable (str, numbers, lists, dicts): {error}") from error
