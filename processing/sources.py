"""Cell sources for the corpus builder: AnnData (in memory or backed h5ad) and TileDB-SOMA / Census.

A source exposes the same four things whatever it reads:

* ``obs``: a DataFrame in CELLxGENE schema column names (renamed with ``obs_map``), one row per
  cell in source order, index = cell ids;
* ``gene_ids`` (unversioned Ensembl ID per column, None where a gene has none) and
  ``gene_symbols`` (symbol per column, for gene-set scoring);
* ``input_values``: what the matrix holds ("counts", "normalized" or "log1p");
* ``iter_chunks(chunk_size)``: ``(first_row, CSR chunk)`` pairs covering every row once;

and ``var``, the gene table the gene IDs were read from, which a build tokenized by a given feature extractor reads
again by that extractor's vocabulary (``resolve_genes``), as inference reads the same file.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from modeling_cell2text.cell_inputs import anndata_matrix
from modeling_cell2text.gene_ids import (
    ENSEMBL_VAR_COLUMNS,
    REPEATED_WARNING,
    SUPERSEDED_WARNING,
    SYMBOL_VAR_COLUMNS,
    ensembl_gene_id,
    superseded_symbols,
    var_gene_source,
)
from modeling_cell2text.gene_table import ensembl_to_symbol, repeated_symbols, symbol_index
from modeling_cell2text.rank_value import as_csr

if TYPE_CHECKING:
    from modeling_cell2text.feature_extraction_cell2text import Cell2TextFeatureExtractor

logger = logging.getLogger(__name__)

#: CELLxGENE schema obs columns the builder reads (label and ontology term id pairs, ids; `tissue_type`: whether the
#: tissue is a donor's, or an organoid, cell culture or cell line, schema 5+; `suspension_type`: "cell", or "nucleus"
#: for single-nucleus RNA-seq, counted in summary.json).
SCHEMA_COLUMNS = (
    "cell_type", "cell_type_ontology_term_id", "tissue", "tissue_ontology_term_id", "tissue_type",
    "disease", "disease_ontology_term_id", "sex", "sex_ontology_term_id",
    "development_stage", "development_stage_ontology_term_id", "donor_id", "dataset_id", "assay", "is_primary_data",
    "suspension_type",
)
#: The paper's Census filter: primary data with a known cell type, tissue and disease.
DEFAULT_SOMA_FILTER = (
    "is_primary_data == True and cell_type_ontology_term_id != 'unknown' "
    "and tissue_ontology_term_id != 'unknown' and disease_ontology_term_id != 'unknown'"
)


def resolve_genes(
    var: pd.DataFrame, feature_extractor: Cell2TextFeatureExtractor | None = None, *, warn: bool = True
) -> tuple[list[str | None], list[str | None]]:
    """(Ensembl ID or None, symbol or None) per var row; symbols map through the GENCODE table, or through
    ``feature_extractor``'s tables where the corpus is tokenized by a given one.

    The gene IDs are read where inference reads them (``gene_ids.var_gene_source``: Ensembl IDs from the index or a
    column, else the symbol source naming the most genes), and mapped name by name by the feature extractor's rule
    (``match_genes``): an Ensembl ID is read as one, any other name as a symbol (``modeling_cell2text.gene_ids``), so
    a symbol among Ensembl IDs, or an Ensembl ID among symbols (CELLxGENE names an unnamed gene by its ID), gives the
    gene inference gives it. With Ensembl IDs, the symbols (for gene-set scoring) are a ``feature_name``-like
    column's, else (no such column, or a name missing in it) the table's, else the name as given. Unmapped genes stay
    None and are reported by the caller; previous symbols left unread (``gene_ids.superseded_symbols``) are logged
    unless ``warn`` is False.

    With a ``feature_extractor`` (``--feature-extractor``: Geneformer's vocabulary, or shards' merged medians), var's
    symbol source is the one naming the most of its vocabulary genes and symbols map by its table, as that extractor
    reads the same file at inference; by the whole GENCODE table, an index of pseudogene symbols could be read beside
    a ``feature_name`` column of the vocabulary's genes, which inference reads. Where that extractor's medians counted
    this input, read without it, and the two readings name other genes, the build refuses
    (``check_one_gene_reading``).
    """
    if feature_extractor is None:
        _, values, are_ensembl = var_gene_source(var, symbol_index())
        symbol_to_gene, gene_symbols = symbol_index(), None
    else:
        _, values, are_ensembl = feature_extractor.var_gene_source(var)
        symbol_to_gene, gene_symbols = feature_extractor.symbol_to_gene, feature_extractor.gene_symbols
    names = [value.strip() for value in values]
    mapping = {name: symbol_to_gene[name] for name in names
               if ensembl_gene_id(name) is None and name in symbol_to_gene}
    superseded = superseded_symbols(names, mapping, gene_symbols or ensembl_to_symbol(mapping.values()))
    repeated = repeated_symbols(names, mapping)  # GOLGA8M beside GOLGA8M-1: inference reads neither
    for unread, warning in ((superseded, SUPERSEDED_WARNING), (repeated, REPEATED_WARNING)):
        if unread and warn:
            logger.warning(warning, len(unread), sorted(unread)[:5])
    superseded |= repeated
    ids = [ensembl_gene_id(name) or (None if name in superseded else mapping.get(name)) for name in names]
    if not are_ensembl:
        return ids, list(values)
    table = ensembl_to_symbol([gene_id for gene_id in ids if gene_id])
    symbol_column = next((c for c in SYMBOL_VAR_COLUMNS if c in var.columns), None)
    given = var[symbol_column] if symbol_column is not None else [None] * len(ids)
    # a missing name read "nan", a name no library gene has: the gene counted in none of its sets; a row that names
    # no gene ("": a 10x antibody "CD4") has no symbol either, else it counted in CD4's sets where that gene is absent
    return ids, [None if not name else str(given_name) if pd.notna(given_name) and str(given_name).strip()
                 else table.get(gene_id) or (name if ensembl_gene_id(name) is None else None)
                 for given_name, gene_id, name in zip(given, ids, names)]


def var_sources(var: pd.DataFrame, feature_extractor: Cell2TextFeatureExtractor) -> tuple[str, str]:
    """Where var's genes are read (``"index"`` or a column) without `feature_extractor` (the source's reading, by the
    whole GENCODE table) and with it (by its vocabulary), as `resolve_genes` chooses them."""
    return var_gene_source(var, symbol_index())[0], feature_extractor.var_gene_source(var)[0]


def check_one_gene_reading(var: pd.DataFrame, feature_extractor: Cell2TextFeatureExtractor,
                           counted: Sequence[str | None], tokenized: Sequence[str | None], name: str) -> None:
    """Refuse a ``var`` whose genes a pass without a feature extractor (the medians' pass, ``--medians histogram``)
    read as ``counted`` and a rebuild with ``feature_extractor``, whose medians it counted, reads as ``tokenized``,
    where the two chose other symbol sources of var (`resolve_genes`: the one naming the most genes of the whole
    GENCODE table, and the one naming the most vocabulary genes) that name other genes: the medians counted a
    column's values as one gene and the tokens rank them as another (an index of unexpressed symbols beside a
    ``feature_name`` column naming vocabulary genes in another order), exit 0."""
    counted_source, tokenized_source = var_sources(var, feature_extractor)
    if counted_source == tokenized_source:
        return
    differ = [j for j, (was, gene) in enumerate(zip(counted, tokenized))
              if gene is not None and gene != was and gene in feature_extractor.gene_medians]
    if differ:
        names = {source: list(var.index if source == "index" else var[source])
                 for source in (counted_source, tokenized_source)}
        examples = "; ".join(f"column {j}: {str(names[counted_source][j])!r} = {counted[j]} counted, "
                             f"{str(names[tokenized_source][j])!r} = {tokenized[j]} tokenized" for j in differ[:3])
        raise ValueError(
            f"var of {name} names its genes in two ways that disagree: the medians' pass, without a feature extractor, "
            f"read them from var {counted_source} (by the whole gene table), this build with the feature extractor "
            f"of those medians, as inference does, from var {tokenized_source} (by its vocabulary), and {len(differ)} "
            f"columns are other genes in the two (e.g. {examples}): the medians counted other genes than the tokens "
            "rank. Give var one naming of its genes (e.g. adata.var_names = adata.var['feature_name'], or drop the "
            "column that names other genes), then build the medians' pass again (--medians histogram), merge the "
            "histograms and rebuild.")


def standardize_obs(obs: pd.DataFrame, obs_map: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Rename columns to CELLxGENE names (``obs_map``: old -> new) and add missing schema columns as None."""
    obs_map = dict(obs_map or {})
    missing = [old for old in obs_map if old not in obs.columns]
    if missing:
        raise ValueError(f"obs_map names columns not in obs: {missing}; available: {list(obs.columns)}")
    unread = [new for new in obs_map.values() if new not in SCHEMA_COLUMNS]
    if unread:  # a misspelt target ("tissue_ontology_term") dropped the column it should have filled, silently
        raise ValueError(f"obs_map maps onto {unread}, which the builder does not read; map onto the CELLxGENE "
                         f"columns {list(SCHEMA_COLUMNS)}")
    targets = list(obs_map.values())
    twice = sorted({new for new in targets if targets.count(new) > 1})
    if twice:
        raise ValueError(f"obs_map maps several columns onto {twice}; map one column onto each name")
    # A mapped column takes the place of an obs column of its new name (the rename left both: "ValueError: 2").
    replaced = [new for old, new in obs_map.items() if new in obs.columns and new not in obs_map]
    if replaced:
        logger.warning("obs columns %s are replaced by the columns --obs-map maps onto them", replaced)
    obs = obs.drop(columns=replaced).rename(columns=obs_map)
    out = pd.DataFrame(index=obs.index.astype(str))
    for column in SCHEMA_COLUMNS:
        out[column] = obs[column].astype(object).to_numpy() if column in obs.columns else None
    return out


def input_sha256(obs: pd.DataFrame, gene_ids: Iterable[Any], first_rows: sp.csr_matrix | None = None,
                 matrix: str = "") -> str:
    """A checksum of an input's cells (obs: ids and every column, as text), genes and, where given, the values of
    its first rows, else the name of the `matrix` they are read from: tells inputs apart where their names are alike
    (two files named cells.h5ad, one Census release under two obs filters), their obs are (AnnData built from arrays
    numbers its cells 0, 1, ...) or their matrices differ (a SOMA experiment's X layers "raw" and "normalized", whose
    values it does not read: the medians of one joined shards tokenized from the other, exit 0)."""
    digest = hashlib.sha256(pd.util.hash_pandas_object(obs.astype(str), index=True).to_numpy().tobytes())
    for gene in gene_ids:
        digest.update(str(gene).encode() + b"\n")
    if first_rows is not None:
        for part in (first_rows.indptr, first_rows.indices, first_rows.data):
            digest.update(np.ascontiguousarray(part).tobytes())
    if matrix:
        digest.update(b"matrix\0" + matrix.encode())
    return digest.hexdigest()


def shard_range(n_rows: int, index: int, count: int) -> range:
    """Rows of shard ``index`` (0-based) of ``count`` near-equal contiguous ranges."""
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}), got {index}")
    return range(n_rows * index // count, n_rows * (index + 1) // count)


def check_whole_inputs(parts: Mapping[str, tuple[str, str, int, int]], what: str, fix: str) -> None:
    """Refuse `parts` (a file -> (its input's identity, the input's name, shard index, shard count)) that do not add
    up to whole inputs: one shard of an input given twice, shards of two `--shard i/N` splits of it, or one missing.
    `what` names the files ("histograms", "corpus shards"); `fix` says what to give for a missing shard. Counted
    twice or left out, cells weigh on medians, or stand in a corpus, as they do not in their input."""
    by_input: dict[str, dict[tuple[int, int], str]] = {}
    names: dict[str, str] = {}
    for path, (identity, names[identity], index, count) in parts.items():
        shards = by_input.setdefault(identity, {})
        if (index, count) in shards:
            raise ValueError(f"{path} and {shards[index, count]} both count shard {index}/{count} of the same input "
                             f"({names[identity]!r}: the same cells and genes): give each shard once.")
        shards[index, count] = path
    for identity, shards in by_input.items():
        counts = {count for _, count in shards}
        if len(counts) > 1:
            raise ValueError(f"the {what} of {names[identity]!r} are shards of different splits ({sorted(shards)}): "
                             "give the shards of one --shard i/N build.")
        count = counts.pop()
        missing = sorted(set(range(count)) - {index for index, _ in shards})
        if missing:
            shown = ", ".join(f"{i}/{count}" for i in missing)
            # the missing shards given, as another input of its name: the input_sha256 of every input changes where
            # the builder reads other obs columns (suspension_type), so shards of two versions name two inputs
            alike = sorted(path for other, given in by_input.items() if other != identity
                           and names[other] == names[identity] for (index, n), path in given.items()
                           if n == count and index in missing)
            if alike:
                raise ValueError(
                    f"the {what} of {names[identity]!r} lack its shards {shown}; those given ({', '.join(alike)}) "
                    "are of an input of that name read as other cells or genes: shards built by different "
                    "versions of the corpus builder (which reads other obs columns), or from another file of that "
                    "name or another --obs-map or --obs-filter; build every shard from one input with one version.")
            raise ValueError(f"the {what} of {names[identity]!r} lack its shards {shown}: {fix}.")


class AnnDataSource:
    """An AnnData object (in memory or backed) read in row chunks from ``X``, a layer, or ``adata.raw``
    (``use_raw=True``: CELLxGENE's layout, raw counts in ``raw.X`` with their genes in ``raw.var``)."""

    shard: tuple[int, int] | None = None  # (index, count) where select_shard kept one shard
    input_sha256: str  # which input, whatever its name: its cells and genes (`input_sha256`) before any shard

    def __init__(
        self,
        adata: Any,
        *,
        name: str = "anndata",
        layer: str | None = None,
        use_raw: bool = False,
        input_values: str = "counts",
        obs_map: Mapping[str, str] | None = None,
        dataset_id: str | None = None,
    ) -> None:
        # Refused input: ValueErrors, which the command lines end with one line naming their options (as_command_line)
        if layer is not None and layer not in adata.layers:
            raise ValueError(f"layer={layer!r} is not in adata.layers (its layers: {list(adata.layers.keys())}); "
                             "pass layer=... naming the one that holds the counts, or leave it out to read X "
                             "(use_raw=True reads adata.raw)")
        if use_raw and (layer is not None or adata.raw is None):
            raise ValueError(f"use_raw=True reads adata.raw.X: it cannot be combined with layer={layer!r}"
                             if layer is not None else
                             "use_raw=True but adata.raw is None; read X (leave use_raw out) or pass layer=...")
        self.adata, self.layer, self.use_raw, self.name = adata, layer, use_raw, name
        self.input_values = input_values
        self.obs = standardize_obs(adata.obs, obs_map)
        if dataset_id is not None:
            self.obs["dataset_id"] = self.obs["dataset_id"].where(self.obs["dataset_id"].notna(), dataset_id)
        self.var = adata.raw.var if use_raw else adata.var
        self.gene_ids, self.gene_symbols = resolve_genes(self.var)
        self.rows = range(adata.n_obs)
        first_rows = next(self.iter_chunks(64))[1] if adata.n_obs else None
        self.input_sha256 = input_sha256(self.obs, self.gene_ids, first_rows)

    @property
    def n_cells(self) -> int:
        return len(self.rows)

    def select_shard(self, index: int, count: int) -> None:
        """Keep only shard ``index`` of ``count`` contiguous, near-equal row ranges (``--shard i/n``)."""
        self.rows = shard_range(self.adata.n_obs, index, count)
        self.shard = (index, count)
        self.obs = self.obs.iloc[self.rows.start : self.rows.stop]

    def iter_chunks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield ``(first_row, CSR rows)`` over the cells (backed files are read chunk by chunk)."""
        matrix = anndata_matrix(self.adata, self.layer, self.use_raw)  # refuses slices anndata reads wrongly
        for start in range(0, self.n_cells, chunk_size):
            first = self.rows.start + start
            block = matrix[first : min(first + chunk_size, self.rows.stop)]
            yield start, as_csr(block)


def h5ad_source(path: str | Path, *, backed: bool = False, **kwargs: Any) -> AnnDataSource:
    """An h5ad file, read into memory or opened backed (``backed=True``: read in row chunks); a file that is no
    readable h5ad is refused naming it (`tl.read_h5ad`)."""
    from modeling_cell2text import tl

    adata = tl.read_h5ad(path, backed="r" if backed else None)
    kwargs.setdefault("name", Path(path).name)
    kwargs.setdefault("dataset_id", Path(path).stem)
    return AnnDataSource(adata, **kwargs)


#: The Census release built from by default (``--census-version``): a long-term-support release, so
#: a build can be repeated; recorded in the corpus summary and card.
DEFAULT_CENSUS_VERSION = "2025-01-30"
#: Cell id columns, best first: Census's ``observation_joinid`` (it has no ``obs_id``), then
#: the ``obs_id`` that ``tiledbsoma.io.from_anndata`` writes; else ``soma_joinid``.
SOMA_CELL_ID_COLUMNS = ("observation_joinid", "obs_id")


class SomaSource:
    """A TileDB-SOMA experiment (e.g. CELLxGENE Census), filtered on obs, read in row chunks.

    Pass an opened ``experiment`` (e.g. ``census["census_data"]["homo_sapiens"]`` inside
    ``with cellxgene_census.open_soma(census_version=...) as census``), or a ``uri`` to open. Only
    the obs and var columns the builder uses are read; X is read in blocks of cells through an
    axis query. ``census_version`` is recorded in the corpus summary and card.
    """

    shard: tuple[int, int] | None = None  # (index, count) where select_shard kept one shard
    input_sha256: str  # which input, whatever its name: its cells and genes (`input_sha256`) before any shard

    def __init__(
        self,
        uri: str | None = None,
        *,
        experiment: Any = None,
        measurement: str = "RNA",
        x_name: str = "raw",
        obs_value_filter: str | None = DEFAULT_SOMA_FILTER,
        input_values: str = "counts",
        obs_map: Mapping[str, str] | None = None,
        name: str | None = None,
        census_version: str | None = None,
    ) -> None:
        import tiledbsoma

        if experiment is None:
            if uri is None:
                raise ValueError("pass a SOMA experiment uri or an opened experiment")
            experiment = tiledbsoma.Experiment.open(uri)
        self.experiment, self.measurement, self.x_name = experiment, measurement, x_name
        self.name = name or str(uri or "SOMA experiment")
        self.input_values = input_values
        self.obs_value_filter = obs_value_filter
        self.census_version = census_version
        obs_columns = set(experiment.obs.schema.names)
        id_column = next((c for c in SOMA_CELL_ID_COLUMNS if c in obs_columns), None)
        used = ["soma_joinid", *([id_column] if id_column else []),
                *(c for c in dict.fromkeys([*SCHEMA_COLUMNS, *(obs_map or {})]) if c in obs_columns)]
        self.obs_columns_read = used
        obs = experiment.obs.read(value_filter=obs_value_filter, column_names=used).concat().to_pandas()
        obs = obs.sort_values("soma_joinid", kind="stable")
        self.joinids = obs["soma_joinid"].to_numpy(np.int64)
        ids = obs[id_column or "soma_joinid"].astype(str)
        if id_column == "observation_joinid" and ids.duplicated().any() and "dataset_id" in obs.columns:
            ids = obs["dataset_id"].astype(str) + "/" + ids  # unique within a dataset, not across datasets
        obs.index = pd.Index(ids.to_numpy(), name=None)
        self.obs = standardize_obs(obs, obs_map)
        var_schema = set(experiment.ms[measurement].var.schema.names)
        var_used = [c for c in ("soma_joinid", "var_id", *ENSEMBL_VAR_COLUMNS, *SYMBOL_VAR_COLUMNS) if c in var_schema]
        var = experiment.ms[measurement].var.read(column_names=var_used).concat().to_pandas()
        var_joinids = var["soma_joinid"].to_numpy(np.int64)
        self._column_of = np.full(int(var_joinids.max()) + 1 if len(var) else 0, -1, dtype=np.int64)
        self._column_of[var_joinids] = np.arange(len(var))
        if "var_id" in var.columns and "feature_id" not in var.columns:
            var = var.rename(columns={"var_id": "feature_id"})
        var = var.drop(columns="soma_joinid")
        self.n_genes = len(var)
        self.var = var
        self.gene_ids, self.gene_symbols = resolve_genes(var)
        self.input_sha256 = input_sha256(self.obs, self.gene_ids, matrix=f"{measurement}/X/{x_name}")
        logger.info("SOMA source %s: %d cells pass the obs filter %r", self.name, len(self.joinids), obs_value_filter)

    @property
    def n_cells(self) -> int:
        return len(self.joinids)

    def select_shard(self, index: int, count: int) -> None:
        """Keep only shard ``index`` of ``count`` contiguous ranges of the filtered cells."""
        rows = shard_range(len(self.joinids), index, count)
        self.shard = (index, count)
        self.joinids = self.joinids[rows.start : rows.stop]
        self.obs = self.obs.iloc[rows.start : rows.stop]

    def iter_chunks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield ``(first_row, CSR rows)`` over the filtered cells in soma_joinid order, one axis query per block."""
        import tiledbsoma

        for start in range(0, self.n_cells, chunk_size):
            ids = self.joinids[start : start + chunk_size]
            query = self.experiment.axis_query(self.measurement, obs_query=tiledbsoma.AxisQuery(coords=(ids,)))
            with query:
                table = query.X(self.x_name).tables().concat()
            rows = np.searchsorted(ids, table.column("soma_dim_0").to_numpy())
            cols = self._column_of[table.column("soma_dim_1").to_numpy()]
            data = table.column("soma_data").to_numpy()
            chunk = sp.csr_matrix((data, (rows, cols)), shape=(len(ids), self.n_genes))
            chunk.sum_duplicates()
            yield start, chunk
