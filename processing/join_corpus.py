"""Join corpus shards built on several machines into one corpus (docs/corpus.md, "Millions of cells across machines").

    python -m processing.join_corpus shard_0 shard_1 ... --out corpus

Each shard is a corpus folder of `python -m processing.build_corpus`, every one tokenized with the same feature
extractor (`--feature-extractor fe/`, made from the shards' merged median histograms). The joined corpus holds each
split's rows shard after shard, in the order given, that feature extractor, and the summary.json one build of all
the shards' cells writes: counts summed, label -> id tables joined, the card's pathway table recomputed, and the
split fingerprints of the join (a checksum of the shards', in order; `joined_from` lists each shard's record).

Refused, naming the fix, where the joined corpus would train or evaluate on something other than it says: shards
tokenized by different feature extractors (other token ids or gene orders), built with other pathway, expression-bin
or ontology settings, rejection rules (`--required-fields`, `--keep-non-primary`) or rule reading obs values
(`obs_cleaning`: rebuild a shard of an earlier version), a shard given twice, an input whose `--shard i/N` shards
are not all given, shards whose cells are not those their feature extractor's medians count, or whose values were
read as another kind (`--input-values`; `vocabulary_source["median_inputs"]`), a malformed such record, a cell id
two shards hold, kept or rejected (cells of several files with the same barcodes), a donor whose cells are in two
splits (shards split on their own cells, without `--hashed-splits`), a label with two ontology ids, cross-validation
fold builds, and a shard folder whose splits do not load or hold other numbers of cells than its summary records (a
copy cut short).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from hub_cards.render import public_name, write_dataset_card
from modeling_cell2text.argument_types import as_command_line, refused_input_as_one_line
from modeling_cell2text.output_files import publish_folder
from processing.build_corpus import _is_corpus_folder, _staging_dir
from processing.corpus import (FEATURE_EXTRACTOR_DIR, REJECTS_FILE, SPLIT_FINGERPRINTS, SUMMARY_FILE,
                               UNMAPPED_GENES_FILE, check_max_shard_size, corpus_feature_extractor, read_rejects,
                               read_summary, read_unmapped_genes, save_splits, top_pathways_by_cell_type)
from processing.gene_medians import MEDIAN_INPUT_NAMES, read_median_inputs
from processing.sources import check_whole_inputs
from processing.splits import SPLITS

logger = logging.getLogger(__name__)

EXTRACTOR_FILE = "preprocessor_config.json"
# Settings every shard must share: another value gives the joined corpus descriptions or tokens of two kinds.
SHARED_SETTINGS = ("pathway_library", "pathway_ranking", "pathway_set_sizes", "min_pathway_genes",
                   "pathway_gene_matching", "pathways_per_cell", "expression_bins",
                   "gene_vocabulary_size", "census_version", "ontology_versions", "required_fields",
                   "keep_non_primary", "obs_cleaning")


@dataclass
class Shard:
    path: Path
    summary: dict
    extractor_config: dict  # the feature extractor's settings (its preprocessor_config.json, as loaded)
    splits: datasets.DatasetDict | None = None  # its rows, memory-mapped


def read_shard(path: str | Path) -> Shard:
    """A corpus folder's summary and feature extractor settings; a folder that is no built corpus is refused."""
    path = Path(path)
    extractor_file = path / FEATURE_EXTRACTOR_DIR / EXTRACTOR_FILE
    if not _is_corpus_folder(path) or not extractor_file.is_file():
        raise ValueError(f"{path} is not a corpus folder (summary.json, dataset_dict.json and "
                         f"{FEATURE_EXTRACTOR_DIR}/{EXTRACTOR_FILE}): give folders built by "
                         "python -m processing.build_corpus.")
    if not (path / REJECTS_FILE).is_file():  # the join lists every shard's rejected cells (a traceback before)
        raise ValueError(f"{path} has no {REJECTS_FILE}, which every build writes (its rejected cells): give the "
                         "shard's folder as build_corpus wrote it, or build it again.")
    read_rejects(path)  # a corrupt one, before anything is joined
    read_unmapped_genes(path)
    summary = read_summary(path / SUMMARY_FILE, {"fingerprints": SPLIT_FINGERPRINTS})
    try:
        splits = datasets.load_from_disk(str(path))
        missing = [split for split in SPLITS if split not in splits]
    except (OSError, ValueError) as error:  # datasets' message named a file, not the fix
        raise ValueError(f"{path}'s splits do not load ({error}): the folder is incomplete, a copy cut short or "
                         "files removed; copy it again, or build the shard again.") from error
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} split, which every build writes (empty or not): copy "
                         "the folder again, or build the shard again.")
    # an Arrow file cut at a batch boundary loads, with fewer rows: the join lost cells, exit 0
    recorded = summary.get("splits") or {}
    short = {split: (len(splits[split]), recorded[split]) for split in SPLITS
             if split in recorded and len(splits[split]) != recorded[split]}
    if short:
        raise ValueError(f"{path}'s splits hold other numbers of cells than its {SUMMARY_FILE} records ("
                         f"{'; '.join(f'{split}: {rows} rows, {cells} recorded' for split, (rows, cells) in short.items())}"
                         "): a copy cut short or files replaced; copy the folder again, or build the shard again.")
    return Shard(path, summary, corpus_feature_extractor(path).to_dict(),  # its reader refuses a corrupt config
                 splits)


def check_joinable(shards: Sequence[Shard]) -> None:
    """Refuse shards whose join would not be one corpus (see the module docstring): before anything is written."""
    first = shards[0]
    for shard in shards:
        if "fold" in shard.summary:
            raise ValueError(f"{shard.path} is a cross-validation fold build (--fold): folds are dealt from one "
                             "whole input; build shards without --fold to join them.")
        if shard.extractor_config != first.extractor_config:
            differ = sorted(key for key in {*shard.extractor_config, *first.extractor_config}
                            if shard.extractor_config.get(key) != first.extractor_config.get(key))
            raise ValueError(f"{shard.path} and {first.path} were tokenized by different feature extractors "
                             f"(they differ in {differ}), so one token id or gene order would mean two things in "
                             "the joined corpus: merge the shards' median histograms (python -m "
                             "processing.gene_medians shard*/median_histogram.npz --out fe/) and rebuild every "
                             "shard with --feature-extractor fe/.")
        for key in SHARED_SETTINGS:
            if shard.summary.get(key) != first.summary.get(key):
                # every build writes these (the pathway ones where it scores pathways: pathway_library differs
                # first), only a Census build census_version: a summary without one is an earlier version's
                older = [other.path for other in (shard, first) if key not in other.summary and key != "census_version"]
                raise ValueError(f"{shard.path} was built with {key} {shard.summary.get(key)!r} and {first.path} "
                                 f"with {first.summary.get(key)!r}: " + (
                                     f"{older[0]} records no {key}, so an earlier version of build_corpus built it: "
                                     "rebuild it with this version." if older else
                                     "rebuild the shards with the same settings (and the same version of the "
                                     "package, for ontology_versions)."))
    seen: dict[str, Path] = {}
    for shard in shards:
        key = json.dumps(shard.summary.get("fingerprints"), sort_keys=True)
        if key in seen:
            raise ValueError(f"{shard.path} and {seen[key]} hold the same cells (equal split fingerprints): give "
                             "each shard once.")
        seen[key] = shard.path
    _check_complete_inputs(shards)
    _check_median_inputs(shards)


def _check_complete_inputs(shards: Sequence[Shard]) -> None:
    """Every `--shard i/N` of an input once, for one N, as the median merge checks its histograms."""
    parts = {}
    for shard in shards:
        part = shard.summary.get("shard")
        if part is not None:
            index, count = map(int, part.split("/"))
            source = shard.summary.get("source")
            parts[str(shard.path)] = (shard.summary.get("input_sha256") or source, source, index, count)
    check_whole_inputs(parts, "corpus shards", "give every shard (a joined corpus missing some would say it holds "
                                               "the whole input)")


def _check_median_inputs(shards: Sequence[Shard]) -> None:
    """Refuse shards whose cells are not those the medians of their feature extractor count (its
    `vocabulary_source["median_inputs"]`, which the histogram merge and a build's own medians record: each input's
    checksum, shard where one, and what chose its cells and read their values, `build_corpus._median_cells`): one
    build of all the cells ranks their genes by the medians of all of them. A shard built without `--medians
    histogram` writes no histogram, which `shard*/median_histogram.npz` then skips; a shard left out of the join
    after the merge is missing from the corpus; a first pass with other rejection rules counted other cells, one
    with other --input-values other values: all joined exit 0.
    A vocabulary of other cells (Geneformer's) is not checked."""
    source = shards[0].extractor_config.get("vocabulary_source") or {}
    if source.get("kind") != "corpus":
        return
    inputs = read_median_inputs(source.get("median_inputs"), f"the feature extractor of {shards[0].path}")
    if inputs is None:
        logger.warning("the shards' feature extractor records no median_inputs (merged by an earlier version, or "
                       "from histograms an earlier version wrote, which record no input checksum or no rejection "
                       "rules, kept_by): whether its medians count the cells of every shard, and only theirs, is not "
                       "checked; histograms and a merge of this version record them")
        return
    rules = sorted({key for entry in inputs for key in entry} - set(MEDIAN_INPUT_NAMES))
    differ = [rule for rule in rules  # the ones the message shows
              if len({json.dumps(record.get(rule), sort_keys=True)
                      for record in (*inputs, *(shard.summary for shard in shards))}) > 1]

    def holds(entry: dict, summary: dict) -> bool:  # an entry without "shard" counts all of its input
        return (entry.get("input_sha256") == summary.get("input_sha256")
                and entry.get("shard") in (None, summary.get("shard"))
                and all(entry.get(rule) == summary.get(rule) for rule in rules))

    def named(record: dict) -> str:
        part = record.get("shard")
        return (repr(public_name(record.get("source"))) + (f" shard {part}" if part else "")
                + "".join(f", {rule} {record.get(rule)!r}" for rule in differ))

    for shard in shards:
        if not any(holds(entry, shard.summary) for entry in inputs):
            raise ValueError(
                f"{shard.path} holds the cells of {named(shard.summary)}, which the medians of the feature extractor "
                f"it was tokenized with do not count (they count {'; '.join(map(named, inputs[:3]))}"
                f"{f'; and {len(inputs) - 3} more inputs' if len(inputs) > 3 else ''}): build that shard "
                "with --medians histogram (a shard without it writes no median_histogram.npz, and the merge's glob "
                "skips it), the rejection rules and --input-values of its tokens (--required-fields, "
                "--keep-non-primary) and this version of the package, merge every shard's histogram (python -m processing.gene_medians "
                "shard*/median_histogram.npz --out fe/) and rebuild every shard with --feature-extractor fe/.")
    for entry in inputs:
        if not any(holds(entry, shard.summary) for shard in shards):
            raise ValueError(
                f"the medians of the shards' feature extractor count the cells of {named(entry)}, which no shard "
                "given holds: give its shard too (a shard left out of the join is missing from the corpus), or merge "
                "the histograms of only the shards you join and rebuild them with that feature extractor.")


def check_donor_splits(corpus: datasets.DatasetDict) -> None:
    """Refuse a donor whose cells are in two splits: shards split on their own cells put one donor's cells in
    train and test, and the test figures read optimistic. Shards built with --hashed-splits and one --seed agree."""
    splits_of: dict[str, set[str]] = {}
    for split, rows in corpus.items():
        for donor in rows.unique("donor_id"):
            if donor is not None:
                splits_of.setdefault(donor, set()).add(split)
    shared = sorted(donor for donor, splits in splits_of.items() if len(splits) > 1)
    if shared:
        examples = {donor: sorted(splits_of[donor]) for donor in shared[:3]}
        raise ValueError(f"{len(shared)} donors have cells in two splits of the joined corpus (e.g. {examples}): "
                         "rebuild every shard with --hashed-splits and one --seed, so that each donor's split "
                         "follows from its id alone. If one id names different donors in different datasets, "
                         "make the ids unique (e.g. prefix the dataset) before building.")


def check_unique_cell_ids(corpus: datasets.DatasetDict, rejected: Sequence[str] = ()) -> None:
    """Refuse a cell id that two cells of the joined corpus hold, kept (rows) or `rejected` (its rejects.csv's ids):
    a build refuses repeated ids, and shards of several files (10x barcodes such as "AAACCTGAGAAGGCCT-1" repeat
    across samples) would otherwise join into a corpus whose per-cell results (evaluation's `cell_id`) cannot be
    told apart or are matched to the wrong cell, or whose rejects.csv lists a kept cell's id as rejected."""
    chunks = [chunk for split in corpus.values() for chunk in split.data.column("cell_id").chunks]
    ids = pa.chunked_array([*chunks, pa.array(list(rejected), type=pa.string())], type=pa.string())
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(repeated):
        raise ValueError(f"{len(repeated)} cell ids are in more than one shard of the joined corpus, kept or rejected "
                         f"(e.g. {repeated[:5].to_pylist()}); each cell needs a unique id: make the cell ids unique "
                         "across the input files (e.g. prefix each file's name: adata.obs_names = 'part0_' + "
                         "adata.obs_names) and rebuild the shards.")


def join_summaries(shards: Sequence[Shard], corpus: datasets.DatasetDict, name: str | None) -> dict:
    """The joined corpus's summary.json, as one build of the shards' cells writes it, plus `joined_from`."""
    summaries = [shard.summary for shard in shards]
    first = summaries[0]

    def one_or_all(key: str) -> object:  # a setting that may differ by input (AUCell's depth: 5% of its genes)
        values = [summary.get(key) for summary in summaries]
        distinct = sorted({json.dumps(value) for value in values})
        return values[0] if len(distinct) == 1 else [json.loads(value) for value in distinct]

    def summed(key: str) -> dict:
        total: Counter = Counter()
        for summary in summaries:
            total.update(summary.get(key) or {})
        return dict(sorted(total.items()))

    label_counts: dict = {}
    for summary in summaries:
        for field, per_split in (summary.get("label_counts") or {}).items():
            for split, counts in per_split.items():
                label_counts.setdefault(field, {}).setdefault(split, Counter()).update(counts)
    label_counts = {field: {split: dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
                            for split, counts in per_split.items()} for field, per_split in label_counts.items()}
    unknown: dict = {}
    for summary in summaries:
        for field, counts in (summary.get("unknown_ontology_term_ids") or {}).items():
            unknown.setdefault(field, Counter()).update(counts)
    names = list(dict.fromkeys(summary.get("name") for summary in summaries))
    sources = list(dict.fromkeys(str(summary.get("source")) for summary in summaries))
    median = ({key: first.get(key) for key in ("median_method", "median_relative_error_bound", "vocabulary_source")
               if key in first}
              if len({summary.get("median_method") for summary in summaries}) == 1 else
              {"median_method": "given feature extractor", "median_relative_error_bound": None,
               "vocabulary_source": shards[0].extractor_config.get("vocabulary_source")})
    inputs = {summary.get("input_sha256") for summary in summaries}
    pathways = {}
    if "pathway_ranking" in first:
        pathways = {"pathway_ranking": first["pathway_ranking"], "pathway_set_sizes": first.get("pathway_set_sizes"),
                    "min_pathway_genes": first.get("min_pathway_genes"),
                    "pathway_gene_matching": first.get("pathway_gene_matching"),
                    "pathways_per_cell": first.get("pathways_per_cell"),
                    "pathway_max_rank": one_or_all("pathway_max_rank"), "pathway_sets": one_or_all("pathway_sets"),
                    "top_pathways_by_cell_type": top_pathways_by_cell_type(
                        (label for split in corpus.values() for label in split["cell_type"]),
                        (cell for split in corpus.values() for cell in split["pathways"]))}
    return {
        "name": name or (names[0] if len(names) == 1 else " + ".join(map(str, names))),
        # several: their names (a path's last component: a joined string of paths read as one path where the card
        # and the upload drop machine paths); `joined_from` keeps each shard's own
        "source": sources[0] if len(sources) == 1 else "; ".join(str(public_name(source)) for source in sources),
        "num_cells_in": sum(summary.get("num_cells_in", 0) for summary in summaries),
        "splits": {split: len(corpus[split]) for split in SPLITS},
        "rejected": summed("rejected"),
        "required_fields": first.get("required_fields"),
        "keep_non_primary": first.get("keep_non_primary"),
        "obs_cleaning": first.get("obs_cleaning"),
        "left_out": summed("left_out"),
        "suspension_types": summed("suspension_types"),
        "label_counts": label_counts,
        "gene_vocabulary_size": first.get("gene_vocabulary_size"),
        "pathway_library": first.get("pathway_library"),
        **pathways,
        "seed": one_or_all("seed"),
        "split_by": "donor" if any(summary.get("split_by") == "donor" for summary in summaries) else "cell",
        "hashed_splits": all(summary.get("hashed_splits") for summary in summaries),
        "ontology_term_ids": join_label_tables(shards),
        "unknown_ontology_term_ids": {field: dict(sorted(counts.items())) for field, counts in unknown.items()},
        "input_values": one_or_all("input_values"),
        **({"census_version": first["census_version"]} if "census_version" in first else {}),
        "expression_bins": first.get("expression_bins"),
        "unmapped_genes": len(_unmapped_genes(shards)),
        **median,
        "fingerprints": {split: hashlib.sha256("|".join(summary["fingerprints"][split] for summary in summaries)
                                               .encode()).hexdigest()[:16] for split in SPLITS},
        "ontology_versions": first.get("ontology_versions"),
        **({"input_sha256": inputs.pop()} if len(inputs) == 1 and None not in inputs else {}),
        "joined_from": [{"name": summary.get("name"), "source": summary.get("source"), "shard": summary.get("shard"),
                         "input_sha256": summary.get("input_sha256"), "splits": summary.get("splits"),
                         "fingerprints": summary.get("fingerprints")} for summary in summaries],
    }


def join_label_tables(shards: Sequence[Shard]) -> dict:
    """Each field's label -> ontology id table over the shards (a label one shard states without an id takes the
    other's, as one build does); a label the shards give two ids is refused, as the builder refuses one in a shard."""
    tables: dict[str, dict[str, str | None]] = {}
    for shard in shards:
        for field, table in (shard.summary.get("ontology_term_ids") or {}).items():
            joined = tables.setdefault(field, {})
            for label, term in table.items():
                if None not in (joined.get(label), term) and joined[label] != term:
                    raise ValueError(f"{field} label {label!r} names {joined[label]} in one shard and {term} in "
                                     f"{shard.path}; one label must name one term: correct the "
                                     f"{field}_ontology_term_id of those cells and rebuild the shard.")
                if joined.get(label) is None:
                    joined[label] = term
    return {field: dict(sorted(table.items())) for field, table in tables.items()}


def _unmapped_genes(shards: Sequence[Shard]) -> list[str]:
    genes: dict[str, None] = {}
    for shard in shards:
        genes.update(dict.fromkeys(read_unmapped_genes(shard.path)))
    return list(genes)


def join_corpus(shard_dirs: Sequence[str | Path], out_dir: str | Path, name: str | None = None,
                overwrite: bool = False, max_shard_size: str | int = "500MB") -> dict:
    """Join the corpus folders `shard_dirs` into `out_dir` (see the module docstring); returns the summary.

    Written to a staging folder next to `out_dir` and moved into place when complete, as a build is: a failed join
    leaves nothing, and a non-empty `out_dir` is replaced only with `overwrite` (and only when it holds a corpus)."""
    if not shard_dirs:
        raise ValueError("give the corpus folders to join")
    check_max_shard_size(max_shard_size)  # datasets refused it (0: divided by it) after the shards were joined
    shards = [read_shard(path) for path in shard_dirs]
    check_joinable(shards)
    corpus = datasets.DatasetDict({split: datasets.concatenate_datasets([shard.splits[split] for shard in shards])
                                   for split in SPLITS})
    rejects = pd.concat([read_rejects(shard.path) for shard in shards])
    check_unique_cell_ids(corpus, rejects["cell_id"])
    check_donor_splits(corpus)
    summary = join_summaries(shards, corpus, name)
    out = Path(out_dir).absolute()
    if any(out == shard.path.absolute() for shard in shards):
        raise ValueError(f"--out {out} is one of the shards: choose a new folder.")
    staging = _staging_dir(out, overwrite)
    try:
        save_splits(dict(corpus), staging, max_shard_size)
        shutil.copytree(shards[0].path / FEATURE_EXTRACTOR_DIR, staging / FEATURE_EXTRACTOR_DIR)
        rejects.to_csv(staging / REJECTS_FILE, index=False)
        (staging / UNMAPPED_GENES_FILE).write_text("".join(f"{gene}\n" for gene in _unmapped_genes(shards)),
                                                   encoding="utf-8")
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        write_dataset_card(staging, None, folder=out.name)
        publish_folder(staging, out, overwrite, fix="pass --overwrite to replace the corpus there")
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("joined %d shards into %s: splits %s", len(shards), out, summary["splits"])
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m processing.join_corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+", help="corpus folders built by python -m processing.build_corpus")
    parser.add_argument("--out", required=True, help="the joined corpus's folder (new or empty)")
    parser.add_argument("--name", default=None, help="the joined corpus's name (default: the shards' names)")
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus already at --out")
    parser.add_argument("--max-shard-size", default="500MB", help="largest Arrow file of a split (default 500MB)")
    args = parser.parse_args(argv)
    with refused_input_as_one_line("join_corpus", as_command_line):
        summary = join_corpus(args.shards, args.out, args.name, args.overwrite, args.max_shard_size)
    print(f"joined {len(args.shards)} shards: {summary['splits']}; out: {args.out}")
    return summary


if __name__ == "__main__":
    main()
