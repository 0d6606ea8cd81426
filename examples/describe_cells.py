"""Describe single cells with a trained Cell2Text model through the `cell-to-text` pipeline.

    python examples/describe_cells.py                                  # the demo model on 8 pbmc68k cells
    python examples/describe_cells.py --model DIR_OR_REPO --h5ad cells.h5ad --input-values counts

Run `bash scripts/main.sh` first to train the demo model (outputs/demo/cell2text-demo).
"""

import argparse

import anndata as ad
import scanpy as sc
from transformers import pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="outputs/demo/cell2text-demo")
parser.add_argument("--h5ad", help="your cells (default: scanpy's pbmc68k_reduced, log1p-normalised .raw)")
parser.add_argument("--input-values", default=None, choices=["counts", "normalized", "log1p"])
parser.add_argument("--cells", type=int, default=8)
parser.add_argument("--max-new-tokens", type=int, default=160)
args = parser.parse_args()

if args.h5ad:
    adata = ad.read_h5ad(args.h5ad)
    input_values = args.input_values or "counts"
else:
    adata = sc.datasets.pbmc68k_reduced().raw.to_adata()  # log1p of normalised counts, gene symbols
    input_values = args.input_values or "log1p"

describe = pipeline("cell-to-text", model=args.model, trust_remote_code=True)
results = describe(adata[: args.cells], batch_size=8, input_values=input_values, max_new_tokens=args.max_new_tokens)
for name, result in zip(adata.obs_names[: args.cells], results):
    print(f"{name}: {result['cell_type']} ({result['cell_type_ontology_term_id']})")
    print(f"    {result['description']}")
