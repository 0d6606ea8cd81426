"""Cell2Text feature extractor: Geneformer's rank-value encoding of single-cell expression, as model inputs.

The extractor holds the gene vocabulary (token ids, medians, symbols) and turns cells into padded
``gene_input_ids``. Its parts live in small modules: ``rank_value`` (Geneformer's arithmetic and the vectorised
ranking, with the choices it documents), ``geneformer_dictionaries`` (reading Geneformer's pickles safely),
``cell_inputs`` (AnnData or matrix input) and ``gene_ids`` (which input gene is which vocabulary gene).
Genes outside the vocabulary are dropped, but counted and reported; a cell without any expressed vocabulary gene
is an error unless ``skip_empty_cells=True``. Unlike Geneformer's ``TranscriptomeTokenizer``, Ensembl IDs of earlier
releases are not mapped to the vocabulary's (its ``gene_mapping_file``): they are counted as unmatched; and input
genes naming one vocabulary gene are refused, not summed (its ``collapse_gene_ids=True``): map the IDs and sum the
duplicated columns first (docs/model.md, "Rank-value encoding", shows how with AnnData).

This file travels as remote code: it imports only numpy, transformers and its sibling modules; anndata objects
are recognised without importing anndata.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import BatchFeature, FeatureExtractionMixin

from .argument_types import is_integer_at_least, with_close_match
from .cell_inputs import (CELL_INPUT_NAMES, CELL_ROW_KEYS, empty_cells_error, format_cells,
                          resolve_input)
from .gene_ids import (REPEATED_WARNING, SUPERSEDED_WARNING, check_one_column_per_gene, ensembl_gene_id,
                       resolve_symbols, superseded_symbols, var_gene_source)
from .gene_table import repeated_symbols, vocabulary_symbols
from .geneformer_dictionaries import checked_vocabulary_source, load_geneformer_dictionaries, load_numeric_dict
from .rank_value import RankedCells, rank_matrix

logger = logging.getLogger(__name__)

PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"
SPECIAL_TOKENS = (PAD, MASK, CLS, EOS)
#: Geneformer V2's special token ids (its token dictionary); V1's holds only <pad> 0 and <mask> 1, its genes from 2.
GENEFORMER_V2_SPECIAL_IDS = {PAD: 0, MASK: 1, CLS: 2, EOS: 3}
_EXAMPLES = 5
#: Token ids must lie in [0, MAX_VOCAB_SIZE): lookup arrays are sized by the largest id (Geneformer: ~20,000-25,000).
MAX_VOCAB_SIZE = 2**22
#: Gene tokens per cell, special tokens included (Geneformer V2's input size).
DEFAULT_MODEL_INPUT_SIZE = 4096


class NoGeneMatchedError(ValueError):
    """None of the input genes is in the feature extractor's vocabulary (wrong species or gene-ID column)."""


@dataclass
class _GeneMatch:
    """How the input genes map to the vocabulary: token id per input column (-1: unused)."""

    column_tokens: np.ndarray
    column_medians: np.ndarray
    n_input: int
    n_matched: int
    unmatched_examples: list[str]


def unknown_settings_error(kind: str, unknown: set[str], known: Sequence[str]) -> TypeError:
    """The error for settings a saved config or a caller gives that `kind` does not have (transformers would keep
    them as unused attributes or drop them, so a misspelt setting would leave its default in force)."""
    hints = [with_close_match(name, known) for name in sorted(unknown)]
    return TypeError(f"{kind} has no setting {', '.join(hints)}; its settings are {sorted(known)}. Fix the "
                     "name in the saved config (or the call).")


def _is_integer(value: object) -> bool:
    return is_integer_at_least(value, -math.inf)


def _is_number(value: object) -> bool:
    return _is_integer(value) or isinstance(value, (float, np.floating))


def _is_string(value: object) -> bool:
    return isinstance(value, str)


def _checked_mapping(name: str, value: object, kind: str, fits) -> dict:
    """`value`, a setting that maps genes (or symbols) to `kind`; another shape is refused naming the setting: a
    list ended in an AttributeError, a token id 4.7 was read as 4 (another gene's token)."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must map genes to {kind}, got {type(value).__name__}; fix the saved config (or the "
                         "call).")
    wrong = next(((key, item) for key, item in value.items() if not fits(item)), None)
    if wrong is not None:
        raise ValueError(f"{name} must map genes to {kind}, found {wrong[0]!r}: {wrong[1]!r}; fix the saved config "
                         "(or the call).")
    return value


#: Each vocabulary mapping's values: what they are (for messages), the check, the conversion.
_VOCABULARY_RULES = {"gene_token_ids": ("token ids", _is_integer, int), "gene_medians": ("numbers", _is_number, float),
                     "gene_symbols": ("strings", _is_string, str), "symbol_to_gene": ("strings", _is_string, str)}


class _VocabularyMapping(dict):
    """A feature extractor's vocabulary mapping, read-only: its lookups are built from it when it is set, so an edit in
    place (``extractor.gene_medians[gene] = m``) ranked cells by the old values while ``save_pretrained`` wrote the
    new ones, exit 0. Copies and pickles as a dict does."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a feature extractor's vocabulary mapping (gene_token_ids, gene_medians, gene_symbols, "
                        "symbol_to_gene) cannot be edited in place: its lookups would keep the old values. Set a new "
                        "one, e.g. extractor.gene_medians = {**extractor.gene_medians, gene: median}.")

    __setitem__ = __delitem__ = __ior__ = update = pop = popitem = clear = setdefault = _refuse

    def __reduce__(self) -> tuple:
        return type(self), (dict(self),)


def _checked_vocabulary(name: str, value: object) -> _VocabularyMapping:
    """The vocabulary mapping `name` (a key of `_VOCABULARY_RULES`), checked, with str keys and converted values."""
    kind, fits, convert = _VOCABULARY_RULES[name]
    return _VocabularyMapping({str(k): convert(v) for k, v in _checked_mapping(name, value, kind, fits).items()})


class Cell2TextFeatureExtractor(FeatureExtractionMixin):
    """Turns expression matrices into Geneformer gene-token inputs (rank-value encoding).

    Args:
        gene_token_ids: Ensembl ID (unversioned) -> token id, plus the special tokens
            ``<pad>``, ``<mask>``, ``<cls>``, ``<eos>`` (Geneformer V2 uses 0, 1, 2, 3).
        gene_medians: Ensembl ID -> non-zero median of normalised counts in the pretraining
            corpus. Only genes with both a token id and a median are ranked.
        gene_symbols: Ensembl ID -> symbol for vocabulary genes (display; and symbol input when
            ``symbol_to_gene`` is not given).
        model_input_size: maximum number of tokens per cell, special tokens included.
        special_tokens: True for Geneformer V2 (``<cls>`` first, ``<eos>`` last), False for V1.
        min_gene_match_rate: below this fraction of input genes found in the vocabulary a
            warning is logged.
        num_expression_bins: 0 (default) for Geneformer's rank-value tokens only; B > 0 adds
            value-aware inputs, ``gene_value_ids``: each gene's per-cell expression bin in 1..B.
        symbol_to_gene: symbol -> Ensembl ID used to map symbol input, resolved by ``gene_ids.resolve_symbols``
            over the whole packaged gene table (as the corpus builder does); by default derived from
            ``gene_symbols`` with the same rule (a symbol several vocabulary genes carry maps to none).
        vocabulary_source: where the vocabulary came from (JSON-serialisable dict with a ``"kind"``):
            ``{"kind": "geneformer", "token_dictionary_sha256": ..., "gene_median_sha256": ...}``,
            ``{"kind": "corpus", ...}`` or ``{"kind": "unknown"}`` (the default, e.g. older configs).
    """

    def __init__(
        self,
        gene_token_ids: dict[str, int] | None = None,
        gene_medians: dict[str, float] | None = None,
        gene_symbols: dict[str, str] | None = None,
        model_input_size: int = DEFAULT_MODEL_INPUT_SIZE,
        special_tokens: bool = True,
        min_gene_match_rate: float = 0.5,
        num_expression_bins: int = 0,
        symbol_to_gene: dict[str, str] | None = None,
        vocabulary_source: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - _MIXIN_KEYS
        if unknown:
            raise unknown_settings_error("Cell2TextFeatureExtractor", unknown, _SETTINGS)
        kwargs.pop("feature_extractor_type", None)
        super().__init__(**kwargs)
        if gene_token_ids is None:
            gene_token_ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        self.gene_token_ids = _checked_vocabulary("gene_token_ids", gene_token_ids)
        self.gene_medians = _checked_vocabulary("gene_medians", gene_medians or {})
        self.gene_symbols = _checked_vocabulary("gene_symbols", gene_symbols or {})
        self.model_input_size = model_input_size
        self.special_tokens = special_tokens
        self.num_expression_bins = num_expression_bins
        self._check_layout()
        self.model_input_size, self.special_tokens = int(model_input_size), bool(special_tokens)
        self.num_expression_bins = int(num_expression_bins)
        self.min_gene_match_rate = float(min_gene_match_rate)
        self.vocabulary_source = checked_vocabulary_source(vocabulary_source)
        if symbol_to_gene is None:
            symbol_to_gene = resolve_symbols((gene, symbol, False) for gene, symbol in self.gene_symbols.items())
        self.symbol_to_gene = _checked_vocabulary("symbol_to_gene", symbol_to_gene)
        self._validate_config()
        self._build_lookups()

    def __setattr__(self, name: str, value: Any) -> None:
        """A vocabulary mapping (``gene_token_ids``, ``gene_medians``, ``gene_symbols``, ``symbol_to_gene``) set after
        construction is checked and the lookups are built again: ``extractor.gene_medians = new`` ranked by the old
        medians while ``save_pretrained`` wrote the new ones, exit 0. Editing a mapping in place is refused
        (``_VocabularyMapping``): set a new one."""
        if name in _VOCABULARY_RULES and "_token_medians" in self.__dict__:  # after construction
            before = getattr(self, name)
            super().__setattr__(name, _checked_vocabulary(name, value))
            try:
                self._check_layout()
                self._validate_config()
            except (TypeError, ValueError):
                super().__setattr__(name, before)  # refused: the extractor stays as it was
                raise
            self._build_lookups()
            return
        super().__setattr__(name, value)

    # -- construction -------------------------------------------------------------------------

    def _check_layout(self) -> None:
        """Refuse a ``model_input_size``, ``special_tokens`` or ``num_expression_bins`` that cannot lay out a cell's
        tokens (and bins), when built and again when cells are tokenized or padded (``extractor.model_input_size = N``
        after loading is how a size is changed): set to 2 with special tokens (0 without), every cell kept no gene
        and was skipped as empty, exit 0 with ``skip_empty_cells=True``; ``special_tokens = "false"`` kept
        ``<cls>``/``<eos>``; 300 expression bins (uint8) wrapped to 0..44."""
        fix = "fix the saved config (or the call, or the value set on the feature extractor)"
        if not _is_integer(self.model_input_size):  # int(2048.9) ran as 2048
            raise ValueError(f"model_input_size must be an integer, got {self.model_input_size!r}; {fix}.")
        if not isinstance(self.special_tokens, (bool, np.bool_)):  # bool("false") is True: <cls>/<eos> were kept
            raise TypeError(f"special_tokens must be True or False, got {self.special_tokens!r}; {fix}.")
        required = (PAD, CLS, EOS) if self.special_tokens else (PAD,)
        missing = [t for t in required if t not in self.gene_token_ids]
        if missing:
            raise ValueError(
                f"gene_token_ids lacks the special tokens {missing}; add them (Geneformer V2: <pad>=0, <mask>=1, "
                "<cls>=2, <eos>=3) or pass special_tokens=False for a V1 vocabulary"
            )
        if not _is_integer(self.num_expression_bins):
            raise ValueError(f"num_expression_bins must be an integer, got {self.num_expression_bins!r}; {fix}.")
        if not 0 <= self.num_expression_bins <= 255:
            raise ValueError(f"num_expression_bins must be in 0..255 (0: rank-value tokens only), got "
                             f"{self.num_expression_bins}; {fix}.")
        minimum = 3 if self.special_tokens else 1
        if self.model_input_size < minimum:
            raise ValueError(f"model_input_size must be >= {minimum} (one gene token"
                             f"{' besides <cls> and <eos>' if self.special_tokens else ''}), got "
                             f"{self.model_input_size}; {fix}.")

    def _validate_config(self) -> None:
        ids = list(self.gene_token_ids.values())
        if min(ids) < 0 or max(ids) >= MAX_VOCAB_SIZE:
            worst = next((t, i) for t, i in self.gene_token_ids.items() if not 0 <= i < MAX_VOCAB_SIZE)
            raise ValueError(
                f"token ids must lie in [0, {MAX_VOCAB_SIZE}) (MAX_VOCAB_SIZE; Geneformer's are 0..~25,000), found "
                f"{worst[0]!r}: {worst[1]}; fix the token dictionary or the gene_token_ids of the preprocessor config"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("gene_token_ids must map each token to a distinct id; fix the token dictionary")
        bad = [(g, m) for g, m in self.gene_medians.items() if not (math.isfinite(m) and m > 0)]
        if bad:
            raise ValueError(f"gene medians must be finite and > 0; {len(bad)} are not, e.g. {bad[:_EXAMPLES]}")

    def _build_lookups(self) -> None:
        """Private lookup tables (not saved): gene -> token, token -> median, symbol -> gene."""
        self._gene_to_token = {
            gene: token
            for gene, token in self.gene_token_ids.items()
            if gene not in SPECIAL_TOKENS and gene in self.gene_medians
        }
        size = self.vocab_size
        self._token_medians = np.ones(size, dtype=np.float64)  # float64, as Geneformer's norm_factor_vector
        for gene, token in self._gene_to_token.items():
            self._token_medians[token] = self.gene_medians[gene]
        self._symbol_to_gene = {s: g for s, g in self.symbol_to_gene.items() if g in self._gene_to_token}
        vocabulary_symbols = {self.gene_symbols[g] for g in self._gene_to_token if g in self.gene_symbols}
        self._unresolved_symbols = vocabulary_symbols - self._symbol_to_gene.keys()
        self._warned: set[str] = set()  # a gene list's warnings are said once, not per block
        self._is_special = np.zeros(size, dtype=bool)
        special_ids = self.special_token_ids
        self._is_special[special_ids] = True
        self._max_special_id = max(special_ids)
        self._vocabulary_sha256: str | None = None  # taken when cells are first ranked (`_ranking_fingerprint`)
        unranked = sum(1 for g in self.gene_token_ids if g not in SPECIAL_TOKENS and g not in self.gene_medians)
        if unranked:
            logger.info("%d vocabulary genes have no median and are never ranked", unranked)

    @classmethod
    def get_feature_extractor_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        """transformers' reading of a saved config, refusing one that is no JSON object (a list ended in a
        TypeError from `cls(**config)`)."""
        config, kwargs = super().get_feature_extractor_dict(pretrained_model_name_or_path, **kwargs)
        if not isinstance(config, dict):
            raise ValueError(f"the feature extractor config of {pretrained_model_name_or_path} is a "
                             f"{type(config).__name__}, not a JSON object: restore the file, or save the feature "
                             "extractor again.")
        return config, kwargs

    @classmethod
    def from_gene_medians(
        cls, gene_medians: dict[str, float], *, source_details: dict[str, Any] | None = None, **kwargs: Any
    ) -> Cell2TextFeatureExtractor:
        """Build a vocabulary from corpus medians: special tokens 0..3, then the genes in sorted order.

        Symbols come from the packaged gene table unless ``gene_symbols`` is given. ``vocabulary_source`` records
        ``{"kind": "corpus", "n_genes": ..., "gene_medians_sha256": ...}`` plus ``source_details`` (e.g. the
        corpus builder's dataset names).
        """
        genes = sorted({ensembl_gene_id(g) or g for g in gene_medians})
        if len(genes) != len(gene_medians):
            raise ValueError("gene_medians holds the same Ensembl ID twice (after stripping version suffixes)")
        medians = {(ensembl_gene_id(g) or g): float(m) for g, m in gene_medians.items()}
        token_ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        token_ids.update({gene: i + len(SPECIAL_TOKENS) for i, gene in enumerate(genes)})
        if "gene_symbols" not in kwargs:
            kwargs["gene_symbols"], kwargs["symbol_to_gene"] = vocabulary_symbols(genes)
        canonical = json.dumps(sorted(medians.items()), separators=(",", ":")).encode()
        source = {**(source_details or {}), "kind": "corpus", "n_genes": len(genes),
                  "gene_medians_sha256": hashlib.sha256(canonical).hexdigest()}
        return cls(gene_token_ids=token_ids, gene_medians=medians, vocabulary_source=source, **kwargs)

    @classmethod
    def from_geneformer_dictionaries(
        cls, token_dictionary_file: str, gene_median_file: str, **kwargs: Any
    ) -> Cell2TextFeatureExtractor:
        """Build from Geneformer's pickled token and gene-median dictionaries (restricted unpickler).

        V1 dictionaries have no ``<cls>``/``<eos>``: pass ``special_tokens=False`` and
        ``model_input_size=2048`` for them.
        """
        token_ids, medians, source = load_geneformer_dictionaries(token_dictionary_file, gene_median_file)
        if "gene_symbols" not in kwargs:
            kwargs["gene_symbols"], kwargs["symbol_to_gene"] = vocabulary_symbols(
                [g for g in token_ids if g not in SPECIAL_TOKENS]
            )
        return cls(gene_token_ids=token_ids, gene_medians=medians, vocabulary_source=source, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Saved configuration: vocabulary, medians, symbols and options (no lookup caches), as plain dicts."""
        return {k: dict(v) if isinstance(v, _VocabularyMapping) else v for k, v in super().to_dict().items()
                if not k.startswith("_")}

    def __deepcopy__(self, memo: dict) -> Cell2TextFeatureExtractor:
        return type(self).from_dict(self.to_dict())

    # -- properties ---------------------------------------------------------------------------

    @property
    def model_input_names(self) -> list[str]:
        return list(CELL_INPUT_NAMES if self.num_expression_bins else CELL_INPUT_NAMES[:-1])

    @property
    def pad_token_id(self) -> int:
        return self.gene_token_ids[PAD]

    @property
    def cls_token_id(self) -> int | None:
        return self.gene_token_ids.get(CLS)

    @property
    def eos_token_id(self) -> int | None:
        return self.gene_token_ids.get(EOS)

    @property
    def mask_token_id(self) -> int | None:
        return self.gene_token_ids.get(MASK)

    @property
    def vocab_size(self) -> int:
        """Size of the token embedding the vocabulary needs (max token id + 1, special tokens included;
        at most MAX_VOCAB_SIZE)."""
        return max(self.gene_token_ids.values()) + 1

    @property
    def special_token_ids(self) -> list[int]:
        """Ids of the special tokens the vocabulary holds (of pad, mask, cls, eos): tokens that are no gene."""
        return [self.gene_token_ids[t] for t in SPECIAL_TOKENS if t in self.gene_token_ids]

    @property
    def max_genes(self) -> int:
        """Gene tokens kept per cell: the input size minus the two special tokens in V2."""
        return self.model_input_size - (2 if self.special_tokens else 0)

    # -- gene matching ------------------------------------------------------------------------

    def match_genes(self, gene_ids: Sequence[Any]) -> _GeneMatch:
        """Map input genes (Ensembl IDs, versioned or not, or symbols) to token ids.

        Raises ValueError when no gene matches or when two input genes map to the same gene (a previous symbol beside
        its gene's current symbol names none: ``gene_ids.superseded_symbols``); logs a warning when fewer than
        ``min_gene_match_rate`` of them match.
        """
        if not self._gene_to_token:
            raise ValueError(
                "the vocabulary holds no gene with a median; build the extractor with from_gene_medians(...) or "
                "from_geneformer_dictionaries(...)"
            )
        tokens = np.full(len(gene_ids), -1, dtype=np.int32)
        column_genes: list[str | None] = []
        unmatched: list[str] = []
        n_ambiguous = 0
        names = [str(raw).strip() for raw in gene_ids]
        superseded = superseded_symbols(names, self._symbol_to_gene, self.gene_symbols)  # IGJ beside JCHAIN
        repeated = repeated_symbols(names, self._symbol_to_gene)  # GOLGA8M beside GOLGA8M-1
        for unread, warning in ((superseded, SUPERSEDED_WARNING), (repeated, REPEATED_WARNING)):
            if unread and (said := warning % (len(unread), sorted(unread)[:5])) not in self._warned:
                self._warned.add(said)
                logger.warning(said)
        superseded |= repeated
        for column, name in enumerate(names):
            token = self._gene_to_token.get(name)  # fast path: an unversioned vocabulary ID
            if token is not None:
                gene = name
            else:
                gene = ensembl_gene_id(name)
                if gene is None and name not in superseded:
                    gene = self._symbol_to_gene.get(name)
                    n_ambiguous += gene is None and name in self._unresolved_symbols
                token = self._gene_to_token.get(gene) if gene is not None else None
            column_genes.append(None if token is None else gene)
            if token is None:
                unmatched.append(name)
                continue
            tokens[column] = token
        check_one_column_per_gene(names, column_genes, _EXAMPLES)
        n_input, n_matched = len(gene_ids), int((tokens >= 0).sum())
        summary = (
            f"{n_matched} of {n_input} input genes are in the vocabulary of {len(self._gene_to_token)} genes "
            f"({n_ambiguous} ambiguous symbols, see gene_ids.resolve_symbols); unmatched examples: {unmatched[:_EXAMPLES]}"
        )
        if n_matched == 0:
            raise NoGeneMatchedError(
                f"None of the input genes is in the vocabulary: {summary}. Pass Ensembl gene IDs (e.g. "
                "ENSG00000141510) or gene symbols of the vocabulary's species as gene_ids / var."
            )
        if n_matched < self.min_gene_match_rate * n_input:
            if summary not in self._warned:  # a describe matches the genes per block of 512 cells
                self._warned.add(summary)
                logger.warning("Low gene match rate: %s", summary)
        else:
            logger.info(summary)
        medians = np.ones(len(gene_ids), dtype=np.float64)
        medians[tokens >= 0] = self._token_medians[tokens[tokens >= 0]]
        return _GeneMatch(tokens, medians, n_input, n_matched, unmatched[:_EXAMPLES])

    def var_gene_source(self, var: Any) -> tuple[str, list[str], bool]:
        """Where an AnnData ``var`` names its genes, as this extractor reads it: Ensembl IDs where it has them, else
        the symbols that name the most vocabulary genes (``gene_ids.var_gene_source``). A corpus built with this
        extractor reads its files' genes by it too, so a file gives one gene per column in training and in use."""
        return var_gene_source(var, self._symbol_to_gene)

    def var_gene_ids(self, var: Any) -> list[str]:
        """The gene IDs of an AnnData ``var``, one per column (``var_gene_source``)."""
        return self.var_gene_source(var)[1]

    # -- ranking ------------------------------------------------------------------------------

    def tokenize(
        self,
        cells: Any,
        gene_ids: Sequence[str] | None = None,
        *,
        layer: str | None = None,
        input_values: str = "counts",
        skip_empty_cells: bool = False,
        report_skipped: bool = True,
        chunk_size: int = 128,
        num_threads: int | None = None,
        first_row: int = 0,
    ) -> RankedCells:
        """Rank-value encode each cell; returns ragged token ids (special tokens included).

        ``cells``: AnnData (``.X`` or ``layer``; in memory or backed, read in row chunks),
        a scipy sparse matrix/array or a 2-D numpy array (then ``gene_ids`` is required).
        ``input_values``: "counts" (raw integer counts: Geneformer's ``count / n_counts * 10,000``),
        "normalized" (non-negative, e.g. CP10k, taken as the normalised value) or "log1p" (log1p of normalised
        values; float64 expm1 is applied). Values are checked against what is declared
        (``rank_value.check_values``). Skipped cells are logged unless ``report_skipped=False`` (a caller ranking a
        block of a larger input reports them itself, by their rows in that input). Chunks of ``chunk_size`` rows are
        ranked in ``num_threads`` threads (numpy
        releases the GIL in its sorts; default: the available cores, at most 4). The arithmetic is ``rank_value``'s.
        ``first_row``: the row of the first cell in a larger input that a caller ranks in blocks, so that value errors
        name the input's rows (cells without vocabulary genes are named by their rows in ``cells``, with their obs
        names).
        """
        self._check_layout()
        matrix, gene_ids, obs_names = self.resolve_input(cells, gene_ids, layer)
        match = self.match_genes(gene_ids)
        special_ids = (self.cls_token_id, self.eos_token_id) if self.special_tokens else None
        ranked = rank_matrix(
            matrix, match.column_tokens, match.column_medians, input_values=input_values, max_genes=self.max_genes,
            special_ids=special_ids, num_expression_bins=self.num_expression_bins, chunk_size=chunk_size,
            num_threads=num_threads, first_row=first_row,
        )
        ranked.made_by = self._ranking_fingerprint()
        empty, n_cells = ranked.skipped_cells, matrix.shape[0]
        if len(empty) and not skip_empty_cells:
            raise empty_cells_error(empty, n_cells, obs_names)
        if len(empty) and report_skipped:
            logger.warning("Skipped %d of %d cells that express no vocabulary gene: %s", len(empty), n_cells,
                           format_cells(empty, obs_names))
        return ranked

    def resolve_input(
        self, cells: Any, gene_ids: Sequence[str] | None, layer: str | None
    ) -> tuple[Any, Sequence[Any], Sequence[str] | None]:
        """Return (row-chunkable matrix, gene IDs, obs names or None) for any accepted input (``cell_inputs``).

        Public so that callers reading cells in blocks (the pipeline, the CLI) resolve inputs like `tokenize`.
        """
        return resolve_input(cells, gene_ids, layer, self._symbol_to_gene)

    # -- model inputs -------------------------------------------------------------------------

    def __call__(
        self,
        cells: Any,
        gene_ids: Sequence[str] | None = None,
        *,
        layer: str | None = None,
        input_values: str = "counts",
        skip_empty_cells: bool = False,
        return_tensors: str | None = None,
    ) -> BatchFeature:
        """Rank-value encode cells into padded model inputs.

        Returns ``gene_input_ids`` (padded with the pad id to the longest cell),
        ``gene_attention_mask`` (1 on real tokens, special tokens included),
        ``gene_token_mask`` (1 on gene tokens only) and, for value-aware extractors,
        ``gene_value_ids`` (expression bins, 0 on special tokens and padding). With ``skip_empty_cells=True`` also
        ``cell_indices`` (input rows kept) and ``skipped_cell_indices`` (input rows dropped).
        """
        ranked = self.tokenize(
            cells, gene_ids, layer=layer, input_values=input_values, skip_empty_cells=skip_empty_cells
        )
        batch = self.pad(ranked)
        if skip_empty_cells:
            batch.update(zip(CELL_ROW_KEYS, (ranked.cell_indices, ranked.skipped_cells)))
        return BatchFeature(dict(batch), tensor_type=return_tensors)

    def pad(
        self,
        token_lists: Sequence[Sequence[int]] | RankedCells,
        value_lists: Sequence[Sequence[int]] | None = None,
        return_tensors: str | None = None,
    ) -> BatchFeature:
        """Pad per-cell token lists (e.g. stored in a corpus) into the model inputs. The lists must be laid out as
        this extractor's ``tokenize`` gives them (with ``special_tokens``: ``<cls>``, the genes, ``<eos>``; without:
        the genes only); lists of the other layout are refused, and so are Geneformer V2's lists (``<cls>`` 2 first,
        ``<eos>`` 3 last in every cell) given to an extractor of a vocabulary without ``<cls>``/``<eos>`` (Geneformer
        V1's, whose ids 2 and 3 are genes): V1 lists whose every cell begins with gene id 2 and ends with gene id 3 (one
        such cell, say) are refused too, as lists tell no more. ``RankedCells`` of this extractor's ``tokenize`` are
        not judged by their layout (they record the extractor that made them, which is checked).

        Value-aware extractors also need each cell's expression bins: in ``token_lists`` (cells from
        ``tokenize``) or as ``value_lists`` (e.g. the corpus column ``gene_value_ids``).
        """
        self._check_layout()
        flat_bins = None
        if isinstance(token_lists, RankedCells):  # made by this extractor's tokenize (checked): ids and layout valid
            self._check_made_here(token_lists)
            lengths, flat = token_lists.lengths, token_lists.tokens
            flat_bins = token_lists.value_bins if value_lists is None else None
        else:
            arrays = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_lists]
            lengths = np.array([len(a) for a in arrays], dtype=np.int64)
            flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
            if len(flat) and (flat.min() < 0 or flat.max() >= self.vocab_size):
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}) (this extractor's vocabulary)")
            if (flat == self.pad_token_id).any():  # a padded batch's rows: the encoder attended to the padding
                raise ValueError(
                    f"token lists hold the padding token (id {self.pad_token_id}), which no cell's tokens hold: pass "
                    "each cell's tokens unpadded (a corpus's gene_input_ids column; from a padded batch, "
                    "row[gene_attention_mask.bool()]), else the gene encoder reads the padding as part of the cell.")
            # not for RankedCells made here: a V1 cell whose first gene is id 2 and last id 3 is no V2 cell
            self._check_special_layout(flat, lengths)
        if value_lists is not None:
            flat_bins = self._check_value_lists(value_lists, lengths)
        if self.num_expression_bins and flat_bins is None:
            raise ValueError(
                f"This feature extractor is value-aware (num_expression_bins={self.num_expression_bins}): pass each "
                "cell's expression bins (value_lists=, e.g. the corpus column gene_value_ids), or expression values."
            )
        width = int(lengths.max()) if len(lengths) else 0
        if width > self.model_input_size:
            raise ValueError(f"a cell has {width} tokens, more than model_input_size={self.model_input_size}")
        real = np.arange(width) < lengths[:, None]
        if self.pad_token_id == 0:  # np.zeros is lazily zeroed by the OS: cheaper than np.full
            input_ids = np.zeros((len(lengths), width), dtype=np.int64)
        else:
            input_ids = np.full((len(lengths), width), self.pad_token_id, dtype=np.int64)
        input_ids[real] = flat
        attention = real.astype(np.int64)
        gene_mask = attention.copy()
        # special tokens are few (2 per cell): find them in the flat list, clear them in the mask
        special = np.flatnonzero(flat <= self._max_special_id)  # specials usually have the lowest ids
        special = special[self._is_special[flat[special]]]
        ends = np.cumsum(lengths)
        rows = np.searchsorted(ends, special, side="right")
        gene_mask[rows, special - (ends - lengths)[rows]] = 0
        data = {"gene_input_ids": input_ids, "gene_attention_mask": attention, "gene_token_mask": gene_mask}
        if self.num_expression_bins:
            value_ids = np.zeros((len(lengths), width), dtype=np.int64)
            value_ids[real] = flat_bins
            data["gene_value_ids"] = value_ids
        return BatchFeature(data, tensor_type=return_tensors)

    def _ranking_fingerprint(self) -> tuple:
        """What cells ranked by this extractor depend on, as ``tokenize`` records it in ``RankedCells.made_by`` and
        ``pad`` compares it: the vocabulary and medians (their checksum: 40 ms for 20,000 genes, taken when cells are
        first ranked and again after a mapping is set) and the settings that can be set after loading
        (``_RANKING_PARTS`` names them)."""
        if self._vocabulary_sha256 is None:
            self._vocabulary_sha256 = hashlib.sha256(json.dumps(
                [sorted(self.gene_token_ids.items()), sorted(self.gene_medians.items())]).encode()).hexdigest()
        return self._vocabulary_sha256, self.model_input_size, self.special_tokens, self.num_expression_bins

    def _check_made_here(self, ranked: RankedCells) -> None:
        """Refuse ``RankedCells`` that this extractor's ``tokenize`` did not make as it stands: ``pad`` takes their
        ids and bins unchecked, and those of another extractor (another vocabulary or medians, another
        ``model_input_size``, ``special_tokens`` or ``num_expression_bins``) were padded as its own: ids of other
        genes, another gene order, bins of another scale, exit 0."""
        if ranked.made_by == self._ranking_fingerprint():
            return
        if ranked.made_by is None:
            raise ValueError("these RankedCells were not made by a feature extractor's tokenize (they record no "
                             "extractor): pass their cells as token lists (ranked.to_list(), with value_lists= for "
                             "expression bins), which pad checks, or tokenize the cells with this extractor.")
        differ = [f"{name} ({then!r} when ranked, {now!r} here)" if name != _RANKING_PARTS[0] else name
                  for name, then, now in zip(_RANKING_PARTS, ranked.made_by, self._ranking_fingerprint())
                  if then != now]
        raise ValueError(f"these RankedCells were made by another feature extractor, or by this one before its "
                         f"settings changed: {'; '.join(differ)}. Tokenize the cells again with this extractor (or "
                         "pad them with the extractor that made them).")

    def _check_special_layout(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Refuse token lists not laid out as ``tokenize`` lays out this extractor's cells: with special tokens
        ``<cls>`` first, ``<eos>`` last and no special token between; without, no special token at all. Lists of
        the other setting (a corpus tokenized by a V1 extractor given to a V2 one, or the reverse) were padded as
        they came: the gene encoder read cells without ``<cls>``, or ``<cls>``/``<eos>`` among the genes, exit 0."""
        special = self._is_special[flat]
        if self.special_tokens:
            ends = np.cumsum(lengths)
            laid_out = bool((lengths >= 2).all()) and int(special.sum()) == 2 * len(lengths)
            if laid_out and len(lengths):
                laid_out = bool((flat[ends - lengths] == self.cls_token_id).all()
                                and (flat[ends - 1] == self.eos_token_id).all())
            fix = (f"each cell's tokens must be <cls> (id {self.cls_token_id}), its genes, then <eos> (id "
                   f"{self.eos_token_id}), as this extractor's tokenize gives them")
        else:
            laid_out = not special.any()
            fix = "each cell's tokens must be its genes only (no special token), as this extractor's tokenize gives them"
            if laid_out and self.cls_token_id is None:
                self._refuse_geneformer_v2_layout(flat, lengths)
        if not laid_out:
            raise ValueError(
                f"token lists are not laid out for this feature extractor (special_tokens={self.special_tokens}): "
                f"{fix}. Tokenize the cells again with this extractor (or use the extractor the tokens were made with)."
            )

    def _refuse_geneformer_v2_layout(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Refuse token lists in Geneformer V2's layout given to an extractor whose vocabulary has no ``<cls>`` or
        ``<eos>`` (a real Geneformer V1 dictionary: ids 2 and 3 are genes there): every cell begins with id 2 and ends
        with id 3, V2's ``<cls>`` and ``<eos>``. They were padded as genes, and the genes between them, ids of V2's
        vocabulary, read as other genes of this one, exit 0. A cell of this vocabulary whose first and last genes are
        ids 2 and 3, in every cell of the batch, is not plausible."""
        cls_id, eos_id = GENEFORMER_V2_SPECIAL_IDS[CLS], GENEFORMER_V2_SPECIAL_IDS[EOS]
        if not len(lengths) or not (lengths >= 2).all():
            return
        ends = np.cumsum(lengths)
        if not ((flat[ends - lengths] == cls_id).all() and (flat[ends - 1] == eos_id).all()):
            return
        genes = {token: gene for gene, token in self.gene_token_ids.items() if token in (cls_id, eos_id)}
        here = " and ".join(f"id {token} is the gene {genes[token]}" if token in genes else f"id {token} names no gene"
                            for token in (cls_id, eos_id))  # "the genes None and None" of a vocabulary without them
        raise ValueError(
            f"token lists are laid out as Geneformer V2 lays out cells (every cell begins with id {cls_id}, V2's "
            f"<cls>, and ends with id {eos_id}, its <eos>), but this feature extractor's vocabulary has no <cls> or "
            f"<eos> (here {here}): the tokens were made with another vocabulary, whose ids name other genes here. "
            "Tokenize the cells again with this extractor, or use the extractor the tokens were made with (a "
            "corpus's own is in its feature_extractor folder).")

    def _check_value_lists(self, value_lists: Sequence[Sequence[int]], lengths: np.ndarray) -> np.ndarray:
        """Flat expression bins, checked against this extractor and the cells' token counts."""
        if not self.num_expression_bins:
            raise ValueError(
                "Expression bins were given but this feature extractor uses rank-value tokens only "
                "(num_expression_bins=0); leave value_lists out or use the value-aware extractor they were made with."
            )
        arrays = [np.asarray(v, dtype=np.int64).reshape(-1) for v in value_lists]
        value_lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        if len(arrays) != len(lengths) or not np.array_equal(value_lengths, lengths):
            raise ValueError(
                f"Expression bins and tokens differ in length (bins per cell {value_lengths.tolist()[:_EXAMPLES]}, "
                f"tokens per cell {lengths.tolist()[:_EXAMPLES]}): pass one bin per token, cell by cell."
            )
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() > self.num_expression_bins):
            raise ValueError(f"expression bins must lie in [0, {self.num_expression_bins}] (num_expression_bins)")
        return flat


#: The parts of `_ranking_fingerprint`, as a refusal names them.
_RANKING_PARTS = ("the gene vocabulary or medians", "model_input_size", "special_tokens", "num_expression_bins")

# What a saved feature extractor config may hold: the settings above, and the keys transformers writes.
_SETTINGS = tuple(name for name in inspect.signature(Cell2TextFeatureExtractor.__init__).parameters
                  if name not in ("self", "kwargs"))
_MIXIN_KEYS = {"feature_extractor_type", "processor_class", "auto_map"}


__all__ = [
    "MAX_VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "Cell2TextFeatureExtractor",
    "RankedCells",
    "empty_cells_error",
    "load_numeric_dict",
]
