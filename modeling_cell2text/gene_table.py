"""The packaged human gene table: Ensembl gene ID <-> gene symbol (GENCODE v48), and HGNC's previous symbols.

The table ``data/gene_table.tsv.gz`` is built by ``scripts/make_gene_table.py`` from the
CELLxGENE schema's GENCODE file, ``data/previous_symbols.tsv.gz`` from HGNC's complete set (the symbols of renamed
genes, each naming one gene and carried by no GENCODE gene now). They are read lazily (first use) with
``importlib.resources``.
This module uses only the standard library so that it can travel with the model's remote code;
there the data file may be absent, and :func:`load_gene_table` then raises ``FileNotFoundError``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import logging
from collections.abc import Container, Iterable, Sequence

from .gene_ids import resolve_symbols

logger = logging.getLogger(__name__)

TABLE_FILE = "gene_table.tsv.gz"
PREVIOUS_SYMBOLS_FILE = "previous_symbols.tsv.gz"


def _packaged_rows(name: str) -> list[list[str]]:
    """The tab-separated rows of the packaged file ``data/<name>``."""
    package = __package__ or "modeling_cell2text"
    try:
        raw = importlib.resources.files(package).joinpath("data").joinpath(name).read_bytes()
    except (FileNotFoundError, ModuleNotFoundError, TypeError) as error:
        raise FileNotFoundError(
            f"The packaged gene table {package}/data/{name} is not available ({error}). "
            "Install Cell2Text from its repository (pip install . in a checkout) or pass gene_symbols explicitly."
        ) from error
    return [line.split("\t") for line in gzip.decompress(raw).decode("utf-8").splitlines()]


@functools.lru_cache(maxsize=1)
def load_gene_table() -> tuple[tuple[str, str, bool], ...]:
    """Return the packaged rows ``(ensembl_id, symbol, is_protein_coding)``, sorted by ID."""
    return tuple((gene_id, symbol, coding == "1") for gene_id, symbol, coding in _packaged_rows(TABLE_FILE))


@functools.lru_cache(maxsize=1)
def load_previous_symbols() -> tuple[tuple[str, str], ...]:
    """Return the packaged rows ``(previous_symbol, ensembl_id)``: HGNC's symbols of renamed genes, sorted."""
    return tuple((symbol, gene_id) for symbol, gene_id in _packaged_rows(PREVIOUS_SYMBOLS_FILE))


def ensembl_to_symbol(gene_ids: Iterable[str] | None = None) -> dict[str, str]:
    """Map Ensembl gene IDs (unversioned) to symbols; IDs without a symbol are left out.

    With ``gene_ids=None`` the whole table is returned.
    """
    table = {gene_id: symbol for gene_id, symbol, _ in load_gene_table()}
    if gene_ids is None:
        return table
    return {gene_id: table[gene_id] for gene_id in gene_ids if gene_id in table}


@functools.lru_cache(maxsize=1)
def symbol_index() -> dict[str, str]:
    """Symbol -> Ensembl ID over the whole table, by the one rule of :func:`gene_ids.resolve_symbols`, plus the
    renamed genes' previous symbols (the table holds none that a GENCODE gene carries now, so a current symbol always
    wins, also an ambiguous one)."""
    return {**resolve_symbols(load_gene_table()), **dict(load_previous_symbols())}


def symbol_to_ensembl(symbols: Iterable[str]) -> dict[str, str]:
    """Map gene symbols to Ensembl gene IDs with the packaged GENCODE v48 table.

    Returns a dict holding only the symbols that map (unknown and ambiguous symbols are left
    out, so ``len(result)`` counts the matches); the rule for a symbol several genes carry is
    :func:`gene_ids.resolve_symbols`'s (the only protein-coding one, else none). A symbol no gene carries now
    names the gene HGNC renamed from it, where that is one gene (``IGJ``: JCHAIN's ID).
    """
    index = symbol_index()
    return {symbol: index[symbol] for symbol in symbols if symbol in index}


@functools.lru_cache(maxsize=1)
def table_symbols() -> frozenset[str]:
    """Every symbol the table's genes carry now or carried before (previous symbols)."""
    return frozenset(symbol for _, symbol, _ in load_gene_table()) | {s for s, _ in load_previous_symbols()}


def vocabulary_symbols(genes: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(gene -> symbol, symbol -> gene) for the vocabulary ``genes``, for a feature extractor's symbol input.

    Symbols, current and previous, resolve over the whole table as the corpus builder resolves them
    (``symbol_to_ensembl``), then are kept where they name a vocabulary gene. ({}, {}) with a logged warning where
    the table is not available (remote code without the data file): symbol input is then not mapped.
    """
    try:
        symbols = ensembl_to_symbol(genes)
        index = symbol_index()
    except FileNotFoundError as error:
        logger.warning("%s Symbol input will not be mapped.", error)
        return {}, {}
    vocabulary = set(genes)
    return symbols, {symbol: gene for symbol, gene in index.items() if gene in vocabulary}


#: How make_unique joins a repeated name and its count: anndata (scanpy) "-", R (Seurat) ".".
_COPY_SEPARATORS = ("-", ".")


def repeated_symbols(names: Iterable[str], symbol_to_gene: Container[str]) -> set[str]:
    """The symbols among ``names`` (those ``symbol_to_gene`` maps) that ``names`` also hold as anndata's make_unique
    copies (``S-1``, ``S-2``, as scanpy's ``read_10x_mtx`` names a repeated name's later columns; ``S.1``, as R's
    ``make.unique`` in Seurat's ``Read10X`` does: a name of that form that is no gene's symbol). The file named two or
    more columns S:
    two genes carry GOLGA8M, CAST or SIGLEC5, the symbol rule names the protein-coding one, and make_unique gave the
    bare symbol to the file's first column, whichever gene it holds: another gene's counts were read as that gene's,
    exit 0. They name no gene (nor do the copies), in the corpus builder and at inference alike."""
    names = set(names)
    copies = [(name, base) for name in names for separator in _COPY_SEPARATORS
              if (parts := name.rpartition(separator))[1] and (base := parts[0]) in names and parts[2].isdigit()]
    if not copies:
        return set()
    known = _table_symbols()
    return {base for name, base in copies if base in symbol_to_gene and name not in symbol_to_gene and name not in known}


def _table_symbols() -> frozenset[str]:
    """Every symbol of the packaged gene table (none where remote code runs without it): ``IGHV1-69-2`` is a gene,
    no copy of ``IGHV1-69``."""
    try:
        return table_symbols()
    except FileNotFoundError:
        return frozenset()
