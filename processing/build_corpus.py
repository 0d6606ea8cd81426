"""Build a Cell2Text corpus: cells -> rank-value gene tokens + template descriptions, split by donor.

    python -m processing.build_corpus --preset pbmc68k_reduced --out corpus/
    python -m processing.build_corpus --h5ad cells.h5ad --backed --out corpus/
    python -m processing.build_corpus --soma path/or/uri --out corpus/

Two streaming passes over the source, chunk by chunk (memory does not grow with the corpus):

1. labels from obs (reject reasons), cell totals, the gene medians (non-zero medians of
   ``count / total * 10,000``; see processing.gene_medians) and AUCell pathway scores on
   log-normalised expression (top two gene sets per cell);
2. rank-value tokens with the corpus feature extractor, descriptions, rows streamed into one
   Arrow file per split.

Every input cell ends in exactly one split or in ``rejects.csv`` with its reason. The output
directory holds the ``datasets.DatasetDict`` (``load_from_disk``), ``feature_extractor/``,
``rejects.csv``, ``unmapped_genes.txt``, ``summary.json`` and the dataset card ``README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from cell2text_cli import positive_int
from hub_cards.publish import check_repo_id, publish_corpus
from hub_cards.render import public_name, write_dataset_card
from modeling_cell2text.argument_types import as_command_line, is_integer_at_least, refused_input_as_one_line
from modeling_cell2text.description_schema import LABEL_FIELD_NAMES, ONTOLOGY_FIELDS
from modeling_cell2text.feature_extraction_cell2text import DEFAULT_MODEL_INPUT_SIZE, Cell2TextFeatureExtractor
from modeling_cell2text.gene_ids import check_one_column_per_gene
from modeling_cell2text.gene_table import symbol_to_ensembl
from modeling_cell2text.output_files import Terminated, publish_folder, sigterm_as_exception
from processing.ontology_versions import ontology_versions
from processing.corpus import (METADATA_FIELDS, OBS_CLEANING, REJECTS_COLUMNS, REJECTS_FILE, UNMAPPED_GENES_FILE,
                               SplitWriter, check_max_shard_size, clean, describe, is_known_term_of, resolve_labels,
                               top_pathways_by_cell_type)
from processing.gene_medians import (ExactGeneMedians, HistogramGeneMedians, expression_values, median_inputs_record,
                                     normalize_total, read_median_inputs)
from processing.pathways import (
    DEFAULT_GMT, DEFAULT_SET_SIZES, PATHWAY_GENE_MATCHING, aucell, default_max_rank, display_names, filter_set_sizes,
    membership_matrix, read_gmt, sets_in_data_symbols, top_set_indices, unique_gene_names,
)
from processing.sources import check_one_gene_reading, resolve_genes, var_sources
from processing.splits import DEFAULT_FRACTIONS, SPLITS, assign_fold_splits, assign_splits, check_fold

logger = logging.getLogger(__name__)

EXACT_MEDIANS_MAX_CELLS = 20_000
# BuildOptions' settings of pathway scoring (the builder's options of the same names but n_pathways): without a
# gene-set library (gmt=None, --gmt none) no pathway is scored, and each of them is refused rather than ignored.
PATHWAY_OPTIONS = ("pathway_ranking", "pathway_set_sizes", "min_pathway_genes", "pathway_max_rank", "n_pathways")


@dataclass
class BuildOptions:
    """Settings of one corpus build (the CLI flags)."""

    seed: int = 0
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    # (fold, num_folds): k-fold cross-validation instead of `fractions` (processing.splits.assign_fold_splits)
    fold: tuple[int, int] | None = None
    # each donor's (or donorless cell's) split from a hash of its id and the seed: the same in every shard of a
    # corpus built on several machines (processing.splits.hashed_split)
    hashed_splits: bool = False
    # keep cells whose obs is_primary_data is False (CELLxGENE: the same cell published again in another dataset)
    keep_non_primary: bool = False
    chunk_size: int = 2048
    gmt: str | Path | None = DEFAULT_GMT
    n_pathways: int = 2
    # "normalized": rank a cell's sets by AUC / the set's best possible AUC (R AUCell, decoupler); "raw": by
    # ctxcore's AUC (the paper's choice), which favours small sets.
    pathway_ranking: str = "normalized"
    # Library sets kept: min to max genes (GSEA's usual 15-500); None keeps every set.
    pathway_set_sizes: tuple[int, int] | None = DEFAULT_SET_SIZES
    # Gene sets with fewer of their genes in the data score 0: on small panels (pbmc68k has 765 genes) sets with
    # one or two genes present otherwise dominate AUCell's top ranks.
    min_pathway_genes: int = 5
    # AUCell's top ranks per cell; None: 5% of the genes (R AUCell's and pySCENIC's default). Keep it below the genes
    # most cells express (a warning says where it is not: Census-wide data has 60k columns, so 5% is 3,000).
    pathway_max_rank: int | None = None
    medians: str = "auto"  # "exact", "histogram" or "auto" (exact up to EXACT_MEDIANS_MAX_CELLS cells)
    bins_per_decade: int = 100
    # Tokens per cell of the vocabulary built here (None: DEFAULT_MODEL_INPUT_SIZE); a given feature extractor has its
    # own, which a different value here contradicts (refused: it was ignored).
    model_input_size: int | None = None
    # > 0: value-aware corpus, each token also gets its per-cell expression bin (column gene_value_ids)
    expression_bins: int = 0
    feature_extractor: Cell2TextFeatureExtractor | None = None  # given vocabulary (e.g. Geneformer's)
    required_fields: tuple[str, ...] = ("cell_type",)
    name: str | None = None
    repo_id: str | None = None
    progress: bool = True
    max_shard_size: str | int = "500MB"  # Arrow shards of each split (datasets' save_to_disk)
    overwrite: bool = False  # replace an existing, non-empty corpus folder at out_dir


@dataclass
class _Genes:
    """Per-column gene facts: Ensembl ID for tokens (or a never-matching placeholder), symbols."""

    token_ids: list[str]
    usable: np.ndarray  # column may give tokens (mapped, in a given vocabulary)
    symbols: list[str]  # one name per column, for gene-set scoring (unique_gene_names)
    unmapped: list[str]


@dataclass
class _CellPlan:
    """What was decided for every input cell before the second pass writes the kept ones: labels, kept or not,
    split, and top pathways (indices into `pathway_names`; the index len(pathway_names) is no pathway)."""

    labels: pd.DataFrame
    kept: np.ndarray
    split_of: np.ndarray
    top_pathways: np.ndarray
    pathway_names: list[str]


def _genes(source: Any, extractor: Cell2TextFeatureExtractor | None) -> _Genes:
    """Map columns to Ensembl IDs; unmapped genes are reported, not silently lost, and columns naming one gene that
    gives tokens are refused (``gene_ids.check_one_column_per_gene``, inference's rule: sum them first). A given
    ``extractor`` reads the source's var as it reads the same file at inference (``sources.resolve_genes``); where
    its medians counted this input, read without it, a var both readings take as other genes is refused
    (``sources.check_one_gene_reading``)."""
    gene_ids, gene_symbols = source.gene_ids, source.gene_symbols
    if extractor is not None and hasattr(source, "var"):
        # the source's reading of the same names said which previous symbols are left unread (the extractor's leaves
        # those of its vocabulary's genes unread, the others give no tokens): said by both, a build logged it twice
        read_alike = len(set(var_sources(source.var, extractor))) == 1
        gene_ids, gene_symbols = resolve_genes(source.var, extractor, warn=not read_alike)
        if _medians_count(extractor, source):
            check_one_gene_reading(source.var, extractor, source.gene_ids, gene_ids, public_name(source.name))
    # A symbol the given vocabulary's table lacks and the gene table maps names a gene outside that vocabulary: it
    # gives no tokens and is not listed as unmapped, as an Ensembl ID outside the vocabulary is not (listed, 450 of
    # pbmc68k's genes read "no Ensembl ID" for a vocabulary of 300).
    outside = set() if extractor is None else set(symbol_to_ensembl(
        name for gene, symbol in zip(gene_ids, gene_symbols)
        if gene is None and symbol and (name := str(symbol).strip()) not in extractor.symbol_to_gene))
    if extractor is None:  # every mapped gene may enter the vocabulary built here
        check_one_column_per_gene([str(symbol or gene) for gene, symbol in zip(gene_ids, gene_symbols)], gene_ids)
    token_ids, usable, unmapped = [], [], []
    for i, (gene, symbol) in enumerate(zip(gene_ids, gene_symbols)):
        if gene is None and symbol and str(symbol).strip() in outside:
            token_ids.append(f"unmapped:{i}")
            usable.append(False)
        elif gene is None:
            unmapped.append(f"{symbol or i}\tno Ensembl ID")
            token_ids.append(f"unmapped:{i}")
            usable.append(False)
        else:
            token_ids.append(gene)
            usable.append(True)
    usable = np.array(usable, dtype=bool)
    if extractor is not None:  # refuses columns naming one of its vocabulary's genes, as it does at inference
        usable &= extractor.match_genes(token_ids).column_tokens >= 0
    symbols = unique_gene_names([s if s else f"unmapped:{i}" for i, s in enumerate(gene_symbols)])
    if unmapped:
        logger.warning("%d of %d genes have no usable Ensembl ID and give no tokens (see unmapped_genes.txt)",
                       len(unmapped), len(token_ids))
    return _Genes(token_ids, usable, symbols, unmapped)


def _medians_count(extractor: Cell2TextFeatureExtractor, source: Any) -> bool:
    """Whether the medians of `extractor` count cells of `source` (its ``median_inputs`` name the input): read by a
    pass without a feature extractor, whose reading of var the tokens must match (`sources.check_one_gene_reading`)."""
    inputs = read_median_inputs(extractor.vocabulary_source.get("median_inputs"), "the given feature extractor")
    return any(entry["input_sha256"] == source.input_sha256 for entry in inputs or ())


def _median_accumulator(options: BuildOptions, n_cells: int, n_genes: int) -> ExactGeneMedians | HistogramGeneMedians:
    method = options.medians
    if method == "auto":
        method = "exact" if n_cells <= EXACT_MEDIANS_MAX_CELLS else "histogram"
    if method == "exact":
        return ExactGeneMedians(n_genes)
    if method == "histogram":
        return HistogramGeneMedians(n_genes, bins_per_decade=options.bins_per_decade)
    raise ValueError(f"medians must be 'exact', 'histogram' or 'auto', got {options.medians!r}")


def _invalid_cells(chunk: sp.csr_matrix, input_values: str) -> np.ndarray:
    """Per cell of a chunk: holds a NaN, infinite or negative value (also after undoing log1p)."""
    data = np.asarray(chunk.data)
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(data) | (data < 0) | ~np.isfinite(expression_values(data, input_values))
    cell_of_entry = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))
    return np.bincount(cell_of_entry[bad], minlength=chunk.shape[0]) > 0


def _check_integer_counts(chunk: sp.csr_matrix, valid: np.ndarray, cell_ids: np.ndarray) -> None:
    """Refuse non-integer values in valid cells of a source declared as raw counts, naming the cells."""
    rows = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))
    fractional = (np.rint(chunk.data) != chunk.data) & valid[rows]
    if fractional.any():
        cells = list(dict.fromkeys(cell_ids[rows[fractional]]))
        raise ValueError(
            f"input_values='counts' but {len(cells)} cells hold non-integer values (e.g. {cells[:5]}); pass "
            "--input-values normalized (or log1p) for normalised data, or --layer / --use-raw (adata.raw, "
            "CELLxGENE's layout) with the raw counts."
        )


def pathway_max_rank(options: BuildOptions, n_genes: int) -> int:
    """AUCell's number of top ranks: `options.pathway_max_rank`, else 5% of the `n_genes` columns."""
    max_rank = default_max_rank(n_genes) if options.pathway_max_rank is None else options.pathway_max_rank
    if not is_integer_at_least(max_rank, 1) or max_rank > n_genes:
        raise ValueError(f"pathway_max_rank must be an integer between 1 and the number of genes ({n_genes}), got "
                         f"{max_rank!r}")
    return int(max_rank)


def _require_scorable_gene_sets(symbols: list[str], gene_sets: dict[str, list[str]], options: BuildOptions) -> None:
    """Refuse a library none of whose sets has `min_pathway_genes` of its genes among the data's gene symbols (a GMT
    of Entrez or Ensembl ids): every set scores 0, and the corpus, whose summary and card name the library, named no
    pathway in any cell (a warning per chunk said the sets were small)."""
    needed = max(options.min_pathway_genes, 1)
    if not (membership_matrix(symbols, gene_sets)[1] >= needed).any():
        library = [gene for genes in list(gene_sets.values())[:3] for gene in genes[:2]]
        raise ValueError(
            f"no gene set of {Path(str(options.gmt)).name} has {needed} of its genes among the data's gene symbols "
            f"(library genes e.g. {library}; the data's e.g. {symbols[:4]}), so no cell would name a pathway: pass "
            "a GMT of gene symbols (not Entrez or Ensembl ids) with --gmt, or --gmt none to build without pathways.")


def _gene_sets(genes: _Genes, options: BuildOptions) -> dict[str, list[str]] | None:
    """The pathway library's sets of the sizes asked for, checked against the data's genes before a pass over it."""
    pathway_max_rank(options, len(genes.symbols))
    gene_sets = read_gmt(options.gmt) if options.gmt else None
    if gene_sets and options.pathway_set_sizes:
        gene_sets = filter_set_sizes(gene_sets, *options.pathway_set_sizes)
    if gene_sets:  # written as the data names their genes: a renamed gene counts under either symbol
        gene_sets = sets_in_data_symbols(gene_sets, genes.token_ids, genes.symbols)
        _require_scorable_gene_sets(genes.symbols, gene_sets, options)
    return gene_sets


def _first_pass(source, reasons, genes, medians, gene_sets, options):
    """Pass 1: reject cells with invalid values / without counts / vocabulary genes, medians, pathways."""
    n_sets = options.n_pathways
    top = np.full((source.n_cells, n_sets), -1, dtype=np.int32)
    set_names = display_names(list(gene_sets)) if gene_sets else []
    cell_ids = source.obs.index.to_numpy(dtype=object)
    bar = tqdm(total=source.n_cells, unit="cells", desc="pass 1/2: medians, pathways", disable=not options.progress)
    max_rank = pathway_max_rank(options, len(genes.symbols))
    warned = False
    for start, chunk in source.iter_chunks(options.chunk_size):
        rows = np.arange(start, start + chunk.shape[0])
        pending = pd.isna(reasons[rows])
        invalid = pending & _invalid_cells(chunk, source.input_values)
        reasons[rows[invalid]] = "invalid_values"
        pending &= ~invalid
        if invalid.any():  # zero the invalid cells' rows so that totals and medians never see their values
            chunk = sp.csr_matrix(sp.diags((~invalid).astype(chunk.dtype)) @ chunk)
            chunk.eliminate_zeros()
        if source.input_values == "counts":
            _check_integer_counts(chunk, pending, cell_ids[rows])
        normalized, totals = normalize_total(chunk, source.input_values)
        no_counts = pending & (totals <= 0)
        reasons[rows[no_counts]] = "no_counts"
        expressed = (normalized.data > 0) & genes.usable[normalized.indices]
        cell_of_entry = np.repeat(np.arange(len(rows)), np.diff(normalized.indptr))
        n_vocab = np.bincount(cell_of_entry, weights=expressed, minlength=len(rows))
        no_vocab = pending & ~no_counts & (n_vocab == 0)
        reasons[rows[no_vocab]] = "no_vocabulary_gene"
        kept = np.flatnonzero(pending & ~no_counts & ~no_vocab)
        sub = normalized[kept]
        use = genes.usable[sub.indices]
        medians.update(sub.indices[use], sub.data[use])
        if set_names and len(kept):
            sub.data = np.log1p(sub.data)
            rows_of_entries = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
            genes_expressed = np.median(np.bincount(rows_of_entries[sub.data > 0], minlength=sub.shape[0]))
            if genes_expressed < max_rank and not warned:
                logger.warning(
                    "AUCell looks at each cell's top %d genes, but the median cell here expresses %d: the tied block "
                    "of its unexpressed genes fills the rest of those ranks and gives partly expressed sets credit. "
                    "Pass --pathway-max-rank below %d (R AUCell's advice: under the genes most cells express).",
                    max_rank, genes_expressed, genes_expressed)
                warned = True
            scores = aucell(sub, genes.symbols, gene_sets, max_rank=max_rank, chunk_size=512,
                            min_genes=options.min_pathway_genes, normalize=options.pathway_ranking == "normalized",
                            expressed_sets_only=True)
            top[rows[kept]] = top_set_indices(scores, n_sets)
        bar.update(chunk.shape[0])
    bar.close()
    return top, set_names


#: What to change when every cell is rejected for one reason (the reasons: processing/corpus.py, docs/corpus.md).
_REJECT_FIXES = {
    "missing_cell_type": "give each cell its cell type: obs cell_type_ontology_term_id (CL ids), or --obs-map "
    "YOUR_COLUMN=cell_type_ontology_term_id",
    "unmapped_cell_type": "cell type names need their Cell Ontology ids: obs cell_type_ontology_term_id (CL ids), or "
    "--obs-map YOUR_COLUMN=cell_type_ontology_term_id for a column that holds them",
    "unknown_cell_type_term": "cell_type_ontology_term_id must hold CL ids of the bundled Cell Ontology (e.g. "
    "CL:0000236)",
    "obsolete_cell_type_term": "these CL ids are obsolete in the bundled Cell Ontology with no CL replacement: map "
    "them to current CL terms (e.g. the nearest current parent type)",
    "invalid_values": "the matrix holds NaN, infinite or negative values: pass raw counts (a counts layer or "
    "adata.raw), not scaled data",
    "no_counts": "every cell's values are zero: check --layer",
    "no_vocabulary_gene": "no cell expresses a gene of the vocabulary: check the gene ids in var",
    "not_primary_data": "every cell's is_primary_data is False (published first in another dataset): build from "
    "that dataset, or pass --keep-non-primary",
}


def _not_primary(values: pd.Series) -> np.ndarray:
    """Cells whose is_primary_data says False (a bool, a number 0, or text "False" / "0" / "no"); a missing value
    counts as primary."""
    def says_false(value: Any) -> bool:
        if value is None or pd.isna(value):
            return False
        if isinstance(value, (bool, np.bool_, int, float, np.integer, np.floating)):
            return value == 0
        return str(value).strip().lower() in ("false", "0", "0.0", "no", "f")

    return values.map(says_false).to_numpy(dtype=bool)


def _reject_fix(reason: str) -> str:
    """What to change where every cell is rejected for `reason`."""
    if reason in _REJECT_FIXES:
        return _REJECT_FIXES[reason]
    if reason.startswith("wrong_ontology_"):
        return ("a field listed in --required-fields holds ids of another ontology (or not in its form, e.g. "
                "UBERON:0002048): check which obs column holds them (--obs-map)")
    if reason.startswith("obsolete_"):
        return "a field listed in --required-fields holds obsolete terms without a replacement: update them"
    if reason.startswith("tissue_type_"):
        return ("the cells are no donor's tissue (obs tissue_type: an organoid, a cell culture or a cell line), so "
                "their tissue is not stated: leave tissue out of --required-fields")
    if reason == "normal_joined_with_disease":
        return ("a field listed in --required-fields joins PATO:0000461 (normal) with diseases, which the CELLxGENE "
                "schema forbids: give PATO:0000461 alone for healthy donors, else the diseases' ids only")
    if reason == "sex_not_female_or_male":
        return ("the description states female or male only: give sex_ontology_term_id PATO:0000383 / PATO:0000384 "
                "where the labels mean those, or leave sex out of --required-fields")
    return "a field listed in --required-fields is missing"


def _require_kept_cells(reasons: np.ndarray) -> None:
    """Stop, naming the reasons and their fixes, when every cell is rejected (an empty corpus is no corpus)."""
    if len(reasons) and not pd.isna(reasons).any():
        counts = Counter(reasons.tolist())
        fixes = "; ".join(f"{reason}: {_reject_fix(reason)}" for reason in counts)
        raise ValueError(f"every cell was rejected ({dict(sorted(counts.items()))}), nothing to build; {fixes}")


def _warn_empty_splits(split_of: np.ndarray, kept_donors: np.ndarray, folds: bool) -> None:
    """Say which split got no cells, and why: whole donors go to one split, and a split's share of each cell type
    rounds to no cell when a type has few cells."""
    empty = [name for index, name in enumerate(SPLITS) if not (split_of == index).any()]
    if not empty:
        return
    donors = len({d for d in kept_donors if d is not None})
    why = (f"{donors} donor(s) cannot fill three donor-disjoint splits" if donors
           else f"{int((split_of >= 0).sum())} cells give no split a share of any cell type")
    fix = "use fewer folds" if folds else "pass --fold I/K for cross-validation"
    logger.warning("the %s split%s no cells: %s; %s, or add %s", " and ".join(empty),
                   " has" if len(empty) == 1 else "s have", why, fix, "donors" if donors else "cells")


def _shard_record(source: Any) -> dict[str, str]:
    """{"shard": "i/N"} for a source of which `--shard i/N` kept one shard, else {} (all of it)."""
    return {"shard": "/".join(map(str, source.shard))} if getattr(source, "shard", None) else {}


def _kept_by(options: BuildOptions) -> dict:
    """The rejection rules of a build that choose its cells, as summary.json records them: `required_fields`,
    `keep_non_primary`. The fields are sorted: given in another order they choose the same cells (a join compares
    them)."""
    return {"required_fields": sorted(set(options.required_fields)), "keep_non_primary": options.keep_non_primary}


def _median_cells(options: BuildOptions, source: Any) -> dict:
    """What chose the cells a build's medians count and read their values, as summary.json records each: its
    rejection rules, the ontologies that knew their cell types (an unknown or obsolete term is rejected), how obs
    values were read, and what the matrix holds (`input_values`: log1p values are counted after expm1). The histogram
    and a build's own feature extractor record it, so that the join can refuse shards whose cells other rules chose
    or whose values were read otherwise (a first pass with other --required-fields or --input-values, or another
    version of the package)."""
    return {**_kept_by(options), "ontology_versions": ontology_versions(), "obs_cleaning": OBS_CLEANING,
            "input_values": source.input_values}


def _build_extractor(source: Any, genes: _Genes, medians, options: BuildOptions) -> Cell2TextFeatureExtractor:
    """The extractor of this build's own medians; it records their input (`vocabulary_source["median_inputs"]`, as
    the histogram merge does), so that a join of shards tokenized with it refuses the cells of other inputs."""
    values = medians.medians()
    found = {genes.token_ids[i]: float(values[i]) for i in np.flatnonzero(genes.usable & np.isfinite(values))}
    if not found:
        raise ValueError("no gene is expressed in any kept cell; nothing to build a vocabulary from")
    median_input = {"input_sha256": source.input_sha256, "source": public_name(source.name), **_shard_record(source),
                    **_median_cells(options, source)}
    return Cell2TextFeatureExtractor.from_gene_medians(
        found, model_input_size=options.model_input_size or DEFAULT_MODEL_INPUT_SIZE,
        num_expression_bins=options.expression_bins,
        source_details={"median_inputs": median_inputs_record([median_input])})


def _second_pass(source, plan: _CellPlan, genes: _Genes, extractor, writer, options: BuildOptions) -> None:
    """Pass 2: tokens, descriptions and rows of kept cells, streamed to their split's file."""
    lab = {c: plan.labels[c].to_numpy(dtype=object) for c in plan.labels.columns}
    kept, split_of, top = plan.kept, plan.split_of, plan.top_pathways
    ids = source.obs.index.to_numpy(dtype=object)
    names = np.array(plan.pathway_names + [""], dtype=object)
    bar = tqdm(total=source.n_cells, unit="cells", desc="pass 2/2: tokens, descriptions", disable=not options.progress)
    for start, chunk in source.iter_chunks(options.chunk_size):
        local = np.flatnonzero(kept[start : start + chunk.shape[0]])
        bar.update(chunk.shape[0])
        if not len(local):
            continue
        rows = start + local
        ranked = extractor.tokenize(chunk[local], genes.token_ids, input_values=source.input_values,
                                    skip_empty_cells=True, chunk_size=options.chunk_size)
        if len(ranked.skipped_cells):
            raise RuntimeError(f"internal error: {len(ranked.skipped_cells)} kept cells have no tokens")
        pathways = [tuple(p for p in names[t] if p) for t in top[rows]]
        columns = {c: v[rows] for c, v in lab.items()}
        columns["cell_id"], columns["pathways"] = ids[rows], pathways
        columns["description"] = [
            describe(ct, ct_id, ti, sx, di, ag, pw)
            for ct, ct_id, ti, sx, di, ag, pw in zip(
                columns["cell_type"], columns["cell_type_ontology_term_id"], columns["tissue"], columns["sex"],
                columns["disease"], columns["age_group"], pathways)
        ]
        for s, split in enumerate(SPLITS):
            members = np.flatnonzero(split_of[rows] == s)
            if len(members):
                starts = ranked.offsets[members]
                lengths = ranked.offsets[members + 1] - starts
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                take = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
                bins = None if ranked.value_bins is None else ranked.value_bins[take]
                writer.write(split, {c: [v[m] for m in members] if isinstance(v, list) else v[members]
                                     for c, v in columns.items()}, ranked.tokens[take], offsets, bins)
    bar.close()


def _assign_corpus_splits(labels: pd.DataFrame, kept: np.ndarray, cell_ids: pd.Index, options: BuildOptions
                          ) -> tuple[np.ndarray, str]:
    """Each input cell's split (its index in SPLITS; -1 for rejected cells) and what the split went by ("donor", or
    "cell" where no kept cell names its donor, with a warning)."""
    split_of = np.full(len(kept), -1, dtype=np.int8)
    kept_labels = labels["cell_type"].to_numpy(dtype=object)[kept]
    kept_donors = labels["donor_id"].to_numpy(dtype=object)[kept]
    if options.fold is None:
        split_of[kept] = assign_splits(kept_labels, kept_donors, options.fractions, options.seed, cell_ids[kept],
                                       hashed=options.hashed_splits)
    else:
        split_of[kept] = assign_fold_splits(kept_labels, kept_donors, *options.fold, options.seed, cell_ids[kept])
    _warn_empty_splits(split_of, kept_donors, options.fold is not None)
    split_by = "donor" if any(d is not None for d in kept_donors) else "cell"
    if split_by == "cell":
        logger.warning("no cell has a donor_id: cells are split one by one (stratified by cell type), so one donor's "
                       "cells can be in train and test and test figures read optimistic; if a column names the donor, "
                       "pass --obs-map YOUR_COLUMN=donor_id")
    return split_of, split_by


def _label_counts(labels: pd.DataFrame, kept: np.ndarray, split_of: np.ndarray) -> dict:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for column in LABEL_FIELD_NAMES:
        counts[column] = {}
        for s, split in enumerate(SPLITS):
            values = labels[column].to_numpy(dtype=object)[kept & (split_of == s)]
            counted = Counter(v for v in values if v is not None and v == v)
            counts[column][split] = dict(sorted(counted.items(), key=lambda kv: (-kv[1], kv[0])))
    return counts


def _left_out_counts(labels: pd.DataFrame, kept: np.ndarray) -> dict[str, int]:
    """Kept cells per reason a field's value was left out of their record and text (`resolve_labels`)."""
    counted = Counter(v for field in METADATA_FIELDS if f"{field}_left_out" in labels.columns
                      for v in labels[f"{field}_left_out"].to_numpy(dtype=object)[kept] if v is not None)
    return dict(sorted(counted.items()))


#: CELLxGENE's obs `suspension_type` values that `_suspension_counts` counts ("na", its third, is a missing value).
SUSPENSION_TYPES = ("cell", "nucleus")


def _suspension_counts(suspension_types: pd.Series, kept: np.ndarray) -> dict[str, int]:
    """Kept cells per obs `suspension_type` (CELLxGENE: "cell", or "nucleus" for single-nucleus RNA-seq; "na" and
    missing values are not counted), read in lower case as obs `tissue_type` is. Nuclei are described as their cell
    type, as cells are, and train beside them: warned about, so that they are not mixed in without a word (the
    column was not read). Values outside CELLxGENE's are counted as given and warned about, naming CELLxGENE's:
    "nuclei" (and "Nucleus", before it was read in lower case) was counted apart, with no warning nor card section."""
    counts = Counter(v.lower() for v in suspension_types.map(clean).to_numpy(dtype=object)[kept] if v is not None)
    if other := sorted(set(counts) - set(SUSPENSION_TYPES)):
        logger.warning("obs suspension_type holds values other than CELLxGENE's (%s, na): %s; summary.json counts "
                       "their cells under these values, and nuclei among them are neither warned about nor shown "
                       "in the dataset card: write %s", ", ".join(SUSPENSION_TYPES), other[:5],
                       " or ".join(map(repr, SUSPENSION_TYPES)))
    if counts.get("nucleus"):
        logger.warning("%d of the %d kept cells are nuclei (obs suspension_type 'nucleus': single-nucleus RNA-seq); "
                       "their descriptions state the cell type CELLxGENE annotates, as a cell's do ('This sample "
                       "consists of a B cell'), and they train beside the cells (summary.json counts them under "
                       "suspension_types); to keep them apart, build from the cells you want: --obs-filter \"... and "
                       "suspension_type == 'cell'\" for a SOMA source, a subset of an h5ad", counts["nucleus"],
                       int(kept.sum()))
    return dict(sorted(counts.items()))


def _ontology_ids(labels: pd.DataFrame, kept: np.ndarray) -> tuple[dict, dict]:
    """(field -> {label: id} of known ontology terms, field -> {unknown id: cells}) over the kept cells.

    Unknown ids never enter the label -> id table (one bad id must not relabel a whole corpus). A label the kept
    cells state without a known id (given without one, or with an unknown one) enters it with the id None: the
    descriptions state it, so the decoder must be able to choose it (it never was: "COVID-19" given without an id
    was trained on and then described as a healthy donor).
    A label naming two known terms is ambiguous (the text could not be mapped back to one id):
    a ValueError names the terms and example cells.
    """
    table, unknown = {}, {}
    for name in ONTOLOGY_FIELDS:
        pairs = labels.loc[kept, [name, f"{name}_ontology_term_id"]].dropna()
        ids = pairs[f"{name}_ontology_term_id"]
        known = ids.isin([i for i in ids.unique() if is_known_term_of(name, i)])  # per distinct id
        unknown[name] = {str(k): int(v) for k, v in ids[~known].value_counts().sort_index().items()}
        distinct = pairs[known].drop_duplicates()
        clashes = distinct[distinct[name].duplicated(keep=False)]
        if len(clashes):
            label = clashes[name].iloc[0]
            terms = sorted(clashes.loc[clashes[name] == label, f"{name}_ontology_term_id"])
            examples = {t: pairs.index[pairs[f"{name}_ontology_term_id"] == t][:3].tolist() for t in terms}
            raise ValueError(
                f"{name} label {label!r} names {len(terms)} known terms {terms} (cells e.g. {examples}); one label "
                f"must name one term: correct the {name}_ontology_term_id of those cells or drop them."
            )
        named = dict(zip(distinct[name], distinct[f"{name}_ontology_term_id"]))
        stated = labels.loc[kept, name].dropna().unique()
        table[name] = dict(sorted({**{label: None for label in stated}, **named}.items()))
        if unknown[name]:
            logger.warning("%d cells have %s ids unknown to the bundled ontologies %s; they are left out of the "
                           "label -> id table", sum(unknown[name].values()), name, list(unknown[name])[:5])
    return table, {k: v for k, v in unknown.items() if v}


def _top_pathways_by_cell_type(labels: pd.DataFrame, kept: np.ndarray, top: np.ndarray,
                               set_names: list[str]) -> dict:
    """`corpus.top_pathways_by_cell_type` of the kept cells (`top`: indices into `set_names`, -1 for none)."""
    names = np.array([*set_names, ""], dtype=object)
    return top_pathways_by_cell_type(labels["cell_type"].to_numpy(dtype=object)[kept],
                                     (tuple(name for name in names[row] if name) for row in top[kept]))


def _check_source(source: Any) -> None:
    """Refuse a source without cells or genes, or with repeated cell ids, naming the fix."""
    if source.n_cells == 0:
        raise ValueError(f"source {source.name!r} has no cells (after the obs filter and shard); nothing to build.")
    if len(source.gene_ids) == 0:
        raise ValueError(f"source {source.name!r} has no genes (var is empty); pass a matrix with gene columns.")
    duplicated = source.obs.index[source.obs.index.duplicated()]
    if len(duplicated):
        raise ValueError(
            f"{len(duplicated)} cell ids appear more than once (e.g. {list(dict.fromkeys(duplicated))[:5]}); each "
            "cell needs a unique id: make them unique first (AnnData.obs_names_make_unique())."
        )


def _is_corpus_folder(path: Path) -> bool:
    """A folder this builder wrote (both files; another tool's summary.json alone let --overwrite delete a thesis)."""
    return (path / "summary.json").is_file() and (path / "dataset_dict.json").is_file()


def _staging_dir(out: Path, overwrite: bool) -> Path:
    """A fresh folder next to ``out`` to build into; refuses a non-empty ``out`` unless it may be replaced."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; pass a folder path.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"--out {out} is not empty; pass --overwrite (BuildOptions(overwrite=True)) to replace the corpus "
                "there, or choose a new folder."
            )
        if not _is_corpus_folder(out):
            raise FileExistsError(
                f"--out {out} holds files but no corpus (summary.json and dataset_dict.json); refusing to replace "
                "it even with --overwrite: choose a new or empty folder."
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))


def _check_options(options: BuildOptions) -> None:
    """Refuse settings that contradict each other or are out of range, before the source is read (a seed or shard
    size that numpy or datasets refuse stopped a build after its passes over the data)."""
    if not is_integer_at_least(options.seed, 0):
        raise ValueError(f"seed must be an integer >= 0, got {options.seed!r}")
    if not is_integer_at_least(options.chunk_size, 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {options.chunk_size!r}")
    if not is_integer_at_least(options.min_pathway_genes, 1):  # -2 built as 1 did and was recorded as -2
        raise ValueError(f"min_pathway_genes must be an integer >= 1, got {options.min_pathway_genes!r}")
    check_max_shard_size(options.max_shard_size)
    if options.repo_id is not None:  # pushed after the build: refused by the Hub hours in
        check_repo_id(options.repo_id)
    if options.pathway_ranking not in ("normalized", "raw"):
        raise ValueError(f"pathway_ranking must be 'normalized' or 'raw', got {options.pathway_ranking!r}")
    if isinstance(options.gmt, str) and not options.gmt:  # `--gmt "$UNSET"` built without pathways, exit 0
        raise ValueError("gmt='' names no gene-set library: give a GMT file, or gmt=None (--gmt none) to build "
                         "without pathways")
    if options.gmt is None:  # the settings were ignored, exit 0
        ignored = [field.name for field in fields(options)
                   if field.name in PATHWAY_OPTIONS and getattr(options, field.name) != field.default]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} {'sets' if len(ignored) == 1 else 'set'} how pathways are scored, "
                             "and gmt=None builds without pathways: leave them out, or give a gene-set library (gmt)")
    if options.fold is not None:
        if options.hashed_splits:
            raise ValueError("BuildOptions: hashed_splits and fold exclude each other (folds are dealt from the "
                             "whole input).")
        check_fold(*options.fold)


def build_corpus(source: Any, out_dir: str | Path, options: BuildOptions | None = None) -> dict:
    """Build the corpus of ``source`` into ``out_dir``; returns the summary (also in summary.json).

    The corpus is written to a staging folder next to ``out_dir`` and moved into place only
    when complete: a failed or interrupted build leaves nothing behind, and an existing non-empty ``out_dir``
    is replaced only with ``options.overwrite`` (and only when it holds a corpus), also when another build
    published there while this one ran (`output_files.publish_folder`).
    """
    options = options or BuildOptions()
    _check_options(options)  # before any pass over the data (a Census build's first pass takes hours)
    given = options.feature_extractor
    if given is not None and options.expression_bins and options.expression_bins != given.num_expression_bins:
        raise ValueError(
            f"expression_bins={options.expression_bins} but the given feature extractor has num_expression_bins="
            f"{given.num_expression_bins}; a given extractor decides the bins, so leave expression_bins at 0 (for "
            "sharded value-aware corpora, merge the histograms with python -m processing.gene_medians "
            "--expression-bins N)."
        )
    if given is not None and options.model_input_size not in (None, given.model_input_size):
        raise ValueError(  # it was ignored: the corpus was tokenized with the given extractor's
            f"model_input_size={options.model_input_size} but the given feature extractor has model_input_size="
            f"{given.model_input_size}; a given extractor decides the tokens per cell: leave model_input_size out (or "
            "save the extractor with the size you want: extractor.model_input_size = N; extractor.save_pretrained(...))."
        )
    _check_source(source)
    out = Path(out_dir).absolute()
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # removed again on failure
    staging = _staging_dir(out, options.overwrite)
    try:
        summary = _build(source, staging, options)
        # Without a repo (not published yet) the card loads the corpus from the folder it is moved to.
        write_dataset_card(staging, options.repo_id, folder=out.name)
        publish_folder(staging, out, options.overwrite,
                       fix="pass --overwrite (BuildOptions(overwrite=True)) to replace the corpus there")
    finally:
        if staging.exists():
            shutil.rmtree(staging)
            for folder in created:  # deepest first; only folders this build made and left empty
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    logger.info("corpus %s: %d cells in, splits %s, rejected %s", summary["name"], summary["num_cells_in"],
                summary["splits"], summary["rejected"])
    return summary


def _build(source: Any, out: Path, options: BuildOptions) -> dict:
    """Both passes into the (staging) folder ``out``; returns the summary."""
    labels, reasons = resolve_labels(source.obs, options.required_fields)
    if not options.keep_non_primary:
        reasons[pd.isna(reasons) & _not_primary(source.obs["is_primary_data"])] = "not_primary_data"
    genes = _genes(source, options.feature_extractor)
    if not genes.usable.any():
        raise ValueError(
            f"none of the {len(genes.token_ids)} genes has an Ensembl ID{' in the given vocabulary' if options.feature_extractor else ''} "
            "(see the gene names in var); pass Ensembl IDs or HGNC symbols (var index or feature_id / feature_name)."
        )
    gene_sets = _gene_sets(genes, options)
    medians = _median_accumulator(options, source.n_cells, len(genes.token_ids))
    _require_kept_cells(reasons)  # labels: before a pass over the data
    top, set_names = _first_pass(source, reasons, genes, medians, gene_sets, options)
    _require_kept_cells(reasons)  # values
    extractor = options.feature_extractor or _build_extractor(source, genes, medians, options)
    if isinstance(medians, HistogramGeneMedians):
        medians.save(out / "median_histogram.npz", genes.token_ids, source.name, source.shard or (0, 1),
                     source.input_sha256, _median_cells(options, source))
    kept = pd.isna(reasons)
    cell_ids = source.obs.index.astype(str)
    split_of, split_by = _assign_corpus_splits(labels, kept, cell_ids, options)
    ontology_term_ids, unknown_terms = _ontology_ids(labels, kept)
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        writer = SplitWriter(Path(tmp), SPLITS, value_aware=extractor.num_expression_bins > 0)
        _second_pass(source, _CellPlan(labels, kept, split_of, top, set_names), genes, extractor, writer, options)
        fingerprints = writer.close()
        writer.save(out, options.max_shard_size)
    extractor.save_pretrained(str(out / "feature_extractor"))
    rejects = pd.DataFrame(dict(zip(REJECTS_COLUMNS, (cell_ids[~kept], reasons[~kept]))))
    rejects.to_csv(out / REJECTS_FILE, index=False)
    (out / UNMAPPED_GENES_FILE).write_text("".join(f"{line}\n" for line in genes.unmapped), encoding="utf-8")
    summary = {
        "name": options.name or source.name,
        "source": source.name,
        "num_cells_in": int(source.n_cells),
        "splits": dict(writer.counts),
        "rejected": dict(sorted(Counter(rejects["reason"]).items())),
        **_kept_by(options),  # the rejection rules: shards to join must share them
        "obs_cleaning": OBS_CLEANING,  # how obs values were read (donor ids): shards to join must share it
        "left_out": _left_out_counts(labels, kept),
        "suspension_types": _suspension_counts(source.obs["suspension_type"], kept),
        "label_counts": _label_counts(labels, kept, split_of),
        "gene_vocabulary_size": len(extractor.gene_medians),
        "pathway_library": Path(options.gmt).name if options.gmt else None,
        **({"pathway_ranking": f"AUCell, {options.pathway_ranking}", "pathway_set_sizes": options.pathway_set_sizes,
            "pathway_max_rank": pathway_max_rank(options, len(genes.symbols)),
            "min_pathway_genes": options.min_pathway_genes, "pathway_gene_matching": PATHWAY_GENE_MATCHING,
            "pathways_per_cell": options.n_pathways, "pathway_sets": len(set_names),
            "top_pathways_by_cell_type": _top_pathways_by_cell_type(labels, kept, top, set_names)} if set_names else {}),
        "seed": options.seed,
        "split_by": split_by,
        "hashed_splits": options.hashed_splits,
        **({"fold": {"fold": options.fold[0], "num_folds": options.fold[1]}} if options.fold else {}),
        "ontology_term_ids": ontology_term_ids,
        "unknown_ontology_term_ids": unknown_terms,
        "input_values": source.input_values,
        **({"census_version": source.census_version} if getattr(source, "census_version", None) else {}),
        "expression_bins": extractor.num_expression_bins,
        "unmapped_genes": len(genes.unmapped),
        # the medians the tokens were ranked with: the given feature extractor's (its vocabulary source), not the
        # ones this build accumulated (they were recorded as exact, bound 0, for a histogram-merged extractor)
        **({"median_method": "given feature extractor", "median_relative_error_bound": None,
            "vocabulary_source": extractor.vocabulary_source} if options.feature_extractor is not None else
           {"median_method": type(medians).__name__, "median_relative_error_bound": medians.relative_error_bound}),
        "fingerprints": fingerprints,
        "ontology_versions": ontology_versions(),
        "input_sha256": source.input_sha256,  # which input (its cells and genes), for joining shards
        **_shard_record(source),
    }
    if sum(summary["splits"].values()) + len(rejects) != source.n_cells:
        raise RuntimeError("internal error: kept + rejected cells do not add up to the input")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------- CLI


def parse_obs_map(items: Sequence[str] | None) -> dict[str, str]:
    """The --obs-map OLD=NEW items as the source's obs_map (old column name -> new)."""
    mapping = {}
    for item in items or []:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ValueError(f"--obs-map expects OLD=NEW (an obs column and its CELLxGENE name), got {item!r}")
        mapping[old] = new
    return mapping


def _part(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) with 0 <= I < N."""
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(index), int(count)


def make_source(args: argparse.Namespace, stack: contextlib.ExitStack) -> Any:
    """The source named on the command line (preset, h5ad file or SOMA experiment).

    A SOMA experiment (and the Census) is opened as a context manager on ``stack``: it stays
    open for both passes and is closed when the caller's ``with`` block ends.
    """
    from processing import presets, sources

    obs_map = parse_obs_map(args.obs_map)
    if args.preset:
        return presets.PRESETS[args.preset]()
    if args.h5ad:
        return sources.h5ad_source(args.h5ad, backed=args.backed, layer=args.layer, use_raw=args.use_raw,
                                   input_values=args.input_values, obs_map=obs_map)
    census_version = None
    if args.soma == "census":
        try:
            import cellxgene_census
        except ImportError:
            raise SystemExit("--soma census needs the cellxgene-census package: pip install cellxgene-census") from None
        census_version = args.census_version
        census = stack.enter_context(cellxgene_census.open_soma(census_version=census_version))
        experiment = census["census_data"][args.census_organism]
        name = f"CELLxGENE Census {census_version} ({args.census_organism})"
    else:
        import tiledbsoma

        experiment = stack.enter_context(tiledbsoma.Experiment.open(args.soma))
        name = args.soma
    return sources.SomaSource(experiment=experiment, measurement=args.soma_measurement, x_name=args.soma_x,
                              input_values=args.input_values, obs_value_filter=args.obs_filter, obs_map=obs_map,
                              name=name, census_version=census_version)


_SOMA_OPTIONS = ("input_values", "obs_map", "obs_filter", "soma_measurement", "soma_x")
#: The options each source reads (the others are refused with it, not ignored): a preset is fixed; the Census
#: release and organism apply to `--soma census` only (another experiment is opened as it is).
SOURCE_OPTIONS = {
    "preset": (),
    "h5ad": ("backed", "layer", "use_raw", "input_values", "obs_map"),
    "soma": _SOMA_OPTIONS,
    "soma census": (*_SOMA_OPTIONS, "census_version", "census_organism"),
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _refuse_unread_source_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An argparse error for a source option the chosen source does not read (`SOURCE_OPTIONS`): it was ignored."""
    source = next(kind for kind in ("preset", "h5ad", "soma") if getattr(args, kind))
    if source == "soma" and args.soma == "census":
        source = "soma census"
    ignored = [_flag(dest) for dest in dict.fromkeys(d for options in SOURCE_OPTIONS.values() for d in options)
               if dest not in SOURCE_OPTIONS[source] and getattr(args, dest) != parser.get_default(dest)]
    if ignored:  # `--h5ad ... --obs-filter "tissue == 'lung'"` built a corpus of every cell, exit 0
        reads = ", ".join(map(_flag, SOURCE_OPTIONS[source])) or "no source option (it is built as it ships)"
        parser.error(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to --{source}, which "
                     f"reads {reads}"
                     + ("; filter the AnnData first (adata[adata.obs.tissue == 'lung'].write_h5ad(...)) and build "
                        "from that file" if "--obs-filter" in ignored and source == "h5ad" else ""))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from processing import presets, sources

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", choices=sorted(presets.PRESETS))
    what.add_argument("--h5ad", help="h5ad file (CELLxGENE schema obs; raw counts in X or --layer)")
    what.add_argument("--soma", help="TileDB-SOMA experiment URI, or 'census' (needs cellxgene-census)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--backed", action="store_true", help="open the h5ad backed and read it in row chunks")
    parser.add_argument("--layer", help="AnnData layer holding the expression (default X)")
    parser.add_argument("--use-raw", action="store_true",
                        help="read adata.raw.X and its genes (adata.raw.var): CELLxGENE's layout for raw counts")
    parser.add_argument("--input-values", choices=("counts", "normalized", "log1p"), default="counts")
    parser.add_argument("--obs-map", nargs="*", action="extend", metavar="OLD=NEW",
                        help="rename obs columns to CELLxGENE names (repeatable)")
    parser.add_argument("--census-version", default=sources.DEFAULT_CENSUS_VERSION,
                        help="Census release to build from with --soma census (recorded in the summary and card)")
    parser.add_argument("--census-organism", default="homo_sapiens", help="Census organism with --soma census")
    parser.add_argument("--soma-measurement", default="RNA")
    parser.add_argument("--soma-x", default="raw", help="X layer of the SOMA measurement")
    parser.add_argument("--obs-filter", default=sources.DEFAULT_SOMA_FILTER, help="SOMA obs value filter")
    parser.add_argument("--gmt", default=str(DEFAULT_GMT), help="gene-set library (GMT); 'none' to skip pathways")
    parser.add_argument("--pathway-ranking", choices=("normalized", "raw"), default="normalized",
                        help="rank sets by AUC / best possible AUC (default) or by raw AUCell AUC (the paper's)")
    parser.add_argument("--pathway-set-sizes", type=positive_int, nargs=2, metavar=("MIN", "MAX"),
                        default=list(DEFAULT_SET_SIZES), help="keep library sets of MIN to MAX genes")
    parser.add_argument("--min-pathway-genes", type=positive_int, default=5,
                        help="gene sets with fewer genes present score 0")
    parser.add_argument("--pathway-max-rank", type=int, default=None,
                        help="AUCell's top ranks per cell (default: 5%% of the genes); keep it below the genes most "
                             "cells express")
    parser.add_argument("--token-dictionary", help="Geneformer token dictionary (.pkl), with --gene-median-file")
    parser.add_argument("--gene-median-file", help="Geneformer gene median dictionary (.pkl)")
    parser.add_argument("--feature-extractor", help="directory of a saved Cell2TextFeatureExtractor to use as given")
    parser.add_argument("--medians", choices=("auto", "exact", "histogram"), default="auto")
    parser.add_argument("--model-input-size", type=int, default=None,
                        help=f"gene tokens per cell (default {DEFAULT_MODEL_INPUT_SIZE}; with --feature-extractor or "
                             "--token-dictionary: theirs)")
    parser.add_argument("--expression-bins", type=int, default=0, metavar="B",
                        help="value-aware corpus: also store each gene's per-cell expression bin (1..B); 0: rank only")
    parser.add_argument("--required-fields", nargs="*", default=["cell_type"], choices=METADATA_FIELDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=positive_int, default=2048)
    parser.add_argument("--shard", metavar="I/N", type=_part, help="build only shard I (0-based) of N contiguous cell ranges")
    parser.add_argument("--keep-non-primary", action="store_true",
                        help="keep cells whose is_primary_data is False (by default they are rejected, as the Census "
                             "filter does: the same cell is published again in another dataset)")
    parser.add_argument("--hashed-splits", action="store_true",
                        help="each donor's split (each cell's, without donors) from a hash of its id and --seed, the "
                             "same in every shard: needed where shards share donors (docs/corpus.md); split sizes are "
                             "then only near 80/10/10 and a rare cell type may miss train")
    parser.add_argument("--fold", metavar="I/K", type=_part,
                        help="k-fold cross-validation: fold I (0-based) of K is the test split, validation comes from "
                             "the other folds (the same --seed gives the same folds for every I)")
    parser.add_argument("--max-shard-size", default="500MB", help="largest Arrow shard per split (e.g. 500MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace the corpus already in --out")
    parser.add_argument("--name", help="corpus name (summary, card)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="push the corpus and its card to this dataset repo")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    _refuse_unread_source_options(parser, args)
    pathway_options = [_flag(dest) for dest in PATHWAY_OPTIONS
                       if dest in vars(args) and getattr(args, dest) != parser.get_default(dest)]
    if args.gmt == "none" and pathway_options:  # no pathways are scored: they were ignored, exit 0
        parser.error(f"{', '.join(pathway_options)} {'sets' if len(pathway_options) == 1 else 'set'} how pathways are "
                     "scored, and --gmt none builds without pathways: leave them out, or give a gene-set library with "
                     "--gmt")
    if args.hashed_splits and args.fold:
        parser.error("--hashed-splits and --fold exclude each other (folds are dealt from the whole input)")
    if bool(args.token_dictionary) != bool(args.gene_median_file):
        parser.error("--token-dictionary and --gene-median-file go together")
    if args.token_dictionary and args.feature_extractor:  # the dictionaries were used, the extractor ignored
        parser.error("--feature-extractor and --token-dictionary/--gene-median-file each give the vocabulary: pass "
                     "one of them")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("modeling_cell2text").setLevel(logging.WARNING)
    args = parse_args(argv)
    with refused_input_as_one_line("build_corpus", as_command_line):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    """Build (and push) the corpus the parsed command line asks for; returns its summary."""
    extractor = None
    if args.token_dictionary:
        extractor = Cell2TextFeatureExtractor.from_geneformer_dictionaries(args.token_dictionary, args.gene_median_file)
    elif args.feature_extractor:
        given = Path(args.feature_extractor)
        if not (given / "preprocessor_config.json").exists() and (given / "feature_extractor").is_dir():
            raise ValueError(f"--feature-extractor {given} is a corpus folder: pass its feature extractor, "
                             f"--feature-extractor {given / 'feature_extractor'}")
        extractor = Cell2TextFeatureExtractor.from_pretrained(args.feature_extractor)
    options = BuildOptions(
        seed=args.seed, fold=args.fold, chunk_size=args.chunk_size, gmt=None if args.gmt == "none" else args.gmt,
        min_pathway_genes=args.min_pathway_genes, pathway_max_rank=args.pathway_max_rank,
        pathway_ranking=args.pathway_ranking,
        pathway_set_sizes=tuple(args.pathway_set_sizes),
        medians=args.medians, model_input_size=args.model_input_size, expression_bins=args.expression_bins,
        feature_extractor=extractor,
        required_fields=tuple(args.required_fields), name=args.name, repo_id=args.push_to_hub,
        progress=not args.no_progress, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
        hashed_splits=args.hashed_splits, keep_non_primary=args.keep_non_primary,
    )
    if args.shard and not args.hashed_splits:
        logger.warning("--shard without --hashed-splits: this shard's splits are decided from its own cells, so a "
                       "donor whose cells other shards also hold can land in two splits of the joined corpus; build "
                       "every shard with --hashed-splits")
    with contextlib.ExitStack() as stack:
        source = make_source(args, stack)
        if args.shard:
            source.select_shard(*args.shard)
        try:
            with sigterm_as_exception():
                summary = build_corpus(source, args.out, options)
        except (Terminated, KeyboardInterrupt):
            raise SystemExit(f"build_corpus: stopped; nothing was written to {args.out}") from None
    if args.push_to_hub:
        publish_corpus(args.out, args.push_to_hub)
    kept = sum(summary["splits"].values())
    print(f"cells in: {summary['num_cells_in']}; kept: {kept} {summary['splits']}; "
          f"rejected: {sum(summary['rejected'].values())} {summary['rejected']}; out: {args.out}")
    return summary


if __name__ == "__main__":
    main()
