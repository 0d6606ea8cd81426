"""The one owner of gene-ID rules, used by the corpus builder and by the feature extractor at inference.

* An **Ensembl gene ID** is ``ENS`` + optional species letters + ``G`` + digits, with an optional ``.version``
  suffix that is stripped (``ENSG00000141510.17`` -> ``ENSG00000141510``; ``ENSMUSG...`` too), in any case
  (``ensg00000141510`` -> ``ENSG00000141510``, as Geneformer upper-cases them). Anything else
  (transcript IDs ``ENST...``, ``..._PAR_Y`` copies, symbols) is not an Ensembl gene ID.
* A **gene symbol** names the one gene that carries it. A symbol carried by several genes names the only
  protein-coding gene among them; with several protein-coding genes, or several genes and none protein-coding,
  it is ambiguous and names no gene (it is reported as unmatched, never guessed). A symbol no gene carries now
  names the gene HGNC renamed from it, where it was the previous symbol of one gene only (``IGJ`` -> JCHAIN;
  ``gene_table``), except in an input that names that gene by its current symbol too (``superseded_symbols``). A
  symbol an input also holds as anndata's make_unique copy (``GOLGA8M`` beside ``GOLGA8M-1``) names no gene
  (``gene_table.repeated_symbols``, as it needs the table's symbols).
  Matching is exact (case-sensitive), as HGNC symbols are.
* An AnnData's gene IDs are read from ``var``: its index or the first column (``ENSEMBL_VAR_COLUMNS`` first) that
  holds Ensembl IDs, else the symbol source (index or ``SYMBOL_VAR_COLUMNS``) that names the most vocabulary genes.

Standard library only: this module travels with the feature extractor as the model's remote code.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

ENSEMBL_GENE_PATTERN = re.compile(r"^(ENS[A-Z]*G\d+)(\.\d+)?$")
#: ``var`` columns that usually hold Ensembl gene IDs, in the order they are tried (before any other column);
#: CELLxGENE's ``feature_id`` first. The corpus builder (processing/sources.py) tries the same columns.
ENSEMBL_VAR_COLUMNS = ("feature_id", "gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "ensembl_gene_id")
#: ``var`` columns that usually hold gene symbols (CELLxGENE: ``feature_name``).
SYMBOL_VAR_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "symbol", "gene_name")
_SAMPLE = 2000


def ensembl_gene_id(value: Any) -> str | None:
    """Unversioned, upper-case Ensembl gene ID of ``value`` (surrounding spaces ignored), or None if it is not
    one."""
    match = ENSEMBL_GENE_PATTERN.match(str(value).strip().upper())
    return match.group(1) if match else None


def looks_ensembl(values: Sequence[Any]) -> bool:
    """Whether most of (the first 2,000 of) ``values`` are Ensembl gene IDs."""
    sample = list(values[:_SAMPLE])
    return bool(sample) and sum(ensembl_gene_id(v) is not None for v in sample) > 0.5 * len(sample)


def resolve_symbols(genes: Iterable[tuple[str, str, bool]]) -> dict[str, str]:
    """Symbol -> Ensembl ID from ``(ensembl_id, symbol, is_protein_coding)`` rows, by the module's rule.

    Symbols that are ambiguous under the rule are left out, so they map to no gene.
    """
    holders: dict[str, list[tuple[str, bool]]] = {}
    for gene_id, symbol, coding in genes:
        holders.setdefault(symbol, []).append((gene_id, bool(coding)))
    resolved = {}
    for symbol, candidates in holders.items():
        if len(candidates) == 1:
            resolved[symbol] = candidates[0][0]
            continue
        coding_ids = [gene_id for gene_id, coding in candidates if coding]
        if len(coding_ids) == 1:
            resolved[symbol] = coding_ids[0]
    return resolved


#: The warning (``%d`` count, ``%s`` examples) where ``superseded_symbols`` leaves columns unread, in the corpus builder
#: and at inference alike.
SUPERSEDED_WARNING = ("%d symbols are previous symbols of genes the input also names by their current symbol, and are "
                      "not read (e.g. %s); where joined files split a gene between its two names, add such a column "
                      "into the current symbol's")


def superseded_symbols(
    names: Iterable[str], symbol_to_gene: Mapping[str, str], gene_symbols: Mapping[str, str]
) -> set[str]:
    """The ``names`` that are a previous symbol of a gene (``symbol_to_gene`` maps them to a gene whose symbol in
    ``gene_symbols`` is another) that ``names`` also hold the current symbol of. They name no gene: an input with both
    IGJ and JCHAIN (two files joined) reads JCHAIN's column, whatever the columns' order, in the corpus builder and at
    inference alike, as before previous symbols were read (since, the corpus builder read the first of the two and
    inference refused the pair)."""
    names = set(names)
    return {name for name in names if (gene := symbol_to_gene.get(name)) is not None
            and gene_symbols.get(gene, name) != name and gene_symbols[gene] in names
            and symbol_to_gene.get(gene_symbols[gene]) == gene}


#: The warning (``%d`` count, ``%s`` examples) where ``repeated_symbols`` leaves columns unread, in the corpus builder and
#: at inference alike.
REPEATED_WARNING = ("%d symbols named two or more columns of the input (their make_unique copies, SYMBOL-1 or R's "
                    "SYMBOL.1, are there too) and are not read (e.g. %s): which column is the gene a symbol names, "
                    "the names do not say. Give the genes' Ensembl IDs (var['gene_ids'], as scanpy's read_10x_mtx keeps them)")


def check_one_column_per_gene(names: Sequence[str], genes: Sequence[str | None], examples: int = 5) -> None:
    """Refuse input columns that name one gene after ID mapping (``genes``: each column's gene, None where it gives no
    tokens; ``names``: the columns' names, for the message): ``ENSG00000000003.14`` beside ``.15``, a symbol beside
    its gene's ID. Geneformer's tokenizer sums them (``collapse_gene_ids``); one column alone holds part of the gene's
    counts. The corpus builder and inference follow this one rule (the builder kept the first column, a file that
    inference refused)."""
    first_seen: dict[str, int] = {}
    duplicates = []
    for column, (name, gene) in enumerate(zip(names, genes)):
        if gene is None:
            continue
        if gene in first_seen:
            duplicates.append(f"{name!r} (column {column}) = {gene} (column {first_seen[gene]})")
        else:
            first_seen[gene] = column
    if duplicates:
        raise ValueError(
            f"{len(duplicates)} input genes duplicate another input gene after ID mapping: "
            f"{'; '.join(duplicates[:examples])}. Sum the duplicated columns into one (docs/model.md, \"Rank-value "
            "encoding\", shows how with AnnData), or remove them.")


#: 10x's ``var`` column of each feature's kind (scanpy's ``read_10x_h5``): only its ``GENE_EXPRESSION`` rows are genes.
FEATURE_TYPES_COLUMN, GENE_EXPRESSION = "feature_types", "Gene Expression"


def var_gene_source(var: Any, symbol_to_gene: Container[str]) -> tuple[str, list[str], bool]:
    """Where an AnnData ``var`` (a pandas DataFrame) names its genes: (``"index"`` or the column's name, its values
    as strings, one per column of the matrix, whether they are Ensembl IDs). The corpus builder and inference both
    read ``var`` through this, so one file gives one gene per column in training and in use.

    Ensembl IDs are preferred: the index, else the first string column that holds them (``ENSEMBL_VAR_COLUMNS``
    first). Else symbols: the index or a ``SYMBOL_VAR_COLUMNS`` column, whichever holds most of
    ``symbol_to_gene`` (the index on ties). A 10x feature other than gene expression (``FEATURE_TYPES_COLUMN``: an
    antibody "CD4" or "CD19" of CITE-seq, a CRISPR guide) is given as "", which names no gene: read as a symbol
    among Ensembl IDs, its counts were that gene's expression.
    """
    source, values, are_ensembl = _named_genes(var, symbol_to_gene)
    if FEATURE_TYPES_COLUMN in getattr(var, "columns", ()):
        kinds = [str(kind) for kind in var[FEATURE_TYPES_COLUMN].values]
        other = sum(kind != GENE_EXPRESSION for kind in kinds)
        if other and GENE_EXPRESSION in kinds:  # 10x's words: a column of other words says nothing of genes
            logger.info("%d var rows are features other than %r (var[%r]) and name no gene", other, GENE_EXPRESSION,
                        FEATURE_TYPES_COLUMN)
            values = [value if kind == GENE_EXPRESSION else "" for value, kind in zip(values, kinds)]
    return source, values, are_ensembl


def _named_genes(var: Any, symbol_to_gene: Container[str]) -> tuple[str, list[str], bool]:
    """``var_gene_source``'s choice of the index or column naming the genes, before other 10x features are left
    out."""
    if looks_ensembl([str(v) for v in var.index[:_SAMPLE]]):
        return "index", [str(v) for v in var.index], True
    columns = [c for c in var.columns if var[c].dtype == object or str(var[c].dtype) in ("category", "string", "str")]
    ordered = [c for c in ENSEMBL_VAR_COLUMNS if c in columns] + [c for c in columns if c not in ENSEMBL_VAR_COLUMNS]
    for column in ordered:
        if looks_ensembl(var[column].astype(str).values[:_SAMPLE]):
            logger.info("Reading Ensembl gene IDs from var[%r]", column)
            return column, [str(v) for v in var[column].values], True
    candidates = {"index": [str(v) for v in var.index]}
    for column in [c for c in SYMBOL_VAR_COLUMNS if c in columns]:
        candidates[column] = [str(v) for v in var[column].values]
    hits = {name: sum(v in symbol_to_gene for v in values) for name, values in candidates.items()}
    best = max(hits, key=lambda name: hits[name])  # first best wins: the index on ties
    logger.info("Reading gene symbols from var %s (%d of them name genes)", best, hits[best])
    return best, candidates[best], False


def var_gene_ids(var: Any, symbol_to_gene: Container[str]) -> list[str]:
    """The gene IDs of an AnnData ``var``, one per column of the matrix: Ensembl IDs or symbols, as
    ``var_gene_source`` chooses them."""
    return var_gene_source(var, symbol_to_gene)[1]
