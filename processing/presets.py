"""Named corpus sources that ship offline.

``pbmc68k_reduced``: scanpy's bundled 700 PBMCs x 765 genes. Honest handling of what it lacks:

* no raw counts: its ``.raw.X`` is log1p of normalised counts, so the corpus is built from
  ``.raw.X`` with ``input_values="log1p"`` (expm1 undoes the log; ranks and non-zero medians
  of normalised values are unaffected by the missing integer counts);
* no ontology ids: ``obs["bulk_labels"]`` is mapped to Cell Ontology terms with the checked
  table ``processing/data/pbmc68k_bulk_labels.csv``; a label missing from the table is
  rejected as ``unmapped_cell_type``; tissue is blood (UBERON:0000178), disease normal
  (PATO:0000461); sex and development stage are unknown, so the descriptions leave them out;
* no donors: the splits are stratified by cell type instead of donor-disjoint;
* gene symbols only: mapped to Ensembl IDs with the packaged GENCODE table and HGNC's previous symbols of renamed
  genes (750 of 765 map, 50 of them by a previous symbol; the others are reported as unmapped and not used for
  tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from processing.sources import AnnDataSource

#: Hand-checked map of scanpy's pbmc68k_reduced ``bulk_labels`` to Cell Ontology terms, with a rationale per row.
PBMC68K_BULK_LABELS_CSV = Path(__file__).parent / "data" / "pbmc68k_bulk_labels.csv"
BLOOD, NORMAL = ("UBERON:0000178", "blood"), ("PATO:0000461", "normal")


def pbmc68k_cell_type_ids() -> dict[str, str]:
    """pbmc68k_reduced ``bulk_labels`` value -> Cell Ontology term id, in the table's order."""
    table = pd.read_csv(PBMC68K_BULK_LABELS_CSV, dtype=str)
    return dict(zip(table["bulk_label"], table["cell_type_ontology_term_id"]))


def pbmc68k_reduced() -> AnnDataSource:
    """scanpy's pbmc68k_reduced as a CELLxGENE-schema source (see the module doc)."""
    import anndata
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    bulk = adata.obs["bulk_labels"].astype(str)
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    obs["cell_type"] = bulk.to_numpy()
    obs["cell_type_ontology_term_id"] = bulk.map(pbmc68k_cell_type_ids()).to_numpy()
    obs["tissue_ontology_term_id"], obs["tissue"] = BLOOD
    obs["disease_ontology_term_id"], obs["disease"] = NORMAL
    obs["dataset_id"] = "pbmc68k_reduced"
    raw = anndata.AnnData(X=adata.raw.X, obs=obs, var=pd.DataFrame(index=adata.raw.var_names.astype(str)))
    return AnnDataSource(raw, name="scanpy.datasets.pbmc68k_reduced", input_values="log1p")


PRESETS: dict[str, Callable[[], AnnDataSource]] = {"pbmc68k_reduced": pbmc68k_reduced}
