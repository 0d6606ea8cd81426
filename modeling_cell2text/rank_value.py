"""Geneformer's rank-value encoding of a cells x genes matrix: the arithmetic, vectorised over CSR row chunks.

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
* Explicitly stored zeros are not expressed genes; genes outside the vocabulary (token -1) are dropped.
* Values are checked before and after every conversion (see ``check_values``): non-numeric, NaN, infinite or
  negative values, non-integer "counts", counts of 2**31 or more, "log1p" values above 20 or all integer (raw
  counts), "normalized" values that are raw counts or log1p-scaled, and any value that over- or underflows on the
  way are refused with the fix.

The ranking is vectorised over row chunks of a CSR matrix: each entry's value becomes a uint64 key (the float64
bits inverted, so ascending key = descending value, with the lowest bits replaced by the entry's index in its
row), keys are scattered into a padded 2-D array and sorted along rows (one C loop over rows); the low bits then
find each rank's token. Runs of keys equal above the low bits (exact ties, and values differing only in their last
bits) are put in exact-value, then ascending-token order with one 1-D sort over their entries.

Value-aware tokens (``num_expression_bins > 0``): beside its token, each gene gets an expression bin,
scGPT's per-cell value binning: with B bins and n expressed vocabulary genes in the cell, a gene whose expression
exceeds that of k of them gets bin ``1 + floor(B * k / n)`` (equal values share a bin; 0 marks special tokens and
padding). Quantiles within the cell make bins independent of sequencing depth and normalisation, and they carry
what rank order alone hides: a gene can rank high against its corpus median while being weakly expressed.

This file travels as remote code with the feature extractor: it imports only numpy and scipy.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

INPUT_VALUES = ("counts", "normalized", "log1p")
#: Geneformer's per-cell normalisation target (``count / n_counts * TARGET_SUM``).
TARGET_SUM = 10_000
#: The largest plausible log1p value: log1p of 10,000 (CP10k) is 9.2, of 10**6 (CPM) 13.8; expm1(20) is 4.9e8.
MAX_LOG1P = 20.0
#: Counts of one gene in one cell at or above this are not counts.
MAX_COUNT = 2**31
#: The relative uncertainty of each of some values, as stored (the multiples rules allow for it).
Uncertainty = Callable[[np.ndarray], np.ndarray]
_PAD_BASE = np.uint64(0xFFF0 << 48)  # padding keys start here: above the key of any normal positive float64
_TINY = np.finfo(np.float64).tiny
_LOW_BITS = np.uint64(0xFFFFFFFF)

#: One ranked chunk: flat token ids (specials added), genes kept per cell, flat expression bins or None.
ChunkResult = tuple[np.ndarray, np.ndarray, np.ndarray | None]


@dataclass
class RankedCells:
    """Ragged per-cell token ids: cell ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.

    ``cell_indices`` are the input rows these cells come from; ``skipped_cells`` the input rows
    dropped because no vocabulary gene is expressed (only with ``skip_empty_cells=True``).
    ``value_bins`` (value-aware extractors only) holds each token's expression bin, aligned with ``tokens``.
    ``made_by``: the fingerprint of the feature extractor whose ``tokenize`` made them (its vocabulary and medians'
    checksum and its settings), which its ``pad`` checks before taking the ids and bins unchecked (None: made
    otherwise, refused by ``pad``).
    """

    tokens: np.ndarray
    offsets: np.ndarray
    cell_indices: np.ndarray
    skipped_cells: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    value_bins: np.ndarray | None = None
    made_by: tuple | None = None

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


# ----------------------------------------------------------------------------- the whole matrix


def rank_matrix(
    matrix: Any,
    column_tokens: np.ndarray,
    column_medians: np.ndarray,
    *,
    input_values: str,
    max_genes: int,
    special_ids: tuple[int, int] | None,
    num_expression_bins: int = 0,
    chunk_size: int = 128,
    num_threads: int | None = None,
    first_row: int = 0,
) -> RankedCells:
    """Rank-value encode every row of ``matrix`` (scipy sparse, numpy, or row-sliceable like an h5py dataset).

    ``column_tokens``/``column_medians``: each input column's token id (-1: not in the vocabulary) and gene
    median. ``special_ids``: ``(cls, eos)`` ids added around each cell (Geneformer V2), None for V1. Cells without
    an expressed vocabulary gene are left out and listed in ``skipped_cells``; callers decide whether that is an
    error. Chunks of ``chunk_size`` rows are ranked in ``num_threads`` threads (default: ``default_threads()``).
    ``first_row``: the row of ``matrix``'s first cell in a larger input, so that errors name the input's rows.
    """
    if input_values not in INPUT_VALUES:
        raise ValueError(f"input_values must be one of {INPUT_VALUES}, got {input_values!r}")

    def rank(chunk: tuple[int, np.ndarray, np.ndarray, np.ndarray]) -> ChunkResult:
        start, indptr, indices, data = chunk
        check_values(data, indptr, input_values, first_row + start)
        values = rank_values(data, indptr, column_medians[indices], input_values, first_row + start)
        expression = data if num_expression_bins else None
        return rank_chunk(indptr, column_tokens[indices], values, expression, max_genes=max_genes,
                          special_ids=special_ids, num_expression_bins=num_expression_bins)

    chunks = iter_csr_chunks(matrix, chunk_size)
    results = list(ordered_map(rank, chunks, num_threads or default_threads()))
    return join_chunks(results, special_ids is not None, value_aware=num_expression_bins > 0)


def join_chunks(results: list[ChunkResult], special_tokens: bool, value_aware: bool) -> RankedCells:
    """Join ranked chunks (in row order) into one ``RankedCells``; cells with no gene go to ``skipped_cells``."""
    n_genes = np.concatenate([r[1] for r in results]) if results else np.zeros(0, dtype=np.int64)
    kept = np.flatnonzero(n_genes > 0)
    lengths = n_genes[kept] + (2 if special_tokens else 0)
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate([r[0] for r in results]) if results else np.zeros(0, dtype=np.int32)
    value_bins = None
    if value_aware:
        value_bins = np.concatenate([r[2] for r in results]) if results else np.zeros(0, np.uint8)
    return RankedCells(tokens=tokens, offsets=offsets, cell_indices=kept,
                       skipped_cells=np.flatnonzero(n_genes == 0), value_bins=value_bins)


# ----------------------------------------------------------------------------- one chunk


def rank_chunk(
    indptr: np.ndarray,
    tokens: np.ndarray,
    values: np.ndarray,
    expression: np.ndarray | None = None,
    *,
    max_genes: int,
    special_ids: tuple[int, int] | None,
    num_expression_bins: int = 0,
) -> ChunkResult:
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
        padded_bins = expression_bins(expression, positions, counts, width, num_expression_bins).reshape(-1)
        bins = padded_bins.take(positions.take(source, mode="clip"))
    np.right_shift(padded, np.uint64(low_bits), out=padded)  # the value bits above the low bits
    _order_near_ties(padded, source, values, tokens, low_bits, sorted_tokens, bins)
    n_genes = np.minimum(counts, max_genes)
    width = min(width, max_genes)
    extra = 0 if special_ids is None else 2
    ranked = np.empty((n_cells, width + extra), dtype=np.int32)
    if special_ids is not None:
        cls_id, eos_id = special_ids
        ranked[:, 0] = cls_id
        ranked[:, 1 : width + 1] = sorted_tokens[:, :width]
        ranked[:, width + 1] = 0
        ranked[np.arange(n_cells), n_genes + 1] = eos_id
    else:
        ranked[:] = sorted_tokens[:, :width]
    lengths = np.where(n_genes > 0, n_genes + extra, 0)
    real = np.arange(width + extra) < lengths[:, None]
    flat = ranked[real]
    if bins is None:
        return flat, n_genes, None
    ranked_bins = np.zeros((n_cells, width + extra), dtype=np.uint8)
    offset = 0 if special_ids is None else 1
    ranked_bins[:, offset : width + offset] = bins[:, :width]
    if special_ids is not None:
        ranked_bins[np.arange(n_cells), n_genes + 1] = 0  # <eos> where a cell has fewer genes than width
    return flat, n_genes, ranked_bins[real]


def expression_bins(
    expression: np.ndarray, positions: np.ndarray, counts: np.ndarray, width: int, num_bins: int
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
    sorted_bins = 1 + (lower * num_bins) // np.maximum(counts, 1)[:, None]
    sorted_bins[column >= counts[:, None]] = 0
    bins = np.empty((n_cells, width), dtype=np.uint8)
    np.put_along_axis(bins, order, sorted_bins.astype(np.uint8), axis=1)
    return bins


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


# ----------------------------------------------------------------------------- values


def _row_sums(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per-cell totals of a CSR chunk, in float64 (exact for integer counts)."""
    sums = np.zeros(len(indptr) - 1, dtype=np.float64)
    stored = indptr[1:] > indptr[:-1]
    if stored.any():  # reduceat over the rows holding entries only: each one's run ends where the next one's starts
        sums[stored] = np.add.reduceat(data[: indptr[-1]], indptr[:-1][stored], dtype=np.float64)
    return sums


def _spread(totals: np.ndarray) -> float:
    """Relative spread (max - min) / max of positive totals."""
    return float((totals.max() - totals.min()) / totals.max())


def check_values(data: np.ndarray, indptr: np.ndarray, input_values: str, first_row: int) -> None:
    """Refuse values that cannot be expression of the declared kind (on stored entries, per chunk of cells).

    Always: numeric, finite, non-negative. "counts": integers below 2**31. "normalized": below 2**31, not raw
    counts (all values integers while the cells' totals differ), not log1p-scaled (all values <= 20 and in most
    cells expm1(values), not the values, are whole multiples of the cell's smallest one, as counts times a scale
    are: log1p of normalised counts, also on a subset of genes or shallow cells; or all values <= 20 and the
    cells' totals of expm1(values) agree (coefficient of variation below 0.2%: also log1p values rounded to 2
    decimals) while their totals of the values differ by more than 1%, unless most cells with two different values
    hold whole multiples of their smallest one, which shows the values linear). "log1p": at most 20 (log1p of
    CP10k is at most 9.2), not all integers (raw counts), not linear (values above 1, and in most cells the values,
    not their expm1, are whole multiples of the cell's smallest one: normalised counts at a scale that keeps them
    <= 20).
    The totals rules need two cells with values in the chunk.
    """
    where = f"chunk starting at cell {first_row}"
    _check_finite_non_negative(data, where)
    if not len(data):
        return
    integral = data.dtype.kind in "iu" or bool((np.rint(data) == data).all())
    precision = _stored_precision(data)  # the multiples rules allow for it (rounded or float16 values)

    def linear(values: np.ndarray) -> np.ndarray:  # relative uncertainty of stored values
        return precision(values) / values

    def unlogged(expm1_values: np.ndarray) -> np.ndarray:  # relative uncertainty of expm1(stored values)
        return precision(np.log1p(expm1_values)) * (1 + 1 / expm1_values)

    if input_values == "counts":
        _check_counts(data, integral, where)
    elif input_values == "log1p":
        _check_log1p(data, indptr, integral, where, linear, unlogged)
    else:
        _check_normalized(data, indptr, integral, where, linear, unlogged)


def _check_finite_non_negative(data: np.ndarray, where: str) -> None:
    require_numeric(data.dtype)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            raise ValueError(
                f"input holds {n_nan} NaN and {int((~finite).sum()) - n_nan} infinite values ({where}); rank-value "
                "encoding needs finite, non-negative expression values"
            )
    if data.dtype.kind in "if" and len(data) and data.min() < 0:
        raise ScaledValuesError(
            f"input holds negative values (minimum {data.min()}, {where}); pass raw "
            "counts or non-negative normalised values, not scaled/centred data (e.g. adata.raw or a counts layer)"
        )


class ScaledValuesError(ValueError):
    """Negative values: scaled or centred data (scanpy's sc.pp.scale), whatever input_values says; a caller that
    knows where counts are kept can name it."""


class NotCountsError(ValueError):
    """input_values='counts' but the values are not integers (normalised or log1p values, such as CELLxGENE's X,
    whose counts are in adata.raw): a caller that knows where counts are kept can name it."""


def _check_counts(data: np.ndarray, integral: bool, where: str) -> None:
    if not integral:
        example = data[np.flatnonzero(np.rint(data) != data)[0]]
        raise NotCountsError(
            f"input_values='counts' but the values are not integer counts (e.g. {example}, {where}); pass "
            "input_values='normalized' for normalised data or input_values='log1p' for log1p of normalised data "
            "(e.g. scanpy's normalize_total + log1p), or round counts with float noise"
        )
    largest = data.max()
    if float(largest) >= MAX_COUNT:
        raise ValueError(
            f"input_values='counts' but a value is {float(largest):.6g} ({where}): no gene has 2**31 or more counts "
            "in one cell; pass the raw count matrix (e.g. adata.raw or a counts layer)"
        )


def _check_log1p(data: np.ndarray, indptr: np.ndarray, integral: bool, where: str, linear: Uncertainty,
                 unlogged: Uncertainty) -> None:
    largest = data.max()
    if largest > MAX_LOG1P:
        raise ValueError(
            f"input_values='log1p' but values reach {float(largest):.6g} ({where}), above {MAX_LOG1P:g} (log1p "
            "of CP10k data is at most 9.2): these are not log1p of normalised values; pass "
            "input_values='counts' for raw counts or input_values='normalized' for normalised values"
        )
    if integral and largest > 0:
        raise ValueError(
            f"input_values='log1p' but every value is an integer ({where}): these look like raw counts; pass "
            "input_values='counts'"
        )
    if _share_of_count_multiples(np.expm1(data, dtype=np.float64), indptr, uncertainty=unlogged) < 0.5:
        # (below 1, log1p is nearly linear: either reading ranks alike, and log1p of fractions looks linear)
        if largest > 1 and _share_of_count_multiples(data, indptr, uncertainty=linear) >= 0.5:
            raise ValueError(
                f"input_values='log1p' but the values look linear, not log1p-scaled ({where}): in most cells the "
                "values are whole multiples of the cell's smallest one (counts times a scale), expm1(values) are "
                "not; pass input_values='normalized' for normalised values"
            )
        base = _other_log_base(data, indptr)
        if base is not None:
            raise ValueError(_OTHER_BASE_ERROR.format(declared="log1p", base=base, where=where))


def _check_normalized(data: np.ndarray, indptr: np.ndarray, integral: bool, where: str, linear: Uncertainty,
                      unlogged: Uncertainty) -> None:
    largest = data.max()
    if float(largest) >= MAX_COUNT:
        raise ValueError(
            f"input_values='normalized' but a value is {float(largest):.6g} ({where}): normalised expression is far "
            "below 2**31 (CPM is at most 10**6); pass the normalised matrix, or input_values='counts' for raw counts"
        )
    if not integral and _share_of_count_multiples(data, indptr, uncertainty=linear) < 0.5:  # not counts x a scale
        # (values above MAX_LOG1P are no log1p values, which the "log1p" rules refuse: clipped to it, they were all
        # equal, so whole multiples, and normalised cells whose smallest count is 2 or more were told to pass log1p)
        if largest <= MAX_LOG1P and _share_of_count_multiples(np.expm1(data, dtype=np.float64), indptr,
                                                              uncertainty=unlogged) >= 0.5:
            raise ValueError(
                f"input_values='normalized' but the values look log1p-scaled ({where}): in most cells expm1(values) "
                "are whole multiples of the cell's smallest one (counts times a scale), the values themselves are "
                "not; pass input_values='log1p'"
            )
        base = _other_log_base(data, indptr) if largest <= MAX_LOG1P else None
        if base is not None:
            raise ValueError(_OTHER_BASE_ERROR.format(declared="normalized", base=base, where=where))
    totals = _row_sums(data, indptr)
    totals = totals[totals > 0]
    if len(totals) < 2:
        return
    if integral and _spread(totals) > 0:
        raise ValueError(
            f"input_values='normalized' but every value is an integer and the cells' totals differ ({where}): "
            "these look like raw counts; pass input_values='counts'"
        )
    # Values shown linear (counts times a per-cell scale, among the cells with two different values: a cell of equal
    # values, such as a shallow cell of ones, is a multiple in log1p too) are left alone.
    if (largest <= MAX_LOG1P and not integral and _spread(totals) > 0.01
            and _share_of_count_multiples(data, indptr, telling_only=True, uncertainty=linear) < 0.5):
        unlogged_totals = _row_sums(np.expm1(data, dtype=np.float64), indptr)
        unlogged_totals = unlogged_totals[unlogged_totals > 0]
        # a coefficient of variation, not the range (which grows with the cells): log1p values rounded to 2
        # decimals keep their totals within 0.06% (0.3% range over 256 cells)
        if unlogged_totals.std() < 0.002 * unlogged_totals.mean():
            raise ValueError(
                f"input_values='normalized' but the values look log1p-scaled ({where}): the cells' totals of "
                f"expm1(values) agree (about {float(unlogged_totals.mean()):.6g}) while their totals differ; pass "
                "input_values='log1p'"
            )


_OTHER_BASE_ERROR = (
    "input_values='{declared}' but the values look like log{base}(x + 1) ({where}): in most cells {base}**values - 1 "
    "are whole multiples of the cell's smallest one (counts times a scale), the values and expm1(values) are not. "
    "Pass the counts, or log1p values (the natural logarithm: scanpy's default base): if these are log{base}(x + 1), "
    "X = np.log1p(np.power({base}.0, X) - 1) converts them (input_values='log1p')"
)


def _other_log_base(data: np.ndarray, indptr: np.ndarray, tolerance: float = 1e-3) -> int | None:
    """2 or 10 where base**values - 1 are whole multiples of the cell's smallest one (counts times a scale: log2 or
    log10 of normalised counts, e.g. scanpy's `log1p(base=2)`) in most cells that can tell, and in more of them than
    expm1(values) are, else None. A cell can tell with at least 3 different multiples between 1.5 and 20 of its
    smallest value: equal values are multiples always, and at a large multiple the relative tolerance (for rounded
    data) admits any value. Values far below 1 (log1p of fractions) look alike in every base: there the natural
    logarithm is as likely, and nothing is refused."""
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    positive = data > 0
    data, rows = np.asarray(data[positive], dtype=np.float64), rows[positive]
    if not len(data):
        return None
    order = np.lexsort((data, rows))  # each cell's values ascending: its smallest first, equal values together
    data, rows = data[order], rows[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    counts = np.diff(np.r_[starts, len(data)])
    different = np.r_[True, (rows[1:] != rows[:-1]) | (data[1:] != data[:-1])]

    def share_of_multiples(base: float) -> float:
        """The share of the cells that can tell in which base**values - 1 are whole multiples."""
        with np.errstate(over="ignore"):
            unlogged = np.power(base, np.minimum(data, MAX_LOG1P)) - 1.0
        ratios = unlogged / np.repeat(unlogged[starts], counts)
        telling = different & (ratios > 1.5) & (ratios <= 20)
        whole = np.abs(ratios - np.rint(ratios)) <= tolerance * ratios
        cells_telling = np.add.reduceat(telling, starts) >= 3
        cells_whole = np.add.reduceat(telling & ~whole, starts) == 0
        return float((cells_whole & cells_telling).sum() / cells_telling.sum()) if cells_telling.any() else 0.0

    natural = share_of_multiples(math.e)
    for base in (2, 10):
        share = share_of_multiples(float(base))
        if share >= 0.5 and share > natural:
            return base
    return None


# A cell whose smallest value is stored less precisely than this (relative) cannot tell multiples from others.
_TELLING_PRECISION = 0.01


def _stored_precision(data: np.ndarray):
    """How far each stored value may lie from the value it stands for, as a function of the values: half its
    float spacing in the stored dtype (float16 keeps 3 significant digits), plus half a unit of the last decimal
    where every value is rounded to 1-4 decimals (scanpy's pbmc68k_reduced keeps 3). Integers: exact."""
    if data.dtype.kind != "f":
        return lambda values: np.zeros(np.shape(values))
    dtype = data.dtype
    rounding = 0.0
    if dtype != np.float16:  # float16's own spacing is already about a third decimal's
        sample = np.asarray(data[:100_000], dtype=np.float64)
        sample = sample[sample > 0]
        slack = np.spacing(sample.astype(dtype)).astype(np.float64)
        for decimals in range(1, 5):
            scaled = sample * 10.0**decimals
            if len(sample) and np.all(np.abs(scaled - np.rint(scaled)) <= 10.0**decimals * slack + 1e-9):
                rounding = 0.5 * 10.0**-decimals
                break
    return lambda values: np.spacing(np.asarray(values).astype(dtype)).astype(np.float64) / 2 + rounding


def _share_of_count_multiples(values: np.ndarray, indptr: np.ndarray, tolerance: float = 1e-3,
                              telling_only: bool = False, uncertainty=None) -> float:
    """The share of cells whose positive values are all whole multiples (within `tolerance`, relative) of the cell's
    smallest one: normalised counts are (counts x a per-cell scale), so linear normalised data has it and log1p data
    has it after expm1, whatever the depth or the genes kept (the totals rule needs whole cells). A value too large
    for expm1 (infinite) is no multiple. `telling_only`: the share among the cells with two different positive
    values (equal values are multiples in any scale), 0 where no cell has them.

    `uncertainty` (a function of `values`: each one's relative uncertainty from the stored precision) widens the
    tolerance by a value's and its cell's smallest one's, and leaves out the cells whose smallest value is known
    to less than 1% (they cannot tell): log1p values rounded to 3 decimals or stored as float16 drift off whole
    multiples after expm1 (2.001, 7.007), so log1p data declared normalized was taken as linear, most of all a
    cell described alone. NaN where no cell can tell (every comparison with NaN is False: nothing is refused)."""
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    positive = values > 0
    values, rows = np.asarray(values[positive], dtype=np.float64), rows[positive]
    if not len(values):
        return 0.0 if telling_only else 1.0
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # each cell's first positive value (CSR order)
    smallest = np.minimum.reduceat(values, starts)
    lengths = np.diff(np.r_[starts, len(values)])
    allowed = np.full(len(values), tolerance)
    can_tell = np.ones(len(starts), dtype=bool)
    if uncertainty is not None:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            smallest_uncertainty = uncertainty(smallest)
            allowed += uncertainty(values) + np.repeat(smallest_uncertainty, lengths)
        can_tell = smallest_uncertainty <= _TELLING_PRECISION
    with np.errstate(invalid="ignore", over="ignore"):
        ratios = values / np.repeat(smallest, lengths)
        off = ~(np.abs(ratios - np.rint(ratios)) <= allowed * np.maximum(ratios, 1.0))
    off_cells = np.add.reduceat(off, starts) > 0
    if telling_only:
        smallest_entries = np.repeat(smallest, lengths)
        telling = (np.add.reduceat(values != smallest_entries, starts) > 0) & can_tell
        return float((~off_cells[telling]).mean()) if telling.any() else 0.0
    if not can_tell.any():
        return float("nan")
    return float(1.0 - off_cells[can_tell].mean())


def rank_values(
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


# ----------------------------------------------------------------------------- row chunks and threads


def _canonical_csr(matrix: Any) -> sp.csr_matrix:
    """A canonical CSR matrix of a scipy sparse matrix or array (the caller's arrays stay as they are): entries
    repeated for one cell and gene are summed (scipy's reading of them), integers narrower than 64 bits widened
    first, as scipy sums in the stored dtype and wraps (uint8 200 + 100 gave 44: another gene ranked first, exit 0)."""
    dtype = matrix.dtype
    if not getattr(matrix, "has_canonical_format", True) and dtype.kind in "iu" and dtype.itemsize < 8:
        matrix = matrix.astype(np.int64 if dtype.kind == "i" else np.uint64)  # COO sums as it converts to CSR
    matrix = sp.csr_matrix(matrix)
    if not matrix.has_canonical_format:
        matrix = matrix.copy()  # csr_matrix(matrix) shares a CSR matrix's arrays
        matrix.sum_duplicates()
    return matrix


def _csr_parts(matrix: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, data) of a canonical CSR version of a scipy sparse matrix or array."""
    matrix = _canonical_csr(matrix)
    return matrix.indptr, matrix.indices, matrix.data


def iter_csr_chunks(matrix: Any, chunk_size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
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
        yield (start, *_csr_parts(as_csr(block)))


def require_numeric(dtype: np.dtype) -> None:
    """Refuse expression values that are not numbers (strings, objects, complex) or are booleans (a binarised
    matrix: every expressed gene would count 1, and cells would be ranked by their genes' medians alone)."""
    if dtype.kind == "b":
        raise ValueError("expression values are booleans (a binarised matrix?), which cannot be ranked by "
                         "expression: pass the counts (or normalised or log1p values)")
    if dtype.kind not in "iuf":
        raise ValueError(f"expression values must be numeric, got dtype {dtype}")


def as_csr(block: Any) -> sp.csr_matrix:
    """A CSR matrix of a sparse or dense block of cells (a numpy array, an h5py dataset's rows): float16, which
    scipy.sparse cannot hold, becomes float32, which holds every float16 value exactly. A sparse block comes back
    canonical: entries repeated for one cell and gene are summed (scipy's reading of them, without its wrapping of
    narrow integers: ``_canonical_csr``), as every reader of its entries (the corpus builder's medians, AUCell) takes
    one entry per gene."""
    if sp.issparse(block):
        return _canonical_csr(block)
    block = np.asarray(block)
    require_numeric(block.dtype)
    return sp.csr_matrix(block.astype(np.float32) if block.dtype == np.float16 else block)


def default_threads() -> int:
    """Threads for ranking: the cores this process may use, at most 4 (numpy releases the GIL in its sorts)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def ordered_map(function: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
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


__all__ = [
    "INPUT_VALUES",
    "MAX_COUNT",
    "MAX_LOG1P",
    "NotCountsError",
    "ScaledValuesError",
    "TARGET_SUM",
    "RankedCells",
    "as_csr",
    "check_values",
    "default_threads",
    "expression_bins",
    "iter_csr_chunks",
    "join_chunks",
    "ordered_map",
    "rank_chunk",
    "rank_matrix",
    "rank_values",
    "require_numeric",
]
