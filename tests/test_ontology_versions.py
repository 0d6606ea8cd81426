"""The ontology releases are chosen in one place and are what the ontology facts are read from."""

from processing import ontologies
from processing.ontology_versions import CELLXGENE_SCHEMA_VERSION, USED_ONTOLOGIES, ontology_versions


def test_the_pinned_schema_decides_the_releases_read_and_recorded():
    versions = ontology_versions()
    assert versions["cellxgene_schema"] == CELLXGENE_SCHEMA_VERSION
    assert set(versions) == {"cellxgene_schema", *USED_ONTOLOGIES}
    assert all(versions[name] for name in USED_ONTOLOGIES)
    assert ontologies.parser().cxg_schema.version == CELLXGENE_SCHEMA_VERSION
    assert ontologies.parser().cxg_schema.supported_ontologies["CL"]["version"] == versions["CL"]
