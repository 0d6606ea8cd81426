"""The cell inputs a feature extractor accepts, resolved to one row-chunkable matrix and its gene IDs.

AnnData (``X`` or a layer; in memory or backed; gene IDs from ``var`` by ``gene_ids.var_gene_ids``), a pandas
DataFrame of cells x genes (gene IDs or symbols from its columns, cell names from its index; ``gene_ids`` given
with it must equal its columns), a scipy sparse matrix or array, or a 2-D numpy array (with one gene ID per
column). AnnData objects are recognised without importing anndata, so this file travels as remote code: it imports
only numpy, scipy and its siblings.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator, KeysView, Mapping, Sequence, Set, Sized
from typing import Any

import numpy as np
import scipy.sparse as sp

from .gene_ids import ensembl_gene_id, var_gene_ids
from .gene_table import repeated_symbols

# The cell inputs a processor gives the model (gene tokens, their masks, and expression bins for a value-aware
# model): the feature extractor's model_input_names; the model reads them in generation's prefill only.
CELL_INPUT_NAMES = ("gene_input_ids", "gene_attention_mask", "gene_token_mask", "gene_value_ids")

# With skip_empty_cells, the feature extractor also returns the input rows kept and the rows dropped (the rows'
# bookkeeping, not model inputs).
CELL_ROW_KEYS = ("cell_indices", "skipped_cell_indices")


def is_anndata(obj: Any) -> bool:
    """Whether ``obj`` is an AnnData (only when anndata is already imported: an AnnData needs it)."""
    anndata = sys.modules.get("anndata")
    return anndata is not None and isinstance(obj, anndata.AnnData)


def is_series(obj: Any) -> bool:
    """Whether ``obj`` is a pandas Series (only when pandas is already imported: a Series needs it)."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(obj, pandas.Series)


def is_dataframe(obj: Any) -> bool:
    """Whether ``obj`` is a pandas DataFrame (only when pandas is already imported: a DataFrame needs it)."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(obj, pandas.DataFrame)


def anndata_matrix(adata: Any, layer: str | None = None, raw: bool = False) -> Any:
    """``adata.X``, ``adata.layers[layer]`` or ``adata.raw.X`` (``raw``). A view of a backed AnnData (or of one whose
    matrix is read from its file, ``AnnData(X=anndata.io.sparse_dataset(...))``) is read from the file here (a backed
    AnnData's layers are held in memory, and read as any view's: a negative slice of them is taken). A slice
    of one with a negative start, stop or step is refused before reading: anndata reads some wrongly, exit 0
    (``backed[-5:-2]`` of a CSR file: the counts of the cells after the ones named, the view's names unchanged; a
    reversed slice of a CSR file's genes or a CSC file's cells: in the file's order, under reversed names), and fails
    on others with its own words (a reshape, an index pointer size). This names the fix."""
    lazy = adata.is_view and _read_from_file(adata, layer, raw)
    if lazy:
        axes = [("cells", getattr(adata, "_oidx", None))] + ([] if raw else [("genes", getattr(adata, "_vidx", None))])
        negative = [name for name, index in axes if isinstance(index, slice)
                    and any(bound is not None and bound < 0 for bound in (index.start, index.stop, index.step))]
        if negative:
            examples = {"cells": "backed[n - 5 : n - 2] with n = backed.n_obs",
                        "genes": "backed[:, m - 5 : m - 2] with m = backed.n_vars"}
            raise ValueError(
                f"anndata could not read these {' and '.join(negative)} of the backed file: it reads a slice with a "
                "negative start, stop or step of one wrongly (backed[-5:-2] of a CSR file gave the counts of the "
                "cells after the ones named) or not at all. Slice it with non-negative bounds in increasing order "
                f"({'; '.join(examples[name] for name in negative)}), or pass adata.to_memory()[rows]")
    try:
        return adata.raw.X if raw else adata.X if layer is None else adata.layers[layer]
    except ValueError as error:
        if not lazy:
            raise
        # the axes the view selects (a view of genes was said to be of "these cells", with a fix selecting rows)
        selected = [name for name, index in axes if not (isinstance(index, slice) and index == slice(None))]
        fix = {("cells",): "rows", ("genes",): ":, genes", ("cells", "genes"): "rows, genes"}.get(tuple(selected),
                                                                                                  "rows")
        raise ValueError(f"anndata could not read these {' and '.join(selected) or 'cells'} of the backed file "
                         f"({error}): pass adata.to_memory()[{fix}]") from error


def _read_from_file(view: Any, layer: str | None, raw: bool) -> bool:
    """Whether a view's matrix is read from a file (a backed AnnData's X or raw.X, or any parent matrix that is no
    numpy or scipy matrix in memory but a dataset of a file), where anndata slices it itself. Told by the matrix,
    not by ``isbacked``: a backed AnnData's layers are in memory, and anndata reads a negative slice of them right."""
    parent = getattr(view, "_adata_ref", None)
    try:
        source = parent.raw.X if raw else parent.X if layer is None else parent.layers[layer]
    except (AttributeError, KeyError):
        return False
    return source is not None and not isinstance(source, (np.ndarray, sp.spmatrix, sp.sparray))


def check_gene_ids_in_var_order(
    gene_ids: Sequence[Any], var: Any, where: str, symbol_to_gene: Mapping[str, str] | None = None
) -> None:
    """Refuse `gene_ids` given with an AnnData that name its genes (its var index or a text column of var) in
    another order: the values of one gene would be read as another's. Names are compared as the genes they name
    (as `match_genes` reads them: Ensembl ids without version or case, symbols through `symbol_to_gene`), so ids
    with a version suffix, in lower case, or symbols for a var of Ensembl ids are checked too.

    Taken: gene ids equal to one naming at every position. Refused: any naming that holds at least half of the
    given genes that name a vocabulary gene (another text column holds few) with one of them at another position.
    So one gene without a mapping, a column with gaps agreeing on the genes it names, or a vocabulary smaller than
    var (its symbols mostly unmapped) no longer let a reordered list through. Names naming no known gene are
    compared as written; a name given twice (10x features with repeated symbols, or a symbol beside its make_unique
    copy) places no gene. Also refused:
    other genes altogether (another dataset's list of as many genes), where every naming of var disagrees with
    them at more than half of the positions where it names a vocabulary gene (a list correcting a few of var's names
    is taken)."""
    symbol_to_gene = symbol_to_gene or {}
    vocabulary = set(symbol_to_gene.values())

    def gene(name: Any) -> tuple[str, bool, bool]:
        """(the gene a name names, whether it names a vocabulary gene, whether it names a gene at all)"""
        text = str(name).strip()
        known = ensembl_gene_id(text) or symbol_to_gene.get(text)
        return (known, known in vocabulary or not vocabulary, True) if known else (text, False, False)

    def genes(names: Sequence[Any]) -> list[tuple[str, bool, bool]]:
        """`gene` of each name; a symbol named twice (GOLGA8M beside its make_unique copy GOLGA8M-1) places no gene,
        as `match_genes` reads none (`gene_table.repeated_symbols`)."""
        texts = [str(name).strip() for name in names]
        unread = repeated_symbols(texts, symbol_to_gene)
        return [(text, False, False) if text in unread else gene(text) for text in texts]

    given = genes(gene_ids)
    namings = {"index": genes(var.index)}
    namings.update({column: genes(var[column].values) for column in var.columns
                    if var[column].dtype == object or str(var[column].dtype) in ("category", "string", "str")})
    named = {column: [name for name, _, _ in names] for column, names in namings.items()}
    genes = [name for name, _, _ in given]
    if any(genes == names for names in named.values()):
        return  # in one naming's order
    resolved = sum(known for _, known, _ in given) or len(given)
    given_counts = Counter(genes)
    for column, names in named.items():
        if len(names) != len(genes):
            continue
        counts = Counter(names)
        position = {name: j for j, name in enumerate(names) if counts[name] == 1}
        shared = [(i, position[name]) for i, name in enumerate(genes)
                  if name in position and given_counts[name] == 1]  # a name given twice (10x symbols) places none
        if 2 * len(shared) >= resolved and any(i != j for i, j in shared):
            raise ValueError(
                f"gene_ids name the genes of {where} ({column}) in another order: the values of one gene would be "
                "read as another's. Leave gene_ids out (the genes are read from var), or pass them in var's order."
            )
    # Other genes altogether (another dataset's gene list of the same length): refused where every naming of var's
    # genes disagrees with them at most positions where var names a vocabulary gene and gene_ids a gene (a list
    # correcting a few names agrees; var's ids of another species, given with their human orthologs, name none)
    votes = {column: [g == n for (g, _, g_gene), (n, n_known, _) in zip(given, names) if g_gene and n_known]
             for column, names in namings.items() if len(names) == len(given)}
    votes = {column: vote for column, vote in votes.items() if vote}
    if votes and all(2 * sum(vote) < len(vote) for vote in votes.values()):
        column, vote = next(iter(votes.items()))
        raise ValueError(
            f"gene_ids name other genes than {where} ({column}) at {len(vote) - sum(vote)} of the {len(vote)} "
            "positions where it names one of the model's genes: the values of one gene would be read as another's. "
            "Leave gene_ids out (the genes are read from var), or pass the genes of these cells, in var's order."
        )


def check_gene_ids_ordered(gene_ids: Any) -> None:
    """Refuse `gene_ids` that are not one gene per column in the columns' order: a set (its order is Python's hash
    order, which changes from run to run, so each column's values were read as another gene's, exit 0), a single
    string, or an iterator (no length to check against the columns)."""
    if isinstance(gene_ids, (str, bytes)):
        raise TypeError(f"gene_ids must be a list of gene IDs, one per column, got the string {gene_ids!r}: wrap it "
                        "in a list for a single gene.")
    if isinstance(gene_ids, Set) and not isinstance(gene_ids, KeysView):
        raise TypeError(f"gene_ids must list one gene ID per column in the columns' order, got a "
                        f"{type(gene_ids).__name__}, whose order is not the columns': pass a list (e.g. "
                        "list(adata.var_names)).")
    if not isinstance(gene_ids, Sized):
        raise TypeError(f"gene_ids must list one gene ID per column, got a {type(gene_ids).__name__} without a "
                        "length: pass a list (list(gene_ids)).")


def check_not_records(cells: Any) -> None:
    """Refuse cells given as records (a dict of gene -> value per cell, or a list of them), as tokenized inputs (a
    dict of `CELL_INPUT_NAMES`, which were called records) or as an iterator of rows: they were read as a 1-D or 0-D
    matrix, and the error named its shape or asked for gene_ids."""
    tokenized = sorted(set(cells) & set(CELL_INPUT_NAMES)) if isinstance(cells, Mapping) else []
    if tokenized:
        raise TypeError(f"cells given as tokenized inputs ({', '.join(tokenized)}): expression is taken here (a cells "
                        "x genes matrix with gene_ids, a pandas DataFrame or an AnnData). Pass the counts, or give the "
                        "tokenized cells to the processor, processor(gene_input_ids=...), and its output to "
                        "model.generate.")
    first = cells[0] if isinstance(cells, Sequence) and not isinstance(cells, (str, bytes)) and len(cells) else None
    if isinstance(cells, Mapping) or isinstance(first, Mapping):
        raise TypeError("cells given as records (gene -> value per cell): pass pandas.DataFrame(records) (or "
                        "pandas.DataFrame([record]) for one cell), whose columns name the genes.")
    if isinstance(cells, Iterator):
        raise TypeError(f"cells given as a {type(cells).__name__} of rows: pass a cells x genes matrix "
                        "(numpy.stack(list(rows))) with gene_ids, or a pandas DataFrame.")


def resolve_input(
    cells: Any, gene_ids: Sequence[Any] | None, layer: str | None, symbol_to_gene: Mapping[str, str]
) -> tuple[Any, Sequence[Any], Sequence[str] | None]:
    """(row-chunkable matrix, gene IDs, obs names or None) for any accepted input.

    ``symbol_to_gene`` (the vocabulary's symbols) picks the ``var`` column of symbol input where an AnnData's
    ``gene_ids`` are not given. CSC input is converted to CSR once (slicing CSC rows per chunk is slow).
    """
    obs_names = None
    if gene_ids is not None:
        check_gene_ids_ordered(gene_ids)
    if is_anndata(cells):
        if layer is not None and layer not in cells.layers:
            raise KeyError(f"layer {layer!r} not in adata.layers (available: {list(cells.layers.keys())})")
        matrix = anndata_matrix(cells, layer)
        if matrix is None:
            raise ValueError("adata.X is None; pass layer=... naming the layer that holds the counts")
        if gene_ids is None:
            gene_ids = var_gene_ids(cells.var, symbol_to_gene)
        else:
            check_gene_ids_in_var_order(gene_ids, cells.var, "adata.var", symbol_to_gene)
        obs_names = cells.obs_names  # indexed only to name cells in messages
    elif layer is not None:
        raise ValueError("layer= applies to AnnData input only")
    elif is_dataframe(cells):  # cells x genes, as scanpy's adata.to_df() gives: genes from the columns
        # bool columns too (a flag such as is_doublet; beside numbers it made every value an object)
        other = [str(c) for c, kind in zip(cells.columns, (d.kind for d in cells.dtypes)) if kind not in "iuf"]
        if other:
            raise ValueError(f"DataFrame columns that are not expression values: {other[:5]}; pass the genes' "
                             "columns only (e.g. frame.select_dtypes('number'))")
        # pandas' nullable and sparse dtypes (Int64, Float32, Sparse[float32]) give an object array with pd.NA: read
        # as floats, NA as NaN (which the value checks refuse by name), in float32 where every column's values are
        # float32, so that they rank as the same cells in an AnnData do (float32 normalises in float32)
        extension = any(not isinstance(dtype, np.dtype) for dtype in cells.dtypes)
        if extension:
            values = np.result_type(*(getattr(d, "numpy_dtype", None) or getattr(d, "subtype", None) or d
                                      for d in cells.dtypes))
            matrix = cells.to_numpy(dtype=np.float32 if values == np.float32 else np.float64, na_value=np.nan)
        else:
            matrix = cells.to_numpy()
        columns = [str(column) for column in cells.columns]
        if gene_ids is not None and [str(gene) for gene in gene_ids] != columns:
            raise ValueError(
                "gene_ids were given with a DataFrame whose columns name other genes (or the same in another order): "
                "a DataFrame's genes are its columns. Rename the columns (frame.columns = gene_ids) and leave "
                "gene_ids out, or pass frame.to_numpy() with gene_ids."
            )
        gene_ids = columns
        obs_names = cells.index.astype(str)
    else:
        check_not_records(cells)
        matrix = cells
        if gene_ids is None and is_series(cells):
            raise ValueError("one cell given as a pandas Series: pass series.to_frame().T, a one-row DataFrame whose "
                             "columns name the genes (the Series' index)")
        if gene_ids is None:
            raise ValueError("gene_ids is required for matrix input (one Ensembl ID or symbol per column); a pandas "
                             "DataFrame or an AnnData carries its own")
    if isinstance(matrix, (np.ndarray, np.matrix)) or (not sp.issparse(matrix) and not hasattr(matrix, "shape")):
        matrix = np.asarray(matrix)
        if matrix.ndim != 2:
            raise ValueError(f"expected a 2-D cells x genes matrix, got shape {matrix.shape}")
    elif sp.issparse(matrix) and matrix.format == "csc":
        matrix = matrix.tocsr()  # one conversion instead of slow CSC row slicing per chunk
    if len(matrix.shape) != 2:  # a pandas Series (df.iloc[0]), a 1-D tensor or sparse array: one cell's values
        raise ValueError(f"expected a 2-D cells x genes matrix, got shape {tuple(matrix.shape)}; one cell's values "
                         "need a row: values[None, :] (or df.iloc[[0]] for a DataFrame's row)")
    if len(gene_ids) != matrix.shape[1]:
        raise ValueError(f"got {len(gene_ids)} gene IDs for a matrix with {matrix.shape[1]} columns (genes)")
    return matrix, gene_ids, obs_names


def format_cells(indices: np.ndarray, obs_names: Sequence[str] | None, first_row: int = 0) -> str:
    """The first ten of ``indices`` (rows relative to ``first_row``) as row numbers with their obs names."""
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
        f"{format_cells(empty, obs_names, first_row)}. Filter them out (e.g. sc.pp.filter_cells(adata, "
        "min_genes=...)) or pass skip_empty_cells=True."
    )


__all__ = ["anndata_matrix", "check_gene_ids_in_var_order", "empty_cells_error", "format_cells", "is_anndata",
           "resolve_input"]
