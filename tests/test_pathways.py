"""AUCell pathway scoring against a direct per-cell computation of its definition."""

import gzip

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from processing.pathways import (
    DEFAULT_GMT, DEFAULT_SET_SIZES, GO_BIOLOGICAL_PROCESS_GMT, WIKIPATHWAYS_GMT, aucell, default_max_rank,
    display_names, filter_set_sizes, max_auc, membership_matrix, read_gmt, sets_in_data_symbols, top_pathways,
    unique_gene_names,
)
from processing.sources import resolve_genes


def reference_aucell(dense, gene_names, gene_sets, max_rank):
    """AUCell for one cell at a time: rank genes (highest first), credit max(c - rank, 0) with
    c = max_rank - 1; a tied block gets the mean credit of the ranks it occupies (the expected
    value of pySCENIC's random tie breaking); divide by (c + 1) * genes present."""
    c = max_rank - 1
    out = np.zeros((dense.shape[0], len(gene_sets)))
    for i, x in enumerate(dense):
        order = np.argsort(-x, kind="stable")
        sorted_x = x[order]
        credit = np.empty(len(x))
        for value in np.unique(x):
            ranks = np.flatnonzero(sorted_x == value)
            credit[order[ranks]] = np.maximum(c - ranks, 0).mean()
        for j, genes in enumerate(gene_sets.values()):
            present = sorted({gene_names.index(g) for g in genes if g in gene_names})
            if present:
                out[i, j] = credit[present].sum() / ((c + 1) * len(present))
    return out


def recovery_curve_auc(x, positions, max_rank):
    """pySCENIC's recovery-curve AUC of one cell (no ties): area up to rank max_rank - 1."""
    c = max_rank - 1
    ranking = np.empty(len(x), dtype=int)
    ranking[np.argsort(-x)] = np.arange(len(x))
    hits = np.sort(ranking[positions][ranking[positions] < c])
    steps = np.concatenate([hits, [c]])
    return np.sum(np.diff(steps) * np.arange(1, len(steps))) / ((c + 1) * len(positions))


def random_problem(seed, n_cells=60, n_genes=300, density=0.3, n_sets=25, integer=True):
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    counts = rng.poisson(2.0, size=(n_cells, n_genes)) if integer else rng.gamma(1.0, size=(n_cells, n_genes))
    counts = counts * (rng.random((n_cells, n_genes)) < density)
    dense = np.log1p(counts).astype(np.float32)
    dense[0] = 0.0  # an empty cell
    gene_sets = {
        f"set{j}": [genes[k] for k in rng.choice(n_genes, rng.integers(1, 40), replace=False)] + ["NOT_A_GENE"]
        for j in range(n_sets)
    }
    return dense, genes, gene_sets


@pytest.mark.parametrize("max_rank", [None, 1, 40, 300])
@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_aucell_equals_per_cell_definition_with_ties(max_rank, chunk_size):
    dense, genes, gene_sets = random_problem(seed=0)
    expected = reference_aucell(dense.astype(np.float64), genes, gene_sets, max_rank or default_max_rank(len(genes)))
    got = aucell(sp.csr_matrix(dense), genes, gene_sets, max_rank=max_rank, chunk_size=chunk_size)
    assert got.shape == (60, 25)
    assert np.abs(got - expected).max() <= 1e-6
    assert got.min() >= 0.0 and got.max() < 1.0


def test_aucell_dense_input_equals_sparse():
    dense, genes, gene_sets = random_problem(seed=1, integer=False)
    assert np.abs(aucell(dense, genes, gene_sets) - aucell(sp.csc_matrix(dense), genes, gene_sets)).max() == 0


def test_aucell_without_ties_equals_recovery_curve_area():
    rng = np.random.default_rng(2)
    dense = rng.random((20, 200)) + 0.1  # every gene expressed, no ties
    genes = [f"G{i}" for i in range(200)]
    gene_sets = {f"s{j}": [genes[k] for k in rng.choice(200, 15, replace=False)] for j in range(10)}
    got = aucell(dense, genes, gene_sets, max_rank=50)
    for j, members in enumerate(gene_sets.values()):
        positions = np.array([genes.index(g) for g in members])
        for i in range(len(dense)):
            assert got[i, j] == pytest.approx(recovery_curve_auc(dense[i], positions, 50), abs=1e-6)


def test_tie_handling_is_the_mean_of_random_tie_breaking():
    rng = np.random.default_rng(3)
    x = np.array([5.0, 3.0, 3.0, 3.0, 1.0, 0, 0, 0, 0, 0, 0, 0])
    genes = [f"G{i}" for i in range(len(x))]
    gene_sets = {"tied": ["G2", "G6"], "top": ["G0", "G3"]}
    got = aucell(x[None, :], genes, gene_sets, max_rank=6)[0]
    noisy = x + rng.random((20000, len(x))) * 1e-3  # random order inside each tie block
    samples = aucell(noisy, genes, gene_sets, max_rank=6)
    assert np.allclose(got, samples.mean(axis=0), atol=0.005)
    assert got[0] == pytest.approx((4 + 3 + 2) / 3 / (6 * 2))  # G2 shares ranks 1-3, G6 is past the cutoff


def test_all_tied_cells_give_every_gene_the_mean_credit():
    genes = [f"G{i}" for i in range(100)]
    gene_sets = {"a": genes[:10], "b": genes[50:]}
    expected = (19 * 20 / 2) / 100 / 20  # mean of max(19 - r, 0) over 100 ranks, over (c + 1)
    for matrix in (sp.csr_matrix((3, 100)), np.ones((2, 100))):
        assert np.allclose(aucell(matrix, genes, gene_sets, max_rank=20), expected)


def test_aucell_rejects_bad_input():
    dense, genes, gene_sets = random_problem(seed=4)
    with pytest.raises(ValueError, match="non-negative"):
        aucell(dense - 1.0, genes, gene_sets)
    with pytest.raises(ValueError, match="gene_names"):
        aucell(dense, genes[:-1], gene_sets)
    with pytest.raises(ValueError, match="max_rank"):
        aucell(dense, genes, gene_sets, max_rank=0)


def test_sets_below_min_genes_score_zero():
    dense, genes, gene_sets = random_problem(seed=5)
    gene_sets = {"small": genes[:2], "big": genes[:30]}
    scores = aucell(dense, genes, gene_sets, min_genes=5)
    assert np.all(scores[:, 0] == 0) and scores[:, 1].max() > 0


def test_top_pathways_orders_best_first():
    scores = np.array([[0.1, 0.5, 0.3], [0.9, 0.0, 0.9]])
    assert top_pathways(scores, ["a", "b", "c"], k=2) == [["b", "c"], ["a", "c"]]
    assert top_pathways(scores, ["a", "b", "c"], k=5)[0] == ["b", "c", "a"]
    with pytest.raises(ValueError, match="cells x 2 sets"):
        top_pathways(scores, ["a", "b"])


def test_a_set_scoring_zero_is_not_named():
    """top_pathways named sets scoring 0 (an all-zero row gave ['a', 'b']) where the builder names none: a set none of
    whose genes ranks in the cell's top is not its pathway (docs/corpus.md)."""
    scores = np.array([[0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [0.0, 0.2, 0.3]], dtype=np.float32)
    assert top_pathways(scores, ["a", "b", "c"], k=2) == [[], ["a"], ["c", "b"]]


def test_read_gmt(tmp_path):
    text = "SET_A\tdesc\tTP53\tEGFR\tTP53\t\nSET_B\t\tCD19\r\n\nSET_C\thttp://x\tMS4A1\n"
    path = tmp_path / "lib.gmt"
    path.write_text(text)
    expected = {"SET_A": ["TP53", "EGFR"], "SET_B": ["CD19"], "SET_C": ["MS4A1"]}
    assert read_gmt(path) == expected
    gz = tmp_path / "lib.gmt.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    assert read_gmt(gz) == expected
    path.write_text(text, encoding="utf-8-sig")  # saved with a byte-order mark: it began SET_A's name
    assert read_gmt(path) == expected


@pytest.mark.parametrize("text, message", [
    ("SET_A\tdesc\n", ":1: a GMT line needs"),
    ("SET_A\tdesc\tTP53\nSET_A\tdesc\tEGFR\n", ":2: gene set 'SET_A' appears twice"),
    ("\n\n", "no gene sets"),
    # found after the pass over the data, naming no file or line (the reviewer's finding)
    ('SET_A\tdesc\tTP53\nSet "one"\tdesc\tEGFR\n', r":2: gene set name 'Set \"one\"' contains a double quote.*rename"),
    # tl.describe joins a cell's pathways with "; ": read back as two pathways
    ("SET_A\tdesc\tTP53\nGlycolysis; TCA\tdesc\tEGFR\n", r":2: gene set name 'Glycolysis; TCA' contains '; ', which "
                                                    r"joins a cell's pathways in AnnData obs; rename"),
])
def test_read_gmt_rejects_malformed(tmp_path, text, message):
    path = tmp_path / "bad.gmt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_gmt(path)


@pytest.mark.parametrize("name", ["library.gmt", "library.gmt.gz"])
def test_read_gmt_refuses_a_file_that_is_no_text_naming_it(tmp_path, name):
    """`build_corpus --gmt` given a binary file ended in codecs' traceback ("'utf-8' codec can't decode byte 0xff"),
    which named neither the file nor --gmt."""
    from modeling_cell2text.argument_types import raised_by_this_project

    path = tmp_path / name
    content = b"SET_A\tdesc\tTP53\n\xff\xfe binary"
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    with pytest.raises(ValueError, match=rf"^{path} is no GMT text file .*--gmt none") as refused:
        read_gmt(path)
    assert raised_by_this_project(refused.value)  # a command ends it in one line


@pytest.mark.parametrize("case", ["plain text", "truncated", "corrupt"])
def test_read_gmt_refuses_a_gz_file_that_is_no_intact_gzip_naming_it(tmp_path, case):
    """`--gmt x.gmt.gz` not gzipped ended in one line naming no file ("Not a gzipped file (b'SE')"), a truncated one
    in an EOFError traceback, a corrupt one in gzip's or zlib's words only."""
    from modeling_cell2text.argument_types import raised_by_this_project

    text = b"SET_A\tdesc\tTP53\tCD19\n" * 50
    packed = bytearray(gzip.compress(text))
    packed[len(packed) // 2] ^= 0xFF
    path = tmp_path / "library.gmt.gz"
    path.write_bytes({"plain text": text, "truncated": gzip.compress(text)[:30], "corrupt": bytes(packed)}[case])
    with pytest.raises(ValueError, match=rf"^{path} is no GMT text file \(UTF-8, or gzipped as .gz\): .*--gmt none") \
            as refused:
        read_gmt(path)
    assert raised_by_this_project(refused.value)


def test_wikipathways_library_ships():
    gene_sets = read_gmt(WIKIPATHWAYS_GMT)
    assert len(gene_sets) == 801
    assert gene_sets["Glutathione Metabolism WP100"][:3] == ["GPX1", "GGT5", "IDH1"]
    assert "CD19" in gene_sets["B Cell Receptor Signaling Pathway WP23"]


def test_b_cells_score_highest_for_b_cell_receptor_signaling():
    scanpy = pytest.importorskip("scanpy")
    adata = scanpy.datasets.pbmc68k_reduced()
    gene_sets = read_gmt(WIKIPATHWAYS_GMT)
    scores = aucell(adata.raw.X, list(adata.raw.var_names), gene_sets, min_genes=5)
    column = list(gene_sets).index("B Cell Receptor Signaling Pathway WP23")
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    means = {label: scores[labels == label, column].mean() for label in set(labels)}
    b_cells = means.pop("CD19+ B")
    assert b_cells > 3 * max(means.values())


# ------------------------------------------------------------- ctxcore's AUC and the normalisation (issue 12)


def ctxcore_auc(x, positions, auc_threshold=0.05):
    """ctxcore.recovery: rank_cutoff = round(threshold * n_genes) - 1; the area of the set's recovery curve
    (weights 1) up to rank_cutoff, over maxauc = (rank_cutoff + 1) * n (ctxcore's aucs / weighted_auc1d)."""
    rank_cutoff = int(round(auc_threshold * len(x))) - 1
    ranking = np.empty(len(x), dtype=int)
    ranking[np.argsort(-x, kind="stable")] = np.arange(len(x))
    ranks = ranking[positions]
    hits = np.sort(ranks[ranks < rank_cutoff])
    steps = np.concatenate([hits, [rank_cutoff]])
    area = np.sum(np.diff(steps) * np.cumsum(np.ones(len(hits))))
    return area / ((rank_cutoff + 1) * len(positions)), area


def r_aucell_max_auc(n_set_genes, auc_max_rank):
    """R AUCell's .AUC.geneSet_norm / decoupler: x_th = 1..n (1-based ranks) below aucMaxRank,
    maxAUC = sum(diff(c(x_th, aucMaxRank)) * seq_along(x_th))."""
    x_th = np.arange(1, n_set_genes + 1)
    x_th = x_th[x_th < auc_max_rank]
    return np.sum(np.diff(np.concatenate([x_th, [auc_max_rank]])) * np.arange(1, len(x_th) + 1))


def test_aucell_equals_ctxcore_formula_and_normalisation_equals_r_aucell():
    rng = np.random.default_rng(3)
    n_genes = 400
    genes = [f"G{i}" for i in range(n_genes)]
    dense = rng.permutation(np.arange(1, n_genes + 1))[None, :].repeat(6, axis=0).astype(np.float64)
    for row in dense:
        rng.shuffle(row)  # distinct values: no ties, as ctxcore assumes after its random tie breaking
    gene_sets = {f"s{j}": [genes[k] for k in rng.choice(n_genes, size, replace=False)]
                 for j, size in enumerate([1, 3, 10, 19, 20, 60, 200])}
    raw = aucell(dense, genes, gene_sets)
    normalized = aucell(dense, genes, gene_sets, normalize=True)
    max_rank = default_max_rank(n_genes)  # 20 = ctxcore's rank_cutoff + 1 = R's aucMaxRank
    for i, x in enumerate(dense):
        for j, members in enumerate(gene_sets.values()):
            positions = np.array([genes.index(g) for g in members])
            expected, area = ctxcore_auc(x, positions)
            assert raw[i, j] == pytest.approx(expected, rel=1e-6, abs=1e-7)
            best = r_aucell_max_auc(len(positions), max_rank)
            assert max_auc(np.array([len(positions)]), max_rank)[0] == best
            assert normalized[i, j] == pytest.approx(area / best, rel=1e-6, abs=1e-7)


def test_normalised_ranking_stops_favouring_small_sets():
    """Raw AUC ranks a 2-gene set half-way up over a 30-gene set with a third of its genes on top; per best
    possible AUC the large set wins. A set entirely on the top ranks scores 1 whatever its size."""
    n_genes = 400
    genes = [f"G{i}" for i in range(n_genes)]
    x = np.zeros((1, n_genes))
    x[0, :50] = np.arange(50, 0, -1)  # G0 highest ... G49, then zeros
    gene_sets = {"large": genes[:10] + genes[300:320], "small": genes[10:12], "top5": genes[:5], "top19": genes[:19]}
    raw = aucell(x, genes, gene_sets, max_rank=20)[0]
    normalized = aucell(x, genes, gene_sets, max_rank=20, normalize=True)[0]
    assert raw[1] > raw[0] and normalized[0] > normalized[1]
    assert normalized[2] == pytest.approx(1.0) and normalized[3] == pytest.approx(1.0) and raw[2] > raw[3]
    assert top_pathways(normalized[None, :2], ["large", "small"], k=1) == [["large"]]


def test_default_library_is_go_biological_process_15_to_500_genes():
    assert DEFAULT_GMT == GO_BIOLOGICAL_PROCESS_GMT and DEFAULT_SET_SIZES == (15, 500)
    library = read_gmt(DEFAULT_GMT)
    kept = filter_set_sizes(library, *DEFAULT_SET_SIZES)
    assert len(library) == 5407 and len(kept) == 2720
    assert all(15 <= len(g) <= 500 for g in kept.values())
    assert "CD19" in kept["B Cell Receptor Signaling Pathway (GO:0050853)"]
    with pytest.raises(ValueError, match="widen the bounds"):
        filter_set_sizes(library, 5000, 6000)


def test_display_names_drop_term_ids_but_stay_unique():
    names = ["Macrophage Activation (GO:0042116)", "Hedgehog Signaling Pathway WP47",
             "Hedgehog Signaling Pathway WP4249", "Glutathione Metabolism WP100", "Plain"]
    assert display_names(names) == ["Macrophage Activation", "Hedgehog Signaling Pathway WP47",
                                    "Hedgehog Signaling Pathway WP4249", "Glutathione Metabolism", "Plain"]
    for path in (GO_BIOLOGICAL_PROCESS_GMT, WIKIPATHWAYS_GMT):
        shown = display_names(list(read_gmt(path)))
        assert len(set(shown)) == len(shown)


# -- reviewer's findings (stop 41) ----------------------------------------------------------------------------------


def test_a_set_the_cell_does_not_express_is_not_named_in_a_shallow_cell():
    """A cell expressing fewer genes than max_rank: its zero block reaches the top ranks, so an unexpressed set
    scored above 0 from its tie credit (the larger the set, the more, normalised) and was named second."""
    genes = [f"G{i}" for i in range(1000)]
    cell = np.zeros((1, 1000))
    cell[0, :10] = np.arange(10, 0, -1)
    sets = {"expressed": genes[5:7] + genes[500:503], "unexpressed_big": genes[600:700],
            "unexpressed_small": genes[700:715]}
    reference = aucell(cell, genes, sets, max_rank=50, normalize=True, min_genes=5)
    assert (reference > 0).all()  # AUCell itself: the expected credit under random tie breaking
    named = aucell(cell, genes, sets, max_rank=50, normalize=True, min_genes=5, expressed_sets_only=True)
    assert named[0, 0] == reference[0, 0] and (named[0, 1:] == 0).all()
    assert top_pathways(named, list(sets)) == [["expressed"]]
    deep = np.arange(1000, 0, -1.0)[None, :]  # every gene expressed: nothing changes
    assert np.array_equal(aucell(deep, genes, sets, max_rank=50, expressed_sets_only=True),
                          aucell(deep, genes, sets, max_rank=50))


def test_library_genes_written_in_another_case_are_found():
    """Enrichr's libraries write open reading frames upper-case ("C9ORF78"), GENCODE and CELLxGENE "C9orf78": the
    gene was silently left out of every set holding it."""
    genes = ["C9orf78", "CD3E", "MS4A1"]
    matrix, sizes = membership_matrix(genes, {"orf": ["C9ORF78", "CD3E"], "exact": ["CD3E", "MS4A1"]})
    assert sizes.tolist() == [2, 2] and matrix[0, 0] == 1


def test_a_cells_scores_do_not_depend_on_the_other_cells_in_its_chunk():
    """The sort key row * span - value compared a cell's values at the scale of the chunk's largest value and row
    count: two genes 1e-8 apart tied after 1,000 cells holding 1e6."""
    genes = [f"G{i}" for i in range(20)]
    cell = np.zeros((1, 20))
    cell[0, 10], cell[0, 11] = 1 + 1e-8, 1.0
    sets = {"ten": [genes[10]], "eleven": [genes[11]]}
    alone = aucell(cell, genes, sets, max_rank=2)
    others = np.zeros((1000, 20))
    others[:, 0] = 1e6
    together = aucell(np.vstack([others, cell]), genes, sets, max_rank=2, chunk_size=1024)
    assert alone[0].tolist() == together[-1].tolist() and alone[0, 0] > alone[0, 1]


@pytest.mark.parametrize("data_names, library_names", [
    (["IGJ", "TP53", "CD19"], ["JCHAIN", "TP53", "MYC"]),  # older data (pbmc68k_reduced), a newer library
    (["JCHAIN", "TP53", "CD19"], ["IGJ", "TP53", "MYC"]),  # newer data, an older library
    (["ENSG00000132465", "ENSG00000141510", "ENSG00000177455"], ["JCHAIN", "TP53", "MYC"]),  # Ensembl IDs only
])
def test_a_renamed_gene_counts_in_its_sets_whichever_symbol_data_and_library_use(data_names, library_names):
    """Data and library written years apart name a renamed gene differently; matched as written, IGJ counted in no
    set of GO 2023 (which has JCHAIN), so a plasma cell's top pathways left out its strongest gene."""
    gene_ids, symbols = resolve_genes(pd.DataFrame(index=data_names))
    gene_sets = {"immunoglobulin": library_names, "other": ["MYC", "TP53"]}
    in_data = sets_in_data_symbols(gene_sets, gene_ids, symbols)
    assert in_data == {"immunoglobulin": [symbols[0], "TP53", "MYC"], "other": ["MYC", "TP53"]}
    counts = np.array([[50.0, 1.0, 2.0], [0.0, 3.0, 1.0]], dtype=np.float32)
    as_current = aucell(counts, ["JCHAIN", "TP53", "CD19"], {"immunoglobulin": ["JCHAIN", "TP53", "MYC"],
                                                             "other": ["MYC", "TP53"]}, max_rank=2)
    np.testing.assert_array_equal(aucell(counts, symbols, in_data, max_rank=2), as_current)


def test_library_genes_keep_their_spelling_where_no_column_holds_their_gene():
    """Unknown symbols, genes the data lacks, and data columns without an Ensembl ID are left as written, for
    membership_matrix's matching by spelling (any case); one gene named twice in a set is kept once."""
    gene_sets = {"s": ["C9ORF78", "NOT_A_GENE", "TP53", "P53_OLD", "TP53"]}
    assert sets_in_data_symbols(gene_sets, [None, "ENSG00000141510"], ["C9orf78", "TP53"]) == {
        "s": ["C9ORF78", "NOT_A_GENE", "TP53", "P53_OLD"]}


def test_a_library_gene_counts_at_its_own_column_where_two_genes_share_a_name():
    """Data naming two genes alike: GENCODE's two MALL genes (CELLxGENE's feature_name), or names missing in var
    read "nan". GO's gene, matched by Ensembl ID to the second column, was written as the shared name and counted at
    the first column, another gene (exit 0); each column now has its own name, and the gene counts at its column."""
    mall = pd.DataFrame({"feature_name": ["MALL", "TP53", "MALL"]},
                        index=["ENSG00000282304", "ENSG00000141510", "ENSG00000144063"])  # non-coding, TP53, coding
    gene_ids, symbols = resolve_genes(mall)
    names = unique_gene_names(symbols)
    assert names == ["MALL", "TP53", "MALL (column 2)"]
    in_data = sets_in_data_symbols({"s": ["MALL", "TP53"]}, gene_ids, names)
    assert in_data == {"s": ["MALL (column 2)", "TP53"]}
    assert membership_matrix(names, in_data)[0].toarray().ravel().tolist() == [0, 1, 1]
    gene_ids = ["ENSG00000230368", "ENSG00000141510", "ENSG00000132465"]  # FAM41C, TP53, JCHAIN
    names = unique_gene_names(["nan", "TP53", "nan"])
    in_data = sets_in_data_symbols({"s": ["JCHAIN", "TP53"]}, gene_ids, names)
    assert membership_matrix(names, in_data)[0].toarray().ravel().tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match=r"names holds a name twice.*unique_gene_names\(symbols\)"):
        sets_in_data_symbols({"s": ["JCHAIN"]}, gene_ids, ["nan", "TP53", "nan"])


def test_unique_gene_names_are_unique_where_the_file_already_gives_a_name_with_a_column():
    """A file naming a column "MALL (column 2)" beside two MALL columns: the second MALL was named "MALL (column 2)"
    too, and the builder's sets_in_data_symbols then refused the names with a fix no user can apply."""
    gene_ids = ["ENSG00000282304", "ENSG00000141510", "ENSG00000144063"]  # non-coding MALL, TP53, coding MALL
    names = unique_gene_names(["MALL", "MALL (column 2)", "MALL"])
    assert names == ["MALL", "MALL (column 2)", "MALL (column 2) (column 2)"]
    in_data = sets_in_data_symbols({"s": ["MALL"]}, gene_ids, names)
    assert membership_matrix(names, in_data)[0].toarray().ravel().tolist() == [0, 0, 1]


def test_a_name_missing_beside_an_ensembl_id_is_the_tables_symbol_and_counts_in_its_sets():
    """Ensembl IDs with a feature_name-like column that misses some names: they were read as "nan", so those genes
    counted in none of their sets (or, matched by ID, as another "nan" column); the table names them."""
    var = pd.DataFrame({"gene_name": pd.Categorical([np.nan, "TP53", np.nan])},
                       index=["ENSG00000230368", "ENSG00000141510", "ENSG00000132465"])
    gene_ids, symbols = resolve_genes(var)
    assert symbols == ["FAM41C", "TP53", "JCHAIN"]
    in_data = sets_in_data_symbols({"s": ["JCHAIN", "TP53"]}, gene_ids, symbols)
    assert membership_matrix(symbols, in_data)[0].toarray().ravel().tolist() == [0, 1, 1]


def test_a_library_gene_two_columns_hold_is_written_as_the_first_columns_symbol():
    """Two columns of one gene under two names (two versions of its Ensembl ID, named by two releases): GO's JCHAIN
    is written as the first column's name, the column membership_matrix finds for it, as sets_in_data_symbols
    documents."""
    gene_ids = ["ENSG00000132465", "ENSG00000141510", "ENSG00000132465"]
    in_data = sets_in_data_symbols({"s": ["JCHAIN", "TP53"]}, gene_ids, ["IGJ", "TP53", "JCHAIN"])
    assert in_data == {"s": ["IGJ", "TP53"]}


def test_the_files_own_gene_names_beside_ensembl_ids_are_the_symbols_an_empty_one_the_tables():
    """With Ensembl IDs, a feature_name-like column names the genes for gene-set scoring: a gene the packaged table
    lacks keeps its sets by the file's name; an empty or blank name is a missing one, as NaN is (kept as "", the gene
    counted in none of its sets)."""
    var = pd.DataFrame({"gene_name": ["TP53", "MYGENE", "", " "]},
                       index=["ENSG00000141510", "ENSG00000999999", "ENSG00000132465", "ENSG00000198851"])
    gene_ids, symbols = resolve_genes(var)
    assert gene_ids == list(var.index) and symbols == ["TP53", "MYGENE", "JCHAIN", "CD3E"]
