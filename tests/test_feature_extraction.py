"""Tests for the Geneformer rank-value feature extractor and the packaged gene table."""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from tiny_parts import REPO, edit_json

from modeling_cell2text.feature_extraction_cell2text import Cell2TextFeatureExtractor, RankedCells
from modeling_cell2text.gene_ids import var_gene_ids
from modeling_cell2text.gene_table import ensembl_to_symbol, symbol_to_ensembl
from modeling_cell2text.rank_value import _order_near_ties

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_VOCAB = 40
VOCAB_GENES = [f"ENSG{i:011d}" for i in range(1, N_VOCAB + 1)]
SYMBOLS = {gene: f"GENE{i}" for i, gene in enumerate(VOCAB_GENES)}
INPUT_GENES = [f"{g}.{i % 3 + 1}" if i % 2 else g for i, g in enumerate(VOCAB_GENES[:30])] + [
    f"ENSG9{i:010d}" for i in range(6)  # not in the vocabulary
]


def make_extractor(**kwargs) -> Cell2TextFeatureExtractor:
    """Vocabulary with shuffled token ids (so the tie rule differs from column order) and medians
    from a small set (so many values tie)."""
    rng = np.random.default_rng(0)
    token_ids = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    token_ids.update({g: int(t) for g, t in zip(VOCAB_GENES, rng.permutation(N_VOCAB) + 4)})
    medians = {g: float(rng.choice([0.5, 1.0, 2.0, 3.0])) for g in VOCAB_GENES}
    return Cell2TextFeatureExtractor(token_ids, medians, SYMBOLS, **kwargs)


def random_counts(n_cells: int = 37, seed: int = 1) -> sp.csr_matrix:
    """Small-integer counts (many ties), every cell with at least one vocabulary gene, plus
    explicitly stored zeros."""
    rng = np.random.default_rng(seed)
    dense = rng.integers(1, 4, size=(n_cells, len(INPUT_GENES))) * (rng.random((n_cells, len(INPUT_GENES))) < 0.4)
    dense[:, 0] = np.maximum(dense[:, 0], 1)
    matrix = sp.csr_matrix(dense.astype(np.float32))
    matrix.data[::7] = 0.0  # explicit zeros: stored but not expressed
    return matrix


def geneformer_value(count: float, n_counts: float, median: float, input_values: str = "counts") -> float:
    """Geneformer's ranking value of one gene, scalar by scalar: ``count / n_counts * 10_000`` in float32 (the
    matrix's and n_counts' dtype, AnnData's float32), then divided by the float64 median (its norm_factor_vector)."""
    if input_values == "counts":
        normalised = np.float32(count) / np.float32(n_counts) * np.float32(10_000)
        assert type(normalised) is np.float32
    elif input_values == "log1p":
        normalised = np.expm1(np.float64(count))
    else:
        normalised = count
    return float(normalised) / float(median)


def reference_tokens(
    extractor: Cell2TextFeatureExtractor, dense: np.ndarray, genes: list[str], input_values: str = "counts"
) -> list[list[int]]:
    """Plain per-cell rank-value encoding with Geneformer's formula: float64 values, descending; exact ties by
    ascending token id. ``n_counts`` is the cell's total over all input genes."""
    vocab, medians = extractor.gene_token_ids, extractor.gene_medians
    out = []
    for row in dense:
        n_counts = float(np.sum(row, dtype=np.float64))
        entries = []
        for gene, value in zip(genes, row):
            gene = gene.split(".")[0]
            if value != 0 and gene in medians:
                entries.append((geneformer_value(value, n_counts, medians[gene], input_values), vocab[gene]))
        entries.sort(key=lambda e: (-e[0], e[1]))
        tokens = [token for _, token in entries]
        if extractor.special_tokens:
            out.append([vocab["<cls>"]] + tokens[: extractor.model_input_size - 2] + [vocab["<eos>"]])
        else:
            out.append(tokens[: extractor.model_input_size])
    return out


def as_lists(ranked: RankedCells) -> list[list[int]]:
    return [cell.tolist() for cell in ranked]


def dense_of(matrix: sp.csr_matrix) -> np.ndarray:
    return matrix.toarray()


@pytest.fixture
def extractor() -> Cell2TextFeatureExtractor:
    return make_extractor()


@pytest.fixture
def counts() -> sp.csr_matrix:
    return random_counts()


# ----------------------------------------------------------------------------- equality with the reference


@pytest.mark.parametrize("kind", ["csr", "csc", "dense", "csr_array", "coo"])
def test_matches_reference_for_matrix_inputs(extractor, counts, kind):
    converted = {
        "csr": counts,
        "csc": counts.tocsc(),
        "dense": counts.toarray(),
        "csr_array": sp.csr_array(counts),
        "coo": counts.tocoo(),
    }[kind]
    expected = reference_tokens(extractor, dense_of(counts), INPUT_GENES)
    ranked = extractor.tokenize(converted, INPUT_GENES, chunk_size=5, num_threads=2)
    assert as_lists(ranked) == expected
    assert ranked.cell_indices.tolist() == list(range(counts.shape[0]))


def test_many_ties_broken_by_ascending_token_id(extractor):
    # all genes with count 1 and median 1.0 tie: the order is ascending token id
    tied = [g for g in VOCAB_GENES if extractor.gene_medians[g] == 1.0]
    ranked = extractor.tokenize(np.ones((1, len(tied))), tied)
    assert ranked[0][1:-1].tolist() == sorted(extractor.gene_token_ids[g] for g in tied)


def test_matches_reference_for_anndata_in_memory_backed_and_layer(extractor, counts, tmp_path):
    expected = reference_tokens(extractor, dense_of(counts), INPUT_GENES)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(counts.shape[0])])
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=INPUT_GENES))
    assert as_lists(extractor.tokenize(adata, chunk_size=8)) == expected

    layered = ad.AnnData(X=sp.csr_matrix(counts.shape, dtype=np.float32), obs=obs, var=adata.var)
    layered.layers["counts"] = counts
    assert as_lists(extractor.tokenize(layered, layer="counts", chunk_size=8)) == expected

    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        assert as_lists(extractor.tokenize(backed, chunk_size=8)) == expected
    finally:
        backed.file.close()


def test_normalized_and_log1p_inputs_match_reference(extractor, counts):
    normalized = counts.multiply(1e4 / counts.sum(axis=1)).tocsr().astype(np.float64)
    expected = reference_tokens(extractor, normalized.toarray(), INPUT_GENES, "normalized")
    assert as_lists(extractor.tokenize(normalized, INPUT_GENES, input_values="normalized")) == expected
    logged = normalized.copy()
    logged.data = np.log1p(logged.data)
    expected_log = reference_tokens(extractor, logged.toarray(), INPUT_GENES, "log1p")
    assert as_lists(extractor.tokenize(logged, INPUT_GENES, input_values="log1p")) == expected_log


def test_truncation_with_v2_special_tokens(counts):
    extractor = make_extractor(model_input_size=6)
    ranked = extractor.tokenize(counts, INPUT_GENES)
    assert as_lists(ranked) == reference_tokens(extractor, dense_of(counts), INPUT_GENES)
    assert ranked.lengths.max() == 6
    assert all(cell[0] == 2 and cell[-1] == 3 for cell in ranked)


def test_v1_mode_has_no_special_tokens(counts):
    extractor = make_extractor(model_input_size=5, special_tokens=False)
    ranked = extractor.tokenize(counts, INPUT_GENES)
    assert as_lists(ranked) == reference_tokens(extractor, dense_of(counts), INPUT_GENES)
    assert not any(set(cell.tolist()) & {0, 1, 2, 3} for cell in ranked)


@pytest.mark.parametrize("value", ["false", "False", 0])
def test_a_special_tokens_setting_that_is_not_a_bool_is_refused(tmp_path, value):
    """bool("false") is True: a saved config (or a YAML setting) saying "false" kept <cls>/<eos>, without a word."""
    extractor = make_extractor(special_tokens=False)
    extractor.save_pretrained(tmp_path)
    config_file = tmp_path / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config["special_tokens"] = value
    config_file.write_text(json.dumps(config))
    with pytest.raises(TypeError, match=f"special_tokens must be True or False, got {value!r}"):
        Cell2TextFeatureExtractor.from_pretrained(tmp_path)


@pytest.mark.parametrize("special_tokens, setting, value, error, message", [
    (True, "model_input_size", 2, ValueError, "model_input_size must be >= 3"),  # every cell was skipped as empty
    (False, "model_input_size", 0, ValueError, "model_input_size must be >= 1"),
    (True, "model_input_size", 5.0, ValueError, "model_input_size must be an integer, got 5.0"),
    (True, "special_tokens", "false", TypeError, "special_tokens must be True or False"),  # <cls>/<eos> were kept
    (False, "special_tokens", True, ValueError, r"lacks the special tokens \['<cls>', '<eos>'\]"),
    (True, "num_expression_bins", 300, ValueError, "num_expression_bins must be in 0..255"),  # uint8 bins wrapped
    (True, "num_expression_bins", 4.0, ValueError, "num_expression_bins must be an integer"),
])
def test_settings_changed_after_loading_are_checked_when_cells_are_tokenized_or_padded(
        counts, special_tokens, setting, value, error, message):
    """`extractor.model_input_size = N` after loading is how a size is changed: N = 2 with special tokens (0
    without) left every cell without a gene, skipped as empty, exit 0 with skip_empty_cells=True."""
    vocabulary = make_extractor(special_tokens=True).gene_token_ids
    if not special_tokens:  # a V1 vocabulary: no <cls>/<eos>
        vocabulary = {token: i for token, i in vocabulary.items() if token not in ("<cls>", "<eos>")}
    extractor = Cell2TextFeatureExtractor(vocabulary, make_extractor().gene_medians, SYMBOLS,
                                          special_tokens=special_tokens)
    cells = as_lists(extractor.tokenize(counts, INPUT_GENES))
    setattr(extractor, setting, value)
    for call in (lambda: extractor.tokenize(counts, INPUT_GENES, skip_empty_cells=True),
                 lambda: extractor(counts, INPUT_GENES, skip_empty_cells=True), lambda: extractor.pad(cells)):
        with pytest.raises(error, match=message):
            call()


def test_a_vocabulary_mapping_set_after_loading_is_what_cells_are_ranked_by(counts, tmp_path):
    """`extractor.gene_medians = new` ranked cells by the old medians while save_pretrained wrote the new ones: the
    corpus built in memory and the extractor shipped beside the model tokenized the same cells differently, exit 0."""
    extractor = make_extractor()
    new_medians = {gene: median * (7.0 if i % 3 else 1.0) for i, (gene, median) in
                   enumerate(extractor.gene_medians.items())}
    symbols_to_genes = {symbol: gene for gene, symbol in SYMBOLS.items()}
    extractor.gene_medians = new_medians
    fresh = Cell2TextFeatureExtractor(extractor.gene_token_ids, new_medians, SYMBOLS)
    expected = reference_tokens(fresh, dense_of(counts), INPUT_GENES)
    assert expected != reference_tokens(make_extractor(), dense_of(counts), INPUT_GENES)
    assert as_lists(extractor.tokenize(counts, INPUT_GENES)) == expected
    extractor.save_pretrained(tmp_path)
    assert as_lists(Cell2TextFeatureExtractor.from_pretrained(tmp_path).tokenize(counts, INPUT_GENES)) == expected
    extractor.symbol_to_gene = {symbol: gene for symbol, gene in symbols_to_genes.items() if symbol != "GENE0"}
    assert extractor.match_genes(["GENE0", "GENE1"]).column_tokens.tolist() == [
        -1, extractor.gene_token_ids[VOCAB_GENES[1]]]
    with pytest.raises(ValueError, match="gene medians must be finite and > 0"):
        extractor.gene_medians = {**new_medians, VOCAB_GENES[0]: 0.0}
    assert extractor.gene_medians == new_medians  # refused: the extractor stays as it was
    assert as_lists(extractor.tokenize(counts, INPUT_GENES)) == expected



def test_a_vocabulary_mapping_edited_in_place_is_refused(counts, tmp_path):
    """`extractor.gene_medians[gene] = m` (or `.update`, `del`) ranked cells by the old medians while
    save_pretrained wrote the new ones, exit 0; the extractor still copies, pickles and saves, and its to_dict
    gives plain dicts."""
    import copy
    import pickle

    extractor = make_extractor()
    before = as_lists(extractor.tokenize(counts, INPUT_GENES))
    for edit in (lambda m: m.__setitem__(VOCAB_GENES[0], 50.0), lambda m: m.update({VOCAB_GENES[0]: 50.0}),
                 lambda m: m.pop(VOCAB_GENES[0]), lambda m: m.clear(), lambda m: m.setdefault("ENSG99", 1.0)):
        with pytest.raises(TypeError, match="cannot be edited in place.*extractor.gene_medians = "):
            edit(extractor.gene_medians)
    with pytest.raises(TypeError, match="cannot be edited in place"):
        del extractor.gene_token_ids[VOCAB_GENES[0]]
    assert as_lists(extractor.tokenize(counts, INPUT_GENES)) == before
    for twin in (copy.deepcopy(extractor), copy.copy(extractor), pickle.loads(pickle.dumps(extractor))):
        assert twin.gene_medians == extractor.gene_medians
        with pytest.raises(TypeError, match="cannot be edited in place"):
            twin.gene_medians[VOCAB_GENES[0]] = 50.0
    config = extractor.to_dict()
    config["gene_medians"][VOCAB_GENES[0]] = 50.0  # a plain dict: the caller's to edit
    assert extractor.gene_medians[VOCAB_GENES[0]] != 50.0
    extractor.save_pretrained(tmp_path)
    assert as_lists(Cell2TextFeatureExtractor.from_pretrained(tmp_path).tokenize(counts, INPUT_GENES)) == before

def test_call_returns_padded_inputs_and_masks(extractor, counts):
    batch = extractor(counts, INPUT_GENES, return_tensors="pt")
    expected = reference_tokens(extractor, dense_of(counts), INPUT_GENES)
    ids, attention, gene_mask = batch["gene_input_ids"], batch["gene_attention_mask"], batch["gene_token_mask"]
    assert ids.shape == (len(expected), max(map(len, expected)))
    for i, tokens in enumerate(expected):
        n = len(tokens)
        assert ids[i, :n].tolist() == tokens and (ids[i, n:] == 0).all()
        assert attention[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert gene_mask[i].tolist() == [0] + [1] * (n - 2) + [0] * (ids.shape[1] - n + 1)
    assert (extractor.pad([list(t) for t in expected])["gene_input_ids"] == ids.numpy()).all()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad_value, kind, message",
    [(-1.0, "counts", "negative"), (np.nan, "counts", "NaN"), (np.inf, "normalized", "infinite"),
     (2.5, "counts", "not integer counts")],
)
def test_bad_values_raise(extractor, counts, bad_value, kind, message):
    counts = counts.copy()
    counts.data[3] = bad_value
    with pytest.raises(ValueError, match=message):
        extractor.tokenize(counts, INPUT_GENES, input_values=kind)


def test_log_normalised_data_refused_as_counts_accepted_when_stated(extractor, counts):
    logged = counts.copy()
    logged.data = np.log1p(logged.data)
    with pytest.raises(ValueError, match="input_values='normalized'"):
        extractor(logged, INPUT_GENES)
    assert extractor(logged, INPUT_GENES, input_values="log1p")["gene_input_ids"].shape[0] == counts.shape[0]


def test_no_gene_in_vocabulary_raises_with_numbers_and_examples(extractor):
    with pytest.raises(ValueError, match=r"0 of 3 input genes.*'foo'"):
        extractor(np.ones((2, 3)), ["foo", "bar", "ENSG99999999999"])


def test_low_match_rate_warns_with_numbers(extractor, caplog):
    genes = VOCAB_GENES[:2] + [f"unknown{i}" for i in range(8)]
    with caplog.at_level(logging.WARNING):
        extractor(np.ones((1, 10)), genes)
    assert "2 of 10 input genes" in caplog.text
    with caplog.at_level(logging.WARNING):  # said once per gene list, not once per block of cells
        for _ in range(3):
            extractor(np.ones((1, 10)), genes)
    assert caplog.text.count("Low gene match rate") == 1


def test_empty_cells_raise_naming_them_or_are_skipped_and_reported(extractor, counts, caplog):
    counts = counts.tolil()
    counts[[4, 9], :] = 0
    counts[9, 35] = 5  # gene outside the vocabulary only
    counts = counts.tocsr()
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(counts.shape[0])])
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=INPUT_GENES))
    with pytest.raises(ValueError, match=r"2 cells express no gene of the model's vocabulary \(of 37\): cells 4 "
                       r"\('cell4'\), 9 \('cell9'\)\. Filter them out .* or pass skip_empty_cells=True\.$"):
        extractor(adata)
    with caplog.at_level(logging.WARNING):
        batch = extractor(adata, skip_empty_cells=True)
    assert "cell4" in caplog.text and "cell9" in caplog.text
    kept = [i for i in range(37) if i not in (4, 9)]
    assert batch["cell_indices"].tolist() == kept
    assert batch["skipped_cell_indices"].tolist() == [4, 9]
    expected = reference_tokens(extractor, counts.toarray()[kept], INPUT_GENES)
    assert as_lists(extractor.tokenize(adata, skip_empty_cells=True)) == expected


def test_the_pipeline_raises_the_feature_extractors_empty_cell_message(extractor, counts):
    from modeling_cell2text.pipeline_cell2text import rank_block

    counts = counts.tolil()
    counts[[4, 9], :] = 0
    counts = counts.tocsr()
    names = [f"cell{i}" for i in range(counts.shape[0])]
    with pytest.raises(ValueError) as from_extractor:
        extractor.tokenize(ad.AnnData(X=counts, obs=pd.DataFrame(index=names), var=pd.DataFrame(index=INPUT_GENES)))
    with pytest.raises(ValueError) as from_pipeline:  # a block of rows 3..11, as the pipeline ranks them
        rank_block(extractor, counts, INPUT_GENES, 3, 12, names, False, {})
    assert str(from_pipeline.value) == str(from_extractor.value).replace(" (of 37)", "")


@pytest.mark.parametrize(
    "genes",
    [
        [VOCAB_GENES[0], VOCAB_GENES[1], VOCAB_GENES[0]],
        [VOCAB_GENES[0] + ".3", VOCAB_GENES[1], VOCAB_GENES[0]],
        [SYMBOLS[VOCAB_GENES[0]], VOCAB_GENES[1], VOCAB_GENES[0]],
    ],
    ids=["same-id", "version", "symbol"],
)
def test_duplicated_genes_raise(extractor, genes):
    with pytest.raises(ValueError, match="duplicate"):
        extractor(np.ones((1, 3)), genes)


def test_wrong_gene_count_and_missing_layer(extractor, counts):
    with pytest.raises(ValueError, match="gene IDs for a matrix with"):
        extractor(counts, INPUT_GENES[:-1])
    adata = ad.AnnData(X=counts, var=pd.DataFrame(index=INPUT_GENES))
    with pytest.raises(KeyError, match="counts"):
        extractor(adata, layer="counts")



def test_gene_ids_in_no_column_order_are_refused(extractor, counts):
    """A set of gene ids was taken in Python's hash order, which changes from run to run: each column's values were
    read as another gene's, exit 0. A string or an iterator is refused as clearly."""
    with pytest.raises(TypeError, match="got a set, whose order is not the columns'"):
        extractor(counts, set(INPUT_GENES))
    with pytest.raises(TypeError, match="got a frozenset"):
        extractor(counts, frozenset(INPUT_GENES))
    with pytest.raises(TypeError, match="without a length"):
        extractor(counts, iter(INPUT_GENES))
    with pytest.raises(TypeError, match="got the string"):
        extractor(counts[:, :1], INPUT_GENES[0])
    ordered = as_lists(extractor.tokenize(counts, INPUT_GENES))
    assert as_lists(extractor.tokenize(counts, dict.fromkeys(INPUT_GENES).keys())) == ordered  # ordered: taken

# ----------------------------------------------------------------------------- gene identifiers


def test_symbols_in_var_index_or_feature_name_and_ensembl_column(extractor, counts):
    expected = reference_tokens(extractor, dense_of(counts), INPUT_GENES)
    symbols = [SYMBOLS.get(g.split(".")[0], f"NOTAGENE{i}") for i, g in enumerate(INPUT_GENES)]
    by_index = ad.AnnData(X=counts, var=pd.DataFrame(index=symbols))
    assert as_lists(extractor.tokenize(by_index)) == expected
    by_column = ad.AnnData(X=counts, var=pd.DataFrame({"feature_name": symbols}, index=[str(i) for i in range(36)]))
    assert as_lists(extractor.tokenize(by_column)) == expected
    with_ids = ad.AnnData(X=counts, var=pd.DataFrame({"gene_ids": INPUT_GENES}, index=symbols))
    assert as_lists(extractor.tokenize(with_ids)) == expected
    assert as_lists(extractor.tokenize(counts, symbols)) == expected


def test_a_symbol_beside_its_make_unique_copy_names_no_gene(caplog):
    """Two genes carry GOLGA8M (the symbol rule names the protein-coding ENSG00000188626); a file of both named by
    symbol only gets GOLGA8M and GOLGA8M-1 from anndata's make_unique, the bare symbol on the file's first column,
    here the other gene: its counts were read as ENSG00000188626's, exit 0, and the correct Ensembl gene_ids were
    refused as reordered. Neither column is read now (warned); Ensembl IDs read both. IGHV1-69-2 is a gene of its
    own, no copy of IGHV1-69."""
    ighv = symbol_to_ensembl(["IGHV1-69", "IGHV1-69-2"])
    genes = ["ENSG00000261480", "ENSG00000188626", "ENSG00000000003", ighv["IGHV1-69"], ighv["IGHV1-69-2"]]
    fe = Cell2TextFeatureExtractor.from_gene_medians({g: 1.0 for g in genes})
    token = fe.gene_token_ids
    counts = sp.csr_matrix(np.array([[50, 1, 2, 3, 4]], dtype=np.float32))
    symbols = ["GOLGA8M", "GOLGA8M-1", "TSPAN6", "IGHV1-69", "IGHV1-69-2"]
    by_symbol = ad.AnnData(counts, var=pd.DataFrame(index=symbols))
    with caplog.at_level(logging.WARNING):
        read = fe(by_symbol)["gene_input_ids"][0].tolist()
    assert read == [2, token[ighv["IGHV1-69-2"]], token[ighv["IGHV1-69"]], token["ENSG00000000003"], 3]
    assert "1 symbols named two or more columns" in caplog.text and "['GOLGA8M']" in caplog.text
    expected = [2, token["ENSG00000261480"], *read[1:-1], token["ENSG00000188626"], 3]
    assert fe(by_symbol, gene_ids=genes)["gene_input_ids"][0].tolist() == expected
    with_ids = ad.AnnData(counts, var=pd.DataFrame({"gene_ids": genes}, index=symbols))
    assert fe(with_ids)["gene_input_ids"][0].tolist() == expected


def test_a_symbol_beside_its_seurat_make_unique_copy_names_no_gene(caplog):
    """R's make.unique (Seurat's Read10X) names a repeated symbol's later column GOLGA8M.1, not GOLGA8M-1: the bare
    symbol's column, here the other gene that carries GOLGA8M, was read as the protein-coding ENSG00000188626, exit 0,
    no warning. Neither column is read, as with anndata's copies."""
    genes = ["ENSG00000261480", "ENSG00000188626", "ENSG00000000003"]
    fe = Cell2TextFeatureExtractor.from_gene_medians({g: 1.0 for g in genes})
    counts = sp.csr_matrix(np.array([[50, 1, 2]], dtype=np.float32))
    with caplog.at_level(logging.WARNING):
        read = fe(ad.AnnData(counts, var=pd.DataFrame(index=["GOLGA8M", "GOLGA8M.1", "TSPAN6"])))
    assert read["gene_input_ids"].tolist() == [[2, fe.gene_token_ids["ENSG00000000003"], 3]]
    assert "1 symbols named two or more columns" in caplog.text and "['GOLGA8M']" in caplog.text


def test_packaged_gene_table_maps_symbols():
    assert symbol_to_ensembl(["TP53", "CD3E", "not-a-gene"]) == {"TP53": "ENSG00000141510", "CD3E": "ENSG00000198851"}
    assert ensembl_to_symbol(["ENSG00000141510"]) == {"ENSG00000141510": "TP53"}


def test_pbmc68k_symbols_map():
    """pbmc68k_reduced names genes by the symbols of its time: 50 of its 765 have been renamed since (IGJ is JCHAIN,
    the plasma-cell marker) and mapped to no gene while only current symbols were read; 15 name no gene at all."""
    scanpy = pytest.importorskip("scanpy")
    adata = scanpy.datasets.pbmc68k_reduced()
    mapped = symbol_to_ensembl(adata.var_names)
    assert len(mapped) == 750 and len(set(mapped.values())) == 750
    renamed = [name for name, gene in mapped.items() if ensembl_to_symbol([gene])[gene] != name]
    assert len(renamed) == 50  # the number docs/corpus.md, docs/model.md and processing/presets.py quote
    assert mapped["IGJ"] == "ENSG00000132465" and ensembl_to_symbol([mapped["IGJ"]]) == {mapped["IGJ"]: "JCHAIN"}


def test_a_renamed_genes_previous_symbol_names_it_and_a_current_symbol_always_wins():
    mapped = symbol_to_ensembl(["IGJ", "JCHAIN", "SEPT7", "AK3", "ADCY3", "ACSM2", "FACD", "EPB41L4A-AS2", "USP12P3"])
    assert mapped == {
        "IGJ": "ENSG00000132465", "JCHAIN": "ENSG00000132465", "SEPT7": "ENSG00000122545",  # SEPTIN7 now
        # current symbols of other genes than the one HGNC renamed from them (AK4 was AK3, ADCY8 was ADCY3)
        "AK3": "ENSG00000147853", "ADCY3": "ENSG00000138031",
    }  # ACSM2 (ACSM2A and ACSM2B) and FACD (BRCA2 and FANCD2) were previous symbols of two genes each: none.
    # EPB41L4A-AS2 and USP12P3 were EPB41L4A-DT's and USP12PY's previous symbols, and are HGNC's current symbols of
    # other genes (GENCODE v48 labels one by its ID, the other it lacks): they named EPB41L4A-DT and USP12PY


def test_a_cell_named_by_previous_symbols_gets_the_tokens_of_the_same_cell_named_by_current_ones():
    extractor = Cell2TextFeatureExtractor.from_gene_medians(
        {"ENSG00000132465": 1.0, "ENSG00000160593": 2.0, "ENSG00000141510": 0.5})  # JCHAIN, JAML, TP53
    counts = np.array([[3, 1, 2], [0, 4, 1]])
    current = as_lists(extractor.tokenize(counts, ["JCHAIN", "JAML", "TP53"]))
    assert as_lists(extractor.tokenize(counts, ["IGJ", "AMICA1", "TP53"])) == current
    assert extractor.symbol_to_gene["IGJ"] == "ENSG00000132465"  # saved with the extractor: remote code maps it too
    # of the vocabulary's genes only (not the table's 100,000 symbols, in every saved preprocessor_config.json)
    assert set(extractor.symbol_to_gene.values()) == {"ENSG00000132465", "ENSG00000160593", "ENSG00000141510"}
    assert extractor.gene_symbols["ENSG00000132465"] == "JCHAIN"  # shown by the current symbol


def test_a_previous_symbol_beside_its_genes_current_symbol_names_no_gene_in_the_corpus_and_at_inference(caplog):
    """An input holding IGJ and JCHAIN (two files joined): the corpus builder read whichever came first (IGJ's values
    as JCHAIN's, JCHAIN's column reported as a duplicate) and inference refused both as duplicates; the current
    symbol's column is read in both, in either order, as before previous symbols were read."""
    from processing.sources import resolve_genes

    said = "1 symbols are previous symbols of genes the input also names by their current symbol, and are not read"
    for names in (["IGJ", "TP53", "JCHAIN"], ["JCHAIN", "TP53", " IGJ"]):
        extractor = Cell2TextFeatureExtractor.from_gene_medians({"ENSG00000132465": 1.0, "ENSG00000141510": 0.5})
        token = extractor.gene_token_ids
        jchain = names.index("JCHAIN")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            corpus_ids, _ = resolve_genes(pd.DataFrame(index=names))
            assert corpus_ids[jchain] == "ENSG00000132465" and corpus_ids.count("ENSG00000132465") == 1
            expected = [token["ENSG00000141510"] if n == "TP53" else token["ENSG00000132465"] if n == "JCHAIN" else -1
                        for n in names]
            for _ in range(2):  # once per gene list, not per block of cells
                assert extractor.match_genes(names).column_tokens.tolist() == expected
        assert [record.name for record in caplog.records if said in record.getMessage()] == [
            "processing.sources", "modeling_cell2text.feature_extraction_cell2text"]
    # alone, or beside another gene's symbol, a previous symbol names its gene
    assert extractor.match_genes(["IGJ", "TP53"]).column_tokens.tolist() == [token["ENSG00000132465"],
                                                                              token["ENSG00000141510"]]
    assert resolve_genes(pd.DataFrame(index=["IGJ", "TP53"]))[0] == ["ENSG00000132465", "ENSG00000141510"]
    # beside a current symbol that names no gene (ZBED1: two protein-coding genes), a previous symbol (ALTE, of one
    # of them) names its gene: nothing else reads that gene
    zbed1 = "ENSG00000214717"
    extractor = Cell2TextFeatureExtractor.from_gene_medians({zbed1: 1.0, "ENSG00000141510": 0.5})
    names = ["ALTE", "ZBED1", "TP53"]
    assert extractor.match_genes(names).column_tokens.tolist() == [extractor.gene_token_ids[zbed1], -1,
                                                                   extractor.gene_token_ids["ENSG00000141510"]]
    assert resolve_genes(pd.DataFrame(index=names))[0] == [zbed1, None, "ENSG00000141510"]


def test_the_packaged_previous_symbols_name_genes_of_the_table_and_none_a_gene_carries_now():
    from modeling_cell2text.gene_table import load_gene_table, load_previous_symbols

    previous = dict(load_previous_symbols())
    assert len(previous) == len(load_previous_symbols()) > 10_000
    assert not previous.keys() & {symbol for _, symbol, _ in load_gene_table()}
    assert set(previous.values()) <= {gene_id for gene_id, _, _ in load_gene_table()}


def test_the_previous_symbols_table_keeps_symbols_of_one_gene_that_no_gene_carries_now(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_gene_table", REPO / "scripts" / "make_gene_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    hgnc = tmp_path / "hgnc.tsv.gz"
    with gzip.open(hgnc, "wt") as handle:
        handle.write("symbol\tprev_symbol\tensembl_gene_id\n"
                     "JCHAIN\tIGJ\tENSG00000132465\n"
                     "AK4\tAK3|AK3L1\tENSG00000162433\n"  # AK3 is AK3's (another gene's) symbol now
                     "AK3\tAK3L1|AK6\tENSG00000147853\n"  # AK3L1: two genes' previous symbol
                     "NEWGENE\tOLDNAME\t\n"  # no Ensembl ID
                     "OTHER\tOLDER\tENSG99999999999\n"  # an ID GENCODE does not hold
                     "EPB41L4A-DT\tEPB41L4A-AS2\tENSG00000278921\n"  # EPB41L4A-AS2: HGNC's symbol of another gene,
                     "EPB41L4A-AS2\t\tENSG00000251187\n")  # which GENCODE labels by its ID
    genes = [("ENSG00000132465", "JCHAIN", "1"), ("ENSG00000162433", "AK4", "1"), ("ENSG00000147853", "AK3", "1"),
             ("ENSG00000278921", "EPB41L4A-DT", "0")]
    assert script.read_previous_symbols(hgnc, genes) == [("AK6", "ENSG00000147853"), ("IGJ", "ENSG00000132465")]


def test_from_gene_medians_builds_sorted_vocabulary_with_packaged_symbols():
    extractor = Cell2TextFeatureExtractor.from_gene_medians({"ENSG00000198851.10": 2.0, "ENSG00000141510": 1.5})
    assert extractor.gene_token_ids == {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
                                        "ENSG00000141510": 4, "ENSG00000198851": 5}
    assert extractor.gene_symbols == {"ENSG00000141510": "TP53", "ENSG00000198851": "CD3E"}
    assert extractor.vocab_size == 6 and extractor.cls_token_id == 2 and extractor.eos_token_id == 3
    assert extractor(np.array([[1, 5]]), ["TP53", "CD3E"])["gene_input_ids"].tolist() == [[2, 5, 4, 3]]
    # lower-case Ensembl ids, as Geneformer upper-cases them (a reviewer's finding: they matched no gene)
    lower = ["ensg00000141510.3", "ensg00000198851"]
    assert extractor(np.array([[1, 5]]), lower)["gene_input_ids"].tolist() == [[2, 5, 4, 3]]


# ----------------------------------------------------------------------------- restricted unpickler


def write_pickle(path, obj) -> str:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)
    return str(path)


def test_geneformer_dictionaries_load_plain_dicts(tmp_path):
    tokens = write_pickle(tmp_path / "tokens.pkl", {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
                                                    "ENSG00000141510": 4})
    medians = write_pickle(tmp_path / "medians.pkl", {"ENSG00000141510": np.float64(1.25)})
    extractor = Cell2TextFeatureExtractor.from_geneformer_dictionaries(tokens, medians)
    assert extractor.gene_medians == {"ENSG00000141510": 1.25}
    assert type(extractor.gene_medians["ENSG00000141510"]) is float
    assert extractor.gene_symbols == {"ENSG00000141510": "TP53"}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_geneformer_dictionaries_load_every_pickle_protocol_of_numpy_medians(tmp_path, protocol):
    """Protocol 2 (Python 2's, or pickle.dump(..., protocol=2)) writes a numpy scalar's bytes through
    codecs.encode: such a median dictionary was refused as holding a function."""
    tokens = write_pickle(tmp_path / "tokens.pkl", {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
                                                    "ENSG00000141510": 4, "ENSG00000012048": 5})
    medians = tmp_path / "medians.pkl"
    medians.write_bytes(pickle.dumps({"ENSG00000141510": np.float64(1.25), "ENSG00000012048": np.float32(0.5)},
                                     protocol=protocol))
    extractor = Cell2TextFeatureExtractor.from_geneformer_dictionaries(tokens, str(medians))
    assert extractor.gene_medians == {"ENSG00000141510": 1.25, "ENSG00000012048": 0.5}


class CodecsCall:
    """A pickle calling codecs.encode with other arguments than protocol 2's bytes."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        import _codecs
        return _codecs.encode, self.args


class Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


class LongScalar:
    """A numpy float64 whose pickled bytes hold two numbers: a tampered file, not one number."""

    def __reduce__(self):
        rebuild, (dtype, data) = np.float64(1.25).__reduce__()
        return rebuild, (dtype, data + data)


class ScalarThroughCodecs:
    """A numpy float64 whose bytes come from a codecs.encode call of another encoding than protocol 2's latin-1."""

    def __reduce__(self):
        rebuild, (dtype, data) = np.float64(1.25).__reduce__()
        return rebuild, (dtype, CodecsCall(data.decode("latin-1"), "utf-8"))


@pytest.mark.parametrize(
    "payload",
    [{"ENSG00000141510": Sneaky()}, {"ENSG00000141510": os.getcwd}, {"ENSG00000141510": "1.0"},
     {1: 1.0}, [("ENSG00000141510", 1.0)], {"ENSG00000141510": np.array([1.0])},
     {"ENSG00000141510": True}, {"ENSG00000141510": LongScalar()},
     {"ENSG00000141510": CodecsCall("1.0", "rot13")}, {"ENSG00000141510": CodecsCall(b"1.0", "latin1")},
     {"ENSG00000141510": ScalarThroughCodecs()}],
    ids=["reduce", "function", "str-value", "int-key", "list", "ndarray", "bool-value", "long-scalar",
         "codecs-other-encoding", "codecs-bytes-value", "codecs-other-encoding-in-a-scalar"],
)
def test_geneformer_dictionaries_reject_anything_else(tmp_path, payload):
    tokens = write_pickle(tmp_path / "tokens.pkl", {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3})
    medians = write_pickle(tmp_path / "medians.pkl", payload)
    with pytest.raises(ValueError, match="medians.pkl"):
        Cell2TextFeatureExtractor.from_geneformer_dictionaries(tokens, medians)


@pytest.mark.parametrize("content, problem", [
    (b"", "Ran out of input"),  # an EOFError traceback before
    (b"ENSG00000141510\t1.25\n", ""),
    (pickle.dumps({"ENSG00000141510": 1.25})[:-3], ""),
    (pickle.dumps({}), "it is empty"),  # "the vocabulary holds no gene with a median", naming no file
    (pickle.dumps({"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "ENSG00000141510": 4}),
     "it holds the special token '<pad>', as a token dictionary does"),  # "gene medians must be ... > 0"
], ids=["empty file", "text", "truncated", "empty dict", "token dictionary"])
def test_a_median_file_that_is_no_geneformer_median_dictionary_is_refused_naming_it(tmp_path, content, problem):
    tokens = write_pickle(tmp_path / "tokens.pkl", {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
                                                    "ENSG00000141510": 4})
    medians = tmp_path / "medians.pkl"
    medians.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{medians} is no Geneformer gene median dictionary "
                                         rf"\(gene_median_dictionary.pkl\), a pickled dict of str -> float: "
                                         rf"{re.escape(problem)}.*Give that file as Geneformer ships it"):
        Cell2TextFeatureExtractor.from_geneformer_dictionaries(tokens, str(medians))


@pytest.mark.parametrize("token_id", [4.7, True], ids=["float", "bool"])
def test_geneformer_token_ids_must_be_integers(tmp_path, token_id):
    # int(4.7) or int(True) would give the gene another gene's token without a word
    tokens = write_pickle(tmp_path / "tokens.pkl", {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
                                                    "ENSG00000141510": token_id})
    medians = write_pickle(tmp_path / "medians.pkl", {"ENSG00000141510": 1.25})
    with pytest.raises(ValueError, match="tokens.pkl.*str -> int"):
        Cell2TextFeatureExtractor.from_geneformer_dictionaries(tokens, medians)


# ----------------------------------------------------------------------------- saving


def test_save_and_reload_round_trip(extractor, counts, tmp_path):
    extractor.save_pretrained(tmp_path)
    reloaded = Cell2TextFeatureExtractor.from_pretrained(tmp_path)
    for name in ("gene_token_ids", "gene_medians", "gene_symbols", "model_input_size", "special_tokens"):
        assert getattr(reloaded, name) == getattr(extractor, name)
    assert as_lists(reloaded.tokenize(counts, INPUT_GENES)) == as_lists(extractor.tokenize(counts, INPUT_GENES))
    assert not any(key.startswith("_") for key in reloaded.to_dict())


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["gene_token_ids"].update({VOCAB_GENES[0]: 4.7}),  # read as token 4: another gene's
     rf"gene_token_ids must map genes to token ids, found '{VOCAB_GENES[0]}': 4.7; fix the saved config"),
    (lambda c: c.update(gene_medians=[1.0]), "gene_medians must map genes to numbers, got list"),  # AttributeError
    (lambda c: c["gene_medians"].update({VOCAB_GENES[0]: True}), "gene_medians must map genes to numbers"),
    (lambda c: c.update(gene_symbols=None, symbol_to_gene=["TP53"]), "symbol_to_gene must map genes to strings"),
    (lambda c: c["gene_symbols"].update({VOCAB_GENES[0]: 7157}), "gene_symbols must map genes to strings"),
    (lambda c: c.update(model_input_size=2048.5), "model_input_size must be an integer, got 2048.5"),  # ran as 2048
    (lambda c: c.update(num_expression_bins="4"), "num_expression_bins must be an integer, got '4'"),
])
def test_a_saved_config_of_another_shape_is_refused_naming_the_setting(extractor, tmp_path, edit, message):
    extractor.save_pretrained(tmp_path)
    edit_json(tmp_path / "preprocessor_config.json", edit)
    with pytest.raises(ValueError, match=message):
        Cell2TextFeatureExtractor.from_pretrained(tmp_path)


def test_a_saved_config_that_is_no_json_object_is_refused_naming_it(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")  # a TypeError from cls(**config) before
    with pytest.raises(ValueError, match=f"the feature extractor config of {tmp_path} is a list, not a JSON object"):
        Cell2TextFeatureExtractor.from_pretrained(tmp_path)


def test_pad_v1_lists_and_rejects_unknown_ids():
    extractor = make_extractor(special_tokens=False)
    batch = extractor.pad([[7, 5, 9], [6]])
    assert batch["gene_input_ids"].tolist() == [[7, 5, 9], [6, 0, 0]]
    assert batch["gene_token_mask"].tolist() == batch["gene_attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="token ids must lie in"):
        extractor.pad([[5, 10_000]])


def test_token_lists_of_the_other_special_tokens_setting_are_refused(counts):
    """A corpus tokenized by a V1 extractor (genes only) given to a V2 one, or the reverse, was padded as it came:
    the gene encoder read cells without <cls>, or <cls>/<eos> counted as genes of a V1 cell, exit 0."""
    v2, v1 = make_extractor(), make_extractor(special_tokens=False)
    v2_cells, v1_cells = as_lists(v2.tokenize(counts, INPUT_GENES)), as_lists(v1.tokenize(counts, INPUT_GENES))
    assert v2.pad(v2_cells)["gene_input_ids"].shape[0] == v1.pad(v1_cells)["gene_input_ids"].shape[0] == len(v2_cells)
    assert v2.pad([[2, 3]])["gene_token_mask"].tolist() == [[0, 0]]  # no gene: the model refuses it by name
    mask = v2.mask_token_id
    for cells in (v1_cells, [v2_cells[0][:-1]], [v2_cells[0][1:]], [v2_cells[0][:2] + [mask] + v2_cells[0][2:]],
                  [v2_cells[0] + v2_cells[1]], [[]]):
        with pytest.raises(ValueError, match=r"not laid out for this feature extractor \(special_tokens=True\)"):
            v2.pad(cells)
    for cells in (v2_cells, [v1_cells[0] + [mask]]):
        with pytest.raises(ValueError, match=r"not laid out for this feature extractor \(special_tokens=False\)"):
            v1.pad(cells)
    ranked = v2.tokenize(counts, INPUT_GENES)
    v2.special_tokens = False  # cells tokenized before the setting changed
    with pytest.raises(ValueError, match=r"before its settings changed: special_tokens \(True when ranked, False here"):
        v2.pad(ranked)
    with pytest.raises(ValueError, match=r"not laid out for this feature extractor \(special_tokens=False\)"):
        v2.pad(ranked.to_list())


def test_geneformer_v2_token_lists_given_to_a_v1_vocabulary_are_refused(counts):
    """A real Geneformer V1 vocabulary has no <cls>/<eos> (ids 2 and 3 are genes there): V2 token lists (<cls> 2, the
    genes, <eos> 3) given to its extractor passed the layout check and were padded as genes, the ids between read as
    other genes of V1's vocabulary, exit 0."""
    genes = VOCAB_GENES + [f"ENSG8{i:010d}" for i in range(10)]  # V1's vocabulary is larger than V2's
    v1 = Cell2TextFeatureExtractor({"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}},
                                   {g: 1.0 for g in genes}, special_tokens=False, model_input_size=2048)
    v2_cells = as_lists(make_extractor().tokenize(counts, INPUT_GENES))
    for cells in (v2_cells, v2_cells[:1]):
        with pytest.raises(ValueError, match=r"laid out as Geneformer V2.*no <cls> or <eos>.*id 2 is the gene "
                                             r"ENSG00000000001 and id 3 is the gene ENSG00000000002.*Tokenize the "
                                             r"cells again"):
            v1.pad(cells)
    # a V1-like vocabulary without ids 2 and 3 (or one of them) names them so: it said "the genes None and None"
    for first in (3, 4):
        sparse = Cell2TextFeatureExtractor({"<pad>": 0, "<mask>": 1, **{g: i + first for i, g in enumerate(genes)}},
                                           {g: 1.0 for g in genes}, special_tokens=False, model_input_size=2048)
        named = "id 2 names no gene and " + ("id 3 names no gene" if first == 4 else "id 3 is the gene ENSG00000000001")
        with pytest.raises(ValueError, match=named) as refused:
            sparse.pad(v2_cells)
        assert "None" not in str(refused.value)
    v1_cells = as_lists(v1.tokenize(counts, INPUT_GENES))
    assert v1.pad(v1_cells)["gene_input_ids"].shape[0] == len(v1_cells)
    assert v1.pad([[2, 5, 3], [2, 7]])["gene_token_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]  # genes 2 and 3 of V1


def test_a_v1_cell_beginning_with_gene_id_2_and_ending_with_gene_id_3_is_tokenized_and_padded():
    """A genuine V1 cell ranking its gene of id 2 first and its gene of id 3 last (one cell: a single-cell AnnData given
    to the processor) was refused by its own extractor's call as Geneformer V2's layout: the cells of its tokenize
    record the extractor (checked), and are not judged by their layout. As token lists, they are refused."""
    genes = [f"ENSG{i:011d}" for i in range(1, 6)]
    v1 = Cell2TextFeatureExtractor({"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}},
                                   {g: 1.0 for g in genes}, special_tokens=False)
    cell = sp.csr_matrix(np.array([[9, 1, 5, 0, 0]], dtype=np.float32))  # genes of ids 2 (most), 3 (least), 4
    assert v1(cell, genes)["gene_input_ids"].tolist() == [[2, 4, 3]]
    assert v1.pad(v1.tokenize(cell, genes))["gene_input_ids"].tolist() == [[2, 4, 3]]
    with pytest.raises(ValueError, match="laid out as Geneformer V2"):
        v1.pad([[2, 4, 3]])


def test_ranked_cells_of_another_extractor_are_refused_by_pad(counts, tmp_path):
    """pad takes a RankedCells' ids and bins unchecked: cells ranked by another extractor (other medians: another
    gene order; more expression bins: bins of another scale; another vocabulary; another size) were padded as its
    own, exit 0. They record the extractor that made them (`made_by`), which pad compares."""
    import copy

    extractor = make_extractor(num_expression_bins=5)
    ranked = extractor.tokenize(counts, INPUT_GENES)
    expected = extractor.pad(ranked)["gene_input_ids"]
    extractor.save_pretrained(tmp_path)
    for same in (copy.deepcopy(extractor), Cell2TextFeatureExtractor.from_pretrained(tmp_path)):
        assert (same.pad(ranked)["gene_input_ids"] == expected).all()
    other_medians = make_extractor(num_expression_bins=5)
    other_medians.gene_medians = {gene: 1.0 for gene in other_medians.gene_medians}
    other_vocabulary = make_extractor(num_expression_bins=5)
    other_vocabulary.gene_token_ids = {**other_vocabulary.gene_token_ids, "ENSG00000000999": 60}
    cases = [(other_medians, "the gene vocabulary or medians"), (other_vocabulary, "the gene vocabulary or medians"),
             (make_extractor(num_expression_bins=10), r"num_expression_bins \(5 when ranked, 10 here\)"),
             (make_extractor(num_expression_bins=5, model_input_size=30), r"model_input_size \(4096 when ranked, 30")]
    for other, differs in cases:
        with pytest.raises(ValueError, match=f"made by another feature extractor.*{differs}.*Tokenize the cells again"):
            other.pad(ranked)
    with pytest.raises(ValueError, match=r"num_expression_bins \(10 when ranked, 5 here\)"):
        extractor.pad(make_extractor(num_expression_bins=10).tokenize(counts, INPUT_GENES))
    unrecorded = RankedCells(ranked.tokens, ranked.offsets, ranked.cell_indices, value_bins=ranked.value_bins)
    with pytest.raises(ValueError, match=r"not made by a feature extractor's tokenize.*ranked.to_list\(\)"):
        extractor.pad(unrecorded)


def test_padded_token_lists_are_refused_not_read_as_cells(extractor, counts):
    """A padded batch's gene_input_ids given back (processor(gene_input_ids=inputs["gene_input_ids"])) were taken
    with the padding attended as part of each cell: other gene states and logits, exit 0."""
    padded = extractor(counts, INPUT_GENES, return_tensors="np")
    assert (padded["gene_attention_mask"] == 0).any()
    with pytest.raises(ValueError, match=r"padding token \(id 0\).*unpadded.*gene_attention_mask"):
        extractor.pad(padded["gene_input_ids"])
    rows = [row[mask.astype(bool)] for row, mask in zip(padded["gene_input_ids"], padded["gene_attention_mask"])]
    assert (extractor.pad(rows)["gene_input_ids"] == padded["gene_input_ids"]).all()


# ----------------------------------------------------------------------------- value-aware tokens


def reference_bins(extractor: Cell2TextFeatureExtractor, dense: np.ndarray, genes: list[str]) -> list[list[int]]:
    """Per-cell expression bins in token order: 1 + floor(B * genes with lower expression / expressed genes)."""
    n_bins, vocab = extractor.num_expression_bins, extractor.gene_token_ids
    token_of = {g.split(".")[0]: vocab[g.split(".")[0]] for g in genes if g.split(".")[0] in extractor.gene_medians}
    out = []
    for row, tokens in zip(dense, reference_tokens(extractor, dense, genes)):
        expression = {token_of[g.split(".")[0]]: v for g, v in zip(genes, row) if v != 0 and g.split(".")[0] in token_of}
        n = len(expression)
        bins = []
        for token in tokens:
            if token not in expression:  # <cls>, <eos>
                bins.append(0)
                continue
            lower = sum(1 for v in expression.values() if v < expression[token])
            bins.append(1 + n_bins * lower // n)
        out.append(bins)
    return out


@pytest.mark.parametrize("kind", ["csr", "dense"])
def test_value_aware_bins_match_reference_and_leave_the_ranking_unchanged(counts, kind):
    extractor = make_extractor(num_expression_bins=4, model_input_size=12)  # truncation: bins use every gene
    cells = counts if kind == "csr" else counts.toarray()
    ranked = extractor.tokenize(cells, INPUT_GENES, chunk_size=5, num_threads=2)
    rank_only = make_extractor(model_input_size=12).tokenize(cells, INPUT_GENES)
    assert as_lists(ranked) == as_lists(rank_only)
    expected = reference_bins(extractor, dense_of(counts), INPUT_GENES)
    assert [ranked.bins_of(i).tolist() for i in range(len(ranked))] == expected
    # equal counts share a bin (counts here are 1..3, so at most 3 distinct bins per cell)
    assert all(len(set(b) - {0}) <= 3 for b in expected)

    batch = extractor(cells, INPUT_GENES)
    assert extractor.model_input_names[-1] == "gene_value_ids"
    for i, bins in enumerate(expected):
        assert batch["gene_value_ids"][i].tolist() == bins + [0] * (batch["gene_value_ids"].shape[1] - len(bins))
    # the same inputs from stored token and bin lists (a corpus's columns)
    stored = extractor.pad(as_lists(ranked), expected)
    assert all(np.array_equal(stored[k], batch[k]) for k in batch)


def test_value_aware_bins_do_not_depend_on_normalisation(counts):
    extractor = make_extractor(num_expression_bins=8)
    normalised = sp.csr_matrix(counts.multiply(1e4 / np.asarray(counts.sum(axis=1))))
    from_counts = extractor(counts, INPUT_GENES)
    from_log1p = extractor(normalised.log1p(), INPUT_GENES, input_values="log1p")

    def bin_of_each_gene(batch):  # float rounding may reorder tied genes; each gene's bin must not change
        return [dict(zip(ids.tolist(), bins.tolist())) for ids, bins in zip(batch["gene_input_ids"], batch["gene_value_ids"])]

    assert bin_of_each_gene(from_counts) == bin_of_each_gene(from_log1p)


def test_value_aware_options_are_saved_and_checked(counts, tmp_path):
    extractor = make_extractor(num_expression_bins=5)
    extractor.save_pretrained(tmp_path)
    reloaded = Cell2TextFeatureExtractor.from_pretrained(tmp_path)
    assert reloaded.num_expression_bins == 5 and "gene_value_ids" in reloaded.model_input_names
    assert np.array_equal(reloaded(counts, INPUT_GENES)["gene_value_ids"], extractor(counts, INPUT_GENES)["gene_value_ids"])
    with pytest.raises(ValueError, match="num_expression_bins must be in 0..255"):
        make_extractor(num_expression_bins=300)
    with pytest.raises(ValueError, match="pass each cell's expression bins"):
        extractor.pad([[2, 5, 3]])
    with pytest.raises(ValueError, match="differ in length"):
        extractor.pad([[2, 5, 3]], [[0, 1]])
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\]"):
        extractor.pad([[2, 5, 3]], [[0, 6, 0]])
    with pytest.raises(ValueError, match="rank-value tokens only"):
        make_extractor().pad([[2, 5, 3]], [[0, 1, 0]])
    assert "gene_value_ids" not in make_extractor()(counts, INPUT_GENES)


# ----------------------------------------------------------------------------- Geneformer's arithmetic (issue 9.10)


def geneformer_medians(corpus: np.ndarray, genes: list[str]) -> dict[str, float]:
    """Gene medians the way Geneformer's are made: per gene, the median of its non-zero normalised values
    (count / n_counts * 10,000) over the corpus cells, in float64. Cells share totals, so many genes share a
    median, some only up to float64 rounding (e.g. 2 / 400 vs 1 / 200)."""
    normalised = corpus / corpus.sum(axis=1, keepdims=True) * 10_000
    return {g: float(np.median(column[column > 0])) for g, column in zip(genes, normalised.T) if (column > 0).any()}


def test_tokens_equal_geneformers_formula_with_geneformer_style_medians():
    rng = np.random.default_rng(7)
    n_genes = 60
    genes = [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]
    corpus = rng.integers(0, 4, size=(300, n_genes)) * (rng.random((300, n_genes)) < 0.3)
    corpus[:, 0] += 1
    medians = geneformer_medians(corpus.astype(np.float64), genes)
    token_ids = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    token_ids.update({g: int(t) for g, t in zip(genes, rng.permutation(n_genes) + 4)})
    extractor = Cell2TextFeatureExtractor(token_ids, medians, {})
    cells = (rng.integers(0, 6, size=(200, n_genes)) * (rng.random((200, n_genes)) < 0.5)).astype(np.float32)
    cells[:, 0] += 1
    expected = reference_tokens(extractor, cells, genes)
    assert as_lists(extractor.tokenize(sp.csr_matrix(cells), genes, chunk_size=64)) == expected
    value_aware = Cell2TextFeatureExtractor(token_ids, medians, {}, num_expression_bins=4)
    ranked = value_aware.tokenize(sp.csr_matrix(cells), genes, chunk_size=64)  # bins follow the reordered ties
    assert as_lists(ranked) == expected
    assert [ranked.bins_of(i).tolist() for i in range(len(ranked))] == reference_bins(value_aware, cells, genes)
    # the data holds what made the float32 rule wrong: genes whose values tie in float32 but not in float64
    near_ties = 0
    for row in cells:
        n_counts = float(row.sum())
        values = [geneformer_value(c, n_counts, medians[g]) for g, c in zip(genes, row) if c]
        near_ties += len({np.float32(v) for v in values}) < len(set(values))
    assert near_ties > 0


def test_integer_and_float64_counts_use_float64_like_numpy():
    extractor = make_extractor()
    counts = random_counts()
    dense = counts.toarray()
    for matrix in (sp.csr_matrix(dense.astype(np.int64)), dense.astype(np.float64)):
        expected = []
        for row in dense.astype(np.float64):
            total = float(row.sum())
            entries = sorted(
                ((-(c / total * 10_000) / extractor.gene_medians[g.split(".")[0]], extractor.gene_token_ids[g.split(".")[0]])
                 for g, c in zip(INPUT_GENES, row) if c and g.split(".")[0] in extractor.gene_medians)
            )
            expected.append([2] + [t for _, t in entries] + [3])
        assert as_lists(extractor.tokenize(matrix, INPUT_GENES)) == expected


def test_dataframe_input_takes_genes_from_its_columns(extractor, counts):
    # scanpy's adata.to_df() layout; was refused with "gene_ids is required for matrix input"
    frame = pd.DataFrame(dense_of(counts), columns=INPUT_GENES, index=[f"cell{i}" for i in range(counts.shape[0])])
    expected = as_lists(extractor.tokenize(counts, INPUT_GENES))
    assert as_lists(extractor.tokenize(frame)) == expected
    assert as_lists(extractor.tokenize(frame[INPUT_GENES[::-1]])) == expected  # columns by name, not position
    with pytest.raises(ValueError, match="gene_ids is required.*DataFrame or an AnnData carries its own"):
        extractor.tokenize(dense_of(counts))
    with pytest.raises(ValueError, match=r"not expression values: \['cell_type'\].*select_dtypes"):
        extractor.tokenize(frame.assign(cell_type="B cell"))  # was scipy's "does not support dtype object"
    with pytest.raises(ValueError, match=r"not expression values: \['is_doublet'\]"):
        extractor.tokenize(frame.assign(is_doublet=False))  # was "must be numeric, got dtype object", naming none
    with pytest.raises(ValueError, match="expression values must be numeric, got dtype <U1"):
        extractor.tokenize(np.full((2, len(INPUT_GENES)), "1"), INPUT_GENES)



def test_cells_as_records_or_an_iterator_of_rows_name_the_input_to_pass(extractor, counts):
    """A list of dicts (gene -> value) was asked for gene_ids, a generator of rows refused as "shape ()"."""
    dense = dense_of(counts)
    records = [dict(zip(INPUT_GENES, row)) for row in dense]
    with pytest.raises(TypeError, match=r"records .*pandas.DataFrame\(records\)"):
        extractor.tokenize(records)
    with pytest.raises(TypeError, match=r"records .*pandas.DataFrame\(\[record\]\)"):
        extractor.tokenize(records[0])
    with pytest.raises(TypeError, match=r"generator of rows.*numpy.stack\(list\(rows\)\)"):
        extractor.tokenize((row for row in dense), INPUT_GENES)
    assert as_lists(extractor.tokenize(pd.DataFrame(records))) == as_lists(extractor.tokenize(counts, INPUT_GENES))

def test_tokenized_inputs_and_a_series_given_as_cells_name_the_input_to_pass(extractor, counts):
    """The reviewer's findings: a dict of tokenized inputs was refused as "records" (gene -> value), and one cell as
    a pandas Series was asked for gene_ids, where its index names the genes."""
    tokenized = dict(extractor(counts, INPUT_GENES))  # gene_input_ids, gene_attention_mask, gene_token_mask
    for cells in (tokenized, {"gene_input_ids": tokenized["gene_input_ids"]}):
        with pytest.raises(TypeError, match=r"tokenized inputs \(.*gene_input_ids.*processor\(gene_input_ids=\.\.\.\)"):
            extractor.tokenize(cells)
    series = pd.DataFrame(dense_of(counts), columns=INPUT_GENES).iloc[0]
    with pytest.raises(ValueError, match=r"pandas Series: pass series.to_frame\(\).T"):
        extractor.tokenize(series)
    assert as_lists(extractor.tokenize(series.to_frame().T)) == as_lists(extractor.tokenize(counts[:1], INPUT_GENES))


def test_a_dataframe_of_nullable_integers_reads_as_its_values(extractor, counts):
    """The QA finding: pandas' nullable Int64 columns were refused as "expression values must be numeric, got
    dtype object"."""
    frame = pd.DataFrame(dense_of(counts).astype(np.int64), columns=INPUT_GENES)
    expected = as_lists(extractor.tokenize(frame))
    assert as_lists(extractor.tokenize(frame.astype("Int64"))) == expected
    with_missing = frame.astype("Int64")
    with_missing.iloc[0, 0] = pd.NA
    with pytest.raises(ValueError, match="NaN"):
        extractor.tokenize(with_missing)


def test_one_cell_as_a_1d_vector_is_refused_naming_the_fix(extractor, counts):
    """The QA finding: a pandas Series (df.iloc[0]), a 1-D tensor or sparse array failed with "tuple index out of
    range"; a numpy vector already had a clear error."""
    import torch

    row = dense_of(counts)[0]
    frame = pd.DataFrame(dense_of(counts), columns=INPUT_GENES)
    for vector in (row, frame.iloc[0], torch.tensor(row), sp.coo_array(row)):
        with pytest.raises(ValueError, match=r"expected a 2-D cells x genes matrix, got shape \(\d+,\)"):
            extractor.tokenize(vector, INPUT_GENES)


def test_dense_float16_counts_rank_as_float32(extractor, counts, tmp_path):
    # scipy.sparse cannot hold float16: a dense float16 matrix (in memory or backed) failed inside scipy
    half = dense_of(counts).astype(np.float16)
    expected = as_lists(extractor.tokenize(half.astype(np.float32), INPUT_GENES))
    assert as_lists(extractor.tokenize(half, INPUT_GENES, chunk_size=8)) == expected
    path = tmp_path / "half.h5ad"
    ad.AnnData(X=half, var=pd.DataFrame(index=INPUT_GENES)).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        assert as_lists(extractor.tokenize(backed, chunk_size=8)) == expected
    finally:
        backed.file.close()


# ----------------------------------------------------------------------------- values checked (issue 9.4)


@pytest.mark.parametrize(
    "make, input_values, message",
    [
        (lambda c: c * 30, "log1p", "not log1p of normalised values.*input_values='counts'"),  # raw counts, up to 90
        (lambda c: c, "log1p", "every value is an integer.*look like raw counts"),  # small raw counts
        (lambda c: c.astype(np.float64) * 1e39, "counts", "2\\*\\*31 or more counts"),  # beyond float32's range
        (lambda c: c.astype(np.float64) * 1e39, "normalized", "far below 2\\*\\*31"),
        (lambda c: c, "normalized", "look like raw counts.*input_values='counts'"),
        (lambda c: sp.csr_matrix(c.multiply(1e4 / c.sum(axis=1))).log1p(), "normalized",
         "look log1p-scaled.*input_values='log1p'"),
    ],
    ids=["counts-as-log1p", "small-counts-as-log1p", "huge-counts", "huge-normalized", "counts-as-normalized",
         "log1p-as-normalized"],
)
def test_values_implausible_for_what_was_declared_are_refused(extractor, counts, make, input_values, message):
    with pytest.raises(ValueError, match=message):
        extractor.tokenize(sp.csr_matrix(make(counts)), INPUT_GENES, input_values=input_values)


def test_log1p_values_of_a_gene_subset_declared_normalized_are_refused():
    """The QA finding: pbmc68k_reduced's adata.raw (log1p of normalised data, 765 genes) declared 'normalized' was
    ranked as linear values, another gene order for all 700 cells, exit 0 (its cells' expm1 totals differ on a gene
    subset, so the totals rule could not see it)."""
    scanpy = pytest.importorskip("scanpy")
    raw = scanpy.datasets.pbmc68k_reduced().raw
    genes = list(raw.var_names)
    extractor = Cell2TextFeatureExtractor.from_gene_medians({gene: 1.0 for gene in symbol_to_ensembl(genes).values()})
    with pytest.raises(ValueError, match=r"look log1p-scaled .*expm1\(values\) are whole multiples.*'log1p'"):
        extractor.tokenize(raw.X, genes, input_values="normalized")
    assert len(extractor.tokenize(raw.X, genes, input_values="log1p")) == 700
    normalised = sp.csr_matrix(raw.X).expm1() * 10  # the same cells as normalised values
    assert len(extractor.tokenize(normalised, genes, input_values="normalized")) == 700


def test_shallow_cells_normalised_to_their_median_total_are_accepted(extractor):
    """A reviewer's finding on the first rule (largest value at most 20): shallow cells (a panel, low depth)
    normalised by scanpy's default normalize_total (to the median total) were refused as log1p, and the fix it
    named (input_values='log1p') would have ranked them wrongly without an error."""
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(0.3, size=(128, len(INPUT_GENES))).astype(np.float64))
    counts = counts[np.asarray(counts.sum(axis=1)).ravel() > 0]
    totals = np.asarray(counts.sum(axis=1)).ravel()
    shallow = sp.csr_matrix(counts.multiply((np.median(totals) / totals)[:, None])).astype(np.float32)
    assert shallow.max() <= 20 and not np.all(np.rint(shallow.data) == shallow.data)
    assert len(extractor.tokenize(shallow, INPUT_GENES, input_values="normalized")) == shallow.shape[0]
    with pytest.raises(ValueError, match="look log1p-scaled"):
        extractor.tokenize(shallow.log1p(), INPUT_GENES, input_values="normalized")


@pytest.mark.parametrize("cells", [[[2, 2, 3]], [[2, 0, 3], [4, 5, 0]], [[3, 7, 5, 2]]])
def test_normalised_cells_whose_smallest_count_is_not_one_are_accepted(extractor, cells):
    """CP10k values of cells (or a gene panel) whose smallest count is 2 or more are no whole multiples of their
    smallest value; above 20 they were clipped to 20 for the log1p rule, all equal, so whole multiples: refused as
    log1p-scaled, naming input_values='log1p', which the log1p rules refuse (values above 20)."""
    genes = INPUT_GENES[: len(cells[0])]
    counts = np.array(cells, dtype=np.float64)
    normalised = (counts / counts.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    assert normalised.max() > 20
    ranked = extractor.tokenize(normalised, genes, input_values="normalized")
    assert as_lists(ranked) == reference_tokens(extractor, normalised, genes, "normalized")


def test_plausible_values_of_each_kind_are_accepted(extractor, counts):
    normalised = sp.csr_matrix(counts.multiply(1e4 / counts.sum(axis=1)))
    assert len(extractor.tokenize(normalised, INPUT_GENES, input_values="normalized")) == counts.shape[0]
    assert len(extractor.tokenize(normalised.log1p(), INPUT_GENES, input_values="log1p")) == counts.shape[0]
    fractions = sp.csr_matrix(counts.multiply(1 / counts.sum(axis=1)))  # normalize_total(target_sum=1)
    assert len(extractor.tokenize(fractions, INPUT_GENES, input_values="normalized")) == counts.shape[0]


def test_overflow_after_conversion_is_refused():
    genes = VOCAB_GENES[:3]
    extractor = Cell2TextFeatureExtractor(
        {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: i + 4 for i, g in enumerate(genes)}},
        {genes[0]: 1e-310, genes[1]: 1.0, genes[2]: 1.0},  # a denormal median: value / median overflows
    )
    with pytest.raises(ValueError, match="over- or underflow when normalised"):
        extractor.tokenize(np.array([[1.0, 2.0, 3.0]], dtype=np.float32), genes)
    with pytest.raises(ValueError, match="over- or underflow when normalised"):  # a subnormal value
        extractor.tokenize(np.array([[0.0, 1e-310, 30.0]]), genes, input_values="normalized")


# ----------------------------------------------------------------------------- vocabulary source and bounds (9.7)


def test_vocabulary_source_recorded_saved_and_restored(tmp_path):
    import hashlib
    import json

    tokens = write_pickle(tmp_path / "tokens.pkl", {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
                                                    "ENSG00000141510": 4})
    medians = write_pickle(tmp_path / "medians.pkl", {"ENSG00000141510": 1.25})
    extractor = Cell2TextFeatureExtractor.from_geneformer_dictionaries(tokens, medians)
    digest = {path: hashlib.sha256(open(path, "rb").read()).hexdigest() for path in (tokens, medians)}
    assert extractor.vocabulary_source == {
        "kind": "geneformer", "token_dictionary_sha256": digest[tokens], "gene_median_sha256": digest[medians],
        "token_dictionary_file": "tokens.pkl", "gene_median_file": "medians.pkl",
    }
    extractor.save_pretrained(tmp_path / "saved")
    assert Cell2TextFeatureExtractor.from_pretrained(tmp_path / "saved").vocabulary_source == extractor.vocabulary_source

    corpus = Cell2TextFeatureExtractor.from_gene_medians({"ENSG00000141510": 1.5}, source_details={"datasets": ["a"]})
    assert corpus.vocabulary_source["kind"] == "corpus" and corpus.vocabulary_source["datasets"] == ["a"]
    assert corpus.vocabulary_source["n_genes"] == 1 and len(corpus.vocabulary_source["gene_medians_sha256"]) == 64
    assert corpus.vocab_size == 5

    config_file = tmp_path / "saved" / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    del config["vocabulary_source"]  # a config saved before the attribute existed
    config_file.write_text(json.dumps(config))
    assert Cell2TextFeatureExtractor.from_pretrained(tmp_path / "saved").vocabulary_source == {"kind": "unknown"}
    with pytest.raises(ValueError, match="JSON-serialisable"):
        make_extractor(vocabulary_source={"kind": "corpus", "when": object()})
    with pytest.raises(ValueError, match="string 'kind'"):
        make_extractor(vocabulary_source={"sha": "x"})


def test_a_huge_token_id_in_a_geneformer_dictionary_is_refused(tmp_path):
    tokens = write_pickle(tmp_path / "tokens.pkl", {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
                                                    "ENSG00000141510": 2**31})
    medians = write_pickle(tmp_path / "medians.pkl", {"ENSG00000141510": 1.25})
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 4194304\).*'ENSG00000141510': 2147483648"):
        Cell2TextFeatureExtractor.from_geneformer_dictionaries(tokens, medians)


# ----------------------------------------------------------------------------- one gene-ID resolver (9.9)


def test_corpus_and_inference_map_the_same_symbols_to_the_same_genes_ambiguous_ones_included():
    from processing.sources import resolve_genes

    vocabulary = {
        "ENSG00000105501": 1.0,  # SIGLEC5's non-coding gene only: the symbol names the coding one, not in here
        "ENSG00000144063": 1.0, "ENSG00000282304": 2.0,  # MALL: coding + non-coding, both in the vocabulary
        "ENSG00000002586": 1.0, "ENSG00000292348": 2.0,  # CD99: two protein-coding genes: ambiguous
        "ENSG00000141510": 1.0, "ENSG00000198851": 3.0,  # TP53, CD3E
    }
    extractor = Cell2TextFeatureExtractor.from_gene_medians(vocabulary)
    names = ["SIGLEC5", "MALL", "CD99", "TP53", "CD3E", "ENSG00000141510.7", "ENSG00000182378_PAR_Y",
             "ENST00000269305", "ENSG0foo", " CD3E "]
    corpus_ids, _ = resolve_genes(pd.DataFrame(index=names[:5]))
    corpus_tokens = extractor.match_genes([g or "unmapped" for g in corpus_ids]).column_tokens
    inference_tokens = extractor.match_genes(names[:5]).column_tokens
    assert corpus_tokens.tolist() == inference_tokens.tolist()
    token = extractor.gene_token_ids
    assert inference_tokens.tolist() == [-1, token["ENSG00000144063"], -1, token["ENSG00000141510"],
                                         token["ENSG00000198851"]]
    # Ensembl IDs: the corpus's rule is the extractor's
    from modeling_cell2text.gene_ids import ensembl_gene_id

    ids = ["ENSG00000141510.7", "ENSG00000182378_PAR_Y", "ENST00000269305", "ENSG0foo", "ENSG00000198851",
           "ENSG00000105501", "ENSMUSG00000000001.4"]
    ids_as_corpus, _ = resolve_genes(pd.DataFrame(index=ids))
    assert ids_as_corpus == [ensembl_gene_id(n) for n in ids]
    assert ids_as_corpus[:4] == ["ENSG00000141510", None, None, None]
    assert extractor.match_genes(ids).column_tokens.tolist()[:4] == [token["ENSG00000141510"], -1, -1, -1]


@pytest.mark.parametrize("var", [
    # symbols in the index, a feature_name-like column that names no gene: the corpus builder read the column
    pd.DataFrame({"gene_name": ["tp53", "cd3e", "jchain"]}, index=["TP53", "CD3E", "JCHAIN"]),
    # Ensembl IDs in a column of another name, row numbers in the index: the corpus builder read no gene
    pd.DataFrame({"ensembl": ["ENSG00000141510", "ENSG00000198851", "ENSG00000132465"]}, index=["0", "1", "2"]),
    # Ensembl IDs with one symbol among them: the corpus builder read no gene there, inference JCHAIN
    pd.DataFrame(index=["ENSG00000141510", "ENSG00000198851", "JCHAIN"]),
    # symbols with one Ensembl ID among them (CELLxGENE names an unnamed gene by its ID): the same, the other way
    pd.DataFrame(index=["TP53", "CD3E", "ENSG00000132465.12"]),
    # symbols in a feature_name-like column, row numbers in the index: the column names the genes
    pd.DataFrame({"gene_name": ["TP53", "CD3E", "IGJ"]}, index=["0", "1", "2"]),
])
def test_the_corpus_builder_reads_a_files_genes_where_inference_reads_them(var):
    """One file, one gene per column in training and in use: the corpus builder chose its symbol source by name,
    inference by the genes it names, so such a file trained on no genes and was described by three."""
    from processing.sources import resolve_genes

    extractor = Cell2TextFeatureExtractor.from_gene_medians(
        {"ENSG00000141510": 1.0, "ENSG00000198851": 2.0, "ENSG00000132465": 3.0})
    corpus_ids, _ = resolve_genes(var)
    assert corpus_ids == ["ENSG00000141510", "ENSG00000198851", "ENSG00000132465"]
    assert (extractor.match_genes(extractor.var_gene_ids(var)).column_tokens.tolist()
            == extractor.match_genes(corpus_ids).column_tokens.tolist()
            == [extractor.gene_token_ids[gene] for gene in corpus_ids])


def test_10x_features_other_than_gene_expression_name_no_gene_in_the_corpus_builder_or_at_inference():
    """A CITE-seq file read by scanpy: antibodies named like genes ("CD19", "CD4") among the Ensembl IDs of var's
    gene_ids. Read as symbols, their protein counts were those genes' expression, in training and in use, exit 0."""
    from processing.sources import resolve_genes

    genes = ["ENSG00000141510", "ENSG00000198851", "ENSG00000177455", "ENSG00000010610"]  # TP53, CD3E, CD19, CD4
    var = pd.DataFrame({"gene_ids": [*genes[:2], "CD19", "CD4"],
                        "feature_types": ["Gene Expression"] * 2 + ["Antibody Capture"] * 2},
                       index=["TP53", "CD3E", "CD19", "CD4"])
    extractor = Cell2TextFeatureExtractor.from_gene_medians(dict.fromkeys(genes, 1.0))
    assert resolve_genes(var)[0] == [*genes[:2], None, None]
    assert extractor.match_genes(extractor.var_gene_ids(var)).column_tokens.tolist() == [
        extractor.gene_token_ids[genes[0]], extractor.gene_token_ids[genes[1]], -1, -1]
    # nor do they count in gene sets by their name (CD4's sets where the CD4 gene is not in the file)
    cellxgene_like = pd.DataFrame({"feature_name": ["TP53", "CD3E", "CD19", "CD4"],
                                   "feature_types": ["Gene Expression"] * 3 + ["Antibody Capture"]},
                                  index=[*genes[:3], "CD4"])
    assert resolve_genes(cellxgene_like) == ([*genes[:3], None], ["TP53", "CD3E", "CD19", None])
    # a feature_types column in words other than 10x's names its genes as they are (not every gene left out)
    other_words = pd.DataFrame({"gene_ids": genes, "feature_types": ["gene"] * 4}, index=["TP53", "CD3E", "CD19", "CD4"])
    assert resolve_genes(other_words)[0] == genes == extractor.var_gene_ids(other_words)


def test_names_other_code_imports_stay_importable_from_the_feature_extraction_module():
    """The extractor's parts live in their own modules; the names callers import from here still resolve there."""
    from modeling_cell2text import cell_inputs, feature_extraction_cell2text, geneformer_dictionaries, rank_value

    assert feature_extraction_cell2text.RankedCells is rank_value.RankedCells
    assert feature_extraction_cell2text.load_numeric_dict is geneformer_dictionaries.load_numeric_dict
    assert feature_extraction_cell2text.empty_cells_error is cell_inputs.empty_cells_error
    assert feature_extraction_cell2text.SPECIAL_TOKENS == ("<pad>", "<mask>", "<cls>", "<eos>")


@pytest.mark.parametrize("base", [2, 10])
@pytest.mark.parametrize("declared", ["log1p", "normalized"])
def test_log_values_of_another_base_are_refused(declared, base):
    """The reviewer's finding: log2(x + 1) of normalised pbmc68k cells (scanpy's log1p(base=2)) passed as 'log1p'
    and as 'normalized': 2 of 20 cell types changed, exit 0. Natural-log values still pass as log1p."""
    scanpy = pytest.importorskip("scanpy")
    raw = scanpy.datasets.pbmc68k_reduced().raw
    genes = list(raw.var_names)
    extractor = Cell2TextFeatureExtractor.from_gene_medians({gene: 1.0 for gene in symbol_to_ensembl(genes).values()})
    normalised = sp.csr_matrix(raw.X[:64]).expm1()
    other_base = normalised.log1p() / np.log(base)
    with pytest.raises(ValueError, match=f"look like log{base}\\(x \\+ 1\\).*np.log1p\\(np.power\\({base}.0, X\\) - 1\\)"):
        extractor.tokenize(other_base, genes, input_values=declared)
    converted = sp.csr_matrix(other_base)
    converted.data = np.log1p(np.power(float(base), converted.data) - 1)  # the fix the message names
    assert len(extractor.tokenize(converted, genes, input_values="log1p")) == 64
    assert len(extractor.tokenize(raw.X, genes, input_values="log1p")) == 700


@pytest.mark.parametrize("genes_per_cell", [1, 2, 3, 5])
def test_natural_log_values_of_cells_with_few_genes_pass_as_log1p(genes_per_cell):
    """A reviewer's finding on the base rule: log1p of values that are not counts times a scale (TPM, corrected
    counts) in cells of 2-5 genes were refused as log2 or log10 by chance (126 of 2,000 two-gene cells)."""
    rng = np.random.default_rng(1)
    n = 400
    values = np.zeros((n, len(INPUT_GENES)))
    for row in range(n):
        genes = rng.choice(len(INPUT_GENES), genes_per_cell, replace=False)
        values[row, genes] = np.log1p(rng.lognormal(2.0, 1.5, genes_per_cell).round(1))  # ties included
    extractor = Cell2TextFeatureExtractor.from_gene_medians({gene: 1.0 for gene in INPUT_GENES})
    cells = sp.csr_matrix(values)
    for start in range(0, n, 20):  # chunks of 20 cells, one at a time too
        extractor.tokenize(cells[start:start + 20], INPUT_GENES, input_values="log1p")
        extractor.tokenize(cells[start:start + 1], INPUT_GENES, input_values="log1p")


@pytest.mark.parametrize("decimals", [4, 5, None])
def test_log1p_of_fractions_passes(decimals):
    """A reviewer's finding on the base rule: log1p of values far below 1 (normalize_total(target_sum=1), rounded or
    float16) looks alike in every base, and was refused as log2 (97 of 100 single cells rounded to 4 decimals)."""
    rng = np.random.default_rng(0)
    means = rng.lognormal(0, 2, len(INPUT_GENES))
    means /= means.sum()
    counts = rng.negative_binomial(2, 2 / (2 + 200_000 * means), size=(20, len(INPUT_GENES))).astype(np.float64)
    fractions = np.log1p(counts / counts.sum(axis=1, keepdims=True))
    values = np.round(fractions, decimals) if decimals else fractions.astype(np.float16).astype(np.float32)
    extractor = Cell2TextFeatureExtractor.from_gene_medians({gene: 1.0 for gene in INPUT_GENES})
    cells = sp.csr_matrix(values)
    assert len(extractor.tokenize(cells, INPUT_GENES, input_values="log1p")) == 20
    for row in range(20):
        extractor.tokenize(cells[row:row + 1], INPUT_GENES, input_values="log1p")


@pytest.mark.parametrize("target", [5, 10])
def test_linear_values_declared_log1p_are_refused(target):
    """The reviewer's finding: normalised values at a scale that keeps them <= 20 (normalize_total to 10 or 100)
    declared log1p passed and were ranked through expm1: another gene order in every cell (top-50 overlap 0.93 at
    100 over 1,000 genes)."""
    rng = np.random.default_rng(8)
    counts = rng.negative_binomial(0.3, 0.1, size=(64, len(INPUT_GENES))).astype(np.float64)
    counts[:, 0] += 1
    linear = sp.csr_matrix(counts / counts.sum(axis=1, keepdims=True) * target)
    extractor = Cell2TextFeatureExtractor.from_gene_medians({gene: 1.0 + i % 3 for i, gene in enumerate(INPUT_GENES)})
    with pytest.raises(ValueError, match=r"'log1p' but the values look linear.*input_values='normalized'"):
        extractor.tokenize(linear, INPUT_GENES, input_values="log1p")
    assert len(extractor.tokenize(linear, INPUT_GENES, input_values="normalized")) == 64
    assert len(extractor.tokenize(linear.log1p(), INPUT_GENES, input_values="log1p")) == 64


def test_log1p_values_rounded_to_two_decimals_declared_normalized_are_refused():
    """The reviewer's finding: log1p of CP10k rounded to 2 decimals, declared normalized, passed (the rounding
    moves each cell's total of expm1(values) by about 0.05%, past the 0.1% range over 256 cells the rule allowed)
    and was ranked as linear values (top-50 overlap 0.66)."""
    rng = np.random.default_rng(8)
    counts = rng.negative_binomial(0.3, 0.1, size=(256, len(INPUT_GENES))).astype(np.float64)
    counts[:, 0] += 1
    rounded = np.round(np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4), 2)
    extractor = Cell2TextFeatureExtractor.from_gene_medians({gene: 1.0 for gene in INPUT_GENES})
    with pytest.raises(ValueError, match=r"look log1p-scaled"):  # the multiples rule, allowing for the rounding
        extractor.tokenize(sp.csr_matrix(rounded), INPUT_GENES, input_values="normalized")
    for n_cells in (1, 3, 5, 7):  # a few cells too (a range rule below 8 cells let these pass: the third reader)
        with pytest.raises(ValueError, match="look log1p-scaled"):
            extractor.tokenize(sp.csr_matrix(rounded[:n_cells]), INPUT_GENES, input_values="normalized")
    assert len(extractor.tokenize(sp.csr_matrix(rounded), INPUT_GENES, input_values="log1p")) == 256


def test_rounded_or_float16_log1p_values_declared_normalized_are_refused_cell_by_cell():
    """The reviewer's finding: pbmc68k_reduced's raw values (log1p of CP10k kept to 3 decimals) stored as float16
    passed as normalized for all 700 cells (each ranked wrongly), and 121 of its float32 cells described alone
    (the rounding moves expm1(values) off whole multiples: 2.001, 7.007); rounded linear values still pass."""
    import scanpy as sc

    from modeling_cell2text.rank_value import check_values

    raw = sc.datasets.pbmc68k_reduced().raw.X.toarray()[:60]

    def refused(rows: np.ndarray, dtype, declared: str) -> bool:
        matrix = sp.csr_matrix(rows.astype(np.float64))
        try:
            check_values(matrix.data.astype(dtype), matrix.indptr, declared, 0)
        except ValueError as error:
            assert "input_values=" in str(error)
            return True
        return False

    for dtype in (np.float32, np.float16):
        assert refused(raw, dtype, "normalized")
        assert all(refused(raw[[i]], dtype, "normalized") for i in range(len(raw)))
        assert not any(refused(raw[[i]], dtype, "log1p") for i in range(len(raw)))
    linear = np.round(np.expm1(raw.astype(np.float64)), 3)  # CP10k rounded to 3 decimals: linear, not log1p
    for dtype in (np.float32, np.float16):
        assert not any(refused(linear[[i]], dtype, "normalized") for i in range(len(raw)))


def test_linear_values_of_two_cells_whose_expm1_totals_nearly_agree_pass_as_normalized():
    """The second reader's finding on the rule above: in a chunk of 2 cells a coefficient of variation below 0.2%
    lets totals differ by 0.4%, so linear values (shown linear: whole multiples of each cell's smallest value)
    whose expm1 totals came within 0.3% were refused as log1p."""
    genes = [f"ENSG{i:011d}" for i in range(1, 11)]
    cells = np.array([[1.0] * 10, [2 * 0.964] + [0.964] * 7 + [0.0, 0.0]])
    assert abs(np.expm1(cells).sum(axis=1).std() / np.expm1(cells).sum(axis=1).mean()) < 0.002
    extractor = Cell2TextFeatureExtractor.from_gene_medians({gene: 1.0 for gene in genes})
    assert len(extractor.tokenize(sp.csr_matrix(cells), genes, input_values="normalized")) == 2


def test_log1p_of_shallow_cells_of_ones_declared_normalized_is_still_refused():
    """The third reader's finding on the fix above: cells whose values are all equal (every count 1) are whole
    multiples in log1p too; counted as showing the values linear, they switched the totals rule off, and a deeper
    cell beside them was ranked as linear values."""
    genes = [f"ENSG{i:011d}" for i in range(1, 11)]
    counts = np.array([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0], [3, 1, 2, 0, 0, 0, 5, 1, 0, 0]],
                      dtype=np.float64)
    logged = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    extractor = Cell2TextFeatureExtractor.from_gene_medians({gene: 1.0 + i for i, gene in enumerate(genes)})
    with pytest.raises(ValueError, match=r"look log1p-scaled.*totals of expm1\(values\) agree"):
        extractor.tokenize(sp.csr_matrix(logged), genes, input_values="normalized")
    assert len(extractor.tokenize(sp.csr_matrix(logged), genes, input_values="log1p")) == 3


@pytest.mark.parametrize("n_empty_after", [1, 3])
def test_a_cell_followed_by_empty_cells_keeps_its_total(n_empty_after):
    """A reviewer's finding: the per-cell totals lost the last stored count of a cell followed by empty cells at the
    end of a chunk (here 42 + 14 + 1 + 1 read as 57), which changed the float32 rounding of its values and swapped
    its two tied genes (42 over median 3 and 14 over median 1) in its tokens."""
    from modeling_cell2text.rank_value import _row_sums

    matrix = sp.csr_matrix(np.array([[1, 2, 0], [0, 0, 0], [0, 5, 0], [0, 0, 0]], np.float32))
    assert _row_sums(matrix.data, matrix.indptr).tolist() == [3.0, 0.0, 5.0, 0.0]
    genes = [f"ENSG{i:011d}" for i in range(1, 5)]
    extractor = Cell2TextFeatureExtractor.from_gene_medians(dict(zip(genes, [3.0, 1.0, 1.0, 1.0])))
    cell = np.array([[42, 14, 1, 1]], np.float32)
    alone = extractor.tokenize(cell, genes)[0].tolist()
    with_empty = extractor.tokenize(np.vstack([cell, np.zeros((n_empty_after, 4), np.float32)]), genes,
                                    skip_empty_cells=True)
    assert with_empty[0].tolist() == alone


def test_value_errors_name_rows_from_first_row():
    extractor = make_extractor()
    counts = random_counts(5).toarray()
    counts[3, :] = np.nan
    with pytest.raises(ValueError, match="chunk starting at cell 1002"):
        extractor.tokenize(counts, INPUT_GENES, chunk_size=2, first_row=1000)


@pytest.mark.parametrize("make", [lambda m: m.toarray() > 0, lambda m: sp.csr_matrix(m.toarray() > 0)])
def test_a_binarised_matrix_is_refused(extractor, counts, make):
    """Boolean input was ranked as counts of 1: every cell ordered by its genes' medians alone."""
    with pytest.raises(ValueError, match="booleans .*binarised.*pass the counts"):
        extractor.tokenize(make(counts), INPUT_GENES)


def test_a_dataframe_of_float32_extension_columns_ranks_as_float32_cells(extractor):
    """A reviewer's finding: Sparse[float32] and Float32 columns were read as float64, so exact ties broke by another
    rounding than the same float32 cells in an AnnData or array (where float32 normalises in float32)."""
    rng = np.random.default_rng(3)
    dense = (rng.integers(1, 40, size=(300, len(INPUT_GENES))) * (rng.random((300, len(INPUT_GENES))) < 0.5))
    dense[:, 0] = np.maximum(dense[:, 0], 1)
    as_float32 = as_lists(extractor.tokenize(dense.astype(np.float32), INPUT_GENES))
    assert as_float32 != as_lists(extractor.tokenize(dense.astype(np.float64), INPUT_GENES))  # the case is real
    frame = pd.DataFrame(dense.astype(np.float32), columns=INPUT_GENES)
    for dtype in (pd.SparseDtype(np.float32, 0.0), "Float32"):
        assert as_lists(extractor.tokenize(frame.astype(dtype))) == as_float32, dtype


def test_duplicate_csr_entries_are_summed_before_ranking():
    """A CSR matrix holding one (cell, gene) entry twice (non-canonical: scipy keeps both until summed) is the
    matrix with their sum: the gene is ranked once, by its total, as the dense matrix ranks it. Unsummed, the gene
    was ranked twice in the cell (a duplicate token) at half its count each."""
    extractor = make_extractor()
    genes = VOCAB_GENES[:6]
    # cell 0: gene 0 stored twice (4 + 4 = 8 counts), gene 1 has 5, gene 2 has 1
    duplicated = sp.csr_matrix((np.array([4.0, 4.0, 5.0, 1.0], dtype=np.float32), np.array([0, 0, 1, 2]),
                                np.array([0, 4])), shape=(1, len(genes)))
    assert not duplicated.has_canonical_format
    dense = np.array([[8.0, 5.0, 1.0, 0, 0, 0]], dtype=np.float32)
    tokens = extractor.tokenize(duplicated, genes)[0].tolist()
    assert tokens == extractor.tokenize(dense, genes)[0].tolist()
    assert tokens.count(extractor.gene_token_ids[genes[0]]) == 1


@pytest.mark.parametrize("dtype, stored, other", [
    (np.uint8, [200, 100], 250), (np.int8, [100, 100], 120), (np.uint16, [40_000, 30_000], 60_000),
    (np.int16, [20_000] * 2, 30_000)])
@pytest.mark.parametrize("form", ["coo", "csr", "csc", "coo_array"])
def test_entries_repeated_in_narrow_integers_are_summed_without_wrapping(dtype, stored, other, form):
    """scipy sums repeated entries in the stored dtype: uint8 200 + 100 gave 44 (int8 100 + 100 gave -56, refused as
    scaled data), so the gene with 300 counts ranked below one with 250, exit 0."""
    extractor = make_extractor(model_input_size=8)
    genes = VOCAB_GENES[:3]
    rows, columns = np.zeros(3, dtype=np.int64), np.array([0, 0, 1])
    coo = sp.coo_matrix((np.array([*stored, other], dtype=dtype), (rows, columns)), shape=(1, 3))
    matrix = {"coo": coo, "csr": sp.csr_matrix((coo.data, columns, np.array([0, 3])), shape=(1, 3)),
              "csc": sp.csc_matrix((coo.data, rows, np.array([0, 2, 3, 3])), shape=(1, 3)),
              "coo_array": sp.coo_array(coo)}[form]
    dense = np.array([[sum(stored), other, 0]], dtype=np.int64)
    assert as_lists(extractor.tokenize(matrix, genes)) == reference_tokens(extractor, dense, genes)
    assert matrix.dtype == dtype and matrix.data.tolist() == [*stored, other]  # the caller's matrix as it was


def test_near_ties_beyond_one_sort_key_keep_descending_value_then_token_order():
    """`_order_near_ties` falls back to a lexsort when the run, low-bit and token fields do not fit one 64-bit key.
    The fallback must order exactly as the one-key path: by exact value descending, then token ascending."""
    values = np.array([1.0, np.nextafter(1.0, 2.0), 1.0], dtype=np.float64)  # entry 1 is the largest, 0 and 2 tie
    tokens = np.array([9, 7, 5], dtype=np.int32)
    source = np.array([[0, 1, 2]], dtype=np.int64)  # the rank order before the run is sorted
    for low_bits in (8, 60):  # 60: run (1 bit) + 60 + token bits (4) > 64, the lexsort path
        high = np.zeros((1, 3), dtype=np.uint64)  # one run: keys equal above the low bits
        sorted_tokens = tokens[source].copy()
        _order_near_ties(high, source, values, tokens, low_bits, sorted_tokens, None)
        assert sorted_tokens.tolist() == [[7, 5, 9]], low_bits


def test_an_index_of_symbols_with_a_few_ensembl_ids_is_not_read_as_ensembl_ids():
    """Cell Ranger names a gene without a symbol by its Ensembl id, so a symbol index holds a few: the index is read
    as Ensembl ids only where most are, else the var column of Ensembl ids is (an ambiguous symbol, CD99, maps to no
    gene; its id does)."""
    var = pd.DataFrame({"gene_ids": ["ENSG00000002586", "ENSG00000141510", "ENSG00000105501", "ENSG00000198851"]},
                       index=["CD99", "TP53", "ENSG00000105501", "CD3E"])
    assert var_gene_ids(var, {"TP53": "ENSG00000141510", "CD3E": "ENSG00000198851"}) == list(var["gene_ids"])
    half = var.set_axis(["CD99", "TP53", "ENSG00000105501", "ENSG00000198851"])  # half are ids: not most
    assert var_gene_ids(half, {"TP53": "ENSG00000141510"}) == list(var["gene_ids"])


def test_the_known_ensembl_columns_are_tried_first():
    """feature_id (CELLxGENE) is read before another column that also holds Ensembl ids (here another gene's
    each, as a column of orthologs or of an older release would)."""
    var = pd.DataFrame({"previous_ids": ["ENSG00000000001", "ENSG00000000002"],
                        "feature_id": ["ENSG00000141510", "ENSG00000198851"],
                        "ortholog_ids": ["ENSG00000000003", "ENSG00000000004"]}, index=["a", "b"])
    assert var_gene_ids(var, {}) == ["ENSG00000141510", "ENSG00000198851"]


def test_symbols_are_read_from_any_symbol_column_with_the_index_winning_ties():
    symbol_to_gene = {"TP53": "ENSG00000141510", "CD3E": "ENSG00000198851"}
    var = pd.DataFrame({"gene_name": ["TP53", "CD3E", "x"]}, index=["0", "1", "2"])
    assert var_gene_ids(var, symbol_to_gene) == ["TP53", "CD3E", "x"]
    tie = pd.DataFrame({"feature_name": ["TP53", "y"]}, index=["CD3E", "z"])
    assert var_gene_ids(tie, symbol_to_gene) == ["CD3E", "z"]


def test_the_extraction_benchmark_refuses_sizes_below_one_in_one_line(monkeypatch, capsys):
    """benchmarks/feature_extraction.py --repeats 0 printed "0 cells/s (best of 0: inf s wall)" with exit 0, and
    --cells 0 ended in a traceback after building the extractor."""
    import sys
    from tiny_parts import load_benchmark

    benchmark = load_benchmark("feature_extraction")
    for option in ("--cells", "--repeats", "--threads"):
        monkeypatch.setattr(sys, "argv", ["feature_extraction.py", "--genes", "50", "--nnz", "5", option, "0"])
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and option in err[-1], err


@pytest.mark.parametrize("cells, genes, said", [
    (slice(None), np.array([1, 3]), r"these genes of the backed file \(no read\): pass adata.to_memory\(\)\[:, genes\]"),
    (slice(0, 2), slice(None), r"these cells of the backed file \(no read\): pass adata.to_memory\(\)\[rows\]"),
    (np.array([0, 2]), np.array([1]), r"these cells and genes .*adata.to_memory\(\)\[rows, genes\]"),
])
def test_a_view_anndata_cannot_read_is_refused_naming_what_it_selects(cells, genes, said):
    """anndata failing to read a backed file's view with its own ValueError: a view of genes was said to be of
    "these cells", with a fix that selects rows."""
    from modeling_cell2text.cell_inputs import anndata_matrix

    class View:  # a view of a backed AnnData whose reading fails (no such view of anndata 0.12 is known)
        is_view, _oidx, _vidx = True, cells, genes
        _adata_ref = type("Backed", (), {"X": object()})()

        @property
        def X(self):
            raise ValueError("no read")

    with pytest.raises(ValueError, match=said):
        anndata_matrix(View())
