"""Gene medians: exact accumulator vs numpy, histogram within its stated bound, shard merging."""

import json
import struct
import zipfile

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from processing.gene_medians import ExactGeneMedians, HistogramGeneMedians, merge_histogram_files, normalize_total


def _random_entries(seed: int, n_genes: int = 40, n: int = 5000):
    rng = np.random.default_rng(seed)
    genes = rng.integers(0, n_genes - 1, n)  # the last gene is never seen
    values = rng.lognormal(mean=0.0, sigma=2.0, size=n) * rng.choice([1e-3, 1.0, 1e3], size=n)
    return genes, values


def _numpy_medians(genes, values, n_genes):
    return np.array([np.median(values[genes == g]) if (genes == g).any() else np.nan for g in range(n_genes)])


def test_exact_medians_match_numpy_over_chunks():
    genes, values = _random_entries(0)
    acc = ExactGeneMedians(40)
    for part in np.array_split(np.arange(len(genes)), 7):
        acc.update(genes[part], values[part])
    acc.update(np.array([0, 1]), np.array([0.0, -1.0]))  # zeros and negatives are not expression
    np.testing.assert_allclose(acc.medians(), _numpy_medians(genes, values, 40), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bins_per_decade", [10, 100])
def test_histogram_medians_within_stated_bound(bins_per_decade):
    genes, values = _random_entries(1)
    acc = HistogramGeneMedians(40, bins_per_decade=bins_per_decade)
    acc.update(genes, values)
    exact = _numpy_medians(genes, values, 40)
    estimate = acc.medians()
    assert np.isnan(estimate[-1]) and np.isnan(exact[-1])
    error = np.abs(estimate[:-1] / exact[:-1] - 1)
    assert acc.relative_error_bound == pytest.approx(10 ** (1 / (2 * bins_per_decade)) - 1)
    assert error.max() <= acc.relative_error_bound + 1e-12
    assert error.max() > acc.relative_error_bound / 20  # the bound is not vacuous


def test_histogram_shards_merge_to_the_full_histogram(tmp_path):
    genes, values = _random_entries(2)
    full = HistogramGeneMedians(40)
    full.update(genes, values)
    ids = [f"ENSG{i:011d}" for i in range(40)]
    for k, part in enumerate(np.array_split(np.arange(len(genes)), 2)):
        shard = HistogramGeneMedians(40)
        shard.update(genes[part], values[part])
        # shards may hold different gene orders; merging aligns them by ID
        order = np.arange(40)[::-1] if k else np.arange(40)
        permuted = HistogramGeneMedians(40)
        permuted.counts[:] = shard.counts[order]
        permuted.save(tmp_path / f"s{k}.npz", [ids[i] for i in order], "cells.h5ad", (k, 2))
    merged = merge_histogram_files([tmp_path / "s0.npz", tmp_path / "s1.npz"])
    expected = full.medians()
    assert merged == {ids[g]: float(expected[g]) for g in range(39)}


def test_histograms_that_do_not_add_up_to_whole_inputs_are_refused(tmp_path):
    # a shard given twice, or one left out, merged without a word: 336 of pbmc68k's 700 medians moved
    genes, values = _random_entries(2)
    ids = [f"ENSG{i:011d}" for i in range(40)]
    for k, part in enumerate(np.array_split(np.arange(len(genes)), 3)):
        shard = HistogramGeneMedians(40)
        shard.update(genes[part], values[part])
        shard.save(tmp_path / f"s{k}.npz", ids, "cells.h5ad", (k, 3))
    shards = [tmp_path / f"s{k}.npz" for k in range(3)]
    with pytest.raises(ValueError, match=r"s0.npz and .*s0.npz hold the same histogram"):
        merge_histogram_files([*shards, shards[0]])
    with pytest.raises(ValueError, match=r"of 'cells.h5ad' lack its shards 2/3: give every shard"):
        merge_histogram_files(shards[:2])
    copy = HistogramGeneMedians.load(shards[0])[0]
    copy.counts[0, 0] += 1  # another build of the same shard
    copy.save(tmp_path / "again.npz", ids, "cells.h5ad", (0, 3))
    with pytest.raises(ValueError, match=r"both count shard 0/3 of the same input \('cells.h5ad': the same cells and genes\)"):
        merge_histogram_files([*shards, tmp_path / "again.npz"])
    copy.save(tmp_path / "other.npz", ids, "cells.h5ad", (1, 2))
    with pytest.raises(ValueError, match=r"shards of different splits"):
        merge_histogram_files([*shards, tmp_path / "other.npz"])
    copy.save(tmp_path / "other.npz", ids, "other.h5ad")  # another input, whole: joined
    assert merge_histogram_files([*shards, tmp_path / "other.npz"])


def test_inputs_are_told_apart_by_their_cells_not_their_names(tmp_path):
    # the second reader's finding: two datasets each in a file named cells.h5ad were refused as one shard given twice
    # (and the Census, named by release, under two obs filters), while shards 0/2 of one and 1/2 of the other passed
    genes, values = _random_entries(2)
    ids = [f"ENSG{i:011d}" for i in range(40)]
    for k, (cells, shard) in enumerate((("a", (0, 1)), ("b", (0, 1)), ("a", (0, 2)), ("b", (1, 2)))):
        histogram = HistogramGeneMedians(40)
        histogram.update(genes[k::4], values[k::4])
        histogram.save(tmp_path / f"h{k}.npz", ids, "cells.h5ad", shard, input_sha256=cells * 64)
    assert merge_histogram_files([tmp_path / "h0.npz", tmp_path / "h1.npz"])  # two whole inputs
    # shards of one input built by two versions of the builder (one reading obs suspension_type) are two inputs:
    # the message said to give shard 1/2, which was given
    with pytest.raises(ValueError, match=r"lack its shards 1/2; those given \(\S*h3.npz\) are of an input of that "
                                         r"name read as other cells or genes: shards built by different versions"):
        merge_histogram_files([tmp_path / "h2.npz", tmp_path / "h3.npz"])
    histogram = HistogramGeneMedians(40)
    histogram.save(tmp_path / "old.npz", ids, "cells.h5ad", (1, 2))  # an earlier version's: no checksum
    with pytest.raises(ValueError, match=r"\['cells.h5ad'\] were written by two versions"):
        merge_histogram_files([tmp_path / "h2.npz", tmp_path / "old.npz"])


def test_sources_of_alike_names_or_cell_ids_are_told_apart(tmp_path):
    # the second reader's findings: AnnData built from arrays numbers its cells 0, 1, ...: two datasets of one size
    # had one checksum (shards of both merged as one input's)
    import anndata as ad

    from processing.sources import AnnDataSource

    counts = sp.random(20, 30, density=0.3, format="csr", random_state=0)
    genes = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(30)])
    one, other = (AnnDataSource(ad.AnnData(counts * k, obs=pd.DataFrame(index=[str(i) for i in range(20)]),
                                           var=genes), name="cells.h5ad") for k in (1, 2))
    assert one.input_sha256 != other.input_sha256  # one name, one obs, other counts
    again = AnnDataSource(ad.AnnData(counts, obs=pd.DataFrame(index=[str(i) for i in range(20)]), var=genes),
                          name="x.h5ad")
    again.select_shard(1, 2)
    assert again.input_sha256 == one.input_sha256  # the same cells under another name, whatever shard is kept


def test_normalize_total_scales_cells_to_10k_and_undoes_log1p():
    counts = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 4.0]]))
    normalized, totals = normalize_total(counts, "counts")
    np.testing.assert_allclose(totals, [4, 0, 8])
    np.testing.assert_allclose(normalized.toarray(), [[2500, 7500, 0], [0, 0, 0], [2500, 2500, 5000]])
    logged = counts.copy()
    logged.data = np.log1p(logged.data)
    np.testing.assert_allclose(normalize_total(logged, "log1p")[0].toarray(), normalized.toarray())


def test_the_merge_cli_never_replaces_an_output_unasked(tmp_path, capsys):
    """The reviewer's finding: `python -m processing.gene_medians ... --out fe` replaced a merged extractor there,
    and scattered its files into a corpus folder, exit 0."""
    from processing.gene_medians import main

    genes, values = _random_entries(3)
    histogram = HistogramGeneMedians(40)
    histogram.update(genes, values)
    histogram.save(tmp_path / "s0.npz", [f"ENSG{i:011d}" for i in range(40)])
    out = tmp_path / "fe"
    main([str(tmp_path / "s0.npz"), "--out", str(out)])
    saved = (out / "preprocessor_config.json").read_bytes()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "s0.npz"), "--out", str(out), "--model-input-size", "8"])
    assert "--overwrite" in capsys.readouterr().err and (out / "preprocessor_config.json").read_bytes() == saved
    main([str(tmp_path / "s0.npz"), "--out", str(out), "--model-input-size", "8", "--overwrite",
          "--expression-bins", "4"])  # for a sharded value-aware corpus (the reviewer's finding: no way to make one)
    assert (out / "preprocessor_config.json").read_bytes() != saved
    from modeling_cell2text import Cell2TextFeatureExtractor

    assert Cell2TextFeatureExtractor.from_pretrained(out).num_expression_bins == 4
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "summary.json").write_text("{}")
    for flags in ([], ["--overwrite"]):  # a folder of something else is never replaced
        with pytest.raises((SystemExit, FileExistsError)):
            main([str(tmp_path / "s0.npz"), "--out", str(corpus), *flags])
    assert sorted(p.name for p in corpus.iterdir()) == ["summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "fe", "s0.npz"]  # no staging folder left


def _edited_histogram(source, target, **arrays) -> None:
    """A copy of the histogram file `source` at `target` with `arrays` replaced."""
    with np.load(source) as data:
        np.savez(target, **{**dict(data), **arrays})


def _corrupt_member(source, target, member: str) -> None:
    """A copy of the histogram file `source` at `target` whose `member`'s compressed data starts with a reserved
    deflate block type, so that reading it raises zlib.error (the zip's directory still reads)."""
    with zipfile.ZipFile(source) as archive:
        offset = archive.getinfo(member).header_offset
    data = bytearray(source.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[offset + 26: offset + 30])
    start = offset + 30 + name_length + extra_length
    data[start: start + 4] = b"\xff" * 4
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("name, problem", [
    ("summary.json", ""), ("medians.npy", ""), ("other.npz", r" \(no counts array\)"),
    # these ended in a BadZipFile or EOFError traceback, or in numpy's words naming no file, or were merged
    ("truncated.npz", ""), ("empty.npz", ""),
    ("narrow.npz", r" \(counts of shape \(40, 5\) for \(40,\) gene ids and 1100 bins\)"),
    ("binning.npz", r" \(binning of shape \(1,\), not 3 numbers\)"),
    ("shard.npz", r" \(a shard of shape \(1,\), not \(index, count\)\)"),
    ("negative.npz", r" \(counts that are no non-negative integers\)"),  # merged: medians of negative counts
    ("kept_by.npz", r" \(kept_by '\[1\]', not the rejection rules as a JSON object\)"),  # a traceback in the merge
    # gene ids of another shape, and a member whose data does not inflate (zlib's error, a traceback)
    ("genes2d.npz", r" \(counts of shape \(40, 1100\) for \(40, 1\) gene ids and 1100 bins\)"),
    ("inflate.npz", r" \(it does not read \(Error -3 while decompressing data: invalid block type\)\)"),
])
def test_the_merge_cli_refuses_a_file_that_is_no_histogram_in_one_line(tmp_path, name, problem):
    """A file other than a shard's median_histogram.npz ended in numpy's traceback ("Cannot load file containing
    pickled data"), an AttributeError or a KeyError."""
    from processing.gene_medians import main

    histogram = HistogramGeneMedians(40)
    histogram.update(*_random_entries(3))
    genes = [f"ENSG{i:011d}" for i in range(40)]
    histogram.save(tmp_path / "s0.npz", genes)
    given, first = tmp_path / name, tmp_path / "s0.npz"
    {"summary.json": lambda: given.write_text("{}"), "medians.npy": lambda: np.save(given, np.ones(3)),
     "other.npz": lambda: np.savez(given, values=np.ones(3)),
     "truncated.npz": lambda: given.write_bytes(first.read_bytes()[:200]), "empty.npz": lambda: given.write_bytes(b""),
     "narrow.npz": lambda: _edited_histogram(first, given, counts=histogram.counts[:, :5]),
     "binning.npz": lambda: _edited_histogram(first, given, binning=np.ones(1)),
     "shard.npz": lambda: _edited_histogram(first, given, shard=np.ones(1, dtype=np.int64)),
     "negative.npz": lambda: _edited_histogram(first, given, counts=-1 - histogram.counts),
     "kept_by.npz": lambda: _edited_histogram(first, given, kept_by=np.asarray("[1]")),
     "genes2d.npz": lambda: _edited_histogram(first, given, gene_ids=np.array(genes)[:, None]),
     "inflate.npz": lambda: _corrupt_member(first, given, "counts.npy")}[name]()
    with pytest.raises(SystemExit, match=rf"^gene_medians: error: {given} is no gene-median histogram{problem}: give "
                                         "the median_histogram.npz"):
        main([str(tmp_path / "s0.npz"), str(given), "--out", str(tmp_path / "fe")])
    assert not (tmp_path / "fe").exists()


def test_histogram_inputs_name_each_input_once_by_its_checksum(tmp_path):
    """What the merged feature extractor records of its medians' cells (for the join): each input once, named as a
    card names it (never a machine path), with the rules that chose its cells; nothing where a histogram records
    no checksum or rules (the join then warns)."""
    from processing.gene_medians import histogram_inputs

    histogram = HistogramGeneMedians(3)
    histogram.update(np.array([0, 1]), np.array([1.0, 2.0]))
    genes = ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"]
    rules = {"required_fields": ["cell_type"], "keep_non_primary": False}
    for i in range(2):
        histogram.save(tmp_path / f"s{i}.npz", genes, "/data/cells.h5ad", (i, 2), "abc", rules)
    histogram.save(tmp_path / "old.npz", genes, "/data/other.h5ad", (0, 1), "def")  # no rules: an earlier version's
    assert histogram_inputs([tmp_path / "s0.npz", tmp_path / "s1.npz"]) == [
        {"input_sha256": "abc", "source": "cells.h5ad", **rules}]
    assert histogram_inputs([tmp_path / "s0.npz", tmp_path / "s1.npz", tmp_path / "old.npz"]) is None


def test_median_inputs_record_names_shared_rules_once_and_reads_back(tmp_path):
    """A Census-wide merge of 500 inputs repeated the same rules for each in the shipped preprocessor_config.json
    (329 KB): they are written once, and the record (and an earlier version's list of entries) reads back as entries."""
    from processing.build_corpus import BuildOptions, _median_cells
    from processing.gene_medians import median_inputs_record, read_median_inputs

    class Source:
        input_values = "counts"

    rules = _median_cells(BuildOptions(), Source())
    entries = [{"input_sha256": f"{i:064x}", "source": f"dataset {i}", **rules} for i in range(500)]
    entries[7] = {**entries[7], "input_values": "log1p"}  # a rule one input does not share stays with it
    record = median_inputs_record(entries)
    assert record["rules"] == {key: value for key, value in rules.items() if key != "input_values"}
    assert record["inputs"][7] == {"input_sha256": f"{7:064x}", "source": "dataset 7", "input_values": "log1p"}
    assert read_median_inputs(record, "fe") == entries
    assert read_median_inputs(entries, "fe") == entries  # an earlier version's record
    assert read_median_inputs(None, "fe") is None
    before, after = (len(json.dumps({"median_inputs": form}, indent=2)) for form in (entries, record))
    assert after < before / 3, (before, after)  # the rules repeated were most of it
