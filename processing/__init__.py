"""Corpus building for Cell2Text: ontologies, pathway scoring, descriptions, splits."""
