"""Per-gene non-zero medians of normalised counts, computed in one streaming pass.

Geneformer divides each gene's normalised count (``count / cell total * 10,000``) by the gene's
non-zero median over the pretraining corpus. Two accumulators compute those medians chunk by
chunk:

* :class:`ExactGeneMedians` keeps every non-zero value: exact (numpy's median, the mean of the
  two middle values for an even count); memory grows with the number of non-zeros, so it is for
  small corpora.
* :class:`HistogramGeneMedians` keeps one histogram per gene over log-spaced bins
  (``bins_per_decade`` per factor of 10 between ``min_value`` and ``max_value``). Memory is fixed
  (genes x bins counters), histograms of shards add up (:meth:`merge`), and the estimate (each
  middle value replaced by the geometric centre of its bin) has a relative error of at most
  half a bin width in log space: ``|estimate / median - 1| <= 10 ** (1 / (2 * bins_per_decade)) - 1``
  (1.16% for 100 bins per decade), for values inside ``[min_value, max_value]``. Values outside
  are clamped to the edge bins (normalised counts lie in (0, 10,000]; the default range is wider).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from modeling_cell2text.rank_value import INPUT_VALUES, TARGET_SUM
from processing.sources import check_whole_inputs

logger = logging.getLogger(__name__)



def expression_values(data: np.ndarray, input_values: str) -> np.ndarray:
    """Stored values as linear-scale expression (float64): expm1 undoes log1p input."""
    if input_values not in INPUT_VALUES:
        raise ValueError(f"input_values must be one of {INPUT_VALUES}, got {input_values!r}")
    data = np.asarray(data, dtype=np.float64)
    return np.expm1(data) if input_values == "log1p" else data


def normalize_total(matrix: sp.csr_matrix, input_values: str) -> tuple[sp.csr_matrix, np.ndarray]:
    """(cells x genes CSR of ``value / cell total * 10,000``, cell totals) for one chunk.

    Cells with a zero total keep all-zero rows (the caller rejects them).
    """
    matrix = sp.csr_matrix(matrix)
    values = expression_values(matrix.data, input_values)
    lengths = np.diff(matrix.indptr)
    totals = np.bincount(np.repeat(np.arange(matrix.shape[0]), lengths), weights=values, minlength=matrix.shape[0])
    totals = totals.astype(np.float64, copy=False)  # bincount of no values (a chunk of empty cells) is int64
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    normalized = sp.csr_matrix((values * np.repeat(scale, lengths), matrix.indices, matrix.indptr), shape=matrix.shape)
    return normalized, totals


class ExactGeneMedians:
    """Exact non-zero medians: keeps every (gene, value) pair it is given."""

    def __init__(self, n_genes: int) -> None:
        self.n_genes = int(n_genes)
        self._genes: list[np.ndarray] = []
        self._values: list[np.ndarray] = []

    relative_error_bound = 0.0

    def update(self, genes: np.ndarray, values: np.ndarray) -> None:
        """Add values (> 0) of the given gene columns; zeros and negatives are ignored."""
        keep = values > 0
        self._genes.append(np.asarray(genes, dtype=np.int32)[keep])
        self._values.append(np.asarray(values, dtype=np.float64)[keep])

    def medians(self) -> np.ndarray:
        """Median per gene (NaN for genes never seen non-zero)."""
        genes = np.concatenate(self._genes) if self._genes else np.zeros(0, np.int32)
        values = np.concatenate(self._values) if self._values else np.zeros(0)
        order = np.lexsort((values, genes))
        genes, values = genes[order], values[order]
        counts = np.bincount(genes, minlength=self.n_genes)
        starts = np.cumsum(counts) - counts
        result = np.full(self.n_genes, np.nan)
        seen = counts > 0
        low = values[(starts + (counts - 1) // 2)[seen]]
        high = values[(starts + counts // 2)[seen]]
        result[seen] = (low + high) / 2.0
        return result


class HistogramGeneMedians:
    """Approximate non-zero medians from per-gene log-spaced histograms (fixed memory, mergeable)."""

    def __init__(
        self, n_genes: int, bins_per_decade: int = 100, min_value: float = 1e-6, max_value: float = 1e5
    ) -> None:
        if not 0 < min_value < max_value or bins_per_decade < 1:
            raise ValueError("need 0 < min_value < max_value and bins_per_decade >= 1")
        self.n_genes = int(n_genes)
        self.bins_per_decade = int(bins_per_decade)
        self.min_value, self.max_value = float(min_value), float(max_value)
        self.n_bins = int(math.ceil(math.log10(max_value / min_value) * bins_per_decade))
        self.counts = np.zeros((self.n_genes, self.n_bins), dtype=np.int64)

    @property
    def relative_error_bound(self) -> float:
        """Largest ``|estimate / median - 1|`` for values inside the histogram range."""
        return 10 ** (1 / (2 * self.bins_per_decade)) - 1

    def _bins(self, values: np.ndarray) -> np.ndarray:
        position = (np.log10(values) - math.log10(self.min_value)) * self.bins_per_decade
        return np.clip(np.floor(position), 0, self.n_bins - 1).astype(np.int64)

    def bin_centres(self) -> np.ndarray:
        """Geometric centre of each bin."""
        return self.min_value * 10 ** ((np.arange(self.n_bins) + 0.5) / self.bins_per_decade)

    def update(self, genes: np.ndarray, values: np.ndarray) -> None:
        """Add values (> 0) of the given gene columns; zeros and negatives are ignored."""
        keep = values > 0
        keys = np.asarray(genes, dtype=np.int64)[keep] * self.n_bins + self._bins(values[keep])
        np.add.at(self.counts.reshape(-1), keys, 1)  # a view: counts is C-contiguous

    def merge(self, other: HistogramGeneMedians) -> None:
        """Add another accumulator's counts (e.g. from another shard); same binning required."""
        same = (other.n_genes, other.bins_per_decade, other.min_value, other.max_value) == (
            self.n_genes, self.bins_per_decade, self.min_value, self.max_value)
        if not same:
            raise ValueError("cannot merge histograms with different genes or binning; build shards with the same settings")
        self.counts += other.counts

    def medians(self) -> np.ndarray:
        """Estimated median per gene (NaN for genes never seen non-zero)."""
        n = self.counts.sum(axis=1)
        cumulative = np.cumsum(self.counts, axis=1)
        centres = self.bin_centres()

        def value_at(rank: np.ndarray) -> np.ndarray:
            return centres[np.minimum((cumulative <= rank[:, None]).sum(axis=1), self.n_bins - 1)]

        result = (value_at((n - 1) // 2) + value_at(n // 2)) / 2.0
        result[n == 0] = np.nan
        return result

    def save(self, path: str | Path, gene_ids: list[str], source: str = "", shard: tuple[int, int] = (0, 1),
             input_sha256: str = "", kept_by: dict | None = None) -> None:
        """Write the histogram and its gene IDs (``.npz``) so shards can be merged later, with the input it counts
        (its name, and ``input_sha256``: which input, `sources.input_sha256` of its cells and genes; "": by the name) and
        which shard of it (``(index, count)``; ``(0, 1)``: all of it), which the merge checks, and ``kept_by``: what
        chose the cells it counts and read their values (`build_corpus._median_cells`: the rejection rules, ontology
        versions, obs reading and input_values, named as summary.json names them), which the merged feature extractor
        records for the join."""
        np.savez_compressed(
            path, counts=self.counts, gene_ids=np.asarray(gene_ids, dtype=str),
            binning=np.array([self.bins_per_decade, self.min_value, self.max_value], dtype=np.float64),
            source=np.asarray(source, dtype=str), shard=np.asarray(shard, dtype=np.int64),
            input_sha256=np.asarray(input_sha256, dtype=str),
            **({"kept_by": np.asarray(json.dumps(kept_by, sort_keys=True), dtype=str)} if kept_by is not None else {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> tuple[HistogramGeneMedians, list[str]]:
        """Read a histogram written by :meth:`save`; returns it and its gene IDs."""
        with open_histogram(path) as data:
            bins_per_decade, min_value, max_value = data["binning"].tolist()
            hist = cls(len(data["gene_ids"]), int(bins_per_decade), min_value, max_value)
            hist.counts[:] = data["counts"]
            return hist, data["gene_ids"].tolist()


#: The arrays every histogram file holds (`HistogramGeneMedians.save`; earlier versions wrote no shard or source).
HISTOGRAM_ARRAYS = ("counts", "gene_ids", "binning")


def open_histogram(path: str | Path) -> np.lib.npyio.NpzFile:
    """A histogram file (`HistogramGeneMedians.save`) opened for reading (close it: `with`). Another file is refused
    naming it: numpy's words spoke of pickled data, a truncated or empty file ended in a BadZipFile or EOFError
    traceback, arrays of another shape in numpy's broadcast error, and negative counts were merged."""
    problem = None
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile):  # "Cannot load file containing pickled data ...", no data
        data = None
    if isinstance(data, np.lib.npyio.NpzFile):
        try:
            problem = _histogram_problem(data)
        except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:  # a member that does not read
            problem = f"it does not read ({error})"
        if problem is None:
            return data
        data.close()
    raise ValueError(f"{path} is no gene-median histogram{f' ({problem})' if problem else ''}: give the "
                     "median_histogram.npz that build_corpus wrote into each shard's corpus folder.")


def _histogram_problem(data: np.lib.npyio.NpzFile) -> str | None:
    """What keeps the opened file `data` from being a histogram `HistogramGeneMedians.save` wrote, or None."""
    missing = [name for name in HISTOGRAM_ARRAYS if name not in data]
    if missing:
        return f"no {missing[0]} array"
    counts, genes, binning = data["counts"], data["gene_ids"], data["binning"]
    if binning.shape != (3,) or not np.issubdtype(binning.dtype, np.number):
        return f"binning of shape {binning.shape}, not 3 numbers"
    try:
        bins = HistogramGeneMedians(0, int(binning[0]), float(binning[1]), float(binning[2])).n_bins
    except (ValueError, OverflowError) as error:
        return f"binning {binning.tolist()}: {error}"
    if genes.ndim != 1 or counts.shape != (len(genes), bins):
        return f"counts of shape {counts.shape} for {genes.shape} gene ids and {bins} bins"
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        return "counts that are no non-negative integers"
    if "shard" in data and data["shard"].shape != (2,):
        return f"a shard of shape {data['shard'].shape}, not (index, count)"
    if "kept_by" in data:
        try:
            kept_by = json.loads(str(data["kept_by"]))
        except ValueError:
            kept_by = None
        if not isinstance(kept_by, dict):
            return f"kept_by {str(data['kept_by'])[:80]!r}, not the rejection rules as a JSON object"
    return None


def histogram_shard(path: str | Path) -> tuple[str, str, int, int] | None:
    """(which input: its checksum, else its name; its name; shard index; shard count) a histogram file records
    (`HistogramGeneMedians.save`); None for a file written before they were recorded."""
    with open_histogram(path) as data:
        if "shard" not in data:
            return None
        index, count = data["shard"].tolist()
        name = str(data["source"])
        identity = str(data["input_sha256"]) if "input_sha256" in data else ""
        return identity or name, name, index, count


def check_shards(paths: list[str | Path]) -> None:
    """Refuse histograms that do not add up to whole inputs: one given twice (the same counts, or the same shard of
    an input), or an input whose shards are not all given (`--shard i/N` for every i of one N). Counted twice or
    left out, cells weigh on the medians as they do not in the corpus, and every gene order built from them moves."""
    contents: dict[bytes, str] = {}
    for path in paths:
        with open_histogram(path) as data:
            key = data["counts"].tobytes() + "\0".join(data["gene_ids"].tolist()).encode()
        if key in contents:
            raise ValueError(f"{path} and {contents[key]} hold the same histogram: give each shard once.")
        contents[key] = str(path)
    tags = {str(path): histogram_shard(path) for path in paths}
    untagged = [path for path, tag in tags.items() if tag is None]
    if untagged:
        logger.warning("%s record no shard (written by an earlier version): whether every shard is given once is "
                       "not checked", untagged)
    names = {tag[0]: tag[1] for tag in tags.values() if tag is not None}
    mixed = sorted({name for identity, name in names.items() if identity != name} & set(names))
    if mixed:  # a name standing for an input only where a file records no checksum: shards of two versions
        raise ValueError(f"the histograms of {mixed} were written by two versions of the corpus builder (some record "
                         "no input checksum): rebuild the older shards.")
    check_whole_inputs({path: tag for path, tag in tags.items() if tag is not None}, "histograms",
                       "give every shard's median_histogram.npz")


def histogram_inputs(paths: list[str | Path]) -> list[dict] | None:
    """The inputs whose cells the histograms `paths` count, once each (``{"input_sha256": checksum, "source": its
    name as a card names it, never a machine path, and what chose the cells and read their values (their ``kept_by``:
    "required_fields", "keep_non_primary", "ontology_versions", "obs_cleaning", "input_values")}``): the merged feature
    extractor records them (``vocabulary_source["median_inputs"]``, `median_inputs_record`) so that the join can
    refuse shards whose cells are not those of its medians (a shard built without ``--medians histogram`` writes no
    file, and a shell glob skips it; a first pass that rejected other cells or read the values as another kind).
    Whole inputs (`check_shards` refuses others); None where a file records no input checksum or rules (an earlier
    version's)."""
    from hub_cards.render import public_name

    inputs: dict[str, dict] = {}
    for path in paths:
        tag = histogram_shard(path)
        with open_histogram(path) as data:
            kept_by = json.loads(str(data["kept_by"])) if "kept_by" in data else None
        if tag is None or tag[0] == tag[1] or kept_by is None:  # an input known by its name, cells by no rule
            return None
        entry = {"input_sha256": tag[0], "source": public_name(tag[1]), **kept_by}
        inputs.setdefault(json.dumps(entry, sort_keys=True), entry)
    return list(inputs.values())


#: The keys of a `median_inputs_record` entry that name its input; the others say what chose its cells and read its
#: values (`build_corpus._median_cells`), each compared with the same key of a shard's summary.json by the join.
MEDIAN_INPUT_NAMES = ("input_sha256", "source", "shard")


def median_inputs_record(entries: list[dict]) -> dict:
    """``vocabulary_source["median_inputs"]`` of the inputs `entries` (`histogram_inputs`' form): the rules every
    entry shares, once (``"rules"``), and each input's names and any rule it does not share (``"inputs"``). A
    Census-wide merge of 500 inputs repeated the same rules 500 times in the shipped preprocessor_config.json
    (329 KB; 92 KB with the rules once); `read_median_inputs` reads both forms back as entries."""
    shared = {key: value for key, value in entries[0].items()
              if key not in MEDIAN_INPUT_NAMES and all(key in entry and entry[key] == value for entry in entries)}
    return {"rules": shared, "inputs": [{key: value for key, value in entry.items() if key not in shared}
                                        for entry in entries]}


def read_median_inputs(record: object, where: str) -> list[dict] | None:
    """The entries (`histogram_inputs`' form: names and rules of each input) of a ``vocabulary_source
    ["median_inputs"]`` record: `median_inputs_record`'s, or the list of entries an earlier version wrote; None for
    none. A malformed record (a hand edit) is refused naming `where` (the feature extractor) and the fix: it ended
    in an AttributeError."""
    if record is None:
        return None
    problem = _median_inputs_problem(record)
    if problem is not None:
        raise ValueError(f"{where}'s vocabulary_source['median_inputs'] is malformed ({problem}): restore its "
                         "preprocessor_config.json, or merge the shards' histograms again (python -m "
                         "processing.gene_medians shard*/median_histogram.npz --out fe/) and rebuild the shards with "
                         "--feature-extractor fe/.")
    rules, inputs = (record["rules"], record["inputs"]) if isinstance(record, dict) else ({}, record)
    return [{**rules, **entry} for entry in inputs]


def _median_inputs_problem(record: object) -> str | None:
    """What keeps `record` from being a ``median_inputs`` record (`read_median_inputs`), or None."""
    if isinstance(record, dict):
        if set(record) != {"rules", "inputs"}:
            return f"an object of {sorted(record)[:5]}, not of rules and inputs"
        if not isinstance(record["rules"], dict):
            return f"rules {str(record['rules'])[:80]!r}, not an object"
        record = record["inputs"]
    if not isinstance(record, list) or not record:
        return f"inputs {str(record)[:80]!r}, not a list of them"
    for entry in record:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) for key in MEDIAN_INPUT_NAMES[:2]):
            return f"an input {str(entry)[:80]!r}, not an object with a text input_sha256 and source"
    return None


def merge_histogram_files(paths: list[str | Path]) -> dict[str, float]:
    """Merge shard histograms (genes aligned by ID) into gene -> median for genes seen non-zero; the shards are
    checked to add up to whole inputs first (`check_shards`)."""
    check_shards(paths)
    loaded = [HistogramGeneMedians.load(p) for p in paths]
    genes = sorted(set().union(*(ids for _, ids in loaded)))
    position = {g: i for i, g in enumerate(genes)}
    first = loaded[0][0]
    total = HistogramGeneMedians(len(genes), first.bins_per_decade, first.min_value, first.max_value)
    for hist, ids in loaded:
        aligned = HistogramGeneMedians(len(genes), hist.bins_per_decade, hist.min_value, hist.max_value)
        aligned.counts[[position[g] for g in ids]] = hist.counts
        total.merge(aligned)
    medians = total.medians()
    return {g: float(m) for g, m in zip(genes, medians) if np.isfinite(m)}


EXTRACTOR_FILE = "preprocessor_config.json"  # what a saved feature extractor folder holds


def main(argv: list[str] | None = None) -> None:
    """CLI: merge shard histograms into the corpus feature extractor."""
    from modeling_cell2text.feature_extraction_cell2text import DEFAULT_MODEL_INPUT_SIZE, Cell2TextFeatureExtractor
    parser = argparse.ArgumentParser(description="Merge per-shard gene-median histograms into a feature extractor.")
    parser.add_argument("histograms", nargs="+", help="median_histogram.npz files written by build_corpus shards")
    parser.add_argument("--out", required=True, help="directory for the merged feature extractor (new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a feature extractor folder at --out (never a folder holding anything else)")
    parser.add_argument("--model-input-size", type=int, default=DEFAULT_MODEL_INPUT_SIZE)
    parser.add_argument("--expression-bins", type=int, default=0,
                        help="expression bins per cell for a value-aware encoder (as build_corpus --expression-bins; "
                             "0: rank only). The shards rebuilt with this extractor take its bins")
    args = parser.parse_args(argv)
    if args.expression_bins < 0:
        parser.error(f"--expression-bins must be >= 0, got {args.expression_bins}")
    from modeling_cell2text.argument_types import refused_input_as_one_line
    from modeling_cell2text.output_files import OutputExistsError, check_new_output, publish_folder

    out = Path(args.out)
    try:  # before the merge: a merged extractor (or a corpus folder) at --out was replaced without a word
        check_new_output(out, args.overwrite, holds=EXTRACTOR_FILE)
    except OutputExistsError as error:
        parser.error(str(error))
    with refused_input_as_one_line("gene_medians"):
        medians = merge_histogram_files(args.histograms)
    inputs = histogram_inputs(args.histograms)
    extractor = Cell2TextFeatureExtractor.from_gene_medians(
        medians, model_input_size=args.model_input_size, num_expression_bins=args.expression_bins,
        source_details=None if inputs is None else {"median_inputs": median_inputs_record(inputs)})
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        extractor.save_pretrained(staging)
        publish_folder(staging, out, args.overwrite, holds=EXTRACTOR_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"merged {len(args.histograms)} histograms: {len(medians)} genes -> {args.out}")


if __name__ == "__main__":
    main()
