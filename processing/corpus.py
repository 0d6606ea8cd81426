"""The corpus format: cell labels from CELLxGENE obs, their descriptions, the rows written per split, and reading
a built corpus folder back (splits, feature extractor, summary).

Labels come from the ontology term ids (the real ontologies bundled with
cellxgene-ontology-guide): the label is the ontology's label of the (current) term, the cell
type's definition is its Cell Ontology definition, the age group is the HsapDv stage's bucket.
A value CELLxGENE marks as missing ("unknown", "na", NaN, ...) is None and leaves its phrase
out of the description. Cells that cannot be described get a reject reason instead:

* ``missing_cell_type``: no cell type id and no label;
* ``unmapped_cell_type``: a cell type label without a Cell Ontology id (e.g. a preset label
  missing from its mapping table);
* ``unknown_cell_type_term``: an id that is not a term of the bundled Cell Ontology;
* ``obsolete_cell_type_term``: a CL term marked obsolete without a replacement (its label reads "obsolete ...") or
  replaced by a term of another ontology (CL:0017505 by a PATO term);
* ``missing_<field>``: a field listed as required (``required_fields``) is missing, or its value is left out (below).

A field's value that cannot be stated is left out of the text and of the corpus columns (which evaluation reads as
the truth, so they never say more than the text), with its reason per cell in ``resolve_labels``' output column
``<field>_left_out`` (counted per reason in summary.json's ``left_out``; not a corpus column): an id of another
ontology or an obsolete one, "normal" joined with a disease, a sex neither female nor male, or a tissue that is no
donor's (an organoid, cell culture or cell line; CELLxGENE's obs ``tissue_type``). A sex or healthy label given
without an id is read as its term ("F", "Male", "healthy"); other labels without an id are stated as given, with a
warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import reprlib
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa

from modeling_cell2text.description_schema import (
    AGE_GROUPS,
    MISSING_VALUES,
    ONTOLOGY_FIELDS,
    JOINED_TERM_FIELDS,
    TERM_ID_SEPARATOR,
    SEXES,
    TERM_ID_PREFIXES,
    CellDescription,
    is_term_id_of,
    render_description,
)
from modeling_cell2text.feature_extraction_cell2text import Cell2TextFeatureExtractor
from processing import ontologies

logger = logging.getLogger(__name__)

# CELLxGENE metadata read with their ontology term ids: the description's ontology fields, plus the donor's
# development stage, from which `age_group` is bucketed.
METADATA_FIELDS = (*ONTOLOGY_FIELDS, "development_stage")
_string = datasets.Value("string")
FEATURES = datasets.Features(
    {
        "cell_id": _string,
        "gene_input_ids": datasets.List(datasets.Value("int32")),
        "description": _string,
        **{name: _string for field in METADATA_FIELDS for name in (field, f"{field}_ontology_term_id")},
        "age_group": _string,
        "pathways": datasets.List(_string),
        "donor_id": _string,
        "dataset_id": _string,
    }
)
_STRING_COLUMNS = [name for name, feature in FEATURES.items() if feature == _string]
# Value-aware corpora (feature extractor with num_expression_bins > 0) add each token's expression bin.
VALUE_FEATURES = datasets.Features({**FEATURES, "gene_value_ids": datasets.List(datasets.Value("uint8"))})


# A corpus folder: the DatasetDict (save_to_disk), the feature extractor its tokens were made with and the build's
# summary (label tables, ontology versions, fingerprints). A corpus pushed to the Hub (hub_cards.publish) holds the
# same two beside the splits `datasets` pushed.
FEATURE_EXTRACTOR_DIR = "feature_extractor"
SUMMARY_FILE = "summary.json"
REJECTS_FILE = "rejects.csv"  # each rejected input cell and why (a join concatenates the shards')
REJECTS_COLUMNS = ["cell_id", "reason"]
UNMAPPED_GENES_FILE = "unmapped_genes.txt"  # the input genes without a usable Ensembl ID, one a line (a join: union)

# The JSON shape of summary.json's entries that its readers index (a join, training, evaluation, the card,
# publishing): a dict keyed by `str` is an object whose every value has that shape, a dict of names an object with
# those entries, a tuple the shapes a value may take (None: null), a pattern a string it matches in full. Entries
# a build may leave out (an earlier version's) are checked only where present.
_COUNTS = {str: int}
SPLIT_FINGERPRINTS = {"train": str, "validation": str, "test": str}
SUMMARY_SHAPES = {
    "splits": _COUNTS, "rejected": _COUNTS, "left_out": _COUNTS, "suspension_types": _COUNTS, "num_cells_in": int,
    "label_counts": {str: {str: _COUNTS}},
    "ontology_term_ids": {str: {str: (str, None)}},
    "unknown_ontology_term_ids": {str: _COUNTS},
    "fingerprints": {str: str},
    "ontology_versions": ({str: str}, None),
    "fold": _COUNTS,
    "shard": re.compile(r"\d+/\d+"),
}


def is_hub_corpus(corpus: str | Path) -> bool:
    """Whether `corpus` names a Hub dataset ("org/name") rather than a local folder (`names_hub_repo`)."""
    from hub_cards.render import names_hub_repo

    return names_hub_repo(corpus)


def _corpus_files(corpus: str | Path) -> Path:
    """The folder holding the corpus's feature extractor and summary: the corpus folder itself, or, for a Hub
    dataset, those files alone downloaded into the Hub cache (the splits stream or load through `datasets`)."""
    if not is_hub_corpus(corpus):
        return Path(corpus)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(corpus), repo_type="dataset",
                                  allow_patterns=[f"{FEATURE_EXTRACTOR_DIR}/*", SUMMARY_FILE]))


def open_corpus(corpus: str | Path) -> datasets.DatasetDict:
    """The corpus splits: a folder written by processing.build_corpus, or a Hub dataset id it was pushed to."""
    if is_hub_corpus(corpus):
        return datasets.load_dataset(str(corpus))
    corpus_dir = Path(corpus)
    if not (corpus_dir / "dataset_dict.json").exists() and (corpus_dir.parent / "dataset_dict.json").exists():
        raise FileNotFoundError(f"{corpus_dir} is a split of the corpus {corpus_dir.parent}: pass the corpus folder, "
                                f"{corpus_dir.parent} (the split is chosen by name).")
    if not (corpus_dir / "dataset_dict.json").exists():
        raise FileNotFoundError(
            f"{corpus_dir} is not a corpus folder (no dataset_dict.json) nor a Hub dataset id (org/name); build one "
            "with `python -m processing.build_corpus --preset pbmc68k_reduced --out DIR`."
        )
    return datasets.load_from_disk(str(corpus_dir))


def corpus_feature_extractor(corpus: str | Path) -> Cell2TextFeatureExtractor:
    """The feature extractor a corpus (folder or Hub dataset id) was tokenized with."""
    return Cell2TextFeatureExtractor.from_pretrained(str(_corpus_files(corpus) / FEATURE_EXTRACTOR_DIR))


def check_corpus_tokenized_as(corpus: str | Path, feature_extractor: Cell2TextFeatureExtractor, model: str) -> str:
    """Refuse a corpus whose cells were not tokenized as `model`'s feature extractor tokenizes them; returns the
    shared gene vocabulary checksum. Refused: another gene vocabulary (token ids would index the wrong gene
    embeddings), other gene medians or special tokens (every cell another gene order) and other expression bins."""
    from modeling_cell2text.compatibility import gene_ranking_sha256, gene_vocabulary_sha256

    corpus_extractor = corpus_feature_extractor(corpus)
    corpus_sha256 = gene_vocabulary_sha256(corpus_extractor.gene_token_ids)
    model_sha256 = gene_vocabulary_sha256(feature_extractor.gene_token_ids)
    differences = []
    if corpus_sha256 != model_sha256:
        differences.append(f"another gene vocabulary (sha256 {corpus_sha256}, the model's {model_sha256})")
    elif gene_ranking_sha256(corpus_extractor) != gene_ranking_sha256(feature_extractor):
        differences.append("other gene medians or special tokens (another gene order in every cell)")
    if feature_extractor.num_expression_bins and corpus_extractor.num_expression_bins != \
            feature_extractor.num_expression_bins:
        differences.append(f"{corpus_extractor.num_expression_bins} expression bins (the model reads "
                           f"{feature_extractor.num_expression_bins})")
    if differences:
        raise ValueError(
            f"The corpus {corpus} was not tokenized as the model {model} reads cells: " + "; ".join(differences)
            + f". Build it with the model's feature extractor: python -m processing.build_corpus ... "
            f"--feature-extractor {model}"
        )
    return model_sha256


def corpus_summary(corpus: str | Path) -> dict:
    """The build's summary.json of a corpus (folder or Hub dataset id); {} for a corpus without one."""
    path = _corpus_files(corpus) / SUMMARY_FILE
    return read_summary(path) if path.exists() else {}


def read_summary(path: str | Path, required: dict | None = None) -> dict:
    """A corpus's summary.json, refused (ValueError naming the file) where it is no JSON object or an entry a
    reader indexes has another shape (`SUMMARY_SHAPES`; `required`: entries that must be there, with their shapes):
    a corrupt file ended a join, training or publishing in a JSONDecodeError or AttributeError."""
    path = Path(path)
    try:
        summary = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"not JSON ({error})"
    else:
        shapes = {**SUMMARY_SHAPES, **(required or {})}
        present = {key: shape for key, shape in shapes.items()  # `in` of a JSON number or null: a TypeError
                   if key in (required or {}) or (isinstance(summary, dict) and key in summary)}
        problem = _shape_error(summary, present, "it")  # present: the entries checked, required ones among them
    if problem:
        raise ValueError(f"{path} is not a corpus summary as python -m processing.build_corpus writes it: {problem}. "
                         "Build the corpus again (or restore the file).")
    return summary


def _shape_error(value: object, shape: object, where: str) -> str | None:
    """How `value` departs from `shape` (see SUMMARY_SHAPES), or None; `where` names the value in the message."""
    if isinstance(shape, tuple):
        fits = any(_shape_error(value, kind, where) is None for kind in shape)
    elif isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is {reprlib.repr(value)}, not a JSON object"
        missing = [key for key in shape if key is not str and key not in value]
        if missing:
            return f"{where} has no {missing[0]}"
        entries = [(key, shape[str]) for key in value] if str in shape else list(shape.items())
        return next((error for key, item in entries
                     if (error := _shape_error(value[key], item, key if where == "it" else f"{where}[{key!r}]"))),
                    None)
    elif isinstance(shape, re.Pattern):
        fits = isinstance(value, str) and shape.fullmatch(value) is not None
    else:
        fits = value is None if shape is None else isinstance(value, shape) and not (
            shape is int and isinstance(value, bool))
    return None if fits else f"{where} is {reprlib.repr(value)}, not {_shape_name(shape)}"


def _shape_name(shape: object) -> str:
    """A shape (see SUMMARY_SHAPES) in words."""
    if isinstance(shape, tuple):
        return " or ".join(map(_shape_name, shape))
    if isinstance(shape, re.Pattern):
        return f"a string of the form {shape.pattern}"
    return "a JSON object" if isinstance(shape, dict) else {None: "null", str: "a string", int: "an integer"}[shape]


def read_rejects(folder: str | Path) -> pd.DataFrame:
    """A corpus's rejects.csv (columns REJECTS_COLUMNS, as strings), refused (ValueError naming the file) where it
    is no CSV of those columns: a binary or empty file ended a join in pandas' traceback, another header was joined
    into a rejects.csv of the union of the columns."""
    path = Path(folder) / REJECTS_FILE
    try:
        rejects = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        problem = f"not CSV ({' '.join(str(error).split())})"
    else:
        problem = None if list(rejects.columns) == REJECTS_COLUMNS else \
            f"its columns are {list(rejects.columns)}, not {REJECTS_COLUMNS}"
    if problem:
        raise ValueError(f"{path} is not the rejected cells as python -m processing.build_corpus writes them: "
                         f"{problem}. Build the corpus again (or restore the file).")
    return rejects


def read_unmapped_genes(folder: str | Path) -> list[str]:
    """A corpus's unmapped_genes.txt, one gene a line (none where the file is absent), refused (ValueError naming
    the file) where it is no UTF-8 text: a binary one ended a join in a UnicodeDecodeError that named no file, and
    publishing uploaded it as it was."""
    path = Path(folder) / UNMAPPED_GENES_FILE
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        problem = f"not UTF-8 text ({error})"
    else:
        problem = "it holds NUL bytes, as a binary file does" if "\x00" in text else None
    if problem:
        raise ValueError(f"{path} is not the unmapped genes as python -m processing.build_corpus writes them (one a "
                         f"line): {problem}. Build the corpus again (or restore the file).")
    return text.splitlines()


def split_value_lists(split: datasets.Dataset, feature_extractor: Cell2TextFeatureExtractor) -> list | None:
    """A split's expression bins (column gene_value_ids) for a value-aware feature extractor, else None."""
    if not feature_extractor.num_expression_bins:
        return None
    if "gene_value_ids" not in split.column_names:
        raise ValueError(
            f"The feature extractor is value-aware (num_expression_bins={feature_extractor.num_expression_bins}) "
            "but the corpus has no gene_value_ids column; build the corpus with the same --expression-bins."
        )
    return split["gene_value_ids"]


def corpus_features(value_aware: bool) -> datasets.Features:
    """The corpus columns: FEATURES, plus gene_value_ids for a value-aware feature extractor."""
    return VALUE_FEATURES if value_aware else FEATURES


#: How `clean` reads an obs value and `resolve_labels` its ids, recorded in summary.json as `obs_cleaning`: shards
#: built with another rule are not joined (builds before it wrote donor 7 of a float column as "7.0", another donor,
#: hashed into another split, than a new build's "7"; and stated "a healthy donor" beside a donor's joined disease
#: ids "MONDO:0100096 || MONDO:0005275", a UBERON stage as the tissue; "COVID-19 || COVID-19", and "A || B"
#: beside "B || A", also with an unknown id among them). Change it with either.
OBS_CLEANING = ("stripped text; None, NaN, pandas' NA and CELLxGENE's missing words missing; a whole float as the "
                "integer; joined disease ids read as their terms, each once, in their ids' sorted order (an unknown "
                "one with the label given beside it); UBERON stages and tissues kept apart; a tissue judged by its "
                "resolved id; normal joined with a disease left out")


def clean(value: object) -> str | None:
    """A metadata value as a stripped string, or None when CELLxGENE would call it missing. pandas' nullable columns
    give pd.NA (read as the id "<NA>") and map integers to floats: a whole float is written as the integer, so donor
    7 of an int column and of a column with gaps (float, or Int64) is one donor in every shard, not "7" and "7.0"."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return None if text.lower() in MISSING_VALUES else text


def term_id_parts(field: str, term_id: str) -> list[str]:
    """The ids `term_id` joins where `field` takes several (`JOINED_TERM_FIELDS`: a donor's diseases), else itself."""
    return term_id.split(TERM_ID_SEPARATOR) if field in JOINED_TERM_FIELDS else [term_id]


def is_known_term_of(field: str, term_id: str) -> bool:
    """Whether every id `term_id` names in `field` (`term_id_parts`) is a term of the bundled ontologies."""
    return all(ontologies.is_known_term(part) for part in term_id_parts(field, term_id))


@lru_cache(maxsize=None)
def resolve_term(field: str, term_id: str | None, label: str | None) -> tuple[str | None, str | None, bool]:
    """(term id, label, known) for one obs value pair of `field`; known terms take the ontology's label. Joined ids
    (`term_id_parts`) are known where each is, and take their terms' labels: the label given beside them was stated
    as given ("normal" beside two MONDO ids wrote "a healthy donor"). Their current terms are joined once each, in
    their ids' sorted order, so one set of terms is one label whatever the order obs gives (a term named twice, or
    an obsolete id beside its replacement, was stated twice: "COFS syndrome || COFS syndrome", and "normal ||
    normal" left out as normal joined with a disease; "A || B" and "B || A" were two labels of one disease set).
    Joined ids with an unknown one among them (a term newer than the bundled ontology) are so joined too where the
    label given joins as many: a known id as its current term with its label, an unknown one with the label given
    beside it; else both are as given."""
    if term_id is not None and is_known_term_of(field, term_id):
        current = sorted({ontologies.resolve_term(part) for part in term_id_parts(field, term_id)})
        return (TERM_ID_SEPARATOR.join(current), TERM_ID_SEPARATOR.join(map(ontologies.term_label, current)), True)
    parts = term_id_parts(field, term_id) if term_id is not None else []
    if len(parts) > 1 and label is not None and len(names := label.split(TERM_ID_SEPARATOR)) == len(parts):
        named = {}
        for part, name in zip(parts, names):
            if ontologies.is_known_term(part):  # its current term, with its label, as where every id is known
                part = ontologies.resolve_term(part)
                name = ontologies.term_label(part)
            named[part] = name
        by_id = dict(sorted(named.items()))
        return TERM_ID_SEPARATOR.join(by_id), TERM_ID_SEPARATOR.join(by_id.values()), False
    return term_id, label, False


@lru_cache(maxsize=None)
def age_group_of(stage_id: str | None) -> str | None:
    """Age bucket of a known HsapDv stage; None for other ontologies, coarse stages and ids the bundled HsapDv does not
    define (warned about once per id; one such id stopped the whole build)."""
    if stage_id is None or not stage_id.startswith("HsapDv:"):
        return None
    if not ontologies.is_known_term(stage_id):
        logger.warning("development stage %s is not in the bundled HsapDv: its cells get no age group", stage_id)
        return None
    bucket = ontologies.development_stage_to_age_bucket(stage_id)
    return bucket if bucket in AGE_GROUPS else None


def _warn_unknown_cell_type_ids(codes: np.ndarray, pairs: list, per_pair: list) -> None:
    """Name the cell-type ids rejected as unknown, with their cells: rejects.csv gives only the reason, so a
    mistyped id ("CL:000084") or one of a newer Cell Ontology dropped a whole cell type without naming it."""
    cells = np.bincount(codes[codes >= 0], minlength=len(pairs))
    rejected = Counter()
    for (term, _), reason, n in zip(pairs, per_pair, cells):
        if reason == "unknown_cell_type_term" and n:
            rejected[term] += int(n)
    if rejected:
        logger.warning("%d cells are rejected for cell-type ids unknown to the bundled Cell Ontology (%s): correct "
                       "the ids, or map the cells to known CL terms", sum(rejected.values()),
                       "; ".join(f"{term} {n} cells" for term, n in rejected.most_common(10)))


def _cell_type_reason(given_id: str | None, term_id: str | None, label: str | None, known: bool) -> str | None:
    """Why a cell type cannot be described, or None: `given_id` is the id obs gives, `term_id` its current term
    (`resolve_term`). A CL term replaced by another ontology's term (CL:0017505 by a PATO term) is obsolete, not
    unknown: it was warned about as an id unknown to the bundled Cell Ontology."""
    if term_id is None:
        return "missing_cell_type" if label is None else "unmapped_cell_type"
    if known and given_id is not None and given_id.startswith("CL:") and not term_id.startswith("CL:"):
        return "obsolete_cell_type_term"
    if not known or not term_id.startswith("CL:"):
        return "unknown_cell_type_term"
    if ontologies.is_deprecated(term_id):  # resolve_term followed any replacement: there is none
        return "obsolete_cell_type_term"
    return None


# The ids each field takes in the CELLxGENE schema (7), `TERM_ID_PREFIXES` (a CL or Cellosaurus tissue id is no
# donor's tissue: `_not_donor_tissue` leaves it out), and the development stage's: human, mouse, the zebrafish, fly
# and worm stages and UBERON (other organisms).
FIELD_TERM_PREFIXES = {
    **{field: TERM_ID_PREFIXES[field] for field in ("tissue", "disease", "sex")},
    "development_stage": ("HsapDv:", "MmusDv:", "ZFS:", "FBdv:", "WBls:", "UBERON:"),
}


# Labels given without an id that name a term, compared in lower case: sex and health as authors write them ("F",
# "Male", "Healthy"), so that they are stated, and as the ontology's label (one column value per term).
TERMS_OF_LABELS = {
    "sex": {"female": "PATO:0000383", "f": "PATO:0000383", "male": "PATO:0000384", "m": "PATO:0000384"},
    "disease": {"normal": "PATO:0000461", "healthy": "PATO:0000461"},
}
# Fields whose label is stated as given where it comes without an id, and the ontology whose ids name them.
_FREE_LABEL_ONTOLOGIES = {"tissue": "UBERON", "disease": "MONDO (PATO:0000461 for healthy donors)"}


def _term_of_label(field: str, term_id: str | None, label: str | None) -> tuple[str | None, str | None]:
    """The (id, label) pair with the id of a label given without one: a label that is itself a known term id
    (`is_known_term_of`: a donor's diseases joined too; an id column mapped onto the label, `--obs-map
    organ_id=tissue`: it was stated as given, "from the UBERON:0002048 of a donor") is that term, with the ontology's
    label; else the id `TERMS_OF_LABELS` names, if any."""
    if term_id is None and label is not None:
        if is_known_term_of(field, label):
            return label, None
        return TERMS_OF_LABELS.get(field, {}).get(label.lower()), label
    return term_id, label


def _term_problem(field: str, term_id: str | None, label: str | None, known: bool) -> str | None:
    """Why a resolved (non-cell-type) term cannot be stated as `field`, as the reason a required field gives:
    "wrong_ontology_<field>_term" (also an id not in its ontology's form, "UBERON:lung", and a UBERON term of the
    other kind, `_UBERON_KINDS`), "normal_joined_with_disease" (PATO:0000461 joined with diseases' ids, which the
    CELLxGENE schema forbids: "normal" stands alone), "obsolete_<field>_term"
    (no replacement: its label reads "obsolete ..."; a stage is stated only as its age group, which an obsolete
    stage's label still gives), "sex_not_female_or_male" (the template states only those), or None. A tissue id's
    schema 4 suffix (" (organoid)") is no other form: it says what the id names (`_tissue_type`)."""
    if field == "tissue" and term_id is not None:
        term_id = next((term_id.removesuffix(s) for s in _TISSUE_ID_SUFFIXES if term_id.endswith(s)), term_id)
    joined = field in JOINED_TERM_FIELDS
    if term_id is not None and not is_term_id_of(term_id, FIELD_TERM_PREFIXES[field], joined=joined):
        return f"wrong_ontology_{field}_term"
    if field == "disease" and term_id is not None and len(parts := term_id_parts(field, term_id)) > 1 \
            and TERMS_OF_LABELS["disease"]["normal"] in parts:
        return "normal_joined_with_disease"  # the schema's "normal" stands alone: "a donor with COVID-19 || normal"
    if known and field in _UBERON_KINDS and term_id.startswith("UBERON:") and not ontologies.is_deprecated(term_id) \
            and ontologies.is_life_cycle_stage(term_id) != (field == "development_stage"):
        return f"wrong_ontology_{field}_term"  # a stage as the tissue ("the adult stage of a donor"), or the reverse
    if term_id is not None and known and field != "development_stage" and any(
            ontologies.is_deprecated(part) for part in term_id_parts(field, term_id)):
        return f"obsolete_{field}_term"  # without a replacement (resolve_term followed any)
    if field == "sex" and label is not None and label not in SEXES:
        return "sex_not_female_or_male"
    return None


# The fields whose UBERON ids are of one kind (a tissue's no life cycle stage, a stage's one), and the others in words.
_UBERON_KINDS = {"tissue": "UBERON life cycle stages", "development_stage": "UBERON terms that are no life cycle stage"}


def _cellxgene_form(field: str, term_id: str) -> str | None:
    """`term_id` as the CELLxGENE schema writes it, where it differs only in its prefix's case ("mondo:0100096") or,
    in a field of `JOINED_TERM_FIELDS`, in the spacing of its joins ("A||B", "A  ||  B"); else None. The schema
    allows neither form, so such ids are left out as of another form; the warning names this one as the fix."""
    parts = re.split(r"\s*\|\|\s*", term_id) if field in JOINED_TERM_FIELDS else [term_id]
    prefixes = FIELD_TERM_PREFIXES[field]
    written = [next((p + part[len(p):] for p in prefixes if part[:len(p)].lower() == p.lower()), part)
               for part in parts]
    joined = TERM_ID_SEPARATOR.join(sorted(written))
    return joined if joined != term_id and is_term_id_of(joined, prefixes, field in JOINED_TERM_FIELDS) else None


def _wrong_ontology_fix(field: str, term_ids: list[str]) -> str:
    """The fix the warning of ids of another form names: CELLxGENE's form where `_cellxgene_form` gives one (the
    obs column was the right one: "check which obs column holds the disease ids" sent users to --obs-map), else the
    obs column to check."""
    written = {term_id: form for term_id in term_ids if (form := _cellxgene_form(field, term_id)) is not None}
    column = f"check which obs column holds the {field} ids (--obs-map)"
    if not written:
        return column
    joins = f", several joined by {TERM_ID_SEPARATOR!r} in ascending order" if field in JOINED_TERM_FIELDS else ""
    return (f"write them as the CELLxGENE schema does (prefixes in their ontology's case{joins}), e.g. "
            + "; ".join(f"{given!r} as {form!r}" for given, form in list(written.items())[:3])
            + (f"; for the other ids, {column}" if len(written) < len(term_ids) else ""))


def _unstatable(field: str, codes: np.ndarray, pairs: list, resolved: list) -> list[str | None]:
    """Each resolved pair's reason `field` cannot state it (`_term_problem`), or None; the cells so left out are
    warned about with examples, so that a mis-mapped column is not silently dropped."""
    problems = [_term_problem(field, term, label, known) for term, label, known in resolved]
    cells = np.bincount(codes[codes >= 0], minlength=len(pairs))
    wrong_ids = [term for (term, _, _), problem in zip(resolved, problems) if problem == f"wrong_ontology_{field}_term"]
    for problem, what, fix in (
        (f"wrong_ontology_{field}_term",
         f"ids that are not {' / '.join(FIELD_TERM_PREFIXES[field])} (in their ontology's form)"
         + (f", or {_UBERON_KINDS[field]}" if field in _UBERON_KINDS else ""),
         _wrong_ontology_fix(field, wrong_ids)),
        ("normal_joined_with_disease", "PATO:0000461 (normal) joined with diseases, which the CELLxGENE schema "
         "forbids", "give PATO:0000461 alone for healthy donors, else the diseases' ids only"),
        (f"obsolete_{field}_term", "obsolete terms without a replacement", "update the terms"),
        ("sex_not_female_or_male", "neither female nor male, the sexes the description states",
         "where they mean those, give the ids PATO:0000383 (female) / PATO:0000384 (male) in sex_ontology_term_id"),
    ):
        hit = sorted((i for i, p in enumerate(problems) if p == problem), key=lambda i: -cells[i])
        if hit:
            logger.warning(
                "%d cells' %s are %s, so their descriptions and corpus columns leave the %s out (examples: %s); %s",
                sum(cells[i] for i in hit), field, what, field,
                "; ".join(f"{resolved[i][0]} {resolved[i][1]!r}" for i in hit[:3]), fix)
    return problems


# CELLxGENE schema 5+ obs `tissue_type`: "tissue" is a donor's tissue; an "organoid" (tissue: what it models), a
# "cell culture" (tissue: a CL id) or a "cell line" (a Cellosaurus id) is not. Schema 4 marked the first two with a
# suffix of the tissue id; without either, a CL or Cellosaurus id still says which, and any other id is a tissue.
_TISSUE_ID_SUFFIXES = {" (organoid)": "organoid", " (cell culture)": "cell culture"}
_TISSUE_ID_PREFIXES = {"CL:": "cell culture", "CVCL_": "cell line"}
# CELLxGENE's tissue_type values other than "tissue" (schema 5 "cell culture", schema 6+ "primary cell culture").
NOT_DONOR_TISSUE_TYPES = ("organoid", "primary cell culture", "cell culture", "cell line")


def _tissue_type(term_id: str | None, given: str | None) -> str:
    """What a cell's tissue id names: obs `tissue_type` (lower case) where it is one of CELLxGENE's kinds other than
    "tissue", else what the id says (a schema 4 suffix, a CL or Cellosaurus id), else "tissue"."""
    if given is not None and given.lower() in NOT_DONOR_TISSUE_TYPES:
        return given.lower()
    for suffix, kind in _TISSUE_ID_SUFFIXES.items():
        if term_id is not None and term_id.endswith(suffix):
            return kind
    return next((kind for prefix, kind in _TISSUE_ID_PREFIXES.items() if (term_id or "").startswith(prefix)), "tissue")


def _not_donor_tissue(obs: pd.DataFrame, term_ids: np.ndarray) -> np.ndarray:
    """Per cell, "tissue_type_<type>" where its tissue is no donor's (`_tissue_type`), else None; warned about,
    so that an organoid or a cell culture is not described as the donor's tissue ("the epithelial cell of a
    donor"). A missing `tissue_type` column means tissues (CELLxGENE before schema 5). `term_ids`: each cell's
    tissue id as `resolve_labels` reads it, not obs's: an id given in the label column, or an obsolete UBERON term
    replaced by a CL term ("obsolete B cell"), is a cell type too, which was stated as "the B cell of a donor"."""
    given = obs["tissue_type"] if "tissue_type" in obs.columns else pd.Series(None, index=obs.index, dtype=object)
    codes, pairs = _distinct_pairs(pd.Series(term_ids, index=obs.index, dtype=object), given)
    other = sorted({kind for _, kind in pairs if kind is not None
                    and kind.lower() not in ("tissue", *NOT_DONOR_TISSUE_TYPES)})
    if other:  # another dataset's column of that name ("Tumor" / "Normal"): its cells' tissues are kept
        logger.warning("obs tissue_type holds values other than CELLxGENE's (tissue, %s): %s; their cells' tissues "
                       "are read as a donor's tissues", ", ".join(NOT_DONOR_TISSUE_TYPES), other[:5])
    kinds = np.array([_tissue_type(term, kind) for term, kind in pairs], dtype=object)[codes]
    labels = obs["tissue"] if "tissue" in obs.columns else pd.Series(None, index=obs.index, dtype=object)
    no_tissue = (pd.isna(term_ids) & labels.map(clean).isna().to_numpy())
    kinds[no_tissue] = "tissue"  # neither an id nor a label: nothing to leave out
    cells = pd.Series(kinds[kinds != "tissue"], dtype=object).value_counts().sort_index()
    if len(cells):
        logger.warning("%d cells are no donor's tissue (obs tissue_type or their tissue id: %s), so their descriptions "
                       "and corpus columns leave the tissue out rather than state it as the donor's; summary.json "
                       "counts them under left_out", cells.sum(),
                       ", ".join(f"{kind} {n}" for kind, n in cells.items()))
    names = np.full(len(kinds), None, dtype=object)
    other = kinds != "tissue"
    names[other] = ("tissue_type_" + pd.Series(kinds[other], dtype=object).str.replace(" ", "_")).to_numpy(dtype=object)
    return names


def _warn_free_labels(field: str, labels: np.ndarray, ids: np.ndarray) -> None:
    """Say once which labels of `field` are stated as given, without an ontology id (nor one `TERMS_OF_LABELS`
    gives): the corpus cannot map them to terms, and a label such as "control" reads as a disease."""
    free = pd.Series(labels[pd.isna(ids) & ~pd.isna(labels)], dtype=object)
    if len(free):
        counts = free.value_counts()
        logger.warning("%d cells' %s labels have no ontology id and are stated as given (%s); put %s ids in "
                       "%s_ontology_term_id (--obs-map YOUR_ID_COLUMN=%s_ontology_term_id)", len(free), field,
                       "; ".join(f"{label!r} {n} cells" for label, n in counts.head(5).items()),
                       _FREE_LABEL_ONTOLOGIES[field], field, field)


def _warn_relabelled(field: str, codes: np.ndarray, pairs: list, resolved: list) -> None:
    """Say where a known term's id overrode the label given beside it (the id wins: the ontology's label is used),
    so that a label and id that disagree ("T cell" with B cell's CL:0000236) are not relabelled without a word."""
    changed = {i: f"{given!r} ({term}) -> {label!r}" for i, ((term, given), (_, label, known)) in
               enumerate(zip(pairs, resolved)) if known and given is not None and given != label}
    if changed:
        cells = np.bincount(codes[codes >= 0], minlength=len(pairs))
        examples = sorted(changed, key=lambda i: -cells[i])[:5]
        logger.info("%d cells' %s labels differ from their ontology term's label, which the corpus uses (the id "
                    "wins; author labels and ontology renames differ too): %s", sum(cells[i] for i in changed),
                    field, "; ".join(f"{changed[i]} for {cells[i]} cells" for i in examples))


def _distinct_pairs(ids: pd.Series, labels: pd.Series) -> tuple[np.ndarray, list[tuple[str | None, str | None]]]:
    """(code per cell, distinct cleaned (id, label) pairs): per-pair work instead of per-cell."""
    id_codes, id_values = pd.factorize(ids.map(clean))  # code -1: missing
    label_codes, label_values = pd.factorize(labels.map(clean))
    width = len(label_values) + 1
    combined, distinct = pd.factorize((id_codes.astype(np.int64) + 1) * width + (label_codes + 1))
    pairs = []
    for key in distinct.tolist():
        i, j = divmod(key, width)
        pairs.append((str(id_values[i - 1]) if i else None, str(label_values[j - 1]) if j else None))
    return combined, pairs


def resolve_labels(obs: pd.DataFrame, required_fields: Sequence[str] = ("cell_type",)) -> tuple[pd.DataFrame, np.ndarray]:
    """Labels per cell (output column names, and `<field>_left_out`: why a value obs gives is left out, else None)
    and a reject reason per cell (None: kept).

    Work is done once per distinct (id, label) pair, so it is cheap for millions of cells.
    """
    unknown = [f for f in required_fields if f not in METADATA_FIELDS]
    if unknown:
        raise ValueError(f"required_fields must be among {METADATA_FIELDS}, got {unknown}")
    labels = pd.DataFrame(index=obs.index)
    reasons = np.full(len(obs), None, dtype=object)
    for field in METADATA_FIELDS:
        codes, pairs = _distinct_pairs(obs[f"{field}_ontology_term_id"], obs[field])
        pairs = [_term_of_label(field, *pair) for pair in pairs]
        resolved = [resolve_term(field, *pair) for pair in pairs]
        _warn_relabelled(field, codes, pairs, resolved)
        ids = np.array([r[0] for r in resolved], dtype=object)[codes]
        values = np.array([r[1] for r in resolved], dtype=object)[codes]
        if field == "cell_type":
            labels[f"{field}_ontology_term_id"], labels[field] = ids, values
            per_pair = [_cell_type_reason(pair[0], *r) for pair, r in zip(pairs, resolved)]
            _warn_unknown_cell_type_ids(codes, pairs, per_pair)
            reason = np.array(per_pair, dtype=object)[codes]
            reasons = np.where(pd.isna(reasons), reason, reasons)
            continue
        left_out = np.array(_unstatable(field, codes, pairs, resolved), dtype=object)[codes]
        if field == "tissue":
            not_tissue = _not_donor_tissue(obs, ids)
            left_out = np.where(pd.isna(not_tissue), left_out, not_tissue)
        stated = pd.isna(left_out)
        labels[f"{field}_ontology_term_id"] = np.where(stated, ids, None)
        labels[field] = np.where(stated, values, None)
        labels[f"{field}_left_out"] = left_out
        if field in _FREE_LABEL_ONTOLOGIES:
            _warn_free_labels(field, labels[field].to_numpy(), labels[f"{field}_ontology_term_id"].to_numpy())
        if field in required_fields:
            reason = np.where(labels[field].isna().to_numpy(), np.where(stated, f"missing_{field}", left_out), None)
            reasons = np.where(pd.isna(reasons), reason, reasons)
    labels["age_group"] = labels["development_stage_ontology_term_id"].map(age_group_of)
    labels["donor_id"] = obs["donor_id"].map(clean)
    labels["dataset_id"] = obs["dataset_id"].map(clean)
    return labels, np.where(pd.isna(reasons), None, reasons).astype(object)


@lru_cache(maxsize=100_000)
def describe(
    cell_type: str, cell_type_id: str, tissue: str | None, sex: str | None, disease: str | None,
    age_group: str | None, pathways: tuple[str, ...],
) -> str:
    """The description text of one cell (rendered by the model's description schema)."""
    return render_description(description_fields(cell_type, cell_type_id, tissue, sex, disease, age_group, pathways))


def description_fields(
    cell_type: str, cell_type_id: str, tissue: str | None, sex: str | None, disease: str | None,
    age_group: str | None, pathways: tuple[str, ...],
) -> CellDescription:
    """The schema fields a cell's description is rendered from (`resolve_labels` gives only labels it states)."""
    definition = ontologies.term_definition(cell_type_id)
    return CellDescription(
        cell_type=cell_type,
        cell_type_definition=clean(definition),
        tissue=tissue,
        sex=sex,
        disease=disease,
        age_group=age_group,
        pathways=pathways,
    )


def _nullable(values: np.ndarray) -> list[str | None]:
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values]


_ROW_LENGTHS = "gene_input_ids lengths"  # a split's digests: one per column, and the cells' token counts


class SplitWriter:
    """Streams corpus rows into one Arrow file per split and hashes their content (fingerprints)."""

    def __init__(self, directory: Path, splits: Sequence[str], value_aware: bool = False) -> None:
        self.features = corpus_features(value_aware)
        self.schema = self.features.arrow_schema
        self.paths = {s: Path(directory) / f"{s}.arrow" for s in splits}
        self._writers = {s: pa.ipc.new_stream(str(p), self.schema) for s, p in self.paths.items()}
        # one digest per split and column, fed row by row: the rows, not how they were batched, give the fingerprint
        self._hashes = {s: {name: hashlib.sha256() for name in [*self.features, _ROW_LENGTHS]} for s in splits}
        self.counts = dict.fromkeys(splits, 0)

    def write(
        self, split: str, columns: dict[str, object], tokens: np.ndarray, offsets: np.ndarray,
        value_bins: np.ndarray | None = None,
    ) -> None:
        """Write one batch: string columns (lists), pathways (list of tuples), ragged tokens (and their bins)."""
        if (value_bins is None) != ("gene_value_ids" not in self.features):
            raise ValueError("Expression bins must be given exactly when the corpus is value-aware.")
        offsets = np.asarray(offsets, dtype=np.int32) - np.int32(offsets[0])
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        arrays = {name: pa.array(_nullable(np.asarray(columns[name], dtype=object)), type=pa.string()) for name in _STRING_COLUMNS}
        arrays["gene_input_ids"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens))
        arrays["pathways"] = pa.array([list(p) for p in columns["pathways"]], type=pa.list_(pa.string()))
        if value_bins is not None:
            value_bins = np.ascontiguousarray(value_bins, dtype=np.uint8)
            arrays["gene_value_ids"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(value_bins))
        batch = pa.RecordBatch.from_arrays([arrays[name] for name in self.features], schema=self.schema)
        self._writers[split].write_batch(batch)
        digests = self._hashes[split]
        digests["gene_input_ids"].update(tokens.tobytes())
        digests[_ROW_LENGTHS].update(np.diff(offsets).astype(np.int32).tobytes())
        if value_bins is not None:
            digests["gene_value_ids"].update(value_bins.tobytes())
        for name in _STRING_COLUMNS:
            digests[name].update("".join(("\x00" if v is None else v) + "\x1f"
                                         for v in arrays[name].to_pylist()).encode())
        digests["pathways"].update("".join(repr(list(p)) + "\x1f" for p in columns["pathways"]).encode())
        self.counts[split] += batch.num_rows

    def close(self) -> dict[str, str]:
        """Close the files; returns the content fingerprint of each split."""
        for writer in self._writers.values():
            writer.close()
        fingerprints = {}
        for split, digests in self._hashes.items():
            digest = hashlib.sha256(str(self.features).encode())
            for name, column_digest in digests.items():
                digest.update(name.encode() + b"\0" + column_digest.digest())
            fingerprints[split] = digest.hexdigest()[:16]
        return fingerprints

    def save(self, out: Path, max_shard_size: str | int = "500MB") -> None:
        """Save the closed splits at ``out`` with ``DatasetDict.save_to_disk`` (shards of at most ``max_shard_size``).

        Each split's Arrow stream file is opened memory-mapped (``Dataset.from_file``), so the copy
        into shards streams through file-backed pages rather than holding the corpus in memory.
        The content fingerprints are recorded in ``summary.json`` (``close``'s return value).
        """
        save_splits({s: datasets.Dataset.from_file(str(path), split=s) for s, path in self.paths.items()}, out,
                    max_shard_size)


def check_max_shard_size(max_shard_size: str | int) -> None:
    """Refuse a shard size that `save_splits` (datasets) would refuse or divide by (0), before the work it ends."""
    from datasets.utils.py_utils import convert_file_size_to_int

    try:
        shard_bytes = convert_file_size_to_int(max_shard_size)
    except ValueError:
        shard_bytes = 0
    if shard_bytes <= 0:
        raise ValueError(f"max_shard_size must be a size such as 500MB or 2GB (or a number of bytes > 0), got "
                         f"{max_shard_size!r}")


def save_splits(splits: dict[str, datasets.Dataset], out: Path, max_shard_size: str | int = "500MB") -> None:
    """Save a corpus's splits at ``out`` (``DatasetDict.save_to_disk``, files of at most ``max_shard_size``)."""
    datasets.DatasetDict(splits).save_to_disk(str(out), max_shard_size=max_shard_size)
    # datasets writes no shard for an empty split (load_from_disk then fails on it): save it again as one shard.
    for name, split in splits.items():
        if split.num_rows == 0:
            split.save_to_disk(str(out / name), num_shards=1)


def top_pathways_by_cell_type(cell_types: Iterable[str], pathways: Iterable[Sequence[str]], n: int = 3) -> dict:
    """Per cell type (in name order): its cells and the `n` pathways most often among their top pathways, with the
    share of its cells naming each (ties in name order): the summary's and dataset card's table, computed alike by
    the builder and by `join_corpus` from the corpus's cell_type and pathways columns."""
    cells: Counter = Counter()
    named: dict[str, Counter] = {}
    for cell_type, names in zip(cell_types, pathways):
        cells[cell_type] += 1
        named.setdefault(cell_type, Counter()).update(names)
    return {cell_type: {"cells": cells[cell_type],
                        "pathways": [{"name": name, "share": round(count / cells[cell_type], 4)} for name, count in
                                     sorted(named[cell_type].items(), key=lambda item: (-item[1], item[0]))[:n]]}
            for cell_type in sorted(cells)}


def description_vocabulary(split: datasets.Dataset, ontology_term_ids: dict | None = None) -> dict:
    """What the schema-constrained decoder writes, learnt from a corpus split (the training split): each cell type's
    definition as its descriptions state it, the pathway names, the age groups and, given the corpus's label -> id
    tables (`ontology_term_ids`, over all its cells), those of the labels the split holds: a cell type seen only
    in the test split is no candidate. Keyword arguments of `Cell2TextProcessor`."""
    from modeling_cell2text.description_schema import parse_description

    first_of_type: dict[str, int] = {}
    for row, label in enumerate(split["cell_type"]):
        if label is not None and label not in first_of_type:
            first_of_type[label] = row
    definitions = {}
    for label, row in first_of_type.items():
        definition = parse_description(split[row]["description"]).cell_type_definition
        if definition:
            definitions[label] = definition
    pathways = sorted({name for names in split["pathways"] for name in names or []})
    ages = set(split["age_group"]) if "age_group" in split.column_names else set()
    from modeling_cell2text.description_schema import AGE_GROUPS

    vocabulary = {"cell_type_definitions": definitions, "pathway_names": pathways,
                  "age_groups": [group for group in AGE_GROUPS if group in ages]}
    if ontology_term_ids is not None:
        held = {field: set(split[field]) for field in ontology_term_ids}
        vocabulary["ontology_term_ids"] = {field: {label: term for label, term in table.items() if label in held[field]}
                                           for field, table in ontology_term_ids.items()}
    return vocabulary
