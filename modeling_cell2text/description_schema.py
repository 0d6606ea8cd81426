"""The description schema: one owner for the text a Cell2Text model writes and for reading it back.

A description is rendered from structured fields by a fixed template (the corpus builder uses
`render_description`) and parsed back into the same fields (evaluation and the pipeline use
`parse_description`). ``parse_description(render_description(d)) == d`` for every valid `d`.

Template (sentences whose fields are all missing are left out; the text never says "nan" or
"unknown")::

    This sample consists of a {cell_type}. Cell Ontology definition: {definition}.
    It originates from the {tissue} of a {healthy }{sex }donor{ with {disease}}{ during {age}}.
    This cell is associated with the pathway "{pathway_1}".
    Additionally, it involves the pathway "{pathway_2}".

``disease == "normal"`` (PATO:0000461, CELLxGENE's label for healthy donors) renders as "healthy".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

# Development-stage buckets (arXiv 2509.24840): the only values `age_group` may take, in life order.
AGE_GROUPS: tuple[str, ...] = (
    "early embryonic",
    "late embryonic",
    "infancy",
    "early childhood",
    "childhood",
    "adolescence",
    "young adulthood",
    "adulthood",
    "middle age",
    "elderly",
    "advanced elderly",
)
# How each bucket reads after "during".
_AGE_PHRASES = {
    "early embryonic": "the early embryonic stage",
    "late embryonic": "the late embryonic stage",
    "infancy": "infancy",
    "early childhood": "early childhood",
    "childhood": "childhood",
    "adolescence": "adolescence",
    "young adulthood": "young adulthood",
    "adulthood": "adulthood",
    "middle age": "middle age",
    "elderly": "the elderly stage",
    "advanced elderly": "the advanced elderly stage",
}
_AGE_BY_PHRASE = {phrase: group for group, phrase in _AGE_PHRASES.items()}
SEXES: tuple[str, ...] = ("female", "male")
HEALTHY_DISEASE = "normal"
# Values that mean "missing" in CELLxGENE-style metadata; they must never reach the text.
MISSING_VALUES = frozenset({"", "nan", "none", "unknown", "na", "n/a"})


@dataclass(frozen=True)
class LabelField:
    """A labelled field of the description.

    `name` is its `CellDescription` attribute and the corpus column holding its label; `term_id_column` the
    CELLxGENE column of its ontology term id (None: no single term); `similarity_ontology` the ontology in which
    evaluation scores a wrong label's closeness (None: exact match only).
    """

    name: str
    term_id_column: str | None = None
    similarity_ontology: str | None = None


# The labelled fields a description states, in its order. The corpus stores each under its name; the processor,
# evaluation, report and model card read this list. The age group is a bucket of many HsapDv stages, so it has no
# single term id (the corpus keeps the donor's CELLxGENE `development_stage` beside it).
LABEL_FIELDS: tuple[LabelField, ...] = (
    LabelField("cell_type", "cell_type_ontology_term_id", "CL"),
    LabelField("tissue", "tissue_ontology_term_id", "UBERON"),
    LabelField("disease", "disease_ontology_term_id", "MONDO"),
    LabelField("sex", "sex_ontology_term_id"),
    LabelField("age_group"),
)
LABEL_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in LABEL_FIELDS)
# Fields whose labels map to ontology term ids (the processor's `ontology_term_ids` tables).
ONTOLOGY_FIELDS: tuple[str, ...] = tuple(f.name for f in LABEL_FIELDS if f.term_id_column)
# The ids each of them takes in the CELLxGENE schema (7): an id of another ontology means a mis-mapped column or an
# edited table, and its label would be stated as the field's ("a donor with female", "sex: COVID-19"). Tissues:
# UBERON, CL (cell culture), Cellosaurus (cell line), and the zebrafish, fly and worm anatomies; sex: female, male,
# hermaphrodite (which the template does not state).
TERM_ID_PREFIXES: dict[str, tuple[str, ...]] = {
    "cell_type": ("CL:",),
    "tissue": ("UBERON:", "CL:", "CVCL_", "ZFA:", "FBbt:", "WBbt:"),
    "disease": ("MONDO:", "PATO:0000461"),
    "sex": ("PATO:0000383", "PATO:0000384", "PATO:0001340"),
}
# The form of an id of each ontology a field or a development stage takes (the local id's digits; Cellosaurus: four
# letters or digits), so that an edited table's "UBERON:lung" or "CL:banana" is not stated as an id. FBdv has both 8
# and 7 digits (FBdv:0010001 "day 61 of adulthood" to FBdv:0010010).
TERM_ID_FORMS: dict[str, str] = {
    **dict.fromkeys(("CL:", "UBERON:", "MONDO:", "PATO:", "ZFA:", "WBbt:", "HsapDv:", "MmusDv:", "ZFS:", "WBls:"),
                    r"\d{7}"),
    "FBbt:": r"\d{8}",
    "FBdv:": r"\d{7,8}",
    "CVCL_": r"[0-9A-Z]{4}",
}
_TERM_ID = re.compile("|".join(f"{re.escape(prefix)}{form}" for prefix, form in TERM_ID_FORMS.items()))


#: How CELLxGENE (schema 5+) joins the ids of several terms in one value (a donor's diseases).
TERM_ID_SEPARATOR = " || "


#: The fields whose value may name several terms (CELLxGENE: a donor's diseases).
JOINED_TERM_FIELDS = ("disease",)


def is_term_id_of(term_id: object, prefixes: tuple[str, ...], joined: bool = False) -> bool:
    """Whether `term_id` is an id of the form its ontology gives (`TERM_ID_FORMS`) starting with one of `prefixes`
    (an ontology's prefix, or a whole id where a field takes only some terms, `TERM_ID_PREFIXES`), or, where
    `joined` (a field of `JOINED_TERM_FIELDS`), several such ids joined by `TERM_ID_SEPARATOR`."""
    if not isinstance(term_id, str):
        return False
    parts = term_id.split(TERM_ID_SEPARATOR) if joined else [term_id]
    return all(part.startswith(prefixes) and _TERM_ID.fullmatch(part) is not None for part in parts)


class DescriptionParseError(ValueError):
    """A text does not follow the Cell2Text description template."""


def stored_definition(definition: str) -> str:
    """A cell type's definition as a description holds it: without its final period (the template adds it back)
    and the spaces or periods before it, so that it reads back the same ("... (D-cells) ." in two CL definitions)."""
    return re.sub(r"[\s.]+$", "", definition.strip())


@dataclass(frozen=True)
class CellDescription:
    """The structured fields of one cell's description (labels, not ontology IDs)."""

    cell_type: str | None = None
    cell_type_definition: str | None = None
    tissue: str | None = None
    sex: str | None = None
    disease: str | None = None
    age_group: str | None = None
    pathways: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if f.name == "pathways" else (value,)
            for v in values:
                if v is not None and (not isinstance(v, str) or v.strip().lower() in MISSING_VALUES):
                    raise ValueError(
                        f"CellDescription.{f.name}={v!r} is not a usable label; pass None for a missing field."
                    )
        object.__setattr__(self, "pathways", tuple(self.pathways))
        if self.cell_type_definition is not None:
            object.__setattr__(self, "cell_type_definition", stored_definition(self.cell_type_definition))
            if self.cell_type is None:
                raise ValueError("CellDescription has a cell_type_definition but no cell_type.")
        if self.sex is not None and self.sex not in SEXES:
            raise ValueError(f"CellDescription.sex={self.sex!r}; expected one of {SEXES} or None.")
        if self.age_group is not None and self.age_group not in AGE_GROUPS:
            raise ValueError(f"CellDescription.age_group={self.age_group!r}; expected one of {AGE_GROUPS} or None.")
        for name in ("cell_type", "tissue", "disease"):  # free-text labels (sex and age group are checked above)
            value = getattr(self, name)
            if value is not None and value != value.strip():
                raise ValueError(f"CellDescription.{name}={value!r} has leading or trailing whitespace.")
        for p in self.pathways:
            if (problem := pathway_name_problem(p)) is not None:
                raise ValueError(f"Pathway name {p!r} {problem}.")

    def to_dict(self) -> dict:
        return {f.name: (list(getattr(self, f.name)) if f.name == "pathways" else getattr(self, f.name)) for f in fields(self)}


#: What joins a cell's pathways in one AnnData obs column (`tl.describe`'s `<key>_pathways`), where a name holding
#: it would read back as two pathways. Descriptions, processors and the pipeline's lists hold such names
#: unambiguously (a model saved before they were refused loads): `tl.describe` refuses them, and new gene sets are
#: refused where they are read (`pathway_name_problem(name, joined=True)`).
PATHWAY_SEPARATOR = "; "


def pathway_name_problem(name: str, joined: bool = False) -> str | None:
    """Why `name` cannot be a pathway name (None: it can): the template quotes each name; `joined`, also where a
    cell's names are to be joined with `PATHWAY_SEPARATOR` in one obs column (a new corpus's gene sets)."""
    if '"' in name:
        return "contains a double quote, which descriptions use around pathway names"
    if joined and PATHWAY_SEPARATOR in name:
        return f"contains {PATHWAY_SEPARATOR!r}, which joins a cell's pathways in AnnData obs"
    return None


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _origin_sentence(d: CellDescription) -> str | None:
    if d.tissue is None and d.sex is None and d.disease is None and d.age_group is None:
        return None
    donor = "donor"
    if d.sex is not None:
        donor = f"{d.sex} {donor}"
    if d.disease == HEALTHY_DISEASE:
        donor = f"healthy {donor}"
    elif d.disease is not None:
        donor = f"{donor} with {d.disease}"
    source = f"the {d.tissue} of {_article(donor)} {donor}" if d.tissue is not None else f"{_article(donor)} {donor}"
    during = f" during {_AGE_PHRASES[d.age_group]}" if d.age_group is not None else ""
    return f"It originates from {source}{during}."


def render_description(description: CellDescription) -> str:
    """Render the fields of one cell as its description text."""
    d = description
    sentences = []
    if d.cell_type is not None:
        sentences.append(f"This sample consists of {_article(d.cell_type)} {d.cell_type}.")
        if d.cell_type_definition:
            sentences.append(f"Cell Ontology definition: {d.cell_type_definition}.")
    origin = _origin_sentence(d)
    if origin is not None:
        sentences.append(origin)
    for i, pathway in enumerate(d.pathways):
        lead = "This cell is associated with" if i == 0 else "Additionally, it involves"
        sentences.append(f'{lead} the pathway "{pathway}".')
    if not sentences:
        raise ValueError("A CellDescription with no fields cannot be rendered.")
    return " ".join(sentences)


# A cell-type label's characters: a period only between digits, as in every CL label that holds one ("NK1.1-positive
# ...", "Nav1.7"); any other period ends the sentence (off-template text such as "T cell.It ..." is not a label).
_CELL_TYPE_CHARS = r"(?:[^.]|(?<=\d)\.(?=\d))"
# A tissue or disease label: any text that does not run into another origin sentence, so that a definition holding
# one (CL:0011111's says "It originates from the olfactory placode ...") is read as the definition, not as the tissue.
_ORIGIN_LABEL = r"(?:(?!It originates from ).)+?"
_AGE_ALTERNATION = "|".join(re.escape(p) for p in sorted(_AGE_BY_PHRASE, key=len, reverse=True))
_DESCRIPTION_RE = re.compile(
    r"^\s*"
    r"(?:This sample consists of an? (?P<cell_type>" + _CELL_TYPE_CHARS + r"+?)\."
    r"(?:\s+Cell Ontology definition: (?P<definition>.+?)\.(?=\s+It originates from|\s+This cell is associated|\s*$))?"
    r")?"
    r"(?:\s*It originates from (?:the (?P<tissue>" + _ORIGIN_LABEL + r") of |)an? (?:(?P<healthy>healthy) )?"
    r"(?:(?P<sex>female|male) )?donor(?: with (?P<disease>" + _ORIGIN_LABEL + r"))?"
    r"(?: during (?P<age>" + _AGE_ALTERNATION + r"))?\."
    r"(?=\s+This cell is associated|\s*$))?"
    r'(?P<pathways>(?:\s*(?:This cell is associated with|Additionally, it involves) the pathway "[^"]+"\.)*)'
    r"\s*$",
    re.DOTALL,
)
_PATHWAY_RE = re.compile(r'(This cell is associated with|Additionally, it involves) the pathway "([^"]+)"\.')


def parse_description(text: str) -> CellDescription:
    """Parse a description back into its fields; raises `DescriptionParseError` if it does not follow the template."""
    match = _DESCRIPTION_RE.match(text)
    if match is None or not text.strip():
        raise DescriptionParseError(f"Text does not follow the Cell2Text description template: {text[:200]!r}")
    groups = match.groupdict()
    if groups["healthy"] and groups["disease"]:
        raise DescriptionParseError(f"Description says both healthy and a disease: {text[:200]!r}")
    pathway_matches = _PATHWAY_RE.findall(groups["pathways"] or "")
    leads = [lead for lead, _ in pathway_matches]
    if leads and (leads[0] != "This cell is associated with" or "This cell is associated with" in leads[1:]):
        raise DescriptionParseError(f"Pathway sentences are out of order: {text[:200]!r}")
    try:
        return CellDescription(
            cell_type=groups["cell_type"],
            cell_type_definition=groups["definition"],
            tissue=groups["tissue"],
            sex=groups["sex"],
            disease=HEALTHY_DISEASE if groups["healthy"] else groups["disease"],
            age_group=_AGE_BY_PHRASE[groups["age"]] if groups["age"] else None,
            pathways=tuple(name for _, name in pathway_matches),
        )
    except ValueError as err:
        raise DescriptionParseError(f"Description holds an invalid field ({err}): {text[:200]!r}") from err


def with_term_ids(fields: dict, ontology_term_ids: dict) -> dict:
    """`fields` (`CellDescription.to_dict()`) with `<field>_ontology_term_id` for every `ONTOLOGY_FIELDS` field:
    its label's id in `ontology_term_ids` (field -> label -> id), None where the label is missing or unknown."""
    ids = {f"{name}_ontology_term_id": ontology_term_ids.get(name, {}).get(fields.get(name)) if fields.get(name)
           else None for name in ONTOLOGY_FIELDS}
    return {**fields, **ids}


def set_definition(text: str, definition: str | None) -> str:
    """`text` with its cell type's definition sentence removed (`definition` None) or set to `definition`: what a
    model trained without the definitions reads and writes, and its description for the reader. A text without a
    cell type comes back unchanged. Raises `DescriptionParseError` for text that does not follow the template."""
    description = parse_description(text)
    definition = stored_definition(definition) if definition else None
    if description.cell_type is None or description.cell_type_definition == definition:
        return text
    return render_description(replace(description, cell_type_definition=definition))


def first_sentence(text: str) -> str:
    """The first sentence of a description, through its period (a label's own period, as in "NK1.1", stays inside)."""
    text = text.strip()
    return re.match(_CELL_TYPE_CHARS + "*", text).group(0) + "."


def parse_or_none(text: str) -> CellDescription | None:
    """`parse_description`, or None for text that does not follow the template (which counts as unparsed)."""
    try:
        return parse_description(text)
    except DescriptionParseError:
        return None


def label_spans(text: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the labels a description states: cell type, tissue, "healthy", sex,
    disease, age group and pathway names, what a schema-constrained decoder chooses (it writes the template words
    and the definition itself). Raises `DescriptionParseError` for text that does not follow the template."""
    match = _DESCRIPTION_RE.match(text)
    if match is None or not text.strip():
        raise DescriptionParseError(f"Text does not follow the Cell2Text description template: {text[:200]!r}")
    spans = [match.span(group) for group in ("cell_type", "tissue", "healthy", "sex", "disease", "age")
             if match.group(group)]
    start = match.start("pathways")
    spans += [(start + m.start(2), start + m.end(2)) for m in _PATHWAY_RE.finditer(match.group("pathways") or "")]
    return sorted(spans)


# ----------------------------------------------------------------------------- the template as choices


@dataclass(frozen=True)
class SchemaOption:
    """One way to fill a choice of the template: the labels it states (field -> label) and the text it adds."""

    labels: tuple[tuple[str, str | None], ...]
    text: str


def cell_type_option(label: str) -> SchemaOption:
    """The first sentence naming `label` (no leading space: it opens the description)."""
    return SchemaOption((("cell_type", label),), f"This sample consists of {_article(label)} {label}.")


def definition_text(definition: str) -> str:
    """The definition sentence that follows the cell type, as `render_description` writes it."""
    return f" Cell Ontology definition: {stored_definition(definition)}."


def tissue_option(tissue: str) -> SchemaOption:
    """The origin sentence up to the donor's article: the article ends the tissue, so that "lamina propria" is not
    the start of "lamina propria of mucosa of colon" (an option that is the start of another always wins over it:
    the longer one adds log-probabilities, all negative). The donor clause always starts "a" (`SEXES`, "healthy",
    "donor")."""
    return SchemaOption((("tissue", tissue),), f" It originates from the {tissue} of a")


def donor_option(sex: str | None, disease: str | None, age_group: str | None, after_tissue: bool) -> SchemaOption:
    """The rest of the origin sentence ("healthy female donor during adulthood." after `tissue_option`'s text, "a
    healthy female donor during adulthood." where it starts the sentence)."""
    sentence = _origin_sentence(CellDescription(tissue="x" if after_tissue else None, sex=sex, disease=disease,
                                                age_group=age_group))
    lead = "It originates from the x of a " if after_tissue else "It originates from "
    if not sentence.startswith(lead):
        raise ValueError(f"the origin sentence {sentence!r} does not start {lead!r}, which tissue_option writes")
    return SchemaOption((("sex", sex), ("disease", disease), ("age_group", age_group)),
                        " " + (sentence[len(lead):] if after_tissue else sentence))


def pathway_option(pathway: str, position: int) -> SchemaOption:
    lead = "This cell is associated with" if position == 0 else "Additionally, it involves"
    return SchemaOption(((f"pathway_{position + 1}", pathway),), f' {lead} the pathway "{pathway}".')


def schema_options(labels: dict[str, list[str]]) -> dict[str, list[SchemaOption]]:
    """The options of each choice of the template, from each field's known labels (`labels[field]`, "pathways" for
    pathway names). One rule for every field: a field is stated with one of its known labels, and a field without
    known labels is left out of the description. A choice whose fields are all unknown is absent from the result,
    but for the donor clause after a known tissue: the origin sentence still ends "of a donor." (its one option)."""
    known = {name: [label for label in labels.get(name) or []] for name in (*LABEL_FIELD_NAMES, "pathways")}
    options: dict[str, list[SchemaOption]] = {}
    if known["cell_type"]:
        options["cell_type"] = [cell_type_option(label) for label in known["cell_type"]]
    if known["tissue"]:
        options["tissue"] = [tissue_option(label) for label in known["tissue"]]
    donor_fields = [known["sex"] or [None], known["disease"] or [None], known["age_group"] or [None]]
    if known["tissue"] or known["sex"] or known["disease"] or known["age_group"]:
        options["donor"] = [donor_option(sex, disease, age, bool(known["tissue"]))
                            for sex in donor_fields[0] for disease in donor_fields[1] for age in donor_fields[2]]
    if known["pathways"]:
        options["pathway_1"] = [pathway_option(p, 0) for p in known["pathways"]]
        options["pathway_2"] = [pathway_option(p, 1) for p in known["pathways"]]
    return options
