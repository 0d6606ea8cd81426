"""The Census / TileDB-SOMA path, offline: a local SOMA experiment written from real cells gives
the same corpus as the same cells read from an h5ad file."""

import os

import anndata
import datasets
import numpy as np
import pandas as pd
import pytest

from processing.build_corpus import BuildOptions, build_corpus
from processing.presets import pbmc68k_reduced
from processing.sources import DEFAULT_SOMA_FILTER, SomaSource, h5ad_source

tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
os.environ["HF_HUB_OFFLINE"] = "1"


def _census_like_pbmc() -> anndata.AnnData:
    """pbmc68k cells in the CELLxGENE/Census schema: Ensembl var with feature_id/feature_name,
    donors, sex, development stage, is_primary_data; X = normalised values (expm1 of .raw.X)."""
    source = pbmc68k_reduced()
    adata = source.adata
    mapped = np.array([g is not None for g in source.gene_ids])
    ids = np.array(source.gene_ids, dtype=object)[mapped]
    var = pd.DataFrame({"feature_id": ids, "feature_name": np.array(source.gene_symbols)[mapped]}, index=ids)
    X = adata.X[:, mapped].copy()
    X.data = np.expm1(X.data).astype(np.float32)
    obs = adata.obs.copy()
    rng = np.random.default_rng(0)
    n = adata.n_obs
    donor = rng.integers(0, 10, n)
    obs["donor_id"] = [f"donor_{d}" for d in donor]
    obs["sex_ontology_term_id"] = np.where(donor % 2, "PATO:0000383", "PATO:0000384")
    obs["sex"] = np.where(donor % 2, "female", "male")
    obs["development_stage_ontology_term_id"] = np.where(donor % 3, "HsapDv:0000237", "unknown")
    obs["development_stage"] = "unknown"
    obs["is_primary_data"] = rng.random(n) > 0.1
    obs["dataset_id"] = "pbmc68k_census_like"
    for column in obs.columns:
        if obs[column].dtype == object:
            obs[column] = obs[column].astype(str)
    return anndata.AnnData(X=X, obs=obs, var=var)


def test_soma_experiment_gives_the_same_corpus_as_h5ad(tmp_path):
    adata = _census_like_pbmc()
    uri = str(tmp_path / "soma")
    tiledbsoma_io.from_anndata(uri, adata, measurement_name="RNA", X_layer_name="raw")
    primary = adata[adata.obs["is_primary_data"].to_numpy()].copy()  # what the Census filter keeps
    primary.write_h5ad(tmp_path / "cells.h5ad")

    options = BuildOptions(progress=False)
    soma = SomaSource(uri, input_values="normalized", obs_value_filter=DEFAULT_SOMA_FILTER)
    assert soma.n_cells == primary.n_obs < adata.n_obs
    soma_summary = build_corpus(soma, tmp_path / "from_soma", options)
    h5ad_summary = build_corpus(h5ad_source(tmp_path / "cells.h5ad", backed=True, input_values="normalized"),
                                tmp_path / "from_h5ad", options)

    assert soma_summary["splits"] == h5ad_summary["splits"]
    assert soma_summary["fingerprints"] == h5ad_summary["fingerprints"]
    a = datasets.load_from_disk(str(tmp_path / "from_soma"))
    b = datasets.load_from_disk(str(tmp_path / "from_h5ad"))
    for split in a:
        assert a[split].to_pandas().equals(b[split].to_pandas())
    # donors never cross splits; the schema fields reach the text
    donors = {s: set(a[s]["donor_id"]) for s in a}
    assert not donors["train"] & donors["validation"] and not donors["train"] & donors["test"]
    assert not donors["validation"] & donors["test"]
    row = next(r for r in a["train"] if r["development_stage_ontology_term_id"])
    assert row["development_stage"] == "third decade stage" and row["age_group"] == "young adulthood"
    assert f"{row['sex']} donor" in row["description"] and "during" in row["description"]
