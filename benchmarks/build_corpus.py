"""Benchmark the corpus builder end to end on synthetic backed h5ad files.

Each file: N cells x 20,000 real human genes (Ensembl IDs in var, symbols in
var["feature_name"], the default gene-set library's genes first), about 2,000 non-zero integer counts per
cell, CELLxGENE obs columns with 8 donors and real CL / UBERON / MONDO / HsapDv ids. Files are
written chunk by chunk (200k cells take about 3 GB) and kept in --workdir for reruns (under their name once
whole: an interrupted write leaves only a ``.partial`` file, written again by the next run). Each size
is built in its own subprocess (``--backed``, pathway scoring on, histogram medians) so peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is per size.

    python benchmarks/build_corpus.py                     # 50,000 and 200,000 cells
    python benchmarks/build_corpus.py --sizes 50000       # quick run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CELL_TYPES = ["CL:0000236", "CL:0000624", "CL:0000625", "CL:0000623", "CL:0001054", "CL:0000451", "CL:0000233"]
TISSUES = ["UBERON:0000178", "UBERON:0002048", "UBERON:0002107"]
DISEASES = ["PATO:0000461", "MONDO:0004992", "MONDO:0005148"]
SEXES = ["PATO:0000383", "PATO:0000384"]
STAGES = ["HsapDv:0000160", "HsapDv:0000226", "HsapDv:0000237", "HsapDv:0000240"]


def pick_genes(n_genes: int) -> tuple[list[str], list[str]]:
    """n real genes (Ensembl, symbol): every gene of the default GMT first, then others."""
    from modeling_cell2text.gene_table import load_gene_table
    from processing.pathways import DEFAULT_GMT, read_gmt

    table = {symbol: gene for gene, symbol, _ in load_gene_table()}
    in_sets = sorted({g for genes in read_gmt(DEFAULT_GMT).values() for g in genes if g in table})
    others = sorted(set(table) - set(in_sets))
    symbols = (in_sets + others)[:n_genes]
    order = sorted(range(len(symbols)), key=lambda i: table[symbols[i]])
    return [table[symbols[i]] for i in order], [symbols[i] for i in order]


def make_obs(n_cells: int, rng: np.random.Generator) -> pd.DataFrame:
    donor = rng.integers(0, 8, n_cells)
    pick = lambda values, idx: pd.Categorical(np.asarray(values)[idx])  # noqa: E731
    return pd.DataFrame(
        {
            "cell_type_ontology_term_id": pick(CELL_TYPES, rng.integers(0, len(CELL_TYPES), n_cells)),
            "cell_type": "",
            "tissue_ontology_term_id": pick(TISSUES, donor % len(TISSUES)),
            "tissue": "",
            "disease_ontology_term_id": pick(DISEASES, donor % len(DISEASES)),
            "disease": "",
            "sex_ontology_term_id": pick(SEXES, donor % 2),
            "sex": "",
            "development_stage_ontology_term_id": pick(STAGES, donor % len(STAGES)),
            "development_stage": "",
            "donor_id": pick([f"donor_{i}" for i in range(8)], donor),
            "dataset_id": "synthetic",
            "is_primary_data": True,
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )


def write_synthetic_h5ad(path: Path, n_cells: int, n_genes: int = 20_000, nnz: int = 2_000, chunk: int = 10_000) -> None:
    """Write a CSR h5ad chunk by chunk (never the whole matrix in memory)."""
    from anndata.io import write_elem

    rng = np.random.default_rng(0)
    gene_ids, symbols = pick_genes(n_genes)
    draws = int(nnz * 1.05)  # sampling with replacement; ~2,000 distinct genes remain
    with h5py.File(path, "w") as f:
        write_elem(f, "obs", make_obs(n_cells, rng))
        write_elem(f, "var", pd.DataFrame({"feature_name": symbols}, index=gene_ids))
        group = f.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 20,))
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 20,))
        indptr = [np.zeros(1, dtype=np.int64)]
        for start in range(0, n_cells, chunk):
            n = min(chunk, n_cells - start)
            cols = np.sort(rng.integers(0, n_genes, (n, draws), dtype=np.int32), axis=1)
            keep = np.ones_like(cols, dtype=bool)
            keep[:, 1:] = cols[:, 1:] != cols[:, :-1]
            values = rng.geometric(0.3, int(keep.sum())).astype(np.float32)
            old = data.shape[0]
            data.resize((old + len(values),))
            indices.resize((old + len(values),))
            data[old:] = values
            indices[old:] = cols[keep]
            indptr.append(old + np.cumsum(keep.sum(axis=1)))
        group.create_dataset("indptr", data=np.concatenate(indptr))
        for key in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
            write_elem(f, key, {})


def run_one(path: Path, out: Path) -> dict:
    """Build a corpus from one backed file in this process; report speed and peak RSS."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from processing.build_corpus import BuildOptions, build_corpus
    from processing.sources import h5ad_source

    start = time.perf_counter()
    source = h5ad_source(path, backed=True)
    summary = build_corpus(source, out, BuildOptions(medians="histogram", progress=False, overwrite=True))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cells = summary["num_cells_in"]
    return {"cells": cells, "kept": sum(summary["splits"].values()), "seconds": round(seconds, 1),
            "cells_per_s": round(cells / seconds), "peak_rss_mb": round(peak_mb)}


def main(argv: list[str] | None = None) -> None:
    from cell2text_cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cell2text_bench"))
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # internal: build one file
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run_one(args.run, args.out)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        path = args.workdir / f"synthetic_{size}.h5ad"
        if not path.exists():
            start = time.perf_counter()
            # an interrupted write left a file under the final name, read by every later run as the whole one
            partial = path.with_name(f"{path.name}.partial")
            write_synthetic_h5ad(partial, size)
            partial.replace(path)
            print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")
        out = args.workdir / f"corpus_{size}"
        proc = subprocess.run([sys.executable, __file__, "--run", str(path), "--out", str(out)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{size:>9,} cells: {result['cells_per_s']:,} cells/s end to end ({result['seconds']} s), "
              f"peak RSS {result['peak_rss_mb']:,} MB, kept {result['kept']:,}")
    if len(results) > 1:
        growth = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"] - 1
        print(f"peak RSS growth from {results[0]['cells']:,} to {results[-1]['cells']:,} cells: {growth:+.1%}")


if __name__ == "__main__":
    main()
