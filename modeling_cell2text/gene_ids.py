"""The one owner of gene-ID rules, used by the corpus builder and by the feature extractor at inference.

* An **Ensembl gene ID** is ``ENS`` + optional species letters + ``G`` + digits, with an optional ``.version``
  suffix that is stripped (``ENSG00000141510.17`` -> ``ENSG00000141510``; ``ENSMUSG...`` too). Anything else
  (transcript IDs ``ENST...``, ``..._PAR_Y`` copies, symbols) is not an Ensembl gene ID.
* A **gene symbol** names the one gene that carries it. A symbol carried by several genes names the only
  protein-coding gene among them; with several protein-coding genes, or several genes and none protein-coding,
  it is ambiguous and names no gene (it is reported as unmatched, never guessed). Matching is exact
  (case-sensitive), as HGNC symbols are.

Standard library only: this module travels with the feature extractor as the model's remote code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

ENSEMBL_GENE_PATTERN = re.compile(r"^(ENS[A-Z]*G\d+)(\.\d+)?$")
_SAMPLE = 2000


def ensembl_gene_id(value: Any) -> str | None:
    """Unversioned Ensembl gene ID of ``value`` (surrounding spaces ignored), or None if it is not one."""
    match = ENSEMBL_GENE_PATTERN.match(str(value).strip())
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
