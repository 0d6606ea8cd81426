"""Describe single cells with a trained Cell2Text model, scanpy-style: `tl.describe` writes into `adata.obs`.

    python examples/describe_cells.py                                  # the demo model on 8 pbmc68k cells
    python examples/describe_cells.py --model DIR_OR_REPO --h5ad cells.h5ad --input-values counts
    python examples/describe_cells.py --model DIR_OR_REPO --h5ad cellxgene.h5ad --use-raw   # counts in adata.raw
    python examples/describe_cells.py --free --max-new-tokens 80      # the description as the model writes it

Run `bash scripts/main.sh` first to train the demo model (outputs/demo/cell2text-demo). The same through the
pipeline: `pipeline("cell-to-text", model=..., trust_remote_code=True)(adata)`, one dict per cell.
"""

import argparse

import scanpy as sc

from cell2text_cli import positive_int
from modeling_cell2text import tl
from modeling_cell2text.argument_types import as_command_line, refused_input_as_one_line

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="outputs/demo/cell2text-demo")
parser.add_argument("--h5ad", help="your cells (default: scanpy's pbmc68k_reduced, log1p-normalised .raw)")
parser.add_argument("--input-values", default=None, choices=["counts", "normalized", "log1p"])
parser.add_argument("--layer", default=None, help="the layer of --h5ad holding the expression (default X)")
parser.add_argument("--use-raw", action="store_true",
                    help="read adata.raw of --h5ad (CELLxGENE's layout: normalised X, counts in raw)")
parser.add_argument("--cells", type=positive_int, default=8,
                    help="how many of the first cells to describe (default 8)")
parser.add_argument("--free", action="store_true",
                    help="let the model write the whole description (default: every field chosen among its labels)")
parser.add_argument("--max-new-tokens", type=int, default=None,
                    help="longest free description in tokens (with --free; default 160)")
args = parser.parse_args()
if (args.layer is not None or args.use_raw) and not args.h5ad:  # the stand-in's values are read from its .raw
    parser.error("--layer and --use-raw read your --h5ad: add --h5ad")
if args.max_new_tokens is not None and not args.free:  # a constrained description is written whole: it was ignored
    parser.error("--max-new-tokens bounds free descriptions: add --free")

# Refused input (an --h5ad that cannot be read, values that are not what --input-values says, a model folder that is
# not one) ends with one line.
with refused_input_as_one_line("describe_cells", as_command_line):
    if args.h5ad:
        adata, use_raw = tl.read_h5ad(args.h5ad), args.use_raw
        input_values = args.input_values or "counts"
    else:
        adata, use_raw = sc.datasets.pbmc68k_reduced(), True  # .raw: log1p of normalised counts, gene symbols
        input_values = args.input_values or "log1p"
    adata = adata[: args.cells].copy()
    tl.describe(adata, args.model, layer=args.layer, use_raw=use_raw, input_values=input_values, batch_size=8,
                constrained=False if args.free else None, max_new_tokens=args.max_new_tokens)
for name, row in adata.obs.iterrows():
    print(f"{name}: {row['cell2text_cell_type']} ({row['cell2text_cell_type_ontology_term_id']})")
    print(f"    {row['cell2text_description']}")
print(f"model and parameters: adata.uns['cell2text'] = {adata.uns['cell2text']}")
