"""The one place that chooses which ontology releases Cell2Text reads.

``cellxgene-ontology-guide`` bundles several releases of the Cell Ontology, UBERON, MONDO, HsapDv and PATO, one set
per CELLxGENE schema version, and its default is the newest schema it ships: upgrading the package would silently
change labels and definitions. Everything that reads ontologies opens them through :func:`ontology_parser`, and
corpora and cards record :func:`ontology_versions`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: a GPU machine's benchmark imports this module without the package
    from cellxgene_ontology_guide.ontology_parser import OntologyParser
    from cellxgene_ontology_guide.supported_versions import CXGSchema

#: CELLxGENE schema version whose ontology releases are read (shipped by cellxgene-ontology-guide 1.11).
CELLXGENE_SCHEMA_VERSION = "7.1.0"
#: The ontologies the project reads (labels, definitions, graphs).
USED_ONTOLOGIES = ("CL", "UBERON", "MONDO", "HsapDv", "PATO")


def _schema() -> CXGSchema:
    from cellxgene_ontology_guide.supported_versions import CXGSchema

    try:
        return CXGSchema(version=CELLXGENE_SCHEMA_VERSION)
    except ValueError as error:
        raise ValueError(
            f"The installed cellxgene-ontology-guide does not ship CELLxGENE schema {CELLXGENE_SCHEMA_VERSION} "
            f"({error}); install a release that does: pip install 'cellxgene-ontology-guide>=1.11,<2'."
        ) from error


@lru_cache(maxsize=1)
def ontology_parser() -> OntologyParser:
    """An ``OntologyParser`` pinned to :data:`CELLXGENE_SCHEMA_VERSION` (bundled data, no network)."""
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    _schema()  # a precise error where the installed package lacks the schema
    return OntologyParser(schema_version=CELLXGENE_SCHEMA_VERSION)


def ontology_versions() -> dict[str, str]:
    """``{"cellxgene_schema": "7.1.0", "CL": "v2026-03-26", ...}`` for :data:`USED_ONTOLOGIES`."""
    supported = _schema().supported_ontologies
    return {"cellxgene_schema": CELLXGENE_SCHEMA_VERSION} | {
        name: str(supported[name]["version"]) for name in USED_ONTOLOGIES
    }
