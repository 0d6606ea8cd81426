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


def _census_like_experiment(tmp_path) -> tuple[str, anndata.AnnData]:
    """A local SOMA experiment shaped like the Census: cell ids in observation_joinid (no obs_id column),
    extra obs columns the builder must not read."""
    adata = _census_like_pbmc()
    adata.obs_names = [f"joinid-{i:04d}" for i in range(adata.n_obs)]
    adata.obs["unused_annotation"] = "never read"
    uri = str(tmp_path / "census_like")
    tiledbsoma_io.from_anndata(uri, adata, measurement_name="RNA", X_layer_name="raw",
                               obs_id_name="observation_joinid", var_id_name="feature_id")
    return uri, adata


@pytest.fixture
def obs_reads(monkeypatch):
    """Records the column_names of every SOMA DataFrame read."""
    import tiledbsoma

    calls = []
    original = tiledbsoma.DataFrame.read

    def read(self, *args, **kwargs):
        calls.append((self.uri, kwargs.get("column_names")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tiledbsoma.DataFrame, "read", read)
    return calls


def test_census_like_experiment_ids_version_and_only_used_columns(tmp_path, obs_reads):
    import json

    from processing.sources import SCHEMA_COLUMNS

    uri, adata = _census_like_experiment(tmp_path)
    source = SomaSource(uri, input_values="normalized", census_version="2025-01-30", name="census-like")
    obs_calls = [cols for u, cols in obs_reads if u.rstrip("/").endswith("obs")]
    assert len(obs_calls) == 1 and all(cols is not None for _, cols in obs_reads)  # never "all columns"
    assert set(obs_calls[0]) <= {"soma_joinid", "observation_joinid", *SCHEMA_COLUMNS}
    assert "unused_annotation" not in obs_calls[0] and "bulk_labels" not in obs_calls[0]
    primary = adata.obs_names[adata.obs["is_primary_data"].to_numpy()]
    assert list(source.obs.index) == list(primary)  # observation_joinid is the cell id

    summary = build_corpus(source, tmp_path / "corpus", BuildOptions(progress=False, gmt=None))
    assert summary["census_version"] == "2025-01-30"
    assert json.loads((tmp_path / "corpus" / "summary.json").read_text())["census_version"] == "2025-01-30"
    assert "2025-01-30" in (tmp_path / "corpus" / "README.md").read_text()
    corpus = datasets.load_from_disk(str(tmp_path / "corpus"))
    ids = [c for s in corpus.values() for c in s["cell_id"]] + list(pd.read_csv(tmp_path / "corpus" / "rejects.csv")["cell_id"])
    assert sorted(ids) == sorted(primary)


def test_cli_opens_the_census_as_a_context_manager_at_the_pinned_version(tmp_path, monkeypatch):
    import contextlib
    import sys
    import types

    import tiledbsoma

    from processing.build_corpus import main

    uri, _ = _census_like_experiment(tmp_path)
    events = []

    @contextlib.contextmanager
    def open_soma(census_version=None):
        events.append(("open", census_version))
        with tiledbsoma.Experiment.open(uri) as experiment:
            yield {"census_data": {"homo_sapiens": experiment}}
        events.append(("closed", census_version))

    monkeypatch.setitem(sys.modules, "cellxgene_census", types.SimpleNamespace(open_soma=open_soma))
    summary = main(["--soma", "census", "--census-version", "2024-07-01", "--input-values", "normalized",
                    "--gmt", "none", "--out", str(tmp_path / "out"), "--no-progress"])
    assert events == [("open", "2024-07-01"), ("closed", "2024-07-01")]
    assert summary["census_version"] == "2024-07-01" and "2024-07-01" in summary["source"]


def test_cli_builds_from_a_soma_uri(tmp_path):
    from processing.build_corpus import main

    uri, adata = _census_like_experiment(tmp_path)
    summary = main(["--soma", uri, "--input-values", "normalized", "--gmt", "none", "--obs-filter",
                    "is_primary_data == True", "--out", str(tmp_path / "out"), "--no-progress"])
    assert summary["num_cells_in"] == int(adata.obs["is_primary_data"].sum())
    assert "census_version" not in summary  # not the Census: nothing to pin
