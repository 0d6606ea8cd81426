"""Cells per second of the cell-to-text pipeline at batch size 1 and 16, and the share of time outside `generate`.

    python benchmarks/generation.py [--model outputs/demo/cell2text-demo] [--cells 256] [--new-tokens 32]

Every cell gets exactly `--new-tokens` new tokens (min_new_tokens = max_new_tokens), so batch sizes do the same
work. The time outside `generate` is the pipeline's own: feature extraction, prompts, padding, decoding and
parsing. Targets (issue #5): batch 16 >= 4x the cells/s of batch 1; outside-generate share < 10%.
Without the demo model folder (made by the main job) a tiny random model is built, and the output says so.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "outputs" / "demo" / "cell2text-demo"
ENSEMBL = re.compile(r"^ENS[A-Z]*G\d+$")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="saved model + processor folder")
    parser.add_argument("--cells", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per cell (fixed)")
    parser.add_argument("--genes-per-cell", type=int, default=1500, help="expressed genes per synthetic cell")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def model_folder(requested: Path) -> tuple[Path, str]:
    """The requested folder, or a tiny random model when it does not exist (said in the returned label)."""
    if (requested / "config.json").exists():
        return requested, f"model {requested}"
    sys.path.insert(0, str(REPO / "tests"))
    from test_pipeline import save_tiny_model_folder

    folder = save_tiny_model_folder(Path(tempfile.mkdtemp(prefix="cell2text-bench-")), trained=False)
    return folder, f"FALLBACK: {requested} not found; a tiny random model (2-layer, hidden 32) at {folder}"


def synthetic_cells(gene_ids: list[str], n_cells: int, genes_per_cell: int, seed: int = 0) -> sp.csr_matrix:
    """Integer counts; each cell expresses `genes_per_cell` random vocabulary genes (or all, if fewer)."""
    rng = np.random.default_rng(seed)
    per_cell = min(genes_per_cell, len(gene_ids))
    rows = np.repeat(np.arange(n_cells), per_cell)
    cols = np.concatenate([rng.choice(len(gene_ids), per_cell, replace=False) for _ in range(n_cells)])
    counts = rng.negative_binomial(2, 0.3, size=len(rows)) + 1
    return sp.csr_matrix((counts.astype(np.float32), (rows, cols)), shape=(n_cells, len(gene_ids)))


class GenerateTimer:
    """Wraps `model.generate` on the instance and adds up the seconds spent inside it."""

    def __init__(self, model):
        self.seconds = 0.0
        self._generate = model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._generate(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import pipeline
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder, label = model_folder(args.model)
    describe = pipeline("cell-to-text", model=str(folder), trust_remote_code=True, device=args.device)
    vocabulary = [g for g in describe.processor.feature_extractor.gene_token_ids if ENSEMBL.match(g)]
    cells = synthetic_cells(vocabulary, args.cells, args.genes_per_cell)
    timer = GenerateTimer(describe.model)
    generation = {"min_new_tokens": args.new_tokens, "max_new_tokens": args.new_tokens}
    describe(cells[:2], gene_ids=vocabulary, batch_size=2, **generation)  # warm-up

    print(label)
    print(f"{args.cells} cells, {len(vocabulary)} vocabulary genes, {cells.getnnz(axis=1).mean():.0f} expressed "
          f"per cell, {args.new_tokens} new tokens per cell, device {args.device}")
    rates = {}
    for batch_size in args.batch_sizes:
        timer.seconds = 0.0
        start = time.perf_counter()
        results = describe(cells, gene_ids=vocabulary, batch_size=batch_size, **generation)
        wall = time.perf_counter() - start
        assert len(results) == args.cells
        rates[batch_size] = args.cells / wall
        outside = 1 - timer.seconds / wall
        print(f"batch size {batch_size:>3}: {rates[batch_size]:8.2f} cells/s  wall {wall:7.2f} s  "
              f"outside generate {outside:6.1%}")
    if 1 in rates and 16 in rates:
        speedup = rates[16] / rates[1]
        print(f"batch 16 / batch 1: {speedup:.1f}x cells/s (target >= 4x)")


if __name__ == "__main__":
    main()
