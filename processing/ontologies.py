"""Ontology facts (labels, definitions, graphs, age buckets) from one owner.

Everything reads the ontologies bundled offline with ``cellxgene-ontology-guide`` (the
versions the CELLxGENE schema uses), so corpus text and evaluation graphs agree.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import networkx as nx

from modeling_cell2text.description_schema import AGE_GROUPS
from processing.ontology_versions import ontology_parser

if TYPE_CHECKING:  # the package is imported where a parser is made (`ontology_versions.ontology_parser`)
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

logger = logging.getLogger(__name__)

#: Ontologies whose terms can be looked up.
SUPPORTED_ONTOLOGIES = ("CL", "UBERON", "MONDO", "HsapDv", "PATO")
#: Ontologies for which :func:`ontology_graph` builds a graph.
GRAPH_ONTOLOGIES = ("CL", "UBERON", "MONDO")
#: CELLxGENE placeholder values that are not ontology terms.
NON_TERMS = ("unknown", "na")


class UnknownTermError(KeyError):
    """An ontology term id is not defined in the bundled ontology."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


@lru_cache(maxsize=1)
def parser() -> OntologyParser:
    """The shared, lazily created OntologyParser (bundled data, no network), pinned to the releases that
    `processing.ontology_versions` chooses."""
    return ontology_parser()


def ontology_name(term_id: str) -> str:
    """Ontology prefix of a term id, e.g. ``"CL"`` for ``"CL:0000236"``."""
    prefix = term_id.split(":", 1)[0] if ":" in term_id else ""
    for name in SUPPORTED_ONTOLOGIES:
        if prefix.lower() == name.lower():
            return name
    raise UnknownTermError(
        f"{term_id!r} is not a term id of a supported ontology {SUPPORTED_ONTOLOGIES}; "
        "expected the form 'CL:0000236'."
    )


@lru_cache(maxsize=None)
def _terms(name: str) -> dict[str, dict[str, Any]]:
    """All term records of one ontology (id -> label, description, ancestors, ...)."""
    return parser().cxg_schema.ontology(name)


def _record(term_id: str) -> dict[str, Any]:
    """The raw record of a term; raises UnknownTermError when it is not defined."""
    record = _terms(ontology_name(term_id)).get(term_id)
    if record is None:
        raise UnknownTermError(
            f"{term_id!r} is not defined in the bundled {ontology_name(term_id)} ontology; "
            "check the id (CELLxGENE schema versions) or map it to a current term."
        )
    return record


def is_known_term(term_id: str) -> bool:
    """Whether ``term_id`` is defined (deprecated or not) in a supported ontology."""
    try:
        _record(term_id)
    except UnknownTermError:
        return False
    return True


def is_deprecated(term_id: str) -> bool:
    """Whether a defined term is marked obsolete."""
    return bool(_record(term_id).get("deprecated", False))


def resolve_term(term_id: str) -> str:
    """The current id for ``term_id``: its ``replaced_by`` target when deprecated, else itself.

    A deprecated term without a replacement is returned unchanged (it keeps its label).
    """
    seen = {term_id}
    record = _record(term_id)
    while record.get("deprecated") and record.get("replaced_by"):
        replacement = record["replaced_by"]
        if replacement in seen or not is_known_term(replacement):
            break
        seen.add(replacement)
        term_id, record = replacement, _record(replacement)
    return term_id


def term_label(term_id: str, follow_replacement: bool = True) -> str:
    """Human-readable label of a term, e.g. ``"B cell"`` for CL:0000236."""
    if follow_replacement:
        term_id = resolve_term(term_id)
    return str(_record(term_id)["label"])


def term_definition(term_id: str, follow_replacement: bool = True) -> str | None:
    """Textual definition of a term, or None when the ontology gives none."""
    if follow_replacement:
        term_id = resolve_term(term_id)
    return _record(term_id).get("description")


@lru_cache(maxsize=None)
def _label_index(name: str) -> dict[str, str]:
    """Label -> term id of one ontology; current terms win over deprecated ones with the same label."""
    index: dict[str, str] = {}
    for term_id, record in sorted(_terms(name).items(), key=lambda item: bool(item[1].get("deprecated"))):
        index.setdefault(str(record["label"]), term_id)
    return index


def term_id_of_label(name: str, label: str) -> str | None:
    """The id of the term of ontology ``name`` (e.g. "CL") whose label is exactly ``label``, or None."""
    if name not in SUPPORTED_ONTOLOGIES:
        raise UnknownTermError(f"{name!r} is not a supported ontology {SUPPORTED_ONTOLOGIES}.")
    return _label_index(name).get(label)


def term_parents(term_id: str) -> list[str]:
    """Direct parents (distance-1 ancestors; is_a and part_of alike) of a term."""
    return [a for a, distance in _record(term_id)["ancestors"].items() if distance == 1]


#: UBERON's root of life cycle stages (the development stage ids of organisms without a stage ontology of their own);
#: UBERON's other terms are anatomical entities (tissue ids).
UBERON_LIFE_CYCLE_STAGE = "UBERON:0000105"


def is_life_cycle_stage(term_id: str) -> bool:
    """Whether a UBERON term is a life cycle stage (UBERON:0000105 or below it) rather than an anatomical entity."""
    return term_id == UBERON_LIFE_CYCLE_STAGE or UBERON_LIFE_CYCLE_STAGE in _record(term_id)["ancestors"]


def term_ancestors(term_id: str) -> dict[str, int]:
    """All ancestors of a term with their distance (1 = direct parent)."""
    return dict(_record(term_id)["ancestors"])


@lru_cache(maxsize=None)
def ontology_graph(name: str) -> nx.DiGraph:
    """Graph of one ontology: a node per current term (attribute ``label``), edges child -> parent.

    Deprecated terms are left out (they have no parents and would be isolated nodes). The
    graph is cached: do not mutate it; copy it first.
    """
    if name not in GRAPH_ONTOLOGIES:
        raise ValueError(f"No ontology graph for {name!r}; choose one of {GRAPH_ONTOLOGIES}.")
    terms = _terms(name)
    graph = nx.DiGraph(name=name)
    for term_id, record in terms.items():
        if record.get("deprecated"):
            continue
        graph.add_node(term_id, label=record["label"])
    for term_id in list(graph.nodes):
        for parent, distance in terms[term_id]["ancestors"].items():
            if distance == 1 and parent in graph:
                graph.add_edge(term_id, parent)
    logger.debug("Built %s graph: %d terms, %d edges", name, graph.number_of_nodes(), graph.number_of_edges())
    return graph


# --- Development stage -> age bucket -------------------------------------------------

#: The paper's age buckets, youngest first; the description schema owns the list.
AGE_BUCKETS = AGE_GROUPS

#: Lower age bound in years (inclusive) of each postnatal bucket.
#:   infancy          0  <= age < 2   (newborn, months, the 1-year-old stage)
#:   early childhood  2  <= age < 6
#:   childhood        6  <= age < 13
#:   adolescence      13 <= age < 20
#:   young adulthood  20 <= age < 30
#:   adulthood        30 <= age < 45
#:   middle age       45 <= age < 65
#:   elderly          65 <= age < 80
#:   advanced elderly 80 <= age
#: Prenatal: HsapDv "embryonic stage" (Carnegie stages, weeks 1-8 post-fertilization) ->
#: "early embryonic"; "fetal stage" (week 9 to birth) -> "late embryonic".
#: A stage names a bucket only where every age it covers lies in that bucket: "60-79 year-old", "fifth decade"
#: (40-49) or "adult stage" span two or more, and give None rather than one stated with confidence.
POSTNATAL_BUCKET_STARTS = (
    (80.0, "advanced elderly"),
    (65.0, "elderly"),
    (45.0, "middle age"),
    (30.0, "adulthood"),
    (20.0, "young adulthood"),
    (13.0, "adolescence"),
    (6.0, "childhood"),
    (2.0, "early childhood"),
    (0.0, "infancy"),
)

#: Stages whose label gives no age, within one bucket by their HsapDv definition (current and deprecated labels).
#: Absent, so None: stages spanning several buckets by their definition ("child stage (1-4 yo)", "pediatric
#: stage", "juvenile stage (5-14 yo)", "young adult stage" (under 40), "adult stage", "prime adult stage", "middle
#: aged stage" (40-60), "late adult stage" (over 60), "aged stage" (over 65)...) and the whole life ("life cycle",
#: "postnatal stage", "prenatal stage").
_STAGE_LABEL_BUCKETS = {
    "embryonic stage": "early embryonic",
    "fetal stage": "late embryonic",
    "newborn stage": "infancy",
    "newborn stage (0-28 days)": "infancy",
    "nursing stage (0-11 months)": "infancy",
    "infant stage": "infancy",  # current: 28 days to 12 months; deprecated: to 24 months
    "under-1-year-old stage": "infancy",
    "adolescent stage": "adolescence",  # deprecated: over 13 and under 19
    "centenarian stage": "advanced elderly",
}

_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
    "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11,
}


def _ages_in_years(label: str) -> tuple[float, float] | None:
    """The ages [from, to) in years a postnatal HsapDv label names, or None when it names none."""
    if m := re.fullmatch(r"(\d+)-month-old stage", label):
        return int(m.group(1)) / 12.0, (int(m.group(1)) + 1) / 12.0
    if m := re.fullmatch(r"(\d+)-(\d+) year-old(?: child)?(?: stage)?", label):
        return float(m.group(1)), int(m.group(2)) + 1.0
    if m := re.fullmatch(r"(\d+)[- ]year-old( and over)? stage", label):
        return float(m.group(1)), float("inf") if m.group(2) else int(m.group(1)) + 1.0
    if m := re.fullmatch(r"(\w+) decade stage", label):
        if m.group(1) in _ORDINALS:
            return 10.0 * (_ORDINALS[m.group(1)] - 1), 10.0 * _ORDINALS[m.group(1)]
    return None


def age_to_bucket(age_years: float) -> str:
    """Postnatal age bucket for an age in years (see POSTNATAL_BUCKET_STARTS)."""
    if age_years < 0:
        raise ValueError(f"Age must be >= 0 years, got {age_years}.")
    return next(bucket for start, bucket in POSTNATAL_BUCKET_STARTS if age_years >= start)


def _bucket_of_label(label: str) -> str | None:
    """Bucket named by one stage label, by its ages or by the coarse-stage table."""
    ages = _ages_in_years(label)
    if ages is None:
        return _STAGE_LABEL_BUCKETS.get(label)
    first, last = age_to_bucket(ages[0]), age_to_bucket(min(ages[1], 1000.0) - 1e-6)
    return first if first == last else None


def development_stage_to_age_bucket(hsapdv_term_id: str) -> str | None:
    """The paper's age bucket (one of AGE_BUCKETS) for a human development stage term.

    Returns None for "unknown"/"na" and for stages whose ages span several buckets (adult
    stage, 60-79 year-old, fifth decade; life cycle, postnatal). Deprecated terms follow
    ``replaced_by``; without a replacement their label is still used. A stage without a bucket
    of its own takes the bucket of its nearest ancestor that has one (e.g. Carnegie stage 12 ->
    embryonic): an ancestor's ages hold the stage's, so that bucket holds them too.
    """
    if hsapdv_term_id in NON_TERMS:
        return None
    if ontology_name(hsapdv_term_id) != "HsapDv":
        raise ValueError(
            f"{hsapdv_term_id!r} is not a human development stage (HsapDv) term; "
            "age buckets are defined for HsapDv only."
        )
    term_id = resolve_term(hsapdv_term_id)
    bucket = _bucket_of_label(term_label(term_id, follow_replacement=False))
    if bucket is not None:
        return bucket
    for ancestor, _ in sorted(term_ancestors(term_id).items(), key=lambda item: item[1]):
        bucket = _bucket_of_label(term_label(ancestor, follow_replacement=False))
        if bucket is not None:
            return bucket
    return None
