"""Benchmark the rank-value feature extractor: cells/s on random sparse counts.

Default workload (the acceptance target, >= 20,000 cells/s): 10,000 cells x 20,000 genes, about 2,000
non-zero genes per cell (random integer counts, many ties), model input size 4096, one process. The extractor
reproduces Geneformer's arithmetic (float32 count / n_counts * 10,000, float64 division by the median and
comparison) and orders exact ties by token id.

    python benchmarks/feature_extraction.py [--cells 10000] [--genes 20000] [--nnz 2000] [--chunk-size 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp

from cell2text_cli import positive_int
from modeling_cell2text.feature_extraction_cell2text import Cell2TextFeatureExtractor


def random_counts(n_cells: int, n_genes: int, nnz_per_cell: int, seed: int = 0) -> sp.csr_matrix:
    """CSR counts with about ``nnz_per_cell`` genes per cell (varying +-25% across cells).

    Counts are geometric (mostly 1-5), so ties within a cell are common, as in real data.
    """
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_cells, 1000):
        rows = min(1000, n_cells - start)
        rate = nnz_per_cell / n_genes * rng.uniform(0.75, 1.25, size=(rows, 1))
        mask = sp.csr_matrix(rng.random((rows, n_genes), dtype=np.float32) < rate)
        mask.data = rng.geometric(0.3, size=mask.nnz).astype(np.float32)
        blocks.append(mask)
    return sp.vstack(blocks, format="csr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=positive_int, default=10_000)
    parser.add_argument("--genes", type=positive_int, default=20_000)
    parser.add_argument("--nnz", type=positive_int, default=2_000)
    parser.add_argument("--input-size", type=positive_int, default=4096)
    parser.add_argument("--repeats", type=positive_int, default=3)
    # __call__ takes neither setting: it ranks at tokenize's defaults, which its printed line says
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="tokenize's num_threads (default: available cores, at most 4); __call__ runs at the "
                             "default")
    parser.add_argument("--chunk-size", type=positive_int, default=128,
                        help="rows ranked together (tokenize's chunk_size); __call__ runs at the default, 128")
    args = parser.parse_args()

    rng = np.random.default_rng(1)
    genes = [f"ENSG{i:011d}" for i in range(args.genes)]
    medians = dict(zip(genes, rng.uniform(0.5, 5.0, size=args.genes).astype(float)))
    extractor = Cell2TextFeatureExtractor.from_gene_medians(
        medians, gene_symbols={}, model_input_size=args.input_size
    )
    counts = random_counts(args.cells, args.genes, args.nnz)
    print(f"{args.cells} cells x {args.genes} genes, {counts.nnz / args.cells:.0f} non-zero per cell, "
          f"model input size {args.input_size}")
    for name, run in [
        (f"tokenize (ragged token ids, threads {args.threads or 'default'}, chunk size {args.chunk_size})",
         lambda: extractor.tokenize(counts, genes, num_threads=args.threads, chunk_size=args.chunk_size)),
        ("__call__ (padded model inputs, default threads and chunk size)", lambda: extractor(counts, genes)),
    ]:
        best, best_cpu = float("inf"), float("inf")
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, time.process_time() - start_cpu)
        print(f"{name}: {args.cells / best:,.0f} cells/s (best of {args.repeats}: {best:.3f} s wall, "
              f"{best_cpu:.3f} s CPU over all threads)")


if __name__ == "__main__":
    main()
