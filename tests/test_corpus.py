"""Corpus builder on real cells (scanpy's pbmc68k_reduced, offline): layout, accounting, text, determinism."""

import json
import os
import subprocess
from collections import Counter
import sys
from pathlib import Path
from types import SimpleNamespace

import anndata
import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from modeling_cell2text.description_schema import parse_description
from modeling_cell2text.feature_extraction_cell2text import Cell2TextFeatureExtractor
from processing import ontologies
from processing.build_corpus import BuildOptions, build_corpus
from processing.corpus import _STRING_COLUMNS, FEATURES, VALUE_FEATURES, SplitWriter, description_fields
from processing.presets import pbmc68k_reduced
from processing.sources import AnnDataSource

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"name", "source", "num_cells_in", "splits", "rejected", "label_counts", "gene_vocabulary_size",
                "pathway_library", "seed", "ontology_term_ids"}


@pytest.fixture(scope="module")
def pbmc_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("pbmc")
    summary = build_corpus(pbmc68k_reduced(), out, BuildOptions(progress=False))
    return out, summary, datasets.load_from_disk(str(out))


def test_pbmc68k_corpus_layout_and_split_sizes(pbmc_corpus):
    out, summary, corpus = pbmc_corpus
    assert list(corpus) == ["train", "validation", "test"]
    for split in corpus.values():
        assert split.features == FEATURES
    rejects = pd.read_csv(out / "rejects.csv")
    sizes = {name: len(split) for name, split in corpus.items()}
    assert sizes == summary["splits"]
    assert sum(sizes.values()) == 700 - len(rejects)
    assert sizes["train"] == pytest.approx(0.8 * 700, abs=10)
    ids = [cid for split in corpus.values() for cid in split["cell_id"]]
    assert len(ids) == len(set(ids))  # no cell in two splits
    assert all(d is None for split in corpus.values() for d in split["donor_id"])  # pbmc68k has no donors
    # every cell type is in train (stratified split)
    assert set(summary["label_counts"]["cell_type"]["train"]) == set(summary["ontology_term_ids"]["cell_type"])
    assert SUMMARY_KEYS <= set(json.loads((out / "summary.json").read_text()))
    assert summary["gene_vocabulary_size"] == 750 and summary["input_values"] == "log1p"
    assert len((out / "unmapped_genes.txt").read_text().splitlines()) == 15
    assert (out / "README.md").read_text().count("560") >= 1


def test_a_build_does_not_depend_on_how_the_matrix_stores_its_entries(tmp_path, pbmc_corpus):
    """pbmc68k_reduced's raw X (log1p) is a CSR with unsorted column indices. Each cell's normalisation sums its
    entries in the order they are stored, so the gene medians of its sorted copy, the same cells, differed in their
    last bits, and 6 of the 560 training cells got another gene order (two near-tied genes swapped). Both are now read
    in canonical order (`as_csr`)."""
    import anndata

    from processing.sources import AnnDataSource

    out, _, corpus = pbmc_corpus
    shipped = pbmc68k_reduced()
    assert not shipped.adata.X.has_sorted_indices  # the storage this test is about
    adata = anndata.AnnData(X=shipped.adata.X.sorted_indices(), obs=shipped.adata.obs, var=shipped.adata.var)
    build_corpus(AnnDataSource(adata, name=shipped.name, input_values="log1p"), tmp_path / "sorted",
                 BuildOptions(progress=False))
    sorted_extractor = Cell2TextFeatureExtractor.from_pretrained(str(tmp_path / "sorted" / "feature_extractor"))
    assert sorted_extractor.gene_medians == Cell2TextFeatureExtractor.from_pretrained(
        str(out / "feature_extractor")).gene_medians
    rebuilt = datasets.load_from_disk(str(tmp_path / "sorted"))
    assert rebuilt["train"]["gene_input_ids"] == corpus["train"]["gene_input_ids"]


def test_the_card_of_a_corpus_not_published_loads_it_from_its_folder(pbmc_corpus):
    """The card named a Hub repo that does not exist, cell2text/scanpy.datasets (the name cut by Path.stem)."""
    out, _, _ = pbmc_corpus
    card = (out / "README.md").read_text()
    assert f'load_from_disk("{out.name}")' in card and str(out.parent) not in card
    assert "load_dataset(" not in card and "cell2text/" not in card
    assert datasets.load_from_disk(str(out.parent / out.name))["train"].num_rows > 0  # as the card says


@pytest.mark.parametrize("content, problem", [
    (b"{oops", r"not JSON \(Expecting property name"),
    (b"\xd0\xff", r"not JSON \("),
    (b"[1, 2]", r"it is \[1, 2\], not a JSON object"),
    (b"5", "it is 5, not a JSON object"),
    (b"null", "it is None, not a JSON object"),
    (b'{"ontology_term_ids": ["B cell"]}', r"ontology_term_ids is \['B cell'\], not a JSON object"),
    (b'{"ontology_term_ids": {"cell_type": {"B cell": 7}}}',
     r"ontology_term_ids\['cell_type'\]\['B cell'\] is 7, not a string or null"),
    (b'{"fingerprints": "abc"}', "fingerprints is 'abc', not a JSON object"),
    # a join summed a list's items as counts ({"nucleus": 2}), and the model card ended in an AttributeError
    (b'{"suspension_types": ["nucleus", "nucleus"]}',
     r"suspension_types is \['nucleus', 'nucleus'\], not a JSON object"),
    (b'{"splits": {"train": "5"}}', r"splits\['train'\] is '5', not an integer"),
    (b'{"shard": "1of2"}', r"shard is '1of2', not a string of the form"),
    (b'{"splits": {"train": true}}', r"splits\['train'\] is True, not an integer"),  # JSON's true is no count
])
def test_a_corrupt_summary_is_refused_naming_the_file(tmp_path, content, problem):
    """summary.json's readers (training, evaluation, a join, the card, publishing) ended in a JSONDecodeError or,
    for JSON of another shape, an AttributeError or TypeError far from the file."""
    from processing.corpus import corpus_summary

    (tmp_path / "summary.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'summary.json'} is not a corpus summary as python -m "
                                         f"processing.build_corpus writes it: {problem}.*Build the corpus again"):
        corpus_summary(tmp_path)


def test_the_rejects_and_unmapped_genes_readers_take_only_what_a_build_writes(tmp_path):
    """Refused: a rejects.csv with a column more (a join would write rejects of the union of the headers) and an
    unmapped_genes.txt saved as UTF-16 (valid UTF-8 with a NUL after each letter, read as genes otherwise); a corpus
    without unmapped_genes.txt (an earlier build's) has none."""
    from processing.corpus import read_rejects, read_unmapped_genes

    assert read_unmapped_genes(tmp_path) == []
    (tmp_path / "unmapped_genes.txt").write_bytes("GENE1\n".encode("utf-16-le"))
    with pytest.raises(ValueError, match=r"unmapped_genes.txt is not the unmapped genes .*: it holds NUL bytes"):
        read_unmapped_genes(tmp_path)
    (tmp_path / "rejects.csv").write_text("cell_id,reason,note\nc1,empty,x\n")
    with pytest.raises(ValueError, match=r"rejects.csv is not the rejected cells .*: its columns are \['cell_id', "
                                         r"'reason', 'note'\], not \['cell_id', 'reason'\]"):
        read_rejects(tmp_path)


def test_tokens_match_the_saved_feature_extractor(pbmc_corpus):
    out, _, corpus = pbmc_corpus
    extractor = Cell2TextFeatureExtractor.from_pretrained(str(out / "feature_extractor"))
    source = pbmc68k_reduced()
    ranked = extractor.tokenize(source.adata, source.gene_ids, input_values="log1p")
    by_id = dict(zip(source.obs.index, ranked.to_list()))
    bulk_label = dict(zip(source.obs.index, source.obs["cell_type"]))
    cell_type_of_bulk = {}
    rows = 0
    for split in corpus.values():  # every row: tokens and labels belong to the row's own cell
        for row in split:
            assert row["gene_input_ids"] == by_id[row["cell_id"]].tolist(), row["cell_id"]
            assert row["gene_input_ids"][0] == extractor.cls_token_id
            assert row["gene_input_ids"][-1] == extractor.eos_token_id
            # one CL label per pbmc68k bulk label, whichever split the cell went to
            assert cell_type_of_bulk.setdefault(bulk_label[row["cell_id"]], row["cell_type"]) == row["cell_type"]
            rows += 1
    assert rows == sum(len(split) for split in corpus.values()) and len(cell_type_of_bulk) == 10


def test_descriptions_name_real_cl_terms_and_round_trip(pbmc_corpus):
    _, _, corpus = pbmc_corpus
    n = 0
    for split in corpus.values():
        for row in split:
            term = row["cell_type_ontology_term_id"]
            assert term.startswith("CL:") and ontologies.term_label(term) == row["cell_type"]
            definition = ontologies.term_definition(term)
            assert definition and definition.rstrip(".") in row["description"]
            text = row["description"]
            assert "nan" not in text.split() and "unknown" not in text.lower()
            fields = description_fields(row["cell_type"], term, row["tissue"], row["sex"], row["disease"],
                                        row["age_group"], tuple(row["pathways"]))
            assert parse_description(text) == fields
            assert fields.tissue == "blood" and fields.disease == "normal" and len(fields.pathways) == 2
            n += 1
    assert n == 700


def _broken_pbmc_source() -> AnnDataSource:
    """60 real cells with injected problems, one per reject reason."""
    base = pbmc68k_reduced().adata[:60].copy()
    X = base.X.toarray()
    obs = base.obs.copy()
    X[0] = X[59] = 0  # no counts at all (also as the last row of a chunk)
    unmapped = np.array([g is None for g in pbmc68k_reduced().gene_ids])
    X[1] = 0
    X[1, np.flatnonzero(unmapped)[:3]] = 1.0  # counts only in genes without an Ensembl ID
    obs.iloc[2, obs.columns.get_loc("cell_type_ontology_term_id")] = np.nan  # label without a CL id
    obs.iloc[3, obs.columns.get_loc("cell_type_ontology_term_id")] = "unknown"
    obs.iloc[3, obs.columns.get_loc("cell_type")] = "unknown"
    obs.iloc[4, obs.columns.get_loc("cell_type_ontology_term_id")] = "CL:9999999"
    obs.iloc[5, obs.columns.get_loc("tissue_ontology_term_id")] = "unknown"  # tissue missing: required below
    obs.iloc[5, obs.columns.get_loc("tissue")] = "unknown"
    adata = anndata.AnnData(X=sp.csr_matrix(X), obs=obs, var=base.var)
    return AnnDataSource(adata, name="broken", input_values="log1p")


def test_every_cell_is_kept_or_rejected_with_its_reason(tmp_path):
    options = BuildOptions(progress=False, required_fields=("cell_type", "tissue"), gmt=None)
    summary = build_corpus(_broken_pbmc_source(), tmp_path, options)
    rejects = pd.read_csv(tmp_path / "rejects.csv")
    source = _broken_pbmc_source()
    expected = {0: "no_counts", 1: "no_vocabulary_gene", 2: "unmapped_cell_type", 3: "missing_cell_type",
                4: "unknown_cell_type_term", 5: "missing_tissue", 59: "no_counts"}
    assert dict(zip(rejects["cell_id"], rejects["reason"])) == {source.obs.index[i]: r for i, r in expected.items()}
    assert summary["rejected"] == dict(Counter(expected.values()))
    corpus = datasets.load_from_disk(str(tmp_path))
    kept = {cid for split in corpus.values() for cid in split["cell_id"]}
    assert len(kept) + len(rejects) == summary["num_cells_in"] == 60
    assert kept.isdisjoint(rejects["cell_id"])
    assert all(row["pathways"] == [] for row in corpus["train"])  # gmt=None: no pathway phrases
    assert "pathway" not in corpus["train"][0]["description"]


def test_same_inputs_and_seed_give_same_fingerprints(tmp_path, pbmc_corpus):
    _, summary, corpus = pbmc_corpus
    again = build_corpus(pbmc68k_reduced(), tmp_path / "a", BuildOptions(progress=False))
    reloaded = datasets.load_from_disk(str(tmp_path / "a"))
    assert all(reloaded[s].to_pandas().equals(corpus[s].to_pandas()) for s in corpus)
    assert again["fingerprints"] == summary["fingerprints"]
    other = build_corpus(pbmc68k_reduced(), tmp_path / "b", BuildOptions(progress=False, seed=1))
    assert other["fingerprints"]["train"] != summary["fingerprints"]["train"]


def test_a_build_read_in_chunks_writes_the_same_rows_and_fingerprints(tmp_path, pbmc_corpus):
    """Mutation testing's findings: every cell past the first chunk took the pathways of a first-chunk cell (a
    one-character change no test saw: every build read one chunk), and the fingerprints hashed each written batch
    on its own, so the same rows built with another chunk size had other fingerprints (evaluation then refused the
    model's own corpus as another build)."""
    _, summary, corpus = pbmc_corpus
    chunked = build_corpus(pbmc68k_reduced(), tmp_path / "chunked", BuildOptions(progress=False, chunk_size=96))
    reloaded = datasets.load_from_disk(str(tmp_path / "chunked"))
    assert len({tuple(row["pathways"]) for row in corpus["train"]}) > 5  # cells differ in pathways
    assert all(reloaded[s].to_pandas().equals(corpus[s].to_pandas()) for s in corpus)
    assert chunked["fingerprints"] == summary["fingerprints"]


def test_split_fingerprints_are_of_the_rows_not_of_how_they_were_written(tmp_path):
    def columns(ids):
        values = {name: [None] * len(ids) for name in _STRING_COLUMNS}
        values.update(cell_id=ids, description=[f"text of {i}" for i in ids], pathways=[("P1", "P2")] * len(ids))
        return values

    fingerprints = []
    for name, batches in (("one", [(["a", "b"], [5, 6, 7], [0, 2, 3])]),
                          ("two", [(["a"], [5, 6], [0, 2]), (["b"], [7], [0, 1])]),
                          ("other", [(["a", "b"], [5, 6, 7], [0, 1, 3])])):  # the same tokens, other cells
        (tmp_path / name).mkdir()
        writer = SplitWriter(tmp_path / name, ["train"])
        for ids, tokens, offsets in batches:
            writer.write("train", columns(ids), np.array(tokens), np.array(offsets))
        fingerprints.append(writer.close()["train"])
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_given_vocabulary_is_used_as_is(tmp_path, pbmc_corpus):
    out, _, corpus = pbmc_corpus
    extractor = Cell2TextFeatureExtractor.from_pretrained(str(out / "feature_extractor"))
    summary = build_corpus(pbmc68k_reduced(), tmp_path, BuildOptions(progress=False, feature_extractor=extractor))
    rebuilt = datasets.load_from_disk(str(tmp_path))
    assert rebuilt["validation"]["gene_input_ids"] == corpus["validation"]["gene_input_ids"]
    assert summary["gene_vocabulary_size"] == len(extractor.gene_medians)
    # the record names the medians the tokens were ranked with (it said this build's exact ones, bound 0)
    assert summary["median_method"] == "given feature extractor" and summary["median_relative_error_bound"] is None
    assert summary["vocabulary_source"] == extractor.vocabulary_source


def test_a_given_vocabulary_reads_a_files_genes_where_inference_reads_them(tmp_path, pbmc_corpus):
    """Symbols in the index and a feature_name column that disagree on two rows, which the index names by pseudogenes
    the vocabulary lacks: the builder chose the index by the whole gene table (a tie, 765 names each), inference the
    column by the vocabulary, so the corpus trained without two genes that inference reads in those columns."""
    out, _, _ = pbmc_corpus
    extractor = Cell2TextFeatureExtractor.from_pretrained(str(out / "feature_extractor"))
    shipped = pbmc68k_reduced().adata
    columns = np.argsort(-np.asarray((shipped.X > 0).sum(axis=0)).ravel())[:2]  # the two most often expressed
    symbols = [str(name) for name in shipped.var_names]
    assert not {"RPL13AP5", "MTND1P23"} & set(symbols) and symbols[columns[0]] in extractor.symbol_to_gene
    index = list(symbols)
    index[columns[0]], index[columns[1]] = "RPL13AP5", "MTND1P23"  # GENCODE pseudogenes, not in the vocabulary
    adata = anndata.AnnData(X=shipped.X, obs=shipped.obs, var=pd.DataFrame({"feature_name": symbols}, index=index))
    build_corpus(AnnDataSource(adata, input_values="log1p"), tmp_path,
                 BuildOptions(progress=False, feature_extractor=extractor))
    corpus = datasets.load_from_disk(str(tmp_path))
    ranked = extractor.tokenize(adata, input_values="log1p")
    row_of = {cell_id: i for i, cell_id in enumerate(adata.obs_names)}
    for row in corpus["validation"]:
        assert row["gene_input_ids"] == ranked[row_of[row["cell_id"]]].tolist()


def test_genes_outside_a_given_vocabulary_are_not_listed_as_having_no_ensembl_id(tmp_path, pbmc_corpus):
    """A given vocabulary maps symbols by its own table, which lacks the genes outside it: unmapped_genes.txt (shipped
    with the corpus) and summary.json said 450 of pbmc68k's genes had "no Ensembl ID" for a vocabulary of 300 of them.
    They give no tokens and are not listed, as before and as Ensembl IDs outside a vocabulary; the file lists the 15
    names that map to no gene, as a build without a given vocabulary does."""
    from modeling_cell2text.gene_table import symbol_to_ensembl

    out, summary, _ = pbmc_corpus
    source = pbmc68k_reduced()
    genes = sorted(set(symbol_to_ensembl(str(name) for name in source.adata.var_names).values()))[:300]
    extractor = Cell2TextFeatureExtractor.from_gene_medians({gene: 1.0 for gene in genes})
    given = build_corpus(source, tmp_path, BuildOptions(progress=False, gmt=None, feature_extractor=extractor))
    listed = (tmp_path / "unmapped_genes.txt").read_text().splitlines()
    assert listed == (out / "unmapped_genes.txt").read_text().splitlines() and len(listed) == 15
    assert given["unmapped_genes"] == summary["unmapped_genes"] == 15


def test_a_model_input_size_other_than_the_given_vocabularys_is_refused(tmp_path, pbmc_corpus):
    """`--feature-extractor DIR --model-input-size 512` built a corpus of the extractor's size, exit 0."""
    out, _, _ = pbmc_corpus
    extractor = Cell2TextFeatureExtractor.from_pretrained(str(out / "feature_extractor"))
    other = extractor.model_input_size + 8
    with pytest.raises(ValueError, match=f"model_input_size={other} but the given feature extractor has "
                                         f"model_input_size={extractor.model_input_size}.*leave model_input_size out"):
        build_corpus(pbmc68k_reduced(), tmp_path / "c", BuildOptions(progress=False, feature_extractor=extractor,
                                                                    model_input_size=other))
    assert not (tmp_path / "c").exists()


def test_value_aware_corpus_stores_the_bins_its_feature_extractor_gives(tmp_path, pbmc_corpus):
    _, _, rank_corpus = pbmc_corpus
    summary = build_corpus(pbmc68k_reduced(), tmp_path, BuildOptions(progress=False, expression_bins=8,
                                                                      model_input_size=40))
    corpus = datasets.load_from_disk(str(tmp_path))
    assert summary["expression_bins"] == 8 and corpus["train"].features == VALUE_FEATURES
    extractor = Cell2TextFeatureExtractor.from_pretrained(str(tmp_path / "feature_extractor"))
    assert extractor.num_expression_bins == 8
    source = pbmc68k_reduced()
    ranked = extractor.tokenize(source.adata, source.gene_ids, input_values="log1p")
    by_id = {cell_id: i for i, cell_id in enumerate(source.obs.index)}
    for row in corpus["test"].select(range(5)):
        i = by_id[row["cell_id"]]
        assert row["gene_input_ids"] == ranked[i].tolist() and row["gene_value_ids"] == ranked.bins_of(i).tolist()
        assert row["gene_value_ids"][0] == row["gene_value_ids"][-1] == 0 and set(row["gene_value_ids"][1:-1]) <= set(range(1, 9))
    # the same cells and tokens as the rank-only corpus (truncated to 40): the bins are an addition
    assert [t[:39] for t in corpus["test"]["gene_input_ids"]] == [t[:39] for t in rank_corpus["test"]["gene_input_ids"]]
    with pytest.raises(ValueError, match="leave expression_bins at 0"):
        build_corpus(pbmc68k_reduced(), tmp_path / "again", BuildOptions(progress=False, expression_bins=4,
                                                                         feature_extractor=extractor))


def test_cli_builds_pbmc68k_offline(tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "processing.build_corpus", "--preset", "pbmc68k_reduced",
                           "--out", str(out), "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cells in: 700" in proc.stdout
    corpus = datasets.load_from_disk(str(out))
    assert sum(len(s) for s in corpus.values()) + len(pd.read_csv(out / "rejects.csv")) == 700
    assert (out / "feature_extractor" / "preprocessor_config.json").exists()


def test_shards_cover_the_input_and_their_histograms_merge(tmp_path):
    from processing.gene_medians import HistogramGeneMedians, histogram_shard, merge_histogram_files

    options = BuildOptions(progress=False, medians="histogram", gmt=None)
    cells = []
    for i in range(2):
        source = pbmc68k_reduced()
        source.select_shard(i, 2)
        summary = build_corpus(source, tmp_path / f"shard{i}", options)
        assert summary["num_cells_in"] == 350
        cells += [c for s in datasets.load_from_disk(str(tmp_path / f"shard{i}")).values() for c in s["cell_id"]]
    assert sorted(cells) == sorted(pbmc68k_reduced().obs.index)
    merged = merge_histogram_files([tmp_path / f"shard{i}" / "median_histogram.npz" for i in range(2)])
    tags = [histogram_shard(tmp_path / f"shard{i}" / "median_histogram.npz") for i in range(2)]
    source = pbmc68k_reduced()
    assert tags == [(source.input_sha256, source.name, i, 2) for i in range(2)]  # one input's
    build_corpus(pbmc68k_reduced(), tmp_path / "full", options)
    full, ids = HistogramGeneMedians.load(tmp_path / "full" / "median_histogram.npz")
    expected = {g: float(m) for g, m in zip(ids, full.medians()) if np.isfinite(m)}
    assert merged == expected and len(merged) == 750


def _rows(split) -> list[dict]:
    return [dict(row) for row in split]


def test_corpus_streams_with_load_dataset_every_split_every_row(pbmc_corpus):
    out, summary, corpus = pbmc_corpus
    streamed = datasets.load_dataset(str(out), streaming=True)
    assert list(streamed) == list(corpus)
    for split in corpus:
        assert _rows(streamed[split]) == _rows(corpus[split])
        assert len(_rows(streamed[split])) == summary["splits"][split]


def test_splits_are_saved_through_datasets_in_bounded_shards(tmp_path, pbmc_corpus):
    _, summary, corpus = pbmc_corpus
    build_corpus(pbmc68k_reduced(), tmp_path / "c", BuildOptions(progress=False, max_shard_size="100KB"))
    files = sorted((tmp_path / "c" / "train").glob("data-*.arrow"))
    assert len(files) > 1 and all(f.stat().st_size < 300_000 for f in files)
    state = json.loads((tmp_path / "c" / "train" / "state.json").read_text())
    assert [f["filename"] for f in state["_data_files"]] == [f.name for f in files]  # written by datasets itself
    sharded = datasets.load_from_disk(str(tmp_path / "c"))
    streamed = datasets.load_dataset(str(tmp_path / "c"), streaming=True)
    for split in corpus:
        assert _rows(sharded[split]) == _rows(corpus[split]) == _rows(streamed[split])


def test_pathways_are_the_normalised_top_two_never_repeated_and_tabled_per_cell_type(pbmc_corpus):
    from processing.gene_medians import normalize_total
    from processing.pathways import (PATHWAY_GENE_MATCHING, DEFAULT_GMT, aucell, display_names, filter_set_sizes,
                                     read_gmt, sets_in_data_symbols)

    out, summary, corpus = pbmc_corpus
    assert summary["pathway_library"] == DEFAULT_GMT.name and summary["pathway_ranking"] == "AUCell, normalized"
    assert summary["pathway_set_sizes"] == [15, 500] or summary["pathway_set_sizes"] == (15, 500)
    # the corpus's pathways are the two best sets by AUC / best possible AUC, computed directly
    source = pbmc68k_reduced()
    assert summary["pathway_gene_matching"] == PATHWAY_GENE_MATCHING
    # matched by gene: 36 of the 50 genes pbmc68k_reduced names by a previous symbol (IGJ) are in GO's sets, as JCHAIN
    gene_sets = sets_in_data_symbols(filter_set_sizes(read_gmt(DEFAULT_GMT), 15, 500), source.gene_ids,
                                     source.gene_symbols)
    assert sum("IGJ" in genes for genes in gene_sets.values()) > 0
    normalized, _ = normalize_total(sp.csr_matrix(source.adata.X), "log1p")
    normalized.data = np.log1p(normalized.data)
    scores = aucell(normalized, source.gene_symbols, gene_sets, min_genes=5, normalize=True)
    names = display_names(list(gene_sets))
    best = np.argsort(-scores, axis=1, kind="stable")[:, :2]  # a set scoring 0 is not named (docs/corpus.md)
    expected = {cell: [names[j] for j in best[i] if scores[i, j] > 0] for i, cell in enumerate(source.obs.index)}
    rows = [row for split in corpus.values() for row in split]
    assert all(row["pathways"] == expected[row["cell_id"]] for row in rows)
    assert all(len(set(row["pathways"])) == len(row["pathways"]) for row in rows)  # never one set twice
    assert all(row["description"].count(f'"{p}"') == 1 for row in rows for p in row["pathways"])
    assert not any("(GO:" in p for row in rows for p in row["pathways"])
    # the card lists the top three pathways per cell type, from the summary
    table = summary["top_pathways_by_cell_type"]
    assert set(table) == set(summary["ontology_term_ids"]["cell_type"])
    nk = table["natural killer cell"]
    assert nk["cells"] == sum(summary["label_counts"]["cell_type"][s].get("natural killer cell", 0) for s in corpus)
    assert len(nk["pathways"]) == 3 and nk["pathways"][0]["name"] == "Natural Killer Cell Mediated Immunity"
    counted = Counter(p for row in rows if row["cell_type"] == "natural killer cell" for p in row["pathways"])
    listed = {p["name"]: p["share"] for p in nk["pathways"]}
    assert all(share == pytest.approx(counted[name] / 31, abs=1e-4) for name, share in listed.items())
    assert min(counted[n] for n in listed) >= max(c for n, c in counted.items() if n not in listed)  # a top three
    card = (out / "README.md").read_text()
    assert "## Top pathways per cell type" in card and "| natural killer cell | 31 | Natural Killer Cell Mediated Immunity" in card


def test_raw_pathway_ranking_is_the_papers_option(tmp_path, monkeypatch):
    import processing.build_corpus

    calls = []

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return aucell(*args, **kwargs)

    aucell = processing.build_corpus.aucell
    monkeypatch.setattr(processing.build_corpus, "aucell", recorded)
    summary = build_corpus(pbmc68k_reduced(), tmp_path / "raw", BuildOptions(progress=False, pathway_ranking="raw"))
    assert summary["pathway_ranking"] == "AUCell, raw"
    # a set the cell does not express is never named (its tie credit in a shallow cell): the reviewer's finding
    assert calls and all(call["expressed_sets_only"] and not call["normalize"] for call in calls)
    with pytest.raises(ValueError, match="pathway_ranking"):
        build_corpus(pbmc68k_reduced(), tmp_path / "bad", BuildOptions(progress=False, pathway_ranking="zscore"))


def test_a_source_naming_two_genes_alike_scores_pathways_by_one_name_per_column(tmp_path, monkeypatch):
    """GENCODE names some genes alike (two MALL genes in CELLxGENE's feature_name): a library gene matched by
    Ensembl ID to the second counted at the first column, another gene. The builder names each column once."""
    import processing.build_corpus

    names_scored = []

    def recorded(X, gene_names, *args, **kwargs):
        names_scored.append(list(gene_names))
        return aucell(X, gene_names, *args, **kwargs)

    aucell = processing.build_corpus.aucell
    monkeypatch.setattr(processing.build_corpus, "aucell", recorded)
    source = pbmc68k_reduced()
    source.gene_symbols = [source.gene_symbols[0], *source.gene_symbols[:-1]]  # the first name twice
    build_corpus(source, tmp_path / "corpus", BuildOptions(progress=False))
    assert names_scored and all(len(set(names)) == len(names) for names in names_scored)
    assert names_scored[0][:2] == [source.gene_symbols[0], f"{source.gene_symbols[0]} (column 1)"]


def test_pathway_max_rank_is_an_option_and_a_warning_names_it_where_cells_express_fewer_genes(tmp_path, caplog):
    """A reviewer's finding: AUCell's top ranks default to 5% of the columns (3,000 of Census's 60k), above the genes
    most cells express, where unexpressed genes fill the top ranks; nothing said so and nothing could change it."""
    summary = build_corpus(pbmc68k_reduced(), tmp_path / "default", BuildOptions(progress=False))
    assert summary["pathway_max_rank"] == 38  # 5% of pbmc68k_reduced's 765 genes
    assert "--pathway-max-rank" not in caplog.text
    summary = build_corpus(pbmc68k_reduced(), tmp_path / "wide", BuildOptions(progress=False, pathway_max_rank=700))
    assert summary["pathway_max_rank"] == 700
    assert "AUCell looks at each cell's top 700 genes, but the median cell here expresses" in caplog.text
    assert "Pass --pathway-max-rank below" in caplog.text
    with pytest.raises(ValueError, match="pathway_max_rank must be an integer between 1 and the number of genes"):
        build_corpus(pbmc68k_reduced(), tmp_path / "bad", BuildOptions(progress=False, pathway_max_rank=0))
    from processing.build_corpus import pathway_max_rank

    assert pathway_max_rank(BuildOptions(pathway_max_rank=765), 765) == 765  # every gene: the most there is
    with pytest.raises(ValueError, match=r"the number of genes \(765\), got 766"):
        pathway_max_rank(BuildOptions(pathway_max_rank=766), 765)


def test_an_empty_split_is_saved_so_that_the_corpus_loads(tmp_path):
    """Too few donors leave a split empty; datasets writes no shard for it and load_from_disk failed (IndexError)."""
    (tmp_path / "staging").mkdir()
    writer = SplitWriter(tmp_path / "staging", ["train", "test"])
    writer.write("train", {**{name: ["x"] for name in _STRING_COLUMNS}, "pathways": [()]},
                 np.array([5, 6], dtype=np.int32), np.array([0, 2]))
    writer.close()
    writer.save(tmp_path / "corpus")
    loaded = datasets.load_from_disk(str(tmp_path / "corpus"))
    assert loaded["train"].num_rows == 1 and loaded["test"].num_rows == 0
    assert loaded["train"][0]["gene_input_ids"] == [5, 6]


def test_publish_corpus_pushes_splits_then_its_card_for_the_repo_then_its_files(pbmc_corpus, monkeypatch, tmp_path):
    import shutil

    from hub_cards import publish

    out = Path(shutil.copytree(pbmc_corpus[0], tmp_path / "pbmc"))  # publishing rewrites the card: not the shared one
    calls = []

    class FakeHub:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("repo", repo_id, kwargs["private"]))

        def repo_info(self, repo_id, **kwargs):
            return SimpleNamespace(private=True)

        def upload_folder(self, **kwargs):
            calls.append(("folder", kwargs["path_in_repo"], sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())))

        def upload_file(self, **kwargs):
            calls.append(("file", kwargs["path_in_repo"], len(kwargs["path_or_fileobj"]) > 0))  # the bytes uploaded

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo_id, **kw: calls.append(
        ("splits", repo_id, {name: len(split) for name, split in self.items()}, kw.get("private"))))
    monkeypatch.setattr(publish, "push_dataset_card", lambda card, repo_id: calls.append(("card", repo_id, card.text)))
    url = publish.publish_corpus(out, "your-org/pbmc-corpus", private=True, api=FakeHub())

    assert url == "https://huggingface.co/datasets/your-org/pbmc-corpus"
    assert [c[0] for c in calls] == ["repo", "splits", "card", "folder", "file", "file", "file"]
    assert calls[0] == ("repo", "your-org/pbmc-corpus", True)
    assert calls[1][2] == json.loads((out / "summary.json").read_text())["splits"]
    assert calls[1][3] is True  # --private reaches the data too (datasets makes a new repo public otherwise)
    assert "your-org/pbmc-corpus" in calls[2][2] and "your-org/pbmc-corpus" in (out / "README.md").read_text()
    assert calls[3][1] == "feature_extractor" and "preprocessor_config.json" in calls[3][2]
    assert [c[1] for c in calls[4:]] == ["summary.json", "rejects.csv", "unmapped_genes.txt"] and all(c[2] for c in calls[4:])


def test_ids_of_another_ontology_or_obsolete_terms_are_left_out_of_the_text_with_a_warning(caplog):
    """A mis-mapped column was stated as the field: sex and disease swapped wrote "a donor with female" and a record
    with sex "COVID-19"; an obsolete tissue wrote "originates from the obsolete cranial structure"."""
    from processing.corpus import describe, resolve_labels

    obs = pd.DataFrame({
        "cell_type": ["B cell"] * 4, "cell_type_ontology_term_id": ["CL:0000236"] * 4,
        "tissue": ["blood", "cranial structure", "blood", "blood"],
        "tissue_ontology_term_id": ["UBERON:0000178", "UBERON:0000032", "UBERON:0000178", "UBERON:0000178"],
        "sex": ["female", "male", "COVID-19", "female"],
        "sex_ontology_term_id": ["PATO:0000383", "PATO:0000384", "MONDO:0100096", "PATO:0000383"],
        "disease": ["normal", "normal", "female", "deficiency"],
        "disease_ontology_term_id": ["PATO:0000461", "PATO:0000461", "PATO:0000383", "MONDO:0000003"],
        "development_stage": ["adult stage"] * 4, "development_stage_ontology_term_id": ["HsapDv:0000258"] * 4,
        "donor_id": ["d"] * 4, "dataset_id": ["x"] * 4,
    })
    with caplog.at_level("WARNING", logger="processing.corpus"):
        labels, reasons = resolve_labels(obs, required_fields=("cell_type",))
    assert list(reasons) == [None] * 4
    assert list(labels["sex"]) == ["female", "male", None, "female"]
    assert list(labels["disease"]) == ["normal", "normal", None, None]
    assert list(labels["tissue"]) == ["blood", None, "blood", "blood"]
    assert labels["tissue_ontology_term_id"][1] is None and labels["disease_ontology_term_id"][3] is None
    text = describe("B cell", "CL:0000236", labels["tissue"][2], labels["sex"][2], labels["disease"][2], None, ())
    assert "COVID" not in text and "female" not in text
    warned = caplog.text
    assert "1 cells' sex are ids that are not PATO:0000383 / PATO:0000384" in warned and "MONDO:0100096" in warned
    assert "1 cells' tissue are obsolete terms without a replacement" in warned and "UBERON:0000032" in warned
    # the schema's other values: several diseases stay; hermaphrodite (the template states female or male) and a cell
    # line's Cellosaurus id (no donor's tissue) are left out of the record too, as the text leaves them out
    other = obs.iloc[:1].copy()
    other[["sex", "sex_ontology_term_id"]] = ["hermaphrodite", "PATO:0001340"]
    other[["tissue", "tissue_ontology_term_id"]] = ["HeLa", "CVCL_0030"]
    other[["disease", "disease_ontology_term_id"]] = ["COVID-19 || lung disease", "MONDO:0005275 || MONDO:0100096"]
    kept, _ = resolve_labels(other)
    assert kept["disease_ontology_term_id"][0] == "MONDO:0005275 || MONDO:0100096"
    # an id not in its ontology's form (a hand-edited h5ad) is left out too: it was stated as the tissue's id
    other[["tissue", "tissue_ontology_term_id"]] = ["lung", "UBERON:lung"]
    malformed, _ = resolve_labels(other)
    assert malformed.loc[0, ["tissue", "tissue_ontology_term_id"]].isna().all()
    assert malformed["tissue_left_out"][0] == "wrong_ontology_tissue_term"
    assert kept.loc[0, ["sex", "sex_ontology_term_id", "tissue", "tissue_ontology_term_id"]].isna().all()
    assert (kept["sex_left_out"][0], kept["tissue_left_out"][0]) == ("sex_not_female_or_male", "tissue_type_cell_line")
    # a required field so left out rejects the cell with the reason
    _, reasons = resolve_labels(obs, required_fields=("cell_type", "sex", "tissue"))
    assert list(reasons) == [None, "obsolete_tissue_term", "wrong_ontology_sex_term", None]



def test_a_schema_4_tissue_suffix_is_not_warned_about_as_an_id_of_another_form(caplog):
    """CELLxGENE schema 4 marked organoids and cell cultures with a suffix of the tissue id: the form check warned
    "ids that are not UBERON: / CL: / ... check which obs column holds the tissue ids (--obs-map)" of a valid file."""
    from processing.corpus import resolve_labels

    obs = pd.DataFrame({
        "cell_type": ["B cell"] * 2, "cell_type_ontology_term_id": ["CL:0000236"] * 2,
        "tissue": ["lung", "B cell"],
        "tissue_ontology_term_id": ["UBERON:0002048 (organoid)", "CL:0000236 (cell culture)"],
        "sex": ["female"] * 2, "sex_ontology_term_id": ["PATO:0000383"] * 2,
        "disease": ["normal"] * 2, "disease_ontology_term_id": ["PATO:0000461"] * 2,
        "development_stage": ["adult stage"] * 2, "development_stage_ontology_term_id": ["HsapDv:0000258"] * 2,
        "donor_id": ["d"] * 2, "dataset_id": ["x"] * 2,
    })
    with caplog.at_level("WARNING", logger="processing.corpus"):
        labels, _ = resolve_labels(obs)
    assert list(labels["tissue_left_out"]) == ["tissue_type_organoid", "tissue_type_cell_culture"]
    assert "are ids that are not" not in caplog.text and "2 cells are no donor's tissue" in caplog.text


def test_ids_in_another_case_or_joined_otherwise_are_warned_about_naming_cellxgenes_form_not_the_obs_column(caplog):
    """Disease ids in lower case or joined as "A||B" are outside the CELLxGENE schema and left out; the warning named
    the wrong fix ("check which obs column holds the disease ids (--obs-map)") for ids read from the right column."""
    from processing.corpus import resolve_labels

    ids = ["mondo:0100096", "MONDO:0100096||MONDO:0005275", "MONDO:0005275  ||  MONDO:0100096", "uberon:0000178"]
    obs = pd.DataFrame({
        "cell_type": ["B cell"] * 4, "cell_type_ontology_term_id": ["CL:0000236"] * 4,
        "tissue": ["blood"] * 4, "tissue_ontology_term_id": ["UBERON:0000178"] * 4,
        "sex": ["female"] * 4, "sex_ontology_term_id": ["PATO:0000383"] * 4,
        "disease": ["COVID-19"] * 4, "disease_ontology_term_id": ids,
        "development_stage": ["adult stage"] * 4, "development_stage_ontology_term_id": ["HsapDv:0000258"] * 4,
        "donor_id": ["d"] * 4, "dataset_id": ["x"] * 4,
    })
    with caplog.at_level("WARNING", logger="processing.corpus"):
        labels, _ = resolve_labels(obs)
    assert list(labels["disease_left_out"]) == ["wrong_ontology_disease_term"] * 4
    warned = caplog.text
    assert "4 cells' disease are ids that are not MONDO:" in warned
    assert "write them as the CELLxGENE schema does" in warned and "joined by ' || ' in ascending order" in warned
    assert "'mondo:0100096' as 'MONDO:0100096'" in warned
    assert "'MONDO:0100096||MONDO:0005275' as 'MONDO:0005275 || MONDO:0100096'" in warned
    # an id of another ontology (a tissue's, in lower case too) still sends the user to the obs column
    assert "for the other ids, check which obs column holds the disease ids (--obs-map)" in warned


def test_a_cell_type_read_as_the_tissue_from_the_label_column_or_a_replacement_is_not_the_donors_tissue():
    """The tissue kind was read from obs's id column alone: a CL id given in the tissue label column (--obs-map
    organ_id=tissue) and an obsolete UBERON term replaced by a CL term (UBERON:3010309 "obsolete B cell") were both
    read as CL:0000236 and stated as "It originates from the B cell of a donor", exit 0 and no warning."""
    from processing.corpus import describe, resolve_labels

    obs = pd.DataFrame({
        "cell_type": ["B cell"] * 3, "cell_type_ontology_term_id": ["CL:0000236"] * 3,
        "tissue": ["CL:0000236", "B cell", "blood"], "tissue_ontology_term_id": [None, "UBERON:3010309", "UBERON:0000178"],
        "sex": ["female"] * 3, "sex_ontology_term_id": ["PATO:0000383"] * 3,
        "disease": ["normal"] * 3, "disease_ontology_term_id": ["PATO:0000461"] * 3,
        "development_stage": ["adult stage"] * 3, "development_stage_ontology_term_id": ["HsapDv:0000258"] * 3,
        "donor_id": ["d"] * 3, "dataset_id": ["x"] * 3,
    })
    labels, reasons = resolve_labels(obs)
    assert list(reasons) == [None] * 3
    assert list(labels["tissue"]) == [None, None, "blood"]
    assert list(labels["tissue_ontology_term_id"]) == [None, None, "UBERON:0000178"]
    assert list(labels["tissue_left_out"]) == ["tissue_type_cell_culture"] * 2 + [None]
    assert "originates" not in describe("B cell", "CL:0000236", labels["tissue"][1], None, None, None, ())


def test_a_donors_joined_disease_ids_are_read_as_their_terms_not_the_label_given_beside_them():
    """Joined disease ids ("MONDO:... || MONDO:...", CELLxGENE schema 5+) were not looked up: the label given beside
    them was stated as given, so "normal" beside COVID-19 and a lung disorder wrote "a healthy donor" (the label ->
    id table: "normal" -> the two MONDO ids), and an obsolete term among them was stated, exit 0 and no warning; a
    single id's term wins over its label."""
    from processing.build_corpus import _ontology_ids
    from processing.corpus import describe, resolve_labels

    diseases = {"MONDO:0100096 || MONDO:0005275": "normal",  # COVID-19 and lung disorder
                "MONDO:0000010 || MONDO:0100096": "COVID-19 || cerebrooculofacioskeletal syndrome",  # replaced term
                "MONDO:0100096 || MONDO:0000003": "COVID-19 || deficiency"}  # obsolete, no replacement
    obs = pd.DataFrame({
        "cell_type": ["B cell"] * 3, "cell_type_ontology_term_id": ["CL:0000236"] * 3,
        "tissue": ["blood"] * 3, "tissue_ontology_term_id": ["UBERON:0000178"] * 3,
        "sex": ["female"] * 3, "sex_ontology_term_id": ["PATO:0000383"] * 3,
        "disease": list(diseases.values()), "disease_ontology_term_id": list(diseases),
        "development_stage": ["adult stage"] * 3, "development_stage_ontology_term_id": ["HsapDv:0000258"] * 3,
        "donor_id": ["d"] * 3, "dataset_id": ["x"] * 3,
    })
    labels, _ = resolve_labels(obs)
    assert list(labels["disease"]) == ["lung disorder || COVID-19", "COFS syndrome || COVID-19", None]
    assert list(labels["disease_ontology_term_id"]) == ["MONDO:0005275 || MONDO:0100096",
                                                        "MONDO:0008926 || MONDO:0100096", None]
    assert labels["disease_left_out"][2] == "obsolete_disease_term"
    assert "healthy" not in describe("B cell", "CL:0000236", "blood", None, labels["disease"][0], None, ())
    table, unknown = _ontology_ids(labels, np.ones(3, dtype=bool))
    assert table["disease"] == {"lung disorder || COVID-19": "MONDO:0005275 || MONDO:0100096",
                                "COFS syndrome || COVID-19": "MONDO:0008926 || MONDO:0100096"}
    assert "disease" not in unknown
    # the ids given in the label column (--obs-map disease_ids=disease) were stated as the text "a donor with MONDO:..."
    by_label, _ = resolve_labels(obs.assign(disease_ontology_term_id=None, disease=list(diseases)))
    assert list(by_label["disease"])[:2] == ["lung disorder || COVID-19", "COFS syndrome || COVID-19"]


def test_a_term_named_twice_among_a_donors_joined_disease_ids_is_stated_once():
    """Joined disease ids naming one term twice were stated twice: "MONDO:0100096 || MONDO:0100096" wrote "a donor
    with COVID-19 || COVID-19", an obsolete id beside its replacement "COFS syndrome || COFS syndrome" (another
    label than "COFS syndrome" for the same disease), exit 0, no warning; "PATO:0000461 || PATO:0000461" was left
    out as normal joined with a disease, not stated as a healthy donor."""
    from processing.corpus import describe, resolve_labels

    diseases = ["MONDO:0100096 || MONDO:0100096", "MONDO:0000010 || MONDO:0008926", "PATO:0000461 || PATO:0000461"]
    labels, _ = resolve_labels(pd.concat([_one_cell_obs(disease="x", disease_ontology_term_id=ids) for ids in diseases],
                                         ignore_index=True))
    assert list(labels["disease"]) == ["COVID-19", "COFS syndrome", "normal"]
    assert list(labels["disease_ontology_term_id"]) == ["MONDO:0100096", "MONDO:0008926", "PATO:0000461"]
    assert list(labels["disease_left_out"]) == [None] * 3
    assert "of a healthy donor." in describe("B cell", "CL:0000236", "blood", None, labels["disease"][2], None, ())


def test_a_donors_joined_disease_ids_in_another_order_give_the_same_label():
    """"MONDO:0100096 || MONDO:0005275" wrote "COVID-19 || lung disorder" and "MONDO:0005275 || MONDO:0100096" (the
    same diseases; an obsolete id for one of them too) "lung disorder || COVID-19": one donor's cells, or two
    datasets' donors with the same diseases, trained on two labels, and the label -> id table held both, exit 0."""
    from processing.build_corpus import _ontology_ids
    from processing.corpus import resolve_labels

    diseases = ["MONDO:0100096 || MONDO:0005275", "MONDO:0005275 || MONDO:0100096", "MONDO:0100096 || MONDO:0000010",
                "MONDO:0008926 || MONDO:0100096"]  # MONDO:0000010 is replaced by MONDO:0008926 (COFS syndrome)
    obs = pd.concat([_one_cell_obs(disease="x", disease_ontology_term_id=ids) for ids in diseases], ignore_index=True)
    labels, _ = resolve_labels(obs)
    assert list(labels["disease"]) == ["lung disorder || COVID-19"] * 2 + ["COFS syndrome || COVID-19"] * 2
    assert list(labels["disease_ontology_term_id"]) == (["MONDO:0005275 || MONDO:0100096"] * 2
                                                        + ["MONDO:0008926 || MONDO:0100096"] * 2)
    table, _ = _ontology_ids(labels, np.ones(4, dtype=bool))
    assert table["disease"] == {"lung disorder || COVID-19": "MONDO:0005275 || MONDO:0100096",
                                "COFS syndrome || COVID-19": "MONDO:0008926 || MONDO:0100096"}


def test_joined_disease_ids_with_an_unknown_one_give_one_label_whatever_their_order():
    """An id the bundled MONDO does not know (a newer term) among a donor's joined ids kept the order obs gave:
    "MONDO:9999999 || MONDO:0100096" ("long covid || COVID-19") and the reverse trained on two labels of one disease
    set, and "long covid || long covid" was stated twice, exit 0. An unknown id keeps the label given beside it."""
    from processing.corpus import resolve_labels

    given = [("long covid || COVID-19", "MONDO:9999999 || MONDO:0100096"),
             ("COVID-19 || long covid", "MONDO:0100096 || MONDO:9999999"),
             ("long covid || long covid", "MONDO:9999999 || MONDO:9999999"),
             ("long covid", "MONDO:9999999 || MONDO:0100096"),  # labels that do not pair with the ids: as given
             # a known id is its current term with its label: an obsolete one beside its replacement is named once
             ("COFS || long covid || cofs", "MONDO:0000010 || MONDO:9999999 || MONDO:0008926")]
    labels, _ = resolve_labels(pd.concat([_one_cell_obs(disease=label, disease_ontology_term_id=ids)
                                          for label, ids in given], ignore_index=True))
    assert list(labels["disease"]) == ["COVID-19 || long covid"] * 2 + ["long covid"] * 2 + [
        "COFS syndrome || long covid"]
    assert list(labels["disease_ontology_term_id"]) == ["MONDO:0100096 || MONDO:9999999"] * 2 + [
        "MONDO:9999999", "MONDO:9999999 || MONDO:0100096", "MONDO:0008926 || MONDO:9999999"]


def test_a_uberon_stage_as_the_tissue_or_a_uberon_tissue_as_the_stage_is_left_out(caplog):
    """UBERON holds both anatomy (tissue ids) and life cycle stages (the stage ids of organisms without a stage
    ontology): a stage id in the tissue column was stated as "It originates from the post-juvenile adult stage of
    a donor", and a tissue id in the stage column filled the corpus's development_stage with "blood", exit 0."""
    from processing.corpus import resolve_labels

    obs = pd.DataFrame({
        "cell_type": ["B cell"] * 3, "cell_type_ontology_term_id": ["CL:0000236"] * 3,
        "tissue": ["adult", "blood", "blood"], "tissue_ontology_term_id": ["UBERON:0000113", "UBERON:0000178",
                                                                          "UBERON:0000178"],
        "sex": ["female"] * 3, "sex_ontology_term_id": ["PATO:0000383"] * 3,
        "disease": ["normal"] * 3, "disease_ontology_term_id": ["PATO:0000461"] * 3,
        "development_stage": ["adult stage", "blood", "adult"],
        "development_stage_ontology_term_id": ["HsapDv:0000258", "UBERON:0000178", "UBERON:0000113"],
        "donor_id": ["d"] * 3, "dataset_id": ["x"] * 3,
    })
    with caplog.at_level("WARNING", logger="processing.corpus"):
        labels, _ = resolve_labels(obs)
    assert list(labels["tissue"]) == [None, "blood", "blood"]
    assert list(labels["development_stage"]) == ["adult stage", None, "post-juvenile adult stage"]
    assert (labels["tissue_left_out"][0], labels["development_stage_left_out"][1]) == (
        "wrong_ontology_tissue_term", "wrong_ontology_development_stage_term")
    assert "or UBERON life cycle stages" in caplog.text and "UBERON:0000113" in caplog.text

def test_shards_built_with_hashed_splits_agree_and_sharding_without_them_warns(tmp_path, caplog):
    from processing.build_corpus import main as build_main
    from processing.splits import hashed_split

    with pytest.raises(SystemExit):
        build_main(["--preset", "pbmc68k_reduced", "--out", str(tmp_path / "x"), "--fold", "0/5", "--hashed-splits"])
    summary = build_main(["--preset", "pbmc68k_reduced", "--out", str(tmp_path / "s0"), "--no-progress",
                          "--gmt", "none", "--shard", "0/2", "--hashed-splits", "--seed", "4"])
    assert summary["hashed_splits"] is True and summary["shard"] == "0/2"
    corpus = datasets.load_from_disk(str(tmp_path / "s0"))
    for index, name in enumerate(("train", "validation", "test")):  # pbmc68k has no donors: each cell by its id
        ids = corpus[name]["cell_id"]
        assert (hashed_split([f"cell:{c}" for c in ids], seed=4) == index).all()
    with caplog.at_level("WARNING", logger="processing.build_corpus"):
        build_main(["--preset", "pbmc68k_reduced", "--out", str(tmp_path / "s1"), "--no-progress", "--gmt", "none",
                    "--shard", "1/2"])
    assert "--shard without --hashed-splits" in caplog.text


def test_an_empty_token_dictionary_ends_the_command_in_one_line_naming_it(tmp_path):
    """An empty (or truncated) --token-dictionary ended build_corpus in an EOFError traceback."""
    from processing.build_corpus import main

    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(SystemExit, match=f"^build_corpus: error: {tmp_path / 'empty.pkl'} is no Geneformer token "
                                         "dictionary .*: Ran out of input"):
        main(["--preset", "pbmc68k_reduced", "--out", str(tmp_path / "out"), "--token-dictionary",
              str(tmp_path / "empty.pkl"), "--gene-median-file", str(tmp_path / "empty.pkl")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings, message", [
    ({"fold": (0, 5), "hashed_splits": True}, "hashed_splits and fold exclude each other"),
    ({"fold": (7, 5)}, "fold must be in 0 .. 4, got 7"),
    ({"pathway_ranking": "ranked"}, "pathway_ranking must be 'normalized' or 'raw'"),
])
def test_contradicting_options_are_refused_before_the_data_is_read(tmp_path, settings, message):
    """Through the Python API these were refused after the first pass over the data (hours for a Census build)."""
    source = pbmc68k_reduced()
    source.iter_chunks = lambda chunk_size: pytest.fail("the data was read")
    with pytest.raises(ValueError, match=message):
        build_corpus(source, tmp_path / "out", BuildOptions(progress=False, **settings))
    assert not (tmp_path / "out").exists()


def test_the_build_benchmark_never_keeps_a_synthetic_file_it_did_not_finish(tmp_path, monkeypatch):
    """benchmarks/build_corpus.py keeps its synthetic h5ad files for reruns: one whose write was interrupted was kept
    under its final name, and every later run built from that partial file (a traceback, or figures of other data)."""
    from tiny_parts import load_benchmark

    benchmark = load_benchmark("build_corpus")

    def interrupted(path, n_cells):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "write_synthetic_h5ad", interrupted)
    monkeypatch.setattr(sys, "argv", ["build_corpus.py", "--sizes", "10", "--workdir", str(tmp_path)])
    with pytest.raises(KeyboardInterrupt):
        benchmark.main()
    assert not (tmp_path / "synthetic_10.h5ad").exists()


def test_nullable_and_float_obs_columns_read_as_the_plain_ones():
    """pandas' nullable columns: pd.NA was read as the id "<NA>" (a tissue given by label only was left out, as an id
    of the wrong form), and Int64 or float donor ids (a column with gaps) as "7.0": one donor's cells in a shard of
    an int column and a shard of a column with gaps were two donors, so hashed splits and the join's donor check
    could put them in train and test."""
    from processing.corpus import resolve_labels

    nullable = lambda values: pd.array(values, dtype="string")  # noqa: E731
    obs = pd.DataFrame({
        "cell_type": ["B cell"] * 3, "cell_type_ontology_term_id": ["CL:0000236"] * 3,
        "tissue": nullable(["lung", None, "lung"]), "tissue_ontology_term_id": nullable([None, None, None]),
        "sex": ["female"] * 3, "sex_ontology_term_id": ["PATO:0000383"] * 3,
        "disease": ["normal"] * 3, "disease_ontology_term_id": ["PATO:0000461"] * 3,
        "development_stage": ["adult stage"] * 3, "development_stage_ontology_term_id": ["HsapDv:0000258"] * 3,
        "donor_id": pd.array([7, None, 8], dtype="Int64"), "dataset_id": ["x"] * 3,
    })
    labels, _ = resolve_labels(obs)
    assert list(labels["tissue"]) == ["lung", None, "lung"] and list(labels["tissue_left_out"]) == [None] * 3
    assert list(labels["donor_id"]) == ["7", None, "8"]
    labels, _ = resolve_labels(obs.assign(donor_id=np.array([7.0, np.nan, 8.5])))
    assert list(labels["donor_id"]) == ["7", None, "8.5"]
    assert list(resolve_labels(obs.assign(donor_id=[7, 7, 8]))[0]["donor_id"]) == ["7", "7", "8"]


def _one_cell_obs(**values) -> pd.DataFrame:
    obs = {"cell_type": "B cell", "cell_type_ontology_term_id": "CL:0000236", "tissue": "blood",
           "tissue_ontology_term_id": "UBERON:0000178", "sex": "female", "sex_ontology_term_id": "PATO:0000383",
           "disease": "normal", "disease_ontology_term_id": "PATO:0000461", "development_stage": "adult stage",
           "development_stage_ontology_term_id": "HsapDv:0000258", "donor_id": "d", "dataset_id": "x", **values}
    return pd.DataFrame({key: [value] for key, value in obs.items()})


def test_normal_joined_with_a_disease_is_left_out_with_its_reason(caplog):
    """A donor's disease ids "MONDO:0100096 || PATO:0000461" passed the id check and were stated as "a donor with
    COVID-19 || normal", exit 0: the CELLxGENE schema's "normal" stands alone."""
    from processing.build_corpus import _reject_fix
    from processing.corpus import resolve_labels

    obs = _one_cell_obs(disease="COVID-19 || normal", disease_ontology_term_id="MONDO:0100096 || PATO:0000461")
    with caplog.at_level("WARNING", logger="processing.corpus"):
        labels, _ = resolve_labels(obs)
    assert labels.loc[0, ["disease", "disease_ontology_term_id"]].isna().all()
    assert labels["disease_left_out"][0] == "normal_joined_with_disease"
    assert "1 cells' disease are PATO:0000461 (normal) joined with diseases" in caplog.text
    _, reasons = resolve_labels(obs, required_fields=("cell_type", "disease"))
    assert list(reasons) == ["normal_joined_with_disease"]
    assert "PATO:0000461 alone" in _reject_fix("normal_joined_with_disease")
    # several diseases, and normal alone, are stated
    for ids in ("MONDO:0005275 || MONDO:0100096", "PATO:0000461"):
        kept, _ = resolve_labels(_one_cell_obs(disease_ontology_term_id=ids))
        assert kept["disease_ontology_term_id"][0] == ids and kept["disease_left_out"][0] is None



def test_a_cell_type_replaced_by_another_ontologys_term_is_obsolete_not_unknown(caplog):
    """CL:0017505 is obsolete, replaced by a PATO term: it was rejected as unknown_cell_type_term and warned about
    as an id unknown to the bundled Cell Ontology."""
    from processing.corpus import resolve_labels

    with caplog.at_level("WARNING", logger="processing.corpus"):
        _, reasons = resolve_labels(_one_cell_obs(cell_type="increased nucleus size",
                                                  cell_type_ontology_term_id="CL:0017505"))
    assert list(reasons) == ["obsolete_cell_type_term"]
    assert "unknown to the bundled Cell Ontology" not in caplog.text
    _, reasons = resolve_labels(_one_cell_obs(cell_type_ontology_term_id="UBERON:0000178"))
    assert list(reasons) == ["unknown_cell_type_term"]  # an id of another ontology given as the cell type
