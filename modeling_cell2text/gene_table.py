"""The packaged human gene table: Ensembl gene ID <-> gene symbol (GENCODE v48).

The table ``data/gene_table.tsv.gz`` is built by ``scripts/make_gene_table.py`` from the
CELLxGENE schema's GENCODE file. It is read lazily (first use) with ``importlib.resources``.
This module uses only the standard library so that it can travel with the model's remote code;
there the data file may be absent, and :func:`load_gene_table` then raises ``FileNotFoundError``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import logging
from collections.abc import Iterable, Sequence

from .gene_ids import resolve_symbols

logger = logging.getLogger(__name__)

TABLE_FILE = "gene_table.tsv.gz"


@functools.lru_cache(maxsize=1)
def load_gene_table() -> tuple[tuple[str, str, bool], ...]:
    """Return the packaged rows ``(ensembl_id, symbol, is_protein_coding)``, sorted by ID."""
    package = __package__ or "modeling_cell2text"
    try:
        resource = importlib.resources.files(package).joinpath("data").joinpath(TABLE_FILE)
        raw = resource.read_bytes()
    except (FileNotFoundError, ModuleNotFoundError, TypeError) as error:
        raise FileNotFoundError(
            f"The packaged gene table {package}/data/{TABLE_FILE} is not available ({error}). "
            "Install Cell2Text from its repository (pip install . in a checkout) or pass gene_symbols explicitly."
        ) from error
    rows = []
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        gene_id, symbol, coding = line.split("\t")
        rows.append((gene_id, symbol, coding == "1"))
    return tuple(rows)


def ensembl_to_symbol(gene_ids: Iterable[str] | None = None) -> dict[str, str]:
    """Map Ensembl gene IDs (unversioned) to symbols; IDs without a symbol are left out.

    With ``gene_ids=None`` the whole table is returned.
    """
    table = {gene_id: symbol for gene_id, symbol, _ in load_gene_table()}
    if gene_ids is None:
        return table
    return {gene_id: table[gene_id] for gene_id in gene_ids if gene_id in table}


@functools.lru_cache(maxsize=1)
def _symbol_index() -> dict[str, str]:
    """Symbol -> Ensembl ID over the whole table, by the one rule of :func:`gene_ids.resolve_symbols`."""
    return resolve_symbols(load_gene_table())


def symbol_to_ensembl(symbols: Iterable[str]) -> dict[str, str]:
    """Map gene symbols to Ensembl gene IDs with the packaged GENCODE v48 table.

    Returns a dict holding only the symbols that map (unknown and ambiguous symbols are left
    out, so ``len(result)`` counts the matches); the rule for a symbol several genes carry is
    :func:`gene_ids.resolve_symbols`'s (the only protein-coding one, else none).
    """
    index = _symbol_index()
    return {symbol: index[symbol] for symbol in symbols if symbol in index}


def vocabulary_symbols(genes: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(gene -> symbol, symbol -> gene) for the vocabulary ``genes``, for a feature extractor's symbol input.

    Symbols resolve over the whole table (``gene_ids.resolve_symbols``), as the corpus builder resolves them, then
    are kept where they name a vocabulary gene. ({}, {}) with a logged warning where the table is not available
    (remote code without the data file): symbol input is then not mapped.
    """
    try:
        symbols = ensembl_to_symbol(genes)
        resolved = symbol_to_ensembl(set(symbols.values()))
    except FileNotFoundError as error:
        logger.warning("%s Symbol input will not be mapped.", error)
        return {}, {}
    vocabulary = set(genes)
    return symbols, {symbol: gene for symbol, gene in resolved.items() if gene in vocabulary}
