"""Build a Cell2Text training corpus from your own h5ad file.

    python examples/build_corpus_from_h5ad.py --h5ad cells.h5ad --out outputs/my_corpus

The h5ad needs raw counts (X or --layer) and CELLxGENE-schema obs columns: at least
`cell_type_ontology_term_id`, ideally `tissue_ontology_term_id`, `disease_ontology_term_id`,
`sex_ontology_term_id`, `development_stage_ontology_term_id` and `donor_id` (rename yours with
`--obs-map OLD=NEW`, e.g. `--obs-map patient=donor_id`).
Without --h5ad, this writes such a file from scanpy's pbmc68k_reduced first, so the script runs offline as is.
"""

import sys
from pathlib import Path

# processing/ and training/ run from a checkout (they are not installed): put the checkout on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json

import scanpy as sc

from modeling_cell2text.argument_types import as_command_line, refused_input_as_one_line
from processing.build_corpus import BuildOptions, build_corpus, parse_obs_map
from processing.presets import pbmc68k_cell_type_ids
from processing.sources import h5ad_source

parser = argparse.ArgumentParser()
parser.add_argument("--h5ad")
parser.add_argument("--out", default="outputs/example_corpus")
parser.add_argument("--layer", default=None, help="the layer holding the counts (default X)")
parser.add_argument("--use-raw", action="store_true", help="the counts are in adata.raw (CELLxGENE's layout)")
parser.add_argument("--input-values", default="counts", choices=["counts", "normalized", "log1p"])
parser.add_argument("--obs-map", nargs="*", action="extend", metavar="OLD=NEW",
                    help="rename an obs column to its CELLxGENE name (repeatable)")
parser.add_argument("--overwrite", action="store_true", help="replace the corpus already in --out")
args = parser.parse_args()

h5ad = args.h5ad
input_values = args.input_values
if h5ad is None:
    # A stand-in for your file: pbmc68k_reduced with CELLxGENE obs columns and ten made-up donors (the splits are
    # donor-disjoint: with two donors, validation and test would be empty).
    adata = sc.datasets.pbmc68k_reduced().raw.to_adata()
    adata.obs["cell_type_ontology_term_id"] = adata.obs["bulk_labels"].astype(str).map(pbmc68k_cell_type_ids())
    adata.obs["tissue_ontology_term_id"] = "UBERON:0000178"  # blood
    adata.obs["disease_ontology_term_id"] = "PATO:0000461"  # normal
    adata.obs["donor_id"] = [f"donor_{i % 10}" for i in range(adata.n_obs)]
    # its own name beside --out (with_suffix(".h5ad") replaced a user's "cells.h5ad" next to --out cells)
    h5ad = str(Path(args.out).with_name(Path(args.out).name + ".stand-in.h5ad"))
    Path(h5ad).parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(h5ad)
    input_values = "log1p"  # pbmc68k_reduced ships log1p-normalised values, not counts

# Refused input (a missing layer or column, values that are not counts, an existing --out) ends with one line.
with refused_input_as_one_line("build_corpus_from_h5ad", as_command_line):
    source = h5ad_source(h5ad, backed=True, layer=args.layer, use_raw=args.use_raw, input_values=input_values,
                         obs_map=parse_obs_map(args.obs_map))
    summary = build_corpus(source, args.out, BuildOptions(seed=0, overwrite=args.overwrite))
print(json.dumps({k: summary[k] for k in ("num_cells_in", "splits", "rejected", "gene_vocabulary_size")}, indent=2))
print(f"corpus written to {args.out}; load it with datasets.load_from_disk({args.out!r})")
# To fine-tune an already trained Cell2Text on this corpus, build it with the model's gene vocabulary instead:
#   python -m processing.build_corpus --h5ad cells.h5ad --feature-extractor outputs/demo/cell2text-demo --out DIR
