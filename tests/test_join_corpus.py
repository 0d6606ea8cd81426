"""`python -m processing.join_corpus`: shards built apart join into the corpus one build of their cells gives, and
shards that would not make one corpus are refused before anything is written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pytest

from modeling_cell2text.feature_extraction_cell2text import Cell2TextFeatureExtractor
from processing.build_corpus import BuildOptions, build_corpus
from processing.gene_medians import read_median_inputs
from processing.join_corpus import Shard, check_donor_splits, join_corpus, join_label_tables, main
from processing.pathways import PATHWAY_GENE_MATCHING
from processing.presets import pbmc68k_reduced

SHARD_ONLY = ("fingerprints", "joined_from")  # what a join records otherwise than one build


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """pbmc68k_reduced built whole and as 2 shards, all with one feature extractor and hashed splits."""
    root = tmp_path_factory.mktemp("join")
    build_corpus(pbmc68k_reduced(), root / "first", BuildOptions(progress=False, gmt=None))
    extractor = Cell2TextFeatureExtractor.from_pretrained(str(root / "first" / "feature_extractor"))
    options = BuildOptions(progress=False, feature_extractor=extractor, hashed_splits=True, seed=3)
    build_corpus(pbmc68k_reduced(), root / "whole", options)
    for index in range(2):
        source = pbmc68k_reduced()
        source.select_shard(index, 2)
        build_corpus(source, root / f"shard{index}", options)  # records its shard, as --shard does
    return {"root": root, "whole": root / "whole", "shards": [root / "shard0", root / "shard1"]}


def test_joined_shards_are_the_corpus_of_one_build(built, tmp_path):
    summary = join_corpus(built["shards"], tmp_path / "joined")
    joined, whole = (datasets.load_from_disk(str(path)) for path in (tmp_path / "joined", built["whole"]))
    for split in ("train", "validation", "test"):  # shards are contiguous row ranges: the same rows in the same order
        assert joined[split].to_list() == whole[split].to_list()
        assert len(joined[split]) > 0
    expected = json.loads((built["whole"] / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k not in SHARD_ONLY} == {
        k: v for k, v in expected.items() if k not in SHARD_ONLY}
    assert summary["top_pathways_by_cell_type"] and summary["input_sha256"] == expected["input_sha256"]
    assert json.loads((tmp_path / "joined" / "summary.json").read_text()) == summary
    assert [entry["shard"] for entry in summary["joined_from"]] == ["0/2", "1/2"]
    assert (tmp_path / "joined" / "feature_extractor" / "preprocessor_config.json").read_text() == (
        built["whole"] / "feature_extractor" / "preprocessor_config.json").read_text()
    assert (tmp_path / "joined" / "README.md").is_file()
    assert len(pd.read_csv(tmp_path / "joined" / "rejects.csv")) == len(pd.read_csv(built["whole"] / "rejects.csv"))


def test_a_join_is_fingerprinted_by_its_shards_in_order(built, tmp_path):
    forward = join_corpus(built["shards"], tmp_path / "a")["fingerprints"]
    backward = join_corpus(built["shards"][::-1], tmp_path / "b")["fingerprints"]
    assert forward != backward  # other row order: another build for the leak check and the resume record
    assert forward == join_corpus(built["shards"], tmp_path / "c")["fingerprints"]


def edited(shard: Path, to: Path, file: str, edit) -> Path:
    """A copy of `shard` with its JSON `file` edited in place by `edit`, or removed (a folder too) where `edit` is
    None."""
    shutil.copytree(shard, to)
    path = to / file
    if edit is None:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return to
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    return to


def replaced(shard: Path, to: Path, file: str, content: bytes) -> Path:
    """A copy of `shard` whose `file` holds `content`."""
    shutil.copytree(shard, to)
    (to / file).write_bytes(content)
    return to


def cut_short(arrow_file: Path) -> bytes:
    """The Arrow stream file as a copy cut at a record-batch boundary leaves it: its first rows, read without an
    error."""
    with pa.memory_map(str(arrow_file)) as source:
        table = pa.ipc.open_stream(source).read_all()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.slice(0, table.num_rows // 2))
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("case, message", [
    ("twice", "hold the same cells"),
    ("missing", "corpus shards of .scanpy.datasets.pbmc68k_reduced. lack its shards 1/2: give every shard"),
    ("extractor", r"different feature extractors \(they differ in \['gene_medians'\]\).*--feature-extractor fe/"),
    ("library", "was built with pathway_library 'other.gmt'"),
    ("pathway genes matched as written",
     f"was built with pathway_gene_matching None and .* with {re.escape(repr(PATHWAY_GENE_MATCHING))}"),
    # BuildOptions(n_pathways=3): its descriptions name three pathways, the other shard's two
    ("pathways per cell", "was built with pathways_per_cell 3 and .* with 2"),
    # a shard built before a whole float was read as the integer: its donor "7.0" was hashed into another split
    # than the other shard's donor "7", and the join's donor check saw two donors
    ("obs values read as before", "was built with obs_cleaning None and .*: .*s records no obs_cleaning, so an "
                                  "earlier version of build_corpus built it: rebuild it with this version"),
    # a shard built before a donor's joined disease ids were read as their terms: "a healthy donor" for COVID-19
    ("obs labels read as before", r"was built with obs_cleaning .*a whole float as the integer. and .* with .*joined "
                                  r"disease ids read as their terms.*rebuild the shards with the same settings"),
    ("label", "label 'CD14-positive monocyte' names CL:0001054 in one shard and CL:0000576"),
    ("fold", "is a cross-validation fold build"),
    ("rules", "was built with keep_non_primary True"),  # one shard kept cells the other rejected
    ("not a corpus", "is not a corpus folder"),
    ("no rejects", "has no rejects.csv, which every build writes"),
    # a copy cut short: datasets' FileNotFoundError named a file, not the fix
    ("a split folder missing", r"s's splits do not load \(.*test/.*\): the folder is incomplete.*build the shard "
                               "again"),
    ("a split's rows missing", r"s's splits do not load \(.*data-00000-of-00001.arrow.*\): the folder is incomplete"),
    ("a split not listed", "s has no test split, which every build writes"),
    # a copy cut at a batch boundary loaded, with fewer rows: the join lost cells, exit 0
    ("a split's rows cut short", r"s's splits hold other numbers of cells than its summary.json records \(train: "
                                 r"\d+ rows, \d+ recorded\): a copy cut short"),
    ("summary not JSON",
     r"s/summary.json is not a corpus summary as .*: not JSON \(Expecting .*Build the corpus again"),
    ("summary a list", r"s/summary.json is not a corpus summary .*: it is \[1, 2\], not a JSON object"),
    ("summary without fingerprints", "s/summary.json is not a corpus summary .*: it has no fingerprints"),
    ("label table a list", r"s/summary.json .*: ontology_term_ids\['cell_type'\] is \['B cell'\], not a JSON object"),
    ("rejects of another header", r"s/rejects.csv is not the rejected cells .*: its columns are \['a', 'b'\], not "),
    ("rejects not text", r"s/rejects.csv is not the rejected cells .*: not CSV \('utf-8' codec can't decode"),
    ("rejects empty", r"s/rejects.csv is not the rejected cells .*: not CSV \(No columns to parse"),
    ("unmapped genes not text", r"s/unmapped_genes.txt is not the unmapped genes as .*: not UTF-8 text"),
    ("extractor not JSON", "config file at '.*s/feature_extractor/preprocessor_config.json' is not a valid JSON"),
    ("extractor a list", "the feature extractor config of .*s/feature_extractor is a list, not a JSON object"),
])
def test_shards_that_make_no_one_corpus_are_refused_before_writing(built, tmp_path, monkeypatch, case, message):
    first, second = built["shards"]
    copy = tmp_path / "s"
    shards = {
        "twice": lambda: [first, second, first],
        "missing": lambda: [first],
        "extractor": lambda: [first, edited(second, copy, "feature_extractor/preprocessor_config.json",
                                            lambda c: c["gene_medians"].update({next(iter(c["gene_medians"])): 1.5}))],
        "library": lambda: [first, edited(second, copy, "summary.json",
                                          lambda c: c.update(pathway_library="other.gmt"))],
        # a shard built before library genes were matched by Ensembl ID: its renamed genes counted in no set
        "pathway genes matched as written": lambda: [first, edited(second, copy, "summary.json",
                                                                   lambda c: c.pop("pathway_gene_matching"))],
        "pathways per cell": lambda: [first, edited(second, copy, "summary.json",
                                                    lambda c: c.update(pathways_per_cell=3))],
        "obs values read as before": lambda: [first, edited(second, copy, "summary.json",
                                                            lambda c: c.pop("obs_cleaning"))],
        "obs labels read as before": lambda: [first, edited(second, copy, "summary.json", lambda c: c.update(
            obs_cleaning="stripped text; None, NaN, pandas' NA and CELLxGENE's missing words missing; a whole float "
                         "as the integer"))],
        "label": lambda: [first, edited(second, copy, "summary.json", lambda c: c["ontology_term_ids"]["cell_type"]
                                        .update({"CD14-positive monocyte": "CL:0000576"}))],
        "fold": lambda: [first, edited(second, copy, "summary.json", lambda c: c.update(fold={"fold": 0}))],
        "rules": lambda: [first, edited(second, copy, "summary.json", lambda c: c.update(keep_non_primary=True))],
        "not a corpus": lambda: [first, tmp_path],
        "no rejects": lambda: [first, edited(second, copy, "rejects.csv", None)],
        "a split folder missing": lambda: [first, edited(second, copy, "test", None)],
        "a split's rows missing": lambda: [first, edited(second, copy, "train/data-00000-of-00001.arrow", None)],
        "a split not listed": lambda: [first, edited(second, copy, "dataset_dict.json",
                                                     lambda c: c.update(splits=["train", "validation"]))],
        "a split's rows cut short": lambda: [first, replaced(second, copy, "train/data-00000-of-00001.arrow",
                                                             cut_short(second / "train/data-00000-of-00001.arrow"))],
        # corrupt files ended the join in a JSONDecodeError, AttributeError or pandas' traceback; rejects.csv of
        # another header was joined into one of the union of the columns, exit 0
        "summary not JSON": lambda: [first, replaced(second, copy, "summary.json", b"{oops")],
        "summary a list": lambda: [first, replaced(second, copy, "summary.json", b"[1, 2]")],
        "summary without fingerprints": lambda: [first, edited(second, copy, "summary.json",
                                                               lambda c: c.pop("fingerprints"))],
        "label table a list": lambda: [first, edited(second, copy, "summary.json",
                                                     lambda c: c["ontology_term_ids"].update(cell_type=["B cell"]))],
        "rejects of another header": lambda: [first, replaced(second, copy, "rejects.csv", b"a,b\n1,2\n")],
        "rejects not text": lambda: [first, replaced(second, copy, "rejects.csv", b"cell_id,reason\n\xd0\xff,x\n")],
        "rejects empty": lambda: [first, replaced(second, copy, "rejects.csv", b"")],
        # a binary unmapped_genes.txt ended the join in a UnicodeDecodeError that named no file
        "unmapped genes not text": lambda: [first, replaced(second, copy, "unmapped_genes.txt", b"GENE1\n\xd0\xff\n")],
        "extractor not JSON": lambda: [first, replaced(second, copy, "feature_extractor/preprocessor_config.json",
                                                       b"{oops")],  # JSONDecodeError traceback
        "extractor a list": lambda: [first, replaced(second, copy, "feature_extractor/preprocessor_config.json",
                                                     b"[1]")],  # the join's AttributeError, others' TypeError
    }[case]()

    def joined(*args, **kwargs):  # a corrupt shard file is refused before the splits are joined and written
        raise AssertionError("the splits were joined before every shard was checked")

    monkeypatch.setattr("processing.join_corpus.save_splits", joined)
    with pytest.raises((ValueError, OSError), match=message):  # OSError: transformers' for a config not JSON
        join_corpus(shards, tmp_path / "joined")
    assert not (tmp_path / "joined").exists()
    with pytest.raises(SystemExit, match=f"join_corpus: .*{message}"):
        main([*map(str, shards), "--out", str(tmp_path / "joined")])


def test_a_donor_in_two_splits_is_refused():
    """Shards split on their own cells (no --hashed-splits) put one donor's cells in train and test."""
    corpus = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"donor_id": ["d1", "d2", None]}),
                                   "test": datasets.Dataset.from_dict({"donor_id": ["d3", None]})})
    check_donor_splits(corpus)
    corpus["test"] = datasets.Dataset.from_dict({"donor_id": ["d3", "d1"]})
    with pytest.raises(ValueError, match=r"1 donors have cells in two splits .*'d1': \['test', 'train'\].*"
                                         "--hashed-splits and one --seed"):
        check_donor_splits(corpus)


def test_a_join_whose_donor_is_in_two_splits_is_refused(built, tmp_path):
    """Through the join: shards split on their own cells put one donor's cells in train and test."""
    first = tmp_path / "donor"
    shutil.copytree(built["shards"][0], first)
    rows = datasets.load_from_disk(str(built["shards"][0])).map(lambda row: {"donor_id": "d1"})
    for split in rows:
        shutil.rmtree(first / split)
    rows.save_to_disk(str(first))
    with pytest.raises(ValueError, match=r"1 donors have cells in two splits .*'d1': \['test', 'train', 'validation'\]"):
        join_corpus([first, built["shards"][1]], tmp_path / "joined")
    assert not (tmp_path / "joined").exists()


def test_a_cell_id_two_shards_hold_is_refused(built, tmp_path):
    """Shards of several files (one build per file) whose cells share ids, as 10x barcodes do across samples, joined
    into a corpus with repeated cell ids (exit 0), which a build refuses: per-cell results matched by id (the demo's
    baseline predictions) then went to the wrong cell."""
    second = tmp_path / "second"
    shutil.copytree(built["shards"][1], second)
    taken = datasets.load_from_disk(str(built["shards"][0]))["test"]["cell_id"][0]
    rows = datasets.load_from_disk(str(built["shards"][1])).map(
        lambda row, i: {"cell_id": taken if i == 0 else row["cell_id"]},
        with_indices=True)
    for split in rows:
        shutil.rmtree(second / split)
    rows.save_to_disk(str(second))
    with pytest.raises(ValueError, match=rf"1 cell ids are in more than one shard .*'{taken}'.*unique across the "
                                         "input files"):
        join_corpus([built["shards"][0], second], tmp_path / "joined")
    assert not (tmp_path / "joined").exists()


def test_a_cell_id_one_shard_keeps_and_another_rejects_is_refused(built, tmp_path):
    """Two files' cells of one barcode, kept in one shard and rejected in the other (no cell type id): the join
    held the kept cell and its rejects.csv listed the same id as rejected, exit 0; one build refuses repeated ids."""
    second = tmp_path / "second"
    shutil.copytree(built["shards"][1], second)
    kept = datasets.load_from_disk(str(built["shards"][0]))["train"]["cell_id"][0]
    rejects = pd.read_csv(second / "rejects.csv", dtype=str)
    pd.concat([rejects, pd.DataFrame({"cell_id": [kept], "reason": ["unmapped_cell_type"]})]).to_csv(
        second / "rejects.csv", index=False)
    with pytest.raises(ValueError, match=rf"1 cell ids are in more than one shard of the joined corpus, kept or "
                                         rf"rejected \(e.g. \['{kept}'\]\)"):
        join_corpus([built["shards"][0], second], tmp_path / "joined")
    assert not (tmp_path / "joined").exists()


@pytest.mark.parametrize("size", ["500XB", "0"])
def test_a_shard_size_datasets_refuses_is_refused_before_the_join(built, tmp_path, monkeypatch, size):
    """--max-shard-size 500XB ended in datasets' traceback, 0 in a ZeroDivisionError, after the shards were read and
    concatenated; the corpus builder refused both before its work already."""
    monkeypatch.setattr(datasets, "load_from_disk", None)  # reading a shard would call it
    with pytest.raises(SystemExit, match=f"^join_corpus: error: --max-shard-size must be a size .*got '{size}'"):
        main([*map(str, built["shards"]), "--out", str(tmp_path / "joined"), "--max-shard-size", size])
    assert list(tmp_path.iterdir()) == []


def test_an_existing_corpus_is_replaced_only_with_overwrite(built, tmp_path):
    join_corpus(built["shards"], tmp_path / "joined")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        join_corpus(built["shards"], tmp_path / "joined")
    join_corpus(built["shards"], tmp_path / "joined", overwrite=True, name="pbmc joined")
    assert json.loads((tmp_path / "joined" / "summary.json").read_text())["name"] == "pbmc joined"


def test_shards_of_several_files_are_named_by_their_files(built, tmp_path):
    """Their paths joined in one string read as one path where the card and the upload drop machine paths."""
    first, second = (edited(shard, tmp_path / f"s{i}", "summary.json",
                            lambda c, i=i: c.update(source=f"/data/part{i}.h5ad"))
                     for i, shard in enumerate(built["shards"]))
    summary = join_corpus([first, second], tmp_path / "joined")
    assert summary["source"] == "part0.h5ad; part1.h5ad"
    assert [entry["source"] for entry in summary["joined_from"]] == ["/data/part0.h5ad", "/data/part1.h5ad"]


def test_joined_label_table_gives_a_label_stated_without_an_id_the_id_another_shard_gives(tmp_path):
    """A label one shard states without an id (None) takes the id a later shard gives it (it kept None: mutation
    testing's finding), as one build of all the cells would; the joined processor then writes its ontology id."""
    fields = set(Shard.__dataclass_fields__)

    def shard(name, table):
        values = {"path": tmp_path / name, "summary": {"ontology_term_ids": {"tissue": table}}}
        return Shard(**{key: values.get(key) for key in fields})

    joined = join_label_tables([shard("a", {"blood": None, "lung": "UBERON:0002048"}),
                                shard("b", {"blood": "UBERON:0000178"})])
    assert joined == {"tissue": {"blood": "UBERON:0000178", "lung": "UBERON:0002048"}}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """pbmc68k_reduced as two files (one build per file), each built once with --medians histogram."""
    from processing.sources import AnnDataSource

    root = tmp_path_factory.mktemp("files")
    adata = pbmc68k_reduced().adata

    def part(i):
        return AnnDataSource(adata[i * 350:(i + 1) * 350].copy(), name=f"/data/part{i}.h5ad", input_values="log1p")

    for i in range(2):
        build_corpus(part(i), root / f"first{i}", BuildOptions(progress=False, gmt=None, medians="histogram"))
    return {"root": root, "part": part}


def _tokenized(files, histograms: list[int], parts: list[int], to: Path, **options) -> list[Path]:
    """The shards `parts` rebuilt with the feature extractor the merge CLI makes of the histograms of `histograms`."""
    from processing.gene_medians import main as merge

    merge([*(str(files["root"] / f"first{i}" / "median_histogram.npz") for i in histograms), "--out", str(to / "fe")])
    options = BuildOptions(progress=False, gmt=None, hashed_splits=True, **options,
                           feature_extractor=Cell2TextFeatureExtractor.from_pretrained(str(to / "fe")))
    for i in parts:
        build_corpus(files["part"](i), to / f"shard{i}", options)
    return [to / f"shard{i}" for i in parts]


def test_a_shard_whose_cells_the_medians_do_not_count_is_refused(files, tmp_path):
    """A shard built without --medians histogram writes no median_histogram.npz, so the merge of
    shard*/median_histogram.npz skipped it: the shards joined into a corpus whose genes were ranked by the medians of
    the other shard's cells only, exit 0."""
    shards = _tokenized(files, [0], [0, 1], tmp_path)
    with pytest.raises(ValueError, match=r"shard1 holds the cells of 'part1.h5ad', .*which the medians of the "
                                         r"feature extractor .* do not count \(they count 'part0.h5ad'[^;]*\): build "
                                         "that shard with --medians histogram"):
        join_corpus(shards, tmp_path / "joined")
    assert not (tmp_path / "joined").exists()


def test_an_input_the_medians_count_and_no_shard_holds_is_refused(files, tmp_path):
    """A file's shard left out of the join (its rebuild failed, a glob missed it) was missing from the corpus, exit
    0: the merged feature extractor records which inputs its medians count."""
    shards = _tokenized(files, [0, 1], [0, 1], tmp_path)
    with pytest.raises(ValueError, match="the medians of the shards' feature extractor count the cells of "
                                         "'part1.h5ad', .*which no shard given holds: give its shard too"):
        join_corpus(shards[:1], tmp_path / "joined")
    assert join_corpus(shards, tmp_path / "joined")["num_cells_in"] == 700
    # the feature extractor ships with the model: its record names the inputs as a card does, never a machine path
    for extractor in (tmp_path / "fe", files["root"] / "first0" / "feature_extractor"):
        inputs = read_median_inputs(
            Cell2TextFeatureExtractor.from_pretrained(str(extractor)).vocabulary_source["median_inputs"], "fe")
        assert {entry["source"] for entry in inputs} <= {"part0.h5ad", "part1.h5ad"}
        assert "/data/" not in (extractor / "preprocessor_config.json").read_text()


def test_shards_whose_medians_counted_cells_kept_by_other_rules_are_refused(files, tmp_path):
    """A first pass (the histograms) that rejected non-primary cells, and shards rebuilt with --keep-non-primary:
    the corpus held cells its medians did not count, exit 0."""
    shards = _tokenized(files, [0, 1], [0, 1], tmp_path, keep_non_primary=True)
    with pytest.raises(ValueError, match=r"shard0 holds the cells of 'part0.h5ad', keep_non_primary True, .*which the "
                                         r"medians .* \(they count 'part0.h5ad', keep_non_primary False.*the "
                                         r"rejection rules and --input-values of its tokens \(--required-fields, "
                                         r"--keep-non-primary\)"):
        join_corpus(shards, tmp_path / "joined")


def test_required_fields_in_another_order_choose_the_same_cells(files, tmp_path):
    """--required-fields tissue cell_type and cell_type tissue keep the same cells, but were recorded as given, so
    the join refused shards (and histograms) of the two orders as built by other rules."""
    from processing.gene_medians import main as merge

    for i, order in enumerate([("tissue", "cell_type"), ("cell_type", "tissue")]):
        build_corpus(files["part"](i), tmp_path / f"first{i}", BuildOptions(progress=False, gmt=None,
                                                                            medians="histogram", required_fields=order))
    merge([str(tmp_path / f"first{i}" / "median_histogram.npz") for i in range(2)] + ["--out", str(tmp_path / "fe")])
    extractor = Cell2TextFeatureExtractor.from_pretrained(str(tmp_path / "fe"))
    for i, order in enumerate([("cell_type", "tissue"), ("tissue", "cell_type")]):
        build_corpus(files["part"](i), tmp_path / f"shard{i}", BuildOptions(
            progress=False, gmt=None, hashed_splits=True, required_fields=order, feature_extractor=extractor))
    assert join_corpus([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "joined")["num_cells_in"] == 700


def test_shards_rebuilt_by_another_version_than_their_histograms_are_refused(files, tmp_path, monkeypatch):
    """Histograms of one version of the package, shards rebuilt by another whose ontologies know other cell types
    (an unknown or obsolete term is rejected): the medians counted other cells than the corpus holds."""
    from processing import build_corpus as builder

    newer = {**builder.ontology_versions(), "CL": "v2099-01-01"}
    monkeypatch.setattr(builder, "ontology_versions", lambda: newer)
    shards = _tokenized(files, [0, 1], [0, 1], tmp_path)
    with pytest.raises(ValueError, match=r"shard0 holds the cells of 'part0.h5ad', ontology_versions .*v2099-01-01.*"
                                         r"which the medians .* \(they count 'part0.h5ad', ontology_versions "):
        join_corpus(shards, tmp_path / "joined")


def test_shards_tokenized_with_one_shards_own_medians_are_refused(built, tmp_path):
    """A shard's own feature extractor (its medians: its cells only) given to the other shards: a build records the
    cells its medians count, as the merge does."""
    first = pbmc68k_reduced()
    first.select_shard(0, 2)
    build_corpus(first, tmp_path / "own0", BuildOptions(progress=False, gmt=None))
    options = BuildOptions(progress=False, gmt=None, hashed_splits=True, feature_extractor=(
        Cell2TextFeatureExtractor.from_pretrained(str(tmp_path / "own0" / "feature_extractor"))))
    for index in range(2):
        source = pbmc68k_reduced()
        source.select_shard(index, 2)
        build_corpus(source, tmp_path / f"shard{index}", options)
    with pytest.raises(ValueError, match=r"shard1 holds the cells of 'scanpy.datasets.pbmc68k_reduced' shard 1/2, "
                                         r"which the medians .* \(they count 'scanpy.datasets.pbmc68k_reduced' shard "
                                         r"0/2\)"):
        join_corpus([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "joined")


def test_shards_of_an_extractor_that_records_no_median_inputs_join_with_a_warning(built, tmp_path, caplog):
    """A feature extractor merged by an earlier version records no median_inputs: nothing to check, said so."""
    def drop(config):
        config["vocabulary_source"].pop("median_inputs")

    shards = [edited(shard, tmp_path / f"s{i}", "feature_extractor/preprocessor_config.json", drop)
              for i, shard in enumerate(built["shards"])]
    join_corpus(shards, tmp_path / "joined")
    assert "records no median_inputs (merged by an earlier version" in caplog.text
    # histograms of the version before kept_by record a checksum: the warning blamed a checksum they have
    assert "which record no input checksum or no rejection rules, kept_by" in caplog.text


def test_the_median_inputs_refusal_names_three_inputs_at_most(tmp_path):
    """A Census-wide merge counts hundreds of inputs: the message names three and counts the others."""
    from processing.join_corpus import check_joinable

    inputs = [{"input_sha256": f"sha{i}", "source": f"dataset{i}", "required_fields": ["cell_type"],
               "keep_non_primary": False} for i in range(5)]
    shard = Shard(tmp_path / "s", {"input_sha256": "other", "source": "other", "fingerprints": {}},
                  {"vocabulary_source": {"kind": "corpus", "median_inputs": inputs}})
    with pytest.raises(ValueError, match=r"\(they count 'dataset0', .*; 'dataset2', [^;]*; and 2 more inputs\)"):
        check_joinable([shard])


def test_shards_rebuilt_with_other_input_values_than_their_histograms_are_refused(tmp_path):
    """A first pass that read the values as normalized ones (--input-values normalized: medians of the stored values)
    and shards rebuilt with --input-values log1p (tokens of expm1 of them): values both readings take (fractional,
    no counts behind them, at most 20), the same cells and checksum, so the corpus joined, its genes ranked by
    medians of other values, exit 0."""
    import numpy as np

    from processing.gene_medians import main as merge
    from processing.sources import AnnDataSource

    adata = pbmc68k_reduced().adata
    adata.X.data = adata.X.data * np.random.default_rng(0).uniform(0.8, 1.2, adata.X.nnz).astype(adata.X.dtype)

    def part(i, input_values):
        return AnnDataSource(adata[i * 350:(i + 1) * 350].copy(), name=f"part{i}.h5ad", input_values=input_values)

    for i in range(2):
        build_corpus(part(i, "normalized"), tmp_path / f"first{i}",
                     BuildOptions(progress=False, gmt=None, medians="histogram"))
    merge([str(tmp_path / f"first{i}" / "median_histogram.npz") for i in range(2)] + ["--out", str(tmp_path / "fe")])
    options = BuildOptions(progress=False, gmt=None, hashed_splits=True,
                           feature_extractor=Cell2TextFeatureExtractor.from_pretrained(str(tmp_path / "fe")))
    for i in range(2):
        build_corpus(part(i, "log1p"), tmp_path / f"shard{i}", options)
    with pytest.raises(ValueError, match=r"shard0 holds the cells of 'part0.h5ad', input_values 'log1p', .*which the "
                                         r"medians .* \(they count 'part0.h5ad', input_values 'normalized'.*the "
                                         r"rejection rules and --input-values of its tokens"):  # the fix names it
        join_corpus([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "joined")


@pytest.mark.parametrize("record, problem", [
    ({"rules": {}, "inputs": "part0.h5ad"}, "inputs 'part0.h5ad', not a list of them"),
    (["part0.h5ad"], "an input 'part0.h5ad', not an object with a text input_sha256 and source"),
    ({"inputs": []}, r"an object of \['inputs'\], not of rules and inputs"),
    ({"rules": ["cell_type"], "inputs": [{"input_sha256": "a", "source": "b"}]}, "rules .*, not an object"),
])
def test_a_malformed_median_inputs_record_is_refused_naming_the_fix(built, tmp_path, record, problem):
    """A hand-edited median_inputs (a list of names, a string) ended in an AttributeError ('str' object has no
    attribute 'get')."""
    def edit(config):
        config["vocabulary_source"]["median_inputs"] = record

    shards = [edited(shard, tmp_path / f"s{i}", "feature_extractor/preprocessor_config.json", edit)
              for i, shard in enumerate(built["shards"])]
    with pytest.raises(ValueError, match=r"the feature extractor of .*s0's vocabulary_source\['median_inputs'\] is "
                                         rf"malformed \({problem}\): restore its preprocessor_config.json, or merge"):
        join_corpus(shards, tmp_path / "joined")
    # a build given that feature extractor reads the record too (whether its medians count the input), before a pass
    extractor = Cell2TextFeatureExtractor.from_pretrained(str(shards[0] / "feature_extractor"))
    with pytest.raises(ValueError, match=rf"the given feature extractor's vocabulary_source\['median_inputs'\] is "
                                         rf"malformed \({problem}\)"):
        build_corpus(pbmc68k_reduced(), tmp_path / "rebuilt", BuildOptions(progress=False, feature_extractor=extractor))


def test_a_var_the_medians_pass_and_the_rebuild_read_as_other_genes_is_refused(tmp_path):
    """The medians' pass (no feature extractor) chooses var's symbol source by the whole gene table, the rebuild with
    the merged extractor by its vocabulary: an index of symbols, those past column 400 unexpressed, beside a
    feature_name column naming vocabulary genes in another order: the histogram counted the index's genes, the
    rebuild tokenized 699 columns as other genes, exit 0."""
    import numpy as np

    from modeling_cell2text.gene_table import symbol_index
    from processing.gene_medians import main as merge
    from processing.sources import AnnDataSource

    adata = pbmc68k_reduced().adata
    symbols, table = list(adata.var_names), symbol_index()
    # names of other genes, one name each: two previous symbols of one gene are one gene's two columns, refused
    named = {table[name] for name in symbols if name in table}
    others = [name for name in sorted(table)
              if name not in set(symbols) and table[name] not in named and not named.add(table[name])][:len(symbols)]
    shuffled = np.random.default_rng(0).permutation([name for name in symbols if name in table])
    second = adata[350:].copy()
    counts = second.X.tocsc()
    counts[:, 400:] = 0
    counts.eliminate_zeros()
    second.X = counts.tocsr()
    second.var = pd.DataFrame({"feature_name": [shuffled[j] if j < 700 else f"NOGENE{j}" for j in range(len(symbols))]},
                              index=[name if j < 400 else others[j] for j, name in enumerate(symbols)])
    parts = {"a.h5ad": adata[:350].copy(), "b.h5ad": second}
    for name, part in parts.items():
        build_corpus(AnnDataSource(part.copy(), name=name, input_values="log1p"), tmp_path / f"first_{name}",
                     BuildOptions(progress=False, gmt=None, medians="histogram"))
    merge([str(tmp_path / f"first_{name}" / "median_histogram.npz") for name in parts] + ["--out", str(tmp_path / "fe")])
    options = BuildOptions(progress=False, gmt=None, feature_extractor=Cell2TextFeatureExtractor.from_pretrained(
        str(tmp_path / "fe")))
    with pytest.raises(ValueError, match=r"var of b.h5ad names its genes in two ways that disagree: the medians' pass, "
                                         r"without a feature extractor, read them from var index .* from var "
                                         r"feature_name .* and \d+ columns are other genes in the two \(e.g. column 0: "
                                         r"'HES4' = ENSG00000188290 counted, .*Give var one naming of its genes"):
        build_corpus(AnnDataSource(second, name="b.h5ad", input_values="log1p"), tmp_path / "shard_b", options)
    # the other input reads alike in both passes, and a vocabulary that did not count b's cells (a's own) reads b as
    # inference does
    build_corpus(AnnDataSource(parts["a.h5ad"], name="a.h5ad", input_values="log1p"), tmp_path / "shard_a", options)
    build_corpus(AnnDataSource(second, name="b.h5ad", input_values="log1p"), tmp_path / "b_by_a", BuildOptions(
        progress=False, gmt=None, feature_extractor=Cell2TextFeatureExtractor.from_pretrained(
            str(tmp_path / "first_a.h5ad" / "feature_extractor"))))
