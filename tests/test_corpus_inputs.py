"""Corpus builder on bad or unusual inputs (issue 9): ontology ids, invalid values, output folder, ids, CLI."""

import json
import os

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from processing.build_corpus import BuildOptions, _ontology_ids, build_corpus, main, parse_args
from processing.presets import pbmc68k_reduced
from processing.sources import AnnDataSource

os.environ["HF_HUB_OFFLINE"] = "1"
N_CELLS, N_GENES = 24, 40
OPTIONS = dict(progress=False, gmt=None)


def _gene_ids() -> list[str]:
    return [g for g in pbmc68k_reduced().gene_ids if g is not None][:N_GENES]


def _tiny_adata(seed: int = 0) -> anndata.AnnData:
    """24 cells x 40 Ensembl genes of integer counts, CELLxGENE obs: B cells and T cells from blood."""
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(N_CELLS, N_GENES)).astype(np.float32)
    X[:, 0] += 1  # every cell has counts
    b_cell = np.arange(N_CELLS) % 2 == 0
    obs = pd.DataFrame(
        {
            "cell_type_ontology_term_id": np.where(b_cell, "CL:0000236", "CL:0000084"),
            "cell_type": np.where(b_cell, "B cell", "T cell"),
            "tissue_ontology_term_id": "UBERON:0000178",
            "tissue": "blood",
            "disease_ontology_term_id": "PATO:0000461",
            "disease": "normal",
        },
        index=[f"cell{i:02d}" for i in range(N_CELLS)],
    )
    ids = _gene_ids()
    return anndata.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=ids))


def _source(adata: anndata.AnnData, **kwargs) -> AnnDataSource:
    return AnnDataSource(adata, name="tiny", **kwargs)


# ------------------------------------------------------------------ ontology ids (issue 9, item 3)


def test_one_unknown_tissue_id_does_not_relabel_the_corpus(tmp_path):
    adata = _tiny_adata()
    adata.obs.loc["cell23", "tissue_ontology_term_id"] = "UBERON:9999999"  # unknown term, label "blood"
    summary = build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert summary["ontology_term_ids"]["tissue"] == {"blood": "UBERON:0000178"}
    assert summary["unknown_ontology_term_ids"] == {"tissue": {"UBERON:9999999": 1}}
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["ontology_term_ids"]["tissue"] == {"blood": "UBERON:0000178"}


def test_a_label_only_an_unknown_id_names_is_a_label_without_id(tmp_path):
    """Its cells' descriptions state it, so the decoder must be able to choose it; its unknown id stays out."""
    adata = _tiny_adata()
    lung = adata.obs_names[:6]
    adata.obs["tissue"] = adata.obs["tissue"].astype(object)
    adata.obs.loc[lung, "tissue"], adata.obs.loc[lung, "tissue_ontology_term_id"] = "lung", "UBERON:9999999"
    summary = build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert summary["ontology_term_ids"]["tissue"] == {"blood": "UBERON:0000178", "lung": None}
    assert summary["unknown_ontology_term_ids"] == {"tissue": {"UBERON:9999999": 6}}


def test_unknown_cell_type_ids_are_named_with_their_cells(tmp_path, caplog):
    """The reviewer's finding: a mistyped id dropped a whole cell type, exit 0, naming no id (rejects.csv gives
    only the reason)."""
    adata = _tiny_adata()
    t_cells = adata.obs["cell_type"] == "T cell"
    adata.obs["cell_type_ontology_term_id"] = adata.obs["cell_type_ontology_term_id"].astype(object)
    adata.obs.loc[t_cells, "cell_type_ontology_term_id"] = "CL:000084"
    with caplog.at_level("WARNING", logger="processing.corpus"):
        build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert "12 cells are rejected for cell-type ids unknown to the bundled Cell Ontology (CL:000084 12 cells)" in \
        caplog.text


def test_an_obsolete_cell_type_without_replacement_is_rejected_and_an_unknown_stage_is_counted(tmp_path):
    """The QA findings: CL:0000013 (obsolete, no replacement) was kept, its text reading "an obsolete dentine
    secreting cell" and the label entering the model's label table; one unknown HsapDv id stopped the whole build
    with a KeyError (now: that cell gets no age group, with a warning)."""
    adata = _tiny_adata()
    adata.obs.loc["cell22", "cell_type_ontology_term_id"] = "CL:0000013"
    adata.obs["development_stage_ontology_term_id"] = "HsapDv:0000126"  # 32-year-old stage
    adata.obs.loc["cell23", "development_stage_ontology_term_id"] = "HsapDv:9999999"
    summary = build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert summary["rejected"] == {"obsolete_cell_type_term": 1}
    assert "obsolete" not in json.dumps(summary["ontology_term_ids"])
    assert sum(summary["splits"].values()) == N_CELLS - 1
    from datasets import load_from_disk

    corpus = load_from_disk(str(tmp_path / "out"))
    ages = {cell: age for split in corpus.values() for cell, age in zip(split["cell_id"], split["age_group"])}
    assert ages["cell23"] is None and ages["cell00"] == "adulthood"


def test_a_label_that_disagrees_with_its_id_is_relabelled_and_said(tmp_path, caplog):
    """The QA finding: "T cell" beside B cell's CL:0000236 became "B cell" without a word (the id wins, as
    documented)."""
    adata = _tiny_adata()
    adata.obs.loc[["cell01", "cell03"], "cell_type_ontology_term_id"] = "CL:0000236"  # labelled "T cell"
    caplog.set_level("INFO", logger="processing.corpus")  # the builder's command line shows INFO
    build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert "2 cells' cell_type labels differ from their ontology term's label" in caplog.text
    assert "'T cell' (CL:0000236) -> 'B cell' for 2 cells" in caplog.text


def test_a_label_naming_two_known_terms_is_an_error_naming_the_cells():
    labels = pd.DataFrame(
        {
            "cell_type": ["B cell"] * 3, "cell_type_ontology_term_id": ["CL:0000236"] * 3,
            "tissue": ["blood", "blood", "blood"],
            "tissue_ontology_term_id": ["UBERON:0000178", "UBERON:0000178", "UBERON:0002371"],
            **{c: [None] * 3 for c in ("disease", "disease_ontology_term_id", "sex", "sex_ontology_term_id")},
        },
        index=["a", "b", "c"],
    )
    with pytest.raises(ValueError, match=r"'blood' names 2 known terms .*UBERON:0002371.*\['c'\]"):
        _ontology_ids(labels, np.ones(3, dtype=bool))


# ------------------------------------------------------------------ invalid values (issue 9, item 5)


def test_invalid_values_get_their_own_reject_reason(tmp_path):
    adata = _tiny_adata()
    X = adata.X.toarray()
    X[1, 3] = np.nan  # was rejected as no_vocabulary_gene
    X[2] = -X[2] - 1  # all negative: was rejected as no_counts
    X[3, 5] = -1.0  # partly negative: stopped the build
    X[4, 7] = np.inf
    X[5] = 0  # no counts at all: still no_counts
    adata.X = sp.csr_matrix(X)
    summary = build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS, chunk_size=4))
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv")
    assert dict(zip(rejects["cell_id"], rejects["reason"])) == {
        "cell01": "invalid_values", "cell02": "invalid_values", "cell03": "invalid_values",
        "cell04": "invalid_values", "cell05": "no_counts",
    }
    assert summary["rejected"] == {"invalid_values": 4, "no_counts": 1}
    assert sum(summary["splits"].values()) == N_CELLS - 5


def test_dense_float16_counts_build_the_float32_corpus(tmp_path):
    # scipy.sparse holds no float16: the build stopped with scipy's dtype error
    adata = _tiny_adata()
    expected = build_corpus(_source(adata), tmp_path / "f32", BuildOptions(**OPTIONS))
    adata.X = adata.X.toarray().astype(np.float16)
    summary = build_corpus(_source(adata), tmp_path / "f16", BuildOptions(**OPTIONS))
    assert summary["fingerprints"] == expected["fingerprints"]


def test_counts_split_over_repeated_entries_build_the_corpus_of_their_sums(tmp_path):
    """A CSR matrix holding one cell and gene's count in two entries (not canonical: scipy, scanpy and toarray()
    read their sum) gave every cell another gene order, exit 0: the medians took each entry as a value of its own."""
    adata = _tiny_adata()
    counts = adata.X.toarray()
    expected = build_corpus(_source(adata), tmp_path / "canonical", BuildOptions(**OPTIONS))
    entries = adata.X.tocoo()
    low = np.floor(entries.data / 2)
    row, col, data = np.r_[entries.row, entries.row], np.r_[entries.col, entries.col], np.r_[entries.data - low, low]
    order = np.argsort(row, kind="stable")
    indptr = np.r_[0, np.cumsum(np.bincount(row, minlength=N_CELLS))]
    adata.X = sp.csr_matrix((data[order], col[order], indptr), shape=adata.shape)
    assert not adata.X.has_canonical_format and (adata.X.toarray() == counts).all()
    summary = build_corpus(_source(adata), tmp_path / "repeated", BuildOptions(**OPTIONS))
    assert summary["fingerprints"] == expected["fingerprints"]
    assert adata.X.nnz == 2 * entries.nnz  # the caller's matrix is left as it was


def test_an_empty_split_is_named_with_the_fix(tmp_path, caplog):
    # two donors fill two donor-disjoint splits: the third was empty without a word
    adata = _tiny_adata()
    adata.obs["donor_id"] = np.where(np.arange(N_CELLS) < N_CELLS // 2, "donor-a", "donor-b")
    summary = build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert sorted(summary["splits"].values())[0] == 0
    assert "the validation and test splits have no cells: 2 donor(s) cannot fill three donor-disjoint splits; pass --fold" in caplog.text
    caplog.clear()
    build_corpus(_source(_tiny_adata()[:4].copy()), tmp_path / "few", BuildOptions(**OPTIONS))  # no donors
    assert "splits have no cells: 4 cells give no split a share of any cell type; pass --fold" in caplog.text
    caplog.clear()
    build_corpus(_source(_tiny_adata()), tmp_path / "full", BuildOptions(**OPTIONS))
    assert "no cells" not in caplog.text


def test_a_split_by_cell_is_said_where_no_cell_has_a_donor(tmp_path, caplog):
    """The QA finding: the donor in a column called `patient` gave a per-cell split (each patient in train,
    validation and test) without a word, in the log, summary.json or the card."""
    from hub_cards.render import write_dataset_card

    adata = _tiny_adata()
    adata.obs["patient"] = np.where(np.arange(N_CELLS) % 4 < 2, "p1", "p2")
    summary = build_corpus(_source(adata), tmp_path / "by-cell", BuildOptions(**OPTIONS))
    assert summary["split_by"] == "cell"
    assert "no cell has a donor_id: cells are split one by one" in caplog.text and "--obs-map" in caplog.text
    assert "cells are split one by one" in str(write_dataset_card(tmp_path / "by-cell", "org/x"))
    caplog.clear()
    adata.obs["donor_id"] = adata.obs.pop("patient")
    summary = build_corpus(_source(adata), tmp_path / "by-donor", BuildOptions(**OPTIONS))
    assert summary["split_by"] == "donor" and "no cell has a donor_id" not in caplog.text
    assert "Whole donors go to one split" in str(write_dataset_card(tmp_path / "by-donor", "org/x"))


def test_obs_map_onto_an_existing_column_uses_the_mapped_one(tmp_path, caplog):
    """The QA finding: `--obs-map author_ct=cell_type_ontology_term_id` where that column exists stopped with a
    traceback "ValueError: 2" (the rename left two columns of one name)."""
    adata = _tiny_adata()
    adata.obs["author_ct"] = "CL:0000236"  # every cell a B cell by the author's ids
    summary = build_corpus(_source(adata, obs_map={"author_ct": "cell_type_ontology_term_id"}), tmp_path / "out",
                           BuildOptions(**OPTIONS))
    assert summary["ontology_term_ids"]["cell_type"] == {"B cell": "CL:0000236"}
    assert "['cell_type_ontology_term_id'] are replaced" in caplog.text
    with pytest.raises(ValueError, match=r"maps several columns onto \['donor_id'\]"):
        _source(adata.copy(), obs_map={"author_ct": "donor_id", "cell_type": "donor_id"})


def test_counts_in_adata_raw_are_read_with_use_raw(tmp_path):
    """The QA finding: CELLxGENE files hold raw counts in adata.raw; the builder could not read them (--layer raw
    gave a KeyError traceback)."""
    counts = _tiny_adata()
    raw_layout = counts.copy()
    raw_layout.raw = counts  # counts and their genes in raw
    raw_layout.X = raw_layout.X.multiply(1.5).tocsr()  # X: something else (not counts)
    expected = build_corpus(_source(counts), tmp_path / "x", BuildOptions(**OPTIONS))
    built = build_corpus(_source(raw_layout, use_raw=True), tmp_path / "raw", BuildOptions(**OPTIONS))
    assert built["fingerprints"] == expected["fingerprints"]  # the same tokens, texts and splits
    with pytest.raises(ValueError, match="adata.raw is None"):
        _source(counts, use_raw=True)
    path = tmp_path / "raw.h5ad"
    raw_layout.write_h5ad(path)
    cli = main(["--h5ad", str(path), "--use-raw", "--gmt", "none", "--out", str(tmp_path / "cli"), "--no-progress"])
    assert cli["splits"] == expected["splits"] and cli["gene_vocabulary_size"] == expected["gene_vocabulary_size"]


def test_a_chunk_of_only_empty_or_invalid_cells_is_rejected_not_fatal(tmp_path):
    # numpy's bincount of no values is int64: a chunk whose cells had no stored values stopped the build
    adata = _tiny_adata()
    X = adata.X.toarray()
    X[4:8] = 0  # the second chunk of 4: no counts
    X[8:12] = -1  # the third: invalid values only
    adata.X = sp.csr_matrix(X)
    summary = build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS, chunk_size=4))
    assert summary["rejected"] == {"invalid_values": 4, "no_counts": 4}
    assert sum(summary["splits"].values()) == N_CELLS - 8


@pytest.mark.parametrize(
    "spoil, reason, fix",
    [
        (lambda a: a.obs.__setitem__("cell_type_ontology_term_id", None), "unmapped_cell_type",
         "cell_type_ontology_term_id"),
        (lambda a: setattr(a, "X", sp.csr_matrix(-a.X.toarray())), "invalid_values", "raw counts"),
    ],
)
def test_every_cell_rejected_stops_naming_the_reason_and_the_fix(tmp_path, spoil, reason, fix):
    # was: "no gene is expressed in any kept cell" (labels) or an empty corpus
    adata = _tiny_adata()
    spoil(adata)
    with pytest.raises(ValueError, match=f"every cell was rejected .*'{reason}': {N_CELLS}.*{fix}"):
        build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert not (tmp_path / "out").exists()


def test_log1p_values_that_overflow_are_invalid(tmp_path):
    adata = _tiny_adata()
    X = np.log1p(adata.X.toarray())
    X[6, 2] = 800.0  # expm1 overflows to inf
    adata.X = sp.csr_matrix(X)
    summary = build_corpus(_source(adata, input_values="log1p"), tmp_path / "out", BuildOptions(**OPTIONS))
    assert summary["rejected"] == {"invalid_values": 1}


def test_non_integer_counts_stop_the_build_naming_cells_and_the_fix(tmp_path):
    adata = _tiny_adata()
    X = adata.X.toarray()
    X[7, 1] = 0.5
    adata.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match=r"cell07.*--input-values normalized"):
        build_corpus(_source(adata), tmp_path / "new" / "out", BuildOptions(**OPTIONS))
    assert not (tmp_path / "new").exists()  # a failed build leaves nothing behind
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ output folder and ids (issue 9, item 6)


def test_non_empty_out_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_corpus(_source(_tiny_adata()), out, BuildOptions(**OPTIONS))
    with pytest.raises(FileExistsError, match="no corpus"):  # not a corpus: never replaced
        build_corpus(_source(_tiny_adata()), out, BuildOptions(**OPTIONS, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (out / "summary.json").write_text("{}")  # another tool's summary beside the user's files: still not a corpus
    with pytest.raises(FileExistsError, match="no corpus"):
        build_corpus(_source(_tiny_adata()), out, BuildOptions(**OPTIONS, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"

    corpus = tmp_path / "corpus"
    build_corpus(_source(_tiny_adata()), corpus, BuildOptions(**OPTIONS))
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_corpus(_source(_tiny_adata(seed=1)), corpus, BuildOptions(**OPTIONS))
    (corpus / "stale.txt").write_text("old")
    summary = build_corpus(_source(_tiny_adata(seed=1)), corpus, BuildOptions(**OPTIONS, overwrite=True))
    assert not (corpus / "stale.txt").exists()
    assert json.loads((corpus / "summary.json").read_text())["fingerprints"] == summary["fingerprints"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_existing_empty_out_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    build_corpus(_source(_tiny_adata()), tmp_path / "out", BuildOptions(**OPTIONS))
    assert (tmp_path / "out" / "summary.json").is_file()


def test_duplicated_cell_ids_are_refused(tmp_path):
    adata = _tiny_adata()
    adata.obs_names = ["same"] * 2 + list(adata.obs_names[2:])
    with pytest.raises(ValueError, match=r"1 cell ids appear more than once \(e.g. \['same'\]\).*obs_names_make_unique"):
        build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert not (tmp_path / "out").exists()


def test_no_genes_or_no_usable_genes_is_a_clear_error(tmp_path):
    adata = _tiny_adata()
    with pytest.raises(ValueError, match="has no genes"):
        build_corpus(_source(adata[:, []].copy()), tmp_path / "a", BuildOptions(**OPTIONS))
    renamed = adata.copy()
    renamed.var_names = [f"not_a_gene_{i}" for i in range(N_GENES)]
    with pytest.raises(ValueError, match=r"none of the 40 genes has an Ensembl ID"):
        build_corpus(_source(renamed), tmp_path / "b", BuildOptions(**OPTIONS))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setting, value", [("seed", -1), ("max_shard_size", "500XB"), ("max_shard_size", 0),
                                            ("chunk_size", 0), ("min_pathway_genes", -2)])
def test_a_seed_shard_size_or_chunk_size_numpy_or_datasets_refuse_is_refused_before_the_passes(tmp_path, setting,
                                                                                              value):
    """--seed -1 or --max-shard-size 500XB stopped the build with numpy's or datasets' words after both passes over
    the data (hours for a Census build)."""
    source = _source(_tiny_adata())
    source.iter_chunks = None  # a pass over the data would call it
    with pytest.raises(ValueError, match=rf"{setting} must be .*got {value!r}"):
        build_corpus(source, tmp_path / "out", BuildOptions(**OPTIONS, **{setting: value}))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backed", [False, True])
def test_an_hdf5_file_that_is_no_anndata_is_refused_naming_it(tmp_path, backed):
    """An HDF5 file without AnnData's groups ended build_corpus in anndata's TypeError or h5py's KeyError (a
    traceback); `cell2text` named the file already."""
    import h5py

    from processing.sources import h5ad_source

    path = tmp_path / "other.h5ad"
    with h5py.File(path, "w") as file:
        file.create_dataset("values", data=np.ones(3))
    with pytest.raises(ValueError, match=rf"^cannot read {path} as an .h5ad file \(truncated, or another format\?\)"):
        h5ad_source(path, backed=backed)
    with pytest.raises(FileNotFoundError, match=rf"^input file {tmp_path / 'missing.h5ad'} does not exist$"):
        h5ad_source(tmp_path / "missing.h5ad", backed=backed)  # h5py's words: "Unable to synchronously open file"


def test_a_repo_id_the_hub_refuses_is_refused_before_the_passes(tmp_path):
    """--push-to-hub 'org/x/y' was refused by huggingface_hub after the build (hours for a Census build)."""
    source = _source(_tiny_adata())
    source.iter_chunks = None  # a pass over the data would call it
    with pytest.raises(ValueError, match=r"^'org/x/y' is not a Hub repo id: .*owner/name"):
        build_corpus(source, tmp_path / "out", BuildOptions(**OPTIONS, repo_id="org/x/y"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", [["--chunk-size", "0"], ["--chunk-size", "-3"], ["--min-pathway-genes", "-2"],
                                   ["--shard", "2/2"],
                                   ["--shard", "1"], ["--shard", "a/b"], ["--shard=-1/2"]])
def test_bad_chunk_size_and_shard_are_argparse_errors(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--preset", "pbmc68k_reduced", "--out", "x", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and ("expected an integer >= 1" in err or "expected I/N" in err)


@pytest.mark.parametrize("flags, ignored", [
    (["--h5ad", "cells.h5ad", "--obs-filter", "tissue == 'lung'"], "--obs-filter does not apply to --h5ad"),
    (["--preset", "pbmc68k_reduced", "--obs-map", "louvain=donor_id"], "--obs-map does not apply to --preset"),
    (["--preset", "pbmc68k_reduced", "--input-values", "normalized", "--layer", "counts"],
     "--layer, --input-values do not apply to --preset"),
    (["--soma", "census", "--use-raw", "--backed"], "--backed, --use-raw do not apply to --soma"),
    # the release is Census's: another experiment was opened as it is, the release recorded nowhere
    (["--soma", "s3://bucket/experiment", "--census-version", "2024-07-01"],
     "--census-version does not apply to --soma, which reads --input-values"),
])
def test_a_source_option_the_source_does_not_read_is_an_argparse_error(flags, ignored, capsys):
    """`--h5ad cells.h5ad --obs-filter "tissue == 'lung'"` built a corpus of every cell (the filter is SOMA's), and
    --preset ignored --obs-map and the other source options, exit 0."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*flags, "--out", "x"])
    assert exit_info.value.code == 2 and ignored in capsys.readouterr().err
    args = parse_args(["--h5ad", "cells.h5ad", "--out", "x", "--backed", "--layer", "counts", "--input-values",
                       "log1p", "--obs-map", "patient=donor_id"])  # what an h5ad source reads
    assert args.layer == "counts" and args.obs_map == ["patient=donor_id"]


@pytest.mark.parametrize("flags, refused", [
    (["--pathway-set-sizes", "10", "200"], "--pathway-set-sizes sets how pathways are scored"),
    (["--pathway-ranking", "raw", "--min-pathway-genes", "3", "--pathway-max-rank", "40"],
     "--pathway-ranking, --min-pathway-genes, --pathway-max-rank set how pathways are scored"),
])
def test_a_pathway_option_with_gmt_none_is_an_argparse_error(flags, refused, capsys):
    """`--gmt none --pathway-set-sizes 10 200` built a corpus without pathways, the sizes ignored, exit 0."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--preset", "pbmc68k_reduced", "--out", "x", "--gmt", "none", *flags])
    assert exit_info.value.code == 2 and refused in capsys.readouterr().err
    assert parse_args(["--preset", "pbmc68k_reduced", "--out", "x", *flags]).gmt != "none"  # with a library: read
    assert parse_args(["--preset", "pbmc68k_reduced", "--out", "x", "--gmt", "none"]).gmt == "none"


@pytest.mark.parametrize("settings, refused", [
    ({"pathway_set_sizes": (10, 200)}, r"^pathway_set_sizes sets how pathways are scored, and gmt=None builds"),
    ({"n_pathways": 3, "pathway_max_rank": 40}, r"^n_pathways, pathway_max_rank set how pathways are scored"),
    ({"gmt": ""}, r"^gmt='' names no gene-set library"),
])
def test_pathway_settings_without_a_library_are_refused_before_the_data_is_read(tmp_path, settings, refused):
    """BuildOptions(gmt=None, pathway_set_sizes=(10, 200)) (the Python API; the command line refuses --gmt none with
    them) built a corpus without pathways, the setting ignored, and gmt='' (`--gmt "$UNSET"`) built one without
    pathways as gmt=None does: exit 0 both."""
    source = _source(_tiny_adata())
    source.iter_chunks = None  # a pass over the data would call it
    with pytest.raises(ValueError, match=refused):
        build_corpus(source, tmp_path / "out", BuildOptions(**{**OPTIONS, **settings}))
    assert list(tmp_path.iterdir()) == []


def test_an_empty_gmt_on_the_command_line_ends_in_one_line(tmp_path):
    """`--gmt "$GMT"` with GMT unset built the pbmc68k corpus without pathways, exit 0."""
    with pytest.raises(SystemExit, match=r"^build_corpus: error: gmt='' names no gene-set library"):
        main(["--preset", "pbmc68k_reduced", "--out", str(tmp_path / "out"), "--gmt", "", "--no-progress"])
    assert not (tmp_path / "out").exists()


def test_a_feature_extractor_with_geneformer_dictionaries_is_an_argparse_error(capsys):
    """Both give the vocabulary: the dictionaries were used and --feature-extractor ignored, exit 0."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--preset", "pbmc68k_reduced", "--out", "x", "--token-dictionary", "t.pkl", "--gene-median-file",
                    "m.pkl", "--feature-extractor", "fe"])
    assert exit_info.value.code == 2 and "--feature-extractor and --token-dictionary" in capsys.readouterr().err
    assert parse_args(["--soma", "census", "--census-version", "2024-07-01", "--out", "x"]).census_version == \
        "2024-07-01"  # what --soma census reads


def test_good_shard_parses():
    assert parse_args(["--preset", "pbmc68k_reduced", "--out", "x", "--shard", "1/4"]).shard == (1, 4)


def test_obs_map_is_repeatable():
    """A second --obs-map replaced the first."""
    args = parse_args(["--h5ad", "cells.h5ad", "--out", "x", "--obs-map", "a=donor_id", "b=sex", "--obs-map",
                       "c=tissue"])
    assert args.obs_map == ["a=donor_id", "b=sex", "c=tissue"]


def test_cli_refusals_are_one_line_errors(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"^build_corpus: error: --out .* is not empty; pass --overwrite"):
        main(["--preset", "pbmc68k_reduced", "--gmt", "none", "--out", str(tmp_path / "out"), "--no-progress"])
    (tmp_path / "corpus" / "feature_extractor").mkdir(parents=True)  # the corpus folder, not its feature extractor
    with pytest.raises(SystemExit, match=r"^build_corpus: error: --feature-extractor .*corpus is a corpus folder: "
                                         r"pass its feature extractor, --feature-extractor .*corpus/feature_extractor"):
        main(["--preset", "pbmc68k_reduced", "--gmt", "none", "--out", str(tmp_path / "new"), "--no-progress",
              "--feature-extractor", str(tmp_path / "corpus")])


def test_cli_refusals_of_the_input_name_the_options(tmp_path):
    """A missing --layer ended with a KeyError traceback; the values' refusals named Python keywords
    (input_values='counts'), not the options."""
    adata = _tiny_adata()
    adata.layers["spliced"] = adata.X.copy()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    command = ["--h5ad", str(path), "--gmt", "none", "--no-progress"]
    with pytest.raises(SystemExit, match=r"^build_corpus: error: --layer counts is not in adata.layers \(its layers: "
                                         r"\['spliced'\]\); pass --layer NAME naming the one that holds the counts"):
        main([*command, "--layer", "counts", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"^build_corpus: error: --obs-map names columns not in obs: \['author'\]"):
        main([*command, "--obs-map", "author=cell_type", "--out", str(tmp_path / "b")])
    adata.X = adata.X.multiply(0.5).tocsr()  # not counts
    adata.write_h5ad(path)
    with pytest.raises(SystemExit, match=r"^build_corpus: error: --input-values counts but .* pass --input-values "
                                         r"normalized") as refused:
        main([*command, "--out", str(tmp_path / "c")])
    assert "input_values=" not in str(refused.value)
    assert list(tmp_path.iterdir()) == [path]


def test_non_primary_cells_are_rejected_unless_kept(tmp_path):
    """The h5ad path kept cells whose is_primary_data is False (published again elsewhere): joined corpora could then
    hold the same cell in train and test; the Census filter leaves them out."""
    adata = _tiny_adata()
    adata.obs["is_primary_data"] = [i % 4 != 0 for i in range(N_CELLS)]
    summary = build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert summary["rejected"] == {"not_primary_data": N_CELLS // 4}
    kept = build_corpus(_source(adata), tmp_path / "kept", BuildOptions(**OPTIONS, keep_non_primary=True))
    assert kept["rejected"] == {} and sum(kept["splits"].values()) == N_CELLS
    adata.obs["is_primary_data"] = [1.0, 0.0] * (N_CELLS // 2)  # an int column with a NaN reads as float
    assert build_corpus(_source(adata), tmp_path / "float", BuildOptions(**OPTIONS))["rejected"] == {
        "not_primary_data": N_CELLS // 2}
    adata.obs["is_primary_data"] = "False"  # as text, e.g. from a CSV
    with pytest.raises(ValueError, match="not_primary_data.*--keep-non-primary"):
        build_corpus(_source(adata), tmp_path / "none", BuildOptions(**OPTIONS))


def test_obs_map_onto_a_column_the_builder_does_not_read_is_refused():
    """A misspelt target (`organ_id=tissue_ontology_term`) dropped the column and kept the unchecked label, exit 0."""
    adata = _tiny_adata()
    adata.obs["organ_id"] = "UBERON:0000178"
    with pytest.raises(ValueError, match=r"maps onto \['tissue_ontology_term'\], which the builder does not read"):
        _source(adata, obs_map={"organ_id": "tissue_ontology_term"})


def test_every_cell_rejected_for_a_wrong_ontology_required_field_names_the_column_fix(tmp_path):
    adata = _tiny_adata()
    adata.obs["sex_ontology_term_id"] = "MONDO:0100096"  # the disease column mapped onto sex
    adata.obs["sex"] = "COVID-19"
    with pytest.raises(ValueError, match=r"wrong_ontology_sex_term: .*ids of another ontology.*--obs-map"):
        build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS, required_fields=("cell_type", "sex")))


def test_a_gene_set_library_of_ids_the_data_does_not_name_is_refused_before_the_passes(tmp_path):
    """A GMT of Ensembl (or Entrez) ids against the data's symbols: every set scored 0, exit 0, and the corpus, whose
    summary and card name the library, named no pathway in any cell."""
    gmt = tmp_path / "ensembl.gmt"
    gmt.write_text("".join(f"SET_{k}\tids\t" + "\t".join(_gene_ids()[k * 10:(k + 1) * 10]) + "\n" for k in range(4)))
    source = _source(_tiny_adata())
    source.iter_chunks = None  # a pass over the data would call it
    with pytest.raises(ValueError, match=r"no gene set of ensembl.gmt has 5 of its genes among the data's gene "
                                         r"symbols .*'ENSG.*a GMT of gene symbols .*--gmt none"):
        build_corpus(source, tmp_path / "out", BuildOptions(**{**OPTIONS, "gmt": gmt, "pathway_set_sizes": None}))
    assert not (tmp_path / "out").exists()


def test_a_library_of_one_gene_set_names_it_at_most_once(tmp_path):
    """With fewer sets than pathways per cell (one set, two pathways) the builder broadcast the set's index over both
    places: every description named the one set twice."""
    import datasets

    source = _source(_tiny_adata())
    gmt = tmp_path / "one.gmt"
    gmt.write_text("Only Set (GO:0000001)\t\t" + "\t".join(s for s in source.gene_symbols[:20] if s) + "\n")
    build_corpus(source, tmp_path / "out", BuildOptions(progress=False, gmt=gmt, pathway_set_sizes=None))
    rows = [row for split in datasets.load_from_disk(str(tmp_path / "out")).values() for row in split]
    assert {tuple(row["pathways"]) for row in rows} <= {(), ("Only Set",)} and any(row["pathways"] for row in rows)
    assert all(row["description"].count('"Only Set"') == len(row["pathways"]) for row in rows)


def _corpus_rows(out) -> list[dict]:
    import datasets

    return [row for split in datasets.load_from_disk(str(out)).values() for row in split]


def _column_says_what_the_text_says(rows: list[dict]) -> None:
    """Evaluation reads the corpus columns as the truth: they must state what the description states, no more."""
    from modeling_cell2text.description_schema import parse_description

    for row in rows:
        text = parse_description(row["description"])
        assert (row["tissue"], row["sex"], row["disease"]) == (text.tissue, text.sex, text.disease), row["cell_id"]


def test_organoids_and_cell_cultures_are_not_described_as_a_donors_tissue(tmp_path, caplog):
    """CELLxGENE schema 5 marks organoids and cell cultures in obs tissue_type (a culture's tissue is a CL id); the
    builder dropped the column and wrote "It originates from the lung of a donor" for an organoid and "from the
    epithelial cell of a donor" for a culture."""
    adata = _tiny_adata()
    kinds = ["tissue", "organoid", "cell culture", "tissue"] * 6
    adata.obs["sample_kind"] = kinds  # mapped onto tissue_type, as --obs-map sample_kind=tissue_type does
    adata.obs["tissue_ontology_term_id"] = ["CL:0000066" if k == "cell culture" else "UBERON:0002048" for k in kinds]
    adata.obs["tissue"] = ["epithelial cell" if k == "cell culture" else "lung" for k in kinds]
    adata.obs.loc["cell03", ["tissue_ontology_term_id", "tissue"]] = ["UBERON:0002048 (organoid)", "lung"]  # schema 4
    source = _source(adata, obs_map={"sample_kind": "tissue_type"})
    with caplog.at_level("WARNING", logger="processing.corpus"):
        summary = build_corpus(source, tmp_path / "out", BuildOptions(**OPTIONS))
    rows = {row["cell_id"]: row for row in _corpus_rows(tmp_path / "out")}
    donor_tissue = {f"cell{i:02d}" for i, k in enumerate(kinds) if k == "tissue"} - {"cell03"}
    assert {c for c, row in rows.items() if row["tissue"] is not None} == donor_tissue
    assert all(rows[c]["tissue"] == "lung" and "from the lung of a healthy donor" in rows[c]["description"]
               for c in donor_tissue)
    others = [row for c, row in rows.items() if c not in donor_tissue]
    assert all(row["tissue_ontology_term_id"] is None and "It originates from a healthy donor." in row["description"]
               for row in others)
    assert summary["left_out"] == {"tissue_type_cell_culture": 6, "tissue_type_organoid": 7}
    assert "| tissue_type_organoid | 7 |" in (tmp_path / "out" / "README.md").read_text()  # the card says so too
    assert summary["ontology_term_ids"]["tissue"] == {"lung": "UBERON:0002048"}
    assert "13 cells are no donor's tissue (obs tissue_type or their tissue id: cell culture 6, organoid 7)" in \
        caplog.text
    _column_says_what_the_text_says(rows.values())
    # without a tissue_type column (CELLxGENE before schema 5) a tissue id is a tissue, but a CL id never is
    plain = _tiny_adata()
    plain.obs.loc["cell00", ["tissue_ontology_term_id", "tissue"]] = ["CL:0000066", "epithelial cell"]
    summary = build_corpus(_source(plain), tmp_path / "plain", BuildOptions(**OPTIONS))
    assert summary["left_out"] == {"tissue_type_cell_culture": 1}
    assert sum(summary["label_counts"]["tissue"][s].get("blood", 0) for s in summary["splits"]) == N_CELLS - 1
    # a required tissue rejects such cells, naming why
    summary = build_corpus(source, tmp_path / "required",
                           BuildOptions(**OPTIONS, required_fields=("cell_type", "tissue")))
    assert summary["rejected"] == {"tissue_type_cell_culture": 6, "tissue_type_organoid": 7}


def test_nuclei_mixed_with_cells_are_counted_and_said(tmp_path, caplog):
    """CELLxGENE's obs suspension_type ("nucleus": single-nucleus RNA-seq) was not read: nuclei were described and
    trained beside cells with no word in the log, summary.json or the card. They are still described as their cell
    type (the template has no word for a nucleus), now counted and warned about."""
    adata = _tiny_adata()
    adata.obs["suspension_type"] = ["nucleus"] * 5 + ["cell"] * 17 + ["na", "cell"]
    adata.obs.loc["cell23", "cell_type_ontology_term_id"] = "CL:000084"  # rejected: not counted
    with caplog.at_level("WARNING", logger="processing.build_corpus"):
        summary = build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert summary["suspension_types"] == {"cell": 17, "nucleus": 5}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["suspension_types"] == {"cell": 17, "nucleus": 5}
    assert "5 of the 23 kept cells are nuclei (obs suspension_type 'nucleus'" in caplog.text
    assert "suspension_type == 'cell'" in caplog.text
    card = (tmp_path / "out" / "README.md").read_text()
    assert "### Cells and nuclei" in card and "| nucleus | 5 |" in card
    # cells only: counted, no warning, no card section
    caplog.clear()
    cells = _tiny_adata()
    cells.obs["suspension_type"] = "cell"
    with caplog.at_level("WARNING", logger="processing.build_corpus"):
        summary = build_corpus(_source(cells), tmp_path / "cells", BuildOptions(**OPTIONS))
    assert summary["suspension_types"] == {"cell": N_CELLS} and "nuclei" not in caplog.text
    assert "Cells and nuclei" not in (tmp_path / "cells" / "README.md").read_text()
    # values outside CELLxGENE's: read in lower case, as obs tissue_type is; others counted as given and warned
    # about ("Nucleus" and "nuclei" were counted apart from nuclei, with no warning and no card section)
    caplog.clear()
    other = _tiny_adata()
    other.obs["suspension_type"] = ["Nucleus"] * 5 + ["nuclei"] * 3 + ["Cell"] * (N_CELLS - 8)
    with caplog.at_level("WARNING", logger="processing.build_corpus"):
        summary = build_corpus(_source(other), tmp_path / "other", BuildOptions(**OPTIONS))
    assert summary["suspension_types"] == {"cell": N_CELLS - 8, "nuclei": 3, "nucleus": 5}
    assert "5 of the 24 kept cells are nuclei" in caplog.text
    assert "obs suspension_type holds values other than CELLxGENE's (cell, nucleus, na): ['nuclei']" in caplog.text
    assert "| nucleus | 5 |" in (tmp_path / "other" / "README.md").read_text()


def test_another_datasets_tissue_type_column_keeps_the_tissues(tmp_path, caplog):
    """The second reader's finding: an h5ad whose tissue_type column means something else ("Tumor" / "Normal")
    lost every cell's tissue; a cell without a tissue id was counted as an organoid's tissue left out."""
    adata = _tiny_adata()
    adata.obs["tissue_type"] = ["Tumor", "Normal"] * (N_CELLS // 2)
    adata.obs["tissue_type"] = adata.obs["tissue_type"].astype(object)
    adata.obs.loc[["cell01", "cell02"], "tissue_type"] = "organoid"
    adata.obs.loc["cell01", ["tissue_ontology_term_id", "tissue"]] = ["unknown", "unknown"]  # nothing to leave out
    adata.obs.loc["cell02", "tissue_ontology_term_id"] = "unknown"  # a label without its id is left out too
    adata.obs.loc["cell04", "tissue_type"] = "primary cell culture"  # schema 6's name
    with caplog.at_level("WARNING", logger="processing.corpus"):
        summary = build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert summary["left_out"] == {"tissue_type_organoid": 1, "tissue_type_primary_cell_culture": 1}
    rows = {row["cell_id"]: row for row in _corpus_rows(tmp_path / "out")}
    assert all(row["tissue"] == "blood" for cell, row in rows.items() if cell not in ("cell01", "cell02", "cell04"))
    assert rows["cell01"]["tissue"] is rows["cell02"]["tissue"] is rows["cell04"]["tissue"] is None
    assert "obs tissue_type holds values other than CELLxGENE's (tissue, organoid, primary cell culture, cell " \
           "culture, cell line): ['Normal', 'Tumor']; their cells' tissues are read as a donor's tissues" in caplog.text
    assert "2 cells are no donor's tissue (obs tissue_type or their tissue id: organoid 1, primary cell culture 1)" \
        in caplog.text


def test_sex_and_health_labels_without_ids_are_read_and_the_columns_say_what_the_text_says(tmp_path, caplog):
    """User labels mapped with --obs-map condition=disease gender=sex: "Healthy" and "Normal" were written as
    diseases ("a donor with Healthy"), and "Female", "M" or "F" left the text but stayed in the corpus sex column,
    which evaluation reads as the truth."""
    adata = _tiny_adata()
    adata.obs = adata.obs.drop(columns=["disease", "disease_ontology_term_id"])
    conditions = ["control", "Healthy", "Normal", "normal", "COVID-19", "HEALTHY"] * 4
    genders = ["Female", "M", "female", "male", "F", "other"] * 4
    adata.obs["condition"], adata.obs["gender"] = conditions, genders
    with caplog.at_level("WARNING", logger="processing.corpus"):
        summary = build_corpus(_source(adata, obs_map={"condition": "disease", "gender": "sex"}), tmp_path / "out",
                               BuildOptions(**OPTIONS))
    rows = _corpus_rows(tmp_path / "out")
    _column_says_what_the_text_says(rows)
    given = {f"cell{i:02d}": (c, g) for i, (c, g) in enumerate(zip(conditions, genders))}
    for row in rows:
        condition, gender = given[row["cell_id"]]
        healthy = condition.lower() in ("normal", "healthy")
        assert row["disease"] == ("normal" if healthy else condition)
        assert row["disease_ontology_term_id"] == ("PATO:0000461" if healthy else None)
        assert ("healthy" in row["description"].split()) == healthy
        sex = {"f": "female", "female": "female", "m": "male", "male": "male"}.get(gender.lower())
        assert row["sex"] == sex and row["sex_ontology_term_id"] == {"female": "PATO:0000383", "male": "PATO:0000384",
                                                                      None: None}[sex]
    assert summary["ontology_term_ids"]["sex"] == {"female": "PATO:0000383", "male": "PATO:0000384"}
    # labels stated without an id are in the label table too (id None), so the decoder can choose them: "COVID-19"
    # was trained on and then never a candidate (its cells described as healthy donors)
    assert summary["ontology_term_ids"]["disease"] == {"COVID-19": None, "control": None, "normal": "PATO:0000461"}
    assert summary["left_out"] == {"sex_not_female_or_male": 4}
    warned = [r.getMessage() for r in caplog.records if "stated as given" in r.getMessage()]
    assert len(warned) == 1 and "'control' 4 cells" in warned[0] and "'COVID-19' 4 cells" in warned[0]
    assert "MONDO" in warned[0] and "disease_ontology_term_id" in warned[0]
    assert "4 cells' sex are neither female nor male" in caplog.text and "PATO:0000383" in caplog.text


def test_ontology_ids_in_a_label_column_are_read_as_their_terms(tmp_path):
    """An id column mapped onto the label (`--obs-map organ_id=tissue`) was stated as given, exit 0: "It originates
    from the UBERON:0002048 of a healthy donor", a label without an id; cell type ids in the cell_type column were
    rejected as cell types without ids."""
    adata = _tiny_adata()
    adata.obs = adata.obs.drop(columns=["tissue", "tissue_ontology_term_id", "cell_type"])
    adata.obs["organ_id"] = "UBERON:0002048"
    adata.obs["celltype_id"] = adata.obs.pop("cell_type_ontology_term_id")
    source = _source(adata, obs_map={"organ_id": "tissue", "celltype_id": "cell_type"})
    summary = build_corpus(source, tmp_path / "out", BuildOptions(**OPTIONS))
    assert summary["ontology_term_ids"]["tissue"] == {"lung": "UBERON:0002048"}
    assert summary["ontology_term_ids"]["cell_type"] == {"B cell": "CL:0000236", "T cell": "CL:0000084"}
    rows = _corpus_rows(tmp_path / "out")
    assert len(rows) == N_CELLS and all("from the lung of a healthy donor" in row["description"] for row in rows)
    assert {row["tissue_ontology_term_id"] for row in rows} == {"UBERON:0002048"}


def test_columns_naming_one_gene_are_refused_by_the_corpus_builder_as_at_inference(tmp_path):
    """Two columns with one Ensembl id (a version suffix stripped, say): the builder kept the first column's counts as
    the gene's (listed the second in unmapped_genes.txt) and trained on the file, which inference then refused. One
    rule for both (`gene_ids.check_one_column_per_gene`): refused, naming the fix (sum them, docs/model.md)."""
    from processing.corpus import corpus_feature_extractor

    adata = _tiny_adata()
    ids = _gene_ids()
    build_corpus(_source(adata), tmp_path / "first", BuildOptions(**OPTIONS))
    extractor = corpus_feature_extractor(tmp_path / "first")
    adata.var_names = ids[:-1] + [ids[0] + ".2"]  # the last column is the first gene again
    refused = rf"1 input genes duplicate another input gene after ID mapping: .*= {ids[0]} \(column 0\)\. Sum the "
    def unread():  # refused before any pass over the matrix (tokenizing refused them too, after both passes)
        source = _source(adata)
        source.iter_chunks = lambda chunk_size: pytest.fail("the matrix was read before the columns were refused")
        return source

    with pytest.raises(ValueError, match=refused + r"duplicated columns into one \(docs/model.md"):
        build_corpus(unread(), tmp_path / "dup", BuildOptions(**OPTIONS))
    with pytest.raises(ValueError, match=refused):  # a given vocabulary (--feature-extractor) holding the gene
        build_corpus(unread(), tmp_path / "given", BuildOptions(**OPTIONS, feature_extractor=extractor))
    with pytest.raises(ValueError, match=refused):  # inference, the same rule
        extractor(adata)
    assert not (tmp_path / "dup").exists() or not any((tmp_path / "dup").iterdir())
    adata.var_names = ids[:-2] + ["ENSG00000999999.1", "ENSG00000999999.2"]  # a gene outside the given vocabulary
    build_corpus(_source(adata), tmp_path / "outside", BuildOptions(**OPTIONS, feature_extractor=extractor))
    assert extractor(adata)["gene_input_ids"].shape[0] == N_CELLS  # it gives no tokens: accepted by both


def test_a_symbol_beside_its_make_unique_copy_gives_no_tokens_in_the_corpus_as_at_inference(tmp_path, caplog):
    """GOLGA8M beside GOLGA8M-1 (two genes carry the symbol; make_unique gave the bare one to the file's first column,
    whichever gene it holds): the builder read the bare symbol's column as the protein-coding gene's. Neither is read
    now (`gene_table.repeated_symbols`), as inference reads neither."""
    from modeling_cell2text.gene_table import ensembl_to_symbol
    from processing.corpus import corpus_feature_extractor

    adata = _tiny_adata()
    symbols = list(ensembl_to_symbol(_gene_ids()).values())
    assert len(symbols) == N_GENES
    adata.var_names = symbols[:-2] + ["GOLGA8M", "GOLGA8M-1"]
    with caplog.at_level("WARNING"):
        build_corpus(_source(adata), tmp_path / "out", BuildOptions(**OPTIONS))
    assert "symbols named two or more columns" in caplog.text and "['GOLGA8M']" in caplog.text
    assert "ENSG00000188626" not in corpus_feature_extractor(tmp_path / "out").gene_token_ids
    assert "GOLGA8M\tno Ensembl ID" in (tmp_path / "out" / "unmapped_genes.txt").read_text()


def test_a_negative_slice_of_a_backed_file_is_refused_by_the_corpus_builder_too(tmp_path):
    """anndata reads backed[-5:-2] of a CSR file as the cells after the ones named, under their names: the builder
    gave cells c5-c7 the counts of c6-c8, exit 0 (inference refuses such a view: `cell_inputs.anndata_matrix`)."""
    counts = sp.csr_matrix(np.arange(1, 41, dtype=np.float32).reshape(10, 4))
    anndata.AnnData(X=counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(10)]),
                    var=pd.DataFrame(index=["TP53", "CD3E", "CD19", "CD4"])).write_h5ad(tmp_path / "cells.h5ad")
    backed = anndata.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    read = next(AnnDataSource(backed[5:8]).iter_chunks(64))[1]
    assert read.toarray().tolist() == counts[5:8].toarray().tolist()
    with pytest.raises(ValueError, match=r"negative start, stop or step.*backed\[n - 5 : n - 2\]"):
        AnnDataSource(backed[-5:-2])


def test_a_negative_slice_of_a_backed_files_layer_is_read_not_refused(tmp_path):
    """A backed AnnData holds its layers in memory, where anndata reads backed[-5:-2] right: the refusal of negative
    slices (meant for X and raw.X, read from the file) refused this valid view's layer too, in the builder and at
    inference. X and raw.X of the same view are still refused."""
    from modeling_cell2text.cell_inputs import anndata_matrix

    counts = sp.csr_matrix(np.arange(1, 41, dtype=np.float32).reshape(10, 4))
    adata = anndata.AnnData(X=counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(10)]),
                            var=pd.DataFrame(index=["TP53", "CD3E", "CD19", "CD4"]), layers={"counts": counts.copy()})
    adata.raw = adata.copy()
    adata.write_h5ad(tmp_path / "cells.h5ad")
    view = anndata.read_h5ad(tmp_path / "cells.h5ad", backed="r")[-5:-2]
    read = next(AnnDataSource(view, layer="counts").iter_chunks(64))[1]
    assert read.toarray().tolist() == counts[5:8].toarray().tolist()
    assert anndata_matrix(view, layer="counts").toarray().tolist() == counts[5:8].toarray().tolist()
    for kwargs in ({}, {"raw": True}):
        with pytest.raises(ValueError, match="negative start, stop or step"):
            anndata_matrix(view, **kwargs)


def test_a_negative_slice_of_a_backed_files_genes_is_refused_naming_the_genes_fix(tmp_path):
    """The refusal of backed[:, -3:] said "backed[n - 5 : n - 2] with n = backed.n_obs": a slice of the cells, for
    a view whose cells were not sliced. It names the genes' slice (n_vars), and both where both are negative."""
    from modeling_cell2text.cell_inputs import anndata_matrix

    anndata.AnnData(X=sp.csr_matrix(np.ones((10, 4), dtype=np.float32)),
                    var=pd.DataFrame(index=["TP53", "CD3E", "CD19", "CD4"])).write_h5ad(tmp_path / "cells.h5ad")
    backed = anndata.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"these genes .*\(backed\[:, m - 5 : m - 2\] with m = backed.n_vars\), or "):
        anndata_matrix(backed[:, -3:])
    with pytest.raises(ValueError, match=r"these cells and genes .*\(backed\[n - 5 : n - 2\] with n = backed.n_obs; "
                                         r"backed\[:, m - 5 : m - 2\] with m = backed.n_vars\), or "):
        anndata_matrix(backed[-5:-2, -3:])


def test_previous_symbols_left_unread_are_said_once_in_a_build_with_a_feature_extractor(tmp_path, caplog):
    """A var holding IGJ beside JCHAIN: a build with a given feature extractor said so twice (the source's reading of
    var, then the extractor's)."""
    from modeling_cell2text.feature_extraction_cell2text import Cell2TextFeatureExtractor

    adata = pbmc68k_reduced().adata
    adata.var_names = ["IGJ", "JCHAIN", *adata.var_names[2:]]
    build_corpus(AnnDataSource(adata.copy(), input_values="log1p"), tmp_path / "own",
                 BuildOptions(progress=False, gmt=None))
    extractor = Cell2TextFeatureExtractor.from_pretrained(str(tmp_path / "own" / "feature_extractor"))
    caplog.clear()
    build_corpus(AnnDataSource(adata, input_values="log1p"), tmp_path / "given",
                 BuildOptions(progress=False, gmt=None, feature_extractor=extractor))
    assert caplog.text.count("1 symbols are previous symbols of genes the input also names") == 1


def test_a_soma_experiments_x_layers_are_other_inputs(monkeypatch):
    """A SOMA source's checksum reads no values: shards of the same cells tokenized from X "normalized" and medians
    counted from X "raw" (both read as --input-values normalized) were one input, so the join took them, exit 0."""
    import sys
    import types
    from types import SimpleNamespace

    from processing.sources import SomaSource

    class Frame:  # a SOMA dataframe, read whole
        def __init__(self, frame):
            self.frame, self.schema = frame, SimpleNamespace(names=list(frame.columns))

        def read(self, value_filter=None, column_names=None):
            return SimpleNamespace(concat=lambda: SimpleNamespace(to_pandas=lambda: self.frame[column_names].copy()))

    obs = pd.DataFrame({"soma_joinid": [0, 1, 2], "obs_id": ["a", "b", "c"], "cell_type": ["T cell"] * 3})
    var = pd.DataFrame({"soma_joinid": [0, 1], "feature_id": ["ENSG00000141510", "ENSG00000132465"]})
    experiment = SimpleNamespace(obs=Frame(obs), ms={"RNA": SimpleNamespace(var=Frame(var))})
    monkeypatch.setitem(sys.modules, "tiledbsoma", types.ModuleType("tiledbsoma"))

    def checksum(x_name):
        return SomaSource(experiment=experiment, x_name=x_name, obs_value_filter=None).input_sha256

    assert checksum("raw") == checksum("raw") != checksum("normalized")
