"""Gene-set (pathway) scoring of single cells with AUCell, vectorised over cells.

AUCell (Aibar et al. 2017, as implemented in pySCENIC/ctxcore): rank a cell's genes by
expression, highest first (rank 0); keep the top ``max_rank`` genes (default: 5% of all
genes, rounded); the AUC of a gene set is the area under its recovery curve up to rank
``max_rank - 1``, which equals ``sum over set genes g with rank r_g < c of (c - r_g)`` with
``c = max_rank - 1``; it is divided by ``(c + 1) * n`` where ``n`` is the number of the set's
genes present in the data (ctxcore/pySCENIC's ``maxauc``).

That raw score favours small sets: its best possible value, reached when the set's genes take
the top ranks, is ``S(min(n, c)) / ((c + 1) * n)`` with ``S(m) = sum_{r < m} (c - r)``, which is
higher for smaller ``n``. ``aucell(..., normalize=True)`` divides the area by that best possible
area ``S(min(n, c))`` instead (R AUCell's ``normAUC``, decoupler's ``aucell``), so every set's
scores span [0, 1] and sets of different sizes can be ranked against each other.

Ties: pySCENIC breaks ties at random. Here a gene in a block of tied values (in particular
the block of all zero-expressed genes at the bottom) gets the mean of ``max(c - r, 0)``
over the ranks ``r`` that block occupies: exactly the expected AUC under random tie
breaking, deterministic, and independent of gene order and of the other cells. In a cell
expressing fewer than ``max_rank`` genes the zero block reaches the top ranks, so a set none of
whose genes the cell expresses scores above 0 from that credit alone: ``expressed_sets_only=True``
(the corpus builder's choice, which names a cell's top sets) scores such a set 0.

Cost: one sort of each chunk's non-zeros plus a sparse product with a genes x sets 0/1
matrix; about 5,000 cells/s for 20k genes, 2k non-zeros per cell and 800 sets on one busy
CPU core.
"""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from modeling_cell2text.description_schema import pathway_name_problem
from modeling_cell2text.gene_table import symbol_to_ensembl
from modeling_cell2text.rank_value import as_csr

logger = logging.getLogger(__name__)

#: Gene Ontology biological processes (Enrichr's GO_Biological_Process_2023, gene symbols): the default
#: library, process-level terms rather than disease pathways.
GO_BIOLOGICAL_PROCESS_GMT = Path(__file__).parent / "data" / "GO_Biological_Process_2023.gmt.gz"
#: WikiPathways 2023 human (801 sets, many disease-level): the library of earlier corpora.
WIKIPATHWAYS_GMT = Path(__file__).parent / "data" / "WikiPathway_2023_Human.gmt.gz"
DEFAULT_GMT = GO_BIOLOGICAL_PROCESS_GMT
#: Gene sets kept by default: 15 to 500 genes in the library (the usual GSEA bounds).
DEFAULT_SET_SIZES = (15, 500)
#: Term ids that libraries append to set names, left out of the text: "(GO:0050863)", "WP23".
_TERM_ID_SUFFIX = re.compile(r"\s+(\(GO:\d+\)|WP\d+)$")


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Read a GMT file (``name<TAB>description<TAB>gene...`` per line; ``.gz`` allowed).

    Genes keep their first-seen order; duplicates and empty fields are dropped; a byte-order mark is read as none
    (it began the first set's name, and so every description naming that set). Raises
    ValueError naming the line for a line without genes, a repeated set name, or a name with a double quote or "; "
    (`description_schema.pathway_name_problem`), and
    naming the file for one that is no UTF-8 text (a .gz file: no intact gzip of one).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    gene_sets: dict[str, list[str]] = {}
    try:
        with opener(path, "rt", encoding="utf-8-sig") as handle:  # -sig: a BOM (a file saved on Windows) is no name
            lines = handle.readlines()
    # a binary file (a .zip, a .pkl) or another encoding: codecs' words only; a .gz file that is no gzip, truncated
    # or corrupt: gzip's and zlib's words only (no file named), or an EOFError traceback
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is no GMT text file (UTF-8, or gzipped as .gz): {error}; give a gene-set library "
                         "in the GMT format, or build without pathways (--gmt none).") from error
    for line_number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        name = fields[0].strip()
        genes = list(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))
        if not name or not genes:
            raise ValueError(
                f"{path}:{line_number}: a GMT line needs a set name, a description field "
                "and at least one gene, separated by tabs."
            )
        if name in gene_sets:
            raise ValueError(f"{path}:{line_number}: gene set {name!r} appears twice; names must be unique.")
        if (problem := pathway_name_problem(name, joined=True)) is not None:  # here, not after the scoring pass
            raise ValueError(f"{path}:{line_number}: gene set name {name!r} {problem}; rename the set in the file.")
        gene_sets[name] = genes
    if not gene_sets:
        raise ValueError(f"{path} holds no gene sets.")
    return gene_sets


def filter_set_sizes(gene_sets: Mapping[str, Sequence[str]], min_size: int, max_size: int) -> dict[str, list[str]]:
    """The sets with ``min_size`` to ``max_size`` genes (in the library); ValueError when none is left."""
    if not 1 <= min_size <= max_size:
        raise ValueError(f"set sizes need 1 <= min <= max, got ({min_size}, {max_size}).")
    kept = {name: list(genes) for name, genes in gene_sets.items() if min_size <= len(genes) <= max_size}
    if not kept:
        raise ValueError(f"no gene set has {min_size} to {max_size} genes; widen the bounds (--pathway-set-sizes).")
    return kept


#: How the corpus builder matches a library's genes to the data's, as its summary records it (shards to join share it:
#: matched as written, a renamed gene counted in none of its sets; matched by Ensembl ID under a symbol two columns
#: carried, at the first of them, another gene).
PATHWAY_GENE_MATCHING = "Ensembl ID at its own column, then symbol"


def unique_gene_names(symbols: Sequence[str]) -> list[str]:
    """The columns' names for gene-set scoring: each column's symbol, or, where an earlier column carries that symbol
    too (two genes of a file named alike, as GENCODE names some), the symbol with its column ("MALL (column 7)"), so
    that ``sets_in_data_symbols`` can write a library gene matched by Ensembl ID as its own column's name: under a
    shared name, ``membership_matrix`` found it at the first column so named, another gene. A name the file already
    gives ("MALL (column 2)") gets the column again, so that no two columns share a name."""
    names: list[str] = []
    taken: set[str] = set()
    for column, symbol in enumerate(symbols):
        name = symbol
        while name in taken:
            name = f"{name} (column {column})"
        names.append(name)
        taken.add(name)
    return names


def sets_in_data_symbols(gene_sets: Mapping[str, Sequence[str]], gene_ids: Sequence[str | None],
                         names: Sequence[str]) -> dict[str, list[str]]:
    """The sets with each library gene written as the data names it, matched by gene rather than by spelling.

    A library symbol that names a gene (``gene_table.symbol_to_ensembl``: current symbols, and the previous symbol
    of a renamed gene) whose Ensembl ID is a column's in ``gene_ids`` is written as that column's name in ``names``
    (the first such column's). Data and library written years apart name a renamed gene differently (pbmc68k_reduced's
    IGJ is GO 2023's JCHAIN); matched as written, such a gene counted in none of its sets. Other library genes stay as
    written, for ``membership_matrix`` to match by spelling. ``names`` must name each column once
    (``unique_gene_names``).
    """
    if len(set(names)) != len(names):
        raise ValueError("names holds a name twice, so a library gene could count at another gene's column; pass "
                         "unique_gene_names(symbols)")
    column_name: dict[str, str] = {}
    for gene_id, name in zip(gene_ids, names):
        if gene_id is not None:
            column_name.setdefault(gene_id, name)
    library_ids = symbol_to_ensembl({gene for genes in gene_sets.values() for gene in genes})
    as_data = {gene: column_name[gene_id] for gene, gene_id in library_ids.items() if gene_id in column_name}
    return {name: list(dict.fromkeys(as_data.get(gene, gene) for gene in genes)) for name, genes in gene_sets.items()}


def display_names(set_names: Sequence[str]) -> list[str]:
    """Set names as they appear in descriptions: the trailing term id ("(GO:0050863)", "WP23") left out,
    except where two sets would then read the same (both keep their full names), so names stay unique."""
    short = [_TERM_ID_SUFFIX.sub("", name) for name in set_names]
    counts: dict[str, int] = {}
    for name in short:
        counts[name] = counts.get(name, 0) + 1
    names = [s if counts[s] == 1 else full for s, full in zip(short, set_names)]
    if len(set(names)) != len(names):
        raise ValueError("gene set names are not unique; read the library with read_gmt, which refuses repeats.")
    return names


def max_auc(sizes: np.ndarray, max_rank: int) -> np.ndarray:
    """Best possible AUC area of sets with ``sizes`` genes present (their genes on the top ranks), per set."""
    return _prefix_credit(np.asarray(sizes, dtype=np.int64), max_rank - 1)


def default_max_rank(n_genes: int, fraction: float = 0.05) -> int:
    """AUCell's default number of top genes: ``round(fraction * n_genes)``, at least 1."""
    return max(1, int(round(fraction * n_genes)))


def membership_matrix(
    gene_names: Sequence[str], gene_sets: Mapping[str, Sequence[str]]
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Sparse genes x sets 0/1 matrix and the number of each set's genes found in ``gene_names``. A set's gene
    not found as written is looked up ignoring case: Enrichr's libraries write open reading frames upper-case
    ("C9ORF78"), GENCODE and CELLxGENE "C9orf78"."""
    position: dict[str, int] = {}
    position_ignoring_case: dict[str, int] = {}
    for i, gene in enumerate(gene_names):
        position.setdefault(gene, i)
        position_ignoring_case.setdefault(str(gene).upper(), i)
    rows, cols = [], []
    for j, genes in enumerate(gene_sets.values()):
        found = {position.get(g, position_ignoring_case.get(str(g).upper())) for g in genes} - {None}
        rows.extend(found)
        cols.extend([j] * len(found))
    data = np.ones(len(rows), dtype=np.float64)
    matrix = sp.csr_matrix((data, (rows, cols)), shape=(len(gene_names), len(gene_sets)))
    sizes = np.asarray(matrix.sum(axis=0)).ravel()
    return matrix, sizes


def _prefix_credit(n: np.ndarray, cutoff: int) -> np.ndarray:
    """``S(n) = sum_{r < n} max(cutoff - r, 0)`` for integer arrays ``n >= 0``."""
    m = np.minimum(n, cutoff).astype(np.float64)
    return m * cutoff - m * (m - 1.0) / 2.0


def _credits(chunk: sp.csr_matrix, n_genes: int, cutoff: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Per-gene AUC credit of one chunk of cells.

    Returns a sparse matrix holding, for each expressed gene, its credit minus the credit of
    a zero-expressed gene of the same cell, and that zero credit per cell.
    """
    n_cells = chunk.shape[0]
    nnz_per_row = np.diff(chunk.indptr)
    row = np.repeat(np.arange(n_cells), nnz_per_row)
    # Each row's values descending: all values by value, then (stable) by row, so rows stay blocks in their order
    # and no cell's values are compared at another cell's scale.
    values = chunk.data.astype(np.float64)
    by_value = np.argsort(-values, kind="stable")
    order = by_value[np.argsort(row[by_value], kind="stable")]
    sorted_values = values[order]
    rank = np.arange(len(order)) - np.repeat(chunk.indptr[:-1], nnz_per_row)
    # Tie blocks: runs of equal values within a row; each member gets the mean credit of the run's ranks.
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (sorted_values[1:] != sorted_values[:-1]) | (row[1:] != row[:-1])
    block = np.cumsum(starts) - 1
    block_first = rank[starts]
    block_row = row[starts]  # sorting keeps rows in place, so row[i] is the row of sorted entry i
    block_size = np.bincount(block)
    block_credit = (
        _prefix_credit(block_first + block_size, cutoff) - _prefix_credit(block_first, cutoff)
    ) / block_size
    n_zero = n_genes - nnz_per_row
    zero_credit = np.zeros(n_cells)
    has_zero = n_zero > 0
    zero_credit[has_zero] = (
        _prefix_credit(np.full(has_zero.sum(), n_genes), cutoff) - _prefix_credit(nnz_per_row[has_zero], cutoff)
    ) / n_zero[has_zero]
    credit = np.empty(len(order))
    credit[order] = (block_credit - zero_credit[block_row])[block]
    keep = credit != 0.0
    matrix = sp.csr_matrix(
        (credit[keep], chunk.indices[keep], np.concatenate([[0], np.cumsum(np.bincount(row[keep], minlength=n_cells))])),
        shape=chunk.shape,
    )
    return matrix, zero_credit


def aucell(
    X: np.ndarray | sp.spmatrix,
    gene_names: Sequence[str],
    gene_sets: Mapping[str, Sequence[str]],
    max_rank: int | None = None,
    chunk_size: int = 1024,
    min_genes: int = 1,
    normalize: bool = False,
    expressed_sets_only: bool = False,
) -> np.ndarray:
    """AUCell scores (cells x sets, float32, in [0, 1]) of every gene set in every cell.

    Args:
        X: cells x genes expression, non-negative (e.g. log-normalised counts), dense or
            sparse; implicit zeros are unexpressed genes.
        gene_names: the gene identifier of each column, in the namespace of ``gene_sets``.
        gene_sets: set name -> genes (e.g. from :func:`read_gmt`); genes missing from
            ``gene_names`` are ignored.
        max_rank: number of top-ranked genes the AUC looks at; default 5% of the genes.
        chunk_size: cells processed at once (bounds memory).
        min_genes: sets with fewer genes present score 0 (and are logged).
        expressed_sets_only: in a cell, a set none of whose genes the cell expresses scores 0 (not the credit of
            the tied zero block, which reaches the top ranks in a cell expressing fewer than ``max_rank`` genes).
        normalize: divide by each set's best possible AUC (R AUCell's ``normAUC``, decoupler) instead
            of ctxcore's ``(max_rank) * genes present``, so that sets of any size can reach 1.
    """
    n_cells, n_genes = X.shape
    if len(gene_names) != n_genes:
        raise ValueError(f"gene_names has {len(gene_names)} entries but X has {n_genes} columns.")
    if not gene_sets:
        raise ValueError("gene_sets is empty; pass at least one gene set.")
    max_rank = default_max_rank(n_genes) if max_rank is None else int(max_rank)
    if not 1 <= max_rank <= n_genes:
        raise ValueError(f"max_rank must be between 1 and the number of genes ({n_genes}), got {max_rank}.")
    cutoff = max_rank - 1
    membership, sizes = membership_matrix(gene_names, gene_sets)
    too_small = sizes < max(min_genes, 1)
    if too_small.any():
        logger.warning(
            "%d of %d gene sets have fewer than %d genes in the data and score 0.",
            int(too_small.sum()), len(sizes), max(min_genes, 1),
        )
    best = max_auc(sizes, max_rank) if normalize else (cutoff + 1.0) * sizes
    denominator = np.where(too_small | (best <= 0), np.inf, best)
    scores = np.empty((n_cells, len(gene_sets)), dtype=np.float32)
    matrix = as_csr(X)
    for start in range(0, n_cells, chunk_size):
        chunk = matrix[start : start + chunk_size]
        chunk.sum_duplicates()
        chunk.eliminate_zeros()
        if chunk.nnz and chunk.data.min() < 0:
            raise ValueError(
                "AUCell needs non-negative expression with zeros for unexpressed genes "
                "(e.g. log1p-normalised counts, adata.raw.X), not scaled data."
            )
        credit, zero_credit = _credits(chunk, n_genes, cutoff)
        auc = (credit @ membership).toarray() + zero_credit[:, None] * sizes[None, :]
        shallow = np.flatnonzero(zero_credit > 0) if expressed_sets_only else []  # unexpressed genes in the top
        if len(shallow):
            expressed = chunk[shallow]
            expressed.data = np.ones_like(expressed.data)
            auc[shallow] *= (expressed @ membership).toarray() > 0  # a set with no expressed gene: 0
        scores[start : start + chunk.shape[0]] = auc / denominator
    return scores


def top_set_indices(scores: np.ndarray, k: int = 2) -> np.ndarray:
    """Indices of the ``k`` best sets per cell, best first (ties: earlier set first), -1 where a set scores 0 or
    there are fewer than ``k`` sets: a set none of whose genes ranks in the cell's top (or, scored with
    ``aucell(..., expressed_sets_only=True)``, none of whose genes the cell expresses) is not the cell's pathway.
    The rule the corpus builder names pathways by (``top_pathways`` gives the names)."""
    scores = np.asarray(scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, order, axis=1)
    top = np.full((scores.shape[0], k), -1, dtype=np.int32)
    top[:, : order.shape[1]] = np.where(best > 0, order, -1)
    return top


def top_pathways(scores: np.ndarray, set_names: Sequence[str], k: int = 2) -> list[list[str]]:
    """Names of the ``k`` highest-scoring sets per cell, best first (ties: earlier set first); a set scoring 0 is
    not named (``top_set_indices``)."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(set_names):
        raise ValueError(f"scores must be cells x {len(set_names)} sets, got shape {scores.shape}.")
    return [[set_names[j] for j in row if j >= 0] for row in top_set_indices(scores, k).tolist()]
